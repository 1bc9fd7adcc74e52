//! The manifests under `manifests/` as the API server and the agent would take them.
//!
//! Every YAML document parses as its k8s-openapi type (chosen by `apiVersion` and `kind`; a kind
//! this test does not know fails it) with no field that the type would drop, so a misspelled or
//! misplaced field is caught. The properties issue 5 asks of the `DaemonSet`, the RBAC objects and
//! the example Services are checked on the parsed objects. The `AgentSettings` document of the
//! `ConfigMap`, and the example Services with it, go through the real `lb-agent validate` (the
//! debug build, `integration_tests::agent::agent_bin`: `cargo build -p lb-userspace` first).
//! No root needed.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
};

use integration_tests::agent::{agent_bin, workspace};
use k8s_openapi::{
    Resource,
    api::{
        apps::v1::{DaemonSet, Deployment},
        core::v1::{ConfigMap, Container, Endpoints, PodSpec, Service, ServiceAccount},
        discovery::v1::EndpointSlice,
        rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, Subject},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::{Deserialize as _, Serialize, de::DeserializeOwned};
use serde_yaml::Value;

/// The agent's manifest: RBAC, settings and the `DaemonSet`.
const AGENT_MANIFEST: &str = "manifests/lb-agent.yaml";
/// The Services of the Kubernetes documentation, with their Deployments.
const SERVICE_TYPES: &str = "manifests/examples/service-types";
/// The API version of the agent's settings document.
const SETTINGS_API_VERSION: &str = "lb-agent/v1alpha1";
/// Where `lb-agent run` serves `/healthz` and `/livez` (kube-proxy's port).
const HEALTHZ_PORT: i32 = 10256;

/// One document of a manifest, as its Kubernetes type.
enum Object {
    ServiceAccount(Box<ServiceAccount>),
    ConfigMap(Box<ConfigMap>),
    Service(Box<Service>),
    Endpoints(Box<Endpoints>),
    EndpointSlice(Box<EndpointSlice>),
    DaemonSet(Box<DaemonSet>),
    Deployment(Box<Deployment>),
    ClusterRole(Box<ClusterRole>),
    ClusterRoleBinding(Box<ClusterRoleBinding>),
    Role(Box<Role>),
    RoleBinding(Box<RoleBinding>),
    /// The agent's own document, which no Kubernetes type describes: `lb-agent validate` checks
    /// it.
    AgentSettings(Value),
}

/// A parsed document and where it came from (`file, document N`).
struct Document {
    file: PathBuf,
    place: String,
    object: Object,
}

/// Every `*.yaml` and `*.yml` file under `dir`, recursively, in name order (`dir` itself if it
/// is a file).
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    if dir.is_file() {
        return vec![dir.to_owned()];
    }
    let mut files = Vec::new();
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            files.extend(yaml_files(&path));
        } else if path
            .extension()
            .is_some_and(|ext| ext == "yaml" || ext == "yml")
        {
            files.push(path);
        }
    }
    files
}

