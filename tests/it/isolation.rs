//! Tenant isolation: one project's plugins and traffic, however hostile,
//! cost that project its own quotas and leave other projects alone. Each
//! test plays one attack from the first project (`server.project`) while
//! the second (`server.other`) uses the server as usual.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use reqwest::Method;
use serde_json::{Value, json};
use sluice::runtime::Policy;
use sluice::server::ServeConfig;
use sluice::store::{Backend, Claim, CreatedProject, QueuedEvent};

use crate::common::postgres::TestStore;
use crate::common::server::{TestServer, wait_until};

/// PostHog batch capture with `project`'s token; the status.
async fn capture_as(server: &TestServer, project: &CreatedProject, events: Value) -> u16 {
    server.capture_batch_as(project, events).await.0
}

fn events(prefix: &str, n: usize) -> Value {
    Value::Array(
        (0..n)
            .map(|i| json!({"event": format!("{prefix} {i}"), "distinct_id": format!("{prefix}-user")}))
            .collect(),
    )
}

#[tokio::test]
async fn a_chain_that_multiplies_events_dead_letters_the_input_and_spares_other_projects() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let server = TestServer::start(backend).await;
        // Three links that each make 100 events of one: 10^6 without a
        // total, over the default quota of 1,000 at the second link.
        for _ in 0..3 {
            server
                .upload_and_install("splitter", json!({"copies": 99}), "open")
                .await;
        }
        assert_eq!(
            capture_as(&server, &server.project, events("bomb", 1)).await,
            200
        );
        assert_eq!(
            capture_as(&server, &server.other, events("calm", 5)).await,
            200
        );

        server.wait_events_of(&server.other, 5).await;
        let letters = wait_until("the bomb to be dead-lettered", || async {
            let (status, body) = server.call_api(Method::GET, "/dead-letters", None).await;
            assert_eq!(status, 200, "{body}");
            let results = body["results"].as_array().unwrap().clone();
            (!results.is_empty()).then_some(results)
        })
        .await;
        assert_eq!(letters.len(), 1, "{letters:?}");
        let error = letters[0]["error"].as_str().unwrap();
        assert!(error.contains("`events_per_input` (1000)"), "{error}");
        assert_eq!(
            letters[0]["event"]["event"], "bomb 0",
            "the input as captured"
        );
        let (_, stored) = server.call_api(Method::GET, "/events", None).await;
        assert_eq!(stored["results"], json!([]), "none of the copies is stored");
        // Going over the total is not the plugins' failure.
        let (_, configs) = server.call_api(Method::GET, "/plugin-configs", None).await;
        for config in configs["results"].as_array().unwrap() {
            assert_eq!(config["enabled"], true, "{config}");
            assert_eq!(config["consecutive_failures"], 0, "{config}");
        }
    }
}

#[tokio::test]
async fn a_link_that_keeps_running_near_its_deadline_is_disabled_like_a_failing_one() {
    let server = TestServer::start(Backend::Sqlite).await;
    // 60 ms of its 100 ms deadline on every event: never a timeout.
    let slow = server
        .upload_and_install("slow-link", json!({"ms": 60}), "open")
        .await;
    assert_eq!(
        capture_as(&server, &server.project, events("slow", 12)).await,
        200
    );
    let reason = wait_until("the slow link to be disabled", || async {
        let config = server
            .plugin_config_view(slow["id"].as_str().unwrap())
            .await;
        config["disabled_reason"].as_str().map(str::to_string)
    })
    .await;
    assert!(reason.contains("near their deadline"), "{reason}");
    // Every event was kept: slow is not wrong.
    server.wait_events_of(&server.project, 12).await;
}

#[tokio::test]
async fn the_chain_has_one_time_budget_per_event_across_its_links() {
    let server = TestServer::start(Backend::Sqlite).await;
    server
        .set_quotas(&server.project, json!({"chain_time_ms": 100}))
        .await;
    server
        .upload_and_install("slow-link", json!({"ms": 70}), "open")
        .await;
    let second = server
        .upload_and_install("slow-link", json!({"ms": 70}), "open")
        .await;
    assert_eq!(
        capture_as(&server, &server.project, events("timed", 1)).await,
        200
    );
    // The second link gets what the first left, about 30 ms, and is
    // stopped there; fail-open passes the event on.
    server.wait_events_of(&server.project, 1).await;
    let logs = wait_until("the second link's error to be logged", || async {
        let (_, logs) = server
            .call_api(
                Method::GET,
                &format!("/plugin-configs/{}/logs", second["id"].as_str().unwrap()),
                None,
            )
            .await;
        let lines: Vec<String> = logs["results"]
            .as_array()?
            .iter()
            .filter_map(|l| l["message"].as_str().map(str::to_string))
            .collect();
        (!lines.is_empty()).then_some(lines)
    })
    .await;
    assert!(
        logs.iter()
            .any(|line| line.contains("quota `chain_time_ms`, 100 ms")),
        "{logs:?}"
    );
}

