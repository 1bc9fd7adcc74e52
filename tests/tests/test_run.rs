//! The data path as tables of packets, run through `BPF_PROG_TEST_RUN`.
//!
//! Every test loads its own `DataPlane`, fills the maps from a desired state (most use one: a
//! TCP and a UDP service port answering on a clusterIP, a nodePort, a loadBalancer IP and an
//! externalIP, each with three endpoints on this node, plus a service port without endpoints;
//! the tests of traffic policies, source ranges, SNAT, affinity and the pod program build their
//! own), and sends typed frames through the XDP and TC programs. A case names the frame, the
//! verdict, what the output frame must be (byte for byte, with every checksum recomputed from
//! scratch), and the counter deltas. Backends are predicted independently of the agent: the
//! Maglev table built from the endpoints, indexed by the flow hash.
//!
//! Needs root (`CAP_BPF`, `CAP_NET_ADMIN`) to load the programs.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::c_long,
    fmt::Write as _,
    io,
    mem::size_of,
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::{
    TestRun, TestRunOptions, TestRunResult,
    programs::{ProgramError, SchedClassifier},
};
use integration_tests::frame::{
    CLIENT_MAC, ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, IPV4_CHECK_OFFSET, IPV4_DST_OFFSET,
    IPV4_MIN_HDR_LEN, IPV4_OPT_NOP, IPV4_OPT_ROUTER_ALERT, IPV4_SRC_OFFSET, IcmpErrorFrame,
    IcmpQuote, Ipv4Frame, Ipv4L4, L4, L4Checksum, NODE_MAC, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST,
    TCP_SYN, VLAN_HLEN, VlanTag, arp_request, differing_offsets, icmp_echo_request, ipv6_udp,
    truncate, verify_ipv4_checksum, verify_l4_checksum, verify_quoted_ipv4_checksum,
};
use lb_common::{
    BackendStats, Counter, DropReason, Egress, FlowEntry, FlowKey, FrontendKey, MAX_BACKENDS,
    checksum::l4_checksum_be, direction, flow_flags, hash::flow_hash, map_names, tcp_state,
};
use lb_userspace::{
    dataplane::{Counters, DataPlane, LoadOptions, XdpModeChoice, read_backend_stats},
    maglev,
    maps::{MapContents, NodeConfig},
    model::{
        DesiredState, Endpoint, EndpointState, Frontend, FrontendKind, Ipv4Cidr, Protocol,
        ServicePort, TrafficPolicy,
    },
};

// Program return values (include/uapi/linux/bpf.h, pkt_cls.h).
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;

const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 10);
const NODE_PORT: u16 = 30_080;
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const LB_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);
const SERVICE_PORT: u16 = 80;
const ENDPOINTS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 244, 1, 11),
    Ipv4Addr::new(10, 244, 1, 12),
    Ipv4Addr::new(10, 244, 1, 13),
];
const TARGET_PORT: u16 = 8080;
/// A service port with no ready endpoint.
const EMPTY_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 99);
const EMPTY_NODE_PORT: u16 = 30_090;
/// This node's name: endpoints with it are local.
const NODE_NAME: &str = "node-a";
/// M: a small prime keeps the tables (and their expected copies) cheap to build.
const MAGLEV_SIZE: u32 = 251;
/// Not 0, so a data path or agent that dropped the seed would pick differently.
const HASH_SEED: u32 = 0x5eed_1234;
const MAX_TABLES: u32 = 8;
/// Outside the cluster.
const CLIENT: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 5);
/// A pod on another node, reaching the service by its clusterIP.
const POD_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 7);
/// A server the node itself talks to.
const REMOTE_SERVER: Ipv4Addr = Ipv4Addr::new(1, 1, 1, 1);

fn sock(addr: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(addr, port)
}

fn node_port() -> SocketAddrV4 {
    sock(NODE_IP, NODE_PORT)
}

fn cluster_ip() -> SocketAddrV4 {
    sock(CLUSTER_IP, SERVICE_PORT)
}

fn lb_ip() -> SocketAddrV4 {
    sock(LB_IP, SERVICE_PORT)
}

fn external_ip() -> SocketAddrV4 {
    sock(EXTERNAL_IP, SERVICE_PORT)
}

fn client(port: u16) -> SocketAddrV4 {
    sock(CLIENT, port)
}

fn web(protocol: Protocol) -> ServicePort {
    let frontend = |kind, addr, port| Frontend { kind, addr, port };
    ServicePort {
        service: "default/web".to_owned(),
        port_name: protocol.to_string().to_lowercase(),
        protocol,
        frontends: vec![
            frontend(FrontendKind::ClusterIp, CLUSTER_IP, SERVICE_PORT),
            frontend(FrontendKind::NodePort, NODE_IP, NODE_PORT),
            frontend(FrontendKind::LoadBalancer, LB_IP, SERVICE_PORT),
            frontend(FrontendKind::ExternalIp, EXTERNAL_IP, SERVICE_PORT),
        ],
        endpoints: ENDPOINTS.iter().map(|&addr| local_endpoint(addr)).collect(),
        ..ServicePort::default()
    }
}

/// An endpoint on this node: reached without SNAT.
fn local_endpoint(addr: Ipv4Addr) -> Endpoint {
    Endpoint {
        addr,
        port: TARGET_PORT,
        pod: None,
        node_name: Some(NODE_NAME.to_owned()),
        state: EndpointState::Ready,
    }
}

fn desired_state() -> DesiredState {
    DesiredState {
        service_ports: vec![
            ServicePort {
                service: "default/empty".to_owned(),
                port_name: String::new(),
                protocol: Protocol::Tcp,
                frontends: vec![
                    Frontend {
                        kind: FrontendKind::ClusterIp,
                        addr: EMPTY_CLUSTER_IP,
                        port: SERVICE_PORT,
                    },
                    Frontend {
                        kind: FrontendKind::NodePort,
                        addr: NODE_IP,
                        port: EMPTY_NODE_PORT,
                    },
                ],
                ..ServicePort::default()
            },
            web(Protocol::Tcp),
            web(Protocol::Udp),
        ],
    }
}

/// The Maglev table of a set of endpoints, built as the agent builds it (identities
/// `"addr:port"`, this test's size and seed), as endpoints rather than indices.
fn maglev_table(endpoints: &[SocketAddrV4]) -> Vec<SocketAddrV4> {
    let identities: Vec<String> = endpoints
        .iter()
        .map(|e| format!("{}:{}", e.ip(), e.port()))
        .collect();
    let bytes: Vec<&[u8]> = identities.iter().map(String::as_bytes).collect();
    maglev::build_table(&bytes, MAGLEV_SIZE, HASH_SEED)
        .unwrap_or_else(|e| panic!("building the expected Maglev table: {e}"))
        .into_iter()
        .map(|i| endpoints[i as usize])
        .collect()
}

/// The backend the data path must pick for a new flow to a service port served by
/// `endpoints`: the Maglev table's entry at the flow hash (over the packet's 5-tuple, fields in
/// network byte order read as native integers, with the configured seed) modulo M.
fn maglev_pick(
    endpoints: &[SocketAddrV4],
    l4: L4,
    from: SocketAddrV4,
    frontend: SocketAddrV4,
) -> SocketAddrV4 {
    let ne = |addr: &Ipv4Addr| u32::from_ne_bytes(addr.octets());
    let ports = (u32::from(from.port().to_be()) << 16) | u32::from(frontend.port().to_be());
    let hash = flow_hash(
        ne(from.ip()),
        ne(frontend.ip()),
        ports,
        l4.number(),
        HASH_SEED,
    );
    let slot = usize::try_from(hash % MAGLEV_SIZE).expect("a slot index fits in usize");
    maglev_table(endpoints)[slot]
}

/// The backend the data path must pick for a new flow to the `web` service ports.
fn expected_backend(l4: L4, from: SocketAddrV4, frontend: SocketAddrV4) -> SocketAddrV4 {
    let endpoints: Vec<SocketAddrV4> = ENDPOINTS.iter().map(|&a| sock(a, TARGET_PORT)).collect();
    maglev_pick(&endpoints, l4, from, frontend)
}

/// What a program did with one frame.
struct Run {
    verdict: u32,
    out: Vec<u8>,
}

fn test_run<P>(program: &P, frame: &[u8]) -> Result<Run, ProgramError>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    // Room to spare: the programs never grow a frame, but a too-small buffer is ENOSPC.
    let mut out = vec![0_u8; frame.len() + 256];
    let TestRunResult {
        return_value,
        data_size_out,
        duration: _,
        ctx_size_out: _,
    } = program.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ..TestRunOptions::default()
    })?;
    out.truncate(usize::try_from(data_size_out).expect("u32 fits in usize"));
    Ok(Run {
        verdict: return_value,
        out,
    })
}

/// `BPF_PROG_TEST_RUN` (include/uapi/linux/bpf.h `enum bpf_cmd`).
const BPF_PROG_TEST_RUN: c_long = 10;
/// Test-run flag (Linux 6.11, commit "bpf: add `CHECKSUM_COMPLETE` to bpf test progs"): the
/// kernel gives the skb `ip_summed = CHECKSUM_COMPLETE` with `skb->csum` summed over the frame
/// from the network header, and after the run fails with `EBADMSG` unless `skb->csum` still
/// matches the output frame. aya 0.14's `TestRunAttrs` cannot set it, hence the raw syscall.
const BPF_F_TEST_SKB_CHECKSUM_COMPLETE: u32 = 1 << 2;

/// The `test` member of `union bpf_attr` (include/uapi/linux/bpf.h), up to `batch_size`.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// Runs the TC program on `frame` as a `CHECKSUM_COMPLETE` skb (see
/// [`BPF_F_TEST_SKB_CHECKSUM_COMPLETE`]): what a NIC with full receive checksums hands the
/// stack, and the state in which `skb->csum` must be kept right by the program's helpers.
fn tc_test_run_checksum_complete(program: &SchedClassifier, frame: &[u8]) -> io::Result<Run> {
    let fd = program
        .fd()
        .unwrap_or_else(|e| panic!("the TC program has no fd: {e}"))
        .as_fd()
        .as_raw_fd();
    let mut out = vec![0_u8; frame.len() + 256];
    let len = |n: usize| u32::try_from(n).expect("test frames are small");
    let mut attr = TestRunAttr {
        prog_fd: u32::try_from(fd).expect("file descriptors are not negative"),
        data_size_in: len(frame.len()),
        data_size_out: len(out.len()),
        data_in: frame.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat: 1,
        flags: BPF_F_TEST_SKB_CHECKSUM_COMPLETE,
        ..TestRunAttr::default()
    };
    // SAFETY: `attr` is a zero-initialised prefix of `union bpf_attr` for this command, of the
    // size passed; `data_in` and `data_out` point to buffers of the sizes given that outlive
    // the call, and the kernel writes at most `data_size_out` bytes to `data_out`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &raw mut attr,
            size_of::<TestRunAttr>(),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    out.truncate(usize::try_from(attr.data_size_out).expect("u32 fits in usize"));
    Ok(Run {
        verdict: attr.retval,
        out,
    })
}

/// This node as the tests configure it: no SNAT unless a test turns it on.
fn node_config() -> NodeConfig {
    NodeConfig {
        node_name: NODE_NAME.to_owned(),
        maglev_table_size: MAGLEV_SIZE,
        maglev_seed: HASH_SEED,
        max_tables: MAX_TABLES,
        ..NodeConfig::default()
    }
}

/// A loaded data plane with the maps filled from a desired state.
struct Lb {
    dp: DataPlane,
}

impl Lb {
    /// The maps filled from [`desired_state`].
    fn new() -> Self {
        Lb::with(&desired_state(), &node_config())
    }

    fn with(state: &DesiredState, node: &NodeConfig) -> Self {
        // The data path asks the kernel for routes (the SNAT source, a pod reply's egress): in a
        // network namespace of this test thread's own, with no routes and forwarding off, every
        // lookup fails and the programs take their fallbacks, whatever the host's routes are.
        // SAFETY: unshare changes only this thread's network namespace.
        let unshared = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert!(
            unshared == 0,
            "unshare(CLONE_NEWNET) failed (run as root): {}",
            io::Error::last_os_error()
        );
        let mut dp = DataPlane::load(LoadOptions {
            max_tables: MAX_TABLES,
            maglev_table_size: MAGLEV_SIZE,
            ..LoadOptions::default()
        })
        .unwrap_or_else(|e| panic!("loading the data plane failed (run as root): {e}"));
        let contents = MapContents::from_state(state, node, &MapContents::default())
            .unwrap_or_else(|e| panic!("the test state does not fit the maps: {e}"));
        dp.apply(contents)
            .unwrap_or_else(|e| panic!("filling the maps failed: {e}"));
        Lb { dp }
    }

    fn try_xdp(&mut self, frame: &[u8]) -> Result<Run, ProgramError> {
        let program = self
            .dp
            .xdp_program()
            .unwrap_or_else(|e| panic!("no XDP program: {e}"));
        test_run(program, frame)
    }

    fn xdp(&mut self, case: &str, frame: &[u8]) -> Run {
        self.try_xdp(frame)
            .unwrap_or_else(|e| panic!("{case}: XDP test run failed: {e} ({e:?})"))
    }

