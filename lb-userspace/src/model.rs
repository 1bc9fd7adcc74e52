//! The desired state: what the data path should serve, whichever source it came from.

use std::{fmt, net::Ipv4Addr};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl Protocol {
    #[must_use]
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::IPPROTO_TCP,
            Protocol::Udp => lb_common::IPPROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

/// How a client reaches a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FrontendKind {
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalIp,
}

impl fmt::Display for FrontendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FrontendKind::ClusterIp => "clusterIP",
            FrontendKind::NodePort => "nodePort",
            FrontendKind::LoadBalancer => "loadBalancer",
            FrontendKind::ExternalIp => "externalIP",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub kind: FrontendKind,
    pub addr: Ipv4Addr,
    pub port: u16,
}

/// An endpoint's conditions as kube-proxy reads them. Endpoints that are not serving at all are
/// never part of the desired state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum EndpointState {
    /// `ready` (an unset `ready` reads as true): takes new flows.
    #[default]
    Ready,
    /// `serving` and `terminating` but not `ready`: takes new flows only while no endpoint of
    /// the same set (all, or this node's) is ready.
    Terminating,
}

/// A serving endpoint of a service port: where its traffic is translated to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    pub addr: Ipv4Addr,
    pub port: u16,
    /// The pod behind the address, when the `EndpointSlice` names it (for logs only).
    pub pod: Option<String>,
    /// The endpoint's `nodeName`; node-local policies and SNAT compare it with this node's name.
    pub node_name: Option<String>,
    pub state: EndpointState,
}

/// `externalTrafficPolicy` / `internalTrafficPolicy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum TrafficPolicy {
    /// Any endpoint on any node.
    #[default]
    Cluster,
    /// Only endpoints on this node; none means the traffic is dropped.
    Local,
}

/// How a new flow picks its backend (annotation `lb-agent/backend-selection`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Selection {
    /// Maglev consistent hashing of the 5-tuple: every node picks the same backend.
    #[default]
    Maglev,
    /// A random backend per new flow.
    Random,
}

/// An IPv4 CIDR block, as in `loadBalancerSourceRanges`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv4Cidr {
    /// The network address (host bits are zero).
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

impl Ipv4Cidr {
    #[must_use]
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.prefix_len))
            .unwrap_or(0);
        u32::from(addr) & mask == u32::from(self.addr) & mask
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// One port of one Service, with every address it answers on and its ready endpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServicePort {
    /// `namespace/name`.
    pub service: String,
    /// The port's name; empty for a Service's single unnamed port.
    pub port_name: String,
    pub protocol: Protocol,
    pub frontends: Vec<Frontend>,
    /// Sorted and without duplicates, so the same input always gives the same maps.
    pub endpoints: Vec<Endpoint>,
    /// Which endpoints serve the nodePort, loadBalancer and externalIP frontends.
    pub external_policy: TrafficPolicy,
    /// Which endpoints serve the clusterIP frontend.
    pub internal_policy: TrafficPolicy,
    /// `sessionAffinity: ClientIP`: seconds a client stays with its backend (`None`: no affinity).
    pub affinity_timeout_seconds: Option<u32>,
    /// `loadBalancerSourceRanges`; empty means every source is allowed.
    pub source_ranges: Vec<Ipv4Cidr>,
    pub selection: Selection,
    /// The nodePort (written or assigned); `None` on a Service without node ports.
    pub node_port: Option<u16>,
    /// True when the nodePort was omitted and lb-agent assigned it.
    pub node_port_assigned: bool,
    /// The Service's `healthCheckNodePort` (written or assigned), the same on each of its
    /// ports: `type: LoadBalancer` with `externalTrafficPolicy: Local` only.
    pub health_check_node_port: Option<u16>,
    /// Where a `type: LoadBalancer` Service's address came from when lb-agent allocated it
    /// from `loadBalancerIPPools` (files as the source); `None` otherwise.
    pub load_balancer_allocation: Option<AddressAllocation>,
}

/// The outcome of allocating a load balancer address from the pools.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AddressAllocation {
    /// Allocated from this pool.
    Pool(String),
    /// None could be given, for this reason.
    Pending(String),
}

impl fmt::Display for AddressAllocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddressAllocation::Pool(pool) => write!(f, "allocated from pool {pool}"),
            AddressAllocation::Pending(why) => write!(f, "pending: {why}"),
        }
    }
}

impl ServicePort {
    /// `namespace/name:port-name` (or `namespace/name` for an unnamed port).
    #[must_use]
    pub fn display_name(&self) -> String {
        if self.port_name.is_empty() {
            self.service.clone()
        } else {
            format!("{}:{}", self.service, self.port_name)
        }
    }
}

/// Everything the data path should serve, sorted by service and port name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub service_ports: Vec<ServicePort>,
}
