//! The data path. A packet's journey, top to bottom:
//!
//! ```text
//! XDP ingress (lb_xdp_ingress), on the node's interfaces: packets from the network
//!   parse    Ethernet (0-2 VLAN tags) -> IPv4 -> TCP/UDP ports, or an ICMP error
//!   icmp     error about a translated flow -> rewritten for the address each end used
//!   lookup   FRONTENDS[dst addr, dst port, proto] -> forward:
//!     source   loadBalancerSourceRanges              (outside: drop, counted)
//!     track    CONNTRACK[flow, FORWARD] hit -> same backend (every packet of a flow)
//!     select   miss -> affinity, else MAGLEV[table][hash(flow) % M] -> backend
//!     snat     backend on another node -> claim a SNAT port, track REPLY + SNAT + FORWARD
//!     nat      DNAT to the backend, incremental IPv4 + L4 checksums
//!   reply    CONNTRACK[flow, REPLY] hit (a remote backend's reply) -> source = frontend,
//!            and for a translated with SNAT flow destination = client
//!   egress   planned before the rewrite (`egress::plan`): bpf_fib_lookup of the translated
//!            packet; to a FORWARD_TARGETS interface -> SNAT here too, MACs, TTL-1, XDP_TX or
//!            XDP_REDIRECT; else (no neighbour, MTU, local, partial checksum, not a target,
//!            `forwarding: stack`) XDP_PASS with DNAT only, counted in EGRESS by reason; a
//!            reply that falls back is marked in its XDP metadata for TC ingress
//!
//! TC ingress (lb_tc_ingress), on the same interfaces: replies XDP marked
//!   route    bpf_redirect_neigh to the route's interface (the stack would drop them: their
//!            source is a node address); everything else goes on untouched
//!
//! TC egress (lb_tc_egress), on the same interfaces: packets leaving the node
//!   reply    CONNTRACK[flow, REPLY] hit (a local backend's reply) -> source = frontend
//!   snat     CONNTRACK[flow, SNAT] hit (a flow to a remote backend) -> source = SNAT port
//!   icmp     error from a local backend or this node -> quote rewritten for the client
//!
//! TC ingress (lb_tc_pod_ingress), on pod interfaces (--pod-iface): packets pods send
//!   lookup   FRONTENDS, or the frontend's pod entry (a Local Service's external address:
//!            cluster-wide endpoints) -> forward as above, without SNAT (pods are routable)
//!   reply    a local backend's reply -> source = frontend
//!   route    new source is a node address (NodePort) -> bpf_redirect_neigh to the route's
//!            interface, as the stack drops a local source arriving on a pod as a martian
//!   icmp     as on egress
//! ```
//!
//! Every outcome increments a `Counter`; every drop also increments its `DropReason`. Every
//! packet translated with its flow's backend known (forward, new or tracked, and reply) adds to
//! that backend's packets and bytes (`stats::count_backend`), once per packet: TC's SNAT of a
//! packet XDP already translated is not counted again.
#![no_std]
#![no_main]
#![expect(
    clippy::needless_pass_by_value,
    reason = "the program macros hand each entry point its context by value"
)]
#![expect(
    clippy::inline_always,
    reason = "each program must be one function: the verifier follows no calls into BPF-to-BPF \
              functions we did not mean to make"
)]

#[cfg(feature = "bench")]
mod bench;
mod egress;
mod flow;
mod icmp;
mod lookup;
mod nat;
mod parse;
mod route;
mod select;
mod stats;
mod track;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use lb_common::{Counter, DropReason};
use parse::Parsed;

use crate::flow::Origin;

/// What the program decided for a packet it did not drop.
pub enum Verdict {
    /// Not service traffic, or not a packet we translate: hand it to the stack as it came.
    Pass(Counter),
    /// Translated; hand it to the stack, which routes it on.
    Translated(Counter),
    /// Translated and sent on by the program: the action it returns (`XDP_TX`,
    /// `XDP_REDIRECT`, `TC_ACT_REDIRECT`, or `XDP_PASS` for a fallback).
    Sent(Counter, u32),
}

impl Verdict {
    #[inline(always)]
    fn counter(&self) -> Counter {
        match self {
            Verdict::Pass(counter) | Verdict::Translated(counter) | Verdict::Sent(counter, _) => {
                *counter
            }
        }
    }
}

