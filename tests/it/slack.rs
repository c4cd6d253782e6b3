//! The Slack destination, built as a component and run by the real runtime
//! against a local fake of Slack's incoming webhooks: the exact path shape,
//! JSON bodies checked the way Slack checks them, plain-text `ok` and error
//! codes, and a 429 with `Retry-After` once a scripted number of posts is
//! used up.

use crate::common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use common::{install, runtime, wasm};
use serde_json::{Value, json};
use sluice::runtime::{ExportFailure, ExportedEvent, PluginInstance, Policy};

const TEAM: &str = "T0SLUICE1";
const BOT: &str = "B0SLUICE2";
pub(crate) const SECRET: &str = "xoxSecretPart1234567890";

/// Block types Slack accepts in a message.
const BLOCK_TYPES: &[&str] = &[
    "actions",
    "context",
    "divider",
    "file",
    "header",
    "image",
    "input",
    "markdown",
    "rich_text",
    "section",
    "video",
];

#[derive(Clone, Copy, Debug, PartialEq)]
enum Channel {
    Open,
    Archived,
    /// An admin restricts who may post.
    Restricted,
}

#[derive(Debug)]
struct SlackState {
    channel: Channel,
    /// Messages accepted, in order.
    messages: Vec<Value>,
    /// Posts accepted before Slack starts answering 429; `None` is no limit.
    allowance: Option<usize>,
    retry_after_secs: u64,
    /// Answered once to the next valid post, before the channel checks.
    outage: Option<(u16, &'static str)>,
}

#[derive(Clone)]
pub(crate) struct FakeSlack {
    state: Arc<Mutex<SlackState>>,
    base: String,
}

impl FakeSlack {
    pub(crate) fn start() -> FakeSlack {
        let state = Arc::new(Mutex::new(SlackState {
            channel: Channel::Open,
            messages: Vec::new(),
            allowance: None,
            retry_after_secs: 1,
            outage: None,
        }));
        let router = axum::Router::new()
            .route(
                "/services/{team}/{bot}/{secret}",
                axum::routing::post(post_message),
            )
            .fallback(|| async { reply(StatusCode::NOT_FOUND, "no_service") })
            .with_state(state.clone());
        let addr = common::serve(router);
        FakeSlack {
            state,
            base: format!("http://127.0.0.1:{}", addr.port()),
        }
    }

    /// The webhook URL Slack would hand out for the fake's channel.
    pub(crate) fn webhook_url(&self) -> String {
        format!("{}/services/{TEAM}/{BOT}/{SECRET}", self.base)
    }

    fn set(&self, change: impl FnOnce(&mut SlackState)) {
        change(&mut self.state.lock().unwrap());
    }

    pub(crate) fn messages(&self) -> Vec<Value> {
        self.state.lock().unwrap().messages.clone()
    }
}

fn reply(status: StatusCode, body: &'static str) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain")], body).into_response()
}

async fn post_message(
    State(state): State<Arc<Mutex<SlackState>>>,
    Path((team, bot, secret)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !team.starts_with('T') || !bot.starts_with('B') || team != TEAM || bot != BOT {
        return reply(StatusCode::NOT_FOUND, "no_service");
    }
    if secret != SECRET {
        return reply(StatusCode::NOT_FOUND, "no_service");
    }
    let json_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(';').next().unwrap().trim() == "application/json");
    if !json_type {
        return reply(StatusCode::BAD_REQUEST, "invalid_payload");
    }
    let Ok(Value::Object(message)) = serde_json::from_slice::<Value>(&body) else {
        return reply(StatusCode::BAD_REQUEST, "invalid_payload");
    };
    let text = match message.get("text") {
        None => "",
        Some(Value::String(text)) => text.as_str(),
        Some(_) => return reply(StatusCode::BAD_REQUEST, "invalid_payload"),
    };
    let blocks = match message.get("blocks") {
        None => &Vec::new(),
        Some(Value::Array(blocks)) => blocks,
        Some(_) => return reply(StatusCode::BAD_REQUEST, "invalid_blocks_format"),
    };
    if text.trim().is_empty() && blocks.is_empty() {
        return reply(StatusCode::BAD_REQUEST, "no_text");
    }
    if !blocks_are_valid(blocks) {
        return reply(StatusCode::BAD_REQUEST, "invalid_blocks");
    }

    let mut state = state.lock().unwrap();
    if let Some((status, code)) = state.outage.take() {
        return reply(StatusCode::from_u16(status).unwrap(), code);
    }
    match state.channel {
        Channel::Open => {}
        Channel::Archived => return reply(StatusCode::GONE, "channel_is_archived"),
        Channel::Restricted => return reply(StatusCode::FORBIDDEN, "action_prohibited"),
    }
    match &mut state.allowance {
        Some(0) => {
            let wait = state.retry_after_secs.to_string();
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [
                    (header::CONTENT_TYPE, "text/plain".to_string()),
                    (header::RETRY_AFTER, wait),
                ],
                "rate_limited",
            )
                .into_response();
        }
        Some(left) => *left -= 1,
        None => {}
    }
    state.messages.push(Value::Object(message));
    reply(StatusCode::OK, "ok")
}

