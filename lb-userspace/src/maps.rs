//! From the desired state to map contents, and from two map contents to the ordered plan that
//! turns one into the other. Every config source goes through here.
//!
//! Each service port gets up to two Maglev tables: one over the endpoints every node may use
//! (`Cluster` policies) and one over this node's (`Local` policies). Which endpoints a table
//! holds follows kube-proxy: the ready ones; if none is ready, the serving-and-terminating ones.
//! Service and backend ids stay the same across applies for the same service port and endpoint,
//! so tracked flows, affinity entries and counters keep meaning the same thing.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::Arc,
};

use lb_common::{
    Backend, FrontendKey, MAX_BACKENDS, MAX_FRONTENDS, SOURCE_RANGE_ENTRIES, Service, Settings,
    backend_flags, frontend_scope, service_flags,
};

use crate::{
    maglev::{self, MaglevError},
    model::{
        DesiredState, Endpoint, EndpointState, FrontendKind, Ipv4Cidr, Protocol, Selection,
        ServicePort, TrafficPolicy,
    },
};

/// What this node is, as far as the maps are concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    /// Compared with each endpoint's `nodeName`.
    pub node_name: String,
    /// Flows to other nodes' endpoints get this source address; `None` turns SNAT off.
    pub snat_addr: Option<Ipv4Addr>,
    /// SNAT source ports, inclusive.
    pub snat_ports: (u16, u16),
    /// Whether `loadBalancerSourceRanges` also guard the nodePorts (kube-proxy: no; here: yes
    /// by default, since a nodePort otherwise bypasses the ranges).
    pub source_ranges_on_node_ports: bool,
    /// M, the size of every Maglev table (prime).
    pub maglev_table_size: u32,
    pub maglev_seed: u32,
    /// How many Maglev tables the data path was loaded with room for.
    pub max_tables: u32,
}

/// Default SNAT ports: above Linux's default ephemeral range (32768-60999), so translated flows
/// never collide with the node's own connections.
pub const DEFAULT_SNAT_PORTS: (u16, u16) = (61_000, 65_535);

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            node_name: String::new(),
            snat_addr: None,
            snat_ports: DEFAULT_SNAT_PORTS,
            source_ranges_on_node_ports: true,
            maglev_table_size: maglev::DEFAULT_TABLE_SIZE,
            maglev_seed: 0,
            max_tables: lb_common::DEFAULT_MAX_TABLES,
        }
    }
}

/// Which endpoints a Maglev table spreads over: a service port's, all or only this node's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TableKey {
    pub service_id: u32,
    pub local: bool,
}

/// A Maglev table: slot -> backend id. The slots are shared between the builds that keep the
/// table, so with thousands of Services an apply neither copies nor compares the tables that
/// did not change (each is M entries: 64 KiB at the default size).
#[derive(Clone, Debug, Eq)]
pub struct MaglevTable {
    /// The distinct backend ids in the slots, sorted. Maglev puts every backend of its set into
    /// the table, so this is the set the table spreads over.
    backends: Vec<u32>,
    slots: Arc<[u32]>,
}

impl MaglevTable {
    /// A table built over `backends` (in any order; each of them is in `slots`).
    fn built(mut backends: Vec<u32>, slots: Vec<u32>) -> Self {
        backends.sort_unstable();
        backends.dedup();
        MaglevTable {
            backends,
            slots: slots.into(),
        }
    }

    /// A table read back from the maps.
    #[must_use]
    pub fn from_slots(slots: Vec<u32>) -> Self {
        let mut backends = slots.clone();
        backends.sort_unstable();
        backends.dedup();
        MaglevTable {
            backends,
            slots: slots.into(),
        }
    }

    #[must_use]
    pub fn slots(&self) -> &[u32] {
        &self.slots
    }

    /// The backend ids the table spreads over, sorted.
    #[must_use]
    pub fn backends(&self) -> &[u32] {
        &self.backends
    }
}

