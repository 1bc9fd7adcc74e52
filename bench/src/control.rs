//! Sections 3 and 5: the control plane (Maglev build time; applying 1k and 10k Services through
//! the agent's own path; one endpoint change to the maps, against `iptables-restore` and
//! `nft -f` doing the same), and the Maglev tables' quality (balance, disruption).

use std::{
    io::Write as _,
    net::Ipv4Addr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use integration_tests::netns::Netns;
use lb_userspace::{
    config,
    dataplane::{DataPlane, LoadOptions},
    maglev,
    maps::{MapContents, NodeConfig},
};
use serde::Serialize;

use crate::{
    Progress,
    memory::{self, MemorySection},
    stats::{Figure, quantile},
    workload::{self, Workload},
};

const SEED: u32 = 0x5eed;
const ENDPOINTS: usize = 4;

#[derive(Debug, Serialize)]
pub struct MaglevRow {
    pub m: u32,
    pub n: usize,
    pub build_ms: Figure,
    /// Entries per backend: largest minus smallest.
    pub balance_max_minus_min: u32,
    /// Entries of the fullest backend over the mean.
    pub balance_max_over_mean: f64,
    /// Share of entries that move when one backend is removed (ideal 1/N).
    pub remove_one_remapped_pct: f64,
    /// Share of entries that move when one backend is added (ideal 1/(N+1)).
    pub add_one_remapped_pct: f64,
}

#[derive(Debug, Serialize)]
pub struct MaglevSection {
    pub seed: u32,
    pub rows: Vec<MaglevRow>,
}

fn identities(n: usize, offset: usize) -> Vec<String> {
    (offset..offset + n)
        .map(|k| format!("{}:{}", workload::endpoint(0, k, 1), workload::TARGET_PORT))
        .collect()
}

#[expect(clippy::cast_precision_loss, reason = "table sizes")]
pub fn maglev_section(quick: bool) -> anyhow::Result<MaglevSection> {
    let runs = if quick { 5 } else { 9 };
    let mut rows = Vec::new();
    for m in [16_381, 65_537] {
        for n in [10, 100, 1000] {
            let ids = identities(n, 0);
            let bytes: Vec<&[u8]> = ids.iter().map(String::as_bytes).collect();
            let mut samples = Vec::new();
            let mut table = Vec::new();
            for _ in 0..runs {
                let start = Instant::now();
                table = maglev::build_table(&bytes, m, SEED)?;
                samples.push(start.elapsed().as_secs_f64() * 1e3);
            }
            let mut counts = vec![0_u32; n];
            for &i in &table {
                counts[i as usize] += 1;
            }
            let (max, min) = (
                counts.iter().copied().max().unwrap_or(0),
                counts.iter().copied().min().unwrap_or(0),
            );
            let mean = f64::from(m) / n as f64;
            // Remove the middle backend; add one new identity.
            let mut removed = bytes.clone();
            removed.remove(n / 2);
            let extra = identities(1, n);
            let mut added = bytes.clone();
            added.push(extra[0].as_bytes());
            rows.push(MaglevRow {
                m,
                n,
                build_ms: Figure::of(&samples).context("no samples")?,
                balance_max_minus_min: max - min,
                balance_max_over_mean: f64::from(max) / mean,
                remove_one_remapped_pct: 100.0 * maglev::disruption(&bytes, &removed, m, SEED)?,
                add_one_remapped_pct: 100.0 * maglev::disruption(&bytes, &added, m, SEED)?,
            });
        }
    }
    Ok(MaglevSection { seed: SEED, rows })
}

#[derive(Debug, Serialize)]
pub struct ApplyRow {
    pub services: usize,
    pub endpoints_per_service: usize,
    pub maglev_table_size: u32,
    /// Parsing and validating the manifests (`config::parse`).
    pub parse_ms: Figure,
    /// Desired state -> map contents, Maglev tables included (`MapContents::from_state`).
    pub build_ms: Figure,
    /// Diff and map writes (`DataPlane::apply`).
    pub write_ms: Figure,
    pub total_ms: Figure,
    pub map_writes: usize,
    /// The same Services as kube-proxy's iptables rules, one `iptables-restore`.
    pub iptables_restore_ms: Option<Figure>,
    /// The same Services as kube-proxy's nftables ruleset, one `nft -f`.
    pub nft_ms: Option<Figure>,
}

#[derive(Debug, Serialize)]
pub struct ChangeRow {
    pub services: usize,
    pub changes: usize,
    /// Config text -> parse -> map contents -> diff -> map writes, per change.
    pub end_to_end_p50_ms: f64,
    pub end_to_end_p99_ms: f64,
    /// Desired state -> map contents (every Maglev table rebuilt) -> diff -> map writes.
    pub maps_p50_ms: f64,
    pub maps_p99_ms: f64,
    /// Diff and map writes alone (`DataPlane::apply`).
    pub write_p50_ms: f64,
    pub write_p99_ms: f64,
    pub map_writes_per_change: f64,
    pub iptables_restore_p50_ms: Option<f64>,
    pub iptables_restore_p99_ms: Option<f64>,
    pub nft_p50_ms: Option<f64>,
    pub nft_p99_ms: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct ControlSection {
    pub runs: usize,
    pub apply: Vec<ApplyRow>,
    pub change: Vec<ChangeRow>,
    pub iptables_version: String,
    pub nft_version: String,
}

fn node_config(loaded: &config::Loaded) -> NodeConfig {
    let settings = &loaded.settings;
    NodeConfig {
        node_name: workload::NODE_NAME.to_owned(),
        snat_addr: None,
        snat_ports: (settings.snat.ports.first, settings.snat.ports.last),
        source_ranges_on_node_ports: settings.source_ranges_on_node_ports,
        maglev_table_size: settings.maglev.table_size,
        maglev_seed: settings.maglev.seed,
        max_tables: settings.max_tables,
    }
}

fn parse(text: &str) -> anyhow::Result<config::Loaded> {
    config::parse(text, &[Ipv4Addr::new(192, 168, 0, 1)]).map_err(|problems| {
        anyhow::anyhow!(
            "the generated manifests are invalid: {}",
            problems
                .iter()
                .take(3)
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        )
    })
}

fn ms(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}

/// The longest an `iptables-restore` or `nft -f` may take before it is killed and reported
/// (`nft -f` of 30k Services in kube-proxy's layout took almost 10 minutes here).
pub const RULES_TIME_LIMIT: Duration = Duration::from_mins(20);

/// Runs `program args` in `ns` with `input` on stdin, for at most [`RULES_TIME_LIMIT`]; returns
/// wall milliseconds.
pub fn timed_stdin(ns: &Netns, program: &str, args: &[&str], input: &str) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut child = ns
        .command(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program}"))?;
    // Closed when dropped at the end of the statement, so the program sees the end of input.
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() > RULES_TIME_LIMIT {
            // Our own child (`ip netns exec` execs the program): killed by its handle.
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{program} {} did not finish within {} s; killed",
                args.join(" "),
                RULES_TIME_LIMIT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = ms(start);
    if !status.success() {
        let mut stderr = String::new();
        if let Some(mut pipe) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
        }
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            stderr.lines().take(5).collect::<Vec<_>>().join(" | ")
        );
    }
    Ok(took)
}

