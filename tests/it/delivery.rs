//! Delivery end to end: events captured by the real server reach a local
//! receiver through the webhook destination, across an outage, permanent
//! errors with dead letters and replay, automatic pause and resume, a
//! SIGKILL mid-delivery on both backends, and scheduled tasks that run once
//! per fire across processes.

use crate::common;
use crate::common::process;
use crate::common::server::wait_until;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use common::postgres::TestDatabase;
use process::{ServerProcess, Target, create_project_on};
use serde_json::{Value, json};
use sluice::runtime::Policy;
use sluice::server::ServeConfig;
use sluice::store::Backend;

/// A reply the receiver gives: status and an optional Retry-After.
type Reply = (u16, Option<&'static str>);

#[derive(Default)]
struct ReceiverState {
    /// Replies to give, in order; 200 once they run out.
    script: VecDeque<Reply>,
    /// Uuids of every event in a request answered 200, in arrival order.
    delivered: Vec<String>,
    /// Every request: when it arrived and the status it got.
    requests: Vec<(Instant, u16)>,
    /// How long each request takes, to keep deliveries in flight.
    delay: Duration,
}

/// A webhook receiver that can fail on script. `/hook` takes batches;
/// `/gone` always answers 404.
#[derive(Clone, Default)]
struct Receiver {
    state: Arc<Mutex<ReceiverState>>,
}

impl Receiver {
    fn start(&self) -> String {
        let me = self.clone();
        let router = axum::Router::new()
            .route(
                "/hook",
                axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                    let me = me.clone();
                    async move { me.take(headers, body).await }
                }),
            )
            .route(
                "/gone",
                axum::routing::post(|| async { (StatusCode::NOT_FOUND, "no such hook") }),
            );
        format!("http://{}", common::serve(router))
    }

    async fn take(&self, headers: HeaderMap, body: Bytes) -> axum::response::Response {
        let delay = self.state.lock().unwrap().delay;
        tokio::time::sleep(delay).await;
        let mut state = self.state.lock().unwrap();
        let (status, retry_after) = state.script.pop_front().unwrap_or((200, None));
        state.requests.push((Instant::now(), status));
        if status == 200 {
            let records: Vec<Value> = serde_json::from_slice(&body).expect("a JSON array");
            let ids: Vec<String> = records
                .iter()
                .map(|r| r["uuid"].as_str().unwrap().to_string())
                .collect();
            // The header lets a receiver de-duplicate without parsing.
            assert_eq!(headers["x-sluice-event-ids"], ids.join(",").as_str());
            state.delivered.extend(ids);
        }
        let mut response = axum::response::Response::new(axum::body::Body::from("receiver"));
        *response.status_mut() = StatusCode::from_u16(status).unwrap();
        if let Some(after) = retry_after {
            response
                .headers_mut()
                .insert("retry-after", after.parse().unwrap());
        }
        response
    }

    fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.state.lock().unwrap().script.extend(replies);
    }

    fn delivered(&self) -> HashSet<String> {
        self.state
            .lock()
            .unwrap()
            .delivered
            .iter()
            .cloned()
            .collect()
    }

    fn requests(&self) -> Vec<(Instant, u16)> {
        self.state.lock().unwrap().requests.clone()
    }
}

/// A client of one project's API.
struct Api {
    base: String,
    project_id: String,
    key: String,
    token: String,
    client: reqwest::Client,
}

