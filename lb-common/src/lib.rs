//! Types shared by the eBPF data path (`lb-ebpf`) and the agent (`lb-userspace`).
//!
//! Every map key and value is `#[repr(C)]` with explicit padding and a size assertion, so both
//! sides agree on the layout byte for byte. Addresses and ports are kept in network byte order
//! exactly as they appear in the packet (`*_be` fields hold the packet's bytes read as a native
//! integer), so the data path never swaps bytes.
#![cfg_attr(not(test), no_std)]
#![expect(
    clippy::inline_always,
    reason = "the data path calls these; the verifier needs them inlined into each program"
)]
#![expect(
    clippy::pub_underscore_fields,
    reason = "explicit padding fields are part of each map type's layout and must be settable"
)]

pub mod checksum;
pub mod hash;

use core::mem::size_of;

/// Names of the maps in the eBPF object; the agent looks them up by these.
pub mod map_names {
    pub const SETTINGS: &str = "SETTINGS";
    pub const FRONTENDS: &str = "FRONTENDS";
    pub const MAGLEV: &str = "MAGLEV";
    pub const BACKENDS: &str = "BACKENDS";
    pub const SOURCE_RANGES: &str = "SOURCE_RANGES";
    pub const AFFINITY: &str = "AFFINITY";
    pub const CONNTRACK: &str = "CONNTRACK";
    pub const COUNTERS: &str = "COUNTERS";
    pub const DROPS: &str = "DROPS";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
}

/// The benchmark build's control array `BENCH_CTL` (`lb-ebpf` feature `bench`, driven by
/// `lb-bench`): its slots and the generator modes, one definition for both sides.
pub mod bench_ctl {
    /// Nonzero: the new-flow prologue gives every frame a source never used before.
    pub const NEW_FLOW: u32 = 0;
    /// The prologue's sequence number.
    pub const NEW_FLOW_SEQ: u32 = 1;
    /// Where `bench_xdp_redirect` sends every frame.
    pub const REDIRECT_IFINDEX: u32 = 2;
    /// How the generator varies the source: one of the `GEN_*` values.
    pub const GEN_MODE: u32 = 3;
    pub const GEN_SEQ: u32 = 4;
    /// The UDP destination port the sink counts.
    pub const SINK_PORT: u32 = 5;
    pub const SLOTS: u32 = 8;

    pub const GEN_ONE_FLOW: u64 = 0;
    /// Source port = sequence number mod 65536: 65,536 flows, round robin.
    pub const GEN_64K_FLOWS: u64 = 1;
    /// Source address and port from the sequence number: every frame a new flow.
    pub const GEN_NEW_FLOWS: u64 = 2;
}

/// Names of the programs in the eBPF object.
pub mod program_names {
    /// XDP on the node's interfaces: frontends -> DNAT (and SNAT setup) to a backend; replies
    /// and ICMP errors from remote backends -> back to the client.
    pub const XDP_INGRESS: &str = "lb_xdp_ingress";
    /// TC egress on the same interfaces: local backends' replies -> the frontend address; SNAT
    /// of flows to remote backends; ICMP errors about translated flows.
    pub const TC_EGRESS: &str = "lb_tc_egress";
    /// TC ingress on pod interfaces (`--pod-iface`): what pods send to Services, and local
    /// backends' replies to pods.
    pub const TC_POD_INGRESS: &str = "lb_tc_pod_ingress";
}

/// Capacity of the frontend table: one entry per (address, port, protocol) a Service answers on.
pub const MAX_FRONTENDS: u32 = 65_536;
/// Default number of Maglev tables (one per service port and traffic policy in use).
pub const DEFAULT_MAX_TABLES: u32 = 1_024;
/// Backends across all service ports (one per service port and endpoint). Id 0 is never used.
pub const MAX_BACKENDS: u32 = 65_536;
/// Tracked flow entries: two per connection (forward and reply), three with SNAT.
pub const CONNTRACK_ENTRIES: u32 = 262_144;
/// Clients remembered by `sessionAffinity: ClientIP`, across all service ports.
pub const AFFINITY_ENTRIES: u32 = 65_536;
/// CIDRs of `loadBalancerSourceRanges`, across all service ports.
pub const SOURCE_RANGE_ENTRIES: u32 = 16_384;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// How long an idle flow is kept, by state, in nanoseconds of `CLOCK_MONOTONIC` (the clock of
/// `bpf_ktime_get_ns`). The values follow kube-proxy's conntrack settings where it has one.
pub mod timeouts {
    const SECOND: u64 = 1_000_000_000;
    /// A TCP flow that has seen only SYNs in this direction.
    pub const TCP_SYN: u64 = 60 * SECOND;
    /// A TCP flow past its handshake (kube-proxy's `tcpEstablishedTimeout`, 24 h).
    pub const TCP_ESTABLISHED: u64 = 86_400 * SECOND;
    /// A TCP flow that has seen a FIN or RST.
    pub const TCP_CLOSING: u64 = 10 * SECOND;
    /// Any UDP flow.
    pub const UDP: u64 = 60 * SECOND;
    /// A tracked flow's expiry is only rewritten when it moves by more than this, so a busy flow
    /// does not write its entry on every packet.
    pub const REFRESH_GRANULARITY: u64 = SECOND;
}

