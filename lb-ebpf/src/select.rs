//! Which backend a new flow goes to: source ranges, session affinity, then the Maglev table.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use lb_common::{
    AffinityKey, AffinityValue, Backend, Counter, DropReason, Service, Settings, backend_flags,
    maglev_table_stride, service_flags,
};

use crate::{lookup, parse::Tuple, stats};

const NANOS_PER_SECOND: u64 = 1_000_000_000;

/// Drops sources outside the Service's `loadBalancerSourceRanges` (when it has any).
#[inline(always)]
pub fn check_source(service: &Service, tuple: &Tuple) -> Result<(), DropReason> {
    if service.flags & service_flags::SOURCE_RANGES == 0
        || lookup::source_allowed(service.service_id, tuple.src_addr_be)
    {
        Ok(())
    } else {
        Err(DropReason::SourceRangeDenied)
    }
}

/// Picks the backend for a new flow: the client's affinity backend if it has a live one, else
/// the Maglev table's entry for the flow hash (or a random entry, per Service).
#[inline(always)]
pub fn backend(
    service: &Service,
    tuple: &Tuple,
    settings: &Settings,
    now: u64,
) -> Result<(u32, Backend), DropReason> {
    let local_only = service.flags & service_flags::LOCAL_ONLY != 0;
    if service.backend_count == 0 {
        return Err(if local_only {
            DropReason::NoLocalBackend
        } else {
            DropReason::NoBackend
        });
    }
    let affinity_key = AffinityKey {
        service_id: service.service_id,
        client_addr_be: tuple.src_addr_be,
    };
    let affinity_ns = u64::from(service.affinity_timeout_s) * NANOS_PER_SECOND;
    if affinity_ns != 0
        && let Some((id, backend)) = affinity_backend(service, &affinity_key, local_only, now)
    {
        remember(&affinity_key, id, &backend, now + affinity_ns);
        stats::count(Counter::AffinityHit);
        return Ok((id, backend));
    }

    let hash = if service.flags & service_flags::RANDOM != 0 {
        // SAFETY: a helper without arguments.
        unsafe { bpf_get_prandom_u32() }
    } else {
        tuple.hash(settings.hash_seed)
    };
    let m = settings.maglev_table_size;
    // `checked_*`: a `%` that could divide by zero is a reachable panic the verifier rejects.
    let index = service
        .table
        .checked_mul(maglev_table_stride(m))
        .and_then(|first| first.checked_add(hash.checked_rem(m)?))
        .ok_or(DropReason::BackendMissing)?;
    let id = lookup::maglev_entry(index).ok_or(DropReason::BackendMissing)?;
    let backend = lookup::backend(id).ok_or(DropReason::BackendMissing)?;
    if affinity_ns != 0 {
        remember(&affinity_key, id, &backend, now + affinity_ns);
    }
    Ok((id, backend))
}

/// The client's affinity backend, if it has one that has not expired and still serves this
/// frontend (same endpoint, still in the table the frontend uses).
#[inline(always)]
fn affinity_backend(
    service: &Service,
    key: &AffinityKey,
    local_only: bool,
    now: u64,
) -> Option<(u32, Backend)> {
    let pinned = lookup::affinity(key)?;
    if pinned.expires_ns < now {
        return None;
    }
    let backend = lookup::backend(pinned.backend_id)?;
    let in_table = if local_only {
        backend_flags::IN_LOCAL_TABLE
    } else {
        backend_flags::IN_CLUSTER_TABLE
    };
    let same = backend.addr_be == pinned.addr_be
        && backend.port_be == pinned.port_be
        && backend.service_id == service.service_id
        && backend.flags & in_table != 0;
    same.then_some((pinned.backend_id, backend))
}

#[inline(always)]
fn remember(key: &AffinityKey, backend_id: u32, backend: &Backend, expires_ns: u64) {
    lookup::set_affinity(
        key,
        &AffinityValue {
            backend_id,
            addr_be: backend.addr_be,
            port_be: backend.port_be,
            expires_ns,
            ..AffinityValue::default()
        },
    );
}
