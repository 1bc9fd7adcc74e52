//! The desired state: what the data path should serve, whichever source it came from.

use std::{fmt, net::Ipv4Addr};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
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

/// A ready endpoint of a service port: where its traffic is translated to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    pub addr: Ipv4Addr,
    pub port: u16,
    /// The pod behind the address, when the `EndpointSlice` names it (for logs only).
    pub pod: Option<String>,
}

/// One port of one Service, with every address it answers on and its ready endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// `namespace/name`.
    pub service: String,
    /// The port's name; empty for a Service's single unnamed port.
    pub port_name: String,
    pub protocol: Protocol,
    pub frontends: Vec<Frontend>,
    /// Sorted and without duplicates, so the same input always gives the same maps.
    pub endpoints: Vec<Endpoint>,
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
