//! BigQuery destination: streams every exported event into one table with
//! `tabledata.insertAll`, one row per event.
//!
//! **Rows.** Each row is `{uuid, event, distinct_id, person_id, timestamp,
//! properties}`, with `properties` as JSON text so one table schema fits
//! every event (a STRING or JSON column takes it). The row's `insertId` is
//! the event uuid, so BigQuery drops the copies a retry sends within its
//! de-duplication window.
//!
//! **Requests.** A batch is split into requests of at most 500 rows and
//! 10 MB, Google's advice and limit. Requests are sent with
//! `skipInvalidRows: false`: if BigQuery refuses one row, it inserts none of
//! that request, so a dead-lettered batch can be replayed without
//! duplicating rows that were accepted. For the same reason the plugin
//! stops at the first request that reports row errors.
//!
//! **Errors.** Rows refused as `invalid` (or for any reason other than a
//! passing one) dead-letter the batch, naming the event uuids and BigQuery's
//! reasons. Rows refused only as `stopped` (held back because another row
//! failed) or for `backendError`-like reasons, 403 `rateLimitExceeded` /
//! `quotaExceeded`, 429 and 5xx are retried. Other 4xx are permanent, with a
//! message saying what to check.
//!
//! **Sign-in.** See [`auth`]: a service-account JWT exchanged for an access
//! token that the install's instances share through the key-value store; a
//! 401 renews it once.

mod auth;

use std::fmt::Write as _;

use serde::Deserialize;
use sluice_plugin_sdk::http::{HttpError, Request, Response};
use sluice_plugin_sdk::{
    Error, ExportError, ExportedEvent, Plugin, Result, Value, info, json, register_plugin,
};

use auth::{ServiceAccount, Token};

/// Google's advice for `insertAll`: at most 500 rows per request.
const MAX_ROWS_PER_REQUEST: usize = 500;
/// BigQuery refuses requests over 10 MB. Counted in decimal megabytes, the
/// stricter reading.
const MAX_REQUEST_BYTES: usize = 10_000_000;
/// Row reasons that a later attempt can clear. `stopped` is handled apart:
/// it only means another row failed.
const RETRYABLE_REASONS: &[&str] = &[
    "backendError",
    "internalError",
    "timeout",
    "rateLimitExceeded",
    "quotaExceeded",
];
/// How many failed rows an error message spells out.
const FAILURES_SHOWN: usize = 10;

#[derive(Deserialize)]
struct Config {
    project_id: String,
    dataset_id: String,
    table_id: String,
    service_account_key: String,
    #[serde(default)]
    ignore_unknown_values: bool,
    #[serde(default = "default_api_base")]
    api_base: String,
}

fn default_api_base() -> String {
    "https://bigquery.googleapis.com".into()
}

struct BigQuery {
    account: ServiceAccount,
    /// The `insertAll` URL of the table.
    url: String,
    /// `project.dataset.table`, for messages.
    table: String,
    ignore_unknown_values: bool,
}

/// A 200 answer; `insertErrors` lists the rows not inserted.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct InsertAllResponse {
    #[serde(default)]
    insert_errors: Vec<RowErrors>,
}

#[derive(Deserialize)]
struct RowErrors {
    index: usize,
    #[serde(default)]
    errors: Vec<ErrorProto>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ErrorProto {
    #[serde(default)]
    reason: String,
    #[serde(default)]
    location: String,
    #[serde(default)]
    message: String,
}

/// Google's error envelope: `{"error": {"code", "message", "errors", "status"}}`.
#[derive(Default, Deserialize)]
struct Envelope {
    #[serde(default)]
    error: GoogleError,
}

#[derive(Default, Deserialize)]
struct GoogleError {
    #[serde(default)]
    message: String,
    #[serde(default)]
    errors: Vec<ErrorProto>,
}

impl Plugin for BigQuery {
    type Config = Config;

