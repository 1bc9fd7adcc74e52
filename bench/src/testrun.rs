//! Section 1: the per-packet cost of each path through the programs, with `BPF_PROG_TEST_RUN`
//! and `repeat`, and the Katran-derived peer in the same rounds.
//!
//! Test-run does not restore the frame between repeats, so each case is built so that every
//! repeat takes the path it names, and proves it afterwards: the verdict, the output frame, and
//! counters that moved by exactly `repeat`.
//!
//! - established: a Service whose only endpoint is its own frontend. The first packet (run
//!   before timing) tracks the flow; every timed repeat then finds it (`forward_tracked`),
//!   rewrites the destination (to the same address and port) and updates both checksums.
//! - new flow: the benchmark build's prologue gives every repeat a source never used before, so
//!   each one misses the connection table, picks a backend through Maglev and inserts two
//!   entries (`forward_new`). The table is filled first, so each insert also evicts the least
//!   recently used entry: a busy node's steady state.
//! - reply (TC egress): the reply of such a flow; its translated source is again its own.
//! - drops and non-service traffic leave the frame as it came.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};
use aya::{TestRun, TestRunOptions, TestRunResult, programs::Xdp};
use integration_tests::frame::{
    Ipv4Frame, Ipv4L4, TCP_ACK, TCP_SYN, truncate, verify_ipv4_checksum, verify_l4_checksum,
};
use lb_common::{
    Counter, DropReason,
    bench_ctl::{NEW_FLOW, NEW_FLOW_SEQ},
};
use lb_userspace::{
    dataplane::{BENCH_EBPF_OBJECT, Counters, DataPlane, LoadOptions},
    maps::{MapContents, NodeConfig},
    model::{
        DesiredState, Endpoint, EndpointState, Frontend, FrontendKind, Ipv4Cidr, Protocol,
        ServicePort,
    },
};
use serde::Serialize;

use crate::{Progress, ctl, katran::Katran, stats::Figure};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;

const NODE_NAME: &str = "bench-node";
const CLIENT: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 5);
/// Established flows and their replies: the endpoint is the frontend itself.
const EST_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// New flows: the endpoint is the frontend itself, the prologue varies the source.
const NEW_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
/// A Service without endpoints.
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 99);
/// A Service whose `loadBalancerSourceRanges` exclude the client.
const RANGED_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);
const OTHER_HOST: Ipv4Addr = Ipv4Addr::new(1, 1, 1, 1);
const PORT: u16 = 80;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Case {
    Floor,
    NotService,
    Established,
    NewFlow,
    NewFlowRoomy,
    Reply,
    DropNoBackend,
    DropSourceRange,
    DropTruncated,
    PrologueOnly,
    Katran,
}

impl Case {
    pub const ALL: [Case; 11] = [
        Case::Floor,
        Case::NotService,
        Case::Established,
        Case::NewFlow,
        Case::NewFlowRoomy,
        Case::Reply,
        Case::DropNoBackend,
        Case::DropSourceRange,
        Case::DropTruncated,
        Case::PrologueOnly,
        Case::Katran,
    ];

    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Case::Floor => "trivial XDP program (XDP_PASS), the floor",
            Case::NotService => "non-service traffic (TCP to a non-frontend), XDP_PASS",
            Case::Established => "established flow: conntrack hit, DNAT, IPv4+TCP checksums",
            Case::NewFlow => {
                "new flow: miss, Maglev, 2 conntrack inserts (table full: LRU evicts), DNAT"
            }
            Case::NewFlowRoomy => {
                "new flow into a table with room (fresh table of 2 x repeat entries, no eviction)"
            }
            Case::Reply => "reply path (TC egress): conntrack hit, SNAT back to the frontend",
            Case::DropNoBackend => "drop: Service without endpoints",
            Case::DropSourceRange => "drop: source outside loadBalancerSourceRanges (LPM)",
            Case::DropTruncated => "drop: TCP header truncated",
            Case::PrologueOnly => {
                "benchmark build's new-flow prologue, then a truncated-TCP drop (no map lookup)"
            }
            Case::Katran => {
                "peer: Katran-derived test_xdp_noinline (v4: LRU miss, CH ring, IPIP encap)"
            }
        }
    }

    #[must_use]
    pub fn key(self) -> &'static str {
        match self {
            Case::Floor => "floor",
            Case::NotService => "not_service",
            Case::Established => "established",
            Case::NewFlow => "new_flow",
            Case::NewFlowRoomy => "new_flow_roomy",
            Case::Reply => "reply",
            Case::DropNoBackend => "drop_no_backend",
            Case::DropSourceRange => "drop_source_range",
            Case::DropTruncated => "drop_truncated",
            Case::PrologueOnly => "prologue_only",
            Case::Katran => "katran",
        }
    }
}

