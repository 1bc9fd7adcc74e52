//! Kubernetes Service semantics across nodes: traffic policies and SNAT, Maglev consistency,
//! session affinity, source ranges, terminating endpoints, ICMP errors, reloads, VLAN tags and
//! pods as clients. Each test builds its own `cluster` topology (a client, two nodes running
//! `lb-agent`, pods behind each node's bridge), all torn down by guards. Needs root.
//!
//! The first tests check the topology and the probe without an agent, so that a failure further
//! down is about the data path and not about the harness.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    time::{Duration, Instant},
};

use integration_tests::{
    agent::{Agent, agent_bin, final_counters},
    cluster::{
        CLIENT_ADDR, CLIENT_ALT_ADDR, Cluster, Tagging, VLAN_CLIENT_ADDR, cluster_addr, node_addr,
        vlan_node_addr,
    },
    netns::{Netns, Process, unique_prefix},
    probe::{self, Answer, Batch, Hold, Options},
};

/// Requests per batch where answers are counted: with 4 backends the chance that one is never
/// picked by chance is 4 * (3/4)^60, about 1e-7.
const REQUESTS: u32 = 60;
/// Per-request timeout where failure is the expected outcome, to keep those tests short.
const SHORT_TIMEOUT_MS: u64 = 500;

/// Options for requests expected to fail: a short timeout, and every request is made (the
/// agent's drop counters are checked against them).
fn expecting_failures(bind: Option<Ipv4Addr>) -> Options {
    Options {
        bind,
        timeout_ms: Some(SHORT_TIMEOUT_MS),
        max_failures: Some(u32::MAX),
        ..Options::default()
    }
}

const READY: &str = "{ready: true, serving: true, terminating: false}";
const TERMINATING: &str = "{ready: false, serving: true, terminating: true}";
const NOT_SERVING: &str = "{ready: false, serving: false, terminating: true}";

const fn v4(a: u8, b: u8, c: u8, d: u8, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(a, b, c, d), port))
}

/// `sem/web` (TCP) through its load balancer IP.
const WEB_LB: SocketAddr = v4(198, 51, 100, 10, 80);
/// `sem/echo` (UDP) through its load balancer IP.
const ECHO_LB: SocketAddr = v4(198, 51, 100, 53, 53);
const WEB_NODE_PORT: u16 = 30080;
const ECHO_NODE_PORT: u16 = 30053;

fn probe_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_lb-probe"))
}

fn cluster(pods: &[&[&str]]) -> Cluster {
    Cluster::create(&unique_prefix(), pods)
        .unwrap_or_else(|e| panic!("building the cluster: {e:#}"))
}

fn node_port(node: u8, port: u16) -> SocketAddr {
    SocketAddr::from((node_addr(node), port))
}

// ---------------------------------------------------------------------------------------------
// Config: Services written inline in each test; the endpoint lists come from the pods.

/// One `EndpointSlice` endpoint for pod `name`: its address, `nodeName` and `conditions`.
fn endpoint(cluster: &Cluster, name: &str, conditions: &str) -> String {
    let pod = cluster.pod(name).unwrap_or_else(|| panic!("no pod {name}"));
    let node = cluster.node_of(name).expect("the pod's node");
    format!(
        "  - addresses: [{}]\n    conditions: {conditions}\n    nodeName: node-{node}\n    \
         targetRef: {{kind: Pod, namespace: sem, name: {name}}}\n",
        pod.addr
    )
}

/// Ready endpoints for `names`.
fn ready(cluster: &Cluster, names: &[&str]) -> String {
    names.iter().map(|n| endpoint(cluster, n, READY)).collect()
}

