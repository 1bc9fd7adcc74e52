//! The fake Kubernetes API server (`integration_tests::fake_api`) against a plain HTTP client
//! written here, and against kube-rs itself: the agent's Kubernetes mode is only as well tested
//! as the fake is faithful. No root needed, except for the network-namespace test (it fails
//! without it).

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpStream,
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use integration_tests::{
    fake_api::{FakeApi, Request},
    netns::{Netns, unique_prefix},
};
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Service};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::watcher,
};
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(10);

const SERVICES: &str = r"
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: demo
  labels: {app: web, tier: front}
spec:
  type: NodePort
  selector: {app: web}
  ports:
    - {name: http, port: 80, targetPort: 8080}
---
apiVersion: v1
kind: Service
metadata:
  name: db
  namespace: demo
  labels: {app: db}
spec:
  selector: {app: db}
  ports:
    - {port: 5432}
";

fn start() -> FakeApi {
    let api = FakeApi::start("127.0.0.1:0".parse().unwrap()).unwrap();
    api.set_bookmark_interval(Duration::from_millis(200));
    api
}

fn connect(port: u16) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream
}

/// One request on a fresh connection: the status code and the JSON body.
fn http(port: u16, method: &str, target: &str, body: Option<(&str, &Value)>) -> (u16, Value) {
    let mut stream = connect(port);
    let (content_type, body) = body.map_or((String::new(), String::new()), |(t, b)| {
        (format!("Content-Type: {t}\r\n"), b.to_string())
    });
    write!(
        stream,
        "{method} {target} HTTP/1.1\r\nHost: fake\r\nUser-Agent: plain-test\r\n{content_type}\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, serde_json::from_str(body).unwrap())
}

fn get(port: u16, target: &str) -> (u16, Value) {
    http(port, "GET", target, None)
}

fn rv(object: &Value) -> u64 {
    object["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// A watch read line by line through the chunked encoding.
struct Watch {
    reader: BufReader<TcpStream>,
    pending: Vec<u8>,
    ended: bool,
}

#[derive(Debug, PartialEq)]
enum End {
    /// The terminating chunk came: the server ended the watch.
    Clean,
    /// The connection went without it.
    Cut,
}

impl Watch {
    fn open(port: u16, target: &str) -> Self {
        let mut stream = connect(port);
        write!(
            stream,
            "GET {target} HTTP/1.1\r\nHost: fake\r\nUser-Agent: plain-watch\r\n\r\n"
        )
        .unwrap();
        let mut reader = BufReader::new(stream);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(head.contains("Transfer-Encoding: chunked"), "{head}");
        assert!(head.contains("Content-Type: application/json"), "{head}");
        Watch {
            reader,
            pending: Vec::new(),
            ended: false,
        }
    }

    /// The next event, or how the stream ended.
    fn next(&mut self) -> Result<Value, End> {
        loop {
            if let Some(newline) = self.pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=newline).collect();
                return Ok(serde_json::from_slice(&line).unwrap());
            }
            if self.ended {
                return Err(End::Clean);
            }
            let mut size = String::new();
            match self.reader.read_line(&mut size) {
                Ok(0) | Err(_) => return Err(End::Cut),
                Ok(_) => {}
            }
            let size = usize::from_str_radix(size.trim(), 16).unwrap();
            let mut chunk = vec![0; size + 2];
            if self.reader.read_exact(&mut chunk).is_err() {
                return Err(End::Cut);
            }
            assert_eq!(&chunk[size..], b"\r\n");
            if size == 0 {
                self.ended = true;
            }
            self.pending.extend_from_slice(&chunk[..size]);
        }
    }

    /// The next event that is not a bookmark.
    fn next_change(&mut self) -> Value {
        loop {
            let event = self.next().unwrap();
            if event["type"] != "BOOKMARK" {
                return event;
            }
        }
    }
}

fn summary(event: &Value) -> (String, String) {
    (
        event["type"].as_str().unwrap().to_owned(),
        event["object"]["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

fn pair(kind: &str, name: &str) -> (String, String) {
    (kind.to_owned(), name.to_owned())
}

#[test]
fn list_then_watch_from_its_resource_version() {
    let api = start();
    api.apply_yaml(SERVICES).unwrap();
    let (code, list) = get(api.port(), "/api/v1/services?limit=500");
    assert_eq!(code, 200);
    assert_eq!(list["kind"], "ServiceList");
    assert_eq!(list["apiVersion"], "v1");
    assert!(list["metadata"].get("continue").is_none());
    let names: Vec<_> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| &i["metadata"]["name"])
        .collect();
    assert_eq!(names, ["db", "web"]);
    let list_rv = rv(&list);
    assert_eq!(list_rv, api.current_resource_version());

    let mut watch = Watch::open(
        api.port(),
        &format!(
            "/api/v1/services?&watch=true&timeoutSeconds=290&allowWatchBookmarks=true&resourceVersion={list_rv}"
        ),
    );
    let mut web = api.get("services", "demo", "web").unwrap();
    web["metadata"]["labels"]["tier"] = json!("back");
    api.apply(web).unwrap();
    let modified = watch.next_change();
    assert_eq!(summary(&modified), pair("MODIFIED", "web"));
    assert_eq!(modified["object"]["metadata"]["labels"]["tier"], "back");
    assert_eq!(modified["object"]["kind"], "Service");
    assert!(rv(&modified["object"]) > list_rv);
    api.delete("services", "demo", "db").unwrap();
    let deleted = watch.next_change();
    assert_eq!(summary(&deleted), pair("DELETED", "db"));
    assert_eq!(rv(&deleted["object"]), api.current_resource_version());

    // From "0", or without a resourceVersion: the current objects first.
    for target in [
        "/api/v1/namespaces/demo/services?watch=1&resourceVersion=0",
        "/api/v1/namespaces/demo/services?watch=true",
    ] {
        let mut watch = Watch::open(api.port(), target);
        assert_eq!(summary(&watch.next_change()), pair("ADDED", "web"));
    }
    // Resuming from an old resourceVersion replays what came after it.
    let mut watch = Watch::open(
        api.port(),
        &format!("/api/v1/namespaces/demo/services?watch=true&resourceVersion={list_rv}"),
    );
    assert_eq!(summary(&watch.next_change()), pair("MODIFIED", "web"));
    assert_eq!(summary(&watch.next_change()), pair("DELETED", "db"));
}

#[test]
fn bookmarks_carry_the_current_resource_version() {
    let api = start();
    api.apply_yaml(SERVICES).unwrap();
    let current = api.current_resource_version();
    let mut watch = Watch::open(
        api.port(),
        &format!("/api/v1/services?watch=true&allowWatchBookmarks=true&resourceVersion={current}"),
    );
    let bookmark = watch.next().unwrap();
    assert_eq!(bookmark["type"], "BOOKMARK");
    assert_eq!(bookmark["object"]["kind"], "Service");
    assert_eq!(bookmark["object"]["apiVersion"], "v1");
    assert_eq!(rv(&bookmark["object"]), current);
    // A bookmark after a change carries the change's resourceVersion.
    api.delete("services", "demo", "db");
    assert_eq!(watch.next().unwrap()["type"], "DELETED");
    let bookmark = watch.next().unwrap();
    assert_eq!(bookmark["type"], "BOOKMARK");
    assert_eq!(rv(&bookmark["object"]), current + 1);
    // Without allowWatchBookmarks, none; the watch ends cleanly after timeoutSeconds.
    let started = Instant::now();
    let mut watch = Watch::open(
        api.port(),
        &format!(
            "/apis/discovery.k8s.io/v1/endpointslices?watch=true&timeoutSeconds=1&resourceVersion={current}"
        ),
    );
    assert_eq!(watch.next(), Err(End::Clean));
    assert!(started.elapsed() >= Duration::from_secs(1));

    // A streaming list ends its initial events with the annotated bookmark.
    let mut watch = Watch::open(
        api.port(),
        "/api/v1/services?watch=true&allowWatchBookmarks=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&resourceVersion=0",
    );
    assert_eq!(summary(&watch.next().unwrap()), pair("ADDED", "web"));
    let end = watch.next().unwrap();
    assert_eq!(end["type"], "BOOKMARK");
    assert_eq!(
        end["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );
}

#[test]
fn selectors_filter_lists_and_watches() {
    let api = start();
    api.apply_yaml(SERVICES).unwrap();
    let names = |target: &str| -> Vec<String> {
        let (code, list) = get(api.port(), target);
        assert_eq!(code, 200, "{target}: {list}");
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["metadata"]["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(names("/api/v1/services?labelSelector=app%3Dweb"), ["web"]);
    assert_eq!(names("/api/v1/services?labelSelector=app==db"), ["db"]);
    assert_eq!(names("/api/v1/services?labelSelector=app!%3Dweb"), ["db"]);
    assert_eq!(names("/api/v1/services?labelSelector=tier"), ["web"]);
    assert_eq!(names("/api/v1/services?labelSelector=!tier"), ["db"]);
    assert_eq!(
        names("/api/v1/services?labelSelector=app%3Dweb%2Ctier%3Dfront"),
        ["web"]
    );
    assert_eq!(
        names("/api/v1/services?labelSelector=app+in+(web,db),tier+notin+(x)"),
        ["db", "web"]
    );
    assert_eq!(
        names("/api/v1/services?fieldSelector=metadata.name%3Ddb"),
        ["db"]
    );
    assert_eq!(
        names("/api/v1/services?fieldSelector=metadata.namespace%3Dother"),
        Vec::<String>::new()
    );
    assert_eq!(
        names("/api/v1/namespaces/other/services"),
        Vec::<String>::new()
    );
    let (code, status) = get(api.port(), "/api/v1/services?labelSelector=a+in+x");
    assert_eq!((code, status["kind"].as_str()), (400, Some("Status")));

    // An object that stops matching leaves the watch as DELETED; one that starts, as ADDED.
    let current = api.current_resource_version();
    let mut watch = Watch::open(
        api.port(),
        &format!(
            "/api/v1/services?watch=true&labelSelector=tier%3Dfront&resourceVersion={current}"
        ),
    );
    let mut web = api.get("services", "demo", "web").unwrap();
    web["metadata"]["labels"]["tier"] = json!("back");
    api.apply(web.clone()).unwrap();
    let mut db = api.get("services", "demo", "db").unwrap();
    db["metadata"]["labels"]["tier"] = json!("front");
    api.apply(db).unwrap();
    web["metadata"]["labels"]["tier"] = json!("middle");
    api.apply(web).unwrap();
    api.delete("services", "demo", "db");
    assert_eq!(summary(&watch.next_change()), pair("DELETED", "web"));
    assert_eq!(summary(&watch.next_change()), pair("ADDED", "db"));
    assert_eq!(summary(&watch.next_change()), pair("DELETED", "db"));
}

#[test]
fn compaction_expires_old_resource_versions() {
    let api = start();
    api.apply_yaml(SERVICES).unwrap();
    let old = api.current_resource_version();
    let mut open = Watch::open(
        api.port(),
        &format!("/api/v1/services?watch=true&resourceVersion={old}"),
    );
    api.delete("services", "demo", "db");
    api.compact();
    // A watch open across the compaction misses nothing.
    assert_eq!(summary(&open.next_change()), pair("DELETED", "db"));
    let mut watch = Watch::open(
        api.port(),
        &format!("/api/v1/services?watch=true&resourceVersion={old}"),
    );
    let error = watch.next().unwrap();
    assert_eq!(error["type"], "ERROR");
    assert_eq!(error["object"]["kind"], "Status");
    assert_eq!(error["object"]["status"], "Failure");
    assert_eq!(error["object"]["reason"], "Expired");
    assert_eq!(error["object"]["code"], 410);
    assert!(
        error["object"]["message"]
            .as_str()
            .unwrap()
            .starts_with(&format!("too old resource version: {old} ("))
    );
    assert_eq!(watch.next(), Err(End::Clean));
    // From the current resourceVersion it works; expire_watches ends it with 410 too.
    let current = api.current_resource_version();
    let mut watch = Watch::open(
        api.port(),
        &format!("/api/v1/services?watch=true&resourceVersion={current}"),
    );
    api.expire_watches();
    assert_eq!(watch.next().unwrap()["object"]["code"], 410);
    assert_eq!(watch.next(), Err(End::Clean));
}

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases";
const WEB: &str = "/api/v1/namespaces/demo/services/web";
const MERGE: &str = "application/merge-patch+json";

/// A request with a JSON body of the given type.
fn send(port: u16, method: &str, target: &str, content_type: &str, body: &Value) -> (u16, Value) {
    http(port, method, target, Some((content_type, body)))
}

fn reason(answer: &(u16, Value)) -> (u16, &str) {
    (answer.0, answer.1["reason"].as_str().unwrap_or_default())
}

#[test]
fn create_and_replace_are_checked() {
    let api = start();
    let port = api.port();
    let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "lb"}, "spec": {"holderIdentity": "a"}});
    let (code, created) = send(port, "POST", LEASES, "application/json", &lease);
    assert_eq!(code, 201, "{created}");
    assert_eq!(created["metadata"]["namespace"], "kube-system");
    assert!(created["metadata"]["uid"].is_string());
    let created_at = created["metadata"]["creationTimestamp"].as_str().unwrap();
    assert!(
        created_at.len() == 20 && created_at.ends_with('Z'),
        "{created_at}"
    );
    let again = send(port, "POST", LEASES, "application/json", &lease);
    assert_eq!(reason(&again), (409, "AlreadyExists"));

    // Replace with the current resourceVersion works, with a stale one conflicts.
    let item = format!("{LEASES}/lb");
    let mut update = created.clone();
    update["spec"]["holderIdentity"] = json!("b");
    let (code, replaced) = send(port, "PUT", &item, "application/json", &update);
    assert_eq!(code, 200, "{replaced}");
    assert_eq!(replaced["spec"]["holderIdentity"], "b");
    assert_eq!(replaced["metadata"]["uid"], created["metadata"]["uid"]);
    assert!(rv(&replaced) > rv(&created));
    update["spec"]["holderIdentity"] = json!("c");
    let stale = send(port, "PUT", &item, "application/json", &update);
    assert_eq!(reason(&stale), (409, "Conflict"));
    assert_eq!(stale.1["kind"], "Status");
    let (code, got) = get(port, &item);
    assert_eq!((code, &got["spec"]["holderIdentity"]), (200, &json!("b")));
    // DELETE answers the object; afterwards it is gone.
    let (code, deleted) = http(port, "DELETE", &item, None);
    assert_eq!((code, &deleted["kind"]), (200, &json!("Lease")));
    assert_eq!(
        reason(&http(port, "DELETE", &item, None)),
        (404, "NotFound")
    );
}

#[test]
fn bad_requests_get_status_answers() {
    let api = start();
    let port = api.port();
    let other = format!("{LEASES}/other");
    let named = json!({"metadata": {"name": "lb"}});
    let mismatch = send(port, "PUT", &other, "application/json", &named);
    assert_eq!(reason(&mismatch), (400, "BadRequest"));
    let missing = send(port, "PUT", &other, "application/json", &json!({}));
    assert_eq!(reason(&missing), (404, "NotFound"));
    assert_eq!(
        missing.1["message"],
        "leases.coordination.k8s.io \"other\" not found"
    );
    assert_eq!(missing.1["status"], "Failure");
    assert_eq!(missing.1["apiVersion"], "v1");
    assert_eq!(
        reason(&get(port, "/api/v1/namespaces/x/pods")),
        (404, "NotFound")
    );
    assert_eq!(get(port, "/nope").0, 404);
    assert_eq!(get(port, "/api/v1/namespaces/default/nodes/x").0, 404);
    let method = http(port, "DELETE", "/api/v1/services", None);
    assert_eq!(reason(&method), (405, "MethodNotAllowed"));
    let not_object = send(
        port,
        "POST",
        "/api/v1/namespaces/default/services",
        "application/json",
        &json!("x"),
    );
    assert_eq!(reason(&not_object), (400, "BadRequest"));
    let wrong_kind = send(
        port,
        "POST",
        LEASES,
        "application/json",
        &json!({"kind": "Service", "apiVersion": "v1", "metadata": {"name": "x"}}),
    );
    assert_eq!(reason(&wrong_kind), (400, "BadRequest"));
    let nameless = send(port, "POST", LEASES, "application/json", &json!({}));
    assert_eq!(reason(&nameless), (422, "Invalid"));
    let mut raw = connect(port);
    raw.write_all(b"garbage\r\n\r\n").unwrap();
    let mut answer = String::new();
    raw.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("\"kind\":\"Status\""), "{answer}");
    // Absurd sizes and timeouts are refused or capped, never a crash.
    for request in [
        "POST /api/v1/namespaces/default/services HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n",
        "POST /api/v1/namespaces/default/services HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n",
        "POST /api/v1/namespaces/default/services HTTP/1.1\r\nContent-Length: x\r\n\r\n",
    ] {
        let mut raw = connect(port);
        raw.write_all(request.as_bytes()).unwrap();
        let mut answer = String::new();
        raw.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 4"), "{request:?}: {answer}");
    }
    let mut watch = Watch::open(
        port,
        "/api/v1/services?watch=true&timeoutSeconds=18446744073709551615&allowWatchBookmarks=true",
    );
    assert_eq!(watch.next().unwrap()["type"], "BOOKMARK");
    // The server still serves.
    assert_eq!(get(port, "/api/v1/services").0, 200);
}

#[test]
fn status_is_a_subresource() {
    let api = start();
    api.apply_yaml(SERVICES).unwrap();
    let port = api.port();
    let status = format!("{WEB}/status");
    let ingress = json!({"status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.10"}]}}, "spec": {"type": "ClusterIP"}});
    let (code, patched) = send(port, "PATCH", &status, MERGE, &ingress);
    assert_eq!(code, 200, "{patched}");
    assert_eq!(
        patched["status"]["loadBalancer"]["ingress"][0]["ip"],
        "192.0.2.10"
    );
    assert_eq!(
        patched["spec"]["type"], "NodePort",
        "a status write changes only the status"
    );
    // The same patch again changes nothing, so no new resourceVersion.
    let (_, again) = send(
        port,
        "PATCH",
        &status,
        "application/strategic-merge-patch+json",
        &ingress,
    );
    assert_eq!(rv(&again), rv(&patched));
    // A write to the object keeps the status.
    let labels = json!({"status": null, "metadata": {"labels": {"x": "y"}}});
    let (code, main) = send(port, "PATCH", WEB, MERGE, &labels);
    assert_eq!(code, 200);
    assert_eq!(
        main["metadata"]["labels"],
        json!({"app": "web", "tier": "front", "x": "y"})
    );
    assert_eq!(main["status"], patched["status"]);
    let mut replace = main.clone();
    replace["status"] = json!({});
    replace["spec"]["sessionAffinity"] = json!("ClientIP");
    let (code, put) = send(port, "PUT", WEB, "application/json", &replace);
    assert_eq!(code, 200);
    assert_eq!(put["spec"]["sessionAffinity"], "ClientIP");
    assert_eq!(put["status"], patched["status"]);
    // PUT to /status replaces the status only.
    let mut replace = put.clone();
    replace["status"] = json!({"loadBalancer": {}});
    replace["spec"]["sessionAffinity"] = json!("None");
    let (code, put) = send(port, "PUT", &status, "application/json", &replace);
    assert_eq!(code, 200);
    assert_eq!(put["status"], json!({"loadBalancer": {}}));
    assert_eq!(put["spec"]["sessionAffinity"], "ClientIP");
    // The control API can set a status.
    api.set_status(
        "services",
        "demo",
        "db",
        json!({"loadBalancer": {"ingress": [{"ip": "192.0.2.11"}]}}),
    )
    .unwrap();
    let db = api.get("services", "demo", "db").unwrap();
    assert_eq!(
        db["status"]["loadBalancer"]["ingress"][0]["ip"],
        "192.0.2.11"
    );
}