#[derive(Debug, Serialize)]
pub struct CaseResult {
    pub case: Case,
    pub key: &'static str,
    pub label: &'static str,
    pub ns_per_packet: Figure,
    /// What proved every repeat took the path: verdict, output, counter deltas.
    pub checks: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct TestRunSection {
    pub repeat: u32,
    pub runs: usize,
    pub cases: Vec<CaseResult>,
    /// The prologue's own cost: `prologue_only` minus `drop_truncated` (same path after it).
    pub prologue_ns: f64,
    /// `new_flow` and `new_flow_roomy` minus the prologue's cost (estimates).
    pub new_flow_without_prologue_ns: f64,
    pub new_flow_roomy_without_prologue_ns: f64,
}

fn sock(addr: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(addr, port)
}

fn self_service(name: &str, vip: Ipv4Addr) -> ServicePort {
    ServicePort {
        service: format!("bench/{name}"),
        port_name: String::new(),
        protocol: Protocol::Tcp,
        frontends: vec![Frontend {
            kind: FrontendKind::ClusterIp,
            addr: vip,
            port: PORT,
        }],
        endpoints: vec![Endpoint {
            addr: vip,
            port: PORT,
            pod: None,
            node_name: Some(NODE_NAME.to_owned()),
            state: EndpointState::Ready,
        }],
        ..ServicePort::default()
    }
}

fn desired_state() -> DesiredState {
    let mut empty = self_service("empty", EMPTY_VIP);
    empty.endpoints.clear();
    let mut ranged = self_service("ranged", RANGED_VIP);
    // loadBalancerSourceRanges guard the LoadBalancer address (not the clusterIP).
    ranged.frontends[0].kind = FrontendKind::LoadBalancer;
    ranged.source_ranges = vec![Ipv4Cidr {
        addr: Ipv4Addr::new(192, 0, 2, 0),
        prefix_len: 24,
    }];
    DesiredState {
        service_ports: vec![
            self_service("established", EST_VIP),
            self_service("new", NEW_VIP),
            empty,
            ranged,
        ],
    }
}

fn load(object: Option<&[u8]>, conntrack_entries: u32) -> anyhow::Result<DataPlane> {
    let options = LoadOptions {
        max_tables: 8,
        conntrack_entries,
        ..LoadOptions::default()
    };
    let mut dp = match object {
        Some(object) => DataPlane::load_object(options, object),
        None => DataPlane::load(options),
    }
    .context("loading the data plane (run as root)")?;
    let node = NodeConfig {
        node_name: NODE_NAME.to_owned(),
        max_tables: 8,
        ..NodeConfig::default()
    };
    let contents = MapContents::from_state(&desired_state(), &node, &MapContents::default())
        .context("building map contents")?;
    dp.apply(contents).context("filling the maps")?;
    Ok(dp)
}

/// One timed test run: the verdict, the kernel's average ns per repeat, the output frame.
pub struct Timed {
    pub verdict: u32,
    pub ns: f64,
    pub out: Vec<u8>,
}

pub fn timed<P>(program: &P, frame: &[u8], repeat: u32) -> anyhow::Result<Timed>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let mut out = vec![0_u8; frame.len() + 512];
    let TestRunResult {
        return_value,
        duration,
        data_size_out,
        ctx_size_out: _,
    } = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat,
            ..TestRunOptions::default()
        })
        .context("BPF_PROG_TEST_RUN")?;
    out.truncate(usize::try_from(data_size_out).unwrap_or(0));
    Ok(Timed {
        verdict: return_value,
        ns: duration_ns(duration),
        out,
    })
}

#[expect(clippy::cast_precision_loss, reason = "nanoseconds of one run")]
fn duration_ns(d: Duration) -> f64 {
    d.as_nanos() as f64
}

/// Counter deltas between two readings, only the ones that moved.
/// Outcome and drop counters that moved, with how much.
type Deltas = (Vec<(Counter, u64)>, Vec<(DropReason, u64)>);

fn deltas(before: &Counters, after: &Counters) -> Deltas {
    let outcomes = Counter::ALL
        .iter()
        .map(|&c| (c, after.get(c).wrapping_sub(before.get(c))))
        .filter(|&(_, n)| n != 0)
        .collect();
    let drops = DropReason::ALL
        .iter()
        .map(|&r| (r, after.drops(r).wrapping_sub(before.drops(r))))
        .filter(|&(_, n)| n != 0)
        .collect();
    (outcomes, drops)
}

