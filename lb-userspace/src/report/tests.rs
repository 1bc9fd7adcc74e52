use lb_common::FlowEntry;

use super::*;
use crate::record::tests::sample_record;

/// Backend ids of the sample record: (web http 10.1.0.5, web http 10.1.0.6, web metrics
/// 10.1.0.5, dns 10.1.0.9), and the service ids of web http and dns.
pub(crate) struct Ids {
    pub http_local: u32,
    pub http_remote: u32,
    pub metrics: u32,
    pub dns: u32,
    pub http_service: u32,
    pub dns_service: u32,
}

pub(crate) fn ids(record: &AgentRecord) -> Ids {
    let id = |s: usize, p: usize, e: usize| {
        record.services[s].ports[p].endpoints[e]
            .backend_id
            .unwrap_or_else(|| panic!("endpoint {s}/{p}/{e} has a backend"))
    };
    let service = |s: usize| {
        record.services[s].ports[0]
            .service_id
            .unwrap_or_else(|| panic!("service {s} has an id"))
    };
    Ids {
        http_local: id(0, 0, 0),
        http_remote: id(0, 0, 1),
        metrics: id(0, 1, 0),
        dns: id(1, 0, 0),
        http_service: service(0),
        dns_service: service(1),
    }
}

fn flow(direction: u8, src_port: u16, service_id: u32, backend_id: u32) -> (FlowKey, FlowEntry) {
    (
        FlowKey {
            src_addr_be: u32::from_ne_bytes([172, 16, 0, 1]),
            dst_addr_be: u32::from_ne_bytes([10, 96, 0, 10]),
            src_port_be: src_port.to_be(),
            dst_port_be: 80u16.to_be(),
            protocol: lb_common::IPPROTO_TCP,
            direction,
            _pad: [0; 2],
        },
        FlowEntry {
            service_id,
            backend_id,
            ..FlowEntry::default()
        },
    )
}

const STALE_BACKEND: u32 = 999;

pub(crate) fn sample_snapshot() -> Snapshot {
    let (record, _) = sample_record();
    let ids = ids(&record);
    let traffic = |fp, fb, rp, rb| BackendStats {
        forward_packets: fp,
        forward_bytes: fb,
        reply_packets: rp,
        reply_bytes: rb,
    };
    let traffic = BTreeMap::from([
        (ids.http_local, traffic(10, 1000, 8, 4000)),
        (ids.http_remote, traffic(5, 500, 5, 2500)),
        (ids.metrics, traffic(1, 60, 1, 70)),
        (ids.dns, traffic(3, 300, 3, 600)),
        // An endpoint that went away: belongs to nothing in the record.
        (STALE_BACKEND, traffic(1_000, 1_000, 1_000, 1_000)),
    ]);
    let mut flows = vec![
        flow(direction::FORWARD, 1, ids.http_service, ids.http_local),
        flow(direction::FORWARD, 2, ids.http_service, ids.http_local),
        flow(direction::FORWARD, 3, ids.http_service, ids.http_remote),
        flow(direction::FORWARD, 4, ids.dns_service, ids.dns),
        // A connection to a removed endpoint still counts for its port.
        flow(direction::FORWARD, 5, ids.http_service, STALE_BACKEND),
    ];
    // The other entries of the same connections must not count again.
    let others: Vec<_> = flows
        .iter()
        .flat_map(|(k, e)| {
            [direction::REPLY, direction::SNAT].map(|d| (FlowKey { direction: d, ..*k }, *e))
        })
        .collect();
    flows.extend(others);
    Snapshot {
        record,
        counters: Counters {
            outcomes: vec![(Counter::XdpSeen, 100), (Counter::ForwardNew, 5)],
            drops: vec![(DropReason::NoBackend, 3)],
            egress: vec![(lb_common::Egress::Redirect, 4)],
        },
        traffic,
        flows,
    }
}