fn queued(name: &str) -> QueuedEvent {
    QueuedEvent {
        uuid: uuid::Uuid::new_v4().to_string(),
        event: name.into(),
        distinct_id: "user".into(),
        timestamp: "2026-01-01T00:00:00.000Z".into(),
        received_at: "2026-01-01T00:00:00.000Z".into(),
        properties: Default::default(),
    }
}

#[tokio::test]
async fn one_claim_takes_a_slice_of_every_waiting_project_however_long_one_backlog_is() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let test_store = TestStore::create(backend).await;
        let store = test_store.open().await;
        let flood = store.create_project("flood").await.unwrap();
        let calm = store.create_project("calm").await.unwrap();
        let backlog: Vec<QueuedEvent> = (0..3_000).map(|_| queued("flood")).collect();
        store.enqueue(&flood.project_id, &backlog).await.unwrap();
        let late: Vec<QueuedEvent> = (0..5).map(|_| queued("calm")).collect();
        store.enqueue(&calm.project_id, &late).await.unwrap();

        let claim = Claim {
            limit: 500,
            lease: std::time::Duration::from_secs(30),
            ..Claim::default()
        };
        let claimed = store.claim("worker", &claim).await.unwrap();
        let calm_rows = claimed
            .iter()
            .filter(|row| row.project_id == calm.project_id)
            .count();
        assert_eq!(
            calm_rows, 5,
            "the calm project's events come in the first batch"
        );
        let flood_rows = claimed.len() - calm_rows;
        assert!(
            (1..=250).contains(&flood_rows),
            "the flood gets its half of the batch, not all of it: {flood_rows}"
        );
        store.close().await;
    }
}

/// The healthy neighbour: `server.other`, with a chain of three
/// first-party transformations and a webhook destination to a local
/// receiver, sending a batch every 50 ms while an attack runs.
struct Neighbour {
    sent: Arc<Mutex<HashSet<String>>>,
    refused: Arc<Mutex<Vec<u16>>>,
    delivered: Arc<Mutex<HashSet<String>>>,
    stop: tokio::sync::watch::Sender<bool>,
    stream: tokio::task::JoinHandle<()>,
}

impl Neighbour {
    async fn start(server: &TestServer) -> Neighbour {
        let other = &server.other;
        server
            .upload_and_install_as(
                other,
                "property-renamer",
                json!({"properties": {"plan": "tier"}}),
                "open",
            )
            .await;
        server
            .upload_and_install_as(other, "pii-scrubber", json!({"drop": ["password"]}), "open")
            .await;
        server
            .upload_and_install_as(other, "url-parser", json!({}), "open")
            .await;
        let delivered = Arc::new(Mutex::new(HashSet::new()));
        let receiver = {
            let delivered = delivered.clone();
            axum::Router::new().route(
                "/hook",
                axum::routing::post(move |body: axum::body::Bytes| {
                    let delivered = delivered.clone();
                    async move {
                        let records: Vec<Value> = serde_json::from_slice(&body).unwrap();
                        let mut delivered = delivered.lock().unwrap();
                        for record in records {
                            delivered.insert(record["uuid"].as_str().unwrap().to_string());
                        }
                        "ok"
                    }
                }),
            )
        };
        let url = format!("http://{}/hook", crate::common::serve(receiver));
        server
            .upload_and_install_as(other, "webhook", json!({"url": url}), "open")
            .await;

        let sent = Arc::new(Mutex::new(HashSet::new()));
        let refused = Arc::new(Mutex::new(Vec::new()));
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let stream = {
            let (client, base, token) = (
                server.client.clone(),
                server.base.clone(),
                other.capture_token.clone(),
            );
            let (sent, refused) = (sent.clone(), refused.clone());
            tokio::spawn(async move {
                while !*stopped.borrow() {
                    let batch: Vec<Value> = (0..20)
                        .map(|i| {
                            json!({
                                "event": "$pageview",
                                "distinct_id": format!("neighbour-{i}"),
                                "uuid": uuid::Uuid::new_v4().to_string(),
                                "properties": {
                                    "plan": "pro",
                                    "password": "hunter2",
                                    "$current_url": "https://shop.example/cart?item=7",
                                },
                            })
                        })
                        .collect();
                    let response = client
                        .post(format!("{base}/batch/"))
                        .header("content-type", "application/json")
                        .body(json!({"api_key": token, "batch": batch}).to_string())
                        .send()
                        .await
                        .unwrap();
                    let status = response.status().as_u16();
                    if status == 200 {
                        sent.lock().unwrap().extend(
                            batch
                                .iter()
                                .map(|e| e["uuid"].as_str().unwrap().to_string()),
                        );
                    } else {
                        refused.lock().unwrap().push(status);
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(std::time::Duration::from_millis(50)) => {}
                        _ = stopped.changed() => {}
                    }
                }
            })
        };
        Neighbour {
            sent,
            refused,
            delivered,
            stop,
            stream,
        }
    }

