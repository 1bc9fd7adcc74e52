//! Connection tracking: the entries of a new flow (with its SNAT port), and each packet's
//! refresh of its entry's state and idle timeout.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{
    Backend, DropReason, FlowEntry, FlowKey, IPPROTO_TCP, Settings, direction, flow_flags,
    tcp_state, timeouts,
};

use crate::{
    lookup,
    parse::{L4Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, Tuple},
};

/// SNAT ports tried for one new flow before giving up. Probing starts at a hash of the flow,
/// so with the range half full a flow still finds a port with probability 1 - 2^-16.
const SNAT_PORT_TRIES: u32 = 16;
/// Mixed into the flow hash for the SNAT port, so it is independent of the backend choice.
const SNAT_HASH_SALT: u32 = 0x9e37_79b9;

/// `CLOCK_MONOTONIC` now, the clock of every `expires_ns`.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: a helper without arguments or side effects.
    unsafe { bpf_ktime_get_ns() }
}

/// An entry's state and idle timeout after one more packet in its direction.
///
/// TCP: only SYNs so far -> `SYN`; any FIN or RST -> `CLOSING`, which only a new SYN (the
/// client reusing the tuple) leaves; anything else -> `OPEN`. UDP is always `OPEN`.
#[inline(always)]
fn next_state(protocol: u8, state: u8, tcp_flags: u8) -> (u8, u64) {
    if protocol != IPPROTO_TCP {
        return (tcp_state::OPEN, timeouts::UDP);
    }
    let state = if tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        tcp_state::CLOSING
    } else if tcp_flags & TCP_SYN != 0 {
        if state == tcp_state::CLOSING && tcp_flags & TCP_ACK == 0 {
            tcp_state::SYN
        } else {
            state
        }
    } else if state == tcp_state::CLOSING {
        state
    } else {
        tcp_state::OPEN
    };
    let timeout = match state {
        tcp_state::SYN => timeouts::TCP_SYN,
        tcp_state::CLOSING => timeouts::TCP_CLOSING,
        _ => timeouts::TCP_ESTABLISHED,
    };
    (state, timeout)
}

/// Updates a tracked entry for one more packet in its direction. The expiry is only written
/// when the state changes or it moves by more than the refresh granularity, so a busy flow does
/// not write its entry on every packet.
#[inline(always)]
pub fn refresh(entry: *mut FlowEntry, packet: &L4Packet, now: u64) {
    // SAFETY: `entry` comes from a successful map lookup and stays valid while this program
    // runs; concurrent writers on other CPUs write the same kind of value (a benign race).
    let entry = unsafe { &mut *entry };
    let (state, timeout) = next_state(packet.tuple.protocol, entry.tcp_state, packet.tcp_flags);
    let expires = now.saturating_add(timeout);
    if state != entry.tcp_state
        || expires
            > entry
                .expires_ns
                .saturating_add(timeouts::REFRESH_GRANULARITY)
    {
        entry.tcp_state = state;
        entry.expires_ns = expires;
    }
}

/// The flow a new packet starts: who it came from, which frontend, which backend.
pub struct NewFlow<'a> {
    pub packet: &'a L4Packet,
    pub service_id: u32,
    pub backend_id: u32,
    pub backend: &'a Backend,
}

impl NewFlow<'_> {
    #[inline(always)]
    fn entry(&self, nat_addr_be: u32, nat_port_be: u16, state: (u8, u64), now: u64) -> FlowEntry {
        FlowEntry {
            nat_addr_be,
            nat_port_be,
            service_id: self.service_id,
            backend_id: self.backend_id,
            tcp_state: state.0,
            expires_ns: now.saturating_add(state.1),
            ..FlowEntry::default()
        }
    }
}

/// Tracks a flow whose replies come back through this node unchanged (a local backend, or a
/// pod client): a REPLY entry, then the FORWARD one, so that by the time the first packet
/// reaches the backend its answer can already be translated back. Returns the FORWARD entry.
#[inline(always)]
pub fn track(flow: &NewFlow, now: u64) -> Result<FlowEntry, DropReason> {
    let t = &flow.packet.tuple;
    let (b, protocol) = (flow.backend, t.protocol);
    let reply_key = key(b.addr_be, b.port_be, t.src_addr_be, t.src_port_be, protocol);
    let reply = flow.entry(t.dst_addr_be, t.dst_port_be, opening(protocol), now);
    let forward_state = next_state(protocol, tcp_state::SYN, flow.packet.tcp_flags);
    let forward = flow.entry(b.addr_be, b.port_be, forward_state, now);
    lookup::insert_flow(&reply_key, &reply).map_err(|()| DropReason::ConntrackInsertFailed)?;
    lookup::insert_flow(&t.flow_key(direction::FORWARD), &forward)
        .map_err(|()| DropReason::ConntrackInsertFailed)?;
    Ok(forward)
}

