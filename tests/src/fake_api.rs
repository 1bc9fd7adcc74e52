//! A fake Kubernetes API server for the integration tests.
//!
//! No real API server can run on the test machines, so the agent's Kubernetes mode is tested
//! against this one: a plain HTTP/1.1 server (no TLS, no authentication) that speaks the real
//! list and watch protocol for the few resources the agent uses, and serves the same objects
//! users `kubectl apply`. It is deliberately small; what it does and does not do:
//!
//! - Resources: core/v1 `services`, `nodes` and `events`, `discovery.k8s.io/v1`
//!   `endpointslices`, `coordination.k8s.io/v1` `leases` and `events.k8s.io/v1` `events`.
//!   Objects are stored as JSON, keyed by (resource, namespace, name); nothing validates them
//!   beyond what the routes need.
//! - One global resourceVersion counter, like etcd's revision: every write bumps it and is kept
//!   in a history, from which watches resume. [`FakeApi::compact`] moves the compaction point,
//!   so a watch starting from before it gets `410 Expired` the way real API servers answer.
//! - LIST ignores `limit`, `continue` and `resourceVersion` and always answers the whole current
//!   state in one page (clients must accept that: a server may ignore `limit`).
//! - WATCH streams one JSON event per line, chunked; initial `ADDED` events when started without
//!   a resourceVersion (or with "0", or with `sendInitialEvents=true`), bookmarks when asked,
//!   `ERROR` 410 when the resourceVersion is compacted, and a clean end after `timeoutSeconds`.
//! - Writes: POST, PUT (optimistic concurrency on `metadata.resourceVersion`), PATCH with merge
//!   patch (strategic merge patch and server-side apply are treated as merge patches: lists are
//!   replaced, never merged by key, and apply does not remove fields it no longer sets), DELETE.
//!   Services and Nodes have a `/status` subresource with the real split: writes to the object
//!   keep its status, writes to `/status` change only the status. A write that changes nothing
//!   does not bump the resourceVersion, like the real server. JSON patch and `dryRun` are not
//!   supported.
//! - Services get the defaults the API server gives them (see `default_service`).
//! - Every request is recorded with its `User-Agent` and remote address, so tests can tell
//!   which agent wrote what.
//!
//! Threads and blocking sockets only: one thread accepts, one thread serves each connection,
//! and watches wait on a condition variable with bounded timeouts.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs::File,
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    path::Path,
    sync::{
        Arc, Condvar, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, anyhow};
use serde::Deserialize as _;
use serde_json::{Map, Value, json};

/// How often watches that asked for bookmarks get one, unless a test sets another interval.
const DEFAULT_BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);
/// How long a watch without `timeoutSeconds` lasts; real servers pick 30 to 60 minutes, tests
/// want a bound.
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_mins(5);
/// Longest `timeoutSeconds` honoured (a day): no test watches longer.
const MAX_WATCH_TIMEOUT_SECS: u64 = 86_400;
/// Longest a waiting watch sleeps before it looks at its connection and the clock again.
const WAIT_SLICE: Duration = Duration::from_millis(200);
/// A client that stops reading must not hold a serving thread for ever.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_LINE: u64 = 64 * 1024;
const MAX_HEADERS: usize = 200;
const MAX_BODY: usize = 16 * 1024 * 1024;
/// How long dropping the handle waits for the serving threads.
const JOIN_TIMEOUT: Duration = Duration::from_secs(3);
/// The characters of `generateName` suffixes (real servers avoid vowels and look-alikes).
const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// One resource the fake serves.
#[derive(Debug, PartialEq, Eq)]
struct ResourceInfo {
    /// The name tests use for it in the control API, and its key in the store.
    key: &'static str,
    plural: &'static str,
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    namespaced: bool,
    /// Whether `.status` is a subresource: then writes to the object keep the stored status and
    /// writes to `/status` change only the status.
    status_subresource: bool,
}

const RESOURCES: &[ResourceInfo] = &[
    ResourceInfo {
        key: "services",
        plural: "services",
        group: "",
        version: "v1",
        kind: "Service",
        namespaced: true,
        status_subresource: true,
    },
    ResourceInfo {
        key: "endpointslices",
        plural: "endpointslices",
        group: "discovery.k8s.io",
        version: "v1",
        kind: "EndpointSlice",
        namespaced: true,
        status_subresource: false,
    },
    ResourceInfo {
        key: "nodes",
        plural: "nodes",
        group: "",
        version: "v1",
        kind: "Node",
        namespaced: false,
        status_subresource: true,
    },
    ResourceInfo {
        key: "leases",
        plural: "leases",
        group: "coordination.k8s.io",
        version: "v1",
        kind: "Lease",
        namespaced: true,
        status_subresource: false,
    },
    ResourceInfo {
        key: "events",
        plural: "events",
        group: "",
        version: "v1",
        kind: "Event",
        namespaced: true,
        status_subresource: false,
    },
    // The same Events through the newer group (kube-runtime's recorder uses it). A real server
    // stores both views in one place; here they are separate, which no test needs to see.
    ResourceInfo {
        key: "events.events.k8s.io",
        plural: "events",
        group: "events.k8s.io",
        version: "v1",
        kind: "Event",
        namespaced: true,
        status_subresource: false,
    },
];

impl ResourceInfo {
    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The name real servers use in messages: `services`, `leases.coordination.k8s.io`.
    fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_owned()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// The store's namespace for an object: none for cluster-scoped resources.
    fn store_namespace(&self, namespace: &str) -> String {
        if self.namespaced {
            if namespace.is_empty() {
                "default".to_owned()
            } else {
                namespace.to_owned()
            }
        } else {
            String::new()
        }
    }
}

/// Looks a resource up by its control-API name (`services`) or qualified name
/// (`leases.coordination.k8s.io`).
fn resource_by_name(name: &str) -> Option<&'static ResourceInfo> {
    RESOURCES
        .iter()
        .find(|r| r.key == name || r.qualified() == name)
}

fn resource_by_path(group: &str, version: &str, plural: &str) -> Option<&'static ResourceInfo> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

fn resource_by_kind(api_version: &str, kind: &str) -> Option<&'static ResourceInfo> {
    RESOURCES
        .iter()
        .find(|r| r.api_version() == api_version && r.kind == kind)
}

/// A request as the fake received it.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    /// Path and query, as sent (not decoded).
    pub target: String,
    pub body: String,
    pub user_agent: Option<String>,
    /// The kubeconfig user the client came as: the bearer token that
    /// [`FakeApi::write_kubeconfig`] gives each user is its name. kube-rs sends no
    /// `User-Agent`, so this is how tests tell two agents apart.
    pub user: Option<String>,
    pub content_type: Option<String>,
    pub remote: SocketAddr,
    /// The network namespace of the listener it came through (`None`: the tests' own), which
    /// tells agents in different namespaces apart (see [`FakeApi::listen_also_in_netns`]).
    pub netns: Option<String>,
    /// The status code answered (200 for a watch that started streaming); 0 while the request
    /// is being served (it is recorded when it arrives, so a test that sees its effect also
    /// finds it here).
    pub code: u16,
    /// Counts requests from 0 in the order they arrived.
    pub seq: u64,
}

impl Request {
    /// The path without the query.
    #[must_use]
    pub fn path(&self) -> &str {
        self.target.split_once('?').map_or(&self.target, |(p, _)| p)
    }

    /// Whether it asked to change something.
    #[must_use]
    pub fn is_write(&self) -> bool {
        matches!(self.method.as_str(), "POST" | "PUT" | "PATCH" | "DELETE")
    }

    /// Whether it was a watch.
    #[must_use]
    pub fn is_watch(&self) -> bool {
        self.method == "GET"
            && (self.target.contains("watch=true")
                || self.target.contains("watch=1")
                || self.target.contains("/watch/"))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

/// One write, kept so that watches can resume from any resourceVersion after the compaction
/// point.
struct Change {
    rv: u64,
    kind: ChangeKind,
    resource: &'static ResourceInfo,
    namespace: String,
    object: Value,
    /// The object before the write: a watch with a selector needs it to tell an object that
    /// stopped matching (sent as `DELETED`) from one that never matched.
    previous: Option<Value>,
}

type Key = (&'static str, String, String);

/// How a write treats `.status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    /// A write to the object: for resources with a status subresource the stored status stays.
    Object,
    /// A write to `/status`: only the status changes.
    Status,
    /// The control API (`apply`): everything changes; an object without status keeps its status.
    Everything,
}

struct State {
    rv: u64,
    /// Watches resuming from a resourceVersion below this get 410.
    compacted: u64,
    objects: BTreeMap<Key, Value>,
    history: Vec<Change>,
    requests: Vec<Request>,
    uid_counter: u64,
    /// Bumped by [`FakeApi::expire_watches`]; each watch ends with 410 when it changes.
    expire_epoch: u64,
    /// While set, requests wait before they are answered (see [`FakeApi::hold`]).
    held: bool,
    bookmark_interval: Duration,
    default_watch_timeout: Duration,
}

/// An error answered as a Kubernetes `Status`.
#[derive(Debug)]
struct ApiError {
    code: u16,
    reason: &'static str,
    message: String,
    details: Option<Value>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(400, "BadRequest", message)
    }

    fn invalid(message: impl Into<String>) -> Self {
        ApiError::new(422, "Invalid", message)
    }

    fn not_found(res: &ResourceInfo, name: &str) -> Self {
        ApiError {
            details: Some(json!({"name": name, "group": res.group, "kind": res.plural})),
            ..ApiError::new(
                404,
                "NotFound",
                format!("{} \"{name}\" not found", res.qualified()),
            )
        }
    }

    fn already_exists(res: &ResourceInfo, name: &str) -> Self {
        ApiError {
            details: Some(json!({"name": name, "group": res.group, "kind": res.plural})),
            ..ApiError::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", res.qualified()),
            )
        }
    }

