use std::time::{Duration, UNIX_EPOCH};

use super::*;
use crate::model::{Endpoint, EndpointState, Frontend, FrontendKind, Protocol, TrafficPolicy};

pub(crate) const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 10);

fn endpoint(last: u8, port: u16, node: &str, state: EndpointState, pod: &str) -> Endpoint {
    Endpoint {
        addr: Ipv4Addr::new(10, 1, 0, last),
        port,
        pod: Some(pod.to_owned()),
        node_name: Some(node.to_owned()),
        state,
    }
}

/// `default/web` (ports `http` with a Local nodePort and `metrics`) and `kube-system/dns` (UDP),
/// seen from node `node-a`.
pub(crate) fn sample_state() -> DesiredState {
    let web_http = ServicePort {
        service: "default/web".into(),
        port_name: "http".into(),
        protocol: Protocol::Tcp,
        frontends: vec![
            Frontend {
                kind: FrontendKind::ClusterIp,
                addr: Ipv4Addr::new(10, 96, 0, 10),
                port: 80,
            },
            Frontend {
                kind: FrontendKind::NodePort,
                addr: NODE_IP,
                port: 30_080,
            },
        ],
        endpoints: vec![
            endpoint(5, 8080, "node-a", EndpointState::Ready, "web-1"),
            endpoint(6, 8080, "node-b", EndpointState::Ready, "web-2"),
            endpoint(7, 8080, "node-a", EndpointState::Terminating, "web-3"),
        ],
        external_policy: TrafficPolicy::Local,
        node_port: Some(30_080),
        node_port_assigned: true,
        health_check_node_port: Some(32_000),
        ..ServicePort::default()
    };
    let web_metrics = ServicePort {
        service: "default/web".into(),
        port_name: "metrics".into(),
        frontends: vec![Frontend {
            kind: FrontendKind::ClusterIp,
            addr: Ipv4Addr::new(10, 96, 0, 10),
            port: 9090,
        }],
        endpoints: vec![endpoint(5, 9090, "node-a", EndpointState::Ready, "web-1")],
        external_policy: TrafficPolicy::Local,
        health_check_node_port: Some(32_000),
        ..ServicePort::default()
    };
    let dns = ServicePort {
        service: "kube-system/dns".into(),
        port_name: String::new(),
        protocol: Protocol::Udp,
        frontends: vec![Frontend {
            kind: FrontendKind::ClusterIp,
            addr: Ipv4Addr::new(10, 96, 0, 53),
            port: 53,
        }],
        endpoints: vec![endpoint(9, 53, "node-b", EndpointState::Ready, "dns-1")],
        affinity_timeout_seconds: Some(600),
        ..ServicePort::default()
    };
    DesiredState {
        service_ports: vec![web_http, web_metrics, dns],
    }
}

pub(crate) fn sample_node() -> NodeConfig {
    NodeConfig {
        node_name: "node-a".into(),
        snat_addr: Some(NODE_IP),
        ..NodeConfig::default()
    }
}

pub(crate) fn sample_record() -> (AgentRecord, MapContents) {
    let state = sample_state();
    let node = sample_node();
    let contents = MapContents::from_state(&state, &node, &MapContents::default())
        .unwrap_or_else(|e| panic!("sample state must fit the maps: {e}"));
    let record = AgentRecord::build(
        &state,
        &contents,
        &node,
        ApplyInfo {
            generation: 7,
            applied_at: UNIX_EPOCH + Duration::from_millis(1_790_000_000_042),
            config_path: "/etc/lb-agent/config.yaml".into(),
            node_addresses: vec![NODE_IP],
            interfaces: vec![
                InterfaceRecord {
                    name: "veth-pod1".into(),
                    kind: InterfaceKind::Pod,
                    xdp_mode: None,
                },
                InterfaceRecord {
                    name: "eth0".into(),
                    kind: InterfaceKind::Node,
                    xdp_mode: Some("native".into()),
                },
            ],
        },
    );
    (record, contents)
}

#[test]
fn ports_are_grouped_by_service_with_the_ids_the_maps_gave_them() {
    let (record, contents) = sample_record();
    let names: Vec<_> = record
        .services
        .iter()
        .map(|s| (s.namespace.as_str(), s.name.as_str(), s.ports.len()))
        .collect();
    assert_eq!(names, [("default", "web", 2), ("kube-system", "dns", 1)]);

    let http = &record.services[0].ports[0];
    assert_eq!(http.name, "http");
    assert_eq!(
        http.service_id,
        contents.service_ids.get("default/web:http/TCP").copied()
    );
    assert!(http.service_id.is_some());
    assert_eq!(
        record.services[1].ports[0].service_id,
        contents.service_ids.get("kube-system/dns/UDP").copied()
    );
    assert_eq!(http.node_port, Some(30_080));
    assert!(http.node_port_assigned);
    assert_eq!(http.health_check_node_port, Some(32_000));
    assert_eq!(http.external_policy, PolicyName::Local);
    assert_eq!(http.internal_policy, PolicyName::Cluster);
    assert_eq!(
        http.frontends[1],
        FrontendRecord {
            kind: FrontendKindName::NodePort,
            addr: NODE_IP,
            port: 30_080
        }
    );
    assert_eq!(
        record.services[1].ports[0].affinity_timeout_seconds,
        Some(600)
    );
}

