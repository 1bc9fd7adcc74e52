//! Tests of the config reader: real `kubectl` output, hand-written manifests, every kind of
//! problem (with where it is), and odd input that must not panic.

// YAML snippets are all written `r#"..."#`, whether or not they hold a `"`.
#![allow(clippy::needless_raw_string_hashes)]

use std::{fmt::Write as _, net::Ipv4Addr, path::PathBuf};

use super::{
    AgentSettings, Allocation, ConfigError, INPUT_NAME, Loaded, Location, MaglevSettings,
    PortRange, Problem, SnatSettings, load, parse, parse_port_range, read_objects, read_sources,
};
use crate::model::{
    AddressAllocation, Endpoint, EndpointState, Frontend, FrontendKind, Ipv4Cidr, Protocol,
    Selection, ServicePort, TrafficPolicy,
};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

const NODE_A: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 10);
const NODE_B: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 11);
const NODES: &[Ipv4Addr] = &[NODE_A, NODE_B];

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// Parses `yaml`, failing the test with every problem if it does not.
#[track_caller]
fn ok(yaml: &str) -> Loaded {
    match parse(yaml, NODES) {
        Ok(loaded) => loaded,
        Err(problems) => panic!("expected the config to parse, got:\n{}", lines(&problems)),
    }
}

/// Parses `yaml`, failing the test if it does not fail.
#[track_caller]
fn problems(yaml: &str) -> Vec<Problem> {
    match parse(yaml, NODES) {
        Ok(loaded) => panic!("expected problems, but it parsed: {:#?}", loaded.state),
        Err(problems) => {
            assert!(!problems.is_empty(), "Err with no problems");
            problems
        }
    }
}

fn lines(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Parses `yaml` expecting exactly one problem, and returns it.
#[track_caller]
fn only_problem(yaml: &str) -> Problem {
    let problems = problems(yaml);
    assert_eq!(
        problems.len(),
        1,
        "expected one problem, got:\n{}",
        lines(&problems)
    );
    problems.into_iter().next().unwrap()
}

/// Asserts that `problem` is at `document` (top level, not in a List), about `object`, in
/// `field`, and that its message contains every one of `message_parts`.
#[track_caller]
fn assert_problem(
    problem: &Problem,
    document: usize,
    object: Option<&str>,
    field: &str,
    message_parts: &[&str],
) {
    assert_eq!(
        problem.location,
        Location {
            file: INPUT_NAME.into(),
            document,
            item: None
        },
        "location of {problem}"
    );
    assert_eq!(problem.object.as_deref(), object, "object of {problem}");
    assert_eq!(problem.field, field, "field of {problem}");
    for part in message_parts {
        assert!(
            problem.message.contains(part),
            "message of {problem:?} should contain {part:?}"
        );
    }
}

/// The problem reported for `field`, failing the test if there is not exactly one.
#[track_caller]
fn problem_at<'a>(problems: &'a [Problem], field: &str) -> &'a Problem {
    let found: Vec<_> = problems.iter().filter(|p| p.field == field).collect();
    assert_eq!(
        found.len(),
        1,
        "expected one problem at {field}, got:\n{}",
        lines(problems)
    );
    found[0]
}

/// Asserts that some warning contains every one of `parts`.
#[track_caller]
fn assert_warned(loaded: &Loaded, parts: &[&str]) {
    assert!(
        loaded
            .warnings
            .iter()
            .any(|w| parts.iter().all(|part| w.contains(part))),
        "no warning contains all of {parts:?}; warnings: {:#?}",
        loaded.warnings
    );
}

/// The one service port of `service` (`namespace/name`) called `port_name`.
#[track_caller]
fn port<'a>(loaded: &'a Loaded, service: &str, port_name: &str) -> &'a ServicePort {
    let found: Vec<_> = loaded
        .state
        .service_ports
        .iter()
        .filter(|p| p.service == service && p.port_name == port_name)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one port {service}:{port_name}, got {:#?}",
        loaded.state.service_ports
    );
    found[0]
}

/// `(service, port name)` of every service port, in the order the state has them.
fn port_names(loaded: &Loaded) -> Vec<(&str, &str)> {
    loaded
        .state
        .service_ports
        .iter()
        .map(|p| (p.service.as_str(), p.port_name.as_str()))
        .collect()
}

fn fe(kind: FrontendKind, addr: &str, port: u16) -> Frontend {
    Frontend {
        kind,
        addr: ip(addr),
        port,
    }
}

/// `NodePort` frontends on every node.
fn node_ports(port: u16) -> Vec<Frontend> {
    NODES
        .iter()
        .map(|&addr| Frontend {
            kind: FrontendKind::NodePort,
            addr,
            port,
        })
        .collect()
}

/// Asserts the frontends of `port`, in any order (the state keeps them sorted).
#[track_caller]
fn assert_frontends(port: &ServicePort, expected: impl IntoIterator<Item = Frontend>) {
    let mut expected: Vec<_> = expected.into_iter().collect();
    expected.sort();
    assert_eq!(
        port.frontends,
        expected,
        "frontends of {}",
        port.display_name()
    );
}

/// A ready endpoint with no node; `EndpointExt` changes that.
fn ep(addr: &str, port: u16, pod: Option<&str>) -> Endpoint {
    Endpoint {
        addr: ip(addr),
        port,
        pod: pod.map(str::to_owned),
        node_name: None,
        state: EndpointState::Ready,
    }
}

trait EndpointExt {
    /// With `nodeName: node`.
    fn on(self, node: &str) -> Self;
    /// Serving while terminating, not ready.
    fn terminating(self) -> Self;
}

impl EndpointExt for Endpoint {
    fn on(self, node: &str) -> Self {
        Endpoint {
            node_name: Some(node.to_owned()),
            ..self
        }
    }

    fn terminating(self) -> Self {
        Endpoint {
            state: EndpointState::Terminating,
            ..self
        }
    }
}

/// Asserts the endpoints of `port`, in any order (the state keeps them sorted).
#[track_caller]
fn assert_endpoints(port: &ServicePort, expected: impl IntoIterator<Item = Endpoint>) {
    let mut expected: Vec<_> = expected.into_iter().collect();
    expected.sort();
    assert_eq!(
        port.endpoints,
        expected,
        "endpoints of {}",
        port.display_name()
    );
}

/// Endpoint addresses of `port`, ignoring ports and pods.
fn endpoint_addrs(port: &ServicePort) -> Vec<Ipv4Addr> {
    port.endpoints.iter().map(|e| e.addr).collect()
}

// ---------------------------------------------------------------------------------------------
// `kubectl get svc,endpointslices -A -o yaml`
// ---------------------------------------------------------------------------------------------

/// What `kubectl get svc,endpointslices -A -o yaml` prints for a small cluster (managedFields
/// and most annotations trimmed).
const KUBECTL_LIST: &str = r#"
apiVersion: v1
items:
- apiVersion: v1
  kind: Service
  metadata:
    creationTimestamp: "2024-05-01T09:12:44Z"
    labels:
      component: apiserver
      provider: kubernetes
    name: kubernetes
    namespace: default
    resourceVersion: "198"
    uid: 2b9d3c8e-6b1e-4a63-9d0c-0c3a6f1e7d11
  spec:
    clusterIP: 10.96.0.1
    clusterIPs:
    - 10.96.0.1
    internalTrafficPolicy: Cluster
    ipFamilies:
    - IPv4
    ipFamilyPolicy: SingleStack
    ports:
    - name: https
      port: 443
      protocol: TCP
      targetPort: 6443
    sessionAffinity: None
    type: ClusterIP
  status:
    loadBalancer: {}
- apiVersion: v1
  kind: Service
  metadata:
    annotations:
      prometheus.io/port: "9153"
      prometheus.io/scrape: "true"
    creationTimestamp: "2024-05-01T09:12:46Z"
    labels:
      k8s-app: kube-dns
      kubernetes.io/cluster-service: "true"
      kubernetes.io/name: CoreDNS
    name: kube-dns
    namespace: kube-system
    resourceVersion: "263"
    uid: 7a0e0c55-31c4-4b8e-bb56-1f0f4f5b0a2e
  spec:
    clusterIP: 10.96.0.10
    clusterIPs:
    - 10.96.0.10
    internalTrafficPolicy: Cluster
    ipFamilies:
    - IPv4
    ipFamilyPolicy: SingleStack
    ports:
    - name: dns
      port: 53
      protocol: UDP
      targetPort: 53
    - name: dns-tcp
      port: 53
      protocol: TCP
      targetPort: 53
    - name: metrics
      port: 9153
      protocol: TCP
      targetPort: 9153
    selector:
      k8s-app: kube-dns
    sessionAffinity: None
    type: ClusterIP
  status:
    loadBalancer: {}
- apiVersion: v1
  kind: Service
  metadata:
    annotations:
      kubectl.kubernetes.io/last-applied-configuration: |
        {"apiVersion":"v1","kind":"Service","metadata":{"annotations":{},"name":"web","namespace":"shop"},"spec":{"ports":[{"name":"http","port":80,"targetPort":"http"}],"selector":{"app":"web"},"type":"LoadBalancer"}}
    creationTimestamp: "2024-05-02T14:03:10Z"
    name: web
    namespace: shop
    resourceVersion: "48213"
    uid: c1f4b5de-9e0a-4f7d-8d62-5b3e2a9c4f00
  spec:
    allocateLoadBalancerNodePorts: true
    clusterIP: 10.96.12.34
    clusterIPs:
    - 10.96.12.34
    externalIPs:
    - 203.0.113.7
    externalTrafficPolicy: Cluster
    internalTrafficPolicy: Cluster
    ipFamilies:
    - IPv4
    ipFamilyPolicy: SingleStack
    ports:
    - name: http
      nodePort: 31080
      port: 80
      protocol: TCP
      targetPort: http
    - name: https
      nodePort: 31443
      port: 443
      protocol: TCP
      targetPort: 8443
    selector:
      app: web
    sessionAffinity: None
    type: LoadBalancer
  status:
    loadBalancer:
      ingress:
      - ip: 198.51.100.20
        ipMode: VIP
- apiVersion: v1
  kind: Service
  metadata:
    creationTimestamp: "2024-05-02T14:05:51Z"
    name: api
    namespace: shop
    resourceVersion: "48377"
    uid: 0d2f7a61-2c1b-4f33-a0b5-4a6de1c27e9b
  spec:
    clusterIP: 10.96.40.2
    clusterIPs:
    - 10.96.40.2
    externalTrafficPolicy: Cluster
    internalTrafficPolicy: Cluster
    ipFamilies:
    - IPv4
    ipFamilyPolicy: SingleStack
    ports:
    - nodePort: 30080
      port: 8080
      protocol: TCP
      targetPort: grpc
    selector:
      app: api
    sessionAffinity: ClientIP
    sessionAffinityConfig:
      clientIP:
        timeoutSeconds: 10800
    type: NodePort
  status:
    loadBalancer: {}
- addressType: IPv4
  apiVersion: discovery.k8s.io/v1
  endpoints:
  - addresses:
    - 192.168.1.10
    conditions:
      ready: true
      serving: true
      terminating: false
  kind: EndpointSlice
  metadata:
    creationTimestamp: "2024-05-01T09:12:44Z"
    generation: 1
    labels:
      kubernetes.io/service-name: kubernetes
    name: kubernetes
    namespace: default
    resourceVersion: "200"
    uid: 5e8a1d1f-0f0c-4c43-9b7e-52d6c2f0a3b4
  ports:
  - name: https
    port: 6443
    protocol: TCP
- addressType: IPv4
  apiVersion: discovery.k8s.io/v1
  endpoints:
  - addresses:
    - 10.244.0.3
    conditions:
      ready: true
      serving: true
      terminating: false
    nodeName: node-a
    targetRef:
      kind: Pod
      name: coredns-5dd5756b68-7xk2p
      namespace: kube-system
      uid: 8c0b2c6e-3d8e-4b9c-a6b1-4f2e1d7c9a01
    zone: zone-a
  - addresses:
    - 10.244.1.4
    conditions:
      ready: true
      serving: true
      terminating: false
    nodeName: node-b
    targetRef:
      kind: Pod
      name: coredns-5dd5756b68-q9w8z
      namespace: kube-system
      uid: 1e6a9f0b-7c5d-4e2f-8b3a-9d0c1b2a3f45
    zone: zone-b
  kind: EndpointSlice
  metadata:
    annotations:
      endpoints.kubernetes.io/last-change-trigger-time: "2024-05-01T09:13:20Z"
    creationTimestamp: "2024-05-01T09:12:46Z"
    generateName: kube-dns-
    generation: 3
    labels:
      endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
      k8s-app: kube-dns
      kubernetes.io/cluster-service: "true"
      kubernetes.io/name: CoreDNS
      kubernetes.io/service-name: kube-dns
    name: kube-dns-fv2lk
    namespace: kube-system
    ownerReferences:
    - apiVersion: v1
      blockOwnerDeletion: true
      controller: true
      kind: Service
      name: kube-dns
      uid: 7a0e0c55-31c4-4b8e-bb56-1f0f4f5b0a2e
    resourceVersion: "412"
    uid: 3f1e2d4c-5b6a-4798-8a9b-0c1d2e3f4a5b
  ports:
  - name: dns-tcp
    port: 53
    protocol: TCP
  - name: metrics
    port: 9153
    protocol: TCP
  - name: dns
    port: 53
    protocol: UDP
- addressType: IPv4
  apiVersion: discovery.k8s.io/v1
  endpoints:
  - addresses:
    - 10.244.1.17
    conditions:
      ready: true
      serving: true
      terminating: false
    hints:
      forZones:
      - name: zone-b
    nodeName: node-b
    targetRef:
      kind: Pod
      name: web-7f9c6d8b5-2kq4m
      namespace: shop
      uid: 6b2d9e1f-3a4c-4d5e-9f60-7a8b9c0d1e2f
    zone: zone-b
  - addresses:
    - 10.244.0.21
    conditions:
      ready: false
      serving: true
      terminating: true
    hints:
      forZones:
      - name: zone-a
    nodeName: node-a
    targetRef:
      kind: Pod
      name: web-7f9c6d8b5-old01
      namespace: shop
      uid: 2c3d4e5f-6a7b-4c8d-9e0f-1a2b3c4d5e6f
    zone: zone-a
  kind: EndpointSlice
  metadata:
    annotations:
      endpoints.kubernetes.io/last-change-trigger-time: "2024-05-02T14:20:02Z"
    creationTimestamp: "2024-05-02T14:03:10Z"
    generateName: web-
    generation: 7
    labels:
      endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
      kubernetes.io/service-name: web
    name: web-8xq2n
    namespace: shop
    ownerReferences:
    - apiVersion: v1
      blockOwnerDeletion: true
      controller: true
      kind: Service
      name: web
      uid: c1f4b5de-9e0a-4f7d-8d62-5b3e2a9c4f00
    resourceVersion: "50112"
    uid: 9a8b7c6d-5e4f-4a3b-2c1d-0e9f8a7b6c5d
  ports:
  - name: http
    port: 8080
    protocol: TCP
  - name: https
    port: 8443
    protocol: TCP