    fn conflict(res: &ResourceInfo, name: &str) -> Self {
        ApiError {
            details: Some(json!({"name": name, "group": res.group, "kind": res.plural})),
            ..ApiError::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{name}\": the object has been \
                     modified; please apply your changes to the latest version and try again",
                    res.qualified()
                ),
            )
        }
    }

    fn expired(requested: u64, oldest: u64) -> Self {
        ApiError::new(
            410,
            "Expired",
            format!("too old resource version: {requested} ({oldest})"),
        )
    }

    fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.code, self.reason, self.message)
    }
}

impl std::error::Error for ApiError {}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A test that panicked while holding the lock must not take every later request down.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The object's `metadata` (created if missing).
fn metadata_mut(object: &mut Value) -> &mut Map<String, Value> {
    if !object.is_object() {
        *object = Value::Object(Map::new());
    }
    let Value::Object(fields) = object else {
        unreachable!("made an object above")
    };
    let meta = fields
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if !meta.is_object() {
        *meta = Value::Object(Map::new());
    }
    match meta {
        Value::Object(m) => m,
        _ => unreachable!("made an object above"),
    }
}

fn meta_str<'a>(object: &'a Value, field: &str) -> Option<&'a str> {
    object
        .get("metadata")
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(target) = target {
        for (key, value) in patch {
            if value.is_null() {
                target.remove(key);
            } else {
                merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

/// RFC 3339 in UTC, seconds precision, as `creationTimestamp` has it.
fn timestamp(time: SystemTime) -> String {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        .cast_signed();
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's days-to-civil: no date crate needed for one format.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

// ---------------------------------------------------------------------------------------------
// Selectors

#[derive(Debug)]
enum LabelRequirement {
    Exists(String),
    NotExists(String),
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

/// Splits at commas outside parentheses (`a in (x,y),b`).
fn split_terms(selector: &str) -> Vec<&str> {
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0_i32, 0);
    for (i, c) in selector.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&selector[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&selector[start..]);
    terms
        .into_iter()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect()
}

fn valid_key(key: &str) -> bool {
    !key.is_empty() && !key.contains(|c: char| c.is_whitespace() || "=!(),".contains(c))
}

fn parse_label_selector(selector: &str) -> Result<Vec<LabelRequirement>, ApiError> {
    let invalid = || ApiError::bad_request(format!("unable to parse requirement: {selector:?}"));
    let mut requirements = Vec::new();
    for term in split_terms(selector) {
        let requirement = if let Some(key) = term.strip_prefix('!') {
            LabelRequirement::NotExists(key.trim().to_owned())
        } else if let Some((head, list)) = term.split_once('(') {
            let list = list.strip_suffix(')').ok_or_else(invalid)?;
            let values = list.split(',').map(|v| v.trim().to_owned()).collect();
            match head.split_whitespace().collect::<Vec<_>>()[..] {
                [key, "in"] => LabelRequirement::In(key.to_owned(), values),
                [key, "notin"] => LabelRequirement::NotIn(key.to_owned(), values),
                _ => return Err(invalid()),
            }
        } else if let Some((key, value)) = term.split_once("!=") {
            LabelRequirement::NotEquals(key.trim().to_owned(), value.trim().to_owned())
        } else if let Some((key, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
            LabelRequirement::Equals(key.trim().to_owned(), value.trim().to_owned())
        } else {
            LabelRequirement::Exists(term.to_owned())
        };
        let (LabelRequirement::Exists(key)
        | LabelRequirement::NotExists(key)
        | LabelRequirement::Equals(key, _)
        | LabelRequirement::NotEquals(key, _)
        | LabelRequirement::In(key, _)
        | LabelRequirement::NotIn(key, _)) = &requirement;
        if !valid_key(key) {
            return Err(invalid());
        }
        requirements.push(requirement);
    }
    Ok(requirements)
}

#[derive(Debug)]
struct FieldRequirement {
    path: String,
    value: String,
    equal: bool,
}

fn parse_field_selector(selector: &str) -> Result<Vec<FieldRequirement>, ApiError> {
    split_terms(selector)
        .into_iter()
        .map(|term| {
            let (path, value, equal) = if let Some((p, v)) = term.split_once("!=") {
                (p, v, false)
            } else if let Some((p, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (p, v, true)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid selector: '{selector}'; can't understand '{term}'"
                )));
            };
            Ok(FieldRequirement {
                path: path.trim().to_owned(),
                value: value.trim().to_owned(),
                equal,
            })
        })
        .collect()
}

/// The selectors of a list or watch. Any field path works (real servers allow only a few per
/// resource); a missing field reads as "".
#[derive(Debug, Default)]
struct Selector {
    labels: Vec<LabelRequirement>,
    fields: Vec<FieldRequirement>,
}

impl Selector {
    fn from_query(query: &Query) -> Result<Self, ApiError> {
        Ok(Selector {
            labels: query
                .get("labelSelector")
                .map(parse_label_selector)
                .transpose()?
                .unwrap_or_default(),
            fields: query
                .get("fieldSelector")
                .map(parse_field_selector)
                .transpose()?
                .unwrap_or_default(),
        })
    }

    fn matches(&self, object: &Value) -> bool {
        let labels = object.get("metadata").and_then(|m| m.get("labels"));
        let label = |key: &str| labels.and_then(|l| l.get(key)).and_then(Value::as_str);
        let labels_match = self.labels.iter().all(|r| match r {
            LabelRequirement::Exists(k) => label(k).is_some(),
            LabelRequirement::NotExists(k) => label(k).is_none(),
            LabelRequirement::Equals(k, v) => label(k) == Some(v.as_str()),
            LabelRequirement::NotEquals(k, v) => label(k) != Some(v.as_str()),
            LabelRequirement::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelRequirement::NotIn(k, vs) => label(k).is_none_or(|l| vs.iter().all(|v| v != l)),
        });
        labels_match
            && self.fields.iter().all(|r| {
                let found = r
                    .path
                    .split('.')
                    .try_fold(object, |v, part| v.get(part))
                    .map_or_else(String::new, |v| match v {
                        Value::String(s) => s.clone(),
                        Value::Null => String::new(),
                        other => other.to_string(),
                    });
                (found == r.value) == r.equal
            })
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP

/// Decoded query parameters; the first occurrence of a name wins.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(query: &str) -> Self {
        Query(
            query
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|pair| {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    (percent_decode(k, true), percent_decode(v, true))
                })
                .collect(),
        )
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, name: &str) -> bool {
        matches!(self.get(name), Some("true" | "1"))
    }
}

fn percent_decode(text: &str, plus_is_space: bool) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                if let Ok(b) = u8::from_str_radix(hex, 16) {
                    out.push(b);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            b'+' if plus_is_space => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

struct HttpRequest {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    keep_alive: bool,
}

impl HttpRequest {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

enum ReadOutcome {
    Request(HttpRequest),
    Closed,
    Bad(ApiError),
}

/// One line without its CRLF; `None` at end of stream.
fn read_line(reader: &mut BufReader<TcpStream>) -> io::Result<Option<Result<String, ApiError>>> {
    let mut line = Vec::new();
    let n = reader
        .by_ref()
        .take(MAX_LINE)
        .read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        if u64::try_from(n).unwrap_or(u64::MAX) >= MAX_LINE {
            return Ok(Some(Err(ApiError::bad_request("line too long"))));
        }
        return Ok(None);
    }
    while matches!(line.last(), Some(b'\n' | b'\r')) {
        line.pop();
    }
    Ok(Some(Ok(String::from_utf8_lossy(&line).into_owned())))
}

fn read_chunked(reader: &mut BufReader<TcpStream>) -> io::Result<Result<Vec<u8>, ApiError>> {
    let mut body = Vec::new();
    loop {
        let Some(line) = read_line(reader)? else {
            return Err(io::ErrorKind::UnexpectedEof.into());
        };
        let line = match line {
            Ok(l) => l,
            Err(e) => return Ok(Err(e)),
        };
        let size = line.split(';').next().unwrap_or("").trim();
        let Ok(size) = usize::from_str_radix(size, 16) else {
            return Ok(Err(ApiError::bad_request("bad chunk size")));
        };
        if size > MAX_BODY - body.len() {
            return Ok(Err(ApiError::new(
                413,
                "RequestEntityTooLarge",
                "request body too large",
            )));
        }
        if size == 0 {
            // Trailers, up to the empty line.
            while let Some(Ok(l)) = read_line(reader)? {
                if l.is_empty() {
                    break;
                }
            }
            return Ok(Ok(body));
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..])?;
        read_line(reader)?;
    }
}

fn read_request(
    reader: &mut BufReader<TcpStream>,
    stream: &mut TcpStream,
) -> io::Result<ReadOutcome> {
    // Tolerate empty lines between requests (RFC 9112 section 2.2).
    let request_line = loop {
        match read_line(reader)? {
            None => return Ok(ReadOutcome::Closed),
            Some(Err(e)) => return Ok(ReadOutcome::Bad(e)),
            Some(Ok(l)) if l.is_empty() => {}
            Some(Ok(l)) => break l,
        }
    };
    let parts: Vec<&str> = request_line.split_whitespace().collect();
    let [method, target, version] = parts[..] else {
        return Ok(ReadOutcome::Bad(ApiError::bad_request("bad request line")));
    };
    if !version.starts_with("HTTP/1.") {
        return Ok(ReadOutcome::Bad(ApiError::bad_request("only HTTP/1.x")));
    }
    let mut headers = Vec::new();
    loop {
        let line = match read_line(reader)? {
            None => return Ok(ReadOutcome::Closed),
            Some(Err(e)) => return Ok(ReadOutcome::Bad(e)),
            Some(Ok(l)) => l,
        };
        if line.is_empty() {
            break;
        }
        if headers.len() >= MAX_HEADERS {
            return Ok(ReadOutcome::Bad(ApiError::bad_request("too many headers")));
        }
        let Some((name, value)) = line.split_once(':') else {
            return Ok(ReadOutcome::Bad(ApiError::bad_request("bad header line")));
        };
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
    let mut request = HttpRequest {
        method: method.to_owned(),
        target: target.to_owned(),
        headers,
        body: Vec::new(),
        keep_alive: version == "HTTP/1.1",
    };
    match request.header("connection").map(str::to_ascii_lowercase) {
        Some(c) if c.contains("close") => request.keep_alive = false,
        Some(c) if c.contains("keep-alive") => request.keep_alive = true,
        _ => {}
    }
    if request
        .header("expect")
        .is_some_and(|e| e.eq_ignore_ascii_case("100-continue"))
    {
        stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    }
    let chunked = request
        .header("transfer-encoding")
        .is_some_and(|t| t.to_ascii_lowercase().contains("chunked"));
    if chunked {
        match read_chunked(reader)? {
            Ok(body) => request.body = body,
            Err(e) => return Ok(ReadOutcome::Bad(e)),
        }
    } else if let Some(length) = request.header("content-length") {
        let Ok(length) = length.parse::<usize>() else {
            return Ok(ReadOutcome::Bad(ApiError::bad_request(
                "bad Content-Length",
            )));
        };
        if length > MAX_BODY {
            return Ok(ReadOutcome::Bad(ApiError::new(
                413,
                "RequestEntityTooLarge",
                "request body too large",
            )));
        }
        request.body.resize(length, 0);
        reader.read_exact(&mut request.body)?;
    }
    Ok(ReadOutcome::Request(request))
}

fn reason_phrase(code: u16) -> &'static str {
    match code {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        410 => "Gone",
        413 => "Payload Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Entity",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    }
}

fn write_response(
    stream: &mut TcpStream,
    code: u16,
    body: &Value,
    keep_alive: bool,
) -> io::Result<()> {
    let body = body.to_string();
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let head = format!(
        "HTTP/1.1 {code} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Cache-Control: no-cache, private\r\nConnection: {connection}\r\n\r\n",
        reason_phrase(code),
        body.len()
    );
    let mut out = head.into_bytes();
    out.extend_from_slice(body.as_bytes());
    stream.write_all(&out)?;
    stream.flush()
}

/// Writes one chunk of a chunked body.
fn write_chunk(stream: &mut TcpStream, data: &[u8]) -> io::Result<()> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    stream.write_all(&out)?;
    stream.flush()
}

// ---------------------------------------------------------------------------------------------
// Routes

/// What a request path names.
struct Route {
    resource: &'static ResourceInfo,
    /// The namespace in the path (`None` for cluster-wide collections and cluster-scoped
    /// resources).
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
    /// The old `/api/v1/watch/...` form.
    watch_prefix: bool,
}

fn parse_route(path: &str) -> Result<Route, ApiError> {
    let not_found = || {
        ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    };
    let segments: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| percent_decode(s, false))
        .collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let (group, version, mut rest) = match segments[..] {
        ["api", version, ref rest @ ..] => ("", version, rest),
        ["apis", group, version, ref rest @ ..] => (group, version, rest),
        _ => return Err(not_found()),
    };
    let watch_prefix = rest.first() == Some(&"watch");
    if watch_prefix {
        rest = &rest[1..];
    }
    let (namespace, plural, name, sub) = match rest {
        ["namespaces", ns, plural, rest @ ..] => (Some(*ns), *plural, rest.first(), rest.get(1)),
        [plural, rest @ ..] => (None, *plural, rest.first(), rest.get(1)),
        [] => return Err(not_found()),
    };
    let too_long = rest.len() > if namespace.is_some() { 5 } else { 3 };
    let resource = resource_by_path(group, version, plural).ok_or_else(not_found)?;
    let status = match sub {
        None => false,
        Some(&"status") if resource.status_subresource => true,
        Some(_) => return Err(not_found()),
    };
    // A namespaced object needs its namespace, a cluster-scoped one must not have one.
    if too_long
        || (namespace.is_some() && !resource.namespaced)
        || (namespace.is_none() && resource.namespaced && name.is_some())
    {
        return Err(not_found());
    }
    Ok(Route {
        resource,
        namespace: namespace.map(str::to_owned),
        name: name.map(|n| (*n).to_owned()),
        status,
        watch_prefix,
    })
}

