//! Bounds-checked views of the headers the data path reads.
//!
//! Drop policy, stated once: a frame we cannot identify as service traffic is passed to the stack
//! untouched (and counted), because the stack applies its own rules to it; a TCP or UDP packet
//! too short to hold its ports and checksum is dropped, because neither we nor the stack can do
//! anything correct with it.
//!
//! Up to two VLAN tags (802.1Q, 802.1ad: one tag or `QinQ`) are skipped, so tagged frames from a
//! trunk are served like untagged ones. IPv4 options are skipped by the header length and
//! counted. Fragments are passed untouched and counted (see the README's fragment rule).
//!
//! Both programs get the same `Parsed` answer: XDP reads packet memory directly, TC through the
//! skb load helper (which also reads non-linear data). `Frame` is the one interface they share.

use aya_ebpf::programs::{TcContext, XdpContext};
use lb_common::{
    Counter, DropReason, FlowKey, FrontendKey, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP,
    frontend_scope, hash::flow_hash,
};

use crate::stats;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const ETH_HDR_LEN: usize = 14;
const ETH_TYPE_OFFSET: usize = 12;
const VLAN_TAG_LEN: usize = 4;
/// One tag, or `QinQ`; a third tag is not something a node's trunk carries.
const MAX_VLAN_TAGS: usize = 2;

const IPV4_MIN_HDR_LEN: usize = 20;
const IPV4_FRAGS_OFFSET: usize = 6;
/// TTL, then the protocol: read together (see `Frame`).
pub const IPV4_TTL_OFFSET: usize = 8;
pub const IPV4_CHECK_OFFSET: usize = 10;
pub const IPV4_SRC_OFFSET: usize = 12;
pub const IPV4_DST_OFFSET: usize = 16;
/// The More Fragments flag and the fragment offset, in the host-order `frags` word.
const IPV4_FRAGMENT_MASK: u16 = 0x3fff;

/// Bytes from the L4 header's start that must be present: ports plus the checksum field.
const TCP_MIN_LEN: usize = 20;
const UDP_MIN_LEN: usize = 8;
pub const TCP_CHECK_OFFSET: usize = 16;
pub const UDP_CHECK_OFFSET: usize = 6;
const TCP_FLAGS_OFFSET: usize = 13;
pub const L4_SRC_PORT_OFFSET: usize = 0;
pub const L4_DST_PORT_OFFSET: usize = 2;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
/// Type, code, checksum and the 4-byte rest of header come before the quoted packet.
const ICMP_HDR_LEN: usize = 8;
pub const ICMP_CHECK_OFFSET: usize = 2;

/// The addresses and ports of a TCP or UDP packet, in network byte order.
#[derive(Clone, Copy)]
pub struct Tuple {
    pub src_addr_be: u32,
    pub dst_addr_be: u32,
    pub src_port_be: u16,
    pub dst_port_be: u16,
    pub protocol: u8,
}

impl Tuple {
    #[inline(always)]
    pub fn frontend_key(&self) -> FrontendKey {
        FrontendKey {
            addr_be: self.dst_addr_be,
            port_be: self.dst_port_be,
            protocol: self.protocol,
            scope: frontend_scope::ANY,
        }
    }

    #[inline(always)]
    pub fn flow_key(&self, direction: u8) -> FlowKey {
        FlowKey {
            src_addr_be: self.src_addr_be,
            dst_addr_be: self.dst_addr_be,
            src_port_be: self.src_port_be,
            dst_port_be: self.dst_port_be,
            protocol: self.protocol,
            direction,
            _pad: [0; 2],
        }
    }

    /// The flow hash of this 5-tuple (fields as the packet holds them).
    #[inline(always)]
    pub fn hash(&self, seed: u32) -> u32 {
        let ports = (u32::from(self.src_port_be) << 16) | u32::from(self.dst_port_be);
        flow_hash(
            self.src_addr_be,
            self.dst_addr_be,
            ports,
            self.protocol,
            seed,
        )
    }

    /// The key of a packet going the other way.
    #[inline(always)]
    pub fn reversed_flow_key(&self, direction: u8) -> FlowKey {
        FlowKey {
            src_addr_be: self.dst_addr_be,
            dst_addr_be: self.src_addr_be,
            src_port_be: self.dst_port_be,
            dst_port_be: self.src_port_be,
            protocol: self.protocol,
            direction,
            _pad: [0; 2],
        }
    }
}

/// Where the headers of an IPv4 packet are in the frame. Offsets rather than pointers: they
/// depend on VLAN tags and header lengths, and LLVM may rebuild a variable-offset pointer from
/// the packet start, which loses the bounds the verifier saw. Writers re-check each field.
#[derive(Clone, Copy)]
pub struct Headers {
    /// The IPv4 header.
    pub l3: usize,
    /// The TCP, UDP or ICMP header.
    pub l4: usize,
}

