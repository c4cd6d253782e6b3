//! The Salesforce destination, built as a component and run by the real
//! runtime against a local server that behaves like Salesforce's OAuth token
//! endpoint and its sObject Collections upsert.

use crate::common;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{patch, post};
use common::{install, runtime, wasm};
use serde_json::{Map, Value, json};
use sluice::runtime::{ExportFailure, ExportedEvent, PluginInstance, Policy, Runtime};

const CLIENT_ID: &str = "3MVG9-consumer-key";
pub(crate) const CLIENT_SECRET: &str = "consumer-secret";
pub(crate) const REFRESH_TOKEN: &str = "5Aep861-refresh";

/// Salesforce's per-org field list for the two objects the plugin writes:
/// (name, required on create, is an External ID field).
fn fields_of(object: &str) -> Option<&'static [(&'static str, bool, bool)]> {
    const LEAD: &[(&str, bool, bool)] = &[
        ("LastName", true, false),
        ("Company", true, false),
        ("FirstName", false, false),
        ("Email", false, false),
        ("Title", false, false),
        ("Sluice_Id__c", false, true),
    ];
    const CONTACT: &[(&str, bool, bool)] = &[
        ("LastName", true, false),
        ("FirstName", false, false),
        ("Email", false, false),
        ("Title", false, false),
        ("Sluice_Id__c", false, true),
    ];
    match object {
        "Lead" => Some(LEAD),
        "Contact" => Some(CONTACT),
        _ => None,
    }
}

/// One upsert call as the fake saw it.
#[derive(Clone, Debug)]
struct Call {
    path: String,
    authorization: Option<String>,
    body: Value,
    status: u16,
}

#[derive(Default)]
struct Org {
    /// Where the token response says the data API is; the fake's own
    /// address unless a test moves it.
    instance_url: String,
    refresh_token_revoked: bool,
    token_requests: usize,
    /// Access tokens issued and whether each is still live.
    tokens: HashMap<String, bool>,
    calls: Vec<Call>,
    /// Whole-call replies to give before looking at the request.
    scripted: VecDeque<(u16, Value)>,
    /// Records by object; several may share an external ID (the field need
    /// not be Unique), which makes upserts by it ambiguous.
    records: HashMap<String, Vec<Map<String, Value>>>,
    next_id: usize,
    api_usage: u64,
}

#[derive(Clone, Default)]
pub(crate) struct FakeSalesforce {
    org: Arc<Mutex<Org>>,
}

fn errors(status: u16, code: &str, message: &str) -> (u16, Value) {
    (status, json!([{"message": message, "errorCode": code}]))
}

impl FakeSalesforce {
    /// Serves the token endpoint and the data API; returns the base URL.
    pub(crate) fn start(&self) -> String {
        let router = axum::Router::new()
            .route("/services/oauth2/token", post(token))
            .route(
                "/services/data/{version}/composite/sobjects/{object}/{field}",
                patch(upsert),
            )
            .with_state(self.clone());
        let base = format!("http://127.0.0.1:{}", common::serve(router).port());
        let mut org = self.org.lock().unwrap();
        if org.instance_url.is_empty() {
            org.instance_url = base.clone();
        }
        base
    }

    fn with_org<R>(&self, f: impl FnOnce(&mut Org) -> R) -> R {
        f(&mut self.org.lock().unwrap())
    }

    /// Ends every session, as an org's session timeout does.
    fn expire_sessions(&self) {
        self.with_org(|org| org.tokens.values_mut().for_each(|live| *live = false));
    }

    fn script(&self, reply: (u16, Value)) {
        self.with_org(|org| org.scripted.push_back(reply));
    }

    fn seed(&self, object: &str, record: Value) {
        self.with_org(|org| {
            org.next_id += 1;
            let mut record = record.as_object().unwrap().clone();
            record.insert("Id".into(), json!(format!("00Q{:012}", org.next_id)));
            org.records.entry(object.into()).or_default().push(record);
        });
    }