    fn new(config: Config) -> Result<Self> {
        let project = config.project_id.trim();
        let project_ok = !project.is_empty()
            && project
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | ':'));
        if !project_ok {
            return Err(Error::msg(format!(
                "project_id must be a Google Cloud project id such as my-project, got {project:?}"
            )));
        }
        let dataset = config.dataset_id.trim();
        let dataset_ok = !dataset.is_empty()
            && dataset.len() <= 1024
            && dataset
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !dataset_ok {
            return Err(Error::msg(format!(
                "dataset_id must be letters, digits and underscores, got {dataset:?}"
            )));
        }
        let table = config.table_id.trim();
        if table.is_empty()
            || table.len() > 1024
            || table.chars().any(|c| c == '/' || c.is_control())
        {
            return Err(Error::msg(format!(
                "table_id must be a table name (no slashes), got {table:?}"
            )));
        }
        let base = config.api_base.trim().trim_end_matches('/');
        let lower = base.to_ascii_lowercase();
        if !["https://", "http://"]
            .iter()
            .any(|scheme| lower.starts_with(scheme) && lower.len() > scheme.len())
        {
            return Err(Error::msg(
                "api_base must be an absolute URL such as https://bigquery.googleapis.com",
            ));
        }
        Ok(BigQuery {
            account: ServiceAccount::parse(&config.service_account_key)?,
            url: format!(
                "{base}/bigquery/v2/projects/{}/datasets/{}/tables/{}/insertAll",
                path_segment(project),
                path_segment(dataset),
                path_segment(table)
            ),
            table: format!("{project}.{dataset}.{table}"),
            ignore_unknown_values: config.ignore_unknown_values,
        })
    }

    fn export(&mut self, events: Vec<ExportedEvent>) -> Result<(), ExportError> {
        if events.is_empty() {
            return Ok(());
        }
        let rows = events
            .iter()
            .map(|event| serde_json::to_vec(&row(event)))
            .collect::<Result<Vec<_>, _>>()?;
        let requests = self.pack(&events, &rows)?;
        let mut token = self.account.token()?;
        for range in requests {
            let response = self.call(&mut token, &rows[range.clone()])?;
            if !response.is_success() {
                return Err(self.call_error(&response));
            }
            let answer: InsertAllResponse = response.json().map_err(|err| {
                ExportError::retryable(format!(
                    "BigQuery answered insertAll with an unexpected body: {err}"
                ))
            })?;
            let sent = &events[range];
            if !answer.insert_errors.is_empty() {
                return Err(self.row_errors(sent, &answer.insert_errors));
            }
            info!("inserted {} row(s) into {}", sent.len(), self.table);
        }
        Ok(())
    }
}

impl BigQuery {
    /// Splits the rows into requests of at most 500 rows and 10 MB.
    fn pack(
        &self,
        events: &[ExportedEvent],
        rows: &[Vec<u8>],
    ) -> Result<Vec<std::ops::Range<usize>>, ExportError> {
        let envelope = self.body(&[]).len();
        let too_large: Vec<&str> = rows
            .iter()
            .zip(events)
            .filter(|(row, _)| envelope + row.len() > MAX_REQUEST_BYTES)
            .map(|(_, event)| event.uuid.as_str())
            .collect();
        if !too_large.is_empty() {
            return Err(ExportError::permanent(format!(
                "event(s) {} are too large for BigQuery, which takes at most 10 MB per request: drop or trim their largest properties with a transformation",
                too_large.join(", ")
            )));
        }
        let mut requests = Vec::new();
        let (mut start, mut bytes) = (0, envelope);
        for (i, row) in rows.iter().enumerate() {
            let comma = usize::from(i > start);
            let full =
                i - start == MAX_ROWS_PER_REQUEST || bytes + comma + row.len() > MAX_REQUEST_BYTES;
            if i > start && full {
                requests.push(start..i);
                (start, bytes) = (i, envelope);
            }
            bytes += usize::from(i > start) + row.len();
        }
        requests.push(start..rows.len());
        Ok(requests)
    }