/// The documents of one YAML stream (empty documents skipped), with their places.
fn yaml_documents(file: &Path) -> Vec<(String, Value)> {
    let text =
        fs::read_to_string(file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
    let name = file
        .strip_prefix(workspace())
        .unwrap_or(file)
        .display()
        .to_string();
    serde_yaml::Deserializer::from_str(&text)
        .enumerate()
        .filter_map(|(index, document)| {
            let place = format!("{name}, document {}", index + 1);
            let value =
                Value::deserialize(document).unwrap_or_else(|e| panic!("{place}: not YAML: {e}"));
            (!value.is_null()).then_some((place, value))
        })
        .collect()
}

/// Every document of every YAML file under `dir` (a file or directory relative to the
/// workspace), parsed.
fn load(dir: &str) -> Vec<Document> {
    let files = yaml_files(&workspace().join(dir));
    assert!(!files.is_empty(), "no YAML file under {dir}");
    files
        .into_iter()
        .flat_map(|file| {
            yaml_documents(&file)
                .into_iter()
                .map(move |(place, value)| Document {
                    file: file.clone(),
                    object: parse_document(value, &place),
                    place,
                })
        })
        .collect()
}

fn is<T: Resource>(api_version: &str, kind: &str) -> bool {
    T::API_VERSION == api_version && T::KIND == kind
}

/// The k8s-openapi type for the document's `apiVersion` and `kind`.
fn parse_document(value: Value, place: &str) -> Object {
    let field = |name: &str| {
        value
            .get(name)
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("{place}: no {name}; every document must be an object"))
            .to_owned()
    };
    let (api_version, kind) = (field("apiVersion"), field("kind"));
    let (v, k) = (api_version.as_str(), kind.as_str());
    if is::<ServiceAccount>(v, k) {
        Object::ServiceAccount(Box::new(typed(&value, place)))
    } else if is::<ConfigMap>(v, k) {
        Object::ConfigMap(Box::new(typed(&value, place)))
    } else if is::<Service>(v, k) {
        Object::Service(Box::new(typed(&value, place)))
    } else if is::<Endpoints>(v, k) {
        Object::Endpoints(Box::new(typed(&value, place)))
    } else if is::<EndpointSlice>(v, k) {
        Object::EndpointSlice(Box::new(typed(&value, place)))
    } else if is::<DaemonSet>(v, k) {
        Object::DaemonSet(Box::new(typed(&value, place)))
    } else if is::<Deployment>(v, k) {
        Object::Deployment(Box::new(typed(&value, place)))
    } else if is::<ClusterRole>(v, k) {
        Object::ClusterRole(Box::new(typed(&value, place)))
    } else if is::<ClusterRoleBinding>(v, k) {
        Object::ClusterRoleBinding(Box::new(typed(&value, place)))
    } else if is::<Role>(v, k) {
        Object::Role(Box::new(typed(&value, place)))
    } else if is::<RoleBinding>(v, k) {
        Object::RoleBinding(Box::new(typed(&value, place)))
    } else if v == SETTINGS_API_VERSION && k == "AgentSettings" {
        Object::AgentSettings(value)
    } else {
        panic!(
            "{place}: {api_version} {kind} is not a kind this test knows; add its k8s-openapi \
             type to parse_document"
        )
    }
}

/// `value` as `T`, refusing anything `T` would drop: the parsed object, written back, must be
/// the document as it was.
fn typed<T: Resource + DeserializeOwned + Serialize>(value: &Value, place: &str) -> T {
    let object: T = serde_yaml::from_value(value.clone())
        .unwrap_or_else(|e| panic!("{place}: not a valid {} {}: {e}", T::API_VERSION, T::KIND));
    let back = serde_yaml::to_value(&object).expect("a parsed object serializes");
    if let Some(path) = first_difference(value, &back, "") {
        panic!(
            "{place}: {path} does not survive parsing as {} {}: not a field of the type \
             (misspelled or misplaced?), or of another type",
            T::API_VERSION,
            T::KIND
        );
    }
    object
}

/// The path of the first place where `written` and `parsed` differ.
fn first_difference(written: &Value, parsed: &Value, path: &str) -> Option<String> {
    match (written, parsed) {
        (Value::Mapping(written), Value::Mapping(parsed)) => {
            let key_name = |key: &Value| {
                key.as_str()
                    .map_or_else(|| format!("{key:?}"), str::to_owned)
            };
            written
                .iter()
                .find_map(|(key, value)| {
                    let path = format!("{path}.{}", key_name(key));
                    match parsed.get(key) {
                        None => Some(path),
                        Some(back) => first_difference(value, back, &path),
                    }
                })
                .or_else(|| {
                    parsed
                        .keys()
                        .find(|key| !written.contains_key(*key))
                        .map(|key| format!("{path}.{} (added)", key_name(key)))
                })
        }
        (Value::Sequence(written), Value::Sequence(parsed)) if written.len() == parsed.len() => {
            written
                .iter()
                .zip(parsed)
                .enumerate()
                .find_map(|(index, (value, back))| {
                    first_difference(value, back, &format!("{path}[{index}]"))
                })
        }
        _ => (written != parsed).then(|| format!("{path} ({written:?} became {parsed:?})")),
    }
}

