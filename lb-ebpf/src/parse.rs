//! Bounds-checked views of the headers the data path reads.
//!
//! Drop policy, stated once: a frame we cannot identify as service traffic is passed to the stack
//! untouched (and counted), because the stack applies its own rules to it; a TCP or UDP packet
//! too short to hold its ports and checksum is dropped, because neither we nor the stack can do
//! anything correct with it. IPv4 options are skipped by the header length; fragments are passed.

use core::mem::size_of;

use aya_ebpf::programs::{TcContext, XdpContext};
use lb_common::{Counter, DropReason, FlowKey, FrontendKey, IPPROTO_TCP, IPPROTO_UDP};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

const ETH_P_IP: u16 = 0x0800;
const ETH_HDR_LEN: usize = size_of::<EthHdr>();
const ETH_TYPE_OFFSET: usize = 12;
const IPV4_MIN_HDR_LEN: usize = size_of::<Ipv4Hdr>();
const IPV4_VIHL_OFFSET: usize = ETH_HDR_LEN;
const IPV4_FRAGS_OFFSET: usize = ETH_HDR_LEN + 6;
const IPV4_PROTO_OFFSET: usize = ETH_HDR_LEN + 9;
pub const IPV4_CHECK_OFFSET: usize = ETH_HDR_LEN + 10;
pub const IPV4_SRC_OFFSET: usize = ETH_HDR_LEN + 12;
const IPV4_DST_OFFSET: usize = ETH_HDR_LEN + 16;
/// The More Fragments flag and the fragment offset, in the host-order `frags` word.
const IPV4_FRAGMENT_MASK: u16 = 0x3fff;
/// Bytes from the L4 header's start that must be present: ports plus the checksum field.
const TCP_MIN_LEN: usize = 20;
const UDP_MIN_LEN: usize = 8;
const TCP_CHECK_OFFSET: usize = 16;
const UDP_CHECK_OFFSET: usize = 6;
const L4_DST_PORT_OFFSET: usize = 2;

/// The addresses and ports of a TCP or UDP packet, in network byte order.
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
            _pad: 0,
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
}

/// A parsed packet in XDP, with where the fields DNAT rewrites are.
///
/// Offsets rather than pointers: the L4 header's offset depends on the IPv4 header length, and
/// LLVM may rebuild a variable-offset pointer from the packet start, which loses the bounds the
/// verifier saw. The writer re-checks each field with `ptr_at` right where it writes.
pub struct XdpPacket {
    pub tuple: Tuple,
    pub ip: *mut Ipv4Hdr,
    pub dst_port_offset: usize,
    pub l4_check_offset: usize,
}

/// A pointer to a `T` at `offset` in the packet, if the whole `T` lies inside it.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

// SAFETY (for every `unsafe { &raw const (*hdr).field }` below): taking a field's address
// through a pointer from `ptr_at` reads nothing and stays inside the checked header.
#[inline(always)]
fn read<T: Copy>(ptr: *const T) -> T {
    // SAFETY: every pointer read here came from `ptr_at`, which checked it lies in the packet;
    // packet data has no alignment guarantee, hence the unaligned read.
    unsafe { ptr.read_unaligned() }
}