/// The node-wide values the data path reads: the value of the single-entry `SETTINGS` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// M, the prime size of every Maglev table.
    pub maglev_table_size: u32,
    /// Seed of the flow hash (the same on every node, so every node picks the same backend).
    pub hash_seed: u32,
    /// The node address flows to other nodes' backends are translated to (SNAT) when the route to
    /// the backend names no source address; 0 disables SNAT.
    pub snat_addr_be: u32,
    /// SNAT source ports, host byte order, inclusive.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
}
const _: () = assert!(size_of::<Settings>() == 16);

/// Where a packet to `addr:port/protocol` is going: the key of the `FRONTENDS` map.
///
/// One Service port has several frontends: its clusterIP, each `LoadBalancer` ingress IP and
/// externalIP on the Service port, and each node address on the nodePort.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendKey {
    pub addr_be: u32,
    pub port_be: u16,
    pub protocol: u8,
    /// Whose packets the entry serves: one of `frontend_scope`.
    pub scope: u8,
}

/// Values of `FrontendKey::scope`.
pub mod frontend_scope {
    /// Every packet to the frontend: the entry every frontend has.
    pub const ANY: u8 = 0;
    /// Only packets from this node's pods, looked up first when the `ANY` entry's Service has
    /// `service_flags::POD_ENTRY`: pods reach a `Local` Service's external addresses through
    /// the cluster-wide table, as kube-proxy treats their traffic as internal.
    pub const POD: u8 = 1;
}
const _: () = assert!(size_of::<FrontendKey>() == 8);

/// Entries (u32 backend ids) between the starts of two Maglev tables: M rounded up to even.
///
/// The kernel stores array elements 8-byte aligned, so `MAGLEV` holds pairs of entries
/// (`[u32; 2]`) to waste nothing; tables start on a pair so the agent can write them as one
/// contiguous run through its memory mapping.
#[must_use]
pub const fn maglev_table_stride(table_size: u32) -> u32 {
    table_size + (table_size & 1)
}

/// Bits of `Service::flags`.
pub mod service_flags {
    /// The frontend's traffic policy is `Local`: only this node's endpoints are in its table,
    /// and an empty table is counted as `NoLocalBackend`.
    pub const LOCAL_ONLY: u32 = 1;
    /// New flows pick a random table entry instead of the flow hash's.
    pub const RANDOM: u32 = 1 << 1;
    /// Sources must match `SOURCE_RANGES` for this service id.
    pub const SOURCE_RANGES: u32 = 1 << 2;
    /// The frontend has a `frontend_scope::POD` entry too, which pods' packets use instead.
    pub const POD_ENTRY: u32 = 1 << 3;
}

/// How a frontend's new flows are served: the value of the `FRONTENDS` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Service {
    /// The service port; never 0. Keys affinity and source ranges, labels statistics.
    pub service_id: u32,
    /// Which Maglev table: entries `table * stride .. table * stride + M` of `MAGLEV`, with
    /// `stride = maglev_table_stride(M)`.
    pub table: u32,
    /// How many backends the table spreads over; 0 means none (the packet is dropped).
    pub backend_count: u32,
    /// `sessionAffinity: ClientIP` timeout in seconds; 0 means no affinity.
    pub affinity_timeout_s: u32,
    pub flags: u32,
}
const _: () = assert!(size_of::<Service>() == 20);