/// The objects of one kind, with their places.
macro_rules! objects {
    ($documents:expr, $variant:ident) => {
        $documents
            .iter()
            .filter_map(|document| match &document.object {
                Object::$variant(object) => Some((document.place.as_str(), object.as_ref())),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
}

/// The one object of a kind in `documents`.
macro_rules! single {
    ($documents:expr, $variant:ident) => {{
        let found = objects!($documents, $variant);
        assert_eq!(
            found.len(),
            1,
            "expected exactly one {} in {AGENT_MANIFEST}",
            stringify!($variant)
        );
        found[0].1
    }};
}

fn name_of(metadata: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> &str {
    metadata.name.as_deref().expect("every object has a name")
}

fn namespace_of(metadata: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> &str {
    metadata.namespace.as_deref().unwrap_or("default")
}

/// The value of `--name` in `args` (`--name=value` or `--name value`).
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter().enumerate().find_map(|(index, arg)| {
        if let Some(value) = arg
            .strip_prefix(name)
            .and_then(|rest| rest.strip_prefix('='))
        {
            Some(value)
        } else if arg == name {
            args.get(index + 1).map(String::as_str)
        } else {
            None
        }
    })
}

/// The `$(VAR)` references Kubernetes expands in `text`.
fn env_references(text: &str) -> Vec<&str> {
    text.split("$(")
        .skip(1)
        .filter_map(|rest| rest.split_once(')').map(|(name, _)| name))
        .collect()
}

/// The `fieldRef.fieldPath` an environment variable of `container` comes from.
fn field_ref<'a>(container: &'a Container, name: &str) -> Option<&'a str> {
    container
        .env
        .iter()
        .flatten()
        .find(|var| var.name == name)?
        .value_from
        .as_ref()?
        .field_ref
        .as_ref()
        .map(|selector| selector.field_path.as_str())
}

#[test]
fn every_document_under_manifests_parses_as_its_kubernetes_type() {
    let documents = load("manifests");
    let files: BTreeSet<&Path> = documents.iter().map(|d| d.file.as_path()).collect();
    for expected in [
        AGENT_MANIFEST,
        "manifests/examples/demo.yaml",
        "manifests/examples/service-types/services.yaml",
        "manifests/examples/service-types/backends.yaml",
    ] {
        assert!(
            files.contains(workspace().join(expected).as_path()),
            "{expected} was not read"
        );
    }
    // Endpoints and slices belong to a Service of the manifests (the agent warns otherwise).
    let services: BTreeSet<(&str, &str)> = objects!(documents, Service)
        .into_iter()
        .map(|(_, service)| (namespace_of(&service.metadata), name_of(&service.metadata)))
        .collect();
    for document in &documents {
        let owner = match &document.object {
            Object::EndpointSlice(slice) => Some((
                namespace_of(&slice.metadata),
                slice
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|labels| labels.get("kubernetes.io/service-name"))
                    .map_or_else(
                        || panic!("{}: no kubernetes.io/service-name", document.place),
                        String::as_str,
                    ),
            )),
            Object::Endpoints(endpoints) => Some((
                namespace_of(&endpoints.metadata),
                name_of(&endpoints.metadata),
            )),
            _ => None,
        };
        if let Some((namespace, name)) = owner {
            assert!(
                services.contains(&(namespace, name)),
                "{}: no Service {namespace}/{name} in the manifests",
                document.place
            );
        }
    }
}

#[test]
fn settings_documents_outside_the_configmap_pass_lb_agent_validate() {
    // None today (the settings live in the ConfigMap, checked below); an example settings file
    // added later is checked here.
    let documents = load("manifests");
    let scratch = Scratch::new("standalone");
    for (index, document) in documents.iter().enumerate() {
        if let Object::AgentSettings(settings) = &document.object {
            let path = scratch.0.join(format!("{index}.yaml"));
            fs::write(&path, serde_yaml::to_string(settings).expect("YAML"))
                .expect("writing the settings");
            let (ok, stdout, stderr) = validate(&path);
            assert!(
                ok,
                "{}: lb-agent validate refused it:\n{stdout}{stderr}",
                document.place
            );
        }
    }
}

/// The pod spec of the agent's `DaemonSet`.
fn pod_spec(daemonset: &DaemonSet) -> &PodSpec {
    daemonset
        .spec
        .as_ref()
        .and_then(|spec| spec.template.spec.as_ref())
        .expect("the DaemonSet has a pod spec")
}

/// The container that runs `lb-agent`.
fn agent_container(pod: &PodSpec) -> &Container {
    pod.containers
        .iter()
        .find(|container| container.name == "lb-agent")
        .expect("a container named lb-agent")
}

fn agent_args(agent: &Container) -> &[String] {
    let args = agent.args.as_deref().expect("args");
    assert_eq!(args.first().map(String::as_str), Some("run"));
    args
}

#[test]
fn the_daemonset_runs_on_every_node_with_host_network() {
    let documents = load(AGENT_MANIFEST);
    let daemonset = single!(documents, DaemonSet);
    assert_eq!(namespace_of(&daemonset.metadata), "kube-system");
    let strategy = daemonset
        .spec
        .as_ref()
        .and_then(|spec| spec.update_strategy.as_ref())
        .expect("updateStrategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    assert_eq!(
        strategy
            .rolling_update
            .as_ref()
            .and_then(|rolling| rolling.max_unavailable.clone()),
        Some(IntOrString::Int(1))
    );
    let pod = pod_spec(daemonset);
    assert_eq!(
        pod.host_network,
        Some(true),
        "the agent serves the node's NICs"
    );
    // Not ClusterFirstWithHostNet: the cluster DNS is a clusterIP, which this data path does
    // not translate for the node's own connections (see the comment in the manifest).
    assert_eq!(pod.dns_policy.as_deref(), Some("Default"));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert!(pod.host_pid != Some(true) && pod.host_ipc != Some(true));
    assert!(
        pod.termination_grace_period_seconds
            .is_some_and(|seconds| seconds > 0)
    );
    // Every taint tolerated, as kube-proxy: operator Exists with no key and no effect.
    assert!(
        pod.tolerations.iter().flatten().any(|toleration| {
            toleration.operator.as_deref() == Some("Exists")
                && toleration.key.is_none()
                && toleration.effect.is_none()
        }),
        "tolerations must include {{operator: Exists}}"
    );
    // The service account exists, in the DaemonSet's namespace.
    let account = single!(documents, ServiceAccount);
    assert_eq!(
        pod.service_account_name.as_deref(),
        account.metadata.name.as_deref()
    );
    assert_eq!(account.metadata.namespace, daemonset.metadata.namespace);
    assert!(
        agent_container(pod)
            .image
            .as_deref()
            .is_some_and(|image| !image.is_empty())
    );
}

#[test]
fn the_agent_is_unprivileged_with_only_the_capabilities_it_needs() {
    let documents = load(AGENT_MANIFEST);
    let pod = pod_spec(single!(documents, DaemonSet));
    // Only init containers may be privileged; the agent is not, and cannot become so.
    assert_eq!(
        pod.containers.len(),
        1,
        "the agent is the only long-running container"
    );
    for container in &pod.containers {
        let security = container
            .security_context
            .as_ref()
            .unwrap_or_else(|| panic!("container {} has no securityContext", container.name));
        assert_ne!(
            security.privileged,
            Some(true),
            "{} is privileged",
            container.name
        );
        assert_eq!(
            security.allow_privilege_escalation,
            Some(false),
            "{}",
            container.name
        );
    }
    let capabilities = agent_container(pod)
        .security_context
        .as_ref()
        .and_then(|security| security.capabilities.as_ref())
        .expect("capabilities");
    assert_eq!(capabilities.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    let added: BTreeSet<&str> = capabilities
        .add
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    assert_eq!(added, BTreeSet::from(["BPF", "NET_ADMIN", "PERFMON"]));
}

#[test]
fn the_agent_gets_node_name_namespace_and_interface_from_the_downward_api() {
    let documents = load(AGENT_MANIFEST);
    let daemonset = single!(documents, DaemonSet);
    let pod = pod_spec(daemonset);
    let agent = agent_container(pod);
    let args = agent_args(agent);
    assert!(args.iter().any(|arg| arg == "--kubernetes"));
    assert_eq!(flag(args, "--node-name"), Some("$(NODE_NAME)"));
    assert_eq!(field_ref(agent, "NODE_NAME"), Some("spec.nodeName"));
    assert_eq!(flag(args, "--lease-namespace"), Some("$(POD_NAMESPACE)"));
    assert_eq!(
        field_ref(agent, "POD_NAMESPACE"),
        Some("metadata.namespace")
    );
    let defined: BTreeSet<&str> = agent
        .env
        .iter()
        .flatten()
        .map(|var| var.name.as_str())
        .collect();
    for arg in args {
        for name in env_references(arg) {
            assert!(
                defined.contains(name),
                "argument {arg:?} refers to $({name}), which the container does not define \
                 (Kubernetes would pass it literally)"
            );
        }
    }
    // The interface: one annotation of the pod template, read by every container.
    assert_eq!(flag(args, "--iface"), Some("$(LB_IFACE)"));
    let iface_path = field_ref(agent, "LB_IFACE").expect("LB_IFACE from the downward API");
    let annotation = iface_path
        .strip_prefix("metadata.annotations['")
        .and_then(|rest| rest.strip_suffix("']"))
        .expect("LB_IFACE comes from a pod annotation");
    let annotations = daemonset
        .spec
        .as_ref()
        .and_then(|spec| spec.template.metadata.as_ref())
        .and_then(|metadata| metadata.annotations.as_ref());
    assert!(
        annotations
            .and_then(|annotations| annotations.get(annotation))
            .is_some_and(|value| !value.trim().is_empty()),
        "the pod template must set the annotation {annotation}"
    );
    // The forwarding mode: one annotation too, so prepare-node sets accept_local exactly when
    // the agent runs with `--forwarding stack`.
    assert_eq!(flag(args, "--forwarding"), Some("$(LB_FORWARDING)"));
    let forwarding_path =
        field_ref(agent, "LB_FORWARDING").expect("LB_FORWARDING from the downward API");
    let forwarding = forwarding_path
        .strip_prefix("metadata.annotations['")
        .and_then(|rest| rest.strip_suffix("']"))
        .and_then(|name| annotations?.get(name))
        .expect("LB_FORWARDING comes from a pod annotation");
    assert_eq!(
        forwarding, "xdp",
        "the default forwarding mode needs no accept_local"
    );
    for init in pod.init_containers.iter().flatten() {
        assert_eq!(
            (
                field_ref(init, "LB_IFACE"),
                field_ref(init, "LB_FORWARDING")
            ),
            (Some(iface_path), Some(forwarding_path)),
            "{} sets accept_local on the agent's interface when forwarding is stack",
            init.name
        );
    }
    // The API server by its real address: the kubelet's default is the kubernetes Service's
    // clusterIP, which the node's own connections do not reach through this data path.
    assert!(
        defined.contains("KUBERNETES_SERVICE_HOST") && defined.contains("KUBERNETES_SERVICE_PORT")
    );
}

#[test]
fn the_pins_go_to_the_hosts_bpffs() {
    let documents = load(AGENT_MANIFEST);
    let pod = pod_spec(single!(documents, DaemonSet));
    let agent = agent_container(pod);
    let bpffs = pod
        .volumes
        .iter()
        .flatten()
        .find(|volume| {
            volume
                .host_path
                .as_ref()
                .is_some_and(|host| host.path == "/sys/fs/bpf")
        })
        .expect("a hostPath volume of /sys/fs/bpf");
    let mount = agent
        .volume_mounts
        .iter()
        .flatten()
        .find(|mount| mount.name == bpffs.name)
        .expect("the agent mounts the bpffs volume");
    assert_eq!(mount.mount_propagation.as_deref(), Some("HostToContainer"));
    assert_ne!(mount.read_only, Some(true));
    let pin_dir = flag(agent_args(agent), "--pin-dir").expect("--pin-dir");
    assert!(
        Path::new(pin_dir).starts_with(&mount.mount_path) && pin_dir != mount.mount_path,
        "--pin-dir {pin_dir} must be a directory inside the bpffs mount {}",
        mount.mount_path
    );
    // Whoever mounts a bpffs that reaches the host needs Bidirectional, so is privileged, so
    // is an init container, and mounts nothing else that way.
    for init in pod.init_containers.iter().flatten() {
        for mount in init.volume_mounts.iter().flatten() {
            if mount.mount_propagation.as_deref() == Some("Bidirectional") {
                assert_eq!(mount.name, bpffs.name, "{}", init.name);
            }
        }
    }
}

#[test]
fn config_names_the_settings_of_the_configmap() {
    let documents = load(AGENT_MANIFEST);
    let pod = pod_spec(single!(documents, DaemonSet));
    let agent = agent_container(pod);
    let config = flag(agent_args(agent), "--config").expect("--config");
    let (mount, volume) = agent
        .volume_mounts
        .iter()
        .flatten()
        .find_map(|mount| {
            let volume = pod
                .volumes
                .iter()
                .flatten()
                .find(|volume| volume.name == mount.name)?;
            let map = volume.config_map.as_ref()?;
            Path::new(config)
                .starts_with(&mount.mount_path)
                .then_some((mount, map))
        })
        .expect("--config is inside a ConfigMap volume");
    assert_eq!(mount.read_only, Some(true));
    let config_map = single!(documents, ConfigMap);
    assert_eq!(
        config_map.metadata.name.as_deref(),
        Some("lb-agent-settings")
    );
    assert_eq!(
        Some(volume.name.as_str()),
        config_map.metadata.name.as_deref()
    );
    let key = Path::new(config)
        .strip_prefix(&mount.mount_path)
        .expect("inside the mount")
        .to_str()
        .expect("UTF-8");
    assert!(
        config_map
            .data
            .as_ref()
            .is_some_and(|data| data.contains_key(key)),
        "the ConfigMap has no key {key} for --config {config}"
    );
}

#[test]
fn the_probes_ask_the_health_endpoints() {
    let documents = load(AGENT_MANIFEST);
    let agent = agent_container(pod_spec(single!(documents, DaemonSet)));
    let healthz_addr = flag(agent_args(agent), "--healthz-addr").unwrap_or("0.0.0.0:10256");
    assert!(healthz_addr.ends_with(&format!(":{HEALTHZ_PORT}")));
    for (probe, path) in [
        (agent.liveness_probe.as_ref(), "/livez"),
        (agent.readiness_probe.as_ref(), "/healthz"),
    ] {
        let get = probe
            .and_then(|probe| probe.http_get.as_ref())
            .unwrap_or_else(|| panic!("no httpGet probe for {path}"));
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(get.port, IntOrString::Int(HEALTHZ_PORT));
    }
    let requests = agent
        .resources
        .as_ref()
        .and_then(|resources| resources.requests.as_ref())
        .expect("resource requests");
    assert!(requests.contains_key("cpu") && requests.contains_key("memory"));
}

/// A rule as (API group, resource, verbs), one per group and resource it names.
fn rule_entries(rules: &[PolicyRule]) -> BTreeSet<(String, String, Vec<String>)> {
    let mut entries = BTreeSet::new();
    for rule in rules {
        let mut verbs = rule.verbs.clone();
        verbs.sort();
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                entries.insert((group.clone(), resource.clone(), verbs.clone()));
            }
        }
    }
    entries
}

