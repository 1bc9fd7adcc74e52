//! Running `lb-probe` clients in the client namespace and reading their answers.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc::{self, Receiver, RecvTimeoutError},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::netns::{Netns, Pod, Process, Topology, run};

/// One request's answer: which backend answered, the client address it saw, and the client's
/// own address for the request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub backend: String,
    pub client_seen: SocketAddr,
    pub local: SocketAddr,
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

/// How `lb-probe http|udp` sends, beyond target and count.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Source address (`--bind`).
    pub bind: Option<Ipv4Addr>,
    /// UDP: request i from port `source_port + i` (`--source-port`).
    pub source_port: Option<u16>,
    /// Per-request timeout (`--timeout-ms`); lb-probe's default when `None`.
    pub timeout_ms: Option<u64>,
    /// Skip the remaining requests after this many failures (`--max-failures`).
    pub max_failures: Option<u32>,
}

/// Runs `lb-probe http|udp --target TARGET --count COUNT` in `ns`.
pub fn requests(
    ns: &Netns,
    probe_bin: &Path,
    kind: &str,
    target: SocketAddr,
    count: u32,
) -> anyhow::Result<Batch> {
    requests_with(ns, probe_bin, kind, target, count, &Options::default())
}

/// Like `requests`, with a source address, source ports or timeout.
pub fn requests_with(
    ns: &Netns,
    probe_bin: &Path,
    kind: &str,
    target: SocketAddr,
    count: u32,
    options: &Options,
) -> anyhow::Result<Batch> {
    let mut command = ns.command(&probe_bin.to_string_lossy());
    command.args([
        kind,
        "--target",
        &target.to_string(),
        "--count",
        &count.to_string(),
    ]);
    if let Some(bind) = options.bind {
        command.args(["--bind", &bind.to_string()]);
    }
    if let Some(port) = options.source_port {
        command.args(["--source-port", &port.to_string()]);
    }
    if let Some(timeout) = options.timeout_ms {
        command.args(["--timeout-ms", &timeout.to_string()]);
    }
    if let Some(max) = options.max_failures {
        command.args(["--max-failures", &max.to_string()]);
    }
    let output = run(&mut command)?;
    let mut batch = Batch::default();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        match parse_result(line)? {
            Ok(answer) => batch.answers.push(answer),
            Err(failure) => batch.failures.push(failure),
        }
    }
    Ok(batch)
}

/// `ok <backend> <seen> <local>` as an answer, `fail ...` as the failure line.
fn parse_result(line: &str) -> anyhow::Result<Result<Answer, String>> {
    let mut words = line.split_whitespace();
    match (words.next(), words.next(), words.next(), words.next()) {
        (Some("ok"), Some(backend), Some(seen), Some(local)) => Ok(Ok(Answer {
            backend: backend.to_owned(),
            client_seen: seen
                .parse()
                .with_context(|| format!("bad client address in {line:?}"))?,
            local: local
                .parse()
                .with_context(|| format!("bad local address in {line:?}"))?,
        })),
        (Some("fail"), ..) => Ok(Err(line.to_owned())),
        _ => bail!("unexpected lb-probe output {line:?}"),
    }
}

/// Runs `lb-probe pmtu` in `ns` and returns the path MTU its socket learned, with the probe's
/// whole output for messages.
pub fn path_mtu(
    ns: &Netns,
    probe_bin: &Path,
    target: SocketAddr,
    size: usize,
    attempts: u32,
) -> anyhow::Result<(u32, String)> {
    let output = run(ns.command(&probe_bin.to_string_lossy()).args([
        "pmtu",
        "--target",
        &target.to_string(),
        "--size",
        &size.to_string(),
        "--attempts",
        &attempts.to_string(),
    ]))?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let mtu = text
        .lines()
        .find_map(|l| l.strip_prefix("mtu "))
        .and_then(|m| m.trim().parse().ok())
        .with_context(|| format!("no mtu line in lb-probe pmtu output:\n{text}"))?;
    Ok((mtu, text))
}

/// A running probe that reports line by line: its stdout is read on a thread, and what it
/// printed so far is kept for results and messages.
struct Reporter {
    process: Process,
    lines: Receiver<String>,
    output: Vec<String>,
    /// The probe mode, for messages (`lb-probe hold`).
    what: &'static str,
}

