//! The Kubernetes API as the config source: Services, `EndpointSlices` and this node's Node,
//! watched with kube-rs, read through the same reader as the files (`config::read_objects`), so
//! both sources share one path from objects to maps.
//!
//! - The watchers (kube-runtime) list, then watch; a watch that expires (410 Gone) or breaks is
//!   listed again with backoff, and the stores swap in the new list at once, so a relist that
//!   finds nothing new leads to an apply that writes nothing. While the API server is away the
//!   stores keep their last state and so does the data plane.
//! - Every event only marks the stores changed; the agent applies them after a short quiet
//!   period, so a burst of updates is one apply.
//! - An object the reader refuses (the API server accepted it, but lb-agent cannot serve it, a
//!   nodePort outside `nodePortRange` say) is left out with a warning; the rest is applied. A
//!   bad settings file refuses the whole apply, as with files.
//! - Load balancer addresses: the agent that holds the lease allocates them from the pools
//!   ([`crate::ipam`]) and writes `status.loadBalancer.ingress`; every agent serves what the
//!   status says.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use k8s_openapi::{
    api::{
        coordination::v1::{Lease, LeaseSpec},
        core::v1::{Event, Node, ObjectReference, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    api::{Patch, PatchParams, PostParams},
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        watcher,
    },
};
use tokio::sync::Notify;

use crate::{
    config::{self, Allocation, Loaded},
    ipam,
};

/// What `run --kubernetes` was given.
#[derive(Clone, Debug)]
pub struct ApiOptions {
    /// `None`: in-cluster config (service account), or `KUBECONFIG` / `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    pub node_name: String,
    /// The lease that picks the one agent writing load balancer addresses.
    pub lease_namespace: String,
    pub lease_duration: Duration,
}

/// The name of the lease the allocating agent holds.
pub const LEASE_NAME: &str = "lb-agent-ipam";
/// Who writes Events and status: the `reportingComponent` and field manager.
pub const COMPONENT: &str = "lb-agent";
/// Labels the API server filters by, as kube-proxy asks: no other proxy's Services, no headless
/// Services' slices. The reader checks the same again.
const SERVICE_SELECTOR: &str = "!service.kubernetes.io/service-proxy-name";
const SLICE_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// A client for the API server: from `--kubeconfig`, else inferred (in-cluster first).
pub async fn connect(options: &ApiOptions) -> anyhow::Result<Client> {
    let config = match &options.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(
                kubeconfig,
                &kube::config::KubeConfigOptions::default(),
            )
            .await
            .with_context(|| format!("the kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer().await.context(
            "no Kubernetes config: not in a pod (KUBERNETES_SERVICE_HOST unset) and no \
             kubeconfig; pass --kubeconfig",
        )?,
    };
    Client::try_from(config).context("creating the Kubernetes client")
}

/// The objects watched, as last listed and watched.
#[derive(Clone)]
pub struct ApiStores {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    nodes: Store<Node>,
    /// Notified on every change of any store.
    pub changed: Arc<Notify>,
}

impl ApiStores {
    /// Starts the three watchers (on the current tokio runtime); they run for the life of the
    /// process, retrying with backoff.
    #[must_use]
    pub fn watch(client: &Client, node_name: &str) -> Self {
        let changed = Arc::new(Notify::new());
        let services = spawn_watcher(
            Api::<Service>::all(client.clone()),
            watcher::Config::default().labels(SERVICE_SELECTOR),
            &changed,
        );
        let slices = spawn_watcher(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default().labels(SLICE_SELECTOR),
            &changed,
        );
        let nodes = spawn_watcher(
            Api::<Node>::all(client.clone()),
            watcher::Config::default().fields(&format!("metadata.name={node_name}")),
            &changed,
        );
        ApiStores {
            services,
            slices,
            nodes,
            changed,
        }
    }

    /// Waits until each watcher has listed once.
    pub async fn synced(&self) -> anyhow::Result<()> {
        let lost = "a watcher stopped before its first list";
        self.services.wait_until_ready().await.context(lost)?;
        self.slices.wait_until_ready().await.context(lost)?;
        self.nodes.wait_until_ready().await.context(lost)?;
        Ok(())
    }

    /// This node's IPv4 addresses from its Node object: `InternalIP`s, then `ExternalIP`s.
    #[must_use]
    pub fn node_addresses(&self) -> Vec<Ipv4Addr> {
        let mut addrs = Vec::new();
        for kind in ["InternalIP", "ExternalIP"] {
            for node in self.nodes.state() {
                let listed = node.status.as_ref().and_then(|s| s.addresses.as_ref());
                addrs.extend(
                    listed
                        .into_iter()
                        .flatten()
                        .filter(|a| a.type_ == kind)
                        .filter_map(|a| a.address.parse::<Ipv4Addr>().ok()),
                );
            }
        }
        addrs
    }