- addressType: IPv4
  apiVersion: discovery.k8s.io/v1
  endpoints:
  - addresses:
    - 10.244.0.22
    conditions:
      ready: true
      serving: true
      terminating: false
    hints:
      forZones:
      - name: zone-a
    nodeName: node-a
    targetRef:
      kind: Pod
      name: web-7f9c6d8b5-x8v7c
      namespace: shop
      uid: 4e5f6a7b-8c9d-4e0f-a1b2-c3d4e5f6a7b8
    zone: zone-a
  kind: EndpointSlice
  metadata:
    creationTimestamp: "2024-05-02T14:19:55Z"
    generateName: web-
    generation: 2
    labels:
      endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
      kubernetes.io/service-name: web
    name: web-m4d7r
    namespace: shop
    ownerReferences:
    - apiVersion: v1
      blockOwnerDeletion: true
      controller: true
      kind: Service
      name: web
      uid: c1f4b5de-9e0a-4f7d-8d62-5b3e2a9c4f00
    resourceVersion: "50140"
    uid: 1b2c3d4e-5f6a-4b7c-8d9e-0f1a2b3c4d5e
  ports:
  - name: http
    port: 8080
    protocol: TCP
  - name: https
    port: 8443
    protocol: TCP
- addressType: IPv4
  apiVersion: discovery.k8s.io/v1
  endpoints:
  - addresses:
    - 10.244.1.30
    conditions:
      ready: true
      serving: true
      terminating: false
    nodeName: node-b
    targetRef:
      kind: Pod
      name: api-6c8d9f7b4-p2m5n
      namespace: shop
      uid: 5f6a7b8c-9d0e-4f1a-b2c3-d4e5f6a7b8c9
    zone: zone-b
  kind: EndpointSlice
  metadata:
    creationTimestamp: "2024-05-02T14:05:51Z"
    generateName: api-
    generation: 2
    labels:
      endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
      kubernetes.io/service-name: api
    name: api-r7t2k
    namespace: shop
    ownerReferences:
    - apiVersion: v1
      blockOwnerDeletion: true
      controller: true
      kind: Service
      name: api
      uid: 0d2f7a61-2c1b-4f33-a0b5-4a6de1c27e9b
    resourceVersion: "48402"
    uid: 6a7b8c9d-0e1f-4a2b-c3d4-e5f6a7b8c9d0
  ports:
  - name: ""
    port: 9090
    protocol: TCP
kind: List
metadata:
  resourceVersion: ""
"#;

#[test]
fn kubectl_list_gives_every_service_port_sorted() {
    let loaded = ok(KUBECTL_LIST);
    assert_eq!(
        port_names(&loaded),
        [
            ("default/kubernetes", "https"),
            ("kube-system/kube-dns", "dns"),
            ("kube-system/kube-dns", "dns-tcp"),
            ("kube-system/kube-dns", "metrics"),
            ("shop/api", ""),
            ("shop/web", "http"),
            ("shop/web", "https"),
        ]
    );
    assert!(
        loaded.warnings.is_empty(),
        "warnings: {:#?}",
        loaded.warnings
    );
}

#[test]
fn kubectl_list_cluster_ip_service() {
    let loaded = ok(KUBECTL_LIST);
    let https = port(&loaded, "default/kubernetes", "https");
    assert_eq!(https.protocol, Protocol::Tcp);
    assert_frontends(https, [fe(FrontendKind::ClusterIp, "10.96.0.1", 443)]);
    // targetPort 6443 comes from the slice; no targetRef, so no pod.
    assert_endpoints(https, [ep("192.168.1.10", 6443, None)]);
}

#[test]
fn kubectl_list_load_balancer_service_has_every_kind_of_frontend() {
    let loaded = ok(KUBECTL_LIST);

    let http = port(&loaded, "shop/web", "http");
    assert_eq!(http.protocol, Protocol::Tcp);
    let mut expected = vec![
        fe(FrontendKind::ClusterIp, "10.96.12.34", 80),
        fe(FrontendKind::LoadBalancer, "198.51.100.20", 80),
        fe(FrontendKind::ExternalIp, "203.0.113.7", 80),
    ];
    expected.extend(node_ports(31080));
    assert_frontends(http, expected);

    let https = port(&loaded, "shop/web", "https");
    let mut expected = vec![
        fe(FrontendKind::ClusterIp, "10.96.12.34", 443),
        fe(FrontendKind::LoadBalancer, "198.51.100.20", 443),
        fe(FrontendKind::ExternalIp, "203.0.113.7", 443),
    ];
    expected.extend(node_ports(31443));
    assert_frontends(https, expected);
}

#[test]
fn kubectl_list_endpoints_are_joined_across_slices_with_the_slice_port() {
    let loaded = ok(KUBECTL_LIST);
    // `targetPort: http` is resolved by Kubernetes; the slice carries the number (8080). The
    // two ready pods come from two slices; the terminating one (serving, not ready) is kept as
    // a stand-in for when none is ready.
    let pods = |port: u16| {
        [
            ep("10.244.0.21", port, Some("web-7f9c6d8b5-old01"))
                .on("node-a")
                .terminating(),
            ep("10.244.0.22", port, Some("web-7f9c6d8b5-x8v7c")).on("node-a"),
            ep("10.244.1.17", port, Some("web-7f9c6d8b5-2kq4m")).on("node-b"),
        ]
    };
    assert_endpoints(port(&loaded, "shop/web", "http"), pods(8080));
    assert_endpoints(port(&loaded, "shop/web", "https"), pods(8443));
}

#[test]
fn kubectl_list_multi_port_service_matches_ports_by_name_and_protocol() {
    let loaded = ok(KUBECTL_LIST);
    let pods = |port: u16| {
        [
            ep("10.244.0.3", port, Some("coredns-5dd5756b68-7xk2p")).on("node-a"),
            ep("10.244.1.4", port, Some("coredns-5dd5756b68-q9w8z")).on("node-b"),
        ]
    };

    let dns = port(&loaded, "kube-system/kube-dns", "dns");
    assert_eq!(dns.protocol, Protocol::Udp);
    assert_frontends(dns, [fe(FrontendKind::ClusterIp, "10.96.0.10", 53)]);
    assert_endpoints(dns, pods(53));

    let dns_tcp = port(&loaded, "kube-system/kube-dns", "dns-tcp");
    assert_eq!(dns_tcp.protocol, Protocol::Tcp);
    assert_frontends(dns_tcp, [fe(FrontendKind::ClusterIp, "10.96.0.10", 53)]);
    assert_endpoints(dns_tcp, pods(53));

    // Listed first in the Service, second in the slice: matched by name, not position.
    let metrics = port(&loaded, "kube-system/kube-dns", "metrics");
    assert_eq!(metrics.protocol, Protocol::Tcp);
    assert_frontends(metrics, [fe(FrontendKind::ClusterIp, "10.96.0.10", 9153)]);
    assert_endpoints(metrics, pods(9153));
}

#[test]
fn kubectl_list_node_port_service() {
    let loaded = ok(KUBECTL_LIST);
    let api = port(&loaded, "shop/api", "");
    assert_eq!(api.display_name(), "shop/api");
    let mut expected = vec![fe(FrontendKind::ClusterIp, "10.96.40.2", 8080)];
    expected.extend(node_ports(30080));
    assert_frontends(api, expected);
    assert_endpoints(
        api,
        [ep("10.244.1.30", 9090, Some("api-6c8d9f7b4-p2m5n")).on("node-b")],
    );
}

#[test]
fn node_ports_are_served_on_no_address_without_node_ips() {
    let loaded = parse(KUBECTL_LIST, &[]).unwrap();
    let api = port(&loaded, "shop/api", "");
    assert_frontends(api, [fe(FrontendKind::ClusterIp, "10.96.40.2", 8080)]);
}

#[test]
fn kubectl_list_with_mixed_objects_and_problems_reports_list_items() {
    let yaml = r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: ConfigMap
  metadata: {name: settings, namespace: shop}
- apiVersion: v1
  kind: Service
  metadata: {name: web, namespace: shop}
  spec:
    clusterIP: 10.96.0.300
    ports: [{port: 80}]
"#;
    let problems = problems(yaml);
    assert_eq!(problems.len(), 1, "{}", lines(&problems));
    let problem = &problems[0];
    assert_eq!(
        problem.location,
        Location {
            file: INPUT_NAME.into(),
            document: 1,
            item: Some(1)
        }
    );
    assert_eq!(problem.object.as_deref(), Some("Service shop/web"));
    assert_eq!(problem.field, "spec.clusterIP");
    assert_eq!(
        problem.to_string(),
        "<input>, document 1, items[1] (Service shop/web), field spec.clusterIP: \"10.96.0.300\" is not \
         an IPv4 address, \"None\" or empty"
    );
}

#[test]
fn list_problems() {
    let problem = only_problem("apiVersion: v1\nkind: List\n");
    assert_problem(
        &problem,
        1,
        Some("List"),
        "items",
        &["missing or not a list"],
    );

    let problem = only_problem("apiVersion: v1\nkind: List\nitems: {a: 1}\n");
    assert_problem(&problem, 1, Some("List"), "items", &["not a list"]);

    let problems = problems(
        r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: List
  items: []
"#,
    );
    assert_eq!(problems.len(), 1, "{}", lines(&problems));
    assert_eq!(
        problems[0].location,
        Location {
            file: INPUT_NAME.into(),
            document: 1,
            item: Some(0)
        }
    );
    assert_eq!(problems[0].field, "kind");
    assert!(problems[0].message.contains("List inside a List"));
}

#[test]
fn empty_list_is_an_empty_state() {
    let loaded = ok("apiVersion: v1\nkind: List\nitems: []\nmetadata:\n  resourceVersion: \"\"\n");
    assert!(loaded.state.service_ports.is_empty());
    assert!(loaded.warnings.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Hand-written manifests
// ---------------------------------------------------------------------------------------------

#[test]
fn separate_documents_and_default_namespace() {
    let yaml = r#"
# A Service without a namespace is in `default`, as kubectl applies it.
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  clusterIP: 10.0.0.10
  ports:
  - port: 80
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
ports:
- port: 8080
endpoints:
- addresses: [10.1.0.1]
  conditions: {ready: true}
- addresses: [10.1.0.2]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-2
  namespace: default
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
ports:
- port: 8080
  protocol: TCP
endpoints:
- addresses: [10.1.0.3]
  conditions: {ready: false}
- addresses: [10.1.0.4]
  conditions: {}
"#;
    let loaded = ok(yaml);
    assert_eq!(port_names(&loaded), [("default/web", "")]);
    let web = port(&loaded, "default/web", "");
    assert_eq!(web.protocol, Protocol::Tcp, "protocol defaults to TCP");
    assert_frontends(web, [fe(FrontendKind::ClusterIp, "10.0.0.10", 80)]);
    // 10.1.0.2 and 10.1.0.4 have no `ready`, which counts as ready; 10.1.0.3 is not ready.
    assert_endpoints(
        web,
        [
            ep("10.1.0.1", 8080, None),
            ep("10.1.0.2", 8080, None),
            ep("10.1.0.4", 8080, None),
        ],
    );
    assert!(
        loaded.warnings.is_empty(),
        "warnings: {:#?}",
        loaded.warnings
    );
}

#[test]
fn documents_may_come_in_any_order_and_empty_documents_are_ignored() {
    let yaml = r#"
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: dns-1
  namespace: infra
  labels: {kubernetes.io/service-name: dns}
addressType: IPv4
ports: [{name: dns, port: 5353, protocol: UDP}]
endpoints: [{addresses: [10.2.0.1], targetRef: {kind: Pod, name: dns-0}}]
---
---
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: infra}
spec:
  clusterIP: 10.0.0.53
  ports: [{name: dns, port: 53, protocol: UDP}]
...
"#;
    let loaded = ok(yaml);
    let dns = port(&loaded, "infra/dns", "dns");
    assert_eq!(dns.protocol, Protocol::Udp);
    assert_frontends(dns, [fe(FrontendKind::ClusterIp, "10.0.0.53", 53)]);
    assert_endpoints(dns, [ep("10.2.0.1", 5353, Some("dns-0"))]);
}

#[test]
fn slices_in_another_namespace_or_for_another_port_do_not_match() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: a}
spec:
  clusterIP: 10.0.0.10
  ports: [{name: http, port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: b, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.1.0.1]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-2, namespace: a, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports:
- {name: metrics, port: 9090}
- {name: http, port: 8080, protocol: UDP}
endpoints: [{addresses: [10.1.0.2]}]
"#;
    let loaded = ok(yaml);
    assert!(port(&loaded, "a/web", "http").endpoints.is_empty());
    assert_warned(
        &loaded,
        &["document 2", "EndpointSlice b/web-1", "Service b/web"],
    );
}

#[test]
fn first_address_of_an_endpoint_is_used() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {clusterIP: 10.0.0.10, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.1.0.1, 10.1.0.9]}]
"#;
    let loaded = ok(yaml);
    assert_eq!(
        endpoint_addrs(port(&loaded, "default/web", "")),
        [ip("10.1.0.1")]
    );
}

#[test]
fn the_same_endpoint_in_two_slices_is_listed_once() {
    let slice = |name: &str| {
        format!(
            r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{port: 8080}}]
endpoints: [{{addresses: [10.1.0.1], targetRef: {{kind: Pod, name: web-0}}}}]
"#
        )
    };
    let yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\n\
         spec: {{clusterIP: 10.0.0.10, ports: [{{port: 80}}]}}\n---{}---{}",
        slice("web-1"),
        slice("web-2")
    );
    let loaded = ok(&yaml);
    assert_endpoints(
        port(&loaded, "default/web", ""),
        [ep("10.1.0.1", 8080, Some("web-0"))],
    );
}