// ---------------------------------------------------------------------------------------------
// The store

impl State {
    fn new() -> Self {
        State {
            rv: 1,
            compacted: 0,
            objects: BTreeMap::new(),
            history: Vec::new(),
            requests: Vec::new(),
            uid_counter: 0,
            expire_epoch: 0,
            held: false,
            bookmark_interval: DEFAULT_BOOKMARK_INTERVAL,
            default_watch_timeout: DEFAULT_WATCH_TIMEOUT,
        }
    }

    fn next_uid(&mut self) -> String {
        self.uid_counter += 1;
        format!("fa4e0000-0000-4000-8000-{:012x}", self.uid_counter)
    }

    /// Records a write: bumps the resourceVersion, stores or removes the object, keeps the
    /// change for watches, and returns the object as stored.
    fn commit(
        &mut self,
        resource: &'static ResourceInfo,
        namespace: &str,
        name: &str,
        kind: ChangeKind,
        mut object: Value,
    ) -> Value {
        self.rv += 1;
        metadata_mut(&mut object).insert("resourceVersion".into(), self.rv.to_string().into());
        let key = (resource.key, namespace.to_owned(), name.to_owned());
        let previous = if kind == ChangeKind::Deleted {
            self.objects.remove(&key)
        } else {
            self.objects.insert(key, object.clone())
        };
        self.history.push(Change {
            rv: self.rv,
            kind,
            resource,
            namespace: namespace.to_owned(),
            object: object.clone(),
            previous,
        });
        object
    }

    fn get(&self, resource: &ResourceInfo, namespace: &str, name: &str) -> Option<&Value> {
        self.objects
            .get(&(resource.key, namespace.to_owned(), name.to_owned()))
    }

