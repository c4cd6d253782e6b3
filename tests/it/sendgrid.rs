//! The SendGrid destination, built as a component and run by the real
//! runtime against a local fake of SendGrid's Marketing contacts API. The
//! fake checks requests the way SendGrid documents (Bearer key, `PUT` only,
//! `Accept`, 1 to 30,000 contacts and at most 6 MB, an identifier on every
//! contact, custom field IDs that exist), answers 202 with a fresh job id,
//! sends the rate-limit headers on every response and a 429 when told to.

use crate::common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use common::{install, runtime, wasm};
use serde_json::{Map, Value, json};
use sluice::runtime::{ExportFailure, ExportedEvent, PluginInstance, Policy};

pub(crate) const API_KEY: &str = "SG.fake-key.0123456789";
const LIST: &str = "ca7a3796-e8a8-4029-9ccb-df8937940562";
/// The decimal reading of SendGrid's 6 MB, the stricter one.
const MAX_BODY_BYTES: usize = 6_000_000;
const MAX_CONTACTS: usize = 30_000;
const IDENTIFIERS: &[&str] = &["email", "phone_number_id", "external_id", "anonymous_id"];
const RESERVED_FIELDS: &[&str] = &[
    "email",
    "phone_number_id",
    "external_id",
    "anonymous_id",
    "alternate_emails",
    "first_name",
    "last_name",
    "address_line_1",
    "address_line_2",
    "city",
    "state_province_region",
    "postal_code",
    "country",
    "custom_fields",
];
/// Custom fields defined in the fake account: ID → whether it is a number.
const CUSTOM_FIELDS: &[(&str, bool)] = &[("e1_T", false), ("e2_N", true)];

#[derive(Default)]
struct SendGridState {
    /// Contacts by email, with the lists they are on.
    contacts: BTreeMap<String, (Map<String, Value>, Vec<String>)>,
    /// Accepted request bodies and their sizes.
    requests: Vec<(usize, Value)>,
    jobs: u64,
    /// Requests left before 429; `None` is no limit.
    allowance: Option<usize>,
    /// Unix seconds when the current window ends.
    reset: u64,
    /// A status to answer the next request with, as in an outage.
    outage: Option<u16>,
}

type Shared = Arc<Mutex<SendGridState>>;

pub(crate) struct FakeSendGrid {
    state: Shared,
    pub(crate) base: String,
}

impl FakeSendGrid {
    pub(crate) fn start() -> FakeSendGrid {
        let state: Shared = Arc::default();
        state.lock().unwrap().reset = now_secs() + 60;
        let contacts = axum::routing::put(upsert_contacts).fallback(|| async {
            failure(
                StatusCode::METHOD_NOT_ALLOWED,
                None,
                "method not allowed",
                0,
            )
        });
        let router = axum::Router::new()
            .route("/v3/marketing/contacts", contacts)
            // SendGrid itself answers bodies over its limit with 413.
            .layer(DefaultBodyLimit::max(64 << 20))
            .with_state(state.clone());
        let addr = common::serve(router);
        FakeSendGrid {
            state,
            base: format!("http://127.0.0.1:{}", addr.port()),
        }
    }

    fn set(&self, change: impl FnOnce(&mut SendGridState)) {
        change(&mut self.state.lock().unwrap());
    }

    pub(crate) fn contacts(&self) -> BTreeMap<String, (Map<String, Value>, Vec<String>)> {
        self.state.lock().unwrap().contacts.clone()
    }

