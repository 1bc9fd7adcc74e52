//! Tests of the map plan: ids across applies, which endpoints each table holds, what `diff`
//! rewrites, and how capacity problems are reported.

use std::{collections::BTreeSet, net::Ipv4Addr};

use lb_common::{FrontendKey, backend_flags, service_flags};

use super::{CapacityError, MapContents, NodeConfig, Plan, TableKey, diff};
use crate::model::{
    DesiredState, Endpoint, EndpointState, Frontend, FrontendKind, Protocol, ServicePort,
    TrafficPolicy,
};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

const THIS_NODE: &str = "node-a";
const OTHER_NODE: &str = "node-b";
const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 10);
const TARGET_PORT: u16 = 8080;

/// A small prime table, so building it is cheap and a table is easy to read in a failure.
fn node() -> NodeConfig {
    NodeConfig {
        node_name: THIS_NODE.to_owned(),
        maglev_table_size: 13,
        maglev_seed: 7,
        max_tables: 16,
        ..NodeConfig::default()
    }
}

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 1, last)
}

fn endpoint(last: u8, node: &str, state: EndpointState) -> Endpoint {
    Endpoint {
        addr: ip(last),
        port: TARGET_PORT,
        pod: None,
        node_name: Some(node.to_owned()),
        state,
    }
}

fn local(last: u8) -> Endpoint {
    endpoint(last, THIS_NODE, EndpointState::Ready)
}

fn remote(last: u8) -> Endpoint {
    endpoint(last, OTHER_NODE, EndpointState::Ready)
}

/// Service `name`'s port on clusterIP `10.96.0.<n>:80` and nodePort `30000 + n`, TCP.
fn service(name: &str, n: u8, endpoints: Vec<Endpoint>) -> ServicePort {
    ServicePort {
        service: format!("default/{name}"),
        protocol: Protocol::Tcp,
        frontends: vec![
            Frontend {
                kind: FrontendKind::ClusterIp,
                addr: Ipv4Addr::new(10, 96, 0, n),
                port: 80,
            },
            Frontend {
                kind: FrontendKind::NodePort,
                addr: NODE_IP,
                port: 30_000 + u16::from(n),
            },
        ],
        endpoints,
        ..ServicePort::default()
    }
}

fn state(service_ports: Vec<ServicePort>) -> DesiredState {
    DesiredState { service_ports }
}

#[track_caller]
fn build(state: &DesiredState, previous: &MapContents) -> MapContents {
    build_on(state, &node(), previous)
}

#[track_caller]
fn build_on(state: &DesiredState, node: &NodeConfig, previous: &MapContents) -> MapContents {
    MapContents::from_state(state, node, previous)
        .unwrap_or_else(|e| panic!("from_state failed: {e}"))
}

fn service_id(contents: &MapContents, name: &str) -> u32 {
    contents.service_ids[&format!("default/{name}/TCP")]
}

fn backend_id(contents: &MapContents, name: &str, last: u8) -> u32 {
    contents.backend_ids[&(service_id(contents, name), ip(last), TARGET_PORT)]
}

/// The endpoint addresses' last bytes a table spreads over (each once).
fn table_members(contents: &MapContents, key: TableKey) -> BTreeSet<u8> {
    let table = contents
        .tables
        .get(&key)
        .unwrap_or_else(|| panic!("no table {key:?}"));
    table
        .slots()
        .iter()
        .map(|id| {
            let backend = contents
                .backends
                .get(id)
                .unwrap_or_else(|| panic!("table {key:?} names backend {id}, which is not there"));
            Ipv4Addr::from(backend.addr_be.to_ne_bytes()).octets()[3]
        })
        .collect()
}

fn cluster_table(contents: &MapContents, name: &str) -> TableKey {
    TableKey {
        service_id: service_id(contents, name),
        local: false,
    }
}

fn local_table(contents: &MapContents, name: &str) -> TableKey {
    TableKey {
        service_id: service_id(contents, name),
        local: true,
    }
}

fn frontend_key(addr: Ipv4Addr, port: u16) -> FrontendKey {
    FrontendKey {
        addr_be: u32::from_ne_bytes(addr.octets()),
        port_be: port.to_be(),
        protocol: Protocol::Tcp.number(),
        scope: lb_common::frontend_scope::ANY,
    }
}

