//! `lb-agent`: fills the data path's maps from Kubernetes Service and `EndpointSlice` manifests and
//! attaches it to the node's interfaces.

use std::{
    cell::RefCell,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::ExitCode,
    rc::Rc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use lb_userspace::{
    agent::{self, Agent, NodeArgs, ServeOptions, Source, read_config, summary},
    config::ConfigError,
    dataplane::{DataPlane, Forwarding, LoadOptions, XdpModeChoice},
    kubernetes::{self, ApiOptions, ApiStores},
    logging::{self, LogFormat},
    maps::MapContents,
    netif,
    pins::{PinDir, PinnedDataPlane},
    podif::IfacePattern,
    record::AgentRecord,
    report::{Snapshot, Status},
};

#[derive(Parser)]
#[command(
    name = "lb-agent",
    // `lb-agent --version`: "lb-agent 0.1.0 (git 0123456789ab)", the revision from build.rs.
    version = concat!(env!("CARGO_PKG_VERSION"), " (git ", env!("LB_GIT_REVISION"), ")"),
    about = "eBPF/XDP load balancer for Kubernetes Services"
)]
struct Cli {
    /// How log lines look: `text` for people, `json` (one object per line) for log pipelines.
    /// The level comes from `RUST_LOG` (default `info`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the data path, fill it from the config, attach to the interfaces, serve until
    /// SIGINT or SIGTERM, then detach.
    Run(Box<RunArgs>),
    /// What the data plane serves and counts, read from the maps pinned under --pin-dir (while
    /// the agent runs, or after it stopped and left the data plane forwarding).
    Status {
        /// The --pin-dir the agent runs (or ran) with.
        #[arg(long)]
        pin_dir: PathBuf,
        /// `text` for people, `json` for scripts.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
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
    /// table size and seed, SNAT ports, table sizes, node port range, address pools). With
    /// --kubernetes: only the `AgentSettings` (optional).
    #[arg(long, required_unless_present = "kubernetes")]
    config: Option<PathBuf>,
    /// Watch Services, `EndpointSlices` and this node's Node in the Kubernetes API instead of
    /// reading them from --config.
    #[arg(long)]
    kubernetes: bool,
    /// The kubeconfig to reach the API server with; default: the pod's service account
    /// (in-cluster), else `KUBECONFIG` or ~/.kube/config.
    #[arg(long, requires = "kubernetes")]
    kubeconfig: Option<PathBuf>,
    /// Namespace of the lease (`lb-agent-ipam`) that picks the one agent writing load
    /// balancer addresses: the agent's own (the `DaemonSet` passes it from the downward API).
    #[arg(long, env = "POD_NAMESPACE", default_value = "kube-system")]
    lease_namespace: String,
    /// Seconds a lease holder that stopped renewing keeps the lease (client-go's default).
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(2..=300))]
    lease_duration: u64,
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
    /// How XDP sends what it translated: routed and sent out by XDP itself (xdp), or handed to
    /// the kernel stack, which runs netfilter's FORWARD chain on it (stack).
    #[arg(long, value_enum, default_value_t = Forwarding::Xdp)]
    forwarding: Forwarding,
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
    /// Apply changes of the config as soon as they are written (the config's directory is
    /// watched); `false`: only on SIGHUP.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    watch_config: bool,
    /// Prometheus metrics (`/metrics`), or `off`. kube-proxy's default address.
    #[arg(long, default_value = "127.0.0.1:10249", value_parser = parse_listen_addr)]
    metrics_addr: ListenAddr,
    /// kube-proxy's `/healthz` and `/livez`, or `off`.
    #[arg(long, default_value = "0.0.0.0:10256", value_parser = parse_listen_addr)]
    healthz_addr: ListenAddr,
    /// Address the `healthCheckNodePort` servers of `externalTrafficPolicy: Local` Services
    /// listen on.
    #[arg(long, default_value = "0.0.0.0")]
    health_check_ip: IpAddr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    Text,
    Json,
}

/// An address to listen on, or none (`off`).
#[derive(Clone, Copy, Debug)]
struct ListenAddr(Option<SocketAddr>);