fn expect_deltas(
    case: Case,
    before: &Counters,
    after: &Counters,
    outcomes: &[(Counter, u64)],
    drops: &[(DropReason, u64)],
) -> anyhow::Result<String> {
    let (got_outcomes, got_drops) = deltas(before, after);
    let mut want_outcomes = outcomes.to_vec();
    want_outcomes.sort_by_key(|&(c, _)| c as u32);
    let mut want_drops = drops.to_vec();
    want_drops.sort_by_key(|&(r, _)| r as u32);
    ensure!(
        got_outcomes == want_outcomes && got_drops == want_drops,
        "{}: counters moved by {got_outcomes:?} drops {got_drops:?}, expected {want_outcomes:?} \
         drops {want_drops:?}",
        case.key()
    );
    let show: Vec<String> = want_outcomes
        .iter()
        .map(|(c, n)| format!("{}+{n}", c.name()))
        .chain(
            want_drops
                .iter()
                .map(|(r, n)| format!("drop {}+{n}", r.name())),
        )
        .collect();
    Ok(format!("counters exactly: {}", show.join(", ")))
}

struct Frames {
    established: Vec<u8>,
    new_flow: Vec<u8>,
    reply: Vec<u8>,
    not_service: Vec<u8>,
    no_backend: Vec<u8>,
    source_range: Vec<u8>,
    truncated: Vec<u8>,
}

fn frames() -> Frames {
    let client = sock(CLIENT, 40_000);
    let tcp = |dst: SocketAddrV4| Ipv4Frame::tcp(client, dst).with_tcp_flags(TCP_ACK);
    Frames {
        established: tcp(sock(EST_VIP, PORT)).build(),
        new_flow: Ipv4Frame::tcp(sock(CLIENT, 1), sock(NEW_VIP, PORT))
            .with_tcp_flags(TCP_SYN)
            .build(),
        reply: Ipv4Frame::tcp(sock(EST_VIP, PORT), client)
            .with_tcp_flags(TCP_ACK)
            .build(),
        not_service: tcp(sock(OTHER_HOST, 443)).build(),
        no_backend: tcp(sock(EMPTY_VIP, PORT)).build(),
        source_range: tcp(sock(RANGED_VIP, PORT)).build(),
        // Ethernet + IPv4 + 10 of the 20 TCP header bytes.
        truncated: truncate(&tcp(sock(EST_VIP, PORT)).build(), 14 + 20 + 10),
    }
}

/// Everything the rounds need, loaded once.
pub struct Bench {
    prod: DataPlane,
    /// The benchmark build (prologue and `bench_xdp_pass`), for the floor and new flows.
    with_prologue: DataPlane,
    katran: Option<Katran>,
    frames: Frames,
}

impl Bench {
    pub fn new(katran: Option<Katran>) -> anyhow::Result<Self> {
        let mut prod = load(None, lb_common::CONNTRACK_ENTRIES)?;
        let mut with_prologue = load(Some(BENCH_EBPF_OBJECT), lb_common::CONNTRACK_ENTRIES)?;
        with_prologue
            .ebpf_mut()
            .program_mut("bench_xdp_pass")
            .context("no bench_xdp_pass in the benchmark object")
            .and_then(|p| {
                let p: &mut Xdp = p.try_into()?;
                p.load().map_err(anyhow::Error::from)
            })?;
        let frames = frames();
        // The established flow and its reply are tracked by one packet, before any timing.
        let first = timed(prod.xdp_program()?, &frames.established, 1)?;
        ensure!(first.verdict == XDP_PASS, "tracking the established flow");
        Ok(Bench {
            prod,
            with_prologue,
            katran,
            frames,
        })
    }

    /// Fills the new-flow data plane's connection table, so the timed runs insert into a full
    /// table (each insert evicts) rather than into one that fills up during the runs.
    pub fn fill_conntrack(&mut self) -> anyhow::Result<()> {
        ctl::set(self.with_prologue.ebpf_mut(), NEW_FLOW, 1)?;
        let program = self.with_prologue.xdp_program()?;
        let run = timed(
            program,
            &self.frames.new_flow,
            lb_common::CONNTRACK_ENTRIES / 2 + 1024,
        );
        ctl::set(self.with_prologue.ebpf_mut(), NEW_FLOW, 0)?;
        ensure!(run?.verdict == XDP_PASS, "filling the connection table");
        Ok(())
    }

