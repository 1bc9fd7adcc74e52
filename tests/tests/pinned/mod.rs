//! What the tests that pin under the host's bpffs share (`mod pinned;` in each): a pin directory
//! of the test's own, removed even when the test fails, the small data plane they load, and an
//! agent on a cluster node that pins there. Lives here, not in the `integration_tests` library,
//! because it uses `lb-userspace`, which that library must not depend on.

#![allow(dead_code)] // each test file uses a part

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::maps::{Map, MapData};
use integration_tests::{
    agent::{Agent, agent_bin},
    cluster::{Cluster, DAEMONSET_ARGS, NODE_IFACE, node_addr},
    netns::unique_prefix,
};
use lb_userspace::{
    dataplane::{DataPlane, LoadOptions},
    maps::NodeConfig,
    model::{Endpoint, EndpointState, Frontend, FrontendKind, Protocol, ServicePort},
    pins::PinDir,
};

pub const MAGLEV_SIZE: u32 = 31;
pub const MAX_TABLES: u32 = 8;
pub const NODE: &str = "node-a";

/// A pin directory of its own under /sys/fs/bpf, unpinned and removed when the test ends (also
/// on failure): the links pinned under it (which detaches them), the maps, then the directory.
pub struct Pins(pub PathBuf);

impl Pins {
    pub fn new() -> Self {
        Pins(Path::new("/sys/fs/bpf").join(unique_prefix()))
    }

    /// The small data plane of these tests, pinned here.
    pub fn options(&self) -> LoadOptions {
        LoadOptions {
            max_tables: MAX_TABLES,
            maglev_table_size: MAGLEV_SIZE,
            conntrack_entries: 1024,
            pin_dir: Some(self.0.clone()),
            ..LoadOptions::default()
        }
    }

    pub fn load(&self) -> DataPlane {
        DataPlane::load(self.options())
            .unwrap_or_else(|e| panic!("loading with pins in {}: {e}", self.0.display()))
    }

    /// A pinned map opened from outside the data plane, as another process would.
    pub fn map(&self, name: &str) -> Map {
        let path = self.0.join("maps").join(name);
        let data =
            MapData::from_pin(&path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
        Map::from_map_data(data).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    /// The `--pin-dir` argument.
    pub fn arg(&self) -> &str {
        self.0.to_str().expect("a UTF-8 pin path")
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        // What `lb-agent cleanup` does (links first, then maps), then whatever else is left.
        let _ = PinDir::existing(&self.0).remove_all();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The node of the data-plane-only tests, sized like [`Pins::options`].
pub fn node() -> NodeConfig {
    NodeConfig {
        node_name: NODE.to_owned(),
        maglev_table_size: MAGLEV_SIZE,
        maglev_seed: 3,
        max_tables: MAX_TABLES,
        snat_addr: Some(Ipv4Addr::new(192, 168, 7, 1)),
        ..NodeConfig::default()
    }
}

/// Starts an agent on node 1 of `cluster` as the `DaemonSet` runs it, pinning under `pins`
/// (`Agent::start` gives it the host's mounts).
pub fn start_pinned_agent(cluster: &Cluster, config: &Path, pins: &Pins) -> Agent {
    Agent::start(
        &cluster.node(1).ns,
        &agent_bin(),
        config,
        NODE_IFACE,
        &[
            DAEMONSET_ARGS.as_slice(),
            &[
                "--node-name",
                "node-1",
                "--node-ip",
                &node_addr(1).to_string(),
                "--pin-dir",
                pins.arg(),
            ],
        ]
        .concat(),
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("{e:#}"))
}

/// A ready endpoint 10.244.1.`last`:8080 on `node`.
pub fn endpoint(last: u8, node: &str) -> Endpoint {
    Endpoint {
        addr: Ipv4Addr::new(10, 244, 1, last),
        port: 8080,
        pod: None,
        node_name: Some(node.to_owned()),
        state: EndpointState::Ready,
    }
}

/// `default/name` on `10.96.0.n:80` (`clusterIP`) and `198.51.100.n:80` (`LoadBalancer`).
pub fn port(name: &str, n: u8, protocol: Protocol, endpoints: Vec<Endpoint>) -> ServicePort {
    ServicePort {
        service: format!("default/{name}"),
        protocol,
        frontends: vec![
            Frontend {
                kind: FrontendKind::ClusterIp,
                addr: Ipv4Addr::new(10, 96, 0, n),
                port: 80,
            },
            Frontend {
                kind: FrontendKind::LoadBalancer,
                addr: Ipv4Addr::new(198, 51, 100, n),
                port: 80,
            },
        ],
        endpoints,
        ..ServicePort::default()
    }
}
