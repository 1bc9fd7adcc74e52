//! Running `lb-agent` inside a node namespace, as a user would, and waiting until it serves.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::netns::{Netns, Process};

/// What `lb-agent run` logs once it is attached (see `READY_LINE` in lb-userspace).
const READY_LINE: &str = "lb-agent is serving";

pub struct Agent {
    process: Process,
    log: Arc<Mutex<String>>,
}

impl Agent {
    /// Starts `lb-agent run --config CONFIG --iface IFACE ARGS...` in `node` and waits (at most
    /// `timeout`) for it to report that it serves.
    pub fn start(
        node: &Netns,
        agent_bin: &Path,
        config: &Path,
        iface: &str,
        extra_args: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let mut command = node.command(&agent_bin.to_string_lossy());
        command
            .args(["run", "--config"])
            .arg(config)
            .args(["--iface", iface, "--stats-interval", "0"])
            .args(extra_args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut process = Process::spawn(&mut command)?;
        let stderr = process.child_mut().stderr.take().context("agent stderr")?;
        let log = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(mut log) = sink.lock() {
                    log.push_str(&line);
                    log.push('\n');
                }
            }
        });
        let mut agent = Agent { process, log };
        let deadline = Instant::now() + timeout;
        loop {
            if agent.log().contains(READY_LINE) {
                return Ok(agent);
            }
            if let Some(status) = agent.process.child_mut().try_wait()? {
                bail!(
                    "lb-agent exited with {status} before serving:\n{}",
                    agent.log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "lb-agent did not serve within {timeout:?}:\n{}",
                    agent.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Everything the agent logged so far.
    #[must_use]
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Stops the agent with SIGTERM, as a service manager would; returns its log.
    pub fn stop(mut self) -> anyhow::Result<String> {
        let status = self.process.terminate(Duration::from_secs(10))?;
        // Let the reader thread drain the last lines.
        std::thread::sleep(Duration::from_millis(100));
        if !status.success() {
            bail!("lb-agent exited with {status}:\n{}", self.log());
        }
        Ok(self.log())
    }
}