#[test]
fn endpoints_carry_locality_state_and_backend_ids() {
    let (record, contents) = sample_record();
    let http = &record.services[0].ports[0];
    let Some(service_id) = http.service_id else {
        panic!("http has a service id");
    };
    let summary: Vec<_> = http
        .endpoints
        .iter()
        .map(|e| (e.addr.octets()[3], e.local, e.state, e.backend_id))
        .collect();
    let id = |last| {
        contents
            .backend_ids
            .get(&(service_id, Ipv4Addr::new(10, 1, 0, last), 8080))
            .copied()
    };
    assert!(id(5).is_some() && id(6).is_some());
    assert_eq!(
        summary,
        [
            (5, true, EndpointStateName::Ready, id(5)),
            (6, false, EndpointStateName::Ready, id(6)),
            // Terminating while others are ready: in no table, so no backend.
            (7, true, EndpointStateName::Terminating, None),
        ]
    );
    assert_eq!(http.endpoints[0].pod.as_deref(), Some("web-1"));
    assert_eq!(http.endpoints[1].node_name.as_deref(), Some("node-b"));
}

#[test]
fn local_ready_endpoints_are_unique_across_ports() {
    let (record, _) = sample_record();
    // web-1 on 8080 and 9090 (two endpoints), web-3 terminating, web-2 remote.
    assert_eq!(record.services[0].local_ready_endpoints(), 2);
    assert_eq!(record.services[1].local_ready_endpoints(), 0);

    let mut doubled = record.services[0].clone();
    let again = doubled.ports[0].clone();
    doubled.ports.push(again);
    assert_eq!(
        doubled.local_ready_endpoints(),
        2,
        "same addr:port counts once"
    );
}

#[test]
fn record_header_fields() {
    let (record, _) = sample_record();
    assert_eq!(record.generation, 7);
    assert_eq!(record.applied_at, "2026-09-21T14:13:20.042Z");
    assert_eq!(record.node_name, "node-a");
    assert_eq!(record.node_addresses, [NODE_IP]);
    assert_eq!(record.settings.snat_addr, Some(NODE_IP));
    assert_eq!(
        record
            .interfaces
            .iter()
            .map(|i| i.name.as_str())
            .collect::<Vec<_>>(),
        ["eth0", "veth-pod1"],
        "sorted: node interfaces first"
    );
}

#[test]
fn stored_json_uses_stable_camel_case_names_and_reads_back() {
    let (record, _) = sample_record();
    let bytes = record.to_json_bytes();
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("record is JSON: {e}"));
    assert_eq!(value["recordVersion"], 1);
    assert_eq!(value["appliedAt"], "2026-09-21T14:13:20.042Z");
    assert_eq!(value["nodeAddresses"][0], "192.168.1.10");
    assert_eq!(value["interfaces"][0]["xdpMode"], "native");
    assert_eq!(value["interfaces"][1]["kind"], "pod");
    let http = &value["services"][0]["ports"][0];
    assert_eq!(http["protocol"], "TCP");
    assert_eq!(http["nodePortAssigned"], true);
    assert_eq!(http["healthCheckNodePort"], 32_000);
    assert_eq!(http["externalPolicy"], "Local");
    assert_eq!(http["selection"], "maglev");
    assert_eq!(http["frontends"][0]["kind"], "clusterIP");
    assert_eq!(http["endpoints"][2]["state"], "terminating");
    assert!(http["endpoints"][2]["backendId"].is_null());
    assert!(http["endpoints"][0]["backendId"].is_u64());
    assert_eq!(
        value["services"][1]["ports"][0]["affinityTimeoutSeconds"],
        600
    );

    let back =
        AgentRecord::from_json_bytes(&bytes).unwrap_or_else(|e| panic!("record reads back: {e}"));
    assert_eq!(back, record);
}

#[test]
fn newer_or_damaged_records_are_refused_with_a_reason() {
    let (mut record, _) = sample_record();
    record.record_version = RECORD_VERSION + 1;
    let err = AgentRecord::from_json_bytes(&record.to_json_bytes())
        .err()
        .map(|e| e.to_string());
    assert!(
        err.as_deref().is_some_and(|e| e.contains("version 2")),
        "{err:?}"
    );
    let err = AgentRecord::from_json_bytes(b"{\"recordVersion\": 1, \"generation\": \"x\"}")
        .err()
        .map(|e| e.to_string());
    assert!(
        err.as_deref().is_some_and(|e| e.contains("not valid JSON")),
        "{err:?}"
    );
    assert!(AgentRecord::from_json_bytes(b"\xff\x00garbage").is_err());
}

#[test]
fn rfc3339_formatting() {
    let at = |secs: u64, millis: u64| {
        format_rfc3339(UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis))
    };
    assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
    assert_eq!(at(951_782_400, 1), "2000-02-29T00:00:00.001Z");
    assert_eq!(at(1_709_210_096, 999), "2024-02-29T12:34:56.999Z");
    assert_eq!(at(4_102_444_799, 0), "2099-12-31T23:59:59.000Z");
    assert_eq!(
        format_rfc3339(UNIX_EPOCH - Duration::from_secs(5)),
        "1970-01-01T00:00:00.000Z"
    );
}
