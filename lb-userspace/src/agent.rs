//! The running agent: from a config to the maps, at start and on every change, and what it
//! reports about it (log, record, metrics, health).
//!
//! One path turns a config into map writes (`read_config` -> `MapContents::from_state` ->
//! `DataPlane::apply`), whatever started it: the first start, a start that takes over pinned
//! maps, a change of the config's directory, or SIGHUP. A config that fails anywhere on that
//! path before the maps are written changes nothing.

use std::{
    cell::RefCell,
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    rc::Rc,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, bail};
use tokio::sync::Notify;

use crate::{
    config::{self, AgentSettings},
    dataplane::{DataPlane, DataPlaneError, Forwarding, XdpModeChoice},
    health::{self, HealthHandle, HealthServers},
    http::Server,
    ipam,
    kubernetes::{self, AddressWriter, ApiOptions, ApiStores, LeaseLock},
    maps::{MapContents, NodeConfig},
    metrics::{AgentMetrics, ChangeSource, render_prometheus},
    model::{DesiredState, FrontendKind},
    podif::{self, IfacePattern, LinkEvents},
    record::{AgentRecord, ApplyInfo, InterfaceKind, InterfaceRecord},
    report::{Snapshot, Status},
    watch::ConfigWatcher,
};

/// The line `run` logs once every interface is attached; tests and the demo wait for it.
pub const READY_LINE: &str = "lb-agent is serving";
/// How often idle flows are looked for and removed.
const FLOW_EXPIRY_INTERVAL: Duration = Duration::from_secs(5);

/// What the command line and the host say about this node; the rest is in the config's
/// settings.
#[derive(Clone, Debug, Default)]
pub struct NodeArgs {
    pub node_name: String,
    /// `--node-ip`: wins over the settings' `nodeAddresses`.
    pub node_ips: Vec<Ipv4Addr>,
    /// The interfaces' addresses, used when neither of the above gives one.
    pub interface_ips: Vec<Ipv4Addr>,
}

/// Where the Services and settings come from.
pub enum Source {
    /// A file or directory of manifests (and the settings).
    Files(PathBuf),
    /// The Kubernetes API, plus an optional file or directory with the settings only.
    Kubernetes {
        stores: ApiStores,
        settings: Option<PathBuf>,
    },
}

impl Source {
    /// Reads it whole.
    pub fn read(&self, args: &NodeArgs) -> anyhow::Result<config::Loaded> {
        match self {
            Source::Files(path) => Ok(config::load(path, &args.node_ips, &args.interface_ips)?),
            Source::Kubernetes { stores, settings } => {
                let (texts, notes) = match settings {
                    Some(path) => config::read_files(path)?,
                    None => (Vec::new(), Vec::new()),
                };
                kubernetes::check_settings_only(&texts)?;
                let mut loaded = stores.read(&texts, &args.node_ips, &args.interface_ips)?;
                loaded.warnings.splice(0..0, notes);
                Ok(loaded)
            }
        }
    }

    /// The API's objects, with the Kubernetes source.
    #[must_use]
    pub fn stores(&self) -> Option<&ApiStores> {
        match self {
            Source::Files(_) => None,
            Source::Kubernetes { stores, .. } => Some(stores),
        }
    }

    /// The file or directory to watch for changes, if any.
    #[must_use]
    pub fn files(&self) -> Option<&Path> {
        match self {
            Source::Files(path) => Some(path),
            Source::Kubernetes { settings, .. } => settings.as_deref(),
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Files(path) => write!(f, "{}", path.display()),
            Source::Kubernetes { settings: None, .. } => f.write_str("the Kubernetes API"),
            Source::Kubernetes {
                settings: Some(path),
                ..
            } => write!(f, "the Kubernetes API (settings: {})", path.display()),
        }
    }
}

