//! `lb-agent run --kubernetes` against the fake API server (`integration_tests::fake_api`),
//! serving the objects users `kubectl apply`: Services and endpoints appearing, changing and
//! going away while traffic flows through the node; the API going away and coming back, and a
//! watch that expires; load balancer addresses allocated, released and refused; two agents and
//! one lease. Real agents in the namespaces of a test cluster (tests/src/cluster.rs), the fake
//! listening inside the nodes' namespaces. Needs root (CI is root).

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use integration_tests::{
    agent::{Agent, agent_bin},
    cluster::{Cluster, DAEMONSET_ARGS, NODE_IFACE, node_addr, node_name},
    fake_api::FakeApi,
    netns::{Process, unique_prefix},
    probe::{self, Batch, Hold},
};
use serde_json::Value;

const WEB_NODE_PORT: u16 = 30080;
/// Seconds; short, so a takeover is quick to see.
const LEASE_SECONDS: u64 = 3;
/// The address pool of these tests: inside the range the client routes through node 1.
const POOL: &str = "198.51.100.0/29";
const WAIT: Duration = Duration::from_secs(20);

fn probe_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_lb-probe"))
}

fn cluster(pods: &[&[&str]]) -> Cluster {
    Cluster::create(&unique_prefix(), pods)
        .unwrap_or_else(|e| panic!("building the cluster: {e:#}"))
}

/// The fake API in node 1's namespace (and in the others' on the same port), with the cluster's
/// Node objects.
fn api(cluster: &Cluster) -> FakeApi {
    let api = FakeApi::start_in_netns(cluster.node(1).ns.name(), "127.0.0.1:0".parse().unwrap())
        .unwrap_or_else(|e| panic!("{e:#}"));
    for node in cluster.nodes.iter().skip(1) {
        api.listen_also_in_netns(node.ns.name())
            .unwrap_or_else(|e| panic!("{e:#}"));
    }
    for node in &cluster.nodes {
        api.apply_yaml(&format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {}}}\nstatus:\n  addresses:\n  \
             - {{type: InternalIP, address: {}}}\n  - {{type: Hostname, address: {}}}\n",
            node.name(),
            node.addr(),
            node.name()
        ))
        .unwrap_or_else(|e| panic!("{e:#}"));
    }
    api
}

/// Starts `lb-agent run --kubernetes` on node `number`, with `settings` as its --config. No
/// --node-ip: the node's addresses come from its Node object.
fn start_agent(cluster: &Cluster, api: &FakeApi, number: u8, settings: &str) -> Agent {
    let scratch = cluster.scratch();
    let kubeconfig = scratch.join(format!("kubeconfig-{number}"));
    api.write_kubeconfig(&kubeconfig, &node_name(number))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let settings_path = scratch.join(format!("settings-{number}.yaml"));
    std::fs::write(&settings_path, settings).unwrap();
    let name = node_name(number);
    let lease = LEASE_SECONDS.to_string();
    Agent::start(
        &cluster.node(number).ns,
        &agent_bin(),
        &settings_path,
        NODE_IFACE,
        &[
            DAEMONSET_ARGS.as_slice(),
            &[
                "--kubernetes",
                "--kubeconfig",
                &kubeconfig.to_string_lossy(),
                "--node-name",
                &name,
                "--lease-namespace",
                "kube-system",
                "--lease-duration",
                &lease,
                "--healthz-addr",
                "off",
                "--metrics-addr",
                "off",
            ],
        ]
        .concat(),
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("starting the agent on {name}: {e:#}"))
}

fn settings(pools: bool) -> String {
    let mut text = "apiVersion: lb-agent/v1alpha1\nkind: AgentSettings\n".to_owned();
    if pools {
        let _ = writeln!(
            text,
            "loadBalancerIPPools:\n- {{name: test, addresses: [\"{POOL}\"]}}"
        );
    }
    text
}

/// A Service as users write it (the fake assigns the clusterIP); `extra` goes into its spec.
fn service(name: &str, service_type: &str, extra: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: web}}\nspec:\n  \
         type: {service_type}\n  selector: {{app: {name}}}\n  ports:\n  - {{name: http, port: \
         80, targetPort: 8080{extra}}}\n"
    )
}

/// The `EndpointSlice` of Service `name` with the pods `pods` (ready).
fn slice(cluster: &Cluster, name: &str, pods: &[&str]) -> String {
    let mut yaml = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-x1\n  \
         namespace: web\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: \
         IPv4\nports: [{{name: http, protocol: TCP, port: 8080}}]\nendpoints:\n"
    );
    if pods.is_empty() {
        yaml = yaml.replace("endpoints:\n", "endpoints: []\n");
    }
    for pod in pods {
        let addr = cluster.pod(pod).expect("pod").addr;
        let node = cluster.node_of(pod).expect("node");
        let _ = writeln!(
            yaml,
            "- addresses: [{addr}]\n  conditions: {{ready: true}}\n  nodeName: {}\n  \
             targetRef: {{kind: Pod, namespace: web, name: {pod}}}",
            node_name(node)
        );
    }
    yaml
}

