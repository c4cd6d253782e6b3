//! Outages of what the server depends on: PostgreSQL going away under
//! load and coming back, and vendors that hang, flap, stay down, or answer
//! with garbage.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice::store::Backend;

use crate::common::postgres::admin_url;
use crate::common::proxy::Proxy;
use crate::common::server::{TestServer, wait_until};

/// What the senders saw, by phase.
#[derive(Default)]
struct Seen {
    acknowledged: HashSet<String>,
    /// Status (0 for no answer) to count, per phase.
    statuses: BTreeMap<(&'static str, u16), usize>,
    /// 503s without a Retry-After.
    without_retry_after: usize,
    /// When the first request after the restore was acknowledged.
    recovered_at: Option<Instant>,
}

/// Sends batches of 20 new events every 100 ms until `stop`; an
/// unacknowledged batch is not retried (its uuids are simply not counted).
async fn send(
    server: Arc<(String, String)>,
    phase: Arc<Mutex<&'static str>>,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
) {
    let (base, token) = (&server.0, &server.1);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(90))
        .build()
        .unwrap();
    while !stop.load(Ordering::SeqCst) {
        let uuids: Vec<String> = (0..20).map(|_| uuid::Uuid::now_v7().to_string()).collect();
        let batch: Vec<Value> = uuids
            .iter()
            .map(|uuid| json!({"event": "during outage", "distinct_id": "d", "uuid": uuid}))
            .collect();
        let sent_in = *phase.lock().unwrap();
        let answer = client
            .post(format!("{base}/batch/"))
            .header("content-type", "application/json")
            .body((json!({"api_key": token, "batch": batch})).to_string())
            .send()
            .await;
        {
            let mut seen = seen.lock().unwrap();
            let status = match &answer {
                Ok(response) => response.status().as_u16(),
                Err(_) => 0,
            };
            *seen.statuses.entry((sent_in, status)).or_default() += 1;
            match answer {
                Ok(_) if status == 200 => {
                    seen.acknowledged.extend(uuids);
                    if sent_in == "after" && seen.recovered_at.is_none() {
                        seen.recovered_at = Some(Instant::now());
                    }
                }
                Ok(response)
                    if status == 503 && !response.headers().contains_key("retry-after") =>
                {
                    seen.without_retry_after += 1;
                }
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_outage_capture_answers_503_with_retry_after_loses_nothing_and_recovers() {
    let admin = reqwest::Url::parse(&admin_url()).unwrap();
    let upstream: SocketAddr = tokio::net::lookup_host(format!(
        "{}:{}",
        admin.host_str().unwrap(),
        admin.port().unwrap_or(5432)
    ))
    .await
    .unwrap()
    .next()
    .unwrap();
    let proxy = Arc::new(Proxy::start(upstream).await);
    let through = proxy.clone();
    let server = TestServer::start_with(Backend::Postgres, move |mut config| {
        if let sluice::store::StoreConfig::Postgres { url } = &config.store {
            config.store = sluice::store::StoreConfig::Postgres {
                url: through.url(url),
            };
        }
        config
    })
    .await;
    let direct_url = server.database_url().unwrap().to_string();
    let target = Arc::new((server.base.clone(), server.project.capture_token.clone()));
    let phase = Arc::new(Mutex::new("before"));
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let senders: Vec<_> = (0..2)
        .map(|_| {
            tokio::spawn(send(
                target.clone(),
                phase.clone(),
                stop.clone(),
                seen.clone(),
            ))
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let outage = Duration::from_secs(8);
    *phase.lock().unwrap() = "during";
    proxy.cut();
    tokio::time::sleep(outage).await;
    proxy.restore();
    let restored = Instant::now();
    *phase.lock().unwrap() = "after";
    wait_until("capture to acknowledge again after the outage", || async {
        let seen = seen.lock().unwrap();
        (seen.recovered_at.is_some()
            && seen.statuses.get(&("after", 200)).copied().unwrap_or(0) >= 10)
            .then_some(())
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for sender in senders {
        sender.await.unwrap();
    }
    let seen = std::mem::take(&mut *seen.lock().unwrap());

    // While the database was away, capture said so, with a time to retry.
    let during_503 = seen.statuses.get(&("during", 503)).copied().unwrap_or(0);
    assert!(
        during_503 > 0,
        "no 503 during the outage: {:?}",
        seen.statuses
    );
    assert_eq!(seen.without_retry_after, 0, "every 503 carries Retry-After");
    for ((phase, status), count) in &seen.statuses {
        assert!(
            *status == 200 || *status == 503,
            "{count} requests {phase} the outage got {status}: {:?}",
            seen.statuses
        );
    }

    // Nothing acknowledged was lost, nothing stored twice.
    use sqlx::{Connection, Row};
    let acknowledged = seen.acknowledged;
    let stored = wait_until("every acknowledged event to be stored", || async {
        let mut conn = sqlx::PgConnection::connect(&direct_url).await.unwrap();
        let rows = sqlx::query("SELECT uuid FROM events")
            .fetch_all(&mut conn)
            .await
            .unwrap();
        let stored: Vec<String> = rows.iter().map(|r| r.get::<String, _>(0)).collect();
        let found = stored.iter().filter(|u| acknowledged.contains(*u)).count();
        (found == acknowledged.len()).then_some(stored)
    })
    .await;
    let unique: HashSet<&String> = stored.iter().collect();
    assert_eq!(unique.len(), stored.len(), "an event was stored twice");
    eprintln!(
        "postgres outage: {} s cut, {} events acknowledged and stored once, answers {:?}, \
         first acknowledgement {:.1} s after the restore",
        outage.as_secs(),
        acknowledged.len(),
        seen.statuses,
        seen.recovered_at
            .unwrap()
            .duration_since(restored)
            .as_secs_f64(),
    );
}

/// How the vendor answers, switched by the test.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Vendor {
    Up,
    /// Holds every request for a minute: past any export deadline.
    Hangs,
    /// In turn: 200, 500, the connection dropped unanswered, 429 with
    /// Retry-After, a 200 whose body is not JSON.
    Flaps,
    Down,
    /// 200 with a body far over the host's response limit.
    HugeOk,
    /// 500 with a body far over the host's response limit.
    HugeError,
}

#[derive(Clone)]
struct FakeVendor {
    mode: Arc<Mutex<Vendor>>,
    /// Every uuid of a request answered 2xx, with how often.
    delivered: crate::common::Received,
    requests: Arc<std::sync::atomic::AtomicUsize>,
}

const HUGE: usize = 24 << 20;

impl FakeVendor {
    fn start(mode: Vendor) -> (FakeVendor, String) {
        let vendor = FakeVendor {
            mode: Arc::new(Mutex::new(mode)),
            delivered: Default::default(),
            requests: Arc::default(),
        };
        let me = vendor.clone();
        let router = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |body: axum::body::Bytes| {
                let me = me.clone();
                async move { me.answer(body).await }
            }),
        );
        let url = format!("http://{}/hook", crate::common::serve(router));
        (vendor, url)
    }

    fn set(&self, mode: Vendor) {
        *self.mode.lock().unwrap() = mode;
    }

    fn record(&self, body: &[u8]) {
        self.delivered.record(body);
    }

    async fn answer(&self, body: axum::body::Bytes) -> axum::response::Response {
        use axum::http::StatusCode;
        use axum::response::IntoResponse;
        let n = self.requests.fetch_add(1, Ordering::SeqCst);
        let mode = *self.mode.lock().unwrap();
        match mode {
            Vendor::Up => {
                self.record(&body);
                "ok".into_response()
            }
            Vendor::Hangs => {
                tokio::time::sleep(Duration::from_secs(60)).await;
                StatusCode::GATEWAY_TIMEOUT.into_response()
            }
            Vendor::Flaps => match n % 5 {
                0 => {
                    self.record(&body);
                    "ok".into_response()
                }
                1 => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
                // Dropping the handler's future is not possible from
                // inside it; a body that fails mid-stream drops the
                // connection instead.
                2 => axum::response::Response::new(axum::body::Body::from_stream(
                    futures::stream::iter([
                        Ok::<_, std::io::Error>(axum::body::Bytes::from_static(b"partial")),
                        Err(std::io::Error::other("the vendor went away")),
                    ]),
                )),
                3 => (
                    StatusCode::TOO_MANY_REQUESTS,
                    [("retry-after", "1")],
                    "slow down",
                )
                    .into_response(),
                _ => {
                    self.record(&body);
                    (StatusCode::OK, "<html>not json at all").into_response()
                }
            },
            Vendor::Down => (StatusCode::SERVICE_UNAVAILABLE, "down").into_response(),
            Vendor::HugeOk => {
                self.record(&body);
                vec![b'x'; HUGE].into_response()
            }
            Vendor::HugeError => {
                (StatusCode::INTERNAL_SERVER_ERROR, vec![b'x'; HUGE]).into_response()
            }
        }
    }

    fn uuids(&self) -> HashSet<String> {
        self.delivered.uuids()
    }
}

/// A server whose plugins may call loopback and whose exports end after
/// two seconds; a project with a webhook destination to `url`, retried
/// quickly and given up after `max_retry_seconds`.
async fn with_webhook(backend: Backend, url: &str, max_retry_seconds: u64) -> (TestServer, String) {
    let server = TestServer::start_with(backend, |mut config| {
        config.policy.allow_loopback = true;
        config.policy.limits.export_deadline = Duration::from_secs(2);
        config
    })
    .await;
    let created = server
        .upload_and_install("webhook", json!({"url": url}), "open")
        .await;
    let id = created["id"].as_str().unwrap().to_string();
    let (status, body) = server
        .call_api(
            reqwest::Method::PATCH,
            &format!("/plugin-configs/{id}"),
            Some(json!({"delivery": {
                "batch_size": 25, "linger_ms": 20,
                "retry_initial_backoff_ms": 100, "retry_max_backoff_ms": 500,
                "max_retry_seconds": max_retry_seconds,
            }})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    (server, id)
}

async fn capture(server: &TestServer, n: usize) -> HashSet<String> {
    let events: Vec<Value> = (0..n)
        .map(|i| json!({"event": "order", "distinct_id": format!("u{i}"), "uuid": uuid::Uuid::now_v7().to_string()}))
        .collect();
    let (status, body) = server.capture_batch(Value::Array(events.clone())).await;
    assert_eq!(status, 200, "{body}");
    events
        .iter()
        .map(|e| e["uuid"].as_str().unwrap().to_string())
        .collect()
}

async fn destination(server: &TestServer, id: &str) -> Value {
    let (status, view) = server
        .call_api(reqwest::Method::GET, &format!("/destinations/{id}"), None)
        .await;
    assert_eq!(status, 200, "{view}");
    view
}

/// Waits until the destination's outbox is empty; its view.
async fn drained(server: &TestServer, id: &str) -> Value {
    wait_until("the outbox to drain", || async {
        let view = destination(server, id).await;
        (view["stats"]["pending"] == 0 && view["stats"]["retrying"] == 0).then_some(view)
    })
    .await
}

async fn a_vendor_that_hangs_past_the_export_deadline_is_retried_until_it_answers(
    backend: Backend,
) {
    let (vendor, url) = FakeVendor::start(Vendor::Hangs);
    let (server, id) = with_webhook(backend, &url, 3600).await;
    let sent = capture(&server, 100).await;
    wait_until("attempts cut off at the export deadline", || async {
        let view = destination(&server, &id).await;
        (view["stats"]["failed_attempts"].as_i64().unwrap_or(0) >= 2).then_some(())
    })
    .await;
    assert!(vendor.uuids().is_empty());
    vendor.set(Vendor::Up);
    wait_until("every event at the vendor", || async {
        vendor.uuids().is_superset(&sent).then_some(())
    })
    .await;
    let view = drained(&server, &id).await;
    assert_eq!(view["stats"]["dead_lettered"], 0, "{view}");
    let error = view["stats"]["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("timed out") || error.contains("deadline"),
        "{view}"
    );
}

async fn a_flapping_vendor_gets_every_event_and_nothing_is_dead_lettered(backend: Backend) {
    let (vendor, url) = FakeVendor::start(Vendor::Flaps);
    let (server, id) = with_webhook(backend, &url, 3600).await;
    let sent = capture(&server, 500).await;
    wait_until("every event at the vendor", || async {
        vendor.uuids().is_superset(&sent).then_some(())
    })
    .await;
    let view = drained(&server, &id).await;
    assert_eq!(view["stats"]["dead_lettered"], 0, "{view}");
    assert!(
        view["stats"]["failed_attempts"].as_i64().unwrap() > 0,
        "{view}"
    );
}

async fn a_vendor_down_past_max_retry_seconds_dead_letters_and_replay_delivers(backend: Backend) {
    let (vendor, url) = FakeVendor::start(Vendor::Down);
    let (server, id) = with_webhook(backend, &url, 2).await;
    let sent = capture(&server, 60).await;
    // The batch that kept failing for `max_retry_seconds` is dead-lettered
    // and the destination paused; the rest wait in the outbox.
    let view = wait_until("the destination paused", || async {
        let view = destination(&server, &id).await;
        (view["paused"] == true).then_some(view)
    })
    .await;
    let reason = view["paused_reason"].as_str().unwrap();
    assert!(
        reason.contains("after 2s of retries") && reason.contains("503"),
        "{view}"
    );
    let (status, body) = server
        .call_api(reqwest::Method::GET, "/dead-letters?limit=100", None)
        .await;
    assert_eq!(status, 200, "{body}");
    let letters = body["results"].as_array().unwrap().clone();
    assert!(!letters.is_empty(), "{view}");
    for letter in &letters {
        assert!(
            letter["error"].as_str().unwrap().contains("503"),
            "{letter}"
        );
        assert!(sent.contains(letter["event_uuid"].as_str().unwrap()));
    }
    assert!(
        vendor.uuids().is_empty(),
        "nothing both dead-lettered and delivered"
    );

    // The vendor is back: resume, replay, and every event arrives.
    vendor.set(Vendor::Up);
    let (status, body) = server
        .call_api(
            reqwest::Method::POST,
            &format!("/destinations/{id}/resume"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = server
        .call_api(
            reqwest::Method::POST,
            "/dead-letters/replay",
            Some(json!({"plugin_config_id": id})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["replayed"], letters.len());
    wait_until("every event at the vendor", || async {
        (vendor.uuids() == sent).then_some(())
    })
    .await;
    let view = drained(&server, &id).await;
    assert_eq!(view["stats"]["dead_lettered"], 0, "{view}");
    let (_, body) = server
        .call_api(reqwest::Method::GET, "/dead-letters", None)
        .await;
    assert_eq!(body["results"], json!([]));
}

async fn a_vendor_answering_huge_bodies_is_judged_by_its_status(backend: Backend) {
    // A 2xx with a body past the host's limit: delivered, once.
    let (vendor, url) = FakeVendor::start(Vendor::HugeOk);
    let (server, id) = with_webhook(backend, &url, 3600).await;
    let sent = capture(&server, 50).await;
    let view = wait_until("the batch delivered", || async {
        let view = destination(&server, &id).await;
        (view["stats"]["delivered"] == 50).then_some(view)
    })
    .await;
    assert_eq!(view["stats"]["dead_lettered"], 0, "{view}");
    assert_eq!(vendor.uuids(), sent);
    assert!(vendor.delivered.each_once(), "a huge 2xx is not retried");
    // A 5xx with a huge body: retried as a 5xx, delivered once it recovers.
    vendor.set(Vendor::HugeError);
    vendor.delivered.clear();
    let sent = capture(&server, 50).await;
    wait_until("retries of the huge 500s", || async {
        let view = destination(&server, &id).await;
        (view["stats"]["failed_attempts"].as_i64().unwrap_or(0) >= 2).then_some(())
    })
    .await;
    vendor.set(Vendor::Up);
    wait_until("every event at the vendor", || async {
        vendor.uuids().is_superset(&sent).then_some(())
    })
    .await;
    let view = drained(&server, &id).await;
    assert_eq!(view["stats"]["dead_lettered"], 0, "{view}");
    assert!(
        view["stats"]["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("500"),
        "{view}"
    );
}

on_both_backends!(
    a_vendor_that_hangs_past_the_export_deadline_is_retried_until_it_answers,
    a_flapping_vendor_gets_every_event_and_nothing_is_dead_lettered,
    a_vendor_down_past_max_retry_seconds_dead_letters_and_replay_delivers,
    a_vendor_answering_huge_bodies_is_judged_by_its_status,
);
