#![expect(
    clippy::float_cmp,
    reason = "sample values are integer counts, exact in f64"
)]

use std::collections::BTreeMap;

use super::*;
use crate::report::tests::sample_snapshot;

/// One sample line, parsed back.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses a label block body (`a="x",b="y\"z"`), undoing the escapes.
fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut chars = text.chars().peekable();
    while chars.peek().is_some() {
        let name: String = chars.by_ref().take_while(|&c| c != '=').collect();
        assert_eq!(
            chars.next(),
            Some('"'),
            "label {name} value is quoted in {text}"
        );
        let mut value = String::new();
        loop {
            match chars.next() {
                Some('\\') => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(c @ ('\\' | '"')) => value.push(c),
                    other => panic!("bad escape {other:?} in {text}"),
                },
                Some('"') => break,
                Some(c) => value.push(c),
                None => panic!("unterminated label value in {text}"),
            }
        }
        assert!(
            labels.insert(name.clone(), value).is_none(),
            "label {name} twice"
        );
        match chars.next() {
            Some(',') | None => {}
            other => panic!("expected , after a label, got {other:?} in {text}"),
        }
    }
    labels
}

/// Parses the exposition, checking every sample's family was declared (HELP and TYPE) before
/// it, and that no family is declared twice.
fn parse(text: &str) -> (Vec<Sample>, BTreeMap<String, String>) {
    let mut helps = std::collections::BTreeSet::new();
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = Vec::new();
    assert!(text.ends_with('\n'), "exposition ends with a newline");
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or_else(|| panic!("{line}"));
            assert!(!help.is_empty());
            assert!(helps.insert(name.to_owned()), "HELP twice: {name}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or_else(|| panic!("{line}"));
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            assert!(helps.contains(name), "TYPE before HELP: {line}");
            assert!(
                types.insert(name.to_owned(), kind.to_owned()).is_none(),
                "TYPE twice: {name}"
            );
            continue;
        }
        assert!(
            !line.starts_with('#') && !line.is_empty(),
            "stray line {line:?}"
        );
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (
                name,
                parse_labels(rest.strip_suffix('}').unwrap_or_else(|| panic!("{line}"))),
            ),
            None => (series, BTreeMap::new()),
        };
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "metric name {name}"
        );
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|e| panic!("value of {line}: {e}")),
        };
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                name.strip_suffix(suffix)
                    .filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(name);
        assert!(types.contains_key(family), "sample before its TYPE: {line}");
        if types[family].as_str() == "counter" {
            assert!(
                family.ends_with("_total"),
                "counter {family} ends in _total"
            );
        }
        samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    (samples, types)
}

fn find<'a>(samples: &'a [Sample], name: &str, labels: &[(&str, &str)]) -> &'a Sample {
    let matching: Vec<_> = samples
        .iter()
        .filter(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect();
    assert_eq!(matching.len(), 1, "{name} {labels:?}: {matching:?}");
    matching[0]
}

fn sample_metrics() -> AgentMetrics {
    let mut agent = AgentMetrics::new(ChangeSource::File);
    agent.applied(ChangeSource::File, Duration::from_micros(800));
    agent.applied(ChangeSource::File, Duration::from_millis(30));
    agent.applied(ChangeSource::File, Duration::from_secs(20));
    agent.refused();
    agent
}

#[test]
fn exposition_parses_back_with_every_family_declared() {
    let status = Status::from_snapshot(&sample_snapshot());
    let text = render_prometheus(&status, &sample_metrics());
    let (samples, types) = parse(&text);
    assert_eq!(types["lbagent_config_apply_duration_seconds"], "histogram");
    assert_eq!(types["lbagent_backend_flows"], "gauge");

    // No two samples share a name and label set.
    let mut series = std::collections::BTreeSet::new();
    for s in &samples {
        assert!(
            series.insert((s.name.clone(), s.labels.clone())),
            "duplicate {s:?}"
        );
    }
}