/// At most 50 blocks of known types; section text up to 3000 characters and
/// header text up to 150, as Slack's Block Kit reference sets them.
fn blocks_are_valid(blocks: &[Value]) -> bool {
    let text_len = |block: &Value| {
        block["text"]["text"]
            .as_str()
            .map_or(0, |text| text.chars().count())
    };
    blocks.len() <= 50
        && blocks.iter().all(|block| match block["type"].as_str() {
            Some("section") => text_len(block) <= 3000,
            Some("header") => {
                block["text"]["type"] == "plain_text" && (1..=150).contains(&text_len(block))
            }
            Some(kind) => BLOCK_TYPES.contains(&kind),
            None => false,
        })
}

fn exported(uuid: &str, name: &str, properties: Value) -> ExportedEvent {
    ExportedEvent {
        uuid: uuid.into(),
        name: name.into(),
        distinct_id: "ada@example.com".into(),
        person_id: Some("person-1".into()),
        timestamp: "2024-05-01T12:00:00.000Z".into(),
        properties: properties.to_string(),
    }
}

fn uuid(n: u32) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

fn slack(config: Value) -> PluginInstance {
    // The fake is on loopback, which the operator must allow.
    let runtime = runtime(Policy {
        allow_loopback: true,
        ..Policy::default()
    });
    let plugin = runtime.load(&wasm("slack")).unwrap();
    plugin.install(install("slack", config)).unwrap()
}

fn permanent(result: Result<(), ExportFailure>) -> String {
    common::permanent("slack@0.1.0", result)
}

#[test]
fn posts_each_listed_event_as_its_own_message_rendered_from_the_event() {
    let fake = FakeSlack::start();
    let mut instance = slack(json!({
        "webhook_url": fake.webhook_url(),
        "events": ["subscription started", "subscription cancelled"],
        "text": "{{distinct_id}} did {{event}} ({{properties.plan.name}})",
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": "{{event}}"}},
            {"type": "section", "text": {"type": "mrkdwn", "text": "*{{distinct_id}}* · {{properties.plan.name}} · {{properties.seats}} seats"}},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": "event {{uuid}} at {{timestamp}}"}]},
        ],
    }));
    instance
        .export(vec![
            exported(
                &uuid(1),
                "subscription started",
                json!({"plan": {"name": "Pro & Co"}, "seats": 5}),
            ),
            exported(
                &uuid(2),
                "$pageview",
                json!({"$current_url": "https://x.test"}),
            ),
            exported(
                &uuid(3),
                "subscription cancelled",
                json!({"plan": {"name": "Team"}, "seats": 12}),
            ),
        ])
        .expect("delivered");

    let messages = fake.messages();
    assert_eq!(
        messages.len(),
        2,
        "the pageview is not listed: {messages:?}"
    );
    assert_eq!(
        messages[0],
        json!({
            "text": "ada@example.com did subscription started (Pro &amp; Co)",
            "blocks": [
                {"type": "header", "text": {"type": "plain_text", "text": "subscription started"}},
                {"type": "section", "text": {"type": "mrkdwn", "text": "*ada@example.com* · Pro &amp; Co · 5 seats"}},
                {"type": "context", "elements": [{"type": "mrkdwn", "text": format!("event {} at 2024-05-01T12:00:00.000Z", uuid(1))}]},
            ],
        })
    );
    assert_eq!(
        messages[1]["text"],
        "ada@example.com did subscription cancelled (Team)"
    );
    assert_eq!(
        messages[1]["blocks"][1]["text"]["text"],
        "*ada@example.com* · Team · 12 seats"
    );

    let (logs, calls) = instance.take_activity();
    assert_eq!(calls.len(), 2);
    assert!(calls.iter().all(|call| call.status == Some(200)));
    assert!(
        logs.iter().all(|line| !line.message.contains(SECRET)),
        "{logs:?}"
    );
}

