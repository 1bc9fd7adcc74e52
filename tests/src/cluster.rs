//! The multi-node topology of the Service-semantics tests: dual-homed nodes, as on bare metal.
//!
//! ```text
//!                 lan ns: bridge br0 (no address), the client-facing segment; the node ports
//!                 are isolated, so nodes cannot reach each other's first address
//!            port "client"          port "node-1"               port "node-2"
//!                 |                      |                           |
//!  client ns      |       node-1 ns      |            node-2 ns      |
//!  eth0 172.30.0.2/24     eth0 172.30.0.11/24 (agent)  eth0 172.30.0.12/24 (agent)
//!       172.30.0.3/24     eth1 192.168.100.11/24       eth1 192.168.100.12/24
//!  198.51.100.0/24        cni0 10.244.1.1/24           cni0 10.244.2.1/24
//!    via .11 (or .12)     10.244.2.0/24 via            10.244.1.0/24 via
//!                           192.168.100.12 dev eth1      192.168.100.11 dev eth1
//!                         ip_forward=1                 ip_forward=1
//!                           vethpI -- pod eth0           vethpI -- pod eth0
//!                           10.244.1.(10+I)/24           10.244.2.(10+I)/24
//!                           default via 10.244.1.1       default via 10.244.2.1
//!                                |                           |
//!                 lan ns: bridge br1, the cluster segment: ports "cl-node-1", "cl-node-2"
//! ```
//!
//! Agents run as the `DaemonSet` runs them ([`DAEMONSET_ARGS`]): on both node interfaces, with
//! `--pod-iface`. Traffic to other nodes' pods leaves by eth1, so its SNAT source must be eth1's
//! address: the node's first address (`--node-ip`, eth0) is not reachable from other nodes.
//!
//! As in `netns`, nothing touches the root namespace: every veth is created with both ends in
//! their namespaces, and every namespace (and the scratch directory with the configs) is removed
//! by a guard, also when a test panics. The host-side pod interfaces are named `vethp*`, the
//! pattern the agent's `--pod-iface` is given; names are per namespace, so they repeat across
//! nodes as they do on real nodes.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{
    agent::Agent,
    netns::{Netns, Pod, Process, run},
    probe,
};

pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 2);
/// The client's second address, outside the source ranges tests allow.
pub const CLIENT_ALT_ADDR: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 3);
/// Load balancer and external IPs live here; the client routes it through one node.
pub const SERVICE_RANGE: &str = "198.51.100.0/24";
/// Every node's client-facing interface, with its first address.
pub const NODE_IFACE: &str = "eth0";
/// Every node's interface toward the other nodes.
pub const CLUSTER_IFACE: &str = "eth1";
/// `--pod-iface` pattern that matches the host side of every pod's veth.
pub const POD_IFACE_PATTERN: &str = "vethp*";
/// What every agent is started with besides `--iface eth0`, as `manifests/lb-agent.yaml` runs it:
/// every node interface and the pod interfaces.
pub const DAEMONSET_ARGS: [&str; 4] = ["--iface", CLUSTER_IFACE, "--pod-iface", POD_IFACE_PATTERN];

/// The client's address on the tagged link of `Cluster::add_vlan`.
pub const VLAN_CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(172, 31, 100, 2);

/// `node-N`: the Kubernetes node name, used as `nodeName` in `EndpointSlices`.
#[must_use]
pub fn node_name(node: u8) -> String {
    format!("node-{node}")
}

/// 172.30.0.(10+N)
#[must_use]
pub fn node_addr(node: u8) -> Ipv4Addr {
    Ipv4Addr::new(172, 30, 0, 10 + node)
}

/// 192.168.100.(10+N): node N's address on the cluster segment (eth1), the source of its SNAT
/// toward other nodes' pods.
#[must_use]
pub fn cluster_addr(node: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 100, 10 + node)
}

