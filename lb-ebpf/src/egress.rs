//! How a packet XDP translated leaves: routed here and sent straight out of its egress
//! interface (`XDP_TX`, `XDP_REDIRECT`), so the kernel stack never sees it, or handed to the
//! stack when it must decide (a fallback, counted by its reason in `EGRESS`).
//!
//! The route is looked up for the packet as it will be after translation, before anything is
//! rewritten: a packet that falls back goes to the stack as it does with `forwarding: stack`,
//! DNAT only, and TC egress applies SNAT after the stack routed it. A reply that falls back is
//! translated all the same, and is handed to `lb_tc_ingress` through XDP metadata: with a node
//! address as its new source, the stack would drop it as a martian, while TC can send it with
//! `bpf_redirect_neigh`, which resolves the neighbour XDP could not.

use aya_ebpf::{
    Global,
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        bpf_fib_lookup, xdp_action,
    },
    helpers::bpf_xdp_adjust_meta,
    macros::map,
    maps::DevMapHash,
    programs::{TcContext, XdpContext},
};
use lb_common::{
    Counter, DropReason, Egress, REPLY_HANDOFF_MAGIC,
    checksum::{self, Delta},
    forwarding,
};

use crate::{
    Verdict,
    nat::Rewrite,
    parse::{Frame, IPV4_CHECK_OFFSET, IPV4_TTL_OFFSET, L4Packet},
    route::{self, Route},
    stats,
};

/// How XDP sends what it translated: one of `forwarding`, set by the loader.
#[unsafe(no_mangle)]
static FORWARDING: Global<u32> = Global::new(forwarding::XDP);

/// The interfaces XDP may send to, keyed by ifindex: the ones the agent serves, which take XDP
/// frames. `XDP_TX` needs its interface here too.
#[map(name = "FORWARD_TARGETS")]
static FORWARD_TARGETS: DevMapHash =
    DevMapHash::with_max_entries(lb_common::MAX_FORWARD_TARGETS, 0);

const ETH_HLEN: usize = 14;

/// Where a translated packet goes.
#[derive(Clone, Copy)]
pub enum Plan {
    /// Out of `ifindex` to `dmac`, from `smac`.
    Send {
        ifindex: u32,
        smac: [u8; 6],
        dmac: [u8; 6],
    },
    /// To the stack, for this reason.
    Stack(Egress),
}

impl Plan {
    #[inline(always)]
    pub fn sends(&self) -> bool {
        matches!(self, Plan::Send { .. })
    }
}

/// The plan for `packet` once its addresses are `src_be` -> `dst_be`.
#[inline(always)]
fn plan(ctx: &XdpContext, packet: &L4Packet, src_be: u32, dst_be: u32) -> Plan {
    if FORWARDING.load() != forwarding::XDP {
        return Plan::Stack(Egress::Stack);
    }
    // Tagged frames would need their tags rewritten for the egress interface.
    if packet.at.l3 != ETH_HLEN {
        return Plan::Stack(Egress::Unusual);
    }
    // A veth hands XDP the frames of a local socket with a partial L4 checksum (offloaded:
    // the field holds the pseudo-header sum, the stack completes it on the way out). Sent as
    // is, the receiver would drop them; only the stack can finish them. A complete checksum
    // that happens to equal the pseudo-header sum (1 in 65,536) just takes the stack's path.
    if partial_checksum(ctx, packet) {
        return Plan::Stack(Egress::PartialChecksum);
    }
    let ingress = Route::ingress_ifindex(ctx);
    let mut query: bpf_fib_lookup = route::query(packet, ingress, src_be, dst_be);
    // A nonzero `tot_len` makes the lookup check it against the egress MTU.
    query.__bindgen_anon_1.tot_len = packet.l3_len;
    match ctx.lookup_neigh(&mut query, 0) {
        BPF_FIB_LKUP_RET_SUCCESS => {}
        BPF_FIB_LKUP_RET_NO_NEIGH => return Plan::Stack(Egress::NoNeighbour),
        BPF_FIB_LKUP_RET_FRAG_NEEDED => return Plan::Stack(Egress::FragNeeded),
        _ => return Plan::Stack(Egress::NotForwarded),
    }
    if FORWARD_TARGETS.get_ifindex(query.ifindex).is_none() {
        return Plan::Stack(Egress::NotATarget);
    }
    // The stack answers a spent TTL with "time exceeded".
    if !ctx
        .read::<u8>(packet.at.l3 + IPV4_TTL_OFFSET)
        .is_some_and(|ttl| ttl > 1)
    {
        return Plan::Stack(Egress::Unusual);
    }
    Plan::Send {
        ifindex: query.ifindex,
        smac: query.smac,
        dmac: query.dmac,
    }
}

