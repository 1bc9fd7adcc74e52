//! Per-CPU counters for every outcome and every drop reason.

use aya_ebpf::{macros::map, maps::PerCpuArray};
use lb_common::{COUNTER_COUNT, Counter, DROP_REASON_SLOTS, DropReason};

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

#[map(name = "DROPS")]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DROP_REASON_SLOTS, 0);

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
