//! The `lb-agent` container image: one layer holding a static (musl) `lb-agent`, written as an
//! OCI image archive with umoci and tar, no container daemon. Shared by `cargo xtask image` and
//! `tests/tests/image.rs`, so the test checks the image the task builds, and the name below is
//! the one `manifests/lb-agent.yaml` uses (a test compares them).
//!
//! ```text
//! target/image/
//!   lb-agent-VERSION.oci.tar    the archive: an OCI image layout (oci-layout, index.json, blobs)
//!   layout/                     the same layout, unpacked (umoci works on it)
//!   bundle/                     scratch: umoci's runtime bundle, rootfs/ is the layer's content
//! ```

use std::{
    io::Read as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::netns::run;

/// The repository name `cargo xtask image` tags; the tag is the agent's version. `localhost/`
/// is a registry name that resolves to nothing by accident: a node that has not imported the
/// image fails to pull it at once instead of fetching someone else's `lb-agent`.
pub const NAME: &str = "localhost/lb-agent";
/// The Rust target of the binary in the image: static, no libc needed in the image.
pub const TARGET: &str = "x86_64-unknown-linux-musl";
/// Where the binary is in the image, and the image's entrypoint.
pub const AGENT_PATH: &str = "/usr/local/bin/lb-agent";
/// The image's `PATH`, so `command: [lb-agent]` finds it.
pub const PATH_ENV: &str = "PATH=/usr/local/bin:/usr/bin:/bin";
/// The annotation containerd's `ctr images import` names an imported image by.
const CONTAINERD_NAME: &str = "io.containerd.image.name";

/// What the image is built from and says about itself.
pub struct Spec<'a> {
    /// A static `lb-agent` (built for `TARGET`).
    pub agent_bin: &'a Path,
    /// `org.opencontainers.image.version`, and the tag.
    pub version: &'a str,
    /// `org.opencontainers.image.revision`: the git commit.
    pub revision: &'a str,
    /// `org.opencontainers.image.source`: where the source is, if known.
    pub source: Option<&'a str>,
    /// The image's creation time (RFC 3339), e.g. the commit's; umoci's default is now.
    pub created: Option<&'a str>,
}

/// An image archive that was written.
pub struct Built {
    pub archive: PathBuf,
    /// `NAME:VERSION`.
    pub reference: String,
    /// The archive's size in bytes.
    pub size: u64,
}

/// `NAME:version`.
#[must_use]
pub fn reference(version: &str) -> String {
    format!("{NAME}:{version}")
}

/// The labels of the image, as `(key, value)`.
#[must_use]
pub fn labels(spec: &Spec<'_>) -> Vec<(String, String)> {
    let mut labels = vec![
        ("org.opencontainers.image.title", "lb-agent".to_owned()),
        (
            "org.opencontainers.image.description",
            "eBPF/XDP load balancer for Kubernetes Services".to_owned(),
        ),
        ("org.opencontainers.image.version", spec.version.to_owned()),
        (
            "org.opencontainers.image.revision",
            spec.revision.to_owned(),
        ),
        (
            "org.opencontainers.image.licenses",
            "MIT OR Apache-2.0".to_owned(),
        ),
    ];
    if let Some(source) = spec.source {
        labels.push(("org.opencontainers.image.source", source.to_owned()));
    }
    labels.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

/// `lb-agent --version` of `bin`: `(version, short revision)` from `lb-agent 0.1.0 (git REV)`.
pub fn agent_version(bin: &Path) -> anyhow::Result<(String, String)> {
    let output = Command::new(bin)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", bin.display()))?;
    let text = String::from_utf8_lossy(&output.stdout);
    let parsed = text
        .trim()
        .strip_prefix("lb-agent ")
        .and_then(|rest| rest.split_once(" (git "))
        .and_then(|(version, rev)| Some((version.to_owned(), rev.strip_suffix(')')?.to_owned())));
    match parsed {
        Some(parsed) if output.status.success() => Ok(parsed),
        _ => bail!(
            "{} --version printed {:?}, not `lb-agent VERSION (git REVISION)`",
            bin.display(),
            text.trim()
        ),
    }
}

/// Whether the ELF file at `path` is statically linked: it has no `PT_INTERP` program header
/// (no dynamic loader to find). Reads the 64-bit little-endian header only, what x86-64 has.
pub fn is_static_elf(path: &Path) -> anyhow::Result<bool> {
    const PT_INTERP: u32 = 3;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .with_context(|| format!("opening {}", path.display()))?
        .take(1 << 20)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading {}", path.display()))?;
    let read = |at: usize, len: usize| -> anyhow::Result<u64> {
        let field = bytes
            .get(at..at + len)
            .with_context(|| format!("{} is too short for an ELF header", path.display()))?;
        Ok(field
            .iter()
            .rev()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
    };
    if bytes.get(..4) != Some(b"\x7fELF") || bytes.get(4) != Some(&2) || bytes.get(5) != Some(&1) {
        bail!("{} is not a 64-bit little-endian ELF file", path.display());
    }
    let phoff = usize::try_from(read(0x20, 8)?)?;
    let phentsize = usize::try_from(read(0x36, 2)?)?;
    let phnum = usize::try_from(read(0x38, 2)?)?;
    for index in 0..phnum {
        if read(phoff + index * phentsize, 4)? == u64::from(PT_INTERP) {
            return Ok(false);
        }
    }
    Ok(true)
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            == Some("0")
    })
}

