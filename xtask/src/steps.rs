//! Quiet output for every task: one line per step with the time it took, and the errors.
//!
//! What nested commands print (cargo's `Compiling ...`, the eBPF build's forwarded warnings,
//! apt-get, rustup) goes to a log file of the task, `target/xtask/TASK.log`, named once at the
//! start. `--verbose` prints all of it as it comes instead. When a nested command fails, its
//! errors are taken from the log and become part of the error the task ends with, so a failure
//! shows what went wrong without the chatter of what went right.

use std::{
    fmt::Write as _,
    fs::{File, OpenOptions},
    io::{Read as _, Seek as _, SeekFrom, Write as _},
    path::PathBuf,
    process::{Command, ExitStatus, Stdio},
    sync::OnceLock,
    time::Instant,
};

use anyhow::{Context as _, bail};

/// Lines of a failed command's output shown when it printed no recognisable error.
const TAIL_LINES: usize = 30;
/// At most this many lines of errors in one failure.
const MAX_ERROR_LINES: usize = 80;

struct Output {
    verbose: bool,
    log: PathBuf,
}

static OUTPUT: OnceLock<Output> = OnceLock::new();

/// Starts the log of `task` (truncated) and says where it is, or, with `verbose`, that nested
/// output is shown as it comes.
pub fn init(task: &str, verbose: bool) -> anyhow::Result<()> {
    let dir = crate::workspace().join("target/xtask");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let log = dir.join(format!("{task}.log"));
    File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    if verbose {
        println!("==> {task}: --verbose, nested output is shown as it comes");
    } else {
        let shown = log
            .strip_prefix(crate::workspace())
            .map_or_else(|_| log.clone(), std::path::Path::to_owned);
        println!(
            "==> {task}: output of nested builds goes to {} (--verbose shows it)",
            shown.display()
        );
    }
    let _ = OUTPUT.set(Output { verbose, log });
    Ok(())
}

fn output() -> &'static Output {
    OUTPUT.get_or_init(|| Output {
        verbose: true,
        log: PathBuf::new(),
    })
}

/// Runs one step: prints `==> NAME ... RESULT (N s)`, `RESULT` being what `body` returns (what
/// it did or skipped). With `--verbose` the name goes on a line of its own first, so nested
/// output is shown under it.
pub fn step(name: &str, body: impl FnOnce() -> anyhow::Result<String>) -> anyhow::Result<()> {
    let start = Instant::now();
    if output().verbose {
        println!("==> {name}");
    } else {
        print!("==> {name} ... ");
        let _ = std::io::stdout().flush();
    }
    let result = body();
    let took = start.elapsed().as_secs_f64();
    match &result {
        Ok(what) if output().verbose => println!("==> {name}: {what} ({took:.1} s)"),
        Ok(what) => println!("{what} ({took:.1} s)"),
        Err(_) if output().verbose => println!("==> {name}: failed ({took:.1} s)"),
        Err(_) => println!("failed ({took:.1} s)"),
    }
    result.map(drop)
}

/// Runs `command` to completion with its output in the log (or shown, with `--verbose`) and
/// returns that output. A failure is an error that names the command and the log and carries
/// the errors the command printed.
pub fn run(command: &mut Command) -> anyhow::Result<String> {
    let (status, text) = run_status(command)?;
    if !status.success() {
        bail!("{}", failure(command, status, &text));
    }
    Ok(text)
}

/// As `run`, but returns the exit status with the output instead of failing on it.
pub fn run_status(command: &mut Command) -> anyhow::Result<(ExitStatus, String)> {
    let out = output();
    command.stdin(Stdio::null());
    if out.verbose {
        let status = command
            .status()
            .with_context(|| format!("running {}", describe(command)))?;
        return Ok((status, String::new()));
    }
    let mut log = OpenOptions::new()
        .append(true)
        .read(true)
        .open(&out.log)
        .with_context(|| format!("opening {}", out.log.display()))?;
    let start = log.seek(SeekFrom::End(0)).context("seeking the log")?;
    let _ = writeln!(log, "\n$ {}", describe(command));
    let status = command
        .stdout(log.try_clone().context("log file")?)
        .stderr(log.try_clone().context("log file")?)
        .status()
        .with_context(|| format!("running {}", describe(command)))?;
    let mut text = String::new();
    log.seek(SeekFrom::Start(start))
        .context("seeking the log")?;
    log.read_to_string(&mut text)
        .with_context(|| format!("reading {}", out.log.display()))?;
    Ok((status, text))
}

/// The error of a failed command: its name and status, where its whole output is, and the
/// lines that say what went wrong.
pub fn failure(command: &Command, status: ExitStatus, text: &str) -> String {
    let out = output();
    let mut message = format!("`{}` failed ({status})", describe(command));
    if !out.verbose {
        let _ = write!(
            message,
            "; its output is in {}; what it reported:\n{}",
            out.log.display(),
            errors(text)
        );
    }
    message
}

/// The lines of `text` that carry errors: rustc/cargo diagnostics (from `error` to the blank
/// line that ends one), apt's `E:` lines, panics, and failed tests (from `failures:` to `test
/// result:`, which holds each failed test's output and the list of names). Its last lines when
/// none of those is there.
#[must_use]
pub fn errors(text: &str) -> String {
    enum Mode {
        Outside,
        Diagnostic,
        Tests,
    }
    let lines: Vec<&str> = text.lines().collect();
    let mut picked: Vec<&str> = Vec::new();
    let mut mode = Mode::Outside;
    for line in &lines {
        match mode {
            Mode::Outside if line.starts_with("failures:") => mode = Mode::Tests,
            Mode::Outside
                if line.starts_with("error")
                    || line.starts_with("E: ")
                    || line.contains("panicked at") =>
            {
                mode = Mode::Diagnostic;
            }
            Mode::Outside => continue,
            Mode::Diagnostic if line.trim().is_empty() => {
                mode = Mode::Outside;
                picked.push(line);
                continue;
            }
            Mode::Tests if line.starts_with("test result:") => {
                mode = Mode::Outside;
                picked.push(line);
                continue;
            }
            Mode::Diagnostic | Mode::Tests => {}
        }
        picked.push(line);
    }
    if picked.is_empty() {
        picked = lines[lines.len().saturating_sub(TAIL_LINES)..].to_vec();
    }
    if picked.len() > MAX_ERROR_LINES {
        let left = picked.len() - MAX_ERROR_LINES;
        picked.truncate(MAX_ERROR_LINES);
        return format!("{}\n... ({left} more lines in the log)", picked.join("\n"));
    }
    picked.join("\n").trim_end().to_owned()
}

/// `program arg ...`, as a person would type it.
#[must_use]
pub fn describe(command: &Command) -> String {
    let mut words = vec![command.get_program().to_string_lossy().into_owned()];
    words.extend(command.get_args().map(|a| a.to_string_lossy().into_owned()));
    words.join(" ")
}
