//! `cargo xtask setup`: make a fresh machine able to build, test and demo the project.
//! Every step checks first and says, on its one line, whether it did something or skipped it;
//! what the installers print goes to the task's log (`steps`).

use std::process::{Command, Stdio};

use anyhow::Context as _;

use crate::{steps, workspace};

/// bpf-linker 0.10.4 loads the nightly toolchain's own libLLVM (LLVM 22), so it matches the
/// compiler that builds the eBPF crate; see `../shared/toolchain.md`.
const BPF_LINKER_VERSION: &str = "0.10.4";
/// Commands the tests and the demo run, and the Debian package of each.
const COMMANDS: [(&str, &str); 11] = [
    ("ip", "iproute2"),
    ("sysctl", "procps"),
    ("kill", "procps"),
    ("ethtool", "ethtool"),
    // Runs a program in a namespace's network but the host's mounts, so pins reach the bpffs.
    ("nsenter", "util-linux"),
    // Health-check and metrics requests in the operations tests.
    ("curl", "curl"),
    // `cargo xtask image` and tests/tests/image.rs: the static agent (C parts of its crates are
    // compiled with musl-gcc), the image (umoci, tar), inspecting it (skopeo), and running the
    // agent with exactly the capabilities the manifest grants (setpriv).
    ("musl-gcc", "musl-tools"),
    ("umoci", "umoci"),
    ("skopeo", "skopeo"),
    ("tar", "tar"),
    ("setpriv", "util-linux"),
];
const BPFFS: &str = "/sys/fs/bpf";

pub fn run() -> anyhow::Result<()> {
    steps::step("setup: nightly rust-src", nightly_rust_src)?;
    steps::step(
        &format!("setup: Rust target {}", integration_tests::image::TARGET),
        musl_target,
    )?;
    steps::step(
        &format!("setup: bpf-linker {BPF_LINKER_VERSION}"),
        bpf_linker,
    )?;
    steps::step("setup: Debian packages", debian_packages)?;
    steps::step("setup: bpffs", bpffs)?;
    Ok(())
}

fn did(what: &str) -> String {
    format!("did: {what}")
}

fn skipped(what: &str) -> String {
    format!("skipped: {what}")
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

/// Runs an installer, its output in the task's log.
fn status(program: &str, args: &[&str]) -> anyhow::Result<()> {
    steps::run(Command::new(program).args(args).current_dir(workspace())).map(drop)
}

fn nightly_rust_src() -> anyhow::Result<String> {
    let installed = output(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    )
    .context(
        "no nightly toolchain: the eBPF crate needs one (`rustup toolchain install nightly`)",
    )?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(skipped("installed"));
    }
    status(
        "rustup",
        &["component", "add", "rust-src", "--toolchain", "nightly"],
    )?;
    Ok(did("installed the nightly rust-src component"))
}

/// The target of the static agent in the image, for the toolchain that builds the workspace.
fn musl_target() -> anyhow::Result<String> {
    let target = integration_tests::image::TARGET;
    let installed = output("rustup", &["target", "list", "--installed"])
        .context("`rustup target list` failed: is rustup installed?")?;
    if installed.lines().any(|l| l.trim() == target) {
        return Ok(skipped("installed"));
    }
    status("rustup", &["target", "add", target])?;
    Ok(did(&format!("installed the Rust target {target}")))
}

fn bpf_linker() -> anyhow::Result<String> {
    if let Some(version) = output("bpf-linker", &["--version"])
        && version.contains(BPF_LINKER_VERSION)
    {
        return Ok(skipped(&format!("installed ({})", version.trim())));
    }
    print!("installing, about 2 minutes ... ");
    let _ = std::io::Write::flush(&mut std::io::stdout());
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
    Ok(did(&format!("installed bpf-linker {BPF_LINKER_VERSION}")))
}

/// apt-get waits this long for a lock another apt holds (other builds on the machine).
const APT_LOCK: [&str; 2] = ["-o", "DPkg::Lock::Timeout=600"];

fn debian_packages() -> anyhow::Result<String> {
    let mut missing: Vec<&str> = COMMANDS
        .iter()
        .filter(|(command, _)| output("sh", &["-c", &format!("command -v {command}")]).is_none())
        .map(|&(_, package)| package)
        .collect();
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        let mut packages: Vec<&str> = COMMANDS.iter().map(|&(_, p)| p).collect();
        packages.sort_unstable();
        packages.dedup();
        return Ok(skipped(&format!("present ({})", packages.join(", "))));
    }
    apt_install(&missing)
}

/// `apt-get update`, then installs `packages` without recommends.
fn apt_install(packages: &[&str]) -> anyhow::Result<String> {
    status("apt-get", &[&APT_LOCK[..], &["update", "-qq"]].concat())?;
    let mut args = [
        &APT_LOCK[..],
        &["install", "-y", "-qq", "--no-install-recommends"],
    ]
    .concat();
    args.extend(packages);
    status("apt-get", &args)?;
    Ok(did(&format!("installed {}", packages.join(", "))))
}

fn bpffs() -> anyhow::Result<String> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    let mounted = mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let (_, target, fstype) = (fields.next(), fields.next(), fields.next());
        target == Some(BPFFS) && fstype == Some("bpf")
    });
    if mounted {
        return Ok(skipped(&format!("{BPFFS} mounted")));
    }
    status("mount", &["-t", "bpf", "bpf", BPFFS])?;
    Ok(did(&format!("mounted bpffs on {BPFFS}")))
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
pub fn bench_packages() -> anyhow::Result<String> {
    let mut missing: Vec<&str> = BENCH_NEEDS
        .iter()
        .filter(|(path, _)| !std::path::Path::new(path).exists())
        .map(|&(_, package)| package)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        let packages: Vec<&str> = BENCH_NEEDS.iter().map(|&(_, p)| p).collect();
        return Ok(skipped(&format!("present ({})", packages.join(", "))));
    }
    apt_install(&missing)
}