fn cluster_ip_key(n: u8) -> FrontendKey {
    frontend_key(Ipv4Addr::new(10, 96, 0, n), 80)
}

fn node_port_key(n: u8) -> FrontendKey {
    frontend_key(NODE_IP, 30_000 + u16::from(n))
}

// ---------------------------------------------------------------------------------------------
// Ids
// ---------------------------------------------------------------------------------------------

#[test]
fn ids_stay_the_same_when_services_and_endpoints_are_added() {
    let before = state(vec![
        service("a", 1, vec![local(20), local(30)]),
        service("c", 3, vec![local(40)]),
    ]);
    let first = build(&before, &MapContents::default());

    // "b" sorts between the two, and endpoint 10 before a's others: numbered afresh, both
    // would move the ids of what follows them.
    let after = state(vec![
        service("a", 1, vec![local(10), local(20), local(30)]),
        service("b", 2, vec![local(50)]),
        service("c", 3, vec![local(40)]),
    ]);
    let fresh = build(&after, &MapContents::default());
    assert_ne!(
        service_id(&fresh, "c"),
        service_id(&first, "c"),
        "the test needs a state that numbered afresh renumbers"
    );
    assert_ne!(backend_id(&fresh, "a", 20), backend_id(&first, "a", 20));

    let second = build(&after, &first);
    for name in ["a", "c"] {
        assert_eq!(
            service_id(&second, name),
            service_id(&first, name),
            "service {name}"
        );
    }
    for (name, last) in [("a", 20), ("a", 30), ("c", 40)] {
        assert_eq!(
            backend_id(&second, name, last),
            backend_id(&first, name, last),
            "backend {name}/{last}"
        );
    }
    // New ids are new: none collides with one in use.
    let old_services: BTreeSet<u32> = first.service_ids.values().copied().collect();
    assert!(!old_services.contains(&service_id(&second, "b")));
    let old_backends: BTreeSet<u32> = first.backend_ids.values().copied().collect();
    for (name, last) in [("a", 10), ("b", 50)] {
        assert!(
            !old_backends.contains(&backend_id(&second, name, last)),
            "backend {name}/{last} got an id already in use"
        );
    }
    // And ids are unique within one contents.
    let ids: BTreeSet<u32> = second.backend_ids.values().copied().collect();
    assert_eq!(ids.len(), second.backend_ids.len(), "duplicate backend ids");
}

#[test]
fn ids_that_went_away_are_not_reused_in_the_same_apply() {
    let first = build(
        &state(vec![service("a", 1, vec![local(10)])]),
        &MapContents::default(),
    );
    let second = build(&state(vec![service("d", 4, vec![local(11)])]), &first);
    assert_ne!(service_id(&second, "d"), service_id(&first, "a"));
    assert_ne!(backend_id(&second, "d", 11), backend_id(&first, "a", 10));
}

// ---------------------------------------------------------------------------------------------
// Which endpoints each table holds
// ---------------------------------------------------------------------------------------------

/// A service whose clusterIP uses every node's endpoints and whose nodePort only this node's.
fn split_policies(name: &str, n: u8, endpoints: Vec<Endpoint>) -> ServicePort {
    ServicePort {
        external_policy: TrafficPolicy::Local,
        internal_policy: TrafficPolicy::Cluster,
        ..service(name, n, endpoints)
    }
}

#[test]
fn local_tables_hold_only_local_endpoints() {
    let contents = build(
        &state(vec![split_policies(
            "a",
            1,
            vec![local(10), local(11), remote(20), remote(21), remote(22)],
        )]),
        &MapContents::default(),
    );
    assert_eq!(
        table_members(&contents, local_table(&contents, "a")),
        BTreeSet::from([10, 11])
    );
    assert_eq!(
        table_members(&contents, cluster_table(&contents, "a")),
        BTreeSet::from([10, 11, 20, 21, 22])
    );

    let node_port = contents.frontends[&node_port_key(1)];
    assert_eq!(node_port.table_key, Some(local_table(&contents, "a")));
    assert_eq!(node_port.service.backend_count, 2);
    assert_ne!(node_port.service.flags & service_flags::LOCAL_ONLY, 0);
    let cluster_ip = contents.frontends[&cluster_ip_key(1)];
    assert_eq!(cluster_ip.table_key, Some(cluster_table(&contents, "a")));
    assert_eq!(cluster_ip.service.backend_count, 5);
    assert_eq!(cluster_ip.service.flags & service_flags::LOCAL_ONLY, 0);

    // One backend per endpoint, even for one in both tables; its flags say where it runs and
    // which tables hold it.
    assert_eq!(contents.backends.len(), 5, "{:?}", contents.backends);
    let flags = |last| contents.backends[&backend_id(&contents, "a", last)].flags;
    let both = backend_flags::IN_CLUSTER_TABLE | backend_flags::IN_LOCAL_TABLE;
    assert_eq!(flags(10), backend_flags::LOCAL | both);
    assert_eq!(flags(20), backend_flags::IN_CLUSTER_TABLE);
}

