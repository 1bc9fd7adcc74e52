//! The container image, as a node gets it: `integration_tests::image::build` (what `cargo xtask
//! image` runs) writes the archive; skopeo inspects it; skopeo and umoci unpack it; and the agent
//! runs from the unpacked rootfs with exactly the capabilities `manifests/lb-agent.yaml` grants,
//! `BPF`, `NET_ADMIN` and `PERFMON` (`setpriv` limits the bounding set, as the container runtime
//! does), in the demo topology: it starts, serves `NodePort` connections, `lb-agent status` (with
//! the same capabilities) reads the pinned data plane, and after a restart the next agent takes it
//! over. Without `PERFMON` it does not start and says why, in the words the README documents.
//!
//! The static agent comes from `LB_AGENT_STATIC_BIN`, which `cargo xtask test` builds
//! (`--target x86_64-unknown-linux-musl --release`). Every namespace, pin directory and scratch
//! directory is removed by a guard, also when a test fails. Needs root (CI is root).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use integration_tests::{
    agent::{self, Agent, workspace},
    demo::{CONFIG, NODE_NAME, PODS, http_node_port},
    image::{self, AGENT_PATH, Built, PATH_ENV, Spec, TARGET},
    netns::{NODE_IFACE, Process, Topology, run, unique_prefix},
    probe::{self, Batch},
};

/// `setpriv` with the manifest's capabilities and nothing else: the bounding set limits what
/// any exec'd program can have (uid 0 gets exactly the bounding set), no inheritable or ambient
/// capabilities, and `no_new_privs` as `allowPrivilegeEscalation: false` sets it.
const MANIFEST_CAPS: &[&str] = &[
    "setpriv",
    "--bounding-set=-all,+bpf,+net_admin,+perfmon",
    "--inh-caps=-all",
    "--ambient-caps=-all",
    "--no-new-privs",
    "--",
];
/// The same without `PERFMON`.
const WITHOUT_PERFMON: &[&str] = &[
    "setpriv",
    "--bounding-set=-all,+bpf,+net_admin",
    "--inh-caps=-all",
    "--ambient-caps=-all",
    "--no-new-privs",
    "--",
];
/// Capability numbers (linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;
/// What the agent says when the kernel refuses its XDP program for lack of `CAP_PERFMON`: the
/// verifier's words, which the README ("Before you start") and the manifest quote.
const NO_PERFMON_MESSAGE: &str = "pointer arithmetic with it prohibited for !root";
const REQUESTS: u32 = 20;

fn probe_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_lb-probe"))
}

