//! Salesforce destination: keeps a Lead or Contact per person up to date
//! from the profile data in Sluice events, the way a CRM sync does.
//!
//! **Which events.** `$identify` events and events carrying a `$set` object
//! become records; every other event is skipped. `field_mapping` picks the
//! Salesforce fields and the Sluice properties they come from.
//!
//! **Idempotent writes.** Records are upserted with sObject Collections
//! (`PATCH /composite/sobjects/{object}/{external_id_field}`), keyed by an
//! External ID field holding the event's distinct id: the id the customer's
//! own product knows the user by, and readable in Salesforce. Redelivering a
//! batch updates the same records again. A person's events within a batch
//! merge into one record, since Salesforce fails every copy of an external
//! ID repeated in one call.
//!
//! **Required fields only on create.** Upsert cannot tell "create" from
//! "update", and sending a placeholder `Company` on every update would
//! overwrite what the sales team typed. So records go without `defaults`
//! first; those Salesforce refuses with `REQUIRED_FIELD_MISSING` (only
//! possible on create) are sent once more with the defaults added.
//!
//! **Partial failures.** Calls use `allOrNone: false`, so good records are
//! written even when others fail, and every chunk is sent. If any record
//! failed for a passing reason (a locked row), the batch is retried; else,
//! if any was refused, the batch goes to dead letters with the event uuids
//! and Salesforce's reasons. A failed call (limit, outage) stops the batch
//! at once; the retry rewrites the chunks already sent, harmlessly.
//!
//! **Sign-in.** See [`oauth`]: the session is cached in the key-value store
//! and renewed once per call when Salesforce answers 401.

mod oauth;
mod records;

use std::fmt::Write as _;
use std::time::Duration;

use serde::Deserialize;
use sluice_plugin_sdk::http::{self, HttpError, Request, Response};
use sluice_plugin_sdk::{
    Error, ExportError, ExportedEvent, Map, Plugin, Result, Value, info, json, register_plugin,
    warn,
};

use oauth::{Credentials, Session};
use records::{Mapping, Record, check_api_name, parse_defaults};

/// sObject Collections take at most 200 records per call.
const MAX_RECORDS_PER_CALL: usize = 200;

/// Salesforce sends no Retry-After. Concurrent-request limits clear as soon
/// as long calls finish (they count calls running over 20 s)...
const CONCURRENT_LIMIT_WAIT: Duration = Duration::from_secs(30);
/// ...while the daily allocation is a rolling 24 hours that frees up as old
/// calls age out, so asking again within minutes would only burn retries.
const DAILY_LIMIT_WAIT: Duration = Duration::from_secs(15 * 60);

/// Per-record error codes that a later attempt can clear. Everything else
/// (validation rules, bad values, duplicates) needs a person to act.
const RETRYABLE_RECORD_ERRORS: &[&str] = &[
    "UNABLE_TO_LOCK_ROW",
    "REQUEST_LIMIT_EXCEEDED",
    "SERVER_UNAVAILABLE",
];

/// How many failed records an error message spells out.
const FAILURES_SHOWN: usize = 10;

#[derive(Deserialize)]
struct Config {
    #[serde(default = "default_login_url")]
    login_url: String,
    client_id: String,
    #[serde(default)]
    client_secret: Option<String>,
    refresh_token: String,
    #[serde(default = "default_api_version")]
    api_version: String,
    #[serde(default)]
    object: SObject,
    external_id_field: String,
    #[serde(default = "default_field_mapping")]
    field_mapping: Value,
    #[serde(default)]
    defaults: Option<Value>,
    // Read by the host to grant the host; the plugin only checks its form.
    #[serde(default)]
    instance_url: Option<String>,
}

fn default_login_url() -> String {
    "https://login.salesforce.com".into()
}

fn default_api_version() -> String {
    "61.0".into()
}

fn default_field_mapping() -> Value {
    sluice_plugin_sdk::json!({"Email": "email", "FirstName": "first_name", "LastName": "last_name"})
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq)]
enum SObject {
    #[default]
    Lead,
    Contact,
}

impl SObject {
    fn name(self) -> &'static str {
        match self {
            SObject::Lead => "Lead",
            SObject::Contact => "Contact",
        }
    }

    /// Placeholders for the fields Salesforce requires to create one.
    fn default_defaults(self) -> Map<String, Value> {
        let placeholder = || Value::String("[not provided]".into());
        let mut defaults = Map::new();
        defaults.insert("LastName".into(), placeholder());
        if self == SObject::Lead {
            defaults.insert("Company".into(), placeholder());
        }
        defaults
    }
}

struct Salesforce {
    credentials: Credentials,
    /// `vNN.N`, as it appears in paths.
    api_version: String,
    object: SObject,
    external_id_field: String,
    mapping: Mapping,
    defaults: Map<String, Value>,
}

/// What Salesforce did with one record.
#[derive(Debug)]
enum Outcome {
    Written,
    /// Refused for lacking required fields: it was being created.
    MissingRequired(String),
    Retry(String),
    Refused(String),
}

/// One entry of the array an sObject Collections call answers with.
#[derive(Deserialize)]
struct RecordResult {
    success: bool,
    #[serde(default)]
    created: Option<bool>,
    #[serde(default)]
    errors: Vec<RecordError>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RecordError {
    #[serde(default)]
    status_code: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    fields: Vec<String>,
}

/// One entry of the array REST API errors come as.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ApiError {
    #[serde(default)]
    error_code: String,
    #[serde(default)]
    message: String,
}

impl Plugin for Salesforce {
    type Config = Config;