impl Reporter {
    fn spawn(command: &mut Command, what: &'static str) -> anyhow::Result<Self> {
        command.stdout(Stdio::piped());
        let mut process = Process::spawn(command)?;
        let stdout = process
            .child_mut()
            .stdout
            .take()
            .with_context(|| format!("{what} stdout"))?;
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Reporter {
            process,
            lines,
            output: Vec::new(),
            what,
        })
    }

    fn output(&self) -> String {
        self.output.join("\n")
    }

    /// Reads lines until one satisfies `done`, for at most `timeout`.
    fn read_until(&mut self, timeout: Duration, done: impl Fn(&str) -> bool) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let finished = done(&line);
                    self.output.push(line);
                    if finished {
                        return Ok(());
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    bail!("{} ended:\n{}", self.what, self.output())
                }
                Err(RecvTimeoutError::Timeout) => {
                    bail!(
                        "{} did not get on within {timeout:?}:\n{}",
                        self.what,
                        self.output()
                    )
                }
            }
        }
    }

    /// Takes the lines printed so far without waiting.
    fn read_available(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.output.push(line);
        }
    }

    /// Waits (at most `timeout`) for the probe to exit and takes the rest of its output; an
    /// unsuccessful exit is an error with that output.
    fn finish(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let status = self.process.wait(timeout)?;
        // The reader thread ends with the probe's stdout; take what it still has.
        self.read_until(Duration::from_secs(2), |_| false).ok();
        if !status.success() {
            bail!("{} exited with {status}:\n{}", self.what, self.output());
        }
        Ok(())
    }

    /// The lines starting with `phase` and a space, without that prefix.
    fn phase<'a>(&'a self, phase: &'a str) -> impl Iterator<Item = &'a str> {
        self.output
            .iter()
            .filter_map(move |l| l.strip_prefix(phase))
            .filter_map(|l| l.strip_prefix(' '))
    }
}

/// A running `lb-probe hold`: connections held open until `release` is called.
pub struct Hold {
    reporter: Reporter,
    release_file: PathBuf,
}

impl Hold {
    /// Starts `lb-probe hold` in `ns` with `count` connections to `target`; `release_file` must
    /// not exist yet (creating it starts the second requests).
    pub fn start(
        ns: &Netns,
        probe_bin: &Path,
        target: SocketAddr,
        count: u32,
        release_file: &Path,
    ) -> anyhow::Result<Self> {
        if release_file.exists() {
            bail!("{} exists already", release_file.display());
        }
        let mut command = ns.command(&probe_bin.to_string_lossy());
        command
            .args(["hold", "--target", &target.to_string()])
            .args(["--count", &count.to_string(), "--until"])
            .arg(release_file)
            .args(["--wait-secs", "60"]);
        Ok(Hold {
            reporter: Reporter::spawn(&mut command, "lb-probe hold")?,
            release_file: release_file.to_owned(),
        })
    }

    /// Waits (at most `timeout`) until every connection made its first request; returns the
    /// result per connection.
    pub fn held(&mut self, timeout: Duration) -> anyhow::Result<Vec<Result<Answer, String>>> {
        self.reporter
            .read_until(timeout, |line| line == "holding")?;
        self.results("held")
    }

    /// Lets the probe make the second request on every connection and waits (at most
    /// `timeout`) for it to finish; returns the result per connection.
    pub fn release(&mut self, timeout: Duration) -> anyhow::Result<Vec<Result<Answer, String>>> {
        std::fs::write(&self.release_file, b"")
            .with_context(|| format!("creating {}", self.release_file.display()))?;
        self.reporter.finish(timeout)?;
        self.results("again")
    }

    /// Everything the probe printed so far.
    #[must_use]
    pub fn output(&self) -> String {
        self.reporter.output()
    }

    fn results(&self, phase: &str) -> anyhow::Result<Vec<Result<Answer, String>>> {
        self.reporter.phase(phase).map(parse_result).collect()
    }
}

/// How one connection of `lb-probe stream` ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamEnd {
    /// Every request answered, all by `backend`; the slowest took `slowest_ms`.
    Ok {
        backend: String,
        requests: u64,
        slowest_ms: u64,
    },
    /// Broken by `reason` after `requests` answered requests.
    Failed { reason: String, requests: u64 },
}