#[test]
fn local_policy_without_local_endpoints_has_no_table() {
    let contents = build(
        &state(vec![split_policies("a", 1, vec![remote(20)])]),
        &MapContents::default(),
    );
    assert!(!contents.tables.contains_key(&local_table(&contents, "a")));
    let node_port = contents.frontends[&node_port_key(1)];
    assert_eq!(node_port.table_key, None);
    assert_eq!(node_port.service.backend_count, 0);
    assert_ne!(node_port.service.flags & service_flags::LOCAL_ONLY, 0);
    // The clusterIP is still served.
    assert_eq!(
        contents.frontends[&cluster_ip_key(1)].service.backend_count,
        1
    );
}

#[test]
fn pods_reach_a_local_external_address_through_every_endpoint() {
    // Both policies Local: only the pod entry needs the cluster-wide table.
    let both_local = ServicePort {
        internal_policy: TrafficPolicy::Local,
        ..split_policies("a", 1, vec![local(10), remote(20)])
    };
    let contents = build(&state(vec![both_local]), &MapContents::default());
    let node_port = contents.frontends[&node_port_key(1)];
    assert_eq!(node_port.table_key, Some(local_table(&contents, "a")));
    assert_ne!(node_port.service.flags & service_flags::POD_ENTRY, 0);

    let pod_key = FrontendKey {
        scope: lb_common::frontend_scope::POD,
        ..node_port_key(1)
    };
    let for_pods = contents.frontends[&pod_key];
    assert_eq!(for_pods.table_key, Some(cluster_table(&contents, "a")));
    assert_eq!(for_pods.service.backend_count, 2);
    assert_eq!(for_pods.service.service_id, node_port.service.service_id);
    assert_eq!(
        for_pods.service.flags & (service_flags::LOCAL_ONLY | service_flags::POD_ENTRY),
        0
    );
    assert_eq!(
        table_members(&contents, cluster_table(&contents, "a")),
        BTreeSet::from([10, 20])
    );

    // A clusterIP follows its own (internal) policy, for pods too: no pod entry.
    let cluster_ip = contents.frontends[&cluster_ip_key(1)];
    assert_eq!(cluster_ip.service.flags & service_flags::POD_ENTRY, 0);
    let cluster_ip_pod_key = FrontendKey {
        scope: lb_common::frontend_scope::POD,
        ..cluster_ip_key(1)
    };
    assert!(!contents.frontends.contains_key(&cluster_ip_pod_key));

    // Cluster policies need no pod entry at all.
    let cluster = build(
        &state(vec![service("b", 2, vec![local(10), remote(20)])]),
        &MapContents::default(),
    );
    assert!(
        cluster
            .frontends
            .keys()
            .all(|k| k.scope == lb_common::frontend_scope::ANY),
        "{:?}",
        cluster.frontends.keys()
    );
}

