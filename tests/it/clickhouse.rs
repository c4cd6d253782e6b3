//! The clickhouse destination, built as a component and run by the real
//! runtime against a local fake of ClickHouse's HTTP interface that checks
//! what ClickHouse checks and answers the way it does.

use crate::common;

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::io::Read as _;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use base64::Engine as _;
use common::{install, runtime, wasm};
use flate2::read::GzDecoder;
use serde_json::{Value, json};
use sluice::runtime::{ExportFailure, ExportedEvent, PluginInstance, Policy};

const USER: &str = "sluice";
const PASSWORD: &str = "s3cret";
const COLUMNS: [&str; 6] = [
    "uuid",
    "event",
    "distinct_id",
    "person_id",
    "timestamp",
    "properties",
];
/// The plugin's limit on uncompressed JSON per insert.
const MAX_INSERT_BYTES: usize = 8 << 20;

/// What the fake saw of one accepted or deduplicated insert.
#[derive(Clone, Debug)]
struct Seen {
    table: String,
    params: BTreeMap<String, String>,
    gzip: bool,
    basic_auth: bool,
    uncompressed_bytes: usize,
    rows: usize,
    deduplicated: bool,
}

#[derive(Default)]
struct State {
    /// `database.table` → its columns.
    tables: BTreeMap<String, Vec<&'static str>>,
    rows: BTreeMap<String, Vec<Value>>,
    tokens: HashSet<(String, String)>,
    seen: Vec<Seen>,
    /// Errors to answer valid inserts with, in order: status, code, name.
    script: VecDeque<(u16, u32, &'static str)>,
}

/// ClickHouse's HTTP interface with user `sluice`, table `analytics.events`
/// (the documented columns) and `analytics.narrow` (no `person_id`).
#[derive(Clone)]
struct FakeClickHouse {
    state: Arc<Mutex<State>>,
}

/// A ClickHouse exception: status, code, name and message.
type Exception = (u16, u32, &'static str, String);

impl FakeClickHouse {
    fn start() -> (FakeClickHouse, String) {
        let mut state = State::default();
        state
            .tables
            .insert("analytics.events".into(), COLUMNS.to_vec());
        state.tables.insert(
            "analytics.narrow".into(),
            COLUMNS
                .iter()
                .copied()
                .filter(|c| *c != "person_id")
                .collect(),
        );
        let fake = FakeClickHouse {
            state: Arc::new(Mutex::new(state)),
        };
        let me = fake.clone();
        let router = axum::Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let me = me.clone();
                async move { me.handle(method, uri, headers, body) }
            },
        );
        let addr = common::serve(router);
        (fake, format!("http://127.0.0.1:{}", addr.port()))
    }

    fn script(&self, status: u16, code: u32, name: &'static str) {
        self.state
            .lock()
            .unwrap()
            .script
            .push_back((status, code, name));
    }

