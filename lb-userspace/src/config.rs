//! The config: a file, or a directory of `*.yaml` / `*.yml` files read in name order, each a
//! multi-document YAML stream of Kubernetes objects, as users write them or as `kubectl get
//! svc,endpointslices -o yaml` prints them (a `v1` `List`), plus at most one agent settings
//! document.
//!
//! Read: `v1` `Service`, `discovery.k8s.io/v1` `EndpointSlice` (it belongs to the Service named by
//! its `kubernetes.io/service-name` label in the same namespace), `v1` `Endpoints` (named like its
//! Service; used only for a Service that has no `EndpointSlice`, as kube-proxy) and
//! `lb-agent/v1alpha1` `AgentSettings` ([`AgentSettings`]). Other kinds are skipped with a
//! warning. Every problem found is reported at once, each naming the file, the document, the
//! object and the field.
//!
//! The fields read, with the API server's defaults and rules (so a manifest it would refuse is
//! refused here too, and one it would accept means the same to the data path as to kube-proxy):
//!
//! - Service `metadata`: `name`, `namespace` (default `default`), the annotations
//!   `lb-agent/backend-selection` (`maglev`, the default, or `random`) and
//!   `service.beta.kubernetes.io/load-balancer-source-ranges` (comma-separated CIDRs, used only
//!   when `spec.loadBalancerSourceRanges` is empty).
//! - Service `spec`: `type`, `clusterIP`, `externalIPs`, `ports[]` (`name`, `protocol`, `port`,
//!   `targetPort`, `nodePort`), `allocateLoadBalancerNodePorts`, `externalTrafficPolicy`
//!   (`Cluster` or `Local`; only on a Service reachable from outside: `NodePort`, `LoadBalancer`
//!   or with `externalIPs`), `internalTrafficPolicy` (`Cluster` or `Local`), `healthCheckNodePort`
//!   (only on `LoadBalancer` with `externalTrafficPolicy: Local`), `sessionAffinity` (`None` or
//!   `ClientIP`), `sessionAffinityConfig.clientIP.timeoutSeconds` (1-86400, default 10800) and
//!   `loadBalancerSourceRanges` (type `LoadBalancer` only). All of these apply to every port of
//!   the Service.
//! - `nodePort` and `healthCheckNodePort`: inside `nodePortRange` of the settings, each (port,
//!   protocol) used once across all Services. When omitted (and the API server would assign
//!   one), one is assigned from the input alone, so every node and every restart gives the same
//!   port for the same files: see `Reader::node_ports`.
//! - `targetPort` (a number or a port name; default `port`): the endpoint port whose name is the
//!   Service port's name wins; else, for a named `targetPort`, the endpoint port of that name;
//!   an `EndpointSlice` or `Endpoints` subset that lists no ports serves a numeric `targetPort`.
//!   A named `targetPort` that nothing resolves leaves the port without endpoints (a warning).
//! - Service `status.loadBalancer.ingress[].ip`, and for `type: LoadBalancer` of lb-agent's class
//!   (`spec.loadBalancerClass` unset or `lb-agent.io/lb`) what it asks of the address pools:
//!   `spec.loadBalancerIP` and the annotations `lb-agent.io/load-balancer-ips` and
//!   `lb-agent.io/address-pool` ([`crate::ipam`]).
//! - Skipped as kube-proxy skips them: Services labelled `service.kubernetes.io/service-proxy-name`
//!   (another proxy's) and headless Services (`clusterIP: None`), with their endpoints.
//! - `EndpointSlice`: `metadata.labels[kubernetes.io/service-name]`, `addressType`, `ports[]`
//!   and `endpoints[]`: the first of `addresses`, `nodeName`, `targetRef.name` and `conditions`
//!   (`ready`, `serving`, `terminating`), read as kube-proxy reads them.
//! - `Endpoints`: `subsets[]`: `addresses[]` (ready) and `notReadyAddresses[]` (not used), each
//!   with `ip`, `nodeName` and `targetRef.name`, and `ports[]` (`name`, `port`, `protocol`).
//! - `AgentSettings`: every field optional, unknown fields are errors; see [`AgentSettings`].

use std::{
    collections::{BTreeMap, BTreeSet, btree_map::Entry},
    fmt::{self, Write as _},
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::{
    ipam,
    model::{
        AddressAllocation, DesiredState, Endpoint, EndpointState, Frontend, FrontendKind, Ipv4Cidr,
        Protocol, Selection, ServicePort, TrafficPolicy,
    },
};

/// The label that links an `EndpointSlice` to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The label that hands a Service to another proxy: kube-proxy, and lb-agent, leave it alone.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// The annotation that picks how a Service's new flows choose their backend.
pub const SELECTION_ANNOTATION: &str = "lb-agent/backend-selection";
/// The annotation that held `loadBalancerSourceRanges` before the field existed.
pub const SOURCE_RANGES_ANNOTATION: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";
/// The API server's default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_SECONDS: u32 = 10_800;
/// The `timeoutSeconds` the API server accepts: up to one day.
pub const AFFINITY_TIMEOUT_SECONDS: std::ops::RangeInclusive<u32> = 1..=86_400;

/// Where a problem is: the file, the document in it (from 1) and, inside a `List`, the item.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    pub document: usize,
    pub item: Option<usize>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}, document {}", self.file.display(), self.document)?;
        if let Some(item) = self.item {
            write!(f, ", items[{item}]")?;
        }
        Ok(())
    }
}

/// One thing wrong with the config, and what to do about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub location: Location,
    /// `Service default/web`, when the object is known.
    pub object: Option<String>,
    /// The field path, such as `spec.ports[0].nodePort`; empty for the whole document.
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.location)?;
        if let Some(object) = &self.object {
            write!(f, " ({object})")?;
        }
        if !self.field.is_empty() {
            write!(f, ", field {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {}: {source}", file.display())]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    /// `path` is what was given (a file or a directory); each problem names its own file.
    #[error("{}", render_problems(path, problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

fn render_problems(path: &Path, problems: &[Problem]) -> String {
    let mut out = format!(
        "config {} has {} problem{}:",
        path.display(),
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    for problem in problems {
        let _ = write!(out, "\n  - {problem}");
    }
    out
}

/// A config that was read: the state to serve, the agent's settings, and what was skipped and
/// why.
#[derive(Debug)]
pub struct Loaded {
    pub state: DesiredState,
    pub settings: AgentSettings,
    /// The addresses node ports are served on (see [`load`] for where they come from).
    pub node_ips: Vec<Ipv4Addr>,
    /// What each `type: LoadBalancer` Service of lb-agent's class asks for and holds, when
    /// `loadBalancerIPPools` are set: the Kubernetes source's allocator decides on these.
    pub address_claims: Vec<ipam::Claim>,
    pub warnings: Vec<String>,
}

/// The `apiVersion` and `kind` of the agent settings document.
pub const SETTINGS_API_VERSION: &str = "lb-agent/v1alpha1";
pub const SETTINGS_KIND: &str = "AgentSettings";
/// The default `nodePortRange`: the API server's default `--service-node-port-range`.
pub const DEFAULT_NODE_PORT_RANGE: PortRange = PortRange {
    first: 30_000,
    last: 32_767,
};
/// The default `snat.ports`: above Linux's default ephemeral range (32768-60999), so translated
/// flows never collide with the node's own connections.
pub const DEFAULT_SNAT_PORTS: PortRange = PortRange {
    first: 61_000,
    last: 65_535,
};
/// The smallest `connectionTableSize`: fewer flow entries than this would fill up in moments.
pub const MIN_CONNECTION_TABLE_SIZE: u32 = 1_024;
/// The largest `connectionTableSize` (16 Mi entries, about 1.5 GiB of kernel memory).
pub const MAX_CONNECTION_TABLE_SIZE: u32 = 16 * 1024 * 1024;
/// The largest `maxTables`; each table takes 4 x `maglev.tableSize` bytes.
pub const MAX_MAX_TABLES: u32 = 65_536;

/// An inclusive range of ports, written `FIRST-LAST` (`30000-32767`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    #[must_use]
    pub fn contains(self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }

    /// How many ports the range holds (at least 1).
    #[must_use]
    pub fn size(self) -> u32 {
        u32::from(self.last) - u32::from(self.first) + 1
    }

    #[must_use]
    pub fn overlaps(self, other: PortRange) -> bool {
        self.first <= other.last && other.first <= self.last
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl std::str::FromStr for PortRange {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        parse_port_range(text)
    }
}

impl TryFrom<String> for PortRange {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        parse_port_range(&text)
    }
}

impl From<PortRange> for String {
    fn from(range: PortRange) -> String {
        range.to_string()
    }
}

/// Parses `FIRST-LAST` (ports 1-65535, `FIRST` not above `LAST`).
pub fn parse_port_range(text: &str) -> Result<PortRange, String> {
    let (first, last) = text.split_once('-').ok_or_else(|| {
        format!("{text:?} is not FIRST-LAST, for example {DEFAULT_NODE_PORT_RANGE}")
    })?;
    let port = |p: &str| {
        let p = p.trim();
        // `u16::from_str` would also take a sign.
        p.bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| p.parse::<u16>().ok())
            .flatten()
            .filter(|&p| p > 0)
            .ok_or_else(|| format!("{p:?} in {text:?} is not a port (1-65535)"))
    };
    let (first, last) = (port(first)?, port(last)?);
    if first > last {
        return Err(format!(
            "{text:?}: {first} is above {last}; write FIRST-LAST"
        ));
    }
    Ok(PortRange { first, last })
}