    fn requests(&self) -> Vec<(usize, Value)> {
        self.state.lock().unwrap().requests.clone()
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Every SendGrid answer carries the key's rate-limit headers.
fn with_rate_headers(mut response: Response, remaining: usize, reset: u64) -> Response {
    let headers = response.headers_mut();
    headers.insert("x-ratelimit-limit", "600".parse().unwrap());
    headers.insert(
        "x-ratelimit-remaining",
        remaining.to_string().parse().unwrap(),
    );
    headers.insert("x-ratelimit-reset", reset.to_string().parse().unwrap());
    response
}

/// SendGrid's error body.
fn failure(status: StatusCode, field: Option<&str>, message: &str, reset: u64) -> Response {
    let body = json!({"errors": [{"field": field, "message": message}]});
    with_rate_headers((status, Json(body)).into_response(), 599, reset)
}

async fn upsert_contacts(State(state): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let mut state = state.lock().unwrap();
    let reset = state.reset;
    let bad =
        |field: &str, message: &str| failure(StatusCode::BAD_REQUEST, Some(field), message, reset);
    let authorized = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {API_KEY}"));
    if !authorized {
        return failure(
            StatusCode::UNAUTHORIZED,
            None,
            "authorization required",
            reset,
        );
    }
    match &mut state.allowance {
        Some(0) => {
            return failure(
                StatusCode::TOO_MANY_REQUESTS,
                None,
                "too many requests",
                reset,
            );
        }
        Some(left) => *left -= 1,
        None => {}
    }
    if let Some(status) = state.outage.take() {
        return failure(
            StatusCode::from_u16(status).unwrap(),
            None,
            "internal error",
            reset,
        );
    }
    let accepts_json = headers
        .get("accept")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/json") || v.contains("*/*"));
    if !accepts_json {
        return failure(
            StatusCode::NOT_ACCEPTABLE,
            None,
            "Accept must allow application/json",
            reset,
        );
    }
    if body.len() > MAX_BODY_BYTES {
        return failure(
            StatusCode::PAYLOAD_TOO_LARGE,
            None,
            "request body is over 6 MB",
            reset,
        );
    }
    let Ok(Value::Object(request)) = serde_json::from_slice::<Value>(&body) else {
        return bad("", "invalid JSON");
    };
    let lists: Vec<String> = match request.get("list_ids") {
        None => Vec::new(),
        Some(Value::Array(ids)) => {
            let mut lists = Vec::new();
            for id in ids {
                match id.as_str() {
                    Some(LIST) => lists.push(LIST.to_string()),
                    _ => return bad("list_ids", &format!("{id} is not a valid list ID")),
                }
            }
            lists
        }
        Some(_) => return bad("list_ids", "must be an array of list IDs"),
    };
    let Some(Value::Array(contacts)) = request.get("contacts") else {
        return bad("contacts", "contacts is required");
    };
    if contacts.is_empty() || contacts.len() > MAX_CONTACTS {
        return bad(
            "contacts",
            &format!("must hold 1 to 30000 contacts, got {}", contacts.len()),
        );
    }
    for (i, contact) in contacts.iter().enumerate() {
        let at = format!("contacts[{i}]");
        let Some(contact) = contact.as_object() else {
            return bad(&at, "must be an object");
        };
        let identified = IDENTIFIERS.iter().any(|id| {
            contact
                .get(*id)
                .and_then(Value::as_str)
                .is_some_and(|v| !v.is_empty())
        });
        if !identified {
            return bad(&at, "contact must have at least one identifier");
        }
        for (key, value) in contact {
            if !RESERVED_FIELDS.contains(&key.as_str()) {
                return bad(&format!("{at}.{key}"), "is not a reserved field");
            }
            if key != "custom_fields" && key != "alternate_emails" && !value.is_string() {
                return bad(&format!("{at}.{key}"), "must be a string");
            }
        }
        if let Some(email) = contact.get("email").and_then(Value::as_str)
            && (!email.contains('@') || email != email.to_lowercase())
        {
            return bad(&format!("{at}.email"), "must be a valid lowercase email");
        }
        let custom = match contact.get("custom_fields") {
            None => &Map::new(),
            Some(Value::Object(custom)) => custom,
            Some(_) => return bad(&format!("{at}.custom_fields"), "must be an object"),
        };
        for (id, value) in custom {
            match CUSTOM_FIELDS.iter().find(|(known, _)| known == id) {
                None => {
                    return bad(
                        "custom_fields",
                        &format!("{id} is not a valid custom field ID"),
                    );
                }
                Some((_, true)) if !value.is_number() => {
                    return bad("custom_fields", &format!("{id} must be a number"));
                }
                Some((_, false)) if !value.is_string() => {
                    return bad("custom_fields", &format!("{id} must be text"));
                }
                _ => {}
            }
        }
    }

    for contact in contacts {
        let contact = contact.as_object().unwrap();
        let key = contact.get("email").and_then(Value::as_str).unwrap_or("");
        let (stored, on_lists) = state.contacts.entry(key.to_string()).or_default();
        // Fields that are not sent stay as they were.
        for (field, value) in contact {
            if let (Some(Value::Object(old)), Value::Object(new)) = (stored.get_mut(field), value) {
                old.extend(new.clone());
            } else {
                stored.insert(field.clone(), value.clone());
            }
        }
        for list in &lists {
            if !on_lists.contains(list) {
                on_lists.push(list.clone());
            }
        }
    }
    state
        .requests
        .push((body.len(), Value::Object(request.clone())));
    state.jobs += 1;
    let job = format!("2f6d7a4b-0000-4000-8000-{:012}", state.jobs);
    with_rate_headers(
        (StatusCode::ACCEPTED, Json(json!({ "job_id": job }))).into_response(),
        599,
        reset,
    )
}

fn exported(uuid: &str, name: &str, distinct_id: &str, properties: Value) -> ExportedEvent {
    ExportedEvent {
        uuid: uuid.into(),
        name: name.into(),
        distinct_id: distinct_id.into(),
        person_id: None,
        timestamp: "2024-05-01T12:00:00.000Z".into(),
        properties: properties.to_string(),
    }
}

fn uuid(n: u32) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

fn identify(n: u32, set: Value) -> ExportedEvent {
    exported(
        &uuid(n),
        "$identify",
        &format!("user-{n}"),
        json!({ "$set": set }),
    )
}

fn sendgrid(fake: &FakeSendGrid, mut config: Value) -> PluginInstance {
    config["base_url"] = json!(fake.base);
    // The fake is on loopback, which the operator must allow.
    let runtime = runtime(Policy {
        allow_loopback: true,
        ..Policy::default()
    });
    let plugin = runtime.load(&wasm("sendgrid")).unwrap();
    plugin.install(install("sendgrid", config)).unwrap()
}

fn permanent(result: Result<(), ExportFailure>) -> String {
    common::permanent("sendgrid@0.1.0", result)
}

#[test]
fn upserts_contacts_from_person_updates_with_every_field_checked() {
    let fake = FakeSendGrid::start();
    let mut instance = sendgrid(
        &fake,
        json!({
            "api_key": API_KEY,
            "list_ids": [LIST],
            "field_mapping": {"email": "email", "firstName": "first_name", "lastName": "last_name", "town": "city"},
            "custom_fields": {"plan": "e1_T", "seats": "e2_N"},
        }),
    );
    instance
        .export(vec![
            identify(
                1,
                json!({"email": "Ada@Example.com", "firstName": "Ada", "town": "London", "seats": "5"}),
            ),
            exported(
                &uuid(2),
                "upgraded",
                "user-1",
                json!({"email": "ada@example.com", "$set": {"plan": "pro", "seats": 12, "lastName": "Lovelace"}}),
            ),
            exported(
                &uuid(3),
                "$pageview",
                "user-3",
                json!({"email": "bob@example.com"}),
            ),
            identify(4, json!({"firstName": "No email"})),
            identify(5, json!({"email": "bob@example.com"})),
        ])
        .expect("delivered");

    let requests = fake.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(
        requests[0].1,
        json!({
            "list_ids": [LIST],
            "contacts": [
                {"email": "ada@example.com", "first_name": "Ada", "city": "London", "last_name": "Lovelace",
                 "external_id": "user-1", "custom_fields": {"e2_N": 12, "e1_T": "pro"}},
                {"email": "bob@example.com", "external_id": "user-5"},
            ],
        })
    );
    let contacts = fake.contacts();
    assert_eq!(
        contacts.keys().collect::<Vec<_>>(),
        ["ada@example.com", "bob@example.com"]
    );
    assert_eq!(contacts["ada@example.com"].1, [LIST]);

    let (logs, calls) = instance.take_activity();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].status, Some(202));
    let lines: Vec<&str> = logs.iter().map(|l| l.message.as_str()).collect();
    assert!(
        lines.contains(
            &format!(
                "skipped 1 event(s) without a usable email address: {}",
                uuid(4)
            )
            .as_str()
        ),
        "{lines:?}"
    );
    assert!(
        lines.contains(&"SendGrid queued 2 contact(s) from 3 event(s) in 1 request(s); job(s) 2f6d7a4b-0000-4000-8000-000000000001"),
        "{lines:?}"
    );

    // Redelivery is an upsert: the same two contacts, not four.
    instance
        .export(vec![identify(
            5,
            json!({"email": "bob@example.com", "firstName": "Bob"}),
        )])
        .expect("delivered again");
    let contacts = fake.contacts();
    assert_eq!(contacts.len(), 2);
    assert_eq!(contacts["bob@example.com"].0["first_name"], "Bob");
}

#[test]
fn requests_are_split_at_30000_contacts() {
    let fake = FakeSendGrid::start();
    let mut instance = sendgrid(&fake, json!({"api_key": API_KEY, "external_id": ""}));
    let events: Vec<ExportedEvent> = (1..=30_001)
        .map(|n| identify(n, json!({"email": format!("u{n}@x.io")})))
        .collect();
    instance.export(events).expect("delivered");
    let sizes: Vec<usize> = fake
        .requests()
        .iter()
        .map(|(_, body)| body["contacts"].as_array().unwrap().len())
        .collect();
    assert_eq!(sizes, [30_000, 1]);
    assert_eq!(fake.contacts().len(), 30_001);
}

#[test]
fn requests_are_split_below_6_mb() {
    let fake = FakeSendGrid::start();
    let mut instance = sendgrid(
        &fake,
        json!({"api_key": API_KEY, "custom_fields": {"bio": "e1_T"}}),
    );
    let bio = "b".repeat(700_000);
    let events: Vec<ExportedEvent> = (1..=12)
        .map(|n| identify(n, json!({"email": format!("u{n}@x.io"), "bio": bio})))
        .collect();
    instance.export(events).expect("delivered");
    let requests = fake.requests();
    let sizes: Vec<usize> = requests.iter().map(|(bytes, _)| *bytes).collect();
    assert_eq!(requests.len(), 2, "{sizes:?}");
    assert!(
        sizes.iter().all(|bytes| *bytes <= MAX_BODY_BYTES),
        "{sizes:?}"
    );
    assert_eq!(fake.contacts().len(), 12);
}

#[test]
fn a_rate_limit_is_retryable_until_sendgrids_reset_time() {
    let fake = FakeSendGrid::start();
    let reset = now_secs() + 90;
    fake.set(|s| {
        s.allowance = Some(0);
        s.reset = reset;
    });
    let mut instance = sendgrid(&fake, json!({"api_key": API_KEY}));
    let batch = || vec![identify(1, json!({"email": "ada@example.com"}))];

    let before = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let result = instance.export(batch());
    let after = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    match result {
        Err(ExportFailure::Retryable {
            message,
            retry_after: Some(wait),
            ..
        }) => {
            // The plugin reads the reset against the clock at some moment
            // during the call.
            let reset = Duration::from_secs(reset);
            assert!(wait <= reset - before && wait >= reset - after, "{wait:?}");
            assert!(message.contains("HTTP 429 too many requests"), "{message}");
        }
        other => panic!("a 429 should be retryable with a wait, got {other:?}"),
    }
    assert!(fake.contacts().is_empty());

    fake.set(|s| s.allowance = None);
    instance.export(batch()).expect("the window reset");
    assert_eq!(fake.contacts().len(), 1);
}

#[test]
fn an_outage_is_retryable() {
    let fake = FakeSendGrid::start();
    fake.set(|s| s.outage = Some(503));
    let mut instance = sendgrid(&fake, json!({"api_key": API_KEY}));
    match instance.export(vec![identify(1, json!({"email": "a@x.io"}))]) {
        Err(ExportFailure::Retryable { message, .. }) => {
            assert!(message.contains("HTTP 503 internal error"), "{message}")
        }
        other => panic!("a 503 should be retryable, got {other:?}"),
    }
}

#[test]
fn a_wrong_api_key_is_permanent() {
    let fake = FakeSendGrid::start();
    let mut instance = sendgrid(&fake, json!({"api_key": "SG.revoked"}));
    let message = permanent(instance.export(vec![identify(1, json!({"email": "a@x.io"}))]));
    assert!(
        message.contains("HTTP 401 authorization required"),
        "{message}"
    );
    assert!(message.contains("check `api_key`"), "{message}");
    assert!(!message.contains("SG.revoked"), "{message}");
}

#[test]
fn an_unknown_custom_field_or_list_is_a_permanent_validation_error() {
    let fake = FakeSendGrid::start();
    let mut instance = sendgrid(
        &fake,
        json!({"api_key": API_KEY, "custom_fields": {"plan": "e9_T"}}),
    );
    let message =
        permanent(instance.export(vec![identify(7, json!({"email": "a@x.io", "plan": "pro"}))]));
    assert!(
        message.contains("HTTP 400 custom_fields: e9_T is not a valid custom field ID"),
        "{message}"
    );
    assert!(message.contains(&uuid(7)), "{message}");

    let mut instance = sendgrid(
        &fake,
        json!({"api_key": API_KEY, "list_ids": ["not-a-list"]}),
    );
    let message = permanent(instance.export(vec![identify(8, json!({"email": "a@x.io"}))]));
    assert!(
        message.contains("list_ids: \"not-a-list\" is not a valid list ID"),
        "{message}"
    );
    assert!(fake.contacts().is_empty());
}

/// The fake must refuse what SendGrid refuses, or the tests above prove
/// nothing.
#[test]
fn the_fake_refuses_what_sendgrid_refuses() {
    let fake = FakeSendGrid::start();
    let url = format!("{}/v3/marketing/contacts", fake.base);
    let send = |method: &str, key: Option<&str>, accept: bool, body: Vec<u8>| -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let (url, key) = (url.clone(), key.map(str::to_string));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut request = reqwest::Client::new()
                .request(method, url)
                .header("content-type", "application/json")
                .body(body);
            if let Some(key) = key {
                request = request.bearer_auth(key);
            }
            // reqwest sends `Accept: */*` by default, which SendGrid takes.
            let accept = if accept {
                "application/json"
            } else {
                "text/html"
            };
            request = request.header("accept", accept);
            let response = request.send().await.unwrap();
            for header in [
                "x-ratelimit-limit",
                "x-ratelimit-remaining",
                "x-ratelimit-reset",
            ] {
                assert!(response.headers().contains_key(header), "{header}");
            }
            let status = response.status().as_u16();
            let bytes = response.bytes().await.unwrap();
            (
                status,
                serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            )
        })
    };
    let contacts = |contacts: Value| json!({ "contacts": contacts }).to_string().into_bytes();
    let ok = || contacts(json!([{"email": "a@x.io"}]));

    assert_eq!(send("POST", Some(API_KEY), true, ok()).0, 405);
    assert_eq!(send("PUT", None, true, ok()).0, 401);
    assert_eq!(send("PUT", Some(API_KEY), false, ok()).0, 406);
    assert_eq!(send("PUT", Some(API_KEY), true, b"{".to_vec()).0, 400);
    assert_eq!(send("PUT", Some(API_KEY), true, contacts(json!([]))).0, 400);
    let (status, body) = send(
        "PUT",
        Some(API_KEY),
        true,
        contacts(json!([{"first_name": "Ada"}])),
    );
    assert_eq!(status, 400);
    assert_eq!(
        body["errors"][0]["message"],
        "contact must have at least one identifier"
    );
    let too_many: Vec<Value> = (0..30_001)
        .map(|i| json!({"external_id": i.to_string()}))
        .collect();
    assert_eq!(
        send("PUT", Some(API_KEY), true, contacts(Value::Array(too_many))).0,
        400
    );
    let huge = contacts(
        json!([{"email": "a@x.io", "custom_fields": {"e1_T": "x".repeat(MAX_BODY_BYTES)}}]),
    );
    assert_eq!(send("PUT", Some(API_KEY), true, huge).0, 413);
    let text_in_number = contacts(json!([{"email": "a@x.io", "custom_fields": {"e2_N": "12"}}]));
    assert_eq!(send("PUT", Some(API_KEY), true, text_in_number).0, 400);
    assert!(fake.contacts().is_empty());

    let (status, first) = send("PUT", Some(API_KEY), true, ok());
    let (_, second) = send("PUT", Some(API_KEY), true, ok());
    assert_eq!(status, 202);
    assert_ne!(first["job_id"], second["job_id"]);
    assert_eq!(fake.contacts().len(), 1);
}