/// 172.31.100.(10+N): node N's address on the tagged link of `Cluster::add_vlan`.
#[must_use]
pub fn vlan_node_addr(node: u8) -> Ipv4Addr {
    Ipv4Addr::new(172, 31, 100, 10 + node)
}

/// 10.244.N.1: node N's address on its pod bridge, the pods' gateway.
#[must_use]
pub fn pod_gateway(node: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, node, 1)
}

/// 10.244.N.(10+I): pod I (0-based) on node N.
#[must_use]
pub fn pod_addr(node: u8, index: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, node, 10 + u8::try_from(index).unwrap_or(200))
}

/// How the client's frames to node 1 are tagged (`Cluster::add_vlan`).
#[derive(Clone, Copy, Debug)]
pub enum Tagging {
    /// One 802.1Q tag.
    Dot1Q { id: u16 },
    /// An 802.1ad outer tag and an 802.1Q inner tag (`QinQ`).
    QinQ { outer: u16, inner: u16 },
}

/// One node: its namespace, its pods, and what its pod links were given.
pub struct ClusterNode {
    pub number: u8,
    /// Pod i is attached through host-side interface `vethp{i}`.
    pub pods: Vec<Pod>,
    pub ns: Netns,
    pod_mtu: Option<u32>,
}

impl ClusterNode {
    #[must_use]
    pub fn name(&self) -> String {
        node_name(self.number)
    }

    #[must_use]
    pub fn addr(&self) -> Ipv4Addr {
        node_addr(self.number)
    }
}

/// Removes a directory tree on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A client, nodes with pods, and the L2 segment between them. Fields drop in order: the VLAN
/// taggers, nodes (their pods first), client, lan, then the scratch directory.
pub struct Cluster {
    taggers: Vec<Process>,
    pub nodes: Vec<ClusterNode>,
    pub client: Netns,
    pub lan: Netns,
    prefix: String,
    scratch: Scratch,
}

/// Spawns `command` with stdout piped and waits (bounded) for its first line to be `ready`.
fn start_reporting(command: &mut std::process::Command, ready: &str) -> anyhow::Result<Process> {
    command.stdout(std::process::Stdio::piped());
    let mut process = Process::spawn(command)?;
    let stdout = process.child_mut().stdout.take().context("stdout")?;
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line);
        let _ = sender.send(line);
    });
    match receiver.recv_timeout(Duration::from_secs(10)) {
        Ok(line) if line.trim() == ready => Ok(process),
        other => {
            let status = process.wait(Duration::from_secs(1)).ok();
            bail!("{command:?} did not report {ready:?}: {other:?}, exit {status:?}")
        }
    }
}

/// `ip link add A netns NS_A type veth peer name B netns NS_B`: both ends born in place.
fn veth(a_ns: &Netns, a_name: &str, b_ns: &Netns, b_name: &str) -> anyhow::Result<()> {
    run(std::process::Command::new("ip").args([
        "link",
        "add",
        a_name,
        "netns",
        a_ns.name(),
        "type",
        "veth",
        "peer",
        "name",
        b_name,
        "netns",
        b_ns.name(),
    ]))
    .map(drop)
}