    /// One timed run of `case`, checked. Returns ns per packet and what was checked.
    #[expect(
        clippy::too_many_lines,
        reason = "one arm per case, each with its checks"
    )]
    pub fn run(&mut self, case: Case, repeat: u32) -> anyhow::Result<(f64, Vec<String>)> {
        let r = u64::from(repeat);
        let mut checks = Vec::new();
        match case {
            Case::Floor => {
                let program: &mut Xdp = self
                    .with_prologue
                    .ebpf_mut()
                    .program_mut("bench_xdp_pass")
                    .context("bench_xdp_pass")?
                    .try_into()?;
                let t = timed(program, &self.frames.established, repeat)?;
                ensure!(t.verdict == XDP_PASS, "floor: verdict {}", t.verdict);
                ensure!(t.out == self.frames.established, "floor: frame changed");
                checks.push("verdict XDP_PASS, frame unchanged".to_owned());
                Ok((t.ns, checks))
            }
            Case::Katran => {
                let katran = self
                    .katran
                    .as_mut()
                    .context("the Katran peer is not loaded")?;
                katran.run(repeat)
            }
            Case::NewFlow | Case::NewFlowRoomy | Case::PrologueOnly => {
                let frame = if case == Case::PrologueOnly {
                    self.frames.truncated.clone()
                } else {
                    self.frames.new_flow.clone()
                };
                // A table with room: a fresh data plane whose table takes every repeat.
                let mut roomy = if case == Case::NewFlowRoomy {
                    Some(load(
                        Some(BENCH_EBPF_OBJECT),
                        repeat.saturating_mul(2).saturating_add(65_536),
                    )?)
                } else {
                    None
                };
                let dp = roomy.as_mut().unwrap_or(&mut self.with_prologue);
                let seq = ctl::get(dp.ebpf_mut(), NEW_FLOW_SEQ)?;
                ctl::set(dp.ebpf_mut(), NEW_FLOW, 1)?;
                let before = dp.counters()?;
                let t = timed(dp.xdp_program()?, &frame, repeat);
                let after = dp.counters()?;
                ctl::set(dp.ebpf_mut(), NEW_FLOW, 0)?;
                let t = t?;
                let last = seq + r - 1;
                #[expect(clippy::cast_possible_truncation, reason = "16 bits each")]
                let (addr_low, port) = ((last >> 16) as u16, last as u16);
                // Ethernet + IPv4: the source address's low half, then the L4 source port.
                let src_low = t.out.get(28..30).map(|b| u16::from_be_bytes([b[0], b[1]]));
                let sport = t.out.get(34..36).map(|b| u16::from_be_bytes([b[0], b[1]]));
                ensure!(
                    src_low == Some(addr_low) && sport == Some(port),
                    "{}: the last repeat's source is {src_low:?}/{sport:?}, expected sequence \
                     {last}",
                    case.key()
                );
                checks.push(format!(
                    "every repeat a distinct source (last = sequence {last}, checked in the \
                     output)"
                ));
                if case == Case::PrologueOnly {
                    ensure!(t.verdict == XDP_DROP, "prologue: verdict {}", t.verdict);
                    checks.push(expect_deltas(
                        case,
                        &before,
                        &after,
                        &[(Counter::XdpSeen, r), (Counter::XdpDrop, r)],
                        &[(DropReason::L4HeaderTruncated, r)],
                    )?);
                } else {
                    ensure!(
                        t.verdict == XDP_PASS,
                        "{}: verdict {}",
                        case.key(),
                        t.verdict
                    );
                    let out = Ipv4L4::parse(&t.out).map_err(|e| anyhow::anyhow!("{e}"))?;
                    ensure!(
                        *out.dst.ip() == NEW_VIP && out.dst.port() == PORT,
                        "new flow: destination {}",
                        out.dst
                    );
                    checks.push(format!("verdict XDP_PASS, destination {}", out.dst));
                    checks.push(expect_deltas(
                        case,
                        &before,
                        &after,
                        &[(Counter::XdpSeen, r), (Counter::ForwardNew, r)],
                        &[],
                    )?);
                }
                Ok((t.ns, checks))
            }
            Case::Reply => {
                let before = self.prod.counters()?;
                let t = timed(self.prod.tc_program()?, &self.frames.reply, repeat)?;
                let after = self.prod.counters()?;
                ensure!(t.verdict == TC_ACT_OK, "reply: verdict {}", t.verdict);
                ensure!(t.out == self.frames.reply, "reply: frame differs");
                verify(&t.out)?;
                checks.push("verdict TC_ACT_OK, checksums valid".to_owned());
                checks.push(expect_deltas(
                    case,
                    &before,
                    &after,
                    &[(Counter::TcSeen, r), (Counter::ReplyTranslated, r)],
                    &[],
                )?);
                Ok((t.ns, checks))
            }
            _ => {
                let (frame, verdict, counter, drop) = match case {
                    Case::NotService => (
                        &self.frames.not_service,
                        XDP_PASS,
                        Counter::PassNotService,
                        None,
                    ),
                    Case::Established => (
                        &self.frames.established,
                        XDP_PASS,
                        Counter::ForwardTracked,
                        None,
                    ),
                    Case::DropNoBackend => (
                        &self.frames.no_backend,
                        XDP_DROP,
                        Counter::XdpDrop,
                        Some(DropReason::NoBackend),
                    ),
                    Case::DropSourceRange => (
                        &self.frames.source_range,
                        XDP_DROP,
                        Counter::XdpDrop,
                        Some(DropReason::SourceRangeDenied),
                    ),
                    Case::DropTruncated => (
                        &self.frames.truncated,
                        XDP_DROP,
                        Counter::XdpDrop,
                        Some(DropReason::L4HeaderTruncated),
                    ),
                    _ => bail!("unhandled case {case:?}"),
                };
                let frame = frame.clone();
                let before = self.prod.counters()?;
                let t = timed(self.prod.xdp_program()?, &frame, repeat)?;
                let after = self.prod.counters()?;
                ensure!(
                    t.verdict == verdict,
                    "{}: verdict {} (expected {verdict})",
                    case.key(),
                    t.verdict
                );
                ensure!(t.out == frame, "{}: frame differs", case.key());
                if case == Case::Established {
                    verify(&t.out)?;
                    checks.push("verdict XDP_PASS, DNAT output with valid checksums".to_owned());
                } else {
                    checks.push(format!("verdict {verdict}, frame unchanged"));
                }
                let drops: Vec<(DropReason, u64)> = drop.map(|d| (d, r)).into_iter().collect();
                checks.push(expect_deltas(
                    case,
                    &before,
                    &after,
                    &[(Counter::XdpSeen, r), (counter, r)],
                    &drops,
                )?);
                Ok((t.ns, checks))
            }
        }
    }
}