#[test]
fn a_rate_limit_is_retryable_after_slacks_delay_and_the_retry_posts_only_the_rest() {
    let fake = FakeSlack::start();
    fake.set(|s| {
        s.allowance = Some(2);
        s.retry_after_secs = 17;
    });
    let mut instance = slack(json!({
        "webhook_url": fake.webhook_url(),
        "events": ["paid"],
        "text": "payment {{properties.n}}",
    }));
    let batch = || {
        (1..=4)
            .map(|n| exported(&uuid(n), "paid", json!({"n": n})))
            .collect::<Vec<_>>()
    };

    match instance.export(batch()) {
        Err(ExportFailure::Retryable {
            message,
            retry_after,
            ..
        }) => {
            assert_eq!(retry_after, Some(Duration::from_secs(17)));
            assert!(message.contains("HTTP 429 rate_limited"), "{message}");
            assert!(
                message.contains("2 of 4 message(s) were posted"),
                "{message}"
            );
        }
        other => panic!("a 429 should be retryable, got {other:?}"),
    }
    assert_eq!(fake.messages().len(), 2);

    fake.set(|s| s.allowance = None);
    instance.export(batch()).expect("the retry goes through");
    let texts: Vec<Value> = fake.messages().iter().map(|m| m["text"].clone()).collect();
    assert_eq!(
        texts,
        ["payment 1", "payment 2", "payment 3", "payment 4"],
        "each event is posted once, in order"
    );
}

#[test]
fn an_unknown_webhook_is_permanent_and_the_secret_stays_out_of_the_message() {
    let fake = FakeSlack::start();
    for url in [
        format!("{}/services/{TEAM}/{BOT}/revokedSecret999", fake.base),
        format!("{}/services/{TEAM}/{SECRET}", fake.base),
    ] {
        let mut instance = slack(json!({"webhook_url": url, "events": ["paid"]}));
        let message = permanent(instance.export(vec![exported(&uuid(1), "paid", json!({}))]));
        assert!(message.contains("HTTP 404 no_service"), "{message}");
        assert!(
            message.contains("create a new incoming webhook and set `webhook_url`"),
            "{message}"
        );
        assert!(!message.contains("revokedSecret999") && !message.contains(SECRET));
    }
    assert!(fake.messages().is_empty());
}

#[test]
fn an_archived_or_restricted_channel_is_permanent() {
    let fake = FakeSlack::start();
    let mut instance = slack(json!({"webhook_url": fake.webhook_url(), "events": ["paid"]}));
    let batch = || vec![exported(&uuid(1), "paid", json!({}))];

    fake.set(|s| s.channel = Channel::Archived);
    let message = permanent(instance.export(batch()));
    assert!(
        message.contains("HTTP 410 channel_is_archived"),
        "{message}"
    );
    assert!(message.contains("unarchive it"), "{message}");

    fake.set(|s| s.channel = Channel::Restricted);
    let message = permanent(instance.export(batch()));
    assert!(message.contains("HTTP 403 action_prohibited"), "{message}");

    fake.set(|s| s.channel = Channel::Open);
    instance
        .export(batch())
        .expect("posted once the channel is open");
    assert_eq!(fake.messages().len(), 1);
}