impl PartialEq for MaglevTable {
    fn eq(&self, other: &Self) -> bool {
        self.backends == other.backends
            && (Arc::ptr_eq(&self.slots, &other.slots) || self.slots == other.slots)
    }
}

/// A frontend's value, before the data plane knows where its table lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrontendEntry {
    /// `table` is filled in by the data plane from `table_key`.
    pub service: Service,
    /// `None` when no endpoint serves this frontend (`backend_count` is 0).
    pub table_key: Option<TableKey>,
}

/// What the agent-owned maps should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapContents {
    pub settings: Settings,
    pub frontends: BTreeMap<FrontendKey, FrontendEntry>,
    pub tables: BTreeMap<TableKey, MaglevTable>,
    /// Backend id -> backend.
    pub backends: BTreeMap<u32, Backend>,
    /// (service id, CIDR) pairs of `loadBalancerSourceRanges`.
    pub source_ranges: BTreeSet<(u32, Ipv4Cidr)>,
    /// Service port identity (`namespace/name:port/PROTOCOL`) -> service id.
    pub service_ids: BTreeMap<String, u32>,
    /// (service id, endpoint address, port) -> backend id.
    pub backend_ids: BTreeMap<(u32, Ipv4Addr, u16), u32>,
    /// Service id -> the service port's display name, for reports.
    pub service_names: BTreeMap<u32, String>,
    /// Service ids of UDP service ports.
    pub udp_services: BTreeSet<u32>,
}

/// A Maglev table over `set` (whose backend ids are `set_ids`), as backend ids.
fn maglev_table(
    set: &[&Endpoint],
    set_ids: &[u32],
    node: &NodeConfig,
) -> Result<MaglevTable, CapacityError> {
    let identities: Vec<String> = set
        .iter()
        .map(|e| format!("{}:{}", e.addr, e.port))
        .collect();
    let identity_bytes: Vec<&[u8]> = identities.iter().map(String::as_bytes).collect();
    let indices = maglev::build_table(&identity_bytes, node.maglev_table_size, node.maglev_seed)?;
    let slots = indices.iter().map(|&i| set_ids[i as usize]).collect();
    Ok(MaglevTable::built(set_ids.to_vec(), slots))
}

impl MapContents {
    /// The table this build had for `key`, if a new one would be the same: the same M and
    /// seed and the same backend ids. An id names one (service, address, port) for as long as
    /// it is in use (a new endpoint never gets an id the previous build used), and Maglev fills
    /// every backend into a table, so the distinct ids of a table are its backend set. Without
    /// this every table of every Service was rebuilt on every change: most of an apply's time
    /// with thousands of Services.
    fn unchanged_table(
        &self,
        key: TableKey,
        set_ids: &[u32],
        settings: &Settings,
    ) -> Option<&MaglevTable> {
        if self.settings.maglev_table_size != settings.maglev_table_size
            || self.settings.hash_seed != settings.hash_seed
        {
            return None;
        }
        let table = self.tables.get(&key)?;
        let mut wanted = set_ids.to_vec();
        wanted.sort_unstable();
        wanted.dedup();
        (table.backends() == wanted).then_some(table)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CapacityError {
    #[error(
        "{count} Maglev tables are needed but the data path has room for {limit}; raise maxTables in the AgentSettings"
    )]
    TooManyTables { count: usize, limit: u32 },
    #[error(
        "service {service} has {count} endpoints but the Maglev table size is {size}; raise \
         maglev.tableSize in the AgentSettings to a prime well above the endpoint count (at least 100x for even spread)"
    )]
    TableTooSmall {
        service: String,
        count: usize,
        size: u32,
    },
    #[error("{count} backends (service ports x endpoints) exceed the limit of {limit}")]
    TooManyBackends { count: usize, limit: u32 },
    #[error("{count} frontends exceed the limit of {limit}")]
    TooManyFrontends { count: usize, limit: u32 },
    #[error("{count} loadBalancerSourceRanges entries exceed the limit of {limit}")]
    TooManySourceRanges { count: usize, limit: u32 },
    #[error("maglev.tableSize: {0}")]
    Maglev(#[from] MaglevError),
    #[error("snat.ports {0}-{1}: the first port must not be above the last")]
    SnatPorts(u16, u16),
}