/// A config read and turned into map contents.
pub struct ReadConfig {
    pub state: DesiredState,
    pub settings: AgentSettings,
    pub node: NodeConfig,
    /// The addresses `NodePorts` are served on.
    pub node_ips: Vec<Ipv4Addr>,
    pub contents: MapContents,
    /// For the Kubernetes source's address allocator.
    pub address_claims: Vec<ipam::Claim>,
    /// The config's warnings, logged by whoever read it.
    pub warnings: Vec<String>,
}

/// Reads the config and turns it into map contents, keeping the ids `previous` gave. The one
/// path from a source to maps, at start, reload and validate.
pub fn read_config(
    source: &Source,
    args: &NodeArgs,
    previous: &MapContents,
) -> anyhow::Result<ReadConfig> {
    let loaded = source.read(args)?;
    let settings = loaded.settings;
    let node = NodeConfig {
        node_name: args.node_name.clone(),
        snat_addr: loaded.node_ips.first().copied(),
        snat_ports: (settings.snat.ports.first, settings.snat.ports.last),
        source_ranges_on_node_ports: settings.source_ranges_on_node_ports,
        maglev_table_size: settings.maglev.table_size,
        maglev_seed: settings.maglev.seed,
        max_tables: settings.max_tables,
    };
    let contents = MapContents::from_state(&loaded.state, &node, previous)
        .with_context(|| source.to_string())?;
    Ok(ReadConfig {
        state: loaded.state,
        settings,
        node,
        node_ips: loaded.node_ips,
        contents,
        address_claims: loaded.address_claims,
        warnings: loaded.warnings,
    })
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

/// What `run` was asked to do besides the config.
pub struct ServeOptions {
    pub ifaces: Vec<String>,
    pub xdp_mode: XdpModeChoice,
    pub pod_patterns: Vec<IfacePattern>,
    /// Seconds between counter lines in the log; 0: none.
    pub stats_interval: u64,
    /// Re-read the config when its directory changes (SIGHUP always does).
    pub watch: bool,
    pub metrics_addr: Option<SocketAddr>,
    pub healthz_addr: Option<SocketAddr>,
    /// Where `healthCheckNodePort` servers listen (kube-proxy: every address).
    pub health_check_ip: IpAddr,
    /// With the Kubernetes source: the client and the lease that elects the agent writing load
    /// balancer addresses.
    pub api: Option<(kube::Client, ApiOptions)>,
}

/// What the address allocator works from: the pools and the claims of the last apply.
pub type AddressInput = (Vec<ipam::Pool>, Vec<ipam::Claim>);

/// The agent between applies: the data plane and what it needs to change it and report on it.
pub struct Agent {
    dataplane: DataPlane,
    source: Source,
    node_args: NodeArgs,
    /// The warnings of the last read: only new ones are logged.
    warnings: BTreeSet<String>,
    /// The pools and claims of the last apply, for the allocator (Kubernetes source).
    address_input: tokio::sync::watch::Sender<AddressInput>,
    /// The settings running: the ones that size the maps cannot change without a restart.
    settings: AgentSettings,
    /// What the maps were last filled from.
    state: DesiredState,
    node: NodeConfig,
    node_ips: Vec<Ipv4Addr>,
    /// +1 for every apply that changed the desired state or the maps.
    generation: u64,
    record: Option<AgentRecord>,
    metrics: AgentMetrics,
    health: HealthHandle,
    interfaces: Vec<InterfaceRecord>,
    pod_patterns: Vec<IfacePattern>,
    /// Pod interfaces attached: name -> ifindex.
    pods: BTreeMap<String, u32>,
    /// Applies that failed in a row since the last one that succeeded.
    failed_applies: u32,
    /// After a failed apply: when to try again, and the change it applies.
    retry: Option<(Instant, Change)>,
}

/// The wait before retrying a failed apply, doubled after each further failure up to
/// `APPLY_RETRY_MAX` (kube-proxy retries a failed sync after its sync period, 30 s).
const APPLY_RETRY_FIRST: Duration = Duration::from_secs(2);
const APPLY_RETRY_MAX: Duration = Duration::from_secs(30);

/// The wait after `failed` applies in a row failed.
fn retry_delay(failed: u32) -> Duration {
    let doublings = failed.saturating_sub(1).min(8);
    APPLY_RETRY_FIRST
        .saturating_mul(1 << doublings)
        .min(APPLY_RETRY_MAX)
}

impl Agent {
    /// Fills the maps of `dataplane` from `read` (a pinned data plane is reconciled with it:
    /// only the difference is written) and attaches to the interfaces.
    pub fn start(
        mut dataplane: DataPlane,
        source: Source,
        node_args: NodeArgs,
        mut read: ReadConfig,
        options: &ServeOptions,
    ) -> anyhow::Result<Self> {
        let adopting = dataplane.contents() != &MapContents::default();
        if adopting {
            log::info!(
                "took over the pinned maps in {}",
                dataplane.pin_dir().unwrap_or(Path::new("")).display()
            );
            // The pinned maps' ids are kept, so tracked flows and counters keep their meaning.
            read.contents = MapContents::from_state(&read.state, &read.node, dataplane.contents())
                .with_context(|| source.to_string())?;
        }
        let started = Instant::now();
        let writes = dataplane.apply(read.contents)?;
        log::info!(
            writes = writes,
            service_ports = read.state.service_ports.len(),
            took_ms = started.elapsed().as_secs_f64() * 1e3,
            adopted = adopting;
            "maps filled"
        );
        let mut interfaces = Vec::new();
        for iface in &options.ifaces {
            let mode = dataplane.attach(iface, options.xdp_mode)?;
            log::info!(iface = iface.as_str(), xdp_mode = mode.to_string().as_str(); "{iface}: XDP on ingress, TC on egress and ingress, forwarding {}", dataplane.forwarding().name());
            if read.node.snat_addr.is_some() && dataplane.forwarding() == Forwarding::Stack {
                crate::netif::accept_local_sources(iface).with_context(|| {
                    format!(
                        "setting net.ipv4.conf.{iface}.accept_local=1, which replies of SNATed \
                         flows to a nodePort need"
                    )
                })?;
            }
            interfaces.push(InterfaceRecord {
                name: iface.clone(),
                kind: InterfaceKind::Node,
                xdp_mode: Some(mode.to_string()),
            });
        }
        for line in summary(&read.state) {
            log::info!("{line}");
        }
        // Generations go on across restarts: the pinned record says where the last agent was.
        let generation = if adopting {
            dataplane
                .record()
                .ok()
                .flatten()
                .and_then(|bytes| AgentRecord::from_json_bytes(&bytes).ok())
                .map_or(1, |record| record.generation + 1)
        } else {
            1
        };
        let changes_from = if source.stores().is_some() {
            ChangeSource::Api
        } else {
            ChangeSource::File
        };
        let health = HealthHandle::new(health::DEFAULT_HEALTH_TIMEOUT);
        health.updated(SystemTime::now());
        let address_input =
            tokio::sync::watch::Sender::new((read.settings.pools(), read.address_claims));
        let mut agent = Agent {
            dataplane,
            source,
            node_args,
            warnings: log_new_warnings(&BTreeSet::new(), read.warnings),
            address_input,
            settings: read.settings,
            state: read.state,
            node: read.node,
            node_ips: read.node_ips,
            generation,
            record: None,
            metrics: AgentMetrics::new(changes_from),
            health,
            interfaces,
            pod_patterns: options.pod_patterns.clone(),
            pods: BTreeMap::new(),
            failed_applies: 0,
            retry: None,
        };
        agent.write_record();
        Ok(agent)
    }

    /// The data plane, to stop it.
    pub fn dataplane_mut(&mut self) -> &mut DataPlane {
        &mut self.dataplane
    }

    /// Re-reads the config and applies the difference; an invalid config changes nothing.
    /// The apply latency is measured from when the change was seen; `trigger` names what
    /// started this apply in the log (`retry` for a retry).
    ///
    /// An apply that fails halfway leaves the maps as far as it got (read back by the data
    /// plane, so the next apply starts from them): `/healthz` fails with the reason and the apply
    /// is retried with backoff until one succeeds or a newer change replaces it.
    fn reload(&mut self, change: Change, trigger: &str) {
        let waited = change.seen.elapsed();
        self.health.queued_update(
            SystemTime::now()
                .checked_sub(waited)
                .unwrap_or(SystemTime::now()),
        );
        let read = read_config(&self.source, &self.node_args, self.dataplane.contents()).and_then(
            |read| {
                check_restart_settings(&self.settings, &read.settings)?;
                Ok(read)
            },
        );
        let read = match read {
            Ok(read) => read,
            Err(error) => {
                self.health.refused();
                self.metrics.refused();
                // Retrying the same invalid config would only refuse it again; the next change
                // is read as usual.
                self.retry = None;
                log::error!(
                    trigger = trigger;
                    "config reload refused, still serving the previous config: {error:#}"
                );
                return;
            }
        };
        let changed = read.state != self.state || &read.contents != self.dataplane.contents();
        let writes = match self.dataplane.apply(read.contents) {
            Ok(writes) => writes,
            Err(error) => {
                self.apply_failed(change, trigger, &error);
                return;
            }
        };
        self.warnings = log_new_warnings(&self.warnings, read.warnings);
        self.address_input
            .send_replace((read.settings.pools(), read.address_claims));
        let latency = change.seen.elapsed();
        self.health.updated(SystemTime::now());
        if self.failed_applies > 0 {
            log::info!(
                failed_applies = self.failed_applies;
                "applied after failed applies"
            );
        }
        self.failed_applies = 0;
        self.retry = None;
        if changed {
            self.generation += 1;
            self.metrics.applied(change.source, latency);
        }
        log::info!(
            trigger = trigger,
            generation = self.generation,
            changed = changed,
            service_ports = read.state.service_ports.len(),
            writes = writes,
            latency_ms = latency.as_secs_f64() * 1e3;
            "config reloaded"
        );
        if changed {
            for line in summary(&read.state) {
                log::info!("{line}");
            }
        }
        self.state = read.state;
        self.settings = read.settings;
        self.node = read.node;
        self.node_ips = read.node_ips;
        if changed {
            self.write_record();
        }
    }

    /// After an apply failed: says so in `/healthz`, the metrics and the log, and schedules the
    /// retry.
    fn apply_failed(&mut self, change: Change, trigger: &str, error: &DataPlaneError) {
        self.failed_applies = self.failed_applies.saturating_add(1);
        let delay = retry_delay(self.failed_applies);
        self.retry = Some((Instant::now() + delay, change));
        // The whole chain: "map FRONTENDS: `bpf_map_update_elem` failed: Argument list too long".
        let mut reason = error.to_string();
        let mut source = std::error::Error::source(error);
        while let Some(cause) = source {
            reason.push_str(": ");
            reason.push_str(&cause.to_string());
            source = cause.source();
        }
        if self.dataplane.out_of_sync() {
            reason.push_str("; reading the maps back failed too, so what they hold is not known");
        }
        log::error!(
            trigger = trigger,
            failed_applies = self.failed_applies,
            retry_in_s = delay.as_secs();
            "applying the config failed, the maps hold part of it; retrying in {}s: {reason}",
            delay.as_secs()
        );
        self.health.apply_failed(reason);
        self.metrics.failed();
    }
    /// Stores what was applied, for `status` (also after this process is gone).
    fn write_record(&mut self) {
        let mut interfaces = self.interfaces.clone();
        interfaces.extend(self.pods.keys().map(|name| InterfaceRecord {
            name: name.clone(),
            kind: InterfaceKind::Pod,
            xdp_mode: None,
        }));
        let record = AgentRecord::build(
            &self.state,
            self.dataplane.contents(),
            &self.node,
            ApplyInfo {
                generation: self.generation,
                applied_at: SystemTime::now(),
                config_path: self.source.to_string(),
                node_addresses: self.node_ips.clone(),
                interfaces,
            },
        );
        if let Err(e) = self.dataplane.write_record(&record.to_json_bytes()) {
            log::warn!("storing the record for `lb-agent status` failed: {e}");
        }
        self.record = Some(record);
    }

    /// The Prometheus text of the data plane now.
    fn metrics_text(&self) -> anyhow::Result<String> {
        let record = self.record.clone().context("nothing applied yet")?;
        let snapshot = Snapshot::read(record, &self.dataplane)?;
        Ok(render_prometheus(
            &Status::from_snapshot(&snapshot),
            &self.metrics,
        ))
    }

    /// Attaches to pod interfaces that appeared, forgets the ones that went away. Returns
    /// whether anything changed.
    fn sync_pods(&mut self) -> bool {
        if self.pod_patterns.is_empty() {
            return false;
        }
        let wanted = match podif::matching_interfaces(&self.pod_patterns) {
            Ok(wanted) => wanted,
            Err(e) => {
                log::warn!("listing interfaces: {e}");
                return false;
            }
        };
        let (to_attach, to_forget) = podif::reconcile(&self.pods, &wanted);
        let changed = !to_attach.is_empty() || !to_forget.is_empty();
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
        changed
    }
}

/// Serves until SIGINT or SIGTERM: applies config changes (watched, or on SIGHUP), expires idle
/// flows, keeps pod interfaces attached, answers metrics and health requests, and logs the
/// counters when they change. Must run inside a `LocalSet` (the HTTP servers are local tasks).
pub async fn serve(agent: Rc<RefCell<Agent>>, options: &ServeOptions) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    let mut hangup = signal(SignalKind::hangup()).context("installing a SIGHUP handler")?;
    let (has_pods, health) = (
        !agent.borrow().pod_patterns.is_empty(),
        agent.borrow().health.clone(),
    );
    let Changes {
        mut watcher,
        api: mut api_changes,
        allocator,
    } = Changes::start(&agent.borrow(), options)?;
    // Opened before the first scan, so no interface can appear unseen in between.
    let mut links = if has_pods {
        Some(LinkEvents::open().context("watching network interfaces")?)
    } else {
        None
    };
    let _servers = start_servers(&agent, options, &health)?;
    let mut health_checks = HealthServers::new(options.health_check_ip, health.clone());
    {
        let mut agent = agent.borrow_mut();
        if agent.sync_pods() {
            agent.write_record();
        }
        for (kind, iface) in agent.dataplane.drop_unclaimed_links() {
            log::info!("{iface}: no longer served, removed the pinned {kind} link");
        }
        sync_health_checks(&agent, &mut health_checks);
    }
    log::info!("{READY_LINE} on {}", options.ifaces.join(", "));

    let mut stats = tokio::time::interval(Duration::from_secs(options.stats_interval.max(1)));
    let mut expiry = tokio::time::interval(FLOW_EXPIRY_INTERVAL);
    let mut last = String::new();
    loop {
        let retry = agent.borrow().retry;
        tokio::select! {
            _ = terminate.recv() => { log::info!("SIGTERM: stopping"); break; }
            () = async {
                if let Some((at, _)) = retry {
                    tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
                }
            }, if retry.is_some() => {
                if let Some((_, change)) = retry {
                    reload(&agent, &mut health_checks, change, "retry");
                }
            }
            _ = interrupt.recv() => { log::info!("SIGINT: stopping"); break; }
            _ = hangup.recv() => {
                let change = Change { seen: Instant::now(), source: ChangeSource::Signal };
                reload(&agent, &mut health_checks, change, "SIGHUP");
            }
            seen = async { api_changes.as_mut()?.recv().await }, if api_changes.is_some() => {
                if let Some(seen) = seen {
                    let change = Change { seen, source: ChangeSource::Api };
                    reload(&agent, &mut health_checks, change, "api");
                } else {
                    api_changes = None;
                }
            }
            seen = async { watcher.as_mut()?.changed().await.ok() }, if watcher.is_some() => {
                if let Some(seen) = seen {
                    let change = Change { seen, source: ChangeSource::File };
                    reload(&agent, &mut health_checks, change, "file");
                } else {
                    log::warn!("watching the config failed; changes now need SIGHUP");
                    watcher = None;
                }
            }
            _ = expiry.tick() => {
                agent.borrow_mut().dataplane.refresh_forward_targets();
                match agent.borrow_mut().dataplane.expire_flows(monotonic_now_ns()) {
                    Ok(0) => {}
                    Ok(n) => log::debug!("removed {n} idle flows"),
                    Err(e) => log::warn!("removing idle flows: {e}"),
                }
            }
            changed = async { links.as_mut()?.changed().await.ok() }, if links.is_some() => {
                if changed.is_none() {
                    log::warn!("reading interface events failed; rescanning pod interfaces");
                }
                let mut agent = agent.borrow_mut();
                if agent.sync_pods() {
                    agent.write_record();
                }
            }
            _ = stats.tick(), if options.stats_interval > 0 => {
                let now = agent.borrow().dataplane.counters()?.to_string();
                if now != last {
                    log::info!("counters: {now}");
                    last = now;
                }
            }
        }
    }
    // Load balancers probing /healthz take this node out while it goes away.
    health.set_node_eligible(false);
    if let Some((stop, task)) = allocator {
        // Gives the lease up, so another agent allocates at once; bounded, the API may be gone.
        let _ = stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(3), task).await;
    }
    Ok(())
}

