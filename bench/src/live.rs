//! Section 2: live forwarding over veth, our XDP program against kube-proxy's data paths.
//!
//! ```text
//!  generator ns                    node ns (one per variant)                   sink ns
//!  g0 --veth-- n0 [XDP: ours | redirect | pass + iptables | pass + nft] n1 --veth-- s0 [XDP sink]
//!  live-frames generator     10.10.0.1/24            10.11.0.1/24            counts, drops
//! ```
//!
//! The generator (`bench_xdp_gen`, a live-frames test run in the generator namespace) writes each UDP
//! frame from a template and sends it out of g0 (`XDP_TX`). In the node, the variant under test
//! translates it to one of the Service's endpoints (10.2.0.0/15, routed to the sink), the kernel
//! forwards it (ours passes translated packets to the stack: `XDP_PASS`, no XDP redirect yet),
//! and the sink's XDP program counts and drops it. The bare XDP redirect from n0 to n1 is the
//! ceiling. n0 always has an XDP program, because veth only takes frames sent with `XDP_TX` from
//! its peer when it has one (a no-op `XDP_PASS` for the netfilter variants).
//!
//! Each variant has its own node namespace (so netfilter's connection tracking, which the NAT
//! rules turn on, never touches the others) and its own generator and sink. Runs are
//! interleaved: round by round, every variant once.