    fn new(config: Config) -> Result<Self> {
        let login_url = absolute_url(&config.login_url, "login_url")?;
        if let Some(url) = config
            .instance_url
            .as_deref()
            .filter(|u| !u.trim().is_empty())
        {
            absolute_url(url, "instance_url")?;
        }
        let client_id = config.client_id.trim().to_string();
        if client_id.is_empty() {
            return Err(Error::msg(
                "client_id must be the connected app's consumer key",
            ));
        }
        let refresh_token = config.refresh_token.trim().to_string();
        if refresh_token.is_empty() {
            return Err(Error::msg(
                "refresh_token must be a refresh token issued for the connected app",
            ));
        }
        let external_id_field = config.external_id_field.trim().to_string();
        check_api_name(&external_id_field, "external_id_field")?;
        if external_id_field.eq_ignore_ascii_case("Id") {
            return Err(Error::msg(
                "external_id_field must be a field marked External ID, such as Sluice_Id__c, not Id",
            ));
        }
        let mapping = Mapping::parse(&config.field_mapping, &external_id_field)?;
        let defaults = match &config.defaults {
            Some(defaults) => parse_defaults(defaults, &external_id_field)?,
            None => config.object.default_defaults(),
        };
        Ok(Salesforce {
            credentials: Credentials::new(
                login_url,
                client_id,
                // Forms send "" for a field left blank.
                config.client_secret.filter(|s| !s.is_empty()),
                refresh_token,
            ),
            api_version: api_version(&config.api_version)?,
            object: config.object,
            external_id_field,
            mapping,
            defaults,
        })
    }

    fn export(&mut self, events: Vec<ExportedEvent>) -> Result<(), ExportError> {
        let records = self.mapping.records(&events);
        if records.is_empty() {
            return Ok(());
        }
        let mut session = self.credentials.session()?;

        let all: Vec<&Record> = records.iter().collect();
        let mut outcomes = self.upsert(&mut session, &all, false)?;
        let needing_defaults: Vec<usize> = outcomes
            .iter()
            .enumerate()
            .filter(|(_, (record, outcome))| {
                matches!(outcome, Outcome::MissingRequired(_)) && self.defaults_add_to(record)
            })
            .map(|(i, _)| i)
            .collect();
        if !needing_defaults.is_empty() {
            let again: Vec<&Record> = needing_defaults.iter().map(|&i| outcomes[i].0).collect();
            let second = self.upsert(&mut session, &again, true)?;
            for (i, (_, outcome)) in needing_defaults.into_iter().zip(second) {
                outcomes[i].1 = outcome;
            }
        }
        self.verdict(&outcomes, records.len())
    }
}

impl Salesforce {
    fn defaults_add_to(&self, record: &Record) -> bool {
        self.defaults
            .keys()
            .any(|field| !record.fields.contains_key(field))
    }

    /// Upserts `records` in calls of at most 200 and reports each record's
    /// outcome. A call that fails as a whole fails the batch.
    fn upsert<'r>(
        &mut self,
        session: &mut Session,
        records: &[&'r Record],
        with_defaults: bool,
    ) -> Result<Vec<(&'r Record, Outcome)>, ExportError> {
        let mut outcomes = Vec::with_capacity(records.len());
        for chunk in records.chunks(MAX_RECORDS_PER_CALL) {
            let body = serde_json::to_vec(&self.body(chunk, with_defaults))?;
            let response = self.call(session, &body)?;
            log_api_usage(&response);
            if !response.is_success() {
                return Err(self.call_error(&response));
            }
            let results: Vec<RecordResult> = response.json().map_err(|err| {
                ExportError::retryable(format!(
                    "Salesforce answered the upsert with an unexpected body: {err}"
                ))
            })?;
            if results.len() != chunk.len() {
                return Err(ExportError::retryable(format!(
                    "Salesforce answered {} result(s) for {} record(s)",
                    results.len(),
                    chunk.len()
                )));
            }
            let created = results
                .iter()
                .filter(|r| r.success && r.created == Some(true))
                .count();
            let written = results.iter().filter(|r| r.success).count();
            info!(
                "upserted {written} of {} {} record(s): {created} created, {} updated",
                chunk.len(),
                self.object.name(),
                written - created
            );
            outcomes.extend(chunk.iter().copied().zip(results.into_iter().map(outcome)));
        }
        Ok(outcomes)
    }

    fn body(&self, records: &[&Record], with_defaults: bool) -> Value {
        let object = self.object.name();
        let records: Vec<Value> = records
            .iter()
            .map(|record| {
                let mut fields = Map::new();
                fields.insert(
                    "attributes".into(),
                    sluice_plugin_sdk::json!({"type": object}),
                );
                fields.insert(
                    self.external_id_field.clone(),
                    Value::String(record.external_id.clone()),
                );
                for (field, value) in &record.fields {
                    fields.insert(field.clone(), value.clone());
                }
                if with_defaults {
                    for (field, value) in &self.defaults {
                        if !fields.contains_key(field) {
                            fields.insert(field.clone(), value.clone());
                        }
                    }
                }
                Value::Object(fields)
            })
            .collect();
        sluice_plugin_sdk::json!({"allOrNone": false, "records": records})
    }

    /// Sends one upsert call, renewing the session once if Salesforce no
    /// longer accepts it.
    fn call(&mut self, session: &mut Session, body: &[u8]) -> Result<Response, ExportError> {
        let response = self.send(session, body)?;
        if response.status != 401 {
            return Ok(response);
        }
        *session = self.credentials.renew(session)?;
        let response = self.send(session, body)?;
        if response.status == 401 {
            return Err(ExportError::permanent(format!(
                "Salesforce refused a freshly issued access token ({}): check that the integration user is active, has the API Enabled permission and that the connected app allows the `api` scope",
                api_error_text(&response)
            )));
        }
        Ok(response)
    }

