//! The config file: a multi-document YAML stream of Kubernetes objects, as users write them or as
//! `kubectl get svc,endpointslices -o yaml` prints them (a `v1` `List`).
//!
//! Read: `v1` `Service` and `discovery.k8s.io/v1` `EndpointSlice`; an `EndpointSlice` belongs to the
//! Service named by its `kubernetes.io/service-name` label in the same namespace. Other kinds are
//! skipped with a warning. Every problem found is reported at once, each naming the file, the
//! document, the object and the field.
//!
//! The fields read, with the API server's defaults and rules (so a manifest it would refuse is
//! refused here too, and one it would accept means the same to the data path as to kube-proxy):
//!
//! - Service `metadata`: `name`, `namespace` (default `default`), the annotations
//!   `lb-agent/backend-selection` (`maglev`, the default, or `random`) and
//!   `service.beta.kubernetes.io/load-balancer-source-ranges` (comma-separated CIDRs, used only
//!   when `spec.loadBalancerSourceRanges` is empty).
//! - Service `spec`: `type`, `clusterIP`, `externalIPs`, `ports[]` (`name`, `protocol`, `port`,
//!   `nodePort`), `allocateLoadBalancerNodePorts`, `externalTrafficPolicy` (`Cluster` or `Local`;
//!   only on a Service reachable from outside: `NodePort`, `LoadBalancer` or with `externalIPs`),
//!   `internalTrafficPolicy` (`Cluster` or `Local`), `sessionAffinity` (`None` or `ClientIP`),
//!   `sessionAffinityConfig.clientIP.timeoutSeconds` (1-86400, default 10800) and
//!   `loadBalancerSourceRanges` (type `LoadBalancer` only). All of these apply to every port of
//!   the Service.
//! - Service `status.loadBalancer.ingress[].ip`.
//! - `EndpointSlice`: `metadata.labels[kubernetes.io/service-name]`, `addressType`, `ports[]`
//!   and `endpoints[]`: the first of `addresses`, `nodeName`, `targetRef.name` and `conditions`
//!   (`ready`, `serving`, `terminating`), read as kube-proxy reads them.

use std::{
    collections::{BTreeMap, BTreeSet, btree_map::Entry},
    fmt::{self, Write as _},
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::model::{
    DesiredState, Endpoint, EndpointState, Frontend, FrontendKind, Ipv4Cidr, Protocol, Selection,
    ServicePort, TrafficPolicy,
};

/// The label that links an `EndpointSlice` to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The API server's default `--service-node-port-range`.
pub const NODE_PORT_RANGE: std::ops::RangeInclusive<u16> = 30000..=32767;
/// The annotation that picks how a Service's new flows choose their backend.
pub const SELECTION_ANNOTATION: &str = "lb-agent/backend-selection";
/// The annotation that held `loadBalancerSourceRanges` before the field existed.
pub const SOURCE_RANGES_ANNOTATION: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";
/// The API server's default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_SECONDS: u32 = 10_800;
/// The `timeoutSeconds` the API server accepts: up to one day.
pub const AFFINITY_TIMEOUT_SECONDS: std::ops::RangeInclusive<u32> = 1..=86_400;

/// Where in the file a problem is: document number (from 1) and, inside a `List`, the item.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub document: usize,
    pub item: Option<usize>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "document {}", self.document)?;
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
    #[error("cannot read config file {}: {source}", file.display())]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", render_problems(file, problems))]
    Invalid {
        file: PathBuf,
        problems: Vec<Problem>,
    },
}

fn render_problems(file: &Path, problems: &[Problem]) -> String {
    let mut out = format!(
        "config file {} has {} problem{}:",
        file.display(),
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    for problem in problems {
        let _ = write!(out, "\n  - {problem}");
    }
    out
}

/// A config that was read: the state to serve, plus what was skipped and why.
#[derive(Debug)]
pub struct Loaded {
    pub state: DesiredState,
    pub warnings: Vec<String>,
}

/// Reads and validates `file`. `node_ips` are the addresses `NodePorts` are served on.
pub fn load_file(file: &Path, node_ips: &[Ipv4Addr]) -> Result<Loaded, ConfigError> {
    let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
        file: file.to_owned(),
        source,
    })?;
    parse(&text, node_ips).map_err(|problems| ConfigError::Invalid {
        file: file.to_owned(),
        problems,
    })
}