    /// The stored record of `external_id`, without its Salesforce Id.
    fn record(&self, object: &str, external_id: &str) -> Option<Value> {
        self.with_org(|org| {
            let mut found = org
                .records
                .get(object)?
                .iter()
                .find(|r| r["Sluice_Id__c"] == json!(external_id))?
                .clone();
            found.remove("Id");
            Some(Value::Object(found))
        })
    }

    pub(crate) fn count(&self, object: &str) -> usize {
        self.with_org(|org| org.records.get(object).map_or(0, Vec::len))
    }

    pub(crate) fn token_requests(&self) -> usize {
        self.with_org(|org| org.token_requests)
    }

    fn calls(&self) -> Vec<Call> {
        self.with_org(|org| org.calls.clone())
    }
}

fn json_reply(status: u16, body: Value, usage: Option<u64>) -> Response {
    let mut response = (
        StatusCode::from_u16(status).unwrap(),
        [("content-type", "application/json;charset=UTF-8")],
        body.to_string(),
    )
        .into_response();
    if let Some(used) = usage {
        response.headers_mut().insert(
            "sforce-limit-info",
            format!("api-usage={used}/15000").parse().unwrap(),
        );
    }
    response
}

/// `POST /services/oauth2/token`, refresh-token grant only.
async fn token(State(fake): State<FakeSalesforce>, headers: HeaderMap, body: Bytes) -> Response {
    let mut org = fake.org.lock().unwrap();
    org.token_requests += 1;
    let refuse = |error: &str, description: &str| {
        json_reply(
            400,
            json!({"error": error, "error_description": description}),
            None,
        )
    };
    let form_encoded = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if !form_encoded {
        return refuse("invalid_request", "must be form-encoded");
    }
    let form: HashMap<String, String> = form_urlencoded::parse(&body).into_owned().collect();
    let field = |name: &str| form.get(name).map(String::as_str).unwrap_or("");
    if field("grant_type") != "refresh_token" {
        return refuse("unsupported_grant_type", "grant type not supported");
    }
    if field("client_id") != CLIENT_ID {
        return refuse("invalid_client_id", "client identifier invalid");
    }
    if field("client_secret") != CLIENT_SECRET {
        return refuse("invalid_client", "invalid client credentials");
    }
    if field("refresh_token") != REFRESH_TOKEN || org.refresh_token_revoked {
        return refuse("invalid_grant", "expired access/refresh token");
    }
    let access_token = format!("00Dxx0000001gPL!AR8AQ-{}", org.token_requests);
    org.tokens.insert(access_token.clone(), true);
    json_reply(
        200,
        json!({
            "access_token": access_token,
            "signature": "CMJ4l+CCaPQiKjoOEwEig9H4wqhpuLSk4J2urAe+fVg=",
            "scope": "refresh_token api",
            "instance_url": org.instance_url,
            "id": "https://login.salesforce.com/id/00Dxx0000001gPLEAY/005xx000001Sv6AAAS",
            "token_type": "Bearer",
            "issued_at": "1714564800000",
        }),
        None,
    )
}

