//! `lb-bench`: the measurements behind `cargo xtask bench` (which installs what they need,
//! builds this binary and runs it as root). See the README's "Performance" section.

mod control;
mod ctl;
mod katran;
mod live;
mod memory;
mod report;
mod stats;
mod testrun;
mod workload;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use clap::Parser;

#[derive(Parser)]
#[command(about = "lb benchmarks: test-run, live forwarding, control plane, memory, Maglev")]
pub struct Args {
    /// A short run: fewer repeats, a subset of the live matrix, short durations.
    #[arg(long)]
    pub quick: bool,
    /// Where the JSON, the Markdown report and the SVG charts go.
    #[arg(long)]
    pub out_dir: PathBuf,
    /// The results' base name (`<date>-<git sha>`).
    #[arg(long)]
    pub name: String,
    /// Scratch directory (the Katran source and object).
    #[arg(long)]
    pub scratch: PathBuf,
    /// Update this README's "Performance" section with the results.
    #[arg(long)]
    pub readme: Option<PathBuf>,
    /// The command line to show in the README.
    #[arg(long, default_value = "cargo xtask bench")]
    pub command: String,
    /// Only these sections (testrun, live, control, memory, maglev); default all.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
}

/// Progress lines with the time since the start, so a long run shows where it is.
pub struct Progress {
    start: Instant,
}

impl Progress {
    pub fn step(&mut self, what: &str) {
        println!("[{:>6.1}s] {what}", self.start.elapsed().as_secs_f64());
    }

    #[must_use]
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut progress = Progress {
        start: Instant::now(),
    };
    let wants = |s: &str| args.only.is_empty() || args.only.iter().any(|o| o == s);
    let mut report = report::Report::new(&args)?;

    // A section that fails is recorded and the others still run, so one broken peer does not
    // lose the rest of a long run; the run then fails at the end.
    if wants("testrun") {
        progress.step("test-run: building the Katran peer");
        let katran = katran::build(&args.scratch)
            .and_then(|(object, clang)| katran::Katran::load(&object, clang));
        let katran = match katran {
            Ok(k) => {
                report.meta.katran_clang.clone_from(&k.clang);
                Some(k)
            }
            Err(e) => {
                report.failures.push(format!("Katran peer: {e:#}"));
                None
            }
        };
        let (repeat, runs) = if args.quick {
            (100_000, 5)
        } else {
            (1_000_000, 7)
        };
        match testrun::section(katran, repeat, runs, &mut progress) {
            Ok(section) => report.testrun = Some(section),
            Err(e) => report.failures.push(format!("test-run: {e:#}")),
        }
    }
    if wants("maglev") {
        progress.step("Maglev: build time and quality");
        match control::maglev_section(args.quick) {
            Ok(section) => report.maglev = Some(section),
            Err(e) => report.failures.push(format!("Maglev: {e:#}")),
        }
    }
    // Namespaces this run creates: `lbb<pid>-*`; ones a killed run left are removed first.
    integration_tests::netns::Netns::remove_stale("lbb");
    let prefix = format!("lbb{}-", std::process::id());
    if wants("control") {
        match control::apply_section(args.quick, &prefix, &mut progress) {
            Ok((control, memory)) => {
                report.control = Some(control);
                report.memory = Some(memory);
            }
            Err(e) => report.failures.push(format!("control plane: {e:#}")),
        }
    }
    if wants("live") {
        match live::section(args.quick, &prefix, &mut progress) {
            Ok(section) => report.live = Some(section),
            Err(e) => report.failures.push(format!("live: {e:#}")),
        }
    }
    report.meta.duration_s = progress.elapsed().as_secs_f64();
    let written = report.write(&args)?;
    for path in written {
        progress.step(&format!("wrote {}", path.display()));
    }
    let problems = report.verify(&args);
    if !problems.is_empty() {
        anyhow::bail!("the run is incomplete:\n  {}", problems.join("\n  "));
    }
    progress.step("every figure produced and every path checked");
    Ok(())
}