/// The static agent the image is built from.
fn static_agent() -> PathBuf {
    let path = std::env::var_os("LB_AGENT_STATIC_BIN").map_or_else(
        || workspace().join(format!("target/{TARGET}/release/lb-agent")),
        PathBuf::from,
    );
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask test` (it builds the static agent), or `cargo xtask \
         image`",
        path.display()
    );
    path
}

/// Removes a directory tree on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An image built into a scratch directory and unpacked from its archive.
struct Unpacked {
    built: Built,
    version: String,
    revision: String,
    /// The image's root filesystem, as umoci unpacked it.
    rootfs: PathBuf,
    _scratch: Scratch,
}

impl Unpacked {
    /// The agent inside the unpacked rootfs.
    fn agent(&self) -> PathBuf {
        self.rootfs.join(AGENT_PATH.trim_start_matches('/'))
    }
}

const SOURCE: &str = "https://source.example.invalid/lb";

fn build_and_unpack() -> Unpacked {
    let scratch = Scratch(std::env::temp_dir().join(format!("{}-image", unique_prefix())));
    let bin = static_agent();
    let (version, revision) = image::agent_version(&bin).unwrap_or_else(|e| panic!("{e:#}"));
    let spec = Spec {
        agent_bin: &bin,
        version: &version,
        revision: &revision,
        source: Some(SOURCE),
        created: Some("2026-01-02T03:04:05Z"),
    };
    let built = image::build(&spec, &scratch.0.join("out")).unwrap_or_else(|e| panic!("{e:#}"));
    // Unpacked from the archive, not from the layout it was made of: what a node gets.
    let layout = scratch.0.join("copied");
    let copied = format!("oci:{}:{version}", layout.display());
    run(Command::new("skopeo").args([
        "--insecure-policy",
        "copy",
        "--quiet",
        &format!("oci-archive:{}", built.archive.display()),
        &copied,
    ]))
    .unwrap_or_else(|e| panic!("skopeo copy from the archive: {e:#}"));
    let bundle = scratch.0.join("bundle");
    run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:{version}", layout.display()))
        .arg(&bundle))
    .unwrap_or_else(|e| panic!("umoci unpack: {e:#}"));
    Unpacked {
        built,
        version,
        revision,
        rootfs: bundle.join("rootfs"),
        _scratch: scratch,
    }
}

fn skopeo_inspect(archive: &Path, extra: &[&str]) -> serde_json::Value {
    let output = run(Command::new("skopeo")
        .arg("inspect")
        .args(extra)
        .arg(format!("oci-archive:{}", archive.display())))
    .unwrap_or_else(|e| panic!("skopeo inspect: {e:#}"));
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("skopeo inspect JSON: {e}"))
}

/// Every path under `root`, relative to it.
fn tree(root: &Path) -> BTreeSet<String> {
    let mut paths = BTreeSet::new();
    let mut pending = vec![root.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() && !path.is_symlink() {
                pending.push(path.clone());
            }
            let relative = path.strip_prefix(root).expect("under root");
            paths.insert(relative.to_string_lossy().into_owned());
        }
    }
    paths
}

#[test]
fn the_image_holds_a_static_agent_its_labels_and_an_entrypoint_any_user_can_run() {
    let image = build_and_unpack();
    let archive = &image.built.archive;
    assert_eq!(
        image.built.reference,
        format!("localhost/lb-agent:{}", image.version)
    );

    let inspected = skopeo_inspect(archive, &[]);
    let labels = &inspected["Labels"];
    assert_eq!(labels["org.opencontainers.image.version"], image.version);
    assert_eq!(labels["org.opencontainers.image.revision"], image.revision);
    assert_eq!(labels["org.opencontainers.image.source"], SOURCE);
    assert_eq!(labels["org.opencontainers.image.title"], "lb-agent");
    assert_eq!(inspected["Architecture"], "amd64", "{inspected:#}");
    assert_eq!(inspected["Os"], "linux", "{inspected:#}");
    assert_eq!(
        inspected["Layers"].as_array().map(Vec::len),
        Some(1),
        "one layer: {inspected:#}"
    );
    let config = skopeo_inspect(archive, &["--config"]);
    let runtime = &config["config"];
    assert_eq!(
        runtime["Entrypoint"],
        serde_json::json!([AGENT_PATH]),
        "{config:#}"
    );
    assert!(
        runtime["Env"]
            .as_array()
            .is_some_and(|env| env.contains(&PATH_ENV.into())),
        "{config:#}"
    );
    // No user: the pod's securityContext decides (the manifest: uid 0 with three capabilities).
    assert!(
        runtime["User"].as_str().unwrap_or_default().is_empty(),
        "{config:#}"
    );
    assert_eq!(config["created"], "2026-01-02T03:04:05Z");

    // The name containerd's `ctr images import` gives it, in the archive's index.
    let index = run(Command::new("tar")
        .arg("-xOf")
        .arg(archive)
        .arg("index.json"))
    .unwrap_or_else(|e| panic!("{e:#}"));
    let index: serde_json::Value = serde_json::from_slice(&index.stdout).expect("index.json");
    let annotations = &index["manifests"][0]["annotations"];
    assert_eq!(
        annotations["io.containerd.image.name"],
        image.built.reference
    );
    assert_eq!(
        annotations["org.opencontainers.image.ref.name"],
        image.version
    );

    // Nothing but the agent, executable by any user, and static: no libc in the image.
    assert_eq!(
        tree(&image.rootfs),
        BTreeSet::from(
            [
                "usr",
                "usr/local",
                "usr/local/bin",
                "usr/local/bin/lb-agent"
            ]
            .map(str::to_owned)
        )
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(image.agent())
            .expect("the agent in the rootfs")
            .permissions(),
    );
    assert_eq!(mode & 0o7777, 0o755, "mode {mode:o}");
    assert!(image::is_static_elf(&image.agent()).expect("an ELF file"));
    // With the rootfs as its root directory (nothing of the host to load) and as user nobody.
    let output = run(Command::new("chroot")
        .args(["--userspec=65534:65534"])
        .arg(&image.rootfs)
        .args([AGENT_PATH, "--version"]))
    .unwrap_or_else(|e| panic!("the agent in the rootfs, chrooted, as nobody: {e:#}"));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        format!("lb-agent {} (git {})", image.version, image.revision)
    );
}

/// The demo's pods and backends, a pin directory and an unpacked image. Field order is drop
/// order: backends, then the pins (`lb-agent cleanup`, with every capability, so it can remove
/// what a failed test left), then the namespaces, then the image's scratch directory.
struct Setup {
    _servers: Vec<Process>,
    pins: Pins,
    topology: Topology,
    image: Unpacked,
}

struct Pins {
    dir: PathBuf,
    agent_bin: PathBuf,
}

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = agent::cleanup(&self.agent_bin, &self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Setup {
    fn new() -> Self {
        let image = build_and_unpack();
        let prefix = unique_prefix();
        let topology = Topology::create(&prefix, &PODS)
            .unwrap_or_else(|e| panic!("building the topology: {e:#}"));
        // What the manifest's privileged init container (prepare-node) does before the agent.
        topology
            .node
            .sysctl(&format!("net.ipv4.conf.{NODE_IFACE}.accept_local=1"))
            .unwrap_or_else(|e| panic!("{e:#}"));
        let pins = Pins {
            dir: Path::new("/sys/fs/bpf").join(&prefix),
            agent_bin: image.agent(),
        };
        let servers = probe::start_backends(&topology, &probe_bin())
            .unwrap_or_else(|e| panic!("starting the backends: {e:#}"));
        Setup {
            _servers: servers,
            pins,
            topology,
            image,
        }
    }

    fn start_agent(&self, launcher: &[&str], pinned: bool) -> anyhow::Result<Agent> {
        let pins = self.pins.dir.to_string_lossy();
        let mut args = vec!["--node-name", NODE_NAME];
        if pinned {
            args.extend(["--pin-dir", &pins]);
        }
        Agent::start_through(
            launcher,
            &self.topology.node,
            &self.image.agent(),
            &workspace().join(CONFIG),
            NODE_IFACE,
            &args,
            Duration::from_secs(30),
        )
    }

    /// New connections from the client through the demo's `NodePort`: all answered.
    fn assert_node_port_served(&self, when: &str) {
        let batch: Batch = probe::requests(
            &self.topology.client,
            &probe_bin(),
            "http",
            http_node_port(),
            REQUESTS,
        )
        .unwrap_or_else(|e| panic!("{when}: {e:#}"));
        assert!(
            batch.failures.is_empty(),
            "{when}: failed connections: {:?}",
            batch.failures
        );
        assert_eq!(batch.answers.len(), REQUESTS as usize, "{when}");
        assert!(
            batch.per_backend().len() >= 2,
            "{when}: spread over the backends: {:?}",
            batch.per_backend()
        );
    }

    /// `lb-agent status --output json` from the image, with the manifest's capabilities.
    fn status(&self) -> serde_json::Value {
        let (program, args) = MANIFEST_CAPS.split_first().expect("a launcher");
        let output = run(Command::new(program)
            .args(args)
            .arg(self.image.agent())
            .args(["status", "--pin-dir"])
            .arg(&self.pins.dir)
            .args(["--output", "json"]))
        .unwrap_or_else(|e| panic!("lb-agent status with BPF, NET_ADMIN, PERFMON: {e:#}"));
        serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
            panic!(
                "status is not JSON: {e}\n{}",
                String::from_utf8_lossy(&output.stdout)
            )
        })
    }
}

/// The capability sets of process `pid` from /proc: (effective, bounding).
fn capabilities(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("CapEff:"), field("CapBnd:"))
}

#[test]
fn from_the_image_with_bpf_net_admin_and_perfmon_only_the_agent_serves_shows_status_and_takes_over()
{
    let setup = Setup::new();
    let agent = setup
        .start_agent(MANIFEST_CAPS, true)
        .unwrap_or_else(|e| panic!("the agent from the image, with the manifest's caps: {e:#}"));
    let three = (1u64 << CAP_NET_ADMIN) | (1u64 << CAP_PERFMON) | (1u64 << CAP_BPF);
    assert_eq!(
        capabilities(agent.pid()),
        (three, three),
        "the agent runs with exactly BPF, NET_ADMIN and PERFMON"
    );
    setup.assert_node_port_served("first agent");

    let status = setup.status();
    let web = status["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "web"))
        .unwrap_or_else(|| panic!("status shows demo/web: {status:#}"));
    assert_eq!(web["namespace"], "demo", "{status:#}");
    let forwarded: u64 = web["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["backends"].as_array().into_iter().flatten())
        .filter_map(|b| b["traffic"]["forwardPackets"].as_u64())
        .sum();
    assert!(
        forwarded >= u64::from(REQUESTS),
        "status counts the {REQUESTS} connections' packets: {web:#}"
    );
    assert_eq!(status["interfaces"][0]["name"], NODE_IFACE, "{status:#}");

    // A restart: SIGTERM leaves the pinned data plane forwarding (--on-exit keep), the next
    // agent, with the same three capabilities, takes it over.
    let log = agent.stop().unwrap_or_else(|e| panic!("stopping: {e:#}"));
    assert!(
        !log.contains("took over"),
        "the first agent found pins:\n{log}"
    );
    setup.assert_node_port_served("no agent running");
    let agent = setup
        .start_agent(MANIFEST_CAPS, true)
        .unwrap_or_else(|e| panic!("the restarted agent: {e:#}"));
    let log = agent.log();
    assert!(
        log.contains("took over the pinned maps"),
        "the restarted agent takes over the pinned data plane:\n{log}"
    );
    setup.assert_node_port_served("after the restart");
    assert!(
        setup.status()["services"]
            .as_array()
            .is_some_and(|s| !s.is_empty())
    );
    agent.stop().unwrap_or_else(|e| panic!("stopping: {e:#}"));
}

#[test]
fn from_the_image_without_perfmon_the_agent_does_not_start_and_says_why() {
    let setup = Setup::new();
    let error = match setup.start_agent(WITHOUT_PERFMON, false) {
        Ok(agent) => {
            let log = agent.log();
            drop(agent);
            panic!("the agent started without CAP_PERFMON:\n{log}")
        }
        Err(error) => format!("{error:#}"),
    };
    assert!(
        error.contains("exited with"),
        "the agent exits, not times out: {error}"
    );
    assert!(
        error.contains(NO_PERFMON_MESSAGE),
        "the documented message {NO_PERFMON_MESSAGE:?} is in what the agent said:\n{error}"
    );
    // It attached nothing on its way out.
    let links = run(setup
        .topology
        .node
        .command("ip")
        .args(["link", "show", NODE_IFACE]))
    .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        !String::from_utf8_lossy(&links.stdout).contains("xdp"),
        "no XDP program left on {NODE_IFACE}"
    );
}

/// The manifest runs the image `cargo xtask image` writes.
#[test]
fn the_manifest_names_the_image_xtask_writes() {
    let manifest = std::fs::read_to_string(workspace().join("manifests/lb-agent.yaml"))
        .expect("manifests/lb-agent.yaml");
    let (version, _) =
        image::agent_version(&agent::agent_bin()).unwrap_or_else(|e| panic!("{e:#}"));
    let images: Vec<&str> = manifest
        .lines()
        .filter_map(|l| l.trim().strip_prefix("image: "))
        .collect();
    assert!(
        images.contains(&image::reference(&version).as_str()),
        "the agent's image is {}: {images:?}",
        image::reference(&version)
    );
    // Every other image is pinned by digest.
    for other in images.iter().filter(|i| !i.starts_with(image::NAME)) {
        assert!(
            other.contains("@sha256:"),
            "{other} is not pinned by digest"
        );
    }
}
