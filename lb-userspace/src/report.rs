//! What `lb-agent status` shows: the applied record joined with the data plane's counters,
//! per-backend traffic and tracked flows. Pure: the caller reads the maps.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::Ipv4Addr,
};

use lb_common::{BackendStats, Counter, DropReason, Egress, FlowEntry, FlowKey, direction};
use serde::{Serialize, Serializer};

use crate::{
    dataplane::{Counters, DataPlaneError, read_backend_stats, read_counters, read_flows},
    pins::MapSource,
    record::{
        AgentRecord, EndpointStateName, FrontendRecord, InterfaceRecord, PolicyName, PortRecord,
        ProtocolName, SelectionName,
    },
};

/// Everything `status` reads, at one moment.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub record: AgentRecord,
    pub counters: Counters,
    /// Backend id -> traffic.
    pub traffic: BTreeMap<u32, BackendStats>,
    pub flows: Vec<(FlowKey, FlowEntry)>,
}

impl Snapshot {
    /// Reads the counters, the traffic of the backends `record` names and the tracked flows
    /// from `maps`: the running agent's or the pinned ones.
    pub fn read(record: AgentRecord, maps: &impl MapSource) -> Result<Self, DataPlaneError> {
        let backend_ids: BTreeSet<u32> = record
            .services
            .iter()
            .flat_map(|service| &service.ports)
            .flat_map(|port| &port.endpoints)
            .filter_map(|endpoint| endpoint.backend_id)
            .collect();
        Ok(Snapshot {
            counters: read_counters(maps)?,
            traffic: read_backend_stats(maps, backend_ids.into_iter())?,
            flows: read_flows(maps)?,
            record,
        })
    }
}

/// Packets and bytes, both directions and their sum.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficStatus {
    pub packets: u64,
    pub bytes: u64,
    pub forward_packets: u64,
    pub forward_bytes: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
}

impl TrafficStatus {
    fn add(&mut self, t: BackendStats) {
        self.forward_packets = self.forward_packets.saturating_add(t.forward_packets);
        self.forward_bytes = self.forward_bytes.saturating_add(t.forward_bytes);
        self.reply_packets = self.reply_packets.saturating_add(t.reply_packets);
        self.reply_bytes = self.reply_bytes.saturating_add(t.reply_bytes);
        self.packets = self.forward_packets.saturating_add(self.reply_packets);
        self.bytes = self.forward_bytes.saturating_add(self.reply_bytes);
    }

