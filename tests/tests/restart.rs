//! Restarts without loss, end to end: an agent running with `--pin-dir` is killed with SIGKILL
//! while keep-alive connections stream requests through a `NodePort`; the pinned data plane keeps
//! serving them (and new connections) with no agent at all, and a new agent with the same pin
//! directory takes it over without rewriting anything, so no connection is reset or moved to
//! another backend. And the other way out: `--on-exit remove` plus SIGTERM leaves nothing behind.
//!
//! The demo topology (`netns::Topology`, `manifests/examples/demo.yaml`: `demo/web` on nodePort
//! 30080 with three pods), a pin directory of its own under /sys/fs/bpf, and a scratch directory;
//! every one of them is removed by a guard, also when a test fails. Needs root (CI is root).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use integration_tests::{
    agent::{self, Agent, agent_bin, workspace},
    demo::{CONFIG, NODE_NAME, PODS, http_node_port},
    netns::{
        CLUSTER_IFACE, DAEMONSET_ARGS, NODE_IFACE, Netns, Process, Topology, run, unique_prefix,
    },
    probe::{self, Batch, Stream, StreamEnd},
};

/// Connections kept streaming across the restart: enough that they spread over the backends.
const STREAMS: u32 = 12;
/// Pause between two requests on one streaming connection.
const STREAM_INTERVAL: Duration = Duration::from_millis(20);
/// How long the data plane serves alone after the kill.
const WITHOUT_AGENT: Duration = Duration::from_secs(2);
/// New connections made while no agent runs, and after the restart.
const NEW_CONNECTIONS: u32 = 20;

fn probe_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_lb-probe"))
}

/// The pin directory and the scratch directory of one test. On drop (also when the test
/// fails): `lb-agent cleanup` unpins whatever an agent left, then both directories go.
struct Dirs {
    pins: PathBuf,
    scratch: PathBuf,
    agent_bin: PathBuf,
}

impl Dirs {
    fn new(prefix: &str) -> Self {
        let scratch = std::env::temp_dir().join(prefix);
        std::fs::create_dir_all(&scratch)
            .unwrap_or_else(|e| panic!("creating {}: {e}", scratch.display()));
        Dirs {
            pins: Path::new("/sys/fs/bpf").join(prefix),
            scratch,
            agent_bin: agent_bin(),
        }
    }
}

