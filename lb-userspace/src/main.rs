//! `lb-agent`: fills the data path's maps from Kubernetes Service and `EndpointSlice` manifests and
//! attaches it to the node's interfaces.

use std::{net::Ipv4Addr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use lb_userspace::{
    config::{self, ConfigError},
    dataplane::{DataPlane, XdpModeChoice},
    maps::MapContents,
    model::DesiredState,
    netif,
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
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Validate { file, node_ips } => validate(&file, &node_ips),
        Command::Run(args) => run(args),
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

fn validate(file: &std::path::Path, node_ips: &[Ipv4Addr]) -> anyhow::Result<()> {
    let loaded = config::load_file(file, node_ips)?;
    for warning in &loaded.warnings {
        log::warn!("{warning}");
    }
    MapContents::from_state(&loaded.state).with_context(|| format!("{}", file.display()))?;
    println!(
        "{}: valid, {} service ports",
        file.display(),
        loaded.state.service_ports.len()
    );
    for line in summary(&loaded.state) {
        println!("  {line}");
    }
    Ok(())
}

fn run(args: RunArgs) -> anyhow::Result<()> {
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

    let loaded = config::load_file(&args.config, &node_ips)?;
    for warning in &loaded.warnings {
        log::warn!("{warning}");
    }
    let contents = MapContents::from_state(&loaded.state)
        .with_context(|| format!("{}", args.config.display()))?;

    if !netif::ipv4_forwarding_enabled() {
        log::warn!(
            "IPv4 forwarding is off (net.ipv4.ip_forward=0): translated packets will not reach \
             backends on other interfaces; enable it with `sysctl -w net.ipv4.ip_forward=1`"
        );
    }

    let mut dataplane = DataPlane::load()?;
    let writes = dataplane.apply(contents)?;
    log::info!(
        "node {node_name}, node addresses {}: {} service ports, {writes} map writes",
        join(&node_ips),
        loaded.state.service_ports.len()
    );
    for iface in &args.ifaces {
        let mode = dataplane.attach(iface, args.xdp_mode)?;
        log::info!("{iface}: XDP attached in {mode} mode, TC on egress");
    }
    for line in summary(&loaded.state) {
        log::info!("{line}");
    }
    log::info!("{READY_LINE} on {}", args.ifaces.join(", "));

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(&dataplane, args.stats_interval))?;

    let detached = dataplane.detach_all();
    log::info!("detached from {}", detached.join(", "));
    log::info!("counters: {}", dataplane.counters()?);
    Ok(())
}

/// Waits for SIGINT or SIGTERM, logging the counters when they change.
async fn serve(dataplane: &DataPlane, stats_interval: u64) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    let period = Duration::from_secs(stats_interval.max(1));
    let mut ticker = tokio::time::interval(period);
    let mut last = String::new();
    loop {
        tokio::select! {
            _ = terminate.recv() => { log::info!("SIGTERM: stopping"); return Ok(()); }
            _ = interrupt.recv() => { log::info!("SIGINT: stopping"); return Ok(()); }
            _ = ticker.tick(), if stats_interval > 0 => {
                let now = dataplane.counters()?.to_string();
                if now != last {
                    log::info!("counters: {now}");
                    last = now;
                }
            }
        }
    }
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