#[test]
fn per_backend_and_per_service_values() {
    let snapshot = sample_snapshot();
    let text = render_prometheus(
        &Status::from_snapshot(&snapshot),
        &AgentMetrics::new(ChangeSource::File),
    );
    let (samples, _) = parse(&text);
    let http = [
        ("namespace", "default"),
        ("service", "web"),
        ("port", "http"),
        ("protocol", "TCP"),
    ];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut labels = http.to_vec();
        labels.extend_from_slice(extra);
        labels
    };
    let value = |name: &str, labels: &[(&str, &str)]| find(&samples, name, labels).value;
    let local = [("backend", "10.1.0.5:8080")];
    assert_eq!(
        value(
            "lbagent_backend_packets_total",
            &with(&[local[0], ("direction", "forward")])
        ),
        10.0
    );
    assert_eq!(
        value(
            "lbagent_backend_bytes_total",
            &with(&[local[0], ("direction", "reply")])
        ),
        4000.0
    );
    assert_eq!(value("lbagent_backend_flows", &with(&local)), 2.0);
    assert_eq!(
        value(
            "lbagent_backend_flows",
            &with(&[("backend", "10.1.0.7:8080")])
        ),
        0.0,
        "an endpoint without a backend is listed with zeros"
    );
    assert_eq!(
        value(
            "lbagent_service_packets_total",
            &with(&[("direction", "forward")])
        ),
        15.0
    );
    assert_eq!(
        value(
            "lbagent_service_bytes_total",
            &with(&[("direction", "reply")])
        ),
        6500.0
    );
    assert_eq!(value("lbagent_service_flows", &http), 4.0);
    assert_eq!(
        value(
            "lbagent_service_flows",
            &[
                ("namespace", "kube-system"),
                ("service", "dns"),
                ("port", "")
            ]
        ),
        1.0
    );
    assert_eq!(value("lbagent_flows", &[]), 5.0);
}

#[test]
fn drops_counters_and_agent_values() {
    let status = Status::from_snapshot(&sample_snapshot());
    let (samples, _) = parse(&render_prometheus(&status, &sample_metrics()));
    let value = |name: &str, labels: &[(&str, &str)]| find(&samples, name, labels).value;
    assert_eq!(
        value("lbagent_drops_total", &[("reason", "no_backend")]),
        3.0
    );
    assert_eq!(
        samples
            .iter()
            .filter(|s| s.name == "lbagent_drops_total")
            .count(),
        lb_common::DropReason::ALL.len(),
        "every reason, zero included"
    );
    assert_eq!(
        value("lbagent_drops_total", &[("reason", "rewrite_failed")]),
        0.0
    );
    assert_eq!(
        value("lbagent_packets_total", &[("outcome", "xdp_seen")]),
        100.0
    );
    assert_eq!(
        samples
            .iter()
            .filter(|s| s.name == "lbagent_packets_total")
            .count(),
        lb_common::Counter::ALL.len()
    );
    assert_eq!(value("lbagent_config_generation", &[]), 7.0);
    assert_eq!(
        value("lbagent_config_reloads_total", &[("result", "applied")]),
        3.0
    );
    assert_eq!(
        value("lbagent_config_reloads_total", &[("result", "refused")]),
        1.0
    );
    let bucket = |le| {
        value(
            "lbagent_config_apply_duration_seconds_bucket",
            &[("source", "file"), ("le", le)],
        )
    };
    assert_eq!(bucket("0.001"), 1.0);
    assert_eq!(bucket("0.025"), 1.0);
    assert_eq!(bucket("0.05"), 2.0);
    assert_eq!(bucket("10"), 2.0);
    assert_eq!(bucket("+Inf"), 3.0);
    assert_eq!(
        value(
            "lbagent_config_apply_duration_seconds_count",
            &[("source", "file")]
        ),
        3.0
    );
    let sum = value(
        "lbagent_config_apply_duration_seconds_sum",
        &[("source", "file")],
    );
    assert!((sum - 20.0308).abs() < 1e-9, "{sum}");
    assert_eq!(
        value(
            "lbagent_interface_attached",
            &[("interface", "eth0"), ("mode", "native")]
        ),
        1.0
    );
    assert_eq!(
        value(
            "lbagent_interface_attached",
            &[("interface", "veth-pod1"), ("mode", "tc")]
        ),
        1.0
    );
}