fn version(program: &str, arg: &str) -> String {
    Command::new(program).arg(arg).output().map_or_else(
        |e| format!("{program}: {e}"),
        |o| String::from_utf8_lossy(&o.stdout).trim().to_owned(),
    )
}

/// Applies `count` Services `runs` times, each into a freshly loaded data plane; then, on the
/// last one, `changes` single-endpoint changes. The memory row is read with the Services in.
fn ours(
    count: usize,
    runs: usize,
    changes: usize,
    progress: &mut Progress,
) -> anyhow::Result<(ApplyRow, ChangeRow, memory::MemoryRow)> {
    let table_size = maglev::DEFAULT_TABLE_SIZE;
    let mut workload = Workload::new(count, ENDPOINTS);
    let text = workload.yaml(table_size);
    let (mut parse_s, mut build_s, mut write_s, mut total_s) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut map_writes = 0;
    let mut kept = None;
    for run in 0..runs {
        progress.step(&format!(
            "control plane: apply {count} Services x {ENDPOINTS} endpoints, run {}/{runs}",
            run + 1
        ));
        let max_tables = u32::try_from(count).unwrap_or(u32::MAX).max(1);
        let mut dp = DataPlane::load(LoadOptions {
            max_tables,
            maglev_table_size: table_size,
            ..LoadOptions::default()
        })
        .context("loading the data plane")?;
        let start = Instant::now();
        let loaded = parse(&text)?;
        let parsed = ms(start);
        let node = node_config(&loaded);
        let t = Instant::now();
        let contents = MapContents::from_state(&loaded.state, &node, dp.contents())?;
        let built = ms(t);
        let t = Instant::now();
        map_writes = dp.apply(contents)?;
        let written = ms(t);
        total_s.push(ms(start));
        parse_s.push(parsed);
        build_s.push(built);
        write_s.push(written);
        ensure!(
            dp.contents().frontends.len() == count,
            "applied {} frontends, expected {count}",
            dp.contents().frontends.len()
        );
        kept = Some((dp, node));
    }
    let (mut dp, node) = kept.context("no runs")?;
    let memory_row = memory::row(
        count,
        ENDPOINTS,
        table_size,
        u32::try_from(count).unwrap_or(u32::MAX),
    );

    progress.step(&format!(
        "control plane: {changes} endpoint changes with {count} Services"
    ));
    let (mut end_to_end, mut maps_only, mut write_only, mut change_writes) =
        (Vec::new(), Vec::new(), Vec::new(), 0);
    for k in 0..changes {
        let service = (k * 7919) % count;
        workload
            .overrides
            .push(((service, 0), workload::spare_endpoint(k)));
        let text = workload.yaml(table_size);
        let start = Instant::now();
        let loaded = parse(&text)?;
        let t = Instant::now();
        let contents = MapContents::from_state(&loaded.state, &node, dp.contents())?;
        let w = Instant::now();
        change_writes += dp.apply(contents)?;
        write_only.push(ms(w));
        maps_only.push(ms(t));
        end_to_end.push(ms(start));
    }
    #[expect(clippy::cast_precision_loss, reason = "small counts")]
    let change = ChangeRow {
        services: count,
        changes,
        end_to_end_p50_ms: quantile(&end_to_end, 0.5),
        end_to_end_p99_ms: quantile(&end_to_end, 0.99),
        maps_p50_ms: quantile(&maps_only, 0.5),
        maps_p99_ms: quantile(&maps_only, 0.99),
        write_p50_ms: quantile(&write_only, 0.5),
        write_p99_ms: quantile(&write_only, 0.99),
        map_writes_per_change: change_writes as f64 / changes.max(1) as f64,
        iptables_restore_p50_ms: None,
        iptables_restore_p99_ms: None,
        nft_p50_ms: None,
        nft_p99_ms: None,
    };
    let apply = ApplyRow {
        services: count,
        endpoints_per_service: ENDPOINTS,
        maglev_table_size: table_size,
        parse_ms: Figure::of(&parse_s).context("no runs")?,
        build_ms: Figure::of(&build_s).context("no runs")?,
        write_ms: Figure::of(&write_s).context("no runs")?,
        total_ms: Figure::of(&total_s).context("no runs")?,
        map_writes,
        iptables_restore_ms: None,
        nft_ms: None,
    };
    Ok((apply, change, memory_row))
}

