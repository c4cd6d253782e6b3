//! The real server on an ephemeral port: PostHog capture in all its
//! encodings, errors that store nothing, de-duplication, persons, the
//! events API, and transformation plugins installed through the API.

use crate::common;
use crate::common::server::{TestServer, wait_until};

use std::io::Write;
use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};
use sluice::server::{ServeConfig, open_store};
use sluice::store::Backend;

async fn start_with(
    backend: Backend,
    config: impl FnOnce(ServeConfig) -> ServeConfig,
) -> TestServer {
    TestServer::start_with(backend, config).await
}

async fn start(backend: Backend) -> TestServer {
    TestServer::start(backend).await
}

impl TestServer {
    async fn post(&self, path: &str, body: Vec<u8>, headers: &[(&str, &str)]) -> (u16, Value) {
        let mut request = self.client.post(format!("{}{path}", self.base)).body(body);
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn post_json(&self, path: &str, body: Value) -> (u16, Value) {
        self.post(
            path,
            serde_json::to_vec(&body).unwrap(),
            &[("content-type", "application/json")],
        )
        .await
    }

    /// GET an API path of the project with its key; asserts 200.
    async fn get_api(&self, path_and_query: &str) -> Value {
        let (status, body) = self
            .call_api(reqwest::Method::GET, path_and_query, None)
            .await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Captures a last event and waits until it is stored; the names of
    /// the events stored before it, oldest first. The worker stores events
    /// in the order they were queued, so this waits for every event
    /// accepted before it.
    async fn stored_through_sentinel(&self, token: &str) -> Vec<Value> {
        let (status, _) = self
            .post_json(
                "/capture/",
                json!({"api_key": token, "event": "sentinel", "distinct_id": "sentinel"}),
            )
            .await;
        assert_eq!(status, 200);
        let mut stored = wait_until("the sentinel event to be stored", || async {
            let stored = self.events("limit=1000").await["results"]
                .as_array()
                .unwrap()
                .clone();
            stored
                .iter()
                .any(|event| event["event"] == "sentinel")
                .then_some(stored)
        })
        .await;
        stored.retain(|event| event["event"] != "sentinel");
        stored.reverse();
        stored
    }

    async fn events(&self, query: &str) -> Value {
        self.get_api(&format!("/events?{query}")).await
    }

    /// Waits until the events API shows `n` events (the worker stores them
    /// shortly after capture answers).
    async fn wait_for(&self, n: usize) -> Vec<Value> {
        wait_until(&format!("{n} events to be stored"), || async {
            let results = self.events("limit=1000").await["results"]
                .as_array()
                .unwrap()
                .clone();
            (results.len() >= n).then_some(results)
        })
        .await
    }
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

async fn every_posthog_endpoint_and_encoding_is_accepted_and_stored(backend: Backend) {
    let server = start(backend).await;
    let token = server.project.capture_token.clone();
    let single = |n: u32| json!({"api_key": token, "event": "single", "distinct_id": format!("u{n}"), "properties": {"n": n}});

    for (i, path) in ["/capture", "/capture/", "/e", "/e/", "/batch/", "/i/v0/e/"]
        .iter()
        .enumerate()
    {
        let (status, body) = server.post_json(path, single(i as u32)).await;
        assert_eq!((status, body), (200, json!({"status": 1})), "{path}");
    }
    // A batch, as posthog-python and posthog-node send it.
    let (status, _) = server
        .post_json(
            "/batch/",
            json!({"api_key": token, "sent_at": chrono::Utc::now().to_rfc3339(), "batch": [
                {"event": "batched", "distinct_id": "b1", "properties": {}},
                {"event": "batched", "distinct_id": "b2", "properties": {}}
            ]}),
        )
        .await;
    assert_eq!(status, 200);
    // gzip by header, and by posthog-js's query parameter with the token in
    // each event's properties.
    let js = serde_json::to_vec(
        &json!([{"event": "$pageview", "properties": {"token": token, "distinct_id": "js"}}]),
    )
    .unwrap();
    let (status, _) = server
        .post(
            "/e/?compression=gzip-js&ver=1.130.0",
            gzip(&js),
            &[("content-type", "text/plain")],
        )
        .await;
    assert_eq!(status, 200);
    let body = serde_json::to_vec(&single(100)).unwrap();
    let (status, _) = server
        .post("/capture/", gzip(&body), &[("content-encoding", "gzip")])
        .await;
    assert_eq!(status, 200);
    // A form with base64 JSON in `data`.
    let data =
        base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(&single(200)).unwrap());
    let form = format!(
        "data={}",
        form_urlencoded::byte_serialize(data.as_bytes()).collect::<String>()
    );
    let (status, _) = server
        .post(
            "/e/",
            form.into_bytes(),
            &[("content-type", "application/x-www-form-urlencoded")],
        )
        .await;
    assert_eq!(status, 200);

    // JSON labelled as a form, as `curl -d` sends it.
    let (status, _) = server
        .post(
            "/capture/",
            serde_json::to_vec(&single(300)).unwrap(),
            &[("content-type", "application/x-www-form-urlencoded")],
        )
        .await;
    assert_eq!(status, 200);

    // 6 single events, a batch of 2, posthog-js, gzip, form, curl.
    let stored = server.wait_for(12).await;
    assert_eq!(stored.len(), 12);
    let js_event = stored
        .iter()
        .find(|e| e["distinct_id"] == json!("js"))
        .unwrap();
    assert_eq!(js_event["event"], json!("$pageview"));
    assert!(
        js_event["properties"].get("token").is_none(),
        "the token is not stored as a property"
    );
    assert_eq!(js_event["properties"]["$ip"], json!("127.0.0.1"));
    for event in &stored {
        for field in [
            "uuid",
            "event",
            "distinct_id",
            "person_id",
            "timestamp",
            "properties",
        ] {
            assert!(event.get(field).is_some(), "{field} missing in {event}");
        }
    }
}

async fn browsers_may_send_events_from_other_origins(backend: Backend) {
    let server = start(backend).await;
    let preflight = server
        .client
        .request(reqwest::Method::OPTIONS, format!("{}/e/", server.base))
        .header("origin", "https://shop.example.com")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type")
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status(), 200);
    assert_eq!(
        preflight.headers()["access-control-allow-origin"],
        "https://shop.example.com"
    );
    let event = json!({"api_key": server.project.capture_token, "event": "e", "distinct_id": "d"});
    let response = server
        .client
        .post(format!("{}/e/", server.base))
        .header("origin", "https://shop.example.com")
        .header("content-type", "text/plain")
        .body(event.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "https://shop.example.com"
    );
}

async fn bad_requests_get_clear_json_errors_and_store_nothing(backend: Backend) {
    let server = start_with(backend, |c| ServeConfig {
        max_body_bytes: 4096,
        ..c
    })
    .await;
    let token = server.project.capture_token.clone();

    let (status, body) = server.post("/capture/", b"{not json".to_vec(), &[]).await;
    assert_eq!(status, 400);
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .starts_with("the body is not valid JSON"),
        "{body}"
    );