#[test]
fn label_values_are_escaped() {
    let mut snapshot = sample_snapshot();
    snapshot.record.services[0].name = "we\"ird\\na\nme".into();
    let text = render_prometheus(
        &Status::from_snapshot(&snapshot),
        &AgentMetrics::new(ChangeSource::File),
    );
    assert!(text.contains(r#"service="we\"ird\\na\nme""#), "{text}");
    let (samples, _) = parse(&text);
    find(
        &samples,
        "lbagent_service_flows",
        &[("service", "we\"ird\\na\nme"), ("port", "http")],
    );
}

#[test]
fn histogram_buckets_are_cumulative_and_inclusive() {
    let mut h = Histogram::new(&APPLY_BUCKETS);
    assert_eq!(h.cumulative().len(), APPLY_BUCKETS.len() + 1);
    assert!(h.cumulative().iter().all(|(_, n)| *n == 0));
    h.observe(0.001); // exactly on a bound: that bucket (le is inclusive)
    h.observe(0.0011);
    h.observe(0.5);
    h.observe(11.0);
    let c: BTreeMap<String, u64> = h.cumulative().into_iter().collect();
    assert_eq!(c["0.001"], 1);
    assert_eq!(c["0.0025"], 2);
    assert_eq!(c["0.25"], 2);
    assert_eq!(c["0.5"], 3);
    assert_eq!(c["10"], 3);
    assert_eq!(c["+Inf"], 4);
    assert_eq!(h.count(), 4);
    assert!((h.sum() - 11.5021).abs() < 1e-9);
    let les: Vec<String> = h.cumulative().into_iter().map(|(le, _)| le).collect();
    assert_eq!(les.first().map(String::as_str), Some("0.001"));
    assert_eq!(les.get(9).map(String::as_str), Some("1"));
}

#[test]
fn apply_latency_is_labelled_by_the_source_of_the_change() {
    let mut agent = AgentMetrics::new(ChangeSource::Api);
    let render = |agent: &AgentMetrics| {
        let text = render_prometheus(&Status::from_snapshot(&sample_snapshot()), agent);
        parse(&text).0
    };
    let count = |samples: &[Sample], source| {
        find(
            samples,
            "lbagent_config_apply_duration_seconds_count",
            &[("source", source)],
        )
        .value
    };
    // The agent's own source is there before its first change, the others are not.
    let before = render(&agent);
    assert_eq!(count(&before, "api"), 0.0);
    assert!(
        !before
            .iter()
            .any(|s| s.labels.get("source").map(String::as_str) == Some("signal")),
        "{before:?}"
    );

    agent.applied(ChangeSource::Api, Duration::from_millis(3));
    agent.applied(ChangeSource::Signal, Duration::from_millis(40));
    agent.applied(ChangeSource::Api, Duration::from_millis(4));
    let after = render(&agent);
    assert_eq!(count(&after, "api"), 2.0);
    assert_eq!(count(&after, "signal"), 1.0);
    let bucket = |source, le| {
        find(
            &after,
            "lbagent_config_apply_duration_seconds_bucket",
            &[("source", source), ("le", le)],
        )
        .value
    };
    assert_eq!(bucket("api", "0.005"), 2.0);
    assert_eq!(bucket("signal", "0.025"), 0.0);
    assert_eq!(bucket("signal", "0.05"), 1.0);
}