    /// Sets what the server owns on an object about to be written: kind, apiVersion, name,
    /// namespace, and for a new object uid and creationTimestamp (an update keeps the stored
    /// ones).
    fn prepare(
        &mut self,
        resource: &'static ResourceInfo,
        namespace: &str,
        name: &str,
        object: &mut Value,
        old: Option<&Value>,
    ) {
        let uid = old
            .and_then(|o| meta_str(o, "uid"))
            .map_or_else(|| self.next_uid(), str::to_owned);
        let created = old
            .and_then(|o| meta_str(o, "creationTimestamp"))
            .map_or_else(|| timestamp(SystemTime::now()), str::to_owned);
        let meta = metadata_mut(object);
        meta.insert("name".into(), name.into());
        if resource.namespaced {
            meta.insert("namespace".into(), namespace.into());
        } else {
            meta.remove("namespace");
        }
        meta.insert("uid".into(), uid.into());
        meta.insert("creationTimestamp".into(), created.into());
        if let Value::Object(fields) = object {
            fields.insert("kind".into(), resource.kind.into());
            fields.insert("apiVersion".into(), resource.api_version().into());
        }
    }

    /// The namespace and name a new object gets: from the body, checked against the path.
    fn identity(
        &self,
        resource: &ResourceInfo,
        path_namespace: Option<&str>,
        object: &Value,
    ) -> Result<(String, String), ApiError> {
        if !object.is_object() {
            return Err(ApiError::bad_request("the body must be a JSON object"));
        }
        let body_namespace = meta_str(object, "namespace").filter(|n| !n.is_empty());
        if let (Some(path), Some(body)) = (path_namespace, body_namespace)
            && resource.namespaced
            && path != body
        {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the \
                 request",
            ));
        }
        let namespace =
            resource.store_namespace(path_namespace.or(body_namespace).unwrap_or_default());
        let name = match (meta_str(object, "name"), meta_str(object, "generateName")) {
            (Some(name), _) if !name.is_empty() => name.to_owned(),
            (_, Some(prefix)) if !prefix.is_empty() => {
                // Five characters from the counter, in the alphabet real servers use.
                let mut n = self.uid_counter * 7919 + 12_345;
                let suffix: String = (0..5)
                    .map(|_| {
                        let c = ALPHABET[usize::try_from(n % 27).unwrap_or(0)];
                        n /= 27;
                        char::from(c)
                    })
                    .collect();
                format!("{prefix}{suffix}")
            }
            _ => {
                return Err(ApiError::invalid(format!(
                    "{} is invalid: metadata.name: Required value: name or generateName is \
                     required",
                    resource.kind
                )));
            }
        };
        Ok((namespace, name))
    }

    fn check_kind(resource: &ResourceInfo, object: &Value) -> Result<(), ApiError> {
        let kind = object.get("kind").and_then(Value::as_str);
        let api_version = object.get("apiVersion").and_then(Value::as_str);
        if kind.is_some_and(|k| k != resource.kind)
            || api_version.is_some_and(|v| v != resource.api_version())
        {
            return Err(ApiError::bad_request(format!(
                "the body is a {}/{}, not a {}/{}",
                api_version.unwrap_or_default(),
                kind.unwrap_or_default(),
                resource.api_version(),
                resource.kind
            )));
        }
        Ok(())
    }

    fn create(
        &mut self,
        resource: &'static ResourceInfo,
        path_namespace: Option<&str>,
        mut object: Value,
        part: Part,
    ) -> Result<Value, ApiError> {
        Self::check_kind(resource, &object)?;
        let (namespace, name) = self.identity(resource, path_namespace, &object)?;
        if self.get(resource, &namespace, &name).is_some() {
            return Err(ApiError::already_exists(resource, &name));
        }
        if part != Part::Everything && resource.key == "services" {
            // Like the real server: a client creates a Service, its status is written later
            // (Nodes keep theirs: kubelets register with one).
            if let Value::Object(fields) = &mut object {
                fields.remove("status");
            }
        }
        metadata_mut(&mut object).remove("resourceVersion");
        self.prepare(resource, &namespace, &name, &mut object, None);
        if resource.key == "services" {
            self.default_service(&namespace, &name, &mut object, None)?;
        }
        Ok(self.commit(resource, &namespace, &name, ChangeKind::Added, object))
    }

    /// Writes `new` over the stored object (which must exist), keeping what `part` says to keep.
    /// A write that changes nothing is not a change.
    fn update(
        &mut self,
        resource: &'static ResourceInfo,
        namespace: &str,
        name: &str,
        mut new: Value,
        part: Part,
    ) -> Result<Value, ApiError> {
        let old = self
            .get(resource, namespace, name)
            .cloned()
            .ok_or_else(|| ApiError::not_found(resource, name))?;
        if let Some(rv) = meta_str(&new, "resourceVersion").filter(|rv| !rv.is_empty())
            && Some(rv) != meta_str(&old, "resourceVersion")
        {
            return Err(ApiError::conflict(resource, name));
        }
        if !new.is_object() {
            return Err(ApiError::bad_request("the body must be a JSON object"));
        }
        let keep_status = match part {
            Part::Object => resource.status_subresource,
            Part::Status => false,
            Part::Everything => new.get("status").is_none(),
        };
        if part == Part::Status {
            // Only the status comes from the request.
            let status = new.get("status").cloned();
            new = old.clone();
            if let Value::Object(fields) = &mut new {
                match status {
                    Some(status) => fields.insert("status".into(), status),
                    None => fields.remove("status"),
                };
            }
        } else if keep_status && let Value::Object(fields) = &mut new {
            match old.get("status") {
                Some(status) => fields.insert("status".into(), status.clone()),
                None => fields.remove("status"),
            };
        }
        self.prepare(resource, namespace, name, &mut new, Some(&old));
        metadata_mut(&mut new).insert(
            "resourceVersion".into(),
            meta_str(&old, "resourceVersion").unwrap_or_default().into(),
        );
        if resource.key == "services" {
            self.default_service(namespace, name, &mut new, Some(&old))?;
        }
        if new == old {
            return Ok(old);
        }
        Ok(self.commit(resource, namespace, name, ChangeKind::Modified, new))
    }

    fn patch(
        &mut self,
        resource: &'static ResourceInfo,
        namespace: &str,
        name: &str,
        patch: &Value,
        part: Part,
    ) -> Result<Value, ApiError> {
        if !patch.is_object() {
            return Err(ApiError::bad_request("the patch must be a JSON object"));
        }
        let old = self
            .get(resource, namespace, name)
            .ok_or_else(|| ApiError::not_found(resource, name))?;
        // A patch that names a resourceVersion is checked against it, like the real server.
        if let Some(rv) = meta_str(patch, "resourceVersion")
            && Some(rv) != meta_str(old, "resourceVersion")
        {
            return Err(ApiError::conflict(resource, name));
        }
        let mut new = old.clone();
        merge_patch(&mut new, patch);
        // The patch cannot rename or move the object, nor change what the server owns.
        metadata_mut(&mut new).remove("resourceVersion");
        metadata_mut(&mut new).insert("name".into(), name.into());
        self.update(resource, namespace, name, new, part)
    }

    fn delete(
        &mut self,
        resource: &'static ResourceInfo,
        namespace: &str,
        name: &str,
    ) -> Result<Value, ApiError> {
        let object = self
            .get(resource, namespace, name)
            .cloned()
            .ok_or_else(|| ApiError::not_found(resource, name))?;
        Ok(self.commit(resource, namespace, name, ChangeKind::Deleted, object))
    }

    fn list(&self, resource: &ResourceInfo, namespace: Option<&str>) -> Vec<&Value> {
        self.objects
            .iter()
            .filter(|((key, ns, _), _)| {
                *key == resource.key && namespace.is_none_or(|n| n == ns.as_str())
            })
            .map(|(_, v)| v)
            .collect()
    }

    /// The defaults the API server gives a Service, kept to what the agent reads:
    ///
    /// - `spec.type` `ClusterIP`, `sessionAffinity` `None`, `internalTrafficPolicy` `Cluster`;
    /// - `clusterIP`/`clusterIPs` allocated from 10.96.0.0/16 (first free address from
    ///   10.96.0.10; 10.96.0.1 is the `kubernetes` Service's on real clusters), kept across
    ///   updates that omit them, none for `ExternalName` or `clusterIP: None`;
    ///   `ipFamilies` `[IPv4]` and `ipFamilyPolicy` `SingleStack` with an allocated address;
    /// - each port: `protocol` `TCP`, `targetPort` = `port`, and for `NodePort` and
    ///   `LoadBalancer` a `nodePort` (first free from 30000; kept across updates by port and
    ///   protocol), except for a `LoadBalancer` with `allocateLoadBalancerNodePorts: false`;
    /// - `NodePort`/`LoadBalancer`: `externalTrafficPolicy` `Cluster`; `LoadBalancer`:
    ///   `allocateLoadBalancerNodePorts` `true`, and with `externalTrafficPolicy: Local` a
    ///   `healthCheckNodePort`;
    /// - `status` `{"loadBalancer": {}}` when it has none.
    ///
    /// Conflicting explicit addresses or ports are not rejected.
    fn default_service(
        &self,
        namespace: &str,
        name: &str,
        object: &mut Value,
        old: Option<&Value>,
    ) -> Result<(), ApiError> {
        let (used_ips, used_ports) = self.service_allocations(namespace, name);
        let old_spec = old.and_then(|o| o.get("spec"));
        let Value::Object(fields) = object else {
            return Ok(());
        };
        fields
            .entry("status")
            .or_insert_with(|| json!({"loadBalancer": {}}));
        let spec = fields
            .entry("spec")
            .or_insert_with(|| Value::Object(Map::new()));
        let Value::Object(spec) = spec else {
            return Err(ApiError::invalid(
                "Service is invalid: spec: must be an object",
            ));
        };
        let kind = spec
            .entry("type")
            .or_insert_with(|| "ClusterIP".into())
            .as_str()
            .unwrap_or("ClusterIP")
            .to_owned();
        spec.entry("sessionAffinity").or_insert("None".into());
        if kind != "ExternalName" {
            spec.entry("internalTrafficPolicy")
                .or_insert("Cluster".into());
            let cluster_ip = match spec.get("clusterIP").and_then(Value::as_str) {
                Some(ip) if !ip.is_empty() => ip.to_owned(),
                _ => match old_spec
                    .and_then(|s| s.get("clusterIP"))
                    .and_then(Value::as_str)
                {
                    Some(ip) if !ip.is_empty() => ip.to_owned(),
                    _ => (10_u32..0xffff)
                        .map(|i| Ipv4Addr::from(0x0a60_0000 | i))
                        .find(|ip| !used_ips.contains(ip))
                        .ok_or_else(|| ApiError::new(500, "InternalError", "no free cluster IP"))?
                        .to_string(),
                },
            };
            spec.insert("clusterIP".into(), cluster_ip.clone().into());
            spec.entry("clusterIPs")
                .or_insert_with(|| json!([cluster_ip]));
            if cluster_ip != "None" {
                spec.entry("ipFamilies").or_insert_with(|| json!(["IPv4"]));
                spec.entry("ipFamilyPolicy").or_insert("SingleStack".into());
            }
        }
        default_service_ports(spec, old_spec, &kind, used_ports)
    }

    /// The cluster IPs and node ports the other Services hold.
    fn service_allocations(
        &self,
        namespace: &str,
        name: &str,
    ) -> (BTreeSet<Ipv4Addr>, BTreeSet<u16>) {
        let mut ips = BTreeSet::new();
        let mut ports = BTreeSet::new();
        for ((key, ns, n), service) in &self.objects {
            if *key != "services" || (ns == namespace && n == name) {
                continue;
            }
            let Some(spec) = service.get("spec") else {
                continue;
            };
            if let Some(ip) = spec
                .get("clusterIP")
                .and_then(Value::as_str)
                .and_then(|ip| ip.parse().ok())
            {
                ips.insert(ip);
            }
            let node_ports = spec
                .get("ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|p| p.get("nodePort"));
            for port in node_ports.chain(spec.get("healthCheckNodePort")) {
                if let Some(p) = port.as_u64().and_then(|p| u16::try_from(p).ok()) {
                    ports.insert(p);
                }
            }
        }
        (ips, ports)
    }
}

