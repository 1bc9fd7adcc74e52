//! Builds the eBPF object (`lb-ebpf`) with the nightly toolchain and bpf-linker, so that
//! `lb-agent` can embed it. `cargo xtask setup` installs both.

use std::{path::Path, process::Command};

use anyhow::Context as _;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR unset")?;
    let workspace = Path::new(&manifest_dir)
        .parent()
        .context("lb-userspace has no parent directory")?;
    let ebpf_dir = workspace.join("lb-ebpf");
    // aya-build watches the eBPF crate; the shared types live in lb-common.
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("lb-common").display()
    );
    git_revision();
    let ebpf_dir = ebpf_dir
        .to_str()
        .context("the workspace path is not UTF-8")?;
    aya_build::build_ebpf(
        [Package {
            name: "lb-ebpf",
            root_dir: ebpf_dir,
            ..Package::default()
        }],
        Toolchain::default(),
    )
    .context(
        "building the eBPF object failed; run `cargo xtask setup` to install the nightly \
         rust-src component and bpf-linker",
    )?;
    if std::env::var_os("CARGO_FEATURE_BENCH").is_some() {
        build_bench_object(ebpf_dir)?;
    }
    Ok(())
}

/// `LB_GIT_REVISION` for `lb-agent --version`: the commit the agent is built from (12 hex
/// digits), `LB_GIT_REVISION` from the environment if set (a build outside a git checkout), else
/// `unknown`. Re-run when HEAD moves: the files git reads for it are watched.
fn git_revision() {
    println!("cargo:rerun-if-env-changed=LB_GIT_REVISION");
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .filter(|s| !s.is_empty())
    };
    let revision = std::env::var("LB_GIT_REVISION")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_owned());
    // HEAD names the branch; the branch's ref file (or packed-refs) names the commit.
    let mut watched = vec![git(&["rev-parse", "--git-path", "HEAD"])];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.push(git(&["rev-parse", "--git-path", &branch]));
        watched.push(git(&["rev-parse", "--git-common-dir"]).map(|d| format!("{d}/packed-refs")));
    }
    for path in watched.into_iter().flatten() {
        if Path::new(&path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    println!("cargo:rustc-env=LB_GIT_REVISION={revision}");
}

/// With the `bench` feature (only `lb-bench` turns it on): the same crate built again with its
/// `bench` feature, into `OUT_DIR/bench/lb-ebpf`. aya-build writes to `OUT_DIR` and names the
/// object after the crate, so the second build gets a directory of its own.
fn build_bench_object(ebpf_dir: &str) -> anyhow::Result<()> {
    let out_dir = std::env::var("OUT_DIR").context("OUT_DIR unset")?;
    let bench_dir = Path::new(&out_dir).join("bench");
    std::fs::create_dir_all(&bench_dir).context("creating OUT_DIR/bench")?;
    // SAFETY: a build script is single-threaded here (aya-build joined its threads).
    unsafe { std::env::set_var("OUT_DIR", &bench_dir) };
    let built = aya_build::build_ebpf(
        [Package {
            name: "lb-ebpf",
            root_dir: ebpf_dir,
            features: &["bench"],
            ..Package::default()
        }],
        Toolchain::default(),
    )
    .context("building the benchmark eBPF object (feature `bench`) failed");
    // SAFETY: as above.
    unsafe { std::env::set_var("OUT_DIR", &out_dir) };
    built
}