    fn tc(&mut self, case: &str, frame: &[u8]) -> Run {
        let program = self
            .dp
            .tc_program()
            .unwrap_or_else(|e| panic!("no TC program: {e}"));
        test_run(program, frame)
            .unwrap_or_else(|e| panic!("{case}: TC test run failed: {e} ({e:?})"))
    }

    fn tc_checksum_complete(&mut self, frame: &[u8]) -> io::Result<Run> {
        let program = self
            .dp
            .tc_program()
            .unwrap_or_else(|e| panic!("no TC program: {e}"));
        tc_test_run_checksum_complete(program, frame)
    }

    fn counters(&self) -> Counters {
        self.dp
            .counters()
            .unwrap_or_else(|e| panic!("reading the counters failed: {e}"))
    }

    fn flows(&self) -> Vec<(FlowKey, FlowEntry)> {
        self.dp
            .flows()
            .unwrap_or_else(|e| panic!("reading the conntrack table failed: {e}"))
    }

    /// Runs `frame` through XDP and checks the verdict and that the counters moved by exactly
    /// `counters` and `drops` (every other counter by 0).
    fn expect_xdp(
        &mut self,
        case: &str,
        frame: &[u8],
        verdict: u32,
        counters: &[(Counter, u64)],
        drops: &[(DropReason, u64)],
    ) -> Vec<u8> {
        let before = self.counters();
        let Run { verdict: got, out } = self.xdp(case, frame);
        let after = self.counters();
        assert_eq!(got, verdict, "{case}: XDP verdict (1 drop, 2 pass)");
        assert_deltas(case, &before, &after, counters, drops);
        out
    }

    /// Like [`Lb::expect_xdp`] for the TC program.
    fn expect_tc(
        &mut self,
        case: &str,
        frame: &[u8],
        verdict: u32,
        counters: &[(Counter, u64)],
        drops: &[(DropReason, u64)],
    ) -> Vec<u8> {
        let before = self.counters();
        let Run { verdict: got, out } = self.tc(case, frame);
        let after = self.counters();
        assert_eq!(got, verdict, "{case}: TC verdict (0 ok, 2 shot)");
        assert_deltas(case, &before, &after, counters, drops);
        out
    }

    /// Like [`Lb::expect_xdp`] for the pod-interface TC program.
    fn expect_pod(
        &mut self,
        case: &str,
        frame: &[u8],
        verdict: u32,
        counters: &[(Counter, u64)],
        drops: &[(DropReason, u64)],
    ) -> Vec<u8> {
        let before = self.counters();
        let program = self
            .dp
            .pod_program()
            .unwrap_or_else(|e| panic!("no pod program: {e}"));
        let Run { verdict: got, out } = test_run(program, frame)
            .unwrap_or_else(|e| panic!("{case}: pod program test run failed: {e} ({e:?})"));
        let after = self.counters();
        assert_eq!(got, verdict, "{case}: pod program verdict (0 ok, 2 shot)");
        assert_deltas(case, &before, &after, counters, drops);
        out
    }

    /// The conntrack entry under `key`; panics if there is none.
    fn flow(&self, case: &str, key: &FlowKey) -> FlowEntry {
        let Some((_, entry)) = self.flows().into_iter().find(|(k, _)| k == key) else {
            panic!("{case}: no conntrack entry {key:?}");
        };
        entry
    }
}

/// `counters`, plus `ipv4_options` if `packet` carries IPv4 options (the parser counts them
/// for every packet it reads, whatever happens to it next).
fn with_options_counted(packet: &Ipv4Frame, counters: &[(Counter, u64)]) -> Vec<(Counter, u64)> {
    let mut counters = counters.to_vec();
    if !packet.options.is_empty() {
        counters.push((Counter::Ipv4Options, 1));
    }
    counters
}

/// How much each counter and drop reason moved.
type Deltas = (Vec<(Counter, u64)>, Vec<(DropReason, u64)>);

/// Non-zero counter changes, in counter order.
fn deltas(before: &Counters, after: &Counters) -> Deltas {
    let counters = Counter::ALL
        .iter()
        .map(|&c| (c, after.get(c) - before.get(c)))
        .filter(|&(_, n)| n != 0)
        .collect();
    let drops = DropReason::ALL
        .iter()
        .map(|&r| (r, after.drops(r) - before.drops(r)))
        .filter(|&(_, n)| n != 0)
        .collect();
    (counters, drops)
}

fn assert_deltas(
    case: &str,
    before: &Counters,
    after: &Counters,
    counters: &[(Counter, u64)],
    drops: &[(DropReason, u64)],
) {
    let sorted_counters = |list: &[(Counter, u64)]| {
        let mut list = list.to_vec();
        list.sort_by_key(|&(c, _)| c as u32);
        list
    };
    let sorted_drops = |list: &[(DropReason, u64)]| {
        let mut list = list.to_vec();
        list.sort_by_key(|&(r, _)| r as u32);
        list
    };
    let (got_counters, got_drops) = deltas(before, after);
    assert_eq!(
        (got_counters, got_drops),
        (sorted_counters(counters), sorted_drops(drops)),
        "{case}: counter deltas (all counters now: {after})"
    );
}

/// Panics unless `out` equals `expected`, listing the differing bytes.
fn assert_frame_eq(case: &str, out: &[u8], expected: &[u8]) {
    if out == expected {
        return;
    }
    let mut report = format!(
        "{case}: output frame differs from the expected one ({} bytes out, {} expected)",
        out.len(),
        expected.len()
    );
    if out.len() == expected.len() {
        for i in differing_offsets(out, expected) {
            let _ = write!(
                report,
                "\n  offset {i}: {:#04x}, expected {:#04x}",
                out[i], expected[i]
            );
        }
    }
    panic!("{report}");
}

/// Panics unless both checksums of `out` verify by full recomputation and the L4 one is `l4`.
fn assert_checksums(case: &str, out: &[u8], l4: L4Checksum) {
    if let Err(e) = verify_ipv4_checksum(out) {
        panic!("{case}: {e}");
    }
    match verify_l4_checksum(out) {
        Ok(got) => assert_eq!(got, l4, "{case}: L4 checksum"),
        Err(e) => panic!("{case}: {e}"),
    }
}

/// Panics if `input` and `out` differ anywhere but at `allowed` offsets.
fn assert_changed_only(case: &str, input: &[u8], out: &[u8], allowed: &[usize]) {
    assert_eq!(input.len(), out.len(), "{case}: frame length changed");
    let stray: Vec<usize> = differing_offsets(input, out)
        .into_iter()
        .filter(|i| !allowed.contains(i))
        .collect();
    assert!(
        stray.is_empty(),
        "{case}: bytes changed outside the rewritten fields: {stray:?}"
    );
}

/// The offsets DNAT may change: IPv4 checksum, destination address, destination port, L4
/// checksum.
fn dnat_offsets(ip: &Ipv4L4) -> Vec<usize> {
    let mut offsets = vec![IPV4_CHECK_OFFSET, IPV4_CHECK_OFFSET + 1];
    offsets.extend(IPV4_DST_OFFSET..IPV4_DST_OFFSET + 4);
    offsets.extend([ip.dst_port_offset(), ip.dst_port_offset() + 1]);
    offsets.extend([ip.l4_check_offset(), ip.l4_check_offset() + 1]);
    offsets
}

/// The offsets SNAT may change: IPv4 checksum, source address, source port, L4 checksum.
fn snat_offsets(ip: &Ipv4L4) -> Vec<usize> {
    let mut offsets = vec![IPV4_CHECK_OFFSET, IPV4_CHECK_OFFSET + 1];
    offsets.extend(IPV4_SRC_OFFSET..IPV4_SRC_OFFSET + 4);
    offsets.extend([ip.src_port_offset(), ip.src_port_offset() + 1]);
    offsets.extend([ip.l4_check_offset(), ip.l4_check_offset() + 1]);
    offsets
}

fn parse(case: &str, frame: &[u8]) -> Ipv4L4 {
    Ipv4L4::parse(frame).unwrap_or_else(|e| panic!("{case}: reading the frame back: {e}"))
}

/// A UDP payload ending in two bytes chosen so that the datagram `from -> to`, as built, has a
/// computed checksum of 0, which RFC 768 sends as 0xffff.
fn payload_summing_to_zero_checksum(from: SocketAddrV4, to: SocketAddrV4) -> Vec<u8> {
    let mut payload = b"zero".to_vec();
    payload.extend([0, 0]);
    let datagram = Ipv4Frame::udp(from, to).with_payload(payload.clone());
    // With the last word 0 the checksum is C = !sum; putting C there makes the sum 0xffff, so
    // the checksum computes to 0. The word is at an even offset (8-byte header + 4 bytes).
    let c = l4_checksum_be(
        from.ip().octets(),
        to.ip().octets(),
        L4::Udp.number(),
        &datagram.segment(),
    );
    let n = payload.len();
    payload[n - 2..].copy_from_slice(&c.to_be_bytes());
    payload
}

/// One flow to a frontend: its first packet and a later one.
struct DnatCase {
    name: &'static str,
    first: Ipv4Frame,
    later: Ipv4Frame,
    /// The L4 checksum the translated packets carry.
    l4_checksum: L4Checksum,
}

#[expect(clippy::too_many_lines, reason = "a table of cases")]
fn dnat_cases() -> Vec<DnatCase> {
    let tcp = |name, from, to| {
        let first = Ipv4Frame::tcp(from, to);
        let later = first
            .clone()
            .with_tcp_flags(TCP_ACK | TCP_PSH)
            .with_payload(*b"GET / HTTP/1.1\r\n\r\n");
        DnatCase {
            name,
            first,
            later,
            l4_checksum: L4Checksum::Valid,
        }
    };
    let udp = |name, from, to| {
        let first = Ipv4Frame::udp(from, to).with_payload(*b"query");
        let later = first.clone().with_payload(*b"second datagram");
        DnatCase {
            name,
            first,
            later,
            l4_checksum: L4Checksum::Valid,
        }
    };
    let with = |mut case: DnatCase, f: &dyn Fn(Ipv4Frame) -> Ipv4Frame| {
        case.first = f(case.first);
        case.later = f(case.later);
        case
    };
    let max_options = [IPV4_OPT_NOP; 40];

    let zero_from = client(40_016);
    let zero_backend = expected_backend(L4::Udp, zero_from, node_port());
    let zero_payload = payload_summing_to_zero_checksum(zero_from, zero_backend);

    vec![
        tcp("TCP nodePort", client(40_001), node_port()),
        udp("UDP nodePort", client(40_002), node_port()),
        tcp("TCP loadBalancer IP", client(40_003), lb_ip()),
        udp("UDP loadBalancer IP", client(40_004), lb_ip()),
        tcp(
            "TCP clusterIP from a pod",
            sock(POD_CLIENT, 40_005),
            cluster_ip(),
        ),
        udp(
            "UDP clusterIP from a pod",
            sock(POD_CLIENT, 40_006),
            cluster_ip(),
        ),
        tcp("TCP externalIP", client(40_007), external_ip()),
        udp("UDP externalIP", client(40_008), external_ip()),
        with(
            tcp(
                "TCP nodePort, IPv4 option (IHL 6)",
                client(40_009),
                node_port(),
            ),
            &|f| f.with_options(&IPV4_OPT_ROUTER_ALERT),
        ),
        with(
            udp(
                "UDP clusterIP, IPv4 option (IHL 6)",
                client(40_010),
                cluster_ip(),
            ),
            &|f| f.with_options(&IPV4_OPT_ROUTER_ALERT),
        ),
        with(
            tcp(
                "TCP loadBalancer IP, 40 bytes of options (IHL 15)",
                client(40_011),
                lb_ip(),
            ),
            &|f| f.with_options(&max_options),
        ),
        with(
            udp(
                "UDP nodePort, 40 bytes of options (IHL 15)",
                client(40_012),
                node_port(),
            ),
            &|f| f.with_options(&max_options),
        ),
        DnatCase {
            l4_checksum: L4Checksum::UdpNone,
            ..with(
                udp(
                    "UDP without checksum (0 stays 0)",
                    client(40_013),
                    node_port(),
                ),
                &Ipv4Frame::without_udp_checksum,
            )
        },
        with(
            udp("UDP, odd payload length", client(40_014), node_port()),
            &|f| f.with_payload(*b"odd"),
        ),
        // 14 + 20 + 8 + 4 = 46 bytes; Ethernet pads to 60. The padding is not in the checksum.
        with(
            udp("UDP with Ethernet padding", client(40_015), cluster_ip()),
            &|f| f.with_payload(*b"tiny").with_trailer(14),
        ),
        // The L4 checksum the rewrite computes is 0, which UDP must send as 0xffff.
        with(
            udp(
                "UDP whose new checksum computes to 0 (sent as 0xffff)",
                zero_from,
                node_port(),
            ),
            &|f| f.with_payload(zero_payload.clone()),
        ),
        with(
            tcp(
                "TCP nodePort, IHL 6, with payload",
                client(40_017),
                node_port(),
            ),
            &|f| {
                f.with_options(&IPV4_OPT_ROUTER_ALERT)
                    .with_payload(*b"odd payload")
            },
        ),
    ]
}