#[test]
fn service_without_slices_has_no_endpoints() {
    let loaded = ok(r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {clusterIP: 10.0.0.10, ports: [{port: 80}]}
"#);
    let web = port(&loaded, "default/web", "");
    assert_frontends(web, [fe(FrontendKind::ClusterIp, "10.0.0.10", 80)]);
    assert!(web.endpoints.is_empty());
}

#[test]
fn slice_without_endpoints_as_kubectl_prints_it() {
    // `endpoints` and `ports` have no `omitempty` in the API, so a Service scaled to zero has
    // a slice with `endpoints: null`, and a Service without ports one with `ports: null`.
    let loaded = ok(r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.0.0.10, ports: [{name: http, port: 80}]}
---
addressType: IPv4
apiVersion: discovery.k8s.io/v1
endpoints: null
kind: EndpointSlice
metadata:
  labels: {kubernetes.io/service-name: web}
  name: web-abcde
  namespace: shop
ports:
- name: http
  port: 8080
  protocol: TCP
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec: {clusterIP: None}
---
addressType: IPv4
apiVersion: discovery.k8s.io/v1
endpoints:
- addresses: [10.1.0.5]
  conditions: {ready: true}
kind: EndpointSlice
metadata:
  labels: {kubernetes.io/service-name: db}
  name: db-fghij
  namespace: shop
ports: null
"#);
    assert_eq!(port_names(&loaded), [("shop/web", "http")]);
    assert!(port(&loaded, "shop/web", "http").endpoints.is_empty());
}

#[test]
fn null_fields_count_as_unset() {
    let loaded = ok(r#"
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace:
  labels:
spec:
  type:
  clusterIP: 10.0.0.10
  externalIPs:
  ports:
  - port: 80
    protocol:
status:
"#);
    assert_frontends(
        port(&loaded, "default/web", ""),
        [fe(FrontendKind::ClusterIp, "10.0.0.10", 80)],
    );
}

#[test]
fn cluster_ip_service_ignores_node_ports_and_load_balancer_status() {
    let loaded = ok(r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.0.0.10
  ports: [{port: 80, nodePort: 31000}]
status:
  loadBalancer:
    ingress: [{ip: 198.51.100.1}]
"#);
    assert_frontends(
        port(&loaded, "default/web", ""),
        [fe(FrontendKind::ClusterIp, "10.0.0.10", 80)],
    );
}

#[test]
fn load_balancer_hostname_ingress_is_skipped_with_a_warning() {
    let loaded = ok(r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: LoadBalancer
  clusterIP: 10.0.0.10
  ports: [{port: 80, nodePort: 30080}]
status:
  loadBalancer:
    ingress:
    - hostname: abc.elb.example.com
    - ip: 198.51.100.1
"#);
    let mut expected = vec![
        fe(FrontendKind::ClusterIp, "10.0.0.10", 80),
        fe(FrontendKind::LoadBalancer, "198.51.100.1", 80),
    ];
    expected.extend(node_ports(30080));
    assert_frontends(port(&loaded, "default/web", ""), expected);
    assert_warned(&loaded, &["Service default/web", "abc.elb.example.com"]);
}

#[test]
fn load_balancer_without_node_ports_when_not_allocated() {
    // With `allocateLoadBalancerNodePorts: false` the API server assigns no node ports.
    let loaded = ok(r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: LoadBalancer
  allocateLoadBalancerNodePorts: false
  clusterIP: 10.0.0.10
  ports: [{name: http, port: 80}, {name: dns, port: 53, protocol: UDP, nodePort: 30053}]
status:
  loadBalancer:
    ingress: [{ip: 198.51.100.1}]
"#);
    assert_frontends(
        port(&loaded, "default/web", "http"),
        [
            fe(FrontendKind::ClusterIp, "10.0.0.10", 80),
            fe(FrontendKind::LoadBalancer, "198.51.100.1", 80),
        ],
    );
    let mut expected = vec![
        fe(FrontendKind::ClusterIp, "10.0.0.10", 53),
        fe(FrontendKind::LoadBalancer, "198.51.100.1", 53),
    ];
    expected.extend(node_ports(30053));
    assert_frontends(port(&loaded, "default/web", "dns"), expected);
}

#[test]
fn a_service_port_may_reach_one_address_in_two_ways() {
    // The load balancer's address is also listed in externalIPs: one Service port, not a clash.
    let loaded = ok(r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: LoadBalancer
  clusterIP: 10.0.0.10
  externalIPs: [198.51.100.1]
  ports: [{port: 80, nodePort: 30080}]
status:
  loadBalancer:
    ingress: [{ip: 198.51.100.1}]
"#);
    let web = port(&loaded, "default/web", "");
    assert!(
        web.frontends
            .contains(&fe(FrontendKind::LoadBalancer, "198.51.100.1", 80))
    );
    assert!(
        web.frontends
            .contains(&fe(FrontendKind::ExternalIp, "198.51.100.1", 80))
    );
}

#[test]
fn same_port_number_with_tcp_and_udp_is_not_a_clash() {
    let loaded = ok(r#"
apiVersion: v1
kind: Service
metadata: {name: dns}
spec:
  clusterIP: 10.0.0.53
  ports: [{name: udp, port: 53, protocol: UDP}, {name: tcp, port: 53, protocol: TCP}]
"#);
    assert_eq!(port(&loaded, "default/dns", "udp").protocol, Protocol::Udp);
    assert_eq!(port(&loaded, "default/dns", "tcp").protocol, Protocol::Tcp);
}

// ---------------------------------------------------------------------------------------------
// Skipped with a warning
// ---------------------------------------------------------------------------------------------

#[test]
fn external_name_service_is_skipped_with_a_warning() {
    let loaded = ok(r#"
apiVersion: v1
kind: Service
metadata: {name: mail, namespace: shop}
spec:
  type: ExternalName
  externalName: mail.example.com
  ports: [{port: 25}]
"#);
    assert!(loaded.state.service_ports.is_empty());
    assert_warned(
        &loaded,
        &["document 1", "Service shop/mail", "ExternalName"],
    );
}

#[test]
fn headless_service_is_skipped_with_its_endpoints() {
    let loaded = ok(r#"
apiVersion: v1
kind: Service
metadata: {name: db}
spec:
  clusterIP: None
  ports: [{name: pg, port: 5432}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-1, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
ports: [{name: pg, port: 5432}]
endpoints: [{addresses: [10.1.0.7]}]
"#);
    assert!(loaded.state.service_ports.is_empty());
    assert_eq!(loaded.warnings.len(), 1, "{:#?}", loaded.warnings);
    assert_warned(&loaded, &["Service default/db", "headless", "skipped"]);
}

#[test]
fn sctp_port_is_skipped_with_a_warning() {
    let loaded = ok(r#"
apiVersion: v1
kind: Service
metadata: {name: sig}
spec:
  clusterIP: 10.0.0.20
  ports:
  - {name: sctp, port: 3868, protocol: SCTP}
  - {name: tcp, port: 3868, protocol: TCP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: sig-1, labels: {kubernetes.io/service-name: sig}}
addressType: IPv4
ports: [{name: sctp, port: 3868, protocol: SCTP}, {name: tcp, port: 3868, protocol: TCP}]
endpoints: [{addresses: [10.1.0.8]}]
"#);
    assert_eq!(port_names(&loaded), [("default/sig", "tcp")]);
    assert_endpoints(
        port(&loaded, "default/sig", "tcp"),
        [ep("10.1.0.8", 3868, None)],
    );
    assert_warned(&loaded, &["Service default/sig", "spec.ports[0]", "SCTP"]);
}

#[test]
fn unknown_kinds_are_skipped_with_a_warning() {
    let loaded = ok(r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec: {replicas: 3}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: web}
data: {}
---
apiVersion: v1beta1
kind: Service
metadata: {name: old}
"#);
    assert!(loaded.state.service_ports.is_empty());
    assert_warned(&loaded, &["document 1", "apps/v1 Deployment", "skipped"]);
    assert_warned(&loaded, &["document 2", "v1 ConfigMap", "skipped"]);
    assert_warned(&loaded, &["document 3", "v1beta1 Service", "skipped"]);
}

#[test]
fn ipv6_and_fqdn_slices_are_skipped_with_a_warning() {
    let loaded = ok(r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {clusterIP: 10.0.0.10, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v6, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{port: 8080}]
endpoints: [{addresses: ["fd00::1"]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-fqdn, labels: {kubernetes.io/service-name: web}}
addressType: FQDN
ports: [{port: 8080}]
endpoints: [{addresses: [web.example.com]}]
"#);
    assert!(port(&loaded, "default/web", "").endpoints.is_empty());
    assert_warned(
        &loaded,
        &["document 2", "EndpointSlice default/web-v6", "IPv6"],
    );
    assert_warned(
        &loaded,
        &["document 3", "EndpointSlice default/web-fqdn", "FQDN"],
    );
}

#[test]
fn ipv6_cluster_ip_is_skipped_with_a_warning() {
    let loaded = ok(r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {clusterIP: "fd00:10:96::1", ports: [{port: 80}]}
"#);
    assert!(port(&loaded, "default/web", "").frontends.is_empty());
    assert_warned(&loaded, &["Service default/web", "fd00:10:96::1", "IPv6"]);
}

#[test]
fn slice_without_its_service_is_warned_about() {
    let loaded = ok(r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: ghost-abc
  namespace: shop
  labels: {kubernetes.io/service-name: ghost}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.1.0.1]}]
"#);
    assert!(loaded.state.service_ports.is_empty());
    assert_warned(
        &loaded,
        &[
            "document 1",
            "EndpointSlice shop/ghost-abc",
            "Service shop/ghost",
            "not in the config",
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// Problems: each with its document, object, field and message
// ---------------------------------------------------------------------------------------------

/// A valid Service for document 1, so that a problem can be placed in document 2.
const GOOD_SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: ok}
spec: {clusterIP: 10.0.0.1, ports: [{port: 80}]}
"#;

/// `GOOD_SERVICE`, then `yaml` as document 2.
fn second(yaml: &str) -> String {
    format!("{GOOD_SERVICE}---\n{yaml}")
}

#[test]
fn invalid_yaml() {
    let problem = only_problem(&second(
        "apiVersion: v1\nkind: [Service\nmetadata: {name: x}\n",
    ));
    assert_problem(&problem, 2, None, "", &["not valid YAML", "line"]);

    let problem = only_problem("apiVersion: v1\n  kind: Service\n");
    assert_problem(&problem, 1, None, "", &["not valid YAML"]);

    let problem = only_problem("key: \"unterminated\n");
    assert_problem(&problem, 1, None, "", &["not valid YAML"]);
}

#[test]
fn missing_api_version_or_kind() {
    let problem = only_problem(&second("kind: Service\nmetadata: {name: web}\n"));
    assert_problem(
        &problem,
        2,
        None,
        "apiVersion",
        &["missing", "apiVersion and kind"],
    );

    let problem = only_problem(&second("apiVersion: v1\nmetadata: {name: web}\n"));
    assert_problem(
        &problem,
        2,
        None,
        "kind",
        &["missing", "apiVersion and kind"],
    );

    let problem = only_problem("metadata: {name: web}\n");
    assert_problem(&problem, 1, None, "apiVersion", &["missing"]);
}

#[test]
fn missing_name() {
    let problem = only_problem(&second(
        "apiVersion: v1\nkind: Service\nspec: {ports: [{port: 80}]}\n",
    ));
    assert_problem(
        &problem,
        2,
        Some("Service without a name"),
        "metadata.name",
        &["missing"],
    );
}

#[test]
fn bad_cluster_ip() {
    let problem = only_problem(&second(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
         spec: {clusterIP: 10.0.0.256, ports: [{port: 80}]}\n",
    ));
    assert_problem(
        &problem,
        2,
        Some("Service shop/web"),
        "spec.clusterIP",
        &["\"10.0.0.256\"", "not an IPv4 address"],
    );
}

#[test]
fn bad_external_ip() {
    let problem = only_problem(&second(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n\
         spec: {clusterIP: 10.0.0.2, externalIPs: [203.0.113.7, lb.example.com], ports: [{port: 80}]}\n",
    ));
    assert_problem(
        &problem,
        2,
        Some("Service default/web"),
        "spec.externalIPs[1]",
        &["\"lb.example.com\"", "not an IPv4 address"],
    );
}

#[test]
fn bad_load_balancer_ingress_ip() {
    let problem = only_problem(
        r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {type: LoadBalancer, clusterIP: 10.0.0.2, ports: [{port: 80, nodePort: 30080}]}
status: {loadBalancer: {ingress: [{ip: 198.51.100.1}, {ip: "2001:db8::1"}]}}
"#,
    );
    assert_problem(
        &problem,
        1,
        Some("Service default/web"),
        "status.loadBalancer.ingress[1].ip",
        &["2001:db8::1", "not an IPv4 address"],
    );
}

#[test]
fn node_port_out_of_range() {
    let problem = only_problem(&second(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n\
         spec: {type: NodePort, clusterIP: 10.0.0.2, ports: [{port: 80, nodePort: 80}]}\n",
    ));
    assert_problem(
        &problem,
        2,
        Some("Service default/web"),
        "spec.ports[0].nodePort",
        &["80 is outside the node port range 30000-32767"],
    );

    for bad in ["29999", "32768", "70000", "-1"] {
        let problem = only_problem(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\n\
             spec: {{type: LoadBalancer, ports: [{{port: 80, nodePort: {bad}}}]}}\n",
        ));
        assert_problem(
            &problem,
            1,
            Some("Service default/web"),
            "spec.ports[0].nodePort",
            &[bad, "outside the node port range"],
        );
    }
}

#[test]
fn omitted_node_port_is_assigned() {
    let loaded = ok(r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  clusterIP: 10.0.0.2
  ports:
  - {name: a, port: 80, nodePort: 30080}
  - {name: b, port: 81}
"#);
    let a = port(&loaded, "default/web", "a");
    assert_eq!((a.node_port, a.node_port_assigned), (Some(30080), false));
    let b = port(&loaded, "default/web", "b");
    let assigned = b.node_port.expect("port b gets a node port");
    assert!(b.node_port_assigned);
    assert!((30000..=32767).contains(&assigned), "{assigned}");
    assert_ne!(assigned, 30080);
    assert_frontends(
        b,
        [fe(FrontendKind::ClusterIp, "10.0.0.2", 81)]
            .into_iter()
            .chain(node_ports(assigned)),
    );
}

#[test]
fn unknown_service_type() {
    let problem = only_problem(&second(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n\
         spec: {type: Ingress, ports: [{port: 80}]}\n",
    ));
    assert_problem(
        &problem,
        2,
        Some("Service default/web"),
        "spec.type",
        &[
            "unknown Service type \"Ingress\"",
            "ClusterIP, NodePort, LoadBalancer",
        ],
    );
}

#[test]
fn unknown_protocol() {
    let problem = only_problem(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n\
         spec: {ports: [{port: 80, protocol: tcp}]}\n",
    );
    assert_problem(
        &problem,
        1,
        Some("Service default/web"),
        "spec.ports[0].protocol",
        &["unknown protocol \"tcp\"", "TCP or UDP"],
    );
}

#[test]
fn service_port_out_of_range() {
    let problems = problems(&second(
        r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.0.0.2
  ports:
  - {name: zero, port: 0}
  - {name: big, port: 70000}
  - {name: negative, port: -5}
  - {name: fine, port: 65535}
"#,
    ));
    assert_eq!(problems.len(), 3, "{}", lines(&problems));
    for (field, text) in [
        ("spec.ports[0].port", "0 is not a port"),
        ("spec.ports[1].port", "70000 is not a port"),
        ("spec.ports[2].port", "-5 is not a port"),
    ] {
        assert_problem(
            problem_at(&problems, field),
            2,
            Some("Service default/web"),
            field,
            &[text, "1-65535"],
        );
    }
}

#[test]
fn duplicate_port_name() {
    let problem = only_problem(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n\
         spec: {ports: [{name: http, port: 80}, {name: http, port: 81}]}\n",
    );
    assert_problem(
        &problem,
        1,
        Some("Service default/web"),
        "spec.ports[1].name",
        &["\"http\" is used twice"],
    );
}

#[test]
fn wrong_field_type_names_the_field() {
    let problem = only_problem(&second(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n\
         spec: {clusterIP: 10.0.0.2, ports: [{port: \"http\"}]}\n",
    ));
    assert_problem(
        &problem,
        2,
        Some("Service default/web"),
        "spec.ports[0].port",
        &["invalid type", "http"],
    );

    let problem = only_problem(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {externalIPs: 1.2.3.4}\n",
    );
    assert_problem(
        &problem,
        1,
        Some("Service default/web"),
        "spec.externalIPs",
        &["invalid type"],
    );

    let problem = only_problem(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {name: s, labels: {kubernetes.io/service-name: web}}\n\
         addressType: IPv4\nendpoints: [{addresses: [10.1.0.1], conditions: {ready: maybe}}]\n",
    );
    assert_problem(
        &problem,
        1,
        Some("EndpointSlice default/s"),
        "endpoints[0].conditions.ready",
        &["invalid type"],
    );
}

#[test]
fn missing_required_field() {
    let problem = only_problem(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{name: http}]}\n",
    );
    assert_problem(
        &problem,
        1,
        Some("Service default/web"),
        "spec.ports[0]",
        &["missing field `port`"],
    );

    let problem = only_problem(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {name: s, labels: {kubernetes.io/service-name: web}}\n",
    );
    assert_problem(
        &problem,
        1,
        Some("EndpointSlice default/s"),
        "",
        &["missing field `addressType`"],
    );
}

/// An `EndpointSlice` for Service `web` in document 2, with `rest` after its metadata.
fn slice(rest: &str) -> String {
    second(&format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: web-1, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}\n\
         {rest}"
    ))
}

#[test]
fn bad_endpoint_address() {
    let problem = only_problem(&slice(
        "addressType: IPv4\nports: [{port: 8080}]\n\
         endpoints: [{addresses: [10.1.0.1]}, {addresses: [10.1.0.2, 10.1.0]}]\n",
    ));
    assert_problem(
        &problem,
        2,
        Some("EndpointSlice shop/web-1"),
        "endpoints[1].addresses[1]",
        &["\"10.1.0\"", "not an IPv4 address"],
    );

    // Checked even when the endpoint is not ready.
    let problem = only_problem(&slice(
        "addressType: IPv4\nports: [{port: 8080}]\n\
         endpoints: [{addresses: [pod.local], conditions: {ready: false}}]\n",
    ));
    assert_problem(
        &problem,
        2,
        Some("EndpointSlice shop/web-1"),
        "endpoints[0].addresses[0]",
        &["\"pod.local\""],
    );
}

#[test]
fn bad_slice_port() {
    let problems = problems(&slice(
        "addressType: IPv4\n\
         ports: [{name: a, port: 0}, {name: b}, {name: c, port: 8080, protocol: ICMP}]\n",
    ));
    assert_eq!(problems.len(), 3, "{}", lines(&problems));
    for (field, text) in [
        ("ports[0].port", "not a port"),
        ("ports[1].port", "missing"),
        ("ports[2].protocol", "unknown protocol \"ICMP\""),
    ] {
        assert_problem(
            problem_at(&problems, field),
            2,
            Some("EndpointSlice shop/web-1"),
            field,
            &[text],
        );
    }
}

#[test]
fn unknown_address_type() {
    let problem = only_problem(&slice("addressType: IP\n"));
    assert_problem(
        &problem,
        2,
        Some("EndpointSlice shop/web-1"),
        "addressType",
        &["unknown address type \"IP\"", "IPv4, IPv6 or FQDN"],
    );
}

#[test]
fn missing_service_name_label() {
    let problem = only_problem(&second(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {name: web-1, labels: {app: web}}\naddressType: IPv4\n",
    ));
    assert_problem(
        &problem,
        2,
        Some("EndpointSlice default/web-1"),
        "metadata.labels[kubernetes.io/service-name]",
        &["missing", "names the Service"],
    );
}

#[test]
fn duplicate_frontend_names_both_services() {
    let problem = only_problem(
        r#"
apiVersion: v1
kind: Service
metadata: {name: first, namespace: a}
spec: {clusterIP: 10.0.0.10, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: second, namespace: b}
spec:
  clusterIP: 10.0.0.20
  externalIPs: [10.0.0.10]
  ports: [{name: web, port: 8080}, {name: http, port: 80}]
"#,
    );
    assert_problem(
        &problem,
        2,
        Some("Service b/second"),
        "spec.ports[1]",
        &[
            "10.0.0.10:80/TCP",
            "already served by Service a/first spec.ports[0]",
        ],
    );
}

#[test]
fn duplicate_node_port_names_both_services() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: first}
spec: {type: NodePort, ports: [{port: 80, nodePort: 30080}]}
---
apiVersion: v1
kind: Service
metadata: {name: second}
spec: {type: NodePort, ports: [{port: 81, nodePort: 30080}]}
"#;
    // Once, whether or not node addresses are known (not once per node address).
    for node_ips in [NODES, &[]] {
        let problems = parse(yaml, node_ips).unwrap_err();
        assert_eq!(problems.len(), 1, "{}", lines(&problems));
        assert_problem(
            &problems[0],
            2,
            Some("Service default/second"),
            "spec.ports[0].nodePort",
            &[
                "30080/TCP is already the node port of Service default/first \
                 spec.ports[0].nodePort",
                "omit the field to have a free one assigned",
            ],
        );
    }
}

#[test]
fn two_ports_of_one_service_on_the_same_frontend_clash() {
    let problem = only_problem(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n\
         spec: {clusterIP: 10.0.0.10, ports: [{name: a, port: 80}, {name: b, port: 80}]}\n",
    );
    assert_problem(
        &problem,
        1,
        Some("Service default/web"),
        "spec.ports[1]",
        &[
            "10.0.0.10:80/TCP",
            "already served by Service default/web spec.ports[0]",
        ],
    );
}

#[test]
fn every_problem_is_reported_at_once() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  clusterIP: 10.0.0.999
  externalIPs: [nope]
  ports:
  - {name: a, port: 0, nodePort: 30080}
  - {name: b, port: 80, nodePort: 80}
---
kind: Service
metadata: {name: anonymous}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: orphan}
addressType: IPv4
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [300.1.1.1]}]
"#;
    let problems = problems(yaml);
    let got: Vec<(usize, &str)> = problems
        .iter()
        .map(|p| (p.location.document, p.field.as_str()))
        .collect();
    for expected in [
        (1, "spec.clusterIP"),
        (1, "spec.externalIPs[0]"),
        (1, "spec.ports[0].port"),
        (1, "spec.ports[1].nodePort"),
        (2, "apiVersion"),
        (3, "metadata.labels[kubernetes.io/service-name]"),
        (4, "endpoints[0].addresses[0]"),
    ] {
        assert!(
            got.contains(&expected),
            "{expected:?} missing from:\n{}",
            lines(&problems)
        );
    }
    assert_eq!(problems.len(), 7, "{}", lines(&problems));
}

#[test]
fn warnings_do_not_hide_problems() {
    let problems = problems(
        r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: x}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {clusterIP: bad, ports: [{port: 80}]}
"#,
    );
    assert_eq!(problems.len(), 1, "{}", lines(&problems));
    assert_eq!(problems[0].field, "spec.clusterIP");
}

// ---------------------------------------------------------------------------------------------
// ConfigError display
// ---------------------------------------------------------------------------------------------

/// A file under the temp directory that is removed when dropped.
struct TempFile(std::path::PathBuf);

impl TempFile {
    fn new(contents: &str) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "lb-userspace-config-test-{}-{}-{}.yaml",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        ));
        std::fs::write(&path, contents).unwrap();
        Self(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn invalid_config_error_names_the_file_and_every_problem() {
    let file = TempFile::new(
        r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  type: NodePort
  clusterIP: 10.0.0.256
  ports: [{port: 80, nodePort: 80}]
---
kind: Service
"#,
    );
    let error = load(&file.0, NODES, &[]).unwrap_err();
    let ConfigError::Invalid {
        path: named,
        problems,
    } = &error
    else {
        panic!("expected ConfigError::Invalid, got {error:?}");
    };
    assert_eq!(named, &file.0);
    assert_eq!(problems.len(), 3, "{}", lines(problems));

    let text = error.to_string();
    let f = file.0.display();
    let expected = format!(
        "config {f} has 3 problems:\n\
         \x20 - {f}, document 1 (Service shop/web), field spec.clusterIP: \"10.0.0.256\" is \
         not an IPv4 address, \"None\" or empty\n\
         \x20 - {f}, document 1 (Service shop/web), field spec.ports[0].nodePort: 80 is outside \
         the node port range 30000-32767 (nodePortRange of AgentSettings); use a port in it, or \
         omit the field to have one assigned\n\
         \x20 - {f}, document 2, field apiVersion: missing; every document must be a \
         Kubernetes object with apiVersion and kind (v1 Service, discovery.k8s.io/v1 \
         EndpointSlice, v1 Endpoints or lb-agent/v1alpha1 AgentSettings)",
    );
    assert_eq!(text, expected);
}

#[test]
fn one_problem_is_singular() {
    let file = TempFile::new("kind: Service\n");
    let text = load(&file.0, NODES, &[]).unwrap_err().to_string();
    assert!(
        text.starts_with(&format!(
            "config {0} has 1 problem:\n  - {0}, document 1",
            file.0.display()
        )),
        "{text}"
    );
}

#[test]
fn load_file_reads_a_valid_file() {
    let file = TempFile::new(KUBECTL_LIST);
    let loaded = load(&file.0, NODES, &[]).unwrap();
    assert_eq!(loaded.state, ok(KUBECTL_LIST).state);
}

#[test]
fn unreadable_file_is_a_read_error() {
    let file = TempFile::new("");
    let missing = file.0.with_extension("missing");
    let error = load(&missing, NODES, &[]).unwrap_err();
    assert!(matches!(error, ConfigError::Read { .. }), "{error:?}");
    let text = error.to_string();
    assert!(text.contains("cannot read config"), "{text}");
    assert!(text.contains(&missing.display().to_string()), "{text}");
}

// ---------------------------------------------------------------------------------------------
// Odd input never panics
// ---------------------------------------------------------------------------------------------

#[test]
fn odd_input_does_not_panic() {
    let deep_sequence = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let deep_mapping: String = (0..200)
        .flat_map(|depth| ["  ".repeat(depth), "a:\n".to_owned()])
        .collect();
    let deep_list_item = format!(
        "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {{name: x}}\n  spec: {}{}\n",
        "{a: ".repeat(500),
        "}".repeat(500)
    );
    let binary: String = (0u8..=255).map(char::from).collect();
    let long_line = "x".repeat(1 << 20);
    let inputs: Vec<&str> = vec![
        "",
        " ",
        "\n\n\n",
        "---",
        "---\n---\n---",
        "...",
        "~",
        "null",
        "42",
        "hello",
        "\"just a string\"",
        "- a\n- b\n",
        "[1, 2, 3]",
        "{}",
        "[]",
        "!!binary aGVsbG8=",
        "? complex key\n: value\n",
        "[1, 2]: 3\napiVersion: v1\n",
        "apiVersion: 1\nkind: 2\n",
        "apiVersion: [v1]\nkind: {Service: 1}\n",
        "apiVersion: v1\nkind: Service\n",
        "apiVersion: v1\nkind: Service\nmetadata: []\nspec: 5\n",
        "apiVersion: v1\nkind: Service\nmetadata: {name: [x]}\n",
        "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {ports: [1, 2]}\n",
        "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {ports: {port: 80}}\n",
        "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {ports: [{port: 1e99}]}\n",
        "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {ports: [{port: 99999999999999999999999}]}\n",
        "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {type: NodePort, ports: [{port: 1, nodePort: -99999999999}]}\n",
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s}\naddressType: 7\n",
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s, labels: {kubernetes.io/service-name: 5}}\naddressType: IPv4\n",
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s, labels: {kubernetes.io/service-name: x}}\naddressType: IPv4\nendpoints: [{addresses: []}, {}, 3]\n",
        "apiVersion: v1\nkind: List\nitems: [1, \"two\", [3], null, {}]\n",
        "apiVersion: v1\nkind: List\nitems: null\n",
        "a: &anchor [1, 2]\nb: *anchor\n",
        "a: *undefined\n",
        "a: &a [*a]\n",
        "key: value\nkey: value\n",
        "\t\tkind: Service",
        "{{{{{{{{",
        "]]]]",
        ": : : :",
        "%YAML 1.2\n---\napiVersion: v1\n",
        "%BOGUS directive\n---\n",
        "\u{feff}apiVersion: v1\nkind: Service\nmetadata: {name: bom}\n",
        "\u{0}\u{1}\u{2}\u{3}",
        "\u{fffd}\u{fffd}\u{202e}",
        &deep_sequence,
        &deep_mapping,
        &deep_list_item,
        &binary,
        &long_line,
    ];
    for input in inputs {
        let result = std::panic::catch_unwind(|| parse(input, NODES));
        let shown: String = input.chars().take(60).collect();
        let result = result.unwrap_or_else(|_| panic!("parse panicked on {shown:?}"));
        if let Err(problems) = result {
            assert!(!problems.is_empty(), "Err without problems for {shown:?}");
            for problem in &problems {
                // Every problem renders, and names a document that exists.
                let _ = problem.to_string();
                assert!(problem.location.document >= 1, "{problem}");
            }
        }
    }
}

#[test]
fn empty_input_is_an_empty_state() {
    for input in ["", "---", "---\n---\n", "# only a comment\n", "~"] {
        let loaded = parse(input, NODES)
            .unwrap_or_else(|problems| panic!("{input:?}: {}", lines(&problems)));
        assert!(loaded.state.service_ports.is_empty(), "{input:?}");
        assert!(loaded.warnings.is_empty(), "{input:?}");
    }
}

#[test]
fn non_object_documents_are_problems() {
    for input in [
        "42",
        "hello",
        "[1, 2]",
        "- apiVersion: v1\n  kind: Service\n",
        "{}",
    ] {
        let problem = only_problem(input);
        assert_problem(&problem, 1, None, "apiVersion", &["missing"]);
    }
}

#[test]
fn the_same_service_twice_is_an_error_naming_both_documents() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}
"#;
    let problems = parse(yaml, &[]).expect_err("a Service defined twice must be refused");
    assert_eq!(problems.len(), 1, "{problems:?}");
    let problem = &problems[0];
    assert_eq!(problem.location.document, 2);
    assert_eq!(problem.object.as_deref(), Some("Service default/web"));
    assert_eq!(problem.field, "metadata.name");
    assert!(
        problem.message.contains("document 1"),
        "{}",
        problem.message
    );
}

// ---------------------------------------------------------------------------------------------
// Endpoint nodes and conditions
// ---------------------------------------------------------------------------------------------

/// Service `default/web` (one unnamed port) and a slice for it whose `endpoints` are `endpoints`
/// (a YAML flow sequence).
fn web_with_endpoints(endpoints: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\n\
         spec: {{clusterIP: 10.0.0.10, ports: [{{port: 80}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: web-1, labels: {{kubernetes.io/service-name: web}}}}\n\
         addressType: IPv4\nports: [{{port: 8080}}]\nendpoints: {endpoints}\n"
    )
}

#[test]
fn node_name_is_read() {
    let loaded = ok(&web_with_endpoints(
        "[{addresses: [10.1.0.1], nodeName: ip-10-0-0-1.ec2.internal}, {addresses: [10.1.0.2]}, \
         {addresses: [10.1.0.3], nodeName: null}]",
    ));
    assert_endpoints(
        port(&loaded, "default/web", ""),
        [
            ep("10.1.0.1", 8080, None).on("ip-10-0-0-1.ec2.internal"),
            ep("10.1.0.2", 8080, None),
            ep("10.1.0.3", 8080, None),
        ],
    );
}

#[test]
fn bad_node_name() {
    for name in [
        r#""""#,
        "Node-A",
        "node_a",
        "-node",
        "node-",
        "node..a",
        ".node",
        "node.",
        "nöde",
        &"a".repeat(254),
    ] {
        let problem = only_problem(&web_with_endpoints(&format!(
            "[{{addresses: [10.1.0.1]}}, {{addresses: [10.1.0.2], nodeName: {name}}}]"
        )));
        assert_problem(
            &problem,
            2,
            Some("EndpointSlice default/web-1"),
            "endpoints[1].nodeName",
            &[
                "is not a node name",
                "lowercase letters, digits, '-' and '.'",
            ],
        );
    }
    // The longest name the API server allows, and names of digits only, are fine.
    let long = format!("{}.b", "a".repeat(251));
    ok(&web_with_endpoints(&format!(
        "[{{addresses: [10.1.0.1], nodeName: {long}}}, {{addresses: [10.1.0.2], nodeName: \"42\"}}]"
    )));
}

#[test]
fn endpoint_conditions_as_kube_proxy_reads_them() {
    // (conditions, what becomes of the endpoint). Unset `ready` and `serving` read as true,
    // unset `terminating` as false.
    let table: &[(&str, Option<EndpointState>)] = &[
        ("{}", Some(EndpointState::Ready)),
        ("{ready: true}", Some(EndpointState::Ready)),
        (
            "{ready: null, serving: null, terminating: null}",
            Some(EndpointState::Ready),
        ),
        (
            "{ready: true, serving: true, terminating: false}",
            Some(EndpointState::Ready),
        ),
        // Ready says it all, even with odd companions.
        ("{ready: true, serving: false}", Some(EndpointState::Ready)),
        (
            "{ready: true, terminating: true}",
            Some(EndpointState::Ready),
        ),
        ("{serving: false}", Some(EndpointState::Ready)),
        ("{terminating: true}", Some(EndpointState::Ready)),
        // The fallback: serving while terminating, not ready.
        (
            "{ready: false, serving: true, terminating: true}",
            Some(EndpointState::Terminating),
        ),
        (
            "{ready: false, terminating: true}",
            Some(EndpointState::Terminating),
        ),
        // Not ready and not a terminating server: never used.
        ("{ready: false}", None),
        ("{ready: false, serving: true}", None),
        ("{ready: false, serving: true, terminating: false}", None),
        ("{ready: false, serving: false}", None),
        ("{ready: false, serving: false, terminating: true}", None),
        ("{ready: false, serving: false, terminating: false}", None),
    ];
    for (conditions, expected) in table {
        let loaded = ok(&web_with_endpoints(&format!(
            "[{{addresses: [10.1.0.1], conditions: {conditions}}}]"
        )));
        let got: Vec<_> = port(&loaded, "default/web", "")
            .endpoints
            .iter()
            .map(|e| e.state)
            .collect();
        assert_eq!(
            got,
            expected.iter().copied().collect::<Vec<_>>(),
            "{conditions}"
        );
    }
}

/// Service `default/web` and one slice per entry of `endpoints`, each holding that one endpoint.
fn web_with_slices(endpoints: &[&str]) -> String {
    let mut yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n\
                    spec: {clusterIP: 10.0.0.10, ports: [{port: 80}]}\n"
        .to_owned();
    for (i, endpoint) in endpoints.iter().enumerate() {
        let _ = write!(
            yaml,
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: web-{i}, labels: {{kubernetes.io/service-name: web}}}}\n\
             addressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{endpoint}]\n"
        );
    }
    yaml
}

