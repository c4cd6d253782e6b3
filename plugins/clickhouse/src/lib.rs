//! ClickHouse destination: inserts exported events into one table through
//! ClickHouse's HTTP interface, self-hosted or ClickHouse Cloud.
//!
//! Each insert is
//!
//! ```text
//! POST {url}/?query=INSERT INTO {database}.{table} FORMAT JSONEachRow
//!            &insert_deduplication_token=sluice-{digest}&…
//! Authorization: Basic …
//! Content-Encoding: gzip
//! ```
//!
//! with one JSON object per event and line: `uuid`, `event`, `distinct_id`,
//! `person_id`, `timestamp` as `YYYY-MM-DD hh:mm:ss.fff` in UTC (what a
//! `DateTime64(3, 'UTC')` column reads with default settings) and
//! `properties` as a JSON string.
//!
//! Delivery is at least once and the host retries whole batches, so every
//! insert carries an `insert_deduplication_token` derived from the uuids of
//! its rows: ClickHouse stores a retried insert once. Rows are sorted by uuid
//! before a batch is cut into inserts, so a batch retried in another order
//! is cut the same way and its tokens match.
//!
//! The user and password go as HTTP Basic authorisation, which ClickHouse
//! accepts like its `X-ClickHouse-User`/`X-ClickHouse-Key` headers, because
//! the host hides `Authorization` in recorded HTTP calls.

mod time;

use std::io::Write as _;

use flate2::Compression;
use flate2::write::GzEncoder;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sluice_plugin_sdk::http::{Request, Response};
use sluice_plugin_sdk::{
    Error, ExportError, ExportedEvent, Plugin, Result, clock, info, register_plugin, warn,
};

/// Most uncompressed JSON per insert. ClickHouse itself takes far more, but
/// a bounded insert keeps the plugin's memory, the proxy in front of
/// ClickHouse and the host's HTTP deadline comfortable, and is still large
/// enough that inserts stay few (ClickHouse prefers a few large inserts to
/// many small ones).
const MAX_INSERT_BYTES: usize = 8 << 20;

/// Error codes ClickHouse answers for conditions that pass: load, timeouts,
/// replication and disk trouble. Any other code is ClickHouse refusing this
/// insert, which a retry would not change.
const RETRYABLE_CODES: &[(u32, &str)] = &[
    (159, "TIMEOUT_EXCEEDED"),
    (202, "TOO_MANY_SIMULTANEOUS_QUERIES"),
    (209, "SOCKET_TIMEOUT"),
    (210, "NETWORK_ERROR"),
    (225, "NO_ZOOKEEPER"),
    (241, "MEMORY_LIMIT_EXCEEDED"),
    (242, "TABLE_IS_READ_ONLY"),
    (243, "NOT_ENOUGH_SPACE"),
    (252, "TOO_MANY_PARTS"),
    (319, "UNKNOWN_STATUS_OF_INSERT"),
    (394, "QUERY_WAS_CANCELLED"),
    (439, "CANNOT_SCHEDULE_TASK"),
    (999, "KEEPER_EXCEPTION"),
];

#[derive(Deserialize)]
struct Config {
    url: String,
    #[serde(default = "default_database")]
    database: String,
    table: String,
    #[serde(default = "default_user")]
    user: String,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    async_insert: bool,
}

fn default_database() -> String {
    "default".into()
}

fn default_user() -> String {
    "default".into()
}

struct ClickHouse {
    /// Base URL without a trailing `/`.
    url: String,
    /// `database.table`, both checked identifiers.
    table: String,
    user: String,
    password: String,
    async_insert: bool,
}

/// One line of JSONEachRow.
#[derive(Serialize)]
struct Row<'a> {
    uuid: &'a str,
    event: &'a str,
    distinct_id: &'a str,
    person_id: Option<&'a str>,
    timestamp: String,
    /// A JSON string, so a `String` column takes any shape of properties.
    properties: String,
}

/// One insert: its rows' uuids (for the token) and its gzip body.
struct Insert {
    uuids: Vec<String>,
    body: Vec<u8>,
}