#[test]
fn per_backend_numbers() {
    let snapshot = sample_snapshot();
    let ids = ids(&snapshot.record);
    let status = Status::from_snapshot(&snapshot);
    let http = &status.services[0].ports[0];
    let b: Vec<_> = http
        .backends
        .iter()
        .map(|b| (b.backend_id, b.flows, b.traffic.packets, b.traffic.bytes))
        .collect();
    assert_eq!(
        b,
        [
            (Some(ids.http_local), 2, 18, 5000),
            (Some(ids.http_remote), 1, 10, 3000),
            (None, 0, 0, 0),
        ]
    );
    assert_eq!(
        http.backends[0].traffic,
        TrafficStatus {
            packets: 18,
            bytes: 5000,
            forward_packets: 10,
            forward_bytes: 1000,
            reply_packets: 8,
            reply_bytes: 4000,
        }
    );
    assert_eq!(http.backends[2].state, EndpointStateName::Terminating);
    assert!(http.backends[0].local && !http.backends[1].local);
}

#[test]
fn per_port_and_per_service_totals() {
    let status = Status::from_snapshot(&sample_snapshot());
    let web = &status.services[0];
    let http = &web.ports[0];
    assert_eq!(
        http.flows, 4,
        "three to known backends, one to a removed one"
    );
    assert_eq!(
        http.traffic,
        TrafficStatus {
            packets: 28,
            bytes: 8000,
            forward_packets: 15,
            forward_bytes: 1500,
            reply_packets: 13,
            reply_bytes: 6500,
        }
    );
    assert_eq!(web.ports[1].traffic.packets, 2);
    assert_eq!(
        (web.traffic.packets, web.traffic.bytes, web.flows),
        (30, 8130, 4)
    );
    let dns = &status.services[1];
    assert_eq!(
        (dns.traffic.packets, dns.traffic.bytes, dns.flows),
        (6, 900, 1)
    );
    assert_eq!(status.flows, 5);
}

#[test]
fn every_drop_reason_and_counter_is_listed() {
    let status = Status::from_snapshot(&sample_snapshot());
    assert_eq!(status.drops.len(), DropReason::ALL.len());
    assert!(status.drops.contains(&("no_backend", 3)));
    assert!(status.drops.contains(&("source_range_denied", 0)));
    assert_eq!(status.counters.len(), Counter::ALL.len());
    assert_eq!(status.counters[0], ("xdp_seen", 100));
    assert!(status.counters.contains(&("forward_new", 5)));
    assert_eq!((status.generation, status.interfaces.len()), (7, 2));
}

#[test]
fn json_output_for_scripts() {
    let status = Status::from_snapshot(&sample_snapshot());
    let value: serde_json::Value = serde_json::from_str(&status.to_json())
        .unwrap_or_else(|e| panic!("status JSON parses: {e}"));
    assert_eq!(value["generation"], 7);
    assert_eq!(value["appliedAt"], "2026-09-21T14:13:20.042Z");
    assert_eq!(value["drops"]["no_backend"], 3);
    assert_eq!(value["drops"]["snat_ports_exhausted"], 0);
    assert_eq!(value["counters"]["xdp_seen"], 100);
    assert_eq!(value["flows"], 5);
    let http = &value["services"][0]["ports"][0];
    assert_eq!(value["services"][0]["traffic"]["bytes"], 8130);
    assert_eq!(http["flows"], 4);
    assert_eq!(http["traffic"]["replyBytes"], 6500);
    assert_eq!(http["backends"][0]["addr"], "10.1.0.5");
    assert_eq!(http["backends"][0]["traffic"]["forwardPackets"], 10);
    assert_eq!(http["backends"][1]["nodeName"], "node-b");
    assert_eq!(http["backends"][2]["state"], "terminating");
    assert_eq!(http["externalPolicy"], "Local");
    assert_eq!(http["frontends"][1]["kind"], "nodePort");
    assert_eq!(value["interfaces"][0]["xdpMode"], "native");
    // The drop reasons keep the data plane's order in the text itself.
    let text = status.to_json();
    let first = text.find("\"l4_header_truncated\"");
    let last = text.find("\"snat_ports_exhausted\"");
    assert!(first.is_some() && first < last, "ordered drops");
}