    /// Stops sending and checks that the neighbour never noticed the
    /// attack: every batch accepted, every event stored and delivered,
    /// every plugin config still enabled. Reports the server's memory.
    async fn finish(self, server: &TestServer, attack: &str) {
        let _ = self.stop.send(true);
        self.stream.await.unwrap();
        let refused = self.refused.lock().unwrap().clone();
        assert!(
            refused.is_empty(),
            "{attack}: the neighbour's capture was refused: {refused:?}"
        );
        let sent = self.sent.lock().unwrap().clone();
        assert!(!sent.is_empty(), "{attack}: the neighbour sent nothing");
        let delivered = self.delivered.clone();
        wait_until(
            &format!(
                "{attack}: the neighbour's {} events to be delivered",
                sent.len()
            ),
            || async { delivered.lock().unwrap().is_superset(&sent).then_some(()) },
        )
        .await;
        let (status, configs) = server
            .call_api_as(&server.other, Method::GET, "/plugin-configs", None)
            .await;
        assert_eq!(status, 200, "{configs}");
        for config in configs["results"].as_array().unwrap() {
            assert_eq!(config["enabled"], true, "{attack}: {config}");
            assert_eq!(config["disabled_reason"], Value::Null, "{attack}: {config}");
        }
        println!(
            "{attack}: the neighbour had {} events stored and delivered; server RSS {} MiB",
            sent.len(),
            rss_mib()
        );
    }
}

/// This process's resident memory: the server runs in it.
fn rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| {
            value
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kib| kib / 1024)
}

/// A server whose plugins may call the neighbour's loopback receiver.
async fn start(backend: Backend) -> TestServer {
    TestServer::start_with(backend, |config| ServeConfig {
        policy: Policy {
            allow_loopback: true,
            ..Policy::default()
        },
        ..config
    })
    .await
}

async fn a_multiplying_chain_leaves_the_neighbour_alone(backend: Backend) {
    let server = start(backend).await;
    let neighbour = Neighbour::start(&server).await;
    for _ in 0..4 {
        server
            .upload_and_install("splitter", json!({"copies": 99}), "open")
            .await;
    }
    for round in 0..20 {
        assert_eq!(
            capture_as(
                &server,
                &server.project,
                events(&format!("bomb {round}"), 5)
            )
            .await,
            200
        );
    }
    let letters = wait_until("every bomb to be dead-lettered", || async {
        let (_, body) = server
            .call_api(Method::GET, "/dead-letters?limit=1000", None)
            .await;
        let results = body["results"].as_array().unwrap().clone();
        (results.len() == 100).then_some(results)
    })
    .await;
    assert!(
        letters.iter().all(|l| l["error"]
            .as_str()
            .unwrap()
            .contains("quota `events_per_input`")),
        "{letters:?}"
    );
    neighbour.finish(&server, "a multiplying chain").await;
}

