//! The webhook destination, built as a component and run by the real
//! runtime against a local receiver.

use crate::common;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use common::{install, runtime, wasm};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use sluice::runtime::{ExportFailure, ExportedEvent, PluginInstance, Policy};

/// A status and headers to answer with.
type Reply = (u16, Vec<(&'static str, &'static str)>);

#[derive(Clone, Default)]
struct Receiver {
    requests: Arc<Mutex<Vec<(HeaderMap, Bytes)>>>,
    /// Replies to give, in order; 200 once they run out.
    replies: Arc<Mutex<VecDeque<Reply>>>,
}

impl Receiver {
    fn start(&self) -> String {
        let me = self.clone();
        let router = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                let me = me.clone();
                async move {
                    me.requests.lock().unwrap().push((headers, body));
                    let (status, headers) = me
                        .replies
                        .lock()
                        .unwrap()
                        .pop_front()
                        .unwrap_or((200, vec![]));
                    let mut response =
                        axum::response::Response::new(axum::body::Body::from("receiver says hi"));
                    *response.status_mut() = StatusCode::from_u16(status).unwrap();
                    for (k, v) in headers {
                        response.headers_mut().insert(k, v.parse().unwrap());
                    }
                    response
                }
            }),
        );
        let addr = common::serve(router);
        format!("http://127.0.0.1:{}/hook", addr.port())
    }

    fn reply(&self, status: u16, headers: Vec<(&'static str, &'static str)>) {
        self.replies.lock().unwrap().push_back((status, headers));
    }

    fn requests(&self) -> Vec<(HeaderMap, Bytes)> {
        self.requests.lock().unwrap().clone()
    }
}

fn exported(uuid: &str, name: &str, properties: Value) -> ExportedEvent {
    ExportedEvent {
        uuid: uuid.into(),
        name: name.into(),
        distinct_id: "user-1".into(),
        person_id: Some("person-1".into()),
        timestamp: "2024-05-01T12:00:00.000Z".into(),
        properties: properties.to_string(),
    }
}

fn webhook(config: Value) -> PluginInstance {
    // The receiver is on loopback, which the operator must allow.
    let runtime = runtime(Policy {
        allow_loopback: true,
        ..Policy::default()
    });
    let plugin = runtime.load(&wasm("webhook")).unwrap();
    plugin.install(install("webhook", config)).unwrap()
}

#[test]
fn delivers_a_signed_batch_that_the_receiver_can_verify_and_deduplicate() {
    let receiver = Receiver::default();
    let url = receiver.start();
    let mut instance = webhook(json!({"url": url, "secret": "s3cret"}));
    instance
        .export(vec![
            exported(
                "00000000-0000-4000-8000-000000000001",
                "signed up",
                json!({"plan": "pro"}),
            ),
            exported(
                "00000000-0000-4000-8000-000000000002",
                "paid",
                json!({"amount": 30}),
            ),
        ])
        .unwrap();

    let requests = receiver.requests();
    assert_eq!(requests.len(), 1);
    let (headers, body) = &requests[0];
    let mut mac = Hmac::<Sha256>::new_from_slice(b"s3cret").unwrap();
    mac.update(body);
    let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    assert_eq!(headers["x-sluice-signature"], expected.as_str());
    assert_eq!(
        headers["x-sluice-event-ids"],
        "00000000-0000-4000-8000-000000000001,00000000-0000-4000-8000-000000000002"
    );
    let records: Value = serde_json::from_slice(body).unwrap();
    assert_eq!(
        records[0],
        json!({
            "uuid": "00000000-0000-4000-8000-000000000001",
            "event": "signed up",
            "distinct_id": "user-1",
            "person_id": "person-1",
            "timestamp": "2024-05-01T12:00:00.000Z",
            "properties": {"plan": "pro"}
        })
    );
    assert_eq!(records[1]["properties"], json!({"amount": 30}));

    let (_, calls) = instance.take_activity();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].status, Some(200));
}