    /// The request body around already serialised rows, so its size is
    /// known exactly while packing.
    fn body(&self, rows: &[Vec<u8>]) -> Vec<u8> {
        let mut body = format!(
            "{{\"skipInvalidRows\":false,\"ignoreUnknownValues\":{},\"rows\":[",
            self.ignore_unknown_values
        )
        .into_bytes();
        for (i, row) in rows.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(row);
        }
        body.extend_from_slice(b"]}");
        body
    }

    /// Sends one request, renewing the token once if BigQuery refuses it.
    /// The body is built again for the second try rather than kept twice:
    /// near 10 MB, memory is the scarce thing.
    fn call(&mut self, token: &mut Token, rows: &[Vec<u8>]) -> Result<Response, ExportError> {
        let response = self.send(token, self.body(rows))?;
        if response.status != 401 {
            return Ok(response);
        }
        *token = self.account.renew(token)?;
        let response = self.send(token, self.body(rows))?;
        if response.status == 401 {
            return Err(ExportError::permanent(format!(
                "BigQuery refused a freshly issued access token for {} ({}): check that the service account still exists and is enabled",
                self.account.client_email,
                google_error_text(&response)
            )));
        }
        Ok(response)
    }

    fn send(&self, token: &Token, body: Vec<u8>) -> Result<Response, ExportError> {
        Request::post(&self.url)
            .bearer_auth(&token.access_token)
            .header("content-type", "application/json")
            .header("accept", "application/json")
            .body(body)
            .send()
            .map_err(|err| match err {
                HttpError::Denied(reason) => {
                    ExportError::permanent(format!("cannot reach api_base: {reason}"))
                }
                other => other.into(),
            })
    }

    /// Classifies a request that failed as a whole.
    fn call_error(&self, response: &Response) -> ExportError {
        let envelope: Envelope = response.json().unwrap_or_default();
        let reasons: Vec<&str> = envelope
            .error
            .errors
            .iter()
            .map(|e| e.reason.as_str())
            .collect();
        let detail = google_error_text(response);
        let table = &self.table;
        let status = response.status;
        let throttled = reasons
            .iter()
            .any(|r| matches!(*r, "rateLimitExceeded" | "quotaExceeded"));
        if status == 429 || status >= 500 || (status == 403 && throttled) || status == 408 {
            return ExportError::Retryable {
                message: format!("BigQuery did not take the rows for now (HTTP {status} {detail})"),
                retry_after: response.retry_after(),
            };
        }
        let advice = match status {
            403 => format!(
                "give {} permission to insert into {table} (for example roles/bigquery.dataEditor on the dataset)",
                self.account.client_email
            ),
            404 => format!(
                "check project_id, dataset_id and table_id, and that the table {table} exists"
            ),
            413 => "the request is over BigQuery's size limit".to_string(),
            _ => format!("check the table {table} and its schema"),
        };
        ExportError::permanent(format!(
            "BigQuery refused the insert (HTTP {status} {detail}): {advice}"
        ))
    }

    /// The batch's result from `insertErrors`.
    fn row_errors(&self, sent: &[ExportedEvent], errors: &[RowErrors]) -> ExportError {
        let mut refused = Vec::new();
        let mut retry = Vec::new();
        let mut stopped = 0;
        for row in errors {
            let uuid = sent
                .get(row.index)
                .map_or("(unknown row)", |event| event.uuid.as_str());
            let reasons = || row.errors.iter().map(|e| e.reason.as_str());
            let text = row
                .errors
                .iter()
                .map(|e| {
                    let mut text = e.reason.clone();
                    if !e.location.is_empty() {
                        let _ = write!(text, " at {}", e.location);
                    }
                    if !e.message.is_empty() {
                        let _ = write!(text, ": {}", e.message);
                    }
                    text
                })
                .collect::<Vec<_>>()
                .join("; ");
            if reasons().all(|r| r == "stopped") {
                stopped += 1;
            } else if reasons().any(|r| RETRYABLE_REASONS.contains(&r)) {
                retry.push(format!("{uuid}: {text}"));
            } else {
                refused.push(format!("{uuid}: {text}"));
            }
        }
        let table = &self.table;
        if !retry.is_empty() {
            return ExportError::retryable(format!(
                "BigQuery could not insert {} row(s) into {table} for now: {}",
                retry.len(),
                shown(&retry)
            ));
        }
        if !refused.is_empty() {
            return ExportError::permanent(format!(
                "BigQuery refused {} row(s) of {} for {table}, so it inserted none of that request ({stopped} other row(s) held back). Fix the table's schema or the events, then replay the dead letters: {}",
                refused.len(),
                sent.len(),
                shown(&refused)
            ));
        }
        ExportError::retryable(format!(
            "BigQuery held back {stopped} row(s) of {table} without naming a failed row"
        ))
    }
}