#[test]
fn terminating_endpoints_serve_only_while_their_set_has_no_ready_one() {
    let terminating = |last, node| endpoint(last, node, EndpointState::Terminating);

    // Cluster-wide, a remote endpoint is ready: the terminating ones are out. This node has
    // none ready: its terminating one serves the Local table.
    let contents = build(
        &state(vec![split_policies(
            "a",
            1,
            vec![
                terminating(10, THIS_NODE),
                remote(20),
                terminating(21, OTHER_NODE),
            ],
        )]),
        &MapContents::default(),
    );
    assert_eq!(
        table_members(&contents, cluster_table(&contents, "a")),
        BTreeSet::from([20])
    );
    assert_eq!(
        table_members(&contents, local_table(&contents, "a")),
        BTreeSet::from([10])
    );
    assert_eq!(
        contents.backends[&backend_id(&contents, "a", 10)].flags,
        backend_flags::LOCAL | backend_flags::IN_LOCAL_TABLE,
        "a terminating endpoint only in the Local table"
    );
    assert!(
        !contents
            .backend_ids
            .contains_key(&(service_id(&contents, "a"), ip(21), TARGET_PORT)),
        "an endpoint no table holds has no backend"
    );

    // A ready local endpoint puts the terminating local one out of the Local table too.
    let contents = build(
        &state(vec![split_policies(
            "a",
            1,
            vec![terminating(10, THIS_NODE), local(11), remote(20)],
        )]),
        &MapContents::default(),
    );
    assert_eq!(
        table_members(&contents, local_table(&contents, "a")),
        BTreeSet::from([11])
    );

    // Nothing ready anywhere: every terminating endpoint serves.
    let contents = build(
        &state(vec![split_policies(
            "a",
            1,
            vec![terminating(10, THIS_NODE), terminating(21, OTHER_NODE)],
        )]),
        &MapContents::default(),
    );
    assert_eq!(
        table_members(&contents, cluster_table(&contents, "a")),
        BTreeSet::from([10, 21])
    );
    assert_eq!(
        table_members(&contents, local_table(&contents, "a")),
        BTreeSet::from([10])
    );
}

#[test]
fn table_entries_name_only_their_own_service_backends() {
    // The same endpoints behind two services: each service port has its own backends.
    let endpoints = vec![local(10), local(11), remote(20)];
    let contents = build(
        &state(vec![
            split_policies("a", 1, endpoints.clone()),
            service("b", 2, endpoints),
        ]),
        &MapContents::default(),
    );
    assert_eq!(contents.tables.len(), 3, "a: cluster and local, b: cluster");
    for (key, table) in &contents.tables {
        assert_eq!(table.slots().len(), 13, "table {key:?} has M entries");
        for id in table.slots() {
            assert_eq!(
                contents.backends[id].service_id, key.service_id,
                "table {key:?} names backend {id} of another service"
            );
        }
    }
    assert_ne!(
        backend_id(&contents, "a", 10),
        backend_id(&contents, "b", 10)
    );
}

// ---------------------------------------------------------------------------------------------
// Diff
// ---------------------------------------------------------------------------------------------

/// The frontend keys a plan writes, wherever it writes them.
fn written_frontends(plan: &Plan) -> BTreeSet<FrontendKey> {
    plan.set_frontends
        .iter()
        .map(|(k, _)| *k)
        .chain(
            plan.write_tables
                .iter()
                .flat_map(|(_, frontends)| frontends.iter().map(|(k, _)| *k)),
        )
        .collect()
}

#[test]
fn diff_rewrites_a_changed_table_with_its_frontends_and_nothing_else() {
    let old = build(
        &state(vec![
            service("a", 1, vec![local(10), local(11)]),
            service("b", 2, vec![local(20)]),
        ]),
        &MapContents::default(),
    );
    let new = build(
        &state(vec![
            service("a", 1, vec![local(10), local(11), local(12)]),
            service("b", 2, vec![local(20)]),
        ]),
        &old,
    );
    let plan = diff(&old, &new);
    let tables: Vec<TableKey> = plan.write_tables.iter().map(|(k, _)| *k).collect();
    assert_eq!(tables, [cluster_table(&new, "a")], "only a's table changed");
    let switched: BTreeSet<FrontendKey> = plan.write_tables[0].1.iter().map(|(k, _)| *k).collect();
    assert_eq!(
        switched,
        BTreeSet::from([cluster_ip_key(1), node_port_key(1)]),
        "a's frontends switch to its new table"
    );
    assert!(plan.set_frontends.is_empty(), "{:?}", plan.set_frontends);
    assert!(!written_frontends(&plan).contains(&cluster_ip_key(2)));
    assert!(!written_frontends(&plan).contains(&node_port_key(2)));
    let new_backend = backend_id(&new, "a", 12);
    assert_eq!(
        plan.set_backends,
        [(new_backend, new.backends[&new_backend])],
        "only the new endpoint's backend is written"
    );
    assert!(plan.remove_frontends.is_empty());
    assert!(plan.drop_tables.is_empty());
    assert!(plan.clear_backends.is_empty());

    assert!(diff(&new, &new).is_empty(), "no change, no writes");
}