/// The agent settings document (`apiVersion: lb-agent/v1alpha1`, `kind: AgentSettings`): how
/// this agent serves, as opposed to what it serves. At most one per config; every field is
/// optional, and an unknown field is an error so that a typo cannot silently do nothing.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct AgentSettings {
    /// The API server's `--service-node-port-range`: explicit nodePorts must be inside it, and
    /// omitted ones are assigned from it.
    pub node_port_range: PortRange,
    /// The addresses `NodePorts` are served on; empty: the caller decides (`--node-ip` wins
    /// over this, and `lb-agent run` falls back to the interfaces' addresses).
    pub node_addresses: Vec<Ipv4Addr>,
    /// Whether `loadBalancerSourceRanges` also guard the Service's nodePorts (kube-proxy: no;
    /// here yes by default, since a nodePort otherwise bypasses the ranges).
    pub source_ranges_on_node_ports: bool,
    pub maglev: MaglevSettings,
    /// Maglev tables the data path has room for (one per service port and traffic policy in
    /// use); each takes 4 x `maglev.tableSize` bytes of kernel memory. Read at start only.
    pub max_tables: u32,
    /// Entries of the flow table: two per connection (forward and reply), three with SNAT.
    /// Read at start only.
    pub connection_table_size: u32,
    pub snat: SnatSettings,
    /// Addresses for `type: LoadBalancer` Services (bare metal): see [`crate::ipam`].
    #[serde(rename = "loadBalancerIPPools")]
    pub load_balancer_ip_pools: Vec<ipam::PoolSettings>,
}

impl AgentSettings {
    /// The address pools, parsed (checked when the settings were read).
    #[must_use]
    pub fn pools(&self) -> Vec<ipam::Pool> {
        ipam::check_pools(&self.load_balancer_ip_pools).unwrap_or_default()
    }
}

impl Default for AgentSettings {
    fn default() -> Self {
        AgentSettings {
            node_port_range: DEFAULT_NODE_PORT_RANGE,
            node_addresses: Vec::new(),
            source_ranges_on_node_ports: true,
            maglev: MaglevSettings::default(),
            max_tables: lb_common::DEFAULT_MAX_TABLES,
            connection_table_size: lb_common::CONNTRACK_ENTRIES,
            snat: SnatSettings::default(),
            load_balancer_ip_pools: Vec::new(),
        }
    }
}

/// `maglev`: the same on every node, so every node picks the same backend for the same flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct MaglevSettings {
    /// M, the size of every Maglev table: a prime, at least 100x the largest endpoint count for
    /// an even spread. Read at start only.
    pub table_size: u32,
    /// Seed of the Maglev tables and the flow hash.
    pub seed: u32,
}

impl Default for MaglevSettings {
    fn default() -> Self {
        MaglevSettings {
            table_size: crate::maglev::DEFAULT_TABLE_SIZE,
            seed: 0,
        }
    }
}

/// `snat`: flows to endpoints on other nodes leave with the node's address and one of these
/// source ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct SnatSettings {
    /// Keep them out of the node's ephemeral range (`net.ipv4.ip_local_port_range`) and out of
    /// `nodePortRange`.
    pub ports: PortRange,
}

impl Default for SnatSettings {
    fn default() -> Self {
        SnatSettings {
            ports: DEFAULT_SNAT_PORTS,
        }
    }
}

/// Reads and validates the config at `path`: one file, or a directory whose `*.yaml` and `*.yml`
/// files are read in name order (not recursively; hidden entries such as a `ConfigMap` volume's
/// `..data` are skipped, symlinks are followed). `NodePorts` are served on the first of these
/// that is not empty: `node_ips` (given on the command line), the settings' `nodeAddresses`,
/// `discovered` (the interfaces' addresses); with none, node ports are checked and assigned but
/// served on no address.
pub fn load(
    path: &Path,
    node_ips: &[Ipv4Addr],
    discovered: &[Ipv4Addr],
) -> Result<Loaded, ConfigError> {
    let (sources, notes) = read_files(path)?;
    let mut loaded =
        read_sources(&sources, node_ips, discovered).map_err(|problems| ConfigError::Invalid {
            path: path.to_owned(),
            problems,
        })?;
    loaded.warnings.splice(0..0, notes);
    Ok(loaded)
}

/// The texts of the config at `path` (file name, text), and notes on what was not read: see
/// [`load`].
pub fn read_files(path: &Path) -> Result<(Sources, Vec<String>), ConfigError> {
    let read_error = |file: &Path| {
        let file = file.to_owned();
        move |source| ConfigError::Read { file, source }
    };
    let metadata = std::fs::metadata(path).map_err(read_error(path))?;
    let mut sources = Vec::new();
    let mut notes = Vec::new();
    if metadata.is_dir() {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(path).map_err(read_error(path))? {
            let entry = entry.map_err(read_error(path))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let is_yaml = name.ends_with(".yaml") || name.ends_with(".yml");
            if name.starts_with('.') || !is_yaml {
                continue;
            }
            let file = entry.path();
            // `metadata` follows symlinks: a ConfigMap volume's keys are links into `..data`.
            if std::fs::metadata(&file)
                .map_err(read_error(&file))?
                .is_file()
            {
                files.push(file);
            }
        }
        files.sort();
        if files.is_empty() {
            notes.push(format!(
                "{}: no *.yaml or *.yml files in this directory; nothing to serve",
                path.display()
            ));
        }
        for file in files {
            let text = std::fs::read_to_string(&file).map_err(read_error(&file))?;
            sources.push((file, text));
        }
    } else {
        let text = std::fs::read_to_string(path).map_err(read_error(path))?;
        sources.push((path.to_owned(), text));
    }
    Ok((sources, notes))
}

/// Config texts: (file name, text).
pub type Sources = Vec<(PathBuf, String)>;

/// The name [`parse`] gives its text in locations.
pub const INPUT_NAME: &str = "<input>";

/// Parses and validates one YAML stream (named [`INPUT_NAME`] in locations).
pub fn parse(text: &str, node_ips: &[Ipv4Addr]) -> Result<Loaded, Vec<Problem>> {
    read_sources(
        &[(PathBuf::from(INPUT_NAME), text.to_owned())],
        node_ips,
        &[],
    )
}

/// Parses and validates YAML streams (file name, text) as one config; node addresses as in
/// [`load`].
pub fn read_sources(
    sources: &[(PathBuf, String)],
    node_ips: &[Ipv4Addr],
    discovered: &[Ipv4Addr],
) -> Result<Loaded, Vec<Problem>> {
    read_objects(sources, Vec::new(), node_ips, discovered, Allocation::Here)
}

/// Who gives `type: LoadBalancer` Services their addresses from `loadBalancerIPPools`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Allocation {
    #[default]
    /// The reader, from the input alone (the files): the result is served and shown in
    /// `status`, the same on every node.
    Here,
    /// Someone who writes `status.loadBalancer.ingress` (the Kubernetes source's leader): only
    /// the addresses in the status are served.
    ByStatus,
}

/// Reads YAML streams (file name, text) and objects already parsed (each named by a path, such
/// as `api/Service/default/web`, that problems name as their file) as one config.
pub fn read_objects(
    sources: &[(PathBuf, String)],
    objects: Vec<(PathBuf, serde_yaml::Value)>,
    node_ips: &[Ipv4Addr],
    discovered: &[Ipv4Addr],
    allocation: Allocation,
) -> Result<Loaded, Vec<Problem>> {
    let mut reader = Reader {
        allocation,
        ..Reader::default()
    };
    for (file, value) in objects {
        let location = Location {
            file,
            document: 1,
            item: None,
        };
        reader.object(value, location);
    }
    for (file, text) in sources {
        for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let location = Location {
                file: file.clone(),
                document: index + 1,
                item: None,
            };
            match serde_yaml::Value::deserialize(document) {
                Ok(serde_yaml::Value::Null) => {}
                Ok(value) => reader.object(value, location),
                Err(error) => {
                    reader.problem(&location, None, "", format!("not valid YAML: {error}"));
                    // The YAML parser cannot resynchronise after a syntax error.
                    break;
                }
            }
        }
    }
    reader.finish(node_ips, discovered)
}

