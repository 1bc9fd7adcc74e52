//! From the desired state to map contents, and from two map contents to the ordered updates that
//! turn one into the other. Every config source goes through here.

use std::collections::BTreeMap;

use lb_common::{
    Backend, FrontendKey, MAX_BACKENDS, MAX_BACKENDS_PER_SERVICE, MAX_FRONTENDS, MAX_SERVICES,
    Service, backend_slot_index,
};

use crate::model::DesiredState;

/// What the agent-owned maps should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapContents {
    pub frontends: BTreeMap<FrontendKey, Service>,
    /// `BACKEND_SLOTS` index -> backend id.
    pub slots: BTreeMap<u32, u32>,
    /// Backend id -> backend.
    pub backends: BTreeMap<u32, Backend>,
    /// Service id -> the service port's name, for reports.
    pub service_names: BTreeMap<u32, String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CapacityError {
    #[error("{count} service ports exceed the data path's limit of {limit}")]
    TooManyServices { count: usize, limit: u32 },
    #[error("service {service} has {count} ready endpoints; one service port can hold {limit}")]
    TooManyEndpoints {
        service: String,
        count: usize,
        limit: u32,
    },
    #[error("{count} distinct endpoint address:port pairs exceed the limit of {limit}")]
    TooManyBackends { count: usize, limit: u32 },
    #[error("{count} frontends exceed the limit of {limit}")]
    TooManyFrontends { count: usize, limit: u32 },
}

impl MapContents {
    /// Numbers service ports and backends in the state's (sorted) order, so the same state
    /// always gives the same maps. Ids start at 1: 0 means "unset" in the data path.
    pub fn from_state(state: &DesiredState) -> Result<Self, CapacityError> {
        // Ids 0 of services and backends are never used, so one slot of each holds nothing.
        let (max_services, max_backends) = (MAX_SERVICES - 1, MAX_BACKENDS - 1);
        let exceeds = |count: usize, max: u32| u32::try_from(count).map_or(true, |c| c > max);
        if exceeds(state.service_ports.len(), max_services) {
            return Err(CapacityError::TooManyServices {
                count: state.service_ports.len(),
                limit: max_services,
            });
        }
        let mut contents = MapContents::default();
        let mut backend_ids: BTreeMap<(u32, u16), u32> = BTreeMap::new();
        for (service_id, port) in (1..).zip(&state.service_ports) {
            if exceeds(port.endpoints.len(), MAX_BACKENDS_PER_SERVICE) {
                return Err(CapacityError::TooManyEndpoints {
                    service: port.display_name(),
                    count: port.endpoints.len(),
                    limit: MAX_BACKENDS_PER_SERVICE,
                });
            }
            contents
                .service_names
                .insert(service_id, port.display_name());
            for (slot, endpoint) in (0..).zip(&port.endpoints) {
                let backend = Backend {
                    addr_be: u32::from_ne_bytes(endpoint.addr.octets()),
                    port_be: endpoint.port.to_be(),
                    _pad: 0,
                };
                let next_id = u32::try_from(backend_ids.len() + 1).unwrap_or(u32::MAX);
                let id = *backend_ids
                    .entry((backend.addr_be, backend.port_be))
                    .or_insert(next_id);
                contents.backends.insert(id, backend);
                contents
                    .slots
                    .insert(backend_slot_index(service_id, slot), id);
            }
            let service = Service {
                id: service_id,
                backend_count: u32::try_from(port.endpoints.len()).unwrap_or(0),
            };
            for frontend in &port.frontends {
                let key = FrontendKey {
                    addr_be: u32::from_ne_bytes(frontend.addr.octets()),
                    port_be: frontend.port.to_be(),
                    protocol: port.protocol.number(),
                    _pad: 0,
                };
                contents.frontends.insert(key, service);
            }
        }
        if exceeds(contents.backends.len(), max_backends) {
            return Err(CapacityError::TooManyBackends {
                count: contents.backends.len(),
                limit: max_backends,
            });
        }
        if exceeds(contents.frontends.len(), MAX_FRONTENDS) {
            return Err(CapacityError::TooManyFrontends {
                count: contents.frontends.len(),
                limit: MAX_FRONTENDS,
            });
        }
        Ok(contents)
    }
}

/// One map write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapUpdate {
    SetBackend(u32, Backend),
    SetSlot(u32, u32),
    SetFrontend(FrontendKey, Service),
    RemoveFrontend(FrontendKey),
    ClearSlot(u32),
    ClearBackend(u32),
}