use std::{
    fs::File,
    net::Ipv4Addr,
    os::fd::AsFd as _,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use aya::{
    Ebpf, TestRun as _, TestRunAttrs, TestRunOptions,
    maps::{Array, MapData, PerCpuArray},
    programs::{Xdp, XdpMode, xdp::XdpLinkId},
};
use integration_tests::{frame::Ipv4Frame, netns::Netns};
use lb_common::{
    Counter, Egress,
    bench_ctl::{
        GEN_64K_FLOWS, GEN_MODE, GEN_NEW_FLOWS, GEN_ONE_FLOW, REDIRECT_IFINDEX, SINK_PORT,
    },
};
use lb_userspace::{
    dataplane::{BENCH_EBPF_OBJECT, DataPlane, LoadOptions, XdpModeChoice},
    maps::{MapContents, NodeConfig},
};
use serde::Serialize;

use crate::{
    Progress,
    control::timed_stdin,
    ctl,
    stats::Figure,
    workload::{self, Workload},
};

/// Maglev M for the live runs: 4 endpoints need far less than the default, and 30k tables of
/// the default 16381 entries would take 2 GB of kernel memory.
const LIVE_TABLE_SIZE: u32 = 4093;
const ENDPOINTS: usize = 4;

/// Endpoints per Service at `count` Services: 4, or fewer where 4 would not fit in our data
/// path's backend table (`lb_common::MAX_BACKENDS` - 1 usable ids: 30k x 4 does not), the same
/// for every variant.
fn endpoints_for(count: usize) -> usize {
    let usable = (lb_common::MAX_BACKENDS - 1) as usize;
    ENDPOINTS.min(usable / count.max(1)).max(1)
}
const GEN_SRC: Ipv4Addr = Ipv4Addr::new(172, 20, 0, 0);
const GEN_SRC_PORT: u16 = 1024;
const BATCH: u32 = 64;
/// Frames per live-frames test run: small enough for the time budget to be checked often.
const LIVE_CHUNK: u32 = 65_536;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Variant {
    Ours,
    Redirect,
    Iptables,
    Nftables,
}

impl Variant {
    pub const ALL: [Variant; 4] = [
        Variant::Ours,
        Variant::Redirect,
        Variant::Iptables,
        Variant::Nftables,
    ];

    #[must_use]
    pub fn key(self) -> &'static str {
        match self {
            Variant::Ours => "ours",
            Variant::Redirect => "xdp_redirect",
            Variant::Iptables => "iptables",
            Variant::Nftables => "nftables",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Mix {
    OneFlow,
    Flows64k,
    NewFlows,
}

impl Mix {
    #[must_use]
    pub fn key(self) -> &'static str {
        match self {
            Mix::OneFlow => "one_flow",
            Mix::Flows64k => "64k_flows",
            Mix::NewFlows => "new_flow_per_packet",
        }
    }

    fn mode(self) -> u64 {
        match self {
            Mix::OneFlow => GEN_ONE_FLOW,
            Mix::Flows64k => GEN_64K_FLOWS,
            Mix::NewFlows => GEN_NEW_FLOWS,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct LiveCell {
    pub services: usize,
    pub endpoints_per_service: usize,
    pub mix: Mix,
    pub variant: Variant,
    /// Frames the sink received per second of generator time, millions.
    pub mpps: Figure,
    /// Share of generated frames that reached the sink, per run.
    pub delivered_pct: Figure,
}

#[derive(Debug, Serialize)]
pub struct LiveSection {
    /// Frames per run, unless the time budget ends it first.
    pub frames_per_run: u32,
    pub seconds_per_run_at_most: f64,
    pub runs: usize,
    pub maglev_table_size: u32,
    pub generator_cpu: Option<usize>,
    /// The generator used, and why live frames were not (if they were not).
    pub generator: Generator,
    pub live_frames_refused: Option<String>,
    /// Service counts that could not be configured, with why.
    pub skipped: Vec<String>,
    pub cells: Vec<LiveCell>,
    /// Ours over each peer, by (services, mix): median Mpps ratios.
    pub ratios: Vec<Ratio>,
}

#[derive(Debug, Serialize)]
pub struct Ratio {
    pub services: usize,
    pub mix: Mix,
    pub ours_over_redirect: f64,
    pub ours_over_iptables: f64,
    pub ours_over_nftables: f64,
}

/// Runs `f` with this thread in network namespace `ns`, and returns it to where it was.
fn in_netns<T>(ns: &str, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let home = File::open("/proc/thread-self/ns/net").context("opening this thread's netns")?;
    let target = if ns == "self" {
        File::open("/proc/thread-self/ns/net")?
    } else {
        File::open(format!("/run/netns/{ns}")).with_context(|| format!("netns {ns}"))?
    };
    setns(&target)?;
    let result = f();
    setns(&home).context("returning to the original network namespace")?;
    result
}

fn setns(file: &File) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: setns on an open namespace file descriptor; affects only this thread.
    let ret = unsafe { libc::setns(file.as_fd().as_raw_fd(), libc::CLONE_NEWNET) };
    if ret != 0 {
        bail!("setns: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn ifindex(name: &str) -> anyhow::Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    ensure!(index != 0, "no interface {name}");
    Ok(index)
}

fn mac(ns: &Netns, iface: &str) -> anyhow::Result<[u8; 6]> {
    let output = integration_tests::netns::run(
        ns.command("cat")
            .arg(format!("/sys/class/net/{iface}/address")),
    )?;
    let text = String::from_utf8_lossy(&output.stdout);
    let mut bytes = [0_u8; 6];
    for (i, part) in text.trim().split(':').enumerate().take(6) {
        bytes[i] = u8::from_str_radix(part, 16)?;
    }
    Ok(bytes)
}

fn load_bench_object() -> anyhow::Result<Ebpf> {
    Ebpf::load(BENCH_EBPF_OBJECT).context("loading the benchmark object")
}

fn load_xdp(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<()> {
    let program: &mut Xdp = ebpf
        .program_mut(name)
        .with_context(|| format!("no {name}"))?
        .try_into()?;
    program.load()?;
    Ok(())
}

fn attach(ebpf: &mut Ebpf, name: &str, iface: &str) -> anyhow::Result<XdpLinkId> {
    let program: &mut Xdp = ebpf
        .program_mut(name)
        .with_context(|| format!("no {name}"))?
        .try_into()?;
    program
        .attach(iface, XdpMode::Driver)
        .with_context(|| format!("attaching {name} to {iface}"))
}

fn per_cpu_sum(ebpf: &Ebpf, name: &str) -> anyhow::Result<u64> {
    let map: PerCpuArray<&MapData, u64> =
        PerCpuArray::try_from(ebpf.map(name).with_context(|| format!("no {name}"))?)?;
    Ok(map.get(&0, 0)?.iter().sum())
}

/// One variant's namespaces and programs.
///
/// Fields drop in order: the programs (and their links) first, then the namespaces, whose
/// guards delete them with their veths, also when a run fails.
struct Lane {
    dp: Option<DataPlane>,
    /// Generator, sink and (for the peers) the node's XDP program: one bench object each, so
    /// their maps (counters, control) are separate.
    node: Option<Ebpf>,
    generator: Ebpf,
    sink: Ebpf,
    variant: Variant,
    gen_ns: Netns,
    node_ns: Netns,
    /// Kept for its guard: dropping it deletes the sink namespace.
    _sink_ns: Netns,
    gen_ifindex: u32,
    template: Vec<u8>,
    generator_kind: Generator,
    packet: Option<PacketGen>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Generator {
    /// `bench_xdp_gen` in a live-frames test run (`BPF_F_TEST_XDP_LIVE_FRAMES`).
    LiveFrames,
    /// A packet socket (`AF_PACKET`, `sendmmsg`, qdisc bypassed) in the generator namespace.
    Packet,
}

/// The fallback generator: frames written from the template in userspace, 64 per
/// `sendmmsg`, out of g0.
struct PacketGen {
    fd: std::os::fd::OwnedFd,
    seq: u64,
}

const PACKET_QDISC_BYPASS: libc::c_int = 20;
const PACKET_BATCH: usize = 64;

impl PacketGen {
    fn open(iface: &str) -> anyhow::Result<Self> {
        use std::os::fd::FromRawFd as _;
        // SAFETY: plain socket(2); the descriptor is owned below.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        ensure!(
            raw >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: a fresh descriptor nobody else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        let one: libc::c_int = 1;
        // SAFETY: an int option of the size given.
        unsafe {
            libc::setsockopt(
                raw,
                libc::SOL_PACKET,
                PACKET_QDISC_BYPASS,
                (&raw const one).cast(),
                4,
            );
        }
        // SAFETY: a zeroed sockaddr_ll with family and interface set.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = u16::try_from(libc::AF_PACKET).unwrap_or(17);
        addr.sll_ifindex = i32::try_from(ifindex(iface)?)?;
        // SAFETY: binding to a sockaddr_ll of the size given.
        let ret = unsafe {
            libc::bind(
                raw,
                (&raw const addr).cast(),
                u32::try_from(size_of::<libc::sockaddr_ll>()).unwrap_or(20),
            )
        };
        ensure!(
            ret == 0,
            "binding to {iface}: {}",
            std::io::Error::last_os_error()
        );
        Ok(PacketGen { fd, seq: 0 })
    }

    /// Sends `frames` frames from `template`, varying the source as `mix` says; returns the
    /// time it took and the frames the kernel took.
    fn send(
        &mut self,
        template: &[u8],
        mix: Mix,
        frames: u32,
        budget: Duration,
    ) -> anyhow::Result<(Duration, u64)> {
        use std::os::fd::AsRawFd as _;
        let len = template.len();
        let mut buf = vec![0_u8; len * PACKET_BATCH];
        let base_check = u16::from_be_bytes([template[24], template[25]]);
        let mut sent = 0_u64;
        let total = u64::from(frames);
        let start = Instant::now();
        let deadline = start + budget;
        while sent < total && Instant::now() < deadline {
            let n = usize::try_from((total - sent).min(PACKET_BATCH as u64)).unwrap_or(1);
            for k in 0..n {
                let frame = &mut buf[k * len..(k + 1) * len];
                frame.copy_from_slice(template);
                let seq = self.seq;
                self.seq += 1;
                #[expect(clippy::cast_possible_truncation, reason = "16 bits each")]
                match mix {
                    Mix::OneFlow => {}
                    Mix::Flows64k => frame[34..36].copy_from_slice(&(seq as u16).to_be_bytes()),
                    Mix::NewFlows => {
                        let low = ((seq >> 16) % 0xfffe + 1) as u16;
                        frame[34..36].copy_from_slice(&(seq as u16).to_be_bytes());
                        frame[28..30].copy_from_slice(&low.to_be_bytes());
                        // RFC 1624 with the template's low half 0.
                        let mut sum = u32::from(!base_check) + u32::from(low);
                        sum = (sum & 0xffff) + (sum >> 16);
                        sum = (sum & 0xffff) + (sum >> 16);
                        let check = !(sum as u16);
                        frame[24..26].copy_from_slice(&check.to_be_bytes());
                    }
                }
            }
            let mut iovs: Vec<libc::iovec> = (0..n)
                .map(|k| libc::iovec {
                    iov_base: buf[k * len..].as_mut_ptr().cast(),
                    iov_len: len,
                })
                .collect();
            // SAFETY: zeroed mmsghdrs each pointing at one iovec of `buf`, which outlives the
            // call.
            let mut msgs: Vec<libc::mmsghdr> = iovs
                .iter_mut()
                .map(|iov| {
                    let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                    m.msg_hdr.msg_iov = std::ptr::from_mut(iov);
                    m.msg_hdr.msg_iovlen = 1;
                    m
                })
                .collect();
            // SAFETY: `msgs` holds `n` valid headers.
            let ret = unsafe {
                libc::sendmmsg(
                    self.fd.as_raw_fd(),
                    msgs.as_mut_ptr(),
                    u32::try_from(n).unwrap_or(1),
                    0,
                )
            };
            if ret < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ENOBUFS) || e.raw_os_error() == Some(libc::EAGAIN)
                {
                    continue;
                }
                bail!("sendmmsg: {e}");
            }
            sent += u64::try_from(ret).unwrap_or(0);
        }
        Ok((start.elapsed(), sent))
    }
}

impl Lane {
    #[expect(
        clippy::too_many_lines,
        reason = "the topology step by step: namespaces, veths, addresses, routes, programs"
    )]
    fn create(prefix: &str, variant: Variant) -> anyhow::Result<Self> {
        let name = |role: &str| format!("{prefix}{}-{role}", variant.key().replace('_', ""));
        let gen_ns = Netns::create(&name("gen"))?;
        let node_ns = Netns::create(&name("node"))?;
        let sink_ns = Netns::create(&name("sink"))?;
        gen_ns.ip(&[
            "link",
            "add",
            "g0",
            "type",
            "veth",
            "peer",
            "name",
            "n0",
            "netns",
            node_ns.name(),
        ])?;
        node_ns.ip(&[
            "link",
            "add",
            "n1",
            "type",
            "veth",
            "peer",
            "name",
            "s0",
            "netns",
            sink_ns.name(),
        ])?;
        gen_ns.ip(&["addr", "add", "10.10.0.2/24", "dev", "g0"])?;
        gen_ns.ip(&["link", "set", "g0", "up"])?;
        node_ns.ip(&["addr", "add", "10.10.0.1/24", "dev", "n0"])?;
        node_ns.ip(&["addr", "add", "10.11.0.1/24", "dev", "n1"])?;
        node_ns.ip(&["link", "set", "n0", "up"])?;
        node_ns.ip(&["link", "set", "n1", "up"])?;
        sink_ns.ip(&["addr", "add", "10.11.0.2/24", "dev", "s0"])?;
        sink_ns.ip(&["link", "set", "s0", "up"])?;
        let sink_mac = mac(&sink_ns, "s0")?;
        let sink_mac = sink_mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        node_ns.ip(&[
            "neigh",
            "replace",
            "10.11.0.2",
            "lladdr",
            &sink_mac,
            "dev",
            "n1",
            "nud",
            "permanent",
        ])?;
        node_ns.ip(&[
            "route",
            "add",
            "10.2.0.0/15",
            "via",
            "10.11.0.2",
            "dev",
            "n1",
        ])?;
        node_ns.ip(&[
            "route",
            "add",
            "172.20.0.0/16",
            "via",
            "10.10.0.2",
            "dev",
            "n0",
        ])?;
        for ns in [&gen_ns, &sink_ns] {
            ns.sysctl("net.ipv6.conf.all.disable_ipv6=1")?;
        }
        for setting in [
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.n0.rp_filter=0",
            "net.ipv4.conf.n0.accept_local=1",
        ] {
            node_ns.sysctl(setting)?;
        }
        let node_mac = mac(&node_ns, "n0")?;
        let gen_mac = mac(&gen_ns, "g0")?;

        let mut sink = load_bench_object()?;
        load_xdp(&mut sink, "bench_xdp_sink")?;
        // Only frames to the endpoints' port count (translated ones); the redirect does not
        // translate, so its sink counts the Service port.
        let port = if variant == Variant::Redirect {
            workload::SERVICE_PORT
        } else {
            workload::TARGET_PORT
        };
        ctl::set(&mut sink, SINK_PORT, u64::from(port))?;
        in_netns(sink_ns.name(), || {
            attach(&mut sink, "bench_xdp_sink", "s0").map(drop)
        })?;
        let mut generator = load_bench_object()?;
        load_xdp(&mut generator, "bench_xdp_gen")?;
        // g0 needs no program for XDP_TX from a test run; the node side (n0) has one.
        let gen_ifindex = in_netns(gen_ns.name(), || ifindex("g0"))?;

        let template = Ipv4Frame::udp(
            std::net::SocketAddrV4::new(GEN_SRC, GEN_SRC_PORT),
            std::net::SocketAddrV4::new(workload::vip(0), workload::SERVICE_PORT),
        )
        .with_payload(vec![0x5a_u8; 22])
        .without_udp_checksum()
        .build();
        ensure!(template.len() == 64, "template of {} bytes", template.len());
        let mut template = template;
        template[0..6].copy_from_slice(&node_mac);
        template[6..12].copy_from_slice(&gen_mac);

        let mut lane = Lane {
            variant,
            gen_ns,
            node_ns,
            _sink_ns: sink_ns,
            generator,
            sink,
            node: None,
            dp: None,
            gen_ifindex,
            template,
            generator_kind: Generator::LiveFrames,
            packet: None,
        };
        lane.attach_node()?;
        Ok(lane)
    }

    fn attach_node(&mut self) -> anyhow::Result<()> {
        let node_ns = self.node_ns.name().to_owned();
        match self.variant {
            // The data plane is loaded by `configure`, sized for the Services.
            Variant::Ours => {}
            Variant::Redirect => {
                let mut node = load_bench_object()?;
                load_xdp(&mut node, "bench_xdp_redirect")?;
                let n1 = in_netns(&node_ns, || ifindex("n1"))?;
                ctl::set(&mut node, REDIRECT_IFINDEX, u64::from(n1))?;
                in_netns(&node_ns, || {
                    attach(&mut node, "bench_xdp_redirect", "n0").map(drop)
                })?;
                self.node = Some(node);
            }
            Variant::Iptables | Variant::Nftables => {
                let mut node = load_bench_object()?;
                load_xdp(&mut node, "bench_xdp_pass")?;
                in_netns(&node_ns, || {
                    attach(&mut node, "bench_xdp_pass", "n0").map(drop)
                })?;
                self.node = Some(node);
            }
        }
        Ok(())
    }

    /// Serves `count` Services (ours needs a data plane with room for their tables).
    fn configure(&mut self, count: usize, progress: &mut Progress) -> anyhow::Result<()> {
        let workload = Workload::new(count, endpoints_for(count));
        match self.variant {
            Variant::Ours => {
                // Tables are sized at load: reload with room for `count`, then attach again.
                self.dp = None;
                let mut dp = DataPlane::load(LoadOptions {
                    max_tables: u32::try_from(count).unwrap_or(u32::MAX),
                    maglev_table_size: LIVE_TABLE_SIZE,
                    ..LoadOptions::default()
                })?;
                let loaded = lb_userspace::config::parse(
                    &workload.yaml(LIVE_TABLE_SIZE),
                    &[Ipv4Addr::new(10, 10, 0, 1)],
                )
                .map_err(|p| anyhow::anyhow!("manifests: {}", p.len()))?;
                let node = NodeConfig {
                    node_name: workload::NODE_NAME.to_owned(),
                    maglev_table_size: LIVE_TABLE_SIZE,
                    max_tables: u32::try_from(count).unwrap_or(u32::MAX),
                    ..NodeConfig::default()
                };
                let contents = MapContents::from_state(&loaded.state, &node, dp.contents())?;
                dp.apply(contents)?;
                let node_ns = self.node_ns.name().to_owned();
                // On both links, as the agent runs: n1 (its peer runs the sink's XDP program,
                // so it takes XDP frames) becomes a target XDP sends to.
                in_netns(&node_ns, || {
                    for iface in ["n0", "n1"] {
                        dp.attach(iface, XdpModeChoice::Native)?;
                    }
                    Ok::<_, anyhow::Error>(())
                })?;
                self.dp = Some(dp);
            }
            Variant::Redirect => {}
            Variant::Iptables => {
                progress.step(&format!("live: iptables-restore of {count} Services"));
                timed_stdin(&self.node_ns, "iptables-restore", &[], &workload.iptables())?;
            }
            Variant::Nftables => {
                progress.step(&format!("live: nft -f of {count} Services"));
                timed_stdin(&self.node_ns, "nft", &["-f", "-"], &workload.nft())?;
            }
        }
        Ok(())
    }

    /// Live-frames test runs of the generator program in the generator namespace: `frames`
    /// frames, in chunks of `LIVE_CHUNK`, or fewer when `budget` ends first (a slow peer, such
    /// as iptables with many Services, would otherwise take minutes per run). Returns the time
    /// taken and the frames sent.
    fn live_frames(&mut self, frames: u32, budget: Duration) -> anyhow::Result<(Duration, u64)> {
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex.
        // The kernel refuses a context whose `data_end` is not the frame's length (EINVAL).
        let mut ctx = [0_u8; 24];
        let len = u32::try_from(self.template.len()).unwrap_or(u32::MAX);
        ctx[4..8].copy_from_slice(&len.to_ne_bytes());
        ctx[12..16].copy_from_slice(&self.gen_ifindex.to_ne_bytes());
        let gen_ns = self.gen_ns.name().to_owned();
        let template = self.template.clone();
        let program: &mut Xdp = self
            .generator
            .program_mut("bench_xdp_gen")
            .context("bench_xdp_gen")?
            .try_into()?;
        let start = Instant::now();
        let mut sent = 0_u32;
        in_netns(&gen_ns, || {
            while sent < frames && (sent == 0 || start.elapsed() < budget) {
                let chunk = (frames - sent).min(LIVE_CHUNK);
                program
                    .test_run(TestRunOptions {
                        data_in: Some(&template),
                        ctx_in: Some(&ctx),
                        repeat: chunk,
                        attrs: TestRunAttrs::new().xdp_live_frames(BATCH),
                        ..TestRunOptions::default()
                    })
                    .context("the live-frames generator")?;
                sent += chunk;
            }
            Ok(())
        })?;
        Ok((start.elapsed(), u64::from(sent)))
    }

    /// Tries the live-frames generator once; if the kernel refuses it, switches this lane to
    /// the packet-socket generator. Returns why it fell back.
    fn choose_generator(&mut self) -> anyhow::Result<Option<String>> {
        ctl::set(&mut self.generator, GEN_MODE, 0)?;
        self.upload_template()?;
        match self.live_frames(1, Duration::ZERO) {
            Ok(_) => Ok(None),
            Err(e) => {
                let gen_ns = self.gen_ns.name().to_owned();
                self.packet = Some(in_netns(&gen_ns, || PacketGen::open("g0"))?);
                self.generator_kind = Generator::Packet;
                Ok(Some(format!("{e:#}")))
            }
        }
    }

    fn upload_template(&mut self) -> anyhow::Result<()> {
        let mut map: Array<&mut MapData, [u64; 8]> = Array::try_from(
            self.generator
                .map_mut("BENCH_TEMPLATE")
                .context("template")?,
        )?;
        let mut words = [0_u64; 8];
        for (i, w) in words.iter_mut().enumerate() {
            let mut b = [0_u8; 8];
            b.copy_from_slice(&self.template[i * 8..i * 8 + 8]);
            *w = u64::from_ne_bytes(b);
        }
        map.set(0, words, 0)?;
        Ok(())
    }

    /// Sends `frames` frames to Service `target` and returns (Mpps at the sink, % delivered).
    fn run(
        &mut self,
        mix: Mix,
        target: usize,
        frames: u32,
        budget: Duration,
    ) -> anyhow::Result<(f64, f64)> {
        let mut template = self.template.clone();
        // Destination: the target Service's clusterIP; its IPv4 checksum follows.
        let frame = Ipv4Frame::udp(
            std::net::SocketAddrV4::new(GEN_SRC, GEN_SRC_PORT),
            std::net::SocketAddrV4::new(workload::vip(target), workload::SERVICE_PORT),
        )
        .with_payload(vec![0x5a_u8; 22])
        .without_udp_checksum()
        .build();
        template[12..].copy_from_slice(&frame[12..]);
        self.template.clone_from(&template);
        self.upload_template()?;
        ctl::set(&mut self.generator, GEN_MODE, mix.mode())?;
        let sink_before = per_cpu_sum(&self.sink, "BENCH_SINK")?;
        let gen_before = per_cpu_sum(&self.generator, "BENCH_GEN_COUNT")?;
        let template = template;
        let ours_before = match &self.dp {
            Some(dp) => Some(dp.counters()?),
            None => None,
        };
        let (took, sent) = match self.generator_kind {
            Generator::LiveFrames => {
                let (took, chunks) = self.live_frames(frames, budget)?;
                let sent = per_cpu_sum(&self.generator, "BENCH_GEN_COUNT")? - gen_before;
                ensure!(
                    sent == chunks,
                    "live frames: the generator counted {sent} of the {chunks} run"
                );
                (took, sent)
            }
            Generator::Packet => {
                let socket = self.packet.as_mut().context("no packet socket")?;
                socket.send(&template, mix, frames, budget)?
            }
        };
        // Frames still queued between the namespaces: the pipeline drains in microseconds.
        std::thread::sleep(Duration::from_millis(20));
        // Both generators stop at their time budget (slow peers would otherwise take minutes).
        ensure!(
            sent > 0,
            "{}: the generator sent {sent} frames of {frames}",
            self.variant.key()
        );
        let delivered = per_cpu_sum(&self.sink, "BENCH_SINK")? - sink_before;
        ensure!(
            delivered > 0,
            "{} {}: the sink received nothing",
            self.variant.key(),
            mix.key()
        );
        if let (Some(dp), Some(before)) = (&self.dp, ours_before) {
            let after = dp.counters()?;
            let forwarded = (after.get(Counter::ForwardNew) - before.get(Counter::ForwardNew))
                + (after.get(Counter::ForwardTracked) - before.get(Counter::ForwardTracked));
            ensure!(
                forwarded >= delivered,
                "ours: translated {forwarded} frames but the sink received {delivered}"
            );
            if mix == Mix::NewFlows {
                ensure!(
                    after.get(Counter::ForwardNew) - before.get(Counter::ForwardNew) == forwarded,
                    "ours: a new-flow run hit tracked flows"
                );
            }
            // What the figure is about: XDP sent them on itself, not the stack.
            let redirected = after.egress(Egress::Redirect) - before.egress(Egress::Redirect);
            ensure!(
                redirected >= delivered,
                "ours: XDP redirected {redirected} frames but the sink received {delivered} \
                 (egress counters: {after})"
            );
        }
        #[expect(clippy::cast_precision_loss, reason = "frame counts")]
        Ok((
            delivered as f64 / took.as_secs_f64() / 1e6,
            100.0 * delivered as f64 / sent as f64,
        ))
    }
}

/// Pins this thread to the last CPU, so the generator's runs land on one core.
fn pin_to_last_cpu() -> Option<usize> {
    let cpus = std::thread::available_parallelism().ok()?.get();
    let cpu = cpus.checked_sub(1)?;
    // SAFETY: a zeroed cpu_set_t with one bit set, for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        (libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set) == 0)
            .then_some(cpu)
    }
}

fn unpin() {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    // SAFETY: as above, every CPU.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for cpu in 0..cpus {
            libc::CPU_SET(cpu, &mut set);
        }
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set);
    }
}