// The subset of the Kubernetes objects the data path needs. Unknown fields are ignored, as the
// API server's own clients do.

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ObjectMeta {
    name: Option<String>,
    namespace: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ServiceObject {
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: ServiceSpec,
    #[serde(default)]
    status: ServiceStatus,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ServiceSpec {
    #[serde(rename = "type")]
    service_type: Option<String>,
    #[serde(rename = "clusterIP")]
    cluster_ip: Option<String>,
    #[serde(default, rename = "externalIPs")]
    external_ips: Vec<String>,
    #[serde(default)]
    ports: Vec<ServicePortSpec>,
    /// `false` on a `LoadBalancer`: the API server assigns no node ports.
    allocate_load_balancer_node_ports: Option<bool>,
    external_traffic_policy: Option<String>,
    internal_traffic_policy: Option<String>,
    session_affinity: Option<String>,
    session_affinity_config: Option<SessionAffinityConfig>,
    #[serde(default)]
    load_balancer_source_ranges: Vec<String>,
    health_check_node_port: Option<i64>,
    /// Deprecated by Kubernetes but what most bare-metal users write to ask for an address.
    #[serde(rename = "loadBalancerIP")]
    load_balancer_ip: Option<String>,
    load_balancer_class: Option<String>,
}

#[derive(Deserialize)]
struct SessionAffinityConfig {
    #[serde(rename = "clientIP")]
    client_ip: Option<ClientIpConfig>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ClientIpConfig {
    timeout_seconds: Option<i64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ServicePortSpec {
    name: Option<String>,
    protocol: Option<String>,
    port: i64,
    node_port: Option<i64>,
    /// A number or a port name (Kubernetes' `IntOrString`).
    target_port: Option<serde_yaml::Value>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ServiceStatus {
    #[serde(default)]
    load_balancer: LoadBalancerStatus,
}

#[derive(Deserialize, Default)]
struct LoadBalancerStatus {
    #[serde(default)]
    ingress: Vec<LoadBalancerIngress>,
}

#[derive(Deserialize)]
struct LoadBalancerIngress {
    ip: Option<String>,
    hostname: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EndpointSliceObject {
    #[serde(default)]
    metadata: ObjectMeta,
    address_type: String,
    #[serde(default)]
    endpoints: Vec<EndpointSpec>,
    #[serde(default)]
    ports: Vec<EndpointPortSpec>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EndpointSpec {
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    conditions: EndpointConditions,
    node_name: Option<String>,
    target_ref: Option<ObjectReference>,
}

#[derive(Deserialize, Default)]
struct EndpointConditions {
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
}

#[derive(Deserialize)]
struct ObjectReference {
    name: Option<String>,
}

#[derive(Deserialize)]
struct EndpointPortSpec {
    name: Option<String>,
    protocol: Option<String>,
    port: Option<i64>,
}

/// The `v1` `Endpoints` of older manifests: named like its Service, one subset per set of
/// ports.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EndpointsObject {
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default)]
    subsets: Vec<EndpointSubset>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EndpointSubset {
    #[serde(default)]
    addresses: Vec<EndpointAddress>,
    #[serde(default)]
    not_ready_addresses: Vec<EndpointAddress>,
    #[serde(default)]
    ports: Vec<EndpointPortSpec>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EndpointAddress {
    ip: String,
    node_name: Option<String>,
    target_ref: Option<ObjectReference>,
}

/// A Service as read, before its endpoints are joined to it.
struct ServiceEntry {
    location: Location,
    object: String,
    namespace: String,
    name: String,
    ports: Vec<PortEntry>,
    settings: ServiceSettings,
    /// `spec.healthCheckNodePort` as written.
    health_check_node_port: Option<i64>,
    /// `type: LoadBalancer` with `externalTrafficPolicy: Local`: the API server gives these a
    /// health check node port, and allows one on no other Service.
    wants_health_check: bool,
    /// `type: LoadBalancer` of lb-agent's class: what it asks for and its status addresses.
    address_request: Option<AddressRequest>,
}

struct AddressRequest {
    requested: Vec<Ipv4Addr>,
    pool: Option<String>,
    current: Vec<Ipv4Addr>,
}

/// The Service-wide settings that every one of its ports carries.
struct ServiceSettings {
    external_policy: TrafficPolicy,
    internal_policy: TrafficPolicy,
    affinity_timeout_seconds: Option<u32>,
    source_ranges: Vec<Ipv4Cidr>,
    selection: Selection,
}

struct PortEntry {
    field: String,
    name: String,
    protocol: Protocol,
    port: u16,
    frontends_on_service_ips: Vec<Frontend>,
    node_port: NodePortWanted,
    target_port: TargetPort,
}

/// What a service port asks for as its node port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NodePortWanted {
    /// `ClusterIP`, or `allocateLoadBalancerNodePorts: false` without a nodePort.
    No,
    /// Written in `spec.ports[].nodePort`; range checked at the end, since the settings
    /// document may come after the Service.
    Given(i64),
    /// Omitted where the API server would assign one.
    Assign,
}

/// `spec.ports[].targetPort`: where the endpoints listen.
#[derive(Clone, Debug, PartialEq, Eq)]
enum TargetPort {
    Number(u16),
    /// A container port name, resolved through the endpoint ports of the same name.
    Name(String),
}

/// How a Service's type decides its node ports.
struct NodePortRules {
    has_node_ports: bool,
    /// False when `allocateLoadBalancerNodePorts: false` lets a port go without one.
    required: bool,
}

/// The endpoints of one `EndpointSlice` or one `Endpoints` subset, with its ports.
struct EndpointGroup {
    /// (port name, protocol, number).
    ports: Vec<(String, Protocol, u16)>,
    endpoints: Vec<(Ipv4Addr, Listed)>,
}

/// Where a Service's endpoints came from, for the messages.
struct EndpointSource {
    /// `document 2 (EndpointSlice default/web-abc)`, the first one seen.
    origin: String,
    groups: Vec<EndpointGroup>,
}

/// What an endpoint's conditions let it take, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Serves {
    Ready,
    Terminating,
    /// Not serving: never used, but it still claims its address (see `Listed`).
    Nothing,
}

impl Serves {
    /// The conditions as kube-proxy reads them: unset `ready` and `serving` are true, unset
    /// `terminating` is false (the API's documented meaning of nil). A ready endpoint takes new
    /// flows; one that is serving while terminating only stands in when nothing is ready.
    fn of(conditions: &EndpointConditions) -> Self {
        let ready = conditions.ready.unwrap_or(true);
        let serving = conditions.serving.unwrap_or(true);
        let terminating = conditions.terminating.unwrap_or(false);
        if ready {
            Serves::Ready
        } else if serving && terminating {
            Serves::Terminating
        } else {
            Serves::Nothing
        }
    }

    fn state(self) -> Option<EndpointState> {
        match self {
            Serves::Ready => Some(EndpointState::Ready),
            Serves::Terminating => Some(EndpointState::Terminating),
            Serves::Nothing => None,
        }
    }
}

/// One endpoint as a slice lists it. The same address and port can be listed more than once:
/// an endpoint moving between slices shows up in both for a while, and a pod network may give a
/// terminating pod's address to a new pod before the old one is gone. Of those, the smallest
/// `Listed` is kept, whatever the document order, so the same files always give the same state.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Listed {
    /// First, so that a non-terminating listing wins even if it is not ready yet: the address
    /// then belongs to a new pod, and the old pod's terminating listing must not draw its
    /// traffic (kube-proxy prefers the non-terminating endpoint the same way).
    terminating: bool,
    /// Then the best state: ready wins over terminating.
    serves: Serves,
    pod: Option<String>,
    node_name: Option<String>,
}

/// Endpoint groups per (namespace, service name).
type EndpointIndex = BTreeMap<(String, String), EndpointSource>;

/// Which service port (service and port index, and its name) serves an address, port and
/// protocol, and as which kind of frontend.
type Claims = BTreeMap<(Ipv4Addr, u16, Protocol), ((usize, usize), String, FrontendKind)>;

#[derive(Default)]
struct Reader {
    problems: Vec<Problem>,
    warnings: Vec<String>,
    services: Vec<ServiceEntry>,
    /// From `EndpointSlices`.
    slices: EndpointIndex,
    /// From `v1` `Endpoints`; used only for Services that have no slices, as kube-proxy.
    legacy_endpoints: EndpointIndex,
    /// The settings document and where it is.
    settings: Option<(Location, AgentSettings)>,
    allocation: Allocation,
    /// Services skipped on purpose (another proxy's, headless): their endpoints go unused
    /// without a warning of their own.
    skipped: BTreeSet<(String, String)>,
}

impl Reader {
    fn problem(&mut self, location: &Location, object: Option<&str>, field: &str, message: String) {
        self.problems.push(Problem {
            location: location.clone(),
            object: object.map(str::to_owned),
            field: field.to_owned(),
            message,
        });
    }

    fn object(&mut self, value: serde_yaml::Value, location: Location) {
        let api_version = value
            .get("apiVersion")
            .and_then(serde_yaml::Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let kind = value
            .get("kind")
            .and_then(serde_yaml::Value::as_str)
            .unwrap_or_default()
            .to_owned();
        match (api_version.as_str(), kind.as_str()) {
            ("v1", "List") => self.list(&value, &location),
            ("v1", "Service") => self.service(value, location),
            ("discovery.k8s.io/v1", "EndpointSlice") => self.endpoint_slice(value, &location),
            ("v1", "Endpoints") => self.endpoints(value, &location),
            (SETTINGS_API_VERSION, SETTINGS_KIND) => self.agent_settings(value, location),
            (_, SETTINGS_KIND) => self.problem(
                &location,
                Some(SETTINGS_KIND),
                "apiVersion",
                format!("{api_version:?} is not known; use {SETTINGS_API_VERSION}"),
            ),
            ("", _) | (_, "") => self.problem(
                &location,
                None,
                if api_version.is_empty() {
                    "apiVersion"
                } else {
                    "kind"
                },
                "missing; every document must be a Kubernetes object with apiVersion and kind \
                 (v1 Service, discovery.k8s.io/v1 EndpointSlice, v1 Endpoints or \
                 lb-agent/v1alpha1 AgentSettings)"
                    .to_owned(),
            ),
            _ => self.warnings.push(format!(
                "{location}: {api_version} {kind} is not used by lb-agent; skipped"
            )),
        }
    }

    fn list(&mut self, value: &serde_yaml::Value, location: &Location) {
        let Some(items) = value.get("items").and_then(serde_yaml::Value::as_sequence) else {
            self.problem(
                location,
                Some("List"),
                "items",
                "missing or not a list".to_owned(),
            );
            return;
        };
        for (item, value) in items.iter().enumerate() {
            let item_location = Location {
                file: location.file.clone(),
                document: location.document,
                item: Some(item),
            };
            if value.get("kind").and_then(serde_yaml::Value::as_str) == Some("List") {
                self.problem(
                    &item_location,
                    None,
                    "kind",
                    "a List inside a List is not supported".to_owned(),
                );
                continue;
            }
            self.object(value.clone(), item_location);
        }
    }

    /// Deserializes `value`, reporting a type error with the path of the field that caused it.
    fn typed<T: for<'de> Deserialize<'de>>(
        &mut self,
        value: serde_yaml::Value,
        location: &Location,
        object: &str,
    ) -> Option<T> {
        match serde_path_to_error::deserialize::<_, T>(value) {
            Ok(typed) => Some(typed),
            Err(error) => {
                let field = match error.path().to_string() {
                    root if root == "." => String::new(),
                    path => path,
                };
                let message = error.into_inner().to_string();
                self.problem(location, Some(object), &field, message);
                None
            }
        }
    }

    fn service(&mut self, value: serde_yaml::Value, location: Location) {
        let object = describe("Service", &value);
        let Some(service) = self.typed::<ServiceObject>(value, &location, &object) else {
            return;
        };
        let Some((namespace, name)) = self.identity(&service.metadata, &location, &object) else {
            return;
        };
        let at = |s: &mut Self, field: &str, message: String| {
            s.problem(&location, Some(&object), field, message);
        };
        if let Some(reason) = not_proxied(&service) {
            self.warnings
                .push(format!("{location} ({object}): {reason}; skipped"));
            self.skipped.insert((namespace, name));
            return;
        }

        let service_type = service.spec.service_type.as_deref().unwrap_or("ClusterIP");
        // Whether every port needs a node port; one that has it is served on it either way.
        let node_ports_required = service.spec.allocate_load_balancer_node_ports != Some(false);
        let (has_node_ports, has_load_balancer) = match service_type {
            "ClusterIP" => (false, false),
            "NodePort" => (true, false),
            "LoadBalancer" => (true, true),
            "ExternalName" => {
                self.warnings.push(format!(
                    "{location} ({object}): type ExternalName is resolved by DNS, not by a \
                     load balancer; skipped"
                ));
                return;
            }
            other => {
                at(
                    self,
                    "spec.type",
                    format!(
                        "unknown Service type {other:?}; use ClusterIP, NodePort, LoadBalancer \
                         or ExternalName"
                    ),
                );
                return;
            }
        };

        let service_ips = self.service_ips(&service, has_load_balancer, &location, &object);
        let address_request = if has_load_balancer {
            self.address_request(&service, &service_ips, &location, &object)
        } else {
            None
        };
        let settings = self.service_settings(&service, service_type, &location, &object);
        let rules = NodePortRules {
            has_node_ports,
            required: node_ports_required,
        };
        let wants_health_check =
            has_load_balancer && settings.external_policy == TrafficPolicy::Local;
        let mut ports = Vec::new();
        let mut seen_names = BTreeSet::new();
        for (i, port) in service.spec.ports.iter().enumerate() {
            let field = format!("spec.ports[{i}]");
            let name = port.name.clone().unwrap_or_default();
            if !seen_names.insert(name.clone()) {
                at(
                    self,
                    &format!("{field}.name"),
                    format!("port name {name:?} is used twice; every port needs its own name"),
                );
            }
            if let Some(entry) =
                self.service_port(port, field, name, &service_ips, &rules, &location, &object)
            {
                ports.push(entry);
            }
        }

        if let Some(first) = self
            .services
            .iter()
            .find(|s| s.namespace == namespace && s.name == name)
        {
            let message = format!(
                "defined twice; the first definition is in {}. Keep one",
                first.location
            );
            self.problem(&location, Some(&object), "metadata.name", message);
            return;
        }
        self.services.push(ServiceEntry {
            location,
            object,
            namespace,
            name,
            ports,
            settings,
            health_check_node_port: service.spec.health_check_node_port,
            wants_health_check,
            address_request,
        });
    }

    /// What a `type: LoadBalancer` Service asks for from the address pools; `None` when it
    /// belongs to another `loadBalancerClass`.
    fn address_request(
        &mut self,
        service: &ServiceObject,
        service_ips: &[(FrontendKind, Ipv4Addr)],
        location: &Location,
        object: &str,
    ) -> Option<AddressRequest> {
        let class = service.spec.load_balancer_class.as_deref();
        if class.is_some_and(|c| c != ipam::LOAD_BALANCER_CLASS) {
            return None;
        }
        let annotations = &service.metadata.annotations;
        let requested = match ipam::requested_addresses(
            annotations
                .get(ipam::REQUESTED_IPS_ANNOTATION)
                .map(String::as_str),
            service
                .spec
                .load_balancer_ip
                .as_deref()
                .filter(|ip| !ip.is_empty()),
        ) {
            Ok(requested) => requested,
            Err(message) => {
                let field = if annotations.contains_key(ipam::REQUESTED_IPS_ANNOTATION) {
                    format!("metadata.annotations[{}]", ipam::REQUESTED_IPS_ANNOTATION)
                } else {
                    "spec.loadBalancerIP".to_owned()
                };
                self.problem(location, Some(object), &field, message);
                return None;
            }
        };
        Some(AddressRequest {
            requested,
            pool: annotations.get(ipam::POOL_ANNOTATION).cloned(),
            current: service_ips
                .iter()
                .filter(|(kind, _)| *kind == FrontendKind::LoadBalancer)
                .map(|&(_, addr)| addr)
                .collect(),
        })
    }

    /// The settings that apply to every port of the Service.
    fn service_settings(
        &mut self,
        service: &ServiceObject,
        service_type: &str,
        location: &Location,
        object: &str,
    ) -> ServiceSettings {
        ServiceSettings {
            external_policy: self.external_policy(&service.spec, service_type, location, object),
            internal_policy: self.internal_policy(&service.spec, location, object),
            affinity_timeout_seconds: self.affinity(&service.spec, location, object),
            source_ranges: self.source_ranges(service, service_type, location, object),
            selection: self.selection(&service.metadata, location, object),
        }
    }

    /// `spec.externalTrafficPolicy`. The API server defaults it to `Cluster` on a Service that
    /// is reachable from outside the cluster, and refuses it on any other: there it would
    /// silently mean nothing.
    fn external_policy(
        &mut self,
        spec: &ServiceSpec,
        service_type: &str,
        location: &Location,
        object: &str,
    ) -> TrafficPolicy {
        let field = "spec.externalTrafficPolicy";
        // An empty string is Go's unset: the API server cannot tell the two apart.
        let Some(value) = spec
            .external_traffic_policy
            .as_deref()
            .filter(|v| !v.is_empty())
        else {
            return TrafficPolicy::Cluster;
        };
        let externally_accessible =
            matches!(service_type, "NodePort" | "LoadBalancer") || !spec.external_ips.is_empty();
        if !externally_accessible {
            self.problem(
                location,
                Some(object),
                field,
                format!(
                    "{value:?} may only be set when `type` is 'NodePort' or 'LoadBalancer', or \
                     when the Service has externalIPs; remove it"
                ),
            );
            return TrafficPolicy::Cluster;
        }
        self.traffic_policy(value, field, "external", location, object)
    }

    /// `spec.internalTrafficPolicy`, `Cluster` when unset. Unlike `externalTrafficPolicy` it is
    /// a pointer in the API, so an empty string is a value, and the API server refuses it.
    fn internal_policy(
        &mut self,
        spec: &ServiceSpec,
        location: &Location,
        object: &str,
    ) -> TrafficPolicy {
        match spec.internal_traffic_policy.as_deref() {
            None => TrafficPolicy::Cluster,
            Some(value) => self.traffic_policy(
                value,
                "spec.internalTrafficPolicy",
                "internal",
                location,
                object,
            ),
        }
    }

    fn traffic_policy(
        &mut self,
        value: &str,
        field: &str,
        which: &str,
        location: &Location,
        object: &str,
    ) -> TrafficPolicy {
        match value {
            "Cluster" => TrafficPolicy::Cluster,
            "Local" => TrafficPolicy::Local,
            other => {
                self.problem(
                    location,
                    Some(object),
                    field,
                    format!("unknown {which} traffic policy {other:?}; use Cluster or Local"),
                );
                TrafficPolicy::Cluster
            }
        }
    }

    /// `spec.sessionAffinity` and its timeout: `Some(seconds)` for `ClientIP`.
    fn affinity(&mut self, spec: &ServiceSpec, location: &Location, object: &str) -> Option<u32> {
        match spec.session_affinity.as_deref() {
            // An empty string is Go's unset, which the API server defaults to `None`.
            None | Some("" | "None") => {
                // `null` is unset too; `{}` is not, and the API server refuses it.
                if spec.session_affinity_config.is_some() {
                    self.problem(
                        location,
                        Some(object),
                        "spec.sessionAffinityConfig",
                        "must not be set when sessionAffinity is None; set sessionAffinity: \
                         ClientIP or remove it"
                            .to_owned(),
                    );
                }
                None
            }
            Some("ClientIP") => {
                let timeout = spec
                    .session_affinity_config
                    .as_ref()
                    .and_then(|config| config.client_ip.as_ref())
                    .and_then(|client_ip| client_ip.timeout_seconds);
                // Whatever is missing on the way to the timeout, the API server defaults it.
                let Some(timeout) = timeout else {
                    return Some(DEFAULT_AFFINITY_TIMEOUT_SECONDS);
                };
                match u32::try_from(timeout) {
                    Ok(seconds) if AFFINITY_TIMEOUT_SECONDS.contains(&seconds) => Some(seconds),
                    _ => {
                        self.problem(
                            location,
                            Some(object),
                            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                            format!(
                                "{timeout} is out of range; use {}-{} seconds (at most one day)",
                                AFFINITY_TIMEOUT_SECONDS.start(),
                                AFFINITY_TIMEOUT_SECONDS.end()
                            ),
                        );
                        None
                    }
                }
            }
            Some(other) => {
                self.problem(
                    location,
                    Some(object),
                    "spec.sessionAffinity",
                    format!("unknown session affinity {other:?}; use None or ClientIP"),
                );
                None
            }
        }
    }

    /// `spec.loadBalancerSourceRanges`, or when that is empty the older annotation, as cloud
    /// load balancers read them. The API server allows either on type `LoadBalancer` only.
    fn source_ranges(
        &mut self,
        service: &ServiceObject,
        service_type: &str,
        location: &Location,
        object: &str,
    ) -> Vec<Ipv4Cidr> {
        // (field path, entry) pairs; the API server trims padding from both forms.
        let mut entries: Vec<(String, &str)> = Vec::new();
        let annotation_field = format!("metadata.annotations[{SOURCE_RANGES_ANNOTATION}]");
        let from_annotation = if !service.spec.load_balancer_source_ranges.is_empty() {
            for (i, range) in service.spec.load_balancer_source_ranges.iter().enumerate() {
                entries.push((format!("spec.loadBalancerSourceRanges[{i}]"), range.trim()));
            }
            false
        } else if let Some(value) = service.metadata.annotations.get(SOURCE_RANGES_ANNOTATION) {
            let value = value.trim();
            if !value.is_empty() {
                for range in value.split(',') {
                    entries.push((annotation_field.clone(), range.trim()));
                }
            }
            true
        } else {
            return Vec::new();
        };

        if service_type != "LoadBalancer" {
            let field = if from_annotation {
                annotation_field.as_str()
            } else {
                "spec.loadBalancerSourceRanges"
            };
            self.problem(
                location,
                Some(object),
                field,
                "may only be used when `type` is 'LoadBalancer'; remove it".to_owned(),
            );
        }

        let mut ranges = Vec::new();
        let mut skipped_ipv6 = false;
        for (field, entry) in entries {
            match parse_cidr(entry) {
                Some(Cidr::V4 { cidr, host_bits }) => {
                    if host_bits {
                        self.warnings.push(format!(
                            "{location} ({object}): {field} {entry:?} has host bits set; read as \
                             {cidr}, as kube-proxy does"
                        ));
                    }
                    ranges.push(cidr);
                }
                Some(Cidr::V6) => {
                    skipped_ipv6 = true;
                    self.warnings.push(format!(
                        "{location} ({object}): {field} {entry:?} is IPv6, which lb-agent does \
                         not serve yet; skipped"
                    ));
                }
                None => self.problem(
                    location,
                    Some(object),
                    &field,
                    format!("{entry:?} is not a CIDR; use an IPv4 network such as 203.0.113.0/24"),
                ),
            }
        }
        if skipped_ipv6 && ranges.is_empty() {
            // kube-proxy does the same per address family, but it is easy to miss.
            self.warnings.push(format!(
                "{location} ({object}): no IPv4 source range is left, so IPv4 clients are not \
                 restricted"
            ));
        }
        ranges.sort();
        ranges.dedup();
        ranges
    }

    /// The `lb-agent/backend-selection` annotation.
    fn selection(&mut self, metadata: &ObjectMeta, location: &Location, object: &str) -> Selection {
        match metadata
            .annotations
            .get(SELECTION_ANNOTATION)
            .map(String::as_str)
        {
            None | Some("maglev") => Selection::Maglev,
            Some("random") => Selection::Random,
            Some(other) => {
                self.problem(
                    location,
                    Some(object),
                    &format!("metadata.annotations[{SELECTION_ANNOTATION}]"),
                    format!("unknown backend selection {other:?}; use maglev or random"),
                );
                Selection::Maglev
            }
        }
    }

    /// The addresses a Service answers on with its own port number: `clusterIP`, `externalIPs`,
    /// and (for type `LoadBalancer`) its load balancer ingress IPs.
    fn service_ips(
        &mut self,
        service: &ServiceObject,
        has_load_balancer: bool,
        location: &Location,
        object: &str,
    ) -> Vec<(FrontendKind, Ipv4Addr)> {
        let mut service_ips = Vec::new();
        match service.spec.cluster_ip.as_deref() {
            None | Some("" | "None") => {}
            Some(ip) => match ip.parse::<Ipv4Addr>() {
                Ok(addr) => service_ips.push((FrontendKind::ClusterIp, addr)),
                Err(_) if ip.parse::<std::net::Ipv6Addr>().is_ok() => {
                    self.warnings.push(format!(
                        "{location} ({object}): clusterIP {ip} is IPv6, which lb-agent does not \
                         serve yet; skipped"
                    ));
                }
                Err(_) => self.problem(
                    location,
                    Some(object),
                    "spec.clusterIP",
                    format!("{ip:?} is not an IPv4 address, \"None\" or empty"),
                ),
            },
        }
        for (i, ip) in service.spec.external_ips.iter().enumerate() {
            match ip.parse::<Ipv4Addr>() {
                Ok(addr) => service_ips.push((FrontendKind::ExternalIp, addr)),
                Err(_) => self.problem(
                    location,
                    Some(object),
                    &format!("spec.externalIPs[{i}]"),
                    format!("{ip:?} is not an IPv4 address"),
                ),
            }
        }
        if has_load_balancer {
            for (i, ingress) in service.status.load_balancer.ingress.iter().enumerate() {
                match (&ingress.ip, &ingress.hostname) {
                    (Some(ip), _) => match ip.parse::<Ipv4Addr>() {
                        Ok(addr) => service_ips.push((FrontendKind::LoadBalancer, addr)),
                        Err(_) => self.problem(
                            location,
                            Some(object),
                            &format!("status.loadBalancer.ingress[{i}].ip"),
                            format!("{ip:?} is not an IPv4 address"),
                        ),
                    },
                    (None, Some(hostname)) => self.warnings.push(format!(
                        "{location} ({object}): load balancer ingress {hostname} has no ip; \
                         only addresses are served"
                    )),
                    (None, None) => {}
                }
            }
        }

        service_ips
    }

    /// One `spec.ports[]` entry, or `None` (with a problem or warning recorded) if it cannot be
    /// served.
    #[expect(
        clippy::too_many_arguments,
        reason = "the port plus the Service context it needs"
    )]
    fn service_port(
        &mut self,
        port: &ServicePortSpec,
        field: String,
        name: String,
        service_ips: &[(FrontendKind, Ipv4Addr)],
        rules: &NodePortRules,
        location: &Location,
        object: &str,
    ) -> Option<PortEntry> {
        let protocol = match parse_protocol(port.protocol.as_deref()) {
            Ok(Some(protocol)) => protocol,
            Ok(None) => {
                self.warnings.push(format!(
                    "{location} ({object}): {field} is SCTP, which lb-agent does not serve; \
                     skipped"
                ));
                return None;
            }
            Err(message) => {
                self.problem(
                    location,
                    Some(object),
                    &format!("{field}.protocol"),
                    message,
                );
                return None;
            }
        };
        let Some(service_port) = port_number(port.port) else {
            self.problem(
                location,
                Some(object),
                &format!("{field}.port"),
                format!("{} is not a port; use 1-65535", port.port),
            );
            return None;
        };
        let node_port = match port.node_port {
            // A ClusterIP Service has no node ports; the API server clears one left over from
            // an earlier type.
            _ if !rules.has_node_ports => NodePortWanted::No,
            Some(n) => NodePortWanted::Given(n),
            None if rules.required => NodePortWanted::Assign,
            None => NodePortWanted::No,
        };
        let target_port = match &port.target_port {
            None | Some(serde_yaml::Value::Null) => TargetPort::Number(service_port),
            Some(value) => match target_port(value) {
                Ok(target) => target,
                Err(message) => {
                    self.problem(
                        location,
                        Some(object),
                        &format!("{field}.targetPort"),
                        message,
                    );
                    return None;
                }
            },
        };
        Some(PortEntry {
            field,
            name,
            protocol,
            port: service_port,
            frontends_on_service_ips: service_ips
                .iter()
                .map(|&(kind, addr)| Frontend {
                    kind,
                    addr,
                    port: service_port,
                })
                .collect(),
            node_port,
            target_port,
        })
    }

    fn endpoint_slice(&mut self, value: serde_yaml::Value, location: &Location) {
        let object = describe("EndpointSlice", &value);
        let Some(slice) = self.typed::<EndpointSliceObject>(value, location, &object) else {
            return;
        };
        let Some((namespace, _)) = self.identity(&slice.metadata, location, &object) else {
            return;
        };
        let Some(service) = slice.metadata.labels.get(SERVICE_NAME_LABEL).cloned() else {
            self.problem(
                location,
                Some(&object),
                &format!("metadata.labels[{SERVICE_NAME_LABEL}]"),
                "missing; it names the Service this slice belongs to".to_owned(),
            );
            return;
        };
        match slice.address_type.as_str() {
            "IPv4" => {}
            "IPv6" | "FQDN" => {
                self.warnings.push(format!(
                    "{location} ({object}): addressType {} is not served yet; skipped",
                    slice.address_type
                ));
                return;
            }
            other => {
                self.problem(
                    location,
                    Some(&object),
                    "addressType",
                    format!("unknown address type {other:?}; use IPv4, IPv6 or FQDN"),
                );
                return;
            }
        }
        let ports = self.slice_ports(&slice.ports, "ports", location, &object);
        let mut endpoints = Vec::new();
        for (i, endpoint) in slice.endpoints.iter().enumerate() {
            let mut addrs = Vec::new();
            for (j, address) in endpoint.addresses.iter().enumerate() {
                match address.parse::<Ipv4Addr>() {
                    Ok(addr) => addrs.push(addr),
                    Err(_) => self.problem(
                        location,
                        Some(&object),
                        &format!("endpoints[{i}].addresses[{j}]"),
                        format!("{address:?} is not an IPv4 address"),
                    ),
                }
            }
            self.check_node_name(
                endpoint.node_name.as_deref(),
                &format!("endpoints[{i}].nodeName"),
                location,
                &object,
            );
            // Kubernetes lists all addresses of one endpoint, but they are the same pod: use the
            // first, as kube-proxy does.
            let Some(&addr) = addrs.first() else { continue };
            // Endpoints that serve nothing are kept until the merge: they still claim their
            // address (see `Listed`).
            endpoints.push((
                addr,
                Listed {
                    terminating: endpoint.conditions.terminating.unwrap_or(false),
                    serves: Serves::of(&endpoint.conditions),
                    pod: endpoint.target_ref.as_ref().and_then(|r| r.name.clone()),
                    node_name: endpoint.node_name.clone(),
                },
            ));
        }
        self.slices
            .entry((namespace, service))
            .or_insert_with(|| EndpointSource {
                origin: format!("{location} ({object})"),
                groups: Vec::new(),
            })
            .groups
            .push(EndpointGroup { ports, endpoints });
    }

    /// A `v1` `Endpoints`: each subset becomes a group of endpoints; `addresses` are ready,
    /// `notReadyAddresses` are not (kube-proxy does not use them).
    fn endpoints(&mut self, value: serde_yaml::Value, location: &Location) {
        let object = describe("Endpoints", &value);
        let Some(endpoints) = self.typed::<EndpointsObject>(value, location, &object) else {
            return;
        };
        let Some((namespace, name)) = self.identity(&endpoints.metadata, location, &object) else {
            return;
        };
        let mut groups = Vec::new();
        for (i, subset) in endpoints.subsets.iter().enumerate() {
            let ports = self.slice_ports(
                &subset.ports,
                &format!("subsets[{i}].ports"),
                location,
                &object,
            );
            let mut listed = Vec::new();
            let lists = [
                ("addresses", &subset.addresses, Serves::Ready),
                (
                    "notReadyAddresses",
                    &subset.not_ready_addresses,
                    Serves::Nothing,
                ),
            ];
            for (list, addresses, serves) in lists {
                for (j, address) in addresses.iter().enumerate() {
                    let field = format!("subsets[{i}].{list}[{j}]");
                    self.check_node_name(
                        address.node_name.as_deref(),
                        &format!("{field}.nodeName"),
                        location,
                        &object,
                    );
                    let Ok(addr) = address.ip.parse::<Ipv4Addr>() else {
                        self.problem(
                            location,
                            Some(&object),
                            &format!("{field}.ip"),
                            format!("{:?} is not an IPv4 address", address.ip),
                        );
                        continue;
                    };
                    listed.push((
                        addr,
                        Listed {
                            terminating: false,
                            serves,
                            pod: address.target_ref.as_ref().and_then(|r| r.name.clone()),
                            node_name: address.node_name.clone(),
                        },
                    ));
                }
            }
            groups.push(EndpointGroup {
                ports,
                endpoints: listed,
            });
        }
        match self.legacy_endpoints.entry((namespace, name)) {
            Entry::Vacant(vacant) => {
                vacant.insert(EndpointSource {
                    origin: format!("{location} ({object})"),
                    groups,
                });
            }
            Entry::Occupied(occupied) => {
                let message = format!(
                    "defined twice; the first definition is {}. Keep one",
                    occupied.get().origin
                );
                self.problem(location, Some(&object), "metadata.name", message);
            }
        }
    }

    /// The settings document; a second one is a problem.
    fn agent_settings(&mut self, value: serde_yaml::Value, location: Location) {
        let object = match value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(serde_yaml::Value::as_str)
        {
            Some(name) => format!("{SETTINGS_KIND} {name}"),
            None => SETTINGS_KIND.to_owned(),
        };
        if let Some((first, _)) = &self.settings {
            let message = format!(
                "a second {SETTINGS_KIND} document; the first is {first}. A config has at most \
                 one: merge them"
            );
            self.problem(&location, Some(&object), "", message);
            return;
        }
        let serde_yaml::Value::Mapping(mut fields) = value else {
            return;
        };
        // Every object's fields; the rest must be settings.
        for key in ["apiVersion", "kind", "metadata"] {
            fields.remove(key);
        }
        let Some(settings) =
            self.typed::<AgentSettings>(serde_yaml::Value::Mapping(fields), &location, &object)
        else {
            // Still counts as the one settings document.
            self.settings = Some((location, AgentSettings::default()));
            return;
        };
        let at = |s: &mut Self, field: &str, message: String| {
            s.problem(&location, Some(&object), field, message);
        };
        if let Err(error) = crate::maglev::check_table_size(settings.maglev.table_size) {
            at(self, "maglev.tableSize", error.to_string());
        }
        if !(1..=MAX_MAX_TABLES).contains(&settings.max_tables) {
            at(
                self,
                "maxTables",
                format!(
                    "{} is out of range; use 1-{MAX_MAX_TABLES} (default {})",
                    settings.max_tables,
                    lb_common::DEFAULT_MAX_TABLES
                ),
            );
        }
        let connections = MIN_CONNECTION_TABLE_SIZE..=MAX_CONNECTION_TABLE_SIZE;
        if !connections.contains(&settings.connection_table_size) {
            at(
                self,
                "connectionTableSize",
                format!(
                    "{} is out of range; use {}-{} (default {})",
                    settings.connection_table_size,
                    connections.start(),
                    connections.end(),
                    lb_common::CONNTRACK_ENTRIES
                ),
            );
        }
        if settings.snat.ports.overlaps(settings.node_port_range) {
            at(
                self,
                "snat.ports",
                format!(
                    "{} overlaps nodePortRange {}: replies to translated flows would be taken \
                     for nodePort traffic; use ports outside it (default {DEFAULT_SNAT_PORTS})",
                    settings.snat.ports, settings.node_port_range
                ),
            );
        }
        if let Err(problems) = ipam::check_pools(&settings.load_balancer_ip_pools) {
            for (field, message) in problems {
                at(self, &field, message);
            }
        }
        self.settings = Some((location, settings));
    }

    fn check_node_name(
        &mut self,
        node_name: Option<&str>,
        field: &str,
        location: &Location,
        object: &str,
    ) {
        if let Some(node_name) = node_name
            && !is_dns_subdomain(node_name)
        {
            self.problem(
                location,
                Some(object),
                field,
                format!(
                    "{node_name:?} is not a node name; use at most 253 lowercase letters, \
                     digits, '-' and '.', each dot-separated part starting and ending with \
                     a letter or digit"
                ),
            );
        }
    }

    /// The TCP and UDP ports of an `EndpointSlice`: (port name, protocol, number).
    fn slice_ports(
        &mut self,
        ports: &[EndpointPortSpec],
        prefix: &str,
        location: &Location,
        object: &str,
    ) -> Vec<(String, Protocol, u16)> {
        let mut served = Vec::new();
        for (i, port) in ports.iter().enumerate() {
            let field = format!("{prefix}[{i}]");
            let protocol = match parse_protocol(port.protocol.as_deref()) {
                Ok(Some(protocol)) => protocol,
                // SCTP endpoints are valid; the Service side already warned that it is not served.
                Ok(None) => continue,
                Err(message) => {
                    self.problem(
                        location,
                        Some(object),
                        &format!("{field}.protocol"),
                        message,
                    );
                    continue;
                }
            };
            let Some(number) = port.port.and_then(port_number) else {
                self.problem(
                    location,
                    Some(object),
                    &format!("{field}.port"),
                    "missing or not a port; use 1-65535".to_owned(),
                );
                continue;
            };
            served.push((port.name.clone().unwrap_or_default(), protocol, number));
        }
        served
    }

    /// The object's namespace and name; namespace defaults to `default` as `kubectl` does.
    fn identity(
        &mut self,
        metadata: &ObjectMeta,
        location: &Location,
        object: &str,
    ) -> Option<(String, String)> {
        let Some(name) = metadata.name.clone().filter(|n| !n.is_empty()) else {
            self.problem(
                location,
                Some(object),
                "metadata.name",
                "missing; every object needs a name".to_owned(),
            );
            return None;
        };
        let namespace = metadata
            .namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".to_owned());
        Some((namespace, name))
    }

    /// Checks the node ports that are written and assigns the omitted ones, as the API server
    /// would: inside `range`, and each (port, protocol) used by one Service port only. The
    /// assignment depends on nothing but the input, so every node and every restart gives the
    /// same ports: the written ports are taken first, then each Service (in namespace and name
    /// order) gets, port by port, the first free port at or after the hash of
    /// `namespace/name/portName/protocol`, wrapping around the range.
    fn node_ports(&mut self, services: &[ServiceEntry], range: PortRange) -> Vec<ServiceNodePorts> {
        let mut result: Vec<ServiceNodePorts> = services
            .iter()
            .map(|service| ServiceNodePorts {
                ports: vec![None; service.ports.len()],
                health_check: None,
            })
            .collect();
        // Who has each (protocol, port), for the messages; `used` has the ports of either
        // protocol, which assignment avoids.
        let mut owners: BTreeMap<(Protocol, u16), String> = BTreeMap::new();
        let mut used = BTreeSet::new();
        let outside = |n: i64| {
            format!(
                "{n} is outside the node port range {range} (nodePortRange of {SETTINGS_KIND}); \
                 use a port in it, or omit the field to have one assigned"
            )
        };
        for (service_index, service) in services.iter().enumerate() {
            let mut wanted: Vec<(Option<usize>, String, Protocol, u16)> = Vec::new();
            for (port_index, port) in service.ports.iter().enumerate() {
                let NodePortWanted::Given(n) = port.node_port else {
                    continue;
                };
                let field = format!("{}.nodePort", port.field);
                if let Some(n) = port_number(n).filter(|&n| range.contains(n)) {
                    wanted.push((Some(port_index), field, port.protocol, n));
                } else {
                    self.problem(&service.location, Some(&service.object), &field, outside(n));
                }
            }
            if let Some(n) = service.health_check_node_port {
                let field = "spec.healthCheckNodePort".to_owned();
                if !service.wants_health_check {
                    self.problem(
                        &service.location,
                        Some(&service.object),
                        &field,
                        "may only be set when type is LoadBalancer and externalTrafficPolicy is \
                         Local; remove it"
                            .to_owned(),
                    );
                } else if let Some(n) = port_number(n).filter(|&n| range.contains(n)) {
                    // The health check is served over HTTP, so it takes the TCP port.
                    wanted.push((None, field, Protocol::Tcp, n));
                } else {
                    self.problem(&service.location, Some(&service.object), &field, outside(n));
                }
            }
            for (port_index, field, protocol, n) in wanted {
                match owners.entry((protocol, n)) {
                    Entry::Occupied(owner) => {
                        let message = format!(
                            "{n}/{protocol} is already the node port of {}; each node port \
                             belongs to one Service port per protocol: pick another, or omit \
                             the field to have a free one assigned",
                            owner.get()
                        );
                        self.problem(&service.location, Some(&service.object), &field, message);
                    }
                    Entry::Vacant(vacant) => {
                        vacant.insert(format!("{} {field}", service.object));
                        used.insert(n);
                        let ports = &mut result[service_index];
                        match port_index {
                            Some(i) => ports.ports[i] = Some((n, false)),
                            None => ports.health_check = Some(n),
                        }
                    }
                }
            }
        }
        self.assign_node_ports(services, range, &mut used, &mut result);
        result
    }

    /// The second half of [`Self::node_ports`]: assigns the omitted node ports, avoiding `used`.
    fn assign_node_ports(
        &mut self,
        services: &[ServiceEntry],
        range: PortRange,
        used: &mut BTreeSet<u16>,
        result: &mut [ServiceNodePorts],
    ) {
        let mut order: Vec<usize> = (0..services.len()).collect();
        order.sort_by(|&a, &b| {
            (&services[a].namespace, &services[a].name)
                .cmp(&(&services[b].namespace, &services[b].name))
        });
        for service_index in order {
            let service = &services[service_index];
            // (port index or `None` for the health check, field, key name).
            let mut wanted: Vec<(Option<usize>, String, &str, Protocol)> = Vec::new();
            for (port_index, port) in service.ports.iter().enumerate() {
                if port.node_port == NodePortWanted::Assign {
                    let field = format!("{}.nodePort", port.field);
                    wanted.push((Some(port_index), field, &port.name, port.protocol));
                }
            }
            if service.wants_health_check && service.health_check_node_port.is_none() {
                // Not a valid port name, so it cannot collide with a port's key.
                let field = "spec.healthCheckNodePort".to_owned();
                wanted.push((None, field, "healthCheckNodePort", Protocol::Tcp));
            }
            for (port_index, field, name, protocol) in wanted {
                let key = format!("{}/{}/{name}/{protocol}", service.namespace, service.name);
                let Some(n) = assign_port(range, &key, used) else {
                    let message = format!(
                        "no free port is left in the node port range {range} to assign; widen \
                         nodePortRange of {SETTINGS_KIND}, or free some node ports"
                    );
                    self.problem(&service.location, Some(&service.object), &field, message);
                    continue;
                };
                used.insert(n);
                let ports = &mut result[service_index];
                match port_index {
                    Some(i) => ports.ports[i] = Some((n, true)),
                    None => ports.health_check = Some(n),
                }
            }
        }
    }

    /// The endpoints of one service port: per group (slice or subset), the port of the same
    /// name as the service port, else the port named by a named `targetPort`; a group that
    /// lists no ports at all serves a numeric `targetPort`.
    fn port_endpoints(
        &mut self,
        service: &ServiceEntry,
        port: &PortEntry,
        source: Option<&EndpointSource>,
    ) -> Vec<Endpoint> {
        let Some(source) = source else {
            return Vec::new();
        };
        let mut by_addr: BTreeMap<(Ipv4Addr, u16), Listed> = BTreeMap::new();
        let mut resolved = false;
        for group in &source.groups {
            let named = |name: &str| {
                group
                    .ports
                    .iter()
                    .find(|(n, protocol, _)| n == name && *protocol == port.protocol)
                    .map(|&(_, _, number)| number)
            };
            let number = match &port.target_port {
                TargetPort::Number(number) if group.ports.is_empty() => Some(*number),
                TargetPort::Number(_) => named(&port.name),
                TargetPort::Name(target) => named(&port.name).or_else(|| named(target)),
            };
            let Some(number) = number else { continue };
            resolved = true;
            for (addr, listed) in &group.endpoints {
                match by_addr.entry((*addr, number)) {
                    Entry::Vacant(vacant) => {
                        vacant.insert(listed.clone());
                    }
                    Entry::Occupied(mut occupied) => {
                        if listed < occupied.get() {
                            occupied.insert(listed.clone());
                        }
                    }
                }
            }
        }
        let has_endpoints = source.groups.iter().any(|g| !g.endpoints.is_empty());
        if let TargetPort::Name(target) = &port.target_port
            && !resolved
            && has_endpoints
        {
            self.warnings.push(format!(
                "{} ({}): {}.targetPort {target:?} matches no port of its endpoints ({}); as \
                 with kube-proxy, this port has no endpoints. Name the endpoint port {:?} or \
                 {target:?}",
                service.location, service.object, port.field, source.origin, port.name
            ));
        }
        by_addr
            .into_iter()
            .filter_map(|((addr, port), listed)| {
                Some(Endpoint {
                    addr,
                    port,
                    state: listed.serves.state()?,
                    pod: listed.pod,
                    node_name: listed.node_name,
                })
            })
            .collect()
    }

    /// Records that `frontends` belong to `owner` (service and port index), and reports the
    /// ones another service port has already.
    fn claim(
        &mut self,
        claimed: &mut Claims,
        frontends: &[Frontend],
        owner: (usize, usize),
        service: &ServiceEntry,
        port: &PortEntry,
    ) {
        for frontend in frontends {
            let here = format!("{} {}", service.object, port.field);
            let claim = (frontend.addr, frontend.port, port.protocol);
            if let Some((first_owner, first, first_kind)) = claimed.get(&claim) {
                // The same port reached in two ways, say an externalIP that is also its
                // load balancer's address; or two node ports, already reported.
                let both_node_ports = *first_kind == FrontendKind::NodePort
                    && frontend.kind == FrontendKind::NodePort;
                if *first_owner == owner || both_node_ports {
                    continue;
                }
                let message = format!(
                    "{}:{}/{} is already served by {first}; every address, port and \
                     protocol can belong to one Service port only",
                    frontend.addr, frontend.port, port.protocol
                );
                self.problem(
                    &service.location,
                    Some(&service.object),
                    &port.field,
                    message,
                );
            } else {
                claimed.insert(claim, (owner, here, frontend.kind));
            }
        }
    }

    /// Joins Services with their endpoints, checks and assigns node ports, expands them over
    /// the node addresses, and checks that no two service ports claim the same address, port
    /// and protocol.
    fn finish(
        mut self,
        node_ips: &[Ipv4Addr],
        discovered: &[Ipv4Addr],
    ) -> Result<Loaded, Vec<Problem>> {
        let settings = self
            .settings
            .take()
            .map(|(_, settings)| settings)
            .unwrap_or_default();
        let node_ips = [node_ips, &settings.node_addresses, discovered]
            .into_iter()
            .find(|ips| !ips.is_empty())
            .unwrap_or_default()
            .to_vec();
        let services = std::mem::take(&mut self.services);
        let node_ports = self.node_ports(&services, settings.node_port_range);
        let pools = settings.pools();
        let address_claims = address_claims(&services, &pools);
        let allocated = self.allocate_here(&services, &pools, &address_claims);
        let mut slices = std::mem::take(&mut self.slices);
        let mut legacy = std::mem::take(&mut self.legacy_endpoints);
        let mut service_ports = Vec::new();
        let mut claimed = Claims::new();
        for (service_index, service) in services.iter().enumerate() {
            let source = self.endpoint_source(service, &mut slices, &mut legacy);
            let health_check_node_port = node_ports[service_index].health_check;
            for (port_index, port) in service.ports.iter().enumerate() {
                let node_port = node_ports[service_index].ports[port_index];
                let mut frontends = port.frontends_on_service_ips.clone();
                let allocation = allocated.get(&service_index);
                if let Some((AddressAllocation::Pool(_), addrs)) = allocation {
                    frontends.extend(addrs.iter().map(|&addr| Frontend {
                        kind: FrontendKind::LoadBalancer,
                        addr,
                        port: port.port,
                    }));
                }
                if let Some((node_port, _)) = node_port {
                    frontends.extend(node_ips.iter().map(|&addr| Frontend {
                        kind: FrontendKind::NodePort,
                        addr,
                        port: node_port,
                    }));
                }
                frontends.sort();
                frontends.dedup();
                self.claim(
                    &mut claimed,
                    &frontends,
                    (service_index, port_index),
                    service,
                    port,
                );
                let endpoints = self.port_endpoints(service, port, source.as_ref());
                service_ports.push(ServicePort {
                    service: format!("{}/{}", service.namespace, service.name),
                    port_name: port.name.clone(),
                    protocol: port.protocol,
                    frontends,
                    endpoints,
                    external_policy: service.settings.external_policy,
                    internal_policy: service.settings.internal_policy,
                    affinity_timeout_seconds: service.settings.affinity_timeout_seconds,
                    source_ranges: service.settings.source_ranges.clone(),
                    selection: service.settings.selection,
                    node_port: node_port.map(|(n, _)| n),
                    node_port_assigned: node_port.is_some_and(|(_, assigned)| assigned),
                    health_check_node_port,
                    load_balancer_allocation: allocation.map(|(a, _)| a.clone()),
                });
            }
        }
        self.warn_unused_endpoints(slices.into_iter().chain(legacy));
        if !self.problems.is_empty() {
            // In file order; the checks across documents (node ports, claims) come last
            // otherwise. Stable, so one document's problems keep their field order.
            self.problems.sort_by(|a, b| {
                let key = |p: &Problem| {
                    (
                        p.location.file.clone(),
                        p.location.document,
                        p.location.item,
                    )
                };
                key(a).cmp(&key(b))
            });
            return Err(self.problems);
        }
        service_ports.sort_by(|a, b| (&a.service, &a.port_name).cmp(&(&b.service, &b.port_name)));
        Ok(Loaded {
            state: DesiredState { service_ports },
            settings,
            node_ips,
            address_claims: if self.allocation == Allocation::ByStatus {
                address_claims
            } else {
                Vec::new()
            },
            warnings: self.warnings,
        })
    }

    /// A Service's endpoints: its slices, else its `Endpoints`.
    fn endpoint_source(
        &mut self,
        service: &ServiceEntry,
        slices: &mut EndpointIndex,
        legacy: &mut EndpointIndex,
    ) -> Option<EndpointSource> {
        let key = (service.namespace.clone(), service.name.clone());
        match (slices.remove(&key), legacy.remove(&key)) {
            (Some(slices), Some(legacy)) => {
                self.warnings.push(format!(
                    "{}: Service {}/{} also has EndpointSlices ({}); only the slices are used, \
                     as kube-proxy does",
                    legacy.origin, service.namespace, service.name, slices.origin
                ));
                Some(slices)
            }
            (slices, legacy) => slices.or(legacy),
        }
    }

    fn warn_unused_endpoints(
        &mut self,
        unused: impl Iterator<Item = ((String, String), EndpointSource)>,
    ) {
        for ((namespace, name), source) in unused {
            if self.skipped.contains(&(namespace.clone(), name.clone())) {
                continue;
            }
            self.warnings.push(format!(
                "{}: belongs to Service {namespace}/{name}, which is not in the config; its \
                 endpoints are not used",
                source.origin
            ));
        }
    }

    /// With [`Allocation::Here`]: the addresses each Service without any in its status gets
    /// (by index into `services`); a conflict is a warning, and shown in `status`.
    fn allocate_here(
        &mut self,
        services: &[ServiceEntry],
        pools: &[ipam::Pool],
        claims: &[ipam::Claim],
    ) -> BTreeMap<usize, (AddressAllocation, Vec<Ipv4Addr>)> {
        let mut result = BTreeMap::new();
        if self.allocation != Allocation::Here || claims.is_empty() {
            return result;
        }
        let outcomes = ipam::allocate(pools, claims);
        for (index, service) in services.iter().enumerate() {
            let key = format!("{}/{}", service.namespace, service.name);
            let Some(request) = &service.address_request else {
                continue;
            };
            // Addresses written in the status are served as written.
            if !request.current.is_empty() {
                continue;
            }
            match outcomes.get(&key) {
                Some(ipam::Outcome::Addresses { pool, addrs }) => {
                    result.insert(
                        index,
                        (AddressAllocation::Pool(pool.clone()), addrs.clone()),
                    );
                }
                Some(ipam::Outcome::Conflict(why)) => {
                    self.warnings.push(format!(
                        "{} ({}): no load balancer address: {why}",
                        service.location, service.object
                    ));
                    result.insert(index, (AddressAllocation::Pending(why.clone()), Vec::new()));
                }
                None => {}
            }
        }
        result
    }
}

/// Why kube-proxy (and so lb-agent) leaves a Service alone, if it does.
fn not_proxied(service: &ServiceObject) -> Option<String> {
    if let Some(proxy) = service.metadata.labels.get(SERVICE_PROXY_NAME_LABEL) {
        Some(format!(
            "label {SERVICE_PROXY_NAME_LABEL}={proxy} hands it to another proxy"
        ))
    } else if service.spec.cluster_ip.as_deref() == Some("None") {
        // DNS answers with the endpoints themselves; no proxy is involved.
        Some("headless (clusterIP: None)".to_owned())
    } else {
        None
    }
}

/// The claims on the address pools: every `type: LoadBalancer` Service of lb-agent's class,
/// except one whose status holds only addresses of no pool (another controller's).
fn address_claims(services: &[ServiceEntry], pools: &[ipam::Pool]) -> Vec<ipam::Claim> {
    if pools.is_empty() {
        return Vec::new();
    }
    services
        .iter()
        .filter_map(|service| {
            let request = service.address_request.as_ref()?;
            let managed_elsewhere = !request.current.is_empty()
                && request.requested.is_empty()
                && !request
                    .current
                    .iter()
                    .any(|a| pools.iter().any(|p| p.contains(*a)));
            (!managed_elsewhere).then(|| ipam::Claim {
                service: format!("{}/{}", service.namespace, service.name),
                requested: request.requested.clone(),
                pool: request.pool.clone(),
                current: request.current.clone(),
            })
        })
        .collect()
}

/// A Service's node ports, written or assigned.
struct ServiceNodePorts {
    /// Per port: the node port and whether it was assigned.
    ports: Vec<Option<(u16, bool)>>,
    health_check: Option<u16>,
}

/// A port's protocol (TCP when unset): `Ok(None)` for SCTP, which is valid but not served.
fn parse_protocol(protocol: Option<&str>) -> Result<Option<Protocol>, String> {
    match protocol.unwrap_or("TCP") {
        "TCP" => Ok(Some(Protocol::Tcp)),
        "UDP" => Ok(Some(Protocol::Udp)),
        "SCTP" => Ok(None),
        other => Err(format!("unknown protocol {other:?}; use TCP or UDP")),
    }
}

/// A `loadBalancerSourceRanges` entry that parsed.
#[derive(Debug, PartialEq, Eq)]
enum Cidr {
    /// `host_bits`: the address had bits set past the prefix, which are cleared in `cidr`.
    V4 {
        cidr: Ipv4Cidr,
        host_bits: bool,
    },
    V6,
}

/// An `address/prefix-length` CIDR; `None` if it is not one. Strict: the whole text must be
/// the CIDR, and the prefix length decimal digits within the address's width.
fn parse_cidr(text: &str) -> Option<Cidr> {
    let (addr, prefix) = text.split_once('/')?;
    // `u8::from_str` would also take a sign.
    if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let prefix_len = prefix.parse::<u8>().ok()?;
    if let Ok(addr) = addr.parse::<Ipv4Addr>() {
        if prefix_len > 32 {
            return None;
        }
        let mask = u32::MAX
            .checked_shl(32 - u32::from(prefix_len))
            .unwrap_or(0);
        let network = Ipv4Addr::from(u32::from(addr) & mask);
        return Some(Cidr::V4 {
            cidr: Ipv4Cidr {
                addr: network,
                prefix_len,
            },
            host_bits: network != addr,
        });
    }
    if addr.parse::<std::net::Ipv6Addr>().is_ok() && prefix_len <= 128 {
        return Some(Cidr::V6);
    }
    None
}

/// Whether `name` is an RFC 1123 subdomain, as the API server requires of node names.
fn is_dns_subdomain(name: &str) -> bool {
    let alphanumeric = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    name.len() <= 253
        && name.split('.').all(|label| {
            let bytes = label.as_bytes();
            match (bytes.first(), bytes.last()) {
                (Some(&first), Some(&last)) => {
                    alphanumeric(first)
                        && alphanumeric(last)
                        && bytes.iter().all(|&b| alphanumeric(b) || b == b'-')
                }
                _ => false,
            }
        })
}

fn port_number(n: i64) -> Option<u16> {
    u16::try_from(n).ok().filter(|&p| p != 0)
}

/// `targetPort`: a number 1-65535 or a port name, as the API server accepts them.
fn target_port(value: &serde_yaml::Value) -> Result<TargetPort, String> {
    match value {
        serde_yaml::Value::Number(n) => n
            .as_i64()
            .and_then(port_number)
            .map(TargetPort::Number)
            .ok_or_else(|| format!("{n} is not a port; use 1-65535 or a port name")),
        serde_yaml::Value::String(name) if is_port_name(name) => Ok(TargetPort::Name(name.clone())),
        serde_yaml::Value::String(name) => Err(format!(
            "{name:?} is not a port name; use a number 1-65535 or a name of at most 15 \
             lowercase letters, digits and '-', with at least one letter, not starting or \
             ending with '-' (such as http)"
        )),
        _ => Err("not a port; use a number 1-65535 or a port name".to_owned()),
    }
}

/// Whether `name` is a port name (an IANA service name), as the API server requires of a named
/// `targetPort`.
fn is_port_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    (1..=15).contains(&bytes.len())
        && bytes
            .iter()
            .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && bytes.iter().any(u8::is_ascii_lowercase)
        && bytes.first() != Some(&b'-')
        && bytes.last() != Some(&b'-')
        && !name.contains("--")
}

/// FNV-1a (32 bits): a hash that is the same in every process, on every node and in every
/// version, unlike std's randomly seeded one. Assigned node ports depend on it.
pub(crate) fn stable_hash(text: &str) -> u32 {
    const OFFSET_BASIS: u32 = 0x811c_9dc5;
    const PRIME: u32 = 0x0100_0193;
    text.bytes().fold(OFFSET_BASIS, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(PRIME)
    })
}

/// The first port of `range` not in `used`, starting at `key`'s hash and wrapping around;
/// `None` when every port is used.
fn assign_port(range: PortRange, key: &str, used: &BTreeSet<u16>) -> Option<u16> {
    let len = range.size();
    let start = stable_hash(key) % len;
    (0..len)
        .map(|step| (start + step) % len)
        .filter_map(|offset| u16::try_from(u32::from(range.first) + offset).ok())
        .find(|port| !used.contains(port))
}

/// `Kind namespace/name` for messages, read leniently from a value that may not parse.
fn describe(kind: &str, value: &serde_yaml::Value) -> String {
    let metadata = value.get("metadata");
    let field = |f: &str| {
        metadata
            .and_then(|m| m.get(f))
            .and_then(serde_yaml::Value::as_str)
            .unwrap_or_default()
    };
    let namespace = match field("namespace") {
        "" => "default",
        ns => ns,
    };
    match field("name") {
        "" => format!("{kind} without a name"),
        name => format!("{kind} {namespace}/{name}"),
    }
}

#[cfg(test)]
mod tests;