#[test]
fn dnat_translates_every_frontend_kind() {
    let mut lb = Lb::new();
    for DnatCase {
        name,
        first,
        later,
        l4_checksum,
    } in dnat_cases()
    {
        let frontend = first.dst;
        let backend = expected_backend(first.l4, first.src, frontend);
        for (packet, counter, which) in [
            (&first, Counter::ForwardNew, "first packet"),
            (&later, Counter::ForwardTracked, "later packet"),
        ] {
            let case = format!(
                "{name}, {which}, {} -> {frontend} (backend {backend})",
                packet.src
            );
            let input = packet.build();
            let out = lb.expect_xdp(
                &case,
                &input,
                XDP_PASS,
                &with_options_counted(packet, &[(Counter::XdpSeen, 1), (counter, 1)]),
                &[],
            );
            let got = parse(&case, &out);
            assert_eq!(
                (got.src, got.dst),
                (packet.src, backend),
                "{case}: addresses"
            );
            assert_checksums(&case, &out, l4_checksum);
            assert_changed_only(&case, &input, &out, &dnat_offsets(&got));
            // The whole frame as if the client had sent it to the backend: checksums included.
            assert_frame_eq(&case, &out, &packet.clone().with_dst(backend).build());
            if name.contains("0xffff") {
                let check_at = got.l4_check_offset();
                assert_eq!(
                    out[check_at..check_at + 2],
                    [0xff, 0xff],
                    "{case}: UDP checksum"
                );
            }
        }

        // Both directions are tracked: the reply key is what the backend will send back.
        let ne = |addr: &SocketAddrV4| u32::from_ne_bytes(addr.ip().octets());
        let forward = FlowKey {
            src_addr_be: ne(&first.src),
            dst_addr_be: ne(&frontend),
            src_port_be: first.src.port().to_be(),
            dst_port_be: frontend.port().to_be(),
            protocol: first.l4.number(),
            direction: direction::FORWARD,
            _pad: [0; 2],
        };
        let reply = FlowKey {
            src_addr_be: ne(&backend),
            dst_addr_be: ne(&first.src),
            src_port_be: backend.port().to_be(),
            dst_port_be: first.src.port().to_be(),
            direction: direction::REPLY,
            ..forward
        };
        let flows = lb.flows();
        let target = |key: &FlowKey| {
            let Some(&(_, target)) = flows.iter().find(|(k, _)| k == key) else {
                panic!("{name}: no conntrack entry {key:?}");
            };
            (target.nat_addr_be, target.nat_port_be)
        };
        assert_eq!(
            target(&forward),
            (ne(&backend), backend.port().to_be()),
            "{name}: forward entry names the backend"
        );
        assert_eq!(
            target(&reply),
            (ne(&frontend), frontend.port().to_be()),
            "{name}: reply entry names the frontend"
        );
    }
}

#[test]
fn flows_spread_over_all_backends_and_stay_on_theirs() {
    const FLOWS: u16 = 300;
    let mut lb = Lb::new();
    let ports = 20_000..20_000 + FLOWS;
    let mut chosen = Vec::new();
    let mut per_backend = [0_u32; 3];
    for port in ports.clone() {
        let packet = Ipv4Frame::tcp(client(port), node_port());
        let case = format!("new flow from port {port}");
        let out = lb.expect_xdp(
            &case,
            &packet.build(),
            XDP_PASS,
            &[(Counter::XdpSeen, 1), (Counter::ForwardNew, 1)],
            &[],
        );
        let backend = parse(&case, &out).dst;
        assert_eq!(
            backend,
            expected_backend(L4::Tcp, client(port), node_port()),
            "{case}: backend differs from the flow hash's choice"
        );
        let slot = ENDPOINTS
            .iter()
            .position(|e| e == backend.ip())
            .unwrap_or_else(|| panic!("{case}: {backend} is no endpoint"));
        per_backend[slot] += 1;
        chosen.push(backend);
    }
    assert!(
        per_backend.iter().all(|&n| n > 0),
        "{FLOWS} flows left a backend without any: {per_backend:?}"
    );
    assert_eq!(
        lb.flows().len(),
        usize::from(FLOWS) * 2,
        "two conntrack entries per flow"
    );

    // Every later packet of each flow goes where its first one went.
    let before = lb.counters();
    for (port, backend) in ports.zip(chosen) {
        let packet = Ipv4Frame::tcp(client(port), node_port())
            .with_tcp_flags(TCP_ACK)
            .with_payload(*b"data");
        let case = format!("tracked flow from port {port}");
        let Run { verdict, out } = lb.xdp(&case, &packet.build());
        assert_eq!(verdict, XDP_PASS, "{case}");
        assert_eq!(
            parse(&case, &out).dst,
            backend,
            "{case}: flow moved to another backend"
        );
    }
    assert_deltas(
        "tracked flows",
        &before,
        &lb.counters(),
        &[(Counter::XdpSeen, 300), (Counter::ForwardTracked, 300)],
        &[],
    );
}

/// One flow's reply, leaving the backend's node through TC egress.
struct ReplyCase {
    name: &'static str,
    /// The client's packet to the frontend, sent through XDP first.
    request: Ipv4Frame,
    /// The backend's answer with everything but the addresses; the addresses come from the flow.
    reply: fn(SocketAddrV4, SocketAddrV4) -> Ipv4Frame,
    l4_checksum: L4Checksum,
}

fn syn_ack(from: SocketAddrV4, to: SocketAddrV4) -> Ipv4Frame {
    let mut reply = Ipv4Frame::tcp(from, to).with_tcp_flags(TCP_SYN | TCP_ACK);
    reply.ack = 0x0102_0305;
    reply.src_mac = NODE_MAC;
    reply.dst_mac = CLIENT_MAC;
    reply
}

fn tcp_data(from: SocketAddrV4, to: SocketAddrV4) -> Ipv4Frame {
    syn_ack(from, to)
        .with_tcp_flags(TCP_ACK | TCP_PSH)
        .with_payload(*b"HTTP/1.1 200 OK\r\n\r\nhello")
}

fn udp_answer(from: SocketAddrV4, to: SocketAddrV4) -> Ipv4Frame {
    Ipv4Frame::udp(from, to).with_payload(*b"answer")
}

fn reply_cases() -> Vec<ReplyCase> {
    let valid = L4Checksum::Valid;
    vec![
        ReplyCase {
            name: "TCP nodePort SYN-ACK",
            request: Ipv4Frame::tcp(client(41_001), node_port()),
            reply: syn_ack,
            l4_checksum: valid,
        },
        ReplyCase {
            name: "TCP loadBalancer IP, data with odd length",
            request: Ipv4Frame::tcp(client(41_002), lb_ip()),
            reply: tcp_data,
            l4_checksum: valid,
        },
        ReplyCase {
            name: "TCP clusterIP, reply with an IPv4 option",
            request: Ipv4Frame::tcp(sock(POD_CLIENT, 41_003), cluster_ip()),
            reply: |from, to| tcp_data(from, to).with_options(&IPV4_OPT_ROUTER_ALERT),
            l4_checksum: valid,
        },
        ReplyCase {
            name: "UDP nodePort",
            request: Ipv4Frame::udp(client(41_004), node_port()).with_payload(*b"query"),
            reply: udp_answer,
            l4_checksum: valid,
        },
        ReplyCase {
            name: "UDP externalIP, 40 bytes of options",
            request: Ipv4Frame::udp(client(41_005), external_ip()).with_payload(*b"query"),
            reply: |from, to| udp_answer(from, to).with_options(&[IPV4_OPT_NOP; 40]),
            l4_checksum: valid,
        },
        ReplyCase {
            name: "UDP reply without checksum (0 stays 0)",
            request: Ipv4Frame::udp(client(41_006), node_port()).with_payload(*b"query"),
            reply: |from, to| udp_answer(from, to).without_udp_checksum(),
            l4_checksum: L4Checksum::UdpNone,
        },
        ReplyCase {
            name: "UDP reply with Ethernet padding",
            request: Ipv4Frame::udp(client(41_007), cluster_ip()).with_payload(*b"query"),
            reply: |from, to| {
                Ipv4Frame::udp(from, to)
                    .with_payload(*b"ok")
                    .with_trailer(16)
            },
            l4_checksum: valid,
        },
        ReplyCase {
            name: "UDP reply whose new checksum computes to 0 (sent as 0xffff)",
            request: Ipv4Frame::udp(client(41_008), node_port()).with_payload(*b"query"),
            // The payload makes the *translated* reply (frontend -> client) sum to zero.
            reply: |from, to| {
                Ipv4Frame::udp(from, to)
                    .with_payload(payload_summing_to_zero_checksum(node_port(), to))
            },
            l4_checksum: valid,
        },
    ]
}

#[test]
fn tc_translates_replies_back_to_the_frontend() {
    let mut lb = Lb::new();
    for ReplyCase {
        name,
        request,
        reply,
        l4_checksum,
    } in reply_cases()
    {
        let frontend = request.dst;
        let backend = expected_backend(request.l4, request.src, frontend);
        let forward = lb.xdp(name, &request.build());
        assert_eq!(forward.verdict, XDP_PASS, "{name}: forward packet");
        assert_eq!(
            parse(name, &forward.out).dst,
            backend,
            "{name}: forward packet"
        );

        let reply = reply(backend, request.src);
        let input = reply.build();
        let case = format!("{name}: {backend} -> {} (frontend {frontend})", request.src);
        let out = lb.expect_tc(
            &case,
            &input,
            TC_ACT_OK,
            &with_options_counted(
                &reply,
                &[(Counter::TcSeen, 1), (Counter::ReplyTranslated, 1)],
            ),
            &[],
        );
        let got = parse(&case, &out);
        assert_eq!(
            (got.src, got.dst),
            (frontend, request.src),
            "{case}: addresses"
        );
        assert_checksums(&case, &out, l4_checksum);
        assert_changed_only(&case, &input, &out, &snat_offsets(&got));
        assert_frame_eq(&case, &out, &reply.clone().with_src(frontend).build());
        if name.contains("0xffff") {
            let check_at = got.l4_check_offset();
            assert_eq!(
                out[check_at..check_at + 2],
                [0xff, 0xff],
                "{case}: UDP checksum field"
            );
        }
    }
}

/// The reply table again, each reply handed to TC as a `CHECKSUM_COMPLETE` skb (see
/// [`BPF_F_TEST_SKB_CHECKSUM_COMPLETE`]): the frame must come out the same, and the kernel
/// checks that the program's helpers kept `skb->csum` equal to the sum of the new frame.
///
/// Every case runs; the failures are listed together at the end.
#[test]
fn tc_keeps_skb_csum_right_on_checksum_complete_skbs() {
    const EBADMSG: i32 = 74;
    const EINVAL: i32 = 22;
    let mut lb = Lb::new();
    let mut failures = Vec::new();
    for ReplyCase {
        name,
        request,
        reply,
        ..
    } in reply_cases()
    {
        let frontend = request.dst;
        let backend = expected_backend(request.l4, request.src, frontend);
        let forward = lb.xdp(name, &request.build());
        assert_eq!(forward.verdict, XDP_PASS, "{name}: forward packet");

        let reply = reply(backend, request.src);
        let case = format!("{name}: {backend} -> {} (frontend {frontend})", request.src);
        match lb.tc_checksum_complete(&reply.build()) {
            Ok(Run { verdict, out }) => {
                assert_eq!(verdict, TC_ACT_OK, "{case}: TC verdict");
                assert_frame_eq(&case, &out, &reply.clone().with_src(frontend).build());
            }
            Err(e) if e.raw_os_error() == Some(EBADMSG) => failures.push(format!(
                "{case}: EBADMSG: after the program ran, skb->csum no longer matched the frame"
            )),
            Err(e) if e.raw_os_error() == Some(EINVAL) => panic!(
                "{case}: the kernel refused BPF_F_TEST_SKB_CHECKSUM_COMPLETE (Linux 6.11+): {e}"
            ),
            Err(e) => panic!("{case}: TC test run failed: {e}"),
        }
    }
    assert!(
        failures.is_empty(),
        "CHECKSUM_COMPLETE replies with a stale skb->csum:\n  {}",
        failures.join("\n  ")
    );
}