#[test]
fn renders_the_body_template_per_event() {
    let receiver = Receiver::default();
    let url = receiver.start();
    let template = json!({"text": "{{distinct_id}} did {{event}}", "amount": "{{properties.amount}}", "id": "{{uuid}}"});
    let mut instance = webhook(json!({"url": url, "mode": "each", "body_template": template}));
    instance
        .export(vec![exported(
            "00000000-0000-4000-8000-000000000003",
            "paid",
            json!({"amount": 30}),
        )])
        .unwrap();
    let (_, body) = &receiver.requests()[0];
    let record: Value = serde_json::from_slice(body).unwrap();
    assert_eq!(
        record,
        json!({"text": "user-1 did paid", "amount": 30, "id": "00000000-0000-4000-8000-000000000003"})
    );
}

#[test]
fn server_errors_and_rate_limits_are_retryable_and_client_errors_are_permanent() {
    let receiver = Receiver::default();
    let url = receiver.start();
    receiver.reply(503, vec![]);
    receiver.reply(429, vec![("retry-after", "7")]);
    receiver.reply(400, vec![]);
    let mut instance = webhook(json!({"url": url}));
    let batch = || {
        vec![exported(
            "00000000-0000-4000-8000-000000000004",
            "e",
            json!({}),
        )]
    };

    match instance.export(batch()) {
        Err(ExportFailure::Retryable {
            plugin,
            message,
            retry_after: None,
        }) => {
            assert_eq!(plugin, "webhook@0.1.0");
            assert!(message.contains("503"), "{message}");
        }
        other => panic!("503 should be retryable, got {other:?}"),
    }
    match instance.export(batch()) {
        Err(ExportFailure::Retryable { retry_after, .. }) => {
            assert_eq!(retry_after, Some(Duration::from_secs(7)))
        }
        other => panic!("429 should be retryable, got {other:?}"),
    }
    match instance.export(batch()) {
        Err(ExportFailure::Permanent { message, .. }) => {
            assert!(message.contains("HTTP 400: receiver says hi"), "{message}")
        }
        other => panic!("400 should be permanent, got {other:?}"),
    }
    instance.export(batch()).expect("the receiver recovered");
    assert_eq!(receiver.requests().len(), 4);
}

#[test]
fn a_webhook_url_on_loopback_is_refused_without_operator_permission() {
    let receiver = Receiver::default();
    let url = receiver.start();
    let strict = runtime(Policy::default());
    let plugin = strict.load(&wasm("webhook")).unwrap();
    let mut instance = plugin
        .install(install("strict", json!({"url": url})))
        .unwrap();
    match instance.export(vec![exported(
        "00000000-0000-4000-8000-000000000005",
        "e",
        json!({}),
    )]) {
        Err(ExportFailure::Permanent { message, .. }) => {
            assert!(message.contains("loopback address"), "{message}")
        }
        other => panic!("expected a permanent refusal, got {other:?}"),
    }
    assert!(
        receiver.requests().is_empty(),
        "nothing may reach the receiver"
    );
}

#[test]
fn recorded_calls_blank_out_secret_config_values_and_credential_headers() {
    let receiver = Receiver::default();
    let url = receiver.start();
    let mut instance = webhook(json!({
        "url": url,
        "secret": "topsecret-value",
        "headers": {"X-Forwarded-Auth": "Bearer topsecret-value", "X-Vendor-Token": "abc", "X-Plain": "visible"},
    }));
    instance
        .export(vec![exported(
            "00000000-0000-4000-8000-000000000006",
            "e",
            json!({}),
        )])
        .unwrap();
    // The receiver got the real values.
    let (headers, _) = &receiver.requests()[0];
    assert_eq!(headers["x-forwarded-auth"], "Bearer topsecret-value");

    let (_, calls) = instance.take_activity();
    let recorded: std::collections::HashMap<String, String> = calls[0]
        .request_headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
        .collect();
    assert_eq!(recorded["x-forwarded-auth"], "Bearer [redacted]");
    assert_eq!(recorded["x-vendor-token"], "[redacted]");
    assert_eq!(recorded["x-plain"], "visible");
}
