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
    config::{self, ConfigError},
    dataplane::{DataPlane, LoadOptions, XdpModeChoice},
    maglev,
    maps::{DEFAULT_SNAT_PORTS, MapContents, NodeConfig},
    model::DesiredState,
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
    /// Check a config file without touching the kernel; exits 2 if it has problems.
    Validate {
        /// Multi-document YAML of v1 Service and discovery.k8s.io/v1 `EndpointSlice` objects.
        file: PathBuf,
        /// Node addresses `NodePorts` would be served on (only affects the summary).
        #[arg(long = "node-ip")]
        node_ips: Vec<Ipv4Addr>,
    },
}

#[derive(Parser)]
struct RunArgs {
    /// Multi-document YAML of v1 Service and discovery.k8s.io/v1 `EndpointSlice` objects.
    #[arg(long)]
    config: PathBuf,
    /// Interface to serve on (repeatable): XDP on ingress, TC on egress.
    #[arg(long = "iface", required = true)]
    ifaces: Vec<String>,
    /// This node's name (used by node-local policies); defaults to the host name.
    #[arg(long)]
    node_name: Option<String>,
    /// Addresses `NodePorts` answer on (repeatable); defaults to the IPv4 addresses of the
    /// interfaces.
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
    /// M, the size of every Maglev table: a prime, at least 100x the largest endpoint count
    /// for an even spread. The same on every node.
    #[arg(long, default_value_t = maglev::DEFAULT_TABLE_SIZE)]
    maglev_table_size: u32,
    /// Seed of the Maglev tables and the flow hash. The same on every node, so every node
    /// picks the same backend for the same flow.
    #[arg(long, default_value_t = 0)]
    maglev_seed: u32,
    /// Source ports for SNAT to other nodes' endpoints, `FIRST-LAST`. Keep them out of the
    /// node's ephemeral range (`net.ipv4.ip_local_port_range`) and the `NodePort` range.
    #[arg(long, default_value = "61000-65535", value_parser = parse_port_range)]
    snat_ports: (u16, u16),
    /// Maglev tables the data path has room for (one per service port and traffic policy in
    /// use); each takes 4 x M bytes of kernel memory.
    #[arg(long, default_value_t = lb_common::DEFAULT_MAX_TABLES)]
    max_tables: u32,
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

fn parse_port_range(text: &str) -> Result<(u16, u16), String> {
    let (first, last) = text.split_once('-').ok_or_else(|| {
        format!(
            "{text:?} is not FIRST-LAST, for example {}-{}",
            DEFAULT_SNAT_PORTS.0, DEFAULT_SNAT_PORTS.1
        )
    })?;
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .ok()
            .filter(|&p| p > 0)
            .ok_or_else(|| format!("{p:?} is not a port (1-65535)"))
    };
    let (first, last) = (port(first)?, port(last)?);
    if first > last {
        return Err(format!("{first} is above {last}"));
    }
    Ok((first, last))
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

/// Reads the config file and turns it into map contents, keeping the ids `previous` gave;
/// logs the file's warnings. The one path from file to maps, at start, reload and validate.
fn read_config(
    file: &Path,
    node_ips: &[Ipv4Addr],
    node: &NodeConfig,
    previous: &MapContents,
) -> anyhow::Result<(DesiredState, MapContents)> {
    let loaded = config::load_file(file, node_ips)?;
    for warning in &loaded.warnings {
        log::warn!("{warning}");
    }
    let contents = MapContents::from_state(&loaded.state, node, previous)
        .with_context(|| format!("{}", file.display()))?;
    Ok((loaded.state, contents))
}

fn validate(file: &Path, node_ips: &[Ipv4Addr]) -> anyhow::Result<()> {
    let (state, _) = read_config(
        file,
        node_ips,
        &NodeConfig::default(),
        &MapContents::default(),
    )?;
    println!(
        "{}: valid, {} service ports",
        file.display(),
        state.service_ports.len()
    );
    for line in summary(&state) {
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
    let node_ips = if args.node_ips.is_empty() {
        let mut ips = Vec::new();
        for iface in &args.ifaces {
            ips.extend(
                netif::ipv4_addresses(iface)
                    .with_context(|| format!("reading the addresses of {iface}"))?,
            );
        }
        if ips.is_empty() {
            bail!(
                "no IPv4 address on {}; NodePorts need one: pass --node-ip",
                args.ifaces.join(", ")
            );
        }
        ips
    } else {
        args.node_ips
    };

    let node = NodeConfig {
        node_name: node_name.clone(),
        snat_addr: node_ips.first().copied(),
        snat_ports: args.snat_ports,
        maglev_table_size: args.maglev_table_size,
        maglev_seed: args.maglev_seed,
        max_tables: args.max_tables,
        ..NodeConfig::default()
    };
    let (state, contents) = read_config(&args.config, &node_ips, &node, &MapContents::default())?;

    if !netif::ipv4_forwarding_enabled() {
        log::warn!(
            "IPv4 forwarding is off (net.ipv4.ip_forward=0): translated packets will not reach \
             backends on other interfaces; enable it with `sysctl -w net.ipv4.ip_forward=1`"
        );
    }

    let mut dataplane = DataPlane::load(LoadOptions {
        max_tables: args.max_tables,
        maglev_table_size: args.maglev_table_size,
        pin_dir: args.pin_dir.clone(),
        ..LoadOptions::default()
    })?;
    // Pinned maps a previous agent left: the ids they use are kept, and only the difference
    // is written.
    let contents = if dataplane.contents() == &MapContents::default() {
        contents
    } else {
        let (_, adopted) = read_config(&args.config, &node_ips, &node, dataplane.contents())?;
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
        node,
        node_ips,
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
    node: NodeConfig,
    node_ips: Vec<Ipv4Addr>,
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
        let result = read_config(
            &self.config,
            &self.node_ips,
            &self.node,
            self.dataplane.contents(),
        )
        .and_then(|(state, contents)| Ok((self.dataplane.apply(contents)?, state)));
        match result {
            Ok((writes, state)) => {
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
        let frontends: Vec<String> = port
            .frontends
            .iter()
            .map(|f| format!("{}={}:{}", f.kind, f.addr, f.port))
            .collect();
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