    fn rows(&self, table: &str) -> Vec<Value> {
        self.state
            .lock()
            .unwrap()
            .rows
            .get(table)
            .cloned()
            .unwrap_or_default()
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    fn handle(
        &self,
        method: Method,
        uri: Uri,
        headers: HeaderMap,
        body: Bytes,
    ) -> axum::response::Response {
        if uri.path() == "/ping" {
            return axum::response::Response::new(axum::body::Body::from("Ok.\n"));
        }
        match self.insert(&method, &uri, &headers, &body) {
            Ok((written, query_id)) => {
                let summary = json!({
                    "read_rows": written.to_string(),
                    "read_bytes": body.len().to_string(),
                    "written_rows": written.to_string(),
                    "written_bytes": body.len().to_string(),
                    "total_rows_to_read": "0",
                    "result_rows": written.to_string(),
                    "result_bytes": body.len().to_string(),
                    "elapsed_ns": "1000000",
                });
                axum::response::Response::builder()
                    .status(200)
                    .header("X-ClickHouse-Query-Id", query_id)
                    .header("X-ClickHouse-Summary", summary.to_string())
                    .header("X-ClickHouse-Format", "TabSeparated")
                    .header("X-ClickHouse-Timezone", "UTC")
                    .header("X-ClickHouse-Server-Display-Name", "fake-clickhouse")
                    .body(axum::body::Body::empty())
                    .unwrap()
            }
            Err((status, code, name, message)) => axum::response::Response::builder()
                .status(StatusCode::from_u16(status).unwrap())
                .header("Content-Type", "text/plain; charset=UTF-8")
                .header("X-ClickHouse-Exception-Code", code.to_string())
                .header("X-ClickHouse-Server-Display-Name", "fake-clickhouse")
                .body(axum::body::Body::from(format!(
                    "Code: {code}. DB::Exception: {message}. ({name}) (version 24.8.1.1)\n"
                )))
                .unwrap(),
        }
    }

    /// Runs an insert: rows written (0 when deduplicated) and a query id.
    fn insert(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<(usize, String), Exception> {
        let params: BTreeMap<String, String> =
            form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
                .into_owned()
                .collect();
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());

        // Credentials first, as ClickHouse does: either header pair, Basic,
        // or URL parameters; nothing given is `default` with no password.
        let basic = header("authorization")
            .and_then(|v| v.strip_prefix("Basic "))
            .and_then(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok())
            .and_then(|bytes| String::from_utf8(bytes).ok());
        let (user, password) = if let Some(user) = header("x-clickhouse-user") {
            (
                user.to_string(),
                header("x-clickhouse-key").unwrap_or("").to_string(),
            )
        } else if let Some(pair) = &basic {
            let (user, password) = pair.split_once(':').unwrap_or((pair, ""));
            (user.to_string(), password.to_string())
        } else {
            (
                params.get("user").cloned().unwrap_or("default".into()),
                params.get("password").cloned().unwrap_or_default(),
            )
        };
        if user != USER || password != PASSWORD {
            return Err((
                403,
                516,
                "AUTHENTICATION_FAILED",
                format!(
                    "{user}: Authentication failed: password is incorrect, or there is no user with such name"
                ),
            ));
        }

        const KNOWN_SETTINGS: [&str; 7] = [
            "query",
            "insert_deduplication_token",
            "insert_deduplicate",
            "wait_end_of_query",
            "async_insert",
            "wait_for_async_insert",
            "async_insert_deduplicate",
        ];
        if let Some(unknown) = params
            .keys()
            .find(|k| !KNOWN_SETTINGS.contains(&k.as_str()))
        {
            return Err((
                404,
                115,
                "UNKNOWN_SETTING",
                format!("Unknown setting '{unknown}'"),
            ));
        }
        let query = params.get("query").ok_or((
            400,
            62,
            "SYNTAX_ERROR",
            "Syntax error: failed at position 1: Empty query".to_string(),
        ))?;
        if method == Method::GET {
            return Err((
                500,
                164,
                "READONLY",
                "Cannot execute query in readonly mode. For queries over HTTP, method GET implies readonly. You should use method POST for modifying queries".into(),
            ));
        }
        let words: Vec<&str> = query.split_whitespace().collect();
        let [insert, into, target, format_kw, format] = words[..] else {
            return Err((
                400,
                62,
                "SYNTAX_ERROR",
                format!("Syntax error: failed at position 1 ({query})"),
            ));
        };
        if !insert.eq_ignore_ascii_case("INSERT")
            || !into.eq_ignore_ascii_case("INTO")
            || !format_kw.eq_ignore_ascii_case("FORMAT")
        {
            return Err((
                400,
                62,
                "SYNTAX_ERROR",
                format!("Syntax error: failed at position 1 ({query})"),
            ));
        }
        if format != "JSONEachRow" {
            return Err((
                404,
                73,
                "UNKNOWN_FORMAT",
                format!("Unknown format {format}"),
            ));
        }
        let table = if target.contains('.') {
            target.to_string()
        } else {
            format!("default.{target}")
        };
        let mut state = self.state.lock().unwrap();
        let database = table.split('.').next().unwrap();
        if !state
            .tables
            .keys()
            .any(|t| t.starts_with(&format!("{database}.")))
        {
            return Err((
                404,
                81,
                "UNKNOWN_DATABASE",
                format!("Database {database} does not exist"),
            ));
        }
        let columns = state.tables.get(&table).cloned().ok_or((
            404,
            60,
            "UNKNOWN_TABLE",
            format!("Table {table} does not exist"),
        ))?;
        if let Some((status, code, name)) = state.script.pop_front() {
            return Err((status, code, name, "Scripted by the test".into()));
        }

        let gzip = header("content-encoding") == Some("gzip");
        let text = if gzip {
            let mut text = String::new();
            GzDecoder::new(body)
                .read_to_string(&mut text)
                .map_err(|err| {
                    (
                        500,
                        354,
                        "ZLIB_INFLATE_FAILED",
                        format!("inflate failed: {err}"),
                    )
                })?;
            text
        } else {
            String::from_utf8_lossy(body).into_owned()
        };
        let mut rows = Vec::new();
        for (n, line) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
            rows.push(parse_row(line, &columns, n + 1)?);
        }

        let token = params.get("insert_deduplication_token").cloned();
        let deduplicated = match &token {
            Some(token) => !state.tokens.insert((table.clone(), token.clone())),
            None => false,
        };
        let written = if deduplicated { 0 } else { rows.len() };
        state.seen.push(Seen {
            table: table.clone(),
            params: params.clone(),
            gzip,
            basic_auth: basic.is_some(),
            uncompressed_bytes: text.len(),
            rows: rows.len(),
            deduplicated,
        });
        if !deduplicated {
            state.rows.entry(table).or_default().extend(rows);
        }
        Ok((written, uuid::Uuid::new_v4().to_string()))
    }
}

