//! The BigQuery destination, built as a component and run by the real
//! runtime against a local server that behaves like Google's OAuth token
//! endpoint (JWT bearer grant) and BigQuery's `tabledata.insertAll`.

use crate::common;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::{install, runtime, wasm};
use rsa::pkcs1v15::{Signature, VerifyingKey};
use rsa::pkcs8::DecodePublicKey;
use rsa::sha2::Sha256;
use rsa::signature::Verifier;
use serde_json::{Map, Value, json};
use sluice::runtime::{ExportFailure, ExportedEvent, PluginInstance, Policy, Runtime};

const CLIENT_EMAIL: &str = "sluice-writer@my-project.iam.gserviceaccount.com";
const KEY_ID: &str = "7f3c1e0a9b8d";
/// The only audience Google's token endpoint accepts.
const AUDIENCE: &str = "https://oauth2.googleapis.com/token";
/// Scopes that allow `tabledata.insertAll`.
const INSERT_SCOPES: &[&str] = &[
    "https://www.googleapis.com/auth/bigquery.insertdata",
    "https://www.googleapis.com/auth/bigquery",
    "https://www.googleapis.com/auth/cloud-platform",
];
/// BigQuery's request size limit.
const MAX_REQUEST_BYTES: usize = 10 * 1024 * 1024;