/// Parses `web_with_slices(endpoints)` in the given order and reversed, asserts that both give
/// the same endpoints, and returns them.
#[track_caller]
fn endpoints_in_any_order(endpoints: &[&str]) -> Vec<Endpoint> {
    let forward = ok(&web_with_slices(endpoints));
    let mut reversed = endpoints.to_vec();
    reversed.reverse();
    let backward = ok(&web_with_slices(&reversed));
    let forward = port(&forward, "default/web", "").endpoints.clone();
    assert_eq!(
        forward,
        port(&backward, "default/web", "").endpoints,
        "document order changed the result"
    );
    forward
}

#[test]
fn the_same_address_ready_and_terminating_is_ready() {
    // An endpoint that moved between slices, seen in both with different conditions.
    let got = endpoints_in_any_order(&[
        "{addresses: [10.1.0.1], conditions: {ready: false, serving: true, terminating: true}, \
         nodeName: node-a, targetRef: {name: web-0}}",
        "{addresses: [10.1.0.1], nodeName: node-a, targetRef: {name: web-0}}",
    ]);
    assert_eq!(got, [ep("10.1.0.1", 8080, Some("web-0")).on("node-a")]);
}

#[test]
fn an_address_taken_over_by_a_new_pod_is_not_served_by_the_old_one() {
    // The pod network gave the terminating pod's address to a new pod that is not ready yet:
    // the address is the new pod's, so neither serves until it is ready.
    let got = endpoints_in_any_order(&[
        "{addresses: [10.1.0.1], conditions: {ready: false, serving: true, terminating: true}, \
         targetRef: {name: old}}",
        "{addresses: [10.1.0.1], conditions: {ready: false, serving: false, terminating: false}, \
         targetRef: {name: new}}",
    ]);
    assert!(got.is_empty(), "{got:?}");
}

