use std::{
    cell::Cell,
    net::Ipv4Addr,
    time::{Duration, UNIX_EPOCH},
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    task::LocalSet,
};

use super::*;
use crate::{
    http::tests::{get, send},
    record::tests::sample_record,
};

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_790_000_000 + secs)
}

#[test]
fn health_follows_pending_changes_like_kube_proxy() {
    let h = HealthHandle::new(Duration::from_mins(1));
    assert!(h.is_healthy(at(0)), "healthy while starting");
    h.queued_update(at(0));
    assert!(h.is_healthy(at(59)), "pending, not late yet");
    h.queued_update(at(30)); // the oldest pending change counts
    assert!(!h.is_healthy(at(60)));
    h.updated(at(61));
    assert!(h.is_healthy(at(200)));
    assert_eq!(h.get().check(at(200)).1, Some(at(61)));
    h.queued_update(at(300));
    h.refused();
    assert!(
        h.is_healthy(at(1000)),
        "a refused change is no longer pending"
    );
}

#[test]
fn healthz_and_livez_bodies() {
    let h = HealthHandle::new(Duration::from_mins(1));
    h.updated(at(0));
    let r = proxy_health_response(&h.get(), at(10), true);
    assert_eq!(r.status, 200);
    assert_eq!(r.content_type, "application/json");
    assert_eq!(
        r.body,
        "{\"lastUpdated\": \"2026-09-21T14:13:30.000Z\",\"currentTime\": \
         \"2026-09-21T14:13:30.000Z\", \"nodeEligible\": true}"
    );
    assert!(
        r.headers
            .contains(&("X-Content-Type-Options", "nosniff".into()))
    );

    h.queued_update(at(5));
    let r = proxy_health_response(&h.get(), at(65), false);
    assert_eq!(r.status, 503);
    assert_eq!(
        r.body,
        "{\"lastUpdated\": \"2026-09-21T14:13:20.000Z\",\"currentTime\": \"2026-09-21T14:14:25.000Z\"}"
    );

    // Not eligible: /healthz fails, /livez does not.
    let h = HealthHandle::new(Duration::from_mins(1));
    h.set_node_eligible(false);
    let r = proxy_health_response(&h.get(), at(0), true);
    assert_eq!(r.status, 503);
    assert!(
        r.body
            .starts_with("{\"lastUpdated\": \"0001-01-01T00:00:00Z\""),
        "{}",
        r.body
    );
    assert!(r.body.ends_with("\"nodeEligible\": false}"), "{}", r.body);
    assert_eq!(proxy_health_response(&h.get(), at(0), false).status, 200);
}

#[test]
fn wanted_servers_come_from_local_policy_services_with_a_port() {
    let (record, _) = sample_record();
    let wanted = wanted_service_health(&record);
    assert_eq!(
        wanted,
        BTreeMap::from([(
            32_000,
            ServiceHealth {
                namespace: "default".into(),
                name: "web".into(),
                local_endpoints: 2,
            }
        )])
    );
    let mut cluster = record.clone();
    for p in &mut cluster.services[0].ports {
        p.external_policy = PolicyName::Cluster;
    }
    assert!(
        wanted_service_health(&cluster).is_empty(),
        "Cluster policy: no server"
    );
}

fn service(name: &str, local_endpoints: usize) -> ServiceHealth {
    ServiceHealth {
        namespace: "default".into(),
        name: name.into(),
        local_endpoints,
    }
}

