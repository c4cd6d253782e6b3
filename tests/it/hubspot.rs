//! The HubSpot destination, built as a component and run by the real
//! runtime against a local fake of HubSpot's CRM v3 contacts batch API. The
//! fake checks requests the way HubSpot documents (Bearer token and scope,
//! 1 to 100 inputs, string property values, a unique `idProperty`, known
//! properties, no id twice), keeps contacts so `new` is right, answers with
//! HubSpot's rate headers and error bodies, and can be told to throttle.

use crate::common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use common::{install, runtime, wasm};
use serde_json::{Value, json};
use sluice::runtime::{ExportFailure, ExportedEvent, PluginInstance, Policy};

pub(crate) const TOKEN: &str = "pat-na1-11111111-2222-3333-4444-555555555555";
/// A real token of an app without the contacts write scope.
const READ_ONLY_TOKEN: &str = "pat-na1-readonly";

/// Properties the fake account has; the unique ones may be `idProperty`.
const PROPERTIES: &[&str] = &[
    "email",
    "firstname",
    "lastname",
    "phone",
    "company",
    "website",
    "plan_tier",
    "app_user_id",
];
const UNIQUE_PROPERTIES: &[&str] = &["email", "app_user_id"];

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Contact {
    id: u64,
    properties: BTreeMap<String, String>,
}

#[derive(Default)]
struct HubSpotState {
    contacts: Vec<Contact>,
    /// Bodies of the upsert requests that passed authentication.
    requests: Vec<Value>,
    /// The `policyName` of a 429 to answer to the next request.
    throttle: Option<&'static str>,
    /// A status to answer the next request with, as in an outage.
    outage: Option<u16>,
    next_id: u64,
}

impl HubSpotState {
    fn find(&self, id_property: &str, id: &str) -> Option<usize> {
        self.contacts.iter().position(|contact| {
            contact
                .properties
                .get(id_property)
                .is_some_and(|value| same_id(id_property, value, id))
        })
    }
}

fn same_id(id_property: &str, a: &str, b: &str) -> bool {
    // HubSpot compares emails without regard to case.
    match id_property {
        "email" => a.eq_ignore_ascii_case(b),
        _ => a == b,
    }
}

type Shared = Arc<Mutex<HubSpotState>>;

#[derive(Clone)]
pub(crate) struct FakeHubSpot {
    state: Shared,
    pub(crate) base: String,
}

impl FakeHubSpot {
    pub(crate) fn start() -> FakeHubSpot {
        let state: Shared = Arc::default();
        let router = axum::Router::new()
            .route(
                "/crm/v3/objects/contacts/batch/upsert",
                axum::routing::post(upsert_contacts),
            )
            .route(
                "/crm/v3/objects/contacts/batch/create",
                axum::routing::post(create_contacts),
            )
            .with_state(state.clone());
        let addr = common::serve(router);
        FakeHubSpot {
            state,
            base: format!("http://127.0.0.1:{}", addr.port()),
        }
    }

    fn set(&self, change: impl FnOnce(&mut HubSpotState)) {
        change(&mut self.state.lock().unwrap());
    }

    pub(crate) fn contacts(&self) -> Vec<Contact> {
        self.state.lock().unwrap().contacts.clone()
    }

    fn requests(&self) -> Vec<Value> {
        self.state.lock().unwrap().requests.clone()
    }

    fn add_contact(&self, properties: &[(&str, &str)]) {
        self.set(|s| {
            s.next_id += 1;
            let id = s.next_id;
            s.contacts.push(Contact {
                id,
                properties: properties
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            });
        });
    }
}

/// HubSpot's error body. The message texts are HubSpot's where known.
fn error(status: StatusCode, category: &str, message: &str, details: Value) -> Response {
    let mut body = json!({
        "status": "error",
        "message": message,
        "correlationId": "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee",
        "category": category,
    });
    if !details.is_null() {
        body["errors"] = details;
    }
    with_rate_headers((status, Json(body)).into_response())
}

/// Every HubSpot answer carries the account's rate-limit headers.
fn with_rate_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        ("x-hubspot-ratelimit-daily", "250000"),
        ("x-hubspot-ratelimit-daily-remaining", "249000"),
        ("x-hubspot-ratelimit-interval-milliseconds", "10000"),
        ("x-hubspot-ratelimit-max", "190"),
        ("x-hubspot-ratelimit-remaining", "189"),
        ("x-hubspot-ratelimit-secondly", "19"),
        ("x-hubspot-ratelimit-secondly-remaining", "18"),
        (
            "x-hubspot-correlation-id",
            "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee",
        ),
    ] {
        headers.insert(name, value.parse().unwrap());
    }
    response
}