/// A config change to apply.
#[derive(Clone, Copy, Debug)]
struct Change {
    /// When it was noticed (the first inotify event, watch event or signal).
    seen: Instant,
    source: ChangeSource,
}

/// Applies the config as it is now (after `change`, `trigger` in the log) and moves the health
/// check servers to the Services that now have them.
fn reload(
    agent: &Rc<RefCell<Agent>>,
    health_checks: &mut HealthServers,
    change: Change,
    trigger: &str,
) {
    let mut agent = agent.borrow_mut();
    agent.reload(change, trigger);
    sync_health_checks(&agent, health_checks);
}

/// Where changes to apply come from, besides SIGHUP.
struct Changes {
    /// The config files (or the settings, with the Kubernetes source).
    watcher: Option<ConfigWatcher>,
    /// The API's objects: when a burst of changes began.
    api: Option<tokio::sync::mpsc::Receiver<Instant>>,
    /// The address allocator task, and how to stop it.
    allocator: Option<(
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    )>,
}

impl Changes {
    fn start(agent: &Agent, options: &ServeOptions) -> anyhow::Result<Self> {
        let watcher = match agent.source.files() {
            Some(files) if options.watch => Some(
                ConfigWatcher::new(files)
                    .with_context(|| format!("watching {} for changes", files.display()))?,
            ),
            _ => None,
        };
        if let Some(watcher) = &watcher {
            log::info!(
                "watching {} for config changes",
                watcher.directory().display()
            );
        }
        let stores = agent.source.stores();
        let allocator = match (&options.api, stores) {
            (Some((client, api_options)), Some(stores)) => {
                let (stop, stopped) = tokio::sync::oneshot::channel();
                let task = tokio::spawn(allocate_addresses(
                    client.clone(),
                    api_options.clone(),
                    stores.clone(),
                    agent.address_input.subscribe(),
                    stopped,
                ));
                Some((stop, task))
            }
            _ => None,
        };
        Ok(Changes {
            watcher,
            api: stores.map(|stores| coalesce(&stores.changed)),
            allocator,
        })
    }
}