    fn send(&self, session: &Session, body: &[u8]) -> Result<Response, ExportError> {
        let url = format!(
            "{}/services/data/{}/composite/sobjects/{}/{}",
            session.instance_url,
            self.api_version,
            self.object.name(),
            self.external_id_field
        );
        Request::patch(url)
            .bearer_auth(&session.access_token)
            .header("content-type", "application/json")
            .header("accept", "application/json")
            .body(body.to_vec())
            .send()
            .map_err(|err| match err {
                HttpError::Denied(reason) => ExportError::permanent(format!(
                    "cannot reach the Salesforce instance {} named by the token response: {reason}. If the org lives outside salesforce.com, set `instance_url` to it",
                    session.instance_url
                )),
                other => other.into(),
            })
    }

    /// Classifies a call that failed as a whole.
    fn call_error(&self, response: &Response) -> ExportError {
        let errors: Vec<ApiError> = response.json().unwrap_or_default();
        let detail = api_error_text(response);
        let object = self.object.name();
        match response.status {
            403 if errors
                .iter()
                .any(|e| e.error_code == "REQUEST_LIMIT_EXCEEDED") =>
            {
                let concurrent = errors
                    .iter()
                    .any(|e| e.message.contains("ConcurrentRequests"));
                let usage = response
                    .header("sforce-limit-info")
                    .map(|u| format!(" ({u})"))
                    .unwrap_or_default();
                ExportError::Retryable {
                    message: format!("Salesforce's API request limit is reached{usage}: {detail}"),
                    retry_after: Some(if concurrent {
                        CONCURRENT_LIMIT_WAIT
                    } else {
                        DAILY_LIMIT_WAIT
                    }),
                }
            }
            403 => ExportError::permanent(format!(
                "Salesforce refused the upsert (403 {detail}): give the integration user create and edit access to {object} and its mapped fields"
            )),
            404 => ExportError::permanent(format!(
                "Salesforce found no {object} field {} to upsert by (404 {detail}): check `object`, `external_id_field` and `api_version`",
                self.external_id_field
            )),
            400 => ExportError::permanent(format!(
                "Salesforce refused the upsert request (400 {detail}): check `field_mapping` and `defaults` against the fields of {object}, and that `{}` is marked External ID",
                self.external_id_field
            )),
            status if status == 429 || status >= 500 => ExportError::Retryable {
                message: format!("Salesforce is unavailable (HTTP {status} {detail})"),
                retry_after: response.retry_after(),
            },
            status => ExportError::permanent(format!(
                "Salesforce refused the upsert (HTTP {status} {detail})"
            )),
        }
    }

    /// The whole batch's result from every record's outcome.
    fn verdict(&self, outcomes: &[(&Record, Outcome)], total: usize) -> Result<(), ExportError> {
        let retry: Vec<(&Record, &str)> = outcomes
            .iter()
            .filter_map(|(record, outcome)| match outcome {
                Outcome::Retry(reason) => Some((*record, reason.as_str())),
                _ => None,
            })
            .collect();
        let refused: Vec<(&Record, String)> = outcomes
            .iter()
            .filter_map(|(record, outcome)| match outcome {
                Outcome::Refused(reason) => Some((*record, reason.clone())),
                Outcome::MissingRequired(reason) => Some((
                    *record,
                    format!("{reason} (add the field to `field_mapping` or `defaults`)"),
                )),
                _ => None,
            })
            .collect();
        let object = self.object.name();
        if !retry.is_empty() {
            let mut message = format!(
                "Salesforce could not write {} of {total} {object} record(s) for now",
                retry.len()
            );
            if !refused.is_empty() {
                let _ = write!(message, " and refused {}", refused.len());
            }
            message.push_str(": ");
            message.push_str(&describe(retry.iter().map(|(r, why)| (*r, *why))));
            return Err(ExportError::retryable(message));
        }
        if !refused.is_empty() {
            return Err(ExportError::permanent(format!(
                "Salesforce refused {} of {total} {object} record(s); the others were written. Fix the mapping or the data in Salesforce, then replay the dead letters: {}",
                refused.len(),
                describe(refused.iter().map(|(r, why)| (*r, why.as_str())))
            )));
        }
        Ok(())
    }
}

