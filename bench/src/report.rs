//! The results: JSON (everything, every run), a Markdown report, SVG charts, and the README's
//! "Performance" section.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;
use serde::Serialize;

use crate::{
    Args,
    control::{ControlSection, MaglevSection},
    live::{LiveSection, Variant},
    memory::MemorySection,
    stats::Figure,
    testrun::{Case, TestRunSection},
};

#[derive(Debug, Serialize, Default)]
pub struct Meta {
    pub name: String,
    pub quick: bool,
    pub date_utc: String,
    pub git_sha: String,
    pub kernel: String,
    pub cpu_model: String,
    pub cpus: usize,
    pub pinning: String,
    pub rustc: String,
    pub aya: String,
    pub katran_clang: String,
    pub iptables: String,
    pub nft: String,
    pub duration_s: f64,
}

#[derive(Debug, Serialize, Default)]
pub struct Report {
    pub meta: Meta,
    pub testrun: Option<TestRunSection>,
    pub live: Option<LiveSection>,
    pub maglev: Option<MaglevSection>,
    pub control: Option<ControlSection>,
    pub memory: Option<MemorySection>,
    /// Parts that could not be measured, with why.
    pub failures: Vec<String>,
}

/// The first line a command prints (trimmed), or nothing.
pub fn first_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

