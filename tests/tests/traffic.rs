//! Real traffic through the data path: a client namespace, a node namespace running `lb-agent`
//! with `manifests/examples/demo.yaml`, and three backend pods, all torn down by their guards.
//! Needs root (CI is root).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use integration_tests::{
    agent::{agent_bin, workspace},
    demo::{Demo, PODS, http_load_balancer, http_node_port, udp_external_ip, udp_node_port},
    netns::{CLIENT_ADDR, NODE_ADDR, NODE_IFACE, Process, Topology, unique_prefix},
    probe::{self, Batch},
};

const REQUESTS: u32 = 60;

fn probe_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_lb-probe"))
}

fn setup() -> Demo {
    setup_with(|_| Ok(()))
}

/// Like `setup`, with `adjust` run on the topology before anything starts in it.
fn setup_with(adjust: impl FnOnce(&Topology) -> anyhow::Result<()>) -> Demo {
    Demo::start(
        &unique_prefix(),
        &workspace(),
        &agent_bin(),
        &probe_bin(),
        adjust,
    )
    .unwrap_or_else(|e| panic!("starting the demo: {e:#}"))
}

/// `count` requests through `target`; any harness failure fails the test.
fn requests(demo: &Demo, kind: &str, target: SocketAddr, count: u32) -> Batch {
    demo.requests(kind, target, count)
        .unwrap_or_else(|e| panic!("{kind} requests to {target}: {e:#}"))
}

/// Every request answered, by every backend, each seeing the client's own address.
fn assert_balanced(setup: &Demo, batch: &Batch, what: &str) {
    assert!(
        batch.failures.is_empty(),
        "{what}: {} of {REQUESTS} failed: {:?}\nagent log:\n{}",
        batch.failures.len(),
        batch.failures,
        setup.agent_log()
    );
    assert_eq!(batch.answers.len(), REQUESTS as usize, "{what}: answers");
    let per_backend = batch.per_backend();
    for pod in PODS {
        assert!(
            per_backend.get(pod).copied().unwrap_or(0) > 0,
            "{what}: backend {pod} never answered: {per_backend:?}"
        );
    }
    for answer in &batch.answers {
        assert_eq!(
            answer.client_seen.ip(),
            std::net::IpAddr::V4(CLIENT_ADDR),
            "{what}: the backend must see the client's address (DNAT only)"
        );
    }
}

