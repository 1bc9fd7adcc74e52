//! What the agent answers to load balancers and probes, in kube-proxy's contract:
//!
//! - `/healthz` and `/livez` on `--healthz-addr` (kube-proxy's `proxy_health.go`): 200 while
//!   no config change has waited longer than the health timeout for the maps, 503 after;
//!   `/healthz` is also 503 while the node is not eligible (the agent is going away), and from
//!   an apply that failed (the maps hold part of a change, or what they hold is not known) until
//!   an apply succeeds; its body then says how many applies in a row failed and why.
//! - one server per `healthCheckNodePort` of a `externalTrafficPolicy: Local` Service
//!   (`service_health.go`): 200 with the count of ready local endpoints when there is one and
//!   the agent is healthy, 503 otherwise, so external load balancers skip nodes without pods.
//! - `/metrics` on `--metrics-addr`, rendered by the caller.
//!
//! All servers run on `spawn_local` tasks (see `http`): create them inside a `LocalSet`.

use std::{
    cell::RefCell,
    collections::BTreeMap,
    io,
    net::{IpAddr, SocketAddr},
    rc::Rc,
    time::{Duration, SystemTime},
};

use crate::{
    http::{Handler, Response, Server},
    record::{AgentRecord, PolicyName, format_rfc3339},
};

/// kube-proxy's default: twice its 30 s sync period.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_mins(1);

/// The agent's health as kube-proxy defines it, and whether its applies fail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthState {
    timeout: Duration,
    last_updated: Option<SystemTime>,
    /// The oldest config change not yet in the maps.
    oldest_pending: Option<SystemTime>,
    node_eligible: bool,
    /// Applies that failed in a row (0 after one that succeeded), and the last one's error.
    failed_applies: u32,
    apply_error: Option<String>,
}

impl HealthState {
    #[must_use]
    pub fn new(timeout: Duration) -> Self {
        HealthState {
            timeout,
            last_updated: None,
            oldest_pending: None,
            // Eligible while starting, as kube-proxy.
            node_eligible: true,
            failed_applies: 0,
            apply_error: None,
        }
    }

    /// How many applies in a row failed and why the last one did, if the last one failed: the
    /// maps then hold part of a change (or what they hold could not be read back).
    #[must_use]
    pub fn failing(&self) -> Option<(u32, &str)> {
        (self.failed_applies > 0).then(|| {
            (
                self.failed_applies,
                self.apply_error.as_deref().unwrap_or(""),
            )
        })
    }

    /// Healthy unless a change has been pending for the timeout or longer; and the time of the
    /// last update.
    #[must_use]
    pub fn check(&self, now: SystemTime) -> (bool, Option<SystemTime>) {
        let late = self.oldest_pending.is_some_and(|since| {
            now.duration_since(since).unwrap_or(Duration::ZERO) >= self.timeout
        });
        (!late, self.last_updated)
    }
}

/// The agent's handle on its health, shared with the servers.
#[derive(Clone, Debug)]
pub struct HealthHandle(Rc<RefCell<HealthState>>);

impl HealthHandle {
    #[must_use]
    pub fn new(timeout: Duration) -> Self {
        HealthHandle(Rc::new(RefCell::new(HealthState::new(timeout))))
    }

    fn update(&self, f: impl FnOnce(&mut HealthState)) {
        f(&mut self.0.borrow_mut());
    }

    /// A config change was seen and is not yet in the maps (kube-proxy's `QueuedUpdate`).
    pub fn queued_update(&self, at: SystemTime) {
        self.update(|s| {
            s.oldest_pending.get_or_insert(at);
        });
    }

    /// The maps hold the config (kube-proxy's `Updated`); earlier failed applies are over.
    pub fn updated(&self, at: SystemTime) {
        self.update(|s| {
            s.oldest_pending = None;
            s.last_updated = Some(at);
            s.failed_applies = 0;
            s.apply_error = None;
        });
    }

    /// An apply failed with `reason`: the change stays pending (kube-proxy's timeout still runs)
    /// and `/healthz` fails until an apply succeeds.
    pub fn apply_failed(&self, reason: String) {
        self.update(|s| {
            s.failed_applies = s.failed_applies.saturating_add(1);
            s.apply_error = Some(reason);
        });
    }