/// The row for one event, keyed by its uuid.
fn row(event: &ExportedEvent) -> Value {
    json!({
        "insertId": event.uuid,
        "json": {
            "uuid": event.uuid,
            "event": event.name,
            "distinct_id": event.distinct_id,
            "person_id": event.person_id,
            "timestamp": event.timestamp,
            "properties": Value::Object(event.properties.clone()).to_string(),
        },
    })
}

fn shown(failures: &[String]) -> String {
    let mut text = failures
        .iter()
        .take(FAILURES_SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join("; ");
    if failures.len() > FAILURES_SHOWN {
        let _ = write!(text, "; and {} more", failures.len() - FAILURES_SHOWN);
    }
    text
}

/// `reason: message` from Google's envelope, or the start of the body.
fn google_error_text(response: &Response) -> String {
    let envelope: Envelope = response.json().unwrap_or_default();
    let reason = envelope.error.errors.first().map(|e| e.reason.as_str());
    match (reason, envelope.error.message.as_str()) {
        (Some(reason), message) if !reason.is_empty() => format!("{reason}: {message}"),
        (_, message) if !message.is_empty() => message.to_string(),
        _ => String::from_utf8_lossy(&response.body)
            .chars()
            .take(300)
            .collect::<String>()
            .trim()
            .to_string(),
    }
}

/// Percent-encodes a path segment: table names may hold spaces and other
/// characters a URL path cannot carry as they are.
fn path_segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b':' => {
                out.push(byte as char)
            }
            _ => {
                let _ = write!(out, "%{byte:02X}");
            }
        }
    }
    out
}

