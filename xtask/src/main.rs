//! `cargo xtask`: setting up a machine, running the tests, the demo and the benchmark.

mod bench;
mod demo;
mod image;
mod setup;
mod steps;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::bail;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Project tasks: setup, test, demo, bench, image")]
struct Cli {
    /// Show the output of nested builds and installs as it comes, instead of one line per step
    /// (with the output in target/xtask/TASK.log).
    #[arg(long, short, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what this machine lacks (idempotent): nightly rust-src, bpf-linker for LLVM 22,
    /// Debian packages for the tests and demo, and a mounted bpffs.
    Setup,
    /// Run the whole test suite: unit, `BPF_PROG_TEST_RUN` and network-namespace tests (root).
    Test {
        /// Extra arguments for `cargo test`, after `--` (for example a test name filter).
        #[arg(last = true)]
        cargo_test_args: Vec<String>,
    },
    /// Build, create a demo topology in network namespaces, run lb-agent on it with
    /// manifests/examples/demo.yaml, send requests through the `NodePort` and the `LoadBalancer` IP,
    /// print what each backend saw, and tear everything down.
    Demo {
        /// Requests per frontend.
        #[arg(long, default_value_t = 30)]
        requests: u32,
    },
    /// Measure the data path and the control plane against Katran's selftest balancer,
    /// kube-proxy's iptables and nftables layouts and a bare XDP redirect (root). Writes
    /// bench/results/<date>-<sha>.{json,md,svg} and the README's "Performance" section.
    Bench {
        /// A short run (CI): fewer repeats and a subset; results go to target/bench-quick and
        /// the README is left alone.
        #[arg(long)]
        quick: bool,
        /// Only these sections: testrun, live, control, maglev (comma separated).
        #[arg(long)]
        only: Option<String>,
    },
    /// Build a static lb-agent (musl) and write it as an OCI image archive (umoci, no container
    /// daemon) to target/image/, tagged localhost/lb-agent:VERSION, the image
    /// manifests/lb-agent.yaml names. The last line printed is the archive's path.
    Image {
        /// The `org.opencontainers.image.source` label; default: the URL of the git remote
        /// `origin`, if there is one.
        #[arg(long)]
        source: Option<String>,
    },
}

impl Task {
    fn name(&self) -> &'static str {
        match self {
            Task::Setup => "setup",
            Task::Test { .. } => "test",
            Task::Demo { .. } => "demo",
            Task::Bench { .. } => "bench",
            Task::Image { .. } => "image",
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let verbose = cli.verbose;
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // The error and its causes, without the backtrace `RUST_BACKTRACE` would add: a failed
        // step is not a bug in xtask, and its errors are what matters. --verbose keeps it.
        Err(error) if verbose => {
            eprintln!("Error: {error:?}");
            std::process::ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("Error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    steps::init(cli.command.name(), cli.verbose)?;
    match cli.command {
        Task::Setup => setup::run(),
        Task::Test { cargo_test_args } => test(&cargo_test_args),
        Task::Demo { requests } => {
            setup::run()?;
            demo::run(requests)
        }
        Task::Bench { quick, only } => bench::run(quick, only.as_deref()),
        Task::Image { source } => {
            setup::run()?;
            image::run(source)
        }
    }
}

/// The workspace root (xtask lives one level below it).
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_owned)
}

/// `cargo ARGS` in the workspace with extra environment `envs`.
fn cargo_command(args: &[&str], envs: &[(&str, &Path)]) -> Command {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut command = Command::new(cargo);
    command
        .args(args)
        .envs(envs.iter().copied())
        .current_dir(workspace());
    command
}

/// Runs `cargo ARGS` in the workspace, its output in the task's log (`steps`).
fn cargo(args: &[&str], envs: &[(&str, &Path)]) -> anyhow::Result<()> {
    steps::run(&mut cargo_command(args, envs)).map(drop)
}

fn test(extra: &[String]) -> anyhow::Result<()> {
    setup::run()?;
    require_root("the tests load eBPF programs and create network namespaces")?;
    // Namespaces a killed earlier run could not remove.
    integration_tests::netns::Netns::remove_stale("lbt");
    remove_stale_pins("lbt");
    steps::step("building lb-agent and the test peers (debug)", || {
        cargo(
            &["build", "-p", "lb-userspace", "-p", "integration-tests"],
            &[],
        )?;
        Ok("done".to_owned())
    })?;
    let agent = workspace().join("target/debug/lb-agent");
    // tests/tests/image.rs builds the image from it, as `cargo xtask image` does.
    let static_agent = image::build_static_agent()?;
    let mut args = vec!["test", "--no-fail-fast"];
    if !extra.is_empty() {
        args.push("--");
        args.extend(extra.iter().map(String::as_str));
    }
    let mut command = cargo_command(
        &args,
        &[
            ("LB_AGENT_BIN", &agent),
            ("LB_AGENT_STATIC_BIN", &static_agent),
        ],
    );
    let mut totals = None;
    let result = steps::step(
        "cargo test (unit, BPF_PROG_TEST_RUN, network namespaces, image)",
        || {
            let (status, text) = steps::run_status(&mut command)?;
            let summary = TestTotals::read(&text);
            totals = Some(summary);
            if !status.success() {
                bail!("{}", steps::failure(&command, status, &text));
            }
            Ok(summary.to_string())
        },
    );
    // The plain closing line CI reads; with --verbose cargo's own lines are shown instead.
    if let Some(totals) = totals.filter(|t| t.binaries > 0) {
        println!("tests: {totals}");
    }
    result
}

/// What the `test result:` lines of a `cargo test` run add up to.
#[derive(Clone, Copy, Default)]
struct TestTotals {
    passed: u64,
    failed: u64,
    ignored: u64,
    binaries: u64,
}

impl TestTotals {
    /// Sums `test result: ok. 5 passed; 0 failed; 1 ignored; ...` lines.
    fn read(text: &str) -> Self {
        let mut totals = TestTotals::default();
        for line in text.lines().filter(|l| l.starts_with("test result:")) {
            totals.binaries += 1;
            for part in line.split(';') {
                let mut words = part.split_whitespace().rev();
                let (Some(what), Some(count)) = (words.next(), words.next()) else {
                    continue;
                };
                let Ok(count) = count.parse::<u64>() else {
                    continue;
                };
                match what {
                    "passed" => totals.passed += count,
                    "failed" => totals.failed += count,
                    "ignored" => totals.ignored += count,
                    _ => {}
                }
            }
        }
        totals
    }
}

impl std::fmt::Display for TestTotals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} passed, {} failed, {} skipped",
            self.passed, self.failed, self.ignored
        )
    }
}

/// Pin directories (`/sys/fs/bpf/lbt*`) a killed earlier run left: removing a pin unpins it, and
/// the maps and links go away with their last pin.
fn remove_stale_pins(prefix: &str) {
    let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(prefix) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn require_root(why: &str) -> anyhow::Result<()> {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        })
        .unwrap_or_default();
    if uid != "0" {
        bail!("this needs root: {why}; run it with sudo");
    }
    Ok(())
}