#[test]
fn tc_leaves_other_egress_traffic_alone() {
    let mut lb = Lb::new();
    // A tracked flow, so a reply table exists and near misses are tested against it.
    let tracked_client = client(42_000);
    let backend = expected_backend(L4::Tcp, tracked_client, node_port());
    let forward = lb.xdp(
        "tracked flow",
        &Ipv4Frame::tcp(tracked_client, node_port()).build(),
    );
    assert_eq!(forward.verdict, XDP_PASS, "tracked flow");

    let v6 = |addr: u16, port| {
        SocketAddrV6::new(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, addr), port, 0, 0)
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("ARP request", arp_request(NODE_MAC, NODE_IP, CLIENT)),
        (
            "IPv6 UDP",
            ipv6_udp(v6(0x10, 30_080), v6(0x5, 42_000), b"v6"),
        ),
        (
            "ICMP echo request",
            icmp_echo_request(*backend.ip(), CLIENT, 1, 1, b"ping"),
        ),
        (
            "the node's own connection",
            Ipv4Frame::tcp(sock(NODE_IP, 40_000), sock(REMOTE_SERVER, 443)).build(),
        ),
        (
            "backend to an untracked client port",
            Ipv4Frame::tcp(backend, client(42_001)).build(),
        ),
        (
            "tracked client, but from another backend port",
            Ipv4Frame::tcp(sock(*backend.ip(), 9090), tracked_client).build(),
        ),
        (
            "tracked backend and client, but UDP",
            Ipv4Frame::udp(backend, tracked_client).build(),
        ),
        (
            "tracked reply, but a fragment",
            Ipv4Frame::tcp(backend, tracked_client)
                .with_fragment(true, 0)
                .build(),
        ),
    ];
    for (name, frame) in cases {
        let out = lb.expect_tc(
            name,
            &frame,
            TC_ACT_OK,
            &[(Counter::TcSeen, 1), (Counter::TcPass, 1)],
            &[],
        );
        assert_frame_eq(name, &out, &frame);
    }
}

#[test]
fn tc_drops_a_tracked_reply_too_short_to_rewrite() {
    let mut lb = Lb::new();
    let from = client(43_000);
    let backend = expected_backend(L4::Tcp, from, node_port());
    let forward = lb.xdp("forward", &Ipv4Frame::tcp(from, node_port()).build());
    assert_eq!(forward.verdict, XDP_PASS, "forward");
    // The ports are there (so the reply would be found), the TCP checksum field is not: the
    // parser's drop policy (lb-ebpf/src/parse.rs) drops it before the conntrack lookup, so no
    // rewrite is ever attempted on a header that is not all there.
    let reply = truncate(&Ipv4Frame::tcp(backend, from).build(), ETH_HLEN + 20 + 8);
    lb.expect_tc(
        "tracked TCP reply cut 8 bytes into the TCP header",
        &reply,
        TC_ACT_SHOT,
        &[(Counter::TcSeen, 1), (Counter::TcDrop, 1)],
        &[(DropReason::L4HeaderTruncated, 1)],
    );
}

#[test]
fn traffic_for_no_service_passes_untouched() {
    let mut lb = Lb::new();
    let v6 = |addr: u16, port| {
        SocketAddrV6::new(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, addr), port, 0, 0)
    };
    let cases: Vec<(&str, Vec<u8>, Counter)> = vec![
        (
            "ARP request for the node",
            arp_request(CLIENT_MAC, CLIENT, NODE_IP),
            Counter::PassNotIpv4,
        ),
        (
            "IPv6 UDP to the nodePort number",
            ipv6_udp(v6(5, 40_000), v6(0x10, NODE_PORT), b"v6"),
            Counter::PassNotIpv4,
        ),
        (
            "ICMP echo to the node",
            icmp_echo_request(CLIENT, NODE_IP, 1, 1, b"ping"),
            Counter::PassNotTcpUdp,
        ),
        (
            "ICMP echo to a clusterIP",
            icmp_echo_request(POD_CLIENT, CLUSTER_IP, 1, 2, b"ping"),
            Counter::PassNotTcpUdp,
        ),
        (
            "TCP to the node's SSH port",
            Ipv4Frame::tcp(client(44_001), sock(NODE_IP, 22)).build(),
            Counter::PassNotService,
        ),
        (
            "TCP to the node on the service port (not a nodePort)",
            Ipv4Frame::tcp(client(44_002), sock(NODE_IP, SERVICE_PORT)).build(),
            Counter::PassNotService,
        ),
        (
            "UDP to the node on a port next to the nodePort",
            Ipv4Frame::udp(client(44_003), sock(NODE_IP, NODE_PORT + 1)).build(),
            Counter::PassNotService,
        ),
        (
            "TCP to a clusterIP on another port",
            Ipv4Frame::tcp(sock(POD_CLIENT, 44_004), sock(CLUSTER_IP, 81)).build(),
            Counter::PassNotService,
        ),
        (
            "TCP to the nodePort on another address",
            Ipv4Frame::tcp(
                client(44_005),
                sock(Ipv4Addr::new(192, 168, 50, 11), NODE_PORT),
            )
            .build(),
            Counter::PassNotService,
        ),
        (
            "reply to the node's own TCP connection",
            Ipv4Frame::tcp(sock(REMOTE_SERVER, 443), sock(NODE_IP, 40_000))
                .with_tcp_flags(TCP_SYN | TCP_ACK)
                .build(),
            Counter::PassNotService,
        ),
        (
            "reply to the node's own DNS query",
            Ipv4Frame::udp(sock(REMOTE_SERVER, 53), sock(NODE_IP, 53_000))
                .with_payload(*b"a")
                .build(),
            Counter::PassNotService,
        ),
        (
            "an endpoint's traffic to a client",
            Ipv4Frame::tcp(sock(ENDPOINTS[0], TARGET_PORT), client(44_006)).build(),
            Counter::PassNotService,
        ),
    ];
    for (name, frame, counter) in cases {
        let out = lb.expect_xdp(
            name,
            &frame,
            XDP_PASS,
            &[(Counter::XdpSeen, 1), (counter, 1)],
            &[],
        );
        assert_frame_eq(name, &out, &frame);
    }
    assert!(
        lb.flows().is_empty(),
        "traffic for no service created conntrack entries"
    );
}

/// Rewrites the IPv4 version/IHL byte of a built frame (the header checksum is left stale,
/// as it would be on a corrupted frame).
fn with_version_ihl(mut frame: Vec<u8>, version_ihl: u8) -> Vec<u8> {
    frame[ETH_HLEN] = version_ihl;
    frame
}

/// How a malformed frame must be handled.
enum Outcome {
    /// Passed to the stack untouched, counting this counter.
    Pass(Counter),
    /// Dropped for this reason.
    Drop(DropReason),
    /// Dropped for this reason after its IPv4 options were counted.
    DropWithOptions(DropReason),
}

#[test]
#[expect(clippy::too_many_lines, reason = "a table of cases")]
fn malformed_and_fragmented_frames() {
    let mut lb = Lb::new();
    let tcp = Ipv4Frame::tcp(client(45_000), node_port()).build();
    let udp = Ipv4Frame::udp(client(45_001), node_port())
        .with_payload(*b"query")
        .build();
    let tcp_options = Ipv4Frame::tcp(client(45_002), node_port())
        .with_options(&IPV4_OPT_ROUTER_ALERT)
        .build();
    let tcp_max_options = Ipv4Frame::tcp(client(45_003), node_port())
        .with_options(&[IPV4_OPT_NOP; 40])
        .build();
    let fragment = |more, offset| {
        Ipv4Frame::udp(client(45_004), node_port())
            .with_payload(*b"fragment")
            .with_fragment(more, offset)
            .build()
    };
    let ip_only = ETH_HLEN + 20;
    let mut ethernet_only = vec![0_u8; ETH_HLEN];
    ethernet_only[..6].copy_from_slice(&NODE_MAC);
    ethernet_only[6..12].copy_from_slice(&CLIENT_MAC);
    ethernet_only[12..].copy_from_slice(&ETH_P_IP.to_be_bytes());

    let cases: Vec<(&str, Vec<u8>, Outcome)> = vec![
        // BPF_PROG_TEST_RUN refuses XDP frames shorter than ETH_HLEN (see the test below), so an
        // Ethernet header with nothing after it is the shortest frame the program can be shown.
        (
            "Ethernet header only, EtherType IPv4",
            ethernet_only,
            Outcome::Pass(Counter::PassIpv4Invalid),
        ),
        (
            "IPv4 header cut at 19 bytes",
            truncate(&tcp, ETH_HLEN + 19),
            Outcome::Pass(Counter::PassIpv4Invalid),
        ),
        (
            "IHL 4 (header shorter than 20 bytes)",
            with_version_ihl(tcp.clone(), 0x44),
            Outcome::Pass(Counter::PassIpv4Invalid),
        ),
        (
            "IHL 0",
            with_version_ihl(tcp.clone(), 0x40),
            Outcome::Pass(Counter::PassIpv4Invalid),
        ),
        (
            "version 6 under EtherType IPv4",
            with_version_ihl(tcp.clone(), 0x65),
            Outcome::Pass(Counter::PassIpv4Invalid),
        ),
        (
            "TCP cut to 10 bytes after the IP header",
            truncate(&tcp, ip_only + 10),
            Outcome::Drop(DropReason::L4HeaderTruncated),
        ),
        (
            "TCP cut to 19 bytes (no urgent pointer)",
            truncate(&tcp, ip_only + 19),
            Outcome::Drop(DropReason::L4HeaderTruncated),
        ),
        (
            "TCP with no L4 bytes at all",
            truncate(&tcp, ip_only),
            Outcome::Drop(DropReason::L4HeaderTruncated),
        ),
        (
            "TCP after an IPv4 option, cut to 10 bytes",
            truncate(&tcp_options, ip_only + 4 + 10),
            Outcome::DropWithOptions(DropReason::L4HeaderTruncated),
        ),
        (
            "IHL 15 with the options cut short",
            truncate(&tcp_max_options, ip_only + 30),
            Outcome::DropWithOptions(DropReason::L4HeaderTruncated),
        ),
        (
            "UDP cut to 7 bytes",
            truncate(&udp, ip_only + 7),
            Outcome::Drop(DropReason::L4HeaderTruncated),
        ),
        (
            "UDP cut to its ports",
            truncate(&udp, ip_only + 4),
            Outcome::Drop(DropReason::L4HeaderTruncated),
        ),
        // The drop policy (lb-ebpf/src/parse.rs) applies before the frontend lookup, so a cut
        // TCP header is dropped whatever its destination.
        (
            "TCP to the SSH port cut to 10 bytes",
            truncate(
                &Ipv4Frame::tcp(client(45_005), sock(NODE_IP, 22)).build(),
                ip_only + 10,
            ),
            Outcome::Drop(DropReason::L4HeaderTruncated),
        ),
        (
            "first fragment (MF set, offset 0) to the nodePort",
            fragment(true, 0),
            Outcome::Pass(Counter::PassFragment),
        ),
        (
            "middle fragment (MF set, offset 185)",
            fragment(true, 185),
            Outcome::Pass(Counter::PassFragment),
        ),
        (
            "last fragment (MF clear, offset 185)",
            fragment(false, 185),
            Outcome::Pass(Counter::PassFragment),
        ),
        // A later fragment carries no L4 header, so its shortness is no reason to drop it.
        (
            "later fragment with 4 bytes of payload",
            truncate(&fragment(false, 185), ip_only + 4),
            Outcome::Pass(Counter::PassFragment),
        ),
    ];
    for (name, frame, outcome) in cases {
        match outcome {
            Outcome::Pass(counter) => {
                let out = lb.expect_xdp(
                    name,
                    &frame,
                    XDP_PASS,
                    &[(Counter::XdpSeen, 1), (counter, 1)],
                    &[],
                );
                assert_frame_eq(name, &out, &frame);
            }
            Outcome::Drop(reason) => {
                lb.expect_xdp(
                    name,
                    &frame,
                    XDP_DROP,
                    &[(Counter::XdpSeen, 1), (Counter::XdpDrop, 1)],
                    &[(reason, 1)],
                );
            }
            Outcome::DropWithOptions(reason) => {
                lb.expect_xdp(
                    name,
                    &frame,
                    XDP_DROP,
                    &[
                        (Counter::XdpSeen, 1),
                        (Counter::Ipv4Options, 1),
                        (Counter::XdpDrop, 1),
                    ],
                    &[(reason, 1)],
                );
            }
        }
    }
    assert!(
        lb.flows().is_empty(),
        "malformed frames created conntrack entries"
    );
}

/// The kernel checks the input size before the program runs (`bpf_test_init`: `size <
/// ETH_HLEN` is `-EINVAL`), so a frame cut inside the Ethernet header cannot reach the program
/// through `BPF_PROG_TEST_RUN`; on a real NIC such runts are dropped by the hardware.
#[test]
fn frames_shorter_than_ethernet_are_refused_by_test_run() {
    let mut lb = Lb::new();
    let frame = Ipv4Frame::tcp(client(46_000), node_port()).build();
    for len in [0, 1, 10, ETH_HLEN - 1] {
        let before = lb.counters();
        match lb.try_xdp(&truncate(&frame, len)) {
            Err(ProgramError::SyscallError(aya::sys::SyscallError { call, io_error }))
                if io_error.kind() == io::ErrorKind::InvalidInput =>
            {
                assert_eq!(call, "bpf_prog_test_run", "{len} bytes");
            }
            Err(other) => panic!("{len}-byte frame: expected EINVAL, got {other} ({other:?})"),
            Ok(Run { verdict, .. }) => {
                panic!("{len}-byte frame: the kernel ran the program (verdict {verdict})")
            }
        }
        assert_deltas(
            &format!("{len}-byte frame"),
            &before,
            &lb.counters(),
            &[],
            &[],
        );
    }
}