/// The port half of `State::default_service`: protocols, target ports, node ports and the
/// health check node port, each kept from `old_spec` when it had one.
fn default_service_ports(
    spec: &mut Map<String, Value>,
    old_spec: Option<&Value>,
    kind: &str,
    mut used_ports: BTreeSet<u16>,
) -> Result<(), ApiError> {
    let external = kind == "NodePort" || kind == "LoadBalancer";
    if kind == "LoadBalancer" {
        spec.entry("allocateLoadBalancerNodePorts")
            .or_insert(true.into());
    }
    let node_ports = external
        && spec
            .get("allocateLoadBalancerNodePorts")
            .and_then(Value::as_bool)
            != Some(false);
    let mut allocate = || {
        let port = (30000_u16..=32767).find(|p| !used_ports.contains(p));
        if let Some(p) = port {
            used_ports.insert(p);
        }
        port.ok_or_else(|| ApiError::new(500, "InternalError", "no free node port"))
    };
    let old_ports = old_spec
        .and_then(|s| s.get("ports"))
        .and_then(Value::as_array);
    if let Some(Value::Array(ports)) = spec.get_mut("ports") {
        for port in ports {
            let Value::Object(port) = port else {
                return Err(ApiError::invalid("Service is invalid: spec.ports: objects"));
            };
            let Some(number) = port.get("port").and_then(Value::as_u64) else {
                return Err(ApiError::invalid(
                    "Service is invalid: spec.ports.port: Required value",
                ));
            };
            port.entry("protocol").or_insert("TCP".into());
            port.entry("targetPort").or_insert(number.into());
            if node_ports && port.get("nodePort").is_none() {
                let same = |o: &&Value| {
                    o.get("port") == port.get("port") && o.get("protocol") == port.get("protocol")
                };
                let kept = old_ports
                    .and_then(|o| o.iter().find(same))
                    .and_then(|o| o.get("nodePort"))
                    .cloned();
                let node_port = match kept {
                    Some(p) => p,
                    None => allocate()?.into(),
                };
                port.insert("nodePort".into(), node_port);
            }
        }
    }
    if external {
        let policy = spec
            .entry("externalTrafficPolicy")
            .or_insert("Cluster".into())
            .clone();
        if kind == "LoadBalancer" && policy == "Local" && spec.get("healthCheckNodePort").is_none()
        {
            let port = match old_spec.and_then(|s| s.get("healthCheckNodePort")) {
                Some(p) => p.clone(),
                None => allocate()?.into(),
            };
            spec.insert("healthCheckNodePort".into(), port);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The server

struct Connection {
    stream: TcpStream,
    closed: Arc<AtomicBool>,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled on every change of `state`, and when connections close.
    changed: Condvar,
    connections: Mutex<HashMap<u64, Connection>>,
    next_connection: AtomicU64,
    next_request: AtomicU64,
    /// Set when the handle drops: every thread ends.
    shutdown: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    fn with_state<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let result = f(&mut lock(&self.state));
        self.changed.notify_all();
        result
    }

    fn spawn(&self, f: impl FnOnce() + Send + 'static) {
        let handle = thread::spawn(f);
        let mut threads = lock(&self.threads);
        threads.retain(|t| !t.is_finished());
        threads.push(handle);
    }

    fn close_connections(&self) -> usize {
        let connections: Vec<Connection> =
            lock(&self.connections).drain().map(|(_, c)| c).collect();
        for connection in &connections {
            connection.closed.store(true, Ordering::SeqCst);
            let _ = connection.stream.shutdown(Shutdown::Both);
        }
        // Taking the lock orders this after any watch's check of its flag, so none misses it.
        drop(lock(&self.state));
        self.changed.notify_all();
        connections.len()
    }
}

struct Listener {
    running: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

/// Where the fake listens: an address in a network namespace (`None`: the tests' own).
#[derive(Clone)]
struct Endpoint {
    addr: SocketAddr,
    netns: Option<String>,
}

/// The fake API server. Cheap to share between threads (`&self` everywhere); dropping it closes
/// the listeners and every connection.
pub struct FakeApi {
    shared: Arc<Shared>,
    /// The first endpoint's address (with the port its bind got).
    addr: SocketAddr,
    /// Every endpoint, bound again by [`FakeApi::restart`].
    endpoints: Mutex<Vec<Endpoint>>,
    listeners: Mutex<Vec<Listener>>,
}

/// Binds `addr`, inside the named network namespace if given: a thread enters the namespace,
/// binds and ends; the socket stays in the namespace it was created in.
fn bind(addr: SocketAddr, netns: Option<&str>) -> anyhow::Result<TcpListener> {
    let Some(netns) = netns else {
        // std sets SO_REUSEADDR, so a restart binds again while old connections linger.
        return TcpListener::bind(addr).with_context(|| format!("binding {addr}"));
    };
    let path = format!("/run/netns/{netns}");
    thread::spawn(move || -> anyhow::Result<TcpListener> {
        let file = File::open(&path).with_context(|| format!("opening {path}"))?;
        // SAFETY: a valid namespace descriptor; setns changes only this thread, which ends
        // after binding.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error()).with_context(|| format!("setns {path}"));
        }
        TcpListener::bind(addr).with_context(|| format!("binding {addr} in {path}"))
    })
    .join()
    .map_err(|_| anyhow!("the thread binding in {netns} panicked"))?
}

fn accept_loop(
    shared: &Arc<Shared>,
    listener: &TcpListener,
    netns: Option<&str>,
    running: &AtomicBool,
) {
    // Non-blocking accept polled every few milliseconds: stopping needs no wake-up trick.
    while running.load(Ordering::SeqCst) && !shared.shutdown.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, remote)) => {
                let id = shared.next_connection.fetch_add(1, Ordering::SeqCst);
                let closed = Arc::new(AtomicBool::new(false));
                let Ok(registered) = stream.try_clone() else {
                    continue;
                };
                lock(&shared.connections).insert(
                    id,
                    Connection {
                        stream: registered,
                        closed: closed.clone(),
                    },
                );
                let shared2 = shared.clone();
                let netns = netns.map(str::to_owned);
                shared.spawn(move || {
                    serve_connection(&shared2, stream, remote, netns.as_deref(), &closed);
                    lock(&shared2.connections).remove(&id);
                });
            }
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn serve_connection(
    shared: &Shared,
    mut stream: TcpStream,
    remote: SocketAddr,
    netns: Option<&str>,
    closed: &AtomicBool,
) {
    let setup = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_nodelay(true))
        .and_then(|()| stream.set_write_timeout(Some(WRITE_TIMEOUT)))
        .and_then(|()| stream.try_clone());
    let Ok(read_half) = setup else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    while !closed.load(Ordering::SeqCst) && !shared.shutdown.load(Ordering::SeqCst) {
        let request = match read_request(&mut reader, &mut stream) {
            Ok(ReadOutcome::Request(r)) => r,
            Ok(ReadOutcome::Bad(e)) => {
                let _ = write_response(&mut stream, e.code, &e.to_status(), false);
                break;
            }
            Ok(ReadOutcome::Closed) | Err(_) => break,
        };
        match handle(shared, &mut stream, &request, (remote, netns), closed) {
            Ok(true) if request.keep_alive => {}
            _ => break,
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
}

/// Serves one request; `Ok(false)` when the connection must close.
fn handle(
    shared: &Shared,
    stream: &mut TcpStream,
    request: &HttpRequest,
    (remote, netns): (SocketAddr, Option<&str>),
    closed: &AtomicBool,
) -> io::Result<bool> {
    let record = Request {
        method: request.method.clone(),
        target: request.target.clone(),
        body: String::from_utf8_lossy(&request.body).into_owned(),
        user_agent: request.header("user-agent").map(str::to_owned),
        user: request
            .header("authorization")
            .and_then(|a| a.strip_prefix("Bearer "))
            .map(|t| t.trim().to_owned()),
        content_type: request.header("content-type").map(str::to_owned),
        remote,
        netns: netns.map(str::to_owned),
        code: 0,
        seq: shared.next_request.fetch_add(1, Ordering::SeqCst),
    };
    let seq = record.seq;
    let answered = |code: u16| {
        let mut state = lock(&shared.state);
        if let Some(r) = state.requests.iter_mut().rev().find(|r| r.seq == seq) {
            r.code = code;
        }
    };
    {
        let mut state = lock(&shared.state);
        state.requests.push(record);
        while state.held
            && !closed.load(Ordering::SeqCst)
            && !shared.shutdown.load(Ordering::SeqCst)
        {
            state = shared
                .changed
                .wait_timeout(state, WAIT_SLICE)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
    if closed.load(Ordering::SeqCst) || shared.shutdown.load(Ordering::SeqCst) {
        return Ok(false);
    }
    let (path, query) = request
        .target
        .split_once('?')
        .unwrap_or((&request.target, ""));
    let query = Query::parse(query);
    let outcome = parse_route(path).and_then(|route| {
        let watch = route.watch_prefix || query.flag("watch");
        if request.method == "GET" && watch {
            let watch = Watch::new(shared, &route, &query)?;
            Ok(Answer::Watch(watch))
        } else {
            serve(shared, request, &route, &query).map(|(code, body)| Answer::Object(code, body))
        }
    });
    match outcome {
        Ok(Answer::Watch(watch)) => {
            answered(200);
            watch.run(shared, stream, closed)
        }
        Ok(Answer::Object(code, body)) => {
            answered(code);
            write_response(stream, code, &body, request.keep_alive)?;
            Ok(true)
        }
        Err(e) => {
            answered(e.code);
            write_response(stream, e.code, &e.to_status(), request.keep_alive)?;
            Ok(true)
        }
    }
}

enum Answer {
    Object(u16, Value),
    Watch(Watch),
}

fn parse_body(request: &HttpRequest) -> Result<Value, ApiError> {
    let yaml = request
        .header("content-type")
        .is_some_and(|t| t.contains("yaml"));
    let parsed = if yaml {
        serde_yaml::from_slice(&request.body).map_err(|e| e.to_string())
    } else {
        serde_json::from_slice(&request.body).map_err(|e| e.to_string())
    };
    parsed.map_err(|e| ApiError::bad_request(format!("the body is not valid: {e}")))
}

/// Everything but a watch.
fn serve(
    shared: &Shared,
    request: &HttpRequest,
    route: &Route,
    query: &Query,
) -> Result<(u16, Value), ApiError> {
    let resource = route.resource;
    let namespace = resource.store_namespace(route.namespace.as_deref().unwrap_or_default());
    let part = if route.status {
        Part::Status
    } else {
        Part::Object
    };
    match (request.method.as_str(), route.name.as_deref()) {
        ("GET", None) => {
            let selector = Selector::from_query(query)?;
            let state = lock(&shared.state);
            let items: Vec<Value> = state
                .list(resource, route.namespace.as_deref())
                .into_iter()
                .filter(|o| selector.matches(o))
                .cloned()
                .collect();
            Ok((
                200,
                json!({
                    "kind": format!("{}List", resource.kind),
                    "apiVersion": resource.api_version(),
                    "metadata": {"resourceVersion": state.rv.to_string()},
                    "items": items,
                }),
            ))
        }
        ("GET", Some(name)) => lock(&shared.state)
            .get(resource, &namespace, name)
            .cloned()
            .map(|o| (200, o))
            .ok_or_else(|| ApiError::not_found(resource, name)),
        ("POST", None) if !route.status => {
            let body = parse_body(request)?;
            let created = shared.with_state(|s| {
                s.create(resource, route.namespace.as_deref(), body, Part::Object)
            })?;
            Ok((201, created))
        }
        ("PUT", Some(name)) => {
            let body = parse_body(request)?;
            if meta_str(&body, "name").is_some_and(|n| n != name) {
                return Err(ApiError::bad_request(
                    "the name of the object does not match the name on the URL",
                ));
            }
            State::check_kind(resource, &body)?;
            shared
                .with_state(|s| s.update(resource, &namespace, name, body, part))
                .map(|o| (200, o))
        }
        ("PATCH", Some(name)) => patch(shared, request, route, &namespace, name, part),
        ("DELETE", Some(name)) if !route.status => shared
            .with_state(|s| s.delete(resource, &namespace, name))
            .map(|o| (200, o)),
        (method, _) => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("{method} is not supported on {}", request.target),
        )),
    }
}

fn patch(
    shared: &Shared,
    request: &HttpRequest,
    route: &Route,
    namespace: &str,
    name: &str,
    part: Part,
) -> Result<(u16, Value), ApiError> {
    let resource = route.resource;
    let content_type = request.header("content-type").unwrap_or_default();
    let media = content_type.split(';').next().unwrap_or_default().trim();
    let apply = match media {
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => false,
        "application/apply-patch+yaml" => true,
        _ => {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!(
                    "the body of the request was in an unknown format - accepted media types \
                     include: application/merge-patch+json, \
                     application/strategic-merge-patch+json, application/apply-patch+yaml (got \
                     {content_type:?})"
                ),
            ));
        }
    };
    let body = parse_body(request)?;
    shared.with_state(|s| {
        if apply && s.get(resource, namespace, name).is_none() && part == Part::Object {
            // Server-side apply creates what is missing.
            let mut object = body.clone();
            metadata_mut(&mut object).insert("name".into(), name.into());
            return s
                .create(resource, route.namespace.as_deref(), object, Part::Object)
                .map(|o| (201, o));
        }
        s.patch(resource, namespace, name, &body, part)
            .map(|o| (200, o))
    })
}

