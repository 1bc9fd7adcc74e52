//! The data path. A packet's journey, top to bottom:
//!
//! ```text
//! XDP ingress (lb_xdp_ingress), on the node's interfaces
//!   parse    Ethernet -> IPv4 -> TCP/UDP ports            (not ours: pass, counted)
//!   lookup   FRONTENDS[dst addr, dst port, proto]          (no frontend: pass, counted)
//!   track    CONNTRACK[flow, FORWARD] hit -> same backend  (every packet of a flow)
//!   select   miss -> hash(flow) over the service's ready backends, track both directions
//!   nat      DNAT to backend addr:port, incremental IPv4 + L4 checksum
//!   -> XDP_PASS: the kernel routes the translated packet to the backend
//!
//! TC egress (lb_tc_egress), on the same interfaces
//!   parse    the reply of a backend
//!   track    CONNTRACK[flow, REPLY] hit -> frontend addr:port the client used
//!   nat      SNAT back to the frontend with the kernel's checksum helpers
//! ```
//!
//! Every outcome increments a `Counter`; every drop also increments its `DropReason`.
#![no_std]
#![no_main]

mod lookup;
mod nat;
mod parse;
mod select;
mod stats;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use lb_common::{Counter, DropReason, FlowKey, direction};

/// What the program decided for a packet it did not drop.
enum Verdict {
    /// Not service traffic, or not a packet we translate: hand it to the stack as it came.
    Pass(Counter),
    /// Translated; hand it to the stack, which routes it on.
    Translated(Counter),
}

#[xdp]
pub fn lb_xdp_ingress(ctx: XdpContext) -> u32 {
    stats::count(Counter::XdpSeen);
    match try_xdp_ingress(&ctx) {
        Ok(Verdict::Pass(counter) | Verdict::Translated(counter)) => {
            stats::count(counter);
            xdp_action::XDP_PASS
        }
        Err(reason) => {
            stats::count_drop(Counter::XdpDrop, reason);
            xdp_action::XDP_DROP
        }
    }
}

#[inline(always)]
fn try_xdp_ingress(ctx: &XdpContext) -> Result<Verdict, DropReason> {
    let packet = match parse::xdp_ipv4_l4(ctx)? {
        Ok(packet) => packet,
        Err(not_ours) => return Ok(Verdict::Pass(not_ours)),
    };
    let Some(service) = lookup::frontend(&packet.tuple.frontend_key()) else {
        return Ok(Verdict::Pass(Counter::PassNotService));
    };

    let forward_key = packet.tuple.flow_key(direction::FORWARD);
    let (target, counter) = match lookup::flow(&forward_key) {
        Some(target) => (target, Counter::ForwardTracked),
        None => {
            let target = select::backend(&service, &packet.tuple)?;
            lookup::track_flow(&packet.tuple, &target)?;
            (target, Counter::ForwardNew)
        }
    };

    nat::xdp_rewrite_destination(ctx, &packet, &target)?;
    Ok(Verdict::Translated(counter))
}

#[classifier]
pub fn lb_tc_egress(ctx: TcContext) -> i32 {
    stats::count(Counter::TcSeen);
    match try_tc_egress(&ctx) {
        Ok(Verdict::Pass(counter) | Verdict::Translated(counter)) => {
            stats::count(counter);
            TC_ACT_OK as i32
        }
        Err(reason) => {
            stats::count_drop(Counter::TcDrop, reason);
            TC_ACT_SHOT as i32
        }
    }
}

#[inline(always)]
fn try_tc_egress(ctx: &TcContext) -> Result<Verdict, DropReason> {
    // Anything we cannot parse here is not a reply we created: the XDP side never translated it.
    let Some(reply) = parse::tc_ipv4_l4(ctx) else {
        return Ok(Verdict::Pass(Counter::TcPass));
    };
    let key: FlowKey = reply.tuple.flow_key(direction::REPLY);
    let Some(target) = lookup::flow(&key) else {
        return Ok(Verdict::Pass(Counter::TcPass));
    };
    nat::tc_rewrite_source(ctx, &reply, &target)?;
    Ok(Verdict::Translated(Counter::ReplyTranslated))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic, so this is never linked into a loaded program.
    loop {}
}