register_plugin!(BigQuery);

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;
    use std::time::Duration;

    use super::*;
    use sluice_plugin_sdk::http::Method;
    use sluice_plugin_sdk::testing::{self, MockHost, header, json_body, permanent};

    const PRIVATE_KEY: &str = include_str!("../../../tests/fixtures/bigquery-test-key.pem");
    const TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
    const INSERT: &str = "https://bigquery.googleapis.com/bigquery/v2/projects/my-project/datasets/analytics/tables/events/insertAll";

    fn key_file() -> String {
        json!({
            "type": "service_account",
            "project_id": "my-project",
            "private_key_id": "key-1",
            "private_key": PRIVATE_KEY,
            "client_email": "sluice@my-project.iam.gserviceaccount.com",
            "token_uri": TOKEN_URI,
        })
        .to_string()
    }

    fn config() -> Value {
        json!({
            "project_id": "my-project",
            "dataset_id": "analytics",
            "table_id": "events",
            "service_account_key": key_file(),
        })
    }

    fn with(changes: Value) -> Value {
        testing::merged(config(), changes)
    }

    fn bigquery(config: Value) -> BigQuery {
        testing::plugin(config)
    }

    fn event(uuid: &str, properties: Value) -> ExportedEvent {
        ExportedEvent {
            timestamp: "2024-05-01T12:00:00.000Z".into(),
            ..testing::exported_event(uuid, "signed up", properties)
        }
    }

    fn events(n: usize) -> Vec<ExportedEvent> {
        (0..n)
            .map(|i| event(&format!("e{i}"), json!({"n": i})))
            .collect()
    }

    fn json_response(status: u16, body: Value) -> Response {
        Response::new(status, body.to_string()).with_header("content-type", "application/json")
    }

    fn google_error(status: u16, reason: &str, message: &str) -> Response {
        json_response(
            status,
            json!({"error": {"code": status, "message": message,
                   "errors": [{"domain": "global", "reason": reason, "message": message}],
                   "status": "X"}}),
        )
    }

    fn inserted() -> Response {
        json_response(200, json!({"kind": "bigquery#tableDataInsertAllResponse"}))
    }

    fn is_token_request(request: &Request) -> bool {
        request.url == TOKEN_URI
    }

    /// A token endpoint issuing `token-1`, `token-2`, … for an hour and an
    /// insertAll endpoint answered by `data` with the bearer token and body.
    fn serve(host: &MockHost, mut data: impl FnMut(&str, &Value) -> Response + 'static) {
        let issued = Rc::new(RefCell::new(0));
        host.on_http(move |request| {
            if is_token_request(request) {
                *issued.borrow_mut() += 1;
                return Ok(json_response(
                    200,
                    json!({"access_token": format!("token-{}", issued.borrow()), "expires_in": 3599, "token_type": "Bearer"}),
                ));
            }
            let token = header(request, "authorization")
                .unwrap()
                .strip_prefix("Bearer ")
                .unwrap()
                .to_string();
            Ok(data(&token, &json_body(request)))
        });
    }

    fn token_requests(host: &MockHost) -> usize {
        host.requests()
            .iter()
            .filter(|r| is_token_request(r))
            .count()
    }

    fn inserts(host: &MockHost) -> Vec<Request> {
        host.requests()
            .into_iter()
            .filter(|r| !is_token_request(r))
            .collect()
    }

    fn rows_per_request(host: &MockHost) -> Vec<usize> {
        inserts(host)
            .iter()
            .map(|r| json_body(r)["rows"].as_array().unwrap().len())
            .collect()
    }

    #[test]
    fn inserts_one_row_per_event_keyed_by_its_uuid() {
        let host = MockHost::install();
        serve(&host, |_, _| inserted());
        let mut plugin = bigquery(config());
        let mut anonymous = event("e2", json!({}));
        anonymous.person_id = None;
        plugin
            .export(vec![
                event("e1", json!({"plan": "pro", "seats": 5})),
                anonymous,
            ])
            .expect("delivered");

        let requests = host.requests();
        assert_eq!(requests.len(), 2);
        let token = &requests[0];
        assert_eq!(token.method, Method::Post);
        assert_eq!(
            header(token, "content-type"),
            Some("application/x-www-form-urlencoded")
        );
        let form = String::from_utf8(token.body.clone().unwrap()).unwrap();
        assert!(
            form.starts_with(
                "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion=ey"
            ),
            "{form}"
        );

        let insert = &requests[1];
        assert_eq!(insert.method, Method::Post);
        assert_eq!(insert.url, INSERT);
        assert_eq!(header(insert, "authorization"), Some("Bearer token-1"));
        assert_eq!(header(insert, "content-type"), Some("application/json"));
        assert_eq!(
            json_body(insert),
            json!({
                "skipInvalidRows": false,
                "ignoreUnknownValues": false,
                "rows": [
                    {"insertId": "e1", "json": {"uuid": "e1", "event": "signed up", "distinct_id": "user-1",
                        "person_id": "person-1", "timestamp": "2024-05-01T12:00:00.000Z",
                        "properties": "{\"plan\":\"pro\",\"seats\":5}"}},
                    {"insertId": "e2", "json": {"uuid": "e2", "event": "signed up", "distinct_id": "user-1",
                        "person_id": null, "timestamp": "2024-05-01T12:00:00.000Z", "properties": "{}"}},
                ],
            })
        );
        let logs = host.logs();
        assert!(
            logs.iter()
                .any(|l| l.message == "inserted 2 row(s) into my-project.analytics.events")
        );
        assert!(logs.iter().all(|l| !l.message.contains("token-1")));
    }

    #[test]
    fn batches_are_split_at_500_rows() {
        let host = MockHost::install();
        serve(&host, |_, _| inserted());
        let mut plugin = bigquery(config());
        plugin.export(events(1200)).expect("delivered");
        assert_eq!(rows_per_request(&host), [500, 500, 200]);
        assert_eq!(
            json_body(&inserts(&host)[2])["rows"][199]["insertId"],
            json!("e1199")
        );
        assert_eq!(token_requests(&host), 1);
    }

    #[test]
    fn requests_stay_under_10_mb() {
        let host = MockHost::install();
        serve(&host, |_, _| inserted());
        let mut plugin = bigquery(config());
        let big = "x".repeat(1_000_000);
        let batch: Vec<ExportedEvent> = (0..25)
            .map(|i| event(&format!("e{i}"), json!({"blob": big})))
            .collect();
        plugin.export(batch).expect("delivered");
        let sizes: Vec<usize> = inserts(&host)
            .iter()
            .map(|r| r.body.as_ref().unwrap().len())
            .collect();
        assert!(sizes.iter().all(|&s| s <= MAX_REQUEST_BYTES), "{sizes:?}");
        // A row is just over 1 MB, so nine fit in a request and a tenth does not.
        assert_eq!(rows_per_request(&host), [9, 9, 7]);
    }

    #[test]
    fn an_event_too_large_for_any_request_is_permanent_and_nothing_is_sent() {
        let host = MockHost::install();
        serve(&host, |_, _| inserted());
        let mut plugin = bigquery(config());
        let err = plugin
            .export(vec![
                event("small", json!({})),
                event("huge", json!({"blob": "x".repeat(MAX_REQUEST_BYTES)})),
            ])
            .unwrap_err();
        let message = permanent(err);
        assert!(
            message.starts_with("event(s) huge are too large for BigQuery"),
            "{message}"
        );
        assert!(host.requests().is_empty());
    }

    #[test]
    fn the_token_is_shared_until_shortly_before_it_expires() {
        let host = MockHost::install();
        serve(&host, |_, _| inserted());
        let mut first = bigquery(config());
        first.export(events(1)).unwrap();
        first.export(events(1)).unwrap();
        let mut second = bigquery(config());
        second.export(events(1)).unwrap();
        assert_eq!(token_requests(&host), 1);

        // 3599 s later less the five-minute margin, the token is replaced.
        let start = 1_704_067_200_000;
        host.set_now_millis(start + (3599 - 301) * 1000);
        second.export(events(1)).unwrap();
        assert_eq!(token_requests(&host), 1);
        host.set_now_millis(start + (3599 - 299) * 1000);
        second.export(events(1)).unwrap();
        assert_eq!(token_requests(&host), 2);
        assert_eq!(
            header(&inserts(&host)[4], "authorization"),
            Some("Bearer token-2")
        );
    }

    #[test]
    fn a_refused_token_is_renewed_once_and_the_request_repeated() {
        let host = MockHost::install();
        serve(&host, |token, _| {
            if token == "token-1" {
                google_error(
                    401,
                    "authError",
                    "Request had invalid authentication credentials.",
                )
            } else {
                inserted()
            }
        });
        let mut plugin = bigquery(config());
        plugin.export(events(3)).expect("delivered after renewal");
        let inserts = inserts(&host);
        assert_eq!(inserts.len(), 2);
        assert_eq!(json_body(&inserts[0]), json_body(&inserts[1]));
        assert_eq!(header(&inserts[1], "authorization"), Some("Bearer token-2"));

        serve(&host, |_, _| {
            google_error(
                401,
                "authError",
                "Request had invalid authentication credentials.",
            )
        });
        let err = plugin.export(events(1)).unwrap_err();
        let message = permanent(err);
        assert!(
            message.contains("refused a freshly issued access token"),
            "{message}"
        );
        assert!(
            message.contains("authError: Request had invalid authentication credentials."),
            "{message}"
        );
    }

    #[test]
    fn invalid_rows_are_permanent_naming_their_events_and_later_requests_are_not_sent() {
        let host = MockHost::install();
        serve(&host, |_, body| {
            let rows = body["rows"].as_array().unwrap().len();
            let errors: Vec<Value> = (0..rows)
                .map(|i| {
                    if i == 3 {
                        json!({"index": 3, "errors": [{"reason": "invalid", "location": "timestamp", "debugInfo": "", "message": "Could not parse 'yesterday' as a timestamp."}]})
                    } else {
                        json!({"index": i, "errors": [{"reason": "stopped", "location": "", "debugInfo": "", "message": ""}]})
                    }
                })
                .collect();
            json_response(
                200,
                json!({"kind": "bigquery#tableDataInsertAllResponse", "insertErrors": errors}),
            )
        });
        let mut plugin = bigquery(config());
        let err = plugin.export(events(700)).unwrap_err();
        let message = permanent(err);
        assert_eq!(
            message,
            "BigQuery refused 1 row(s) of 500 for my-project.analytics.events, so it inserted none of that request (499 other row(s) held back). Fix the table's schema or the events, then replay the dead letters: e3: invalid at timestamp: Could not parse 'yesterday' as a timestamp."
        );
        assert_eq!(inserts(&host).len(), 1, "the second request is not sent");
    }

    #[test]
    fn rows_held_back_or_failed_by_the_backend_are_retryable() {
        let host = MockHost::install();
        serve(&host, |_, _| {
            json_response(
                200,
                json!({"insertErrors": [{"index": 0, "errors": [{"reason": "stopped", "message": ""}]}]}),
            )
        });
        let mut plugin = bigquery(config());
        let err = plugin.export(events(2)).unwrap_err();
        assert!(matches!(err, ExportError::Retryable { .. }), "{err:?}");

        serve(&host, |_, _| {
            json_response(
                200,
                json!({"insertErrors": [
                    {"index": 0, "errors": [{"reason": "backendError", "message": "Backend error. Please try again."}]},
                    {"index": 1, "errors": [{"reason": "invalid", "message": "no such field: nope."}]},
                ]}),
            )
        });
        let err = plugin.export(events(2)).unwrap_err();
        let ExportError::Retryable { message, .. } = err else {
            panic!("{err:?}")
        };
        assert!(
            message.contains("e0: backendError: Backend error. Please try again."),
            "{message}"
        );
    }

    #[test]
    fn throttling_and_outages_are_retryable_and_other_refusals_permanent() {
        let host = MockHost::install();
        let mut plugin = bigquery(config());
        let retryable = [
            google_error(
                403,
                "rateLimitExceeded",
                "Exceeded rate limits: too many api requests per user per method",
            ),
            google_error(403, "quotaExceeded", "Exceeded quota: too many bytes"),
            google_error(503, "backendError", "The service is currently unavailable."),
            google_error(500, "internalError", "Internal error"),
            Response::new(429, "slow down").with_header("Retry-After", "9"),
        ];
        for reply in retryable {
            let status = reply.status;
            let answer = reply.clone();
            serve(&host, move |_, _| answer.clone());
            let err = plugin.export(events(1)).unwrap_err();
            assert!(
                matches!(err, ExportError::Retryable { .. }),
                "{status}: {err:?}"
            );
            if status == 429 {
                assert!(
                    matches!(err, ExportError::Retryable { retry_after: Some(d), .. } if d == Duration::from_secs(9))
                );
            }
        }
        let permanent = [
            (
                google_error(
                    403,
                    "accessDenied",
                    "Access Denied: Table my-project:analytics.events",
                ),
                "roles/bigquery.dataEditor",
            ),
            (
                google_error(
                    404,
                    "notFound",
                    "Not found: Table my-project:analytics.events",
                ),
                "check project_id, dataset_id and table_id",
            ),
            (
                google_error(400, "invalid", "Invalid table ID"),
                "invalid: Invalid table ID",
            ),
        ];
        for (reply, expected) in permanent {
            let answer = reply.clone();
            serve(&host, move |_, _| answer.clone());
            let err = plugin.export(events(1)).unwrap_err();
            let message = testing::permanent(err);
            assert!(message.contains(expected), "{message}");
        }
    }

    #[test]
    fn a_refused_key_is_permanent_and_a_token_endpoint_outage_retryable() {
        let host = MockHost::install();
        host.on_http(|_| {
            Ok(json_response(
                400,
                json!({"error": "invalid_grant", "error_description": "Invalid JWT Signature."}),
            ))
        });
        let mut plugin = bigquery(config());
        let err = plugin.export(events(1)).unwrap_err();
        let message = permanent(err);
        assert!(
            message.contains("(invalid_grant: Invalid JWT Signature.)"),
            "{message}"
        );
        assert!(
            message.contains("put it in `service_account_key`"),
            "{message}"
        );

        host.on_http(|_| Ok(Response::new(503, "").with_header("retry-after", "4")));
        assert_eq!(
            plugin.export(events(1)).unwrap_err(),
            ExportError::Retryable {
                message: "Google's token endpoint is unavailable (HTTP 503)".into(),
                retry_after: Some(Duration::from_secs(4)),
            }
        );
    }

    #[test]
    fn a_token_uri_the_host_refuses_gets_a_message_naming_the_rule() {
        let host = MockHost::install();
        host.on_http(|_| {
            Err(HttpError::Denied(
                "capability http for evil.test:443 is not granted".into(),
            ))
        });
        let mut key: Value = serde_json::from_str(&key_file()).unwrap();
        key["token_uri"] = json!("https://evil.test/token");
        let mut plugin = bigquery(with(json!({"service_account_key": key.to_string()})));
        let err = plugin.export(events(1)).unwrap_err();
        let message = permanent(err);
        assert!(
            message.contains("cannot reach the key file's token_uri https://evil.test/token"),
            "{message}"
        );
    }

    #[test]
    fn table_names_are_percent_encoded_in_the_path() {
        let host = MockHost::install();
        serve(&host, |_, _| inserted());
        let mut plugin = bigquery(with(json!({
            "project_id": "example.com:my-project",
            "table_id": "events 2024",
            "api_base": "http://127.0.0.1:9050/",
            "ignore_unknown_values": true,
        })));
        plugin.export(events(1)).unwrap();
        let insert = &inserts(&host)[0];
        assert_eq!(
            insert.url,
            "http://127.0.0.1:9050/bigquery/v2/projects/example.com:my-project/datasets/analytics/tables/events%202024/insertAll"
        );
        assert_eq!(json_body(insert)["ignoreUnknownValues"], json!(true));
    }

    #[test]
    fn bad_config_is_refused_with_a_clear_message() {
        let cases = [
            (
                json!({"project_id": "my project"}),
                "project_id must be a Google Cloud project id",
            ),
            (
                json!({"dataset_id": "analytics-prod"}),
                "dataset_id must be letters, digits and underscores",
            ),
            (json!({"table_id": "a/b"}), "table_id must be a table name"),
            (
                json!({"api_base": "bigquery.googleapis.com"}),
                "api_base must be an absolute URL",
            ),
            (
                json!({"service_account_key": "{}"}),
                "service_account_key has no `client_email`",
            ),
        ];
        for (change, expected) in cases {
            let err = testing::refusal::<BigQuery>(with(change.clone()));
            assert!(err.contains(expected), "{change}: {err}");
        }
    }

    #[test]
    fn the_manifest_describes_every_field_and_its_defaults_are_accepted() {
        let manifest: Value =
            toml::from_str(include_str!("../plugin.toml")).expect("plugin.toml parses");
        assert_eq!(manifest["hooks"], json!(["export"]));
        assert_eq!(manifest["capabilities"]["kv"], json!(true));
        let mut given = testing::manifest_defaults(&manifest);
        assert_eq!(given["api_base"], json!(default_api_base()));
        for (k, v) in config().as_object().unwrap() {
            given.insert(k.clone(), v.clone());
        }
        let plugin = bigquery(Value::Object(given));
        assert_eq!(plugin.url, INSERT);
        assert!(!plugin.ignore_unknown_values);
    }
}
