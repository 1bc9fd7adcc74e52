//! Address and port translation with checksum updates.
//!
//! XDP sees frames as the NIC delivered them, with complete checksums, so every rewrite there
//! is a direct write plus the incremental update of RFC 1624. TC sees socket-built packets
//! whose L4 checksum may be partial (offloaded), so TCP/UDP rewrites there go through the
//! kernel helpers, which handle every `ip_summed` state. ICMP errors carry full checksums on
//! both paths and are rewritten directly: every change is matched by its checksum field, so the
//! sum over the packet (and a `CHECKSUM_COMPLETE` skb's `csum`) stays as it was.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM},
    programs::{TcContext, XdpContext},
};
use lb_common::{DropReason, FlowEntry, IPPROTO_UDP, checksum::Delta};

use crate::parse::{
    Frame, ICMP_CHECK_OFFSET, IPV4_CHECK_OFFSET, IPV4_DST_OFFSET, IPV4_SRC_OFFSET, IcmpError,
    L4_DST_PORT_OFFSET, L4_SRC_PORT_OFFSET, L4Packet, Tuple, ptr_at,
};

/// Which end of a packet to rewrite.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum End {
    Source,
    Destination,
}

impl End {
    #[inline(always)]
    fn addr_offset(self) -> usize {
        match self {
            End::Source => IPV4_SRC_OFFSET,
            End::Destination => IPV4_DST_OFFSET,
        }
    }

    #[inline(always)]
    fn port_offset(self) -> usize {
        match self {
            End::Source => L4_SRC_PORT_OFFSET,
            End::Destination => L4_DST_PORT_OFFSET,
        }
    }
}

/// An address and port in network byte order.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Addr {
    pub addr_be: u32,
    pub port_be: u16,
}

/// Writing a frame, on top of reading it.
pub trait Rewrite: Frame {
    fn write<T: Copy>(&self, offset: usize, value: T) -> Result<(), DropReason>;

    /// Rewrites one end of a TCP or UDP packet: address, port, IPv4 and L4 checksums.
    fn set_l4_end(&self, packet: &L4Packet, end: End, new: Addr) -> Result<(), DropReason>;
}

impl Addr {
    /// One end of a packet's tuple.
    #[inline(always)]
    pub fn of(tuple: &Tuple, end: End) -> Addr {
        match end {
            End::Source => Addr {
                addr_be: tuple.src_addr_be,
                port_be: tuple.src_port_be,
            },
            End::Destination => Addr {
                addr_be: tuple.dst_addr_be,
                port_be: tuple.dst_port_be,
            },
        }
    }

    /// What a flow entry writes (see `FlowEntry`).
    #[inline(always)]
    pub fn nat(entry: &FlowEntry) -> Addr {
        Addr {
            addr_be: entry.nat_addr_be,
            port_be: entry.nat_port_be,
        }
    }

    /// The other address a flow entry keeps (see `FlowEntry`).
    #[inline(always)]
    pub fn peer(entry: &FlowEntry) -> Addr {
        Addr {
            addr_be: entry.peer_addr_be,
            port_be: entry.peer_port_be,
        }
    }
}

impl Rewrite for XdpContext {
    #[inline(always)]
    fn write<T: Copy>(&self, offset: usize, value: T) -> Result<(), DropReason> {
        // Checking here, right where the write happens, is what lets the verifier see it.
        let ptr = ptr_at::<T>(self, offset).ok_or(DropReason::RewriteFailed)?;
        // SAFETY: `ptr_at` checked the whole `T` lies in the packet; no alignment guarantee.
        unsafe { ptr.write_unaligned(value) };
        Ok(())
    }

    #[inline(always)]
    fn set_l4_end(&self, packet: &L4Packet, end: End, new: Addr) -> Result<(), DropReason> {
        let old = Addr::of(&packet.tuple, end);
        // One delta covers the address (IPv4 header, and the L4 pseudo-header); the L4 one
        // adds the port.
        let address = Delta::new().replace_u32(old.addr_be, new.addr_be);
        let address_and_port = address.replace_u16(old.port_be, new.port_be);
        let at = packet.at;
        let ip_check = read_u16(self, at.l3 + IPV4_CHECK_OFFSET)?;
        let l4_check_offset = packet.l4_check_offset();
        let l4_check = read_u16(self, l4_check_offset)?;
        let new_l4_check = if packet.tuple.protocol == IPPROTO_UDP {
            address_and_port.apply_udp(l4_check)
        } else {
            address_and_port.apply(l4_check)
        };
        self.write(at.l3 + end.addr_offset(), new.addr_be)?;
        self.write(at.l3 + IPV4_CHECK_OFFSET, address.apply(ip_check))?;
        self.write(at.l4 + end.port_offset(), new.port_be)?;
        self.write(l4_check_offset, new_l4_check)
    }
}