/// The same Services and changes through `iptables-restore` and `nft -f`, in a namespace of
/// their own. Returns (apply iptables, apply nft, change iptables, change nft) samples.
fn kernel_peers(
    ns: &Netns,
    count: usize,
    runs: usize,
    changes: usize,
    progress: &mut Progress,
) -> anyhow::Result<[Vec<f64>; 4]> {
    let mut out: [Vec<f64>; 4] = Default::default();
    let workload = Workload::new(count, ENDPOINTS);
    let iptables = workload.iptables();
    let nft = workload.nft();
    for run in 0..runs {
        progress.step(&format!(
            "control plane: iptables-restore and nft -f of {count} Services, run {}/{runs}",
            run + 1
        ));
        out[0].push(timed_stdin(ns, "iptables-restore", &[], &iptables)?);
        out[1].push(timed_stdin(ns, "nft", &["-f", "-"], &nft)?);
    }
    let mut changing = Workload::new(count, ENDPOINTS);
    for k in 0..changes {
        let service = (k * 7919) % count;
        changing
            .overrides
            .push(((service, 0), workload::spare_endpoint(k)));
        out[2].push(timed_stdin(
            ns,
            "iptables-restore",
            &["--noflush"],
            &changing.iptables_change(service, 0, 0),
        )?);
        out[3].push(timed_stdin(
            ns,
            "nft",
            &["-f", "-"],
            &changing.nft_change(service, 0, 0),
        )?);
    }
    Ok(out)
}

pub fn apply_section(
    quick: bool,
    prefix: &str,
    progress: &mut Progress,
) -> anyhow::Result<(ControlSection, MemorySection)> {
    // (Services, endpoint changes): a change re-reads the whole config, seconds at 10k.
    let (counts, runs): (&[(usize, usize)], usize) = if quick {
        (&[(1000, 10)], 5)
    } else {
        (&[(1000, 50), (10_000, 20)], 5)
    };
    let ns = Netns::create(&format!("{prefix}cp"))?;
    let mut control = ControlSection {
        runs,
        apply: Vec::new(),
        change: Vec::new(),
        iptables_version: version("iptables", "--version"),
        nft_version: version("nft", "--version"),
    };
    let mut memory = MemorySection::default();
    for &(count, changes) in counts {
        let (mut apply, mut change, row) = ours(count, runs, changes, progress)?;
        memory.rows.push(row);
        let [ipt, nft, ipt_change, nft_change] = kernel_peers(&ns, count, runs, changes, progress)?;
        apply.iptables_restore_ms = Figure::of(&ipt);
        apply.nft_ms = Figure::of(&nft);
        change.iptables_restore_p50_ms = Some(quantile(&ipt_change, 0.5));
        change.iptables_restore_p99_ms = Some(quantile(&ipt_change, 0.99));
        change.nft_p50_ms = Some(quantile(&nft_change, 0.5));
        change.nft_p99_ms = Some(quantile(&nft_change, 0.99));
        control.apply.push(apply);
        control.change.push(change);
    }
    Ok((control, memory))
}