#[xdp]
pub fn lb_xdp_ingress(ctx: XdpContext) -> u32 {
    // Benchmark builds only (never the production object): see `bench.rs`.
    #[cfg(feature = "bench")]
    bench::new_flow_prologue(&ctx);
    stats::count(Counter::XdpSeen);
    match try_xdp_ingress(&ctx) {
        Ok(verdict) => {
            stats::count(verdict.counter());
            match verdict {
                Verdict::Sent(_, action) => action,
                Verdict::Pass(_) | Verdict::Translated(_) => xdp_action::XDP_PASS,
            }
        }
        Err(reason) => {
            stats::count_drop(Counter::XdpDrop, reason);
            xdp_action::XDP_DROP
        }
    }
}

#[inline(always)]
fn try_xdp_ingress(ctx: &XdpContext) -> Result<Verdict, DropReason> {
    let packet = match parse::packet(ctx)? {
        Parsed::L4(packet) => packet,
        Parsed::IcmpError(error) => return icmp::from_network(ctx, &error),
        Parsed::Pass(counter) => return Ok(Verdict::Pass(counter)),
    };
    if let Some(service) = lookup::frontend(&packet.tuple.frontend_key()) {
        return flow::forward(ctx, &packet, &service, Origin::Network);
    }
    flow::reply(ctx, &packet).unwrap_or(Ok(Verdict::Pass(Counter::PassNotService)))
}

#[classifier]
pub fn lb_tc_egress(ctx: TcContext) -> i32 {
    stats::count(Counter::TcSeen);
    tc_verdict(try_tc_egress(&ctx))
}

#[inline(always)]
fn try_tc_egress(ctx: &TcContext) -> Result<Verdict, DropReason> {
    let packet = match parse::packet(ctx)? {
        Parsed::L4(packet) => packet,
        Parsed::IcmpError(error) => return icmp::leaving(ctx, &error),
        Parsed::Pass(_) => return Ok(Verdict::Pass(Counter::TcPass)),
    };
    flow::reply(ctx, &packet)
        .or_else(|| flow::snat(ctx, &packet))
        .unwrap_or(Ok(Verdict::Pass(Counter::TcPass)))
}

#[classifier]
pub fn lb_tc_ingress(ctx: TcContext) -> i32 {
    // Everything but what XDP handed over goes on untouched, uncounted: XDP counted it.
    if !egress::handed_off(&ctx) {
        return TC_ACT_OK;
    }
    let sent = match parse::packet(&ctx) {
        Ok(Parsed::L4(packet)) => route::redirect_reply(&ctx, &packet, true),
        Ok(_) => Err(DropReason::ReplyUnroutable),
        Err(reason) => Err(reason),
    };
    match sent {
        #[expect(clippy::cast_possible_wrap, reason = "TC actions are small")]
        Ok(Verdict::Sent(_, action)) => action as i32,
        Ok(_) => TC_ACT_OK,
        Err(reason) => {
            stats::count_drop(Counter::TcDrop, reason);
            TC_ACT_SHOT
        }
    }
}

#[classifier]
pub fn lb_tc_pod_ingress(ctx: TcContext) -> i32 {
    stats::count(Counter::PodSeen);
    tc_verdict(try_tc_pod_ingress(&ctx))
}

#[inline(always)]
fn try_tc_pod_ingress(ctx: &TcContext) -> Result<Verdict, DropReason> {
    let packet = match parse::packet(ctx)? {
        Parsed::L4(packet) => packet,
        Parsed::IcmpError(error) => return icmp::leaving(ctx, &error),
        Parsed::Pass(_) => return Ok(Verdict::Pass(Counter::TcPass)),
    };
    if let Some(service) = lookup::frontend_for_pod(&packet.tuple.frontend_key()) {
        return flow::forward(ctx, &packet, &service, Origin::Pod);
    }
    match flow::reply(ctx, &packet) {
        Some(Ok(_)) => route::pod_reply(ctx, &packet),
        Some(Err(reason)) => Err(reason),
        None => Ok(Verdict::Pass(Counter::TcPass)),
    }
}

#[inline(always)]
fn tc_verdict(result: Result<Verdict, DropReason>) -> i32 {
    match result {
        Ok(verdict) => {
            stats::count(verdict.counter());
            match verdict {
                #[expect(clippy::cast_possible_wrap, reason = "TC actions are small")]
                Verdict::Sent(_, action) => action as i32,
                Verdict::Pass(_) | Verdict::Translated(_) => TC_ACT_OK,
            }
        }
        Err(reason) => {
            stats::count_drop(Counter::TcDrop, reason);
            TC_ACT_SHOT
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic, so this is never linked into a loaded program.
    loop {}
}