/// A TCP or UDP packet.
pub struct L4Packet {
    pub tuple: Tuple,
    pub at: Headers,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
    /// The IPv4 total length: what the backend statistics count as the packet's bytes.
    pub l3_len: u16,
}

impl L4Packet {
    #[inline(always)]
    pub fn l4_check_offset(&self) -> usize {
        self.at.l4 + l4_check_field(self.tuple.protocol)
    }
}

/// An ICMP error (destination unreachable, time exceeded, parameter problem) quoting a TCP or
/// UDP packet: the one case where ICMP carries a flow we may have translated.
pub struct IcmpError {
    /// Source and destination of the ICMP packet itself (ports unused).
    pub outer: Tuple,
    pub outer_at: Headers,
    /// The quoted packet, as it was sent.
    pub inner: Tuple,
    pub inner_at: Headers,
}

pub enum Parsed {
    L4(L4Packet),
    IcmpError(IcmpError),
    /// Not something we translate: pass it and count this.
    Pass(Counter),
}

/// Offset of the L4 checksum field from the L4 header.
#[inline(always)]
pub fn l4_check_field(protocol: u8) -> usize {
    if protocol == IPPROTO_UDP {
        UDP_CHECK_OFFSET
    } else {
        TCP_CHECK_OFFSET
    }
}

/// Reading a frame: what the parser needs from either program type.
///
/// Avoid one-byte reads at a variable offset: LLVM turns `p + 1 > end` into `p >= end`, from
/// which the verifier learns no range, and rejects the read.
pub trait Frame {
    fn read<T: Copy>(&self, offset: usize) -> Option<T>;
}

impl Frame for XdpContext {
    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        // SAFETY: `ptr_at` checked that the whole `T` lies inside the packet; packet data has
        // no alignment guarantee, hence the unaligned read.
        ptr_at::<T>(self, offset).map(|p| unsafe { p.read_unaligned() })
    }
}

impl Frame for TcContext {
    /// Direct packet access when the bytes are in the skb's linear part (the headers nearly
    /// always are), which is several times cheaper than `bpf_skb_load_bytes`; the helper for the
    /// rest, since TC, unlike XDP, can see headers in paged data.
    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        // SAFETY: the context pointer is valid for the whole run; the fields are read volatile
        // for the reason `ptr_at` gives.
        let (start, end) = unsafe {
            (
                core::ptr::read_volatile(&raw const (*self.skb.skb).data) as usize,
                core::ptr::read_volatile(&raw const (*self.skb.skb).data_end) as usize,
            )
        };
        if start + offset + size_of::<T>() <= end {
            // SAFETY: the whole `T` lies inside the linear data, checked above; packet data has
            // no alignment guarantee, hence the unaligned read.
            return Some(unsafe { ((start + offset) as *const T).read_unaligned() });
        }
        self.load::<T>(offset).ok()
    }
}

/// A pointer to a `T` at `offset` in the packet, if the whole `T` lies inside it.
///
/// `data` and `data_end` are read volatile: otherwise LLVM drops a check that an earlier,
/// wider one implies, but the verifier tracks each check on the register it was made with and
/// then rejects the access.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    // SAFETY: `ctx.ctx` is the program's context pointer, valid for the whole run.
    let (start, end) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*ctx.ctx).data) as usize,
            core::ptr::read_volatile(&raw const (*ctx.ctx).data_end) as usize,
        )
    };
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Parses Ethernet (with up to two VLAN tags), IPv4, and TCP/UDP ports or an ICMP error.
/// `Err(reason)`: drop.
#[inline(always)]
pub fn packet<F: Frame>(frame: &F) -> Result<Parsed, DropReason> {
    let Some(l3) = l3_offset(frame) else {
        return Ok(Parsed::Pass(Counter::PassNotIpv4));
    };
    let Some(ip) = ipv4(frame, l3) else {
        return Ok(Parsed::Pass(Counter::PassIpv4Invalid));
    };
    if ip.fragment {
        return Ok(Parsed::Pass(Counter::PassFragment));
    }
    if ip.l4 - l3 > IPV4_MIN_HDR_LEN {
        stats::count(Counter::Ipv4Options);
    }
    let at = Headers { l3, l4: ip.l4 };
    match ip.protocol {
        IPPROTO_TCP | IPPROTO_UDP => {}
        IPPROTO_ICMP => {
            return Ok(match icmp_error(frame, &ip, at) {
                Some(error) => Parsed::IcmpError(error),
                None => Parsed::Pass(Counter::PassNotTcpUdp),
            });
        }
        _ => return Ok(Parsed::Pass(Counter::PassNotTcpUdp)),
    }
    // One read of the whole minimal L4 header: one bounds check the verifier can follow, and
    // every field read or written later lies inside it.
    let (ports, tcp_flags) = if ip.protocol == IPPROTO_TCP {
        let h = frame
            .read::<[u8; TCP_MIN_LEN]>(at.l4)
            .ok_or(DropReason::L4HeaderTruncated)?;
        ([h[0], h[1], h[2], h[3]], h[TCP_FLAGS_OFFSET])
    } else {
        let h = frame
            .read::<[u8; UDP_MIN_LEN]>(at.l4)
            .ok_or(DropReason::L4HeaderTruncated)?;
        ([h[0], h[1], h[2], h[3]], 0)
    };
    let src_port_be = u16::from_ne_bytes([ports[0], ports[1]]);
    let dst_port_be = u16::from_ne_bytes([ports[2], ports[3]]);
    Ok(Parsed::L4(L4Packet {
        tuple: Tuple {
            src_addr_be: ip.src_addr_be,
            dst_addr_be: ip.dst_addr_be,
            src_port_be,
            dst_port_be,
            protocol: ip.protocol,
        },
        at,
        tcp_flags,
        l3_len: ip.total_len,
    }))
}

