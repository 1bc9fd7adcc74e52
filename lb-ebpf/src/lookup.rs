//! The maps the agent fills (frontends, backends) and the one the data path fills (conntrack).

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap},
};
use lb_common::{
    Backend, CONNTRACK_ENTRIES, DropReason, FlowKey, FlowTarget, FrontendKey, MAX_BACKENDS,
    MAX_BACKENDS_PER_SERVICE, MAX_FRONTENDS, MAX_SERVICES, Service, backend_slot_index, direction,
};

use crate::parse::Tuple;

#[map(name = "FRONTENDS")]
static FRONTENDS: HashMap<FrontendKey, Service> = HashMap::with_max_entries(MAX_FRONTENDS, 0);

/// Row `service.id` holds the backend ids of that service port in slots `0..backend_count`.
#[map(name = "BACKEND_SLOTS")]
static BACKEND_SLOTS: Array<u32> =
    Array::with_max_entries(MAX_SERVICES * MAX_BACKENDS_PER_SERVICE, 0);

#[map(name = "BACKENDS")]
static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Both directions of every translated flow. LRU, so the oldest idle flows make room.
#[map(name = "CONNTRACK")]
static CONNTRACK: LruHashMap<FlowKey, FlowTarget> =
    LruHashMap::with_max_entries(CONNTRACK_ENTRIES, 0);

#[inline(always)]
pub fn frontend(key: &FrontendKey) -> Option<Service> {
    // SAFETY: the value is copied out at once; the agent replaces entries whole.
    unsafe { FRONTENDS.get(key).copied() }
}

#[inline(always)]
pub fn flow(key: &FlowKey) -> Option<FlowTarget> {
    // SAFETY: as above; entries are only ever inserted whole.
    unsafe { CONNTRACK.get(key).copied() }
}

/// The backend in `slot` of service `service_id`, if the slot names one (id 0 means empty).
#[inline(always)]
pub fn backend_in_slot(service_id: u32, slot: u32) -> Option<(u32, Backend)> {
    let id = *BACKEND_SLOTS.get(backend_slot_index(service_id, slot))?;
    if id == 0 {
        return None;
    }
    let backend = *BACKENDS.get(id)?;
    if backend.addr_be == 0 {
        return None;
    }
    Some((id, backend))
}

/// Tracks a new flow in both directions. The reply entry is written first, so that by the time
/// the first packet reaches the backend, its answer can already be translated back.
#[inline(always)]
pub fn track_flow(tuple: &Tuple, target: &FlowTarget) -> Result<(), DropReason> {
    let reply_key = FlowKey {
        src_addr_be: target.nat_addr_be,
        dst_addr_be: tuple.src_addr_be,
        src_port_be: target.nat_port_be,
        dst_port_be: tuple.src_port_be,
        protocol: tuple.protocol,
        direction: direction::REPLY,
        _pad: [0; 2],
    };
    let reply_target = FlowTarget {
        nat_addr_be: tuple.dst_addr_be,
        nat_port_be: tuple.dst_port_be,
        _pad: 0,
        service_id: target.service_id,
        backend_id: target.backend_id,
    };
    CONNTRACK
        .insert(&reply_key, &reply_target, 0)
        .map_err(|_| DropReason::ConntrackInsertFailed)?;
    CONNTRACK
        .insert(&tuple.flow_key(direction::FORWARD), target, 0)
        .map_err(|_| DropReason::ConntrackInsertFailed)
}