#[test]
fn diff_removes_frontends_and_tables_that_went_away() {
    let old = build(
        &state(vec![
            service("a", 1, vec![local(10)]),
            service("b", 2, vec![local(20)]),
        ]),
        &MapContents::default(),
    );
    let mut a = service("a", 1, vec![local(10)]);
    a.frontends.retain(|f| f.kind == FrontendKind::ClusterIp);
    let new = build(&state(vec![a]), &old);
    let plan = diff(&old, &new);
    assert_eq!(
        plan.remove_frontends,
        [cluster_ip_key(2), node_port_key(1), node_port_key(2)]
            .into_iter()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>(),
        "a's nodePort and all of b's frontends"
    );
    assert_eq!(plan.drop_tables, [cluster_table(&old, "b")]);
    assert_eq!(plan.clear_backends, [backend_id(&old, "b", 20)]);
    assert!(plan.write_tables.is_empty(), "a's table is unchanged");
    assert!(
        written_frontends(&plan).is_empty(),
        "a's clusterIP is unchanged"
    );
    assert!(plan.stale_udp_backends.is_empty(), "no UDP service port");
}

#[test]
fn diff_lists_backends_of_udp_service_ports_that_went_away_as_stale() {
    let udp = |endpoints| ServicePort {
        protocol: Protocol::Udp,
        ..service("dns", 53, endpoints)
    };
    let old = build(
        &state(vec![
            udp(vec![local(10), local(11)]),
            service("web", 1, vec![local(20), local(21)]),
        ]),
        &MapContents::default(),
    );
    let new = build(
        &state(vec![
            udp(vec![local(10)]),
            service("web", 1, vec![local(20)]),
        ]),
        &old,
    );
    let plan = diff(&old, &new);
    let dns = old.service_ids["default/dns/UDP"];
    let gone_udp = old.backend_ids[&(dns, ip(11), TARGET_PORT)];
    let gone_tcp = backend_id(&old, "web", 21);
    assert_eq!(
        plan.clear_backends.iter().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from([gone_udp, gone_tcp])
    );
    assert_eq!(
        plan.stale_udp_backends,
        [(dns, old.backends[&gone_udp])],
        "only the UDP endpoint's flows are cut"
    );
}

// ---------------------------------------------------------------------------------------------
// Capacity
// ---------------------------------------------------------------------------------------------

#[test]
fn too_many_tables_are_reported_with_the_limit() {
    let node = NodeConfig {
        max_tables: 2,
        ..node()
    };
    // a: cluster and local tables, b: one more.
    let services = state(vec![
        split_policies("a", 1, vec![local(10)]),
        service("b", 2, vec![local(20)]),
    ]);
    let err = MapContents::from_state(&services, &node, &MapContents::default())
        .expect_err("three tables in room for two");
    assert_eq!(err, CapacityError::TooManyTables { count: 3, limit: 2 });
    assert!(err.to_string().contains("maxTables"), "{err}");
    // Exactly at the limit is fine.
    build_on(
        &state(vec![split_policies("a", 1, vec![local(10)])]),
        &node,
        &MapContents::default(),
    );
}

#[test]
fn a_table_smaller_than_its_endpoints_is_reported_with_the_service() {
    let node = NodeConfig {
        maglev_table_size: 3,
        ..node()
    };
    let endpoints = vec![local(10), local(11), local(12), local(13)];
    let err = MapContents::from_state(
        &state(vec![service("big", 1, endpoints.clone())]),
        &node,
        &MapContents::default(),
    )
    .expect_err("four endpoints in a table of three");
    assert_eq!(
        err,
        CapacityError::TableTooSmall {
            service: "default/big".to_owned(),
            count: 4,
            size: 3,
        }
    );
    let message = err.to_string();
    assert!(
        message.contains("default/big") && message.contains("maglev.tableSize"),
        "{message}"
    );
    // As many endpoints as entries still fits.
    build_on(
        &state(vec![service("big", 1, endpoints[..3].to_vec())]),
        &node,
        &MapContents::default(),
    );
}

/// Contents as a restarted agent reads them back from pinned maps: everything the maps hold,
/// but no service port names.
fn without_names(contents: &MapContents) -> MapContents {
    MapContents {
        service_ids: std::collections::BTreeMap::new(),
        service_names: std::collections::BTreeMap::new(),
        ..contents.clone()
    }
}