#[test]
fn service_without_endpoints_drops() {
    let mut lb = Lb::new();
    let cases = [
        (
            "clusterIP of a service without endpoints",
            sock(EMPTY_CLUSTER_IP, SERVICE_PORT),
        ),
        (
            "nodePort of a service without endpoints",
            sock(NODE_IP, EMPTY_NODE_PORT),
        ),
    ];
    for (name, frontend) in cases {
        for packet in [
            Ipv4Frame::tcp(client(47_000), frontend),
            Ipv4Frame::tcp(client(47_000), frontend).with_tcp_flags(TCP_ACK),
        ] {
            lb.expect_xdp(
                name,
                &packet.build(),
                XDP_DROP,
                &[(Counter::XdpSeen, 1), (Counter::XdpDrop, 1)],
                &[(DropReason::NoBackend, 1)],
            );
        }
    }
    assert!(lb.flows().is_empty(), "a dropped flow was tracked");
}

// The behaviours of the rewritten data path: VLAN tags, traffic policies, source ranges, SNAT
// to other nodes' endpoints, session affinity, ICMP errors, TCP state, the pod program. Each
// test builds the state it needs; the helpers below describe it.

/// Another node of the cluster: its endpoints are remote.
const OTHER_NODE: &str = "node-b";
/// Few SNAT ports, so "in the range" is a narrow check.
const SNAT_PORTS: (u16, u16) = (61_000, 61_007);

fn addr_be(addr: SocketAddrV4) -> u32 {
    u32::from_ne_bytes(addr.ip().octets())
}

/// The conntrack key of a packet `src -> dst`.
fn flow_key(l4: L4, src: SocketAddrV4, dst: SocketAddrV4, direction: u8) -> FlowKey {
    FlowKey {
        src_addr_be: addr_be(src),
        dst_addr_be: addr_be(dst),
        src_port_be: src.port().to_be(),
        dst_port_be: dst.port().to_be(),
        protocol: l4.number(),
        direction,
        _pad: [0; 2],
    }
}

/// An entry's `nat_*` end.
fn nat_of(entry: &FlowEntry) -> SocketAddrV4 {
    sock(
        Ipv4Addr::from(entry.nat_addr_be.to_ne_bytes()),
        u16::from_be(entry.nat_port_be),
    )
}

/// An entry's `peer_*` end.
fn peer_of(entry: &FlowEntry) -> SocketAddrV4 {
    sock(
        Ipv4Addr::from(entry.peer_addr_be.to_ne_bytes()),
        u16::from_be(entry.peer_port_be),
    )
}

fn endpoint_on(addr: Ipv4Addr, node: &str) -> Endpoint {
    Endpoint {
        node_name: Some(node.to_owned()),
        ..local_endpoint(addr)
    }
}

fn frontend_at(kind: FrontendKind, at: SocketAddrV4) -> Frontend {
    Frontend {
        kind,
        addr: *at.ip(),
        port: at.port(),
    }
}

/// A service port named `name` with these frontends and endpoints, everything else default.
fn service_port(
    name: &str,
    protocol: Protocol,
    frontends: &[(FrontendKind, SocketAddrV4)],
    endpoints: Vec<Endpoint>,
) -> ServicePort {
    ServicePort {
        service: format!("default/{name}"),
        port_name: protocol.to_string().to_lowercase(),
        protocol,
        frontends: frontends
            .iter()
            .map(|&(kind, at)| frontend_at(kind, at))
            .collect(),
        endpoints,
        ..ServicePort::default()
    }
}

fn targets(endpoints: &[Endpoint]) -> Vec<SocketAddrV4> {
    endpoints.iter().map(|e| sock(e.addr, e.port)).collect()
}

/// `node_config` with SNAT to this node's address.
fn snat_node() -> NodeConfig {
    NodeConfig {
        snat_addr: Some(NODE_IP),
        snat_ports: SNAT_PORTS,
        ..node_config()
    }
}

/// The translated packets `tcp` and `udp` make for a first packet and a later one.
fn later_packet(first: &Ipv4Frame) -> Ipv4Frame {
    match first.l4 {
        L4::Tcp => first
            .clone()
            .with_tcp_flags(TCP_ACK | TCP_PSH)
            .with_payload(*b"GET / HTTP/1.1\r\n\r\n"),
        L4::Udp => first.clone().with_payload(*b"second datagram"),
    }
}

fn vlan(tpid: u16, vid: u16) -> VlanTag {
    VlanTag { tpid, vid }
}

#[test]
fn vlan_tagged_frames_are_translated_with_their_tags() {
    let mut lb = Lb::new();
    let single = [vlan(ETH_P_8021Q, 100)];
    let qinq = [vlan(ETH_P_8021AD, 200), vlan(ETH_P_8021Q, 100)];
    let cases: Vec<(&str, Ipv4Frame, &[VlanTag])> = vec![
        (
            "TCP nodePort, 802.1Q",
            Ipv4Frame::tcp(client(48_001), node_port()),
            &single,
        ),
        (
            "UDP clusterIP, 802.1Q",
            Ipv4Frame::udp(sock(POD_CLIENT, 48_002), cluster_ip()).with_payload(*b"query"),
            &single,
        ),
        (
            "TCP loadBalancer IP, Q-in-Q",
            Ipv4Frame::tcp(client(48_003), lb_ip()),
            &qinq,
        ),
        (
            "UDP nodePort, Q-in-Q",
            Ipv4Frame::udp(client(48_004), node_port()).with_payload(*b"query"),
            &qinq,
        ),
        (
            "TCP externalIP, Q-in-Q, IPv4 option",
            Ipv4Frame::tcp(client(48_005), external_ip()).with_options(&IPV4_OPT_ROUTER_ALERT),
            &qinq,
        ),
    ];
    for (name, first, tags) in cases {
        let first = first.with_vlan_tags(tags);
        let backend = expected_backend(first.l4, first.src, first.dst);
        let later = later_packet(&first);
        for (packet, counter) in [
            (first, Counter::ForwardNew),
            (later, Counter::ForwardTracked),
        ] {
            let case = format!(
                "{name}: {} -> {} (backend {backend})",
                packet.src, packet.dst
            );
            let counters = [
                (Counter::XdpSeen, 1),
                (Counter::VlanTagged, 1),
                (counter, 1),
            ];
            let out = lb.expect_xdp(
                &case,
                &packet.build(),
                XDP_PASS,
                &with_options_counted(&packet, &counters),
                &[],
            );
            // Tags, MACs and everything else as they came; only the destination translated.
            assert_frame_eq(&case, &out, &packet.clone().with_dst(backend).build());
            assert_checksums(&case, &out, L4Checksum::Valid);
            assert_eq!(
                parse(&case, &out).l3_offset,
                ETH_HLEN + VLAN_HLEN * tags.len(),
                "{case}: IPv4 header offset"
            );
        }
    }

    // A tagged frame for no service is passed untouched, counted as tagged.
    let ssh = Ipv4Frame::tcp(client(48_006), sock(NODE_IP, 22)).with_vlan_tags(&qinq);
    let out = lb.expect_xdp(
        "Q-in-Q TCP to the SSH port",
        &ssh.build(),
        XDP_PASS,
        &[
            (Counter::XdpSeen, 1),
            (Counter::VlanTagged, 1),
            (Counter::PassNotService, 1),
        ],
        &[],
    );
    assert_frame_eq("Q-in-Q TCP to the SSH port", &out, &ssh.build());

    // A third tag is beyond what the parser skips: not IPv4 as far as it can tell.
    let three = Ipv4Frame::tcp(client(48_007), node_port()).with_vlan_tags(&[
        vlan(ETH_P_8021AD, 300),
        vlan(ETH_P_8021AD, 200),
        vlan(ETH_P_8021Q, 100),
    ]);
    let out = lb.expect_xdp(
        "three VLAN tags to the nodePort",
        &three.build(),
        XDP_PASS,
        &[(Counter::XdpSeen, 1), (Counter::PassNotIpv4, 1)],
        &[],
    );
    assert_frame_eq("three VLAN tags to the nodePort", &out, &three.build());
}

const LOCAL_ONLY_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 60);
const LOCAL_ONLY_LB_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 60);
const LOCAL_ONLY_NODE_PORT: u16 = 30_160;
const LOCAL_SOME_NODE_PORT: u16 = 30_161;
const REMOTE_ENDPOINTS: [Ipv4Addr; 2] =
    [Ipv4Addr::new(10, 244, 2, 21), Ipv4Addr::new(10, 244, 2, 22)];

/// Two service ports with `externalTrafficPolicy: Local`: one with only remote endpoints, one
/// with a local endpoint among remote ones. Returns the state and both endpoint lists.
fn local_policy_state() -> (DesiredState, Vec<Endpoint>, Vec<Endpoint>) {
    let remote: Vec<Endpoint> = REMOTE_ENDPOINTS
        .iter()
        .map(|&a| endpoint_on(a, OTHER_NODE))
        .collect();
    // One local endpoint among remote ones.
    let mut mixed = remote.clone();
    mixed.push(local_endpoint(ENDPOINTS[0]));
    let state = DesiredState {
        service_ports: vec![
            ServicePort {
                external_policy: TrafficPolicy::Local,
                ..service_port(
                    "local-only",
                    Protocol::Tcp,
                    &[
                        (
                            FrontendKind::ClusterIp,
                            sock(LOCAL_ONLY_CLUSTER_IP, SERVICE_PORT),
                        ),
                        (FrontendKind::NodePort, sock(NODE_IP, LOCAL_ONLY_NODE_PORT)),
                        (
                            FrontendKind::LoadBalancer,
                            sock(LOCAL_ONLY_LB_IP, SERVICE_PORT),
                        ),
                    ],
                    remote.clone(),
                )
            },
            ServicePort {
                external_policy: TrafficPolicy::Local,
                ..service_port(
                    "local-some",
                    Protocol::Tcp,
                    &[(FrontendKind::NodePort, sock(NODE_IP, LOCAL_SOME_NODE_PORT))],
                    mixed.clone(),
                )
            },
        ],
    };
    (state, remote, mixed)
}

#[test]
fn local_policy_without_local_endpoint_drops() {
    let (state, remote, mixed) = local_policy_state();
    let mut lb = Lb::with(&state, &node_config());

    for (name, frontend) in [
        (
            "Local nodePort, no local endpoint",
            sock(NODE_IP, LOCAL_ONLY_NODE_PORT),
        ),
        (
            "Local loadBalancer IP, no local endpoint",
            sock(LOCAL_ONLY_LB_IP, SERVICE_PORT),
        ),
    ] {
        for packet in [
            Ipv4Frame::tcp(client(49_000), frontend),
            Ipv4Frame::tcp(client(49_000), frontend).with_tcp_flags(TCP_ACK),
        ] {
            lb.expect_xdp(
                name,
                &packet.build(),
                XDP_DROP,
                &[(Counter::XdpSeen, 1), (Counter::XdpDrop, 1)],
                &[(DropReason::NoLocalBackend, 1)],
            );
        }
    }
    assert!(lb.flows().is_empty(), "a dropped flow was tracked");

    // The clusterIP follows the internal policy (Cluster): the remote endpoints serve it.
    let to_cluster_ip = Ipv4Frame::tcp(sock(POD_CLIENT, 49_001), sock(LOCAL_ONLY_CLUSTER_IP, 80));
    let backend = maglev_pick(
        &targets(&remote),
        L4::Tcp,
        to_cluster_ip.src,
        to_cluster_ip.dst,
    );
    let out = lb.expect_xdp(
        "clusterIP of the Local service",
        &to_cluster_ip.build(),
        XDP_PASS,
        &[(Counter::XdpSeen, 1), (Counter::ForwardNew, 1)],
        &[],
    );
    assert_frame_eq(
        "clusterIP of the Local service",
        &out,
        &to_cluster_ip.clone().with_dst(backend).build(),
    );

    // With one local endpoint, every flow goes to it, though Maglev over all three would not.
    let frontend = sock(NODE_IP, LOCAL_SOME_NODE_PORT);
    let local = sock(ENDPOINTS[0], TARGET_PORT);
    let ports = 49_100..49_120;
    assert!(
        ports
            .clone()
            .any(|p| maglev_pick(&targets(&mixed), L4::Tcp, client(p), frontend) != local),
        "the test needs a flow the cluster-wide table would send elsewhere"
    );
    for port in ports {
        let packet = Ipv4Frame::tcp(client(port), frontend);
        let case = format!("Local nodePort with a local endpoint, port {port}");
        let out = lb.expect_xdp(
            &case,
            &packet.build(),
            XDP_PASS,
            &[(Counter::XdpSeen, 1), (Counter::ForwardNew, 1)],
            &[],
        );
        assert_frame_eq(&case, &out, &packet.with_dst(local).build());
    }
}

const RANGED_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 40);
const RANGED_LB_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 40);
const RANGED_NODE_PORT: u16 = 30_140;

