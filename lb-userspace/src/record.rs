//! The record of what the agent applied: every Service as it went into the maps, with the ids
//! the maps gave its ports and endpoints. The agent stores it (as JSON) next to the pinned maps,
//! so `lb-agent status` can explain the maps without the config, even after the agent stopped.
//!
//! The JSON is a stored format: field names are camelCase and must stay stable; new fields get
//! `#[serde(default)]` so an older record still reads.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::{
    maps::{MapContents, NodeConfig, service_identity},
    model::{self, DesiredState, ServicePort},
};

/// Bumped when a change to the record could be misread by an older `status`.
pub const RECORD_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentRecord {
    pub record_version: u32,
    /// Successful applies since the agent's first start on this pin directory.
    pub generation: u64,
    /// When the maps were last written, RFC 3339 UTC.
    pub applied_at: String,
    pub config_path: String,
    pub node_name: String,
    pub node_addresses: Vec<Ipv4Addr>,
    pub settings: SettingsRecord,
    pub interfaces: Vec<InterfaceRecord>,
    /// Sorted by namespace and name.
    pub services: Vec<ServiceRecord>,
}

/// The node settings the maps were built with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SettingsRecord {
    pub maglev_table_size: u32,
    pub maglev_seed: u32,
    pub max_tables: u32,
    pub snat_addr: Option<Ipv4Addr>,
    /// Inclusive.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    pub source_ranges_on_node_ports: bool,
}