fn assert_binds_the_agent(place: &str, subjects: Option<&Vec<Subject>>, account: &ServiceAccount) {
    let subjects = subjects.map(Vec::as_slice).unwrap_or_default();
    assert_eq!(subjects.len(), 1, "{place}: one subject");
    assert_eq!(subjects[0].kind, "ServiceAccount", "{place}");
    assert_eq!(
        Some(subjects[0].name.as_str()),
        account.metadata.name.as_deref(),
        "{place}"
    );
    assert_eq!(subjects[0].namespace, account.metadata.namespace, "{place}");
}

fn entry(group: &str, resource: &str, verbs: &[&str]) -> (String, String, Vec<String>) {
    let mut verbs: Vec<String> = verbs.iter().map(|verb| (*verb).to_owned()).collect();
    verbs.sort();
    (group.to_owned(), resource.to_owned(), verbs)
}

#[test]
fn the_cluster_role_is_least_privilege() {
    let documents = load(AGENT_MANIFEST);
    let cluster_role = single!(documents, ClusterRole);
    let rules = cluster_role.rules.as_deref().unwrap_or_default();
    for rule in rules {
        let names = [&rule.api_groups, &rule.resources, &rule.resource_names];
        assert!(
            !names
                .into_iter()
                .flatten()
                .flatten()
                .chain(&rule.verbs)
                .any(|item| item.contains('*')),
            "no wildcard in {rule:?}"
        );
        assert!(rule.non_resource_urls.is_none(), "{rule:?}");
        for verb in &rule.verbs {
            assert!(
                ![
                    "delete",
                    "deletecollection",
                    "escalate",
                    "bind",
                    "impersonate"
                ]
                .contains(&verb.as_str()),
                "the agent never needs {verb}: {rule:?}"
            );
        }
    }
    let read = ["get", "list", "watch"];
    let expected = BTreeSet::from([
        entry("", "services", &read),
        entry("", "services/status", &["patch", "update"]),
        entry("discovery.k8s.io", "endpointslices", &read),
        entry("", "nodes", &read),
        entry("", "events", &["create", "patch"]),
        entry("events.k8s.io", "events", &["create", "patch"]),
    ]);
    assert_eq!(rule_entries(rules), expected, "the ClusterRole's rules");

    let binding = single!(documents, ClusterRoleBinding);
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(
        Some(binding.role_ref.name.as_str()),
        cluster_role.metadata.name.as_deref()
    );
    let account = single!(documents, ServiceAccount);
    assert_binds_the_agent("ClusterRoleBinding", binding.subjects.as_ref(), account);
}

