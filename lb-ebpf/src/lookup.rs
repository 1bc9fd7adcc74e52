//! The maps: what the agent fills (settings, frontends, Maglev tables, backends, source ranges)
//! and what the data path fills (affinity, conntrack).

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, lpm_trie::Key},
};
use lb_common::{
    AFFINITY_ENTRIES, AffinityKey, AffinityValue, Backend, CONNTRACK_ENTRIES, DEFAULT_MAX_TABLES,
    FlowEntry, FlowKey, FrontendKey, MAX_BACKENDS, MAX_FRONTENDS, SOURCE_RANGE_ENTRIES, Service,
    Settings, SourceRangeKey, frontend_scope, service_flags,
};

#[map(name = "SETTINGS")]
static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

#[map(name = "FRONTENDS")]
static FRONTENDS: HashMap<FrontendKey, Service> = HashMap::with_max_entries(MAX_FRONTENDS, 0);

/// Every Maglev table, one after another, as pairs of backend ids (see `maglev_table_stride`). The agent sizes it at load time (tables x M; this size is a placeholder) and
/// writes new tables through a memory mapping: a table is megabytes, too much for one syscall
/// per entry.
#[map(name = "MAGLEV")]
static MAGLEV: Array<[u32; 2]> = Array::with_max_entries(DEFAULT_MAX_TABLES, BPF_F_MMAPABLE);

#[map(name = "BACKENDS")]
static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

#[map(name = "SOURCE_RANGES")]
static SOURCE_RANGES: LpmTrie<SourceRangeKey, u8> =
    LpmTrie::with_max_entries(SOURCE_RANGE_ENTRIES, 0);

/// `sessionAffinity: ClientIP`. LRU, so the longest-unused clients make room.
#[map(name = "AFFINITY")]
static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::with_max_entries(AFFINITY_ENTRIES, 0);

/// Every translated flow, one entry per direction (see `FlowEntry`). LRU, so the oldest idle
/// flows make room when it is full; the agent also removes expired ones.
#[map(name = "CONNTRACK")]
static CONNTRACK: LruHashMap<FlowKey, FlowEntry> =
    LruHashMap::with_max_entries(CONNTRACK_ENTRIES, 0);

/// `BPF_NOEXIST`: insert only if the key is free.
const NOEXIST: u64 = 1;

#[inline(always)]
pub fn settings() -> Option<Settings> {
    SETTINGS.get(0).copied()
}

#[inline(always)]
pub fn frontend(key: &FrontendKey) -> Option<Service> {
    // SAFETY: the value is copied out at once; the agent replaces entries whole.
    unsafe { FRONTENDS.get(key).copied() }
}

/// The frontend as a pod on this node reaches it: its `frontend_scope::POD` entry when it has
/// one (a `Local` Service's external address, which pods reach through all endpoints).
#[inline(always)]
pub fn frontend_for_pod(key: &FrontendKey) -> Option<Service> {
    let service = frontend(key)?;
    if service.flags & service_flags::POD_ENTRY == 0 {
        return Some(service);
    }
    let pod_key = FrontendKey {
        scope: frontend_scope::POD,
        ..*key
    };
    // Between the agent's writes of the two entries, the pod one can be missing.
    Some(frontend(&pod_key).unwrap_or(service))
}

/// Entry `index` of the concatenated Maglev tables: a backend id (0: none).
#[inline(always)]
pub fn maglev_entry(index: u32) -> Option<u32> {
    let pair = MAGLEV.get(index / 2)?;
    Some(if index & 1 == 0 { pair[0] } else { pair[1] })
}

/// The backend with this id, if the id names one.
#[inline(always)]
pub fn backend(id: u32) -> Option<Backend> {
    if id == 0 {
        return None;
    }
    BACKENDS.get(id).copied().filter(|b| b.addr_be != 0)
}

/// Whether `addr_be` lies in one of the source ranges of service `service_id`.
#[inline(always)]
pub fn source_allowed(service_id: u32, addr_be: u32) -> bool {
    let key = Key::new(
        64,
        SourceRangeKey {
            service_id_be: service_id.to_be(),
            addr_be,
        },
    );
    SOURCE_RANGES.get(&key).is_some()
}

#[inline(always)]
pub fn affinity(key: &AffinityKey) -> Option<AffinityValue> {
    // SAFETY: copied out at once; entries are only ever inserted whole.
    unsafe { AFFINITY.get(key).copied() }
}

#[inline(always)]
pub fn set_affinity(key: &AffinityKey, value: &AffinityValue) {
    // Best effort: without the entry the client is balanced like any other, which is still a
    // correct answer.
    let _ = AFFINITY.insert(key, value, 0);
}

/// A tracked flow's entry, copied out.
#[inline(always)]
pub fn flow(key: &FlowKey) -> Option<FlowEntry> {
    // SAFETY: copied out at once; entries are only ever inserted whole.
    unsafe { CONNTRACK.get(key).copied() }
}

/// A tracked flow's entry, to read and refresh in place.
#[inline(always)]
pub fn flow_mut(key: &FlowKey) -> Option<*mut FlowEntry> {
    CONNTRACK.get_ptr_mut(key)
}

#[inline(always)]
pub fn insert_flow(key: &FlowKey, entry: &FlowEntry) -> Result<(), ()> {
    CONNTRACK.insert(key, entry, 0).map_err(|_| ())
}

/// Inserts only if no entry has the key; `false` if one has.
#[inline(always)]
pub fn claim_flow(key: &FlowKey, entry: &FlowEntry) -> bool {
    CONNTRACK.insert(key, entry, NOEXIST).is_ok()
}
