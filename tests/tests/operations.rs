//! Operating the agent: a config change applied by watching the file while connections are
//! established, an invalid change that changes nothing, `status` and metrics against known
//! traffic, and the health answers load balancers rely on. Real agents in namespaces of a test
//! cluster (tests/src/cluster.rs), torn down by their guards. Needs root (CI is root).

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use integration_tests::{
    agent::{Agent, agent_bin},
    cluster::{Cluster, NODE_IFACE, node_addr},
    netns::{Netns, run, unique_prefix},
    probe::{self, Batch, Hold},
};

mod pinned;
use pinned::{Pins, start_pinned_agent};

const WEB_NODE_PORT: u16 = 30080;
const ECHO_NODE_PORT: u16 = 30053;
const HEALTH_PORT: u16 = 32100;
/// kube-proxy's metrics and health addresses, the agent's defaults.
const METRICS_URL: &str = "http://127.0.0.1:10249/metrics";
/// UDP requests in the status test, each from a new socket.
const REQUESTS: u32 = 12;
/// "hello" in a UDP datagram: 20 bytes of IP header, 8 of UDP, 5 of payload.
const REQUEST_BYTES: u32 = 33;

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

/// `EndpointSlice` endpoints for `names`, ready or not.
fn endpoints(cluster: &Cluster, names: &[&str], ready: bool) -> String {
    let mut yaml = String::new();
    for name in names {
        let pod = cluster.pod(name).unwrap_or_else(|| panic!("no pod {name}"));
        let node = cluster.node_of(name).expect("the pod's node");
        let _ = write!(
            yaml,
            "  - addresses: [{}]\n    conditions: {{ready: {ready}}}\n    nodeName: \
             node-{node}\n    targetRef: {{kind: Pod, namespace: ops, name: {name}}}\n",
            pod.addr
        );
    }
    yaml
}

/// `ops/web`: TCP 80 -> 8080 on nodePort 30080 (type `LoadBalancer`; `spec_extra` is added to
/// its spec).
fn web(spec_extra: &str, endpoints: &str) -> String {
    format!(
        r"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: ops}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.80
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
  namespace: ops
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{{name: http, protocol: TCP, port: 8080}}]
endpoints:
{endpoints}---
"
    )
}