#[test]
fn duplicates_in_the_same_state_keep_one_whatever_the_order() {
    let got = endpoints_in_any_order(&[
        "{addresses: [10.1.0.1], conditions: {ready: false, terminating: true}, \
         targetRef: {name: web-b}, nodeName: node-b}",
        "{addresses: [10.1.0.1], conditions: {ready: false, terminating: true}, \
         targetRef: {name: web-a}, nodeName: node-a}",
        "{addresses: [10.1.0.2], targetRef: {name: web-c}}",
        "{addresses: [10.1.0.2]}",
    ]);
    assert_eq!(
        got,
        [
            ep("10.1.0.1", 8080, Some("web-a"))
                .on("node-a")
                .terminating(),
            ep("10.1.0.2", 8080, None),
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// Service settings: traffic policies, session affinity, source ranges, backend selection
// ---------------------------------------------------------------------------------------------

/// Service `default/web` of `type` with two ports (`http` and `dns`), node ports, externalIPs
/// when `external_ips`, and `extra` lines added to its spec (indented by two spaces).
fn web_service(service_type: &str, external_ips: bool, extra: &str) -> String {
    let mut yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  type: {service_type}\n  \
         clusterIP: 10.0.0.10\n  ports:\n  - {{name: http, port: 80, nodePort: 30080}}\n  \
         - {{name: dns, port: 53, protocol: UDP, nodePort: 30053}}\n"
    );
    if external_ips {
        yaml.push_str("  externalIPs: [203.0.113.7]\n");
    }
    for line in extra.lines() {
        yaml.push_str("  ");
        yaml.push_str(line);
        yaml.push('\n');
    }
    yaml
}

/// `web_service`, with `annotations` (a YAML flow mapping) in its metadata.
fn annotated_web_service(service_type: &str, annotations: &str, extra: &str) -> String {
    web_service(service_type, false, extra).replacen(
        "metadata:\n  name: web\n",
        &format!("metadata:\n  name: web\n  annotations: {annotations}\n"),
        1,
    )
}

/// Both ports of `web_service`: every setting is the Service's, so they must agree.
#[track_caller]
fn web_ports(loaded: &Loaded) -> [&ServicePort; 2] {
    let http = port(loaded, "default/web", "http");
    let dns = port(loaded, "default/web", "dns");
    for (a, b, what) in [
        (
            format!("{:?}", http.external_policy),
            format!("{:?}", dns.external_policy),
            "external_policy",
        ),
        (
            format!("{:?}", http.internal_policy),
            format!("{:?}", dns.internal_policy),
            "internal_policy",
        ),
        (
            format!("{:?}", http.affinity_timeout_seconds),
            format!("{:?}", dns.affinity_timeout_seconds),
            "affinity_timeout_seconds",
        ),
        (
            format!("{:?}", http.source_ranges),
            format!("{:?}", dns.source_ranges),
            "source_ranges",
        ),
        (
            format!("{:?}", http.selection),
            format!("{:?}", dns.selection),
            "selection",
        ),
    ] {
        assert_eq!(a, b, "{what} differs between the ports");
    }
    [http, dns]
}

fn cidr(addr: &str, prefix_len: u8) -> Ipv4Cidr {
    Ipv4Cidr {
        addr: ip(addr),
        prefix_len,
    }
}

#[test]
fn settings_default_as_the_api_server_defaults_them() {
    for (service_type, external_ips) in [
        ("ClusterIP", false),
        ("ClusterIP", true),
        ("NodePort", false),
        ("LoadBalancer", false),
    ] {
        let loaded = ok(&web_service(service_type, external_ips, ""));
        for p in web_ports(&loaded) {
            assert_eq!(p.external_policy, TrafficPolicy::Cluster, "{service_type}");
            assert_eq!(p.internal_policy, TrafficPolicy::Cluster, "{service_type}");
            assert_eq!(p.affinity_timeout_seconds, None, "{service_type}");
            assert!(p.source_ranges.is_empty(), "{service_type}");
            assert_eq!(p.selection, Selection::Maglev, "{service_type}");
        }
        assert!(loaded.warnings.is_empty(), "{:#?}", loaded.warnings);
    }
}

#[test]
fn every_setting_applies_to_every_port() {
    let loaded = ok(&annotated_web_service(
        "LoadBalancer",
        "{lb-agent/backend-selection: random}",
        "externalTrafficPolicy: Local\ninternalTrafficPolicy: Local\nsessionAffinity: ClientIP\n\
         sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}\n\
         loadBalancerSourceRanges: [203.0.113.0/24, 198.51.100.7/32]",
    ));
    for p in web_ports(&loaded) {
        assert_eq!(p.external_policy, TrafficPolicy::Local);
        assert_eq!(p.internal_policy, TrafficPolicy::Local);
        assert_eq!(p.affinity_timeout_seconds, Some(600));
        assert_eq!(
            p.source_ranges,
            [cidr("198.51.100.7", 32), cidr("203.0.113.0", 24)]
        );
        assert_eq!(p.selection, Selection::Random);
    }
    assert!(loaded.warnings.is_empty(), "{:#?}", loaded.warnings);
}

#[test]
fn kubectl_list_settings() {
    let loaded = ok(KUBECTL_LIST);
    let api = port(&loaded, "shop/api", "");
    assert_eq!(api.affinity_timeout_seconds, Some(10800));
    assert_eq!(api.external_policy, TrafficPolicy::Cluster);
    let web = port(&loaded, "shop/web", "http");
    assert_eq!(web.affinity_timeout_seconds, None);
    assert_eq!(web.internal_policy, TrafficPolicy::Cluster);
}

#[test]
fn external_traffic_policy() {
    for (service_type, external_ips) in [
        ("NodePort", false),
        ("LoadBalancer", false),
        ("LoadBalancer", true),
        // A ClusterIP Service is reachable from outside through its externalIPs.
        ("ClusterIP", true),
    ] {
        for (value, expected) in [
            ("Local", TrafficPolicy::Local),
            ("Cluster", TrafficPolicy::Cluster),
            // Go cannot tell an empty string from unset.
            (r#""""#, TrafficPolicy::Cluster),
            ("null", TrafficPolicy::Cluster),
        ] {
            let loaded = ok(&web_service(
                service_type,
                external_ips,
                &format!("externalTrafficPolicy: {value}"),
            ));
            for p in web_ports(&loaded) {
                assert_eq!(p.external_policy, expected, "{service_type} {value}");
                assert_eq!(p.internal_policy, TrafficPolicy::Cluster);
            }
        }
    }
    // Unset (or empty) on a ClusterIP Service without externalIPs is fine.
    ok(&web_service(
        "ClusterIP",
        false,
        r#"externalTrafficPolicy: """#,
    ));
}

#[test]
fn external_traffic_policy_problems() {
    for value in ["Global", "local", "OnlyLocal", "Cluster "] {
        let problem = only_problem(&web_service(
            "NodePort",
            false,
            &format!("externalTrafficPolicy: {value:?}"),
        ));
        assert_problem(
            &problem,
            1,
            Some("Service default/web"),
            "spec.externalTrafficPolicy",
            &[
                &format!("unknown external traffic policy {value:?}"),
                "use Cluster or Local",
            ],
        );
    }
    // Where nothing outside reaches the Service, any value is refused, valid or not.
    for value in ["Local", "Cluster", "Global"] {
        let problem = only_problem(&web_service(
            "ClusterIP",
            false,
            &format!("externalTrafficPolicy: {value}"),
        ));
        assert_problem(
            &problem,
            1,
            Some("Service default/web"),
            "spec.externalTrafficPolicy",
            &[
                &format!("{value:?}"),
                "may only be set when `type` is 'NodePort' or 'LoadBalancer'",
                "externalIPs",
            ],
        );
    }
}

#[test]
fn internal_traffic_policy() {
    for service_type in ["ClusterIP", "NodePort", "LoadBalancer"] {
        for (value, expected) in [
            ("Local", TrafficPolicy::Local),
            ("Cluster", TrafficPolicy::Cluster),
            ("null", TrafficPolicy::Cluster),
        ] {
            let loaded = ok(&web_service(
                service_type,
                false,
                &format!("internalTrafficPolicy: {value}"),
            ));
            for p in web_ports(&loaded) {
                assert_eq!(p.internal_policy, expected, "{service_type} {value}");
                assert_eq!(p.external_policy, TrafficPolicy::Cluster);
            }
        }
    }
}

#[test]
fn internal_traffic_policy_problems() {
    // A pointer in the API, so an empty string is a value, and not a valid one.
    for value in ["", "local", "Global", "Topology"] {
        let problem = only_problem(&web_service(
            "ClusterIP",
            false,
            &format!("internalTrafficPolicy: {value:?}"),
        ));
        assert_problem(
            &problem,
            1,
            Some("Service default/web"),
            "spec.internalTrafficPolicy",
            &[
                &format!("unknown internal traffic policy {value:?}"),
                "use Cluster or Local",
            ],
        );
    }
}

#[test]
fn session_affinity() {
    for (extra, expected) in [
        ("sessionAffinity: None", None),
        (r#"sessionAffinity: """#, None),
        ("sessionAffinity: null", None),
        ("sessionAffinity: None\nsessionAffinityConfig: null", None),
        // The API server fills in whatever is missing on the way to the timeout.
        ("sessionAffinity: ClientIP", Some(10800)),
        (
            "sessionAffinity: ClientIP\nsessionAffinityConfig: null",
            Some(10800),
        ),
        (
            "sessionAffinity: ClientIP\nsessionAffinityConfig: {}",
            Some(10800),
        ),
        (
            "sessionAffinity: ClientIP\nsessionAffinityConfig: {clientIP: {}}",
            Some(10800),
        ),
        (
            "sessionAffinity: ClientIP\nsessionAffinityConfig: {clientIP: {timeoutSeconds: null}}",
            Some(10800),
        ),
        (
            "sessionAffinity: ClientIP\nsessionAffinityConfig: {clientIP: {timeoutSeconds: 1}}",
            Some(1),
        ),
        (
            "sessionAffinity: ClientIP\nsessionAffinityConfig: {clientIP: {timeoutSeconds: 86400}}",
            Some(86400),
        ),
    ] {
        let loaded = ok(&web_service("ClusterIP", false, extra));
        for p in web_ports(&loaded) {
            assert_eq!(p.affinity_timeout_seconds, expected, "{extra}");
        }
    }
}

#[test]
fn session_affinity_problems() {
    for value in ["clientip", "ClientIp", "Sticky", "none"] {
        let problem = only_problem(&web_service(
            "ClusterIP",
            false,
            &format!("sessionAffinity: {value}"),
        ));
        assert_problem(
            &problem,
            1,
            Some("Service default/web"),
            "spec.sessionAffinity",
            &[
                &format!("unknown session affinity {value:?}"),
                "use None or ClientIP",
            ],
        );
    }

    for timeout in ["0", "-1", "86401", "4294967296", "-9223372036854775808"] {
        let problem = only_problem(&web_service(
            "ClusterIP",
            false,
            &format!(
                "sessionAffinity: ClientIP\n\
                 sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {timeout}}}}}"
            ),
        ));
        assert_problem(
            &problem,
            1,
            Some("Service default/web"),
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
            &[&format!("{timeout} is out of range"), "use 1-86400 seconds"],
        );
    }

    for extra in [
        "sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}",
        "sessionAffinity: None\nsessionAffinityConfig: {}",
        r#"sessionAffinity: ""
sessionAffinityConfig: {clientIP: {}}"#,
    ] {
        let problem = only_problem(&web_service("ClusterIP", false, extra));
        assert_problem(
            &problem,
            1,
            Some("Service default/web"),
            "spec.sessionAffinityConfig",
            &["must not be set when sessionAffinity is None", "ClientIP"],
        );
    }

    // Not a number at all: the type error names the field.
    let problem = only_problem(&web_service(
        "ClusterIP",
        false,
        "sessionAffinity: ClientIP\nsessionAffinityConfig: {clientIP: {timeoutSeconds: soon}}",
    ));
    assert_problem(
        &problem,
        1,
        Some("Service default/web"),
        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
        &["invalid type"],
    );
}

#[test]
fn load_balancer_source_ranges() {
    let loaded = ok(&web_service(
        "LoadBalancer",
        false,
        // Padding is allowed (a historical accident the API server keeps), the order does not
        // matter and duplicates count once.
        "loadBalancerSourceRanges: [\"10.0.0.0/8\", \" 203.0.113.0/24 \", 0.0.0.0/0, \
         192.0.2.1/32, 10.0.0.0/8]",
    ));
    for p in web_ports(&loaded) {
        assert_eq!(
            p.source_ranges,
            [
                cidr("0.0.0.0", 0),
                cidr("10.0.0.0", 8),
                cidr("192.0.2.1", 32),
                cidr("203.0.113.0", 24)
            ]
        );
    }
    assert!(loaded.warnings.is_empty(), "{:#?}", loaded.warnings);

    // `null` and `[]` are unset.
    for value in ["null", "[]"] {
        let loaded = ok(&web_service(
            "LoadBalancer",
            false,
            &format!("loadBalancerSourceRanges: {value}"),
        ));
        assert!(web_ports(&loaded)[0].source_ranges.is_empty());
    }
}

#[test]
fn source_range_with_host_bits_is_masked_with_a_warning() {
    let loaded = ok(&web_service(
        "LoadBalancer",
        false,
        "loadBalancerSourceRanges: [203.0.113.0/24, 10.1.2.3/8]",
    ));
    for p in web_ports(&loaded) {
        assert_eq!(
            p.source_ranges,
            [cidr("10.0.0.0", 8), cidr("203.0.113.0", 24)]
        );
    }
    assert_warned(
        &loaded,
        &[
            "document 1 (Service default/web)",
            "spec.loadBalancerSourceRanges[1]",
            "\"10.1.2.3/8\"",
            "host bits",
            "10.0.0.0/8",
        ],
    );
}

#[test]
fn ipv6_source_ranges_are_skipped_with_a_warning() {
    let loaded = ok(&web_service(
        "LoadBalancer",
        false,
        "loadBalancerSourceRanges: [\"2001:db8::/32\", 203.0.113.0/24]",
    ));
    assert_eq!(
        web_ports(&loaded)[0].source_ranges,
        [cidr("203.0.113.0", 24)]
    );
    assert_warned(
        &loaded,
        &[
            "spec.loadBalancerSourceRanges[0]",
            "\"2001:db8::/32\"",
            "IPv6",
            "not serve yet; skipped",
        ],
    );
    assert_eq!(loaded.warnings.len(), 1, "{:#?}", loaded.warnings);

    // With nothing IPv4 left, nothing restricts IPv4 clients: say so.
    let loaded = ok(&web_service(
        "LoadBalancer",
        false,
        "loadBalancerSourceRanges: [\"2001:db8::/32\", \"::/0\"]",
    ));
    assert!(web_ports(&loaded)[0].source_ranges.is_empty());
    assert_warned(&loaded, &["spec.loadBalancerSourceRanges[1]", "IPv6"]);
    assert_warned(&loaded, &["no IPv4 source range is left", "not restricted"]);
}

#[test]
fn bad_source_ranges() {
    let bad = [
        "",
        "10.0.0.0",
        "10.0.0.0/",
        "/8",
        "10.0.0.0/33",
        "10.0.0.0/+8",
        "10.0.0.0/-1",
        "10.0.0.0/8/8",
        "10.0.0.256/8",
        "10.0.0/8",
        "010.0.0.0/8",
        "10.0.0.0/ 8",
        "10.0.0.0/999999999999",
        "2001:db8::/129",
        "2001:db8::g/64",
        "example.com/24",
        "10.0.0.0/8,10.1.0.0/16",
    ];
    let list = bad
        .iter()
        .map(|b| format!("{b:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let problems = problems(&web_service(
        "LoadBalancer",
        false,
        &format!("loadBalancerSourceRanges: [203.0.113.0/24, {list}]"),
    ));
    assert_eq!(problems.len(), bad.len(), "{}", lines(&problems));
    for (i, value) in bad.iter().enumerate() {
        let field = format!("spec.loadBalancerSourceRanges[{}]", i + 1);
        assert_problem(
            problem_at(&problems, &field),
            1,
            Some("Service default/web"),
            &field,
            &[
                &format!("{:?} is not a CIDR", value.trim()),
                "use an IPv4 network such as 203.0.113.0/24",
            ],
        );
    }
}

#[test]
fn source_ranges_only_on_load_balancers() {
    for (service_type, external_ips) in [
        ("ClusterIP", false),
        ("ClusterIP", true),
        ("NodePort", false),
    ] {
        let problem = only_problem(&web_service(
            service_type,
            external_ips,
            "loadBalancerSourceRanges: [203.0.113.0/24]",
        ));
        assert_problem(
            &problem,
            1,
            Some("Service default/web"),
            "spec.loadBalancerSourceRanges",
            &["may only be used when `type` is 'LoadBalancer'"],
        );

        // Even an empty annotation is refused there.
        for value in [r#""""#, "203.0.113.0/24"] {
            let problem = only_problem(&annotated_web_service(
                service_type,
                &format!("{{service.beta.kubernetes.io/load-balancer-source-ranges: {value}}}"),
                if external_ips {
                    "externalIPs: [203.0.113.7]"
                } else {
                    ""
                },
            ));
            assert_problem(
                &problem,
                1,
                Some("Service default/web"),
                "metadata.annotations[service.beta.kubernetes.io/load-balancer-source-ranges]",
                &["may only be used when `type` is 'LoadBalancer'"],
            );
        }
    }
}

#[test]
fn source_ranges_annotation() {
    for (value, expected) in [
        (
            r#""203.0.113.0/24,10.0.0.0/8""#,
            vec![cidr("10.0.0.0", 8), cidr("203.0.113.0", 24)],
        ),
        (
            r#"" 203.0.113.0/24 , 10.0.0.0/8 ""#,
            vec![cidr("10.0.0.0", 8), cidr("203.0.113.0", 24)],
        ),
        (r#""192.0.2.9/32""#, vec![cidr("192.0.2.9", 32)]),
        (r#""""#, vec![]),
        (r#""  ""#, vec![]),
    ] {
        let loaded = ok(&annotated_web_service(
            "LoadBalancer",
            &format!("{{service.beta.kubernetes.io/load-balancer-source-ranges: {value}}}"),
            "",
        ));
        for p in web_ports(&loaded) {
            assert_eq!(p.source_ranges, expected, "{value}");
        }
    }

    // The field wins; the annotation is then not even looked at.
    let loaded = ok(&annotated_web_service(
        "LoadBalancer",
        "{service.beta.kubernetes.io/load-balancer-source-ranges: \"nonsense\"}",
        "loadBalancerSourceRanges: [198.51.100.0/24]",
    ));
    assert_eq!(
        web_ports(&loaded)[0].source_ranges,
        [cidr("198.51.100.0", 24)]
    );

    // Host bits and IPv6 in the annotation are treated as in the field.
    let loaded = ok(&annotated_web_service(
        "LoadBalancer",
        "{service.beta.kubernetes.io/load-balancer-source-ranges: \"10.1.2.3/16,fd00::/8\"}",
        "",
    ));
    assert_eq!(web_ports(&loaded)[0].source_ranges, [cidr("10.1.0.0", 16)]);
    let field = "metadata.annotations[service.beta.kubernetes.io/load-balancer-source-ranges]";
    assert_warned(&loaded, &[field, "\"10.1.2.3/16\"", "host bits"]);
    assert_warned(&loaded, &[field, "\"fd00::/8\"", "IPv6"]);
}

#[test]
fn bad_source_ranges_annotation() {
    let problems = problems(&annotated_web_service(
        "LoadBalancer",
        "{service.beta.kubernetes.io/load-balancer-source-ranges: \
         \"203.0.113.0/24,,10.0.0.0,10.0.0.0/8\"}",
        "",
    ));
    let field = "metadata.annotations[service.beta.kubernetes.io/load-balancer-source-ranges]";
    assert_eq!(problems.len(), 2, "{}", lines(&problems));
    for (problem, value) in problems.iter().zip(["\"\"", "\"10.0.0.0\""]) {
        assert_problem(
            problem,
            1,
            Some("Service default/web"),
            field,
            &[
                &format!("{value} is not a CIDR"),
                "use an IPv4 network such as 203.0.113.0/24",
            ],
        );
    }
}

#[test]
fn backend_selection() {
    for (annotations, expected) in [
        ("{}", Selection::Maglev),
        ("null", Selection::Maglev),
        ("{lb-agent/backend-selection: maglev}", Selection::Maglev),
        ("{lb-agent/backend-selection: random}", Selection::Random),
        ("{other/annotation: random}", Selection::Maglev),
    ] {
        let loaded = ok(&annotated_web_service("NodePort", annotations, ""));
        for p in web_ports(&loaded) {
            assert_eq!(p.selection, expected, "{annotations}");
        }
    }
}

#[test]
fn backend_selection_problems() {
    for value in ["Maglev", "RANDOM", "round-robin", "", " maglev"] {
        let problem = only_problem(&annotated_web_service(
            "NodePort",
            &format!("{{lb-agent/backend-selection: {value:?}}}"),
            "",
        ));
        assert_problem(
            &problem,
            1,
            Some("Service default/web"),
            "metadata.annotations[lb-agent/backend-selection]",
            &[
                &format!("unknown backend selection {value:?}"),
                "use maglev or random",
            ],
        );
    }
    // Annotation values are strings in the API; kubectl refuses anything else too.
    let problem = only_problem(&annotated_web_service(
        "NodePort",
        "{lb-agent/backend-selection: [random]}",
        "",
    ));
    assert_problem(
        &problem,
        1,
        Some("Service default/web"),
        "metadata.annotations.lb-agent/backend-selection",
        &["invalid type"],
    );
}

#[test]
fn every_settings_problem_is_reported_at_once() {
    let problems = problems(&annotated_web_service(
        "ClusterIP",
        "{lb-agent/backend-selection: fast}",
        "externalTrafficPolicy: Local\ninternalTrafficPolicy: Nearby\nsessionAffinity: ClientIP\n\
         sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}\n\
         loadBalancerSourceRanges: [nope]",
    ));
    let mut fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        [
            "metadata.annotations[lb-agent/backend-selection]",
            "spec.externalTrafficPolicy",
            "spec.internalTrafficPolicy",
            "spec.loadBalancerSourceRanges",
            "spec.loadBalancerSourceRanges[0]",
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
        ],
        "{}",
        lines(&problems)
    );
}

#[test]
fn odd_settings_do_not_panic() {
    let inputs = [
        "externalTrafficPolicy: [Local]",
        "externalTrafficPolicy: 7",
        "internalTrafficPolicy: {a: b}",
        "sessionAffinity: ClientIP\nsessionAffinityConfig: 5",
        "sessionAffinity: ClientIP\nsessionAffinityConfig: {clientIP: {timeoutSeconds: 1e99}}",
        "sessionAffinity: ClientIP\nsessionAffinityConfig: \
         {clientIP: {timeoutSeconds: 99999999999999999999999999}}",
        "sessionAffinity: ClientIP\nsessionAffinityConfig: {clientIP: {timeoutSeconds: 1.5}}",
        "loadBalancerSourceRanges: 203.0.113.0/24",
        "loadBalancerSourceRanges: [[1]]",
        "loadBalancerSourceRanges: [\"\\u0000/\\u0000\", \"/\", \"//\", \"1.2.3.4/4294967296\"]",
        "loadBalancerSourceRanges: [\"\u{202e}10.0.0.0/8\", \"١٠.0.0.0/8\", \"10.0.0.0/٨\"]",
    ];
    for extra in inputs {
        let result =
            std::panic::catch_unwind(|| parse(&web_service("LoadBalancer", false, extra), NODES));
        assert!(result.is_ok(), "parse panicked on {extra:?}");
    }
    let annotations = [
        "[1, 2]",
        "{lb-agent/backend-selection: null}",
        "{service.beta.kubernetes.io/load-balancer-source-ranges: \",,,,\"}",
        "{service.beta.kubernetes.io/load-balancer-source-ranges: \"/,/\"}",
    ];
    for annotations in annotations {
        let yaml = annotated_web_service("LoadBalancer", annotations, "");
        let result = std::panic::catch_unwind(|| parse(&yaml, NODES));
        assert!(result.is_ok(), "parse panicked on {annotations:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Agent settings
// ---------------------------------------------------------------------------------------------

const SERVICE_80: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {clusterIP: 10.0.0.2, ports: [{port: 80}]}
"#;

#[test]
fn settings_default_without_a_settings_document() {
    let loaded = ok(SERVICE_80);
    assert_eq!(loaded.settings, AgentSettings::default());
    let defaults = AgentSettings::default();
    assert_eq!(defaults.node_port_range.to_string(), "30000-32767");
    assert_eq!(defaults.snat.ports.to_string(), "61000-65535");
    assert_eq!(defaults.maglev.table_size, 16_381);
    assert_eq!(defaults.maglev.seed, 0);
    assert_eq!(defaults.max_tables, lb_common::DEFAULT_MAX_TABLES);
    assert_eq!(defaults.connection_table_size, lb_common::CONNTRACK_ENTRIES);
    assert!(defaults.source_ranges_on_node_ports);
    assert!(defaults.node_addresses.is_empty());
}

#[test]
fn every_setting_is_read() {
    let loaded = ok(&format!(
        "{SERVICE_80}---\n{}",
        r#"
apiVersion: lb-agent/v1alpha1
kind: AgentSettings
metadata: {name: node-settings}
nodePortRange: "20000-20999"
nodeAddresses: [192.0.2.1, 192.0.2.2]
sourceRangesOnNodePorts: false
maglev: {tableSize: 65537, seed: 7}
maxTables: 64
connectionTableSize: 4096
snat: {ports: "40000-40999"}
loadBalancerIPPools:
- {name: public, addresses: [192.0.2.0/28, 198.51.100.1-198.51.100.9]}
"#
    ));
    let expected = AgentSettings {
        node_port_range: PortRange {
            first: 20_000,
            last: 20_999,
        },
        node_addresses: vec![ip("192.0.2.1"), ip("192.0.2.2")],
        source_ranges_on_node_ports: false,
        maglev: MaglevSettings {
            table_size: 65_537,
            seed: 7,
        },
        max_tables: 64,
        connection_table_size: 4096,
        snat: SnatSettings {
            ports: PortRange {
                first: 40_000,
                last: 40_999,
            },
        },
        load_balancer_ip_pools: vec![crate::ipam::PoolSettings {
            name: "public".to_owned(),
            addresses: vec![
                "192.0.2.0/28".to_owned(),
                "198.51.100.1-198.51.100.9".to_owned(),
            ],
        }],
    };
    assert_eq!(loaded.settings, expected);
}

#[test]
fn partly_written_settings_keep_the_other_defaults() {
    let loaded = ok(&format!(
        "{SERVICE_80}---\napiVersion: lb-agent/v1alpha1\nkind: AgentSettings\nmaglev: {{seed: 7}}\n"
    ));
    let expected = AgentSettings {
        maglev: MaglevSettings {
            seed: 7,
            ..MaglevSettings::default()
        },
        ..AgentSettings::default()
    };
    assert_eq!(loaded.settings, expected);
}

fn settings_problems(settings: &str) -> Vec<Problem> {
    problems(&format!(
        "apiVersion: lb-agent/v1alpha1\nkind: AgentSettings\n{settings}"
    ))
}

#[test]
fn settings_problems_name_the_field() {
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "nodePortRnage: 1-2\n",
            "nodePortRnage",
            &["unknown field `nodePortRnage`", "nodePortRange"],
        ),
        (
            "maglev: {tablesize: 7}\n",
            "maglev.tablesize",
            &["unknown field `tablesize`", "tableSize"],
        ),
        (
            "nodePortRange: 32767-30000\n",
            "nodePortRange",
            &["32767 is above 30000"],
        ),
        (
            "nodePortRange: \"30000\"\n",
            "nodePortRange",
            &["not FIRST-LAST"],
        ),
        ("nodePortRange: 0-100\n", "nodePortRange", &["not a port"]),
        ("snat: {ports: 1-99999}\n", "snat.ports", &["not a port"]),
        (
            "maglev: {tableSize: 16380}\n",
            "maglev.tableSize",
            &["16380 is not prime"],
        ),
        (
            "maglev: {tableSize: 1000003}\n",
            "maglev.tableSize",
            &["out of range"],
        ),
        ("maglev: {seed: -1}\n", "maglev.seed", &["-1"]),
        ("maxTables: 0\n", "maxTables", &["use 1-65536"]),
        (
            "connectionTableSize: 100\n",
            "connectionTableSize",
            &["use 1024-"],
        ),
        (
            "nodeAddresses: [192.0.2.300]\n",
            "nodeAddresses[0]",
            &["invalid IPv4 address"],
        ),
        (
            "snat: {ports: 32000-33000}\n",
            "snat.ports",
            &["overlaps nodePortRange 30000-32767"],
        ),
        (
            "sourceRangesOnNodePorts: maybe\n",
            "sourceRangesOnNodePorts",
            &["boolean"],
        ),
    ];
    for (settings, field, parts) in cases {
        let problems = settings_problems(settings);
        assert_eq!(problems.len(), 1, "{settings}: {}", lines(&problems));
        assert_problem(&problems[0], 1, Some("AgentSettings"), field, parts);
    }
}

#[test]
fn a_second_settings_document_is_a_problem() {
    let problems = problems(
        "apiVersion: lb-agent/v1alpha1\nkind: AgentSettings\nmaxTables: 8\n---\n\
         apiVersion: lb-agent/v1alpha1\nkind: AgentSettings\nmaxTables: 9\n",
    );
    assert_eq!(problems.len(), 1, "{}", lines(&problems));
    assert_problem(
        &problems[0],
        2,
        Some("AgentSettings"),
        "",
        &["second AgentSettings", "<input>, document 1", "at most one"],
    );
}

#[test]
fn settings_with_an_unknown_api_version_is_a_problem() {
    let problem = only_problem("apiVersion: lb-agent/v2\nkind: AgentSettings\n");
    assert_problem(
        &problem,
        1,
        Some("AgentSettings"),
        "apiVersion",
        &["lb-agent/v1alpha1"],
    );
}

#[test]
fn node_addresses_of_the_settings_are_used_when_none_are_given() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {type: NodePort, ports: [{port: 80, nodePort: 30080}]}
---
apiVersion: lb-agent/v1alpha1
kind: AgentSettings
nodeAddresses: [192.0.2.1]
"#;
    let from_settings = parse(yaml, &[]).unwrap();
    assert_frontends(
        &from_settings.state.service_ports[0],
        [fe(FrontendKind::NodePort, "192.0.2.1", 30080)],
    );
    // Given addresses win over the settings'.
    let given = ok(yaml);
    assert_frontends(&given.state.service_ports[0], node_ports(30080));
}

#[test]
fn node_port_range_of_the_settings_applies_wherever_the_document_is() {
    let service = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {type: NodePort, ports: [{name: a, port: 80, nodePort: 20080}, {name: b, port: 81}]}
"#;
    let settings = "apiVersion: lb-agent/v1alpha1\nkind: AgentSettings\n\
                    nodePortRange: 20000-20099\nsnat: {ports: 61000-65535}\n";
    for yaml in [
        format!("{service}---\n{settings}"),
        format!("{settings}---\n{service}"),
    ] {
        let loaded = ok(&yaml);
        assert_eq!(port(&loaded, "default/web", "a").node_port, Some(20080));
        let assigned = port(&loaded, "default/web", "b").node_port.unwrap();
        assert!((20_000..=20_099).contains(&assigned), "{assigned}");
    }
    // Without the settings, 20080 is outside the default range.
    let problem = only_problem(service);
    assert_problem(
        &problem,
        1,
        Some("Service default/web"),
        "spec.ports[0].nodePort",
        &["20080 is outside the node port range 30000-32767"],
    );
}

// ---------------------------------------------------------------------------------------------
// Node port assignment
// ---------------------------------------------------------------------------------------------

/// `count` `NodePort` Services `svc-N`, each with a TCP and a UDP port and no nodePort.
fn many_node_port_services(count: usize) -> Vec<String> {
    (0..count)
        .map(|n| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{n}, namespace: ns}}\n\
                 spec:\n  type: NodePort\n  ports:\n  - {{name: http, port: 80}}\n  \
                 - {{name: dns, port: 53, protocol: UDP}}\n"
            )
        })
        .collect()
}

fn assigned_ports(loaded: &Loaded) -> Vec<(String, String, u16)> {
    loaded
        .state
        .service_ports
        .iter()
        .map(|p| {
            assert!(p.node_port_assigned, "{}", p.display_name());
            (p.service.clone(), p.port_name.clone(), p.node_port.unwrap())
        })
        .collect()
}

#[test]
fn assigned_node_ports_depend_only_on_the_input() {
    let documents = many_node_port_services(40);
    let first = assigned_ports(&ok(&documents.join("---\n")));
    // Twice the same.
    assert_eq!(first, assigned_ports(&ok(&documents.join("---\n"))));
    // In another order.
    let mut reversed = documents.clone();
    reversed.reverse();
    assert_eq!(first, assigned_ports(&ok(&reversed.join("---\n"))));
    // Split over files.
    let sources: Vec<(std::path::PathBuf, String)> = documents
        .iter()
        .enumerate()
        .map(|(i, text)| (format!("{i:02}.yaml").into(), text.clone()))
        .collect();
    assert_eq!(
        first,
        assigned_ports(&read_sources(&sources, NODES, &[]).unwrap())
    );
    // Every assigned port is distinct and in range.
    let mut ports: Vec<u16> = first.iter().map(|(_, _, p)| *p).collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 80);
    assert!(ports.iter().all(|p| (30_000..=32_767).contains(p)));
}

#[test]
fn assigned_node_ports_are_pinned_to_their_hash() {
    // A known value, so that a change of the hash (which would move every assigned node port
    // on an upgrade) cannot go unnoticed. FNV-1a of "default/web//TCP" is 0x88153d94 (computed independently with Python).
    assert_eq!(super::stable_hash("default/web//TCP"), 0x8815_3d94);
    let loaded = ok("apiVersion: v1\nkind: Service\nmetadata: {name: web}\n\
         spec: {type: NodePort, ports: [{port: 80}]}\n");
    let expected = 30_000 + u16::try_from(0x8815_3d94_u32 % 2768).unwrap();
    assert_eq!(loaded.state.service_ports[0].node_port, Some(expected));
}

#[test]
fn assignment_skips_written_node_ports() {
    // Web's hashed port, written by another Service (that sorts after it), moves web on.
    let hashed = 30_000 + u16::try_from(0x8815_3d94_u32 % 2768).unwrap();
    let loaded = ok(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\n\
         spec: {{type: NodePort, ports: [{{port: 80}}]}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: zzz}}\n\
         spec: {{type: NodePort, ports: [{{port: 80, nodePort: {hashed}}}]}}\n"
    ));
    assert_eq!(port(&loaded, "default/zzz", "").node_port, Some(hashed));
    assert_eq!(port(&loaded, "default/web", "").node_port, Some(hashed + 1));
}