/// Bits of `Backend::flags`.
pub mod backend_flags {
    /// The endpoint runs on this node: reached without SNAT.
    pub const LOCAL: u8 = 1;
    /// The endpoint is in its service port's cluster-wide table (it takes new flows there).
    pub const IN_CLUSTER_TABLE: u8 = 1 << 1;
    /// The endpoint is in its service port's node-local table.
    pub const IN_LOCAL_TABLE: u8 = 1 << 2;
}

/// One endpoint of one service port: the value of the `BACKENDS` array, indexed by backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    pub addr_be: u32,
    pub port_be: u16,
    pub flags: u8,
    pub _pad: u8,
    pub service_id: u32,
}
const _: () = assert!(size_of::<Backend>() == 12);

/// Key of the `SOURCE_RANGES` longest-prefix-match trie: a service id (big-endian, so its bits
/// come first) and a source address. The prefix length is 32 + the CIDR's prefix length.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourceRangeKey {
    pub service_id_be: u32,
    pub addr_be: u32,
}
const _: () = assert!(size_of::<SourceRangeKey>() == 8);

/// Key of `AFFINITY`: which client, for which service port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AffinityKey {
    pub service_id: u32,
    pub client_addr_be: u32,
}
const _: () = assert!(size_of::<AffinityKey>() == 8);

/// The backend a client sticks to, and until when. The address and port are kept so an entry
/// whose backend id now names another endpoint (after a config change) is recognised as stale.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub addr_be: u32,
    pub port_be: u16,
    pub _pad: [u8; 6],
    pub expires_ns: u64,
}
const _: () = assert!(size_of::<AffinityValue>() == 24);

/// Which way a conntrack entry translates.
pub mod direction {
    /// Client -> frontend, as the packet arrives: rewrite the destination to the backend.
    pub const FORWARD: u8 = 1;
    /// Backend -> client (or -> this node's SNAT address and port): rewrite the source to the
    /// frontend (and, with SNAT, the destination back to the client).
    pub const REPLY: u8 = 2;
    /// Client -> remote backend, after DNAT, leaving the node: rewrite the source to the SNAT
    /// address and port.
    pub const SNAT: u8 = 3;
}

/// A flow's 5-tuple as it appears in the packet, plus the direction: the key of `CONNTRACK`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FlowKey {
    pub src_addr_be: u32,
    pub dst_addr_be: u32,
    pub src_port_be: u16,
    pub dst_port_be: u16,
    pub protocol: u8,
    pub direction: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<FlowKey>() == 16);

/// Bits of `FlowEntry::flags`.
pub mod flow_flags {
    /// The flow goes to a backend on another node with this node's address as its source.
    pub const SNAT: u8 = 1;
}

/// TCP states a flow entry can be in (UDP entries stay `OPEN`).
pub mod tcp_state {
    /// UDP, or TCP picked up mid-stream or past its handshake.
    pub const OPEN: u8 = 0;
    /// Only SYNs seen in this direction.
    pub const SYN: u8 = 1;
    /// A FIN or RST seen.
    pub const CLOSING: u8 = 2;
}

/// What to write into a tracked packet: the value of `CONNTRACK`.
///
/// | direction | `nat_*` (written)            | `peer_*`                                  |
/// |-----------|------------------------------|-------------------------------------------|
/// | FORWARD   | backend: the new destination | SNAT address and port, if `SNAT`          |
/// | REPLY     | frontend: the new source     | the client: the new destination, if `SNAT`|
/// | SNAT      | SNAT address and port: source| the frontend (for ICMP errors)            |
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEntry {
    pub nat_addr_be: u32,
    pub nat_port_be: u16,
    pub peer_port_be: u16,
    pub peer_addr_be: u32,
    pub service_id: u32,
    pub backend_id: u32,
    pub flags: u8,
    pub tcp_state: u8,
    pub _pad: [u8; 2],
    /// `CLOCK_MONOTONIC` nanoseconds after which the entry is idle (see `timeouts`).
    pub expires_ns: u64,
}
const _: () = assert!(size_of::<FlowEntry>() == 32);