impl Cluster {
    /// Builds the cluster under `prefix`: namespaces `{prefix}-lan`, `{prefix}-client`,
    /// `{prefix}-node-N`, `{prefix}-node-N-{pod}`. `pods[n]` names the pods of node n+1; pod names
    /// must be unique in the cluster (backends answer with them).
    pub fn create(prefix: &str, pods: &[&[&str]]) -> anyhow::Result<Self> {
        let node_count = u8::try_from(pods.len())
            .ok()
            .filter(|n| (1..=9).contains(n))
            .context("between 1 and 9 nodes")?;
        let dir = std::env::temp_dir().join(prefix);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let scratch = Scratch(dir);
        let lan = Netns::create(&format!("{prefix}-lan"))?;
        lan.ip(&["link", "add", "br0", "type", "bridge"])?;
        lan.ip(&["link", "set", "br0", "up"])?;
        lan.ip(&["link", "add", "br1", "type", "bridge"])?;
        lan.ip(&["link", "set", "br1", "up"])?;
        let client = Netns::create(&format!("{prefix}-client"))?;
        let mut cluster = Cluster {
            taggers: Vec::new(),
            nodes: Vec::new(),
            client,
            lan,
            prefix: prefix.to_owned(),
            scratch,
        };

        veth(&cluster.client, "eth0", &cluster.lan, "client")?;
        cluster.plug("client")?;
        let client = &cluster.client;
        client.ip(&["addr", "add", &format!("{CLIENT_ADDR}/24"), "dev", "eth0"])?;
        client.ip(&[
            "addr",
            "add",
            &format!("{CLIENT_ALT_ADDR}/24"),
            "dev",
            "eth0",
        ])?;
        client.ip(&["link", "set", "eth0", "up"])?;
        let via_node_1 = node_addr(1).to_string();
        client.ip(&["route", "add", SERVICE_RANGE, "via", &via_node_1])?;

        for number in 1..=node_count {
            let node = ClusterNode {
                number,
                pods: Vec::new(),
                ns: Netns::create(&format!("{prefix}-{}", node_name(number)))?,
                pod_mtu: None,
            };
            let port = node_name(number);
            let cluster_port = format!("cl-{port}");
            veth(&node.ns, NODE_IFACE, &cluster.lan, &port)?;
            cluster.nodes.push(node);
            cluster.plug(&port)?;
            // The client reaches every node, nodes do not reach each other on this segment.
            cluster.lan.ip(&[
                "link",
                "set",
                &port,
                "type",
                "bridge_slave",
                "isolated",
                "on",
            ])?;
            let ns = &cluster.nodes[usize::from(number - 1)].ns;
            veth(ns, CLUSTER_IFACE, &cluster.lan, &cluster_port)?;
            cluster
                .lan
                .ip(&["link", "set", &cluster_port, "master", "br1", "up"])?;
            for (iface, addr) in [
                (NODE_IFACE, node_addr(number)),
                (CLUSTER_IFACE, cluster_addr(number)),
            ] {
                ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", iface])?;
                ns.ip(&["link", "set", iface, "up"])?;
            }
            ns.ip(&["link", "add", "cni0", "type", "bridge"])?;
            let gateway = format!("{}/24", pod_gateway(number));
            ns.ip(&["addr", "add", &gateway, "dev", "cni0"])?;
            ns.ip(&["link", "set", "cni0", "up"])?;
            ns.sysctl("net.ipv4.ip_forward=1")?;
            for other in (1..=node_count).filter(|&o| o != number) {
                let pod_cidr = format!("10.244.{other}.0/24");
                ns.ip(&[
                    "route",
                    "add",
                    &pod_cidr,
                    "via",
                    &cluster_addr(other).to_string(),
                    "dev",
                    CLUSTER_IFACE,
                ])?;
            }
        }
        for (index, names) in pods.iter().enumerate() {
            let number = u8::try_from(index + 1).context("node number")?;
            for name in *names {
                cluster.add_pod(number, name)?;
            }
        }
        Ok(cluster)
    }

    /// Attaches the lan-side end `port` to the bridge.
    fn plug(&self, port: &str) -> anyhow::Result<()> {
        self.lan.ip(&["link", "set", port, "master", "br0", "up"])
    }

    /// Node `number` (1-based).
    #[must_use]
    pub fn node(&self, number: u8) -> &ClusterNode {
        &self.nodes[usize::from(number - 1)]
    }

    /// The pod named `name`, on whichever node.
    #[must_use]
    pub fn pod(&self, name: &str) -> Option<&Pod> {
        self.nodes
            .iter()
            .flat_map(|n| &n.pods)
            .find(|p| p.name == name)
    }

