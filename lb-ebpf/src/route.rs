//! Routing decisions the data path takes itself: the source address a SNAT flow leaves with,
//! and sending a translated reply out of the interface its route names, past the stack's input
//! checks, where those checks would refuse it.
//!
//! SNAT uses the address of the interface the packet will leave by, as kube-proxy's MASQUERADE
//! does: on a node with a client-facing and a cluster NIC, the other nodes can only answer to
//! the cluster NIC's address.
//!
//! A local backend's reply to a NodePort flow is translated on the pod interface, so its source
//! becomes one of this node's addresses. Arriving on a pod interface with a local source, it is
//! a martian to the stack (`fib_validate_source`), which drops it uncounted. Accepting local
//! sources on pod interfaces (`accept_local`) would let every pod send as the node, so instead
//! the reply is routed here and redirected to its egress interface, as the stack would have
//! forwarded it: TTL decremented, neighbour resolved by the kernel (`bpf_redirect_neigh`).

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_NOT_FWDED, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_SKIP_NEIGH,
        BPF_FIB_LOOKUP_SRC, bpf_fib_lookup, bpf_redir_neigh,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect_neigh},
    programs::{TcContext, XdpContext},
};
use lb_common::{Counter, DropReason};

use crate::{
    Verdict,
    parse::{
        Frame as _, IPV4_CHECK_OFFSET, IPV4_DST_OFFSET, IPV4_SRC_OFFSET, IPV4_TTL_OFFSET,
        L4_DST_PORT_OFFSET, L4_SRC_PORT_OFFSET, L4Packet,
    },
};

const AF_INET: u8 = 2;
const ETH_HLEN: usize = 14;

/// A program context the kernel's route lookup takes.
pub trait Route {
    /// The interface the packet came in on.
    fn ingress_ifindex(&self) -> u32;

    /// The context pointer the helpers take (`xdp_md` or `__sk_buff`).
    fn raw_ctx(&self) -> *mut c_void;

    /// `bpf_fib_lookup` without the neighbour table (a redirect or the stack resolves the
    /// neighbour): one of `BPF_FIB_LKUP_RET_*`, or `u32::MAX` on bad input.
    #[inline(always)]
    fn lookup(&self, query: &mut bpf_fib_lookup, flags: u32) -> u32 {
        self.lookup_neigh(query, flags | BPF_FIB_LOOKUP_SKIP_NEIGH)
    }

    /// `bpf_fib_lookup` with the neighbour table (unless `flags` say otherwise), for a sender
    /// that writes the MACs itself.
    #[inline(always)]
    fn lookup_neigh(&self, query: &mut bpf_fib_lookup, flags: u32) -> u32 {
        // SAFETY: a valid context and a valid parameter block of the size given.
        let ret = unsafe {
            fib_lookup(
                self.raw_ctx(),
                query,
                size_of::<bpf_fib_lookup>() as i32,
                flags,
            )
        };
        u32::try_from(ret).unwrap_or(u32::MAX)
    }
}

impl Route for XdpContext {
    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        // SAFETY: the context pointer is valid for the whole run.
        unsafe { (*self.ctx).ingress_ifindex }
    }

    #[inline(always)]
    fn raw_ctx(&self) -> *mut c_void {
        self.ctx.cast()
    }
}

impl Route for TcContext {
    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        // SAFETY: the context's skb pointer is valid for the whole run.
        unsafe { (*self.skb.skb).ifindex }
    }

    #[inline(always)]
    fn raw_ctx(&self) -> *mut c_void {
        self.skb.skb.cast()
    }
}

/// The address a new flow to a remote backend is translated to: the one the kernel would pick as
/// source on the route to the backend (the route's `src`, else the egress interface's primary
/// address). `None` without a route, for the caller's fallback.
#[inline(always)]
pub fn snat_source<R: Route>(frame: &R, packet: &L4Packet, backend_addr_be: u32) -> Option<u32> {
    let t = &packet.tuple;
    let mut query = query(
        packet,
        frame.ingress_ifindex(),
        t.src_addr_be,
        backend_addr_be,
    );
    if frame.lookup(&mut query, BPF_FIB_LOOKUP_SRC) != BPF_FIB_LKUP_RET_SUCCESS {
        return None;
    }
    // SAFETY: an IPv4 lookup fills the IPv4 member.
    Some(unsafe { query.__bindgen_anon_3.ipv4_src }).filter(|&src| src != 0)
}

/// A reply `flow::reply` just translated on a pod interface: redirected out of its route's
/// interface if its new source is a local address, else left to the stack as before.
#[inline(always)]
pub fn pod_reply(ctx: &TcContext, packet: &L4Packet) -> Result<Verdict, DropReason> {
    let (src_be, dst_be) = addresses(ctx, packet)?;
    // Only what the stack would drop is taken off its path: its source is local when routing
    // to the source from this interface ends in a local route.
    let mut to_source = query(packet, ctx.ingress_ifindex(), dst_be, src_be);
    if ctx.lookup(&mut to_source, 0) != BPF_FIB_LKUP_RET_NOT_FWDED {
        return Ok(Verdict::Translated(Counter::ReplyTranslated));
    }
    redirect_reply(ctx, packet, false)
}

