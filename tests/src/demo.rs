//! The demo of `manifests/examples/demo.yaml`: its frontends, its pods, and starting it all in a
//! topology. Shared by `cargo xtask demo` and the traffic tests, so both run the same thing and
//! the addresses here stay in one place next to the file that declares them.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{
    agent::Agent,
    netns::{DAEMONSET_ARGS, NODE_ADDR, NODE_IFACE, Process, Topology},
    probe::{self, Batch},
};

/// The config, relative to the workspace root.
pub const CONFIG: &str = "manifests/examples/demo.yaml";
/// The node's name: the `nodeName` of the demo's endpoints, so they are served as local.
pub const NODE_NAME: &str = "demo-node";
/// The pods behind both Services, in address order (10.244.1.10, .11, .12).
pub const PODS: [&str; 3] = ["web-0", "web-1", "web-2"];
/// `demo/web`'s `status.loadBalancer.ingress[0].ip`.
pub const LOAD_BALANCER_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
/// `demo/echo`'s `spec.externalIPs[0]`.
pub const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 53);

/// `demo/web` (TCP) through its nodePort.
#[must_use]
pub fn http_node_port() -> SocketAddr {
    SocketAddr::from((NODE_ADDR, 30080))
}

/// `demo/web` (TCP) through its load balancer IP.
#[must_use]
pub fn http_load_balancer() -> SocketAddr {
    SocketAddr::from((LOAD_BALANCER_IP, 80))
}

/// `demo/echo` (UDP) through its nodePort.
#[must_use]
pub fn udp_node_port() -> SocketAddr {
    SocketAddr::from((NODE_ADDR, 30053))
}

/// `demo/echo` (UDP) through its externalIP.
#[must_use]
pub fn udp_external_ip() -> SocketAddr {
    SocketAddr::from((EXTERNAL_IP, 53))
}

/// A running demo. Field order is drop order: the agent first (it detaches), then the backend
/// servers, then the namespaces.
pub struct Demo {
    pub agent: Option<Agent>,
    _servers: Vec<Process>,
    pub topology: Topology,
    probe_bin: PathBuf,
}

impl Demo {
    /// Builds the topology under `prefix`, runs `adjust` on it, starts a backend in every pod
    /// and `lb-agent run` with the demo config on the node, and waits until it serves.
    pub fn start(
        prefix: &str,
        workspace: &Path,
        agent_bin: &Path,
        probe_bin: &Path,
        adjust: impl FnOnce(&Topology) -> anyhow::Result<()>,
    ) -> anyhow::Result<Self> {
        let topology = Topology::create(prefix, &PODS)?;
        adjust(&topology)?;
        let servers = probe::start_backends(&topology, probe_bin)?;
        let agent = Agent::start(
            &topology.node,
            agent_bin,
            &workspace.join(CONFIG),
            NODE_IFACE,
            &[DAEMONSET_ARGS.as_slice(), &["--node-name", NODE_NAME]].concat(),
            Duration::from_secs(30),
        )?;
        Ok(Demo {
            agent: Some(agent),
            _servers: servers,
            topology,
            probe_bin: probe_bin.to_owned(),
        })
    }

    /// `count` requests (`http` or `udp`) from the client namespace to `target`.
    pub fn requests(&self, kind: &str, target: SocketAddr, count: u32) -> anyhow::Result<Batch> {
        probe::requests(&self.topology.client, &self.probe_bin, kind, target, count)
    }

    /// What the agent logged so far (empty once it was stopped).
    #[must_use]
    pub fn agent_log(&self) -> String {
        self.agent.as_ref().map(Agent::log).unwrap_or_default()
    }
}