    /// The Services now, for the allocator.
    fn services(&self) -> Vec<Arc<Service>> {
        self.services.state()
    }

    /// Reads the objects (and the settings files) as one config. Objects the reader refuses
    /// are left out, each with a warning naming it and why.
    pub fn read(
        &self,
        settings: &[(PathBuf, String)],
        node_ips: &[Ipv4Addr],
        interface_ips: &[Ipv4Addr],
    ) -> anyhow::Result<Loaded> {
        let from_node = self.node_addresses();
        let discovered = if from_node.is_empty() {
            interface_ips
        } else {
            &from_node
        };
        let mut left_out = Vec::new();
        let mut refused = BTreeSet::new();
        // A check across objects (two Services claiming one address and port) reports one
        // side; leaving it out settles it, but another round checks that: bounded.
        for _ in 0..4 {
            let input = self.objects(&refused)?;
            match config::read_objects(settings, input, node_ips, discovered, Allocation::ByStatus)
            {
                Ok(mut loaded) => {
                    loaded.warnings.extend(left_out);
                    return Ok(loaded);
                }
                Err(problems) => {
                    for problem in &problems {
                        if !problem.location.file.starts_with(API_PATH) {
                            bail!(config::ConfigError::Invalid {
                                path: problem.location.file.clone(),
                                problems,
                            });
                        }
                        refused.insert(problem.location.file.clone());
                        left_out.push(format!("left out: {problem}"));
                    }
                }
            }
        }
        bail!("the objects from the API still had problems after leaving out the ones named")
    }
}

impl ApiStores {
    /// The stores' objects as the reader takes them, named by [`object_path`], but for
    /// `refused`.
    fn objects(
        &self,
        refused: &BTreeSet<PathBuf>,
    ) -> anyhow::Result<Vec<(PathBuf, serde_yaml::Value)>> {
        let services = self
            .services
            .state()
            .into_iter()
            .map(|s| (object_path("Service", &*s), to_value(&*s)));
        let slices = self
            .slices
            .state()
            .into_iter()
            .map(|s| (object_path("EndpointSlice", &*s), to_value(&*s)));
        services
            .chain(slices)
            .filter(|(path, _)| !refused.contains(path))
            .map(|(path, value)| Ok((path, value?)))
            .collect()
    }
}

/// Where API objects are said to be in problems and warnings: `<api>/KIND/NAMESPACE/NAME` (no
/// file is named like that, as `config::INPUT_NAME` is not).
const API_PATH: &str = "<api>";

fn object_path<K: Resource>(kind: &str, object: &K) -> PathBuf {
    Path::new(API_PATH)
        .join(kind)
        .join(object.namespace().unwrap_or_default())
        .join(object.name_any())
}

fn to_value<K: serde::Serialize>(object: &K) -> anyhow::Result<serde_yaml::Value> {
    serde_yaml::to_value(object).context("converting an API object")
}

/// Runs one watcher into a store, notifying `changed` on every change; errors are logged
/// (once per outage) and retried with kube-runtime's default backoff.
fn spawn_watcher<K>(api: Api<K>, config: watcher::Config, changed: &Arc<Notify>) -> Store<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let changed = Arc::clone(changed);
    let kind = K::kind(&());
    let stream = watcher(api, config).default_backoff().reflect(writer);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut failing = false;
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => {
                    if failing {
                        log::info!("watching {kind}s works again");
                        failing = false;
                    }
                    if matches!(
                        event,
                        watcher::Event::Apply(_)
                            | watcher::Event::Delete(_)
                            | watcher::Event::InitDone
                    ) {
                        changed.notify_one();
                    }
                }
                Err(error) => {
                    if failing {
                        log::debug!("watching {kind}s: {error}");
                    } else {
                        log::warn!(
                            "watching {kind}s failed, retrying with backoff; the data plane \
                             keeps serving what it has: {error}"
                        );
                    }
                    failing = true;
                }
            }
        }
    });
    store
}