/// One JSONEachRow line checked against the table's columns and types.
fn parse_row(line: &str, columns: &[&str], n: usize) -> Result<Value, Exception> {
    let incorrect = |message: String| (400, 117, "INCORRECT_DATA", message);
    let Ok(Value::Object(row)) = serde_json::from_str::<Value>(line) else {
        return Err(incorrect(format!(
            "Cannot parse JSON object here: {line}: (at row {n})"
        )));
    };
    for (column, value) in &row {
        if !columns.contains(&column.as_str()) {
            return Err(incorrect(format!(
                "Unknown field found while parsing JSONEachRow format: {column}: (at row {n})"
            )));
        }
        let ok = match column.as_str() {
            "uuid" => value
                .as_str()
                .is_some_and(|v| uuid::Uuid::parse_str(v).is_ok()),
            "person_id" => value.is_string() || value.is_null(),
            "timestamp" => value.as_str().is_some_and(|v| {
                chrono::NaiveDateTime::parse_from_str(v, "%Y-%m-%d %H:%M:%S%.f").is_ok()
            }),
            _ => value.is_string(),
        };
        if !ok {
            return Err(match column.as_str() {
                "uuid" => (
                    400,
                    376,
                    "CANNOT_PARSE_UUID",
                    format!("Cannot parse uuid {value}: (at row {n})"),
                ),
                "timestamp" => (
                    400,
                    41,
                    "CANNOT_PARSE_DATETIME",
                    format!("Cannot parse DateTime64 from {value}: (at row {n})"),
                ),
                _ => incorrect(format!(
                    "Cannot read the value of column {column}: {value}: (at row {n})"
                )),
            });
        }
    }
    Ok(Value::Object(row))
}

fn exported(n: u32, timestamp: &str, name: &str, properties: Value) -> ExportedEvent {
    ExportedEvent {
        uuid: format!("01890000-0000-7000-8000-{n:012}"),
        name: name.into(),
        distinct_id: format!("user-{n}"),
        person_id: Some(format!("person-{n}")),
        timestamp: timestamp.into(),
        properties: properties.to_string(),
    }
}

fn clickhouse_plugin(config: Value) -> Result<PluginInstance, String> {
    // The fake listens on loopback, which the operator must allow.
    let runtime = runtime(Policy {
        allow_loopback: true,
        ..Policy::default()
    });
    let plugin = runtime.load(&wasm("clickhouse")).unwrap();
    plugin
        .install(install("clickhouse", config))
        .map_err(|err| err.to_string())
}

pub(crate) fn config(url: &str, extra: Value) -> Value {
    let mut config = json!({
        "url": url,
        "database": "analytics",
        "table": "events",
        "user": USER,
        "password": PASSWORD,
    });
    for (key, value) in extra.as_object().unwrap() {
        config[key] = value.clone();
    }
    config
}

fn batch() -> Vec<ExportedEvent> {
    let mut anonymous = exported(
        3,
        "2024-05-02T01:30:00.250+02:00",
        "viewed page",
        json!({"url": "https://example.com/ü?a=1&b=2", "text": "line\nbreak \"quoted\""}),
    );
    anonymous.person_id = None;
    vec![
        exported(
            2,
            "2024-05-01T12:00:05.5Z",
            "paid",
            json!({"amount": 30.5, "items": [{"sku": "a"}, {"sku": "b"}]}),
        ),
        exported(
            1,
            "2024-05-01T12:00:00.000Z",
            "signed up",
            json!({"plan": "pro"}),
        ),
        anonymous,
    ]
}

