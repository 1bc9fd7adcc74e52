//! Address and port translation with checksum updates.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM},
    programs::{TcContext, XdpContext},
};
use lb_common::{DropReason, FlowTarget, IPPROTO_UDP, checksum::Delta};

use crate::parse::{IPV4_CHECK_OFFSET, IPV4_SRC_OFFSET, TcPacket, XdpPacket, ptr_at};

/// DNAT in XDP: destination address and port become the backend's.
///
/// One checksum delta covers the address (IPv4 header, and the L4 pseudo-header) and the port
/// (L4 only). XDP sees frames as the NIC delivered them, with complete checksums, so the
/// incremental update of RFC 1624 is exact.
#[inline(always)]
pub fn xdp_rewrite_destination(
    ctx: &XdpContext,
    packet: &XdpPacket,
    target: &FlowTarget,
) -> Result<(), DropReason> {
    let tuple = &packet.tuple;
    let address = Delta::new().replace_u32(tuple.dst_addr_be, target.nat_addr_be);
    let address_and_port = address.replace_u16(tuple.dst_port_be, target.nat_port_be);
    // The parser checked these; checking again here is what lets the verifier see it.
    let (Some(dst_port), Some(l4_check)) = (
        ptr_at::<[u8; 2]>(ctx, packet.dst_port_offset),
        ptr_at::<[u8; 2]>(ctx, packet.l4_check_offset),
    ) else {
        return Err(DropReason::L4HeaderTruncated);
    };
    let ip = packet.ip;
    // SAFETY: every pointer is bounds-checked and nothing has moved the packet data since;
    // packet data has no alignment guarantee, hence unaligned accesses.
    unsafe {
        (&raw mut (*ip).dst_addr).write_unaligned(target.nat_addr_be.to_ne_bytes());
        let ip_check = u16::from_ne_bytes((&raw const (*ip).check).read_unaligned());
        (&raw mut (*ip).check).write_unaligned(address.apply(ip_check).to_ne_bytes());

        dst_port.write_unaligned(target.nat_port_be.to_ne_bytes());
        let old_check = u16::from_ne_bytes(l4_check.read_unaligned());
        let new_check = if tuple.protocol == IPPROTO_UDP {
            address_and_port.apply_udp(old_check)
        } else {
            address_and_port.apply(old_check)
        };
        l4_check.write_unaligned(new_check.to_ne_bytes());
    }
    Ok(())
}

/// SNAT in TC: a backend's reply leaves from the frontend address and port the client used.
///
/// TC sees socket-built packets whose L4 checksum may be partial (offloaded), so this uses the
/// kernel helpers, which handle every `ip_summed` state: the address goes through the
/// pseudo-header (`BPF_F_PSEUDO_HDR`), and a zero UDP checksum stays zero (`BPF_F_MARK_MANGLED_0`).
#[inline(always)]
pub fn tc_rewrite_source(
    ctx: &TcContext,
    reply: &TcPacket,
    target: &FlowTarget,
) -> Result<(), DropReason> {
    let tuple = &reply.tuple;
    let udp = if tuple.protocol == IPPROTO_UDP {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    let fail = |_| DropReason::RewriteFailed;

    let (old_addr, new_addr) = (u64::from(tuple.src_addr_be), u64::from(target.nat_addr_be));
    ctx.l4_csum_replace(
        reply.l4_check_offset,
        old_addr,
        new_addr,
        u64::from(BPF_F_PSEUDO_HDR) | udp | 4,
    )
    .map_err(fail)?;
    ctx.l3_csum_replace(IPV4_CHECK_OFFSET, old_addr, new_addr, 4)
        .map_err(fail)?;
    ctx.store(IPV4_SRC_OFFSET, &target.nat_addr_be, 0)
        .map_err(fail)?;

    // A UDP datagram without checksum has no field that absorbs the port change, so on a
    // CHECKSUM_COMPLETE skb the store itself must update `skb->csum`. With a checksum, the
    // checksum field's change offsets the port's and `skb->csum` must stay as it is.
    let udp_without_checksum =
        udp != 0 && ctx.load::<u16>(reply.l4_check_offset).map_err(fail)? == 0;
    let store_flags = if udp_without_checksum {
        u64::from(BPF_F_RECOMPUTE_CSUM)
    } else {
        0
    };
    let (old_port, new_port) = (u64::from(tuple.src_port_be), u64::from(target.nat_port_be));
    ctx.l4_csum_replace(reply.l4_check_offset, old_port, new_port, udp | 2)
        .map_err(fail)?;
    ctx.store(reply.src_port_offset, &target.nat_port_be, store_flags)
        .map_err(fail)
}
