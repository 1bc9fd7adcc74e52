//! Builds the eBPF object (`lb-ebpf`) with the nightly toolchain and bpf-linker, so that
//! `lb-agent` can embed it. `cargo xtask setup` installs both.

use std::path::Path;

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
    )
}