/// `sem/web`: TCP 80 -> 8080, nodePort 30080, LB 198.51.100.10, with `spec_extra` added to its
/// spec (indented two spaces) and `endpoints` in its slice.
fn web_service(spec_extra: &str, endpoints: &str) -> String {
    format!(
        r"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: sem}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.80
  selector: {{app: web}}
  ports:
    - {{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: {WEB_NODE_PORT}}}
{spec_extra}status:
  loadBalancer:
    ingress: [{{ip: 198.51.100.10}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abcde
  namespace: sem
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{{name: http, protocol: TCP, port: 8080}}]
endpoints:
{endpoints}---
"
    )
}

/// `sem/echo`: UDP 53 -> 5353, nodePort 30053, LB 198.51.100.53, like `web_service`.
fn echo_service(spec_extra: &str, endpoints: &str) -> String {
    format!(
        r"apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: sem}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.53
  selector: {{app: web}}
  ports:
    - {{name: dns, protocol: UDP, port: 53, targetPort: 5353, nodePort: {ECHO_NODE_PORT}}}
{spec_extra}status:
  loadBalancer:
    ingress: [{{ip: 198.51.100.53}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: echo-fghij
  namespace: sem
  labels: {{kubernetes.io/service-name: echo}}
addressType: IPv4
ports: [{{name: dns, protocol: UDP, port: 5353}}]
endpoints:
{endpoints}---
"
    )
}

// ---------------------------------------------------------------------------------------------
// A running cluster: agents, backends, topology.

/// Field order is drop order: agents first (they detach), then backends, then the namespaces.
struct Setup {
    /// `agents[n - 1]` runs on node n.
    agents: Vec<Option<Agent>>,
    servers: Vec<Process>,
    cluster: Cluster,
    config: PathBuf,
}

impl Setup {
    /// Starts a backend in every pod and writes `yaml` as the config; no agent yet.
    fn new(cluster: Cluster, yaml: &str) -> Self {
        let servers = cluster
            .start_backends(&probe_bin())
            .unwrap_or_else(|e| panic!("starting backends: {e:#}"));
        let config = cluster
            .write_config(yaml)
            .unwrap_or_else(|e| panic!("writing the config: {e:#}"));
        let agents = cluster.nodes.iter().map(|_| None).collect();
        Setup {
            agents,
            servers,
            cluster,
            config,
        }
    }

    /// `new`, then an agent on every node with its node address and `extra_args`.
    fn start(cluster: Cluster, yaml: &str, extra_args: &[&str]) -> Self {
        let mut setup = Setup::new(cluster, yaml);
        let numbers: Vec<u8> = setup.cluster.nodes.iter().map(|n| n.number).collect();
        for number in numbers {
            setup.start_agent(number, node_addr(number), extra_args);
        }
        setup
    }

    fn start_agent(&mut self, number: u8, node_ip: Ipv4Addr, extra_args: &[&str]) {
        let agent = self
            .cluster
            .start_agent(number, &agent_bin(), &self.config, node_ip, extra_args)
            .unwrap_or_else(|e| panic!("{e:#}\nother agents:\n{}", self.logs()));
        self.agents[usize::from(number - 1)] = Some(agent);
    }

    /// Every running agent's log, for failure messages.
    fn logs(&self) -> String {
        let mut text = String::new();
        for (index, agent) in self.agents.iter().enumerate() {
            if let Some(agent) = agent {
                let _ = write!(
                    text,
                    "----- lb-agent on node-{} -----\n{}",
                    index + 1,
                    agent.log()
                );
            }
        }
        text
    }

    /// Rewrites the config and makes every running agent apply it (SIGHUP).
    fn reload(&mut self, yaml: &str) {
        self.cluster
            .write_config(yaml)
            .unwrap_or_else(|e| panic!("writing the config: {e:#}"));
        for index in 0..self.agents.len() {
            if let Some(agent) = self.agents[index].as_mut()
                && let Err(e) = agent.reload(Duration::from_secs(5))
            {
                panic!("reloading node-{}: {e:#}", index + 1);
            }
        }
    }

    /// Stops node `number`'s agent and returns its final counters.
    fn stop_agent(&mut self, number: u8) -> BTreeMap<String, u64> {
        let agent = self.agents[usize::from(number - 1)]
            .take()
            .expect("the agent runs");
        let log = agent
            .stop()
            .unwrap_or_else(|e| panic!("stopping lb-agent on node-{number}: {e:#}"));
        final_counters(&log).unwrap_or_else(|| panic!("no final counters in:\n{log}"))
    }

    fn requests(&self, kind: &str, target: SocketAddr, count: u32) -> Batch {
        self.requests_from(
            &self.cluster.client,
            kind,
            target,
            count,
            &Options::default(),
        )
    }

    fn requests_with(
        &self,
        kind: &str,
        target: SocketAddr,
        count: u32,
        options: &Options,
    ) -> Batch {
        self.requests_from(&self.cluster.client, kind, target, count, options)
    }

    /// Requests from `ns`. Unless `options` say otherwise, a batch stops after 3 failures: a
    /// broken path then fails the test in seconds, not after every request's timeout.
    fn requests_from(
        &self,
        ns: &Netns,
        kind: &str,
        target: SocketAddr,
        count: u32,
        options: &Options,
    ) -> Batch {
        let options = Options {
            max_failures: options.max_failures.or(Some(3)),
            ..options.clone()
        };
        probe::requests_with(ns, &probe_bin(), kind, target, count, &options)
            .unwrap_or_else(|e| panic!("{kind} requests to {target}: {e:#}\n{}", self.logs()))
    }

    fn pod_addr(&self, name: &str) -> Ipv4Addr {
        self.cluster
            .pod(name)
            .unwrap_or_else(|| panic!("no pod {name}"))
            .addr
    }

    /// Every request answered.
    fn assert_all_answered(&self, batch: &Batch, count: u32, what: &str) {
        assert!(
            batch.failures.is_empty() && batch.answers.len() == count as usize,
            "{what}: {} of {count} answered; failures (first 5 of {}): {:?}\nanswers per \
             backend: {:?}\n{}",
            batch.answers.len(),
            batch.failures.len(),
            batch.failures.iter().take(5).collect::<Vec<_>>(),
            batch.per_backend(),
            self.logs()
        );
    }

    /// Exactly the backends `expected` answered, each at least once.
    fn assert_backends(&self, batch: &Batch, expected: &[&str], what: &str) {
        let per_backend = batch.per_backend();
        let answered: BTreeSet<&str> = per_backend.keys().map(String::as_str).collect();
        let expected: BTreeSet<&str> = expected.iter().copied().collect();
        assert_eq!(
            answered,
            expected,
            "{what}: backends that answered (left) differ from the expected ones (right); \
             answers per backend: {per_backend:?}\n{}",
            self.logs()
        );
    }

    /// Each answer from `backend` saw the client address `seen`.
    fn assert_seen(&self, batch: &Batch, backends: &[&str], seen: Ipv4Addr, what: &str) {
        for answer in batch
            .answers
            .iter()
            .filter(|a| backends.contains(&a.backend.as_str()))
        {
            assert_eq!(
                answer.client_seen.ip(),
                IpAddr::V4(seen),
                "{what}: {} saw client {}, expected {seen}\n{}",
                answer.backend,
                answer.client_seen,
                self.logs()
            );
        }
    }

    /// Every request failed (none answered).
    fn assert_none_answered(&self, batch: &Batch, count: u32, what: &str) {
        assert!(
            batch.answers.is_empty() && batch.failures.len() == count as usize,
            "{what}: expected every request to fail, but {} were answered: {:?}\n{}",
            batch.answers.len(),
            batch.per_backend(),
            self.logs()
        );
    }
}

/// A server on a node's own address (not a pod), named after the node.
fn node_server(cluster: &Cluster, number: u8) -> Process {
    let mut command = cluster
        .node(number)
        .ns
        .command(&probe_bin().to_string_lossy());
    command
        .args(["serve", "--name", &format!("node-{number}")])
        .args(["--tcp", "0.0.0.0:9000", "--udp", "0.0.0.0:9001"])
        .args(["--lifetime-secs", "120"])
        .stdout(std::process::Stdio::null());
    Process::spawn(&mut command).expect("node server")
}

/// Waits (bounded) until `ns` gets an HTTP answer from `target`: servers just started.
fn wait_until_answered(ns: &Netns, target: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let options = Options {
        timeout_ms: Some(200),
        ..Options::default()
    };
    for _ in 0..50 {
        let batch =
            probe::requests_with(ns, &probe_bin(), "http", target, 1, &options).expect("lb-probe");
        if !batch.answers.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{target} never answered from {}", ns.name());
}

// ---------------------------------------------------------------------------------------------
// The harness itself, without an agent.

/// Without an agent: the client reaches both nodes over the bridge (from either of its
/// addresses), pods reach pods on the other node through the node routes, the service route can
/// be switched between nodes, and a pod added later is reachable.
#[test]
fn topology_routes_between_client_nodes_and_pods_without_an_agent() {
    let mut setup = Setup::new(cluster(&[&["web-a", "web-b"], &["web-c"]]), "");
    let _node_servers = [
        node_server(&setup.cluster, 1),
        node_server(&setup.cluster, 2),
    ];
    // An address in the service range on both nodes, to see which node the client's route picks.
    for number in [1, 2] {
        let ns = &setup.cluster.node(number).ns;
        ns.ip(&["addr", "add", "198.51.100.99/32", "dev", "lo"])
            .expect("address on lo");
    }
    wait_until_answered(&setup.cluster.client, node_port(1, 9000));
    wait_until_answered(&setup.cluster.client, node_port(2, 9000));

    for number in [1, 2] {
        let batch = setup.requests("http", node_port(number, 9000), 5);
        setup.assert_all_answered(&batch, 5, "client -> node");
        setup.assert_backends(&batch, &[&format!("node-{number}")], "client -> node");
        setup.assert_seen(
            &batch,
            &[&format!("node-{number}")],
            CLIENT_ADDR,
            "client -> node",
        );
        let alt = Options {
            bind: Some(CLIENT_ALT_ADDR),
            ..Options::default()
        };
        for kind in ["http", "udp"] {
            let port = if kind == "http" { 9000 } else { 9001 };
            let batch = setup.requests_with(kind, node_port(number, port), 5, &alt);
            setup.assert_all_answered(&batch, 5, "client (second address) -> node");
            setup.assert_seen(&batch, &[&format!("node-{number}")], CLIENT_ALT_ADDR, kind);
        }
    }

    let service_range_addr = v4(198, 51, 100, 99, 9000);
    let via_1 = setup.requests("http", service_range_addr, 3);
    setup.assert_backends(&via_1, &["node-1"], "service range routed via node-1");
    setup
        .cluster
        .route_services_via(2)
        .expect("switching route");
    let via_2 = setup.requests("http", service_range_addr, 3);
    setup.assert_backends(&via_2, &["node-2"], "service range routed via node-2");

    // Pod to pod across nodes, in both directions, without NAT.
    for (from, to) in [("web-a", "web-c"), ("web-c", "web-b")] {
        let target = SocketAddr::from((setup.pod_addr(to), 8080));
        let ns = &setup.cluster.pod(from).expect("pod").ns;
        let batch = setup.requests_from(ns, "http", target, 3, &Options::default());
        setup.assert_all_answered(&batch, 3, &format!("{from} -> {to}"));
        setup.assert_seen(
            &batch,
            &[to],
            setup.pod_addr(from),
            &format!("{from} -> {to}"),
        );
    }

    // A pod added afterwards gets the next address and interface and is reachable.
    let late = setup.cluster.add_pod(2, "late").expect("adding a pod");
    assert_eq!(late.addr, Ipv4Addr::new(10, 244, 2, 11));
    let server = probe::start_backend(late, &probe_bin()).expect("late backend");
    setup.servers.push(server);
    let ns = &setup.cluster.pod("web-a").expect("pod").ns;
    let target = SocketAddr::from((setup.pod_addr("late"), 5353));
    let batch = setup.requests_from(ns, "udp", target, 3, &Options::default());
    setup.assert_all_answered(&batch, 3, "web-a -> late (UDP)");
    setup.assert_backends(&batch, &["late"], "web-a -> late");
}

/// Without an agent, the probe's own features: a fixed source port per request, `refused` for an
/// ICMP port unreachable, the path MTU learned from the node's frag-needed (node-1's pod links
/// have MTU 1280), and connections held across an event.
#[test]
fn probe_features_work_without_an_agent() {
    let mut cluster = cluster(&[&["web-a", "web-b"], &["web-c", "web-d"]]);
    cluster.set_pod_mtu(1, 1280).expect("pod MTU");
    let setup = Setup::new(cluster, "");
    let from_c = &setup.cluster.pod("web-c").expect("pod").ns;
    let a_addr = setup.pod_addr("web-a");

    let ports = Options {
        source_port: Some(40000),
        ..Options::default()
    };
    let batch = setup.requests_from(from_c, "udp", SocketAddr::from((a_addr, 5353)), 3, &ports);
    setup.assert_all_answered(&batch, 3, "fixed source ports");
    let seen: Vec<u16> = batch.answers.iter().map(|a| a.client_seen.port()).collect();
    assert_eq!(seen, [40000, 40001, 40002], "{batch:?}");

    let refused = setup.requests_from(
        from_c,
        "udp",
        SocketAddr::from((a_addr, 5999)),
        2,
        &Options::default(),
    );
    assert_eq!(refused.failures, ["fail refused"; 2], "{refused:?}");

    let (mtu, output) = probe::path_mtu(
        from_c,
        &probe_bin(),
        SocketAddr::from((a_addr, 5353)),
        1400,
        5,
    )
    .expect("lb-probe pmtu");
    assert_eq!(mtu, 1280, "{output}");
    // The same size fits the path between node-2's own pods (MTU 1500).
    let d_target = SocketAddr::from((setup.pod_addr("web-d"), 5353));
    let (mtu, output) = probe::path_mtu(from_c, &probe_bin(), d_target, 1400, 2).expect("pmtu");
    assert_eq!(mtu, 1500, "{output}");
    assert!(output.contains("answer web-d"), "{output}");

    let release = setup.cluster.scratch().join("release");
    let target = SocketAddr::from((a_addr, 8080));
    let mut connections =
        Hold::start(from_c, &probe_bin(), target, 3, &release).expect("lb-probe hold");
    let firsts = connections.held(Duration::from_secs(10)).expect("held");
    let seconds = connections
        .release(Duration::from_secs(10))
        .expect("released");
    assert_eq!(firsts.len(), 3, "{}", connections.output());
    for (first, second) in firsts.iter().zip(&seconds) {
        let (Ok(first), Ok(second)) = (first, second) else {
            panic!("a held request failed:\n{}", connections.output());
        };
        assert_eq!(first.backend, "web-a");
        // The same connection: the backend saw the same client port both times.
        assert_eq!(
            first.client_seen,
            second.client_seen,
            "{}",
            connections.output()
        );
    }
}

/// Without an agent: frames between the client and node-1 carry 802.1Q or `QinQ` tags in their
/// data, and the tagged link carries traffic both ways. Node-2, which does not strip tags, no
/// longer hears the client: proof that the frames are tagged.
#[test]
fn tagged_links_carry_traffic_without_an_agent() {
    for tagging in [
        Tagging::Dot1Q { id: 100 },
        Tagging::QinQ {
            outer: 100,
            inner: 200,
        },
    ] {
        let mut cluster = cluster(&[&[], &[]]);
        let _servers = [node_server(&cluster, 1), node_server(&cluster, 2)];
        wait_until_answered(&cluster.client, node_port(2, 9000));
        cluster
            .add_vlan(1, tagging, &probe_bin())
            .unwrap_or_else(|e| panic!("{e:#}"));
        let setup = Setup::new(cluster, "");
        let target = SocketAddr::from((vlan_node_addr(1), 9000));
        wait_until_answered(&setup.cluster.client, target);
        let what = format!("{tagging:?} to {target}");
        let batch = setup.requests("http", target, 5);
        setup.assert_all_answered(&batch, 5, &what);
        setup.assert_seen(&batch, &["node-1"], VLAN_CLIENT_ADDR, &what);
        let batch = setup.requests_with(
            "udp",
            SocketAddr::from((vlan_node_addr(1), 9001)),
            5,
            &Options::default(),
        );
        setup.assert_all_answered(&batch, 5, &what);

        // Fresh neighbour resolution towards node-2 goes out tagged, and node-2 drops it.
        setup
            .cluster
            .client
            .ip(&["neigh", "flush", "dev", "eth0"])
            .expect("flushing neighbours");
        let short = expecting_failures(None);
        let batch = setup.requests_with("http", node_port(2, 9000), 2, &short);
        setup.assert_none_answered(&batch, 2, &format!("{tagging:?}: untagging node-2"));
    }
}

// ---------------------------------------------------------------------------------------------
// externalTrafficPolicy and SNAT.

/// Cluster policy, endpoints only on the node the client comes through: no SNAT, the client's
/// own address is preserved (what the data path did before traffic policies existed).
#[test]
fn cluster_policy_with_only_local_endpoints_keeps_the_client_address() {
    let cluster = cluster(&[&["web-a", "web-b"], &["web-c"]]);
    let endpoints = ready(&cluster, &["web-a", "web-b"]);
    let yaml = web_service("", &endpoints) + &echo_service("", &endpoints);
    let setup = Setup::start(cluster, &yaml, &[]);

    for (kind, target) in [("http", WEB_LB), ("udp", ECHO_LB)] {
        let what = format!("{kind} to {target} via node-1");
        let batch = setup.requests(kind, target, REQUESTS);
        setup.assert_all_answered(&batch, REQUESTS, &what);
        setup.assert_backends(&batch, &["web-a", "web-b"], &what);
        setup.assert_seen(&batch, &["web-a", "web-b"], CLIENT_ADDR, &what);
    }
}

/// Cluster policy with endpoints on both nodes: every request through node-1 is answered by all
/// four pods; node-1's pods see the client, node-2's see node-1's cluster-segment address (SNAT
/// to the address of the interface toward them, not to node-1's first address).
#[test]
fn cluster_policy_reaches_every_node_and_snats_to_remote_endpoints() {
    let cluster = cluster(&[&["web-a", "web-b"], &["web-c", "web-d"]]);
    let endpoints = ready(&cluster, &["web-a", "web-b", "web-c", "web-d"]);
    let policy = "  externalTrafficPolicy: Cluster\n";
    let yaml = web_service(policy, &endpoints) + &echo_service(policy, &endpoints);
    let setup = Setup::start(cluster, &yaml, &[]);

    for (kind, target) in [
        ("http", WEB_LB),
        ("udp", ECHO_LB),
        ("http", node_port(1, WEB_NODE_PORT)),
    ] {
        let what = format!("{kind} to {target} via node-1");
        let batch = setup.requests(kind, target, REQUESTS);
        setup.assert_all_answered(&batch, REQUESTS, &what);
        setup.assert_backends(&batch, &["web-a", "web-b", "web-c", "web-d"], &what);
        setup.assert_seen(&batch, &["web-a", "web-b"], CLIENT_ADDR, &what);
        setup.assert_seen(&batch, &["web-c", "web-d"], cluster_addr(1), &what);
    }
}

/// Local policy: each node serves only with its own endpoints and preserves the client address.
#[test]
fn local_policy_uses_only_the_nodes_own_endpoints() {
    let cluster = cluster(&[&["web-a", "web-b"], &["web-c", "web-d"]]);
    let endpoints = ready(&cluster, &["web-a", "web-b", "web-c", "web-d"]);
    let yaml = web_service("  externalTrafficPolicy: Local\n", &endpoints);
    let setup = Setup::start(cluster, &yaml, &[]);

    let via_1 = setup.requests("http", WEB_LB, REQUESTS);
    setup.assert_all_answered(&via_1, REQUESTS, "LB IP via node-1");
    setup.assert_backends(&via_1, &["web-a", "web-b"], "LB IP via node-1");
    setup.assert_seen(&via_1, &["web-a", "web-b"], CLIENT_ADDR, "LB IP via node-1");

    let via_2 = setup.requests("http", node_port(2, WEB_NODE_PORT), REQUESTS);
    setup.assert_all_answered(&via_2, REQUESTS, "node-2's NodePort");
    setup.assert_backends(&via_2, &["web-c", "web-d"], "node-2's NodePort");
    setup.assert_seen(
        &via_2,
        &["web-c", "web-d"],
        CLIENT_ADDR,
        "node-2's NodePort",
    );
}

/// Local policy with no endpoint on node-1: node-1 drops and counts `no_local_backend`; node-2,
/// which has endpoints, serves.
#[test]
fn local_policy_without_a_local_endpoint_drops_and_counts() {
    let cluster = cluster(&[&["web-a"], &["web-c", "web-d"]]);
    let endpoints = ready(&cluster, &["web-c", "web-d"]);
    let yaml = web_service("  externalTrafficPolicy: Local\n", &endpoints);
    let mut setup = Setup::start(cluster, &yaml, &[]);

    let via_2 = setup.requests("http", node_port(2, WEB_NODE_PORT), 30);
    setup.assert_all_answered(&via_2, 30, "node-2's NodePort");
    setup.assert_backends(&via_2, &["web-c", "web-d"], "node-2's NodePort");
    setup.assert_seen(
        &via_2,
        &["web-c", "web-d"],
        CLIENT_ADDR,
        "node-2's NodePort",
    );

    let short = expecting_failures(None);
    let via_1 = setup.requests_with("http", WEB_LB, 5, &short);
    setup.assert_none_answered(&via_1, 5, "LB IP via node-1 (no local endpoint)");
    let via_1 = setup.requests_with("http", node_port(1, WEB_NODE_PORT), 5, &short);
    setup.assert_none_answered(&via_1, 5, "node-1's NodePort (no local endpoint)");

    let logs = setup.logs();
    let counters = setup.stop_agent(1);
    assert!(
        counters.get("no_local_backend").copied().unwrap_or(0) >= 10,
        "node-1 must count each dropped SYN as no_local_backend: {counters:?}\n{logs}"
    );
}

// ---------------------------------------------------------------------------------------------
// Every external address, to a local and a remote endpoint, under both policies.

/// `sem/web`'s externalIP, routed by the client through node-1 like its LB IP.
const WEB_EXTERNAL_IP: SocketAddr = v4(198, 51, 100, 20, 80);

/// Requests through each external address: enough that with two endpoints both are picked but
/// for a chance of 2 * (1/2)^30.
const PER_ADDRESS: u32 = 30;

/// `sem/web` with `externalTrafficPolicy: POLICY`, its externalIP, and `endpoints`.
fn web_with_external_ip(policy: &str, endpoints: &str) -> String {
    let extra = format!(
        "  externalTrafficPolicy: {policy}\n  externalIPs: [{}]\n",
        WEB_EXTERNAL_IP.ip()
    );
    web_service(&extra, endpoints)
}

/// Cluster policy: node-1 answers every connection to its `NodePort`, LB IP and externalIP from
/// both its own pod and node-2's. Its own pod sees the client (its reply is translated on the pod
/// interface and routed from there: the source it gets is node-1's own address); node-2's pod
/// sees node-1's cluster-segment address (SNAT from the interface toward it).
#[test]
fn cluster_policy_serves_every_external_address_from_a_local_and_a_remote_pod() {
    let cluster = cluster(&[&["web-a"], &["web-c"]]);
    let endpoints = ready(&cluster, &["web-a", "web-c"]);
    let mut setup = Setup::start(cluster, &web_with_external_ip("Cluster", &endpoints), &[]);
    for target in [node_port(1, WEB_NODE_PORT), WEB_LB, WEB_EXTERNAL_IP] {
        let what = format!("client -> {target} (Cluster policy)");
        let batch = setup.requests("http", target, PER_ADDRESS);
        setup.assert_all_answered(&batch, PER_ADDRESS, &what);
        setup.assert_backends(&batch, &["web-a", "web-c"], &what);
        setup.assert_seen(&batch, &["web-a"], CLIENT_ADDR, &what);
        setup.assert_seen(&batch, &["web-c"], cluster_addr(1), &what);
    }
    let counters = setup.stop_agent(1);
    // The final counters list only those that moved.
    assert_eq!(
        counters.get("reply_unroutable"),
        None,
        "node-1 could route every reply: {counters:?}"
    );
}

/// Local policy: node-1 answers its `NodePort`, LB IP and externalIP from its own pod only, which
/// sees the client; node-2's `NodePort` is answered by node-2's pod.
#[test]
fn local_policy_serves_every_external_address_from_the_local_pod() {
    let cluster = cluster(&[&["web-a"], &["web-c"]]);
    let endpoints = ready(&cluster, &["web-a", "web-c"]);
    let setup = Setup::start(cluster, &web_with_external_ip("Local", &endpoints), &[]);
    for (target, local) in [
        (node_port(1, WEB_NODE_PORT), "web-a"),
        (WEB_LB, "web-a"),
        (WEB_EXTERNAL_IP, "web-a"),
        (node_port(2, WEB_NODE_PORT), "web-c"),
    ] {
        let what = format!("client -> {target} (Local policy)");
        let batch = setup.requests("http", target, PER_ADDRESS);
        setup.assert_all_answered(&batch, PER_ADDRESS, &what);
        setup.assert_backends(&batch, &[local], &what);
        setup.assert_seen(&batch, &[local], CLIENT_ADDR, &what);
    }
}

/// kube-proxy treats a pod's traffic to a Service's external addresses as internal: a pod on
/// node-1 reaching the `NodePort`, LB IP or externalIP of a `Local` Service is answered by the
/// endpoints on both nodes, and they see the pod's own address.
#[test]
fn pods_reach_every_endpoint_through_a_local_services_external_addresses() {
    let cluster = cluster(&[&["web-a", "cli"], &["web-c"]]);
    let endpoints = ready(&cluster, &["web-a", "web-c"]);
    let setup = Setup::start(cluster, &web_with_external_ip("Local", &endpoints), &[]);
    let cli = setup.pod_addr("cli");
    let cli_ns = &setup.cluster.pod("cli").expect("pod").ns;
    for target in [node_port(1, WEB_NODE_PORT), WEB_LB, WEB_EXTERNAL_IP] {
        let what = format!("pod cli -> {target} (Local policy)");
        let batch = setup.requests_from(cli_ns, "http", target, PER_ADDRESS, &Options::default());
        setup.assert_all_answered(&batch, PER_ADDRESS, &what);
        setup.assert_backends(&batch, &["web-a", "web-c"], &what);
        setup.assert_seen(&batch, &["web-a", "web-c"], cli, &what);
    }
}

// ---------------------------------------------------------------------------------------------
// Backend selection.

/// Maglev: for the same 5-tuple both nodes pick the same backend (same config and seed), so a
/// client whose route moves to another node keeps its backends.
#[test]
fn maglev_picks_the_same_backend_on_every_node() {
    let cluster = cluster(&[&["web-a", "web-b"], &["web-c", "web-d"]]);
    let endpoints = ready(&cluster, &["web-a", "web-b", "web-c", "web-d"]);
    // A seed other than the default, from the settings every node reads.
    let yaml = format!(
        "{}apiVersion: lb-agent/v1alpha1\nkind: AgentSettings\nmaglev: {{seed: 7}}\n",
        echo_service("", &endpoints)
    );
    let setup = Setup::start(cluster, &yaml, &[]);

    let ports = Options {
        source_port: Some(40000),
        ..Options::default()
    };
    let backend_per_port = |batch: &Batch| -> BTreeMap<u16, String> {
        batch
            .answers
            .iter()
            .map(|a| (a.local.port(), a.backend.clone()))
            .collect()
    };
    let via_1 = setup.requests_with("udp", ECHO_LB, 30, &ports);
    setup.assert_all_answered(&via_1, 30, "UDP via node-1");
    setup
        .cluster
        .route_services_via(2)
        .expect("switching the route");
    let via_2 = setup.requests_with("udp", ECHO_LB, 30, &ports);
    setup.assert_all_answered(&via_2, 30, "UDP via node-2");

    let (via_1, via_2) = (backend_per_port(&via_1), backend_per_port(&via_2));
    assert_eq!(
        via_1.keys().copied().collect::<Vec<_>>(),
        (40000..40030).collect::<Vec<_>>(),
        "source ports"
    );
    let distinct: BTreeSet<&String> = via_1.values().collect();
    assert!(
        distinct.len() >= 3,
        "30 flows over 4 endpoints should use at least 3: {via_1:?}"
    );
    let differing: Vec<_> = via_1
        .iter()
        .filter(|(port, backend)| via_2.get(port) != Some(backend))
        .map(|(port, backend)| format!("{port}: node-1 {backend}, node-2 {:?}", via_2.get(port)))
        .collect();
    assert!(
        differing.is_empty(),
        "nodes disagree on the backend for {} of 30 flows: {differing:#?}\n{}",
        differing.len(),
        setup.logs()
    );
}

/// `sessionAffinity: ClientIP`: every new connection from one client address goes to the same
/// backend, for each of the client's two addresses.
#[test]
fn session_affinity_keeps_a_client_on_one_backend() {
    let cluster = cluster(&[&["web-a", "web-b", "web-c"], &[]]);
    let endpoints = ready(&cluster, &["web-a", "web-b", "web-c"]);
    let affinity =
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}\n";
    let yaml = web_service(affinity, &endpoints);
    let setup = Setup::start(cluster, &yaml, &[]);

    for source in [CLIENT_ADDR, CLIENT_ALT_ADDR] {
        let options = Options {
            bind: Some(source),
            ..Options::default()
        };
        let what = format!("30 connections from {source}");
        let batch = setup.requests_with("http", WEB_LB, 30, &options);
        setup.assert_all_answered(&batch, 30, &what);
        let per_backend = batch.per_backend();
        assert_eq!(
            per_backend.len(),
            1,
            "{what}: all must go to one backend: {per_backend:?}\n{}",
            setup.logs()
        );
        let backends: Vec<&str> = per_backend.keys().map(String::as_str).collect();
        setup.assert_seen(&batch, &backends, source, &what);
    }
}

// ---------------------------------------------------------------------------------------------
// Who may connect, and to which endpoints.

/// `loadBalancerSourceRanges` [172.30.0.2/32]: the client's first address is served on the LB
/// IP, an externalIP and the `NodePort`; its second address is refused on all three and counted.
#[test]
fn source_ranges_admit_only_listed_clients() {
    let cluster = cluster(&[&["web-a", "web-b"], &[]]);
    let endpoints = ready(&cluster, &["web-a", "web-b"]);
    let spec = "  externalIPs: [198.51.100.20]\n  loadBalancerSourceRanges: [172.30.0.2/32]\n";
    let yaml = web_service(spec, &endpoints);
    let mut setup = Setup::start(cluster, &yaml, &[]);
    let frontends = [
        ("LB IP", WEB_LB),
        ("externalIP", v4(198, 51, 100, 20, 80)),
        ("NodePort", node_port(1, WEB_NODE_PORT)),
    ];

    for (name, target) in frontends {
        let what = format!("{name} {target} from {CLIENT_ADDR} (in range)");
        let batch = setup.requests("http", target, 10);
        setup.assert_all_answered(&batch, 10, &what);
        setup.assert_seen(&batch, &["web-a", "web-b"], CLIENT_ADDR, &what);
    }
    let outside = expecting_failures(Some(CLIENT_ALT_ADDR));
    for (name, target) in frontends {
        let what = format!("{name} {target} from {CLIENT_ALT_ADDR} (outside the range)");
        let batch = setup.requests_with("http", target, 5, &outside);
        setup.assert_none_answered(&batch, 5, &what);
    }
    let logs = setup.logs();
    let counters = setup.stop_agent(1);
    assert!(
        counters.get("source_range_denied").copied().unwrap_or(0) >= 15,
        "each refused SYN counts as source_range_denied: {counters:?}\n{logs}"
    );
}

/// Endpoint conditions: ready endpoints serve; only when none is ready do serving+terminating
/// ones serve; not-serving ones never do.
#[test]
fn terminating_endpoints_serve_only_without_ready_ones() {
    let cluster = cluster(&[&["web-a", "web-b", "web-c"], &[]]);
    let with_ready = endpoint(&cluster, "web-a", READY)
        + &endpoint(&cluster, "web-b", TERMINATING)
        + &endpoint(&cluster, "web-c", NOT_SERVING);
    let without_ready =
        endpoint(&cluster, "web-b", TERMINATING) + &endpoint(&cluster, "web-c", NOT_SERVING);
    let drain = format!(
        r"apiVersion: v1
kind: Service
metadata: {{name: drain, namespace: sem}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.81
  ports:
    - {{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30081}}
status:
  loadBalancer:
    ingress: [{{ip: 198.51.100.11}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: drain-klmno
  namespace: sem
  labels: {{kubernetes.io/service-name: drain}}
addressType: IPv4
ports: [{{name: http, protocol: TCP, port: 8080}}]
endpoints:
{without_ready}"
    );
    let yaml = web_service("", &with_ready) + &drain;
    let setup = Setup::start(cluster, &yaml, &[]);

    let batch = setup.requests("http", WEB_LB, 30);
    setup.assert_all_answered(&batch, 30, "web (one ready endpoint)");
    setup.assert_backends(&batch, &["web-a"], "web (one ready endpoint)");
    let batch = setup.requests("http", v4(198, 51, 100, 11, 80), 30);
    setup.assert_all_answered(&batch, 30, "drain (no ready endpoint)");
    setup.assert_backends(&batch, &["web-b"], "drain (no ready endpoint)");
}

// ---------------------------------------------------------------------------------------------
// ICMP errors for translated flows.

/// A UDP Service whose endpoint port has no listener: the pod's port unreachable is translated
/// back, so the client's connected socket sees `refused`; for an endpoint on this node and one
/// on the other node (reached with SNAT).
#[test]
fn port_unreachable_from_an_endpoint_reaches_the_client() {
    let cluster = cluster(&[&["web-a"], &["web-c"]]);
    let dead_service = |name: &str, last: u8, pod: &str| {
        let endpoints = ready(&cluster, &[pod]);
        format!(
            r"apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: sem}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.{last}
  ports:
    - {{name: dns, protocol: UDP, port: 53, targetPort: 5999, nodePort: 300{last}}}
status:
  loadBalancer:
    ingress: [{{ip: 198.51.100.{last}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-pqrst
  namespace: sem
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports: [{{name: dns, protocol: UDP, port: 5999}}]
endpoints:
{endpoints}---
"
        )
    };
    let yaml = dead_service("dead-local", 60, "web-a") + &dead_service("dead-remote", 61, "web-c");
    let setup = Setup::start(cluster, &yaml, &[]);

    // Few requests: the kernel rate-limits ICMP errors per destination (a burst of about 6).
    for (what, target) in [
        ("local endpoint", v4(198, 51, 100, 60, 53)),
        ("remote endpoint", v4(198, 51, 100, 61, 53)),
    ] {
        let batch = setup.requests_with("udp", target, 3, &expecting_failures(None));
        assert_eq!(
            batch.failures,
            ["fail refused"; 3],
            "{what} ({target}): the client must get the port unreachable for the address it \
             used; answers {:?}\n{}",
            batch.answers,
            setup.logs()
        );
    }
}

/// Path MTU discovery through the load balancer: node-1's pod links have MTU 1280, so node-1
/// answers 1400-byte DF datagrams to a local endpoint with frag-needed; translated back, it
/// teaches the client's socket (connected to the LB IP) the MTU 1280.
#[test]
fn frag_needed_for_a_translated_flow_reaches_the_client() {
    let mut cluster = cluster(&[&["web-a"], &[]]);
    cluster.set_pod_mtu(1, 1280).expect("pod MTU");
    let endpoints = ready(&cluster, &["web-a"]);
    let setup = Setup::start(cluster, &echo_service("", &endpoints), &[]);

    // Small datagrams pass: the Service works, only the size is the problem.
    let batch = setup.requests("udp", ECHO_LB, 3);
    setup.assert_all_answered(&batch, 3, "small datagrams");
    let (mtu, output) = probe::path_mtu(&setup.cluster.client, &probe_bin(), ECHO_LB, 1400, 5)
        .unwrap_or_else(|e| panic!("lb-probe pmtu: {e:#}"));
    assert_eq!(
        mtu,
        1280,
        "the client's socket to {ECHO_LB} must learn the path MTU; probe output:\n{output}\n{}",
        setup.logs()
    );
}

// ---------------------------------------------------------------------------------------------
// Config changes while traffic flows.

/// Established TCP connections keep their backend across a reload, also the ones whose endpoint
/// was removed (its pod still runs, as kube-proxy leaves such flows alone); new connections use
/// the new endpoint set only.
#[test]
fn established_connections_survive_endpoint_churn() {
    let cluster = cluster(&[&["web-a", "web-b", "web-c", "web-d", "web-e"], &[]]);
    let yaml = web_service("", &ready(&cluster, &["web-a", "web-b", "web-c"]));
    let mut setup = Setup::start(cluster, &yaml, &[]);

    let release = setup.cluster.scratch().join("release");
    let mut connections = Hold::start(&setup.cluster.client, &probe_bin(), WEB_LB, 12, &release)
        .expect("lb-probe hold");
    let firsts: Vec<Answer> = connections
        .held(Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", setup.logs()))
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("a first request failed: {e}\n{}", setup.logs())))
        .collect();
    assert_eq!(firsts.len(), 12, "{}", connections.output());

    // Remove the endpoint of the first held connection, so at least one held connection is on
    // the removed endpoint; add two new ones.
    let removed = firsts[0].backend.clone();
    let mut kept: Vec<&str> = ["web-a", "web-b", "web-c"]
        .into_iter()
        .filter(|b| *b != removed)
        .collect();
    kept.extend(["web-d", "web-e"]);
    let yaml = web_service("", &ready(&setup.cluster, &kept));
    setup.reload(&yaml);

    let seconds = connections
        .release(Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", setup.logs()));
    for (index, (first, second)) in firsts.iter().zip(&seconds).enumerate() {
        match second {
            Ok(second) => assert!(
                second.backend == first.backend && second.client_seen == first.client_seen,
                "held connection {index}: first answered by {} (saw {}), after the reload by \
                 {} (saw {})\n{}",
                first.backend,
                first.client_seen,
                second.backend,
                second.client_seen,
                setup.logs()
            ),
            Err(e) => panic!(
                "held connection {index} (on {}, removed: {}) broke after the reload: {e}\n{}",
                first.backend,
                first.backend == removed,
                setup.logs()
            ),
        }
    }
    assert_eq!(seconds.len(), 12, "{}", connections.output());

    let batch = setup.requests("http", WEB_LB, REQUESTS);
    setup.assert_all_answered(&batch, REQUESTS, "new connections after the reload");
    setup.assert_backends(&batch, &kept, "new connections after the reload");
}

/// A UDP flow whose endpoint is removed moves to another endpoint (kube-proxy clears the UDP
/// conntrack entries of removed endpoints), instead of sending into the void.
#[test]
fn udp_flow_moves_off_a_removed_endpoint() {
    let cluster = cluster(&[&["web-a", "web-b", "web-c"], &[]]);
    let all = ["web-a", "web-b", "web-c"];
    let yaml = echo_service("", &ready(&cluster, &all));
    let mut setup = Setup::start(cluster, &yaml, &[]);

    let same_flow = Options {
        source_port: Some(41000),
        ..Options::default()
    };
    let ask = |setup: &Setup, what: &str| -> String {
        let batch = setup.requests_with("udp", ECHO_LB, 1, &same_flow);
        setup.assert_all_answered(&batch, 1, what);
        batch.answers[0].backend.clone()
    };
    let before: Vec<String> = (0..3).map(|_| ask(&setup, "before the removal")).collect();
    assert!(
        before.iter().all(|b| *b == before[0]),
        "one 5-tuple must stay on one backend: {before:?}\n{}",
        setup.logs()
    );
    let removed = before[0].clone();

    let kept: Vec<&str> = all.into_iter().filter(|b| *b != removed).collect();
    setup.reload(&echo_service("", &ready(&setup.cluster, &kept)));
    let what = format!("after removing {removed}");
    let after: Vec<String> = (0..3).map(|_| ask(&setup, &what)).collect();
    assert!(
        after.iter().all(|b| kept.contains(&b.as_str())) && after.iter().all(|b| *b == after[0]),
        "after removing {removed}, the flow must move to one of {kept:?} and stay: {after:?}\n{}",
        setup.logs()
    );
}

// ---------------------------------------------------------------------------------------------
// Tagged frames.

/// Client frames with an 802.1Q tag, or an 802.1ad outer and 802.1Q inner tag, in the frame
/// data: the `NodePort` and the LB IP are served, translated by the data path (not passed by it).
fn tagged_clients_are_served(tagging: Tagging) {
    let mut cluster = cluster(&[&["web-a", "web-b"], &[]]);
    cluster
        .add_vlan(1, tagging, &probe_bin())
        .unwrap_or_else(|e| panic!("{e:#}"));
    let yaml = web_service("", &ready(&cluster, &["web-a", "web-b"]));
    let mut setup = Setup::new(cluster, &yaml);
    setup.start_agent(1, vlan_node_addr(1), &[]);

    let frontends = [
        (
            "NodePort",
            SocketAddr::from((vlan_node_addr(1), WEB_NODE_PORT)),
        ),
        ("LB IP", WEB_LB),
    ];
    for (name, target) in frontends {
        let what = format!("{name} {target} over a tagged link ({tagging:?})");
        let batch = setup.requests("http", target, 30);
        setup.assert_all_answered(&batch, 30, &what);
        setup.assert_backends(&batch, &["web-a", "web-b"], &what);
        setup.assert_seen(&batch, &["web-a", "web-b"], VLAN_CLIENT_ADDR, &what);
    }
    let logs = setup.logs();
    let counters = setup.stop_agent(1);
    assert!(
        counters.get("forward_new").copied().unwrap_or(0) >= 60,
        "each of the 60 connections is a new flow the data path translated: {counters:?}\n{logs}"
    );
}

#[test]
fn vlan_tagged_clients_are_served() {
    tagged_clients_are_served(Tagging::Dot1Q { id: 100 });
}

#[test]
fn qinq_tagged_clients_are_served() {
    tagged_clients_are_served(Tagging::QinQ {
        outer: 100,
        inner: 200,
    });
}

// ---------------------------------------------------------------------------------------------
// Pods as clients (every agent runs with `--pod-iface`).

/// A pod on node-1 reaches a clusterIP answered by pods on both nodes, which see the pod's own
/// address; a pod added after the agent started is served within a bounded wait; a Service with
/// `internalTrafficPolicy: Local` is answered only by node-1's pods.
#[test]
fn pods_reach_cluster_ips_through_their_interfaces() {
    let cluster = cluster(&[&["web-a", "web-b", "cli"], &["web-c", "web-d"]]);
    let endpoints = ready(&cluster, &["web-a", "web-b", "web-c", "web-d"]);
    let local = format!(
        r"apiVersion: v1
kind: Service
metadata: {{name: local, namespace: sem}}
spec:
  type: ClusterIP
  clusterIP: 10.96.0.81
  internalTrafficPolicy: Local
  ports:
    - {{name: http, protocol: TCP, port: 80, targetPort: 8080}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: local-uvwxy
  namespace: sem
  labels: {{kubernetes.io/service-name: local}}
addressType: IPv4
ports: [{{name: http, protocol: TCP, port: 8080}}]
endpoints:
{endpoints}"
    );
    let yaml = web_service("", &endpoints) + &local;
    let mut setup = Setup::start(cluster, &yaml, &[]);
    let cluster_ip = v4(10, 96, 0, 80, 80);
    let local_ip = v4(10, 96, 0, 81, 80);
    let all = ["web-a", "web-b", "web-c", "web-d"];

    let cli = setup.pod_addr("cli");
    let cli_ns = &setup.cluster.pod("cli").expect("pod").ns;
    let batch = setup.requests_from(cli_ns, "http", cluster_ip, REQUESTS, &Options::default());
    setup.assert_all_answered(&batch, REQUESTS, "cli -> clusterIP");
    setup.assert_backends(&batch, &all, "cli -> clusterIP");
    setup.assert_seen(&batch, &all, cli, "cli -> clusterIP");

    let batch = setup.requests_from(cli_ns, "http", local_ip, 30, &Options::default());
    setup.assert_all_answered(&batch, 30, "cli -> internalTrafficPolicy Local");
    setup.assert_backends(&batch, &["web-a", "web-b"], "cli -> Local clusterIP");
    setup.assert_seen(&batch, &["web-a", "web-b"], cli, "cli -> Local clusterIP");

    let late = setup.cluster.add_pod(1, "late").expect("adding a pod").addr;
    let late_ns = &setup.cluster.pod("late").expect("pod").ns;
    let retry = Options {
        timeout_ms: Some(300),
        ..Options::default()
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut tries = Vec::new();
    for _ in 0..10 {
        let batch = setup.requests_from(late_ns, "http", cluster_ip, 1, &retry);
        let served = !batch.answers.is_empty();
        tries.push(batch);
        if served || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        tries.last().is_some_and(|b| !b.answers.is_empty()),
        "a pod added after the agent started was not served within 3 s: {tries:?}\n{}",
        setup.logs()
    );
    let batch = setup.requests_from(late_ns, "http", cluster_ip, 30, &Options::default());
    setup.assert_all_answered(&batch, 30, "late pod -> clusterIP");
    setup.assert_seen(&batch, &all, late, "late pod -> clusterIP");
}

// ---------------------------------------------------------------------------------------------
// Forwarding from XDP: what XDP sends itself, and what it leaves to the stack.

/// A file under node `number`'s `/proc/sys` (or `/sys`), read inside its namespace.
fn node_file(setup: &Setup, number: u8, path: &str) -> String {
    node_file_in(&setup.cluster, number, path)
}

fn counter(counters: &BTreeMap<String, u64>, name: &str) -> u64 {
    counters.get(name).copied().unwrap_or(0)
}

/// Remote endpoints through a `NodePort`: XDP sends the client's packets out of the cluster
/// interface and the replies out of the client's, redirecting both ways, and the agent never
/// makes the node accept its own addresses as sources. (With the veth default of partial
/// checksums every other test here takes the stack's path: `fallback_partial_checksum`.)
#[test]
fn xdp_sends_both_directions_of_a_remote_flow_itself() {
    let cluster = cluster(&[&["web-a"], &["web-c"]]);
    cluster
        .send_complete_checksums()
        .expect("checksums as from a wire");
    let endpoints = ready(&cluster, &["web-c"]);
    let setup = Setup::start(cluster, &web_service("", &endpoints), &[]);

    let target = node_port(1, WEB_NODE_PORT);
    let batch = setup.requests("http", target, REQUESTS);
    setup.assert_all_answered(&batch, REQUESTS, &format!("http to {target}"));
    setup.assert_seen(&batch, &["web-c"], cluster_addr(1), "SNAT from eth1");
    for iface in ["eth0", "eth1"] {
        let path = format!("/proc/sys/net/ipv4/conf/{iface}/accept_local");
        assert_eq!(
            node_file(&setup, 1, &path),
            "0",
            "{path} on node-1\n{}",
            setup.logs()
        );
    }
    let mut setup = setup;
    let counters = setup.stop_agent(1);
    // Each request is a connection of several packets each way; all but the first few of a
    // flow (before the neighbours are known) leave by redirect.
    let redirected = counter(&counters, "xdp_redirect");
    assert!(
        redirected >= u64::from(REQUESTS) * 4,
        "xdp_redirect {redirected} for {REQUESTS} connections: {counters:?}"
    );
    assert_eq!(counter(&counters, "stack"), 0, "{counters:?}");
}

/// With no neighbour entry for the client (its ARP table was filled by hand, so the node never
/// heard from it), XDP cannot send the first reply: it hands it to TC, which resolves the
/// neighbour with `bpf_redirect_neigh`. The stack would have dropped it as a martian.
#[test]
fn a_reply_without_a_known_neighbour_is_handed_to_tc() {
    let cluster = cluster(&[&["web-a"], &["web-c"]]);
    cluster
        .send_complete_checksums()
        .expect("checksums as from a wire");
    let mac = node_file_in(&cluster, 1, "/sys/class/net/eth0/address");
    cluster
        .client
        .ip(&[
            "neigh",
            "replace",
            &node_addr(1).to_string(),
            "lladdr",
            &mac,
            "nud",
            "permanent",
            "dev",
            "eth0",
        ])
        .expect("static neighbour on the client");
    let endpoints = ready(&cluster, &["web-c"]);
    let mut setup = Setup::start(cluster, &web_service("", &endpoints), &[]);

    let target = node_port(1, WEB_NODE_PORT);
    let batch = setup.requests("http", target, 10);
    setup.assert_all_answered(&batch, 10, &format!("http to {target}"));
    let counters = setup.stop_agent(1);
    assert!(
        counter(&counters, "reply_handed_off") >= 1,
        "the first reply must go through TC: {counters:?}"
    );
    assert_eq!(counter(&counters, "tc_drop"), 0, "{counters:?}");
}

fn node_file_in(cluster: &Cluster, number: u8, path: &str) -> String {
    let output = integration_tests::netns::run(cluster.node(number).ns.command("cat").arg(path))
        .unwrap_or_else(|e| panic!("reading {path} on node-{number}: {e:#}"));
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// An egress interface that takes no XDP frames (a veth whose peer has no GRO, a NIC without
/// `ndo_xdp_xmit`): the agent leaves it out of the targets, and the stack sends those packets.
#[test]
fn the_stack_sends_out_of_an_interface_that_takes_no_xdp_frames() {
    let cluster = cluster(&[&["web-a"], &["web-c"]]);
    cluster
        .send_complete_checksums()
        .expect("checksums as from a wire");
    cluster
        .refuse_xdp_frames_on_cluster_iface(1)
        .expect("GRO off on node-1's cluster port");
    let endpoints = ready(&cluster, &["web-c"]);
    let mut setup = Setup::start(cluster, &web_service("", &endpoints), &[]);

    let target = node_port(1, WEB_NODE_PORT);
    let batch = setup.requests("http", target, 10);
    setup.assert_all_answered(&batch, 10, &format!("http to {target}"));
    let log = setup.agents[0].as_ref().expect("the agent runs").log();
    assert!(log.contains("eth1: takes no XDP frames"), "{log}");
    let counters = setup.stop_agent(1);
    assert!(
        counter(&counters, "fallback_not_a_target") >= 10,
        "the packets to web-c leave by eth1 through the stack: {counters:?}"
    );
}

/// A packet over the egress MTU is handed to the stack, whose "fragmentation needed" is
/// translated back and teaches the client's socket the path MTU.
#[test]
fn a_packet_over_the_egress_mtu_gets_the_kernels_frag_needed() {
    let cluster = cluster(&[&["web-a"], &["web-c"]]);
    cluster
        .send_complete_checksums()
        .expect("checksums as from a wire");
    cluster
        .node(1)
        .ns
        .ip(&["link", "set", "eth1", "mtu", "1280"])
        .expect("eth1 MTU");
    let endpoints = ready(&cluster, &["web-c"]);
    let mut setup = Setup::start(cluster, &echo_service("", &endpoints), &[]);

    let batch = setup.requests("udp", ECHO_LB, 3);
    setup.assert_all_answered(&batch, 3, "small datagrams");
    let (mtu, output) = probe::path_mtu(&setup.cluster.client, &probe_bin(), ECHO_LB, 1400, 5)
        .unwrap_or_else(|e| panic!("lb-probe pmtu: {e:#}"));
    assert_eq!(mtu, 1280, "probe output:\n{output}\n{}", setup.logs());
    let counters = setup.stop_agent(1);
    assert!(
        counter(&counters, "fallback_frag_needed") >= 1,
        "{counters:?}"
    );
}

/// `--forwarding stack`: every translated packet goes through the stack (and its FORWARD
/// chain), as before XDP forwarded; replies then need `accept_local`, which the agent sets.
#[test]
fn forwarding_stack_hands_every_translated_packet_to_the_stack() {
    let cluster = cluster(&[&["web-a"], &["web-c"]]);
    let endpoints = ready(&cluster, &["web-a", "web-c"]);
    let mut setup = Setup::start(
        cluster,
        &web_service("", &endpoints),
        &["--forwarding", "stack"],
    );

    let target = node_port(1, WEB_NODE_PORT);
    let batch = setup.requests("http", target, REQUESTS);
    setup.assert_all_answered(&batch, REQUESTS, &format!("http to {target}"));
    setup.assert_backends(&batch, &["web-a", "web-c"], "stack forwarding");
    assert_eq!(
        node_file(&setup, 1, "/proc/sys/net/ipv4/conf/eth0/accept_local"),
        "1"
    );
    let counters = setup.stop_agent(1);
    assert!(
        counter(&counters, "stack") >= u64::from(REQUESTS),
        "{counters:?}"
    );
    assert_eq!(
        counter(&counters, "xdp_redirect") + counter(&counters, "xdp_tx"),
        0,
        "{counters:?}"
    );
}
