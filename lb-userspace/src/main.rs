//! `lb-agent`: fills the data path's maps from Kubernetes Service and `EndpointSlice` manifests and
//! attaches it to the node's interfaces.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use lb_userspace::{
    config::{self, AgentSettings, ConfigError},
    dataplane::{DataPlane, LoadOptions, XdpModeChoice},
    maps::{MapContents, NodeConfig},
    model::{DesiredState, FrontendKind},
    netif,
    pins::PinDir,
    podif::{self, IfacePattern, LinkEvents},
};

/// The line `run` logs once every interface is attached; tests and the demo wait for it.
const READY_LINE: &str = "lb-agent is serving";

#[derive(Parser)]
#[command(
    name = "lb-agent",
    version,
    about = "eBPF/XDP load balancer for Kubernetes Services"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the data path, fill it from the config, attach to the interfaces, serve until
    /// SIGINT or SIGTERM, then detach.
    Run(RunArgs),
    /// Detach and unpin everything an agent pinned under --pin-dir (tracked connections are
    /// dropped with the maps). Nothing there is not an error.
    Cleanup {
        /// The --pin-dir the agent ran with.
        #[arg(long)]
        pin_dir: PathBuf,
    },
    /// Check a config file or directory without touching the kernel; exits 2 if it has
    /// problems. Prints every service port, with the node ports lb-agent assigned.
    Validate {
        /// A YAML file, or a directory of them, of v1 Service, discovery.k8s.io/v1
        /// `EndpointSlice`, v1 Endpoints and at most one lb-agent/v1alpha1 `AgentSettings`.
        file: PathBuf,
        /// Node addresses `NodePorts` would be served on (only affects the summary); overrides
        /// `nodeAddresses` of the settings.
        #[arg(long = "node-ip")]
        node_ips: Vec<Ipv4Addr>,
    },
}