    /// A config change was refused as invalid: nothing of it reached the maps, so nothing is
    /// pending any more (the refusal shows in logs and metrics). A failed apply before it still
    /// counts: the maps hold what it left.
    pub fn refused(&self) {
        self.update(|s| s.oldest_pending = None);
    }

    /// `false` while the agent is shutting down, so `/healthz` turns 503 and load balancers
    /// drain the node (kube-proxy: a node being deleted).
    pub fn set_node_eligible(&self, eligible: bool) {
        self.update(|s| s.node_eligible = eligible);
    }

    #[must_use]
    pub fn get(&self) -> HealthState {
        self.0.borrow().clone()
    }

    /// kube-proxy's rule and no failed apply: what `healthCheckNodePort` answers report.
    #[must_use]
    pub fn is_healthy(&self, now: SystemTime) -> bool {
        let state = self.0.borrow();
        state.check(now).0 && state.failing().is_none()
    }
}

/// Before the first update kube-proxy prints Go's zero time; this is its RFC 3339 form.
const NEVER: &str = "0001-01-01T00:00:00Z";

fn json_headers() -> Vec<(&'static str, String)> {
    vec![("X-Content-Type-Options", "nosniff".to_owned())]
}

/// The `/healthz` (with `node_eligible`) or `/livez` answer at `now`.
#[must_use]
pub fn proxy_health_response(state: &HealthState, now: SystemTime, is_healthz: bool) -> Response {
    let (healthy, last_updated) = state.check(now);
    // A failed apply fails /healthz (readiness: load balancers skip the node) but not /livez:
    // restarting the agent would not help, and the change pending still times /livez out.
    let failing = state.failing().filter(|_| is_healthz);
    let healthy = healthy && (!is_healthz || state.node_eligible) && failing.is_none();
    // As kube-proxy: a healthy answer reports the current time as the last update, so
    // "lastUpdated is recent" keeps meaning healthy for old clients.
    let last_updated = if healthy {
        format_rfc3339(now)
    } else {
        last_updated.map_or_else(|| NEVER.to_owned(), format_rfc3339)
    };
    let current_time = format_rfc3339(now);
    let body = if let Some((failed, reason)) = failing {
        format!(
            "{{\"lastUpdated\": \"{last_updated}\",\"currentTime\": \"{current_time}\", \"nodeEligible\": {}, \"failedApplies\": {failed}, \"reason\": {}}}",
            state.node_eligible,
            json_string(&if failed == 1 {
                format!("the last apply failed: {reason}")
            } else {
                format!("the last {failed} applies failed: {reason}")
            }),
        )
    } else if is_healthz {
        format!(
            "{{\"lastUpdated\": \"{last_updated}\",\"currentTime\": \"{current_time}\", \"nodeEligible\": {}}}",
            state.node_eligible
        )
    } else {
        format!("{{\"lastUpdated\": \"{last_updated}\",\"currentTime\": \"{current_time}\"}}")
    };
    Response {
        status: if healthy { 200 } else { 503 },
        content_type: "application/json",
        headers: json_headers(),
        body,
    }
}

/// Serves `/healthz` and `/livez` on `addr` (kube-proxy's default is `0.0.0.0:10256`).
pub fn serve_proxy_health(addr: SocketAddr, health: HealthHandle) -> io::Result<Server> {
    let handler: Handler = Rc::new(move |path| {
        let healthz = match path {
            "/healthz" => true,
            "/livez" => false,
            _ => return None,
        };
        Some(proxy_health_response(
            &health.get(),
            SystemTime::now(),
            healthz,
        ))
    });
    Server::start(addr, handler)
}

/// Serves `/metrics` on `addr` with the body `render` returns at each scrape; an error is a
/// 500 with its message (Prometheus then marks the scrape failed).
pub fn serve_metrics(
    addr: SocketAddr,
    render: impl Fn() -> anyhow::Result<String> + 'static,
) -> io::Result<Server> {
    let handler: Handler = Rc::new(move |path| {
        (path == "/metrics").then(|| match render() {
            Ok(body) => Response {
                status: 200,
                content_type: crate::metrics::CONTENT_TYPE,
                headers: Vec::new(),
                body,
            },
            Err(e) => Response::text(500, format!("reading the data plane failed: {e:#}\n")),
        })
    });
    Server::start(addr, handler)
}

/// What a `healthCheckNodePort` answers for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceHealth {
    pub namespace: String,
    pub name: String,
    /// Ready endpoints on this node, unique across the Service's ports.
    pub local_endpoints: usize,
}