/// The updates that turn `old` into `new`, ordered so that a packet never follows a reference
/// to something not yet written: backends, then slots, then frontends; removals in reverse.
#[must_use]
pub fn diff(old: &MapContents, new: &MapContents) -> Vec<MapUpdate> {
    let mut updates = Vec::new();
    for (&id, &backend) in &new.backends {
        if old.backends.get(&id) != Some(&backend) {
            updates.push(MapUpdate::SetBackend(id, backend));
        }
    }
    for (&index, &id) in &new.slots {
        if old.slots.get(&index) != Some(&id) {
            updates.push(MapUpdate::SetSlot(index, id));
        }
    }
    for (&key, &service) in &new.frontends {
        if old.frontends.get(&key) != Some(&service) {
            updates.push(MapUpdate::SetFrontend(key, service));
        }
    }
    for &key in old.frontends.keys() {
        if !new.frontends.contains_key(&key) {
            updates.push(MapUpdate::RemoveFrontend(key));
        }
    }
    for &index in old.slots.keys() {
        if !new.slots.contains_key(&index) {
            updates.push(MapUpdate::ClearSlot(index));
        }
    }
    for &id in old.backends.keys() {
        if !new.backends.contains_key(&id) {
            updates.push(MapUpdate::ClearBackend(id));
        }
    }
    updates
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::model::{Endpoint, Frontend, FrontendKind, Protocol, ServicePort};

    fn port(name: &str, frontend: [u8; 4], endpoints: &[[u8; 4]]) -> ServicePort {
        ServicePort {
            service: format!("default/{name}"),
            port_name: String::new(),
            protocol: Protocol::Tcp,
            frontends: vec![Frontend {
                kind: FrontendKind::ClusterIp,
                addr: Ipv4Addr::from(frontend),
                port: 80,
            }],
            endpoints: endpoints
                .iter()
                .map(|&a| Endpoint {
                    addr: Ipv4Addr::from(a),
                    port: 8080,
                    pod: None,
                    node_name: None,
                    state: crate::model::EndpointState::Ready,
                })
                .collect(),
            ..ServicePort::default()
        }
    }

    #[test]
    fn shared_endpoint_gets_one_backend_id_and_ids_start_at_one() {
        let state = DesiredState {
            service_ports: vec![
                port("a", [10, 96, 0, 1], &[[10, 244, 0, 1], [10, 244, 0, 2]]),
                port("b", [10, 96, 0, 2], &[[10, 244, 0, 2]]),
            ],
        };
        let contents = MapContents::from_state(&state).unwrap();
        assert_eq!(contents.backends.len(), 2);
        assert_eq!(
            contents.backends.keys().copied().collect::<Vec<_>>(),
            [1, 2]
        );
        assert_eq!(contents.slots[&backend_slot_index(2, 0)], 2);
        assert_eq!(contents.slots[&backend_slot_index(1, 1)], 2);
        let services: Vec<_> = contents
            .frontends
            .values()
            .map(|s| (s.id, s.backend_count))
            .collect();
        assert_eq!(services, [(1, 2), (2, 1)]);
    }

    #[test]
    fn diff_from_empty_writes_referenced_entries_before_frontends() {
        let state = DesiredState {
            service_ports: vec![port("a", [10, 96, 0, 1], &[[10, 244, 0, 1]])],
        };
        let new = MapContents::from_state(&state).unwrap();
        let updates = diff(&MapContents::default(), &new);
        assert!(matches!(updates[0], MapUpdate::SetBackend(1, _)));
        assert!(matches!(updates[1], MapUpdate::SetSlot(_, 1)));
        assert!(matches!(updates[2], MapUpdate::SetFrontend(_, _)));
        assert_eq!(updates.len(), 3);
        assert!(diff(&new, &new).is_empty());
        // And back to empty: frontend first, backend last.
        let removal = diff(&new, &MapContents::default());
        assert!(matches!(removal[0], MapUpdate::RemoveFrontend(_)));
        assert!(matches!(removal[2], MapUpdate::ClearBackend(1)));
    }

    #[test]
    fn too_many_endpoints_names_the_service() {
        let many: Vec<[u8; 4]> = (0..=MAX_BACKENDS_PER_SERVICE)
            .map(|i| {
                let [.., hi, lo] = i.to_be_bytes();
                [10, 1, hi, lo]
            })
            .collect();
        let state = DesiredState {
            service_ports: vec![port("big", [10, 96, 0, 1], &many)],
        };
        let err = MapContents::from_state(&state).unwrap_err();
        assert!(err.to_string().contains("default/big"), "{err}");
    }
}
