//! Running `lb-probe` clients in the client namespace and reading their answers.

use std::{collections::BTreeMap, net::SocketAddr, path::Path};

use anyhow::{Context as _, bail};

use crate::netns::{Netns, run};

/// One request's answer: which backend answered and the client address it saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub backend: String,
    pub client_seen: SocketAddr,
}

/// The answers to a batch of requests, and the failures.
#[derive(Debug, Default)]
pub struct Batch {
    pub answers: Vec<Answer>,
    pub failures: Vec<String>,
}

impl Batch {
    /// Answers per backend name.
    #[must_use]
    pub fn per_backend(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for answer in &self.answers {
            *counts.entry(answer.backend.clone()).or_insert(0) += 1;
        }
        counts
    }
}

/// Runs `lb-probe http|udp --target TARGET --count COUNT` in `ns`.
pub fn requests(
    ns: &Netns,
    probe_bin: &Path,
    kind: &str,
    target: SocketAddr,
    count: u32,
) -> anyhow::Result<Batch> {
    let output = run(ns.command(&probe_bin.to_string_lossy()).args([
        kind,
        "--target",
        &target.to_string(),
        "--count",
        &count.to_string(),
    ]))?;
    let mut batch = Batch::default();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("ok"), Some(backend), Some(seen)) => batch.answers.push(Answer {
                backend: backend.to_owned(),
                client_seen: seen
                    .parse()
                    .with_context(|| format!("bad client address in {line:?}"))?,
            }),
            (Some("fail"), ..) => batch.failures.push(line.to_owned()),
            _ => bail!("unexpected lb-probe output {line:?}"),
        }
    }
    Ok(batch)
}

/// Starts `lb-probe serve` in every pod (HTTP on 8080, UDP on 5353, named after the pod) and
/// waits until each has bound its sockets.
pub fn start_backends(
    topology: &crate::netns::Topology,
    probe_bin: &Path,
) -> anyhow::Result<Vec<crate::netns::Process>> {
    let mut servers = Vec::new();
    for pod in &topology.pods {
        let mut command = pod.ns.command(&probe_bin.to_string_lossy());
        command
            .args(["serve", "--name", &pod.name])
            .args(["--tcp", "0.0.0.0:8080", "--udp", "0.0.0.0:5353"])
            .args(["--lifetime-secs", "600"])
            .stdout(std::process::Stdio::piped());
        let mut server = crate::netns::Process::spawn(&mut command)?;
        let stdout = server.child_mut().stdout.take().context("server stdout")?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line);
            let _ = ready_tx.send(line);
        });
        match ready_rx.recv_timeout(std::time::Duration::from_secs(10)) {
            Ok(line) if line.trim() == "serving" => servers.push(server),
            other => bail!("backend in {} did not start: {other:?}", pod.name),
        }
    }
    Ok(servers)
}