#[test]
fn patches_are_checked_and_recorded() {
    let api = start();
    api.apply_yaml(SERVICES).unwrap();
    let port = api.port();
    let status = format!("{WEB}/status");
    let ingress = json!({"status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.10"}]}}});
    assert_eq!(send(port, "PATCH", &status, MERGE, &ingress).0, 200);
    // A patch naming a stale resourceVersion conflicts; JSON patch is not supported.
    let stale = json!({"metadata": {"resourceVersion": "1"}, "status": {}});
    assert_eq!(
        reason(&send(port, "PATCH", &status, MERGE, &stale)),
        (409, "Conflict")
    );
    let json_patch = send(
        port,
        "PATCH",
        WEB,
        "application/json-patch+json",
        &json!([]),
    );
    assert_eq!(reason(&json_patch), (415, "UnsupportedMediaType"));
    let missing = "/api/v1/namespaces/demo/services/nope/status";
    assert_eq!(send(port, "PATCH", missing, MERGE, &ingress).0, 404);
    // Leases have no status subresource.
    assert_eq!(
        send(
            port,
            "PATCH",
            &format!("{LEASES}/x/status"),
            MERGE,
            &ingress
        )
        .0,
        404
    );
    // Server-side apply creates what is missing.
    let apply = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "spec": {"holderIdentity": "a"}});
    let (code, created) = send(
        port,
        "PATCH",
        &format!("{LEASES}/new?fieldManager=t"),
        "application/apply-patch+yaml",
        &apply,
    );
    assert_eq!((code, &created["metadata"]["name"]), (201, &json!("new")));
    // The recorded requests tell who wrote what.
    let writes: Vec<_> = api
        .requests()
        .into_iter()
        .filter(Request::is_write)
        .collect();
    assert_eq!(writes.len(), 6);
    assert!(
        writes
            .iter()
            .all(|r| r.user_agent.as_deref() == Some("plain-test"))
    );
    assert_eq!(writes[0].method, "PATCH");
    assert_eq!(writes[0].path(), status);
    assert_eq!(writes[0].content_type.as_deref(), Some(MERGE));
    assert_eq!(writes[0].code, 200);
    assert!(writes[0].body.contains("192.0.2.10"));
    assert!(writes[0].remote.ip().is_loopback());
    assert_eq!(writes[1].code, 409);
}