/// The IPv4 header's offset, past at most two VLAN tags; `None` if the frame is not IPv4.
#[inline(always)]
fn l3_offset<F: Frame>(frame: &F) -> Option<usize> {
    let mut type_offset = ETH_TYPE_OFFSET;
    for _ in 0..MAX_VLAN_TAGS {
        let ether_type = u16::from_be(frame.read::<u16>(type_offset)?);
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        type_offset += VLAN_TAG_LEN;
    }
    if u16::from_be(frame.read::<u16>(type_offset)?) != ETH_P_IP {
        return None;
    }
    if type_offset != ETH_TYPE_OFFSET {
        stats::count(Counter::VlanTagged);
    }
    Some(type_offset + (ETH_HDR_LEN - ETH_TYPE_OFFSET))
}

struct Ipv4 {
    src_addr_be: u32,
    dst_addr_be: u32,
    protocol: u8,
    fragment: bool,
    /// The total length field, host byte order.
    total_len: u16,
    /// Offset of the L4 header.
    l4: usize,
}

/// The IPv4 header at `l3`; `None` if it is not one the stack would accept the layout of.
#[inline(always)]
fn ipv4<F: Frame>(frame: &F, l3: usize) -> Option<Ipv4> {
    let [vihl, _tos, len_high, len_low] = frame.read::<[u8; 4]>(l3)?;
    let header_len = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || header_len < IPV4_MIN_HDR_LEN {
        return None;
    }
    let frags = u16::from_be(frame.read::<u16>(l3 + IPV4_FRAGS_OFFSET)?);
    Some(Ipv4 {
        src_addr_be: frame.read::<u32>(l3 + IPV4_SRC_OFFSET)?,
        dst_addr_be: frame.read::<u32>(l3 + IPV4_DST_OFFSET)?,
        protocol: frame.read::<[u8; 2]>(l3 + IPV4_TTL_OFFSET)?[1],
        fragment: frags & IPV4_FRAGMENT_MASK != 0,
        total_len: u16::from_be_bytes([len_high, len_low]),
        l4: l3 + header_len,
    })
}

/// An ICMP error quoting a TCP or UDP packet whose ports are present; `None` for any other
/// ICMP (echo, errors about other protocols or truncated quotes), which is passed.
#[inline(always)]
fn icmp_error<F: Frame>(frame: &F, outer: &Ipv4, outer_at: Headers) -> Option<IcmpError> {
    let [icmp_type, _code] = frame.read::<[u8; 2]>(outer_at.l4)?;
    if icmp_type != ICMP_DEST_UNREACH
        && icmp_type != ICMP_TIME_EXCEEDED
        && icmp_type != ICMP_PARAMETER_PROBLEM
    {
        return None;
    }
    let inner = ipv4(frame, outer_at.l4 + ICMP_HDR_LEN)?;
    if inner.protocol != IPPROTO_TCP && inner.protocol != IPPROTO_UDP {
        return None;
    }
    let inner_at = Headers {
        l3: outer_at.l4 + ICMP_HDR_LEN,
        l4: inner.l4,
    };
    // RFC 792 quotes at least the first 8 bytes of the L4 header: the ports are there.
    let [src_port_be, dst_port_be] = frame.read::<[u16; 2]>(inner_at.l4)?;
    Some(IcmpError {
        outer: Tuple {
            src_addr_be: outer.src_addr_be,
            dst_addr_be: outer.dst_addr_be,
            src_port_be: 0,
            dst_port_be: 0,
            protocol: IPPROTO_ICMP,
        },
        outer_at,
        inner: Tuple {
            src_addr_be: inner.src_addr_be,
            dst_addr_be: inner.dst_addr_be,
            src_port_be,
            dst_port_be,
            protocol: inner.protocol,
        },
        inner_at,
    })
}