fn umoci(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("umoci").args(args))
        .map(drop)
        .context("umoci failed; `cargo xtask setup` installs it (Debian package umoci)")
}

/// Builds the image of `spec` under `out_dir` (see the module doc) and returns the archive.
pub fn build(spec: &Spec<'_>, out_dir: &Path) -> anyhow::Result<Built> {
    if !is_static_elf(spec.agent_bin)? {
        bail!(
            "{} is dynamically linked; the image holds no libc: build it with `--target {TARGET}`",
            spec.agent_bin.display()
        );
    }
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let layout = out_dir.join("layout");
    let bundle = out_dir.join("bundle");
    for dir in [&layout, &bundle] {
        if dir.exists() {
            std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
        }
    }
    let layout_str = layout.to_str().context("the output path is not UTF-8")?;
    let bundle_str = bundle.to_str().context("the output path is not UTF-8")?;
    let image = format!("{layout_str}:{}", spec.version);
    let rootless: &[&str] = if is_root() { &[] } else { &["--rootless"] };

    umoci(&["init", "--layout", layout_str])?;
    umoci(&["new", "--image", &image])?;
    umoci(&[&["unpack"], rootless, &["--image", &image, bundle_str]].concat())?;
    // The one file of the image. Directories and the binary 0755: any uid may run it.
    let target = bundle
        .join("rootfs")
        .join(AGENT_PATH.trim_start_matches('/'));
    let bin_dir = target.parent().context("AGENT_PATH has a directory")?;
    std::fs::create_dir_all(bin_dir).with_context(|| format!("creating {}", bin_dir.display()))?;
    std::fs::copy(spec.agent_bin, &target)
        .with_context(|| format!("copying {} into the image", spec.agent_bin.display()))?;
    set_mode(&target, 0o755)?;
    for dir in ["usr", "usr/local", "usr/local/bin"] {
        set_mode(&bundle.join("rootfs").join(dir), 0o755)?;
    }
    let mut history = vec![
        "--history.created_by=cargo xtask image".to_owned(),
        format!("--history.comment=lb-agent {} ({TARGET})", spec.version),
    ];
    if let Some(created) = spec.created {
        history.push(format!("--history.created={created}"));
    }
    let history: Vec<&str> = history.iter().map(String::as_str).collect();
    umoci(
        &[
            &["repack"],
            history.as_slice(),
            &["--image", &image, bundle_str],
        ]
        .concat(),
    )?;

    let mut config: Vec<String> = vec![
        "config".into(),
        "--no-history".into(),
        "--os=linux".into(),
        "--architecture=amd64".into(),
        format!("--config.entrypoint={AGENT_PATH}"),
        "--config.cmd=--help".into(),
        format!("--config.env={PATH_ENV}"),
        "--config.workingdir=/".into(),
        // SIGTERM: with --pin-dir the agent leaves the data plane forwarding and exits.
        "--config.stopsignal=SIGTERM".into(),
    ];
    if let Some(created) = spec.created {
        config.push(format!("--created={created}"));
    }
    for (key, value) in labels(spec) {
        config.push(format!("--config.label={key}={value}"));
    }
    config.push(format!("--image={image}"));
    let config: Vec<&str> = config.iter().map(String::as_str).collect();
    umoci(&config)?;
    umoci(&["gc", "--layout", layout_str])?;
    name_for_containerd(&layout, spec.version)?;

    let archive = out_dir.join(format!("lb-agent-{}.oci.tar", spec.version));
    let partial = archive.with_extension("tar.partial");
    run(Command::new("tar")
        .args(["--sort=name", "--owner=0", "--group=0", "--numeric-owner"])
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&partial)
        .args(["oci-layout", "index.json", "blobs"]))?;
    std::fs::rename(&partial, &archive)
        .with_context(|| format!("renaming to {}", archive.display()))?;
    let _ = std::fs::remove_dir_all(&bundle);
    let size = std::fs::metadata(&archive)
        .with_context(|| format!("reading {}", archive.display()))?
        .len();
    Ok(Built {
        archive,
        reference: reference(spec.version),
        size,
    })
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))
}

/// Adds `io.containerd.image.name: NAME:TAG` to the manifest of `tag` in `index.json`:
/// `org.opencontainers.image.ref.name` holds the tag only (the OCI layout's convention, what
/// umoci writes), and containerd's importer names an image by its own annotation, else it needs
/// `--base-name`.
fn name_for_containerd(layout: &Path, tag: &str) -> anyhow::Result<()> {
    let path = layout.join("index.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut index: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let manifests = index
        .get_mut("manifests")
        .and_then(serde_json::Value::as_array_mut)
        .with_context(|| format!("{} has no manifests", path.display()))?;
    let mut found = false;
    for manifest in manifests {
        let annotations = manifest
            .get_mut("annotations")
            .and_then(serde_json::Value::as_object_mut);
        if let Some(annotations) = annotations
            && annotations.get("org.opencontainers.image.ref.name")
                == Some(&serde_json::Value::from(tag))
        {
            annotations.insert(CONTAINERD_NAME.to_owned(), reference(tag).into());
            found = true;
        }
    }
    if !found {
        bail!("{} has no manifest tagged {tag}", path.display());
    }
    std::fs::write(&path, serde_json::to_vec(&index)?)
        .with_context(|| format!("writing {}", path.display()))
}