#[test]
fn blocks_slack_refuses_are_permanent_and_name_the_event() {
    let fake = FakeSlack::start();
    let mut instance = slack(json!({
        "webhook_url": fake.webhook_url(),
        "events": ["feedback"],
        "text": "feedback from {{distinct_id}}",
        "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": "{{properties.comment}}"}}],
    }));
    let long_comment = "é".repeat(3001);
    let message = permanent(instance.export(vec![
        exported(&uuid(1), "feedback", json!({"comment": "short"})),
        exported(&uuid(2), "feedback", json!({"comment": long_comment})),
    ]));
    assert!(message.contains("HTTP 400 invalid_blocks"), "{message}");
    assert!(
        message.contains(&format!("for event {}", uuid(2))),
        "{message}"
    );
    assert!(
        message.contains("1 of 2 message(s) were posted"),
        "{message}"
    );
    assert_eq!(fake.messages().len(), 1);

    let mut typo = slack(json!({
        "webhook_url": fake.webhook_url(),
        "events": ["feedback"],
        "blocks": [{"type": "sektion", "text": {"type": "mrkdwn", "text": "{{event}}"}}],
    }));
    let message = permanent(typo.export(vec![exported(&uuid(3), "feedback", json!({}))]));
    assert!(
        message.contains("check `blocks` against Block Kit"),
        "{message}"
    );
}

#[test]
fn a_slack_server_error_is_retryable() {
    let fake = FakeSlack::start();
    fake.set(|s| s.outage = Some((500, "rollup_error")));
    let mut instance = slack(json!({"webhook_url": fake.webhook_url(), "events": ["paid"]}));
    let batch = || vec![exported(&uuid(1), "paid", json!({}))];
    match instance.export(batch()) {
        Err(ExportFailure::Retryable {
            message,
            retry_after,
            ..
        }) => {
            assert_eq!(retry_after, None);
            assert!(message.contains("HTTP 500 rollup_error"), "{message}");
        }
        other => panic!("a 500 should be retryable, got {other:?}"),
    }
    instance.export(batch()).expect("Slack recovered");
    assert_eq!(
        fake.messages(),
        [json!({"text": "ada@example.com did paid"})]
    );
}

/// The fake must refuse what Slack refuses, or the tests above prove nothing.
#[test]
fn the_fake_refuses_what_slack_refuses() {
    let fake = FakeSlack::start();
    let url = fake.webhook_url();
    let post = |url: String, content_type: &'static str, body: &'static str| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let response = reqwest::Client::new()
                .post(url)
                .header("content-type", content_type)
                .body(body)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let kind = response.headers()["content-type"]
                .to_str()
                .unwrap()
                .to_string();
            (status, kind, response.text().await.unwrap())
        })
    };
    let json = "application/json";
    let expect = |answer: (u16, String, String), status: u16, body: &str| {
        assert_eq!((answer.0, answer.2.as_str()), (status, body));
        assert_eq!(answer.1, "text/plain");
    };
    expect(post(url.clone(), json, r#"{"text":"hi"}"#), 200, "ok");
    expect(
        post(url.clone(), json, r#"{"text":"hi""#),
        400,
        "invalid_payload",
    );
    expect(
        post(url.clone(), "text/plain", r#"{"text":"hi"}"#),
        400,
        "invalid_payload",
    );
    expect(post(url.clone(), json, r#"{"text":"  "}"#), 400, "no_text");
    expect(
        post(url.clone(), json, r#"{"blocks":[{"type":"nope"}]}"#),
        400,
        "invalid_blocks",
    );
    expect(
        post(format!("{url}x"), json, r#"{"text":"hi"}"#),
        404,
        "no_service",
    );
    expect(
        post(
            format!("{}/services/X/Y/Z", fake.base),
            json,
            r#"{"text":"hi"}"#,
        ),
        404,
        "no_service",
    );
    expect(
        post(format!("{}/api/chat", fake.base), json, r#"{"text":"hi"}"#),
        404,
        "no_service",
    );
    assert_eq!(fake.messages().len(), 1);
}
