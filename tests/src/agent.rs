//! Running `lb-agent` inside a node namespace, as a user would, and waiting until it serves.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    path::Path,
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::netns::{Netns, Process, run};

/// What `lb-agent run` logs once it is attached (see `READY_LINE` in lb-userspace).
const READY_LINE: &str = "lb-agent is serving";
/// What it logs after SIGHUP once the re-read config is applied, or refused.
const RELOADED: &str = "config reloaded";
const RELOAD_REFUSED: &str = "config reload refused";

pub struct Agent {
    process: Process,
    log: Arc<Mutex<String>>,
}

impl Agent {
    /// Starts `lb-agent run --config CONFIG --iface IFACE ARGS...` in `node` and waits (at most
    /// `timeout`) for it to report that it serves.
    ///
    /// With `--pin-dir` among `extra_args` the agent runs with the host's mounts (see
    /// `Netns::command_with_host_mounts`), so its pins stay on the host's bpffs after it exits
    /// and the next agent finds them; otherwise it runs under `ip netns exec`, as before.
    pub fn start(
        node: &Netns,
        agent_bin: &Path,
        config: &Path,
        iface: &str,
        extra_args: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        Self::start_through(&[], node, agent_bin, config, iface, extra_args, timeout)
    }

    /// As `start`, with `launcher` (a program and its arguments, such as `setpriv
    /// --bounding-set=... --`) in front of the agent. The launcher must exec the agent, not fork
    /// it: the pid held is checked to be the agent's.
    pub fn start_through(
        launcher: &[&str],
        node: &Netns,
        agent_bin: &Path,
        config: &Path,
        iface: &str,
        extra_args: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let pinned = extra_args
            .iter()
            .any(|a| *a == "--pin-dir" || a.starts_with("--pin-dir="));
        let agent = agent_bin.to_string_lossy();
        let (program, before_agent) = match launcher.split_first() {
            Some((program, args)) => (*program, args),
            None => (agent.as_ref(), &[][..]),
        };
        let mut command = if pinned {
            node.command_with_host_mounts(program)
        } else {
            node.command(program)
        };
        if !launcher.is_empty() {
            command.args(before_agent).arg(agent_bin);
        }
        command
            .args(["run", "--config"])
            .arg(config)
            .args(["--iface", iface, "--stats-interval", "0"])
            .args(extra_args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut process = Process::spawn(&mut command)?;
        let stderr = process.child_mut().stderr.take().context("agent stderr")?;
        let log = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(mut log) = sink.lock() {
                    log.push_str(&line);
                    log.push('\n');
                }
            }
        });
        let mut agent = Agent { process, log };
        let deadline = Instant::now() + timeout;
        loop {
            if agent.log().contains(READY_LINE) {
                break;
            }
            if let Some(status) = agent.process.child_mut().try_wait()? {
                bail!(
                    "lb-agent exited with {status} before serving:\n{}",
                    agent.log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "lb-agent did not serve within {timeout:?}:\n{}",
                    agent.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if pinned || !launcher.is_empty() {
            agent.check_pid_is_the_agent(agent_bin)?;
        }
        Ok(agent)
    }

    /// Makes sure the pid we hold is `lb-agent` itself and not a launcher in front of it, so
    /// that `kill9` kills the agent (a launcher would die and leave the agent running).
    fn check_pid_is_the_agent(&self, agent_bin: &Path) -> anyhow::Result<()> {
        let pid = self.process.id();
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
            .with_context(|| format!("reading /proc/{pid}/exe"))?;
        let expected = agent_bin
            .canonicalize()
            .with_context(|| format!("resolving {}", agent_bin.display()))?;
        if exe != expected {
            bail!(
                "process {pid} runs {}, not {}: the launcher forked instead of exec'ing the \
                 agent, so signals would miss it",
                exe.display(),
                expected.display()
            );
        }
        Ok(())
    }

    /// The agent's process id.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.process.id()
    }

    /// Kills the agent with SIGKILL, as a crash or an OOM kill would: it gets no chance to
    /// detach or unpin anything. Reaps it and returns its log.
    pub fn kill9(mut self) -> anyhow::Result<String> {
        let status = self.process.kill9()?;
        // Let the reader thread drain the last lines.
        std::thread::sleep(Duration::from_millis(100));
        if status.code().is_some() {
            bail!(
                "lb-agent had exited ({status}) before SIGKILL:\n{}",
                self.log()
            );
        }
        Ok(self.log())
    }

    /// Everything the agent logged so far.
    #[must_use]
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Waits at most `timeout` until the log has more `line`s than `before` had; an error
    /// carrying the log otherwise.
    pub fn wait_for_log(&self, before: &str, line: &str, timeout: Duration) -> anyhow::Result<()> {
        let count = |log: &str| log.matches(line).count();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if count(&self.log()) > count(before) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "the agent did not log {line:?} within {timeout:?}:\n{}",
            self.log()
        )
    }

    /// Sends SIGHUP (re-read the config file) and waits at most `timeout` until the agent says it
    /// applied it. A refused config, an exit or silence is an error that carries the log.
    pub fn reload(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let count = |log: &str, line: &str| log.matches(line).count();
        let before = self.log();
        let (reloaded, refused) = (count(&before, RELOADED), count(&before, RELOAD_REFUSED));
        self.process.signal("HUP")?;
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if count(&log, RELOAD_REFUSED) > refused {
                bail!("lb-agent refused the new config:\n{log}");
            }
            if count(&log, RELOADED) > reloaded {
                return Ok(());
            }
            if let Some(status) = self.process.child_mut().try_wait()? {
                bail!("lb-agent exited with {status} after SIGHUP:\n{log}");
            }
            if Instant::now() > deadline {
                bail!("lb-agent did not log {RELOADED:?} within {timeout:?} of SIGHUP:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the agent with SIGTERM, as a service manager would; returns its log.
    pub fn stop(mut self) -> anyhow::Result<String> {
        let status = self.process.terminate(Duration::from_secs(10))?;
        // Let the reader thread drain the last lines.
        std::thread::sleep(Duration::from_millis(100));
        if !status.success() {
            bail!("lb-agent exited with {status}:\n{}", self.log());
        }
        Ok(self.log())
    }
}

/// Runs `lb-agent cleanup --pin-dir PIN_DIR` with the host's mounts (where the pins are) and
/// returns what it printed; a failure carries its stderr.
pub fn cleanup(agent_bin: &Path, pin_dir: &Path) -> anyhow::Result<String> {
    let output = run(std::process::Command::new(agent_bin)
        .args(["cleanup", "--pin-dir"])
        .arg(pin_dir))?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The last `counters: name=value ... drops: reason=value ...` line of an agent log, as one map
/// of counter and drop reason names to values (the names do not overlap). Counters the agent did
/// not print are zero, as the agent leaves zeros out. `None` if the log has no such line.
#[must_use]
pub fn final_counters(log: &str) -> Option<BTreeMap<String, u64>> {
    let line = log.lines().rev().find(|l| l.contains("counters:"))?;
    let (_, values) = line.split_once("counters:")?;
    Some(
        values
            .split_whitespace()
            .filter_map(|word| word.split_once('='))
            .filter_map(|(name, value)| Some((name.to_owned(), value.parse().ok()?)))
            .collect(),
    )
}

/// The workspace root (the parent of `tests/`).
#[must_use]
pub fn workspace() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| Path::new(".").to_owned(), Path::to_owned)
}

/// `lb-agent` from `LB_AGENT_BIN`, or the debug build of this workspace (`cargo xtask test`
/// builds it first).
///
/// # Panics
/// If it does not exist, with what to run.
#[must_use]
pub fn agent_bin() -> std::path::PathBuf {
    let path = std::env::var_os("LB_AGENT_BIN").map_or_else(
        || workspace().join("target/debug/lb-agent"),
        std::path::PathBuf::from,
    );
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask test`, or `cargo build -p lb-userspace` first",
        path.display()
    );
    path
}
