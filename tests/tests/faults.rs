//! Applies that fail halfway, with faults injected into the real (pinned) maps from outside the
//! data plane, as another process or a bug would cause them: a key deleted behind the agent's
//! back, and a map filled up so that an insert in the middle of a plan fails with E2BIG. Each
//! time the next apply must converge (not fail forever on what the failed one did), and the
//! agent's `/healthz` must fail with the reason in between and recover after. Needs root.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use aya::maps::{HashMap, LpmTrie, MapData};
use integration_tests::{
    agent::Agent,
    cluster::{Cluster, node_addr},
    netns::{Netns, run, unique_prefix},
    probe,
};
use lb_common::{FrontendKey, IPPROTO_TCP, Service, SourceRangeKey, map_names};
use lb_userspace::{
    dataplane::DataPlane,
    maps::MapContents,
    model::{DesiredState, Endpoint, Ipv4Cidr, Protocol, ServicePort, TrafficPolicy},
};

mod pinned;
use pinned::{NODE, Pins, node, start_pinned_agent};

fn endpoint(last: u8) -> Endpoint {
    pinned::endpoint(last, NODE)
}

fn port(name: &str, n: u8, endpoints: Vec<Endpoint>) -> ServicePort {
    pinned::port(name, n, Protocol::Tcp, endpoints)
}

/// `web`, `guarded` (Local policy, a source range) if `with_guarded`, and `extra`.
fn state(with_guarded: bool, extra: &[ServicePort]) -> DesiredState {
    let mut service_ports = vec![port("web", 1, vec![endpoint(1), endpoint(2)])];
    if with_guarded {
        let mut guarded = port("guarded", 2, vec![endpoint(3)]);
        guarded.external_policy = TrafficPolicy::Local;
        guarded.source_ranges = vec![Ipv4Cidr {
            addr: Ipv4Addr::new(203, 0, 113, 0),
            prefix_len: 24,
        }];
        service_ports.push(guarded);
    }
    service_ports.extend_from_slice(extra);
    DesiredState { service_ports }
}

fn contents(state: &DesiredState, previous: &MapContents) -> MapContents {
    MapContents::from_state(state, &node(), previous)
        .unwrap_or_else(|e| panic!("the test state does not fit: {e}"))
}

/// What the maps themselves hold (names are not in the maps).
fn in_maps(contents: &MapContents) -> MapContents {
    MapContents {
        service_ids: std::collections::BTreeMap::new(),
        service_names: std::collections::BTreeMap::new(),
        ..contents.clone()
    }
}

fn guarded_id(contents: &MapContents) -> u32 {
    contents
        .service_ids
        .iter()
        .find(|(identity, _)| identity.contains("guarded"))
        .map_or_else(
            || panic!("no guarded in {:?}", contents.service_ids),
            |(_, &id)| id,
        )
}

/// A frontend key no config of these tests has: 100.64.0.0/10 addresses, port 1.
fn junk_key(i: u32) -> FrontendKey {
    let [_, a, b, c] = i.to_be_bytes();
    FrontendKey {
        addr_be: u32::from_ne_bytes([100, 64 + a, b, c]),
        port_be: 1u16.to_be(),
        protocol: IPPROTO_TCP,
        scope: 0,
    }
}

fn is_junk(key: FrontendKey) -> bool {
    key.port_be == 1u16.to_be() && key.addr_be.to_ne_bytes()[0] == 100
}

/// Fills the pinned `FRONTENDS` with junk keys (raw `BPF_MAP_UPDATE_ELEM`s on the pinned map,
/// not through the data plane) until the kernel refuses one with E2BIG: the map is full. Returns
/// how many went in.
fn fill_frontends(pins: &Pins) -> u32 {
    let mut map: HashMap<MapData, FrontendKey, Service> =
        HashMap::try_from(pins.map(map_names::FRONTENDS)).expect("FRONTENDS is a hash map");
    for i in 0..=lb_common::MAX_FRONTENDS {
        if let Err(error) = map.insert(junk_key(i), Service::default(), 0) {
            let aya::maps::MapError::SyscallError(e) = &error else {
                panic!("filling FRONTENDS: {error}");
            };
            assert_eq!(
                e.io_error.raw_os_error(),
                Some(libc::E2BIG),
                "a full hash map refuses with E2BIG: {error}"
            );
            return i;
        }
    }
    panic!("FRONTENDS took more than MAX_FRONTENDS entries")
}

/// Junk keys left in the pinned `FRONTENDS`.
fn junk_left(pins: &Pins) -> usize {
    let map: HashMap<MapData, FrontendKey, Service> =
        HashMap::try_from(pins.map(map_names::FRONTENDS)).expect("FRONTENDS is a hash map");
    map.keys()
        .filter_map(Result::ok)
        .filter(|k| is_junk(*k))
        .count()
}