/// `ops/echo`: UDP 53 -> 5353 on nodePort 30053.
fn echo(endpoints: &str) -> String {
    format!(
        r"apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: ops}}
spec:
  type: NodePort
  clusterIP: 10.96.0.53
  ports:
    - {{name: dns, protocol: UDP, port: 53, targetPort: 5353, nodePort: {ECHO_NODE_PORT}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: echo-abcde
  namespace: ops
  labels: {{kubernetes.io/service-name: echo}}
addressType: IPv4
ports: [{{name: dns, protocol: UDP, port: 5353}}]
endpoints:
{endpoints}---
"
    )
}

fn start_agent(cluster: &Cluster, node: u8, config: &Path) -> Agent {
    cluster
        .start_agent(node, &agent_bin(), config, node_addr(node), &[])
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// Waits (bounded) until the agent's log has one more `line` than it had in `before`.
fn wait_for_log(agent: &Agent, before: &str, line: &str) {
    agent
        .wait_for_log(before, line, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e:#}"));
}

fn requests(ns: &Netns, kind: &str, target: SocketAddr, count: u32) -> Batch {
    probe::requests(ns, &probe_bin(), kind, target, count)
        .unwrap_or_else(|e| panic!("{kind} requests to {target}: {e:#}"))
}

fn backends(batch: &Batch) -> BTreeSet<String> {
    batch.per_backend().into_keys().collect()
}

/// `curl` in `ns`: (HTTP status, headers, body). Bounded by curl's own timeout.
fn curl(ns: &Netns, url: &str) -> (u16, String, String) {
    let output = run(ns
        .command("curl")
        .args(["-s", "-i", "--max-time", "5", url]))
    .unwrap_or_else(|e| panic!("curl {url}: {e:#}"));
    let text = String::from_utf8_lossy(&output.stdout).replace("\r\n", "\n");
    let (head, body) = text.split_once("\n\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status from {url}: {text}"));
    (status, head.to_owned(), body.to_owned())
}

/// The value of the sample `name{labels}` (exactly as rendered) in Prometheus text.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

fn metrics(node: &Netns) -> String {
    let (status, _, body) = curl(node, METRICS_URL);
    assert_eq!(status, 200, "metrics answer:\n{body}");
    body
}

#[test]
fn a_file_change_is_applied_under_established_connections_and_an_invalid_one_changes_nothing() {
    let cluster = cluster(&[&["a", "b", "c"]]);
    let _backends = cluster
        .start_backends(&probe_bin())
        .unwrap_or_else(|e| panic!("{e:#}"));
    let config = cluster
        .write_config(&web("", &endpoints(&cluster, &["a", "b"], true)))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let agent = start_agent(&cluster, 1, &config);
    let node = &cluster.node(1).ns;
    let target = node_port(1, WEB_NODE_PORT);

    let before = requests(&cluster.client, "http", target, 20);
    assert!(before.failures.is_empty(), "{:?}", before.failures);
    assert_eq!(backends(&before), BTreeSet::from(["a".into(), "b".into()]));
    let release = cluster.scratch().join("release");
    let mut held = Hold::start(&cluster.client, &probe_bin(), target, 8, &release)
        .unwrap_or_else(|e| panic!("{e:#}"));
    let first = held
        .held(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e:#}"));

    // Written, not signalled: the agent sees the file change by itself.
    let log = agent.log();
    cluster
        .write_config(&web("", &endpoints(&cluster, &["b", "c"], true)))
        .unwrap_or_else(|e| panic!("{e:#}"));
    wait_for_log(&agent, &log, "config reloaded");
    let applied = agent.log();
    assert!(
        applied.contains("trigger=file") && applied.contains("latency_ms="),
        "the reload must say what triggered it and how long it took:\n{applied}"
    );

    let again = held
        .release(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e:#}"));
    for (index, (first, again)) in first.iter().zip(&again).enumerate() {
        let (Ok(first), Ok(again)) = (first, again) else {
            panic!(
                "held connection {index} broke across the reload: {first:?} / {again:?}\n{}",
                held.output()
            );
        };
        assert_eq!(
            first.backend, again.backend,
            "held connection {index} changed backend"
        );
    }
    let after = requests(&cluster.client, "http", target, 20);
    assert!(after.failures.is_empty(), "{:?}", after.failures);
    assert_eq!(backends(&after), BTreeSet::from(["b".into(), "c".into()]));

    let scraped = metrics(node);
    assert_eq!(sample(&scraped, "lbagent_config_generation"), Some(2.0));
    assert_eq!(
        sample(
            &scraped,
            "lbagent_config_apply_duration_seconds_count{source=\"file\"}"
        ),
        Some(1.0)
    );

    // An invalid change: refused with its error, and nothing changes.
    let log = agent.log();
    cluster
        .write_config(&web(
            "",
            &endpoints(&cluster, &["a", "b", "c"], true)
                .replace("addresses: [10.", "addresses: [310."),
        ))
        .unwrap_or_else(|e| panic!("{e:#}"));
    wait_for_log(&agent, &log, "config reload refused");
    assert!(
        agent.log().contains("is not an IPv4 address"),
        "the refusal must carry the error:\n{}",
        agent.log()
    );
    let refused = requests(&cluster.client, "http", target, 20);
    assert!(refused.failures.is_empty(), "{:?}", refused.failures);
    assert_eq!(backends(&refused), BTreeSet::from(["b".into(), "c".into()]));
    let scraped = metrics(node);
    assert_eq!(sample(&scraped, "lbagent_config_generation"), Some(2.0));
    assert_eq!(
        sample(
            &scraped,
            r#"lbagent_config_reloads_total{result="refused"}"#
        ),
        Some(1.0)
    );
    agent.stop().unwrap_or_else(|e| panic!("{e:#}"));
}

fn status_json(pins: &Pins) -> serde_json::Value {
    let output = run(Command::new(agent_bin()).args([
        "status",
        "--pin-dir",
        pins.arg(),
        "--output",
        "json",
    ]))
    .unwrap_or_else(|e| panic!("{e:#}"));
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "status --output json is not JSON: {e}\n{}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

/// The status of `ops/echo` after `REQUESTS` UDP requests to its one backend.
fn check_echo_status(status: &serde_json::Value, when: &str) {
    let service = &status["services"][0];
    assert_eq!(service["namespace"], "ops", "{when}: {status:#}");
    assert_eq!(service["name"], "echo", "{when}");
    let port = &service["ports"][0];
    assert_eq!(port["nodePort"], ECHO_NODE_PORT, "{when}");
    let backend = &port["backends"][0];
    let traffic = &backend["traffic"];
    assert_eq!(
        traffic["forwardPackets"],
        u64::from(REQUESTS),
        "{when}: {backend:#}"
    );
    assert_eq!(
        traffic["forwardBytes"],
        u64::from(REQUESTS * REQUEST_BYTES),
        "{when}: {backend:#}"
    );
    assert_eq!(
        traffic["replyPackets"],
        u64::from(REQUESTS),
        "{when}: {backend:#}"
    );
    // Every request came from a new socket: one tracked flow each (UDP flows idle 60 s).
    assert_eq!(backend["flows"], u64::from(REQUESTS), "{when}: {backend:#}");
    assert_eq!(service["flows"], u64::from(REQUESTS), "{when}");
    assert_eq!(status["drops"]["no_backend"], 0, "{when}");
    assert_eq!(status["interfaces"][0]["name"], NODE_IFACE, "{when}");
    assert!(
        status["interfaces"][0]["xdpMode"].is_string(),
        "{when}: the attach mode: {status:#}"
    );
}

#[test]
fn status_and_metrics_count_known_traffic_while_running_and_after_the_agent_stopped() {
    let cluster = cluster(&[&["a"]]);
    let _backends = cluster
        .start_backends(&probe_bin())
        .unwrap_or_else(|e| panic!("{e:#}"));
    // Besides `echo`, a LoadBalancer Service with no address in its status: from the files,
    // the agent allocates one of the pool, serves it and shows it in `status`.
    let pending_lb = echo(&endpoints(&cluster, &["a"], true))
        .replace("name: echo", "name: echo-lb")
        .replace("echo-abcde", "echo-lb-abcde")
        .replace("service-name: echo}", "service-name: echo-lb}")
        .replace("type: NodePort", "type: LoadBalancer")
        .replace("clusterIP: 10.96.0.53", "clusterIP: 10.96.0.54")
        .replace(
            &format!(", nodePort: {ECHO_NODE_PORT}"),
            ", nodePort: 30054",
        );
    let pool = "apiVersion: lb-agent/v1alpha1\nkind: AgentSettings\nloadBalancerIPPools:\n- \
                {name: test, addresses: [198.51.100.32/29]}\n---\n";
    let config = cluster
        .write_config(&format!(
            "{pool}{}{pending_lb}",
            echo(&endpoints(&cluster, &["a"], true))
        ))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let pins = Pins::new();
    let agent = start_pinned_agent(&cluster, &config, &pins);

    let batch = requests(
        &cluster.client,
        "udp",
        node_port(1, ECHO_NODE_PORT),
        REQUESTS,
    );
    assert!(batch.failures.is_empty(), "{:?}", batch.failures);

    check_echo_status(&status_json(&pins), "while the agent runs");
    let status = status_json(&pins);
    let lb_port = &status["services"][1]["ports"][0];
    assert_eq!(
        lb_port["loadBalancerAllocation"], "allocated from pool test",
        "{status:#}"
    );
    let allocated: std::net::Ipv4Addr = lb_port["frontends"]
        .as_array()
        .and_then(|f| f.iter().find(|f| f["kind"] == "loadBalancer"))
        .and_then(|f| f["addr"].as_str()?.parse().ok())
        .unwrap_or_else(|| panic!("no loadBalancer frontend: {status:#}"));
    assert!(allocated.octets()[..3] == [198, 51, 100] && (32..40).contains(&allocated.octets()[3]));
    let via_pool = requests(&cluster.client, "udp", SocketAddr::from((allocated, 53)), 3);
    assert!(via_pool.failures.is_empty(), "{:?}", via_pool.failures);

    let scraped = metrics(&cluster.node(1).ns);
    let labels = |direction: &str| {
        format!(
            r#"{{namespace="ops",service="echo",port="dns",protocol="UDP",backend="{}:5353",direction="{direction}"}}"#,
            cluster.pod("a").expect("pod a").addr
        )
    };
    assert_eq!(
        sample(
            &scraped,
            &format!("lbagent_backend_packets_total{}", labels("forward"))
        ),
        Some(f64::from(REQUESTS)),
        "metrics:\n{scraped}"
    );
    assert_eq!(
        sample(
            &scraped,
            &format!("lbagent_backend_bytes_total{}", labels("forward"))
        ),
        Some(f64::from(REQUESTS * REQUEST_BYTES)),
        "metrics:\n{scraped}"
    );
    assert_eq!(
        sample(
            &scraped,
            &format!("lbagent_backend_packets_total{}", labels("reply"))
        ),
        Some(f64::from(REQUESTS)),
        "metrics:\n{scraped}"
    );

    // The default stop keeps the pinned data plane: status still reads it.
    agent.stop().unwrap_or_else(|e| panic!("{e:#}"));
    check_echo_status(&status_json(&pins), "after the agent stopped");
    let output = run(Command::new(agent_bin()).args(["status", "--pin-dir", pins.arg()]))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("ops/echo")
            && text.contains(&cluster.pod("a").expect("pod a").addr.to_string())
            && text.contains("loadBalancer allocated from pool test"),
        "status text:\n{text}"
    );
}

#[test]
fn health_checks_answer_by_local_endpoints_as_kube_proxy_does() {
    // Pod a on node 1, none on node 2.
    let cluster = cluster(&[&["a"], &[]]);
    let _backends = cluster
        .start_backends(&probe_bin())
        .unwrap_or_else(|e| panic!("{e:#}"));
    let local = format!("  externalTrafficPolicy: Local\n  healthCheckNodePort: {HEALTH_PORT}\n");
    let config = cluster
        .write_config(&web(&local, &endpoints(&cluster, &["a"], true)))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let agent_1 = start_agent(&cluster, 1, &config);
    let agent_2 = start_agent(&cluster, 2, &config);
    let url = |node: u8, path: &str| format!("http://{}:{}{path}", node_addr(node), HEALTH_PORT);

    let (status, head, body) = curl(&cluster.client, &url(1, "/"));
    assert_eq!(
        status, 200,
        "node 1 has a ready local endpoint: {head}\n{body}"
    );
    let json: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
    assert_eq!(json["service"]["namespace"], "ops");
    assert_eq!(json["service"]["name"], "web");
    assert_eq!(json["localEndpoints"], 1);
    assert_eq!(json["serviceProxyHealthy"], true);
    let head = head.to_ascii_lowercase();
    assert!(head.contains("content-type: application/json"), "{head}");
    assert!(head.contains("x-content-type-options: nosniff"), "{head}");
    assert!(
        head.contains("x-load-balancing-endpoint-weight: 1"),
        "{head}"
    );

    let (status, _, body) = curl(&cluster.client, &url(2, "/"));
    assert_eq!(status, 503, "node 2 has no local endpoint: {body}");
    let json: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
    assert_eq!(json["localEndpoints"], 0);

    for node in [1, 2] {
        for path in ["/healthz", "/livez"] {
            let (status, _, body) = curl(
                &cluster.client,
                &format!("http://{}:10256{path}", node_addr(node)),
            );
            assert_eq!(status, 200, "node {node} {path}: {body}");
            let json: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
            assert!(json["lastUpdated"].is_string() && json["currentTime"].is_string());
            if path == "/healthz" {
                assert_eq!(json["nodeEligible"], true);
            }
        }
    }

    // The endpoint stops being ready: node 1 sends load balancers away too.
    let log = agent_1.log();
    cluster
        .write_config(&web(&local, &endpoints(&cluster, &["a"], false)))
        .unwrap_or_else(|e| panic!("{e:#}"));
    wait_for_log(&agent_1, &log, "config reloaded");
    let (status, _, body) = curl(&cluster.client, &url(1, "/"));
    assert_eq!(status, 503, "no ready local endpoint any more: {body}");

    // A Service that no longer asks for health checks closes its port.
    let log = agent_1.log();
    cluster
        .write_config(&web("", &endpoints(&cluster, &["a"], true)))
        .unwrap_or_else(|e| panic!("{e:#}"));
    wait_for_log(&agent_1, &log, "config reloaded");
    let output = run(cluster.client.command("curl").args([
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "5",
        &url(1, "/"),
    ]));
    assert!(
        output.is_err() || output.is_ok_and(|o| o.stdout == b"000"),
        "the health-check port must be closed once no Service uses it"
    );
    agent_1.stop().unwrap_or_else(|e| panic!("{e:#}"));
    agent_2.stop().unwrap_or_else(|e| panic!("{e:#}"));
}
