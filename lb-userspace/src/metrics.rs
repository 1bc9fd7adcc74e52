//! The Prometheus text exposition (format 0.0.4) of a `Status` and of the agent's own
//! counters: what `--metrics-addr` serves at `/metrics`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    time::Duration,
};

use crate::report::{PortStatus, ServiceStatus, Status};

/// The `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bounds (seconds) of the apply-duration buckets: 1 ms to 10 s, 1-2.5-5 steps.
pub const APPLY_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A Prometheus histogram with fixed buckets (cumulative counts are made when rendering).
#[derive(Clone, Debug, PartialEq)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative); the last one is `+Inf`.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    #[must_use]
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, seconds: f64) {
        let bucket = self
            .bounds
            .iter()
            .position(|&le| seconds <= le)
            .unwrap_or(self.bounds.len());
        if let Some(n) = self.counts.get_mut(bucket) {
            *n = n.saturating_add(1);
        }
        self.sum += seconds;
        self.count = self.count.saturating_add(1);
    }

    /// `(le, cumulative count)` for every bucket, ending with `+Inf`.
    #[must_use]
    pub fn cumulative(&self) -> Vec<(String, u64)> {
        let mut running = 0u64;
        self.counts
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                running = running.saturating_add(n);
                let le = self
                    .bounds
                    .get(i)
                    .map_or_else(|| "+Inf".to_owned(), |b| format_float(*b));
                (le, running)
            })
            .collect()
    }

    #[must_use]
    pub fn sum(&self) -> f64 {
        self.sum
    }

    #[must_use]
    pub fn count(&self) -> u64 {
        self.count
    }
}

/// Where a config change came from: the `source` label of the apply latency.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ChangeSource {
    /// The config file or directory changed (inotify).
    File,
    /// A watch event from the Kubernetes API.
    Api,
    /// SIGHUP.
    Signal,
}

impl ChangeSource {
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            ChangeSource::File => "file",
            ChangeSource::Api => "api",
            ChangeSource::Signal => "signal",
        }
    }
}

/// What the agent counts about itself, across reloads.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentMetrics {
    /// From a config change seen to the maps updated, per source of the change (the agent's
    /// own source from the start, the others once they have happened).
    pub apply_duration: BTreeMap<ChangeSource, Histogram>,
    pub reloads_applied: u64,
    pub reloads_refused: u64,
    /// Applies that failed (a map write refused): retried until one succeeds.
    pub reloads_failed: u64,
}

impl AgentMetrics {
    /// Counts nothing yet; the latency of changes from `source` is exported from the start (as
    /// zeros), so a dashboard's `rate()` has a series before the first change.
    #[must_use]
    pub fn new(source: ChangeSource) -> Self {
        AgentMetrics {
            apply_duration: BTreeMap::from([(source, Histogram::new(&APPLY_BUCKETS))]),
            reloads_applied: 0,
            reloads_refused: 0,
            reloads_failed: 0,
        }
    }

    /// A config change from `source` reached the maps after `took`.
    pub fn applied(&mut self, source: ChangeSource, took: Duration) {
        self.reloads_applied = self.reloads_applied.saturating_add(1);
        self.apply_duration
            .entry(source)
            .or_insert_with(|| Histogram::new(&APPLY_BUCKETS))
            .observe(took.as_secs_f64());
    }

    /// A config change was refused; the running state stayed.
    pub fn refused(&mut self) {
        self.reloads_refused = self.reloads_refused.saturating_add(1);
    }

    /// Applying a config change failed partway; it is retried.
    pub fn failed(&mut self) {
        self.reloads_failed = self.reloads_failed.saturating_add(1);
    }
}

/// Prometheus floats: integers without a fraction, others in Rust's shortest round-trip form.
fn format_float(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else {
        format!("{v}")
    }
}

/// A label value with `\`, `"` and newlines escaped, as the format requires.
fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Collects families in order; each family's HELP and TYPE come before its samples.
struct Exposition {
    out: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: &str) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

/// The labels that name a service port.
fn port_labels<'a>(
    service: &'a ServiceStatus,
    port: &'a PortStatus,
) -> Vec<(&'static str, &'a str)> {
    vec![
        ("namespace", service.namespace.as_str()),
        ("service", service.name.as_str()),
        ("port", port.name.as_str()),
        ("protocol", port.protocol.as_str()),
    ]
}