    /// The number of the node pod `name` runs on.
    #[must_use]
    pub fn node_of(&self, name: &str) -> Option<u8> {
        self.nodes
            .iter()
            .find(|n| n.pods.iter().any(|p| p.name == name))
            .map(|n| n.number)
    }

    /// Adds a pod to node `number` (also after agents started: the hotplug case) and returns it.
    pub fn add_pod(&mut self, number: u8, name: &str) -> anyhow::Result<&Pod> {
        if self.pod(name).is_some() {
            bail!("a pod named {name} exists already");
        }
        let prefix = self.prefix.clone();
        let node = &mut self.nodes[usize::from(number - 1)];
        let index = node.pods.len();
        let pod = Pod {
            name: name.to_owned(),
            addr: pod_addr(number, index),
            ns: Netns::create(&format!("{prefix}-{}-{name}", node_name(number)))?,
        };
        let host_side = format!("vethp{index}");
        veth(&pod.ns, "eth0", &node.ns, &host_side)?;
        // Keep the guard before anything else can fail, so the namespace goes with the cluster.
        node.pods.push(pod);
        let (node_ns, pod) = (&node.ns, &node.pods[index]);
        if let Some(mtu) = node.pod_mtu {
            let mtu = mtu.to_string();
            node_ns.ip(&["link", "set", &host_side, "mtu", &mtu])?;
            pod.ns.ip(&["link", "set", "eth0", "mtu", &mtu])?;
        }
        node_ns.ip(&["link", "set", &host_side, "master", "cni0", "up"])?;
        pod.ns
            .ip(&["addr", "add", &format!("{}/24", pod.addr), "dev", "eth0"])?;
        pod.ns.ip(&["link", "set", "eth0", "up"])?;
        let gateway = pod_gateway(number).to_string();
        pod.ns.ip(&["route", "add", "default", "via", &gateway])?;
        Ok(pod)
    }

    /// Sets the MTU of node `number`'s pod links: cni0 and both ends of every pod veth (also of
    /// pods added later), as a CNI with an overlay would.
    pub fn set_pod_mtu(&mut self, number: u8, mtu: u32) -> anyhow::Result<()> {
        let node = &mut self.nodes[usize::from(number - 1)];
        node.pod_mtu = Some(mtu);
        let mtu = mtu.to_string();
        for (index, pod) in node.pods.iter().enumerate() {
            node.ns
                .ip(&["link", "set", &format!("vethp{index}"), "mtu", &mtu])?;
            pod.ns.ip(&["link", "set", "eth0", "mtu", &mtu])?;
        }
        node.ns.ip(&["link", "set", "cni0", "mtu", &mtu])
    }

    /// Routes the client's traffic to `SERVICE_RANGE` through node `number`.
    pub fn route_services_via(&self, number: u8) -> anyhow::Result<()> {
        let via = node_addr(number).to_string();
        self.client
            .ip(&["route", "replace", SERVICE_RANGE, "via", &via])
    }