async fn a_slow_chain_is_disabled_and_leaves_the_neighbour_alone(backend: Backend) {
    let server = start(backend).await;
    let neighbour = Neighbour::start(&server).await;
    // Four links each just inside their deadline: 380 ms an event without
    // a single failure, were nothing counted.
    let mut links = Vec::new();
    for _ in 0..4 {
        links.push(
            server
                .upload_and_install("slow-link", json!({"ms": 95}), "open")
                .await,
        );
    }
    for round in 0..8 {
        assert_eq!(
            capture_as(
                &server,
                &server.project,
                events(&format!("slow {round}"), 5)
            )
            .await,
            200
        );
    }
    wait_until("the slow links to be disabled", || async {
        let (_, configs) = server.call_api(Method::GET, "/plugin-configs", None).await;
        configs["results"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["enabled"] == false)
            .then_some(())
    })
    .await;
    server.wait_events_of(&server.project, 40).await;
    neighbour.finish(&server, "a slow chain").await;
}

async fn plugin_configs_over_the_quota_are_refused_by_name(backend: Backend) {
    let server = start(backend).await;
    server
        .set_quotas(&server.project, json!({"plugin_configs": 3}))
        .await;
    let neighbour = Neighbour::start(&server).await;
    let mut sha = Value::Null;
    for _ in 0..3 {
        sha = server
            .upload_and_install("passthrough", json!({}), "open")
            .await["plugin_sha256"]
            .clone();
    }
    let (status, body) = server
        .call_api(
            Method::POST,
            "/plugin-configs",
            Some(json!({"plugin_sha256": sha, "config": {}})),
        )
        .await;
    assert_eq!(status, 403, "{body}");
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains("quota `plugin_configs` (3)"), "{detail}");
    neighbour.finish(&server, "many plugin configs").await;
}

async fn a_chain_slow_within_every_quota_delays_only_its_project(backend: Backend) {
    let server = start(backend).await;
    let neighbour = Neighbour::start(&server).await;
    // 140 ms an event, each call under half its deadline: no quota stops
    // it, and the batch must still not wait on it.
    for _ in 0..4 {
        server
            .upload_and_install("slow-link", json!({"ms": 35}), "open")
            .await;
    }
    assert_eq!(
        capture_as(&server, &server.project, events("patient", 40)).await,
        200
    );
    server.wait_events_of(&server.project, 40).await;
    neighbour
        .finish(&server, "a chain slow within every quota")
        .await;
}

/// Uploads a built plugin as `project`; the status and the answer.
async fn upload_as(server: &TestServer, project: &CreatedProject, plugin: &str) -> (u16, Value) {
    let response = server
        .client
        .post(format!(
            "{}/api/projects/{}/plugins",
            server.base, project.project_id
        ))
        .bearer_auth(&project.api_key)
        .body(crate::common::wasm(plugin))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (
        status,
        serde_json::from_str(&response.text().await.unwrap()).unwrap(),
    )
}

#[tokio::test]
async fn plugin_uploads_count_against_the_uploading_projects_quota() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let server = TestServer::start(backend).await;
        server
            .set_quotas(&server.project, json!({"plugins": 2}))
            .await;
        for plugin in ["passthrough", "splitter"] {
            let (status, body) = upload_as(&server, &server.project, plugin).await;
            assert_eq!(status, 201, "{body}");
        }
        let (status, body) = upload_as(&server, &server.project, "slow-link").await;
        assert_eq!(status, 403, "{body}");
        let detail = body["detail"].as_str().unwrap();
        assert!(detail.contains("quota `plugins` (2)"), "{detail}");
        // A file it uploaded before counts once, and another project's
        // uploads are its own.
        let (status, body) = upload_as(&server, &server.project, "passthrough").await;
        assert_eq!(status, 201, "{body}");
        let (status, body) = upload_as(&server, &server.other, "slow-link").await;
        assert_eq!(status, 201, "{body}");

        server
            .set_quotas(
                &server.project,
                json!({"plugins": 10, "plugin_bytes": 1000}),
            )
            .await;
        let (status, body) = upload_as(&server, &server.project, "slow-link").await;
        assert_eq!(status, 403, "{body}");
        let detail = body["detail"].as_str().unwrap();
        assert!(detail.contains("quota `plugin_bytes` (1000)"), "{detail}");
    }
}

/// Capture answers seen by a flood: status and body.
type Answers = Arc<Mutex<Vec<(u16, String)>>>;

