//! `cargo xtask`: setting up a machine, running the tests, the demo and the benchmark.

mod bench;
mod demo;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Project tasks: setup, test, demo, bench")]
struct Cli {
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
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Task::Setup => setup::run(),
        Task::Test { cargo_test_args } => test(&cargo_test_args),
        Task::Demo { requests } => {
            setup::run()?;
            demo::run(requests)
        }
        Task::Bench { quick, only } => bench::run(quick, only.as_deref()),
    }
}

/// The workspace root (xtask lives one level below it).
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_owned)
}

/// Runs `cargo ARGS` in the workspace with extra environment `envs`, streaming its output.
fn cargo(args: &[&str], envs: &[(&str, &Path)]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = Command::new(&cargo)
        .args(args)
        .envs(envs.iter().copied())
        .current_dir(workspace())
        .status()
        .with_context(|| format!("running {cargo} {}", args.join(" ")))?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

fn test(extra: &[String]) -> anyhow::Result<()> {
    setup::run()?;
    require_root("the tests load eBPF programs and create network namespaces")?;
    // Namespaces a killed earlier run could not remove.
    integration_tests::netns::Netns::remove_stale("lbt");
    remove_stale_pins("lbt");
    println!("==> building lb-agent and the test peers");
    cargo(
        &["build", "-p", "lb-userspace", "-p", "integration-tests"],
        &[],
    )?;
    let agent = workspace().join("target/debug/lb-agent");
    println!("==> cargo test (unit, BPF_PROG_TEST_RUN, network namespaces)");
    let mut args = vec!["test", "--no-fail-fast"];
    if !extra.is_empty() {
        args.push("--");
        args.extend(extra.iter().map(String::as_str));
    }
    cargo(&args, &[("LB_AGENT_BIN", &agent)])
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