/// `ok <backend> <requests> <slowest ms>` or `fail <reason> after <requests>`.
fn parse_stream_end(line: &str) -> anyhow::Result<StreamEnd> {
    let bad = || format!("unexpected lb-probe stream line {line:?}");
    if let Some(rest) = line.strip_prefix("ok ") {
        let words: Vec<&str> = rest.split_whitespace().collect();
        let [backend, requests, slowest_ms] = words[..] else {
            bail!(bad());
        };
        return Ok(StreamEnd::Ok {
            backend: backend.to_owned(),
            requests: requests.parse().with_context(bad)?,
            slowest_ms: slowest_ms.parse().with_context(bad)?,
        });
    }
    let rest = line.strip_prefix("fail ").with_context(bad)?;
    let (reason, requests) = rest.rsplit_once(" after ").with_context(bad)?;
    Ok(StreamEnd::Failed {
        reason: reason.to_owned(),
        requests: requests.trim().parse().with_context(bad)?,
    })
}

/// A running `lb-probe stream`: keep-alive connections kept busy with requests until `stop`.
pub struct Stream {
    reporter: Reporter,
    stop_file: PathBuf,
}

impl Stream {
    /// Starts `lb-probe stream` in `ns` with `count` connections to `target`, a request on each
    /// every `interval`; `stop_file` must not exist yet (creating it ends the streams). The
    /// probe gives up by itself after `max_duration`.
    pub fn start(
        ns: &Netns,
        probe_bin: &Path,
        target: SocketAddr,
        count: u32,
        interval: Duration,
        stop_file: &Path,
        max_duration: Duration,
    ) -> anyhow::Result<Self> {
        if stop_file.exists() {
            bail!("{} exists already", stop_file.display());
        }
        let mut command = ns.command(&probe_bin.to_string_lossy());
        command
            .args(["stream", "--target", &target.to_string()])
            .args(["--count", &count.to_string()])
            .args(["--interval-ms", &interval.as_millis().max(1).to_string()])
            .args(["--max-secs", &max_duration.as_secs().max(1).to_string()])
            .arg("--until")
            .arg(stop_file);
        Ok(Stream {
            reporter: Reporter::spawn(&mut command, "lb-probe stream")?,
            stop_file: stop_file.to_owned(),
        })
    }

    /// Waits (at most `timeout`) until every connection is open and answered once; returns the
    /// first answer (or the failure) per connection.
    pub fn established(
        &mut self,
        timeout: Duration,
    ) -> anyhow::Result<Vec<Result<Answer, String>>> {
        self.reporter
            .read_until(timeout, |line| line == "streaming")?;
        self.reporter.phase("connected").map(parse_result).collect()
    }

    /// The connections that ended so far, without waiting: while streaming, each of them is a
    /// connection that broke.
    pub fn ended_so_far(&mut self) -> anyhow::Result<Vec<StreamEnd>> {
        self.reporter.read_available();
        self.ends()
    }

    /// Ends the streams and waits (at most `timeout`) for the probe to report every
    /// connection; returns how each ended.
    pub fn stop(&mut self, timeout: Duration) -> anyhow::Result<Vec<StreamEnd>> {
        std::fs::write(&self.stop_file, b"")
            .with_context(|| format!("creating {}", self.stop_file.display()))?;
        self.reporter.finish(timeout)?;
        self.ends()
    }

    /// Everything the probe printed so far.
    #[must_use]
    pub fn output(&self) -> String {
        self.reporter.output()
    }

    fn ends(&self) -> anyhow::Result<Vec<StreamEnd>> {
        self.reporter
            .phase("stream")
            .map(parse_stream_end)
            .collect()
    }
}

/// Starts `lb-probe serve` in `pod` (HTTP on 8080, UDP on 5353, named after the pod) and waits
/// until it has bound its sockets.
pub fn start_backend(pod: &Pod, probe_bin: &Path) -> anyhow::Result<Process> {
    let mut command = pod.ns.command(&probe_bin.to_string_lossy());
    command
        .args(["serve", "--name", &pod.name])
        .args(["--tcp", "0.0.0.0:8080", "--udp", "0.0.0.0:5353"])
        .args(["--lifetime-secs", "600"])
        .stdout(Stdio::piped());
    let mut server = Process::spawn(&mut command)?;
    let stdout = server.child_mut().stdout.take().context("server stdout")?;
    let (ready_tx, ready_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = ready_tx.send(line);
    });
    match ready_rx.recv_timeout(Duration::from_secs(10)) {
        Ok(line) if line.trim() == "serving" => Ok(server),
        other => bail!("backend in {} did not start: {other:?}", pod.name),
    }
}

/// Starts a backend (see `start_backend`) in every pod of `topology`.
pub fn start_backends(topology: &Topology, probe_bin: &Path) -> anyhow::Result<Vec<Process>> {
    topology
        .pods
        .iter()
        .map(|pod| start_backend(pod, probe_bin))
        .collect()
}