fn fixture(name: &str) -> String {
    let path = common::workspace_root().join("tests/fixtures").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

/// The table's columns: (name, type, required).
const SCHEMA: &[(&str, &str, bool)] = &[
    ("uuid", "STRING", true),
    ("event", "STRING", true),
    ("distinct_id", "STRING", true),
    ("person_id", "STRING", false),
    ("timestamp", "TIMESTAMP", true),
    ("properties", "JSON", false),
];

/// One insertAll request as the fake saw it.
#[derive(Clone, Debug)]
struct Call {
    path: String,
    rows: usize,
    bytes: usize,
    status: u16,
}

/// A table made without person_id and properties.
const SLIM_SCHEMA: &[(&str, &str, bool)] = &[
    ("uuid", "STRING", true),
    ("event", "STRING", true),
    ("distinct_id", "STRING", true),
    ("timestamp", "TIMESTAMP", true),
];

struct Table {
    schema: &'static [(&'static str, &'static str, bool)],
    rows: Vec<Map<String, Value>>,
    insert_ids: HashSet<String>,
}

#[derive(Default)]
struct Project {
    token_requests: usize,
    /// Access tokens: when each expires and what it may do.
    tokens: HashMap<String, (SystemTime, String)>,
    /// `project/dataset/table` to its rows.
    tables: HashMap<String, Table>,
    scripted: VecDeque<(u16, Value)>,
    calls: Vec<Call>,
}

#[derive(Clone)]
struct FakeBigQuery {
    project: Arc<Mutex<Project>>,
    public_key: Arc<VerifyingKey<Sha256>>,
}

fn google_error(status: u16, reason: &str, message: &str) -> (u16, Value) {
    let status_text = match status {
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        503 => "UNAVAILABLE",
        _ => "INTERNAL",
    };
    (
        status,
        json!({"error": {
            "code": status,
            "message": message,
            "errors": [{"message": message, "domain": "global", "reason": reason}],
            "status": status_text,
        }}),
    )
}

fn reply(status: u16, body: Value) -> Response {
    (
        StatusCode::from_u16(status).unwrap(),
        [("content-type", "application/json; charset=UTF-8")],
        body.to_string(),
    )
        .into_response()
}

impl FakeBigQuery {
    fn new() -> FakeBigQuery {
        let public_key =
            VerifyingKey::<Sha256>::from_public_key_pem(&fixture("bigquery-test-key.pub.pem"))
                .unwrap();
        let mut project = Project::default();
        for (name, schema) in [("events", SCHEMA), ("slim", SLIM_SCHEMA)] {
            project.tables.insert(
                format!("my-project/analytics/{name}"),
                Table {
                    schema,
                    rows: Vec::new(),
                    insert_ids: HashSet::new(),
                },
            );
        }
        FakeBigQuery {
            project: Arc::new(Mutex::new(project)),
            public_key: Arc::new(public_key),
        }
    }

    /// Serves the token endpoint at `/token` and the BigQuery API; returns
    /// the base URL.
    fn start(&self) -> String {
        let router = axum::Router::new()
            .route("/token", post(token))
            .route(
                "/bigquery/v2/projects/{project}/datasets/{dataset}/tables/{table}/insertAll",
                post(insert_all),
            )
            // Let bodies over the limit through so the handler can refuse
            // them the way BigQuery does.
            .layer(DefaultBodyLimit::max(64 << 20))
            .with_state(self.clone());
        format!("http://127.0.0.1:{}", common::serve(router).port())
    }

    fn with<R>(&self, f: impl FnOnce(&mut Project) -> R) -> R {
        f(&mut self.project.lock().unwrap())
    }

    fn expire_tokens(&self) {
        self.with(|p| {
            p.tokens
                .values_mut()
                .for_each(|(expiry, _)| *expiry = UNIX_EPOCH)
        });
    }

    fn script(&self, reply: (u16, Value)) {
        self.with(|p| p.scripted.push_back(reply));
    }

    fn rows(&self) -> Vec<Map<String, Value>> {
        self.table_rows("events")
    }

    fn table_rows(&self, table: &str) -> Vec<Map<String, Value>> {
        self.with(|p| {
            p.tables[&format!("my-project/analytics/{table}")]
                .rows
                .clone()
        })
    }

    fn calls(&self) -> Vec<Call> {
        self.with(|p| p.calls.clone())
    }

    fn token_requests(&self) -> usize {
        self.with(|p| p.token_requests)
    }
}

/// `POST /token` with the JWT bearer grant.
async fn token(State(fake): State<FakeBigQuery>, headers: HeaderMap, body: Bytes) -> Response {
    let mut project = fake.project.lock().unwrap();
    project.token_requests += 1;
    let refuse = |error: &str, description: &str| {
        reply(
            400,
            json!({"error": error, "error_description": description}),
        )
    };
    let form_encoded = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if !form_encoded {
        return refuse("invalid_request", "Bad Request");
    }
    let form: HashMap<String, String> = form_urlencoded::parse(&body).into_owned().collect();
    if form.get("grant_type").map(String::as_str)
        != Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
    {
        return refuse("unsupported_grant_type", "Invalid grant_type");
    }
    let Some(assertion) = form.get("assertion") else {
        return refuse("invalid_request", "Missing required parameter: assertion");
    };
    let parts: Vec<&str> = assertion.split('.').collect();
    let decode = |part: &str| URL_SAFE_NO_PAD.decode(part).ok();
    let (Some(header), Some(claims), Some(signature)) = (
        parts.first().and_then(|p| decode(p)),
        parts.get(1).and_then(|p| decode(p)),
        parts.get(2).and_then(|p| decode(p)),
    ) else {
        return refuse("invalid_grant", "Invalid JWT: malformed");
    };
    if parts.len() != 3 {
        return refuse("invalid_grant", "Invalid JWT: malformed");
    }
    let header: Value = serde_json::from_slice(&header).unwrap_or(Value::Null);
    let claims: Value = serde_json::from_slice(&claims).unwrap_or(Value::Null);
    if header["alg"] != json!("RS256") || header["kid"] != json!(KEY_ID) {
        return refuse("invalid_grant", "Invalid JWT Signature.");
    }
    let signed = format!("{}.{}", parts[0], parts[1]);
    let verified = Signature::try_from(signature.as_slice())
        .ok()
        .is_some_and(|s| fake.public_key.verify(signed.as_bytes(), &s).is_ok());
    if !verified {
        return refuse("invalid_grant", "Invalid JWT Signature.");
    }
    if claims["iss"] != json!(CLIENT_EMAIL) {
        return refuse("invalid_grant", "Invalid grant: account not found");
    }
    if claims["aud"] != json!(AUDIENCE) {
        return refuse("invalid_grant", "Invalid JWT: Failed audience check.");
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let (Some(iat), Some(exp)) = (claims["iat"].as_i64(), claims["exp"].as_i64()) else {
        return refuse("invalid_grant", "Invalid JWT: iat and exp are required.");
    };
    let timely = exp > iat && exp - iat <= 3600 && (iat - now).abs() <= 300 && exp > now;
    if !timely {
        return refuse(
            "invalid_grant",
            "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. Check your iat and exp values in the JWT claim.",
        );
    }
    let Some(scope) = claims["scope"].as_str().filter(|s| !s.is_empty()) else {
        return refuse("invalid_scope", "Empty or missing scope not allowed.");
    };
    let access_token = format!("ya29.fake-{}", project.token_requests);
    project.tokens.insert(
        access_token.clone(),
        (
            SystemTime::now() + Duration::from_secs(3599),
            scope.to_string(),
        ),
    );
    reply(
        200,
        json!({"access_token": access_token, "expires_in": 3599, "token_type": "Bearer"}),
    )
}

/// `POST /bigquery/v2/projects/{p}/datasets/{d}/tables/{t}/insertAll`.
async fn insert_all(
    State(fake): State<FakeBigQuery>,
    Path((project_id, dataset, table)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut project = fake.project.lock().unwrap();
    let path = format!("{project_id}/{dataset}/{table}");
    let rows = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|b| b["rows"].as_array().map(Vec::len))
        .unwrap_or(0);
    let (status, answer) = answer_insert(&mut project, &path, &headers, &body);
    project.calls.push(Call {
        path,
        rows,
        bytes: body.len(),
        status,
    });
    reply(status, answer)
}

fn answer_insert(
    project: &mut Project,
    path: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> (u16, Value) {
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some((expiry, scope)) = token.and_then(|t| project.tokens.get(t)) else {
        return google_error(
            401,
            "authError",
            "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential.",
        );
    };
    if *expiry <= SystemTime::now() {
        return google_error(
            401,
            "authError",
            "Request had invalid authentication credentials.",
        );
    }
    if !scope.split(' ').any(|s| INSERT_SCOPES.contains(&s)) {
        return google_error(
            403,
            "insufficientPermissions",
            "Request had insufficient authentication scopes.",
        );
    }
    if let Some(reply) = project.scripted.pop_front() {
        return reply;
    }
    if body.len() > MAX_REQUEST_BYTES {
        return google_error(
            413,
            "invalid",
            "Request payload size exceeds the limit: 10485760 bytes.",
        );
    }
    let Some(table) = project.tables.get_mut(path) else {
        return google_error(
            404,
            "notFound",
            &format!(
                "Not found: Table {}",
                path.replacen('/', ":", 1).replacen('/', ".", 1)
            ),
        );
    };
    let Ok(request) = serde_json::from_slice::<Value>(body) else {
        return google_error(400, "invalid", "Invalid JSON payload received.");
    };
    let flag = |name: &str| request.get(name).and_then(Value::as_bool).unwrap_or(false);
    let (skip_invalid, ignore_unknown) = (flag("skipInvalidRows"), flag("ignoreUnknownValues"));
    let Some(rows) = request["rows"].as_array().filter(|rows| !rows.is_empty()) else {
        return google_error(400, "invalid", "No rows present in the request.");
    };

    let problems: Vec<Option<(String, String)>> = rows
        .iter()
        .map(|row| check_row(table.schema, row, ignore_unknown))
        .collect();
    let any_invalid = problems.iter().any(Option::is_some);
    let mut insert_errors = Vec::new();
    for (index, (row, problem)) in rows.iter().zip(&problems).enumerate() {
        match problem {
            Some((location, message)) => insert_errors.push(json!({"index": index, "errors": [
                {"reason": "invalid", "location": location, "debugInfo": "", "message": message}
            ]})),
            None if any_invalid && !skip_invalid => {
                insert_errors.push(json!({"index": index, "errors": [
                    {"reason": "stopped", "location": "", "debugInfo": "", "message": ""}
                ]}))
            }
            None => {
                // Best-effort de-duplication: a known insertId is dropped.
                let id = row["insertId"].as_str().map(str::to_string);
                if id.as_ref().is_some_and(|id| table.insert_ids.contains(id)) {
                    continue;
                }
                let mut stored = row["json"].as_object().unwrap().clone();
                if ignore_unknown {
                    stored.retain(|k, _| table.schema.iter().any(|(name, _, _)| name == k));
                }
                table.rows.push(stored);
                table.insert_ids.extend(id);
            }
        }
    }
    let mut answer = json!({"kind": "bigquery#tableDataInsertAllResponse"});
    if !insert_errors.is_empty() {
        answer["insertErrors"] = Value::Array(insert_errors);
    }
    (200, answer)
}

/// What is wrong with one row, as (location, message), by the schema.
fn check_row(
    schema: &[(&str, &str, bool)],
    row: &Value,
    ignore_unknown: bool,
) -> Option<(String, String)> {
    let Some(values) = row.get("json").and_then(Value::as_object) else {
        return Some(("".into(), "Row is missing its json object.".into()));
    };
    if let Some(id) = row.get("insertId")
        && !id.is_string()
    {
        return Some(("insertId".into(), "insertId must be a string.".into()));
    }
    for (name, value) in values {
        let Some((_, kind, _)) = schema.iter().find(|(column, _, _)| column == name) else {
            if ignore_unknown {
                continue;
            }
            return Some((name.clone(), format!("no such field: {name}.")));
        };
        if value.is_null() {
            continue;
        }
        let Some(text) = value.as_str() else {
            return Some((name.clone(), format!("This field: {name} is not a record.")));
        };
        let valid = match *kind {
            "TIMESTAMP" => chrono::DateTime::parse_from_rfc3339(text).is_ok(),
            "JSON" => serde_json::from_str::<Value>(text).is_ok(),
            _ => true,
        };
        if !valid {
            return Some((
                name.clone(),
                format!("Could not parse '{text}' as {kind} for field {name}."),
            ));
        }
    }
    for (name, _, required) in schema {
        if *required && values.get(*name).is_none_or(Value::is_null) {
            return Some((name.to_string(), format!("Missing required field: {name}.")));
        }
    }
    None
}

fn exported(uuid: &str, name: &str, properties: Value) -> ExportedEvent {
    ExportedEvent {
        uuid: uuid.into(),
        name: name.into(),
        distinct_id: "user-1".into(),
        person_id: Some("0190a1b2-person".into()),
        timestamp: "2024-05-01T12:00:00.000Z".into(),
        properties: properties.to_string(),
    }
}

fn batch(n: usize) -> Vec<ExportedEvent> {
    (0..n)
        .map(|i| {
            exported(
                &format!("00000000-0000-4000-8000-{i:012}"),
                "pageview",
                json!({"n": i}),
            )
        })
        .collect()
}

fn key_file(base: &str) -> String {
    json!({
        "type": "service_account",
        "project_id": "my-project",
        "private_key_id": KEY_ID,
        "private_key": fixture("bigquery-test-key.pem"),
        "client_email": CLIENT_EMAIL,
        "client_id": "104857600000000000000",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": format!("{base}/token"),
    })
    .to_string()
}

pub(crate) fn config(base: &str) -> Value {
    json!({
        "project_id": "my-project",
        "dataset_id": "analytics",
        "table_id": "events",
        "service_account_key": key_file(base),
        "api_base": base,
    })
}

/// The fake is on loopback, which the operator must allow.
fn loopback_runtime() -> Runtime {
    runtime(Policy {
        allow_loopback: true,
        ..Policy::default()
    })
}

fn bigquery(runtime: &Runtime, install_id: &str, config: Value) -> PluginInstance {
    let plugin = runtime.load(&wasm("bigquery")).unwrap();
    plugin.install(install(install_id, config)).unwrap()
}

fn permanent(result: Result<(), ExportFailure>) -> String {
    common::permanent("bigquery@0.1.0", result)
}

#[test]
fn streams_events_as_rows_and_drops_redelivered_ones() {
    let fake = FakeBigQuery::new();
    let base = fake.start();
    let runtime = loopback_runtime();
    let mut instance = bigquery(&runtime, "bq-rows", config(&base));
    let mut anonymous = exported(
        "00000000-0000-4000-8000-000000000002",
        "$pageview",
        json!({"$current_url": "https://example.com/"}),
    );
    anonymous.person_id = None;
    let events = vec![
        exported(
            "00000000-0000-4000-8000-000000000001",
            "signed up",
            json!({"plan": "pro", "seats": 5, "tags": ["a"]}),
        ),
        anonymous,
    ];
    instance.export(events.clone()).unwrap();

    assert_eq!(fake.token_requests(), 1);
    let calls = fake.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].path, "my-project/analytics/events");
    assert_eq!(calls[0].status, 200);
    let rows = fake.rows();
    assert_eq!(rows.len(), 2);
    assert_eq!(
        Value::Object(rows[0].clone()),
        json!({
            "uuid": "00000000-0000-4000-8000-000000000001",
            "event": "signed up",
            "distinct_id": "user-1",
            "person_id": "0190a1b2-person",
            "timestamp": "2024-05-01T12:00:00.000Z",
            "properties": "{\"plan\":\"pro\",\"seats\":5,\"tags\":[\"a\"]}",
        })
    );
    assert_eq!(rows[1]["person_id"], Value::Null);
    assert_eq!(rows[1]["event"], json!("$pageview"));
    let properties: Value = serde_json::from_str(rows[1]["properties"].as_str().unwrap()).unwrap();
    assert_eq!(properties, json!({"$current_url": "https://example.com/"}));

    // A retried batch carries the same insertIds, so BigQuery keeps one copy.
    instance.export(events).unwrap();
    assert_eq!(fake.rows().len(), 2);
    assert_eq!(fake.calls().len(), 2);
}

#[test]
fn the_token_is_shared_by_instances_and_renewed_after_a_401() {
    let fake = FakeBigQuery::new();
    let base = fake.start();
    let runtime = loopback_runtime();
    let mut first = bigquery(&runtime, "bq-token", config(&base));
    first.export(batch(1)).unwrap();
    first.export(batch(2)).unwrap();
    let mut second = bigquery(&runtime, "bq-token", config(&base));
    second.export(batch(3)).unwrap();
    assert_eq!(
        fake.token_requests(),
        1,
        "one sign-in for three exports and two instances"
    );

    fake.expire_tokens();
    second.export(batch(4)).unwrap();
    assert_eq!(fake.token_requests(), 2);
    let statuses: Vec<u16> = fake.calls().iter().map(|c| c.status).collect();
    assert_eq!(statuses, [200, 200, 200, 401, 200]);
    assert_eq!(
        fake.rows().len(),
        4,
        "insertIds collapse the overlapping batches"
    );
}

#[test]
fn batches_are_split_at_500_rows() {
    let fake = FakeBigQuery::new();
    let base = fake.start();
    let runtime = loopback_runtime();
    let mut instance = bigquery(&runtime, "bq-chunks", config(&base));
    instance.export(batch(1200)).unwrap();
    let sizes: Vec<usize> = fake.calls().iter().map(|c| c.rows).collect();
    assert_eq!(sizes, [500, 500, 200]);
    assert_eq!(fake.rows().len(), 1200);
}

#[test]
fn large_events_are_split_to_stay_under_10_mb() {
    let fake = FakeBigQuery::new();
    let base = fake.start();
    let runtime = loopback_runtime();
    let mut instance = bigquery(&runtime, "bq-bytes", config(&base));
    let blob = "x".repeat(900_000);
    let events: Vec<ExportedEvent> = (0..12)
        .map(|i| {
            exported(
                &format!("00000000-0000-4000-8000-{i:012}"),
                "upload",
                json!({"blob": blob}),
            )
        })
        .collect();
    instance.export(events).unwrap();
    let calls = fake.calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(
        calls
            .iter()
            .all(|c| c.status == 200 && c.bytes <= MAX_REQUEST_BYTES),
        "{calls:?}"
    );
    assert_eq!(fake.rows().len(), 12);
}

#[test]
fn invalid_rows_are_permanent_and_nothing_of_their_request_is_inserted() {
    let fake = FakeBigQuery::new();
    let base = fake.start();
    let runtime = loopback_runtime();
    let mut instance = bigquery(&runtime, "bq-invalid", config(&base));
    let mut events = batch(3);
    events[1].timestamp = "yesterday".into();
    let message = permanent(instance.export(events));
    assert!(
        message.contains("BigQuery refused 1 row(s) of 3 for my-project.analytics.events, so it inserted none of that request (2 other row(s) held back)"),
        "{message}"
    );
    assert!(
        message.contains("00000000-0000-4000-8000-000000000001: invalid at timestamp: Could not parse 'yesterday' as TIMESTAMP for field timestamp."),
        "{message}"
    );
    assert!(fake.rows().is_empty());
}

#[test]
fn a_missing_table_is_permanent_and_a_narrower_one_needs_ignore_unknown_values() {
    let fake = FakeBigQuery::new();
    let base = fake.start();
    let runtime = loopback_runtime();
    let mut config = config(&base);
    config["table_id"] = json!("missing");
    let message = permanent(bigquery(&runtime, "bq-missing", config.clone()).export(batch(1)));
    assert!(
        message.contains("HTTP 404 notFound: Not found: Table my-project:analytics.missing"),
        "{message}"
    );
    assert!(
        message.contains("check project_id, dataset_id and table_id"),
        "{message}"
    );

    config["table_id"] = json!("slim");
    let message = permanent(bigquery(&runtime, "bq-slim", config.clone()).export(batch(1)));
    assert!(
        message.contains("invalid at person_id: no such field: person_id."),
        "{message}"
    );

    config["ignore_unknown_values"] = json!(true);
    bigquery(&runtime, "bq-slim-ignore", config)
        .export(batch(1))
        .unwrap();
    let rows = fake.table_rows("slim");
    assert_eq!(rows.len(), 1);
    assert_eq!(
        rows[0].keys().collect::<Vec<_>>(),
        ["uuid", "event", "distinct_id", "timestamp"]
    );
}

#[test]
fn rate_limits_and_backend_errors_are_retryable() {
    let fake = FakeBigQuery::new();
    let base = fake.start();
    let runtime = loopback_runtime();
    let mut instance = bigquery(&runtime, "bq-retry", config(&base));

    fake.script(google_error(
        403,
        "rateLimitExceeded",
        "Exceeded rate limits: too many table update operations for this table.",
    ));
    let (message, retry_after) = common::retryable(instance.export(batch(1)));
    assert!(message.contains("HTTP 403 rateLimitExceeded"), "{message}");
    assert_eq!(
        retry_after, None,
        "BigQuery sends no wait; the engine backs off"
    );

    fake.script(google_error(
        403,
        "quotaExceeded",
        "Exceeded quota: too many bytes streamed.",
    ));
    common::retryable(instance.export(batch(1)));

    fake.script(google_error(
        503,
        "backendError",
        "The service is currently unavailable.",
    ));
    let (message, _) = common::retryable(instance.export(batch(1)));
    assert!(
        message.contains("HTTP 503 backendError: The service is currently unavailable."),
        "{message}"
    );

    fake.script((200, json!({"kind": "bigquery#tableDataInsertAllResponse", "insertErrors": [
        {"index": 0, "errors": [{"reason": "backendError", "location": "", "debugInfo": "", "message": "Backend error."}]}
    ]})));
    common::retryable(instance.export(batch(1)));

    instance.export(batch(1)).expect("BigQuery recovered");
    assert_eq!(fake.rows().len(), 1);
}

#[test]
fn refused_access_and_refused_keys_are_permanent() {
    let fake = FakeBigQuery::new();
    let base = fake.start();
    let runtime = loopback_runtime();

    fake.script(google_error(403, "accessDenied", "Access Denied: Table my-project:analytics.events: Permission bigquery.tables.updateData denied"));
    let message = permanent(bigquery(&runtime, "bq-denied", config(&base)).export(batch(1)));
    assert!(message.contains("accessDenied"), "{message}");
    assert!(message.contains("roles/bigquery.dataEditor"), "{message}");

    // A key file whose private key is not the one Google holds for its id.
    let mut other_key: Value = serde_json::from_str(&key_file(&base)).unwrap();
    other_key["private_key_id"] = json!("deleted-key");
    let mut config = config(&base);
    config["service_account_key"] = json!(other_key.to_string());
    let message = permanent(bigquery(&runtime, "bq-bad-key", config).export(batch(1)));
    assert!(
        message.contains("invalid_grant: Invalid JWT Signature."),
        "{message}"
    );
    assert!(message.contains("Create a new JSON key"), "{message}");
    assert!(fake.rows().is_empty());
}