#[test]
fn load_balancer_source_ranges_filter_external_frontends() {
    let cidr = |a, b, c, d, prefix_len| Ipv4Cidr {
        addr: Ipv4Addr::new(a, b, c, d),
        prefix_len,
    };
    let endpoints: Vec<Endpoint> = ENDPOINTS.iter().map(|&a| local_endpoint(a)).collect();
    let state = DesiredState {
        service_ports: vec![ServicePort {
            source_ranges: vec![cidr(172, 16, 0, 0, 24), cidr(198, 51, 100, 7, 32)],
            ..service_port(
                "ranged",
                Protocol::Tcp,
                &[
                    (
                        FrontendKind::ClusterIp,
                        sock(RANGED_CLUSTER_IP, SERVICE_PORT),
                    ),
                    (FrontendKind::NodePort, sock(NODE_IP, RANGED_NODE_PORT)),
                    (FrontendKind::LoadBalancer, sock(RANGED_LB_IP, SERVICE_PORT)),
                ],
                endpoints.clone(),
            )
        }],
    };
    let mut lb = Lb::with(&state, &node_config());
    let lb_frontend = sock(RANGED_LB_IP, SERVICE_PORT);
    let outside = Ipv4Addr::new(172, 16, 1, 5);
    let cases = [
        (
            "inside the /24, to the loadBalancer IP",
            client(49_200),
            lb_frontend,
            true,
        ),
        (
            "the /32, to the loadBalancer IP",
            sock(Ipv4Addr::new(198, 51, 100, 7), 49_201),
            lb_frontend,
            true,
        ),
        (
            "next to the /32, to the loadBalancer IP",
            sock(Ipv4Addr::new(198, 51, 100, 8), 49_202),
            lb_frontend,
            false,
        ),
        (
            "just outside the /24, to the loadBalancer IP",
            sock(outside, 49_203),
            lb_frontend,
            false,
        ),
        (
            "just outside the /24, to the nodePort",
            sock(outside, 49_204),
            sock(NODE_IP, RANGED_NODE_PORT),
            false,
        ),
        (
            "just outside the /24, to the clusterIP (not filtered)",
            sock(outside, 49_205),
            sock(RANGED_CLUSTER_IP, SERVICE_PORT),
            true,
        ),
    ];
    let mut allowed = 0;
    for (name, from, frontend, allow) in cases {
        let packet = Ipv4Frame::tcp(from, frontend);
        if allow {
            allowed += 1;
            let backend = maglev_pick(&targets(&endpoints), L4::Tcp, from, frontend);
            let out = lb.expect_xdp(
                name,
                &packet.build(),
                XDP_PASS,
                &[(Counter::XdpSeen, 1), (Counter::ForwardNew, 1)],
                &[],
            );
            assert_frame_eq(name, &out, &packet.with_dst(backend).build());
        } else {
            lb.expect_xdp(
                name,
                &packet.build(),
                XDP_DROP,
                &[(Counter::XdpSeen, 1), (Counter::XdpDrop, 1)],
                &[(DropReason::SourceRangeDenied, 1)],
            );
        }
    }
    assert_eq!(lb.flows().len(), allowed * 2, "denied flows were tracked");
}

const REMOTE_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const REMOTE_LB_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
const REMOTE_NODE_PORT: u16 = 30_120;

/// A TCP and a UDP service port whose endpoints all run on another node.
fn remote_state() -> DesiredState {
    let endpoints: Vec<Endpoint> = REMOTE_ENDPOINTS
        .iter()
        .map(|&a| endpoint_on(a, OTHER_NODE))
        .collect();
    let frontends = [
        (
            FrontendKind::ClusterIp,
            sock(REMOTE_CLUSTER_IP, SERVICE_PORT),
        ),
        (FrontendKind::NodePort, sock(NODE_IP, REMOTE_NODE_PORT)),
        (FrontendKind::LoadBalancer, sock(REMOTE_LB_IP, SERVICE_PORT)),
    ];
    DesiredState {
        service_ports: vec![
            service_port("remote", Protocol::Tcp, &frontends, endpoints.clone()),
            service_port("remote", Protocol::Udp, &frontends, endpoints),
        ],
    }
}

fn remote_targets() -> Vec<SocketAddrV4> {
    REMOTE_ENDPOINTS
        .iter()
        .map(|&a| sock(a, TARGET_PORT))
        .collect()
}

/// The L4 checksum `packet` is built with (and keeps through every translation).
fn built_checksum(packet: &Ipv4Frame) -> L4Checksum {
    if packet.l4 == L4::Udp && !packet.udp_checksum {
        L4Checksum::UdpNone
    } else {
        L4Checksum::Valid
    }
}

/// A new flow to a remote endpoint, through XDP: its destination translated, with its three conntrack entries
/// checked. Returns the backend and the SNAT address and port the flow got.
fn snat_flow(lb: &mut Lb, name: &str, request: &Ipv4Frame) -> (SocketAddrV4, SocketAddrV4) {
    let (from, frontend, l4) = (request.src, request.dst, request.l4);
    let backend = maglev_pick(&remote_targets(), l4, from, frontend);
    let flows_before = lb.flows().len();
    let case = format!("{name}: {from} -> {frontend} (backend {backend})");
    let out = lb.expect_xdp(
        &case,
        &request.build(),
        XDP_PASS,
        &[
            (Counter::XdpSeen, 1),
            (Counter::ForwardNew, 1),
            (Counter::SnatNew, 1),
        ],
        &[],
    );
    assert_frame_eq(&case, &out, &request.clone().with_dst(backend).build());
    assert_checksums(&case, &out, built_checksum(request));

    assert_eq!(
        lb.flows().len(),
        flows_before + 3,
        "{case}: a SNATed flow has three conntrack entries"
    );
    let forward = lb.flow(&case, &flow_key(l4, from, frontend, direction::FORWARD));
    assert_eq!(
        nat_of(&forward),
        backend,
        "{case}: FORWARD names the backend"
    );
    assert_eq!(forward.flags, flow_flags::SNAT, "{case}: FORWARD is SNATed");
    let snat = peer_of(&forward);
    assert_eq!(*snat.ip(), NODE_IP, "{case}: SNAT address");
    assert!(
        (SNAT_PORTS.0..=SNAT_PORTS.1).contains(&snat.port()),
        "{case}: SNAT port {} outside {SNAT_PORTS:?}",
        snat.port()
    );
    let reply = lb.flow(&case, &flow_key(l4, backend, snat, direction::REPLY));
    assert_eq!(
        (nat_of(&reply), peer_of(&reply), reply.flags),
        (frontend, from, flow_flags::SNAT),
        "{case}: REPLY (backend -> SNAT port) names the frontend and the client"
    );
    let outgoing = lb.flow(&case, &flow_key(l4, from, backend, direction::SNAT));
    assert_eq!(
        (nat_of(&outgoing), peer_of(&outgoing)),
        (snat, frontend),
        "{case}: SNAT (client -> backend) names the SNAT port and the frontend"
    );
    (backend, snat)
}

#[test]
fn flows_to_remote_endpoints_are_snated_and_their_replies_translated_back() {
    let mut lb = Lb::with(&remote_state(), &snat_node());
    let cases = [
        (
            "TCP nodePort",
            Ipv4Frame::tcp(client(49_300), sock(NODE_IP, REMOTE_NODE_PORT)),
            syn_ack as fn(SocketAddrV4, SocketAddrV4) -> Ipv4Frame,
        ),
        (
            "UDP loadBalancer IP",
            Ipv4Frame::udp(client(49_301), sock(REMOTE_LB_IP, SERVICE_PORT))
                .with_payload(*b"query"),
            udp_answer,
        ),
        (
            "UDP nodePort without checksum",
            Ipv4Frame::udp(client(49_302), sock(NODE_IP, REMOTE_NODE_PORT))
                .with_payload(*b"query")
                .without_udp_checksum(),
            |from, to| udp_answer(from, to).without_udp_checksum(),
        ),
    ];
    let mut snat_ports = Vec::new();
    for (name, request, answer) in cases {
        let checksum = built_checksum(&request);
        let (from, frontend) = (request.src, request.dst);
        let (backend, snat) = snat_flow(&mut lb, name, &request);
        snat_ports.push((backend, snat));

        // Leaving the node, the source becomes the SNAT address and port.
        let dnated = request.clone().with_dst(backend);
        let case = format!("{name}: TC egress {from} -> {backend}");
        let out = lb.expect_tc(
            &case,
            &dnated.build(),
            TC_ACT_OK,
            &[(Counter::TcSeen, 1), (Counter::SnatTranslated, 1)],
            &[],
        );
        let on_the_wire = dnated.clone().with_src(snat);
        assert_frame_eq(&case, &out, &on_the_wire.build());
        assert_checksums(&case, &out, checksum);
        assert_changed_only(
            &case,
            &dnated.build(),
            &out,
            &snat_offsets(&parse(&case, &out)),
        );
        // The same through a CHECKSUM_COMPLETE skb: skb->csum must follow the rewrite.
        match lb.tc_checksum_complete(&dnated.build()) {
            Ok(Run { verdict, out }) => {
                assert_eq!(verdict, TC_ACT_OK, "{case} (CHECKSUM_COMPLETE)");
                assert_frame_eq(&case, &out, &on_the_wire.build());
            }
            Err(e) => panic!("{case} (CHECKSUM_COMPLETE): {e}"),
        }

        // The backend answers the SNAT address and port; XDP sends it on to the client as
        // coming from the frontend.
        let reply = answer(backend, snat);
        let case = format!("{name}: reply {backend} -> {snat}");
        let out = lb.expect_xdp(
            &case,
            &reply.build(),
            XDP_PASS,
            &[(Counter::XdpSeen, 1), (Counter::ReplyTranslated, 1)],
            &[],
        );
        assert_frame_eq(
            &case,
            &out,
            &reply.clone().with_src(frontend).with_dst(from).build(),
        );
        assert_checksums(&case, &out, checksum);
    }
    // Flows to the same backend never share a SNAT port.
    for (i, a) in snat_ports.iter().enumerate() {
        assert!(
            !snat_ports[i + 1..].contains(a),
            "two flows to one backend got one SNAT port: {snat_ports:?}"
        );
    }
}

const STICKY_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 50);
const STICKY_NODE_PORT: u16 = 30_150;

#[test]
fn session_affinity_keeps_a_client_on_one_backend() {
    let endpoints: Vec<Endpoint> = ENDPOINTS.iter().map(|&a| local_endpoint(a)).collect();
    let cluster_ip = sock(STICKY_CLUSTER_IP, SERVICE_PORT);
    let node_port = sock(NODE_IP, STICKY_NODE_PORT);
    // Both policies, so the endpoints are in a cluster and a local table: a pin must hold
    // through either.
    let state = DesiredState {
        service_ports: vec![ServicePort {
            affinity_timeout_seconds: Some(60),
            external_policy: TrafficPolicy::Local,
            ..service_port(
                "sticky",
                Protocol::Tcp,
                &[
                    (FrontendKind::ClusterIp, cluster_ip),
                    (FrontendKind::NodePort, node_port),
                ],
                endpoints.clone(),
            )
        }],
    };
    let mut lb = Lb::with(&state, &node_config());
    let pick = |from, frontend| maglev_pick(&targets(&endpoints), L4::Tcp, from, frontend);
    // Pins are per client address and service port, so each frontend gets its own client.
    for (name, client_addr, frontend) in [
        ("clusterIP", POD_CLIENT, cluster_ip),
        ("nodePort", CLIENT, node_port),
    ] {
        let from = |port| sock(client_addr, port);
        let ports = 49_400..49_450;
        let first = pick(from(ports.start), frontend);
        assert!(
            ports.clone().any(|p| pick(from(p), frontend) != first),
            "{name}: the test needs flows Maglev alone would spread"
        );
        for port in ports.clone() {
            let packet = Ipv4Frame::tcp(from(port), frontend);
            let case = format!("{name}: flow {port} of one client");
            // The first flow pins the client; every later one finds the pin.
            let mut counters = vec![(Counter::XdpSeen, 1), (Counter::ForwardNew, 1)];
            if port != ports.start {
                counters.push((Counter::AffinityHit, 1));
            }
            let out = lb.expect_xdp(&case, &packet.build(), XDP_PASS, &counters, &[]);
            assert_frame_eq(&case, &out, &packet.with_dst(first).build());
        }
    }

    // Another client is balanced on its own.
    let other = sock(Ipv4Addr::new(172, 16, 0, 6), 49_400);
    let packet = Ipv4Frame::tcp(other, cluster_ip);
    let out = lb.expect_xdp(
        "another client's first flow",
        &packet.build(),
        XDP_PASS,
        &[(Counter::XdpSeen, 1), (Counter::ForwardNew, 1)],
        &[],
    );
    assert_frame_eq(
        "another client's first flow",
        &out,
        &packet.with_dst(pick(other, cluster_ip)).build(),
    );
}

/// Panics unless the outer IPv4, quoted IPv4 and ICMP checksums of an ICMP error all verify.
fn assert_icmp_checksums(case: &str, out: &[u8]) {
    if let Err(e) = verify_ipv4_checksum(out) {
        panic!("{case}: outer {e}");
    }
    if let Err(e) = verify_quoted_ipv4_checksum(out) {
        panic!("{case}: quoted {e}");
    }
    match verify_l4_checksum(out) {
        Ok(got) => assert_eq!(got, L4Checksum::Valid, "{case}: ICMP checksum"),
        Err(e) => panic!("{case}: ICMP {e}"),
    }
}