#[test]
fn inserts_a_batch_that_clickhouse_reads_column_by_column() {
    let (fake, url) = FakeClickHouse::start();
    let mut instance = clickhouse_plugin(config(&url, json!({}))).unwrap();
    instance.export(batch()).expect("inserted");

    let seen = fake.seen();
    assert_eq!(seen.len(), 1);
    let insert = &seen[0];
    assert_eq!(insert.table, "analytics.events");
    assert!(insert.gzip, "the body is gzip with Content-Encoding: gzip");
    assert!(insert.basic_auth);
    assert_eq!(
        insert.params["query"],
        "INSERT INTO analytics.events FORMAT JSONEachRow"
    );
    assert!(
        insert.params["insert_deduplication_token"].starts_with("sluice-"),
        "{:?}",
        insert.params
    );
    assert_eq!(insert.params["async_insert"], "0");
    assert_eq!(insert.params["wait_end_of_query"], "1");

    // Sorted by uuid; every column as the documented schema reads it.
    let rows = fake.rows("analytics.events");
    let expected = [
        json!({
            "uuid": "01890000-0000-7000-8000-000000000001",
            "event": "signed up",
            "distinct_id": "user-1",
            "person_id": "person-1",
            "timestamp": "2024-05-01 12:00:00.000",
            "properties": "{\"plan\":\"pro\"}",
        }),
        json!({
            "uuid": "01890000-0000-7000-8000-000000000002",
            "event": "paid",
            "distinct_id": "user-2",
            "person_id": "person-2",
            "timestamp": "2024-05-01 12:00:05.500",
            "properties": "{\"amount\":30.5,\"items\":[{\"sku\":\"a\"},{\"sku\":\"b\"}]}",
        }),
        json!({
            "uuid": "01890000-0000-7000-8000-000000000003",
            "event": "viewed page",
            "distinct_id": "user-3",
            "person_id": null,
            "timestamp": "2024-05-01 23:30:00.250",
            "properties": "{\"url\":\"https://example.com/ü?a=1&b=2\",\"text\":\"line\\nbreak \\\"quoted\\\"\"}",
        }),
    ];
    assert_eq!(rows, expected);
    for row in &rows {
        let properties: Value = serde_json::from_str(row["properties"].as_str().unwrap()).unwrap();
        assert!(properties.is_object());
    }

    let (logs, calls) = instance.take_activity();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].method, "POST");
    assert_eq!(calls[0].status, Some(200));
    // The password travels only in the Authorization header, which the
    // host hides from recorded calls.
    for (name, value) in &calls[0].request_headers {
        assert!(!value.contains(PASSWORD), "{name}");
    }
    assert!(!calls[0].url.contains(PASSWORD));
    assert!(
        logs.iter().any(|l| l
            .message
            .contains("inserted 3 row(s) into analytics.events")),
        "{logs:?}"
    );
}

#[test]
fn a_retried_batch_is_stored_once_whatever_its_order() {
    let (fake, url) = FakeClickHouse::start();
    let mut instance = clickhouse_plugin(config(&url, json!({}))).unwrap();
    instance.export(batch()).unwrap();
    instance
        .export(batch().into_iter().rev().collect())
        .expect("a deduplicated insert is a success");

    let seen = fake.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        seen[0].params["insert_deduplication_token"],
        seen[1].params["insert_deduplication_token"]
    );
    assert!(seen[1].deduplicated);
    assert_eq!(fake.rows("analytics.events").len(), 3);
}

#[test]
fn a_batch_over_the_insert_size_is_split_into_inserts_each_deduplicated() {
    let (fake, url) = FakeClickHouse::start();
    let mut instance = clickhouse_plugin(config(&url, json!({}))).unwrap();
    // About 9 MiB of rows: two inserts.
    let padding = "p".repeat(96 << 10);
    let events: Vec<ExportedEvent> = (1..=96)
        .map(|n| {
            exported(
                n,
                "2024-05-01T12:00:00.000Z",
                "big",
                json!({ "n": n, "padding": padding }),
            )
        })
        .collect();
    instance.export(events.clone()).expect("inserted");

    let seen = fake.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    for insert in &seen {
        assert!(insert.uncompressed_bytes <= MAX_INSERT_BYTES, "{insert:?}");
        assert!(insert.gzip);
    }
    assert_eq!(seen.iter().map(|s| s.rows).sum::<usize>(), 96);
    assert_ne!(
        seen[0].params["insert_deduplication_token"],
        seen[1].params["insert_deduplication_token"]
    );
    let rows = fake.rows("analytics.events");
    let uuids: Vec<&str> = rows.iter().map(|r| r["uuid"].as_str().unwrap()).collect();
    let expected: Vec<String> = events.iter().map(|e| e.uuid.clone()).collect();
    assert_eq!(uuids, expected);

    // The retry, reordered, is cut the same way and stores nothing new.
    instance
        .export(events.into_iter().rev().collect())
        .expect("retry");
    let seen = fake.seen();
    assert_eq!(seen.len(), 4);
    assert!(seen[2].deduplicated && seen[3].deduplicated);
    assert_eq!(fake.rows("analytics.events").len(), 96);
}