impl From<&NodeConfig> for SettingsRecord {
    fn from(node: &NodeConfig) -> Self {
        SettingsRecord {
            maglev_table_size: node.maglev_table_size,
            maglev_seed: node.maglev_seed,
            max_tables: node.max_tables,
            snat_addr: node.snat_addr,
            snat_port_min: node.snat_ports.0,
            snat_port_max: node.snat_ports.1,
            source_ranges_on_node_ports: node.source_ranges_on_node_ports,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum InterfaceKind {
    /// A node interface: XDP on ingress, TC on egress.
    Node,
    /// A host-side pod interface: TC on ingress.
    Pod,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InterfaceRecord {
    pub name: String,
    pub kind: InterfaceKind,
    /// `native` or `generic` for node interfaces; `None` for pod interfaces (no XDP).
    pub xdp_mode: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRecord {
    pub namespace: String,
    pub name: String,
    /// In the config's order of port names.
    pub ports: Vec<PortRecord>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ProtocolName {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
}

impl From<model::Protocol> for ProtocolName {
    fn from(p: model::Protocol) -> Self {
        match p {
            model::Protocol::Tcp => ProtocolName::Tcp,
            model::Protocol::Udp => ProtocolName::Udp,
        }
    }
}

impl ProtocolName {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            ProtocolName::Tcp => "TCP",
            ProtocolName::Udp => "UDP",
        }
    }
}

/// A frontend kind, spelled like the Service fields it comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum FrontendKindName {
    #[serde(rename = "clusterIP")]
    ClusterIp,
    #[serde(rename = "nodePort")]
    NodePort,
    #[serde(rename = "loadBalancer")]
    LoadBalancer,
    #[serde(rename = "externalIP")]
    ExternalIp,
}

impl From<model::FrontendKind> for FrontendKindName {
    fn from(k: model::FrontendKind) -> Self {
        match k {
            model::FrontendKind::ClusterIp => FrontendKindName::ClusterIp,
            model::FrontendKind::NodePort => FrontendKindName::NodePort,
            model::FrontendKind::LoadBalancer => FrontendKindName::LoadBalancer,
            model::FrontendKind::ExternalIp => FrontendKindName::ExternalIp,
        }
    }
}

impl FrontendKindName {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            FrontendKindName::ClusterIp => "clusterIP",
            FrontendKindName::NodePort => "nodePort",
            FrontendKindName::LoadBalancer => "loadBalancer",
            FrontendKindName::ExternalIp => "externalIP",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontendRecord {
    pub kind: FrontendKindName,
    pub addr: Ipv4Addr,
    pub port: u16,
}

/// `externalTrafficPolicy` / `internalTrafficPolicy`, spelled as in the Service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PolicyName {
    Cluster,
    Local,
}

impl From<model::TrafficPolicy> for PolicyName {
    fn from(p: model::TrafficPolicy) -> Self {
        match p {
            model::TrafficPolicy::Cluster => PolicyName::Cluster,
            model::TrafficPolicy::Local => PolicyName::Local,
        }
    }
}

impl PolicyName {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            PolicyName::Cluster => "Cluster",
            PolicyName::Local => "Local",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum SelectionName {
    Maglev,
    Random,
}

impl From<model::Selection> for SelectionName {
    fn from(s: model::Selection) -> Self {
        match s {
            model::Selection::Maglev => SelectionName::Maglev,
            model::Selection::Random => SelectionName::Random,
        }
    }
}

impl SelectionName {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            SelectionName::Maglev => "maglev",
            SelectionName::Random => "random",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum EndpointStateName {
    Ready,
    Terminating,
}

impl From<model::EndpointState> for EndpointStateName {
    fn from(s: model::EndpointState) -> Self {
        match s {
            model::EndpointState::Ready => EndpointStateName::Ready,
            model::EndpointState::Terminating => EndpointStateName::Terminating,
        }
    }
}

impl EndpointStateName {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            EndpointStateName::Ready => "ready",
            EndpointStateName::Terminating => "terminating",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortRecord {
    /// Empty for a Service's single unnamed port.
    pub name: String,
    pub protocol: ProtocolName,
    /// The id the maps know this port by; `None` only if the contents were built from another
    /// state than the record (a bug, but the record still says what it can).
    pub service_id: Option<u32>,
    pub node_port: Option<u16>,
    pub node_port_assigned: bool,
    pub health_check_node_port: Option<u16>,
    /// `allocated from pool NAME` or `pending: why`, when lb-agent allocates the load
    /// balancer address (files as the source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer_allocation: Option<String>,
    pub frontends: Vec<FrontendRecord>,
    pub external_policy: PolicyName,
    pub internal_policy: PolicyName,
    pub affinity_timeout_seconds: Option<u32>,
    pub selection: SelectionName,
    /// CIDRs, `a.b.c.d/n`.
    pub source_ranges: Vec<String>,
    pub endpoints: Vec<EndpointRecord>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointRecord {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub pod: Option<String>,
    pub node_name: Option<String>,
    pub state: EndpointStateName,
    /// On this node (`nodeName` is this node's name).
    pub local: bool,
    /// The backend id when some Maglev table of the port holds the endpoint; `None` for an
    /// endpoint that takes no new flows (terminating while others are ready, or remote behind
    /// a `Local` policy).
    pub backend_id: Option<u32>,
}

/// What the record needs besides the desired state and the map contents.
#[derive(Clone, Debug)]
pub struct ApplyInfo {
    pub generation: u64,
    pub applied_at: SystemTime,
    pub config_path: String,
    pub node_addresses: Vec<Ipv4Addr>,
    pub interfaces: Vec<InterfaceRecord>,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(
        "the stored agent record is not valid JSON of this agent's format: {0}; it was written \
         by another lb-agent version or damaged, and the next successful apply rewrites it"
    )]
    Parse(#[source] serde_json::Error),
    #[error(
        "the stored agent record has version {found}, this lb-agent reads up to \
         {RECORD_VERSION}; use the lb-agent binary that is running"
    )]
    Version { found: u32 },
}

/// Splits `namespace/name`; a name without a namespace (never produced by the config) keeps
/// the whole string as the name.
fn split_service(service: &str) -> (String, String) {
    match service.split_once('/') {
        Some((namespace, name)) => (namespace.to_owned(), name.to_owned()),
        None => (String::new(), service.to_owned()),
    }
}

impl AgentRecord {
    /// The record of `state` as `contents` put it into the maps, on the node `node`.
    #[must_use]
    pub fn build(
        state: &DesiredState,
        contents: &MapContents,
        node: &NodeConfig,
        info: ApplyInfo,
    ) -> Self {
        let mut services: Vec<ServiceRecord> = Vec::new();
        for port in &state.service_ports {
            let (namespace, name) = split_service(&port.service);
            let record = port_record(port, contents, &node.node_name);
            match services.last_mut() {
                Some(last) if last.namespace == namespace && last.name == name => {
                    last.ports.push(record);
                }
                _ => services.push(ServiceRecord {
                    namespace,
                    name,
                    ports: vec![record],
                }),
            }
        }
        // The state is sorted by `namespace/name`, which is the same order except where a
        // namespace is a prefix of another; sort so the record never depends on that.
        services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let mut interfaces = info.interfaces;
        interfaces.sort();
        AgentRecord {
            record_version: RECORD_VERSION,
            generation: info.generation,
            applied_at: format_rfc3339(info.applied_at),
            config_path: info.config_path,
            node_name: node.node_name.clone(),
            node_addresses: info.node_addresses,
            settings: SettingsRecord::from(node),
            interfaces,
            services,
        }
    }

    /// The stored form.
    #[must_use]
    pub fn to_json_bytes(&self) -> Vec<u8> {
        // Serializing plain structs of strings and numbers into memory cannot fail; the empty
        // fallback only exists so this function has no panic path.
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    pub fn from_json_bytes(bytes: &[u8]) -> Result<Self, RecordError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct VersionOnly {
            record_version: u32,
        }
        // The version first, so a newer record gets the version error rather than a
        // confusing "missing field".
        let version: VersionOnly = serde_json::from_slice(bytes).map_err(RecordError::Parse)?;
        if version.record_version > RECORD_VERSION {
            return Err(RecordError::Version {
                found: version.record_version,
            });
        }
        serde_json::from_slice(bytes).map_err(RecordError::Parse)
    }
}

fn port_record(port: &ServicePort, contents: &MapContents, node_name: &str) -> PortRecord {
    let service_id = contents.service_ids.get(&service_identity(port)).copied();
    let endpoints = port
        .endpoints
        .iter()
        .map(|e| EndpointRecord {
            addr: e.addr,
            port: e.port,
            pod: e.pod.clone(),
            node_name: e.node_name.clone(),
            state: e.state.into(),
            local: e.node_name.as_deref() == Some(node_name),
            backend_id: service_id
                .and_then(|id| contents.backend_ids.get(&(id, e.addr, e.port)).copied()),
        })
        .collect();
    PortRecord {
        name: port.port_name.clone(),
        protocol: port.protocol.into(),
        service_id,
        node_port: port.node_port,
        node_port_assigned: port.node_port_assigned,
        health_check_node_port: port.health_check_node_port,
        load_balancer_allocation: port
            .load_balancer_allocation
            .as_ref()
            .map(ToString::to_string),
        frontends: port
            .frontends
            .iter()
            .map(|f| FrontendRecord {
                kind: f.kind.into(),
                addr: f.addr,
                port: f.port,
            })
            .collect(),
        external_policy: port.external_policy.into(),
        internal_policy: port.internal_policy.into(),
        affinity_timeout_seconds: port.affinity_timeout_seconds,
        selection: port.selection.into(),
        source_ranges: port.source_ranges.iter().map(ToString::to_string).collect(),
        endpoints,
    }
}

impl ServiceRecord {
    /// Ready endpoints on this node, counted once per address and port across the Service's
    /// ports, as kube-proxy counts them for `healthCheckNodePort` answers.
    #[must_use]
    pub fn local_ready_endpoints(&self) -> usize {
        self.ports
            .iter()
            .flat_map(|p| &p.endpoints)
            .filter(|e| e.local && e.state == EndpointStateName::Ready)
            .map(|e| (e.addr, e.port))
            .collect::<BTreeSet<_>>()
            .len()
    }
}

/// `t` as RFC 3339 in UTC with milliseconds, e.g. `2026-11-03T07:05:09.042Z`. Times before
/// 1970 (a clock set far back) print as the epoch.
#[must_use]
pub fn format_rfc3339(t: SystemTime) -> String {
    let since_epoch = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = since_epoch.as_secs();
    let days = secs / 86_400;
    let of_day = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60,
        since_epoch.subsec_millis()
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01 (Howard Hinnant's `civil_from_days`,
/// for non-negative days): eras of 400 years are exactly 146 097 days, and counting years from
/// March puts the leap day last.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153; // 0 = March
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
pub(crate) mod tests;