/// The byte column at which `needle` ends on `line`.
fn end_of(line: &str, needle: &str) -> usize {
    line.find(needle).map_or_else(
        || panic!("{needle:?} not in {line:?}"),
        |i| i + needle.len(),
    )
}

#[test]
fn text_table_is_aligned_with_one_line_per_backend() {
    let text = Status::from_snapshot(&sample_snapshot()).render_text();
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with(
            "Node node-a (192.168.1.10), config generation 7 applied 2026-09-21T14:13:20.042Z"
        ),
        "{text}"
    );
    assert_eq!(
        lines[1],
        "Interfaces: eth0 (xdp native), veth-pod1 (pod, tc)"
    );
    assert_eq!(lines[2], "Tracked flows: 5");
    assert!(
        lines.iter().all(|l| l.trim_end() == *l),
        "no trailing spaces:\n{text}"
    );

    let find = |prefix: &str| {
        lines
            .iter()
            .copied()
            .find(|l| l.trim_start().starts_with(prefix))
            .unwrap_or_else(|| panic!("no line starting with {prefix:?} in\n{text}"))
    };
    let header = find("SERVICE / BACKEND");
    let http = find("default/web:http");
    let local = find("-> 10.1.0.5:8080");
    let remote = find("-> 10.1.0.6:8080");
    let terminating = find("-> 10.1.0.7:8080");
    let dns = find("kube-system/dns ");
    assert_eq!(
        lines.iter().filter(|l| l.contains("-> ")).count(),
        5,
        "one line per backend"
    );

    // Numbers are right-aligned under their headers.
    let packets = end_of(header, "PACKETS");
    assert_eq!(end_of(http, " 28 "), packets + 1);
    assert_eq!(end_of(local, " 18 "), packets + 1);
    assert_eq!(end_of(dns, " 6 "), packets + 1);
    let bytes = end_of(header, "  BYTES");
    assert_eq!(end_of(http, " 8000 "), bytes + 1);
    assert_eq!(end_of(remote, " 3000 "), bytes + 1);
    // State and node columns start under their headers.
    let state = header.find("STATE");
    assert_eq!(local.find("ready"), state);
    assert_eq!(terminating.find("terminating"), state);
    assert_eq!(local.find("node-a (local)"), header.find("NODE"));
    assert_eq!(remote.find("node-b"), header.find("NODE"));

    assert!(http.contains("clusterIP 10.96.0.10:80"), "{http}");
    assert!(http.contains("nodePort 192.168.1.10:30080"), "{http}");
    assert!(http.contains("nodePort 30080 (assigned)"), "{http}");
    assert!(http.contains("policy ext=Local int=Cluster"), "{http}");
    assert!(http.contains("healthCheckNodePort 32000"), "{http}");
    assert!(dns.contains("affinity 600s"), "{dns}");
    assert!(terminating.contains("takes no new flows"), "{terminating}");
    assert!(local.contains("pod web-1"), "{local}");

    let no_backend = find("no_backend");
    assert!(no_backend.ends_with(" 3"), "{no_backend}");
    assert!(find("source_range_denied").ends_with(" 0"));
    assert!(find("xdp_seen").ends_with(" 100"));
}

#[test]
fn text_without_services_says_so() {
    let mut snapshot = sample_snapshot();
    snapshot.record.services.clear();
    snapshot.record.interfaces.clear();
    let text = Status::from_snapshot(&snapshot).render_text();
    assert!(text.contains("No services."), "{text}");
    assert!(text.contains("Interfaces: none"), "{text}");
}