/// Sends `project`'s batches of `size` events from `clients` clients flat
/// out until `stop`, recording every answer.
fn flood(
    server: &TestServer,
    project: &CreatedProject,
    clients: usize,
    size: usize,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> (Answers, Vec<tokio::task::JoinHandle<()>>) {
    let answers = Answers::default();
    let tasks = (0..clients)
        .map(|_| {
            let (client, url, token, stop, answers) = (
                server.client.clone(),
                format!("{}/batch/", server.base),
                project.capture_token.clone(),
                stop.clone(),
                answers.clone(),
            );
            tokio::spawn(async move {
                while !*stop.borrow() {
                    let batch = events("flood", size);
                    let response = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(json!({"api_key": token, "batch": batch}).to_string())
                        .send()
                        .await
                        .unwrap();
                    let status = response.status().as_u16();
                    let text = response.text().await.unwrap();
                    answers.lock().unwrap().push((status, text));
                }
            })
        })
        .collect();
    (answers, tasks)
}

/// Waits until the flood has been answered `status` with a detail holding
/// `quota`, then stops it; every answer.
async fn flood_until(
    stop: tokio::sync::watch::Sender<bool>,
    answers: Answers,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    status: u16,
    quota: &str,
) -> Vec<(u16, String)> {
    wait_until(
        &format!("the flood to be answered {status} naming {quota}"),
        || async {
            answers
                .lock()
                .unwrap()
                .iter()
                .any(|(s, detail)| *s == status && detail.contains(quota))
                .then_some(())
        },
    )
    .await;
    let _ = stop.send(true);
    for task in tasks {
        task.await.unwrap();
    }
    answers.lock().unwrap().clone()
}

async fn a_capture_flood_is_refused_for_its_own_queue_share_only(backend: Backend) {
    let server = start(backend).await;
    server
        .set_quotas(&server.project, json!({"queued_events": 300}))
        .await;
    // A chain of 20 ms an event: the project's backlog grows whatever
    // the machine, and the worker keeps taking the neighbour's events.
    server
        .upload_and_install("slow-link", json!({"ms": 20}), "open")
        .await;
    let neighbour = Neighbour::start(&server).await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let (answers, tasks) = flood(&server, &server.project, 4, 100, &stopped);
    let answers = flood_until(stop, answers, tasks, 503, "quota `queued_events` (300)").await;
    let refused: Vec<&(u16, String)> = answers.iter().filter(|(s, _)| *s != 200).collect();
    assert!(
        refused
            .iter()
            .all(|(status, _)| *status == 503 || *status == 429),
        "{:?}",
        refused.iter().take(3).collect::<Vec<_>>()
    );
    neighbour.finish(&server, "a capture flood").await;
}

async fn a_request_storm_gets_429_for_its_token_only(backend: Backend) {
    let server = start(backend).await;
    server
        .set_quotas(&server.project, json!({"capture_requests_per_second": 20}))
        .await;
    let neighbour = Neighbour::start(&server).await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let (answers, tasks) = flood(&server, &server.project, 8, 1, &stopped);
    flood_until(
        stop,
        answers,
        tasks,
        429,
        "quota `capture_requests_per_second` (20)",
    )
    .await;
    neighbour.finish(&server, "a request storm").await;
}

async fn heavy_and_slow_bodies_cost_the_neighbour_nothing(backend: Backend) {
    let server = TestServer::start_with(backend, |config| ServeConfig {
        policy: Policy {
            allow_loopback: true,
            ..Policy::default()
        },
        capture_body_timeout: std::time::Duration::from_secs(2),
        ..config
    })
    .await;
    let neighbour = Neighbour::start(&server).await;
    // 19 MiB of JSON that is not an event batch, 10,001 tiny events, a
    // gzip bomb, and bodies sent a byte at a time; each with the
    // project's own token.
    let token = server.project.capture_token.clone();
    let junk = format!(
        "{{\"api_key\":\"{token}\",\"batch\":[{}]}}",
        vec!["[[[[[[[[[[1]]]]]]]]]]"; 900_000].join(",")
    );
    let many = json!({"api_key": token, "batch": events("tiny", 10_001)}).to_string();
    let bomb = {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(format!("{{\"api_key\":\"{token}\",\"batch\":[").as_bytes())
            .unwrap();
        gz.write_all(&vec![b' '; 24 << 20]).unwrap();
        gz.finish().unwrap()
    };
    let mut slow = Vec::new();
    for _ in 0..20 {
        let address = server.base.trim_start_matches("http://").to_string();
        slow.push(tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
            let _ = stream
                .write_all(b"POST /batch/ HTTP/1.1\r\nhost: s\r\ncontent-length: 100000\r\n\r\n{")
                .await;
            for _ in 0..20 {
                if stream.write_all(b" ").await.is_err() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            }
        }));
    }
    for round in 0..4 {
        println!("round {round}: RSS {} MiB", rss_mib());
        for (body, gzip) in [
            (junk.clone().into_bytes(), false),
            (many.clone().into_bytes(), false),
            (bomb.clone(), true),
        ] {
            let mut request = server
                .client
                .post(format!("{}/batch/", server.base))
                .header("content-type", "application/json");
            if gzip {
                request = request.header("content-encoding", "gzip");
            }
            let status = request.body(body).send().await.unwrap().status().as_u16();
            assert!(
                [400, 413].contains(&status),
                "a heavy body is refused as bad input, got {status}"
            );
        }
    }
    for task in slow {
        task.await.unwrap();
    }
    neighbour.finish(&server, "heavy and slow bodies").await;
}