#[test]
fn keys_deleted_behind_the_data_planes_back_do_not_fail_the_apply_that_deletes_them() {
    let pins = Pins::new();
    let mut dp = pins.load();
    let first = contents(&state(true, &[]), &MapContents::default());
    dp.apply(first.clone()).expect("first apply");
    let guarded = guarded_id(&first);

    // Another hand removes guarded's frontends and its source range from the pinned maps.
    let mut frontends: HashMap<MapData, FrontendKey, Service> =
        HashMap::try_from(pins.map(map_names::FRONTENDS)).expect("FRONTENDS");
    let doomed: Vec<FrontendKey> = first
        .frontends
        .iter()
        .filter(|(_, f)| f.service.service_id == guarded)
        .map(|(k, _)| *k)
        .collect();
    assert!(!doomed.is_empty());
    for key in &doomed {
        frontends.remove(key).expect("removing a frontend");
    }
    let mut ranges: LpmTrie<MapData, SourceRangeKey, u8> =
        LpmTrie::try_from(pins.map(map_names::SOURCE_RANGES)).expect("SOURCE_RANGES");
    let range_keys: Vec<_> = ranges.keys().filter_map(Result::ok).collect();
    assert_eq!(range_keys.len(), 1, "guarded's one source range");
    for key in &range_keys {
        ranges.remove(key).expect("removing a source range");
    }

    // The next config drops guarded: its deletes find nothing, which is what they want.
    let second = contents(&state(false, &[]), dp.contents());
    dp.apply(second.clone())
        .unwrap_or_else(|e| panic!("an apply whose deletes already happened failed: {e}"));
    let third = contents(
        &state(false, &[port("more", 3, vec![endpoint(4)])]),
        dp.contents(),
    );
    dp.apply(third.clone()).expect("the apply after it");
    drop(dp);
    assert_eq!(in_maps(pins.load().contents()), in_maps(&third));
}

#[test]
fn an_insert_refused_halfway_through_a_plan_fails_it_and_the_next_apply_converges() {
    let pins = Pins::new();
    let mut dp = pins.load();
    let first = contents(&state(true, &[]), &MapContents::default());
    dp.apply(first.clone()).expect("first apply");

    let junk = fill_frontends(&pins);
    assert!(junk > 0);
    // guarded goes (its deletes happen first), two services come: an insert fails halfway.
    let wanted = state(
        false,
        &[
            port("more", 3, vec![endpoint(4)]),
            port("most", 4, vec![endpoint(5)]),
        ],
    );
    let second = contents(&wanted, dp.contents());
    let Err(error) = dp.apply(second) else {
        panic!("an apply into a full FRONTENDS succeeded")
    };
    assert!(error.to_string().contains(map_names::FRONTENDS), "{error}");
    assert!(
        !dp.out_of_sync(),
        "the maps were read back after the failure"
    );
    // What the data plane now believes is what the maps hold: the junk too, guarded gone.
    let believed = dp.contents().clone();
    assert_eq!(
        believed.frontends.keys().filter(|k| is_junk(**k)).count(),
        usize::try_from(junk).expect("count"),
        "the read-back sees the junk"
    );
    let guarded = guarded_id(&first);
    assert!(
        believed
            .frontends
            .values()
            .all(|f| f.service.service_id != guarded),
        "guarded's deletes happened"
    );
    assert_eq!(
        in_maps(&believed),
        in_maps(
            DataPlane::load(pins.options())
                .expect("a second handle")
                .contents()
        ),
        "another reader of the pins sees the same"
    );

    // Retried from what the maps hold: the junk is deleted (no config has it), then the inserts
    // fit. Diffing from the contents before the failure would hit E2BIG again, for ever.
    let retry = contents(&wanted, dp.contents());
    dp.apply(retry.clone())
        .unwrap_or_else(|e| panic!("the retry after a half-failed apply failed: {e}"));
    assert_eq!(junk_left(&pins), 0);
    drop(dp);
    assert_eq!(in_maps(pins.load().contents()), in_maps(&retry));
}

// ---- The agent: /healthz while applies fail ----

const WEB_NODE_PORT: u16 = 30080;
const MORE_NODE_PORT: u16 = 30081;

fn probe_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_lb-probe"))
}