/// How long the API must be quiet before its changes are applied, and the longest a change
/// waits: a burst of updates (a rollout) becomes one apply.
const API_QUIET: Duration = Duration::from_millis(100);
const API_MAX_DELAY: Duration = Duration::from_secs(1);

/// Turns the stores' notifications into one message per burst, carrying when the burst began.
/// A task of its own, so no notification is lost when `serve`'s select picks another branch.
fn coalesce(changed: &Arc<Notify>) -> tokio::sync::mpsc::Receiver<Instant> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let changed = Arc::clone(changed);
    tokio::spawn(async move {
        loop {
            changed.notified().await;
            let first = Instant::now();
            while first.elapsed() < API_MAX_DELAY
                && tokio::time::timeout(API_QUIET, changed.notified())
                    .await
                    .is_ok()
            {}
            if tx.send(first).await.is_err() {
                return;
            }
        }
    });
    rx
}

/// Holds (or waits for) the lease; while held, allocates load balancer addresses after every
/// apply and when it is taken. Releases the lease when told to stop.
async fn allocate_addresses(
    client: kube::Client,
    options: ApiOptions,
    stores: ApiStores,
    mut input: tokio::sync::watch::Receiver<AddressInput>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let mut lease = LeaseLock::new(
        client.clone(),
        &options.lease_namespace,
        &options.node_name,
        options.lease_duration,
    );
    let mut writer = AddressWriter::new(client, &options.node_name);
    // client-go renews at a third of the duration; so does this.
    let mut renew = tokio::time::interval(options.lease_duration / 3);
    let mut held = false;
    loop {
        let mut reconcile = false;
        tokio::select! {
            _ = &mut stop => {
                lease.release().await;
                return;
            }
            _ = renew.tick() => {
                let now_held = lease.try_acquire_or_renew().await;
                if now_held != held {
                    if now_held {
                        log::info!(
                            "holding the lease {}/{}: this agent allocates load balancer addresses",
                            options.lease_namespace, kubernetes::LEASE_NAME
                        );
                    } else {
                        log::info!("lost the lease {}: no longer allocating", kubernetes::LEASE_NAME);
                    }
                    held = now_held;
                    reconcile = held;
                }
            }
            changed = input.changed() => {
                if changed.is_err() {
                    return;
                }
                reconcile = held;
            }
        }
        if reconcile {
            let (pools, claims) = input.borrow_and_update().clone();
            writer.reconcile(&stores, &pools, &claims).await;
        }
    }
}