#[test]
fn a_full_node_port_range_is_a_problem() {
    let mut documents = many_node_port_services(2);
    documents.push(
        "apiVersion: lb-agent/v1alpha1\nkind: AgentSettings\nnodePortRange: 30000-30002\n"
            .to_owned(),
    );
    let problems = problems(&documents.join("---\n"));
    assert_eq!(problems.len(), 1, "{}", lines(&problems));
    assert_problem(
        &problems[0],
        2,
        Some("Service ns/svc-1"),
        "spec.ports[1].nodePort",
        &["no free port is left in the node port range 30000-30002"],
    );
}

#[test]
fn same_node_port_with_tcp_and_udp_is_fine() {
    let loaded = ok(r#"
apiVersion: v1
kind: Service
metadata: {name: dns}
spec: {type: NodePort, ports: [{name: tcp, port: 53, nodePort: 30053}]}
---
apiVersion: v1
kind: Service
metadata: {name: dns-udp}
spec: {type: NodePort, ports: [{name: udp, port: 53, protocol: UDP, nodePort: 30053}]}
"#);
    assert_eq!(port(&loaded, "default/dns", "tcp").node_port, Some(30053));
    assert_eq!(
        port(&loaded, "default/dns-udp", "udp").node_port,
        Some(30053)
    );
}

#[test]
fn duplicate_node_port_without_node_addresses_is_a_problem() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {type: NodePort, ports: [{name: a, port: 80, nodePort: 30080}, {name: b, port: 81, nodePort: 30080}]}
"#;
    let problems = parse(yaml, &[]).unwrap_err();
    assert_eq!(problems.len(), 1, "{}", lines(&problems));
    assert_problem(
        &problems[0],
        1,
        Some("Service default/web"),
        "spec.ports[1].nodePort",
        &["30080/TCP is already the node port of Service default/web spec.ports[0].nodePort"],
    );
}

