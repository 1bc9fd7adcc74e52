//! ICMP errors about translated flows, rewritten so each end sees the addresses it used:
//! port unreachable from a backend reaches the client as coming from the frontend, and
//! "fragmentation needed" keeps path-MTU discovery working through the translation.

use lb_common::{Counter, DropReason, FlowEntry, direction, flow_flags};

use crate::{
    Verdict, lookup,
    nat::{Addr, End, Rewrite, set_icmp_outer_addr, set_icmp_quoted_end},
    parse::IcmpError,
};

/// An error arriving from the network (XDP).
///
/// About a packet we sent to a backend (the quote's reverse is a REPLY key): the quote's
/// destination becomes the frontend, and for a translated with SNAT flow its source and the error's
/// destination become the client. About a reply we translated (the quote's reverse is a
/// FORWARD key, the error was sent to the frontend): it goes to the backend instead, quoting
/// the packet as the backend sent it.
#[inline(always)]
pub fn from_network<R: Rewrite>(frame: &R, error: &IcmpError) -> Result<Verdict, DropReason> {
    if let Some(flow) = lookup::flow(&error.inner.reversed_flow_key(direction::REPLY)) {
        to_client(frame, error, &flow)?;
        if flow.flags & flow_flags::SNAT != 0 {
            set_icmp_quoted_end(frame, error, End::Source, Addr::peer(&flow))?;
            set_icmp_outer_addr(frame, error, End::Destination, flow.peer_addr_be)?;
        }
        return Ok(Verdict::Translated(Counter::IcmpTranslated));
    }
    if let Some(flow) = lookup::flow(&error.inner.reversed_flow_key(direction::FORWARD)) {
        set_icmp_quoted_end(frame, error, End::Source, Addr::nat(&flow))?;
        if flow.flags & flow_flags::SNAT != 0 {
            set_icmp_quoted_end(frame, error, End::Destination, Addr::peer(&flow))?;
        }
        set_icmp_outer_addr(frame, error, End::Destination, flow.nat_addr_be)?;
        return Ok(Verdict::Translated(Counter::IcmpTranslated));
    }
    Ok(Verdict::Pass(Counter::PassNotService))
}

/// An error leaving toward a client (TC): sent by a local backend, or by this node about a
/// packet it forwards to a backend (for example "fragmentation needed" on the way to a pod).
/// The quote's destination becomes the frontend the client used.
#[inline(always)]
pub fn leaving<R: Rewrite>(frame: &R, error: &IcmpError) -> Result<Verdict, DropReason> {
    if let Some(flow) = lookup::flow(&error.inner.reversed_flow_key(direction::REPLY)) {
        // translated with SNAT flows' errors come back from the network, where XDP handles them.
        if flow.flags & flow_flags::SNAT == 0 {
            to_client(frame, error, &flow)?;
            return Ok(Verdict::Translated(Counter::IcmpTranslated));
        }
    }
    // This node's own error about a packet it had not translated with SNAT yet: the quote is still the
    // client's packet after DNAT.
    if let Some(flow) = lookup::flow(&error.inner.flow_key(direction::SNAT)) {
        set_icmp_quoted_end(frame, error, End::Destination, Addr::peer(&flow))?;
        return Ok(Verdict::Translated(Counter::IcmpTranslated));
    }
    Ok(Verdict::Pass(Counter::TcPass))
}

/// The quote's destination (the backend) becomes the frontend; if the backend itself sent the
/// error, its source does too.
#[inline(always)]
fn to_client<R: Rewrite>(frame: &R, error: &IcmpError, flow: &FlowEntry) -> Result<(), DropReason> {
    set_icmp_quoted_end(frame, error, End::Destination, Addr::nat(flow))?;
    if error.outer.src_addr_be == error.inner.dst_addr_be {
        set_icmp_outer_addr(frame, error, End::Source, flow.nat_addr_be)?;
    }
    Ok(())
}