fn verify(frame: &[u8]) -> anyhow::Result<()> {
    verify_ipv4_checksum(frame).map_err(|e| anyhow::anyhow!("IPv4 checksum: {e}"))?;
    verify_l4_checksum(frame).map_err(|e| anyhow::anyhow!("L4 checksum: {e}"))?;
    Ok(())
}

/// Runs every case `runs` times, interleaved (round by round, Katran between ours).
pub fn section(
    katran: Option<Katran>,
    repeat: u32,
    runs: usize,
    progress: &mut Progress,
) -> anyhow::Result<TestRunSection> {
    let mut bench = Bench::new(katran)?;
    progress.step("test-run: filling the new-flow connection table");
    bench.fill_conntrack()?;
    let cases: Vec<Case> = Case::ALL
        .iter()
        .copied()
        .filter(|&c| c != Case::Katran || bench.katran.is_some())
        .collect();
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    let mut checks: Vec<Vec<String>> = vec![Vec::new(); cases.len()];
    for round in 0..runs {
        progress.step(&format!(
            "test-run: round {}/{runs} ({} cases x {repeat} repeats)",
            round + 1,
            cases.len()
        ));
        for (i, &case) in cases.iter().enumerate() {
            let (ns, c) = bench
                .run(case, repeat)
                .with_context(|| format!("test-run case {}", case.key()))?;
            samples[i].push(ns);
            checks[i] = c;
        }
    }
    let mut results = Vec::new();
    for (i, &case) in cases.iter().enumerate() {
        results.push(CaseResult {
            case,
            key: case.key(),
            label: case.label(),
            ns_per_packet: Figure::of(&samples[i]).context("no samples")?,
            checks: std::mem::take(&mut checks[i]),
        });
    }
    let median = |c: Case| {
        results
            .iter()
            .find(|r| r.case == c)
            .map_or(f64::NAN, |r| r.ns_per_packet.median)
    };
    let prologue_ns = median(Case::PrologueOnly) - median(Case::DropTruncated);
    Ok(TestRunSection {
        repeat,
        runs,
        new_flow_without_prologue_ns: median(Case::NewFlow) - prologue_ns,
        new_flow_roomy_without_prologue_ns: median(Case::NewFlowRoomy) - prologue_ns,
        prologue_ns,
        cases: results,
    })
}