#[test]
fn icmp_errors_from_a_local_backend_reach_the_client_as_from_the_frontend() {
    let mut lb = Lb::new();
    let cases = [
        (
            "UDP nodePort, whole datagram quoted",
            Ipv4Frame::udp(client(49_500), node_port()).with_payload(*b"query"),
            None,
        ),
        (
            "TCP loadBalancer IP, 8 bytes of TCP quoted",
            Ipv4Frame::tcp(client(49_501), lb_ip()),
            Some(IPV4_MIN_HDR_LEN + 8),
        ),
    ];
    for (name, request, quoted_len) in cases {
        let (from, frontend) = (request.src, request.dst);
        let backend = expected_backend(request.l4, from, frontend);
        let forward = lb.xdp(name, &request.build());
        assert_eq!(forward.verdict, XDP_PASS, "{name}: forward packet");

        // The backend got the DNATed packet and quotes it.
        let received = request.clone().with_dst(backend);
        let mut error = IcmpErrorFrame::port_unreachable(*backend.ip(), CLIENT, received.clone());
        let mut expected = error
            .clone()
            .with_src(*frontend.ip())
            .with_quoted(request.clone())
            .with_quoted_l4_checksum(received.l4_checksum());
        if let Some(len) = quoted_len {
            error = error.with_quoted_len(len);
            expected = expected.with_quoted_len(len);
        }
        let case = format!("{name}: port unreachable {backend} -> {CLIENT}");
        let out = lb.expect_tc(
            &case,
            &error.build(),
            TC_ACT_OK,
            &[(Counter::TcSeen, 1), (Counter::IcmpTranslated, 1)],
            &[],
        );
        assert_frame_eq(&case, &out, &expected.build());
        assert_icmp_checksums(&case, &out);
        let got = IcmpQuote::parse(&out).unwrap_or_else(|e| panic!("{case}: {e}"));
        assert_eq!(
            (*got.outer.src.ip(), got.quoted.src, got.quoted.dst),
            (*frontend.ip(), from, frontend),
            "{case}: error source and quote"
        );
        match lb.tc_checksum_complete(&error.build()) {
            Ok(Run { verdict, out }) => {
                assert_eq!(verdict, TC_ACT_OK, "{case} (CHECKSUM_COMPLETE)");
                assert_frame_eq(&case, &out, &expected.build());
            }
            Err(e) => panic!("{case} (CHECKSUM_COMPLETE): {e}"),
        }
    }
}

#[test]
fn icmp_errors_from_a_remote_backend_reach_the_client_through_snat() {
    let mut lb = Lb::with(&remote_state(), &snat_node());
    let request =
        Ipv4Frame::udp(client(49_600), sock(REMOTE_LB_IP, SERVICE_PORT)).with_payload(*b"query");
    let (from, frontend) = (request.src, request.dst);
    let (backend, snat) = snat_flow(&mut lb, "UDP loadBalancer IP", &request);

    // What the backend received, and quotes back to the SNAT address.
    let received = request.clone().with_dst(backend).with_src(snat);
    let error = IcmpErrorFrame::port_unreachable(*backend.ip(), NODE_IP, received.clone());
    let expected = error
        .clone()
        .with_src(*frontend.ip())
        .with_dst(CLIENT)
        .with_quoted(request.clone())
        .with_quoted_l4_checksum(received.l4_checksum());
    let case = format!("port unreachable {backend} -> {NODE_IP} quoting {snat} -> {backend}");
    let out = lb.expect_xdp(
        &case,
        &error.build(),
        XDP_PASS,
        &[(Counter::XdpSeen, 1), (Counter::IcmpTranslated, 1)],
        &[],
    );
    assert_frame_eq(&case, &out, &expected.build());
    assert_icmp_checksums(&case, &out);
    let got = IcmpQuote::parse(&out).unwrap_or_else(|e| panic!("{case}: {e}"));
    assert_eq!(
        (
            *got.outer.src.ip(),
            *got.outer.dst.ip(),
            got.quoted.src,
            got.quoted.dst
        ),
        (*frontend.ip(), CLIENT, from, frontend),
        "{case}: error ends and quote"
    );
}

/// `CLOCK_MONOTONIC` now, the clock of `bpf_ktime_get_ns` and so of every `expires_ns`.
fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec to write to.
    let ret = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut now) };
    assert_eq!(ret, 0, "clock_gettime: {}", io::Error::last_os_error());
    u64::try_from(now.tv_sec).expect("the monotonic clock is not negative") * 1_000_000_000
        + u64::try_from(now.tv_nsec).expect("nanoseconds are not negative")
}

#[test]
fn tcp_state_sets_the_idle_timeout() {
    const SECOND: u64 = 1_000_000_000;
    let mut lb = Lb::new();
    let from = client(49_700);
    let key = flow_key(L4::Tcp, from, node_port(), direction::FORWARD);
    // Each packet, the state its FORWARD entry must be in after it, and the timeout.
    let steps = [
        ("SYN", TCP_SYN, tcp_state::SYN, 60),
        ("ACK", TCP_ACK, tcp_state::OPEN, 86_400),
        ("data", TCP_ACK | TCP_PSH, tcp_state::OPEN, 86_400),
        ("FIN", TCP_FIN | TCP_ACK, tcp_state::CLOSING, 10),
        ("ACK after FIN", TCP_ACK, tcp_state::CLOSING, 10),
        ("SYN reusing the tuple", TCP_SYN, tcp_state::SYN, 60),
        ("RST", TCP_RST, tcp_state::CLOSING, 10),
    ];
    for (i, (name, flags, state, timeout_s)) in steps.into_iter().enumerate() {
        let packet = Ipv4Frame::tcp(from, node_port()).with_tcp_flags(flags);
        let counter = if i == 0 {
            Counter::ForwardNew
        } else {
            Counter::ForwardTracked
        };
        let before = monotonic_ns();
        lb.expect_xdp(
            name,
            &packet.build(),
            XDP_PASS,
            &[(Counter::XdpSeen, 1), (counter, 1)],
            &[],
        );
        let after = monotonic_ns();
        let entry = lb.flow(name, &key);
        assert_eq!(entry.tcp_state, state, "{name}: TCP state");
        // Generous bounds: the expiry may have been set by an earlier packet of the same state
        // (it is only rewritten when it moves by more than a second).
        let timeout = timeout_s * SECOND;
        let (low, high) = (before + timeout - 2 * SECOND, after + timeout + SECOND);
        assert!(
            (low..=high).contains(&entry.expires_ns),
            "{name}: expires {} s from now, expected about {timeout_s} s",
            entry.expires_ns.saturating_sub(after) / SECOND
        );
    }
}

#[test]
fn pod_program_dnats_to_remote_endpoints_without_snat() {
    let mut lb = Lb::with(&remote_state(), &snat_node());
    let pod = sock(Ipv4Addr::new(10, 244, 1, 50), 49_800);
    let frontend = sock(REMOTE_CLUSTER_IP, SERVICE_PORT);
    let first = Ipv4Frame::tcp(pod, frontend);
    let backend = maglev_pick(&remote_targets(), L4::Tcp, pod, frontend);
    for (packet, counter) in [
        (first.clone(), Counter::ForwardNew),
        (later_packet(&first), Counter::ForwardTracked),
    ] {
        let case = format!("pod {pod} -> clusterIP {frontend} (backend {backend})");
        let out = lb.expect_pod(
            &case,
            &packet.build(),
            TC_ACT_OK,
            &[(Counter::PodSeen, 1), (counter, 1)],
            &[],
        );
        assert_frame_eq(&case, &out, &packet.clone().with_dst(backend).build());
        assert_checksums(&case, &out, L4Checksum::Valid);
    }
    // Two entries, as for a local backend: the reply comes back to the pod's address.
    let flows = lb.flows();
    assert_eq!(flows.len(), 2, "pod flow entries: {flows:?}");
    let forward = lb.flow(
        "pod flow",
        &flow_key(L4::Tcp, pod, frontend, direction::FORWARD),
    );
    assert_eq!(
        (nat_of(&forward), forward.flags),
        (backend, 0),
        "pod flow: FORWARD names the backend, without SNAT"
    );
    let reply = lb.flow(
        "pod flow",
        &flow_key(L4::Tcp, backend, pod, direction::REPLY),
    );
    assert_eq!(
        (nat_of(&reply), reply.flags),
        (frontend, 0),
        "pod flow: REPLY (backend -> pod) names the frontend"
    );
}

#[test]
fn pods_reach_every_endpoint_through_a_local_external_address() {
    // kube-proxy treats a pod's traffic to a Service's external addresses as internal: under
    // `externalTrafficPolicy: Local` it still reaches every endpoint, where traffic from the
    // network reaches only this node's (`local_policy_without_local_endpoint_drops`).
    let (state, remote, mixed) = local_policy_state();
    let mut lb = Lb::with(&state, &node_config());
    let cases = [
        (
            "pod -> Local loadBalancer IP, no local endpoint",
            sock(LOCAL_ONLY_LB_IP, SERVICE_PORT),
            &remote,
        ),
        (
            "pod -> Local nodePort, no local endpoint",
            sock(NODE_IP, LOCAL_ONLY_NODE_PORT),
            &remote,
        ),
        (
            "pod -> Local nodePort, one local endpoint",
            sock(NODE_IP, LOCAL_SOME_NODE_PORT),
            &mixed,
        ),
    ];
    for (name, frontend, endpoints) in cases {
        let mut picked = BTreeSet::new();
        for port in 49_300..49_340 {
            let request = Ipv4Frame::tcp(sock(POD_CLIENT, port), frontend);
            let backend = maglev_pick(&targets(endpoints), L4::Tcp, request.src, frontend);
            let case = format!("{name}: {} (backend {backend})", request.src);
            let out = lb.expect_pod(
                &case,
                &request.build(),
                TC_ACT_OK,
                &[(Counter::PodSeen, 1), (Counter::ForwardNew, 1)],
                &[],
            );
            assert_frame_eq(&case, &out, &request.clone().with_dst(backend).build());
            picked.insert(backend);
        }
        assert!(
            picked
                .iter()
                .any(|b| remote.iter().any(|e| e.addr == *b.ip())),
            "{name}: 40 pod flows never reached a remote endpoint: {picked:?}"
        );
    }
}

// Packets and bytes per backend (`BACKEND_STATS`): every packet translated with its flow's
// backend known is counted once, by its IPv4 total length.

/// Packets and bytes per backend id, as the tests expect them.
#[derive(Default)]
struct ExpectedStats(BTreeMap<u32, BackendStats>);

impl ExpectedStats {
    /// One more packet of backend `id`, `forward` (client -> backend) or reply; its bytes are
    /// the IPv4 packet as the frame builder made it (no Ethernet header, tags or trailer).
    fn count(&mut self, id: u32, forward: bool, packet: &Ipv4Frame) {
        let bytes = u64::try_from(packet.ip_packet().len()).expect("test packets are small");
        let stats = self.0.entry(id).or_default();
        if forward {
            stats.forward_packets += 1;
            stats.forward_bytes += bytes;
        } else {
            stats.reply_packets += 1;
            stats.reply_bytes += bytes;
        }
    }
}

/// The backend id the agent gave endpoint `target` of the service port behind `frontend`.
fn backend_id(lb: &Lb, l4: L4, frontend: SocketAddrV4, target: SocketAddrV4) -> u32 {
    let contents = lb.dp.contents();
    let key = FrontendKey {
        addr_be: addr_be(frontend),
        port_be: frontend.port().to_be(),
        protocol: l4.number(),
        scope: lb_common::frontend_scope::ANY,
    };
    let Some(entry) = contents.frontends.get(&key) else {
        panic!("no frontend {frontend}/{l4:?} in the maps");
    };
    let service_id = entry.service.service_id;
    let Some(&id) = contents
        .backend_ids
        .get(&(service_id, *target.ip(), target.port()))
    else {
        panic!("no backend id for {target} of service {service_id}");
    };
    id
}

/// Every slot of `BACKEND_STATS` that counted anything, not only the ids the agent uses.
fn every_backend_stats(lb: &mut Lb) -> BTreeMap<u32, BackendStats> {
    read_backend_stats(&lb.dp, 0..MAX_BACKENDS)
        .unwrap_or_else(|e| panic!("reading every backend's stats: {e}"))
}

/// Panics unless the data path's per-backend counts are exactly `expected`, both through the
/// agent's reader (the ids in use) and slot by slot over the whole map.
fn assert_backend_stats(lb: &mut Lb, case: &str, expected: &ExpectedStats) {
    let in_use = lb
        .dp
        .backend_stats()
        .unwrap_or_else(|e| panic!("{case}: reading the backend stats: {e}"));
    assert_eq!(in_use, expected.0, "{case}: stats of the backends in use");
    assert_eq!(
        every_backend_stats(lb),
        expected.0,
        "{case}: every slot of {}",
        map_names::BACKEND_STATS
    );
}

/// Which program a frame goes through.
#[derive(Clone, Copy, Debug)]
enum Hook {
    /// XDP on the node's interface.
    Xdp,
    /// TC egress on the node's interface.
    Egress,
    /// TC ingress on a pod's interface.
    Pod,
}