/// Authentication, scripted failures and the checks every batch endpoint
/// makes; the parsed inputs on success.
// The refusal is the fake's reply, built once per request; its size does
// not matter.
#[allow(clippy::result_large_err)]
fn admit(state: &Shared, headers: &HeaderMap, body: &Bytes) -> Result<Vec<Value>, Response> {
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match token {
        Some(TOKEN) => {}
        Some(READ_ONLY_TOKEN) => {
            return Err(error(
                StatusCode::FORBIDDEN,
                "MISSING_SCOPES",
                "This app hasn't been granted all required scopes to make this call.",
                json!([{"message": "One or more of the following scopes are required.",
                        "context": {"requiredGranularScopes": ["crm.objects.contacts.write"]}}]),
            ));
        }
        _ => {
            return Err(error(
                StatusCode::UNAUTHORIZED,
                "INVALID_AUTHENTICATION",
                "Authentication credentials not found.",
                Value::Null,
            ));
        }
    }
    let mut state = state.lock().unwrap();
    if let Some(policy) = state.throttle.take() {
        let body = json!({
            "status": "error",
            "message": format!("You have reached your {} limit.", policy.to_lowercase()),
            "errorType": "RATE_LIMIT",
            "correlationId": "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee",
            "policyName": policy,
            "requestId": "req-1",
        });
        return Err(with_rate_headers(
            (StatusCode::TOO_MANY_REQUESTS, Json(body)).into_response(),
        ));
    }
    if let Some(status) = state.outage.take() {
        return Err(error(
            StatusCode::from_u16(status).unwrap(),
            "INTERNAL_ERROR",
            "internal error",
            Value::Null,
        ));
    }
    let json_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let Some(Value::Array(inputs)) = parsed
        .as_ref()
        .filter(|_| json_type)
        .map(|b| b["inputs"].clone())
    else {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "VALIDATION_ERROR",
            "Invalid input JSON: expected an object with `inputs`",
            Value::Null,
        ));
    };
    state.requests.push(parsed.unwrap());
    if inputs.is_empty() || inputs.len() > 100 {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "VALIDATION_ERROR",
            &format!("inputs must hold 1 to 100 items, got {}", inputs.len()),
            Value::Null,
        ));
    }
    for (i, input) in inputs.iter().enumerate() {
        let Some(properties) = input["properties"].as_object() else {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "VALIDATION_ERROR",
                &format!("inputs[{i}].properties is required"),
                Value::Null,
            ));
        };
        if let Some((name, _)) = properties.iter().find(|(_, v)| !v.is_string()) {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "VALIDATION_ERROR",
                &format!("inputs[{i}].properties.{name} must be a string"),
                Value::Null,
            ));
        }
        let unknown: Vec<Value> = properties
            .keys()
            .filter(|name| !PROPERTIES.contains(&name.as_str()))
            .map(|name| {
                json!({"message": format!("Property \"{name}\" does not exist"),
                       "code": "PROPERTY_DOESNT_EXIST", "context": {"propertyName": [name]}})
            })
            .collect();
        if !unknown.is_empty() {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "VALIDATION_ERROR",
                "Property values were not valid",
                Value::Array(unknown),
            ));
        }
    }
    Ok(inputs)
}