async fn a_key_value_flood_stops_at_its_quota(backend: Backend) {
    let server = start(backend).await;
    server
        .set_quotas(&server.project, json!({"kv_keys_per_config": 50}))
        .await;
    let neighbour = Neighbour::start(&server).await;
    server
        .upload_and_install("kv-counter", json!({}), "open")
        .await;
    // A key per distinct id: 200 keys wanted, 50 allowed.
    let batch: Vec<Value> = (0..200)
        .map(|i| json!({"event": "count me", "distinct_id": format!("kv-{i}")}))
        .collect();
    assert_eq!(
        capture_as(&server, &server.project, Value::Array(batch)).await,
        200
    );
    let stored = server.wait_events_of(&server.project, 200).await;
    let refused: Vec<&str> = stored
        .iter()
        .filter_map(|e| e["properties"]["kv_error"].as_str())
        .collect();
    assert_eq!(refused.len(), 150, "every key past the quota is refused");
    assert!(
        refused[0].contains("`kv_keys_per_config` (50)"),
        "{}",
        refused[0]
    );
    neighbour.finish(&server, "a key-value flood").await;
}

async fn hanging_destinations_hold_only_their_projects_lanes(backend: Backend) {
    let server = start(backend).await;
    let neighbour = Neighbour::start(&server).await;
    // A receiver that holds every request for 5 s, and three destinations
    // asking for 64 lanes each: 192 instances and HTTP requests without
    // the project's quotas, more than the sandbox's pool of 100.
    let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let receiver = {
        let (in_flight, most) = (in_flight.clone(), most.clone());
        axum::Router::new().route(
            "/hang",
            axum::routing::post(move || {
                let (in_flight, most) = (in_flight.clone(), most.clone());
                async move {
                    use std::sync::atomic::Ordering::SeqCst;
                    most.fetch_max(in_flight.fetch_add(1, SeqCst) + 1, SeqCst);
                    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                    in_flight.fetch_sub(1, SeqCst);
                    "late"
                }
            }),
        )
    };
    let url = format!("http://{}/hang", crate::common::serve(receiver));
    let (status, uploaded) = upload_as(&server, &server.project, "webhook").await;
    assert_eq!(status, 201, "{uploaded}");
    for _ in 0..3 {
        let (status, body) = server
            .call_api(
                Method::POST,
                "/plugin-configs",
                Some(json!({
                    "plugin_sha256": uploaded["sha256"],
                    "config": {"url": url},
                    "delivery": {"concurrency": 64, "batch_size": 1, "linger_ms": 0},
                })),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }
    assert_eq!(
        capture_as(&server, &server.project, events("hang", 300)).await,
        200
    );
    server.wait_events_of(&server.project, 300).await;
    wait_until("the destinations to fill their lanes", || async {
        (in_flight.load(std::sync::atomic::Ordering::SeqCst) >= 16).then_some(())
    })
    .await;
    neighbour.finish(&server, "hanging destinations").await;
    // Three destinations asking for 64 lanes each got the project's 16.
    assert_eq!(most.load(std::sync::atomic::Ordering::SeqCst), 16);
}

async fn hostile_plugins_are_disabled_and_leave_the_neighbour_alone(backend: Backend) {
    let server = start(backend).await;
    let neighbour = Neighbour::start(&server).await;
    for plugin in [
        "memory-bomb",
        "spin-forever",
        "deep-recursion",
        "huge-output",
        "log-flood",
        "wasi-file-read",
    ] {
        server.upload_and_install(plugin, json!({}), "open").await;
    }
    let (status, uploaded) = upload_as(&server, &server.project, "panic-in-setup").await;
    assert_eq!(status, 201, "{uploaded}");
    let (status, body) = server
        .call_api(
            Method::POST,
            "/plugin-configs",
            Some(json!({"plugin_sha256": uploaded["sha256"], "config": {}})),
        )
        .await;
    assert_eq!(
        status, 400,
        "a plugin that panics in setup is refused: {body}"
    );
    for round in 0..4 {
        assert_eq!(
            capture_as(
                &server,
                &server.project,
                events(&format!("hostile {round}"), 5)
            )
            .await,
            200
        );
    }
    wait_until(
        "the failing plugins to be disabled with their reason",
        || async {
            let (_, configs) = server.call_api(Method::GET, "/plugin-configs", None).await;
            let disabled: Vec<String> = configs["results"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|c| c["disabled_reason"].as_str().map(str::to_string))
                .collect();
            (disabled.len() >= 4).then_some(disabled)
        },
    )
    .await;
    neighbour.finish(&server, "hostile plugins").await;
}

async fn queries_and_replays_keep_to_their_quotas(backend: Backend) {
    let server = start(backend).await;
    server
        .set_quotas(&server.project, json!({"replay_batch": 50}))
        .await;
    let neighbour = Neighbour::start(&server).await;
    // Letters to replay: a destination that refuses everything.
    let refusing = axum::Router::new().route(
        "/no",
        axum::routing::post(|| async { (axum::http::StatusCode::BAD_REQUEST, "no") }),
    );
    let url = format!("http://{}/no", crate::common::serve(refusing));
    server
        .upload_and_install("webhook", json!({"url": url}), "open")
        .await;
    assert_eq!(
        capture_as(&server, &server.project, events("letter", 200)).await,
        200
    );
    wait_until("the refused events to be dead-lettered", || async {
        let (_, body) = server
            .call_api(Method::GET, "/dead-letters?limit=1000", None)
            .await;
        (body["results"].as_array().unwrap().len() >= 100).then_some(())
    })
    .await;
    // Year-long trends and replays of everything, all at once.
    let mut requests = Vec::new();
    for i in 0..16 {
        let (client, base, project, key) = (
            server.client.clone(),
            server.base.clone(),
            server.project.project_id.clone(),
            server.project.api_key.clone(),
        );
        requests.push(tokio::spawn(async move {
            let (path, body) = if i % 4 == 0 {
                ("dead-letters/replay", json!({"all": true}))
            } else {
                (
                    "query",
                    json!({"kind": "trends", "series": [{}], "date_from": "-365d",
                           "breakdown": {"property": "$browser"}}),
                )
            };
            let response = client
                .post(format!("{base}/api/projects/{project}/{path}"))
                .bearer_auth(key)
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            (path, status, response.text().await.unwrap())
        }));
    }
    for request in requests {
        let (path, status, body) = request.await.unwrap();
        match status {
            200 if path == "dead-letters/replay" => {
                let answer: Value = serde_json::from_str(&body).unwrap();
                assert!(answer["replayed"].as_u64().unwrap() <= 50, "{body}");
            }
            200 => {}
            429 => assert!(
                body.contains("quota `concurrent_queries`")
                    || body.contains("--max-concurrent-queries"),
                "{body}"
            ),
            other => panic!("{path} answered {other}: {body}"),
        }
    }
    neighbour.finish(&server, "queries and replays").await;
}

on_both_backends!(
    a_multiplying_chain_leaves_the_neighbour_alone,
    a_slow_chain_is_disabled_and_leaves_the_neighbour_alone,
    plugin_configs_over_the_quota_are_refused_by_name,
    a_chain_slow_within_every_quota_delays_only_its_project,
    a_capture_flood_is_refused_for_its_own_queue_share_only,
    a_request_storm_gets_429_for_its_token_only,
    heavy_and_slow_bodies_cost_the_neighbour_nothing,
    a_key_value_flood_stops_at_its_quota,
    hanging_destinations_hold_only_their_projects_lanes,
    hostile_plugins_are_disabled_and_leave_the_neighbour_alone,
    queries_and_replays_keep_to_their_quotas,
);