/// Runs `packet` through `hook` and checks the program let it through.
fn pass_through(lb: &mut Lb, hook: Hook, case: &str, packet: &Ipv4Frame) {
    let frame = packet.build();
    let (verdict, pass) = match hook {
        Hook::Xdp => (lb.xdp(case, &frame).verdict, XDP_PASS),
        Hook::Egress => (lb.tc(case, &frame).verdict, TC_ACT_OK),
        Hook::Pod => {
            let program = lb
                .dp
                .pod_program()
                .unwrap_or_else(|e| panic!("no pod program: {e}"));
            let run = test_run(program, &frame)
                .unwrap_or_else(|e| panic!("{case}: pod program test run failed: {e}"));
            (run.verdict, TC_ACT_OK)
        }
    };
    assert_eq!(verdict, pass, "{case}: verdict through {hook:?}");
}

/// The `web` service ports of [`desired_state`] (local endpoints) and the remote ones of
/// [`remote_state`] side by side, on a node that translates with SNAT to remote endpoints.
fn local_and_remote() -> Lb {
    let mut state = desired_state();
    state.service_ports.extend(remote_state().service_ports);
    Lb::with(&state, &snat_node())
}

#[test]
fn backend_stats_count_every_translated_packet_once() {
    let mut lb = local_and_remote();
    let mut expected = ExpectedStats::default();
    assert_backend_stats(&mut lb, "before any traffic", &expected);

    // A client's TCP connection to a local endpoint through the nodePort.
    let first = Ipv4Frame::tcp(client(47_001), node_port());
    let backend = expected_backend(L4::Tcp, first.src, first.dst);
    let tcp_id = backend_id(&lb, L4::Tcp, node_port(), backend);
    let tagged_later = later_packet(&first).with_vlan_tags(&[vlan(ETH_P_8021Q, 100)]);
    let reply = tcp_data(backend, first.src);
    let padded_reply = syn_ack(backend, first.src).with_trailer(16);
    let steps = [
        ("new flow through XDP", Hook::Xdp, &first, true),
        (
            "tracked packet with a VLAN tag",
            Hook::Xdp,
            &tagged_later,
            true,
        ),
        ("reply through TC egress", Hook::Egress, &reply, false),
        (
            "reply with Ethernet padding on the pod interface",
            Hook::Pod,
            &padded_reply,
            false,
        ),
    ];
    for (name, hook, packet, forward) in steps {
        let case = format!("TCP {} -> nodePort (backend {backend}): {name}", first.src);
        pass_through(&mut lb, hook, &case, packet);
        expected.count(tcp_id, forward, packet);
        assert_backend_stats(&mut lb, &case, &expected);
    }

    // A pod's UDP flow to the clusterIP, through its own interface.
    let pod = sock(POD_CLIENT, 47_002);
    let query = Ipv4Frame::udp(pod, cluster_ip()).with_payload(*b"query");
    let udp_backend = expected_backend(L4::Udp, pod, cluster_ip());
    let udp_id = backend_id(&lb, L4::Udp, cluster_ip(), udp_backend);
    assert_ne!(udp_id, tcp_id, "the UDP service port has its own backends");
    let answer = udp_answer(udp_backend, pod);
    for (name, hook, packet, forward) in [
        ("new flow on the pod interface", Hook::Pod, &query, true),
        ("reply through TC egress", Hook::Egress, &answer, false),
    ] {
        let case = format!("UDP {pod} -> clusterIP (backend {udp_backend}): {name}");
        pass_through(&mut lb, hook, &case, packet);
        expected.count(udp_id, forward, packet);
        assert_backend_stats(&mut lb, &case, &expected);
    }

    // A client's UDP flow to a remote endpoint: DNAT in XDP, SNAT in TC egress (the same
    // packet, counted once), the reply back through XDP.
    let request = Ipv4Frame::udp(client(47_003), sock(NODE_IP, REMOTE_NODE_PORT))
        .with_payload(*b"query to a remote endpoint");
    let (remote, snat) = snat_flow(&mut lb, "UDP nodePort to a remote endpoint", &request);
    let remote_id = backend_id(&lb, L4::Udp, request.dst, remote);
    expected.count(remote_id, true, &request);
    assert_backend_stats(&mut lb, "remote flow: new flow through XDP", &expected);
    let leaving = request.clone().with_dst(remote);
    pass_through(
        &mut lb,
        Hook::Egress,
        "remote flow: SNAT in TC egress",
        &leaving,
    );
    assert_backend_stats(&mut lb, "remote flow: SNAT in TC egress", &expected);
    let remote_answer = udp_answer(remote, snat);
    pass_through(
        &mut lb,
        Hook::Xdp,
        "remote flow: reply through XDP",
        &remote_answer,
    );
    expected.count(remote_id, false, &remote_answer);
    assert_backend_stats(&mut lb, "remote flow: reply through XDP", &expected);

    // Traffic that is no translated flow counts for no backend.
    let untouched = [
        (
            "TCP to the node's SSH port",
            Hook::Xdp,
            Ipv4Frame::tcp(client(47_004), sock(NODE_IP, 22)),
        ),
        (
            "the node's own DNS query leaving",
            Hook::Egress,
            Ipv4Frame::udp(sock(NODE_IP, 53_000), sock(REMOTE_SERVER, 53)).with_payload(*b"q"),
        ),
        (
            "an endpoint's packet to a client it has no flow with",
            Hook::Pod,
            Ipv4Frame::tcp(sock(ENDPOINTS[0], TARGET_PORT), client(47_005)),
        ),
    ];
    for (name, hook, packet) in &untouched {
        pass_through(&mut lb, *hook, name, packet);
        assert_backend_stats(&mut lb, name, &expected);
    }
    let to_empty = Ipv4Frame::tcp(client(47_006), sock(EMPTY_CLUSTER_IP, SERVICE_PORT));
    let dropped = lb.xdp("service without endpoints", &to_empty.build());
    assert_eq!(dropped.verdict, XDP_DROP, "service without endpoints");
    assert_backend_stats(&mut lb, "service without endpoints (dropped)", &expected);
}

#[test]
fn a_reused_backend_id_starts_from_zero() {
    let mut lb = Lb::new();
    let node = node_config();
    let apply = |lb: &mut Lb, state: &DesiredState, case: &str| {
        let contents = MapContents::from_state(state, &node, lb.dp.contents())
            .unwrap_or_else(|e| panic!("{case}: the state does not fit the maps: {e}"));
        lb.dp
            .apply(contents)
            .unwrap_or_else(|e| panic!("{case}: applying the state failed: {e}"));
    };
    let mut expected = ExpectedStats::default();

    // A flow to endpoint X counts under X's id.
    let first = Ipv4Frame::tcp(client(47_100), node_port());
    let gone = expected_backend(L4::Tcp, first.src, first.dst);
    let id = backend_id(&lb, L4::Tcp, node_port(), gone);
    pass_through(&mut lb, Hook::Xdp, "flow to the endpoint to remove", &first);
    expected.count(id, true, &first);
    assert_backend_stats(&mut lb, "flow to the endpoint to remove", &expected);

    // X goes away: its slot is zeroed with it.
    let mut state = desired_state();
    let web_tcp = state
        .service_ports
        .iter_mut()
        .find(|p| p.service == "default/web" && p.protocol == Protocol::Tcp)
        .unwrap_or_else(|| panic!("the test state has a web TCP port"));
    web_tcp.endpoints.retain(|e| e.addr != *gone.ip());
    apply(&mut lb, &state, "endpoint removed");
    expected.0.clear();
    assert_backend_stats(&mut lb, "endpoint removed", &expected);

    // Its established TCP flow goes on to its address, still counted under the old id.
    let later = later_packet(&first);
    pass_through(
        &mut lb,
        Hook::Xdp,
        "established flow to the removed endpoint",
        &later,
    );
    let mut lingering = ExpectedStats::default();
    lingering.count(id, true, &later);
    assert_eq!(
        every_backend_stats(&mut lb),
        lingering.0,
        "established flow to the removed endpoint"
    );

    // A new endpoint gets the freed id: it starts from zero.
    let new_addr = Ipv4Addr::new(10, 244, 1, 14);
    let web_tcp = state
        .service_ports
        .iter_mut()
        .find(|p| p.service == "default/web" && p.protocol == Protocol::Tcp)
        .unwrap_or_else(|| panic!("the test state has a web TCP port"));
    web_tcp.endpoints.push(local_endpoint(new_addr));
    let endpoints = targets(&web_tcp.endpoints);
    apply(&mut lb, &state, "endpoint added");
    let newcomer = sock(new_addr, TARGET_PORT);
    assert_eq!(
        backend_id(&lb, L4::Tcp, node_port(), newcomer),
        id,
        "the test needs the new endpoint to reuse the removed one's id"
    );
    assert_backend_stats(&mut lb, "endpoint added with a reused id", &expected);

    // The new endpoint's first flow counts alone.
    let Some(port) = (47_101..48_000)
        .find(|&port| maglev_pick(&endpoints, L4::Tcp, client(port), node_port()) == newcomer)
    else {
        panic!("no client port in 47101..48000 is mapped to {newcomer}");
    };
    let to_newcomer = Ipv4Frame::tcp(client(port), node_port());
    pass_through(&mut lb, Hook::Xdp, "flow to the new endpoint", &to_newcomer);
    expected.count(id, true, &to_newcomer);
    assert_backend_stats(&mut lb, "flow to the new endpoint", &expected);
}

/// Runs `program` in this thread's network namespace (`Lb::with` made it), failing the test
/// with the command's output if it fails.
fn sh(program: &str, args: &[&str]) {
    let output = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// With a route to the backend (a veth of the test's own namespace, the backend's MAC in the
/// neighbour table), XDP sends the translated packet itself: `XDP_TX` when the route leaves by
/// the interface it came in on, the MACs those of the route, the TTL one less, every checksum
/// right, and counted `xdp_tx`.
#[test]
fn xdp_sends_a_routed_packet_back_out_with_the_macs_rewritten() {
    let mut lb = Lb::new();
    let DnatCase {
        name,
        first,
        l4_checksum,
        ..
    } = dnat_cases().into_iter().next().expect("a DNAT case");
    let backend = expected_backend(first.l4, first.src, first.dst);
    let next_hop_mac = [0x02, 0, 0, 0, 0, 0x42];
    let next_hop = next_hop_mac.map(|b| format!("{b:02x}")).join(":");
    let backend_ip = backend.ip().to_string();
    sh(
        "ip",
        &[
            "link", "add", "lbt0", "type", "veth", "peer", "name", "lbt1",
        ],
    );
    for iface in ["lbt0", "lbt1"] {
        sh("ip", &["link", "set", iface, "up"]);
    }
    // GRO on the peer: the veth then takes XDP frames, so the agent makes it a target.
    sh("ethtool", &["-K", "lbt1", "gro", "on"]);
    sh(
        "ip",
        &["route", "add", &format!("{backend_ip}/32"), "dev", "lbt0"],
    );
    sh(
        "ip",
        &[
            "neigh",
            "replace",
            &backend_ip,
            "lladdr",
            &next_hop,
            "dev",
            "lbt0",
            "nud",
            "permanent",
        ],
    );
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").expect("forwarding on");
    lb.dp
        .attach("lbt0", XdpModeChoice::Generic)
        .unwrap_or_else(|e| panic!("attaching to lbt0: {e}"));
    let ifindex = lb_userspace::netif::index("lbt0").expect("lbt0 exists");
    let link = std::process::Command::new("ip")
        .args(["-o", "link", "show", "lbt0"])
        .output()
        .expect("ip link show");
    let link = String::from_utf8_lossy(&link.stdout).into_owned();
    let own_mac: Vec<u8> = link
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .expect("lbt0's MAC")
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).expect("hex"))
        .collect();

    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
    // The kernel wants `data_end` to be the frame's length.
    let input = first.build();
    let mut ctx = [0_u8; 24];
    ctx[4..8].copy_from_slice(&u32::try_from(input.len()).expect("small").to_ne_bytes());
    ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    let mut out = vec![0_u8; input.len() + 256];
    let before = lb.counters();
    let program = lb.dp.xdp_program().expect("the XDP program");
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(&input),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..TestRunOptions::default()
        })
        .unwrap_or_else(|e| panic!("{name}: XDP test run: {e}"));
    out.truncate(usize::try_from(result.data_size_out).expect("fits"));
    let after = lb.counters();
    assert_eq!(
        result.return_value, 3,
        "{name}: XDP_TX (3); before: {before}; after: {after}"
    );
    assert_eq!(out[0..6], next_hop_mac, "{name}: destination MAC");
    assert_eq!(out[6..12], own_mac[..], "{name}: source MAC");
    let got = parse(name, &out);
    assert_eq!(
        (got.src, got.dst),
        (first.src, backend),
        "{name}: addresses"
    );
    assert_eq!(out[ETH_HLEN + 8], first.ttl - 1, "{name}: TTL");
    assert_checksums(name, &out, l4_checksum);
    assert_eq!(
        after.egress(Egress::Tx) - before.egress(Egress::Tx),
        1,
        "{name}: counted xdp_tx"
    );
    lb.dp.detach_all();
}