impl Report {
    pub fn new(args: &Args) -> anyhow::Result<Self> {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
            .unwrap_or_default();
        let (date, sha) = args.name.split_at(args.name.rfind('-').unwrap_or(0));
        Ok(Report {
            meta: Meta {
                name: args.name.clone(),
                quick: args.quick,
                date_utc: first_line("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
                git_sha: sha.trim_start_matches('-').to_owned(),
                kernel: first_line("uname", &["-srvm"]),
                cpu_model,
                cpus: std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
                pinning: "test-run: not pinned (the kernel runs every repeat on the calling \
                          CPU); live: the generator thread pinned to the last CPU, and the \
                          whole forwarding path runs in its softirq on that CPU"
                    .to_owned(),
                rustc: first_line("rustc", &["--version"]),
                aya: "aya 0.14.0, aya-ebpf 0.2.1, bpf-linker 0.10.4".to_owned(),
                katran_clang: String::new(),
                iptables: first_line("iptables", &["--version"]),
                nft: first_line("nft", &["--version"]),
                duration_s: 0.0,
            },
            ..Report::default()
        })
        .map(|mut r: Report| {
            if !date.is_empty() {
                r.meta.name = format!("{date}-{}", r.meta.git_sha);
            }
            r
        })
    }

    /// Writes the JSON, the Markdown report, the charts and (if asked) the README section.
    pub fn write(&self, args: &Args) -> anyhow::Result<Vec<PathBuf>> {
        std::fs::create_dir_all(&args.out_dir)
            .with_context(|| format!("creating {}", args.out_dir.display()))?;
        let mut written = Vec::new();
        let json = args.out_dir.join(format!("{}.json", args.name));
        std::fs::write(&json, serde_json::to_string_pretty(self)?)?;
        written.push(json);
        let charts = self.charts();
        let mut chart_files = Vec::new();
        for (stem, svg) in charts {
            let path = args.out_dir.join(format!("{}-{stem}.svg", args.name));
            std::fs::write(&path, svg)?;
            chart_files.push(path.clone());
            written.push(path);
        }
        let md = args.out_dir.join(format!("{}.md", args.name));
        std::fs::write(&md, self.markdown(&chart_files, &args.command))?;
        written.push(md.clone());
        if let Some(readme) = &args.readme {
            let text = std::fs::read_to_string(readme)?;
            let base = readme.parent().unwrap_or(Path::new("."));
            let rel = |p: &Path| p.strip_prefix(base).unwrap_or(p).display().to_string();
            let notes = std::fs::read_to_string(base.join("bench/NOTES.md")).unwrap_or_default();
            let section = self.readme_section(&args.command, &rel(&md), &chart_files, &rel, &notes);
            std::fs::write(readme, replace_section(&text, &section))?;
            written.push(readme.clone());
        }
        Ok(written)
    }

    /// What is missing or unproven: every figure must be there.
    pub fn verify(&self, args: &Args) -> Vec<String> {
        let wants = |s: &str| args.only.is_empty() || args.only.iter().any(|o| o == s);
        let mut problems = self.failures.clone();
        if wants("testrun") {
            match &self.testrun {
                Some(t) => {
                    for case in Case::ALL {
                        if !t.cases.iter().any(|c| c.case == case) {
                            problems.push(format!("test-run: no figure for {}", case.key()));
                        }
                    }
                }
                None => problems.push("test-run: missing".to_owned()),
            }
        }
        if wants("live") {
            match &self.live {
                Some(l) if !l.cells.is_empty() => {
                    problems.extend(l.skipped.iter().map(|s| format!("live: {s}")));
                }
                _ => problems.push("live: missing".to_owned()),
            }
        }
        if wants("maglev") && self.maglev.as_ref().is_none_or(|m| m.rows.len() != 6) {
            problems.push("Maglev: missing".to_owned());
        }
        if wants("control") {
            match &self.control {
                Some(c) => {
                    for a in &c.apply {
                        if a.iptables_restore_ms.is_none() || a.nft_ms.is_none() {
                            problems.push(format!("apply {}: a peer is missing", a.services));
                        }
                    }
                    if c.apply.is_empty() || c.change.is_empty() {
                        problems.push("control plane: missing".to_owned());
                    }
                }
                None => problems.push("control plane: missing".to_owned()),
            }
            if self.memory.as_ref().is_none_or(|m| m.rows.is_empty()) {
                problems.push("memory: missing".to_owned());
            }
        }
        problems
    }

    fn meta_lines(&self) -> String {
        let m = &self.meta;
        format!(
            "- run: `{}`{}, {} UTC, {:.0} s\n- kernel: {}\n- CPU: {} ({} CPUs, shared with other \
             work; no hardware PMU, so ns and Mpps, not cycles)\n- pinning: {}\n- versions: {}; \
             {}; Katran peer built with {}; {}; {}\n",
            m.name,
            if m.quick { " (--quick)" } else { "" },
            m.date_utc,
            m.duration_s,
            m.kernel,
            m.cpu_model,
            m.cpus,
            m.pinning,
            m.rustc,
            m.aya,
            if m.katran_clang.is_empty() {
                "-"
            } else {
                &m.katran_clang
            },
            m.iptables,
            m.nft
        )
    }

    fn testrun_table(&self, out: &mut String) {
        let Some(t) = &self.testrun else { return };
        let katran = t
            .cases
            .iter()
            .find(|c| c.case == Case::Katran)
            .map(|c| c.ns_per_packet.median);
        let _ = writeln!(
            out,
            "Median of {} interleaved runs (min-max), each `BPF_PROG_TEST_RUN` with repeat = \
             {}; the kernel reports whole ns per repeat.\n",
            t.runs, t.repeat
        );
        out.push_str("| path | ns/packet | vs Katran peer |\n|---|---:|---:|\n");
        for c in &t.cases {
            let ratio = katran.map_or("-".to_owned(), |k| {
                format!("{:.2}x", c.ns_per_packet.median / k)
            });
            let _ = writeln!(
                out,
                "| {} | {} | {ratio} |",
                c.label,
                c.ns_per_packet.show(0)
            );
        }
        let _ = writeln!(
            out,
            "\nThe new-flow rows include the benchmark build's prologue (it gives every repeat a \
             new source); measured alone it costs {:.0} ns, so the new-flow path itself is about \
             {:.0} ns (full table) and {:.0} ns (table with room).",
            t.prologue_ns, t.new_flow_without_prologue_ns, t.new_flow_roomy_without_prologue_ns
        );
    }

    fn live_tables(&self, out: &mut String) {
        let Some(l) = &self.live else { return };
        let _ = writeln!(
            out,
            "Mpps received by the sink per second of generator time, median of {} interleaved \
             runs of {} frames or {:.1} s, whichever ends first (min-max); Maglev M = {} for \
             these runs. Generator: {}.\n",
            l.runs,
            l.frames_per_run,
            l.seconds_per_run_at_most,
            l.maglev_table_size,
            match (&l.generator, &l.live_frames_refused) {
                (crate::live::Generator::Packet, Some(why)) => format!(
                    "a packet socket (`AF_PACKET`, `sendmmsg` of 64 frames, qdisc bypassed; \
                     every frame written from the template with its own source), because this \
                     kernel refuses `BPF_F_TEST_XDP_LIVE_FRAMES` ({why})"
                ),
                _ => "`bench_xdp_gen` in live-frames test runs".to_owned(),
            }
        );
        out.push_str(
            "| Services (endpoints each) | traffic | ours | XDP redirect (ceiling) | iptables | nftables | ours / \
             redirect | ours / iptables | ours / nftables |\n|---:|---|---:|---:|---:|---:|---:|\
             ---:|---:|\n",
        );
        for r in &l.ratios {
            let cell = |v: Variant| {
                l.cells
                    .iter()
                    .find(|c| c.services == r.services && c.mix == r.mix && c.variant == v)
                    .map_or("-".to_owned(), |c| {
                        let lost = if c.delivered_pct.median < 99.0 {
                            format!(" ({:.0}% delivered)", c.delivered_pct.median)
                        } else {
                            String::new()
                        };
                        format!("{}{lost}", c.mpps.show(2))
                    })
            };
            let endpoints = l
                .cells
                .iter()
                .find(|c| c.services == r.services)
                .map_or(0, |c| c.endpoints_per_service);
            let _ = writeln!(
                out,
                "| {} (x{endpoints}) | {} | {} | {} | {} | {} | {:.2} | {:.2} | {:.2} |",
                r.services,
                r.mix.key(),
                cell(Variant::Ours),
                cell(Variant::Redirect),
                cell(Variant::Iptables),
                cell(Variant::Nftables),
                r.ours_over_redirect,
                r.ours_over_iptables,
                r.ours_over_nftables
            );
        }
    }

    fn control_tables(&self, out: &mut String) {
        if let Some(c) = &self.control {
            let _ = writeln!(
                out,
                "Applying Services with 4 endpoints each into a freshly loaded data plane \
                 (manifests -> parse -> map contents with Maglev tables -> diff -> map writes), \
                 median of {} runs (min-max), ms; the same rules through kube-proxy's layouts:\n",
                c.runs
            );
            out.push_str(
                "| Services | parse | build (Maglev) | write maps | total | map writes | \
                 iptables-restore | nft -f |\n|---:|---:|---:|---:|---:|---:|---:|---:|\n",
            );
            for a in &c.apply {
                let opt = |f: &Option<Figure>| f.as_ref().map_or("-".to_owned(), |f| f.show(1));
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} | {} | {} | {} |",
                    a.services,
                    a.parse_ms.show(1),
                    a.build_ms.show(1),
                    a.write_ms.show(1),
                    a.total_ms.show(1),
                    a.map_writes,
                    opt(&a.iptables_restore_ms),
                    opt(&a.nft_ms)
                );
            }
            out.push_str(
                "\nOne endpoint change, p50 / p99 ms (ours: the whole config re-read, as the \
                 agent does on a file change; maps: contents -> diff -> writes; the peers: \
                 kube-proxy's minimal `iptables-restore --noflush` and one `nft -f` \
                 transaction, process start included):\n\n| Services | changes | ours end to \
                 end | ours without parsing | ours diff + writes | map \
                 writes / change | iptables-restore | nft -f |\n|---:|---:|---:|---:|---:|---:|\
                 ---:|---:|\n",
            );
            let pair = |a: Option<f64>, b: Option<f64>| match (a, b) {
                (Some(a), Some(b)) => format!("{a:.2} / {b:.2}"),
                _ => "-".to_owned(),
            };
            for ch in &c.change {
                let _ = writeln!(
                    out,
                    "| {} | {} | {:.1} / {:.1} | {:.1} / {:.1} | {:.3} / {:.3} | {:.1} | {} | {} |",
                    ch.services,
                    ch.changes,
                    ch.end_to_end_p50_ms,
                    ch.end_to_end_p99_ms,
                    ch.maps_p50_ms,
                    ch.maps_p99_ms,
                    ch.write_p50_ms,
                    ch.write_p99_ms,
                    ch.map_writes_per_change,
                    pair(ch.iptables_restore_p50_ms, ch.iptables_restore_p99_ms),
                    pair(ch.nft_p50_ms, ch.nft_p99_ms)
                );
            }
        }
    }

    fn memory_table(&self, out: &mut String) {
        let Some(m) = &self.memory else { return };
        out.push_str(
            "Kernel memory of every map (`memlock` of each map's fd), with the Services applied \
             and `maxTables` = Services, M = 16381. Maps are preallocated: most of it is there \
             whatever is used.\n\n| Services | total MiB | per Service (Maglev table + \
             frontend entry) | per backend (entry + per-CPU stats) | per tracked flow (2 \
             entries) | total / Service |\n|---:|---:|---:|---:|---:|---:|\n",
        );
        #[expect(clippy::cast_precision_loss, reason = "byte counts")]
        for r in &m.rows {
            let _ = writeln!(
                out,
                "| {} | {:.1} | {:.1} KiB | {:.0} B | {:.0} B | {:.1} KiB |",
                r.services,
                r.total_bytes as f64 / 1_048_576.0,
                r.per_service_bytes / 1024.0,
                r.per_backend_bytes,
                r.per_flow_bytes,
                r.total_per_service_bytes / 1024.0
            );
        }
        if let Some(r) = m.rows.last() {
            out.push_str("\nLargest maps at the last row: ");
            #[expect(clippy::cast_precision_loss, reason = "byte counts")]
            let maps: Vec<String> = r
                .maps
                .iter()
                .take(6)
                .map(|m| format!("{} {:.1} MiB", m.name, m.memlock_bytes as f64 / 1_048_576.0))
                .collect();
            let _ = writeln!(out, "{}.", maps.join(", "));
        }
    }

    fn maglev_table(&self, out: &mut String) {
        let Some(m) = &self.maglev else { return };
        out.push_str(
            "| M | N | build ms | entries/backend max-min | max/mean | remove 1: remapped | \
             add 1: remapped |\n|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for r in &m.rows {
            #[expect(clippy::cast_precision_loss, reason = "small counts")]
            let ideal_remove = 100.0 / r.n as f64;
            #[expect(clippy::cast_precision_loss, reason = "small counts")]
            let ideal_add = 100.0 / (r.n + 1) as f64;
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {:.3} | {:.2}% (ideal {ideal_remove:.2}%) | {:.2}% \
                 (ideal {ideal_add:.2}%) |",
                r.m,
                r.n,
                r.build_ms.show(2),
                r.balance_max_minus_min,
                r.balance_max_over_mean,
                r.remove_one_remapped_pct,
                r.add_one_remapped_pct
            );
        }
    }

    fn body(&self, out: &mut String, heading: &str) {
        let _ = writeln!(out, "{heading} Per-packet cost (BPF_PROG_TEST_RUN)\n");
        self.testrun_table(out);
        let _ = writeln!(out, "\n{heading} Live forwarding over veth\n");
        self.live_tables(out);
        let _ = writeln!(out, "\n{heading} Control plane\n");
        self.control_tables(out);
        let _ = writeln!(out, "\n{heading} Memory\n");
        self.memory_table(out);
        let _ = writeln!(out, "\n{heading} Maglev build time and quality\n");
        self.maglev_table(out);
        if !self.failures.is_empty() {
            let _ = writeln!(out, "\n{heading} Not measured\n");
            for f in &self.failures {
                let _ = writeln!(out, "- {f}");
            }
        }
    }

    fn markdown(&self, charts: &[PathBuf], command: &str) -> String {
        let mut out = format!(
            "# lb benchmark {}\n\nCommand: `{command}`\n\n{}\n",
            self.meta.name,
            self.meta_lines()
        );
        for chart in charts {
            if let Some(name) = chart.file_name() {
                let _ = writeln!(out, "![{}]({})\n", name.display(), name.display());
            }
        }
        self.body(&mut out, "##");
        if let Some(t) = &self.testrun {
            out.push_str("\n## How each test-run path was proven\n\n");
            for c in &t.cases {
                let _ = writeln!(out, "- {}: {}", c.key, c.checks.join("; "));
            }
        }
        out
    }

    fn readme_section(
        &self,
        command: &str,
        report: &str,
        charts: &[PathBuf],
        rel: &dyn Fn(&Path) -> String,
        notes: &str,
    ) -> String {
        let mut out = format!(
            "## Performance\n\nMeasured with `{command}` (as root; it installs what it needs: \
             clang-16, libbpf-dev, linux-libc-dev, linux-source-6.1, iptables, nftables, \
             xz-utils; `cargo xtask bench --quick` is the short run CI does). The full report, every run and the \
             charts: [{report}]({report}).\n\n{}\n",
            self.meta_lines()
        );
        for chart in charts {
            let path = rel(chart);
            let _ = writeln!(out, "![{path}]({path})\n");
        }
        self.body(&mut out, "###");
        if !notes.trim().is_empty() {
            out.push('\n');
            out.push_str(notes.trim());
            out.push('\n');
        }
        out.push('\n');
        out
    }

    fn charts(&self) -> Vec<(&'static str, String)> {
        let mut charts = Vec::new();
        if let Some(t) = &self.testrun {
            let bars: Vec<Bar> = t
                .cases
                .iter()
                .map(|c| Bar {
                    label: c.key.to_owned(),
                    series: usize::from(c.case == Case::Katran),
                    value: c.ns_per_packet.clone(),
                })
                .collect();
            charts.push((
                "testrun",
                bar_chart(
                    "ns per packet (BPF_PROG_TEST_RUN), median and min-max",
                    "ns",
                    &["ours", "Katran peer"],
                    &bars,
                ),
            ));
        }
        if let Some(l) = &self.live {
            let bars: Vec<Bar> = l
                .cells
                .iter()
                .map(|c| Bar {
                    label: format!("{} svc, {}", c.services, c.mix.key()),
                    series: Variant::ALL
                        .iter()
                        .position(|&v| v == c.variant)
                        .unwrap_or(0),
                    value: c.mpps.clone(),
                })
                .collect();
            charts.push((
                "live",
                bar_chart(
                    "live forwarding over veth, Mpps at the sink",
                    "Mpps",
                    &["ours", "XDP redirect", "iptables", "nftables"],
                    &bars,
                ),
            ));
        }
        if let Some(c) = &self.control {
            let mut bars = Vec::new();
            for a in &c.apply {
                let label = format!("{} Services", a.services);
                bars.push(Bar {
                    label: label.clone(),
                    series: 0,
                    value: a.total_ms.clone(),
                });
                for (series, f) in [(1, &a.iptables_restore_ms), (2, &a.nft_ms)] {
                    if let Some(f) = f {
                        bars.push(Bar {
                            label: label.clone(),
                            series,
                            value: f.clone(),
                        });
                    }
                }
            }
            charts.push((
                "apply",
                bar_chart(
                    "applying Services (4 endpoints each), ms",
                    "ms",
                    &["ours", "iptables-restore", "nft -f"],
                    &bars,
                ),
            ));
        }
        charts
    }
}