fn local_load_balancer(extra: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec:\n  type: LoadBalancer\n  \
         externalTrafficPolicy: Local\n  ports: [{{name: a, port: 80}}, {{name: b, port: 81}}]\n\
         {extra}"
    )
}

#[test]
fn health_check_node_port_is_assigned_or_read() {
    let loaded = ok(&local_load_balancer(""));
    let a = port(&loaded, "default/web", "a");
    let b = port(&loaded, "default/web", "b");
    let health = a.health_check_node_port.expect("assigned");
    assert_eq!(b.health_check_node_port, Some(health));
    assert!((30_000..=32_767).contains(&health));
    assert_ne!(Some(health), a.node_port);
    assert_ne!(Some(health), b.node_port);

    let loaded = ok(&local_load_balancer("  healthCheckNodePort: 32000\n"));
    assert_eq!(
        port(&loaded, "default/web", "a").health_check_node_port,
        Some(32_000)
    );

    // Cluster policy: none.
    let loaded = ok("apiVersion: v1\nkind: Service\nmetadata: {name: web}\n\
         spec: {type: LoadBalancer, ports: [{port: 80}]}\n");
    assert_eq!(loaded.state.service_ports[0].health_check_node_port, None);
}

#[test]
fn health_check_node_port_problems() {
    let problem = only_problem(&local_load_balancer("  healthCheckNodePort: 80\n"));
    assert_problem(
        &problem,
        1,
        Some("Service default/web"),
        "spec.healthCheckNodePort",
        &["80 is outside the node port range"],
    );
    let problem = only_problem(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n\
         spec: {type: LoadBalancer, healthCheckNodePort: 30100, ports: [{port: 80}]}\n",
    );
    assert_problem(
        &problem,
        1,
        Some("Service default/web"),
        "spec.healthCheckNodePort",
        &["only be set when type is LoadBalancer and externalTrafficPolicy is Local"],
    );
    let problems = problems(&format!(
        "{}---\napiVersion: v1\nkind: Service\nmetadata: {{name: other}}\n\
         spec: {{type: NodePort, ports: [{{port: 80, nodePort: 30100}}]}}\n",
        local_load_balancer("  healthCheckNodePort: 30100\n")
    ));
    assert_eq!(problems.len(), 1, "{}", lines(&problems));
    assert!(
        problems[0]
            .message
            .contains("30100/TCP is already the node port of Service default/web"),
        "{}",
        problems[0]
    );
}