/// Parses and validates a YAML stream.
pub fn parse(text: &str, node_ips: &[Ipv4Addr]) -> Result<Loaded, Vec<Problem>> {
    let mut reader = Reader::default();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let location = Location {
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
    reader.finish(node_ips)
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

/// A Service as read, before its endpoints are joined to it.
struct ServiceEntry {
    location: Location,
    object: String,
    namespace: String,
    name: String,
    ports: Vec<PortEntry>,
    settings: ServiceSettings,
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
    frontends_on_service_ips: Vec<Frontend>,
    node_port: Option<u16>,
}

/// How a Service's type decides its node ports.
struct NodePortRules<'a> {
    service_type: &'a str,
    has_node_ports: bool,
    /// False when `allocateLoadBalancerNodePorts: false` lets a port go without one.
    required: bool,
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

/// Endpoints per (namespace, service name, port name, protocol), by address and port.
type EndpointIndex =
    BTreeMap<(String, String, String, Protocol), BTreeMap<(Ipv4Addr, u16), Listed>>;

/// Which service port (service and port index, and its name) serves an address, port and
/// protocol.
type Claims = BTreeMap<(Ipv4Addr, u16, Protocol), ((usize, usize), String)>;

#[derive(Default)]
struct Reader {
    problems: Vec<Problem>,
    warnings: Vec<String>,
    services: Vec<ServiceEntry>,
    endpoints: EndpointIndex,
    /// Services that `EndpointSlices` point at, to warn about slices with no Service.
    slice_targets: BTreeMap<(String, String), String>,
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
            ("", _) | (_, "") => self.problem(
                &location,
                None,
                if api_version.is_empty() {
                    "apiVersion"
                } else {
                    "kind"
                },
                "missing; every document must be a Kubernetes object with apiVersion and kind \
                 (v1 Service or discovery.k8s.io/v1 EndpointSlice)"
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
        let settings = self.service_settings(&service, service_type, &location, &object);
        let rules = NodePortRules {
            service_type,
            has_node_ports,
            required: node_ports_required,
        };
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
        });
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
        rules: &NodePortRules<'_>,
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
        let node_port = if rules.has_node_ports {
            match port.node_port {
                Some(n) => match u16::try_from(n) {
                    Ok(n) if NODE_PORT_RANGE.contains(&n) => Some(n),
                    _ => {
                        self.problem(
                            location,
                            Some(object),
                            &format!("{field}.nodePort"),
                            format!(
                                "{n} is outside the node port range {}-{}",
                                NODE_PORT_RANGE.start(),
                                NODE_PORT_RANGE.end()
                            ),
                        );
                        return None;
                    }
                },
                None if !rules.required => None,
                None => {
                    self.problem(
                        location,
                        Some(object),
                        &format!("{field}.nodePort"),
                        format!(
                            "required for type {}: lb-agent does not assign node \
                             ports yet; set one in {}-{}",
                            rules.service_type,
                            NODE_PORT_RANGE.start(),
                            NODE_PORT_RANGE.end()
                        ),
                    );
                    return None;
                }
            }
        } else {
            None
        };
        Some(PortEntry {
            field,
            name,
            protocol,
            frontends_on_service_ips: service_ips
                .iter()
                .map(|&(kind, addr)| Frontend {
                    kind,
                    addr,
                    port: service_port,
                })
                .collect(),
            node_port,
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
        self.slice_targets
            .entry((namespace.clone(), service.clone()))
            .or_insert_with(|| format!("{location} ({object})"));

        let ports = self.slice_ports(&slice.ports, location, &object);

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
            if let Some(node_name) = &endpoint.node_name
                && !is_dns_subdomain(node_name)
            {
                self.problem(
                    location,
                    Some(&object),
                    &format!("endpoints[{i}].nodeName"),
                    format!(
                        "{node_name:?} is not a node name; use at most 253 lowercase letters, \
                         digits, '-' and '.', each dot-separated part starting and ending with \
                         a letter or digit"
                    ),
                );
            }
            // Kubernetes lists all addresses of one endpoint, but they are the same pod: use the
            // first, as kube-proxy does.
            let Some(&addr) = addrs.first() else { continue };
            // Endpoints that serve nothing are kept until the merge: they still claim their
            // address (see `Listed`).
            let listed = Listed {
                terminating: endpoint.conditions.terminating.unwrap_or(false),
                serves: Serves::of(&endpoint.conditions),
                pod: endpoint.target_ref.as_ref().and_then(|r| r.name.clone()),
                node_name: endpoint.node_name.clone(),
            };
            for (port_name, protocol, number) in &ports {
                let by_addr = self
                    .endpoints
                    .entry((
                        namespace.clone(),
                        service.clone(),
                        port_name.clone(),
                        *protocol,
                    ))
                    .or_default();
                match by_addr.entry((addr, *number)) {
                    Entry::Vacant(vacant) => {
                        vacant.insert(listed.clone());
                    }
                    Entry::Occupied(mut occupied) => {
                        if listed < *occupied.get() {
                            occupied.insert(listed.clone());
                        }
                    }
                }
            }
        }
    }

    /// The TCP and UDP ports of an `EndpointSlice`: (port name, protocol, number).
    fn slice_ports(
        &mut self,
        ports: &[EndpointPortSpec],
        location: &Location,
        object: &str,
    ) -> Vec<(String, Protocol, u16)> {
        let mut served = Vec::new();
        for (i, port) in ports.iter().enumerate() {
            let field = format!("ports[{i}]");
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

    /// Joins Services with their endpoints, expands node ports over `node_ips`, and checks that
    /// no two service ports claim the same address, port and protocol.
    fn finish(mut self, node_ips: &[Ipv4Addr]) -> Result<Loaded, Vec<Problem>> {
        let mut service_ports = Vec::new();
        let mut claimed = Claims::new();
        let services = std::mem::take(&mut self.services);
        for (service_index, service) in services.iter().enumerate() {
            let key = (service.namespace.clone(), service.name.clone());
            self.slice_targets.remove(&key);
            for (port_index, port) in service.ports.iter().enumerate() {
                let owner = (service_index, port_index);
                let mut frontends = port.frontends_on_service_ips.clone();
                if let Some(node_port) = port.node_port {
                    frontends.extend(node_ips.iter().map(|&addr| Frontend {
                        kind: FrontendKind::NodePort,
                        addr,
                        port: node_port,
                    }));
                }
                frontends.sort();
                frontends.dedup();
                for frontend in &frontends {
                    let here = format!("{} {}", service.object, port.field);
                    let claim = (frontend.addr, frontend.port, port.protocol);
                    if let Some((first_owner, first)) = claimed.get(&claim) {
                        // The same port reached in two ways, say an externalIP that is also its
                        // load balancer's address.
                        if *first_owner == owner {
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
                        claimed.insert(claim, (owner, here));
                    }
                }
                let endpoints = self
                    .endpoints
                    .get(&(
                        service.namespace.clone(),
                        service.name.clone(),
                        port.name.clone(),
                        port.protocol,
                    ))
                    .map(|by_addr| {
                        by_addr
                            .iter()
                            .filter_map(|(&(addr, port), listed)| {
                                Some(Endpoint {
                                    addr,
                                    port,
                                    pod: listed.pod.clone(),
                                    node_name: listed.node_name.clone(),
                                    state: listed.serves.state()?,
                                })
                            })
                            .collect()
                    })
                    .unwrap_or_default();
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
                    ..ServicePort::default()
                });
            }
        }
        for ((namespace, name), slice) in std::mem::take(&mut self.slice_targets) {
            self.warnings.push(format!(
                "{slice}: belongs to Service {namespace}/{name}, which is not in the config; \
                 its endpoints are not used"
            ));
        }
        if !self.problems.is_empty() {
            return Err(self.problems);
        }
        service_ports.sort_by(|a, b| (&a.service, &a.port_name).cmp(&(&b.service, &b.port_name)));
        Ok(Loaded {
            state: DesiredState { service_ports },
            warnings: self.warnings,
        })
    }
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