/// Parses Ethernet, IPv4 and the TCP/UDP ports.
///
/// `Ok(Ok(packet))`: a TCP or UDP packet to look up. `Ok(Err(counter))`: not something we
/// translate; pass it and count `counter`. `Err(reason)`: drop.
#[inline(always)]
pub fn xdp_ipv4_l4(ctx: &XdpContext) -> Result<Result<XdpPacket, Counter>, DropReason> {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Ok(Err(Counter::PassNotIpv4));
    };
    if read(unsafe { &raw const (*eth).ether_type }) != ETH_P_IP.to_be() {
        return Ok(Err(Counter::PassNotIpv4));
    }
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, ETH_HDR_LEN) else {
        return Ok(Err(Counter::PassIpv4Invalid));
    };
    let vihl = read(unsafe { &raw const (*ip).vihl });
    let ip_hdr_len = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || ip_hdr_len < IPV4_MIN_HDR_LEN {
        return Ok(Err(Counter::PassIpv4Invalid));
    }
    if u16::from_be_bytes(read(unsafe { &raw const (*ip).frags })) & IPV4_FRAGMENT_MASK != 0 {
        return Ok(Err(Counter::PassFragment));
    }
    let protocol = read(unsafe { &raw const (*ip).proto });
    let (l4_min_len, check_offset) = match protocol {
        IPPROTO_TCP => (TCP_MIN_LEN, TCP_CHECK_OFFSET),
        IPPROTO_UDP => (UDP_MIN_LEN, UDP_CHECK_OFFSET),
        _ => return Ok(Err(Counter::PassNotTcpUdp)),
    };

    let l4_offset = ETH_HDR_LEN + ip_hdr_len;
    // Check the whole minimal L4 header once; the field pointers below lie inside it.
    if ptr_at::<u8>(ctx, l4_offset + l4_min_len - 1).is_none() {
        return Err(DropReason::L4HeaderTruncated);
    }
    let Some(ports) = ptr_at::<[u16; 2]>(ctx, l4_offset) else {
        return Err(DropReason::L4HeaderTruncated);
    };
    let [src_port_be, dst_port_be] = read(ports);

    Ok(Ok(XdpPacket {
        tuple: Tuple {
            src_addr_be: u32::from_ne_bytes(read(unsafe { &raw const (*ip).src_addr })),
            dst_addr_be: u32::from_ne_bytes(read(unsafe { &raw const (*ip).dst_addr })),
            src_port_be,
            dst_port_be,
            protocol,
        },
        ip,
        dst_port_offset: l4_offset + L4_DST_PORT_OFFSET,
        l4_check_offset: l4_offset + check_offset,
    }))
}

/// A parsed packet in TC, with the offsets the source rewrite needs.
pub struct TcPacket {
    pub tuple: Tuple,
    pub src_port_offset: usize,
    pub l4_check_offset: usize,
}

/// Parses an IPv4 TCP/UDP packet through the skb load helper (which also reads non-linear
/// data). `None` for anything else: TC only translates replies XDP set up, which are all
/// well-formed unfragmented TCP or UDP.
#[inline(always)]
pub fn tc_ipv4_l4(ctx: &TcContext) -> Option<TcPacket> {
    if ctx.load::<u16>(ETH_TYPE_OFFSET).ok()? != ETH_P_IP.to_be() {
        return None;
    }
    let vihl = ctx.load::<u8>(IPV4_VIHL_OFFSET).ok()?;
    let ip_hdr_len = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || ip_hdr_len < IPV4_MIN_HDR_LEN {
        return None;
    }
    if u16::from_be(ctx.load::<u16>(IPV4_FRAGS_OFFSET).ok()?) & IPV4_FRAGMENT_MASK != 0 {
        return None;
    }
    let protocol = ctx.load::<u8>(IPV4_PROTO_OFFSET).ok()?;
    let check_offset = match protocol {
        IPPROTO_TCP => TCP_CHECK_OFFSET,
        IPPROTO_UDP => UDP_CHECK_OFFSET,
        _ => return None,
    };
    let l4_offset = ETH_HDR_LEN + ip_hdr_len;
    let [src_port_be, dst_port_be] = ctx.load::<[u16; 2]>(l4_offset).ok()?;
    Some(TcPacket {
        tuple: Tuple {
            src_addr_be: ctx.load::<u32>(IPV4_SRC_OFFSET).ok()?,
            dst_addr_be: ctx.load::<u32>(IPV4_DST_OFFSET).ok()?,
            src_port_be,
            dst_port_be,
            protocol,
        },
        src_port_offset: l4_offset,
        l4_check_offset: l4_offset + check_offset,
    })
}