impl Drop for Dirs {
    fn drop(&mut self) {
        let _ = agent::cleanup(&self.agent_bin, &self.pins);
        let _ = std::fs::remove_dir_all(&self.pins);
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

/// One node with the demo's pods and backends. Field order is drop order: agent, streams,
/// backends, then the pins (no agent holds them any more), then the namespaces.
struct Setup {
    agent: Option<Agent>,
    stream: Option<Stream>,
    _servers: Vec<Process>,
    dirs: Dirs,
    topology: Topology,
}

impl Setup {
    fn new() -> Self {
        let prefix = unique_prefix();
        let topology = Topology::create(&prefix, &PODS)
            .unwrap_or_else(|e| panic!("building the topology: {e:#}"));
        let dirs = Dirs::new(&prefix);
        let servers = probe::start_backends(&topology, &probe_bin())
            .unwrap_or_else(|e| panic!("starting the backends: {e:#}"));
        Setup {
            agent: None,
            stream: None,
            _servers: servers,
            dirs,
            topology,
        }
    }

    /// Starts `lb-agent run` with the demo config, the pin directory and `extra_args`.
    fn start_agent(&self, extra_args: &[&str]) -> Agent {
        let pins = self.dirs.pins.to_string_lossy();
        let mut args = DAEMONSET_ARGS.to_vec();
        args.extend(["--node-name", NODE_NAME, "--pin-dir", &pins]);
        args.extend_from_slice(extra_args);
        Agent::start(
            &self.topology.node,
            &agent_bin(),
            &workspace().join(CONFIG),
            NODE_IFACE,
            &args,
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("starting lb-agent: {e:#}"))
    }

    fn stream(&mut self) -> &mut Stream {
        self.stream.as_mut().expect("the stream was started")
    }

    /// New connections to the `NodePort`: every one answered, by at least two backends.
    fn assert_new_connections_served(&self, when: &str) {
        let batch: Batch = probe::requests(
            &self.topology.client,
            &probe_bin(),
            "http",
            http_node_port(),
            NEW_CONNECTIONS,
        )
        .unwrap_or_else(|e| panic!("{when}: new connections: {e:#}"));
        assert!(
            batch.failures.is_empty(),
            "{when}: new connections failed: {:?}",
            batch.failures
        );
        assert_eq!(batch.answers.len(), NEW_CONNECTIONS as usize, "{when}");
        assert!(
            batch.per_backend().len() >= 2,
            "{when}: new connections should spread over the backends: {:?}",
            batch.per_backend()
        );
    }

    /// No streaming connection broke so far.
    fn assert_streams_unbroken(&mut self, when: &str) {
        let ended = self
            .stream()
            .ended_so_far()
            .unwrap_or_else(|e| panic!("{when}: reading the stream: {e:#}"));
        assert!(
            ended.is_empty(),
            "{when}: streaming connections broke: {ended:?}\n{}",
            self.stream().output()
        );
    }
}

/// `ip -n NODE link show IFACE`: what the kernel says is attached.
fn link_show(node: &Netns, iface: &str) -> String {
    let output = run(Command::new("ip").args(["-n", node.name(), "link", "show", iface]))
        .unwrap_or_else(|e| panic!("{e:#}"));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn xdp_attached(node: &Netns) -> bool {
    link_show(node, NODE_IFACE).contains("xdp")
}

/// The files under `dir`, recursively (none if it does not exist).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_owned()];
    // Bounded: the pin directory is two levels deep.
    for _ in 0..100 {
        let Some(dir) = pending.pop() else { break };
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files
}

/// The `N` of the agent's start-up line `maps filled writes=N ...`.
fn start_map_writes(log: &str) -> Option<u64> {
    let line = log.lines().find(|l| l.contains("maps filled"))?;
    let (_, after) = line.split_once("writes=")?;
    after.split_whitespace().next()?.parse().ok()
}

/// Every streaming connection ended well: none broke, each kept making requests, none was slow,
/// and each ended on the backend it started on (`started_on`, one per connection).
fn assert_every_stream_ended_well(
    ends: &[StreamEnd],
    mut started_on: Vec<String>,
    streamed_for: Duration,
    output: &str,
) {
    assert_eq!(ends.len(), STREAMS as usize, "{output}");
    // At a request every 20 ms; a fifth of that is plenty on a loaded machine and still shows
    // the connections kept going the whole time.
    let min_requests = u64::try_from(streamed_for.as_millis() / 100).unwrap_or(u64::MAX);
    let mut ended_on = Vec::new();
    for end in ends {
        match end {
            // How slow the slowest request was is in the output, not asserted: speed is the
            // benchmark's business; a stalled request fails its connection (the probe's
            // per-request timeout).
            StreamEnd::Ok {
                backend, requests, ..
            } => {
                assert!(
                    *requests >= min_requests,
                    "a connection made only {requests} requests in {streamed_for:?}:\n{output}"
                );
                ended_on.push(backend.clone());
            }
            StreamEnd::Failed { reason, requests } => {
                panic!("a connection broke after {requests} requests: {reason}\n{output}")
            }
        }
    }
    // Every connection ended on the backend it started on (the probe fails a connection whose
    // backend changes; this checks the set as a whole as well).
    started_on.sort();
    ended_on.sort();
    assert_eq!(ended_on, started_on, "{output}");
}

#[test]
fn established_connections_survive_kill_9_and_restart() {
    let mut setup = Setup::new();
    let first = setup.start_agent(&[]);
    assert!(xdp_attached(&setup.topology.node), "XDP after start");
    // The first agent fills empty maps, so the zero writes of the second one below mean
    // something.
    let first_writes = start_map_writes(&first.log());
    assert!(
        first_writes.is_some_and(|w| w > 0),
        "the first agent should fill the maps: {first_writes:?}\n{}",
        first.log()
    );

    let stop_file = setup.dirs.scratch.join("stop-streaming");
    setup.stream = Some(
        Stream::start(
            &setup.topology.client,
            &probe_bin(),
            http_node_port(),
            STREAMS,
            STREAM_INTERVAL,
            &stop_file,
            Duration::from_mins(1),
        )
        .unwrap_or_else(|e| panic!("starting lb-probe stream: {e:#}")),
    );
    let established = setup
        .stream()
        .established(Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("opening the streaming connections: {e:#}"));
    let streaming_since = Instant::now();
    let backends: Vec<String> = established
        .iter()
        .map(|c| match c {
            Ok(answer) => answer.backend.clone(),
            Err(reason) => panic!("a streaming connection did not open: {reason}"),
        })
        .collect();
    assert_eq!(backends.len(), STREAMS as usize);
    assert!(
        backends.iter().collect::<BTreeSet<_>>().len() >= 2,
        "the connections should spread over the backends: {backends:?}"
    );

    // A crash: no handler runs, nothing is detached or unpinned.
    let killed_log = first
        .kill9()
        .unwrap_or_else(|e| panic!("killing lb-agent: {e:#}"));
    assert!(
        xdp_attached(&setup.topology.node),
        "XDP must stay attached through its pinned link after kill -9:\n{}\nagent log:\n{killed_log}",
        link_show(&setup.topology.node, NODE_IFACE)
    );
    std::thread::sleep(WITHOUT_AGENT);
    setup.assert_streams_unbroken("with no agent");
    // The pinned maps serve new flows too: picked by the Maglev tables, tracked in conntrack.
    setup.assert_new_connections_served("with no agent");
    setup.assert_streams_unbroken("with no agent, after new connections");

    let second = setup.start_agent(&[]);
    let log = second.log();
    let pins = setup.dirs.pins.display().to_string();
    assert!(
        log.contains(&format!("took over the pinned maps in {pins}")),
        "the new agent should adopt the pinned maps:\n{log}"
    );
    assert!(
        log.contains(&format!("{NODE_IFACE}: took over the pinned")),
        "the new agent should adopt the pinned links:\n{log}"
    );
    assert_eq!(
        start_map_writes(&log),
        Some(0),
        "an unchanged config must not rewrite the adopted maps:\n{log}"
    );
    setup.agent = Some(second);
    std::thread::sleep(Duration::from_secs(1));
    setup.assert_streams_unbroken("after the restart");
    setup.assert_new_connections_served("after the restart");

    let streamed_for = streaming_since.elapsed();
    let ends = setup
        .stream()
        .stop(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("stopping the streams: {e:#}"));
    assert_every_stream_ended_well(&ends, backends, streamed_for, &setup.stream().output());

    // SIGTERM with the default --on-exit keep leaves the data plane forwarding; cleanup then
    // removes it.
    let log = setup
        .agent
        .take()
        .expect("agent")
        .stop()
        .unwrap_or_else(|e| panic!("stopping lb-agent: {e:#}"));
    assert!(log.contains("keeps forwarding"), "{log}");
    assert!(
        xdp_attached(&setup.topology.node),
        "XDP after SIGTERM with keep"
    );
    setup.assert_new_connections_served("after SIGTERM with keep");
    let cleaned = agent::cleanup(&agent_bin(), &setup.dirs.pins)
        .unwrap_or_else(|e| panic!("lb-agent cleanup: {e:#}"));
    assert!(cleaned.contains("removed "), "{cleaned}");
    assert!(
        !xdp_attached(&setup.topology.node),
        "cleanup must detach XDP:\n{}",
        link_show(&setup.topology.node, NODE_IFACE)
    );
    assert_eq!(files_under(&setup.dirs.pins), Vec::<PathBuf>::new());
}

#[test]
fn on_exit_remove_detaches_and_unpins_everything() {
    let mut setup = Setup::new();
    let agent = setup.start_agent(&["--on-exit", "remove"]);
    setup.agent = Some(agent);
    setup.assert_new_connections_served("with --on-exit remove");
    let pinned = files_under(&setup.dirs.pins);
    assert!(
        pinned
            .iter()
            .any(|p| p.to_string_lossy().contains("/maps/"))
            && pinned
                .iter()
                .any(|p| p.to_string_lossy().contains("/links/")),
        "maps and links should be pinned while the agent runs: {pinned:?}"
    );

    let log = setup
        .agent
        .take()
        .expect("agent")
        .stop()
        .unwrap_or_else(|e| panic!("stopping lb-agent: {e:#}"));
    let detached = log
        .lines()
        .find_map(|l| l.split_once("detached from ").map(|(_, ifaces)| ifaces))
        .unwrap_or_else(|| panic!("no \"detached from\" line:\n{log}"));
    for iface in [NODE_IFACE, CLUSTER_IFACE, "veth0"] {
        assert!(
            detached.split(", ").any(|d| d == iface),
            "{iface} not detached: {detached}\n{log}"
        );
    }
    assert!(log.contains("removed ") && log.contains(" pins"), "{log}");
    assert!(
        !xdp_attached(&setup.topology.node),
        "XDP must be detached after SIGTERM with --on-exit remove:\n{}",
        link_show(&setup.topology.node, NODE_IFACE)
    );
    let left = files_under(&setup.dirs.pins);
    assert!(left.is_empty(), "pins left behind: {left:?}");
    // With the data path gone the NodePort is a closed port on the node.
    let after = probe::requests(
        &setup.topology.client,
        &probe_bin(),
        "http",
        http_node_port(),
        3,
    )
    .unwrap_or_else(|e| panic!("requests after removal: {e:#}"));
    assert!(after.answers.is_empty(), "{after:?}");

    let cleaned = agent::cleanup(&agent_bin(), &setup.dirs.pins)
        .unwrap_or_else(|e| panic!("lb-agent cleanup on a clean directory must succeed: {e:#}"));
    assert!(
        cleaned.contains("nothing pinned under"),
        "cleanup on a clean directory: {cleaned:?}"
    );
}