/// Hands out the smallest ids that neither the previous contents nor this build use, so ids
/// that just went away are not reused in the same apply.
struct IdAllocator {
    taken: BTreeSet<u32>,
    next: u32,
}

impl IdAllocator {
    fn new(previous: impl Iterator<Item = u32>) -> Self {
        IdAllocator {
            taken: previous.collect(),
            next: 1,
        }
    }

    fn reuse_or_allocate(&mut self, previous: Option<u32>) -> u32 {
        if let Some(id) = previous {
            return id;
        }
        while self.taken.contains(&self.next) {
            self.next += 1;
        }
        self.taken.insert(self.next);
        self.next
    }
}

/// The endpoints that take new flows from one set, as kube-proxy picks them: the ready ones,
/// or if there are none, the serving-and-terminating ones.
fn serving<'a>(endpoints: impl Iterator<Item = &'a Endpoint> + Clone) -> Vec<&'a Endpoint> {
    let ready: Vec<_> = endpoints
        .clone()
        .filter(|e| e.state == EndpointState::Ready)
        .collect();
    if ready.is_empty() {
        endpoints
            .filter(|e| e.state == EndpointState::Terminating)
            .collect()
    } else {
        ready
    }
}

fn be(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

fn frontend_key(port: &ServicePort, frontend: crate::model::Frontend) -> FrontendKey {
    FrontendKey {
        addr_be: be(frontend.addr),
        port_be: frontend.port.to_be(),
        protocol: port.protocol.number(),
        scope: frontend_scope::ANY,
    }
}

/// A service port's key in `MapContents::service_ids`: `namespace/name:port-name/PROTOCOL`.
#[must_use]
pub fn service_identity(port: &ServicePort) -> String {
    format!("{}/{}", port.display_name(), port.protocol)
}

impl MapContents {
    /// Builds the contents for `state`, keeping the ids `previous` gave to the same service
    /// ports and endpoints.
    #[expect(
        clippy::too_many_lines,
        reason = "one pass per service port (backends, tables, frontends) sharing its sets and ids"
    )]
    pub fn from_state(
        state: &DesiredState,
        node: &NodeConfig,
        previous: &MapContents,
    ) -> Result<Self, CapacityError> {
        maglev::check_table_size(node.maglev_table_size)?;
        let (snat_min, snat_max) = node.snat_ports;
        if snat_min > snat_max {
            return Err(CapacityError::SnatPorts(snat_min, snat_max));
        }
        let mut contents = MapContents {
            settings: Settings {
                maglev_table_size: node.maglev_table_size,
                hash_seed: node.maglev_seed,
                snat_addr_be: node.snat_addr.map_or(0, be),
                snat_port_min: snat_min,
                snat_port_max: snat_max,
            },
            ..MapContents::default()
        };
        // Ids only the frontends know (contents read back from pinned maps) are taken too.
        let mut service_ids = IdAllocator::new(
            previous
                .service_ids
                .values()
                .copied()
                .chain(previous.frontends.values().map(|f| f.service.service_id)),
        );
        let mut backend_ids = IdAllocator::new(previous.backend_ids.values().copied());

        for port in &state.service_ports {
            let identity = service_identity(port);
            let known = previous
                .service_ids
                .get(&identity)
                .copied()
                .or_else(|| previous.unnamed_service_id(port, &contents));
            let service_id = service_ids.reuse_or_allocate(known);
            contents.service_ids.insert(identity, service_id);
            contents
                .service_names
                .insert(service_id, port.display_name());
            if port.protocol == Protocol::Udp {
                contents.udp_services.insert(service_id);
            }

            let is_local = |e: &&Endpoint| e.node_name.as_deref() == Some(node.node_name.as_str());
            let cluster_set = serving(port.endpoints.iter());
            let local_set = serving(port.endpoints.iter().filter(is_local));
            let uses = |policy| {
                port.frontends.iter().any(|f| {
                    let frontend_policy = if f.kind == FrontendKind::ClusterIp {
                        port.internal_policy
                    } else {
                        port.external_policy
                    };
                    frontend_policy == policy
                })
            };
            // Pods reach a `Local` external address through every endpoint (below).
            let pods_use_cluster_set = port.external_policy == TrafficPolicy::Local
                && port
                    .frontends
                    .iter()
                    .any(|f| f.kind != FrontendKind::ClusterIp);
            let sets = [
                (
                    false,
                    uses(TrafficPolicy::Cluster) || pods_use_cluster_set,
                    &cluster_set,
                ),
                (true, uses(TrafficPolicy::Local), &local_set),
            ];

            // Backends: every endpoint some table of this port holds.
            let mut ids_of: BTreeMap<(Ipv4Addr, u16), u32> = BTreeMap::new();
            for &(local_table, used, set) in &sets {
                if !used {
                    continue;
                }
                for endpoint in set {
                    let key = (service_id, endpoint.addr, endpoint.port);
                    // An endpoint in both tables is one backend: the id this build already
                    // gave it (for the cluster table) comes before the previous build's.
                    let known = contents
                        .backend_ids
                        .get(&key)
                        .or(previous.backend_ids.get(&key));
                    let id = backend_ids.reuse_or_allocate(known.copied());
                    contents.backend_ids.insert(key, id);
                    ids_of.insert((endpoint.addr, endpoint.port), id);
                    let backend = contents.backends.entry(id).or_insert(Backend {
                        addr_be: be(endpoint.addr),
                        port_be: endpoint.port.to_be(),
                        flags: if is_local(endpoint) {
                            backend_flags::LOCAL
                        } else {
                            0
                        },
                        _pad: 0,
                        service_id,
                    });
                    backend.flags |= if local_table {
                        backend_flags::IN_LOCAL_TABLE
                    } else {
                        backend_flags::IN_CLUSTER_TABLE
                    };
                }
            }

            // Tables.
            for &(local, used, set) in &sets {
                if !used || set.is_empty() {
                    continue;
                }
                if u32::try_from(set.len()).map_or(true, |n| n > node.maglev_table_size) {
                    return Err(CapacityError::TableTooSmall {
                        service: port.display_name(),
                        count: set.len(),
                        size: node.maglev_table_size,
                    });
                }
                let key = TableKey { service_id, local };
                let set_ids: Vec<u32> = set.iter().map(|e| ids_of[&(e.addr, e.port)]).collect();
                let table = if let Some(table) =
                    previous.unchanged_table(key, &set_ids, &contents.settings)
                {
                    table.clone()
                } else {
                    maglev_table(set, &set_ids, node)?
                };
                contents.tables.insert(key, table);
            }

            // Frontends.
            let has_ranges = !port.source_ranges.is_empty();
            for cidr in &port.source_ranges {
                contents.source_ranges.insert((service_id, *cidr));
            }
            for frontend in &port.frontends {
                let (policy, guarded) = match frontend.kind {
                    FrontendKind::ClusterIp => (port.internal_policy, false),
                    FrontendKind::NodePort => {
                        (port.external_policy, node.source_ranges_on_node_ports)
                    }
                    FrontendKind::LoadBalancer | FrontendKind::ExternalIp => {
                        (port.external_policy, true)
                    }
                };
                let local = policy == TrafficPolicy::Local;
                let mut flags = 0;
                if local {
                    flags |= service_flags::LOCAL_ONLY;
                }
                if port.selection == Selection::Random {
                    flags |= service_flags::RANDOM;
                }
                if guarded && has_ranges {
                    flags |= service_flags::SOURCE_RANGES;
                }
                let key = frontend_key(port, *frontend);
                let entry = |local: bool, flags: u32| {
                    let set = if local { &local_set } else { &cluster_set };
                    let table_key = TableKey { service_id, local };
                    FrontendEntry {
                        service: Service {
                            service_id,
                            table: 0,
                            backend_count: u32::try_from(set.len()).unwrap_or(u32::MAX),
                            affinity_timeout_s: port.affinity_timeout_seconds.unwrap_or(0),
                            flags,
                        },
                        table_key: contents
                            .tables
                            .contains_key(&table_key)
                            .then_some(table_key),
                    }
                };
                // kube-proxy treats pods' traffic to a Service's external addresses as
                // internal: a `Local` policy keeps only outside clients on this node's
                // endpoints. Pods on this node look up the pod entry first.
                if local && frontend.kind != FrontendKind::ClusterIp {
                    let pod_entry = entry(false, flags & !service_flags::LOCAL_ONLY);
                    let pod_key = FrontendKey {
                        scope: frontend_scope::POD,
                        ..key
                    };
                    contents.frontends.insert(pod_key, pod_entry);
                    flags |= service_flags::POD_ENTRY;
                }
                let any_entry = entry(local, flags);
                contents.frontends.insert(key, any_entry);
            }
        }
        contents.check_capacity(node)?;
        Ok(contents)
    }

    /// The id `self` gave `port` when `self` was read back from the kernel (after a restart),
    /// where service port names are not kept: the id of the first of its frontends found,
    /// unless that id has a name in `self` (it belongs to another service port) or `building`
    /// already gave it away.
    fn unnamed_service_id(&self, port: &ServicePort, building: &MapContents) -> Option<u32> {
        port.frontends
            .iter()
            .filter_map(|f| self.frontends.get(&frontend_key(port, *f)))
            .map(|entry| entry.service.service_id)
            .find(|id| {
                !self.service_ids.values().any(|named| named == id)
                    && !building.service_ids.values().any(|given| given == id)
            })
    }

    fn check_capacity(&self, node: &NodeConfig) -> Result<(), CapacityError> {
        let exceeds = |count: usize, max: u32| u32::try_from(count).map_or(true, |c| c > max);
        if exceeds(self.tables.len(), node.max_tables) {
            return Err(CapacityError::TooManyTables {
                count: self.tables.len(),
                limit: node.max_tables,
            });
        }
        // Backend id 0 is never used.
        if exceeds(self.backends.len(), MAX_BACKENDS - 1)
            || self.backends.keys().any(|&id| id >= MAX_BACKENDS)
        {
            return Err(CapacityError::TooManyBackends {
                count: self.backends.len(),
                limit: MAX_BACKENDS - 1,
            });
        }
        if exceeds(self.frontends.len(), MAX_FRONTENDS) {
            return Err(CapacityError::TooManyFrontends {
                count: self.frontends.len(),
                limit: MAX_FRONTENDS,
            });
        }
        if exceeds(self.source_ranges.len(), SOURCE_RANGE_ENTRIES) {
            return Err(CapacityError::TooManySourceRanges {
                count: self.source_ranges.len(),
                limit: SOURCE_RANGE_ENTRIES,
            });
        }
        Ok(())
    }
}