/// A watch, checked and ready to stream.
struct Watch {
    resource: &'static ResourceInfo,
    namespace: Option<String>,
    selector: Selector,
    /// `None`: send the current objects first.
    from: Option<u64>,
    initial_end_bookmark: bool,
    bookmarks: bool,
    timeout: Duration,
    /// [`FakeApi::expire_watches`] calls seen when the watch was accepted: taken before the
    /// client sees the response start, so an expiry right after that is never missed.
    epoch: u64,
}

impl Watch {
    fn new(shared: &Shared, route: &Route, query: &Query) -> Result<Self, ApiError> {
        let mut selector = Selector::from_query(query)?;
        if let Some(name) = &route.name {
            // The old form, `.../services/NAME?watch=true`.
            selector.fields.push(FieldRequirement {
                path: "metadata.name".into(),
                value: name.clone(),
                equal: true,
            });
        }
        let send_initial = query.flag("sendInitialEvents");
        let from =
            match query.get("resourceVersion") {
                _ if send_initial => None,
                None | Some("" | "0") => None,
                Some(rv) => Some(rv.parse::<u64>().map_err(|_| {
                    ApiError::bad_request(format!("invalid resource version: {rv:?}"))
                })?),
            };
        let state = lock(&shared.state);
        let timeout = match query.get("timeoutSeconds") {
            // Capped so that the deadline stays representable.
            Some(t) => Duration::from_secs(
                t.parse::<u64>()
                    .map_err(|_| ApiError::bad_request(format!("invalid timeoutSeconds: {t:?}")))?
                    .min(MAX_WATCH_TIMEOUT_SECS),
            ),
            None => state.default_watch_timeout,
        };
        Ok(Watch {
            resource: route.resource,
            namespace: route.namespace.clone(),
            selector,
            from,
            initial_end_bookmark: send_initial,
            bookmarks: query.flag("allowWatchBookmarks"),
            timeout,
            epoch: state.expire_epoch,
        })
    }