    let (status, body) = server
        .post_json("/capture/", json!({"event": "e", "distinct_id": "d"}))
        .await;
    assert_eq!(status, 401);
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("no capture token"),
        "{body}"
    );

    let (status, body) = server
        .post_json(
            "/capture/",
            json!({"api_key": "phc_nope", "event": "e", "distinct_id": "d"}),
        )
        .await;
    assert_eq!(status, 401);
    assert_eq!(
        body["detail"],
        json!("unknown capture token: check the project's token")
    );

    let (status, body) = server
        .post_json(
            "/batch/",
            json!({"api_key": token, "batch": [{"event": "ok", "distinct_id": "d"}, {"event": "no id"}]}),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(
        body["detail"],
        json!("event #2: `distinct_id` is missing or empty")
    );

    let big = json!({"api_key": token, "event": "e", "distinct_id": "d", "properties": {"blob": "x".repeat(5000)}});
    let (status, body) = server.post_json("/capture/", big).await;
    assert_eq!(status, 413);
    assert!(
        body["detail"].as_str().unwrap().contains("4096 bytes"),
        "{body}"
    );

    // A gzip bomb is cut off at the limit too.
    let bomb = gzip(&vec![b' '; 1 << 20]);
    let (status, _) = server
        .post("/capture/", bomb, &[("content-encoding", "gzip")])
        .await;
    assert_eq!(status, 413);

    // Nothing of the refused requests was stored; a good one still is.
    let (status, _) = server
        .post_json(
            "/capture/",
            json!({"api_key": token, "event": "ok", "distinct_id": "d"}),
        )
        .await;
    assert_eq!(status, 200);
    // The worker stores in the order events were queued: once a later
    // event is stored, anything queued before it would be too.
    let stored = server.stored_through_sentinel(&token).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0]["event"], "ok");
}