fn parse_listen_addr(text: &str) -> Result<ListenAddr, String> {
    if text.is_empty() || text == "off" {
        return Ok(ListenAddr(None));
    }
    text.parse()
        .map(|addr| ListenAddr(Some(addr)))
        .map_err(|_| format!("{text:?} is not ADDRESS:PORT (for example 0.0.0.0:10256) or off"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum OnExit {
    /// Leave maps, links and programs pinned and attached.
    Keep,
    /// Detach and unpin everything.
    Remove,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let result = match cli.command {
        Command::Validate { file, node_ips } => validate(&file, &node_ips),
        Command::Run(args) => run(*args),
        Command::Cleanup { pin_dir } => cleanup(&pin_dir),
        Command::Status { pin_dir, output } => status(&pin_dir, output),
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

fn validate(file: &Path, node_ips: &[Ipv4Addr]) -> anyhow::Result<()> {
    let args = NodeArgs {
        node_name: String::new(),
        node_ips: node_ips.to_vec(),
        interface_ips: Vec::new(),
    };
    let read = read_config(
        &Source::Files(file.to_owned()),
        &args,
        &MapContents::default(),
    )?;
    for warning in &read.warnings {
        log::warn!("{warning}");
    }
    let mut text = format!(
        "{}: valid, {} service ports\n",
        file.display(),
        read.state.service_ports.len()
    );
    for line in summary(&read.state) {
        let _ = writeln!(text, "  {line}");
    }
    print_out(&text)
}

/// Writes to stdout; a reader that went away (`validate ... | head`) ends the output quietly
/// instead of panicking as `println!` does.
fn print_out(text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing to stdout"),
        _ => Ok(()),
    }
}

fn status(pin_dir: &Path, output: Output) -> anyhow::Result<()> {
    let pinned = PinnedDataPlane::open(pin_dir)?;
    let bytes = pinned.record()?.with_context(|| {
        format!(
            "{} holds a data plane but no record of what was applied: the agent did not finish \
             starting",
            pin_dir.display()
        )
    })?;
    let record = AgentRecord::from_json_bytes(&bytes)?;
    let status = Status::from_snapshot(&Snapshot::read(record, &pinned)?);
    match output {
        Output::Text => print_out(&status.render_text()),
        Output::Json => print_out(&format!("{}\n", status.to_json())),
    }
}

fn cleanup(pin_dir: &Path) -> anyhow::Result<()> {
    let removed = PinDir::existing(pin_dir).remove_all()?;
    let mut text = String::new();
    if removed.is_empty() {
        text = format!("nothing pinned under {}\n", pin_dir.display());
    }
    for path in removed {
        let _ = writeln!(text, "removed {}", path.display());
    }
    print_out(&text)
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
    let node_name = args.node_name.clone().unwrap_or_else(netif::hostname);
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
        node_ips: args.node_ips.clone(),
        interface_ips,
    };
    // Built first: the Kubernetes source needs it to list before anything is loaded.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let (source, api) = open_source(&runtime, &args, &node_name)?;
    let read = read_config(&source, &node_args, &MapContents::default())?;
    if read.node_ips.is_empty() {
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
    log::info!(
        node = node_name.as_str(),
        node_addresses = lb_userspace::ipam::join_addrs(&read.node_ips).as_str(),
        snat = read.node.snat_addr.map_or("off".to_owned(), |a| format!(
            "egress interface address (else {a}):{}-{}",
            read.node.snat_ports.0, read.node.snat_ports.1
        )).as_str();
        "loading the data path (the kernel verifies the programs)"
    );
    let started = Instant::now();
    let dataplane = DataPlane::load(LoadOptions {
        max_tables: read.settings.max_tables,
        maglev_table_size: read.settings.maglev.table_size,
        conntrack_entries: read.settings.connection_table_size,
        pin_dir: args.pin_dir.clone(),
        forwarding: args.forwarding,
    })?;
    log::info!(took_ms = started.elapsed().as_secs_f64() * 1e3; "data path loaded");
    let options = ServeOptions {
        ifaces: args.ifaces,
        xdp_mode: args.xdp_mode,
        pod_patterns: args.pod_ifaces,
        stats_interval: args.stats_interval,
        watch: args.watch_config,
        metrics_addr: args.metrics_addr.0,
        healthz_addr: args.healthz_addr.0,
        health_check_ip: args.health_check_ip,
        api,
    };
    let agent = Agent::start(dataplane, source, node_args, read, &options)?;
    let agent = Rc::new(RefCell::new(agent));
    let local = tokio::task::LocalSet::new();
    let served = runtime.block_on(local.run_until(agent::serve(Rc::clone(&agent), &options)));
    // The servers' tasks end with the LocalSet; after that nothing else holds the agent.
    drop(local);
    let mut agent = agent.borrow_mut();
    let stopped = stop(agent.dataplane_mut(), on_exit);
    served.and(stopped)
}

/// The config source `run` was given; the Kubernetes source is listed once before this
/// returns (it waits, retrying, while the API server cannot be reached).
fn open_source(
    runtime: &tokio::runtime::Runtime,
    args: &RunArgs,
    node_name: &str,
) -> anyhow::Result<(Source, Option<(kube::Client, ApiOptions)>)> {
    if !args.kubernetes {
        let config = args
            .config
            .clone()
            .context("--config is required without --kubernetes")?;
        return Ok((Source::Files(config), None));
    }
    let api_options = ApiOptions {
        kubeconfig: args.kubeconfig.clone(),
        node_name: node_name.to_owned(),
        lease_namespace: args.lease_namespace.clone(),
        lease_duration: Duration::from_secs(args.lease_duration),
    };
    let client = runtime.block_on(kubernetes::connect(&api_options))?;
    let stores = runtime.block_on(async {
        let stores = ApiStores::watch(&client, node_name);
        log::info!("listing Services, EndpointSlices and Node {node_name} from the API server");
        stores.synced().await.map(|()| stores)
    })?;
    let source = Source::Kubernetes {
        stores,
        settings: args.config.clone(),
    };
    Ok((source, Some((client, api_options))))
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