impl Rewrite for TcContext {
    #[inline(always)]
    fn write<T: Copy>(&self, offset: usize, value: T) -> Result<(), DropReason> {
        self.store(offset, &value, 0)
            .map_err(|_| DropReason::RewriteFailed)
    }

    /// The address goes through the pseudo-header (`BPF_F_PSEUDO_HDR`), and a zero UDP
    /// checksum stays zero (`BPF_F_MARK_MANGLED_0`).
    #[inline(always)]
    fn set_l4_end(&self, packet: &L4Packet, end: End, new: Addr) -> Result<(), DropReason> {
        let old = Addr::of(&packet.tuple, end);
        let udp = if packet.tuple.protocol == IPPROTO_UDP {
            u64::from(BPF_F_MARK_MANGLED_0)
        } else {
            0
        };
        let fail = |_| DropReason::RewriteFailed;
        let at = packet.at;
        let check = packet.l4_check_offset();

        let (old_addr, new_addr) = (u64::from(old.addr_be), u64::from(new.addr_be));
        self.l4_csum_replace(
            check,
            old_addr,
            new_addr,
            u64::from(BPF_F_PSEUDO_HDR) | udp | 4,
        )
        .map_err(fail)?;
        self.l3_csum_replace(at.l3 + IPV4_CHECK_OFFSET, old_addr, new_addr, 4)
            .map_err(fail)?;
        self.store(at.l3 + end.addr_offset(), &new.addr_be, 0)
            .map_err(fail)?;

        // A UDP datagram without checksum has no field that absorbs the port change, so on a
        // CHECKSUM_COMPLETE skb the store itself must update `skb->csum`. With a checksum, the
        // checksum field's change offsets the port's and `skb->csum` must stay as it is.
        let udp_without_checksum =
            udp != 0 && self.read::<u16>(check).ok_or(DropReason::RewriteFailed)? == 0;
        let store_flags = if udp_without_checksum {
            u64::from(BPF_F_RECOMPUTE_CSUM)
        } else {
            0
        };
        let (old_port, new_port) = (u64::from(old.port_be), u64::from(new.port_be));
        self.l4_csum_replace(check, old_port, new_port, udp | 2)
            .map_err(fail)?;
        self.store(at.l4 + end.port_offset(), &new.port_be, store_flags)
            .map_err(fail)
    }
}

/// A 16-bit field as its bytes read natively: `Delta` works on fields in that form, the same
/// form as the `*_be` addresses and ports, so no byte is ever swapped.
#[inline(always)]
fn read_u16<F: Frame>(frame: &F, offset: usize) -> Result<u16, DropReason> {
    frame.read::<u16>(offset).ok_or(DropReason::RewriteFailed)
}

/// Rewrites the address of one end of an ICMP error's own IPv4 header.
#[inline(always)]
pub fn set_icmp_outer_addr<R: Rewrite>(
    frame: &R,
    error: &IcmpError,
    end: End,
    new_addr_be: u32,
) -> Result<(), DropReason> {
    let old = Addr::of(&error.outer, end).addr_be;
    let l3 = error.outer_at.l3;
    let check = read_u16(frame, l3 + IPV4_CHECK_OFFSET)?;
    let delta = Delta::new().replace_u32(old, new_addr_be);
    frame.write(l3 + end.addr_offset(), new_addr_be)?;
    frame.write(l3 + IPV4_CHECK_OFFSET, delta.apply(check))
}

/// Rewrites one end of the packet an ICMP error quotes: its address (and the quoted IPv4
/// checksum) and port, with the ICMP checksum absorbing every change. The quoted L4 checksum
/// is left alone: receivers match the quote by addresses and ports and do not verify it.
#[inline(always)]
pub fn set_icmp_quoted_end<R: Rewrite>(
    frame: &R,
    error: &IcmpError,
    end: End,
    new: Addr,
) -> Result<(), DropReason> {
    let old = Addr::of(&error.inner, end);
    let (inner_l3, inner_l4) = (error.inner_at.l3, error.inner_at.l4);
    let icmp_check_offset = error.outer_at.l4 + ICMP_CHECK_OFFSET;
    let inner_check = read_u16(frame, inner_l3 + IPV4_CHECK_OFFSET)?;
    let icmp_check = read_u16(frame, icmp_check_offset)?;
    let address = Delta::new().replace_u32(old.addr_be, new.addr_be);
    let new_inner_check = address.apply(inner_check);
    let icmp = address
        .replace_u16(inner_check, new_inner_check)
        .replace_u16(old.port_be, new.port_be);
    frame.write(inner_l3 + end.addr_offset(), new.addr_be)?;
    frame.write(inner_l3 + IPV4_CHECK_OFFSET, new_inner_check)?;
    frame.write(inner_l4 + end.port_offset(), new.port_be)?;
    frame.write(icmp_check_offset, icmp.apply(icmp_check))
}