impl Plugin for ClickHouse {
    type Config = Config;

    fn new(config: Config) -> Result<Self> {
        let url = base_url(config.url.trim())?;
        let database = config.database.trim();
        let table = config.table.trim();
        check_identifier(database, "database")?;
        check_identifier(table, "table")?;
        let user = config.user.trim().to_string();
        if user.is_empty() || user.contains(':') {
            return Err(Error::msg(format!(
                "user `{user}` must be a ClickHouse user name without `:`, such as default"
            )));
        }
        Ok(ClickHouse {
            url,
            table: format!("{database}.{table}"),
            user,
            password: config.password.unwrap_or_default(),
            async_insert: config.async_insert,
        })
    }

    fn export(&mut self, events: Vec<ExportedEvent>) -> Result<(), ExportError> {
        if events.is_empty() {
            return Ok(());
        }
        // A failed insert fails the batch; the retry sends the earlier
        // inserts again with their tokens and ClickHouse skips them.
        for insert in inserts(&events, MAX_INSERT_BYTES, clock::now_millis())? {
            self.send(insert)?;
        }
        Ok(())
    }
}

impl ClickHouse {
    fn send(&self, insert: Insert) -> Result<(), ExportError> {
        let token = dedup_token(&insert.uuids);
        let query = format!("INSERT INTO {} FORMAT JSONEachRow", self.table);
        let async_insert = if self.async_insert { "1" } else { "0" };
        let mut params = vec![
            ("query", query.as_str()),
            ("insert_deduplication_token", token.as_str()),
            // On by default for replicated tables; explicit so a profile
            // that turned it off does not silently store retries twice.
            ("insert_deduplicate", "1"),
            // Errors raised late would otherwise follow a 200 in the body.
            ("wait_end_of_query", "1"),
            // Explicit both ways: newer servers default to async inserts.
            ("async_insert", async_insert),
        ];
        if self.async_insert {
            // Wait for the flush so its errors reach the plugin and retries,
            // and dedupe async inserts by the same token.
            params.push(("wait_for_async_insert", "1"));
            params.push(("async_insert_deduplicate", "1"));
        }
        let query_string = params
            .iter()
            .map(|(name, value)| format!("{name}={}", encode_component(value)))
            .collect::<Vec<_>>()
            .join("&");

        let count = insert.uuids.len();
        let response = Request::post(format!("{}/?{query_string}", self.url))
            .basic_auth(&self.user, &self.password)
            .header("Content-Encoding", "gzip")
            .header("Content-Type", "application/x-ndjson")
            .body(insert.body)
            .send()?;

        // A 200 whose body holds an exception failed after the headers went
        // out; wait_end_of_query makes it rare, not impossible.
        let body = String::from_utf8_lossy(&response.body);
        if response.is_success() && !body.contains("DB::Exception") {
            let written = written_rows(&response)
                .map(|rows| format!(", {rows} written"))
                .unwrap_or_default();
            info!(
                "inserted {count} row(s) into {} (HTTP {}{written})",
                self.table, response.status
            );
            return Ok(());
        }
        Err(self.failure(&response))
    }