fn apply(api: &FakeApi, yaml: &str) {
    api.apply_yaml(yaml)
        .unwrap_or_else(|e| panic!("{e:#}\n{yaml}"));
}

fn requests(cluster: &Cluster, target: SocketAddr, count: u32) -> Batch {
    probe::requests_with(
        &cluster.client,
        &probe_bin(),
        "http",
        target,
        count,
        &probe::Options {
            timeout_ms: Some(1_000),
            max_failures: Some(3),
            ..probe::Options::default()
        },
    )
    .unwrap_or_else(|e| panic!("requests to {target}: {e:#}"))
}

fn backends(batch: &Batch) -> BTreeSet<String> {
    batch.per_backend().into_keys().collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| (*n).to_owned()).collect()
}

/// Waits until requests to `target` are answered by exactly `expected` (bounded).
fn wait_for_backends(cluster: &Cluster, target: SocketAddr, expected: &[&str]) {
    let expected = set(expected);
    let mut last = Batch::default();
    for _ in 0..20 {
        last = requests(cluster, target, 12);
        if last.failures.is_empty() && backends(&last) == expected {
            return;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!(
        "{target} never answered from exactly {expected:?}; last: {:?}, failures {:?}",
        last.per_backend(),
        last.failures
    );
}

/// Reloads the agent logged, counted in its log.
fn reloads(agent: &Agent) -> usize {
    agent.log().matches("config reloaded").count()
}

fn load_balancer_ips(api: &FakeApi, name: &str) -> Vec<Ipv4Addr> {
    api.get("services", "web", name)
        .and_then(|s| s["status"]["loadBalancer"]["ingress"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|i| i["ip"].as_str()?.parse().ok())
        .collect()
}

fn events_for(api: &FakeApi, name: &str, reason: &str) -> Vec<Value> {
    api.events()
        .into_iter()
        .filter(|e| e["involvedObject"]["name"] == name && e["reason"] == reason)
        .collect()
}

/// One node with `pods` (serving), and in the API the `NodePort` Service `web/shop` on
/// `WEB_NODE_PORT` with the endpoints `ready`.
fn shop(pods: &[&str], ready: &[&str]) -> (Cluster, Vec<Process>, FakeApi) {
    let cluster = cluster(&[pods]);
    let backends = cluster
        .start_backends(&probe_bin())
        .unwrap_or_else(|e| panic!("{e:#}"));
    let api = api(&cluster);
    apply(
        &api,
        &service("shop", "NodePort", &format!(", nodePort: {WEB_NODE_PORT}")),
    );
    apply(&api, &slice(&cluster, "shop", ready));
    (cluster, backends, api)
}

#[test]
fn services_and_endpoints_follow_the_api_while_traffic_flows() {
    let (cluster, _backends, api) = shop(&["a", "b", "c"], &["a", "b"]);
    // What kube-proxy leaves alone: another proxy's Service, a headless one.
    apply(
        &api,
        &service("theirs", "NodePort", ", nodePort: 30090").replace(
            "namespace: web}",
            "namespace: web, labels: {service.kubernetes.io/service-proxy-name: other}}",
        ),
    );
    apply(
        &api,
        &service("db", "ClusterIP", "").replace("type: ClusterIP", "clusterIP: None"),
    );
    // One the API server took but lb-agent cannot serve: a nodePort outside its range.
    apply(&api, &service("odd", "NodePort", ", nodePort: 20000"));
    let agent = start_agent(&cluster, &api, 1, &settings(false));
    let target = SocketAddr::from((node_addr(1), WEB_NODE_PORT));
    assert!(
        agent.log().contains("left out: <api>/Service/web/odd"),
        "{}",
        agent.log()
    );

    // The rest is served; node addresses came from the Node object.
    wait_for_backends(&cluster, target, &["a", "b"]);
    let other = requests(&cluster, SocketAddr::from((node_addr(1), 30090)), 2);
    assert!(
        other.answers.is_empty(),
        "another proxy's Service must not be served"
    );
    let log = agent.log();
    assert!(log.contains("headless (clusterIP: None); skipped"), "{log}");

    // Connections held across an endpoint change stay on their backend.
    let release = cluster.scratch().join("release");
    let mut held = Hold::start(&cluster.client, &probe_bin(), target, 6, &release)
        .unwrap_or_else(|e| panic!("{e:#}"));
    let first = held.held(WAIT).unwrap_or_else(|e| panic!("{e:#}"));
    let before = agent.log();
    apply(&api, &slice(&cluster, "shop", &["b", "c"]));
    agent
        .wait_for_log(&before, "trigger=api", WAIT)
        .unwrap_or_else(|e| panic!("{e:#}"));
    wait_for_backends(&cluster, target, &["b", "c"]);
    let again = held.release(WAIT).unwrap_or_else(|e| panic!("{e:#}"));
    for (index, (first, again)) in first.iter().zip(&again).enumerate() {
        match (first, again) {
            (Ok(first), Ok(again)) => assert_eq!(first.backend, again.backend, "conn {index}"),
            other => panic!(
                "held connection {index} broke: {other:?}\n{}",
                held.output()
            ),
        }
    }

    // A burst of updates (a rollout) is applied in a few applies, not one per update.
    let before = reloads(&agent);
    let rollout = [["a", "b"], ["a", "c"], ["b", "c"], ["a", "b"], ["a", "c"]];
    for _ in 0..4 {
        for pods in &rollout {
            apply(&api, &slice(&cluster, "shop", pods));
        }
    }
    wait_for_backends(&cluster, target, &["a", "c"]);
    let applies = reloads(&agent) - before;
    assert!(
        (1..=5).contains(&applies),
        "20 updates in a burst took {applies} applies:\n{}",
        agent.log()
    );

    // The Service going away takes its nodePort with it.
    let before = agent.log();
    api.delete("services", "web", "shop");
    agent
        .wait_for_log(&before, "config reloaded", WAIT)
        .unwrap_or_else(|e| panic!("{e:#}"));
    let gone = requests(&cluster, target, 3);
    assert!(gone.answers.is_empty(), "{:?}", gone.per_backend());
    agent.stop().unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
fn the_data_plane_keeps_serving_while_the_api_is_away_and_resyncs_after() {
    let (cluster, _backends, api) = shop(&["a", "b"], &["a"]);
    let agent = start_agent(&cluster, &api, 1, &settings(false));
    let target = SocketAddr::from((node_addr(1), WEB_NODE_PORT));
    wait_for_backends(&cluster, target, &["a"]);

    // A watch that expires (410 Gone) is listed again; nothing changed, so nothing is written.
    let before = agent.log();
    api.compact();
    api.expire_watches();
    agent
        .wait_for_log(&before, "config reloaded", WAIT)
        .unwrap_or_else(|e| panic!("{e:#}"));
    let relisted = agent.log()[before.len()..].to_owned();
    assert!(
        relisted.contains("changed=false") && relisted.contains("writes=0"),
        "a relist of the same objects must write nothing:\n{relisted}"
    );

    // The API server goes away: traffic goes on as before.
    api.stop();
    let during = requests(&cluster, target, 10);
    assert!(during.failures.is_empty(), "{:?}", during.failures);
    assert_eq!(backends(&during), set(&["a"]));
    // Changed while it was away; seen when it is back.
    apply(&api, &slice(&cluster, "shop", &["b"]));
    agent
        .wait_for_log(&before, "retrying with backoff", WAIT)
        .unwrap_or_else(|e| panic!("{e:#}"));
    let before = agent.log();
    api.restart().unwrap_or_else(|e| panic!("{e:#}"));
    agent
        .wait_for_log(&before, "trigger=api", Duration::from_secs(40))
        .unwrap_or_else(|e| panic!("{e:#}"));
    wait_for_backends(&cluster, target, &["b"]);
    agent.stop().unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
fn load_balancer_addresses_are_allocated_released_and_conflicts_reported() {
    let cluster = cluster(&[&["a", "b"]]);
    let _backends = cluster
        .start_backends(&probe_bin())
        .unwrap_or_else(|e| panic!("{e:#}"));
    let api = api(&cluster);
    apply(&api, &service("public-api", "LoadBalancer", ""));
    apply(&api, &slice(&cluster, "public-api", &["a", "b"]));
    let agent = start_agent(&cluster, &api, 1, &settings(true));

    // Allocated from the pool, written to the status, and served.
    assert!(
        api.wait_until(WAIT, |api| !load_balancer_ips(api, "public-api").is_empty()),
        "no address for public-api:\n{}",
        agent.log()
    );
    let ips = load_balancer_ips(&api, "public-api");
    assert_eq!(ips.len(), 1);
    let pool_first = u32::from("198.51.100.0".parse::<Ipv4Addr>().unwrap());
    assert!(
        (pool_first..pool_first + 8).contains(&u32::from(ips[0])),
        "{ips:?}"
    );
    wait_for_backends(&cluster, SocketAddr::from((ips[0], 80)), &["a", "b"]);
    assert_eq!(events_for(&api, "public-api", "AddressAllocated").len(), 1);

    // A Service asking for that address gets a conflict Event, not the address.
    apply(
        &api,
        &service("greedy", "LoadBalancer", "").replace(
            "namespace: web}",
            &format!(
                "namespace: web, annotations: {{lb-agent.io/load-balancer-ips: \"{}\"}}}}",
                ips[0]
            ),
        ),
    );
    assert!(
        api.wait_until(WAIT, |api| !events_for(api, "greedy", "AllocationFailed")
            .is_empty()),
        "no conflict reported:\n{}",
        agent.log()
    );
    let conflict = &events_for(&api, "greedy", "AllocationFailed")[0];
    assert!(
        conflict["message"]
            .as_str()
            .is_some_and(|m| m.contains("web/public-api")),
        "{conflict}"
    );
    assert!(load_balancer_ips(&api, "greedy").is_empty());

    // Changing type releases the address; then the request can be met.
    apply(&api, &service("public-api", "ClusterIP", ""));
    assert!(
        api.wait_until(WAIT, |api| load_balancer_ips(api, "public-api").is_empty()),
        "not released:\n{}",
        agent.log()
    );
    assert!(
        api.wait_until(WAIT, |api| load_balancer_ips(api, "greedy") == ips),
        "the released address did not go to the Service asking for it:\n{}",
        agent.log()
    );
    assert_eq!(events_for(&api, "public-api", "AddressReleased").len(), 1);
    // Every status write went through the status subresource.
    let writes: Vec<String> = api
        .requests()
        .iter()
        .filter(|r| r.is_write() && r.path().contains("/services/"))
        .map(|r| format!("{} {}", r.method, r.path()))
        .collect();
    assert!(writes.iter().all(|w| w.ends_with("/status")), "{writes:#?}");
    agent.stop().unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
fn two_agents_share_one_lease_and_only_the_holder_writes() {
    let cluster = cluster(&[&["a"], &["b"]]);
    let api = api(&cluster);
    apply(&api, &service("first", "LoadBalancer", ""));
    let first_agent = start_agent(&cluster, &api, 1, &settings(true));
    let second_agent = start_agent(&cluster, &api, 2, &settings(true));
    assert!(
        api.wait_until(WAIT, |api| !load_balancer_ips(api, "first").is_empty()),
        "nobody allocated:\n{}\n{}",
        first_agent.log(),
        second_agent.log()
    );
    let holder = |api: &FakeApi| {
        api.get("leases", "kube-system", "lb-agent-ipam")
            .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_owned))
    };
    let first_holder = holder(&api).expect("a holder");
    let (holding, waiting, waiting_node) = if first_holder == node_name(1) {
        (first_agent, second_agent, node_name(2))
    } else {
        (second_agent, first_agent, node_name(1))
    };
    // The agent waiting only read: no status, Event or lease writes from its namespace.
    let writes_from = |api: &FakeApi, node: &str| -> Vec<String> {
        api.requests()
            .iter()
            .filter(|r| r.is_write() && r.user.as_deref() == Some(node))
            .map(|r| format!("{} {}", r.method, r.path()))
            .collect()
    };
    assert_eq!(writes_from(&api, &waiting_node), Vec::<String>::new());

    // The holder stops: it gives the lease up, and the other takes it over and allocates.
    holding.stop().unwrap_or_else(|e| panic!("{e:#}"));
    apply(&api, &service("second", "LoadBalancer", ""));
    assert!(
        api.wait_until(WAIT, |api| !load_balancer_ips(api, "second").is_empty()),
        "the other agent did not take over:\n{}",
        waiting.log()
    );
    assert_eq!(holder(&api).as_deref(), Some(waiting_node.as_str()));
    assert!(
        waiting.log().contains("holding the lease"),
        "{}",
        waiting.log()
    );
    waiting.stop().unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
fn a_crashed_lease_holder_is_replaced_after_the_lease_expires() {
    let cluster = cluster(&[&["a"], &["b"]]);
    let api = api(&cluster);
    let first_agent = start_agent(&cluster, &api, 1, &settings(true));
    assert!(
        api.wait_until(WAIT, |api| api
            .get("leases", "kube-system", "lb-agent-ipam")
            .is_some()),
        "no lease:\n{}",
        first_agent.log()
    );
    let second_agent = start_agent(&cluster, &api, 2, &settings(true));
    // kill -9: no release; the lease must expire first.
    first_agent.kill9().unwrap_or_else(|e| panic!("{e:#}"));
    apply(&api, &service("late", "LoadBalancer", ""));
    assert!(
        api.wait_until(Duration::from_secs(LEASE_SECONDS * 5 + 10), |api| {
            !load_balancer_ips(api, "late").is_empty()
        }),
        "the second agent did not take over an expired lease:\n{}",
        second_agent.log()
    );
    second_agent.stop().unwrap_or_else(|e| panic!("{e:#}"));
}