#[expect(
    clippy::too_many_lines,
    reason = "the matrix, its rounds and the ratios, in the order they run"
)]
pub fn section(quick: bool, prefix: &str, progress: &mut Progress) -> anyhow::Result<LiveSection> {
    // Frames per run, and the most time a run may take (the iptables layout at 30k Services
    // forwards new flows at a few thousand per second).
    let (counts, mixes, frames, budget, runs): (&[usize], &[Mix], u32, Duration, usize) = if quick {
        (
            &[1, 1000],
            &[Mix::Flows64k, Mix::NewFlows],
            100_000,
            Duration::from_millis(500),
            5,
        )
    } else {
        (
            &[1, 1000, 10_000, 30_000],
            &[Mix::OneFlow, Mix::Flows64k, Mix::NewFlows],
            1_000_000,
            Duration::from_secs(2),
            5,
        )
    };
    progress.step("live: creating the namespaces (4 lanes x generator, node, sink)");
    let mut lanes = Vec::new();
    for variant in Variant::ALL {
        lanes.push(Lane::create(prefix, variant).with_context(|| variant.key())?);
    }
    let mut live_frames_refused = None;
    for lane in &mut lanes {
        if let Some(why) = lane.choose_generator()? {
            live_frames_refused = Some(why);
        }
    }
    if let Some(why) = &live_frames_refused {
        progress.step(&format!(
            "live: the kernel refused the live-frames generator ({why}); using the packet-socket \
             generator"
        ));
    }
    let generator = lanes
        .first()
        .map_or(Generator::LiveFrames, |l| l.generator_kind);
    let generator_cpu = pin_to_last_cpu();
    let mut cells = Vec::new();
    let mut skipped = Vec::new();
    let result = (|| -> anyhow::Result<()> {
        'counts: for &count in counts {
            progress.step(&format!("live: configuring {count} Services in every lane"));
            for lane in &mut lanes {
                // A count that cannot be configured is reported, and the others still run.
                if let Err(e) = lane.configure(count, progress) {
                    skipped.push(format!(
                        "{} with {count} Services: {e:#}",
                        lane.variant.key()
                    ));
                    continue 'counts;
                }
            }
            let target = count / 2;
            for &mix in mixes {
                let mut samples = vec![(Vec::new(), Vec::new()); lanes.len()];
                for round in 0..runs {
                    progress.step(&format!(
                        "live: {count} Services, {}, round {}/{runs}",
                        mix.key(),
                        round + 1
                    ));
                    for (i, lane) in lanes.iter_mut().enumerate() {
                        let (mpps, pct) =
                            lane.run(mix, target, frames, budget).with_context(|| {
                                format!("{} {} {count}", lane.variant.key(), mix.key())
                            })?;
                        samples[i].0.push(mpps);
                        samples[i].1.push(pct);
                    }
                }
                for (i, lane) in lanes.iter().enumerate() {
                    cells.push(LiveCell {
                        services: count,
                        endpoints_per_service: endpoints_for(count),
                        mix,
                        variant: lane.variant,
                        mpps: Figure::of(&samples[i].0).context("no runs")?,
                        delivered_pct: Figure::of(&samples[i].1).context("no runs")?,
                    });
                }
            }
        }
        Ok(())
    })();
    unpin();
    drop(lanes);
    result?;
    let mut ratios = Vec::new();
    for &count in counts {
        for &mix in mixes {
            let m = |v: Variant| {
                cells
                    .iter()
                    .find(|c| c.services == count && c.mix == mix && c.variant == v)
                    .map_or(f64::NAN, |c| c.mpps.median)
            };
            let ours = m(Variant::Ours);
            ratios.push(Ratio {
                services: count,
                mix,
                ours_over_redirect: ours / m(Variant::Redirect),
                ours_over_iptables: ours / m(Variant::Iptables),
                ours_over_nftables: ours / m(Variant::Nftables),
            });
        }
    }
    Ok(LiveSection {
        frames_per_run: frames,
        seconds_per_run_at_most: budget.as_secs_f64(),
        runs,
        maglev_table_size: LIVE_TABLE_SIZE,
        generator_cpu,
        generator,
        live_frames_refused,
        skipped,
        cells,
        ratios,
    })
}