/// Whether the text of a settings file has anything but the settings document: with
/// `--kubernetes` the Services come from the API only.
pub fn check_settings_only(settings: &[(PathBuf, String)]) -> anyhow::Result<()> {
    for (file, text) in settings {
        for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let value =
                serde::Deserialize::deserialize(document).unwrap_or(serde_yaml::Value::Null);
            let kind = value.get("kind").and_then(serde_yaml::Value::as_str);
            if value.is_null() || kind == Some(config::SETTINGS_KIND) {
                continue;
            }
            bail!(
                "{}, document {}: with --kubernetes the config holds only the {} document \
                 (Services and EndpointSlices come from the API); found {}",
                file.display(),
                index + 1,
                config::SETTINGS_KIND,
                kind.unwrap_or("a document without kind")
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The lease: one agent allocates load balancer addresses.
// ---------------------------------------------------------------------------------------------

/// A `coordination.k8s.io/v1` Lease held by one agent at a time, as client-go's leader
/// election: the holder renews it; another takes it over when it has not changed for a lease
/// duration by the other's own clock (so clocks need not agree).
pub struct LeaseLock {
    api: Api<Lease>,
    identity: String,
    duration: Duration,
    /// The lease as last seen (holder, renew time, resourceVersion) and when it last changed.
    observed: Option<(String, Instant)>,
    /// When this agent last renewed it, if it holds it.
    renewed: Option<Instant>,
}

impl LeaseLock {
    #[must_use]
    pub fn new(client: Client, namespace: &str, identity: &str, duration: Duration) -> Self {
        LeaseLock {
            api: Api::namespaced(client, namespace),
            identity: identity.to_owned(),
            duration,
            observed: None,
            renewed: None,
        }
    }

    /// Whether this agent holds the lease: renewed within a lease duration.
    #[must_use]
    pub fn is_held(&self) -> bool {
        self.renewed.is_some_and(|at| at.elapsed() < self.duration)
    }

    /// Takes or renews the lease if it can; returns whether this agent holds it.
    pub async fn try_acquire_or_renew(&mut self) -> bool {
        match self.acquire_or_renew().await {
            Ok(held) => {
                self.renewed = held.then(Instant::now);
                held
            }
            Err(error) => {
                log::debug!("lease {LEASE_NAME}: {error:#}");
                self.is_held()
            }
        }
    }

    async fn acquire_or_renew(&mut self) -> anyhow::Result<bool> {
        let now = MicroTime(Timestamp::now());
        let seconds = i32::try_from(self.duration.as_secs())
            .unwrap_or(i32::MAX)
            .max(1);
        let Some(mut lease) = self.api.get_opt(LEASE_NAME).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(LEASE_NAME.to_owned()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return Ok(Self::written(
                self.api.create(&PostParams::default(), &lease).await,
            )?);
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.clone().unwrap_or_default();
        // What changes on every renewal; seen unchanged for a lease duration = expired.
        let version = format!(
            "{holder}/{}",
            lease
                .metadata
                .resource_version
                .as_deref()
                .unwrap_or_default()
        );
        if self
            .observed
            .as_ref()
            .is_none_or(|(seen, _)| *seen != version)
        {
            self.observed = Some((version, Instant::now()));
        }
        let expired = self
            .observed
            .as_ref()
            .is_some_and(|(_, since)| since.elapsed() >= self.duration);
        if holder != self.identity && !holder.is_empty() && !expired {
            return Ok(false);
        }
        if holder != self.identity {
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = Some(now);
        spec.lease_duration_seconds = Some(seconds);
        let replaced = self
            .api
            .replace(LEASE_NAME, &PostParams::default(), &lease)
            .await;
        Ok(Self::written(replaced)?)
    }

    /// A create or replace: a conflict means another agent got there first.
    fn written(result: kube::Result<Lease>) -> kube::Result<bool> {
        match result {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.is_conflict() || status.code == 409 => {
                Ok(false)
            }
            Err(error) => Err(error),
        }
    }

    /// Gives the lease up (on shutdown), so another agent need not wait for it to expire.
    pub async fn release(&mut self) {
        if !self.is_held() {
            return;
        }
        self.renewed = None;
        let Ok(Some(mut lease)) = self.api.get_opt(LEASE_NAME).await else {
            return;
        };
        if let Some(spec) = lease.spec.as_mut()
            && spec.holder_identity.as_deref() == Some(&self.identity)
        {
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            match self
                .api
                .replace(LEASE_NAME, &PostParams::default(), &lease)
                .await
            {
                Ok(_) => log::info!("released the lease {LEASE_NAME}"),
                Err(error) => log::warn!("releasing the lease {LEASE_NAME}: {error}"),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The allocator: what the lease holder writes.
// ---------------------------------------------------------------------------------------------

/// Writes load balancer addresses to the Services' status and reports conflicts as Events. Run
/// only by the lease holder.
pub struct AddressWriter {
    client: Client,
    node_name: String,
    /// The last conflict reported per Service, so one is reported once, not on every apply.
    reported: BTreeMap<String, String>,
}

impl AddressWriter {
    #[must_use]
    pub fn new(client: Client, node_name: &str) -> Self {
        AddressWriter {
            client,
            node_name: node_name.to_owned(),
            reported: BTreeMap::new(),
        }
    }

    /// Allocates for `claims` and writes every status that differs; releases pool addresses
    /// held by Services that no longer claim (type changed, class changed). Returns the
    /// number of writes.
    pub async fn reconcile(
        &mut self,
        stores: &ApiStores,
        pools: &[ipam::Pool],
        claims: &[ipam::Claim],
    ) -> usize {
        let outcomes = ipam::allocate(pools, claims);
        self.reported
            .retain(|service, _| outcomes.contains_key(service));
        let mut writes = 0;
        let claimed: BTreeSet<&str> = claims.iter().map(|c| c.service.as_str()).collect();
        for service in stores.services() {
            let key = format!(
                "{}/{}",
                service.namespace().unwrap_or_default(),
                service.name_any()
            );
            let current = status_addresses(&service);
            let wanted: Vec<Ipv4Addr> = match outcomes.get(&key) {
                Some(ipam::Outcome::Addresses { addrs, .. }) => addrs.clone(),
                Some(ipam::Outcome::Conflict(_)) => Vec::new(),
                // Not a claimant: release what it holds of the pools, leave the rest alone.
                None if !claimed.contains(key.as_str())
                    && current.iter().any(|a| pools.iter().any(|p| p.contains(*a))) =>
                {
                    Vec::new()
                }
                None => continue,
            };
            if let Some(ipam::Outcome::Conflict(why)) = outcomes.get(&key) {
                if self.reported.get(&key) != Some(why) {
                    self.event(&service, "Warning", "AllocationFailed", why)
                        .await;
                    self.reported.insert(key.clone(), why.clone());
                }
            } else {
                self.reported.remove(&key);
            }
            if current == wanted {
                continue;
            }
            if self.write_status(&service, &wanted).await {
                writes += 1;
                let (reason, message) = if wanted.is_empty() {
                    (
                        "AddressReleased",
                        "load balancer address released".to_owned(),
                    )
                } else {
                    let pool = match outcomes.get(&key) {
                        Some(ipam::Outcome::Addresses { pool, .. }) => pool.as_str(),
                        _ => "",
                    };
                    (
                        "AddressAllocated",
                        format!(
                            "load balancer address {} from pool {pool}",
                            ipam::join_addrs(&wanted)
                        ),
                    )
                };
                log::info!(service = key.as_str(); "{message}");
                self.event(&service, "Normal", reason, &message).await;
            }
        }
        writes
    }

    async fn write_status(&self, service: &Service, addrs: &[Ipv4Addr]) -> bool {
        let api: Api<Service> = Api::namespaced(
            self.client.clone(),
            &service.namespace().unwrap_or_default(),
        );
        let ingress: Vec<serde_json::Value> = addrs
            .iter()
            .map(|a| serde_json::json!({"ip": a.to_string(), "ipMode": "VIP"}))
            .collect();
        // `null` removes the list (a JSON merge patch), an empty list would keep an empty one.
        let ingress = if ingress.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::Value::Array(ingress)
        };
        let patch = serde_json::json!({"status": {"loadBalancer": {"ingress": ingress}}});
        match api
            .patch_status(
                &service.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => true,
            Err(error) => {
                log::warn!(
                    "writing the load balancer status of {}/{}: {error}",
                    service.namespace().unwrap_or_default(),
                    service.name_any()
                );
                false
            }
        }
    }

    /// A core/v1 Event on the Service, as `kubectl describe service` shows them.
    async fn event(&self, service: &Service, kind: &str, reason: &str, message: &str) {
        let namespace = service.namespace().unwrap_or_default();
        let now = Timestamp::now();
        let event = Event {
            metadata: ObjectMeta {
                generate_name: Some(format!("{}.", service.name_any())),
                namespace: Some(namespace.clone()),
                ..ObjectMeta::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some("Service".to_owned()),
                name: Some(service.name_any()),
                namespace: Some(namespace.clone()),
                uid: service.uid(),
                resource_version: service.resource_version(),
                ..ObjectReference::default()
            },
            type_: Some(kind.to_owned()),
            reason: Some(reason.to_owned()),
            message: Some(message.to_owned()),
            count: Some(1),
            first_timestamp: Some(Time(now)),
            last_timestamp: Some(Time(now)),
            reporting_component: Some(COMPONENT.to_owned()),
            reporting_instance: Some(self.node_name.clone()),
            source: Some(k8s_openapi::api::core::v1::EventSource {
                component: Some(COMPONENT.to_owned()),
                host: Some(self.node_name.clone()),
            }),
            ..Event::default()
        };
        let api: Api<Event> = Api::namespaced(self.client.clone(), &namespace);
        if let Err(error) = api.create(&PostParams::default(), &event).await {
            log::warn!(
                "creating an Event for {namespace}/{}: {error}",
                service.name_any()
            );
        }
    }
}

/// The IPv4 addresses of a Service's `status.loadBalancer.ingress`.
fn status_addresses(service: &Service) -> Vec<Ipv4Addr> {
    service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|ingress| ingress.ip.as_deref()?.parse().ok())
        .collect()
}