/// The health-check servers `record` calls for: each Service with a `healthCheckNodePort` and
/// an `externalTrafficPolicy: Local` port, by port.
#[must_use]
pub fn wanted_service_health(record: &AgentRecord) -> BTreeMap<u16, ServiceHealth> {
    let mut wanted = BTreeMap::new();
    for service in &record.services {
        let Some(port) = service
            .ports
            .iter()
            .filter(|p| p.external_policy == PolicyName::Local)
            .find_map(|p| p.health_check_node_port)
        else {
            continue;
        };
        wanted.insert(
            port,
            ServiceHealth {
                namespace: service.namespace.clone(),
                name: service.name.clone(),
                local_endpoints: service.local_ready_endpoints(),
            },
        );
    }
    wanted
}

/// kube-proxy's answer for a `healthCheckNodePort`, body laid out as kube-proxy writes it.
#[must_use]
pub fn service_health_response(service: &ServiceHealth, proxy_healthy: bool) -> Response {
    let body = format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {},\n\t\"serviceProxyHealthy\": {}\n}}",
        json_string(&service.namespace),
        json_string(&service.name),
        service.local_endpoints,
        proxy_healthy
    );
    let mut headers = json_headers();
    headers.push((
        "X-Load-Balancing-Endpoint-Weight",
        service.local_endpoints.to_string(),
    ));
    Response {
        status: if service.local_endpoints > 0 && proxy_healthy {
            200
        } else {
            503
        },
        content_type: "application/json",
        headers,
        body,
    }
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}

/// A bind that failed during `HealthServers::sync`; the port is retried at the next sync.
#[derive(Debug)]
pub struct BindError {
    pub port: u16,
    pub service: String,
    pub error: io::Error,
}

impl std::fmt::Display for BindError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "healthCheckNodePort {} of Service {}: listening failed: {}; is another process \
             (an old agent, kube-proxy) using the port?",
            self.port, self.service, self.error
        )
    }
}

struct Listener {
    server: Server,
    service: Rc<RefCell<ServiceHealth>>,
}

/// The `healthCheckNodePort` servers, kept in line with the config.
pub struct HealthServers {
    bind_ip: IpAddr,
    health: HealthHandle,
    listeners: BTreeMap<u16, Listener>,
}

impl HealthServers {
    /// Servers will listen on `bind_ip` (kube-proxy: every address, `0.0.0.0`).
    #[must_use]
    pub fn new(bind_ip: IpAddr, health: HealthHandle) -> Self {
        HealthServers {
            bind_ip,
            health,
            listeners: BTreeMap::new(),
        }
    }

    /// Listens on the ports of `wanted` and no others. Listeners that stay keep running and
    /// only take the new Service and count. Must be called inside a `LocalSet`.
    pub fn sync(&mut self, wanted: BTreeMap<u16, ServiceHealth>) -> Vec<BindError> {
        self.listeners.retain(|port, _| wanted.contains_key(port));
        let mut errors = Vec::new();
        for (port, service) in wanted {
            if let Some(listener) = self.listeners.get(&port) {
                *listener.service.borrow_mut() = service;
                continue;
            }
            let shared = Rc::new(RefCell::new(service));
            let handler_service = Rc::clone(&shared);
            let health = self.health.clone();
            // kube-proxy answers every path and method the same way; so does this, for GET.
            let handler: Handler = Rc::new(move |_path| {
                Some(service_health_response(
                    &handler_service.borrow(),
                    health.is_healthy(SystemTime::now()),
                ))
            });
            match Server::start(SocketAddr::new(self.bind_ip, port), handler) {
                Ok(server) => {
                    self.listeners.insert(
                        port,
                        Listener {
                            server,
                            service: shared,
                        },
                    );
                }
                Err(error) => {
                    let s = shared.borrow();
                    errors.push(BindError {
                        port,
                        service: format!("{}/{}", s.namespace, s.name),
                        error,
                    });
                }
            }
        }
        errors
    }

    /// The ports listened on, with their bound addresses.
    #[must_use]
    pub fn listening(&self) -> Vec<(u16, SocketAddr)> {
        self.listeners
            .iter()
            .map(|(port, l)| (*port, l.server.local_addr()))
            .collect()
    }
}

#[cfg(test)]
mod tests;