/// A program that can send what it translated itself. TC hands everything to the stack (and
/// the pod interface's replies to `route::pod_reply`).
pub trait Sender {
    /// Where `packet` goes once its addresses are `src_be` -> `dst_be`, decided before any
    /// rewrite.
    fn plan(&self, packet: &L4Packet, src_be: u32, dst_be: u32) -> Plan;
    /// A translated packet toward a backend, sent as planned.
    fn send(&self, packet: &L4Packet, plan: Plan, counter: Counter) -> Result<Verdict, DropReason>;
    /// A translated reply, sent as planned.
    fn send_reply(
        &self,
        packet: &L4Packet,
        plan: Plan,
        counter: Counter,
    ) -> Result<Verdict, DropReason>;
}

impl Sender for TcContext {
    #[inline(always)]
    fn plan(&self, _: &L4Packet, _: u32, _: u32) -> Plan {
        Plan::Stack(Egress::Stack)
    }

    #[inline(always)]
    fn send(&self, _: &L4Packet, _: Plan, counter: Counter) -> Result<Verdict, DropReason> {
        Ok(Verdict::Translated(counter))
    }

    #[inline(always)]
    fn send_reply(&self, _: &L4Packet, _: Plan, counter: Counter) -> Result<Verdict, DropReason> {
        Ok(Verdict::Translated(counter))
    }
}

impl Sender for XdpContext {
    #[inline(always)]
    fn plan(&self, packet: &L4Packet, src_be: u32, dst_be: u32) -> Plan {
        plan(self, packet, src_be, dst_be)
    }

    #[inline(always)]
    fn send(&self, packet: &L4Packet, plan: Plan, counter: Counter) -> Result<Verdict, DropReason> {
        send(self, packet, plan).map(|action| Verdict::Sent(counter, action))
    }

    #[inline(always)]
    fn send_reply(
        &self,
        packet: &L4Packet,
        plan: Plan,
        counter: Counter,
    ) -> Result<Verdict, DropReason> {
        send_reply(self, packet, plan).map(|action| Verdict::Sent(counter, action))
    }
}

/// Whether XDP handed this reply to TC (`hand_off`).
#[inline(always)]
pub fn handed_off(ctx: &TcContext) -> bool {
    // SAFETY: the context's skb pointer is valid for the whole run; read volatile for the
    // reason `parse::ptr_at` gives.
    let (meta, data) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*ctx.skb.skb).data_meta) as usize,
            core::ptr::read_volatile(&raw const (*ctx.skb.skb).data) as usize,
        )
    };
    if meta + size_of::<u32>() > data {
        return false;
    }
    // SAFETY: the 4 bytes lie between data_meta and data, checked above.
    unsafe { (meta as *const u32).read_unaligned() == REPLY_HANDOFF_MAGIC }
}

/// Whether the L4 checksum field holds just the pseudo-header sum: a checksum left for the
/// stack to finish (`CHECKSUM_PARTIAL`).
#[inline(always)]
fn partial_checksum(ctx: &XdpContext, packet: &L4Packet) -> bool {
    let t = &packet.tuple;
    let Some(check) = ctx.read::<u16>(packet.l4_check_offset()) else {
        return false;
    };
    let l4_len = packet
        .l3_len
        .wrapping_sub(u16::try_from(packet.at.l4 - packet.at.l3).unwrap_or(0));
    // Words as they lie in the packet, like the checksum itself (see `lb_common::checksum`).
    let words = [
        t.src_addr_be & 0xffff,
        t.src_addr_be >> 16,
        t.dst_addr_be & 0xffff,
        t.dst_addr_be >> 16,
        u32::from(u16::from_ne_bytes([0, t.protocol])),
        u32::from(l4_len.to_be()),
    ];
    check == checksum::fold(words.iter().sum())
}