    fn line(kind: &str, object: &Value) -> Vec<u8> {
        let mut line = json!({"type": kind, "object": object})
            .to_string()
            .into_bytes();
        line.push(b'\n');
        line
    }

    fn bookmark(&self, rv: u64, initial_end: bool) -> Vec<u8> {
        let mut metadata = json!({"resourceVersion": rv.to_string()});
        if initial_end {
            metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        Watch::line(
            "BOOKMARK",
            &json!({"kind": self.resource.kind, "apiVersion": self.resource.api_version(), "metadata": metadata}),
        )
    }

    /// What a change looks like through this watch's namespace and selectors.
    fn translate(&self, change: &Change) -> Option<Vec<u8>> {
        if change.resource.key != self.resource.key
            || self
                .namespace
                .as_deref()
                .is_some_and(|n| n != change.namespace)
        {
            return None;
        }
        let now = self.selector.matches(&change.object);
        let before = change
            .previous
            .as_ref()
            .is_some_and(|p| self.selector.matches(p));
        let kind = match (change.kind, before, now) {
            (ChangeKind::Added, _, true) | (ChangeKind::Modified, false, true) => "ADDED",
            (ChangeKind::Modified, true, true) => "MODIFIED",
            (ChangeKind::Modified | ChangeKind::Deleted, true, _) => "DELETED",
            _ => return None,
        };
        Some(Watch::line(kind, &change.object))
    }

    /// Streams until the timeout, an expiry, or the connection goes; `Ok(true)` when the
    /// response ended cleanly and the connection can serve another request.
    fn run(
        &self,
        shared: &Shared,
        stream: &mut TcpStream,
        closed: &AtomicBool,
    ) -> io::Result<bool> {
        // The state is locked before the client sees the 200: a write or a compaction after
        // that must find the watch already started from its resourceVersion, as etcd's does.
        let mut state = lock(&shared.state);
        stream.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\
              Cache-Control: no-cache, private\r\n\r\n",
        )?;
        let started = Instant::now();
        let deadline = started + self.timeout;
        let mut out = Vec::new();
        let interval = state.bookmark_interval;
        let mut next_bookmark = started + interval;
        let mut sent = match self.from {
            None => {
                for object in state.list(self.resource, self.namespace.as_deref()) {
                    if self.selector.matches(object) {
                        out.extend(Watch::line("ADDED", object));
                    }
                }
                if self.initial_end_bookmark {
                    out.extend(self.bookmark(state.rv, true));
                }
                state.rv
            }
            Some(rv) if rv < state.compacted => {
                let error = ApiError::expired(rv, state.compacted);
                drop(state);
                write_chunk(stream, &Watch::line("ERROR", &error.to_status()))?;
                write_chunk(stream, b"")?;
                return Ok(true);
            }
            Some(rv) => rv,
        };
        loop {
            if closed.load(Ordering::SeqCst) || shared.shutdown.load(Ordering::SeqCst) {
                // Cut, not ended: the client sees the connection go, as when a server dies.
                return Ok(false);
            }
            if state.expire_epoch != self.epoch {
                let error = ApiError::expired(sent, state.compacted.max(state.rv));
                drop(state);
                write_chunk(stream, &Watch::line("ERROR", &error.to_status()))?;
                write_chunk(stream, b"")?;
                return Ok(true);
            }
            let first = state.history.partition_point(|c| c.rv <= sent);
            for change in &state.history[first..] {
                if let Some(line) = self.translate(change) {
                    out.extend(line);
                }
            }
            sent = sent.max(state.rv);
            let now = Instant::now();
            if out.is_empty() && self.bookmarks && now >= next_bookmark {
                out.extend(self.bookmark(sent, false));
                next_bookmark = now + interval;
            }
            if !out.is_empty() {
                drop(state);
                write_chunk(stream, &out)?;
                out.clear();
                state = lock(&shared.state);
                continue;
            }
            if now >= deadline {
                drop(state);
                write_chunk(stream, b"")?;
                return Ok(true);
            }
            let mut wait = deadline.min(now + WAIT_SLICE) - now;
            if self.bookmarks {
                wait = wait.min(next_bookmark.saturating_duration_since(now));
            }
            state = shared
                .changed
                .wait_timeout(state, wait)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The control API

impl FakeApi {
    /// Listens on `addr` (port 0 picks one).
    pub fn start(addr: SocketAddr) -> anyhow::Result<Self> {
        Self::start_with(addr, None)
    }

    /// Listens on `addr` inside the network namespace `/run/netns/NETNS` (needs root), for an
    /// agent that runs there and reaches the API on its loopback.
    pub fn start_in_netns(netns: &str, addr: SocketAddr) -> anyhow::Result<Self> {
        Self::start_with(addr, Some(netns.to_owned()))
    }

    fn start_with(addr: SocketAddr, netns: Option<String>) -> anyhow::Result<Self> {
        let listener = bind(addr, netns.as_deref())?;
        let addr = listener.local_addr()?;
        let api = FakeApi {
            shared: Arc::new(Shared {
                state: Mutex::new(State::new()),
                changed: Condvar::new(),
                connections: Mutex::new(HashMap::new()),
                next_connection: AtomicU64::new(0),
                next_request: AtomicU64::new(0),
                shutdown: AtomicBool::new(false),
                threads: Mutex::new(Vec::new()),
            }),
            addr,
            endpoints: Mutex::new(vec![Endpoint { addr, netns }]),
            listeners: Mutex::new(Vec::new()),
        };
        api.listen(listener, api.endpoints()[0].netns.clone())?;
        Ok(api)
    }

    fn endpoints(&self) -> Vec<Endpoint> {
        lock(&self.endpoints).clone()
    }

    fn listen(&self, listener: TcpListener, netns: Option<String>) -> anyhow::Result<()> {
        listener.set_nonblocking(true)?;
        let running = Arc::new(AtomicBool::new(true));
        let shared = self.shared.clone();
        let flag = running.clone();
        let thread =
            thread::spawn(move || accept_loop(&shared, &listener, netns.as_deref(), &flag));
        lock(&self.listeners).push(Listener { running, thread });
        Ok(())
    }

    /// Listens also on the same address and port inside another network namespace (needs
    /// root): agents in several namespaces then reach one store through their own loopback, with
    /// one kubeconfig, and [`Request::netns`] tells them apart. [`FakeApi::stop`] and
    /// [`FakeApi::restart`] act on every listener.
    pub fn listen_also_in_netns(&self, netns: &str) -> anyhow::Result<()> {
        let endpoint = Endpoint {
            addr: self.addr,
            netns: Some(netns.to_owned()),
        };
        let listener = bind(endpoint.addr, endpoint.netns.as_deref())?;
        self.listen(listener, endpoint.netns.clone())?;
        lock(&self.endpoints).push(endpoint);
        Ok(())
    }

    /// The address it listens on (in its network namespace, if started in one).
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    #[must_use]
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `http://ADDR`, with 127.0.0.1 for an unspecified address.
    #[must_use]
    pub fn url(&self) -> String {
        let mut addr = self.addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(Ipv4Addr::LOCALHOST.into());
        }
        format!("http://{addr}")
    }

    /// Writes a kubeconfig for this server: one cluster, one context (namespace `default`), and
    /// a user `user` whose bearer token is its name. The fake checks no credentials; the token
    /// only lets [`Request::user`] tell which kubeconfig a request came with.
    pub fn write_kubeconfig(&self, path: &Path, user: &str) -> anyhow::Result<()> {
        Self::write_kubeconfig_with_server(path, user, &self.url())
    }

    /// [`FakeApi::write_kubeconfig`] with another server URL, for clients that reach the fake
    /// through a routed address (`http://ADDR:PORT`).
    pub fn write_kubeconfig_with_server(
        path: &Path,
        user: &str,
        server: &str,
    ) -> anyhow::Result<()> {
        let config = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": server}}],
            "users": [{"name": user, "user": {"token": user}}],
            "contexts": [{
                "name": "fake",
                "context": {"cluster": "fake", "user": user, "namespace": "default"},
            }],
            "current-context": "fake",
            "preferences": {},
        });
        let yaml = serde_yaml::to_string(&config)?;
        std::fs::write(path, yaml).with_context(|| format!("writing {}", path.display()))
    }