/// `PATCH /services/data/vNN.N/composite/sobjects/{object}/{field}`.
async fn upsert(
    State(fake): State<FakeSalesforce>,
    Path((version, object, field)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut org = fake.org.lock().unwrap();
    let authorization = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let (status, reply) = answer(&mut org, &version, &object, &field, &headers, &body);
    org.calls.push(Call {
        path: format!("/services/data/{version}/composite/sobjects/{object}/{field}"),
        authorization,
        body: parsed,
        status,
    });
    org.api_usage += 1;
    let usage = org.api_usage;
    json_reply(status, reply, Some(usage))
}

fn answer(
    org: &mut Org,
    version: &str,
    object: &str,
    field: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> (u16, Value) {
    let not_found = || errors(404, "NOT_FOUND", "The requested resource does not exist");
    let version_ok = version
        .strip_prefix('v')
        .and_then(|v| v.split_once('.'))
        .filter(|(_, minor)| minor.len() == 1)
        .and_then(|(major, _)| major.parse::<u32>().ok())
        .is_some_and(|major| major >= 46);
    if !version_ok {
        return not_found();
    }
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if token.is_none_or(|t| org.tokens.get(t) != Some(&true)) {
        return errors(401, "INVALID_SESSION_ID", "Session expired or invalid");
    }
    if let Some(reply) = org.scripted.pop_front() {
        return reply;
    }
    let json_body = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json_body {
        return errors(
            415,
            "UNSUPPORTED_MEDIA_TYPE",
            "Content-Type must be application/json",
        );
    }
    let Some(schema) = fields_of(object) else {
        return not_found();
    };
    if !schema
        .iter()
        .any(|(name, _, external)| *name == field && *external)
    {
        return errors(
            404,
            "NOT_FOUND",
            &format!("Provided external ID field does not exist or is not accessible: {field}"),
        );
    }
    let Ok(request) = serde_json::from_slice::<Value>(body) else {
        return errors(400, "JSON_PARSER_ERROR", "Unexpected character");
    };
    let all_or_none = match request.get("allOrNone") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return errors(400, "JSON_PARSER_ERROR", "allOrNone must be a boolean"),
    };
    let Some(records) = request["records"].as_array() else {
        return errors(400, "INVALID_FIELD", "records must be an array");
    };
    if records.is_empty() {
        return errors(400, "INVALID_FIELD", "No records to process");
    }
    if records.len() > 200 {
        return errors(
            400,
            "EXCEEDED_ID_LIMIT",
            "record limit reached. cannot submit more than 200 records into this call",
        );
    }
    for record in records {
        let Some(record) = record.as_object() else {
            return errors(400, "JSON_PARSER_ERROR", "each record must be an object");
        };
        match record.get("attributes").and_then(|a| a.get("type")) {
            Some(t) if t == object => {}
            Some(t) => {
                return errors(
                    400,
                    "INVALID_TYPE",
                    &format!("a record of type {t} was sent to the {object} collection"),
                );
            }
            None => return errors(400, "INVALID_TYPE", "Must send a concrete entity type."),
        }
        for (name, value) in record {
            if name == "attributes" {
                continue;
            }
            if name == "Id" {
                return errors(
                    400,
                    "INVALID_FIELD",
                    "Id must not be set when upserting by an external ID",
                );
            }
            if !schema.iter().any(|(known, _, _)| known == name) {
                return errors(
                    400,
                    "INVALID_FIELD",
                    &format!("No such column '{name}' on sobject of type {object}"),
                );
            }
            if value.is_object() || value.is_array() {
                return errors(
                    400,
                    "JSON_PARSER_ERROR",
                    &format!(
                        "Cannot deserialize instance of string from an object or array for {name}"
                    ),
                );
            }
        }
    }

    let mut stored = org.records.get(object).cloned().unwrap_or_default();
    let mut next_id = org.next_id;
    let ext = |r: &Value| {
        r.get(field)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let results: Vec<Value> = records
        .iter()
        .map(|record| {
            let fail = |code: &str, message: String, fields: Vec<&str>| {
                json!({"id": null, "success": false, "created": false,
                       "errors": [{"statusCode": code, "message": message, "fields": fields}]})
            };
            let key = ext(record);
            if key.is_empty() {
                return fail("MISSING_ARGUMENT", format!("{field} not specified"), vec![field]);
            }
            if records.iter().filter(|r| ext(r) == key).count() > 1 {
                return fail(
                    "DUPLICATE_VALUE",
                    format!("Duplicate external id specified: {key}"),
                    vec![field],
                );
            }
            if let Some(email) = record.get("Email").and_then(Value::as_str)
                && !email.contains('@')
            {
                return fail(
                    "INVALID_EMAIL_ADDRESS",
                    format!("Email: invalid email address: {email}"),
                    vec!["Email"],
                );
            }
            let matches: Vec<usize> = (0..stored.len())
                .filter(|&i| stored[i].get(field) == Some(&json!(key)))
                .collect();
            let values = record
                .as_object()
                .unwrap()
                .iter()
                .filter(|(name, _)| *name != "attributes");
            match matches.as_slice() {
                [] => {
                    let missing: Vec<&str> = schema
                        .iter()
                        .filter(|(name, required, _)| {
                            *required
                                && record
                                    .get(*name)
                                    .is_none_or(|v| v.is_null() || v == &json!(""))
                        })
                        .map(|(name, _, _)| *name)
                        .collect();
                    if !missing.is_empty() {
                        return fail(
                            "REQUIRED_FIELD_MISSING",
                            format!("Required fields are missing: [{}]", missing.join(", ")),
                            missing,
                        );
                    }
                    next_id += 1;
                    let id = format!("00Q{next_id:012}");
                    let mut created: Map<String, Value> =
                        values.map(|(k, v)| (k.clone(), v.clone())).collect();
                    created.insert("Id".into(), json!(id));
                    stored.push(created);
                    json!({"id": id, "success": true, "errors": [], "created": true})
                }
                [one] => {
                    for (k, v) in values {
                        stored[*one].insert(k.clone(), v.clone());
                    }
                    json!({"id": stored[*one]["Id"], "success": true, "errors": [], "created": false})
                }
                several => {
                    let ids: Vec<String> = several
                        .iter()
                        .map(|&i| stored[i]["Id"].as_str().unwrap().to_string())
                        .collect();
                    fail(
                        "DUPLICATE_EXTERNAL_ID",
                        format!(
                            "{field}: more than one record found for external id field: [{}]",
                            ids.join(", ")
                        ),
                        vec![field],
                    )
                }
            }
        })
        .collect();

    let any_failed = results.iter().any(|r| r["success"] == json!(false));
    if all_or_none && any_failed {
        let rolled_back = results
            .into_iter()
            .map(|r| {
                if r["success"] == json!(true) {
                    json!({"id": null, "success": false, "created": false, "errors": [{
                        "statusCode": "ALL_OR_NONE_OPERATION_ROLLED_BACK",
                        "message": "Record rolled back because not all records were valid and the request was using AllOrNone header",
                        "fields": [],
                    }]})
                } else {
                    r
                }
            })
            .collect();
        return (200, Value::Array(rolled_back));
    }
    org.records.insert(object.into(), stored);
    org.next_id = next_id;
    (200, Value::Array(results))
}

fn person(uuid: &str, name: &str, distinct_id: &str, at: &str, properties: Value) -> ExportedEvent {
    ExportedEvent {
        uuid: uuid.into(),
        name: name.into(),
        distinct_id: distinct_id.into(),
        person_id: Some(format!("person-{distinct_id}")),
        timestamp: at.into(),
        properties: properties.to_string(),
    }
}

fn identify(uuid: &str, distinct_id: &str, set: Value) -> ExportedEvent {
    person(
        uuid,
        "$identify",
        distinct_id,
        "2024-05-01T12:00:00.000Z",
        json!({"$set": set}),
    )
}

pub(crate) fn config(login_url: &str) -> Value {
    json!({
        "login_url": login_url,
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "refresh_token": REFRESH_TOKEN,
        "external_id_field": "Sluice_Id__c",
        "field_mapping": {
            "Email": "email",
            "FirstName": "first_name",
            "LastName": "last_name",
            "Company": "company.name",
            "Title": "title",
        },
    })
}

/// The fake is on loopback, which the operator must allow.
fn loopback_runtime() -> Runtime {
    runtime(Policy {
        allow_loopback: true,
        ..Policy::default()
    })
}

fn salesforce(runtime: &Runtime, install_id: &str, config: Value) -> PluginInstance {
    let plugin = runtime.load(&wasm("salesforce")).unwrap();
    plugin.install(install(install_id, config)).unwrap()
}

fn permanent(result: Result<(), ExportFailure>) -> String {
    common::permanent("salesforce@0.1.0", result)
}

#[test]
fn upserts_people_from_identify_and_set_events_field_by_field() {
    let fake = FakeSalesforce::default();
    let base = fake.start();
    let runtime = loopback_runtime();
    let mut instance = salesforce(&runtime, "sf-happy", config(&base));
    instance
        .export(vec![
            person(
                "00000000-0000-4000-8000-000000000001",
                "$identify",
                "user-1",
                "2024-05-01T12:00:00.000Z",
                json!({"$set": {"email": "ada@example.com", "first_name": "Ada", "last_name": "Lovelace",
                                "company": {"name": "Analytical Engines"}, "title": "Analyst"},
                       "$browser": "Firefox"}),
            ),
            person(
                "00000000-0000-4000-8000-000000000002",
                "$pageview",
                "user-1",
                "2024-05-01T12:00:01.000Z",
                json!({"title": "Home page", "$current_url": "https://example.com/"}),
            ),
            person(
                "00000000-0000-4000-8000-000000000003",
                "promoted",
                "user-1",
                "2024-05-01T12:00:02.000Z",
                json!({"$set": {"title": "Chief Analyst"}}),
            ),
            person(
                "00000000-0000-4000-8000-000000000004",
                "signed up",
                "user-2",
                "2024-05-01T12:00:03.000Z",
                json!({"$set": {"email": "grace@example.com", "last_name": "Hopper", "company": {"name": "Navy"}}}),
            ),
        ])
        .unwrap();

    assert_eq!(fake.token_requests(), 1);
    let calls = fake.calls();
    assert_eq!(calls.len(), 1, "both people go in one call");
    assert_eq!(
        calls[0].path,
        "/services/data/v61.0/composite/sobjects/Lead/Sluice_Id__c"
    );
    assert_eq!(calls[0].status, 200);
    assert!(
        calls[0]
            .authorization
            .as_deref()
            .is_some_and(|a| a.starts_with("Bearer 00Dxx0000001gPL!")),
        "{calls:?}"
    );
    assert_eq!(calls[0].body["allOrNone"], json!(false));
    assert_eq!(
        fake.record("Lead", "user-1"),
        Some(json!({
            "Sluice_Id__c": "user-1",
            "Email": "ada@example.com",
            "FirstName": "Ada",
            "LastName": "Lovelace",
            "Company": "Analytical Engines",
            // The later $set wins; the pageview's own `title` is no profile data.
            "Title": "Chief Analyst",
        }))
    );
    assert_eq!(
        fake.record("Lead", "user-2"),
        Some(json!({
            "Sluice_Id__c": "user-2",
            "Email": "grace@example.com",
            "LastName": "Hopper",
            "Company": "Navy",
        }))
    );
    assert_eq!(fake.count("Lead"), 2);

    // Redelivering the batch updates the same records: nothing new.
    instance
        .export(vec![identify(
            "00000000-0000-4000-8000-000000000001",
            "user-2",
            json!({"email": "grace@example.com", "last_name": "Hopper"}),
        )])
        .unwrap();
    assert_eq!(fake.count("Lead"), 2);
    let (logs, _) = instance.take_activity();
    assert!(
        logs.iter()
            .any(|l| l.message == "upserted 1 of 1 Lead record(s): 0 created, 1 updated"),
        "{logs:?}"
    );
}

#[test]
fn the_session_is_shared_by_every_instance_of_an_install() {
    let fake = FakeSalesforce::default();
    let base = fake.start();
    let runtime = loopback_runtime();
    let batch = || {
        vec![identify(
            "00000000-0000-4000-8000-000000000010",
            "user-1",
            json!({"last_name": "Lovelace", "company": {"name": "AE"}}),
        )]
    };

    let mut first = salesforce(&runtime, "sf-shared", config(&base));
    first.export(batch()).unwrap();
    first.export(batch()).unwrap();
    let mut second = salesforce(&runtime, "sf-shared", config(&base));
    second.export(batch()).unwrap();
    assert_eq!(
        fake.token_requests(),
        1,
        "one sign-in for two exports and two instances"
    );
    let tokens: Vec<Option<String>> = fake.calls().into_iter().map(|c| c.authorization).collect();
    assert_eq!(tokens.len(), 3);
    assert!(tokens.iter().all(|t| *t == tokens[0]));

    // Key-value data is per install: another install signs in for itself.
    let mut other = salesforce(&runtime, "sf-other", config(&base));
    other.export(batch()).unwrap();
    assert_eq!(fake.token_requests(), 2);
}

#[test]
fn an_expired_session_is_renewed_once_and_the_call_retried() {
    let fake = FakeSalesforce::default();
    let base = fake.start();
    let runtime = loopback_runtime();
    let mut instance = salesforce(&runtime, "sf-expiry", config(&base));
    instance
        .export(vec![identify(
            "00000000-0000-4000-8000-000000000020",
            "user-1",
            json!({"last_name": "Lovelace", "company": {"name": "AE"}}),
        )])
        .unwrap();
    fake.expire_sessions();
    instance
        .export(vec![identify(
            "00000000-0000-4000-8000-000000000021",
            "user-1",
            json!({"title": "CTO"}),
        )])
        .unwrap();

    assert_eq!(fake.token_requests(), 2);
    let statuses: Vec<u16> = fake.calls().iter().map(|c| c.status).collect();
    assert_eq!(statuses, [200, 401, 200]);
    let calls = fake.calls();
    assert_eq!(
        calls[1].body, calls[2].body,
        "the refused call is sent again"
    );
    assert_ne!(calls[1].authorization, calls[2].authorization);
    assert_eq!(
        fake.record("Lead", "user-1").unwrap()["Title"],
        json!("CTO")
    );
}

#[test]
fn more_than_200_people_are_sent_in_calls_of_at_most_200() {
    let fake = FakeSalesforce::default();
    let base = fake.start();
    let runtime = loopback_runtime();
    let mut instance = salesforce(&runtime, "sf-chunks", config(&base));
    let events: Vec<ExportedEvent> = (0..450)
        .map(|i| {
            identify(
                &format!("00000000-0000-4000-8000-{i:012}"),
                &format!("user-{i}"),
                json!({"email": format!("u{i}@example.com"), "last_name": format!("Person {i}"), "company": {"name": "Acme"}}),
            )
        })
        .collect();
    instance.export(events).unwrap();
    let sizes: Vec<usize> = fake
        .calls()
        .iter()
        .map(|c| c.body["records"].as_array().unwrap().len())
        .collect();
    assert_eq!(sizes, [200, 200, 50]);
    assert_eq!(fake.count("Lead"), 450);
    assert_eq!(
        fake.record("Lead", "user-449").unwrap()["Email"],
        json!("u449@example.com")
    );
}

#[test]
fn defaults_complete_new_leads_without_overwriting_existing_ones() {
    let fake = FakeSalesforce::default();
    let base = fake.start();
    fake.seed(
        "Lead",
        json!({"Sluice_Id__c": "user-1", "LastName": "Lovelace", "Company": "Analytical Engines"}),
    );
    let runtime = loopback_runtime();
    let mut config = config(&base);
    config["defaults"] = json!({"Company": "Self-serve signup"});
    let mut instance = salesforce(&runtime, "sf-defaults", config);
    instance
        .export(vec![
            identify(
                "00000000-0000-4000-8000-000000000030",
                "user-1",
                json!({"email": "ada@example.com"}),
            ),
            identify(
                "00000000-0000-4000-8000-000000000031",
                "user-2",
                json!({"email": "grace@example.com", "last_name": "Hopper"}),
            ),
        ])
        .unwrap();

    assert_eq!(
        fake.record("Lead", "user-1"),
        Some(
            json!({"Sluice_Id__c": "user-1", "LastName": "Lovelace", "Company": "Analytical Engines", "Email": "ada@example.com"})
        )
    );
    assert_eq!(
        fake.record("Lead", "user-2"),
        Some(
            json!({"Sluice_Id__c": "user-2", "Email": "grace@example.com", "LastName": "Hopper", "Company": "Self-serve signup"})
        )
    );
    let calls = fake.calls();
    assert_eq!(calls.len(), 2, "one more call, for the new lead only");
    assert_eq!(calls[1].body["records"].as_array().unwrap().len(), 1);
}

#[test]
fn the_request_limit_and_outages_are_retryable() {
    let fake = FakeSalesforce::default();
    let base = fake.start();
    let runtime = loopback_runtime();
    let mut instance = salesforce(&runtime, "sf-limits", config(&base));
    let batch = || {
        vec![identify(
            "00000000-0000-4000-8000-000000000040",
            "user-1",
            json!({"last_name": "Lovelace", "company": {"name": "AE"}}),
        )]
    };

    fake.script(errors(
        403,
        "REQUEST_LIMIT_EXCEEDED",
        "TotalRequests Limit exceeded.",
    ));
    match instance.export(batch()) {
        Err(ExportFailure::Retryable {
            message,
            retry_after,
            ..
        }) => {
            assert_eq!(retry_after, Some(Duration::from_secs(15 * 60)));
            assert!(
                message.contains("API request limit is reached (api-usage=1/15000)"),
                "{message}"
            );
            assert!(
                message.contains("TotalRequests Limit exceeded."),
                "{message}"
            );
        }
        other => panic!("the daily limit should be retryable, got {other:?}"),
    }
    fake.script(errors(
        403,
        "REQUEST_LIMIT_EXCEEDED",
        "ConcurrentRequests (Concurrent API Requests) Limit exceeded.",
    ));
    match instance.export(batch()) {
        Err(ExportFailure::Retryable { retry_after, .. }) => {
            assert_eq!(retry_after, Some(Duration::from_secs(30)))
        }
        other => panic!("the concurrency limit should be retryable, got {other:?}"),
    }
    fake.script(errors(
        503,
        "SERVER_UNAVAILABLE",
        "Server is temporarily unavailable",
    ));
    match instance.export(batch()) {
        Err(ExportFailure::Retryable {
            message,
            retry_after: None,
            ..
        }) => {
            assert!(message.contains("HTTP 503"), "{message}")
        }
        other => panic!("503 should be retryable, got {other:?}"),
    }
    instance.export(batch()).expect("Salesforce recovered");
    assert!(fake.record("Lead", "user-1").is_some());
}

#[test]
fn refused_sign_ins_are_permanent_and_say_what_to_fix() {
    let fake = FakeSalesforce::default();
    let base = fake.start();
    let runtime = loopback_runtime();
    let batch = || {
        vec![identify(
            "00000000-0000-4000-8000-000000000050",
            "user-1",
            json!({}),
        )]
    };

    let mut wrong_secret = config(&base);
    wrong_secret["client_secret"] = json!("not-the-secret");
    let message = permanent(salesforce(&runtime, "sf-secret", wrong_secret).export(batch()));
    assert!(
        message.contains("invalid_client: invalid client credentials"),
        "{message}"
    );
    assert!(
        message.contains("check `client_id` and `client_secret`"),
        "{message}"
    );

    let mut instance = salesforce(&runtime, "sf-revoked", config(&base));
    instance.export(batch()).unwrap();
    fake.with_org(|org| org.refresh_token_revoked = true);
    fake.expire_sessions();
    let message = permanent(instance.export(batch()));
    assert!(
        message.contains("invalid_grant: expired access/refresh token"),
        "{message}"
    );
    assert!(message.contains("issue a new refresh token"), "{message}");
}

#[test]
fn refused_records_dead_letter_the_batch_naming_their_events() {
    let fake = FakeSalesforce::default();
    let base = fake.start();
    // Sluice_Id__c is not Unique in this org, and two leads share user-3.
    fake.seed(
        "Lead",
        json!({"Sluice_Id__c": "user-3", "LastName": "A", "Company": "X"}),
    );
    fake.seed(
        "Lead",
        json!({"Sluice_Id__c": "user-3", "LastName": "B", "Company": "X"}),
    );
    let runtime = loopback_runtime();
    let mut instance = salesforce(&runtime, "sf-refused", config(&base));
    let message = permanent(instance.export(vec![
        identify(
            "00000000-0000-4000-8000-000000000061",
            "user-1",
            json!({"email": "ada@example.com", "last_name": "Lovelace", "company": {"name": "AE"}}),
        ),
        identify(
            "00000000-0000-4000-8000-000000000062",
            "user-2",
            json!({"email": "not-an-address", "last_name": "Hopper", "company": {"name": "Navy"}}),
        ),
        identify(
            "00000000-0000-4000-8000-000000000063",
            "user-3",
            json!({"title": "CTO"}),
        ),
    ]));
    assert!(
        message.starts_with("Salesforce refused 2 of 3 Lead record(s); the others were written."),
        "{message}"
    );
    assert!(
        message.contains("event(s) 00000000-0000-4000-8000-000000000062 (distinct id \"user-2\"): INVALID_EMAIL_ADDRESS: Email: invalid email address: not-an-address [Email]"),
        "{message}"
    );
    assert!(
        message.contains("event(s) 00000000-0000-4000-8000-000000000063 (distinct id \"user-3\"): DUPLICATE_EXTERNAL_ID"),
        "{message}"
    );
    assert!(!message.contains("000000000061"), "{message}");
    assert!(
        fake.record("Lead", "user-1").is_some(),
        "the good record is written"
    );
}

#[test]
fn a_mapping_to_a_field_the_object_lacks_is_permanent() {
    let fake = FakeSalesforce::default();
    let base = fake.start();
    let runtime = loopback_runtime();
    let mut config = config(&base);
    config["object"] = json!("Contact");
    let mut instance = salesforce(&runtime, "sf-bad-field", config);
    let message = permanent(instance.export(vec![identify(
        "00000000-0000-4000-8000-000000000070",
        "user-1",
        json!({"last_name": "Lovelace", "company": {"name": "AE"}}),
    )]));
    assert!(
        message.contains("INVALID_FIELD: No such column 'Company' on sobject of type Contact"),
        "{message}"
    );
    assert!(
        message.contains("check `field_mapping` and `defaults`"),
        "{message}"
    );
    assert_eq!(fake.count("Contact"), 0);
}

#[test]
fn an_instance_on_another_host_must_be_allowed_with_instance_url() {
    let login = FakeSalesforce::default();
    let login_url = login.start();
    // The org's data API answers elsewhere: a second server on the same org.
    let instance_url = login.start();
    login.with_org(|org| org.instance_url = instance_url.clone());
    let runtime = loopback_runtime();
    let batch = || {
        vec![identify(
            "00000000-0000-4000-8000-000000000080",
            "user-1",
            json!({"last_name": "Lovelace", "company": {"name": "AE"}}),
        )]
    };

    let message =
        permanent(salesforce(&runtime, "sf-elsewhere", config(&login_url)).export(batch()));
    assert!(
        message.contains(&format!(
            "cannot reach the Salesforce instance {instance_url}"
        )),
        "{message}"
    );
    assert!(message.contains("set `instance_url`"), "{message}");
    assert!(
        login.calls().is_empty(),
        "nothing may reach a host that is not allowed"
    );

    let mut config = config(&login_url);
    config["instance_url"] = json!(instance_url);
    salesforce(&runtime, "sf-allowed", config)
        .export(batch())
        .unwrap();
    assert!(login.record("Lead", "user-1").is_some());
}
