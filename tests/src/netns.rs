//! Network namespaces that delete themselves, and the test topology built from them.
//!
//! ```text
//!  client ns                 node ns                                pod ns (one per pod)
//!  eth0 172.30.0.2/24 ---- eth0 172.30.0.1/24   (XDP + TC here)
//!  default via .1            cni0 10.244.1.1/24 (bridge) ---- vethN ---- eth0 10.244.1.1N/24
//!                            ip_forward=1                              default via 10.244.1.1
//!                            eth1 192.168.100.1/24 (XDP + TC here)
//!                              |
//!                          peer ns: eth0 192.168.100.2/24, where other nodes would be
//! ```
//!
//! The agent runs as the `DaemonSet` runs it ([`DAEMONSET_ARGS`]): on both node interfaces, with
//! `--pod-iface` on the pods' host-side interfaces.
//!
//! Nothing is created in the root namespace: each veth pair is created with both ends already
//! inside their namespaces, and every namespace (with every process still in it) is removed when
//! its guard drops, also when a test panics.

use std::{
    net::Ipv4Addr,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 2);
pub const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 1);
/// The node-side interface the agent attaches to, inside the node namespace.
pub const NODE_IFACE: &str = "eth0";
/// The node's second interface, toward the peer namespace where other nodes would be.
pub const CLUSTER_IFACE: &str = "eth1";
pub const CLUSTER_ADDR: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 1);
pub const PEER_ADDR: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 2);
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
/// `--pod-iface` as `manifests/lb-agent.yaml` sets it; the pods' host sides are `vethN`.
pub const POD_IFACE_PATTERN: &str = "veth*";
/// What the agent is started with besides `--iface eth0`, as the `DaemonSet` runs it.
pub const DAEMONSET_ARGS: [&str; 4] = ["--iface", CLUSTER_IFACE, "--pod-iface", POD_IFACE_PATTERN];

/// The address of pod `index` (0-based).
#[must_use]
pub fn pod_addr(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 1, 10 + u8::try_from(index).unwrap_or(200))
}

/// Runs a command to completion; an error names the command and carries its stderr.
pub fn run(command: &mut Command) -> anyhow::Result<Output> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("ip").args(args)).map(drop)
}