#[test]
fn the_lease_role_names_its_lease_in_the_agents_namespace() {
    let documents = load(AGENT_MANIFEST);
    let account = single!(documents, ServiceAccount);
    let role = single!(documents, Role);
    assert_eq!(role.metadata.namespace, account.metadata.namespace);
    let mut verbs = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        assert_eq!(
            rule.api_groups.as_deref(),
            Some(&["coordination.k8s.io".to_owned()][..])
        );
        assert_eq!(rule.resources.as_deref(), Some(&["leases".to_owned()][..]));
        if rule.verbs == ["create"] {
            // Kubernetes cannot restrict create by name.
            assert!(rule.resource_names.is_none(), "{rule:?}");
        } else {
            assert_eq!(
                rule.resource_names.as_deref(),
                Some(&["lb-agent-ipam".to_owned()][..]),
                "{rule:?}"
            );
        }
        for verb in &rule.verbs {
            assert!(
                ["get", "create", "update", "patch"].contains(&verb.as_str()),
                "{rule:?}"
            );
            verbs.insert(verb.as_str());
        }
    }
    assert!(
        ["get", "create", "update"]
            .iter()
            .all(|verb| verbs.contains(verb)),
        "{verbs:?}"
    );
    let binding = single!(documents, RoleBinding);
    assert_eq!(binding.metadata.namespace, role.metadata.namespace);
    assert_eq!(binding.role_ref.kind, "Role");
    assert_eq!(
        Some(binding.role_ref.name.as_str()),
        role.metadata.name.as_deref()
    );
    assert_binds_the_agent("RoleBinding", binding.subjects.as_ref(), account);
}