async fn a_replayed_uuid_is_stored_once(backend: Backend) {
    let server = start(backend).await;
    let event = json!({
        "api_key": server.project.capture_token,
        "event": "paid",
        "distinct_id": "d",
        "uuid": "0190a0a0-0000-7000-8000-0000000000aa",
    });
    for _ in 0..3 {
        assert_eq!(server.post_json("/capture/", event.clone()).await.0, 200);
    }
    let stored = server
        .stored_through_sentinel(&server.project.capture_token)
        .await;
    assert_eq!(stored.len(), 1);
    assert_eq!(
        stored[0]["uuid"],
        json!("0190a0a0-0000-7000-8000-0000000000aa")
    );
}

async fn the_events_api_filters_orders_and_checks_the_key(backend: Backend) {
    let server = start(backend).await;
    let token = server.project.capture_token.clone();
    let batch: Vec<Value> = (0..5)
        .map(|i| {
            json!({"event": if i % 2 == 0 { "even" } else { "odd" }, "distinct_id": format!("u{}", i % 2),
                   "timestamp": format!("2024-05-01T12:00:0{i}Z")})
        })
        .collect();
    assert_eq!(
        server
            .post_json("/batch/", json!({"api_key": token, "batch": batch}))
            .await
            .0,
        200
    );
    server.wait_for(5).await;

    let all = server.events("").await["results"]
        .as_array()
        .unwrap()
        .clone();
    let times: Vec<&str> = all
        .iter()
        .map(|e| e["timestamp"].as_str().unwrap())
        .collect();
    assert_eq!(times[0], "2024-05-01T12:00:04.000Z", "newest first");
    assert_eq!(times[4], "2024-05-01T12:00:00.000Z");
    assert_eq!(
        server.events("event=odd").await["results"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        server.events("distinct_id=u0").await["results"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    assert_eq!(
        server.events("limit=2").await["results"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let window = server
        .events("after=2024-05-01T12:00:01Z&before=2024-05-01T12:00:04Z")
        .await;
    assert_eq!(window["results"].as_array().unwrap().len(), 2);

    let url = format!(
        "{}/api/projects/{}/events",
        server.base, server.project.project_id
    );
    let response = server.client.get(&url).send().await.unwrap();
    assert_eq!(response.status(), 401);
    let response = server
        .client
        .get(&url)
        .bearer_auth(&server.other.api_key)
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        403,
        "another project's key reads nothing"
    );
    let response = server
        .client
        .get(format!("{url}?limit=0"))
        .bearer_auth(&server.project.api_key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    assert!(
        body["detail"].as_str().unwrap().contains("`limit`"),
        "{body}"
    );
}

impl TestServer {
    async fn person(&self, distinct_id: &str) -> Value {
        self.get_api(&format!("/persons?distinct_id={distinct_id}"))
            .await["results"][0]
            .clone()
    }
}

async fn identify_and_alias_merge_persons_and_old_events_follow_the_merge(backend: Backend) {
    let server = start(backend).await;
    let token = server.project.capture_token.clone();
    let send =
        |batch: Value| server.post_json("/batch/", json!({"api_key": token, "batch": batch}));

    assert_eq!(
        send(json!([
            {"event": "$pageview", "distinct_id": "anon-1", "properties": {"$set_once": {"first_url": "/a"}}},
            {"event": "$pageview", "distinct_id": "anon-2"},
        ]))
        .await
        .0,
        200
    );
    server.wait_for(2).await;
    let anon_person = server.person("anon-1").await["id"].clone();

    assert_eq!(
        send(json!([
            {"event": "$identify", "distinct_id": "user-1",
             "properties": {"$anon_distinct_id": "anon-1", "$set": {"email": "ann@example.com", "plan": "free"}}},
            {"event": "$create_alias", "distinct_id": "user-1", "properties": {"alias": "anon-2"}},
            {"event": "upgraded", "distinct_id": "user-1",
             "properties": {"$set": {"plan": "pro"}, "$set_once": {"first_url": "/ignored"}, "$unset": ["email"]}},
        ]))
        .await
        .0,
        200
    );
    let stored = server.wait_for(5).await;

    let person = server.person("anon-2").await;
    let person_id = person["id"].clone();
    assert_eq!(
        person["distinct_ids"],
        json!(["anon-1", "anon-2", "user-1"])
    );
    assert_eq!(
        person["properties"],
        json!({"first_url": "/a", "plan": "pro"})
    );
    for event in &stored {
        assert_eq!(
            event["person_id"], person_id,
            "{} should resolve to the merged person",
            event["distinct_id"]
        );
    }
    // The anonymous person's id lives on: it was the first person, so the
    // identified user joined it.
    assert_eq!(person_id, anon_person);
}

impl TestServer {
    async fn capture(&self, events: Value) {
        let body = json!({"api_key": self.project.capture_token, "batch": events});
        assert_eq!(self.post_json("/batch/", body).await.0, 200);
    }
}

async fn an_installed_pii_scrubber_changes_stored_events(backend: Backend) {
    let server = start(backend).await;
    server
        .upload_and_install("pii-scrubber", json!({"drop": ["email"]}), "open")
        .await;
    server
        .capture(json!([{"event": "signed up", "distinct_id": "d",
                         "properties": {"email": "ann@example.com", "note": "call +1 415 555 2671", "plan": "pro"}}]))
        .await;
    let stored = server.wait_for(1).await;
    let properties = &stored[0]["properties"];
    assert!(properties.get("email").is_none(), "{properties}");
    assert_eq!(properties["note"], json!("call [redacted]"));
    assert_eq!(properties["plan"], json!("pro"));
}

async fn a_failing_fail_open_plugin_passes_events_on_and_logs_the_uuid(backend: Backend) {
    let server = start(backend).await;
    let config = server
        .upload_and_install("wasi-file-read", json!({}), "open")
        .await;
    let uuid = "0190a0a0-0000-7000-8000-0000000000f1";
    server
        .capture(json!([{"event": "e", "distinct_id": "d", "uuid": uuid, "properties": {"a": 1}}]))
        .await;
    let stored = server.wait_for(1).await;
    assert_eq!(stored[0]["uuid"], json!(uuid));
    assert_eq!(stored[0]["properties"]["a"], json!(1));
    let (_, logs) = server
        .call_api_raw(
            reqwest::Method::GET,
            &format!("/plugin-configs/{}/logs", config["id"].as_str().unwrap()),
            None,
        )
        .await;
    let logs = logs["results"].as_array().unwrap();
    let failure = logs
        .iter()
        .find(|l| l["level"] == json!("error"))
        .expect("the failure is logged");
    assert_eq!(failure["event_uuid"], json!(uuid));
    assert!(
        failure["message"]
            .as_str()
            .unwrap()
            .contains("wasi-file-read@0.1.0 failed in transform"),
        "{failure}"
    );
}

async fn a_failing_fail_closed_plugin_sends_events_to_dead_letters(backend: Backend) {
    let server = start(backend).await;
    server
        .upload_and_install("wasi-file-read", json!({}), "closed")
        .await;
    let uuid = "0190a0a0-0000-7000-8000-0000000000f2";
    server
        .capture(json!([{"event": "e", "distinct_id": "d", "uuid": uuid}]))
        .await;
    let letters = wait_until("a dead letter", || async {
        let letters = server
            .call_api_raw(reqwest::Method::GET, "/dead-letters", None)
            .await
            .1["results"]
            .as_array()
            .unwrap()
            .clone();
        (!letters.is_empty()).then_some(letters)
    })
    .await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0]["event"]["uuid"], json!(uuid));
    assert!(
        letters[0]["error"]
            .as_str()
            .unwrap()
            .contains("no preopened directories")
    );
    assert!(
        server.events("").await["results"]
            .as_array()
            .unwrap()
            .is_empty(),
        "nothing is stored"
    );
}

async fn a_plugin_that_keeps_failing_is_disabled_with_its_reason_and_can_be_re_enabled(
    backend: Backend,
) {
    let server = start(backend).await;
    let config = server
        .upload_and_install("wasi-file-read", json!({}), "open")
        .await;
    let batch: Vec<Value> = (0..12)
        .map(|i| json!({"event": "e", "distinct_id": format!("d{i}")}))
        .collect();
    server.capture(Value::Array(batch)).await;
    server.wait_for(12).await;
    let (_, configs) = server
        .call_api_raw(reqwest::Method::GET, "/plugin-configs", None)
        .await;
    let state = &configs["results"][0];
    assert_eq!(state["enabled"], json!(false));
    let reason = state["disabled_reason"].as_str().unwrap();
    assert!(
        reason.starts_with("disabled after 10 consecutive failed events"),
        "{reason}"
    );

    let path = format!("/plugin-configs/{}", config["id"].as_str().unwrap());
    let (status, enabled) = server
        .call_api_raw(
            reqwest::Method::PATCH,
            &path,
            Some(br#"{"enabled": true}"#.to_vec()),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        (
            enabled["enabled"].clone(),
            enabled["disabled_reason"].clone()
        ),
        (json!(true), Value::Null)
    );
}

async fn plugin_configs_are_checked_against_the_manifest_and_secrets_never_come_back(
    backend: Backend,
) {
    let server = start(backend).await;
    let url = format!(
        "{}/api/projects/{}/plugins",
        server.base, server.project.project_id
    );
    let response = server
        .client
        .post(&url)
        .bearer_auth(&server.project.api_key)
        .body(common::wasm("webhook"))
        .send()
        .await
        .unwrap();
    let uploaded: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    let sha = uploaded["sha256"].clone();

    let bad = json!({"plugin_sha256": sha, "config": {"method": "GET"}});
    let (status, body) = server
        .call_api_raw(
            reqwest::Method::POST,
            "/plugin-configs",
            Some(serde_json::to_vec(&bad).unwrap()),
        )
        .await;
    assert_eq!(status, 400);
    let detail = body["detail"].as_str().unwrap();
    assert!(
        detail.contains("`url` is required")
            && detail.contains("`method` must be one of POST, PUT, PATCH"),
        "{detail}"
    );

    // A body that is not the documented shape gets the API's JSON error.
    for (body, expected) in [
        (&b"{\"plugin_sha256\": "[..], "EOF while parsing"),
        (&br#"{"config": {}}"#[..], "missing field `plugin_sha256`"),
        (
            &br#"{"plugin_sha256": 7, "config": {}}"#[..],
            "plugin_sha256: invalid type",
        ),
    ] {
        let (status, answer) = server
            .call_api_raw(
                reqwest::Method::POST,
                "/plugin-configs",
                Some(body.to_vec()),
            )
            .await;
        assert_eq!(status, 400, "{answer}");
        let detail = answer["detail"].as_str().unwrap_or_default();
        assert!(detail.contains(expected), "{answer}");
    }

    let good = json!({"plugin_sha256": sha, "config": {"url": "https://hooks.example.com/x", "secret": "s3cret"}});
    let (status, created) = server
        .call_api_raw(
            reqwest::Method::POST,
            "/plugin-configs",
            Some(serde_json::to_vec(&good).unwrap()),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    assert!(created["config"].get("secret").is_none(), "{created}");
    assert_eq!(created["secrets_set"], json!(["secret"]));
    assert!(!created.to_string().contains("s3cret"));
    let (_, listed) = server
        .call_api_raw(reqwest::Method::GET, "/plugin-configs", None)
        .await;
    assert!(!listed.to_string().contains("s3cret"));
    let (status, answer) = server
        .call_api_raw(
            reqwest::Method::PATCH,
            &format!("/plugin-configs/{}", created["id"].as_str().unwrap()),
            Some(br#"{"enabeld": false}"#.to_vec()),
        )
        .await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["detail"]
            .as_str()
            .is_some_and(|d| d.contains("unknown field `enabeld`")),
        "{answer}"
    );

    let other = format!(
        "{}/api/projects/{}/plugin-configs",
        server.base, server.project.project_id
    );
    let response = server
        .client
        .get(other)
        .bearer_auth(&server.other.api_key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403, "another project's key sees nothing");
}

async fn capture_answers_503_with_retry_after_when_the_queue_is_full(backend: Backend) {
    let server = start_with(backend, |c| ServeConfig {
        max_queue_depth: 0,
        ..c
    })
    .await;
    let event = json!({"api_key": server.project.capture_token, "event": "e", "distinct_id": "d"});
    let response = server
        .client
        .post(format!("{}/capture/", server.base))
        .body(event.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "5");
    let body: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    assert_eq!(body["detail"], json!("the queue is full; retry after 5 s"));
    // Refused means not queued: the queue itself is empty, so nothing can
    // be stored later.
    let store = open_store(&server.store).await.unwrap();
    assert_eq!(store.queue_depth().await.unwrap(), 0);
    store.close().await;
    assert!(
        server.events("").await["results"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

/// While the pipeline cannot store anything (another session holds the
/// events table locked), capture acknowledges only until the oldest queued
/// event has waited `max_queue_age`; then it answers 503 with
/// `Retry-After`, storing nothing, and once the pipeline can store again it
/// catches up, capture answers 200 again, and every acknowledged event is
/// stored. (On SQLite a lock that stops the worker stops capture too.)
#[tokio::test(flavor = "multi_thread")]
async fn postgres_capture_pushes_back_while_the_pipeline_cannot_store() {
    use sqlx::Connection;
    let server = start_with(Backend::Postgres, |c| ServeConfig {
        max_queue_age: Duration::from_secs(1),
        ..c
    })
    .await;
    let url = server.database_url().unwrap().to_string();
    let mut blocker = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut blocker).await.unwrap();
    sqlx::query("LOCK TABLE events IN EXCLUSIVE MODE")
        .execute(&mut blocker)
        .await
        .unwrap();

    let capture = |n: usize| {
        let body = json!({"api_key": server.project.capture_token, "event": "e",
                          "distinct_id": "d", "uuid": uuid::Uuid::new_v4().to_string(),
                          "properties": {"n": n}});
        server
            .client
            .post(format!("{}/capture/", server.base))
            .body(body.to_string())
            .send()
    };
    let mut acknowledged = 0;
    let mut refused = None;
    for n in 0..600 {
        let response = capture(n).await.unwrap();
        match response.status().as_u16() {
            200 => acknowledged += 1,
            503 => {
                refused = Some(response);
                break;
            }
            other => panic!("capture answered {other}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refused = refused.expect("capture kept acknowledging while nothing could be stored");
    assert_eq!(refused.headers()["retry-after"], "5");
    let body: Value = serde_json::from_str(&refused.text().await.unwrap()).unwrap();
    let detail = body["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("the queue is behind: its oldest event has waited"),
        "{detail}"
    );
    assert!(
        acknowledged > 0,
        "capture took events before it fell behind"
    );

    sqlx::query("ROLLBACK").execute(&mut blocker).await.unwrap();
    let mut recovered = false;
    for n in 0..600 {
        if capture(1000 + n).await.unwrap().status() == 200 {
            acknowledged += 1;
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        recovered,
        "capture answered 503 after the pipeline caught up"
    );
    let stored = server.wait_for(acknowledged).await;
    assert_eq!(
        stored.len(),
        acknowledged,
        "only acknowledged events are stored"
    );
}

on_both_backends!(
    browsers_may_send_events_from_other_origins,
    every_posthog_endpoint_and_encoding_is_accepted_and_stored,
    bad_requests_get_clear_json_errors_and_store_nothing,
    a_replayed_uuid_is_stored_once,
    the_events_api_filters_orders_and_checks_the_key,
    identify_and_alias_merge_persons_and_old_events_follow_the_merge,
    an_installed_pii_scrubber_changes_stored_events,
    a_failing_fail_open_plugin_passes_events_on_and_logs_the_uuid,
    a_failing_fail_closed_plugin_sends_events_to_dead_letters,
    a_plugin_that_keeps_failing_is_disabled_with_its_reason_and_can_be_re_enabled,
    plugin_configs_are_checked_against_the_manifest_and_secrets_never_come_back,
    capture_answers_503_with_retry_after_when_the_queue_is_full,
);

#[tokio::test]
async fn a_request_over_the_event_limit_gets_413_and_stores_nothing() {
    let server = start(Backend::Sqlite).await;
    let token = server.project.capture_token.clone();
    let batch: Vec<Value> = (0..10_001)
        .map(|i| json!({"event": "flood", "distinct_id": format!("u{i}")}))
        .collect();
    let (status, body) = server
        .post_json("/batch/", json!({"api_key": token, "batch": batch}))
        .await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["type"], "validation_error");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("over the limit of 10000 per request"),
        "{body}"
    );
    let stored = server.stored_through_sentinel(&token).await;
    assert!(stored.is_empty(), "{} events stored", stored.len());
}