/// Replaces the README's `## Performance` section (up to the next `## ` heading), or inserts it
/// before `## Layout` (else at the end).
fn replace_section(text: &str, section: &str) -> String {
    if let Some(start) = text.find("\n## Performance\n") {
        let start = start + 1;
        let rest = &text[start + 3..];
        let end = rest.find("\n## ").map_or(text.len(), |i| start + 3 + i + 1);
        return format!("{}{section}{}", &text[..start], &text[end..]);
    }
    if let Some(at) = text.find("\n## Layout\n") {
        return format!("{}\n{section}{}", &text[..at], &text[at + 1..]);
    }
    format!("{text}\n{section}")
}

struct Bar {
    label: String,
    series: usize,
    value: Figure,
}

const COLORS: [&str; 4] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"];

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A horizontal bar chart: one row per bar, grouped by label, coloured by series, with the
/// min-max range as a whisker.
#[expect(clippy::cast_precision_loss, reason = "pixel arithmetic")]
fn bar_chart(title: &str, unit: &str, series: &[&str], bars: &[Bar]) -> String {
    let (left, right, top, row) = (230.0, 90.0, 50.0, 16.0);
    let width = 820.0;
    let plot = width - left - right;
    let max = bars
        .iter()
        .map(|b| b.value.max)
        .fold(0.0_f64, f64::max)
        .max(1e-9);
    let mut y = top;
    let mut body = String::new();
    let mut last_label = String::new();
    for bar in bars {
        if bar.label != last_label {
            y += 6.0;
            let _ = write!(
                body,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" font-size=\"11\">{}</text>",
                left - 6.0,
                y + row - 4.0,
                escape(&bar.label)
            );
            last_label.clone_from(&bar.label);
        }
        let w = plot * bar.value.median / max;
        let color = COLORS[bar.series % COLORS.len()];
        let _ = write!(
            body,
            "<rect x=\"{left}\" y=\"{:.1}\" width=\"{w:.1}\" height=\"{:.1}\" fill=\"{color}\"/>",
            y + 1.0,
            row - 3.0
        );
        let (x0, x1) = (
            left + plot * bar.value.min / max,
            left + plot * bar.value.max / max,
        );
        let ym = y + row / 2.0;
        let _ = write!(
            body,
            "<line x1=\"{x0:.1}\" y1=\"{ym:.1}\" x2=\"{x1:.1}\" y2=\"{ym:.1}\" stroke=\"black\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\">{:.2} {unit}</text>",
            x1 + 4.0,
            y + row - 4.0,
            bar.value.median
        );
        y += row;
    }
    let height = y + 30.0;
    let mut legend = String::new();
    for (i, s) in series.iter().enumerate() {
        let x = left + 150.0 * i as f64;
        let _ = write!(
            legend,
            "<rect x=\"{x}\" y=\"28\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{}\" \
             y=\"37\" font-size=\"11\">{}</text>",
            COLORS[i % COLORS.len()],
            x + 14.0,
            escape(s)
        );
    }
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height:.0}\" \
         font-family=\"sans-serif\"><rect width=\"100%\" height=\"100%\" fill=\"white\"/><text \
         x=\"10\" y=\"18\" font-size=\"14\" font-weight=\"bold\">{}</text>{legend}{body}<line \
         x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{:.1}\" stroke=\"#888\"/></svg>\n",
        escape(title),
        y
    )
}