#[test]
fn ids_read_back_from_the_maps_are_kept_by_matching_frontends() {
    // Ids 1 and 2 as built, then "web" swapped to id 2 by building in the other order first.
    let first = build(
        &state(vec![
            service("api", 2, vec![local(1)]),
            service("web", 1, vec![local(2)]),
        ]),
        &MapContents::default(),
    );
    let applied = build(
        &state(vec![
            service("web", 1, vec![local(2)]),
            service("api", 2, vec![local(1)]),
        ]),
        &first,
    );
    let adopted = without_names(&applied);
    // A new service port listed first would take id 1 if the frontends were not matched.
    let again = build(
        &state(vec![
            service("new", 3, vec![local(3)]),
            service("web", 1, vec![local(2)]),
            service("api", 2, vec![local(1)]),
        ]),
        &adopted,
    );
    assert_eq!(service_id(&again, "web"), service_id(&applied, "web"));
    assert_eq!(service_id(&again, "api"), service_id(&applied, "api"));
    assert_eq!(backend_id(&again, "web", 2), backend_id(&applied, "web", 2));
    let new_id = service_id(&again, "new");
    assert!(
        new_id != service_id(&applied, "web") && new_id != service_id(&applied, "api"),
        "a new service port must not take an id the maps still use: {new_id}"
    );
    // Only the new service port is written.
    let plan = diff(&adopted, &again);
    assert!(plan.remove_frontends.is_empty(), "{plan:?}");
    assert_eq!(
        written_frontends(&plan),
        BTreeSet::from([cluster_ip_key(3), node_port_key(3)])
    );
}

#[test]
fn an_id_read_back_is_not_given_to_two_service_ports() {
    let applied = build(
        &state(vec![service("web", 1, vec![local(2)])]),
        &MapContents::default(),
    );
    // "web" is split: its clusterIP now belongs to "a", its nodePort to "b".
    let mut a = service("a", 1, vec![local(2)]);
    a.frontends.truncate(1);
    let mut b = service("b", 1, vec![local(3)]);
    b.frontends.remove(0);
    let again = build(&state(vec![a, b]), &without_names(&applied));
    assert_eq!(service_id(&again, "a"), service_id(&applied, "web"));
    assert_ne!(service_id(&again, "b"), service_id(&applied, "web"));
}

#[test]
fn a_table_is_rebuilt_exactly_when_its_backends_or_maglev_settings_change() {
    let first = build(
        &state(vec![
            service("a", 1, vec![local(1), local(2)]),
            service("b", 2, vec![local(5), local(6)]),
        ]),
        &MapContents::default(),
    );
    let next = build(
        &state(vec![
            service("a", 1, vec![local(1), local(3)]),
            service("b", 2, vec![local(5), local(6)]),
        ]),
        &first,
    );
    let (a, b) = (cluster_table(&next, "a"), cluster_table(&next, "b"));
    assert_eq!(next.tables[&b], first.tables[&b], "b kept its table");
    assert_eq!(
        table_members(&next, a),
        BTreeSet::from([1, 3]),
        "a's follows it"
    );
    // What a reused table holds is what a fresh build over the same ids gives.
    let rebuilt = build(
        &state(vec![
            service("a", 1, vec![local(1), local(3)]),
            service("b", 2, vec![local(5), local(6)]),
        ]),
        &MapContents {
            tables: std::collections::BTreeMap::new(),
            ..next.clone()
        },
    );
    assert_eq!(rebuilt.tables, next.tables);
    // Another seed: every table is built again.
    let reseeded_node = NodeConfig {
        maglev_seed: 8,
        ..node()
    };
    let reseeded = build_on(
        &state(vec![
            service("a", 1, vec![local(1), local(3)]),
            service("b", 2, vec![local(5), local(6)]),
        ]),
        &reseeded_node,
        &next,
    );
    let fresh = build_on(
        &state(vec![
            service("a", 1, vec![local(1), local(3)]),
            service("b", 2, vec![local(5), local(6)]),
        ]),
        &reseeded_node,
        &MapContents {
            tables: std::collections::BTreeMap::new(),
            ..next.clone()
        },
    );
    assert_ne!(fresh.tables, next.tables, "the seed changes the tables");
    assert_eq!(reseeded.tables, fresh.tables);
}