/// The writes that turn one map contents into another, in the order the data plane must make
/// them so that a packet never follows a reference to something not yet written, nor to a
/// table being rewritten:
///
/// 1. settings, new or changed backends, new source ranges (nothing refers to them yet);
/// 2. frontends that went away are removed;
/// 3. frontends whose table is unchanged (or who have none) are written;
/// 4. each new or changed table is written into a free slot, then its frontends are switched
///    to it, and its old slot is retired;
/// 5. tables that went away are retired;
/// 6. after a grace period in which every packet that could still read a retired slot or a
///    removed backend has left the data path: retired slots are freed, removed backends and
///    source ranges cleared.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub settings: Option<Settings>,
    pub set_backends: Vec<(u32, Backend)>,
    pub add_source_ranges: Vec<(u32, Ipv4Cidr)>,
    pub remove_frontends: Vec<FrontendKey>,
    pub set_frontends: Vec<(FrontendKey, FrontendEntry)>,
    /// Tables to write, each with the frontends to switch to it right after.
    pub write_tables: Vec<(TableKey, Vec<(FrontendKey, FrontendEntry)>)>,
    pub drop_tables: Vec<TableKey>,
    pub clear_backends: Vec<u32>,
    pub remove_source_ranges: Vec<(u32, Ipv4Cidr)>,
    /// Endpoints (service id, backend) of UDP service ports that no longer take flows: like
    /// kube-proxy, their tracked flows are removed so the next datagram picks a live endpoint.
    pub stale_udp_backends: Vec<(u32, Backend)>,
}