#[test]
fn tcp_through_node_port_and_load_balancer_ip_reaches_every_backend() {
    let setup = setup();
    let node_port = requests(&setup, "http", http_node_port(), REQUESTS);
    assert_balanced(&setup, &node_port, "TCP via NodePort");
    let load_balancer = requests(&setup, "http", http_load_balancer(), REQUESTS);
    assert_balanced(&setup, &load_balancer, "TCP via LoadBalancer IP");

    let log = setup
        .agent
        .expect("agent")
        .stop()
        .expect("stopping lb-agent");
    assert!(
        log.lines()
            .any(|l| l.contains("detached from ") && l.ends_with(NODE_IFACE)),
        "{log}"
    );
    // Each connection's first packet is a new flow, and every later one is tracked.
    let counters = log
        .lines()
        .rev()
        .find(|l| l.contains("counters:"))
        .unwrap_or_else(|| panic!("no final counters in:\n{log}"));
    let value = |name: &str| -> u64 {
        counters
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    assert_eq!(value("forward_new"), u64::from(2 * REQUESTS), "{counters}");
    assert!(
        value("forward_tracked") >= u64::from(2 * REQUESTS * 3),
        "{counters}"
    );
    assert!(
        value("reply_translated") >= u64::from(2 * REQUESTS * 3),
        "{counters}"
    );
    assert_eq!(value("xdp_drop"), 0, "{counters}");
}

#[test]
fn udp_through_node_port_and_external_ip_answers_from_the_address_asked() {
    let setup = setup();
    // lb-probe fails any answer that does not come from exactly the target address and port.
    let node_port = requests(&setup, "udp", udp_node_port(), REQUESTS);
    assert_balanced(&setup, &node_port, "UDP via NodePort");
    let external = requests(&setup, "udp", udp_external_ip(), REQUESTS);
    assert_balanced(&setup, &external, "UDP via externalIP");
}

/// With checksum offload off on every veth, every receiver verifies every checksum, so a wrong
/// incremental update in XDP (DNAT) or TC (reply SNAT) shows up as a lost request.
#[test]
fn translated_checksums_verify_at_every_hop() {
    let setup = setup_with(Topology::verify_checksums_at_every_hop);
    let tcp = requests(&setup, "http", http_node_port(), REQUESTS);
    assert_balanced(&setup, &tcp, "TCP via NodePort, checksums verified");
    let tcp = requests(&setup, "http", http_load_balancer(), REQUESTS);
    assert_balanced(&setup, &tcp, "TCP via LoadBalancer IP, checksums verified");
    let udp = requests(&setup, "udp", udp_external_ip(), REQUESTS);
    assert_balanced(&setup, &udp, "UDP via externalIP, checksums verified");
}

#[test]
fn the_nodes_own_connections_are_untouched() {
    let setup = setup();
    let probe = probe_bin();
    // A service of the node itself, on the address NodePorts use but another port.
    let mut node_server_cmd = setup.topology.node.command(&probe.to_string_lossy());
    node_server_cmd.args(["serve", "--name", "node-local", "--tcp", "0.0.0.0:9000"]);
    node_server_cmd.args(["--udp", "0.0.0.0:9001", "--lifetime-secs", "120"]);
    node_server_cmd.stdout(std::process::Stdio::null());
    let _node_server = Process::spawn(&mut node_server_cmd).expect("node server");
    // A server in the client namespace the node connects out to.
    let mut client_server_cmd = setup.topology.client.command(&probe.to_string_lossy());
    client_server_cmd.args(["serve", "--name", "client-local", "--tcp", "0.0.0.0:9100"]);
    client_server_cmd.args(["--lifetime-secs", "120"]);
    client_server_cmd.stdout(std::process::Stdio::null());
    let _client_server = Process::spawn(&mut client_server_cmd).expect("client server");
    std::thread::sleep(Duration::from_millis(300));

    let inbound = requests(&setup, "http", SocketAddr::from((NODE_ADDR, 9000)), 10);
    assert!(inbound.failures.is_empty(), "{:?}", inbound.failures);
    assert_eq!(inbound.per_backend().get("node-local"), Some(&10));
    let inbound_udp = requests(&setup, "udp", SocketAddr::from((NODE_ADDR, 9001)), 10);
    assert_eq!(
        inbound_udp.per_backend().get("node-local"),
        Some(&10),
        "{inbound_udp:?}"
    );

    let outbound = probe::requests(
        &setup.topology.node,
        &probe,
        "http",
        SocketAddr::from((CLIENT_ADDR, 9100)),
        10,
    )
    .expect("node -> client requests");
    assert!(outbound.failures.is_empty(), "{:?}", outbound.failures);
    assert_eq!(outbound.per_backend().get("client-local"), Some(&10));
    for answer in &outbound.answers {
        assert_eq!(answer.client_seen.ip(), std::net::IpAddr::V4(NODE_ADDR));
    }
}

#[test]
fn after_sigterm_the_program_is_detached() {
    let mut setup = setup();
    let before = requests(&setup, "http", http_node_port(), 5);
    assert_eq!(before.answers.len(), 5, "{:?}", before.failures);
    setup
        .agent
        .take()
        .expect("agent")
        .stop()
        .expect("stopping lb-agent");
    // With the data path gone the NodePort is just a closed port on the node.
    let after = requests(&setup, "http", http_node_port(), 3);
    assert_eq!(after.answers.len(), 0, "{after:?}");
    assert!(
        after.failures.iter().all(|f| f.contains("refused")),
        "{:?}",
        after.failures
    );
}