    fn add_status(&mut self, t: TrafficStatus) {
        self.add(BackendStats {
            forward_packets: t.forward_packets,
            forward_bytes: t.forward_bytes,
            reply_packets: t.reply_packets,
            reply_bytes: t.reply_bytes,
        });
    }
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub generation: u64,
    pub applied_at: String,
    pub config_path: String,
    pub node_name: String,
    pub node_addresses: Vec<Ipv4Addr>,
    pub interfaces: Vec<InterfaceRecord>,
    pub services: Vec<ServiceStatus>,
    /// Tracked flows (one per connection: forward entries only).
    pub flows: u64,
    /// Every drop reason, zero included, in reason order.
    #[serde(serialize_with = "ordered_map")]
    pub drops: Vec<(&'static str, u64)>,
    /// Every global counter, in counter order.
    #[serde(serialize_with = "ordered_map")]
    pub counters: Vec<(&'static str, u64)>,
    /// How the packets XDP translated left it: sent by XDP, or handed to the stack and why.
    #[serde(serialize_with = "ordered_map")]
    pub egress: Vec<(&'static str, u64)>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStatus {
    pub namespace: String,
    pub name: String,
    pub traffic: TrafficStatus,
    pub flows: u64,
    pub ports: Vec<PortStatus>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PortStatus {
    pub name: String,
    pub protocol: ProtocolName,
    pub service_id: Option<u32>,
    pub node_port: Option<u16>,
    pub node_port_assigned: bool,
    pub health_check_node_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_balancer_allocation: Option<String>,
    pub frontends: Vec<FrontendRecord>,
    pub external_policy: PolicyName,
    pub internal_policy: PolicyName,
    pub affinity_timeout_seconds: Option<u32>,
    pub selection: SelectionName,
    pub source_ranges: Vec<String>,
    pub traffic: TrafficStatus,
    /// Tracked flows of this port, including flows to endpoints that since went away.
    pub flows: u64,
    pub backends: Vec<BackendStatus>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendStatus {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub pod: Option<String>,
    pub node_name: Option<String>,
    pub state: EndpointStateName,
    pub local: bool,
    /// `None`: the endpoint takes no new flows, so the maps hold no backend for it.
    pub backend_id: Option<u32>,
    pub traffic: TrafficStatus,
    pub flows: u64,
}

/// Writes `(name, value)` pairs as a JSON object in their given order (scripts read
/// `.drops.no_backend`; people read the order the data plane counts in).
fn ordered_map<S: Serializer>(pairs: &[(&'static str, u64)], s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(pairs.iter().map(|(k, v)| (k, v)))
}

impl Status {
    #[must_use]
    pub fn from_snapshot(snapshot: &Snapshot) -> Self {
        // One connection has one FORWARD entry (its REPLY and SNAT entries are the same flow).
        let mut flows_by_backend: BTreeMap<u32, u64> = BTreeMap::new();
        let mut flows_by_service: BTreeMap<u32, u64> = BTreeMap::new();
        let mut flows = 0u64;
        for (key, entry) in &snapshot.flows {
            if key.direction == direction::FORWARD {
                flows += 1;
                *flows_by_backend.entry(entry.backend_id).or_default() += 1;
                *flows_by_service.entry(entry.service_id).or_default() += 1;
            }
        }

        let record = &snapshot.record;
        let flow_counts = FlowCounts {
            by_backend: flows_by_backend,
            by_service: flows_by_service,
        };
        let services = record
            .services
            .iter()
            .map(|service| {
                let ports: Vec<PortStatus> = service
                    .ports
                    .iter()
                    .map(|port| port_status(port, &snapshot.traffic, &flow_counts))
                    .collect();
                let mut traffic = TrafficStatus::default();
                for p in &ports {
                    traffic.add_status(p.traffic);
                }
                ServiceStatus {
                    namespace: service.namespace.clone(),
                    name: service.name.clone(),
                    traffic,
                    flows: ports.iter().map(|p| p.flows).sum(),
                    ports,
                }
            })
            .collect();

        Status {
            generation: record.generation,
            applied_at: record.applied_at.clone(),
            config_path: record.config_path.clone(),
            node_name: record.node_name.clone(),
            node_addresses: record.node_addresses.clone(),
            interfaces: record.interfaces.clone(),
            services,
            flows,
            drops: DropReason::ALL
                .iter()
                .map(|&r| (r.name(), snapshot.counters.drops(r)))
                .collect(),
            counters: Counter::ALL
                .iter()
                .map(|&c| (c.name(), snapshot.counters.get(c)))
                .collect(),
            egress: Egress::ALL
                .iter()
                .map(|&e| (e.name(), snapshot.counters.egress(e)))
                .collect(),
        }
    }

    /// `status --output json`.
    #[must_use]
    pub fn to_json(&self) -> String {
        // Plain structs of strings and numbers: serializing cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// One line per service port, one per backend under it.
    fn services_table(&self) -> Table {
        let mut table = Table::new(&[
            ("SERVICE / BACKEND", Align::Left),
            ("PROTO", Align::Left),
            ("STATE", Align::Left),
            ("NODE", Align::Left),
            ("FLOWS", Align::Right),
            ("PACKETS", Align::Right),
            ("BYTES", Align::Right),
            ("FWD PKTS", Align::Right),
            ("RPL PKTS", Align::Right),
            ("DETAILS", Align::Left),
        ]);
        for service in &self.services {
            for port in &service.ports {
                let name = if port.name.is_empty() {
                    format!("{}/{}", service.namespace, service.name)
                } else {
                    format!("{}/{}:{}", service.namespace, service.name, port.name)
                };
                table.row(vec![
                    name,
                    port.protocol.as_str().to_owned(),
                    String::new(),
                    String::new(),
                    port.flows.to_string(),
                    port.traffic.packets.to_string(),
                    port.traffic.bytes.to_string(),
                    port.traffic.forward_packets.to_string(),
                    port.traffic.reply_packets.to_string(),
                    port_details(port),
                ]);
                for b in &port.backends {
                    let mut details = Vec::new();
                    if let Some(pod) = &b.pod {
                        details.push(format!("pod {pod}"));
                    }
                    match b.backend_id {
                        Some(id) => details.push(format!("id {id}")),
                        None => details.push("takes no new flows".to_owned()),
                    }
                    table.row(vec![
                        format!("  -> {}:{}", b.addr, b.port),
                        String::new(),
                        b.state.as_str().to_owned(),
                        match (&b.node_name, b.local) {
                            (Some(node), true) => format!("{node} (local)"),
                            (Some(node), false) => node.clone(),
                            (None, _) => "-".to_owned(),
                        },
                        b.flows.to_string(),
                        b.traffic.packets.to_string(),
                        b.traffic.bytes.to_string(),
                        b.traffic.forward_packets.to_string(),
                        b.traffic.reply_packets.to_string(),
                        details.join(", "),
                    ]);
                }
            }
        }
        table
    }

    /// The human table: a header, one line per service port with its frontends, one line per
    /// backend under it, then drops and counters.
    #[must_use]
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let addresses: Vec<String> = self
            .node_addresses
            .iter()
            .map(ToString::to_string)
            .collect();
        let _ = writeln!(
            out,
            "Node {} ({}), config generation {} applied {} from {}",
            self.node_name,
            if addresses.is_empty() {
                "no addresses".to_owned()
            } else {
                addresses.join(", ")
            },
            self.generation,
            self.applied_at,
            self.config_path
        );
        let interfaces: Vec<String> = self
            .interfaces
            .iter()
            .map(|i| match &i.xdp_mode {
                Some(mode) => format!("{} (xdp {mode})", i.name),
                None => format!("{} (pod, tc)", i.name),
            })
            .collect();
        let _ = writeln!(
            out,
            "Interfaces: {}",
            if interfaces.is_empty() {
                "none".to_owned()
            } else {
                interfaces.join(", ")
            }
        );
        let _ = writeln!(out, "Tracked flows: {}", self.flows);
        out.push('\n');

        if self.services.is_empty() {
            out.push_str("No services.\n");
        } else {
            out.push_str(&self.services_table().render());
        }
        out.push('\n');

        let mut drops = Table::new(&[("DROP REASON", Align::Left), ("PACKETS", Align::Right)]);
        for (name, n) in &self.drops {
            drops.row(vec![(*name).to_owned(), n.to_string()]);
        }
        out.push_str(&drops.render());
        out.push('\n');
        let mut counters = Table::new(&[("COUNTER", Align::Left), ("PACKETS", Align::Right)]);
        for (name, n) in &self.counters {
            counters.row(vec![(*name).to_owned(), n.to_string()]);
        }
        out.push_str(&counters.render());
        out.push('\n');
        let mut egress = Table::new(&[("XDP EGRESS", Align::Left), ("PACKETS", Align::Right)]);
        for (name, n) in &self.egress {
            egress.row(vec![(*name).to_owned(), n.to_string()]);
        }
        out.push_str(&egress.render());
        out
    }
}

/// Tracked connections by backend id and by service id.
struct FlowCounts {
    by_backend: BTreeMap<u32, u64>,
    by_service: BTreeMap<u32, u64>,
}

fn port_status(
    port: &PortRecord,
    traffic_by_backend: &BTreeMap<u32, BackendStats>,
    flows: &FlowCounts,
) -> PortStatus {
    let backends: Vec<BackendStatus> = port
        .endpoints
        .iter()
        .map(|e| {
            let mut traffic = TrafficStatus::default();
            if let Some(t) = e.backend_id.and_then(|id| traffic_by_backend.get(&id)) {
                traffic.add(*t);
            }
            BackendStatus {
                addr: e.addr,
                port: e.port,
                pod: e.pod.clone(),
                node_name: e.node_name.clone(),
                state: e.state,
                local: e.local,
                backend_id: e.backend_id,
                traffic,
                flows: e
                    .backend_id
                    .and_then(|id| flows.by_backend.get(&id).copied())
                    .unwrap_or(0),
            }
        })
        .collect();
    let mut traffic = TrafficStatus::default();
    // Each backend id once, even if an endpoint were listed twice.
    let mut counted = BTreeSet::new();
    for b in &backends {
        if let Some(id) = b.backend_id
            && counted.insert(id)
        {
            traffic.add_status(b.traffic);
        }
    }
    PortStatus {
        name: port.name.clone(),
        protocol: port.protocol,
        service_id: port.service_id,
        node_port: port.node_port,
        node_port_assigned: port.node_port_assigned,
        health_check_node_port: port.health_check_node_port,
        load_balancer_allocation: port.load_balancer_allocation.clone(),
        frontends: port.frontends.clone(),
        external_policy: port.external_policy,
        internal_policy: port.internal_policy,
        affinity_timeout_seconds: port.affinity_timeout_seconds,
        selection: port.selection,
        source_ranges: port.source_ranges.clone(),
        traffic,
        flows: port
            .service_id
            .and_then(|id| flows.by_service.get(&id).copied())
            .unwrap_or(0),
        backends,
    }
}

fn port_details(port: &PortStatus) -> String {
    let mut details: Vec<String> = port
        .frontends
        .iter()
        .map(|f| format!("{} {}:{}", f.kind.as_str(), f.addr, f.port))
        .collect();
    if port.node_port_assigned
        && let Some(node_port) = port.node_port
    {
        details.push(format!("nodePort {node_port} (assigned)"));
    }
    if let Some(allocation) = &port.load_balancer_allocation {
        details.push(format!("loadBalancer {allocation}"));
    }
    details.push(format!(
        "policy ext={} int={}",
        port.external_policy.as_str(),
        port.internal_policy.as_str()
    ));
    if let Some(hcnp) = port.health_check_node_port {
        details.push(format!("healthCheckNodePort {hcnp}"));
    }
    if let Some(seconds) = port.affinity_timeout_seconds {
        details.push(format!("affinity {seconds}s"));
    }
    if port.selection != SelectionName::Maglev {
        details.push(format!("selection {}", port.selection.as_str()));
    }
    if !port.source_ranges.is_empty() {
        details.push(format!("sources {}", port.source_ranges.join(" ")));
    }
    details.join(", ")
}

#[derive(Clone, Copy)]
enum Align {
    Left,
    Right,
}

/// Columns padded to their widest cell, two spaces apart, no trailing spaces.
struct Table {
    columns: Vec<(&'static str, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(columns: &[(&'static str, Align)]) -> Self {
        Table {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn render(&self) -> String {
        let header: Vec<String> = self.columns.iter().map(|(h, _)| (*h).to_owned()).collect();
        let all: Vec<&Vec<String>> = std::iter::once(&header).chain(&self.rows).collect();
        let widths: Vec<usize> = (0..self.columns.len())
            .map(|i| {
                all.iter()
                    .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for row in all {
            let mut line = String::new();
            for (i, (_, align)) in self.columns.iter().enumerate() {
                let cell = row.get(i).map_or("", String::as_str);
                let width = widths.get(i).copied().unwrap_or(0);
                if i > 0 {
                    line.push_str("  ");
                }
                let _ = match align {
                    Align::Left => write!(line, "{cell:<width$}"),
                    Align::Right => write!(line, "{cell:>width$}"),
                };
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
pub(crate) mod tests;