#[test]
fn service_health_body_is_kube_proxys() {
    let r = service_health_response(&service("web", 3), true);
    assert_eq!(r.status, 200);
    assert_eq!(
        r.body,
        "{\n\t\"service\": {\n\t\t\"namespace\": \"default\",\n\t\t\"name\": \"web\"\n\t},\n\t\
         \"localEndpoints\": 3,\n\t\"serviceProxyHealthy\": true\n}"
    );
    assert!(
        r.headers
            .contains(&("X-Load-Balancing-Endpoint-Weight", "3".into()))
    );
    assert_eq!(
        service_health_response(&service("web", 0), true).status,
        503
    );
    assert_eq!(
        service_health_response(&service("web", 3), false).status,
        503
    );
    let odd = service_health_response(&service("we\"b", 1), true);
    let parsed: serde_json::Value =
        serde_json::from_str(&odd.body).unwrap_or_else(|e| panic!("body is JSON: {e}"));
    assert_eq!(parsed["service"]["name"], "we\"b");
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

#[tokio::test]
async fn healthz_server_answers_200_then_503() {
    LocalSet::new()
        .run_until(async {
            let health = HealthHandle::new(Duration::from_mins(1));
            let server = serve_proxy_health(loopback(0), health.clone())
                .unwrap_or_else(|e| panic!("bind: {e}"));
            let addr = server.local_addr();
            let a = get(addr, "/healthz").await;
            assert_eq!(a.status, 200);
            assert_eq!(a.header("content-type"), Some("application/json"));
            assert_eq!(a.header("x-content-type-options"), Some("nosniff"));
            let body: serde_json::Value =
                serde_json::from_str(&a.body).unwrap_or_else(|e| panic!("{e}: {}", a.body));
            assert_eq!(body["nodeEligible"], true);
            assert_eq!(body["lastUpdated"], body["currentTime"]);

            // A change pending since long ago.
            health.queued_update(SystemTime::now() - Duration::from_mins(2));
            assert_eq!(get(addr, "/healthz").await.status, 503);
            let a = get(addr, "/livez").await;
            assert_eq!(a.status, 503);
            let body: serde_json::Value =
                serde_json::from_str(&a.body).unwrap_or_else(|e| panic!("{e}: {}", a.body));
            assert!(body.get("nodeEligible").is_none());
            health.updated(SystemTime::now());
            assert_eq!(get(addr, "/livez").await.status, 200);
            health.set_node_eligible(false);
            assert_eq!(get(addr, "/healthz").await.status, 503);
            assert_eq!(get(addr, "/livez").await.status, 200);
            assert_eq!(get(addr, "/metrics").await.status, 404);
            assert_eq!(
                send(addr, b"PUT /healthz HTTP/1.1\r\n\r\n").await.status,
                405
            );
        })
        .await;
}

#[tokio::test]
async fn metrics_server_serves_the_rendered_body_or_500() {
    LocalSet::new()
        .run_until(async {
            let fail = Rc::new(Cell::new(false));
            let scrapes = Rc::new(Cell::new(0u32));
            let server = {
                let fail = Rc::clone(&fail);
                let scrapes = Rc::clone(&scrapes);
                serve_metrics(loopback(0), move || {
                    scrapes.set(scrapes.get() + 1);
                    if fail.get() {
                        anyhow::bail!("map COUNTERS unreadable");
                    }
                    Ok(format!("lbagent_flows {}\n", scrapes.get()))
                })
                .unwrap_or_else(|e| panic!("bind: {e}"))
            };
            let addr = server.local_addr();
            let a = get(addr, "/metrics").await;
            assert_eq!((a.status, a.body.as_str()), (200, "lbagent_flows 1\n"));
            assert_eq!(a.header("content-type"), Some(crate::metrics::CONTENT_TYPE));
            assert_eq!(get(addr, "/metrics").await.body, "lbagent_flows 2\n");
            fail.set(true);
            let a = get(addr, "/metrics").await;
            assert_eq!(a.status, 500);
            assert!(a.body.contains("map COUNTERS unreadable"), "{}", a.body);
            assert_eq!(get(addr, "/").await.status, 404);
            assert_eq!(scrapes.get(), 3, "only /metrics renders");
        })
        .await;
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind(loopback(0))
        .and_then(|l| l.local_addr())
        .map_or_else(|e| panic!("no free port: {e}"), |a| a.port())
}

#[tokio::test]
async fn health_check_node_port_servers_follow_sync() {
    LocalSet::new()
        .run_until(async {
            let health = HealthHandle::new(Duration::from_mins(1));
            let mut servers = HealthServers::new(IpAddr::from(Ipv4Addr::LOCALHOST), health.clone());
            let (p1, p2) = (free_port(), free_port());

            let errors = servers.sync(BTreeMap::from([(p1, service("web", 2))]));
            assert!(errors.is_empty(), "{errors:?}");
            let a = get(loopback(p1), "/").await;
            assert_eq!(a.status, 200);
            assert_eq!(a.header("x-load-balancing-endpoint-weight"), Some("2"));
            assert_eq!(a.header("x-content-type-options"), Some("nosniff"));
            assert_eq!(a.header("content-type"), Some("application/json"));
            let body: serde_json::Value =
                serde_json::from_str(&a.body).unwrap_or_else(|e| panic!("{e}: {}", a.body));
            assert_eq!(
                body,
                serde_json::json!({
                    "service": {"namespace": "default", "name": "web"},
                    "localEndpoints": 2,
                    "serviceProxyHealthy": true
                })
            );

            // Same port, new count and a second Service: the first listener keeps running and
            // a request already under way gets the new count.
            let mut early = tokio::net::TcpStream::connect(loopback(p1))
                .await
                .unwrap_or_else(|e| panic!("connect: {e}"));
            early
                .write_all(b"GET / HTTP/1.1\r\n")
                .await
                .unwrap_or_else(|e| panic!("write: {e}"));
            let errors = servers.sync(BTreeMap::from([
                (p1, service("web", 0)),
                (p2, service("api", 1)),
            ]));
            assert!(errors.is_empty(), "{errors:?}");
            early
                .write_all(b"\r\n")
                .await
                .unwrap_or_else(|e| panic!("write: {e}"));
            let mut raw = String::new();
            early
                .read_to_string(&mut raw)
                .await
                .unwrap_or_else(|e| panic!("read: {e}"));
            assert!(raw.starts_with("HTTP/1.1 503 "), "{raw}");
            assert!(raw.contains("\"localEndpoints\": 0"), "{raw}");
            let a = get(loopback(p1), "/any/path").await;
            assert_eq!(a.status, 503, "no local endpoint");
            assert_eq!(a.header("x-load-balancing-endpoint-weight"), Some("0"));
            assert_eq!(get(loopback(p2), "/").await.status, 200);

            // An unhealthy agent fails every Service.
            health.queued_update(SystemTime::now() - Duration::from_mins(2));
            let a = get(loopback(p2), "/").await;
            assert_eq!(a.status, 503);
            assert!(
                a.body.contains("\"serviceProxyHealthy\": false"),
                "{}",
                a.body
            );
            health.updated(SystemTime::now());

            // The first Service goes away: its port closes.
            let errors = servers.sync(BTreeMap::from([(p2, service("api", 1))]));
            assert!(errors.is_empty(), "{errors:?}");
            tokio::task::yield_now().await;
            tokio::task::yield_now().await;
            assert!(tokio::net::TcpStream::connect(loopback(p1)).await.is_err());
            assert_eq!(get(loopback(p2), "/").await.status, 200);
            assert_eq!(servers.listening().len(), 1);

            // A port someone else holds: reported, retried at the next sync.
            let blocker =
                std::net::TcpListener::bind(loopback(0)).unwrap_or_else(|e| panic!("bind: {e}"));
            let taken = blocker.local_addr().map(|a| a.port()).unwrap_or_default();
            let wanted = BTreeMap::from([(p2, service("api", 1)), (taken, service("db", 1))]);
            let errors = servers.sync(wanted.clone());
            assert_eq!(errors.len(), 1);
            assert_eq!(errors[0].port, taken);
            assert!(
                errors[0].to_string().contains("default/db"),
                "{}",
                errors[0]
            );
            drop(blocker);
            assert!(servers.sync(wanted).is_empty());
            assert_eq!(get(loopback(taken), "/").await.status, 200);
        })
        .await;
}

#[test]
fn a_failed_apply_fails_healthz_with_the_reason_until_an_apply_succeeds() {
    let h = HealthHandle::new(Duration::from_mins(1));
    h.updated(at(0));
    h.queued_update(at(10));
    h.apply_failed("writing map FRONTENDS failed: argument list too long".to_owned());
    let r = proxy_health_response(&h.get(), at(11), true);
    assert_eq!(r.status, 503, "{}", r.body);
    let json: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
    assert_eq!(json["failedApplies"], 1);
    assert_eq!(
        json["reason"],
        "the last apply failed: writing map FRONTENDS failed: argument list too long"
    );
    assert_eq!(json["nodeEligible"], true);
    assert!(!h.is_healthy(at(11)), "healthCheckNodePort answers follow");
    // /livez keeps kube-proxy's rule: the change is still pending, so it fails only when late.
    assert_eq!(proxy_health_response(&h.get(), at(11), false).status, 200);
    assert_eq!(proxy_health_response(&h.get(), at(70), false).status, 503);

    h.apply_failed("again".to_owned());
    // A refused change does not hide that the maps hold part of an earlier one.
    h.refused();
    let json: serde_json::Value =
        serde_json::from_str(&proxy_health_response(&h.get(), at(12), true).body).expect("JSON");
    assert_eq!(json["failedApplies"], 2);
    assert_eq!(json["reason"], "the last 2 applies failed: again");

    h.updated(at(13));
    let r = proxy_health_response(&h.get(), at(14), true);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(!r.body.contains("reason"), "{}", r.body);
    assert!(h.is_healthy(at(14)));
}