/// What happened to a packet: indexes of the per-CPU `COUNTERS` array. Numbers are stable.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Every frame the XDP program saw.
    XdpSeen = 0,
    /// Not IPv4 (ARP, IPv6, ...): passed to the stack untouched.
    PassNotIpv4 = 1,
    /// IPv4 with a header the stack must judge (bad version or length): passed untouched; the
    /// kernel drops it and counts it in `IpInHdrErrors`.
    PassIpv4Invalid = 2,
    /// IPv4 fragment: passed untouched (see the README's fragment rule).
    PassFragment = 3,
    /// Neither TCP nor UDP: passed untouched.
    PassNotTcpUdp = 4,
    /// TCP or UDP to an address and port that is no frontend: passed untouched.
    PassNotService = 5,
    /// First packet of a flow: backend chosen, flow tracked, destination translated.
    ForwardNew = 6,
    /// Packet of a tracked flow: destination translated to the flow's backend.
    ForwardTracked = 7,
    /// Dropped by XDP; the reason is counted in `DROPS`.
    XdpDrop = 8,
    /// Every packet the TC egress program saw.
    TcSeen = 9,
    /// A backend's reply: source translated back to the frontend the client used.
    ReplyTranslated = 10,
    /// Egress traffic that is no tracked reply: passed untouched.
    TcPass = 11,
    /// Dropped by TC; the reason is counted in `DROPS`.
    TcDrop = 12,
    /// A new flow to a backend on another node: its source is translated (SNAT) on the way out.
    SnatNew = 13,
    /// TC egress rewrote a flow's source to the SNAT address and port.
    SnatTranslated = 14,
    /// An ICMP error about a translated flow, rewritten for the address the peer used.
    IcmpTranslated = 15,
    /// Every packet the pod-interface TC program saw.
    PodSeen = 16,
    /// A new flow sent to the backend its client is pinned to (`sessionAffinity: ClientIP`).
    AffinityHit = 17,
    /// IPv4 packets with options (translated like any other; counted so they can be seen).
    Ipv4Options = 18,
    /// Frames with one or two VLAN tags (served like untagged ones).
    VlanTagged = 19,
}

impl Counter {
    pub const ALL: [Counter; 20] = [
        Counter::XdpSeen,
        Counter::PassNotIpv4,
        Counter::PassIpv4Invalid,
        Counter::PassFragment,
        Counter::PassNotTcpUdp,
        Counter::PassNotService,
        Counter::ForwardNew,
        Counter::ForwardTracked,
        Counter::XdpDrop,
        Counter::TcSeen,
        Counter::ReplyTranslated,
        Counter::TcPass,
        Counter::TcDrop,
        Counter::SnatNew,
        Counter::SnatTranslated,
        Counter::IcmpTranslated,
        Counter::PodSeen,
        Counter::AffinityHit,
        Counter::Ipv4Options,
        Counter::VlanTagged,
    ];

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Counter::XdpSeen => "xdp_seen",
            Counter::PassNotIpv4 => "pass_not_ipv4",
            Counter::PassIpv4Invalid => "pass_ipv4_invalid",
            Counter::PassFragment => "pass_fragment",
            Counter::PassNotTcpUdp => "pass_not_tcp_udp",
            Counter::PassNotService => "pass_not_service",
            Counter::ForwardNew => "forward_new",
            Counter::ForwardTracked => "forward_tracked",
            Counter::XdpDrop => "xdp_drop",
            Counter::TcSeen => "tc_seen",
            Counter::ReplyTranslated => "reply_translated",
            Counter::TcPass => "tc_pass",
            Counter::TcDrop => "tc_drop",
            Counter::SnatNew => "snat_new",
            Counter::SnatTranslated => "snat_translated",
            Counter::IcmpTranslated => "icmp_translated",
            Counter::PodSeen => "pod_seen",
            Counter::AffinityHit => "affinity_hit",
            Counter::Ipv4Options => "ipv4_options",
            Counter::VlanTagged => "vlan_tagged",
        }
    }
}

#[expect(clippy::cast_possible_truncation, reason = "a handful of counters")]
pub const COUNTER_COUNT: u32 = Counter::ALL.len() as u32;

