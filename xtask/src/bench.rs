//! `cargo xtask bench`: installs what the benchmark needs, builds `lb-bench` (which builds the
//! benchmark's eBPF object) and runs it as root. Full runs write `bench/results/` and the
//! README's "Performance" section; `--quick` writes to `target/bench-quick/` only.

use std::{process::Command, time::Instant};

use anyhow::{Context as _, bail};

use crate::{cargo, require_root, setup, steps, workspace};

fn git(args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new("git")
        .args(args)
        .current_dir(workspace())
        .output()
        .context("running git")?;
    if !output.status.success() {
        bail!("git {} failed", args.join(" "));
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

pub fn run(quick: bool, only: Option<&str>) -> anyhow::Result<()> {
    let start = Instant::now();
    setup::run()?;
    steps::step("setup: benchmark packages", setup::bench_packages)?;
    require_root("the benchmark loads eBPF programs and creates network namespaces")?;
    steps::step(
        "building lb-bench (release; also builds the benchmark eBPF object)",
        || {
            cargo(&["build", "--release", "-p", "lb-bench"], &[])?;
            Ok("done".to_owned())
        },
    )?;
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .context("running date")?;
    let sha = git(&["rev-parse", "--short=10", "HEAD"])?;
    let name = format!("{date}-{sha}");
    let root = workspace();
    let out_dir = if quick {
        root.join("target/bench-quick")
    } else {
        root.join("bench/results")
    };
    let mut command = Command::new(root.join("target/release/lb-bench"));
    command
        .arg("--out-dir")
        .arg(&out_dir)
        .args(["--name", &name])
        .arg("--scratch")
        .arg(root.join("target/bench-scratch"));
    if quick {
        command.args(["--quick", "--command", "cargo xtask bench --quick"]);
    } else {
        command.arg("--readme").arg(root.join("README.md"));
    }
    if let Some(only) = only {
        command.args(["--only", only]);
    }
    println!("==> lb-bench {}", if quick { "--quick" } else { "(full)" });
    let status = command
        .current_dir(&root)
        .status()
        .context("running lb-bench")?;
    if !status.success() {
        bail!("lb-bench failed ({status})");
    }
    println!(
        "==> benchmark finished in {:.0} s; results in {}",
        start.elapsed().as_secs_f64(),
        out_dir.display()
    );
    Ok(())
}
