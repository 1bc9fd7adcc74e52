//! `cargo xtask image`: a static `lb-agent` in an OCI image archive (`integration_tests::image`
//! writes it, with umoci; no container daemon).

use std::{path::PathBuf, process::Command};

use anyhow::Context as _;
use integration_tests::image::{self, Spec, TARGET};

use crate::{cargo, steps, workspace};

/// Builds the release `lb-agent` for the musl target and returns its path.
pub fn build_static_agent() -> anyhow::Result<PathBuf> {
    steps::step(
        &format!("building lb-agent (release, static, {TARGET})"),
        || {
            cargo(
                &[
                    "build",
                    "--release",
                    "--target",
                    TARGET,
                    "-p",
                    "lb-userspace",
                    "--bin",
                    "lb-agent",
                ],
                &[],
            )?;
            Ok("done".to_owned())
        },
    )?;
    Ok(workspace().join(format!("target/{TARGET}/release/lb-agent")))
}

fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git")
        .args(args)
        .current_dir(workspace())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    (output.status.success() && !text.is_empty()).then_some(text)
}

pub fn run(source: Option<String>) -> anyhow::Result<()> {
    let agent = build_static_agent()?;
    let (version, short_revision) = image::agent_version(&agent)?;
    // The full commit for the label; the binary's own revision if git cannot tell.
    let revision = git(&["rev-parse", "HEAD"]).unwrap_or(short_revision);
    let source = source.or_else(|| git(&["remote", "get-url", "origin"]));
    let created = git(&["log", "-1", "--format=%cI", "HEAD"]);
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some();
    let spec = Spec {
        agent_bin: &agent,
        version: &version,
        revision: &revision,
        source: source.as_deref(),
        created: created.as_deref(),
    };
    let mut built = None;
    steps::step("writing the OCI image (umoci)", || {
        let image = image::build(&spec, &workspace().join("target/image"))?;
        #[expect(clippy::cast_precision_loss, reason = "a size in MB, for people")]
        let mb = image.size as f64 / 1e6;
        let what = format!("{}, {mb:.1} MB", image.reference);
        built = Some(image);
        Ok(what)
    })?;
    let built = built.context("the image step returned no image")?;
    if dirty {
        println!(
            "    note: the work tree has uncommitted changes; the revision label {revision} does \
             not describe them"
        );
    }
    if spec.source.is_none() {
        println!(
            "    note: no git remote `origin` and no --source: the image has no \
             org.opencontainers.image.source label"
        );
    }
    println!(
        "    load: ctr -n k8s.io images import {0}; push: skopeo copy oci-archive:{0} \
         docker://REGISTRY/lb-agent:{version}",
        built.archive.display()
    );
    println!("{}", built.archive.display());
    Ok(())
}
