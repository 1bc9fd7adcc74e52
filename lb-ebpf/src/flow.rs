//! What happens to a TCP or UDP packet once it is parsed: to a frontend (forward), from a
//! backend (reply), or leaving toward a remote backend (SNAT).

use lb_common::{
    Counter, DropReason, FlowEntry, FlowKey, Service, backend_flags, direction, flow_flags,
};

use crate::{
    Verdict,
    egress::Sender,
    lookup,
    nat::{Addr, End, Rewrite},
    parse::L4Packet,
    route::{self, Route},
    select,
    stats::{self, Way},
    track,
};

/// Where a packet to a frontend came from.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// From the network (XDP): replies from a backend on another node would go straight to the
    /// client, so flows to remote backends are translated with SNAT to this node.
    Network,
    /// From a pod on this node (TC on its interface): pod addresses are routable, so replies
    /// come back through this node without SNAT.
    Pod,
}

/// A packet to a frontend: the tracked flow's backend, or a new one; DNAT to it. XDP also
/// applies the flow's SNAT when it sends the packet out itself; otherwise TC egress does, once
/// the stack routed it.
#[inline(always)]
pub fn forward<R: Rewrite + Route + Sender>(
    frame: &R,
    packet: &L4Packet,
    service: &Service,
    origin: Origin,
) -> Result<Verdict, DropReason> {
    select::check_source(service, &packet.tuple)?;
    let now = track::now();
    let forward_key = packet.tuple.flow_key(direction::FORWARD);
    let (entry, counter) = if let Some(entry) = lookup::flow_mut(&forward_key) {
        track::refresh(entry, packet, now);
        // SAFETY: a valid map value pointer; copied out.
        (unsafe { *entry }, Counter::ForwardTracked)
    } else {
        let settings = lookup::settings().ok_or(DropReason::BackendMissing)?;
        let (backend_id, backend) = select::backend(service, &packet.tuple, &settings, now)?;
        let flow = track::NewFlow {
            packet,
            service_id: service.service_id,
            backend_id,
            backend: &backend,
        };
        let remote = backend.flags & backend_flags::LOCAL == 0;
        let entry = if origin == Origin::Network && remote && settings.snat_addr_be != 0 {
            let snat_addr_be =
                route::snat_source(frame, packet, backend.addr_be).unwrap_or(settings.snat_addr_be);
            let entry = track::track_snat(&flow, &settings, snat_addr_be, now)?;
            stats::count(Counter::SnatNew);
            entry
        } else {
            track::track(&flow, now)?
        };
        (entry, Counter::ForwardNew)
    };
    let backend = Addr::nat(&entry);
    let snat = (entry.flags & flow_flags::SNAT != 0).then(|| Addr::peer(&entry));
    let source_be = snat.map_or(packet.tuple.src_addr_be, |snat| snat.addr_be);
    let plan = frame.plan(packet, source_be, backend.addr_be);
    frame.set_l4_end(packet, End::Destination, backend)?;
    if let Some(snat) = snat
        && plan.sends()
    {
        frame.set_l4_end(packet, End::Source, snat)?;
        stats::count(Counter::SnatTranslated);
    }
    stats::count_backend(entry.backend_id, Way::Forward, packet.l3_len);
    frame.send(packet, plan, counter)
}

/// A backend's reply to a tracked flow: the source becomes the frontend the client used, and
/// for a translated with SNAT flow the destination becomes the client again. `None` if it is no reply.
#[inline(always)]
pub fn reply<R: Rewrite + Sender>(
    frame: &R,
    packet: &L4Packet,
) -> Option<Result<Verdict, DropReason>> {
    let entry = lookup::flow_mut(&packet.tuple.flow_key(direction::REPLY))?;
    track::refresh(entry, packet, track::now());
    // SAFETY: a valid map value pointer; copied out.
    let entry: FlowEntry = unsafe { *entry };
    let frontend = Addr::nat(&entry);
    let client = (entry.flags & flow_flags::SNAT != 0).then(|| Addr::peer(&entry));
    let client_be = client.map_or(packet.tuple.dst_addr_be, |client| client.addr_be);
    let plan = frame.plan(packet, frontend.addr_be, client_be);
    let translated = frame
        .set_l4_end(packet, End::Source, frontend)
        .and_then(|()| match client {
            Some(client) => frame.set_l4_end(packet, End::Destination, client),
            None => Ok(()),
        });
    Some(translated.and_then(|()| {
        stats::count_backend(entry.backend_id, Way::Reply, packet.l3_len);
        frame.send_reply(packet, plan, Counter::ReplyTranslated)
    }))
}

/// A packet of a translated with SNAT flow leaving for its remote backend: the source becomes this node's
/// SNAT address and port. `None` if it is not one.
///
/// Not counted in the backend's statistics: XDP counted this packet already when it translated
/// its destination on the way in.
#[inline(always)]
pub fn snat<R: Rewrite>(frame: &R, packet: &L4Packet) -> Option<Result<Verdict, DropReason>> {
    let key: FlowKey = packet.tuple.flow_key(direction::SNAT);
    let entry = lookup::flow_mut(&key)?;
    track::refresh(entry, packet, track::now());
    // SAFETY: a valid map value pointer; copied out.
    let entry = unsafe { *entry };
    let source = Addr::nat(&entry);
    Some(
        frame
            .set_l4_end(packet, End::Source, source)
            .map(|()| Verdict::Translated(Counter::SnatTranslated)),
    )
}