/// The whole `/metrics` body.
#[must_use]
#[expect(
    clippy::too_many_lines,
    reason = "one block per metric family, in the order they are exposed"
)]
pub fn render_prometheus(status: &Status, agent: &AgentMetrics) -> String {
    let mut e = Exposition { out: String::new() };

    // Per backend. An address:port listed twice for one port would repeat a label set, which
    // Prometheus rejects: the first listing wins.
    let mut backends = Vec::new();
    for service in &status.services {
        for port in &service.ports {
            let mut seen = BTreeSet::new();
            for b in &port.backends {
                if seen.insert((b.addr, b.port)) {
                    backends.push((service, port, format!("{}:{}", b.addr, b.port), b));
                }
            }
        }
    }
    e.family(
        "lbagent_backend_packets_total",
        "counter",
        "Packets translated for a backend, by direction (forward: client to backend; reply: backend to client).",
    );
    for (service, port, backend, b) in &backends {
        for (direction, value) in [
            ("forward", b.traffic.forward_packets),
            ("reply", b.traffic.reply_packets),
        ] {
            let mut labels = port_labels(service, port);
            labels.extend([("backend", backend.as_str()), ("direction", direction)]);
            e.sample("lbagent_backend_packets_total", &labels, &value.to_string());
        }
    }
    e.family(
        "lbagent_backend_bytes_total",
        "counter",
        "Bytes translated for a backend, by direction.",
    );
    for (service, port, backend, b) in &backends {
        for (direction, value) in [
            ("forward", b.traffic.forward_bytes),
            ("reply", b.traffic.reply_bytes),
        ] {
            let mut labels = port_labels(service, port);
            labels.extend([("backend", backend.as_str()), ("direction", direction)]);
            e.sample("lbagent_backend_bytes_total", &labels, &value.to_string());
        }
    }
    e.family(
        "lbagent_backend_flows",
        "gauge",
        "Tracked flows (connections) to a backend.",
    );
    for (service, port, backend, b) in &backends {
        let mut labels = port_labels(service, port);
        labels.push(("backend", backend.as_str()));
        e.sample("lbagent_backend_flows", &labels, &b.flows.to_string());
    }

    // Per service port.
    let ports: Vec<_> = status
        .services
        .iter()
        .flat_map(|s| s.ports.iter().map(move |p| (s, p)))
        .collect();
    e.family(
        "lbagent_service_packets_total",
        "counter",
        "Packets translated for a Service port, summed over its backends, by direction.",
    );
    for (service, port) in &ports {
        for (direction, value) in [
            ("forward", port.traffic.forward_packets),
            ("reply", port.traffic.reply_packets),
        ] {
            let mut labels = port_labels(service, port);
            labels.push(("direction", direction));
            e.sample("lbagent_service_packets_total", &labels, &value.to_string());
        }
    }
    e.family(
        "lbagent_service_bytes_total",
        "counter",
        "Bytes translated for a Service port, summed over its backends, by direction.",
    );
    for (service, port) in &ports {
        for (direction, value) in [
            ("forward", port.traffic.forward_bytes),
            ("reply", port.traffic.reply_bytes),
        ] {
            let mut labels = port_labels(service, port);
            labels.push(("direction", direction));
            e.sample("lbagent_service_bytes_total", &labels, &value.to_string());
        }
    }
    e.family(
        "lbagent_service_flows",
        "gauge",
        "Tracked flows (connections) of a Service port.",
    );
    for (service, port) in &ports {
        e.sample(
            "lbagent_service_flows",
            &port_labels(service, port),
            &port.flows.to_string(),
        );
    }
    e.family(
        "lbagent_flows",
        "gauge",
        "Tracked flows (connections) of all Services.",
    );
    e.sample("lbagent_flows", &[], &status.flows.to_string());

    // Data plane counters.
    e.family(
        "lbagent_drops_total",
        "counter",
        "Packets the data plane dropped, by reason.",
    );
    for (reason, n) in &status.drops {
        e.sample("lbagent_drops_total", &[("reason", reason)], &n.to_string());
    }
    e.family(
        "lbagent_xdp_egress_total",
        "counter",
        "Packets XDP translated, by how they left: sent by XDP (xdp_tx, xdp_redirect) or handed \
         to the stack and why (see the README's egress list).",
    );
    for (how, n) in &status.egress {
        e.sample("lbagent_xdp_egress_total", &[("how", how)], &n.to_string());
    }
    e.family(
        "lbagent_packets_total",
        "counter",
        "Packets the data plane saw, by what happened to them (see the README's counter list).",
    );
    for (outcome, n) in &status.counters {
        e.sample(
            "lbagent_packets_total",
            &[("outcome", outcome)],
            &n.to_string(),
        );
    }

    // The agent.
    e.family(
        "lbagent_config_generation",
        "gauge",
        "Config applies that changed something since the data plane was first loaded (kept across agent restarts with --pin-dir).",
    );
    e.sample(
        "lbagent_config_generation",
        &[],
        &status.generation.to_string(),
    );
    e.family(
        "lbagent_config_apply_duration_seconds",
        "histogram",
        "Time from a config change seen (source: file, api, signal) to the maps updated.",
    );
    for (source, h) in &agent.apply_duration {
        let source = ("source", source.label());
        for (le, n) in h.cumulative() {
            e.sample(
                "lbagent_config_apply_duration_seconds_bucket",
                &[source, ("le", &le)],
                &n.to_string(),
            );
        }
        e.sample(
            "lbagent_config_apply_duration_seconds_sum",
            &[source],
            &format_float(h.sum()),
        );
        e.sample(
            "lbagent_config_apply_duration_seconds_count",
            &[source],
            &h.count().to_string(),
        );
    }
    e.family(
        "lbagent_config_reloads_total",
        "counter",
        "Config changes applied, refused (invalid; the running state stayed), or failed (a map write failed partway; retried).",
    );
    e.sample(
        "lbagent_config_reloads_total",
        &[("result", "applied")],
        &agent.reloads_applied.to_string(),
    );
    e.sample(
        "lbagent_config_reloads_total",
        &[("result", "refused")],
        &agent.reloads_refused.to_string(),
    );
    e.sample(
        "lbagent_config_reloads_total",
        &[("result", "failed")],
        &agent.reloads_failed.to_string(),
    );
    e.family(
        "lbagent_interface_attached",
        "gauge",
        "Interfaces the data plane is attached to (mode: XDP mode of a node interface, tc for a pod interface).",
    );
    for i in &status.interfaces {
        let mode = i.xdp_mode.as_deref().unwrap_or("tc");
        e.sample(
            "lbagent_interface_attached",
            &[("interface", &i.name), ("mode", mode)],
            "1",
        );
    }
    e.out
}

#[cfg(test)]
mod tests;