/// Why a packet was dropped: indexes of the per-CPU `DROPS` array. Numbers are stable and never
/// reused; 0 is not a reason.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// TCP or UDP packet too short to hold its L4 header.
    L4HeaderTruncated = 1,
    /// A frontend whose service has no ready endpoint (kube-proxy rejects these too).
    NoBackend = 2,
    /// The chosen slot names a backend id with no backend: the maps disagree.
    BackendMissing = 3,
    /// The flow could not be tracked, so its replies could not be translated back.
    ConntrackInsertFailed = 4,
    /// A packet rewrite helper failed in TC.
    RewriteFailed = 5,
    /// A frontend with a `Local` traffic policy and no endpoint on this node (kube-proxy drops
    /// these too).
    NoLocalBackend = 6,
    /// The source is outside the Service's `loadBalancerSourceRanges`.
    SourceRangeDenied = 7,
    /// Every SNAT port toward the chosen backend is in use.
    SnatPortsExhausted = 8,
    /// A local backend's reply whose source became one of this node's addresses (a `NodePort`'s)
    /// could not be sent out of its pod interface directly: no route to the client, too big for
    /// the egress MTU, or TTL spent. The stack would drop it as a martian (its source is local).
    ReplyUnroutable = 9,
}

impl DropReason {
    pub const ALL: [DropReason; 9] = [
        DropReason::L4HeaderTruncated,
        DropReason::NoBackend,
        DropReason::BackendMissing,
        DropReason::ConntrackInsertFailed,
        DropReason::RewriteFailed,
        DropReason::NoLocalBackend,
        DropReason::SourceRangeDenied,
        DropReason::SnatPortsExhausted,
        DropReason::ReplyUnroutable,
    ];

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::L4HeaderTruncated => "l4_header_truncated",
            DropReason::NoBackend => "no_backend",
            DropReason::BackendMissing => "backend_missing",
            DropReason::ConntrackInsertFailed => "conntrack_insert_failed",
            DropReason::RewriteFailed => "rewrite_failed",
            DropReason::NoLocalBackend => "no_local_backend",
            DropReason::SourceRangeDenied => "source_range_denied",
            DropReason::SnatPortsExhausted => "snat_ports_exhausted",
            DropReason::ReplyUnroutable => "reply_unroutable",
        }
    }
}

/// Packets and bytes one backend's translated flows carried: the value of the per-CPU
/// `BACKEND_STATS` array, indexed by backend id like `BACKENDS`.
///
/// Bytes are the IPv4 total length (L3, without Ethernet or VLAN headers), so XDP and TC count a
/// packet the same. Each packet is counted once, where the data path translates it with its
/// flow's backend known: forward is client -> backend (DNAT, new or tracked flow), reply is
/// backend -> client.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendStats {
    pub forward_packets: u64,
    pub forward_bytes: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
}
const _: () = assert!(size_of::<BackendStats>() == 32);

impl BackendStats {
    /// Adds another CPU's (or another backend's) counts to these.
    pub fn accumulate(&mut self, other: &BackendStats) {
        self.forward_packets = self.forward_packets.wrapping_add(other.forward_packets);
        self.forward_bytes = self.forward_bytes.wrapping_add(other.forward_bytes);
        self.reply_packets = self.reply_packets.wrapping_add(other.reply_packets);
        self.reply_bytes = self.reply_bytes.wrapping_add(other.reply_bytes);
    }

    #[must_use]
    pub fn is_zero(&self) -> bool {
        *self == BackendStats::default()
    }
}

/// Size of the `DROPS` array: room for reasons up to 15, so a new reason does not change the size
/// of a pinned map a running agent hands over.
pub const DROP_REASON_SLOTS: u32 = 16;
const _: () = assert!((DropReason::ReplyUnroutable as u32) < DROP_REASON_SLOTS);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is `#[repr(C)]`, `Copy`, made only of integers with explicit padding
    // fields (asserted sizes above), so every bit pattern is valid and there are no implicit holes.
    unsafe impl aya::Pod for super::FrontendKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Service {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Backend {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Settings {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SourceRangeKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AffinityKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AffinityValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BackendStats {}
}

#[cfg(test)]
mod tests {
    use super::BackendStats;

    #[test]
    fn backend_stats_accumulate_field_by_field() {
        let one_cpu = BackendStats {
            forward_packets: 1,
            forward_bytes: 60,
            reply_packets: 2,
            reply_bytes: 1_500,
        };
        let other_cpu = BackendStats {
            forward_packets: 10,
            forward_bytes: 600,
            reply_packets: 0,
            reply_bytes: 0,
        };
        let mut sum = BackendStats::default();
        assert!(sum.is_zero());
        sum.accumulate(&one_cpu);
        sum.accumulate(&other_cpu);
        assert!(!sum.is_zero());
        assert_eq!(
            sum,
            BackendStats {
                forward_packets: 11,
                forward_bytes: 660,
                reply_packets: 2,
                reply_bytes: 1_500,
            }
        );
    }
}
