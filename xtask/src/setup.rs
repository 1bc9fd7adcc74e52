//! `cargo xtask setup`: make a fresh machine able to build, test and demo the project.
//! Every step checks first and says whether it did something or skipped it.

use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

/// bpf-linker 0.10.4 loads the nightly toolchain's own libLLVM (LLVM 22), so it matches the
/// compiler that builds the eBPF crate; see `../shared/toolchain.md`.
const BPF_LINKER_VERSION: &str = "0.10.4";
/// Commands the tests and the demo run, and the Debian package of each.
const COMMANDS: [(&str, &str); 6] = [
    ("ip", "iproute2"),
    ("sysctl", "procps"),
    ("kill", "procps"),
    ("ethtool", "ethtool"),
    // Runs a program in a namespace's network but the host's mounts, so pins reach the bpffs.
    ("nsenter", "util-linux"),
    // Health-check and metrics requests in the operations tests.
    ("curl", "curl"),
];
const BPFFS: &str = "/sys/fs/bpf";

pub fn run() -> anyhow::Result<()> {
    println!("==> setup");
    nightly_rust_src()?;
    bpf_linker()?;
    debian_packages()?;
    bpffs()?;
    Ok(())
}

fn did(what: &str) {
    println!("    did:     {what}");
}

fn skipped(what: &str) {
    println!("    skipped: {what}");
}

/// Runs a command and returns its stdout if it succeeded.
fn output(program: &str, args: &[&str]) -> Option<String> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

fn status(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("running {program}"))?;
    if !status.success() {
        bail!("`{program} {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

fn nightly_rust_src() -> anyhow::Result<()> {
    let installed = output(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    )
    .context(
        "no nightly toolchain: the eBPF crate needs one (`rustup toolchain install nightly`)",
    )?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        skipped("nightly rust-src component (installed)");
        return Ok(());
    }
    status(
        "rustup",
        &["component", "add", "rust-src", "--toolchain", "nightly"],
    )?;
    did("installed the nightly rust-src component");
    Ok(())
}

fn bpf_linker() -> anyhow::Result<()> {
    if let Some(version) = output("bpf-linker", &["--version"])
        && version.contains(BPF_LINKER_VERSION)
    {
        skipped(&format!("bpf-linker ({})", version.trim()));
        return Ok(());
    }
    println!("    installing bpf-linker {BPF_LINKER_VERSION} (about 2 minutes)");
    status(
        "cargo",
        &[
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
        ],
    )?;
    did(&format!("installed bpf-linker {BPF_LINKER_VERSION}"));
    Ok(())
}

fn debian_packages() -> anyhow::Result<()> {
    let mut missing: Vec<&str> = COMMANDS
        .iter()
        .filter(|(command, _)| output("sh", &["-c", &format!("command -v {command}")]).is_none())
        .map(|&(_, package)| package)
        .collect();
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        let mut packages: Vec<&str> = COMMANDS.iter().map(|&(_, p)| p).collect();
        packages.dedup();
        skipped(&format!(
            "Debian packages ({} present)",
            packages.join(", ")
        ));
        return Ok(());
    }
    println!("    installing {}", missing.join(" "));
    status("apt-get", &["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(&missing);
    status("apt-get", &args)?;
    did(&format!("installed {}", missing.join(", ")));
    Ok(())
}

fn bpffs() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    let mounted = mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let (_, target, fstype) = (fields.next(), fields.next(), fields.next());
        target == Some(BPFFS) && fstype == Some("bpf")
    });
    if mounted {
        skipped(&format!("bpffs ({BPFFS} mounted)"));
        return Ok(());
    }
    status("mount", &["-t", "bpf", "bpf", BPFFS])?;
    did(&format!("mounted bpffs on {BPFFS}"));
    Ok(())
}

/// What `cargo xtask bench` needs beyond the tests: a path that shows it is there, and the
/// Debian package that provides it.
const BENCH_NEEDS: [(&str, &str); 7] = [
    // Builds the Katran-derived peer (toolchain.md: 16 is the version seen working).
    ("/usr/bin/clang-16", "clang-16"),
    ("/usr/include/bpf/bpf_helpers.h", "libbpf-dev"),
    ("/usr/include/linux/bpf.h", "linux-libc-dev"),
    // The peer's source: test_xdp_noinline.c is extracted from it at bench time.
    ("/usr/src/linux-source-6.1.tar.xz", "linux-source-6.1"),
    ("/usr/sbin/iptables-restore", "iptables"),
    ("/usr/sbin/nft", "nftables"),
    ("/usr/bin/xz", "xz-utils"),
];

/// Installs the Debian packages the benchmark needs (idempotent: only what is missing).
pub fn bench_packages() -> anyhow::Result<()> {
    println!("==> benchmark packages");
    let mut missing: Vec<&str> = BENCH_NEEDS
        .iter()
        .filter(|(path, _)| !std::path::Path::new(path).exists())
        .map(|&(_, package)| package)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        let packages: Vec<&str> = BENCH_NEEDS.iter().map(|&(_, p)| p).collect();
        skipped(&format!(
            "Debian packages ({} present)",
            packages.join(", ")
        ));
        return Ok(());
    }
    println!("    installing {}", missing.join(" "));
    status(
        "apt-get",
        &["-o", "DPkg::Lock::Timeout=600", "update", "-qq"],
    )?;
    let mut args = vec![
        "-o",
        "DPkg::Lock::Timeout=600",
        "install",
        "-y",
        "-qq",
        "--no-install-recommends",
    ];
    args.extend(&missing);
    status("apt-get", &args)?;
    did(&format!("installed {}", missing.join(", ")));
    Ok(())
}
