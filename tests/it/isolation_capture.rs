//! Capture under abuse: one project's tokens (or a stranger's guesses)
//! must not cost other projects. Unknown tokens are refused before the
//! body is parsed, a token over its request rate gets 429 while another
//! project's requests go through, a project over its share of the queue
//! gets 503 while another's events are accepted and stored, and a body
//! sent a byte at a time is cut off.

use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};
use sluice::server::ServeConfig;
use sluice::store::{Backend, CreatedProject};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::postgres::TestStore;
use crate::common::server::{PATIENCE, TestServer, answer, wait_until};

/// A body no JSON parser accepts, large enough to be parsed off the
/// async runtime were it parsed at all.
fn garbage() -> Vec<u8> {
    vec![b'x'; 256 << 10]
}

fn basic(write_key: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{write_key}:"))
    )
}

impl TestServer {
    async fn segment(&self, write_key: &str, body: Vec<u8>) -> (u16, Option<String>, Value) {
        answer(
            self.client
                .post(format!("{}/v1/track", self.base))
                .header("authorization", basic(write_key))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    /// One PostHog event with `project`'s token in the body.
    async fn capture_as(
        &self,
        project: &CreatedProject,
        name: &str,
    ) -> (u16, Option<String>, Value) {
        let event = json!({"api_key": project.capture_token, "event": name, "distinct_id": "d",
                           "uuid": uuid::Uuid::new_v4().to_string()});
        answer(
            self.client
                .post(format!("{}/capture/", self.base))
                .body(event.to_string())
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    /// The names of `project`'s stored events, once there are `n`.
    async fn stored_names(&self, project: &CreatedProject, n: usize) -> Vec<String> {
        self.wait_events_of(project, n)
            .await
            .iter()
            .map(|event| event["event"].as_str().unwrap().to_string())
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_segment_request_with_an_unknown_write_key_gets_401_before_its_body_is_parsed() {
    let server = TestServer::start(Backend::Sqlite).await;
    let (status, _, body) = server.segment("not-a-write-key", garbage()).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["type"], "authentication_error");
    // With the right key, the same body is parsed, and refused as JSON.
    let (status, _, body) = server
        .segment(&server.project.capture_token, garbage())
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("not valid JSON"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_posthog_token_in_the_query_string_is_checked_before_the_body_is_parsed() {
    let server = TestServer::start(Backend::Sqlite).await;
    let response = server
        .client
        .post(format!("{}/batch/?api_key=not-a-token", server.base))
        .body(garbage())
        .send()
        .await
        .unwrap();
    let (status, _, body) = answer(response).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["type"], "authentication_error");
    // A known token in the query string is enough for a body without one.
    let response = server
        .client
        .post(format!(
            "{}/capture/?token={}",
            server.base, server.project.capture_token
        ))
        .body(json!({"event": "from-query", "distinct_id": "d"}).to_string())
        .send()
        .await
        .unwrap();
    let (status, _, body) = answer(response).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        server.stored_names(&server.project, 1).await,
        vec!["from-query"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_over_its_request_rate_gets_429_naming_the_quota_while_another_project_gets_through()
 {
    let server = TestServer::start(Backend::Sqlite).await;
    server
        .set_quotas(&server.project, json!({"capture_requests_per_second": 1}))
        .await;
    let (retry_after, body) = wait_until("the project's requests to be limited", || async {
        let (status, retry_after, body) = server.capture_as(&server.project, "flood").await;
        match status {
            200 => None,
            429 => Some((retry_after, body)),
            other => panic!("capture answered {other}: {body}"),
        }
    })
    .await;
    let retry_after: u64 = retry_after
        .expect("a 429 says when to retry")
        .parse()
        .unwrap();
    assert!(retry_after >= 1, "Retry-After: {retry_after}");
    assert_eq!(body["type"], "throttled");
    assert_eq!(body["code"], "rate_limited");
    let detail = body["detail"].as_str().unwrap();
    assert!(
        detail.contains("quota `capture_requests_per_second` (1)"),
        "{detail}"
    );
    // A Segment request with the limited key is refused before its body
    // is parsed: 429, not 400.
    let (status, _, body) = server
        .segment(&server.project.capture_token, garbage())
        .await;
    assert_eq!(status, 429, "{body}");

    for i in 0..20 {
        let (status, _, body) = server.capture_as(&server.other, &format!("b{i}")).await;
        assert_eq!(status, 200, "the other project's request #{i}: {body}");
    }
    assert_eq!(server.stored_names(&server.other, 20).await.len(), 20);
}

/// The pipeline is stopped for everyone (another session holds the events
/// table locked) while one project floods: that project is refused once
/// its own queued events reach its `queued_events` quota, and the other
/// project's events are still accepted, then stored once the pipeline
/// runs again.
#[tokio::test(flavor = "multi_thread")]
async fn postgres_a_project_over_its_queue_share_gets_503_while_another_is_accepted_and_stored() {
    use sqlx::Connection;
    let server = TestServer::start(Backend::Postgres).await;
    server
        .set_quotas(&server.project, json!({"queued_events": 5}))
        .await;
    let mut blocker = sqlx::PgConnection::connect(server.database_url().unwrap())
        .await
        .unwrap();
    sqlx::query("BEGIN").execute(&mut blocker).await.unwrap();
    sqlx::query("LOCK TABLE events IN EXCLUSIVE MODE")
        .execute(&mut blocker)
        .await
        .unwrap();

    let acknowledged = std::cell::Cell::new(0);
    let (retry_after, body) = wait_until("the flooding project to be refused", || async {
        let (status, retry_after, body) = server.capture_as(&server.project, "flood").await;
        match status {
            200 => {
                acknowledged.set(acknowledged.get() + 1);
                None
            }
            503 => Some((retry_after, body)),
            other => panic!("capture answered {other}: {body}"),
        }
    })
    .await;
    assert_eq!(retry_after.as_deref(), Some("5"));
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains("quota `queued_events` (5)"), "{detail}");
    let acknowledged = acknowledged.get();
    assert!(acknowledged >= 5, "{acknowledged} acknowledged");

    for i in 0..3 {
        let (status, _, body) = server.capture_as(&server.other, &format!("b{i}")).await;
        assert_eq!(status, 200, "the other project's request #{i}: {body}");
    }
    let (status, _, _) = server.capture_as(&server.project, "flood").await;
    assert_eq!(status, 503, "the flooding project is still refused");

    sqlx::query("ROLLBACK").execute(&mut blocker).await.unwrap();
    let mut others = server.stored_names(&server.other, 3).await;
    others.sort();
    assert_eq!(others, vec!["b0", "b1", "b2"]);
    assert_eq!(
        server
            .stored_names(&server.project, acknowledged)
            .await
            .len(),
        acknowledged,
        "every acknowledged event is stored, and no refused one"
    );
}

/// Each project's part of the queue as the monitor reads it.
#[tokio::test(flavor = "multi_thread")]
async fn the_queue_reports_each_projects_depth_and_oldest_event() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let test_store = TestStore::create(backend).await;
        let store = test_store.open().await;
        let a = store.create_project("a").await.unwrap();
        let b = store.create_project("b").await.unwrap();
        store.create_project("idle").await.unwrap();
        let event = |name: &str| sluice::store::QueuedEvent {
            uuid: uuid::Uuid::new_v4().to_string(),
            event: name.into(),
            distinct_id: "d".into(),
            timestamp: "2024-01-01T00:00:00Z".into(),
            received_at: "2024-01-01T00:00:00Z".into(),
            properties: Default::default(),
        };
        let before = chrono::Utc::now().timestamp_millis() - 1_000;
        store
            .enqueue(&a.project_id, &[event("a1"), event("a2")])
            .await
            .unwrap();
        store.enqueue(&b.project_id, &[event("b1")]).await.unwrap();
        let mut sample = store.queue_status_by_project().await.unwrap();
        sample.sort_by_key(|(_, status)| std::cmp::Reverse(status.depth));
        let depths: Vec<(&str, i64)> = sample
            .iter()
            .map(|(id, status)| (id.as_str(), status.depth))
            .collect();
        assert_eq!(
            depths,
            vec![(a.project_id.as_str(), 2), (b.project_id.as_str(), 1)],
            "{backend:?}"
        );
        for (_, status) in &sample {
            assert!(
                status.oldest_enqueued_ms.is_some_and(|at| at >= before),
                "{status:?}"
            );
        }
        store.close().await;
    }
}

/// A client that sends its headers and then its body a byte at a time is
/// answered 408 once the body timeout passes, with the JSON error, instead
/// of holding a request slot for as long as it likes.
#[tokio::test(flavor = "multi_thread")]
async fn a_body_sent_a_byte_at_a_time_is_cut_off_with_a_json_408() {
    let server = TestServer::start_with(Backend::Sqlite, |c| ServeConfig {
        capture_body_timeout: Duration::from_secs(1),
        ..c
    })
    .await;
    let address = server.base.trim_start_matches("http://");
    let stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    writer
        .write_all(
            b"POST /capture/ HTTP/1.1\r\nhost: sluice\r\ncontent-type: application/json\r\ncontent-length: 10000\r\n\r\n{",
        )
        .await
        .unwrap();
    let trickle = tokio::spawn(async move {
        // Far slower than the body timeout allows: 10,000 bytes would
        // take over an hour.
        while writer.write_all(b" ").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    let mut response = Vec::new();
    let answered = tokio::time::timeout(PATIENCE, async {
        let mut buffer = [0u8; 4096];
        loop {
            let text = String::from_utf8_lossy(&response).to_string();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length: usize = head
                    .lines()
                    .find_map(|line| {
                        let (name, value) = line.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse().unwrap())
                    })
                    .expect("the answer has a length");
                if body.len() >= length {
                    return (head.to_string(), body[..length].to_string());
                }
            }
            match reader.read(&mut buffer).await {
                Ok(0) | Err(_) => panic!("the connection closed without a full answer: {text}"),
                Ok(n) => response.extend_from_slice(&buffer[..n]),
            }
        }
    })
    .await;
    trickle.abort();
    let (head, body) = answered.expect("the slow body was never cut off");
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["type"], "validation_error");
    assert_eq!(body["code"], "body_timeout");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("did not arrive within 1 s"),
        "{body}"
    );
    // The server still answers everyone else.
    let (status, _, body) = server.capture_as(&server.project, "after").await;
    assert_eq!(status, 200, "{body}");
}