/// Carries out `plan` on a packet already translated: the MACs and TTL of a forwarded packet
/// and the action that sends it, or `XDP_PASS`. Counts the outcome.
#[inline(always)]
fn send(ctx: &XdpContext, packet: &L4Packet, plan: Plan) -> Result<u32, DropReason> {
    let Plan::Send {
        ifindex,
        smac,
        dmac,
    } = plan
    else {
        if let Plan::Stack(reason) = plan {
            stats::count_egress(reason);
        }
        return Ok(xdp_action::XDP_PASS);
    };
    decrement_ttl(ctx, packet)?;
    ctx.write(0, dmac)?;
    ctx.write(6, smac)?;
    if ifindex == Route::ingress_ifindex(ctx) {
        stats::count_egress(Egress::Tx);
        return Ok(xdp_action::XDP_TX);
    }
    stats::count_egress(Egress::Redirect);
    // The target was checked in `plan`; should it go meanwhile, the frame goes to the stack.
    Ok(FORWARD_TARGETS
        .redirect(ifindex, u64::from(xdp_action::XDP_PASS))
        .unwrap_or(xdp_action::XDP_PASS))
}

/// A translated reply that is not sent from XDP: handed to `lb_tc_ingress` unless the stack
/// can take it itself (local delivery, or `forwarding: stack`, where the agent sets
/// `accept_local`).
#[inline(always)]
fn send_reply(ctx: &XdpContext, packet: &L4Packet, plan: Plan) -> Result<u32, DropReason> {
    match plan {
        Plan::Send { .. } | Plan::Stack(Egress::Stack | Egress::NotForwarded | Egress::Unusual) => {
            send(ctx, packet, plan)
        }
        // Without room for metadata the stack gets it as it is.
        Plan::Stack(_) => match hand_off(ctx) {
            Ok(()) => {
                stats::count_egress(Egress::ReplyHandedOff);
                Ok(xdp_action::XDP_PASS)
            }
            Err(_) => send(ctx, packet, Plan::Stack(Egress::Unusual)),
        },
    }
}

/// Puts `REPLY_HANDOFF_MAGIC` in the frame's metadata. Packet pointers are invalid after it.
#[inline(always)]
fn hand_off(ctx: &XdpContext) -> Result<(), DropReason> {
    let size = size_of::<u32>() as i32;
    // SAFETY: a valid context; growing the metadata area by 4 bytes.
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -size) } != 0 {
        return Err(DropReason::ReplyUnroutable);
    }
    let (meta, data) = (ctx.metadata(), ctx.data());
    if meta + size_of::<u32>() > data {
        return Err(DropReason::ReplyUnroutable);
    }
    // SAFETY: the 4 bytes lie between data_meta and data, checked above.
    unsafe { (meta as *mut u32).write_unaligned(REPLY_HANDOFF_MAGIC) };
    Ok(())
}

/// TTL minus one and its checksum update, as a router does.
#[inline(always)]
fn decrement_ttl(ctx: &XdpContext, packet: &L4Packet) -> Result<(), DropReason> {
    let at = packet.at.l3 + IPV4_TTL_OFFSET;
    // TTL and protocol share one 16-bit word of the checksum.
    let [ttl, protocol] = ctx.read::<[u8; 2]>(at).ok_or(DropReason::RewriteFailed)?;
    let check = ctx
        .read::<u16>(packet.at.l3 + IPV4_CHECK_OFFSET)
        .ok_or(DropReason::RewriteFailed)?;
    let new_check = Delta::new()
        .replace_u16(
            u16::from_ne_bytes([ttl, protocol]),
            u16::from_ne_bytes([ttl.wrapping_sub(1), protocol]),
        )
        .apply(check);
    ctx.write(at, ttl.wrapping_sub(1))?;
    ctx.write(packet.at.l3 + IPV4_CHECK_OFFSET, new_check)
}