    /// Classifies an error by ClickHouse's exception code (header, else the
    /// `Code: N.` the body starts with), falling back to the status when
    /// there is none: then a proxy answered, not ClickHouse.
    fn failure(&self, response: &Response) -> ExportError {
        let status = response.status;
        let text: String = String::from_utf8_lossy(&response.body)
            .trim()
            .chars()
            .take(500)
            .collect();
        let code = response
            .header("x-clickhouse-exception-code")
            .and_then(|code| code.trim().parse::<u32>().ok())
            .or_else(|| body_code(&text));
        let said = match code {
            Some(code) => format!("HTTP {status}, code {code}: {text}"),
            None => format!("HTTP {status}: {text}"),
        };
        warn!("ClickHouse refused an insert into {}: {said}", self.table);
        let retryable = |message: String| ExportError::Retryable {
            message,
            retry_after: response.retry_after(),
        };

        if let Some(name) = code.and_then(retryable_code) {
            return retryable(format!(
                "ClickHouse could not take the insert into {} for now ({name}; {said}); the batch will be retried",
                self.table
            ));
        }
        if matches!(status, 408 | 429 | 502 | 503 | 504) || (code.is_none() && status >= 500) {
            return retryable(format!(
                "ClickHouse is unavailable ({said}); the batch will be retried"
            ));
        }
        let hint = match code {
            Some(194 | 192 | 193 | 516) => format!(
                "ClickHouse refused user `{}`: check user and password",
                self.user
            ),
            Some(497 | 291) => format!(
                "user `{}` may not insert into {}: GRANT INSERT ON {} TO {}",
                self.user, self.table, self.table, self.user
            ),
            Some(60) => format!(
                "table {} does not exist: create it (see the docs for the columns) or fix database and table",
                self.table
            ),
            Some(81) => format!(
                "database of {} does not exist: create it or fix database",
                self.table
            ),
            Some(6 | 8 | 16 | 25..=27 | 38 | 41 | 53 | 62 | 70 | 72 | 117 | 349 | 376) => format!(
                "ClickHouse could not read the rows into {}: its columns must be uuid, event, distinct_id, person_id (Nullable), timestamp (DateTime64) and properties (String)",
                self.table
            ),
            _ => format!("ClickHouse refused the insert into {}", self.table),
        };
        ExportError::Permanent(format!("{hint} ({said})"))
    }
}

/// Cuts events, sorted by uuid, into inserts of at most `max_bytes` of
/// uncompressed JSON (at least one row each).
fn inserts(
    events: &[ExportedEvent],
    max_bytes: usize,
    now_millis: u64,
) -> Result<Vec<Insert>, ExportError> {
    let mut sorted: Vec<&ExportedEvent> = events.iter().collect();
    sorted.sort_by(|a, b| a.uuid.cmp(&b.uuid));

    let mut inserts = Vec::new();
    let mut current: Option<(GzEncoder<Vec<u8>>, Vec<String>, usize)> = None;
    for event in sorted {
        let mut line = serde_json::to_vec(&row(event, now_millis)?)?;
        line.push(b'\n');
        if let Some((gzip, uuids, size)) = current.take() {
            if size + line.len() > max_bytes {
                inserts.push(finish(gzip, uuids)?);
            } else {
                current = Some((gzip, uuids, size));
            }
        }
        let (gzip, uuids, size) = current.get_or_insert_with(|| {
            (
                GzEncoder::new(Vec::new(), Compression::default()),
                Vec::new(),
                0,
            )
        });
        gzip.write_all(&line).map_err(compression_failed)?;
        uuids.push(event.uuid.clone());
        *size += line.len();
    }
    if let Some((gzip, uuids, _)) = current {
        inserts.push(finish(gzip, uuids)?);
    }
    Ok(inserts)
}

fn finish(gzip: GzEncoder<Vec<u8>>, uuids: Vec<String>) -> Result<Insert, ExportError> {
    Ok(Insert {
        uuids,
        body: gzip.finish().map_err(compression_failed)?,
    })
}

fn compression_failed(err: std::io::Error) -> ExportError {
    ExportError::permanent(format!("failed to compress rows: {err}"))
}

fn row(event: &ExportedEvent, now_millis: u64) -> Result<Row<'_>, ExportError> {
    let at = time::parse_rfc3339(&event.timestamp).unwrap_or_else(|| {
        // The host stores RFC 3339 timestamps, so this is a host bug;
        // the export time keeps the row instead of failing the batch.
        warn!(
            "event {} has timestamp `{}`, which is not RFC 3339; it is inserted with the export time",
            event.uuid, event.timestamp
        );
        time::from_unix_millis(now_millis)
    });
    Ok(Row {
        uuid: &event.uuid,
        event: &event.name,
        distinct_id: &event.distinct_id,
        person_id: event.person_id.as_deref(),
        timestamp: time::clickhouse_datetime64(&at),
        properties: serde_json::to_string(&event.properties)?,
    })
}