/// `ops/NAME`: TCP 80 -> 8080 of pod `a` on `node_port`, cluster IP 10.96.0.N.
fn service(cluster: &Cluster, name: &str, n: u8, node_port: u16) -> String {
    let pod = cluster.pod("a").expect("pod a");
    format!(
        r"apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: ops}}
spec:
  type: NodePort
  clusterIP: 10.96.0.{n}
  ports:
    - {{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: {node_port}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-abcde
  namespace: ops
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports: [{{name: http, protocol: TCP, port: 8080}}]
endpoints:
  - addresses: [{}]
    conditions: {{ready: true}}
    nodeName: node-1
    targetRef: {{kind: Pod, namespace: ops, name: a}}
---
",
        pod.addr
    )
}

/// `curl` in `ns`: (HTTP status, body).
fn curl(ns: &Netns, url: &str) -> (u16, String) {
    let output =
        run(ns
            .command("curl")
            .args(["-s", "--max-time", "5", "-w", "\n%{http_code}", url]))
        .unwrap_or_else(|e| panic!("curl {url}: {e:#}"));
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    let status = status
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no HTTP status from {url}: {text}"));
    (status, body.to_owned())
}

fn healthz(cluster: &Cluster) -> (u16, serde_json::Value) {
    let (status, body) = curl(
        &cluster.client,
        &format!("http://{}:10256/healthz", node_addr(1)),
    );
    let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    (status, json)
}

fn wait_for_log(agent: &Agent, before: &str, line: &str) {
    agent
        .wait_for_log(before, line, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e:#}"));
}

fn served(cluster: &Cluster, port: u16) -> bool {
    let target = SocketAddr::from((node_addr(1), port));
    probe::requests(&cluster.client, &probe_bin(), "http", target, 4)
        .is_ok_and(|batch| batch.failures.is_empty())
}

#[test]
fn healthz_fails_with_the_reason_while_an_apply_fails_and_recovers_when_the_retry_converges() {
    let cluster = Cluster::create(&unique_prefix(), &[&["a"]])
        .unwrap_or_else(|e| panic!("building the cluster: {e:#}"));
    let _backends = cluster
        .start_backends(&probe_bin())
        .unwrap_or_else(|e| panic!("{e:#}"));
    let pins = Pins::new();
    let web = service(&cluster, "web", 80, WEB_NODE_PORT);
    let config = cluster
        .write_config(&web)
        .unwrap_or_else(|e| panic!("{e:#}"));
    let agent = start_pinned_agent(&cluster, &config, &pins);
    let (status, json) = healthz(&cluster);
    assert_eq!(status, 200, "{json}");
    assert!(served(&cluster, WEB_NODE_PORT));

    // The fault: FRONTENDS filled up behind the agent's back, then a new Service arrives.
    fill_frontends(&pins);
    let log = agent.log();
    cluster
        .write_config(&format!(
            "{web}{}",
            service(&cluster, "more", 81, MORE_NODE_PORT)
        ))
        .unwrap_or_else(|e| panic!("{e:#}"));
    wait_for_log(&agent, &log, "applying the config failed");
    let failed_at = Instant::now();
    let (status, json) = healthz(&cluster);
    // The retry comes 2 s after the failure; a check slower than that proves nothing.
    assert!(
        failed_at.elapsed() < Duration::from_secs(2),
        "the health check took too long to see the failure"
    );
    assert_eq!(status, 503, "/healthz after a failed apply: {json}");
    assert_eq!(json["failedApplies"], 1, "{json}");
    let reason = json["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("the last apply failed:")
            && reason.contains(map_names::FRONTENDS)
            && reason.contains("Argument list too long"),
        "the reason names the failure: {json}"
    );
    let (status, livez) = curl(
        &cluster.client,
        &format!("http://{}:10256/livez", node_addr(1)),
    );
    assert_eq!(
        status, 200,
        "/livez keeps kube-proxy's timeout rule: {livez}"
    );

    // The retry diffs from what the maps hold: it deletes the junk and the Service fits.
    wait_for_log(&agent, &log, "config reloaded");
    let (status, json) = healthz(&cluster);
    assert_eq!(status, 200, "/healthz after the retry converged: {json}");
    assert!(json.get("reason").is_none(), "{json}");
    assert_eq!(junk_left(&pins), 0, "the retry removed what no config has");
    assert!(
        served(&cluster, MORE_NODE_PORT),
        "the new Service is served"
    );
    assert!(served(&cluster, WEB_NODE_PORT), "the old one still is");
    let applied = agent.log();
    assert!(
        applied.contains("trigger=retry") && applied.contains("failed_applies=1"),
        "{applied}"
    );
    let (status, metrics) = curl(&cluster.node(1).ns, "http://127.0.0.1:10249/metrics");
    assert_eq!(status, 200);
    assert!(
        metrics
            .lines()
            .any(|l| l == r#"lbagent_config_reloads_total{result="failed"} 1"#),
        "{metrics}"
    );
    agent.stop().unwrap_or_else(|e| panic!("{e:#}"));
}