impl Plan {
    #[must_use]
    pub fn is_empty(&self) -> bool {
        *self == Plan::default()
    }

    /// How many map writes the plan makes (a table counts once).
    #[must_use]
    pub fn writes(&self) -> usize {
        usize::from(self.settings.is_some())
            + self.set_backends.len()
            + self.add_source_ranges.len()
            + self.remove_frontends.len()
            + self.set_frontends.len()
            + self
                .write_tables
                .iter()
                .map(|(_, frontends)| 1 + frontends.len())
                .sum::<usize>()
            + self.drop_tables.len()
            + self.clear_backends.len()
            + self.remove_source_ranges.len()
    }
}

/// The keys of `old` that `new` lacks.
fn removed<K: Ord + Copy, V>(old: &BTreeMap<K, V>, new: &BTreeMap<K, V>) -> Vec<K> {
    old.keys()
        .filter(|k| !new.contains_key(k))
        .copied()
        .collect()
}

/// The plan that turns `old` into `new`.
#[must_use]
pub fn diff(old: &MapContents, new: &MapContents) -> Plan {
    let mut plan = Plan {
        settings: (old.settings != new.settings).then_some(new.settings),
        ..Plan::default()
    };
    for (&id, &backend) in &new.backends {
        if old.backends.get(&id) != Some(&backend) {
            plan.set_backends.push((id, backend));
        }
    }
    plan.add_source_ranges = new
        .source_ranges
        .difference(&old.source_ranges)
        .copied()
        .collect();
    plan.remove_frontends = removed(&old.frontends, &new.frontends);

    let mut switched: BTreeMap<TableKey, Vec<(FrontendKey, FrontendEntry)>> = new
        .tables
        .iter()
        .filter(|(key, table)| old.tables.get(key) != Some(table))
        .map(|(key, _)| (*key, Vec::new()))
        .collect();
    for (&key, &entry) in &new.frontends {
        match entry.table_key.and_then(|t| switched.get_mut(&t)) {
            // Rewritten with its table, even if the entry itself is unchanged: it will point
            // at the table's new slot.
            Some(frontends) => frontends.push((key, entry)),
            None if old.frontends.get(&key) != Some(&entry) => {
                plan.set_frontends.push((key, entry));
            }
            None => {}
        }
    }
    plan.write_tables = switched.into_iter().collect();
    plan.drop_tables = removed(&old.tables, &new.tables);
    plan.clear_backends = removed(&old.backends, &new.backends);
    plan.remove_source_ranges = old
        .source_ranges
        .difference(&new.source_ranges)
        .copied()
        .collect();
    plan.stale_udp_backends = plan
        .clear_backends
        .iter()
        .filter_map(|id| old.backends.get(id))
        .filter(|b| old.udp_services.contains(&b.service_id))
        .map(|b| (b.service_id, *b))
        .collect();
    plan
}

#[cfg(test)]
mod tests;