#[test]
fn overload_is_retryable_and_the_retry_is_stored_once() {
    let (fake, url) = FakeClickHouse::start();
    fake.script(500, 252, "TOO_MANY_PARTS");
    fake.script(503, 209, "SOCKET_TIMEOUT");
    fake.script(500, 241, "MEMORY_LIMIT_EXCEEDED");
    let mut instance = clickhouse_plugin(config(&url, json!({}))).unwrap();

    for name in ["TOO_MANY_PARTS", "SOCKET_TIMEOUT", "MEMORY_LIMIT_EXCEEDED"] {
        match instance.export(batch()) {
            Err(ExportFailure::Retryable {
                plugin,
                message,
                retry_after,
            }) => {
                assert_eq!(plugin, "clickhouse@0.1.0");
                assert!(message.contains(name), "{message}");
                assert!(message.contains("will be retried"), "{message}");
                // ClickHouse gives no wait; the engine's backoff decides.
                assert_eq!(retry_after, None);
            }
            other => panic!("{name} should be retryable, got {other:?}"),
        }
    }
    assert!(fake.rows("analytics.events").is_empty());
    instance.export(batch()).expect("ClickHouse recovered");
    instance.export(batch()).expect("redelivered");
    assert_eq!(fake.rows("analytics.events").len(), 3);
}

#[test]
fn a_wrong_password_is_permanent_and_names_the_settings() {
    let (fake, url) = FakeClickHouse::start();
    let mut instance =
        clickhouse_plugin(config(&url, json!({"password": "not-the-password"}))).unwrap();
    match instance.export(batch()) {
        Err(ExportFailure::Permanent { message, .. }) => {
            assert!(message.contains("check user and password"), "{message}");
            assert!(message.contains("HTTP 403, code 516"), "{message}");
            assert!(message.contains("(AUTHENTICATION_FAILED)"), "{message}");
            assert!(!message.contains("not-the-password"));
        }
        other => panic!("a wrong password should be permanent, got {other:?}"),
    }
    assert!(fake.seen().is_empty());
}

#[test]
fn rows_the_table_cannot_take_and_a_missing_table_are_permanent() {
    let (fake, url) = FakeClickHouse::start();
    let mut narrow = clickhouse_plugin(config(&url, json!({"table": "narrow"}))).unwrap();
    match narrow.export(batch()) {
        Err(ExportFailure::Permanent { message, .. }) => {
            assert!(message.contains("HTTP 400, code 117"), "{message}");
            assert!(
                message.contains("Unknown field found while parsing JSONEachRow format: person_id"),
                "{message}"
            );
            assert!(
                message.contains("its columns must be uuid, event"),
                "{message}"
            );
        }
        other => panic!("unreadable rows should be permanent, got {other:?}"),
    }

    let mut missing = clickhouse_plugin(config(&url, json!({"table": "evnts"}))).unwrap();
    match missing.export(batch()) {
        Err(ExportFailure::Permanent { message, .. }) => {
            assert!(message.contains("HTTP 404, code 60"), "{message}");
            assert!(
                message.contains("table analytics.evnts does not exist"),
                "{message}"
            );
        }
        other => panic!("a missing table should be permanent, got {other:?}"),
    }
    assert!(fake.seen().is_empty());
}

#[test]
fn async_inserts_ask_to_wait_for_the_flush() {
    let (fake, url) = FakeClickHouse::start();
    let mut instance = clickhouse_plugin(config(&url, json!({"async_insert": true}))).unwrap();
    instance.export(batch()).unwrap();
    let params = &fake.seen()[0].params;
    assert_eq!(params["async_insert"], "1");
    assert_eq!(params["wait_for_async_insert"], "1");
    assert_eq!(params["async_insert_deduplicate"], "1");
    assert_eq!(fake.rows("analytics.events").len(), 3);
}

#[test]
fn a_table_name_that_is_not_an_identifier_is_refused_at_install() {
    let (fake, url) = FakeClickHouse::start();
    let err = clickhouse_plugin(config(&url, json!({"table": "events FORMAT CSV --"})))
        .err()
        .expect("refused");
    assert!(
        err.contains("table `events FORMAT CSV --` must be a plain ClickHouse identifier"),
        "{err}"
    );
    assert!(fake.seen().is_empty());
}