impl Api {
    fn new(base: &str, project: &Value) -> Api {
        Api {
            base: base.to_string(),
            project_id: project["project_id"].as_str().unwrap().into(),
            key: project["api_key"].as_str().unwrap().into(),
            token: project["capture_token"].as_str().unwrap().into(),
            client: reqwest::Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api/projects/{}{path}", self.base, self.project_id)
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> (u16, Value) {
        let response = request.bearer_auth(&self.key).send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn get(&self, path: &str) -> Value {
        let (status, body) = self.send(self.client.get(self.url(path))).await;
        assert_eq!(status, 200, "{body}");
        body
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(
            self.client
                .post(self.url(path))
                .header("content-type", "application/json")
                .body(body.to_string()),
        )
        .await
    }

    async fn patch(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(
            self.client
                .patch(self.url(path))
                .header("content-type", "application/json")
                .body(body.to_string()),
        )
        .await
    }

    /// Uploads a built plugin and installs it; returns the install's id.
    async fn install(&self, plugin: &str, config: Value, delivery: Value) -> String {
        let (status, uploaded) = self
            .send(
                self.client
                    .post(self.url("/plugins"))
                    .body(common::wasm(plugin)),
            )
            .await;
        assert_eq!(status, 201, "{uploaded}");
        let (status, created) = self
            .post(
                "/plugin-configs",
                json!({"plugin_sha256": uploaded["sha256"], "config": config, "delivery": delivery}),
            )
            .await;
        assert_eq!(status, 201, "{created}");
        created["id"].as_str().unwrap().to_string()
    }

    /// Captures `n` new events in batches of 500; returns their uuids.
    async fn capture(&self, n: usize) -> HashSet<String> {
        let mut uuids = HashSet::new();
        let events: Vec<Value> = (0..n)
            .map(|i| {
                let uuid = uuid::Uuid::now_v7().to_string();
                uuids.insert(uuid.clone());
                json!({"event": "order", "distinct_id": format!("user-{}", i % 37), "uuid": uuid, "properties": {"n": i}})
            })
            .collect();
        for batch in events.chunks(500) {
            let response = self
                .client
                .post(format!("{}/batch/", self.base))
                .body(json!({"api_key": self.token, "batch": batch}).to_string())
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
        }
        uuids
    }

    async fn destination(&self, id: &str) -> Value {
        self.get(&format!("/destinations/{id}")).await
    }
}

/// An in-process server whose plugins may call loopback receivers.
struct TestServer {
    api: Api,
    _server: common::server::TestServer,
}

async fn start(backend: Backend) -> TestServer {
    let server = common::server::TestServer::start_with(backend, |config| ServeConfig {
        policy: Policy {
            allow_loopback: true,
            ..Policy::default()
        },
        ..config
    })
    .await;
    let project = json!({
        "project_id": server.project.project_id,
        "capture_token": server.project.capture_token,
        "api_key": server.project.api_key,
    });
    TestServer {
        api: Api::new(&server.base, &project),
        _server: server,
    }
}

/// Quick retries, so an outage of a few failed requests passes in seconds.
fn fast_retries(batch_size: u32) -> Value {
    json!({
        "batch_size": batch_size,
        "linger_ms": 50,
        "retry_initial_backoff_ms": 50,
        "retry_max_backoff_ms": 400,
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn every_event_of_a_10k_run_arrives_through_an_outage_of_500s_then_429s() {
    let server = start(Backend::Sqlite).await;
    let api = &server.api;
    let receiver = Receiver::default();
    let base = receiver.start();
    // Down for a while, then rate limited with a requested wait, then fine.
    receiver.script((0..6).map(|_| (500, None)));
    receiver.script((0..3).map(|_| (429, Some("1"))));
    let id = api
        .install(
            "webhook",
            json!({"url": format!("{base}/hook")}),
            fast_retries(500),
        )
        .await;

    let sent = api.capture(10_000).await;
    wait_until("every event at the receiver", || async {
        (receiver.delivered().is_superset(&sent)).then_some(())
    })
    .await;
    let stats = wait_until("the outbox to drain", || async {
        let view = api.destination(&id).await;
        (view["stats"]["pending"] == 0 && view["stats"]["retrying"] == 0).then_some(view)
    })
    .await;

    assert_eq!(stats["stats"]["delivered"], 10_000);
    assert_eq!(stats["stats"]["dead_lettered"], 0);
    assert_eq!(stats["stats"]["dead_lettered_total"], 0);
    assert_eq!(stats["stats"]["failed_attempts"], 9);
    assert_eq!(stats["stats"]["consecutive_failures"], 0);
    assert!(
        stats["stats"]["last_error"]
            .as_str()
            .unwrap()
            .contains("429"),
        "{stats}"
    );
    let attempts = stats["recent_attempts"].as_array().unwrap();
    let retried: Vec<i64> = attempts
        .iter()
        .filter(|a| a["outcome"] == "retrying")
        .map(|a| a["status_code"].as_i64().unwrap())
        .collect();
    assert_eq!(retried.iter().filter(|s| **s == 500).count(), 6);
    assert_eq!(retried.iter().filter(|s| **s == 429).count(), 3);
    assert!(
        attempts
            .iter()
            .all(|a| a["latency_ms"].is_i64() && a["at"].is_string())
    );
    let dead = api.get("/dead-letters").await;
    assert_eq!(dead["results"], json!([]));

    // Retry-After is a floor: no request came sooner after a 429.
    let requests = receiver.requests();
    for pair in requests.windows(2) {
        if pair[0].1 == 429 {
            assert!(
                pair[1].0 - pair[0].0 >= Duration::from_secs(1),
                "a retry came before the Retry-After of 1s had passed"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn permanent_errors_go_to_dead_letters_and_replay_delivers_them_after_the_fix() {
    let server = start(Backend::Sqlite).await;
    let api = &server.api;
    let receiver = Receiver::default();
    let base = receiver.start();
    let id = api
        .install(
            "webhook",
            json!({"url": format!("{base}/gone")}),
            fast_retries(10),
        )
        .await;
    let sent = api.capture(30).await;

    let letters = wait_until("30 dead letters", || async {
        let letters = api.get("/dead-letters").await["results"]
            .as_array()
            .unwrap()
            .clone();
        (letters.len() == 30).then_some(letters)
    })
    .await;
    for letter in &letters {
        assert_eq!(letter["stage"], "delivery");
        assert_eq!(letter["plugin_config_id"], id.as_str());
        assert!(
            letter["error"].as_str().unwrap().contains("404"),
            "{letter}"
        );
        assert_eq!(letter["event"]["uuid"], letter["event_uuid"]);
    }
    let lettered: HashSet<String> = letters
        .iter()
        .map(|l| l["event_uuid"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(lettered, sent);
    let view = api.destination(&id).await;
    assert_eq!(view["stats"]["dead_lettered"], 30);
    assert_eq!(view["stats"]["delivered"], 0);
    assert_eq!(view["paused"], false, "three dead batches do not pause");
    assert!(receiver.delivered().is_empty());

    // Fix the config, then replay one letter by id, then the rest by
    // destination.
    let (status, body) = api
        .patch(
            &format!("/plugin-configs/{id}"),
            json!({"config": {"url": format!("{base}/hook")}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let first = letters[0]["id"].as_i64().unwrap();
    let (status, body) = api
        .post("/dead-letters/replay", json!({"ids": [first]}))
        .await;
    assert_eq!(
        (status, body),
        (200, json!({"replayed": 1, "remaining": 0}))
    );
    let (status, body) = api
        .post("/dead-letters/replay", json!({"plugin_config_id": id}))
        .await;
    assert_eq!(
        (status, body),
        (200, json!({"replayed": 29, "remaining": 0}))
    );

    wait_until("the replayed events at the receiver", || async {
        (receiver.delivered() == sent).then_some(())
    })
    .await;
    assert_eq!(api.get("/dead-letters").await["results"], json!([]));
    let view = wait_until("the delivered count", || async {
        let view = api.destination(&id).await;
        (view["stats"]["delivered"] == 30).then_some(view)
    })
    .await;
    assert_eq!(view["stats"]["dead_lettered"], 0);
    assert_eq!(view["stats"]["dead_lettered_total"], 30);

    // A replay request must say which letters.
    let (status, body) = api
        .post("/dead-letters/replay", json!({"all": true, "ids": [1]}))
        .await;
    assert_eq!(status, 400);
    assert!(body["detail"].as_str().unwrap().contains("exactly one"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_destination_that_keeps_failing_is_paused_keeps_its_events_and_resumes_by_api() {
    let server = start(Backend::Sqlite).await;
    let api = &server.api;
    let receiver = Receiver::default();
    let base = receiver.start();
    let id = api
        .install(
            "webhook",
            json!({"url": format!("{base}/gone")}),
            fast_retries(5),
        )
        .await;
    api.capture(25).await;
    let view = wait_until("the destination to pause", || async {
        let view = api.destination(&id).await;
        (view["paused"] == true).then_some(view)
    })
    .await;
    let reason = view["paused_reason"].as_str().unwrap();
    assert!(
        reason.contains("5 batches in a row went to dead letters") && reason.contains("404"),
        "{reason}"
    );
    assert_eq!(view["stats"]["dead_lettered"], 25);

    // While paused, new events wait in the outbox.
    let waiting = api.capture(7).await;
    let view = wait_until("events pending in the outbox", || async {
        let view = api.destination(&id).await;
        (view["stats"]["pending"] == 7).then_some(view)
    })
    .await;
    assert_eq!(view["stats"]["dead_lettered"], 25);

    let (status, _) = api
        .patch(
            &format!("/plugin-configs/{id}"),
            json!({"config": {"url": format!("{base}/hook")}}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, resumed) = api
        .post(&format!("/destinations/{id}/resume"), json!({}))
        .await;
    assert_eq!(status, 200, "{resumed}");
    assert_eq!(resumed["paused"], false);
    assert_eq!(resumed["paused_reason"], Value::Null);
    wait_until("the waiting events at the receiver", || async {
        (receiver.delivered() == waiting).then_some(())
    })
    .await;

    // Pausing by hand holds events back too.
    let (status, paused) = api
        .post(&format!("/destinations/{id}/pause"), json!({}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(paused["paused_reason"], "paused through the API");
    // A pause takes effect with its answer: no lane leases a batch after it.
    api.capture(3).await;
    wait_until("events held while paused", || async {
        let view = api.destination(&id).await;
        (view["stats"]["pending"] == 3).then_some(())
    })
    .await;
    assert_eq!(receiver.delivered().len(), 7);
}

#[tokio::test(flavor = "multi_thread")]
async fn delivery_settings_are_checked_and_name_the_bad_field() {
    let server = start(Backend::Sqlite).await;
    let api = &server.api;
    let (status, uploaded) = api
        .send(
            api.client
                .post(api.url("/plugins"))
                .body(common::wasm("webhook")),
        )
        .await;
    assert_eq!(status, 201);
    for (delivery, field) in [
        (json!({"batch_size": 0}), "delivery.batch_size"),
        (json!({"concurrency": 1000}), "delivery.concurrency"),
        (
            json!({"max_batches_per_second": -1.0}),
            "delivery.max_batches_per_second",
        ),
        (json!({"batch_sise": 10}), "batch_sise"),
    ] {
        let (status, body) = api
            .post(
                "/plugin-configs",
                json!({"plugin_sha256": uploaded["sha256"], "config": {"url": "http://127.0.0.1:9/x"}, "delivery": delivery}),
            )
            .await;
        assert_eq!(status, 400, "{body}");
        assert!(
            body["detail"].as_str().unwrap().contains(field),
            "{field}: {body}"
        );
    }
}

/// Kills the server while batches are in flight to a slow receiver; after a
/// restart every event is delivered (some perhaps twice) and none is lost.
async fn a_sigkill_during_delivery_loses_no_event(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let database = match backend {
        Backend::Postgres => Some(TestDatabase::create().await),
        Backend::Sqlite => None,
    };
    let target = match &database {
        Some(database) => Target::Postgres(database.url.clone()),
        None => Target::Sqlite(dir.path().join("data")),
    };
    let config_file = dir.path().join("sluice.toml");
    std::fs::write(&config_file, "[plugins]\nallow_loopback = true\n").unwrap();
    let config_arg = config_file.display().to_string();
    let args = ["--config", config_arg.as_str(), "--lease-seconds", "2"];

    let receiver = Receiver::default();
    receiver.state.lock().unwrap().delay = Duration::from_millis(100);
    let base = receiver.start();
    let server = ServerProcess::start_on(&target, &args).await;
    let project = create_project_on(&target);
    let api = Api::new(&server.base, &project);
    let id = api
        .install(
            "webhook",
            json!({"url": format!("{base}/hook")}),
            json!({"batch_size": 20, "linger_ms": 10, "concurrency": 2}),
        )
        .await;
    let sent = api.capture(2_000).await;
    wait_until("deliveries under way", || async {
        (receiver.delivered().len() >= 100).then_some(())
    })
    .await;
    server.kill();
    let before = receiver.delivered().len();
    assert!(
        before < sent.len(),
        "the kill came too late to test anything"
    );

    let restarted = ServerProcess::start_on(&target, &args).await;
    let api = Api::new(&restarted.base, &project);
    wait_until("every event at the receiver", || async {
        receiver.delivered().is_superset(&sent).then_some(())
    })
    .await;
    let view = wait_until("an empty outbox", || async {
        let view = api.destination(&id).await;
        (view["stats"]["pending"] == 0 && view["stats"]["retrying"] == 0).then_some(view)
    })
    .await;
    assert_eq!(view["stats"]["dead_lettered"], 0);
    // Duplicates are allowed (at least once) and carry the same uuid.
    let mut counts: HashMap<String, usize> = HashMap::new();
    for uuid in receiver.state.lock().unwrap().delivered.iter() {
        *counts.entry(uuid.clone()).or_default() += 1;
    }
    assert_eq!(
        counts.keys().cloned().collect::<HashSet<_>>(),
        sent,
        "only captured events arrive"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_a_sigkill_during_delivery_loses_no_event() {
    a_sigkill_during_delivery_loses_no_event(Backend::Sqlite).await
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_a_sigkill_during_delivery_loses_no_event() {
    a_sigkill_during_delivery_loses_no_event(Backend::Postgres).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_scheduled_task_runs_once_per_fire_across_two_processes() {
    let database = TestDatabase::create().await;
    let target = Target::Postgres(database.url.clone());
    let first = ServerProcess::start_on(&target, &[]).await;
    let second = ServerProcess::start_on(&target, &[]).await;
    let project = create_project_on(&target);
    let api = Api::new(&first.base, &project);
    let id = api.install("ticker", json!({}), json!({})).await;

    let logs = wait_until("five runs of the task", || async {
        let logs = api.get(&format!("/plugin-configs/{id}/logs")).await["results"]
            .as_array()
            .unwrap()
            .clone();
        let finished: Vec<String> = logs
            .iter()
            .filter_map(|l| l["message"].as_str())
            .filter(|m| m.starts_with("scheduled task `tick`") && m.ends_with("finished"))
            .map(str::to_string)
            .collect();
        (finished.len() >= 5).then_some((logs, finished))
    })
    .await;
    let (all, finished) = logs;
    let unique: HashSet<&String> = finished.iter().collect();
    assert_eq!(
        unique.len(),
        finished.len(),
        "a fire ran twice: {finished:?}"
    );
    assert!(
        all.iter()
            .any(|l| l["message"] == "tick from task tick" && l["level"] == "info"),
        "the task's own log line is kept"
    );
    drop(second);
}