    fn resource(name: &str) -> anyhow::Result<&'static ResourceInfo> {
        resource_by_name(name).with_context(|| {
            let known: Vec<_> = RESOURCES.iter().map(|r| r.key).collect();
            format!("unknown resource {name:?} (known: {known:?})")
        })
    }

    /// Creates or replaces `object`, like `kubectl apply` for what the tests need: everything in
    /// the document replaces what is stored, except that an object without `status` keeps its
    /// status (so apply can also set a status, which `kubectl apply` cannot). A `List` applies
    /// each item. Returns the stored objects.
    pub fn apply(&self, object: Value) -> anyhow::Result<Vec<Value>> {
        if object.get("kind").and_then(Value::as_str) == Some("List") {
            let items = object
                .get("items")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let mut stored = Vec::new();
            for item in items {
                stored.extend(self.apply(item)?);
            }
            return Ok(stored);
        }
        let api_version = object
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let kind = object
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let resource = resource_by_kind(api_version, kind)
            .with_context(|| format!("the fake does not serve {api_version}/{kind}"))?;
        let mut object = object;
        // Like kubectl apply: last writer wins, no resourceVersion check.
        metadata_mut(&mut object).remove("resourceVersion");
        let stored = self.shared.with_state(|s| {
            let (namespace, name) = s.identity(resource, None, &object)?;
            if s.get(resource, &namespace, &name).is_some() {
                s.update(resource, &namespace, &name, object, Part::Everything)
            } else {
                s.create(resource, Some(&namespace), object, Part::Everything)
            }
        })?;
        Ok(vec![stored])
    }

    /// [`FakeApi::apply`] for every document of a (multi-document) YAML text.
    pub fn apply_yaml(&self, yaml: &str) -> anyhow::Result<Vec<Value>> {
        let mut stored = Vec::new();
        for document in serde_yaml::Deserializer::from_str(yaml) {
            let value = Value::deserialize(document).context("parsing YAML")?;
            if !value.is_null() {
                stored.extend(self.apply(value)?);
            }
        }
        Ok(stored)
    }

    /// Replaces an object's status, as a controller writing `/status` would.
    pub fn set_status(
        &self,
        resource: &str,
        namespace: &str,
        name: &str,
        status: Value,
    ) -> anyhow::Result<Value> {
        let resource = Self::resource(resource)?;
        let namespace = resource.store_namespace(namespace);
        let mut body = Map::new();
        body.insert("status".into(), status);
        Ok(self.shared.with_state(|s| {
            s.update(
                resource,
                &namespace,
                name,
                Value::Object(body),
                Part::Status,
            )
        })?)
    }

    /// Deletes an object; returns it, or `None` when there was none.
    pub fn delete(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        let resource = resource_by_name(resource)?;
        let namespace = resource.store_namespace(namespace);
        self.shared
            .with_state(|s| s.delete(resource, &namespace, name).ok())
    }

    /// One object (`namespace` is ignored for cluster-scoped resources).
    #[must_use]
    pub fn get(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        let resource = resource_by_name(resource)?;
        let namespace = resource.store_namespace(namespace);
        lock(&self.shared.state)
            .get(resource, &namespace, name)
            .cloned()
    }

    /// Every object of a resource, in every namespace, ordered by namespace and name.
    #[must_use]
    pub fn list(&self, resource: &str) -> Vec<Value> {
        let Some(resource) = resource_by_name(resource) else {
            return Vec::new();
        };
        lock(&self.shared.state)
            .list(resource, None)
            .into_iter()
            .cloned()
            .collect()
    }

    /// The Events clients created, through either API group, oldest first.
    #[must_use]
    pub fn events(&self) -> Vec<Value> {
        let mut events: Vec<Value> = ["events", "events.events.k8s.io"]
            .into_iter()
            .flat_map(|r| self.list(r))
            .collect();
        // Uids count up, so they order by creation.
        events.sort_by(|a, b| meta_str(a, "uid").cmp(&meta_str(b, "uid")));
        events
    }

    /// Every request so far, oldest first.
    #[must_use]
    pub fn requests(&self) -> Vec<Request> {
        lock(&self.shared.state).requests.clone()
    }

    pub fn clear_requests(&self) {
        lock(&self.shared.state).requests.clear();
    }

    /// The current resourceVersion.
    #[must_use]
    pub fn current_resource_version(&self) -> u64 {
        lock(&self.shared.state).rv
    }

    /// Moves the compaction point to the current resourceVersion: watches that start from an
    /// older one get 410 Expired. Open watches go on and miss nothing, as with etcd (see
    /// [`FakeApi::expire_watches`] to end them); for that the history itself is kept.
    pub fn compact(&self) {
        self.shared.with_state(|s| s.compacted = s.rv);
    }

    /// Ends every open watch with an `ERROR` 410 Expired event, as a real server does when its
    /// watch cache falls behind.
    pub fn expire_watches(&self) {
        self.shared.with_state(|s| s.expire_epoch += 1);
    }

    /// Closes every open connection (watches are cut mid-stream); the server keeps listening.
    /// Returns how many were open.
    pub fn drop_connections(&self) -> usize {
        self.shared.close_connections()
    }

    /// Closes the listeners and every connection, keeping all state: the API goes away until
    /// [`FakeApi::restart`].
    pub fn stop(&self) {
        let listeners: Vec<Listener> = lock(&self.listeners).drain(..).collect();
        for listener in &listeners {
            listener.running.store(false, Ordering::SeqCst);
        }
        for listener in listeners {
            // The accept loop polls, so this returns within milliseconds.
            let _ = listener.thread.join();
        }
        self.shared.close_connections();
    }

    /// Listens again on the same addresses (and namespaces) after [`FakeApi::stop`]; does
    /// nothing while it listens.
    pub fn restart(&self) -> anyhow::Result<()> {
        if self.is_listening() {
            return Ok(());
        }
        for endpoint in self.endpoints() {
            // The port is ours, but give a racing bind elsewhere a moment to fail.
            let deadline = Instant::now() + Duration::from_secs(5);
            let listener = loop {
                match bind(endpoint.addr, endpoint.netns.as_deref()) {
                    Ok(l) => break l,
                    Err(e) if Instant::now() >= deadline => return Err(e),
                    Err(_) => thread::sleep(Duration::from_millis(50)),
                }
            };
            self.listen(listener, endpoint.netns)?;
        }
        Ok(())
    }

    /// Whether it listens (between [`FakeApi::stop`] and [`FakeApi::restart`] it does not).
    #[must_use]
    pub fn is_listening(&self) -> bool {
        !lock(&self.listeners).is_empty()
    }

    /// While held, requests are read but not answered (watches already streaming go on); for
    /// tests of a slow API.
    pub fn hold(&self, held: bool) {
        self.shared.with_state(|s| s.held = held);
    }

    /// How often watches that allow bookmarks get one (default 1 s).
    pub fn set_bookmark_interval(&self, interval: Duration) {
        // Bounded both ways: no busy loop, and a deadline that stays representable.
        let interval = interval.clamp(
            Duration::from_millis(10),
            Duration::from_secs(MAX_WATCH_TIMEOUT_SECS),
        );
        self.shared.with_state(|s| s.bookmark_interval = interval);
    }

    /// How long a watch without `timeoutSeconds` lasts (default 300 s).
    pub fn set_default_watch_timeout(&self, timeout: Duration) {
        let timeout = timeout.min(Duration::from_secs(MAX_WATCH_TIMEOUT_SECS));
        self.shared
            .with_state(|s| s.default_watch_timeout = timeout);
    }

    /// Polls `condition` every 20 ms until it holds or `timeout` passes; returns whether it held.
    pub fn wait_until(&self, timeout: Duration, mut condition: impl FnMut(&Self) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if condition(self) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        self.stop();
        let threads: Vec<JoinHandle<()>> = lock(&self.shared.threads).drain(..).collect();
        let deadline = Instant::now() + JOIN_TIMEOUT;
        for thread in threads {
            while !thread.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(5));
            }
            // A thread still stuck (a write to a client that stopped reading) is left behind;
            // its socket is shut down and its write times out.
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
    }
}
