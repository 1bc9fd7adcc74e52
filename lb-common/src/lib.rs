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
    pub const FRONTENDS: &str = "FRONTENDS";
    pub const BACKEND_SLOTS: &str = "BACKEND_SLOTS";
    pub const BACKENDS: &str = "BACKENDS";
    pub const CONNTRACK: &str = "CONNTRACK";
    pub const COUNTERS: &str = "COUNTERS";
    pub const DROPS: &str = "DROPS";
}

/// Names of the programs in the eBPF object.
pub mod program_names {
    /// XDP on the node's interfaces: frontends -> DNAT to a backend.
    pub const XDP_INGRESS: &str = "lb_xdp_ingress";
    /// TC egress on the same interfaces: backend replies -> the frontend address the client used.
    pub const TC_EGRESS: &str = "lb_tc_egress";
}

/// Capacity of the frontend table: one entry per (address, port, protocol) a Service answers on.
pub const MAX_FRONTENDS: u32 = 65_536;
/// Service ports the data path can hold. Id 0 is never used, so a zeroed slot means "unset".
pub const MAX_SERVICES: u32 = 4_096;
/// Backends one service port can balance over.
pub const MAX_BACKENDS_PER_SERVICE: u32 = 256;
/// Distinct (endpoint address, target port) pairs across all services. Id 0 is never used.
pub const MAX_BACKENDS: u32 = 65_536;
/// Tracked flows; each connection uses two entries (one per direction).
pub const CONNTRACK_ENTRIES: u32 = 262_144;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

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
    pub _pad: u8,
}
const _: () = assert!(size_of::<FrontendKey>() == 8);

/// The service port a frontend belongs to: the value of the `FRONTENDS` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Service {
    /// Index of this service port's row in `BACKEND_SLOTS`; never 0.
    pub id: u32,
    /// How many slots of the row hold a backend; 0 means no ready endpoint.
    pub backend_count: u32,
}
const _: () = assert!(size_of::<Service>() == 8);

/// Index of a service's `slot`-th backend id in the `BACKEND_SLOTS` array.
#[must_use]
pub const fn backend_slot_index(service_id: u32, slot: u32) -> u32 {
    service_id * MAX_BACKENDS_PER_SERVICE + slot
}

/// An endpoint address and target port: the value of the `BACKENDS` array, indexed by backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    pub addr_be: u32,
    pub port_be: u16,
    pub _pad: u16,
}
const _: () = assert!(size_of::<Backend>() == 8);

/// Which way a conntrack entry translates.
pub mod direction {
    /// Client -> frontend, seen by XDP: rewrite the destination to the backend.
    pub const FORWARD: u8 = 1;
    /// Backend -> client, seen by TC egress: rewrite the source to the frontend.
    pub const REPLY: u8 = 2;
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

/// What to write into a tracked packet: the value of `CONNTRACK`.
///
/// For a `FORWARD` entry `nat_*` is the backend (the new destination); for a `REPLY` entry it is
/// the frontend the client connected to (the new source).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FlowTarget {
    pub nat_addr_be: u32,
    pub nat_port_be: u16,
    pub _pad: u16,
    pub service_id: u32,
    pub backend_id: u32,
}
const _: () = assert!(size_of::<FlowTarget>() == 16);

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
}

impl Counter {
    pub const ALL: [Counter; 13] = [
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
}

impl DropReason {
    pub const ALL: [DropReason; 5] = [
        DropReason::L4HeaderTruncated,
        DropReason::NoBackend,
        DropReason::BackendMissing,
        DropReason::ConntrackInsertFailed,
        DropReason::RewriteFailed,
    ];

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::L4HeaderTruncated => "l4_header_truncated",
            DropReason::NoBackend => "no_backend",
            DropReason::BackendMissing => "backend_missing",
            DropReason::ConntrackInsertFailed => "conntrack_insert_failed",
            DropReason::RewriteFailed => "rewrite_failed",
        }
    }
}

/// Size of the `DROPS` array: the highest reason number plus one.
pub const DROP_REASON_SLOTS: u32 = 8;
const _: () = assert!((DropReason::RewriteFailed as u32) < DROP_REASON_SLOTS);

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
    unsafe impl aya::Pod for super::FlowTarget {}
}