/// The example Services by name.
fn example_services(documents: &[Document]) -> BTreeMap<String, &Service> {
    objects!(documents, Service)
        .into_iter()
        .map(|(_, service)| {
            (
                format!(
                    "{}/{}",
                    namespace_of(&service.metadata),
                    name_of(&service.metadata)
                ),
                service,
            )
        })
        .collect()
}

#[test]
fn the_example_services_are_those_of_the_kubernetes_documentation() {
    let documents = load(SERVICE_TYPES);
    let services = example_services(&documents);
    // (name, type, port, targetPort, nodePort, externalTrafficPolicy)
    let expected = [
        ("default/backend-api", "ClusterIP", 80, 8080, None, None),
        ("default/web-app", "NodePort", 80, 8080, Some(30080), None),
        ("default/debug-svc", "NodePort", 80, 8080, Some(30007), None),
        (
            "default/public-api",
            "LoadBalancer",
            80,
            8080,
            None,
            Some("Local"),
        ),
    ];
    assert_eq!(
        services.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        expected.iter().map(|row| row.0).collect::<BTreeSet<_>>()
    );
    let deployments = objects!(documents, Deployment);
    for (name, type_, port, target_port, node_port, policy) in expected {
        let spec = services[name].spec.as_ref().expect("spec");
        assert_eq!(
            spec.type_.as_deref().unwrap_or("ClusterIP"),
            type_,
            "{name}"
        );
        let ports = spec.ports.as_deref().unwrap_or_default();
        assert_eq!(ports.len(), 1, "{name}: one port");
        assert_eq!(
            ports[0].protocol.as_deref().unwrap_or("TCP"),
            "TCP",
            "{name}"
        );
        assert_eq!(ports[0].port, port, "{name}");
        assert_eq!(
            ports[0].target_port,
            Some(IntOrString::Int(target_port)),
            "{name}"
        );
        assert_eq!(ports[0].node_port, node_port, "{name}");
        assert_eq!(spec.external_traffic_policy.as_deref(), policy, "{name}");
        // As users apply them: the API server fills these in.
        assert!(spec.cluster_ip.is_none(), "{name}");
        assert!(services[name].status.is_none(), "{name}");
        // Some Deployment of the example runs the pods it selects.
        let selector = spec.selector.as_ref().expect("a selector");
        assert!(
            deployments.iter().any(|(_, deployment)| {
                let labels = deployment
                    .spec
                    .as_ref()
                    .and_then(|spec| spec.template.metadata.as_ref())
                    .and_then(|metadata| metadata.labels.as_ref());
                labels.is_some_and(|labels| {
                    selector
                        .iter()
                        .all(|(key, value)| labels.get(key) == Some(value))
                })
            }),
            "{name}: no Deployment has pods with labels {selector:?}"
        );
    }
}