/// The packet's source and destination addresses as they are now (after any rewrite).
#[inline(always)]
fn addresses(ctx: &TcContext, packet: &L4Packet) -> Result<(u32, u32), DropReason> {
    let load = |offset| {
        ctx.read::<u32>(packet.at.l3 + offset)
            .ok_or(DropReason::RewriteFailed)
    };
    Ok((load(IPV4_SRC_OFFSET)?, load(IPV4_DST_OFFSET)?))
}

/// A translated reply the stack would drop (its source is a node address) sent out of the
/// interface its route names, as the stack would have forwarded it. From a pod interface the
/// route never leads back into it (`back_out` false); from a node interface it may.
#[inline(always)]
pub fn redirect_reply(
    ctx: &TcContext,
    packet: &L4Packet,
    back_out: bool,
) -> Result<Verdict, DropReason> {
    let at = packet.at;
    let (src_be, dst_be) = addresses(ctx, packet)?;
    let load_u16 = |offset| ctx.read::<u16>(offset).ok_or(DropReason::RewriteFailed);
    let ingress = ctx.ingress_ifindex();
    let mut to_client = query(packet, ingress, src_be, dst_be);
    to_client.sport = load_u16(at.l4 + L4_SRC_PORT_OFFSET)?;
    to_client.dport = load_u16(at.l4 + L4_DST_PORT_OFFSET)?;
    // `bpf_redirect_neigh` needs a plain Ethernet header in front of the IPv4 one; a pod
    // interface has nothing else. Without a route (or too big for its MTU: the skb variant checks
    // when `tot_len` is 0, GSO included) the stack could do nothing but drop it either.
    if at.l3 != ETH_HLEN
        || ctx.lookup(&mut to_client, 0) != BPF_FIB_LKUP_RET_SUCCESS
        || (to_client.ifindex == ingress && !back_out)
    {
        return Err(DropReason::ReplyUnroutable);
    }
    decrement_ttl(ctx, packet)?;
    let mut next_hop = bpf_redir_neigh {
        nh_family: u32::from(AF_INET),
        __bindgen_anon_1: aya_ebpf::bindings::bpf_redir_neigh__bindgen_ty_1 {
            // After the lookup: the gateway, or the destination itself when on-link.
            // SAFETY: an IPv4 lookup fills the IPv4 member.
            ipv4_nh: unsafe { to_client.__bindgen_anon_4.ipv4_dst },
        },
    };
    // SAFETY: a valid parameter block of the size given; flags must be 0.
    let action = unsafe {
        bpf_redirect_neigh(
            to_client.ifindex,
            &raw mut next_hop,
            size_of::<bpf_redir_neigh>() as i32,
            0,
        )
    };
    Ok(Verdict::Sent(Counter::ReplyTranslated, action as u32))
}

/// A route query for an IPv4 packet from `src_be` to `dst_be` that came in on `ingress`.
#[inline(always)]
pub fn query(packet: &L4Packet, ingress: u32, src_be: u32, dst_be: u32) -> bpf_fib_lookup {
    // SAFETY: all-zero is a valid value of this plain C struct (ports 0, tot_len 0: no MTU given).
    let mut query: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    query.family = AF_INET;
    query.l4_protocol = packet.tuple.protocol;
    query.ifindex = ingress;
    query.__bindgen_anon_3.ipv4_src = src_be;
    query.__bindgen_anon_4.ipv4_dst = dst_be;
    query
}

/// What forwarding does to the IPv4 header: TTL minus one, checksum updated. A packet whose
/// TTL runs out here is not forwarded.
#[inline(always)]
fn decrement_ttl(ctx: &TcContext, packet: &L4Packet) -> Result<(), DropReason> {
    let fail = |_| DropReason::RewriteFailed;
    let at = packet.at.l3 + IPV4_TTL_OFFSET;
    // TTL and protocol share one 16-bit word of the checksum.
    let [ttl, protocol] = ctx.read::<[u8; 2]>(at).ok_or(DropReason::RewriteFailed)?;
    if ttl <= 1 {
        return Err(DropReason::ReplyUnroutable);
    }
    let (old, new) = (
        u16::from_ne_bytes([ttl, protocol]),
        u16::from_ne_bytes([ttl - 1, protocol]),
    );
    ctx.l3_csum_replace(
        packet.at.l3 + IPV4_CHECK_OFFSET,
        u64::from(old),
        u64::from(new),
        2,
    )
    .map_err(fail)?;
    ctx.store(at, &(ttl - 1), 0).map_err(fail)
}
