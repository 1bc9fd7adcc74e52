//! Per-CPU counters for every outcome and every drop reason, and packets and bytes per backend.

use aya_ebpf::{macros::map, maps::PerCpuArray};
use lb_common::{
    BackendStats, COUNTER_COUNT, Counter, DROP_REASON_SLOTS, DropReason, EGRESS_SLOTS, Egress,
    MAX_BACKENDS,
};

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

#[map(name = "DROPS")]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DROP_REASON_SLOTS, 0);

#[map(name = "EGRESS")]
static EGRESS: PerCpuArray<u64> = PerCpuArray::with_max_entries(EGRESS_SLOTS, 0);

/// Indexed by backend id, like `BACKENDS`; the agent zeroes a slot when it gives the id to an
/// endpoint and when it takes it away.
#[map(name = "BACKEND_STATS")]
static BACKEND_STATS: PerCpuArray<BackendStats> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// Which way a translated packet goes, for its backend's statistics.
#[derive(Clone, Copy)]
pub enum Way {
    /// Client -> backend (DNAT).
    Forward,
    /// Backend -> client.
    Reply,
}

#[inline(always)]
fn increment(map: &PerCpuArray<u64>, index: u32) {
    if let Some(slot) = map.get_ptr_mut(index) {
        // SAFETY: the pointer comes from a successful lookup in a per-CPU array: it is valid,
        // aligned, and only this CPU writes it while this program runs.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
pub fn count(counter: Counter) {
    increment(&COUNTERS, counter as u32);
}

/// Counts a drop both in its program's drop counter and under its reason.
#[inline(always)]
pub fn count_drop(counter: Counter, reason: DropReason) {
    count(counter);
    increment(&DROPS, reason as u32);
}

/// Counts how a packet XDP translated left.
#[inline(always)]
pub fn count_egress(egress: Egress) {
    increment(&EGRESS, egress as u32);
}

/// Counts one translated packet of a flow to backend `backend_id`: `l3_len` is its IPv4 total
/// length, so XDP (which sees the Ethernet frame) and TC (the skb) count the same bytes.
#[inline(always)]
pub fn count_backend(backend_id: u32, way: Way, l3_len: u16) {
    if let Some(stats) = BACKEND_STATS.get_ptr_mut(backend_id) {
        // SAFETY: as in `increment`: a valid per-CPU slot only this CPU writes while we run.
        let stats = unsafe { &mut *stats };
        let bytes = u64::from(l3_len);
        match way {
            Way::Forward => {
                stats.forward_packets += 1;
                stats.forward_bytes += bytes;
            }
            Way::Reply => {
                stats.reply_packets += 1;
                stats.reply_bytes += bytes;
            }
        }
    }
}