/// A directory under the system's temporary directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("lb-manifests-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// `lb-agent validate PATH`: (success, stdout, stderr).
fn validate(path: &Path) -> (bool, String, String) {
    let output = Command::new(agent_bin())
        .arg("validate")
        .arg(path)
        .output()
        .expect("running lb-agent validate");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn assert_valid(path: &Path) -> String {
    let (ok, stdout, stderr) = validate(path);
    assert!(
        ok,
        "lb-agent validate {} refused it:\n{stdout}{stderr}",
        path.display()
    );
    stdout
}

/// An address of a documentation range (RFC 5737), which an example must use.
fn documentation_address(address: Ipv4Addr) -> bool {
    let [a, b, c, _] = address.octets();
    matches!((a, b, c), (192, 0, 2) | (198, 51, 100) | (203, 0, 113))
}

/// Checks one `addresses` entry of a pool, a CIDR or a `first-last` range, and returns its
/// first and last address.
fn pool_entry(entry: &str) -> (Ipv4Addr, Ipv4Addr) {
    let parse = |text: &str| {
        text.trim()
            .parse::<Ipv4Addr>()
            .unwrap_or_else(|e| panic!("pool entry {entry:?}: {text:?}: {e}"))
    };
    if let Some((address, length)) = entry.split_once('/') {
        let length: u32 = length.parse().expect("a prefix length");
        assert!(length <= 32, "{entry}");
        let first = u32::from(parse(address));
        let host_bits = u32::MAX.checked_shr(length).unwrap_or(0);
        assert_eq!(first & host_bits, 0, "{entry}: host bits set");
        (Ipv4Addr::from(first), Ipv4Addr::from(first | host_bits))
    } else {
        let (first, last) = entry.split_once('-').expect("a CIDR or a first-last range");
        let (first, last) = (parse(first), parse(last));
        assert!(first <= last, "{entry}");
        (first, last)
    }
}

/// The settings document of the `ConfigMap` (`lb-agent validate` checks the rest of it).
fn settings_document() -> String {
    let documents = load(AGENT_MANIFEST);
    let config_map = single!(documents, ConfigMap);
    let data = config_map.data.as_ref().expect("data");
    assert_eq!(
        data.len(),
        1,
        "the settings ConfigMap holds the settings document only"
    );
    let text = data.values().next().expect("one key");
    let settings: Value = serde_yaml::from_str(text).expect("the settings are YAML");
    assert_eq!(settings["apiVersion"].as_str(), Some(SETTINGS_API_VERSION));
    assert_eq!(settings["kind"].as_str(), Some("AgentSettings"));
    for field in ["nodePortRange", "maglev"] {
        assert!(
            settings.get(field).is_some(),
            "the example settings show {field}"
        );
    }
    let pools = settings
        .get("loadBalancerIPPools")
        .and_then(Value::as_sequence)
        .expect("the example settings show loadBalancerIPPools");
    assert!(!pools.is_empty());
    for pool in pools {
        let name = pool["name"].as_str().expect("a pool has a name");
        let addresses = pool["addresses"]
            .as_sequence()
            .expect("a pool has addresses");
        for entry in addresses {
            let (first, last) = pool_entry(entry.as_str().expect("an address entry is a string"));
            assert!(
                documentation_address(first) && documentation_address(last),
                "pool {name}: {entry:?} is not in a documentation range (RFC 5737)"
            );
        }
    }
    text.clone()
}

/// Writes the settings into `dir` as `00-settings.yaml`.
fn write_settings(dir: &Path) {
    fs::write(dir.join("00-settings.yaml"), settings_document()).expect("writing the settings");
}

#[test]
fn lb_agent_validate_takes_the_settings_of_the_configmap() {
    let scratch = Scratch::new("settings");
    write_settings(&scratch.0);
    let stdout = assert_valid(&scratch.0.join("00-settings.yaml"));
    assert!(stdout.contains("valid, 0 service ports"), "{stdout}");
}

#[test]
fn lb_agent_validate_takes_the_examples_with_the_settings_of_the_configmap() {
    // Each example directory as it is, and the documentation's Services together with the
    // settings every agent runs with (their nodePorts must be inside its nodePortRange).
    assert_valid(&workspace().join("manifests/examples/demo.yaml"));
    assert_valid(&workspace().join(SERVICE_TYPES));
    let scratch = Scratch::new("examples");
    write_settings(&scratch.0);
    for file in yaml_files(&workspace().join(SERVICE_TYPES)) {
        fs::copy(
            &file,
            scratch.0.join(file.file_name().expect("a file name")),
        )
        .expect("copying an example");
    }
    let stdout = assert_valid(&scratch.0);
    let line = |service: &str| {
        stdout
            .lines()
            .find(|line| line.trim_start().starts_with(service))
            .unwrap_or_else(|| panic!("validate printed no line for {service}:\n{stdout}"))
    };
    assert!(
        line("default/web-app").contains("nodePort=30080"),
        "{stdout}"
    );
    assert!(
        line("default/debug-svc").contains("nodePort=30007"),
        "{stdout}"
    );
    assert!(
        !line("default/backend-api").contains("nodePort"),
        "{stdout}"
    );
    // Local policy: a healthCheckNodePort, assigned like the nodePort.
    let public_api = line("default/public-api");
    assert!(
        public_api.contains("(assigned)") && public_api.contains("healthCheckNodePort="),
        "{stdout}"
    );
}
