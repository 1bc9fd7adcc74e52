//! The corpus of invalid configs (`tests/invalid-configs/*.yaml` at the workspace root): each file
//! starts with `# expect: TEXT` lines, and both `config::load` and `lb-agent validate FILE` must
//! refuse it with every one of those texts in the error. Plus `lb-agent validate` on valid input.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use lb_userspace::config::{self, ConfigError};

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/invalid-configs")
}

/// Every case: (file, expected texts).
fn cases() -> Vec<(PathBuf, Vec<String>)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir())
        .expect("reading tests/invalid-configs")
        .map(|entry| entry.expect("listing tests/invalid-configs").path())
        .filter(|path| path.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|file| {
            let text = std::fs::read_to_string(&file).expect("reading a corpus file");
            let expected: Vec<String> = text
                .lines()
                .filter_map(|line| line.strip_prefix("# expect: "))
                .map(str::to_owned)
                .collect();
            assert!(
                !expected.is_empty(),
                "{} has no `# expect: ` line",
                file.display()
            );
            (file, expected)
        })
        .collect()
}

#[test]
fn the_corpus_is_big_enough() {
    assert!(cases().len() >= 15, "only {} cases", cases().len());
}

#[test]
fn load_refuses_every_case_with_the_expected_errors() {
    let mut failures = Vec::new();
    for (file, expected) in cases() {
        match config::load(&file, &[], &[]) {
            Ok(loaded) => failures.push(format!(
                "{}: loaded, expected errors; state {:?}",
                file.display(),
                loaded.state
            )),
            Err(error @ ConfigError::Invalid { .. }) => {
                let text = error.to_string();
                for part in &expected {
                    if !text.contains(part.as_str()) {
                        failures.push(format!("{}: no {part:?} in:\n{text}", file.display()));
                    }
                }
                // Every problem names the file it is in.
                let ConfigError::Invalid { problems, .. } = &error else {
                    unreachable!()
                };
                if problems.iter().any(|p| p.location.file != file) {
                    failures.push(format!("{}: a problem names another file", file.display()));
                }
            }
            Err(error) => failures.push(format!("{}: {error}", file.display())),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

fn lb_agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lb-agent"))
}

#[test]
fn validate_exits_non_zero_with_the_expected_errors() {
    let mut failures = Vec::new();
    for (file, expected) in cases() {
        let output = lb_agent()
            .arg("validate")
            .arg(&file)
            .output()
            .expect("running lb-agent validate");
        let stderr = String::from_utf8_lossy(&output.stderr);
        if output.status.success() {
            failures.push(format!("{}: validate exited 0", file.display()));
        }
        for part in expected
            .iter()
            .map(String::as_str)
            .chain([file.to_string_lossy().as_ref()])
        {
            if !stderr.contains(part) {
                failures.push(format!(
                    "{}: no {part:?} on stderr:\n{stderr}",
                    file.display()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// A directory under the temp directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "lb-agent-validate-{name}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        std::fs::create_dir_all(&path).expect("creating a temp directory");
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const SERVICES: &str = r"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, nodePort: 30080}
  - {name: dns, port: 53, protocol: UDP}
";

const SETTINGS: &str = r"
apiVersion: lb-agent/v1alpha1
kind: AgentSettings
nodeAddresses: [192.0.2.1]
";

#[test]
fn validate_prints_assigned_node_ports_for_a_directory() {
    let dir = TempDir::new("dir");
    std::fs::write(dir.0.join("10-services.yaml"), SERVICES).expect("writing");
    std::fs::write(dir.0.join("00-settings.yml"), SETTINGS).expect("writing");
    let output = lb_agent()
        .arg("validate")
        .arg(&dir.0)
        .output()
        .expect("running lb-agent validate");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("valid, 2 service ports"), "{stdout}");
    let http = stdout
        .lines()
        .find(|l| l.contains("default/web:http"))
        .unwrap_or_else(|| panic!("no http line in:\n{stdout}"));
    assert!(http.contains("nodePort=30080"), "{http}");
    assert!(!http.contains("(assigned)"), "{http}");
    let dns = stdout
        .lines()
        .find(|l| l.contains("default/web:dns"))
        .unwrap_or_else(|| panic!("no dns line in:\n{stdout}"));
    assert!(dns.contains("(assigned)"), "{dns}");

    // The same port from the same input, as one file and with `--node-ip`.
    let single = dir.0.join("all.yaml.txt");
    std::fs::write(&single, format!("{SERVICES}---\n{SETTINGS}")).expect("writing");
    let again = lb_agent()
        .arg("validate")
        .arg(&single)
        .args(["--node-ip", "192.0.2.9"])
        .output()
        .expect("running lb-agent validate");
    let again = String::from_utf8_lossy(&again.stdout);
    let dns_again = again
        .lines()
        .find(|l| l.contains("default/web:dns"))
        .unwrap_or_else(|| panic!("no dns line in:\n{again}"));
    let node_port = |line: &str| {
        line.split_whitespace()
            .find(|w| w.starts_with("nodePort="))
            .map(str::to_owned)
    };
    assert_eq!(node_port(dns), node_port(dns_again));
}