#[derive(Parser)]
struct RunArgs {
    /// A YAML file, or a directory of them, of v1 Service, discovery.k8s.io/v1
    /// `EndpointSlice`, v1 Endpoints and at most one lb-agent/v1alpha1 `AgentSettings` (Maglev
    /// table size and seed, SNAT ports, table sizes, node port range).
    #[arg(long)]
    config: PathBuf,
    /// Interface to serve on (repeatable): XDP on ingress, TC on egress.
    #[arg(long = "iface", required = true)]
    ifaces: Vec<String>,
    /// This node's name (used by node-local policies); defaults to the host name.
    #[arg(long)]
    node_name: Option<String>,
    /// Addresses `NodePorts` answer on (repeatable); overrides `nodeAddresses` of the settings,
    /// which default to the IPv4 addresses of the interfaces.
    #[arg(long = "node-ip")]
    node_ips: Vec<Ipv4Addr>,
    /// XDP attach mode: native where the driver supports it, generic otherwise (auto).
    #[arg(long, value_enum, default_value_t = XdpModeChoice::Auto)]
    xdp_mode: XdpModeChoice,
    /// Seconds between counter reports in the log; 0 turns them off.
    #[arg(long, default_value_t = 10)]
    stats_interval: u64,
    /// Host-side pod interfaces (repeatable; names or globs like `veth*`): TC on their ingress
    /// serves what pods send to Services. Interfaces that appear later are picked up.
    #[arg(long = "pod-iface")]
    pod_ifaces: Vec<IfacePattern>,
    /// A directory on the host's bpffs (e.g. /sys/fs/bpf/lb): maps and links are pinned there,
    /// so the data plane keeps forwarding while no agent runs, and the next agent takes it over
    /// with its tracked connections. Without it nothing outlives the agent.
    #[arg(long)]
    pin_dir: Option<PathBuf>,
    /// What SIGTERM/SIGINT do with a pinned data plane: keep it forwarding (default with
    /// --pin-dir, for restarts and upgrades) or remove it.
    #[arg(long, value_enum)]
    on_exit: Option<OnExit>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum OnExit {
    /// Leave maps, links and programs pinned and attached.
    Keep,
    /// Detach and unpin everything.
    Remove,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Validate { file, node_ips } => validate(&file, &node_ips),
        Command::Run(args) => run(args),
        Command::Cleanup { pin_dir } => cleanup(&pin_dir),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // A config error is the user's to fix and already says how: print it alone.
            if let Some(config_error) = error.downcast_ref::<ConfigError>() {
                eprintln!("error: {config_error}");
                return ExitCode::from(2);
            }
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// What the command line and the host say about this node; the rest is in the config's
/// settings.
struct NodeArgs {
    node_name: String,
    /// `--node-ip`: wins over the settings' `nodeAddresses`.
    node_ips: Vec<Ipv4Addr>,
    /// The interfaces' addresses, used when neither of the above gives one.
    interface_ips: Vec<Ipv4Addr>,
}

/// A config read and turned into map contents.
struct ReadConfig {
    state: DesiredState,
    settings: AgentSettings,
    node: NodeConfig,
    /// The addresses `NodePorts` are served on.
    node_ips: Vec<Ipv4Addr>,
    contents: MapContents,
}

/// Reads the config and turns it into map contents, keeping the ids `previous` gave; logs the
/// config's warnings. The one path from file to maps, at start, reload and validate.
fn read_config(path: &Path, args: &NodeArgs, previous: &MapContents) -> anyhow::Result<ReadConfig> {
    let mut loaded = config::load(path, &args.node_ips)?;
    let node_ips = [
        &args.node_ips,
        &loaded.settings.node_addresses,
        &args.interface_ips,
    ]
    .into_iter()
    .find(|ips| !ips.is_empty())
    .cloned()
    .unwrap_or_default();
    if args.node_ips.is_empty() && loaded.settings.node_addresses.is_empty() && !node_ips.is_empty()
    {
        // Only now known to be needed: the settings name no node address.
        loaded = config::load(path, &node_ips)?;
    }
    for warning in &loaded.warnings {
        log::warn!("{warning}");
    }
    let settings = loaded.settings;
    let node = NodeConfig {
        node_name: args.node_name.clone(),
        snat_addr: node_ips.first().copied(),
        snat_ports: (settings.snat.ports.first, settings.snat.ports.last),
        source_ranges_on_node_ports: settings.source_ranges_on_node_ports,
        maglev_table_size: settings.maglev.table_size,
        maglev_seed: settings.maglev.seed,
        max_tables: settings.max_tables,
    };
    let contents = MapContents::from_state(&loaded.state, &node, previous)
        .with_context(|| format!("{}", path.display()))?;
    Ok(ReadConfig {
        state: loaded.state,
        settings,
        node,
        node_ips,
        contents,
    })
}

fn validate(file: &Path, node_ips: &[Ipv4Addr]) -> anyhow::Result<()> {
    let args = NodeArgs {
        node_name: String::new(),
        node_ips: node_ips.to_vec(),
        interface_ips: Vec::new(),
    };
    let read = read_config(file, &args, &MapContents::default())?;
    println!(
        "{}: valid, {} service ports",
        file.display(),
        read.state.service_ports.len()
    );
    for line in summary(&read.state) {
        println!("  {line}");
    }
    Ok(())
}

fn cleanup(pin_dir: &Path) -> anyhow::Result<()> {
    let removed = PinDir::existing(pin_dir).remove_all()?;
    if removed.is_empty() {
        println!("nothing pinned under {}", pin_dir.display());
    }
    for path in removed {
        println!("removed {}", path.display());
    }
    Ok(())
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let on_exit = match (args.on_exit, &args.pin_dir) {
        (Some(OnExit::Keep), None) => {
            bail!("--on-exit keep needs --pin-dir: without pins nothing outlives the agent")
        }
        (Some(choice), _) => choice,
        (None, Some(_)) => OnExit::Keep,
        (None, None) => OnExit::Remove,
    };
    let node_name = args.node_name.unwrap_or_else(netif::hostname);
    let mut interface_ips = Vec::new();
    if args.node_ips.is_empty() {
        for iface in &args.ifaces {
            interface_ips.extend(
                netif::ipv4_addresses(iface)
                    .with_context(|| format!("reading the addresses of {iface}"))?,
            );
        }
    }
    let node_args = NodeArgs {
        node_name: node_name.clone(),
        node_ips: args.node_ips,
        interface_ips,
    };
    let ReadConfig {
        state,
        settings,
        node,
        node_ips,
        contents,
    } = read_config(&args.config, &node_args, &MapContents::default())?;
    if node_ips.is_empty() {
        bail!(
            "no IPv4 address on {}; NodePorts need one: pass --node-ip or set nodeAddresses in \
             the AgentSettings document",
            args.ifaces.join(", ")
        );
    }

    if !netif::ipv4_forwarding_enabled() {
        log::warn!(
            "IPv4 forwarding is off (net.ipv4.ip_forward=0): translated packets will not reach \
             backends on other interfaces; enable it with `sysctl -w net.ipv4.ip_forward=1`"
        );
    }

    let mut dataplane = DataPlane::load(LoadOptions {
        max_tables: settings.max_tables,
        maglev_table_size: settings.maglev.table_size,
        conntrack_entries: settings.connection_table_size,
        pin_dir: args.pin_dir.clone(),
    })?;
    // Pinned maps a previous agent left: the ids they use are kept, and only the difference
    // is written.
    let contents = if dataplane.contents() == &MapContents::default() {
        contents
    } else {
        let adopted = read_config(&args.config, &node_args, dataplane.contents())?.contents;
        log::info!(
            "took over the pinned maps in {}",
            args.pin_dir.as_deref().unwrap_or(Path::new("")).display()
        );
        adopted
    };
    let writes = dataplane.apply(contents)?;
    log::info!(
        "node {node_name}, node addresses {}, SNAT {}: {} service ports, {writes} map writes",
        join(&node_ips),
        node.snat_addr.map_or("off".to_owned(), |a| format!(
            "to {a} ports {}-{}",
            node.snat_ports.0, node.snat_ports.1
        )),
        state.service_ports.len()
    );
    for iface in &args.ifaces {
        let mode = dataplane.attach(iface, args.xdp_mode)?;
        log::info!("{iface}: XDP attached in {mode} mode, TC on egress");
        if node.snat_addr.is_some() {
            netif::accept_local_sources(iface).with_context(|| {
                format!(
                    "setting net.ipv4.conf.{iface}.accept_local=1, which replies of SNATed \
                     flows to a nodePort need"
                )
            })?;
        }
    }
    for line in summary(&state) {
        log::info!("{line}");
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let mut agent = Agent {
        dataplane,
        settings,
        node_args,
        config: args.config,
        pod_patterns: args.pod_ifaces,
        pods: BTreeMap::new(),
    };
    runtime.block_on(agent.serve(&args.ifaces, args.stats_interval))?;

    stop(&mut agent.dataplane, on_exit)
}

/// Leaves the data plane pinned and forwarding, or detaches and unpins it.
fn stop(dataplane: &mut DataPlane, on_exit: OnExit) -> anyhow::Result<()> {
    log::info!("counters: {}", dataplane.counters()?);
    match (on_exit, dataplane.pin_dir().map(Path::to_owned)) {
        (OnExit::Keep, Some(pin_dir)) => log::info!(
            "the data plane keeps forwarding, pinned in {0}; the next `lb-agent run --pin-dir \
             {0}` takes it over, `lb-agent cleanup --pin-dir {0}` removes it",
            pin_dir.display()
        ),
        (_, pinned) => {
            let detached = dataplane.detach_all();
            log::info!("detached from {}", detached.join(", "));
            if pinned.is_some() {
                let removed = dataplane.remove_pins()?;
                log::info!("removed {} pins", removed.len());
            }
        }
    }
    Ok(())
}

/// How often idle flows are looked for and removed.
const FLOW_EXPIRY_INTERVAL: Duration = Duration::from_secs(5);

/// The running agent: the data plane and what it needs to change it.
struct Agent {
    dataplane: DataPlane,
    /// The settings running: the ones that size the maps cannot change without a restart.
    settings: AgentSettings,
    node_args: NodeArgs,
    config: PathBuf,
    pod_patterns: Vec<IfacePattern>,
    /// Pod interfaces attached: name -> ifindex.
    pods: BTreeMap<String, u32>,
}

impl Agent {
    /// Serves until SIGINT or SIGTERM: reloads the config on SIGHUP, expires idle flows, keeps
    /// the pod interfaces attached, and logs the counters when they change.
    async fn serve(&mut self, ifaces: &[String], stats_interval: u64) -> anyhow::Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut terminate =
            signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
        let mut interrupt =
            signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
        let mut hangup = signal(SignalKind::hangup()).context("installing a SIGHUP handler")?;
        // Opened before the first scan, so no interface can appear unseen in between.
        let mut links = if self.pod_patterns.is_empty() {
            None
        } else {
            Some(LinkEvents::open().context("watching network interfaces")?)
        };
        self.sync_pods();
        for (kind, iface) in self.dataplane.drop_unclaimed_links() {
            log::info!("{iface}: no longer served, removed the pinned {kind} link");
        }
        log::info!("{READY_LINE} on {}", ifaces.join(", "));

        let mut stats = tokio::time::interval(Duration::from_secs(stats_interval.max(1)));
        let mut expiry = tokio::time::interval(FLOW_EXPIRY_INTERVAL);
        let mut last = String::new();
        loop {
            tokio::select! {
                _ = terminate.recv() => { log::info!("SIGTERM: stopping"); return Ok(()); }
                _ = interrupt.recv() => { log::info!("SIGINT: stopping"); return Ok(()); }
                _ = hangup.recv() => self.reload(),
                _ = expiry.tick() => {
                    match self.dataplane.expire_flows(monotonic_now_ns()) {
                        Ok(0) => {}
                        Ok(n) => log::debug!("removed {n} idle flows"),
                        Err(e) => log::warn!("removing idle flows: {e}"),
                    }
                }
                changed = async { links.as_mut()?.changed().await.ok() }, if links.is_some() => {
                    if changed.is_none() {
                        log::warn!("reading interface events failed; rescanning pod interfaces");
                    }
                    self.sync_pods();
                }
                _ = stats.tick(), if stats_interval > 0 => {
                    let now = self.dataplane.counters()?.to_string();
                    if now != last {
                        log::info!("counters: {now}");
                        last = now;
                    }
                }
            }
        }
    }

    /// Re-reads the config and applies the difference; an invalid config changes nothing.
    fn reload(&mut self) {
        let started = Instant::now();
        let result = read_config(&self.config, &self.node_args, self.dataplane.contents())
            .and_then(|read| {
                check_restart_settings(&self.settings, &read.settings)?;
                Ok((
                    self.dataplane.apply(read.contents)?,
                    read.state,
                    read.settings,
                ))
            });
        match result {
            Ok((writes, state, settings)) => {
                self.settings = settings;
                log::info!(
                    "config reloaded: {} service ports, {writes} map writes in {:.1} ms",
                    state.service_ports.len(),
                    started.elapsed().as_secs_f64() * 1e3
                );
                for line in summary(&state) {
                    log::info!("{line}");
                }
            }
            Err(error) => {
                log::error!("config reload refused, still serving the previous config: {error:#}");
            }
        }
    }

    /// Attaches to pod interfaces that appeared, forgets the ones that went away.
    fn sync_pods(&mut self) {
        if self.pod_patterns.is_empty() {
            return;
        }
        let wanted = match podif::matching_interfaces(&self.pod_patterns) {
            Ok(wanted) => wanted,
            Err(e) => {
                log::warn!("listing interfaces: {e}");
                return;
            }
        };
        let (to_attach, to_forget) = podif::reconcile(&self.pods, &wanted);
        for (name, _) in to_forget {
            self.dataplane.forget_pod(&name);
            self.pods.remove(&name);
            log::info!("pod interface {name} gone");
        }
        for (name, index) in to_attach {
            match self.dataplane.attach_pod(&name) {
                Ok(()) => {
                    log::info!("pod interface {name}: TC attached on ingress");
                    self.pods.insert(name, index);
                }
                // It may have gone already; its removal event brings the next scan.
                Err(e) => log::warn!("pod interface {name}: {e}"),
            }
        }
    }
}

/// Refuses a reload that changes a setting the maps were created with.
fn check_restart_settings(running: &AgentSettings, new: &AgentSettings) -> anyhow::Result<()> {
    let sized = [
        (
            "maglev.tableSize",
            running.maglev.table_size,
            new.maglev.table_size,
        ),
        ("maxTables", running.max_tables, new.max_tables),
        (
            "connectionTableSize",
            running.connection_table_size,
            new.connection_table_size,
        ),
    ];
    for (field, was, now) in sized {
        if was != now {
            bail!(
                "{field} changed from {was} to {now}, which sizes the maps and takes effect only \
                 at a restart: restart the agent, or set it back to {was}"
            );
        }
    }
    Ok(())
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of the data path's `bpf_ktime_get_ns`.
fn monotonic_now_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut now) };
    u64::try_from(now.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(now.tv_nsec).unwrap_or(0)
}

/// One line per service port: its frontends and where they lead.
fn summary(state: &DesiredState) -> Vec<String> {
    let mut lines = Vec::new();
    for port in &state.service_ports {
        let mut frontends: Vec<String> = port
            .frontends
            .iter()
            .filter(|f| f.kind != FrontendKind::NodePort)
            .map(|f| format!("{}={}:{}", f.kind, f.addr, f.port))
            .collect();
        // Node ports once, with whether lb-agent chose them, whatever the node addresses.
        if let Some(node_port) = port.node_port {
            let assigned = if port.node_port_assigned {
                " (assigned)"
            } else {
                ""
            };
            frontends.push(format!("nodePort={node_port}{assigned}"));
        }
        if let Some(health) = port.health_check_node_port {
            frontends.push(format!("healthCheckNodePort={health}"));
        }
        let endpoints: Vec<String> = port
            .endpoints
            .iter()
            .map(|e| match &e.pod {
                Some(pod) => format!("{}:{} ({pod})", e.addr, e.port),
                None => format!("{}:{}", e.addr, e.port),
            })
            .collect();
        let endpoints = if endpoints.is_empty() {
            "no ready endpoints: traffic is dropped".to_owned()
        } else {
            endpoints.join(", ")
        };
        lines.push(format!(
            "{} {}: {} -> {}",
            port.display_name(),
            port.protocol,
            frontends.join(" "),
            endpoints
        ));
    }
    lines
}

fn join(addrs: &[Ipv4Addr]) -> String {
    addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}