// ---------------------------------------------------------------------------------------------
// targetPort and endpoint ports
// ---------------------------------------------------------------------------------------------

fn service_with_target(target: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\n\
         spec: {{clusterIP: 10.0.0.2, ports: [{{name: http, port: 80{target}}}]}}\n"
    )
}

fn slice_with_ports(ports: &str) -> String {
    format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: web-1, labels: {{kubernetes.io/service-name: web}}}}\n\
         addressType: IPv4\nports: {ports}\nendpoints: [{{addresses: [10.1.0.5]}}]\n"
    )
}

#[test]
fn endpoint_port_by_service_port_name_wins() {
    let loaded = ok(&format!(
        "{}{}",
        service_with_target(", targetPort: web"),
        slice_with_ports("[{name: web, port: 9090}, {name: http, port: 8080}]")
    ));
    assert_endpoints(&loaded.state.service_ports[0], [ep("10.1.0.5", 8080, None)]);
}

#[test]
fn named_target_port_is_resolved_through_the_endpoint_ports() {
    let loaded = ok(&format!(
        "{}{}",
        service_with_target(", targetPort: web"),
        slice_with_ports("[{name: web, port: 9090}]")
    ));
    assert_endpoints(&loaded.state.service_ports[0], [ep("10.1.0.5", 9090, None)]);
}

#[test]
fn unresolved_named_target_port_leaves_no_endpoints_with_a_warning() {
    let loaded = ok(&format!(
        "{}{}",
        service_with_target(", targetPort: web"),
        slice_with_ports("[{name: metrics, port: 9090}]")
    ));
    assert!(loaded.state.service_ports[0].endpoints.is_empty());
    assert_warned(
        &loaded,
        &[
            "Service default/web",
            "spec.ports[0].targetPort \"web\" matches no port",
            "EndpointSlice default/web-1",
        ],
    );
}

#[test]
fn slice_without_ports_serves_the_numeric_target_port() {
    for (target, expected) in [("", 80), (", targetPort: 8080", 8080)] {
        let loaded = ok(&format!(
            "{}{}",
            service_with_target(target),
            slice_with_ports("[]")
        ));
        assert_endpoints(
            &loaded.state.service_ports[0],
            [ep("10.1.0.5", expected, None)],
        );
    }
    // A named targetPort has nothing to resolve against.
    let loaded = ok(&format!(
        "{}{}",
        service_with_target(", targetPort: web"),
        slice_with_ports("[]")
    ));
    assert!(loaded.state.service_ports[0].endpoints.is_empty());
}

#[test]
fn bad_target_ports() {
    for (target, part) in [
        ("0", "0 is not a port"),
        ("70000", "70000 is not a port"),
        ("\"8080\"", "\"8080\" is not a port name"),
        ("Web", "\"Web\" is not a port name"),
        ("a-very-long-port-name", "not a port name"),
        ("[1]", "not a port"),
    ] {
        let problem = only_problem(&service_with_target(&format!(", targetPort: {target}")));
        assert_problem(
            &problem,
            1,
            Some("Service default/web"),
            "spec.ports[0].targetPort",
            &[part],
        );
    }
}

// ---------------------------------------------------------------------------------------------
// v1 Endpoints
// ---------------------------------------------------------------------------------------------

const ENDPOINTS: &str = r#"
apiVersion: v1
kind: Endpoints
metadata: {name: web}
subsets:
- addresses:
  - {ip: 10.1.0.5, nodeName: node-a, targetRef: {kind: Pod, name: web-5}}
  - {ip: 10.1.0.6}
  notReadyAddresses:
  - {ip: 10.1.0.7, nodeName: node-b}
  ports: [{name: http, port: 8080, protocol: TCP}]
- addresses: [{ip: 10.1.0.8}]
  ports: [{name: http, port: 8081}]
"#;

#[test]
fn endpoints_kind_gives_ready_addresses() {
    let loaded = ok(&format!("{}---{ENDPOINTS}", service_with_target("")));
    assert_endpoints(
        &loaded.state.service_ports[0],
        [
            ep("10.1.0.5", 8080, Some("web-5")).on("node-a"),
            ep("10.1.0.6", 8080, None),
            ep("10.1.0.8", 8081, None),
        ],
    );
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
}

#[test]
fn slices_win_over_endpoints_with_a_warning() {
    let loaded = ok(&format!(
        "{}---{ENDPOINTS}{}",
        service_with_target(""),
        slice_with_ports("[{name: http, port: 9000}]")
    ));
    assert_endpoints(&loaded.state.service_ports[0], [ep("10.1.0.5", 9000, None)]);
    assert_warned(
        &loaded,
        &[
            "Endpoints default/web",
            "also has EndpointSlices",
            "only the slices are used",
        ],
    );
}

#[test]
fn endpoints_problems_name_the_field() {
    let problems = problems(
        "apiVersion: v1\nkind: Endpoints\nmetadata: {name: web}\nsubsets:\n\
         - addresses: [{ip: 10.1.0.300}, {ip: 10.1.0.4, nodeName: Bad_Node}]\n  \
         ports: [{port: 0}]\n",
    );
    problem_at(&problems, "subsets[0].addresses[0].ip");
    problem_at(&problems, "subsets[0].addresses[1].nodeName");
    problem_at(&problems, "subsets[0].ports[0].port");
    assert_eq!(problems.len(), 3, "{}", lines(&problems));
}

#[test]
fn endpoints_without_a_service_are_warned_about() {
    let loaded = ok(ENDPOINTS);
    assert_warned(&loaded, &["Endpoints default/web", "not in the config"]);
}

// ---------------------------------------------------------------------------------------------
// Directories
// ---------------------------------------------------------------------------------------------

/// A directory under the temp directory that is removed when dropped.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new() -> Self {
        let file = TempFile::new("");
        let path = file.0.with_extension("d");
        std::fs::create_dir(&path).unwrap();
        Self(path)
    }

    fn write(&self, name: &str, contents: &str) -> std::path::PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_directory_is_read_in_name_order_as_one_config() {
    let dir = TempDir::new();
    let documents = many_node_port_services(5);
    for (i, text) in documents.iter().enumerate() {
        // `.yml` and `.yaml` both count.
        let extension = if i % 2 == 0 { "yaml" } else { "yml" };
        dir.write(&format!("{i}.{extension}"), text);
    }
    dir.write("notes.txt", "not: [yaml");
    dir.write(".hidden.yaml", "not: [yaml");
    let loaded = load(&dir.0, NODES, &[]).unwrap();
    assert_eq!(
        assigned_ports(&loaded),
        assigned_ports(&ok(&documents.join("---\n")))
    );
}

#[test]
fn a_config_map_volume_is_read_through_its_links() {
    // What the kubelet makes of a ConfigMap: `..data` links to a timestamped directory, and
    // each key links to `..data/KEY`.
    let dir = TempDir::new();
    let version = dir.0.join("..2026_01_01_00_00_00.1");
    std::fs::create_dir(&version).unwrap();
    std::fs::write(version.join("services.yaml"), SERVICE_80).unwrap();
    std::os::unix::fs::symlink(&version, dir.0.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/services.yaml", dir.0.join("services.yaml")).unwrap();
    let loaded = load(&dir.0, NODES, &[]).unwrap();
    assert_eq!(loaded.state, ok(SERVICE_80).state);
}

#[test]
fn problems_in_a_directory_name_their_file() {
    let dir = TempDir::new();
    let good = dir.write("a.yaml", SERVICE_80);
    let bad = dir.write(
        "b.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: x}\n\
                                   spec: {clusterIP: nope}\n---\nnot: [yaml",
    );
    let error = load(&dir.0, NODES, &[]).unwrap_err();
    let ConfigError::Invalid { path, problems } = &error else {
        panic!("{error:?}");
    };
    assert_eq!(path, &dir.0);
    assert_eq!(problems.len(), 2, "{}", lines(problems));
    assert!(problems.iter().all(|p| p.location.file == bad));
    let text = error.to_string();
    assert!(
        text.contains(&format!(
            "{}, document 1 (Service default/x)",
            bad.display()
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("{}, document 2: not valid YAML", bad.display())),
        "{text}"
    );
    assert!(!text.contains(&good.display().to_string()), "{text}");
}

#[test]
fn an_empty_directory_is_an_empty_config_with_a_warning() {
    let dir = TempDir::new();
    let loaded = load(&dir.0, NODES, &[]).unwrap();
    assert!(loaded.state.service_ports.is_empty());
    assert_warned(&loaded, &["no *.yaml or *.yml files"]);
}

#[test]
fn port_range_parsing() {
    assert_eq!(
        parse_port_range("1-65535"),
        Ok(PortRange {
            first: 1,
            last: 65_535
        })
    );
    assert_eq!(parse_port_range(" 5 - 5 ").map(PortRange::size), Ok(1));
    for bad in [
        "", "-", "1", "1-", "-1", "+1-2", "0-10", "1-65536", "9-8", "a-b", "1--2",
    ] {
        assert!(parse_port_range(bad).is_err(), "{bad:?} parsed");
    }
}

const POOLS: &str = "apiVersion: lb-agent/v1alpha1\nkind: AgentSettings\nloadBalancerIPPools:\n\
     - {name: public, addresses: [192.0.2.0/30]}\n- {name: spare, addresses: [198.51.100.7]}\n";

fn load_balancer(name: &str, extra_metadata: &str, extra_spec: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}{extra_metadata}}}\n\
         spec: {{type: LoadBalancer, clusterIP: 10.0.0.{}, ports: [{{port: 80, nodePort: {}}}]{extra_spec}}}\n",
        10 + name.len() * 7 + usize::from(name.as_bytes()[0] - b'a'),
        30_000 + name.len() * 7 + usize::from(name.as_bytes()[0] - b'a')
    )
}

fn load_balancer_ips(loaded: &Loaded, service: &str) -> Vec<Ipv4Addr> {
    port(loaded, service, "")
        .frontends
        .iter()
        .filter(|f| f.kind == FrontendKind::LoadBalancer)
        .map(|f| f.addr)
        .collect()
}

#[test]
fn load_balancers_get_addresses_from_the_pools() {
    let loaded = ok(&format!(
        "{POOLS}{}{}{}{}",
        load_balancer("a", "", ""),
        load_balancer("bb", ", annotations: {lb-agent.io/address-pool: spare}", ""),
        load_balancer("ccc", "", ", loadBalancerIP: 192.0.2.3"),
        load_balancer("dddd", "", ", loadBalancerClass: example.com/other"),
    ));
    let a = load_balancer_ips(&loaded, "default/a");
    assert_eq!(a.len(), 1);
    assert!(
        a[0].octets()[..3] == [192, 0, 2] && a[0] != ip("192.0.2.3"),
        "{a:?}"
    );
    assert_eq!(
        load_balancer_ips(&loaded, "default/bb"),
        [ip("198.51.100.7")]
    );
    assert_eq!(load_balancer_ips(&loaded, "default/ccc"), [ip("192.0.2.3")]);
    assert!(
        load_balancer_ips(&loaded, "default/dddd").is_empty(),
        "another class"
    );
    assert_eq!(
        port(&loaded, "default/bb", "").load_balancer_allocation,
        Some(AddressAllocation::Pool("spare".to_owned()))
    );
    assert_eq!(
        port(&loaded, "default/dddd", "").load_balancer_allocation,
        None
    );
    // Files as the source: the reader allocates, so there is nothing for an allocator to do.
    assert!(loaded.address_claims.is_empty());
}

#[test]
fn load_balancer_conflicts_are_warned_and_shown_not_refused() {
    let loaded = ok(&format!(
        "{POOLS}{}{}",
        load_balancer("a", "", ", loadBalancerIP: 203.0.113.1"),
        load_balancer("b", ", annotations: {lb-agent.io/address-pool: nope}", ""),
    ));
    assert!(load_balancer_ips(&loaded, "default/a").is_empty());
    assert!(matches!(
        &port(&loaded, "default/a", "").load_balancer_allocation,
        Some(AddressAllocation::Pending(why)) if why.contains("203.0.113.1")
    ));
    assert_warned(
        &loaded,
        &[
            "Service default/a",
            "no load balancer address",
            "no address pool",
        ],
    );
    assert_warned(&loaded, &["Service default/b", "\"nope\""]);
}

#[test]
fn status_addresses_are_served_as_written_and_kept_from_others() {
    // `a` holds 192.0.2.1 in its status; `b` asks for it and may not take it.
    let loaded = ok(&format!(
        "{POOLS}{}status: {{loadBalancer: {{ingress: [{{ip: 192.0.2.1}}]}}}}\n{}",
        load_balancer("a", "", ""),
        load_balancer("b", "", ", loadBalancerIP: 192.0.2.1"),
    ));
    assert_eq!(load_balancer_ips(&loaded, "default/a"), [ip("192.0.2.1")]);
    assert_eq!(
        port(&loaded, "default/a", "").load_balancer_allocation,
        None
    );
    assert!(load_balancer_ips(&loaded, "default/b").is_empty());
    assert_warned(
        &loaded,
        &["Service default/b", "already used by Service default/a"],
    );
}

#[test]
fn the_kubernetes_source_gets_claims_and_serves_only_status() {
    let text = format!(
        "{POOLS}{}{}status: {{loadBalancer: {{ingress: [{{ip: 203.0.113.9}}]}}}}\n",
        load_balancer("a", "", ""),
        load_balancer("elsewhere", "", ""),
    );
    let loaded = read_objects(
        &[(PathBuf::from("x.yaml"), text)],
        Vec::new(),
        NODES,
        &[],
        Allocation::ByStatus,
    )
    .unwrap();
    assert!(load_balancer_ips(&loaded, "default/a").is_empty());
    assert_eq!(
        loaded.address_claims,
        [crate::ipam::Claim {
            service: "default/a".to_owned(),
            requested: Vec::new(),
            pool: None,
            current: Vec::new(),
        }],
        "an address outside the pools belongs to another controller"
    );
}

#[test]
fn pools_are_validated_with_their_field() {
    let problems = problems(
        "apiVersion: lb-agent/v1alpha1\nkind: AgentSettings\nloadBalancerIPPools:\n\
         - {name: a, addresses: [192.0.2.0/24]}\n- {name: b, addresses: [192.0.2.5, 10.0.0.1/8]}\n",
    );
    let text = lines(&problems);
    assert!(text.contains("loadBalancerIPPools[0].addresses"), "{text}");
    assert!(text.contains("overlaps"), "{text}");
    assert!(
        text.contains("loadBalancerIPPools[1].addresses[1]"),
        "{text}"
    );
}

#[test]
fn services_of_another_proxy_and_headless_services_are_skipped() {
    let loaded = ok(r#"
apiVersion: v1
kind: Service
metadata: {name: other, labels: {service.kubernetes.io/service-proxy-name: foo-proxy}}
spec: {clusterIP: 10.0.0.10, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: headless}
spec: {clusterIP: None, ports: [{port: 80}]}
"#);
    assert!(loaded.state.service_ports.is_empty());
    assert_warned(&loaded, &["Service default/other", "foo-proxy", "skipped"]);
    assert_warned(
        &loaded,
        &["Service default/headless", "headless", "skipped"],
    );
}