#[test]
fn services_get_the_api_server_defaults() {
    let api = start();
    let stored = api
        .apply_yaml(
            r"
apiVersion: v1
kind: Service
metadata: {name: lb}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  ports: [{port: 80, targetPort: http}, {port: 53, protocol: UDP}]
---
apiVersion: v1
kind: Service
metadata: {name: headless}
spec:
  clusterIP: None
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: ext}
spec: {type: ExternalName, externalName: example.com}
---
apiVersion: v1
kind: Service
metadata: {name: lb-no-node-ports}
spec:
  type: LoadBalancer
  allocateLoadBalancerNodePorts: false
  ports: [{port: 80}]
",
        )
        .unwrap();
    let lb = &stored[0];
    assert_eq!(lb["metadata"]["namespace"], "default");
    let spec = &lb["spec"];
    assert!(spec["clusterIP"].as_str().unwrap().starts_with("10.96."));
    assert_eq!(spec["clusterIPs"], json!([spec["clusterIP"]]));
    assert_eq!(spec["sessionAffinity"], "None");
    assert_eq!(spec["externalTrafficPolicy"], "Local");
    assert_eq!(spec["ports"][0]["protocol"], "TCP");
    assert_eq!(spec["ports"][0]["targetPort"], "http");
    assert_eq!(spec["ports"][1]["protocol"], "UDP");
    assert_eq!(spec["ports"][1]["targetPort"], 53);
    let node_ports: Vec<u64> = (0..2)
        .map(|i| spec["ports"][i]["nodePort"].as_u64().unwrap())
        .collect();
    let health = spec["healthCheckNodePort"].as_u64().unwrap();
    assert!(
        node_ports
            .iter()
            .chain([&health])
            .all(|p| (30000..=32767).contains(p))
    );
    assert!(node_ports[0] != node_ports[1] && !node_ports.contains(&health));
    assert_eq!(stored[1]["spec"]["clusterIP"], "None");
    assert_eq!(stored[1]["spec"]["type"], "ClusterIP");
    assert!(stored[2]["spec"].get("clusterIP").is_none());
    assert!(stored[3]["spec"]["ports"][0].get("nodePort").is_none());
    assert_ne!(stored[3]["spec"]["clusterIP"], spec["clusterIP"]);

    // Re-applying the same document keeps what was allocated.
    let again = api.apply_yaml("apiVersion: v1\nkind: Service\nmetadata: {name: lb}\nspec:\n  type: LoadBalancer\n  externalTrafficPolicy: Local\n  ports: [{port: 80, targetPort: http}, {port: 53, protocol: UDP}]\n").unwrap();
    assert_eq!(again[0]["spec"], *spec);
    assert_eq!(
        again[0]["metadata"]["resourceVersion"],
        lb["metadata"]["resourceVersion"]
    );
    // A POSTed Service is defaulted the same way and loses any status.
    let (code, created) = http(
        api.port(),
        "POST",
        "/api/v1/namespaces/default/services",
        Some((
            "application/json",
            &json!({"apiVersion": "v1", "kind": "Service", "metadata": {"generateName": "gen-"}, "spec": {"type": "NodePort", "ports": [{"port": 1}]}, "status": {"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}}}),
        )),
    );
    assert_eq!(code, 201);
    assert!(
        created["metadata"]["name"]
            .as_str()
            .unwrap()
            .starts_with("gen-")
    );
    assert_eq!(created["status"], json!({"loadBalancer": {}}));
    assert!(created["spec"]["ports"][0]["nodePort"].as_u64().is_some());
    assert_eq!(created["spec"]["externalTrafficPolicy"], "Cluster");
}

#[test]
fn events_and_nodes() {
    let api = start();
    let port = api.port();
    let core_event = json!({"apiVersion": "v1", "kind": "Event", "metadata": {"name": "web.1", "namespace": "demo"}, "reason": "IPAllocated", "involvedObject": {"kind": "Service", "name": "web"}});
    assert_eq!(
        http(
            port,
            "POST",
            "/api/v1/namespaces/demo/events",
            Some(("application/json", &core_event))
        )
        .0,
        201
    );
    let new_event = json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "web.2"}, "reason": "Synced", "regarding": {"kind": "Service", "name": "web"}});
    assert_eq!(
        http(
            port,
            "POST",
            "/apis/events.k8s.io/v1/namespaces/demo/events",
            Some(("application/json", &new_event))
        )
        .0,
        201
    );
    let events = api.events();
    let reasons: Vec<_> = events
        .iter()
        .map(|e| e["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons, ["IPAllocated", "Synced"]);
    assert_eq!(events[1]["apiVersion"], "events.k8s.io/v1");
    // Nodes are cluster-scoped.
    api.apply_yaml("apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\nstatus:\n  addresses: [{type: InternalIP, address: 172.30.0.1}]\n").unwrap();
    let (code, node) = get(port, "/api/v1/nodes/node-a");
    assert_eq!(code, 200);
    assert!(node["metadata"].get("namespace").is_none());
    assert_eq!(node["status"]["addresses"][0]["address"], "172.30.0.1");
    let (_, list) = get(port, "/api/v1/nodes");
    assert_eq!(list["kind"], "NodeList");
    assert_eq!(get(port, "/api/v1/namespaces/default/nodes/node-a").0, 404);
    let mut watch = Watch::open(
        port,
        "/api/v1/nodes?watch=true&fieldSelector=metadata.name%3Dnode-a",
    );
    assert_eq!(summary(&watch.next_change()), pair("ADDED", "node-a"));
}

#[test]
fn drop_connections_cuts_watches_and_keeps_serving() {
    let api = start();
    api.apply_yaml(SERVICES).unwrap();
    let mut watch = Watch::open(api.port(), "/api/v1/services?watch=true");
    watch.next_change();
    watch.next_change();
    assert!(api.drop_connections() >= 1);
    assert_eq!(watch.next(), Err(End::Cut));
    assert_eq!(get(api.port(), "/api/v1/services").0, 200);
}

#[test]
fn stop_and_restart_keep_the_state() {
    let api = start();
    api.apply_yaml(SERVICES).unwrap();
    let port = api.port();
    let rv_before = api.current_resource_version();
    let mut watch = Watch::open(
        port,
        &format!("/api/v1/services?watch=true&resourceVersion={rv_before}"),
    );
    api.stop();
    assert!(!api.is_listening());
    assert_eq!(watch.next(), Err(End::Cut));
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    // Changes while it is away reach watches that resume after it returns.
    api.delete("services", "demo", "db");
    api.restart().unwrap();
    assert_eq!(api.port(), port);
    let mut watch = Watch::open(
        port,
        &format!("/api/v1/services?watch=true&resourceVersion={rv_before}"),
    );
    assert_eq!(summary(&watch.next_change()), pair("DELETED", "db"));
    assert_eq!(get(port, "/api/v1/namespaces/demo/services/web").0, 200);
}

#[test]
fn held_requests_wait() {
    let api = Arc::new(start());
    api.hold(true);
    let port = api.port();
    let answered = Arc::new(Mutex::new(None));
    let thread = {
        let answered = answered.clone();
        std::thread::spawn(move || {
            *answered.lock().unwrap() = Some(get(port, "/api/v1/services").0);
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    assert!(answered.lock().unwrap().is_none());
    api.hold(false);
    thread.join().unwrap();
    assert_eq!(*answered.lock().unwrap(), Some(200));
}

#[test]
fn curl_can_talk_to_it() {
    let api = start();
    api.apply_yaml(SERVICES).unwrap();
    let output = Command::new("curl")
        .args(["-sS", "--max-time", "5", "-A", "curl-test"])
        .arg(format!("{}/api/v1/namespaces/demo/services/web", api.url()))
        .output()
        .expect("curl (cargo xtask setup installs it)");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let service: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(service["metadata"]["name"], "web");
    // A watch through curl, ended by timeoutSeconds.
    let output = Command::new("curl")
        .args(["-sS", "--max-time", "5"])
        .arg(format!(
            "{}/api/v1/services?watch=true&timeoutSeconds=1",
            api.url()
        ))
        .output()
        .unwrap();
    assert!(output.status.success());
    let lines: Vec<Value> = output
        .stdout
        .lines()
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert!(
        api.requests()
            .iter()
            .any(|r| r.user_agent.as_deref() == Some("curl-test"))
    );
}

#[test]
fn serves_inside_network_namespaces() {
    let prefix = unique_prefix();
    let first = Netns::create(&format!("{prefix}-api1")).unwrap();
    let second = Netns::create(&format!("{prefix}-api2")).unwrap();
    let api = FakeApi::start_in_netns(first.name(), "127.0.0.1:0".parse().unwrap()).unwrap();
    api.listen_also_in_netns(second.name()).unwrap();
    api.apply_yaml(SERVICES).unwrap();
    let url = format!("{}/api/v1/namespaces/demo/services/db", api.url());
    let curl = |netns: &Netns| {
        let output = netns
            .command("curl")
            .args(["-sS", "--max-time", "5", &url])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice::<Value>(&output.stdout).unwrap()
    };
    assert_eq!(curl(&first)["metadata"]["name"], "db");
    assert_eq!(curl(&second)["metadata"]["name"], "db");
    let netns: Vec<_> = api.requests().into_iter().map(|r| r.netns).collect();
    assert_eq!(
        netns,
        [
            Some(first.name().to_owned()),
            Some(second.name().to_owned())
        ]
    );
    // Both come back after a restart.
    api.stop();
    api.restart().unwrap();
    assert_eq!(curl(&first)["metadata"]["name"], "db");
    assert_eq!(curl(&second)["metadata"]["name"], "db");
}

// ---------------------------------------------------------------------------------------------
// kube-rs against the fake

async fn kube_client(api: &FakeApi, user: &str) -> Client {
    let dir = std::env::temp_dir().join(format!("fake-api-{}-{user}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("kubeconfig");
    api.write_kubeconfig(&path, user).unwrap();
    let kubeconfig = Kubeconfig::read_from(&path).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    Client::try_from(config).unwrap()
}

/// Runs a watcher on Services and collects (event, name) pairs.
type Seen = Arc<Mutex<Vec<(String, String)>>>;

fn print_requests(api: &FakeApi) {
    for r in api.requests() {
        eprintln!(
            "{} {} -> {} user={:?} agent={:?} {:?}",
            r.method, r.target, r.code, r.user, r.user_agent, r.content_type
        );
    }
}

async fn wait_for(seen: &Seen, expected: (&str, &str)) {
    let deadline = Instant::now() + TIMEOUT;
    while Instant::now() < deadline {
        if seen
            .lock()
            .unwrap()
            .iter()
            .any(|(k, n)| k == expected.0 && n == expected.1)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no {expected:?} in {:?}", seen.lock().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_watcher_follows_changes_and_recovers() {
    let api = Arc::new(start());
    api.apply_yaml(SERVICES).unwrap();
    let client = kube_client(&api, "watcher").await;
    let services: Api<Service> = Api::all(client);
    let seen: Seen = Arc::default();
    let task = {
        let seen = seen.clone();
        tokio::spawn(async move {
            let mut stream = watcher(services, watcher::Config::default()).boxed();
            loop {
                match stream.next().await {
                    Some(Ok(event)) => {
                        let entry = match event {
                            watcher::Event::Init => ("Init".into(), String::new()),
                            watcher::Event::InitApply(s) => {
                                ("InitApply".into(), s.metadata.name.unwrap())
                            }
                            watcher::Event::InitDone => ("InitDone".into(), String::new()),
                            watcher::Event::Apply(s) => ("Apply".into(), s.metadata.name.unwrap()),
                            watcher::Event::Delete(s) => {
                                ("Delete".into(), s.metadata.name.unwrap())
                            }
                        };
                        seen.lock().unwrap().push(entry);
                    }
                    Some(Err(e)) => {
                        seen.lock().unwrap().push(("Error".into(), e.to_string()));
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    None => return,
                }
            }
        })
    };
    wait_for(&seen, ("InitDone", "")).await;
    assert!(seen.lock().unwrap().contains(&pair("InitApply", "web")));
    api.apply_yaml("apiVersion: v1\nkind: Service\nmetadata: {name: new, namespace: demo}\nspec: {ports: [{port: 1}]}\n").unwrap();
    wait_for(&seen, ("Apply", "new")).await;
    api.set_status(
        "services",
        "demo",
        "new",
        json!({"loadBalancer": {"ingress": [{"ip": "192.0.2.1"}]}}),
    )
    .unwrap();
    api.delete("services", "demo", "db");
    wait_for(&seen, ("Delete", "db")).await;

    // Cut connections: the watcher resumes from its last resourceVersion, no relist.
    let watches = api.requests().iter().filter(|r| r.is_watch()).count();
    api.drop_connections();
    api.delete("services", "demo", "new");
    wait_for(&seen, ("Delete", "new")).await;
    assert!(api.requests().iter().filter(|r| r.is_watch()).count() > watches);

    // Compacted and expired: the watcher lists again.
    let inits = |seen: &Seen| {
        seen.lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| k == "InitDone")
            .count()
    };
    assert_eq!(inits(&seen), 1);
    api.apply_yaml("apiVersion: v1\nkind: Service\nmetadata: {name: after, namespace: demo}\nspec: {ports: [{port: 2}]}\n").unwrap();
    wait_for(&seen, ("Apply", "after")).await;
    api.compact();
    api.expire_watches();
    let deadline = Instant::now() + TIMEOUT;
    while inits(&seen) < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(inits(&seen), 2, "{:?}", seen.lock().unwrap());

    // Stopped and restarted: it comes back.
    api.stop();
    tokio::time::sleep(Duration::from_millis(300)).await;
    api.restart().unwrap();
    api.apply_yaml("apiVersion: v1\nkind: Service\nmetadata: {name: back, namespace: demo}\nspec: {ports: [{port: 3}]}\n").unwrap();
    wait_for(&seen, ("Apply", "back")).await;
    task.abort();
    print_requests(&api);
    // No discovery, no /version: typed Apis need nothing else from the server.
    assert!(
        api.requests()
            .iter()
            .all(|r| r.path().starts_with("/api/v1/services")),
        "{:?}",
        api.requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_writes_status_and_leases() {
    let api = start();
    api.apply_yaml(SERVICES).unwrap();
    let client = kube_client(&api, "writer").await;
    let services: Api<Service> = Api::namespaced(client.clone(), "demo");
    let patch = json!({"status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.20"}]}}});
    let patched = services
        .patch_status("web", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    assert_eq!(
        patched
            .status
            .unwrap()
            .load_balancer
            .unwrap()
            .ingress
            .unwrap()[0]
            .ip
            .as_deref(),
        Some("192.0.2.20")
    );
    let applied = services
        .patch_status("db", &PatchParams::apply("lb-agent").force(), &Patch::Apply(&json!({"apiVersion": "v1", "kind": "Service", "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.21"}]}}})))
        .await
        .unwrap();
    assert!(applied.status.is_some());
    let err = services.get("nope").await.unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 404),
        "{err:?}"
    );

    let leases: Api<Lease> = Api::namespaced(client, "kube-system");
    assert!(leases.get_opt("lb-agent").await.unwrap().is_none());
    let mut lease: Lease = serde_json::from_value(json!({"metadata": {"name": "lb-agent"}, "spec": {"holderIdentity": "node-a", "leaseDurationSeconds": 15}})).unwrap();
    let created = leases.create(&PostParams::default(), &lease).await.unwrap();
    let err = leases
        .create(&PostParams::default(), &lease)
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 409 && s.reason == "AlreadyExists"),
        "{err:?}"
    );
    lease = created.clone();
    lease.spec.as_mut().unwrap().holder_identity = Some("node-b".into());
    let replaced = leases
        .replace("lb-agent", &PostParams::default(), &lease)
        .await
        .unwrap();
    assert_eq!(
        replaced.spec.unwrap().holder_identity.as_deref(),
        Some("node-b")
    );
    // The old resourceVersion again: someone else won.
    let err = leases
        .replace("lb-agent", &PostParams::default(), &lease)
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 409 && s.reason == "Conflict"),
        "{err:?}"
    );
    print_requests(&api);
    let writes: Vec<_> = api
        .requests()
        .into_iter()
        .filter(Request::is_write)
        .collect();
    // kube-rs sends no User-Agent; the kubeconfig user's token tells who wrote.
    assert!(
        writes.iter().all(|r| r.user.as_deref() == Some("writer")),
        "{writes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_reads_every_resource_and_records_events() {
    use k8s_openapi::api::{
        core::v1::{Event as CoreEvent, Node, ObjectReference},
        discovery::v1::EndpointSlice,
    };
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};

    let api = start();
    api.apply_yaml(SERVICES).unwrap();
    api.apply_yaml(
        r"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: demo
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
endpoints: [{addresses: [10.244.1.10], conditions: {ready: true}}]
ports: [{name: http, port: 8080, protocol: TCP}]
---
apiVersion: v1
kind: Node
metadata: {name: node-a}
status:
  addresses: [{type: InternalIP, address: 172.30.0.1}]
",
    )
    .unwrap();
    let client = kube_client(&api, "reader").await;
    let slices: Api<EndpointSlice> = Api::all(client.clone());
    let list = slices
        .list(&kube::api::ListParams::default().labels("kubernetes.io/service-name=web"))
        .await
        .unwrap();
    assert_eq!(list.items.len(), 1);
    assert_eq!(list.items[0].endpoints[0].addresses, ["10.244.1.10"]);
    let nodes: Api<Node> = Api::all(client.clone());
    let node = nodes.get("node-a").await.unwrap();
    assert_eq!(
        node.status.unwrap().addresses.unwrap()[0].address,
        "172.30.0.1"
    );

    // core/v1 Events, created directly.
    let events: Api<CoreEvent> = Api::namespaced(client.clone(), "demo");
    let event: CoreEvent = serde_json::from_value(json!({
        "metadata": {"generateName": "web."},
        "involvedObject": {"kind": "Service", "namespace": "demo", "name": "web"},
        "reason": "LoadBalancerAssigned",
        "message": "192.0.2.1",
        "type": "Normal",
    }))
    .unwrap();
    let created = events.create(&PostParams::default(), &event).await.unwrap();
    assert!(created.metadata.name.unwrap().starts_with("web."));
    // events.k8s.io/v1 Events through kube-runtime's recorder: a repeat becomes a PATCH.
    let recorder = Recorder::new(client, Reporter::from("lb-agent".to_owned()));
    let reference: ObjectReference = serde_json::from_value(
        json!({"apiVersion": "v1", "kind": "Service", "namespace": "demo", "name": "web"}),
    )
    .unwrap();
    let event = Event {
        type_: EventType::Normal,
        reason: "Synced".into(),
        note: Some("programmed".into()),
        action: "Sync".into(),
        secondary: None,
    };
    recorder.publish(&event, &reference).await.unwrap();
    recorder.publish(&event, &reference).await.unwrap();
    print_requests(&api);
    let stored = api.events();
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert_eq!(stored[0]["reason"], "LoadBalancerAssigned");
    assert_eq!(stored[1]["apiVersion"], "events.k8s.io/v1");
    assert_eq!(stored[1]["series"]["count"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_streaming_list_watcher() {
    let api = start();
    api.apply_yaml(SERVICES).unwrap();
    let client = kube_client(&api, "streamer").await;
    let services: Api<Service> = Api::namespaced(client, "demo");
    let config = watcher::Config::default()
        .streaming_lists()
        .labels("app=web");
    let mut stream = watcher(services, config).boxed();
    let mut seen = Vec::new();
    let deadline = Instant::now() + TIMEOUT;
    while Instant::now() < deadline {
        let event = tokio::time::timeout(TIMEOUT, stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        match event {
            watcher::Event::InitApply(s) => seen.push(s.metadata.name.unwrap()),
            watcher::Event::InitDone => {
                api.delete("services", "demo", "web");
            }
            watcher::Event::Delete(s) => {
                seen.push(format!("deleted {}", s.metadata.name.unwrap()));
                break;
            }
            _ => {}
        }
    }
    assert_eq!(seen, ["web", "deleted web"]);
    print_requests(&api);
    let watch = &api.requests()[0];
    assert!(watch.target.contains("sendInitialEvents=true"), "{watch:?}");
}
