//! `cargo xtask demo`: the load balancer forwarding real connections, end to end.

use std::{collections::BTreeMap, fmt::Write as _, net::SocketAddr};

use anyhow::{Context as _, bail};
use integration_tests::{
    demo::{
        CONFIG, Demo, NODE_NAME, PODS, http_load_balancer, http_node_port, udp_external_ip,
        udp_node_port,
    },
    netns::{NODE_ADDR, NODE_IFACE, Netns},
    probe::Batch,
};

use crate::{cargo, require_root, steps, workspace};

const PREFIX: &str = "lbdemo";

pub fn run(requests: u32) -> anyhow::Result<()> {
    require_root("the demo loads eBPF programs and creates network namespaces")?;
    steps::step("building lb-agent (release) and the demo peers", || {
        cargo(
            &[
                "build",
                "--release",
                "-p",
                "lb-userspace",
                "-p",
                "integration-tests",
                "--bins",
            ],
            &[],
        )?;
        Ok("done".to_owned())
    })?;
    let release = workspace().join("target/release");
    let agent_bin = release.join("lb-agent");
    let probe_bin = release.join("lb-probe");

    Netns::remove_stale(PREFIX);
    println!(
        "==> topology: namespaces {PREFIX}-client (172.30.0.2), {PREFIX}-node ({NODE_ADDR}, \
         lb-agent on {NODE_IFACE}), {PREFIX}-web-0..2 (10.244.1.10-12)"
    );
    println!("==> lb-agent run --config {CONFIG} --iface {NODE_IFACE} --node-name {NODE_NAME}");
    let mut demo = Demo::start(PREFIX, &workspace(), &agent_bin, &probe_bin, |_| Ok(()))?;
    for line in demo.agent_log().lines() {
        println!("    | {line}");
    }

    let frontends = [
        ("NodePort TCP", "http", http_node_port()),
        ("LoadBalancer TCP", "http", http_load_balancer()),
        ("NodePort UDP", "udp", udp_node_port()),
        ("externalIP UDP", "udp", udp_external_ip()),
    ];
    let mut results = Vec::new();
    for (label, kind, target) in frontends {
        println!("==> {requests} {kind} requests from the client to {target} ({label})");
        let batch = demo
            .requests(kind, target, requests)
            .with_context(|| format!("requests to {target}"))?;
        results.push((label, target, batch));
    }

    let log = demo.agent.take().context("the agent is running")?.stop()?;
    if let Some(counters) = log.lines().rev().find(|l| l.contains("counters:")) {
        println!(
            "==> data path {}",
            counters
                .split_once("counters:")
                .map_or(counters, |c| c.1)
                .trim()
        );
    }
    print_table(&results);
    println!("==> tearing down the namespaces");
    drop(demo);

    let mut problems = Vec::new();
    for (label, target, batch) in &results {
        if !batch.failures.is_empty() {
            problems.push(format!(
                "{label} {target}: {} failed, first: {}",
                batch.failures.len(),
                batch.failures[0]
            ));
        }
        let per_backend = batch.per_backend();
        for pod in PODS {
            if !per_backend.contains_key(pod) {
                problems.push(format!("{label} {target}: {pod} never answered"));
            }
        }
    }
    if !problems.is_empty() {
        bail!(
            "the demo did not go as expected:\n  {}",
            problems.join("\n  ")
        );
    }
    println!("==> every backend answered through every frontend");
    Ok(())
}

fn print_table(results: &[(&str, SocketAddr, Batch)]) {
    let mut header = format!("{:<8}", "backend");
    for (label, target, _) in results {
        let _ = write!(header, " | {:>22}", format!("{label} {}", target.port()));
    }
    header.push_str(" | client address seen by the backend");
    println!();
    println!("{header}");
    println!("{}", "-".repeat(header.len()));
    let mut seen: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (_, _, batch) in results {
        for answer in &batch.answers {
            let ips = seen.entry(answer.backend.as_str()).or_default();
            let ip = answer.client_seen.ip().to_string();
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
    }
    for pod in PODS {
        let mut row = format!("{pod:<8}");
        for (_, _, batch) in results {
            let count = batch.per_backend().get(pod).copied().unwrap_or(0);
            let _ = write!(row, " | {count:>22}");
        }
        let ips = seen.get(pod).map(|ips| ips.join(", ")).unwrap_or_default();
        let _ = write!(row, " | {ips}");
        println!("{row}");
    }
    let mut failed = format!("{:<8}", "failed");
    for (_, _, batch) in results {
        let _ = write!(failed, " | {:>22}", batch.failures.len());
    }
    println!("{failed}");
    println!();
}