/// A named network namespace, deleted with every process in it on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn create(name: &str) -> anyhow::Result<Self> {
        ip(&["netns", "add", name])?;
        let ns = Netns {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME ARGS...`
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// A command that runs `program` inside this namespace.
    #[must_use]
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }

    /// A command that runs `program` in this network namespace with the caller's mounts.
    ///
    /// `ip netns exec` gives the program a mount namespace of its own with a fresh `/sys`, so
    /// whatever it pins on `/sys/fs/bpf` is gone when it exits. `nsenter --net` changes only
    /// the network namespace, so pins land on the host's bpffs and outlive the program. It
    /// execs the program without forking (no `--fork`, no PID namespace), so the child's pid
    /// is the program's own and a signal to it reaches the program.
    #[must_use]
    pub fn command_with_host_mounts(&self, program: &str) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{}", self.name))
            .args(["--", program]);
        command
    }

    pub fn sysctl(&self, setting: &str) -> anyhow::Result<()> {
        run(self.command("sysctl").args(["-qw", setting])).map(drop)
    }

    /// Deletes every namespace whose name starts with `prefix`: what a killed run left behind.
    pub fn remove_stale(prefix: &str) {
        let Ok(output) = Command::new("ip").args(["netns", "list"]).output() else {
            return;
        };
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            if let Some(name) = line.split_whitespace().next()
                && name.starts_with(prefix)
            {
                drop(Netns {
                    name: name.to_owned(),
                });
            }
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // A namespace lives as long as a process is in it: kill those first.
        if let Ok(output) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&output.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                }
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// A child process killed on drop.
pub struct Process {
    child: Child,
}

impl Process {
    pub fn spawn(command: &mut Command) -> anyhow::Result<Self> {
        let child = command
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {command:?}"))?;
        Ok(Process { child })
    }

    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// The process id of the child (the program itself when it was exec'd without a fork).
    #[must_use]
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGKILL and reaps the process: no handler runs, nothing is cleaned up.
    pub fn kill9(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        self.child
            .kill()
            .with_context(|| format!("sending SIGKILL to process {}", self.child.id()))?;
        self.child
            .wait()
            .with_context(|| format!("reaping process {}", self.child.id()))
    }

    /// Sends `signal` (a name `kill` knows, like `HUP`).
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let pid = self.child.id().to_string();
        run(Command::new("kill").args([&format!("-{signal}"), &pid])).map(drop)
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "process {} did not exit within {timeout:?}",
                    self.child.id()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM and waits up to `timeout` for a clean exit.
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        self.signal("TERM")?;
        self.wait(timeout)
            .context("the process did not stop after SIGTERM")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Pod {
    pub name: String,
    pub addr: Ipv4Addr,
    pub ns: Netns,
}

/// A client, one node with a second interface to a peer, and pods behind the node's bridge.
/// Fields drop in order: pods, node, peer, client, so every namespace goes even if building a
/// later one failed.
pub struct Topology {
    pub pods: Vec<Pod>,
    pub node: Netns,
    pub peer: Netns,
    pub client: Netns,
}

impl Topology {
    /// Builds the topology with namespaces named `{prefix}-client`, `{prefix}-peer`,
    /// `{prefix}-node`, `{prefix}-{pod name}`.
    pub fn create(prefix: &str, pod_names: &[&str]) -> anyhow::Result<Self> {
        let client = Netns::create(&format!("{prefix}-client"))?;
        let peer = Netns::create(&format!("{prefix}-peer"))?;
        let node = Netns::create(&format!("{prefix}-node"))?;
        let mut topology = Topology {
            pods: Vec::new(),
            node,
            peer,
            client,
        };
        let node_cidr = format!("{NODE_ADDR}/24");
        let client_cidr = format!("{CLIENT_ADDR}/24");
        let gateway = POD_GATEWAY.to_string();
        let node_ip = NODE_ADDR.to_string();

        ip(&[
            "link",
            "add",
            "eth0",
            "netns",
            topology.client.name(),
            "type",
            "veth",
            "peer",
            "name",
            NODE_IFACE,
            "netns",
            topology.node.name(),
        ])?;
        let client = &topology.client;
        client.ip(&["addr", "add", &client_cidr, "dev", "eth0"])?;
        client.ip(&["link", "set", "eth0", "up"])?;
        client.ip(&["route", "add", "default", "via", &node_ip])?;

        let node = &topology.node;
        node.ip(&["addr", "add", &node_cidr, "dev", NODE_IFACE])?;
        node.ip(&["link", "set", NODE_IFACE, "up"])?;
        node.ip(&["link", "add", "cni0", "type", "bridge"])?;
        node.ip(&["addr", "add", &format!("{gateway}/24"), "dev", "cni0"])?;
        node.ip(&["link", "set", "cni0", "up"])?;
        node.sysctl("net.ipv4.ip_forward=1")?;

        ip(&[
            "link",
            "add",
            "eth0",
            "netns",
            topology.peer.name(),
            "type",
            "veth",
            "peer",
            "name",
            CLUSTER_IFACE,
            "netns",
            topology.node.name(),
        ])?;
        node.ip(&[
            "addr",
            "add",
            &format!("{CLUSTER_ADDR}/24"),
            "dev",
            CLUSTER_IFACE,
        ])?;
        node.ip(&["link", "set", CLUSTER_IFACE, "up"])?;
        let peer = &topology.peer;
        peer.ip(&["addr", "add", &format!("{PEER_ADDR}/24"), "dev", "eth0"])?;
        peer.ip(&["link", "set", "eth0", "up"])?;

        for (index, name) in pod_names.iter().enumerate() {
            let pod = Pod {
                name: (*name).to_owned(),
                addr: pod_addr(index),
                ns: Netns::create(&format!("{prefix}-{name}"))?,
            };
            let host_side = format!("veth{index}");
            ip(&[
                "link",
                "add",
                "eth0",
                "netns",
                pod.ns.name(),
                "type",
                "veth",
                "peer",
                "name",
                &host_side,
                "netns",
                topology.node.name(),
            ])?;
            topology
                .node
                .ip(&["link", "set", &host_side, "master", "cni0", "up"])?;
            pod.ns
                .ip(&["addr", "add", &format!("{}/24", pod.addr), "dev", "eth0"])?;
            pod.ns.ip(&["link", "set", "eth0", "up"])?;
            pod.ns.ip(&["route", "add", "default", "via", &gateway])?;
            topology.pods.push(pod);
        }
        Ok(topology)
    }

    /// Turns checksum offload off on every veth, so that each sender computes full checksums and
    /// each receiver verifies them. With offload on, veth passes packets with partial checksums
    /// that receivers trust without checking, which would hide a wrong rewrite.
    pub fn verify_checksums_at_every_hop(&self) -> anyhow::Result<()> {
        let mut ends: Vec<(&Netns, String)> = vec![
            (&self.client, "eth0".to_owned()),
            (&self.node, NODE_IFACE.to_owned()),
        ];
        for (index, pod) in self.pods.iter().enumerate() {
            ends.push((&pod.ns, "eth0".to_owned()));
            ends.push((&self.node, format!("veth{index}")));
        }
        for (ns, iface) in ends {
            run(ns
                .command("ethtool")
                .args(["-K", &iface, "tx", "off", "rx", "off"]))?;
        }
        Ok(())
    }
}

/// A namespace prefix unique to this process and call: `lbt<pid>-<n>`.
#[must_use]
pub fn unique_prefix() -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    format!(
        "lbt{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}