/// `sluice-` and 32 hex digits of the SHA-256 of the sorted uuids: the same
/// rows always give the same token, different rows a different one.
fn dedup_token(uuids: &[String]) -> String {
    let mut sorted: Vec<&str> = uuids.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    let mut digest = Sha256::new();
    for uuid in sorted {
        digest.update(uuid.as_bytes());
        digest.update(b"\n");
    }
    let mut token = String::from("sluice-");
    for byte in &digest.finalize()[..16] {
        token.push_str(&format!("{byte:02x}"));
    }
    token
}

fn retryable_code(code: u32) -> Option<&'static str> {
    RETRYABLE_CODES
        .iter()
        .find(|(known, _)| *known == code)
        .map(|(_, name)| *name)
}

/// The `N` of a body that starts `Code: N. DB::Exception: …`.
fn body_code(text: &str) -> Option<u32> {
    let rest = &text[text.find("Code: ")? + "Code: ".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// `written_rows` from `X-ClickHouse-Summary`, whose numbers are strings.
fn written_rows(response: &Response) -> Option<u64> {
    let summary: serde_json::Value =
        serde_json::from_str(response.header("x-clickhouse-summary")?).ok()?;
    match &summary["written_rows"] {
        serde_json::Value::String(rows) => rows.parse().ok(),
        other => other.as_u64(),
    }
}

/// The base URL without a trailing `/`; refuses what would break the query
/// string or smuggle credentials.
fn base_url(url: &str) -> Result<String> {
    let refuse = |why: &str| {
        Error::msg(format!(
            "url `{url}` {why}: use the HTTP interface's address, such as http://localhost:8123 or https://abc123.eu-west-1.aws.clickhouse.cloud:8443"
        ))
    };
    let lower = url.to_ascii_lowercase();
    let rest = ["http://", "https://"]
        .iter()
        .find_map(|scheme| lower.strip_prefix(scheme))
        .ok_or_else(|| refuse("is not an http:// or https:// URL"))?;
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() {
        return Err(refuse("has no host"));
    }
    if host.contains('@') {
        return Err(refuse(
            "carries credentials; put them in user and password instead",
        ));
    }
    if url.contains(['?', '#']) {
        return Err(refuse("has a query string or fragment"));
    }
    Ok(url.trim_end_matches('/').to_string())
}

/// Names go into the query unquoted, so only plain identifiers pass.
fn check_identifier(name: &str, field: &str) -> Result<()> {
    let ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 255;
    if !ok {
        return Err(Error::msg(format!(
            "{field} `{name}` must be a plain ClickHouse identifier: letters, digits and underscores, not starting with a digit"
        )));
    }
    Ok(())
}

/// Percent-encodes a query-string value (RFC 3986 unreserved characters
/// stay as they are).
fn encode_component(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(byte as char)
            }
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

register_plugin!(ClickHouse);

#[cfg(test)]
mod tests {
    use std::io::Read as _;
    use std::time::Duration;

    use flate2::read::GzDecoder;
    use sluice_plugin_sdk::http::{HttpError, Method};
    use sluice_plugin_sdk::testing::{self, MockHost, header};
    use sluice_plugin_sdk::{Value, json};

    use super::*;

    const URL: &str = "http://clickhouse.internal:8123";

    fn config(extra: Value) -> Value {
        let required = json!({
            "url": URL,
            "database": "analytics",
            "table": "events",
            "user": "sluice",
            "password": "s3cret",
        });
        testing::merged(required, extra)
    }

    fn clickhouse(extra: Value) -> ClickHouse {
        testing::plugin(config(extra))
    }

    fn refusal(extra: Value) -> String {
        testing::refusal::<ClickHouse>(config(extra))
    }

    fn event(uuid: &str, properties: Value) -> ExportedEvent {
        ExportedEvent {
            timestamp: "2024-05-01T12:00:00.123Z".into(),
            ..testing::exported_event(uuid, "signed up", properties)
        }
    }

    fn answering(status: u16) -> MockHost {
        let host = MockHost::install();
        host.on_http(move |_| {
            Ok(Response::new(status, "").with_header(
                "X-ClickHouse-Summary",
                r#"{"read_rows":"1","read_bytes":"100","written_rows":"1","written_bytes":"100","total_rows_to_read":"0","result_rows":"1","result_bytes":"100"}"#,
            ))
        });
        host
    }

    fn error_reply(status: u16, code: u32, name: &str) -> Response {
        Response::new(
            status,
            format!(
                "Code: {code}. DB::Exception: Something about it. ({name}) (version 24.8.1.1)\n"
            ),
        )
        .with_header("X-ClickHouse-Exception-Code", &code.to_string())
    }

    fn failing_with(reply: Response) -> ExportError {
        let host = MockHost::install();
        host.on_http(move |_| Ok(reply.clone()));
        clickhouse(json!({}))
            .export(vec![event("id-1", json!({}))])
            .unwrap_err()
    }

    fn query_params(request: &Request) -> Vec<(String, String)> {
        let query = request.url.split_once("/?").unwrap().1;
        query
            .split('&')
            .map(|pair| {
                let (name, value) = pair.split_once('=').unwrap();
                (name.to_string(), percent_decode(value))
            })
            .collect()
    }

    fn param(request: &Request, name: &str) -> Option<String> {
        query_params(request)
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }

    fn percent_decode(text: &str) -> String {
        let mut out = Vec::new();
        let bytes = text.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' {
                out.push(u8::from_str_radix(&text[i + 1..i + 3], 16).unwrap());
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        String::from_utf8(out).unwrap()
    }

    fn rows(request: &Request) -> Vec<Value> {
        let mut text = String::new();
        GzDecoder::new(request.body.as_deref().unwrap())
            .read_to_string(&mut text)
            .unwrap();
        text.lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }

    #[test]
    fn a_batch_is_one_gzip_jsoneachrow_insert_with_a_dedup_token() {
        let host = answering(200);
        let mut plugin = clickhouse(json!({}));
        let mut anonymous = event("id-2", json!({"nested": {"a": [1, null]}}));
        anonymous.person_id = None;
        anonymous.timestamp = "2024-05-02T01:30:00+02:00".into();
        plugin
            .export(vec![anonymous, event("id-1", json!({"plan": "pro"}))])
            .expect("inserted");

        let requests = host.requests();
        assert_eq!(requests.len(), 1);
        let request = &requests[0];
        assert_eq!(request.method, Method::Post);
        assert!(request.url.starts_with("http://clickhouse.internal:8123/?query=INSERT%20INTO%20analytics.events%20FORMAT%20JSONEachRow&"), "{}", request.url);
        assert_eq!(
            query_params(request),
            [
                (
                    "query".to_string(),
                    "INSERT INTO analytics.events FORMAT JSONEachRow".to_string()
                ),
                (
                    "insert_deduplication_token".into(),
                    dedup_token(&["id-1".into(), "id-2".into()])
                ),
                ("insert_deduplicate".into(), "1".into()),
                ("wait_end_of_query".into(), "1".into()),
                ("async_insert".into(), "0".into()),
            ]
        );
        // "sluice:s3cret"
        assert_eq!(
            header(request, "authorization"),
            Some("Basic c2x1aWNlOnMzY3JldA==")
        );
        assert_eq!(header(request, "content-encoding"), Some("gzip"));
        // Sorted by uuid.
        assert_eq!(
            rows(request),
            [
                json!({"uuid": "id-1", "event": "signed up", "distinct_id": "user-1", "person_id": "person-1", "timestamp": "2024-05-01 12:00:00.123", "properties": "{\"plan\":\"pro\"}"}),
                json!({"uuid": "id-2", "event": "signed up", "distinct_id": "user-1", "person_id": null, "timestamp": "2024-05-01 23:30:00.000", "properties": "{\"nested\":{\"a\":[1,null]}}"}),
            ]
        );
        assert!(host.logs().iter().any(|line| {
            line.message
                .contains("inserted 2 row(s) into analytics.events (HTTP 200, 1 written)")
        }));
    }

    #[test]
    fn the_token_depends_on_the_rows_not_their_order() {
        let host = answering(200);
        let mut plugin = clickhouse(json!({}));
        let batch = vec![
            event("id-1", json!({})),
            event("id-2", json!({})),
            event("id-3", json!({})),
        ];
        plugin.export(batch.clone()).unwrap();
        plugin
            .export(batch.iter().rev().cloned().collect())
            .unwrap();
        plugin.export(batch[..2].to_vec()).unwrap();
        let requests = host.requests();
        let token = |i: usize| param(&requests[i], "insert_deduplication_token").unwrap();
        assert_eq!(token(0), token(1));
        assert_eq!(requests[0].body, requests[1].body, "same rows, same bytes");
        assert_ne!(token(0), token(2));
        assert!(token(0).starts_with("sluice-") && token(0).len() == 7 + 32);
    }

    #[test]
    fn a_large_batch_is_cut_into_inserts_under_the_size_limit_the_same_way_every_time() {
        let batch: Vec<ExportedEvent> = (0..10)
            .map(|i| event(&format!("id-{i}"), json!({"pad": "x".repeat(100)})))
            .collect();
        let line_len = serde_json::to_vec(&row(&batch[0], 0).unwrap())
            .unwrap()
            .len()
            + 1;
        let limit = line_len * 3 + 1;
        let cut = |events: &[ExportedEvent]| -> Vec<Vec<String>> {
            inserts(events, limit, 0)
                .unwrap()
                .into_iter()
                .map(|insert| insert.uuids)
                .collect()
        };
        let forward = cut(&batch);
        assert_eq!(
            forward.iter().map(Vec::len).collect::<Vec<_>>(),
            [3, 3, 3, 1]
        );
        assert_eq!(forward[0], ["id-0", "id-1", "id-2"]);
        let reversed: Vec<ExportedEvent> = batch.iter().rev().cloned().collect();
        assert_eq!(cut(&reversed), forward);

        // A row over the limit still goes, alone.
        let big = vec![
            event("big", json!({"pad": "x".repeat(limit)})),
            event("small", json!({})),
        ];
        assert_eq!(cut(&big).iter().map(Vec::len).collect::<Vec<_>>(), [1, 1]);
    }

    #[test]
    fn a_failed_insert_fails_the_batch_and_later_inserts_are_not_sent() {
        let host = MockHost::install();
        let mut calls = 0;
        host.on_http(move |_| {
            calls += 1;
            Ok(if calls == 2 {
                error_reply(500, 252, "TOO_MANY_PARTS")
            } else {
                Response::new(200, "")
            })
        });
        let batch: Vec<ExportedEvent> = (0..3)
            .map(|i| {
                event(
                    &format!("id-{i}"),
                    json!({"pad": "x".repeat(MAX_INSERT_BYTES / 2)}),
                )
            })
            .collect();
        let err = clickhouse(json!({})).export(batch).unwrap_err();
        assert!(matches!(err, ExportError::Retryable { .. }), "{err:?}");
        assert_eq!(host.requests().len(), 2);
    }

    #[test]
    fn async_inserts_wait_for_the_flush_and_deduplicate() {
        let host = answering(200);
        clickhouse(json!({"async_insert": true}))
            .export(vec![event("id-1", json!({}))])
            .unwrap();
        let request = &host.requests()[0];
        assert_eq!(param(request, "async_insert").as_deref(), Some("1"));
        assert_eq!(
            param(request, "wait_for_async_insert").as_deref(),
            Some("1")
        );
        assert_eq!(
            param(request, "async_insert_deduplicate").as_deref(),
            Some("1")
        );
    }

    #[test]
    fn transient_codes_and_statuses_are_retryable() {
        for (status, code, name) in [
            (500, 252, "TOO_MANY_PARTS"),
            (500, 241, "MEMORY_LIMIT_EXCEEDED"),
            (500, 202, "TOO_MANY_SIMULTANEOUS_QUERIES"),
            (503, 209, "SOCKET_TIMEOUT"),
            (500, 210, "NETWORK_ERROR"),
            (408, 159, "TIMEOUT_EXCEEDED"),
            (503, 439, "CANNOT_SCHEDULE_TASK"),
        ] {
            match failing_with(error_reply(status, code, name)) {
                ExportError::Retryable {
                    message,
                    retry_after,
                } => {
                    assert!(message.contains(name), "{message}");
                    assert!(
                        message.contains(&format!(
                            "HTTP {status}, code {code}: Code: {code}. DB::Exception"
                        )),
                        "{message}"
                    );
                    assert_eq!(retry_after, None);
                }
                other => panic!("{name} should be retryable, got {other:?}"),
            }
        }
        // Without a code, a proxy answered: its 5xx is retried.
        assert!(matches!(
            failing_with(Response::new(502, "Bad Gateway")),
            ExportError::Retryable { .. }
        ));
        assert!(matches!(
            failing_with(Response::new(500, "")),
            ExportError::Retryable { .. }
        ));
        match failing_with(Response::new(429, "slow").with_header("Retry-After", "9")) {
            ExportError::Retryable { retry_after, .. } => {
                assert_eq!(retry_after, Some(Duration::from_secs(9)))
            }
            other => panic!("429 should be retryable, got {other:?}"),
        }
    }

    #[test]
    fn refusals_are_permanent_and_say_what_to_fix() {
        for (status, code, name, hint) in [
            (
                403,
                516,
                "AUTHENTICATION_FAILED",
                "ClickHouse refused user `sluice`: check user and password",
            ),
            (401, 194, "REQUIRED_PASSWORD", "check user and password"),
            (
                403,
                497,
                "ACCESS_DENIED",
                "GRANT INSERT ON analytics.events TO sluice",
            ),
            (
                404,
                60,
                "UNKNOWN_TABLE",
                "table analytics.events does not exist",
            ),
            (
                404,
                81,
                "UNKNOWN_DATABASE",
                "database of analytics.events does not exist",
            ),
            (
                400,
                117,
                "INCORRECT_DATA",
                "its columns must be uuid, event",
            ),
            (400, 41, "CANNOT_PARSE_DATETIME", "timestamp (DateTime64)"),
            // ClickHouse's catch-all status with a code not known to pass.
            (
                500,
                49,
                "LOGICAL_ERROR",
                "ClickHouse refused the insert into analytics.events",
            ),
        ] {
            match failing_with(error_reply(status, code, name)) {
                ExportError::Permanent(message) => {
                    assert!(message.contains(hint), "{name}: {message}");
                    assert!(message.contains(&format!("({name})")), "{message}");
                    assert!(!message.contains("s3cret"));
                }
                other => panic!("{name} should be permanent, got {other:?}"),
            }
        }
    }

    #[test]
    fn the_code_is_read_from_the_body_when_the_header_is_missing() {
        let reply = Response::new(
            500,
            "Code: 252. DB::Exception: Too many parts (300). (TOO_MANY_PARTS) (version 23.8.1)",
        );
        assert!(matches!(failing_with(reply), ExportError::Retryable { .. }));
    }

    #[test]
    fn an_exception_after_a_200_is_not_a_success() {
        let reply = Response::new(
            200,
            "Code: 241. DB::Exception: Memory limit (total) exceeded. (MEMORY_LIMIT_EXCEEDED)",
        );
        assert!(matches!(failing_with(reply), ExportError::Retryable { .. }));
        let reply = Response::new(
            200,
            "Code: 27. DB::Exception: Cannot parse input. (CANNOT_PARSE_INPUT_ASSERTION_FAILED)",
        );
        assert!(matches!(failing_with(reply), ExportError::Permanent(_)));
    }

    #[test]
    fn network_failures_are_retryable_and_refusals_by_the_host_permanent() {
        let host = MockHost::install();
        host.on_http(|_| Err(HttpError::Connection("connection refused".into())));
        let mut plugin = clickhouse(json!({}));
        let err = plugin.export(vec![event("id-1", json!({}))]).unwrap_err();
        assert!(matches!(err, ExportError::Retryable { .. }), "{err:?}");
        host.on_http(|_| Err(HttpError::Denied("not allowed".into())));
        let err = plugin.export(vec![event("id-1", json!({}))]).unwrap_err();
        assert!(matches!(err, ExportError::Permanent(_)), "{err:?}");
    }

    #[test]
    fn an_empty_batch_sends_nothing() {
        let host = answering(500);
        clickhouse(json!({})).export(Vec::new()).unwrap();
        assert!(host.requests().is_empty());
    }

    #[test]
    fn a_url_path_is_kept_and_an_empty_password_is_sent_empty() {
        let host = answering(200);
        let mut plugin = clickhouse(
            json!({"url": "https://proxy.example.com/clickhouse/", "password": null, "user": "default", "database": "default"}),
        );
        plugin.export(vec![event("id-1", json!({}))]).unwrap();
        let request = &host.requests()[0];
        assert!(
            request.url.starts_with(
                "https://proxy.example.com/clickhouse/?query=INSERT%20INTO%20default.events%20"
            ),
            "{}",
            request.url
        );
        // "default:"
        assert_eq!(header(request, "authorization"), Some("Basic ZGVmYXVsdDo="));
    }

    #[test]
    fn a_malformed_timestamp_is_inserted_with_the_export_time() {
        let host = answering(200);
        let mut broken = event("id-1", json!({}));
        broken.timestamp = "yesterday".into();
        clickhouse(json!({})).export(vec![broken]).unwrap();
        // The mock host's clock.
        assert_eq!(
            rows(&host.requests()[0])[0]["timestamp"],
            json!("2024-01-01 00:00:00.000")
        );
        assert!(
            host.logs()
                .iter()
                .any(|line| line.message.contains("not RFC 3339"))
        );
    }

    #[test]
    fn bad_config_is_refused_with_a_clear_message() {
        let err = refusal(json!({"table": "events; DROP TABLE users"}));
        assert!(
            err.contains("table `events; DROP TABLE users` must be a plain ClickHouse identifier"),
            "{err}"
        );
        let err = refusal(json!({"database": "1st"}));
        assert!(
            err.contains("database `1st` must be a plain ClickHouse identifier"),
            "{err}"
        );
        let err = refusal(json!({"table": "analytics.events"}));
        assert!(err.contains("plain ClickHouse identifier"), "{err}");
        let err = refusal(json!({"url": "localhost:8123"}));
        assert!(err.contains("is not an http:// or https:// URL"), "{err}");
        let err = refusal(json!({"url": "http://localhost:8123/?database=x"}));
        assert!(err.contains("query string"), "{err}");
        let err = refusal(json!({"url": "http://admin:pw@localhost:8123"}));
        assert!(err.contains("carries credentials"), "{err}");
        let err = refusal(json!({"url": "http:///x"}));
        assert!(err.contains("has no host"), "{err}");
        let err = refusal(json!({"user": "a:b"}));
        assert!(err.contains("without `:`"), "{err}");
        let err = refusal(json!({"table": null}));
        assert!(err.contains("invalid config"), "{err}");
    }

    #[test]
    fn the_manifest_describes_every_field_and_its_defaults_are_accepted() {
        let manifest: Value =
            toml::from_str(include_str!("../plugin.toml")).expect("plugin.toml parses");
        assert_eq!(manifest["hooks"], json!(["export"]));
        assert_eq!(
            manifest["capabilities"]["http_hosts"],
            json!(["{config.url}"])
        );
        let mut config = testing::manifest_defaults(&manifest);
        config.insert("url".into(), json!(URL));
        config.insert("table".into(), json!("events"));
        let plugin =
            testing::setup::<ClickHouse>(Value::Object(config)).expect("defaults are valid");
        assert_eq!(plugin.table, "default.events");
        assert_eq!(plugin.user, "default");
        assert_eq!(plugin.password, "");
        assert!(!plugin.async_insert);
    }
}