/// Tracks a flow to a backend on another node, translated with SNAT to `snat_addr` (an address
/// of this node) so its replies come back here: claims a free SNAT port (its REPLY key), then the
/// SNAT entry TC egress applies, then the FORWARD entry. Returns the FORWARD entry.
///
/// A port is free when no REPLY entry uses it toward this backend, or the one that does has
/// expired; ports are per backend address and port, so flows to different backends (also of
/// different Services) never collide.
#[inline(always)]
pub fn track_snat(
    flow: &NewFlow,
    settings: &Settings,
    snat_addr: u32,
    now: u64,
) -> Result<FlowEntry, DropReason> {
    let t = &flow.packet.tuple;
    let (b, protocol) = (flow.backend, t.protocol);
    let first = u32::from(settings.snat_port_min);
    let range = u32::from(settings.snat_port_max)
        .checked_sub(first)
        .ok_or(DropReason::SnatPortsExhausted)?
        + 1;
    let start = t.hash(SNAT_HASH_SALT);

    let mut reply = flow.entry(t.dst_addr_be, t.dst_port_be, opening(protocol), now);
    reply.flags = flow_flags::SNAT;
    reply.peer_addr_be = t.src_addr_be;
    reply.peer_port_be = t.src_port_be;
    let mut claimed = None;
    for attempt in 0..SNAT_PORT_TRIES {
        let offset = start.wrapping_add(attempt).checked_rem(range).unwrap_or(0);
        // `first + offset <= snat_port_max`, so it always fits.
        let port_be = u16::try_from(first + offset).unwrap_or(0).to_be();
        let reply_key = key(b.addr_be, b.port_be, snat_addr, port_be, protocol);
        // Look before inserting: an LRU insert takes a free node first (evicting the oldest
        // entry when the table is full) and only then finds the key in use, so trying a port in
        // use would cost some other flow its entry. An expired one is taken over in place.
        match lookup::flow_mut(&reply_key) {
            None => {
                // `false`: another CPU took it meanwhile; try the next port.
                if lookup::claim_flow(&reply_key, &reply) {
                    claimed = Some(port_be);
                    break;
                }
            }
            // SAFETY: a valid map value pointer; a concurrent reader of an expired flow may see
            // a mix of old and new (the benign race `refresh` has).
            Some(existing) if unsafe { (*existing).expires_ns } < now => {
                // SAFETY: as above; the whole entry is replaced.
                unsafe { *existing = reply };
                claimed = Some(port_be);
                break;
            }
            Some(_) => {}
        }
    }
    let snat_port_be = claimed.ok_or(DropReason::SnatPortsExhausted)?;

    let mut snat = flow.entry(snat_addr, snat_port_be, opening(protocol), now);
    snat.peer_addr_be = t.dst_addr_be;
    snat.peer_port_be = t.dst_port_be;
    let snat_key = FlowKey {
        direction: direction::SNAT,
        ..key(t.src_addr_be, t.src_port_be, b.addr_be, b.port_be, protocol)
    };
    let forward_state = next_state(protocol, tcp_state::SYN, flow.packet.tcp_flags);
    let mut forward = flow.entry(b.addr_be, b.port_be, forward_state, now);
    forward.flags = flow_flags::SNAT;
    forward.peer_addr_be = snat_addr;
    forward.peer_port_be = snat_port_be;
    lookup::insert_flow(&snat_key, &snat).map_err(|()| DropReason::ConntrackInsertFailed)?;
    lookup::insert_flow(&t.flow_key(direction::FORWARD), &forward)
        .map_err(|()| DropReason::ConntrackInsertFailed)?;
    Ok(forward)
}

/// The state of an entry whose direction has seen no packet yet.
#[inline(always)]
fn opening(protocol: u8) -> (u8, u64) {
    if protocol == IPPROTO_TCP {
        (tcp_state::SYN, timeouts::TCP_SYN)
    } else {
        (tcp_state::OPEN, timeouts::UDP)
    }
}

/// A REPLY key from its parts.
#[inline(always)]
fn key(
    src_addr_be: u32,
    src_port_be: u16,
    dst_addr_be: u32,
    dst_port_be: u16,
    protocol: u8,
) -> FlowKey {
    Tuple {
        src_addr_be,
        dst_addr_be,
        src_port_be,
        dst_port_be,
        protocol,
    }
    .flow_key(direction::REPLY)
}