fn outcome(result: RecordResult) -> Outcome {
    if result.success {
        return Outcome::Written;
    }
    let reason = if result.errors.is_empty() {
        "no reason given".to_string()
    } else {
        result
            .errors
            .iter()
            .map(|e| {
                let mut text = format!("{}: {}", e.status_code, e.message);
                if !e.fields.is_empty() {
                    let _ = write!(text, " [{}]", e.fields.join(", "));
                }
                text
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    let codes = || result.errors.iter().map(|e| e.status_code.as_str());
    if codes().any(|code| RETRYABLE_RECORD_ERRORS.contains(&code)) {
        Outcome::Retry(reason)
    } else if !result.errors.is_empty() && codes().all(|code| code == "REQUIRED_FIELD_MISSING") {
        Outcome::MissingRequired(reason)
    } else {
        Outcome::Refused(reason)
    }
}

/// "events a, b (distinct id "u1"): REASON; …", capped so a large batch
/// gives a readable message.
fn describe<'a>(failures: impl ExactSizeIterator<Item = (&'a Record, &'a str)>) -> String {
    let count = failures.len();
    let mut parts: Vec<String> = failures
        .take(FAILURES_SHOWN)
        .map(|(record, reason)| {
            format!(
                "event(s) {} (distinct id {:?}): {reason}",
                record.uuids.join(", "),
                record.external_id
            )
        })
        .collect();
    if count > FAILURES_SHOWN {
        parts.push(format!("and {} more", count - FAILURES_SHOWN));
    }
    parts.join("; ")
}

/// `errorCode: message` of a REST error array, or the start of the body.
fn api_error_text(response: &Response) -> String {
    match response.json::<Vec<ApiError>>() {
        Ok(errors) if !errors.is_empty() => errors
            .iter()
            .map(|e| format!("{}: {}", e.error_code, e.message))
            .collect::<Vec<_>>()
            .join("; "),
        _ => String::from_utf8_lossy(&response.body)
            .chars()
            .take(300)
            .collect::<String>()
            .trim()
            .to_string(),
    }
}

/// Warns when the org has used nine tenths of its daily API allocation,
/// before the limit starts refusing calls.
fn log_api_usage(response: &Response) {
    let Some(info) = response.header("sforce-limit-info") else {
        return;
    };
    let usage = info
        .split(';')
        .find_map(|part| part.trim().strip_prefix("api-usage="))
        .and_then(|usage| usage.split_once('/'))
        .and_then(|(used, max)| {
            Some((
                used.trim().parse::<u64>().ok()?,
                max.trim().parse::<u64>().ok()?,
            ))
        });
    if let Some((used, max)) = usage
        && max > 0
        && used * 10 >= max * 9
    {
        warn!("the Salesforce org has used {used} of its {max} daily API requests");
    }
}

fn absolute_url(url: &str, setting: &str) -> Result<String> {
    let url = url.trim().trim_end_matches('/');
    if !http::is_absolute_url(url) {
        return Err(Error::msg(format!(
            "{setting} must be an absolute https:// URL, such as https://login.salesforce.com; got {}",
            json::kind(&Value::String(url.to_string()))
        )));
    }
    Ok(url.to_string())
}

/// `61.0` (or `v61.0`) to `v61.0`, refusing versions without the
/// collections upsert.
fn api_version(text: &str) -> Result<String> {
    let text = text.trim();
    let number = text.strip_prefix(['v', 'V']).unwrap_or(text);
    let parsed = number
        .split_once('.')
        .filter(|(_, minor)| minor.len() == 1 && minor.chars().all(|c| c.is_ascii_digit()))
        .and_then(|(major, _)| major.parse::<u32>().ok());
    match parsed {
        Some(major) if major >= 46 => Ok(format!("v{number}")),
        Some(_) => Err(Error::msg(format!(
            "api_version {number} is too old: sObject Collections upsert needs 46.0 or later"
        ))),
        None => Err(Error::msg(format!(
            "api_version must look like 61.0, got {text:?}"
        ))),
    }
}

register_plugin!(Salesforce);

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;

    use super::*;
    use sluice_plugin_sdk::http::{Method, Request};
    use sluice_plugin_sdk::json;
    use sluice_plugin_sdk::log::Level;
    use sluice_plugin_sdk::testing::{self, MockHost, header, json_body, permanent};

    const LOGIN: &str = "https://login.salesforce.com";
    const INSTANCE: &str = "https://acme.my.salesforce.com";
    const UPSERT: &str =
        "https://acme.my.salesforce.com/services/data/v61.0/composite/sobjects/Lead/Sluice_Id__c";

    fn config() -> Value {
        json!({
            "client_id": "consumer-key",
            "client_secret": "consumer-secret",
            "refresh_token": "refresh-1",
            "external_id_field": "Sluice_Id__c",
        })
    }

    fn with(changes: Value) -> Value {
        testing::merged(config(), changes)
    }

    fn salesforce(config: Value) -> Salesforce {
        testing::plugin(config)
    }

    fn identify(uuid: &str, distinct_id: &str, set: Value) -> ExportedEvent {
        ExportedEvent {
            distinct_id: distinct_id.into(),
            timestamp: "2024-05-01T12:00:00.000Z".into(),
            ..testing::exported_event(uuid, "$identify", json!({"$set": set}))
        }
    }

    fn json_response(status: u16, body: Value) -> Response {
        Response::new(status, body.to_string()).with_header("content-type", "application/json")
    }

    fn all_created(body: &Value) -> Response {
        let n = body["records"].as_array().unwrap().len();
        json_response(
            200,
            Value::Array(
                (0..n)
                    .map(|i| json!({"id": format!("00Q{i:012}"), "success": true, "errors": [], "created": true}))
                    .collect(),
            ),
        )
    }

    fn failed(code: &str, message: &str, fields: Value) -> Value {
        json!({"id": null, "success": false, "created": false, "errors": [{"statusCode": code, "message": message, "fields": fields}]})
    }

    fn form(request: &Request) -> Vec<(String, String)> {
        let text = String::from_utf8(request.body.clone().unwrap()).unwrap();
        text.split('&')
            .map(|pair| {
                let (k, v) = pair.split_once('=').unwrap();
                (k.to_string(), v.to_string())
            })
            .collect()
    }

    fn is_token_request(request: &Request) -> bool {
        request.url == format!("{LOGIN}/services/oauth2/token")
    }

    /// A token endpoint issuing `token-1`, `token-2`, … and an upsert
    /// endpoint answered by `data` with the request's bearer token and body.
    fn serve(host: &MockHost, mut data: impl FnMut(&str, &Value) -> Response + 'static) {
        let issued = Rc::new(RefCell::new(0));
        host.on_http(move |request| {
            if is_token_request(request) {
                *issued.borrow_mut() += 1;
                return Ok(json_response(
                    200,
                    json!({
                        "access_token": format!("token-{}", issued.borrow()),
                        "instance_url": INSTANCE,
                        "id": "https://login.salesforce.com/id/00D/005",
                        "token_type": "Bearer",
                        "issued_at": "1714564800000",
                        "signature": "sig",
                        "scope": "api refresh_token",
                    }),
                ));
            }
            assert_eq!(request.url, UPSERT);
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

    fn upserts(host: &MockHost) -> Vec<Request> {
        host.requests()
            .into_iter()
            .filter(|r| !is_token_request(r))
            .collect()
    }

    #[test]
    fn upserts_profile_events_keyed_by_distinct_id_and_skips_the_rest() {
        let host = MockHost::install();
        serve(&host, |_, body| all_created(body));
        let mut plugin = salesforce(config());
        let mut pageview = identify("e2", "u2", json!({}));
        pageview.name = "$pageview".into();
        pageview.properties = json!({"email": "not-profile@example.com"})
            .as_object()
            .unwrap()
            .clone();
        plugin
            .export(vec![
                identify("e1", "u1", json!({"email": "ada@example.com", "first_name": "Ada", "last_name": "Lovelace", "plan": "pro"})),
                pageview,
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
        assert_eq!(
            form(token),
            [
                ("grant_type".to_string(), "refresh_token".to_string()),
                ("refresh_token".into(), "refresh-1".into()),
                ("client_id".into(), "consumer-key".into()),
                ("client_secret".into(), "consumer-secret".into()),
            ]
        );
        let upsert = &requests[1];
        assert_eq!(upsert.method, Method::Patch);
        assert_eq!(upsert.url, UPSERT);
        assert_eq!(header(upsert, "authorization"), Some("Bearer token-1"));
        assert_eq!(header(upsert, "content-type"), Some("application/json"));
        assert_eq!(
            json_body(upsert),
            json!({
                "allOrNone": false,
                "records": [{
                    "attributes": {"type": "Lead"},
                    "Sluice_Id__c": "u1",
                    "Email": "ada@example.com",
                    "FirstName": "Ada",
                    "LastName": "Lovelace",
                }],
            })
        );
        let logs = host.logs();
        assert!(
            logs.iter()
                .any(|l| l.message == "upserted 1 of 1 Lead record(s): 1 created, 0 updated"),
            "{logs:?}"
        );
        assert!(
            logs.iter().all(|l| !l.message.contains("token-1")),
            "tokens stay out of the log"
        );
    }

    #[test]
    fn a_batch_without_profile_events_sends_nothing() {
        let host = MockHost::install();
        serve(&host, |_, _| panic!("nothing to send"));
        let mut plugin = salesforce(config());
        let mut event = identify("e1", "u1", json!({}));
        event.name = "clicked".into();
        event.properties = Map::new();
        plugin
            .export(vec![event])
            .expect("nothing to do is success");
        plugin
            .export(Vec::new())
            .expect("an empty batch is success");
        assert!(host.requests().is_empty(), "not even a sign-in");
    }

    #[test]
    fn contacts_go_to_the_contact_endpoint_with_the_configured_version() {
        let host = MockHost::install();
        host.on_http(|request| {
            if is_token_request(request) {
                return Ok(json_response(200, json!({"access_token": "t", "instance_url": "https://acme.my.salesforce.com/"})));
            }
            assert_eq!(
                request.url,
                "https://acme.my.salesforce.com/services/data/v58.0/composite/sobjects/Contact/Ext__c"
            );
            assert_eq!(json_body(request)["records"][0]["attributes"], json!({"type": "Contact"}));
            Ok(all_created(&json_body(request)))
        });
        let mut plugin = salesforce(with(
            json!({"object": "Contact", "api_version": "v58.0", "external_id_field": "Ext__c"}),
        ));
        plugin
            .export(vec![identify("e1", "u1", json!({}))])
            .expect("delivered");
    }

    #[test]
    fn more_than_200_people_are_sent_in_calls_of_at_most_200() {
        let host = MockHost::install();
        serve(&host, |_, body| all_created(body));
        let mut plugin = salesforce(config());
        let events: Vec<ExportedEvent> = (0..450)
            .map(|i| {
                identify(
                    &format!("e{i}"),
                    &format!("u{i}"),
                    json!({"email": format!("{i}@example.com")}),
                )
            })
            .collect();
        plugin.export(events).expect("delivered");
        let sizes: Vec<usize> = upserts(&host)
            .iter()
            .map(|r| json_body(r)["records"].as_array().unwrap().len())
            .collect();
        assert_eq!(sizes, [200, 200, 50]);
        let last = json_body(&upserts(&host)[2]);
        assert_eq!(last["records"][49]["Sluice_Id__c"], json!("u449"));
        assert_eq!(token_requests(&host), 1, "one sign-in for the whole batch");
    }

    #[test]
    fn the_session_is_cached_for_later_exports_and_other_instances() {
        let host = MockHost::install();
        serve(&host, |_, body| all_created(body));
        let batch = || vec![identify("e1", "u1", json!({"email": "ada@example.com"}))];
        let mut first = salesforce(config());
        first.export(batch()).unwrap();
        first.export(batch()).unwrap();
        let mut second = salesforce(config());
        second.export(batch()).unwrap();
        assert_eq!(token_requests(&host), 1);
        assert!(
            upserts(&host)
                .iter()
                .all(|r| header(r, "authorization") == Some("Bearer token-1"))
        );

        // New credentials never reuse a session signed in with the old ones.
        let mut rotated = salesforce(with(json!({"refresh_token": "refresh-2"})));
        rotated.export(batch()).unwrap();
        assert_eq!(token_requests(&host), 2);
    }

    #[test]
    fn an_expired_session_is_renewed_once_and_the_call_retried() {
        let host = MockHost::install();
        serve(&host, |token, body| {
            if token == "token-1" {
                json_response(
                    401,
                    json!([{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}]),
                )
            } else {
                all_created(body)
            }
        });
        let mut plugin = salesforce(config());
        plugin
            .export(vec![identify("e1", "u1", json!({}))])
            .expect("delivered after renewal");
        let upserts = upserts(&host);
        assert_eq!(upserts.len(), 2);
        assert_eq!(
            json_body(&upserts[0]),
            json_body(&upserts[1]),
            "the same call is retried"
        );
        assert_eq!(header(&upserts[1], "authorization"), Some("Bearer token-2"));
        assert_eq!(token_requests(&host), 2);
    }

    #[test]
    fn a_token_refused_right_after_renewal_is_permanent() {
        let host = MockHost::install();
        serve(&host, |_, _| {
            json_response(
                401,
                json!([{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}]),
            )
        });
        let mut plugin = salesforce(config());
        let err = plugin
            .export(vec![identify("e1", "u1", json!({}))])
            .unwrap_err();
        let message = permanent(err);
        assert!(
            message.contains(
                "freshly issued access token (INVALID_SESSION_ID: Session expired or invalid)"
            ),
            "{message}"
        );
        assert_eq!(token_requests(&host), 2, "renewed once, not in a loop");
        assert_eq!(upserts(&host).len(), 2);
    }

    #[test]
    fn a_session_renewed_by_another_instance_is_used_without_signing_in_again() {
        let host = MockHost::install();
        serve(&host, |token, body| match token {
            "token-1" => {
                // Another instance renews the shared session meanwhile.
                let credentials = Credentials::new(
                    LOGIN.into(),
                    "consumer-key".into(),
                    None,
                    "refresh-1".into(),
                );
                let renewed = Session {
                    access_token: "token-other".into(),
                    instance_url: INSTANCE.into(),
                    refresh_token: None,
                };
                sluice_plugin_sdk::kv::set_json(&credentials.cache_key, &renewed, None).unwrap();
                json_response(
                    401,
                    json!([{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}]),
                )
            }
            _ => all_created(body),
        });
        let mut plugin = salesforce(config());
        plugin
            .export(vec![identify("e1", "u1", json!({}))])
            .expect("delivered");
        let upserts = upserts(&host);
        assert_eq!(
            header(&upserts[1], "authorization"),
            Some("Bearer token-other")
        );
        assert_eq!(token_requests(&host), 1, "no second sign-in");
    }

    #[test]
    fn a_refused_refresh_token_is_permanent_and_says_to_issue_a_new_one() {
        let host = MockHost::install();
        host.on_http(|_| Ok(json_response(400, json!({"error": "invalid_grant", "error_description": "expired access/refresh token"}))));
        let mut plugin = salesforce(config());
        let err = plugin
            .export(vec![identify("e1", "u1", json!({}))])
            .unwrap_err();
        let message = permanent(err);
        assert!(
            message.contains("invalid_grant: expired access/refresh token"),
            "{message}"
        );
        assert!(message.contains("issue a new refresh token"), "{message}");
        assert!(message.contains("`refresh_token` setting"), "{message}");

        host.on_http(|_| Ok(json_response(400, json!({"error": "invalid_client", "error_description": "invalid client credentials"}))));
        let err = plugin
            .export(vec![identify("e1", "u1", json!({}))])
            .unwrap_err();
        let message = permanent(err);
        assert!(
            message.contains("check `client_id` and `client_secret`"),
            "{message}"
        );

        host.on_http(|_| Ok(Response::new(503, "down").with_header("retry-after", "12")));
        let err = plugin
            .export(vec![identify("e1", "u1", json!({}))])
            .unwrap_err();
        assert_eq!(
            err,
            ExportError::Retryable {
                message: "Salesforce's token endpoint is unavailable (HTTP 503)".into(),
                retry_after: Some(Duration::from_secs(12)),
            }
        );
    }

    #[test]
    fn the_api_request_limit_is_retryable_after_a_wait_that_fits_the_limit() {
        let host = MockHost::install();
        serve(&host, |_, _| {
            json_response(403, json!([{"message": "TotalRequests Limit exceeded.", "errorCode": "REQUEST_LIMIT_EXCEEDED"}]))
                .with_header("Sforce-Limit-Info", "api-usage=15000/15000")
        });
        let mut plugin = salesforce(config());
        let err = plugin
            .export(vec![identify("e1", "u1", json!({}))])
            .unwrap_err();
        assert_eq!(
            err,
            ExportError::Retryable {
                message: "Salesforce's API request limit is reached (api-usage=15000/15000): REQUEST_LIMIT_EXCEEDED: TotalRequests Limit exceeded.".into(),
                retry_after: Some(DAILY_LIMIT_WAIT),
            }
        );
        assert!(
            host.logs()
                .iter()
                .any(|l| l.level == Level::Warn && l.message.contains("used 15000 of its 15000"))
        );

        serve(&host, |_, _| {
            json_response(
                403,
                json!([{"message": "ConcurrentRequests (Concurrent API Requests) Limit exceeded.", "errorCode": "REQUEST_LIMIT_EXCEEDED"}]),
            )
        });
        let err = plugin
            .export(vec![identify("e1", "u1", json!({}))])
            .unwrap_err();
        assert!(
            matches!(
                err,
                ExportError::Retryable {
                    retry_after: Some(CONCURRENT_LIMIT_WAIT),
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn outages_are_retryable_and_refused_calls_are_permanent() {
        let host = MockHost::install();
        serve(&host, |_, _| Response::new(503, "Service Unavailable"));
        let mut plugin = salesforce(config());
        let batch = || vec![identify("e1", "u1", json!({}))];
        let err = plugin.export(batch()).unwrap_err();
        assert!(
            matches!(
                err,
                ExportError::Retryable {
                    retry_after: None,
                    ..
                }
            ),
            "{err:?}"
        );

        serve(&host, |_, _| {
            json_response(
                400,
                json!([{"message": "No such column 'Plan__c' on sobject of type Lead", "errorCode": "INVALID_FIELD"}]),
            )
        });
        let message = permanent(plugin.export(batch()).unwrap_err());
        assert!(
            message.contains("INVALID_FIELD: No such column 'Plan__c'"),
            "{message}"
        );
        assert!(
            message.contains("check `field_mapping` and `defaults`"),
            "{message}"
        );

        serve(&host, |_, _| {
            json_response(
                404,
                json!([{"message": "Provided external ID field does not exist or is not accessible: Sluice_Id__c", "errorCode": "NOT_FOUND"}]),
            )
        });
        let message = permanent(plugin.export(batch()).unwrap_err());
        assert!(
            message.contains("check `object`, `external_id_field`"),
            "{message}"
        );

        serve(&host, |_, _| {
            json_response(
                403,
                json!([{"message": "insufficient access rights on object id", "errorCode": "INSUFFICIENT_ACCESS_OR_READONLY"}]),
            )
        });
        let message = permanent(plugin.export(batch()).unwrap_err());
        assert!(
            message.contains("give the integration user create and edit access to Lead"),
            "{message}"
        );
    }

    #[test]
    fn defaults_fill_required_fields_only_for_records_being_created() {
        let host = MockHost::install();
        let calls = Rc::new(RefCell::new(0));
        let counter = calls.clone();
        serve(&host, move |_, body| {
            *counter.borrow_mut() += 1;
            if *counter.borrow() == 1 {
                // u1 exists and is updated; u2 is new and lacks Company.
                json_response(
                    200,
                    json!([
                        {"id": "00Q1", "success": true, "errors": [], "created": false},
                        failed("REQUIRED_FIELD_MISSING", "Required fields are missing: [Company]", json!(["Company"])),
                    ]),
                )
            } else {
                all_created(body)
            }
        });
        let mut plugin = salesforce(with(json!({"defaults": {"Company": "Unknown"}})));
        plugin
            .export(vec![
                identify("e1", "u1", json!({"last_name": "Lovelace"})),
                identify("e2", "u2", json!({"last_name": "Hopper"})),
            ])
            .expect("delivered");
        let upserts = upserts(&host);
        assert_eq!(upserts.len(), 2);
        assert!(
            json_body(&upserts[0])["records"]
                .as_array()
                .unwrap()
                .iter()
                .all(|r| r.get("Company").is_none())
        );
        assert_eq!(
            json_body(&upserts[1])["records"],
            json!([{"attributes": {"type": "Lead"}, "Sluice_Id__c": "u2", "LastName": "Hopper", "Company": "Unknown"}])
        );
    }

    #[test]
    fn a_required_field_without_a_default_fails_the_batch_permanently() {
        let host = MockHost::install();
        serve(&host, |_, _| {
            json_response(
                200,
                json!([failed(
                    "REQUIRED_FIELD_MISSING",
                    "Required fields are missing: [Company]",
                    json!(["Company"])
                )]),
            )
        });
        let mut plugin = salesforce(with(json!({"defaults": {}})));
        let err = plugin
            .export(vec![identify("e1", "u1", json!({}))])
            .unwrap_err();
        let message = permanent(err);
        assert!(
            message.contains("event(s) e1 (distinct id \"u1\"): REQUIRED_FIELD_MISSING: Required fields are missing: [Company] [Company] (add the field to `field_mapping` or `defaults`)"),
            "{message}"
        );
        assert_eq!(
            upserts(&host).len(),
            1,
            "no second call when defaults add nothing"
        );
    }

    #[test]
    fn refused_records_fail_the_batch_permanently_naming_their_events_after_every_chunk_is_sent() {
        let host = MockHost::install();
        serve(&host, |_, body| {
            let results = body["records"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| {
                    if r["Email"] == json!("bad") {
                        failed(
                            "INVALID_EMAIL_ADDRESS",
                            "Email: invalid email address: bad",
                            json!(["Email"]),
                        )
                    } else {
                        json!({"id": "00Q", "success": true, "errors": [], "created": true})
                    }
                })
                .collect();
            json_response(200, Value::Array(results))
        });
        let mut plugin = salesforce(config());
        let mut events: Vec<ExportedEvent> = (0..250)
            .map(|i| {
                identify(
                    &format!("e{i}"),
                    &format!("u{i}"),
                    json!({"email": format!("{i}@example.com")}),
                )
            })
            .collect();
        events[3] = identify("bad-1", "u3", json!({"email": "bad"}));
        events.push(identify("bad-2", "u3", json!({"first_name": "Ada"})));
        let err = plugin.export(events).unwrap_err();
        let message = permanent(err);
        assert_eq!(
            message,
            "Salesforce refused 1 of 250 Lead record(s); the others were written. Fix the mapping or the data in Salesforce, then replay the dead letters: event(s) bad-1, bad-2 (distinct id \"u3\"): INVALID_EMAIL_ADDRESS: Email: invalid email address: bad [Email]"
        );
        assert_eq!(upserts(&host).len(), 2, "the second chunk is still sent");
    }

    #[test]
    fn a_locked_row_makes_the_batch_retryable_even_beside_refused_records() {
        let host = MockHost::install();
        serve(&host, |_, _| {
            json_response(
                200,
                json!([
                    failed(
                        "UNABLE_TO_LOCK_ROW",
                        "unable to obtain exclusive access to this record",
                        json!([])
                    ),
                    failed(
                        "INVALID_EMAIL_ADDRESS",
                        "Email: invalid email address: x",
                        json!(["Email"])
                    ),
                ]),
            )
        });
        let mut plugin = salesforce(config());
        let err = plugin
            .export(vec![
                identify("e1", "u1", json!({})),
                identify("e2", "u2", json!({"email": "x"})),
            ])
            .unwrap_err();
        let ExportError::Retryable {
            message,
            retry_after: None,
        } = err
        else {
            panic!("{err:?}")
        };
        assert_eq!(
            message,
            "Salesforce could not write 1 of 2 Lead record(s) for now and refused 1: event(s) e1 (distinct id \"u1\"): UNABLE_TO_LOCK_ROW: unable to obtain exclusive access to this record"
        );
    }

    #[test]
    fn a_rotated_refresh_token_is_used_for_the_next_sign_in() {
        let host = MockHost::install();
        let signins = Rc::new(RefCell::new(Vec::new()));
        let seen = signins.clone();
        host.on_http(move |request| {
            if is_token_request(request) {
                let given = form(request).into_iter().find(|(k, _)| k == "refresh_token").unwrap().1;
                seen.borrow_mut().push(given.clone());
                let n = seen.borrow().len();
                return Ok(json_response(200, json!({
                    "access_token": format!("token-{n}"),
                    "instance_url": INSTANCE,
                    "refresh_token": format!("refresh-rotated-{n}"),
                })));
            }
            if header(request, "authorization") == Some("Bearer token-1") {
                return Ok(json_response(401, json!([{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}])));
            }
            Ok(all_created(&json_body(request)))
        });
        let mut plugin = salesforce(config());
        plugin
            .export(vec![identify("e1", "u1", json!({}))])
            .expect("delivered");
        assert_eq!(*signins.borrow(), ["refresh-1", "refresh-rotated-1"]);
    }

    #[test]
    fn an_instance_the_host_refuses_gets_a_message_naming_the_fix() {
        let host = MockHost::install();
        host.on_http(|request| {
            if is_token_request(request) {
                return Ok(json_response(
                    200,
                    json!({"access_token": "t", "instance_url": "https://acme.my.salesforce.mil"}),
                ));
            }
            Err(HttpError::Denied(
                "capability http for acme.my.salesforce.mil:443 is not granted".into(),
            ))
        });
        let mut plugin = salesforce(config());
        let err = plugin
            .export(vec![identify("e1", "u1", json!({}))])
            .unwrap_err();
        let message = permanent(err);
        assert!(
            message.contains("https://acme.my.salesforce.mil named by the token response"),
            "{message}"
        );
        assert!(message.contains("set `instance_url`"), "{message}");
    }

    #[test]
    fn without_the_key_value_store_the_session_is_kept_in_memory() {
        let host = MockHost::install();
        host.deny_kv();
        serve(&host, |_, body| all_created(body));
        let mut plugin = salesforce(config());
        plugin
            .export(vec![identify("e1", "u1", json!({}))])
            .unwrap();
        plugin
            .export(vec![identify("e1", "u1", json!({}))])
            .unwrap();
        assert_eq!(token_requests(&host), 1);
        assert!(
            host.logs().iter().any(|l| l.level == Level::Warn
                && l.message.contains("cannot cache the Salesforce session"))
        );
    }

    #[test]
    fn bad_config_is_refused_with_a_clear_message() {
        let cases = [
            (
                json!({"api_version": "45.0"}),
                "api_version 45.0 is too old",
            ),
            (
                json!({"api_version": "sixty"}),
                "api_version must look like 61.0",
            ),
            (
                json!({"login_url": "login.salesforce.com"}),
                "login_url must be an absolute https:// URL",
            ),
            (
                json!({"instance_url": "acme"}),
                "instance_url must be an absolute https:// URL",
            ),
            (json!({"external_id_field": "Id"}), "not Id"),
            (
                json!({"external_id_field": "Sluice Id"}),
                "external_id_field: `Sluice Id` is not a Salesforce field API name",
            ),
            (json!({"client_id": " "}), "client_id must be"),
            (json!({"refresh_token": ""}), "refresh_token must be"),
            (
                json!({"field_mapping": {"Sluice_Id__c": "x"}}),
                "set by the plugin itself",
            ),
            (
                json!({"defaults": {"Company": null}}),
                "must be a string, number or boolean",
            ),
            (json!({"object": "Account"}), "invalid config"),
        ];
        for (change, expected) in cases {
            let err = testing::refusal::<Salesforce>(with(change.clone()));
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
        assert_eq!(given["field_mapping"], default_field_mapping());
        assert_eq!(given["login_url"], json!(default_login_url()));
        assert_eq!(given["api_version"], json!(default_api_version()));
        for (k, v) in config().as_object().unwrap() {
            given.insert(k.clone(), v.clone());
        }
        let plugin = salesforce(Value::Object(given));
        assert_eq!(plugin.object, SObject::Lead);
        assert_eq!(plugin.api_version, "v61.0");
        assert_eq!(
            Value::Object(plugin.defaults),
            json!({"LastName": "[not provided]", "Company": "[not provided]"})
        );
        let contact = salesforce(with(json!({"object": "Contact"})));
        assert_eq!(
            Value::Object(contact.defaults),
            json!({"LastName": "[not provided]"})
        );
    }
}