async fn upsert_contacts(State(state): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let inputs = match admit(&state, &headers, &body) {
        Ok(inputs) => inputs,
        Err(response) => return response,
    };
    for (i, input) in inputs.iter().enumerate() {
        let id_property = input["idProperty"].as_str().unwrap_or("hs_object_id");
        if !UNIQUE_PROPERTIES.contains(&id_property) {
            return error(
                StatusCode::BAD_REQUEST,
                "VALIDATION_ERROR",
                &format!("Unable to perform update/upsert by non-unique {id_property} property"),
                Value::Null,
            );
        }
        let Some(id) = input["id"].as_str().filter(|id| !id.is_empty()) else {
            return error(
                StatusCode::BAD_REQUEST,
                "VALIDATION_ERROR",
                &format!("inputs[{i}].id is required"),
                Value::Null,
            );
        };
        let twice = inputs[..i].iter().any(|other| {
            other["idProperty"] == input["idProperty"]
                && other["id"]
                    .as_str()
                    .is_some_and(|o| same_id(id_property, o, id))
        });
        if twice {
            return error(
                StatusCode::BAD_REQUEST,
                "VALIDATION_ERROR",
                &format!("Duplicate IDs found in batch input: [{id}]"),
                Value::Null,
            );
        }
    }

    let mut state = state.lock().unwrap();
    let mut results = Vec::new();
    let mut errors = Vec::new();
    let now = "2024-05-01T12:00:00.000Z";
    for input in &inputs {
        let id_property = input["idProperty"].as_str().unwrap();
        let id = input["id"].as_str().unwrap();
        let trace = input["objectWriteTraceId"].as_str();
        if id_property == "email" && (!id.contains('@') || id.ends_with(".invalid")) {
            let context = match trace {
                Some(trace) => json!({"objectWriteTraceId": [trace]}),
                None => json!({"ids": [id]}),
            };
            errors.push(json!({
                "status": "error",
                "category": "VALIDATION_ERROR",
                "message": format!("Email address {id} is invalid"),
                "context": context,
                "errors": [],
            }));
            continue;
        }
        let mut properties: BTreeMap<String, String> = input["properties"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect();
        properties.insert(id_property.to_string(), id.to_string());
        let (contact, new) = match state.find(id_property, id) {
            Some(index) => {
                let contact = &mut state.contacts[index];
                for (name, value) in properties {
                    // An empty string clears a property.
                    if value.is_empty() {
                        contact.properties.remove(&name);
                    } else {
                        contact.properties.insert(name, value);
                    }
                }
                (contact.clone(), false)
            }
            None => {
                state.next_id += 1;
                properties.retain(|_, v| !v.is_empty());
                let contact = Contact {
                    id: state.next_id,
                    properties,
                };
                state.contacts.push(contact.clone());
                (contact, true)
            }
        };
        let mut result = json!({
            "id": contact.id.to_string(),
            "properties": contact.properties,
            "createdAt": now,
            "updatedAt": now,
            "archived": false,
            "new": new,
        });
        if let Some(trace) = trace {
            result["objectWriteTraceId"] = json!(trace);
        }
        results.push(result);
    }
    let mut body = json!({
        "status": "COMPLETE",
        "results": results,
        "startedAt": now,
        "completedAt": now,
    });
    let status = if errors.is_empty() {
        StatusCode::OK
    } else {
        body["numErrors"] = json!(errors.len());
        body["errors"] = Value::Array(errors);
        StatusCode::MULTI_STATUS
    };
    with_rate_headers((status, Json(body)).into_response())
}

/// Batch create, which is not idempotent: an existing email is a conflict.
async fn create_contacts(State(state): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let inputs = match admit(&state, &headers, &body) {
        Ok(inputs) => inputs,
        Err(response) => return response,
    };
    let mut state = state.lock().unwrap();
    for input in &inputs {
        if let Some(email) = input["properties"]["email"].as_str()
            && let Some(index) = state.find("email", email)
        {
            let existing = state.contacts[index].id;
            return error(
                StatusCode::CONFLICT,
                "CONFLICT",
                &format!("Contact already exists. Existing ID: {existing}"),
                Value::Null,
            );
        }
    }
    let mut results = Vec::new();
    for input in &inputs {
        state.next_id += 1;
        let properties: BTreeMap<String, String> = input["properties"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect();
        let contact = Contact {
            id: state.next_id,
            properties,
        };
        results.push(json!({"id": contact.id.to_string(), "properties": contact.properties}));
        state.contacts.push(contact);
    }
    with_rate_headers(
        (
            StatusCode::CREATED,
            Json(json!({"status": "COMPLETE", "results": results})),
        )
            .into_response(),
    )
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

fn uuid(n: u32) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

fn identify(n: u32, set: Value) -> ExportedEvent {
    exported(&uuid(n), "$identify", json!({ "$set": set }))
}

fn hubspot(fake: &FakeHubSpot, mut config: Value) -> PluginInstance {
    config["base_url"] = json!(fake.base);
    // The fake is on loopback, which the operator must allow.
    let runtime = runtime(Policy {
        allow_loopback: true,
        ..Policy::default()
    });
    let plugin = runtime.load(&wasm("hubspot")).unwrap();
    plugin.install(install("hubspot", config)).unwrap()
}

fn props(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn permanent(result: Result<(), ExportFailure>) -> String {
    common::permanent("hubspot@0.1.0", result)
}

#[test]
fn upserts_contacts_from_person_updates_with_every_field_checked() {
    let fake = FakeHubSpot::start();
    fake.add_contact(&[
        ("email", "ada@example.com"),
        ("firstname", "Ada"),
        ("phone", "+44 1"),
    ]);
    let mut instance = hubspot(
        &fake,
        json!({
            "token": TOKEN,
            "property_mapping": {
                "email": "email", "firstName": "firstname", "lastName": "lastname",
                "phone": "phone", "plan": "plan_tier", "seats": "company",
            },
        }),
    );
    instance
        .export(vec![
            identify(
                1,
                json!({"email": "ADA@example.com", "lastName": "Lovelace", "phone": null, "plan": "pro", "$os": "Mac"}),
            ),
            exported(&uuid(2), "$pageview", json!({"email": "ada@example.com"})),
            exported(
                &uuid(3),
                "order paid",
                json!({"email": "bob@example.com", "$set": {"firstName": "Bob", "seats": 12}}),
            ),
            identify(4, json!({"firstName": "No email"})),
        ])
        .expect("delivered");

    let requests = fake.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(
        requests[0],
        json!({"inputs": [
            {"idProperty": "email", "id": "ada@example.com", "objectWriteTraceId": uuid(1),
             "properties": {"email": "ada@example.com", "lastname": "Lovelace", "phone": "", "plan_tier": "pro"}},
            {"idProperty": "email", "id": "bob@example.com", "objectWriteTraceId": uuid(3),
             "properties": {"firstname": "Bob", "company": "12", "email": "bob@example.com"}},
        ]})
    );
    assert_eq!(
        fake.contacts(),
        [
            Contact {
                id: 1,
                properties: props(&[
                    ("email", "ada@example.com"),
                    ("firstname", "Ada"),
                    ("lastname", "Lovelace"),
                    ("plan_tier", "pro"),
                ]),
            },
            Contact {
                id: 2,
                properties: props(&[
                    ("email", "bob@example.com"),
                    ("firstname", "Bob"),
                    ("company", "12"),
                ]),
            },
        ]
    );

    let (logs, calls) = instance.take_activity();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].status, Some(200));
    let lines: Vec<&str> = logs.iter().map(|l| l.message.as_str()).collect();
    assert!(
        lines.contains(
            &format!("skipped 1 event(s) without a usable `email`: {}", uuid(4)).as_str()
        ),
        "{lines:?}"
    );
    assert!(
        lines.contains(&"upserted 2 HubSpot contact(s), 1 new, from 2 event(s)"),
        "{lines:?}"
    );
}

#[test]
fn events_for_one_contact_are_merged_so_hubspot_never_sees_an_id_twice() {
    let fake = FakeHubSpot::start();
    let mut instance = hubspot(
        &fake,
        json!({"token": TOKEN, "property_mapping": {"email": "email", "plan": "plan_tier", "first_name": "firstname"}}),
    );
    instance
        .export(vec![
            identify(1, json!({"email": "ada@example.com", "plan": "free"})),
            exported(
                &uuid(2),
                "upgraded",
                json!({"$set": {"email": "Ada@Example.com", "plan": "pro"}, "$set_once": {"first_name": "Ada"}}),
            ),
        ])
        .expect("delivered");
    let inputs = fake.requests()[0]["inputs"].clone();
    assert_eq!(inputs.as_array().unwrap().len(), 1);
    assert_eq!(inputs[0]["objectWriteTraceId"], json!(uuid(2)));
    assert_eq!(
        fake.contacts()[0].properties,
        props(&[
            ("email", "ada@example.com"),
            ("plan_tier", "pro"),
            ("firstname", "Ada")
        ])
    );
}

#[test]
fn large_batches_are_split_at_hubspots_limit_of_100_inputs() {
    let fake = FakeHubSpot::start();
    let mut instance = hubspot(&fake, json!({"token": TOKEN}));
    let events: Vec<ExportedEvent> = (1..=230)
        .map(|n| {
            identify(
                n,
                json!({"email": format!("user{n}@example.com"), "first_name": "U"}),
            )
        })
        .collect();
    instance.export(events).expect("delivered");
    let sizes: Vec<usize> = fake
        .requests()
        .iter()
        .map(|r| r["inputs"].as_array().unwrap().len())
        .collect();
    assert_eq!(sizes, [100, 100, 30]);
    let contacts = fake.contacts();
    assert_eq!(contacts.len(), 230);
    assert_eq!(contacts[229].properties["email"], "user230@example.com");

    // Redelivery updates the same contacts instead of creating new ones.
    let again: Vec<ExportedEvent> = (1..=230)
        .map(|n| {
            identify(
                n,
                json!({"email": format!("user{n}@example.com"), "first_name": "U"}),
            )
        })
        .collect();
    instance.export(again).expect("delivered again");
    assert_eq!(fake.contacts().len(), 230);
}

#[test]
fn rate_limits_and_outages_are_retryable_after_hubspots_wait() {
    let fake = FakeHubSpot::start();
    let mut instance = hubspot(&fake, json!({"token": TOKEN}));
    let batch = || vec![identify(1, json!({"email": "ada@example.com"}))];

    fake.set(|s| s.throttle = Some("TEN_SECONDLY_ROLLING"));
    let (message, wait) = common::retryable(instance.export(batch()));
    assert_eq!(
        wait,
        Some(Duration::from_secs(10)),
        "the interval header's window"
    );
    assert!(
        message.contains("HTTP 429 You have reached your ten_secondly_rolling limit."),
        "{message}"
    );

    fake.set(|s| s.throttle = Some("DAILY"));
    let (message, wait) = common::retryable(instance.export(batch()));
    assert_eq!(wait, Some(Duration::from_secs(3600)));
    assert!(message.contains("daily API limit is used up"), "{message}");

    fake.set(|s| s.outage = Some(502));
    let (message, wait) = common::retryable(instance.export(batch()));
    assert_eq!(wait, None);
    assert!(message.contains("HTTP 502 INTERNAL_ERROR"), "{message}");

    instance.export(batch()).expect("HubSpot recovered");
    assert_eq!(fake.contacts().len(), 1);
}

#[test]
fn a_bad_token_or_a_missing_scope_is_permanent() {
    let fake = FakeHubSpot::start();
    let batch = || vec![identify(1, json!({"email": "ada@example.com"}))];

    let mut instance = hubspot(&fake, json!({"token": "pat-na1-revoked"}));
    let message = permanent(instance.export(batch()));
    assert!(
        message.contains("HTTP 401 INVALID_AUTHENTICATION: Authentication credentials not found."),
        "{message}"
    );
    assert!(message.contains("check the private-app token in the `token` setting"));
    assert!(!message.contains("pat-na1-revoked"), "{message}");

    let mut instance = hubspot(&fake, json!({"token": READ_ONLY_TOKEN}));
    let message = permanent(instance.export(batch()));
    assert!(message.contains("HTTP 403 MISSING_SCOPES"), "{message}");
    assert!(
        message.contains("crm.objects.contacts.write scope"),
        "{message}"
    );
    assert!(fake.contacts().is_empty());
}

#[test]
fn a_property_the_account_lacks_is_a_permanent_validation_error() {
    let fake = FakeHubSpot::start();
    let mut instance = hubspot(
        &fake,
        json!({"token": TOKEN, "property_mapping": {"email": "email", "plan": "plan_teir"}}),
    );
    let message = permanent(instance.export(vec![identify(
        7,
        json!({"email": "ada@example.com", "plan": "pro"}),
    )]));
    assert!(
        message.contains(
            "HTTP 400 VALIDATION_ERROR: Property values were not valid (Property \"plan_teir\" does not exist)"
        ),
        "{message}"
    );
    assert!(message.contains(&uuid(7)), "{message}");
    assert!(message.contains("`property_mapping`"), "{message}");

    let mut instance = hubspot(
        &fake,
        json!({"token": TOKEN, "id_property": "firstname", "property_mapping": {"name": "firstname"}}),
    );
    let message = permanent(instance.export(vec![identify(8, json!({"name": "Ada"}))]));
    assert!(
        message.contains("Unable to perform update/upsert by non-unique firstname property"),
        "{message}"
    );
    assert!(fake.contacts().is_empty());
}

#[test]
fn a_custom_unique_property_can_identify_contacts() {
    let fake = FakeHubSpot::start();
    fake.add_contact(&[("app_user_id", "u-42"), ("plan_tier", "free")]);
    let mut instance = hubspot(
        &fake,
        json!({"token": TOKEN, "id_property": "app_user_id", "property_mapping": {"user_id": "app_user_id", "plan": "plan_tier"}}),
    );
    instance
        .export(vec![exported(
            &uuid(1),
            "upgraded",
            json!({"user_id": "u-42", "$set": {"plan": "pro"}}),
        )])
        .expect("delivered");
    assert_eq!(
        fake.contacts(),
        [Contact {
            id: 1,
            properties: props(&[("app_user_id", "u-42"), ("plan_tier", "pro")]),
        }]
    );
}

#[test]
fn a_partial_failure_dead_letters_the_batch_naming_the_refused_event() {
    let fake = FakeHubSpot::start();
    let mut instance = hubspot(&fake, json!({"token": TOKEN}));
    let message = permanent(instance.export(vec![
        identify(1, json!({"email": "ada@example.com"})),
        identify(2, json!({"email": "typo@mail.invalid"})),
        identify(3, json!({"email": "bob@example.com"})),
    ]));
    assert_eq!(
        message,
        format!(
            "HubSpot refused 1 of 3 contact(s) and saved the rest: events {}: VALIDATION_ERROR: Email address typo@mail.invalid is invalid; fix the data or `property_mapping`, then replay",
            uuid(2)
        )
    );
    let saved: Vec<String> = fake
        .contacts()
        .iter()
        .map(|c| c.properties["email"].clone())
        .collect();
    assert_eq!(saved, ["ada@example.com", "bob@example.com"]);
}

/// The fake must refuse what HubSpot refuses, or the tests above prove
/// nothing.
#[test]
fn the_fake_refuses_what_hubspot_refuses() {
    let fake = FakeHubSpot::start();
    fake.add_contact(&[("email", "ada@example.com")]);
    let send = |path: &str, token: Option<&str>, body: Value| -> (u16, Value) {
        let url = format!("{}/crm/v3/objects/contacts/batch/{path}", fake.base);
        let token = token.map(str::to_string);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut request = reqwest::Client::new()
                .post(url)
                .header("content-type", "application/json")
                .body(body.to_string());
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            let response = request.send().await.unwrap();
            assert_eq!(
                response.headers()["x-hubspot-ratelimit-interval-milliseconds"],
                "10000"
            );
            let status = response.status().as_u16();
            let bytes = response.bytes().await.unwrap();
            (status, serde_json::from_slice(&bytes).unwrap())
        })
    };
    let input = |id: &str, properties: Value| json!({"idProperty": "email", "id": id, "properties": properties});
    let ok = input("new@example.com", json!({"email": "new@example.com"}));

    assert_eq!(send("upsert", None, json!({"inputs": [ok.clone()]})).0, 401);
    assert_eq!(send("upsert", Some(TOKEN), json!({"inputs": []})).0, 400);
    let too_many: Vec<Value> = (0..101)
        .map(|i| input(&format!("u{i}@example.com"), json!({})))
        .collect();
    assert_eq!(
        send("upsert", Some(TOKEN), json!({"inputs": too_many})).0,
        400
    );
    let number = input("a@example.com", json!({"company": 3}));
    assert_eq!(
        send("upsert", Some(TOKEN), json!({"inputs": [number]})).0,
        400
    );
    let twice = [
        input("a@example.com", json!({})),
        input("A@example.com", json!({})),
    ];
    let (status, body) = send("upsert", Some(TOKEN), json!({"inputs": twice}));
    assert_eq!(
        (status, body["category"].as_str()),
        (400, Some("VALIDATION_ERROR"))
    );
    let by_name = json!({"idProperty": "firstname", "id": "Ada", "properties": {}});
    assert_eq!(
        send("upsert", Some(TOKEN), json!({"inputs": [by_name]})).0,
        400
    );

    let (status, body) = send("upsert", Some(TOKEN), json!({"inputs": [ok.clone()]}));
    assert_eq!((status, &body["results"][0]["new"]), (200, &json!(true)));
    let (status, body) = send("upsert", Some(TOKEN), json!({"inputs": [ok.clone()]}));
    assert_eq!((status, &body["results"][0]["new"]), (200, &json!(false)));

    let create = json!({"inputs": [{"properties": {"email": "ada@example.com"}}]});
    let (status, body) = send("create", Some(TOKEN), create);
    assert_eq!(status, 409);
    assert_eq!(body["message"], "Contact already exists. Existing ID: 1");
    assert_eq!(fake.contacts().len(), 2);
}
