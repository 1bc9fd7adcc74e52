//! Backend selection for a flow the connection table does not know yet.

use lb_common::{DropReason, FlowTarget, Service, hash::flow_hash};

use crate::{lookup, parse::Tuple};

/// Picks one of the service's ready backends by a hash of the flow's 5-tuple, so the choice is
/// spread evenly and repeatable for the same flow.
#[inline(always)]
pub fn backend(service: &Service, tuple: &Tuple) -> Result<FlowTarget, DropReason> {
    let ports = (u32::from(tuple.src_port_be) << 16) | u32::from(tuple.dst_port_be);
    let hash = flow_hash(
        tuple.src_addr_be,
        tuple.dst_addr_be,
        ports,
        tuple.protocol,
        0,
    );
    // `checked_rem`: a `%` that could divide by zero is a reachable panic the verifier rejects.
    let slot = hash
        .checked_rem(service.backend_count)
        .ok_or(DropReason::NoBackend)?;
    let (backend_id, backend) =
        lookup::backend_in_slot(service.id, slot).ok_or(DropReason::BackendMissing)?;
    Ok(FlowTarget {
        nat_addr_be: backend.addr_be,
        nat_port_be: backend.port_be,
        _pad: 0,
        service_id: service.id,
        backend_id,
    })
}