    /// Makes the link between the client and node `number` a tagged one: every frame either
    /// sends carries `tagging`'s tags in its data, and each strips them on receipt (after XDP,
    /// which sees them). Adds `VLAN_CLIENT_ADDR` and `vlan_node_addr(number)` (172.31.100.0/24)
    /// to their eth0 and routes `SERVICE_RANGE` over them.
    ///
    /// This kernel has no 802.1Q support (no `CONFIG_VLAN_8021Q`, no TC vlan action), so VLAN
    /// devices cannot be created: `lb-probe vlan` stands in for them with two small TC programs
    /// per end (see there). Every frame of the client and of that node is tagged, so node-2,
    /// which does not pop tags, no longer hears them. VLAN offload is off on every veth end on
    /// the way, so the tags travel in the frame data as on a NIC without VLAN offload.
    pub fn add_vlan(
        &mut self,
        number: u8,
        tagging: Tagging,
        probe_bin: &Path,
    ) -> anyhow::Result<()> {
        let port = node_name(number);
        for (ns, iface) in [
            (&self.client, "eth0"),
            (&self.lan, "client"),
            (&self.lan, port.as_str()),
            (&self.node(number).ns, NODE_IFACE),
        ] {
            run(ns.command("ethtool").args([
                "-K",
                iface,
                "txvlan",
                "off",
                "rxvlan",
                "off",
                "tx-vlan-stag-hw-insert",
                "off",
                "rx-vlan-stag-hw-parse",
                "off",
            ]))?;
        }
        let tags: Vec<String> = match tagging {
            Tagging::Dot1Q { id } => vec![format!("802.1Q:{id}")],
            Tagging::QinQ { outer, inner } => {
                vec![format!("802.1Q:{inner}"), format!("802.1ad:{outer}")]
            }
        };
        let node_ns = &self.nodes[usize::from(number - 1)].ns;
        for ns in [&self.client, node_ns] {
            let mut command = ns.command(&probe_bin.to_string_lossy());
            command.args(["vlan", "--iface", "eth0"]);
            for tag in &tags {
                command.args(["--tag", tag]);
            }
            let tagger = start_reporting(&mut command, "tagging")
                .with_context(|| format!("tagging eth0 in {}", ns.name()))?;
            self.taggers.push(tagger);
        }
        let client_cidr = format!("{VLAN_CLIENT_ADDR}/24");
        self.client
            .ip(&["addr", "add", &client_cidr, "dev", "eth0"])?;
        let node_cidr = format!("{}/24", vlan_node_addr(number));
        self.node(number)
            .ns
            .ip(&["addr", "add", &node_cidr, "dev", NODE_IFACE])?;
        let via = vlan_node_addr(number).to_string();
        self.client
            .ip(&["route", "replace", SERVICE_RANGE, "via", &via])
    }

    /// This cluster's scratch directory (removed with the cluster).
    #[must_use]
    pub fn scratch(&self) -> &Path {
        &self.scratch.0
    }

    /// Writes `yaml` as the agents' config file (replacing it whole, so an agent re-reading it
    /// on SIGHUP never sees half of it) and returns its path.
    pub fn write_config(&self, yaml: &str) -> anyhow::Result<PathBuf> {
        let path = self.scratch().join("services.yaml");
        let partial = self.scratch().join("services.yaml.new");
        std::fs::write(&partial, yaml).with_context(|| format!("writing {}", partial.display()))?;
        std::fs::rename(&partial, &path)
            .with_context(|| format!("renaming to {}", path.display()))?;
        Ok(path)
    }

    /// Starts `lb-agent run --config CONFIG --iface eth0 DAEMONSET_ARGS... --node-name node-N
    /// --node-ip NODE_IP EXTRA...` in node `number` and waits until it serves.
    pub fn start_agent(
        &self,
        number: u8,
        agent_bin: &Path,
        config: &Path,
        node_ip: Ipv4Addr,
        extra_args: &[&str],
    ) -> anyhow::Result<Agent> {
        let name = node_name(number);
        let node_ip = node_ip.to_string();
        let mut args = DAEMONSET_ARGS.to_vec();
        args.extend(["--node-name", &name, "--node-ip", &node_ip]);
        args.extend_from_slice(extra_args);
        Agent::start(
            &self.node(number).ns,
            agent_bin,
            config,
            NODE_IFACE,
            &args,
            Duration::from_secs(30),
        )
        .with_context(|| format!("starting lb-agent on {name}"))
    }

    /// Starts an `lb-probe serve` backend (HTTP 8080, UDP 5353) in every pod of every node.
    pub fn start_backends(&self, probe_bin: &Path) -> anyhow::Result<Vec<Process>> {
        self.nodes
            .iter()
            .flat_map(|n| &n.pods)
            .map(|pod| probe::start_backend(pod, probe_bin))
            .collect()
    }
}