/// The metrics and `/healthz` servers that were asked for; dropping them stops them.
fn start_servers(
    agent: &Rc<RefCell<Agent>>,
    options: &ServeOptions,
    health: &HealthHandle,
) -> anyhow::Result<Vec<Server>> {
    let mut servers = Vec::new();
    if let Some(addr) = options.metrics_addr {
        let agent = Rc::clone(agent);
        let server = health::serve_metrics(addr, move || {
            // Never borrowed across an await, so this only fails if a scrape arrives inside
            // an apply, which a single-threaded runtime does not interleave.
            agent
                .try_borrow()
                .context("the agent is busy")?
                .metrics_text()
        })
        .with_context(|| format!("serving metrics on {addr} (--metrics-addr)"))?;
        log::info!("metrics on http://{}/metrics", server.local_addr());
        servers.push(server);
    }
    if let Some(addr) = options.healthz_addr {
        let server = health::serve_proxy_health(addr, health.clone())
            .with_context(|| format!("serving /healthz on {addr} (--healthz-addr)"))?;
        log::info!(
            "health on http://{}/healthz and /livez",
            server.local_addr()
        );
        servers.push(server);
    }
    Ok(servers)
}

/// Keeps one server per `healthCheckNodePort` of the applied config.
fn sync_health_checks(agent: &Agent, servers: &mut HealthServers) {
    let Some(record) = &agent.record else {
        return;
    };
    for error in servers.sync(health::wanted_service_health(record)) {
        log::warn!("{error}");
    }
}

/// Logs the warnings not in `logged` (a source read again and again, as the API is, would
/// repeat them on every apply); returns them all.
fn log_new_warnings(logged: &BTreeSet<String>, warnings: Vec<String>) -> BTreeSet<String> {
    for warning in &warnings {
        if !logged.contains(warning) {
            log::warn!("{warning}");
        }
    }
    warnings.into_iter().collect()
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
#[must_use]
pub fn summary(state: &DesiredState) -> Vec<String> {
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
        if let Some(allocation) = &port.load_balancer_allocation {
            frontends.push(format!("(loadBalancer {allocation})"));
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
