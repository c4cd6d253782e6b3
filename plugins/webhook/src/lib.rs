//! Webhook destination: sends exported events as JSON to one HTTP endpoint
//! chosen by the install, for receivers that have no dedicated Sluice
//! plugin (internal services, automation tools, serverless functions).
//!
//! Delivery is at least once: the host retries a whole batch after any
//! failure, including one that happens halfway through "each" mode. So every
//! request names the uuids its body carries in `X-Sluice-Event-Ids`, and
//! receivers de-duplicate by them. An optional HMAC-SHA256 signature over
//! the exact body bytes lets a receiver refuse requests that did not come
//! from this install.
//!
//! `body_template` is compiled once in [`Plugin::new`], so a mistyped
//! placeholder fails the install where the operator sees it instead of
//! dead-lettering every batch, and rendering an event only walks a prepared
//! tree.

use std::collections::HashSet;
use std::fmt::Write as _;

use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;
use sluice_plugin_sdk::http::{self, Method, Request};
use sluice_plugin_sdk::template::{Field, Json};
use sluice_plugin_sdk::{
    Error, ExportError, ExportedEvent, Map, Plugin, Result, Value, info, json, register_plugin,
};

/// Lets receivers de-duplicate redelivered events without parsing the body.
const EVENT_IDS_HEADER: &str = "X-Sluice-Event-Ids";

#[derive(Deserialize)]
struct Config {
    url: String,
    #[serde(default)]
    method: HttpMethod,
    // Taken untyped so `new` can say exactly what is wrong with it.
    #[serde(default)]
    headers: Value,
    #[serde(default)]
    body_template: Option<Value>,
    #[serde(default)]
    mode: Mode,
    #[serde(default)]
    secret: Option<String>,
    #[serde(default = "default_signature_header")]
    signature_header: String,
    #[serde(default)]
    events: Value,
}

fn default_signature_header() -> String {
    "X-Sluice-Signature".into()
}

#[derive(Clone, Copy, Default, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
enum HttpMethod {
    #[default]
    Post,
    Put,
    Patch,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
enum Mode {
    #[default]
    Batch,
    Each,
}

struct Webhook {
    url: String,
    method: Method,
    /// Content-Type and the configured headers, sent on every request.
    headers: Vec<(String, String)>,
    template: Json,
    mode: Mode,
    signer: Option<Signer>,
    /// Event names to send; empty sends every event.
    events: HashSet<String>,
}

impl Plugin for Webhook {
    type Config = Config;

    fn new(config: Config) -> Result<Self> {
        let url = config.url.trim();
        if !http::is_absolute_url(url) {
            return Err(Error::msg(
                "url must be an absolute http:// or https:// URL, such as https://hooks.example.com/sluice",
            ));
        }

        // An empty secret signs nothing anyone could check, and forms send
        // "" for a field left blank, so it means "not set".
        let signer = match config.secret.filter(|secret| !secret.is_empty()) {
            Some(secret) => {
                let header = config.signature_header.trim().to_string();
                check_header_name(&header, "signature_header")?;
                if header.eq_ignore_ascii_case(EVENT_IDS_HEADER) {
                    return Err(Error::msg(format!(
                        "signature_header must not be {EVENT_IDS_HEADER}, which carries the event ids"
                    )));
                }
                Some(Signer::new(header, secret.as_bytes()))
            }
            None => None,
        };

        let template = match &config.body_template {
            Some(template) => Json::compile(template, "body_template")?,
            None => default_record(),
        };

        Ok(Webhook {
            url: url.to_string(),
            method: match config.method {
                HttpMethod::Post => Method::Post,
                HttpMethod::Put => Method::Put,
                HttpMethod::Patch => Method::Patch,
            },
            headers: headers(&config.headers, signer.as_ref())?,
            template,
            mode: config.mode,
            signer,
            events: event_names(&config.events)?,
        })
    }

    fn export(&mut self, events: Vec<ExportedEvent>) -> Result<(), ExportError> {
        let wanted: Vec<&ExportedEvent> = events
            .iter()
            .filter(|event| self.events.is_empty() || self.events.contains(&event.name))
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        match self.mode {
            Mode::Batch => {
                let records = wanted.iter().map(|e| self.template.render(e)).collect();
                self.send(&Value::Array(records), &wanted)
            }
            Mode::Each => {
                // Stopping at the first failure is enough: the host retries
                // the whole batch and receivers drop the uuids they have.
                for event in &wanted {
                    self.send(&self.template.render(event), std::slice::from_ref(event))?;
                }
                Ok(())
            }
        }
    }
}

impl Webhook {
    fn send(&self, body: &Value, events: &[&ExportedEvent]) -> Result<(), ExportError> {
        let body = serde_json::to_vec(body)?;
        let ids: Vec<&str> = events.iter().map(|event| event.uuid.as_str()).collect();
        let mut request = Request::new(self.method, &self.url);
        request.headers = self.headers.clone();
        request = request.header(EVENT_IDS_HEADER, ids.join(","));
        if let Some(signer) = &self.signer {
            request = request.header(&signer.header, signer.sign(&body));
        }
        let response = request.body(body).send()?;
        // The URL stays out of the log: webhook URLs often embed a token.
        info!(
            "webhook answered HTTP {} for {} event(s)",
            response.status,
            events.len()
        );
        response.error_for_status()?;
        Ok(())
    }
}

/// Validates the `headers` config and puts Content-Type in front unless the
/// install sets its own.
fn headers(config: &Value, signer: Option<&Signer>) -> Result<Vec<(String, String)>> {
    let empty = Map::new();
    let map = match config {
        Value::Null => &empty,
        Value::Object(map) => map,
        other => {
            return Err(Error::msg(format!(
                "headers must be a JSON object of header name to string value, such as {{\"Authorization\": \"Bearer …\"}}; got {}",
                json::kind(other)
            )));
        }
    };
    let mut headers = Vec::with_capacity(map.len() + 1);
    for (name, value) in map {
        check_header_name(name, "headers")?;
        let Value::String(value) = value else {
            return Err(Error::msg(format!(
                "headers: the value of `{name}` must be a string, got {}",
                json::kind(value)
            )));
        };
        if value.contains(['\r', '\n']) {
            return Err(Error::msg(format!(
                "headers: the value of `{name}` must not contain line breaks"
            )));
        }
        // A second copy would leave the receiver to guess which one counts.
        let reserved = name.eq_ignore_ascii_case(EVENT_IDS_HEADER)
            || signer.is_some_and(|s| name.eq_ignore_ascii_case(&s.header));
        if reserved {
            return Err(Error::msg(format!(
                "headers: `{name}` is set by the plugin itself; remove it from headers"
            )));
        }
        headers.push((name.clone(), value.clone()));
    }
    if !headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("content-type"))
    {
        headers.insert(0, ("Content-Type".into(), "application/json".into()));
    }
    Ok(headers)
}

/// Refuses names the host would reject on every request, so the mistake
/// shows on the install instead.
fn check_header_name(name: &str, field: &str) -> Result<()> {
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if name.is_empty() || !name.chars().all(token) {
        return Err(Error::msg(format!(
            "{field}: `{name}` is not a valid HTTP header name (letters, digits and !#$%&'*+-.^_`|~ only)"
        )));
    }
    Ok(())
}

fn event_names(config: &Value) -> Result<HashSet<String>> {
    let items = match config {
        Value::Null => return Ok(HashSet::new()),
        Value::Array(items) => items,
        other => {
            return Err(Error::msg(format!(
                "events must be a JSON array of event names, such as [\"signed up\"]; got {}",
                json::kind(other)
            )));
        }
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::String(name) => Ok(name.clone()),
            other => Err(Error::msg(format!(
                "events[{i}] must be an event name (a string), got {}",
                json::kind(other)
            ))),
        })
        .collect()
}

/// HMAC-SHA256 keyed once, so each request only hashes its body.
struct Signer {
    header: String,
    mac: Hmac<Sha256>,
}

impl Signer {
    fn new(header: String, secret: &[u8]) -> Self {
        let mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts keys of any length");
        Signer { header, mac }
    }

    /// `sha256=` and the lowercase hex digest, the form GitHub and Stripe
    /// receivers already know how to check.
    fn sign(&self, body: &[u8]) -> String {
        let mut mac = self.mac.clone();
        mac.update(body);
        let mut out = String::with_capacity(7 + 64);
        out.push_str("sha256=");
        for byte in mac.finalize().into_bytes() {
            let _ = write!(out, "{byte:02x}");
        }
        out
    }
}

/// What an event looks like without a template: the exported event as the
/// SDK names its fields.
fn default_record() -> Json {
    Json::Object(vec![
        ("uuid".into(), Json::Value(Field::Uuid)),
        ("event".into(), Json::Value(Field::Event)),
        ("distinct_id".into(), Json::Value(Field::DistinctId)),
        ("person_id".into(), Json::Value(Field::PersonId)),
        ("timestamp".into(), Json::Value(Field::Timestamp)),
        (
            "properties".into(),
            Json::Value(Field::Properties(Vec::new())),
        ),
    ])
}

register_plugin!(Webhook);

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use sha2::Digest;
    use sluice_plugin_sdk::http::{HttpError, Response};
    use sluice_plugin_sdk::log::Level;
    use sluice_plugin_sdk::template::{Piece, Text};
    use sluice_plugin_sdk::testing::{self, MockHost, exported_event, header, json_body};

    const URL: &str = "https://hooks.example.com/sluice";

    fn webhook(config: Value) -> Webhook {
        testing::plugin(config)
    }

    fn answering(status: u16) -> MockHost {
        let host = MockHost::install();
        host.on_http(move |_| Ok(Response::new(status, "")));
        host
    }

    /// HMAC-SHA256 written out from RFC 2104 on plain SHA-256, so the test
    /// does not trust the `hmac` crate it checks.
    fn reference_hmac(key: &[u8], message: &[u8]) -> String {
        let mut block = [0u8; 64];
        if key.len() > 64 {
            block[..32].copy_from_slice(&Sha256::digest(key));
        } else {
            block[..key.len()].copy_from_slice(key);
        }
        let pad = |byte: u8| block.iter().map(|k| k ^ byte).collect::<Vec<u8>>();
        let inner = Sha256::new()
            .chain_update(pad(0x36))
            .chain_update(message)
            .finalize();
        let outer = Sha256::new()
            .chain_update(pad(0x5c))
            .chain_update(inner)
            .finalize();
        outer.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn batch_mode_posts_one_array_of_default_records() {
        let host = answering(200);
        let mut plugin = webhook(json!({"url": URL}));
        let mut anonymous = exported_event("id-2", "pageview", json!({}));
        anonymous.person_id = None;
        plugin
            .export(vec![
                exported_event("id-1", "signed up", json!({"plan": "pro"})),
                anonymous,
            ])
            .expect("delivered");

        let requests = host.requests();
        assert_eq!(requests.len(), 1);
        let request = &requests[0];
        assert_eq!(request.method, Method::Post);
        assert_eq!(request.url, URL);
        assert_eq!(header(request, "content-type"), Some("application/json"));
        assert_eq!(header(request, "x-sluice-event-ids"), Some("id-1,id-2"));
        assert_eq!(header(request, "x-sluice-signature"), None);
        assert_eq!(
            json_body(request),
            json!([
                {
                    "uuid": "id-1",
                    "event": "signed up",
                    "distinct_id": "user-1",
                    "person_id": "person-1",
                    "timestamp": "2024-01-01T00:00:00.000Z",
                    "properties": {"plan": "pro"},
                },
                {
                    "uuid": "id-2",
                    "event": "pageview",
                    "distinct_id": "user-1",
                    "person_id": null,
                    "timestamp": "2024-01-01T00:00:00.000Z",
                    "properties": {},
                },
            ])
        );
        let record = &json_body(request)[0];
        let keys: Vec<&String> = record.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            [
                "uuid",
                "event",
                "distinct_id",
                "person_id",
                "timestamp",
                "properties"
            ]
        );
    }

    #[test]
    fn each_request_is_logged_with_its_status_and_count() {
        let host = answering(202);
        let mut plugin = webhook(json!({"url": URL}));
        plugin
            .export(vec![
                exported_event("id-1", "a", json!({})),
                exported_event("id-2", "b", json!({})),
            ])
            .expect("delivered");
        let logs = host.logs();
        assert_eq!(logs.len(), 1);
        assert_eq!(logs[0].level, Level::Info);
        assert_eq!(logs[0].message, "webhook answered HTTP 202 for 2 event(s)");
        assert!(!logs[0].message.contains("hooks.example.com"));
    }

    #[test]
    fn a_template_keeps_whole_placeholders_typed_and_interpolates_mixed_text() {
        let host = answering(200);
        let mut plugin = webhook(json!({
            "url": URL,
            "mode": "each",
            "body_template": {
                "text": "{{event}} by {{distinct_id}}: {{properties.plan.name}} for {{properties.seats}} seats{{properties.nope}}",
                "seats": "{{properties.seats}}",
                "plan": "{{properties.plan}}",
                "first_tag": "{{ properties.tags.0 }}",
                "missing": "{{properties.nope}}",
                "person": "{{person_id}}",
                "all": "{{properties}}",
                "inline": "props={{properties.plan}} person={{person_id}}",
                "list": ["{{uuid}}", 1, true, null],
                "fixed": {"source": "sluice"},
                "{{event}}": "keys are not templated",
            },
        }));
        let mut anonymous = exported_event(
            "id-1",
            "upgraded",
            json!({"plan": {"name": "pro", "annual": true}, "seats": 5, "tags": ["a", "b"]}),
        );
        anonymous.person_id = None;
        plugin.export(vec![anonymous]).expect("delivered");

        assert_eq!(
            json_body(&host.requests()[0]),
            json!({
                "text": "upgraded by user-1: pro for 5 seats",
                "seats": 5,
                "plan": {"name": "pro", "annual": true},
                "first_tag": "a",
                "missing": null,
                "person": null,
                "all": {"plan": {"name": "pro", "annual": true}, "seats": 5, "tags": ["a", "b"]},
                "inline": "props={\"name\":\"pro\",\"annual\":true} person=",
                "list": ["id-1", 1, true, null],
                "fixed": {"source": "sluice"},
                "{{event}}": "keys are not templated",
            })
        );
    }

    #[test]
    fn a_template_is_compiled_once_with_constant_parts_left_as_literals() {
        let template = Json::compile(
            &json!({"fixed": {"a": [1, "b"]}, "name": "{{event}}", "note": "{{event}}!"}),
            "body_template",
        )
        .unwrap();
        assert_eq!(
            template,
            Json::Object(vec![
                ("fixed".into(), Json::Literal(json!({"a": [1, "b"]}))),
                ("name".into(), Json::Value(Field::Event)),
                (
                    "note".into(),
                    Json::Text(Text::from(vec![
                        Piece::Field(Field::Event),
                        Piece::Text("!".into())
                    ]))
                ),
            ])
        );
    }

    #[test]
    fn a_secret_signs_the_exact_body_bytes_with_hmac_sha256() {
        let host = answering(200);
        let mut plugin = webhook(json!({"url": URL, "secret": "s3cr3t"}));
        plugin
            .export(vec![exported_event(
                "id-1",
                "signed up",
                json!({"plan": "pro"}),
            )])
            .expect("delivered");

        let request = &host.requests()[0];
        let sent = request.body.as_deref().unwrap();
        let expected = format!("sha256={}", reference_hmac(b"s3cr3t", sent));
        assert_eq!(
            header(request, "X-Sluice-Signature"),
            Some(expected.as_str())
        );
    }

    #[test]
    fn the_signature_matches_the_rfc_4231_test_vectors() {
        let signer = Signer::new("X-Sig".into(), b"Jefe");
        assert_eq!(
            signer.sign(b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // A key longer than the block size is hashed first.
        let long_key = [0xaa; 131];
        let signer = Signer::new("X-Sig".into(), &long_key);
        let message = b"Test Using Larger Than Block-Size Key - Hash Key First";
        assert_eq!(
            signer.sign(message),
            "sha256=60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
        assert_eq!(
            signer.sign(message),
            format!("sha256={}", reference_hmac(&long_key, message))
        );
    }

    #[test]
    fn the_signature_header_name_and_the_method_can_be_changed() {
        let host = answering(200);
        let mut plugin = webhook(json!({
            "url": URL,
            "method": "PUT",
            "secret": "k",
            "signature_header": "X-Hub-Signature-256",
        }));
        plugin
            .export(vec![exported_event("id-1", "a", json!({}))])
            .expect("delivered");
        let request = &host.requests()[0];
        assert_eq!(request.method, Method::Put);
        assert!(
            header(request, "X-Hub-Signature-256")
                .unwrap()
                .starts_with("sha256=")
        );
        assert_eq!(header(request, "X-Sluice-Signature"), None);
    }

    #[test]
    fn configured_headers_are_sent_and_may_replace_the_content_type() {
        let host = answering(200);
        let mut plugin = webhook(json!({
            "url": URL,
            "headers": {"Authorization": "Bearer t0ken", "Content-Type": "application/vnd.acme+json"},
        }));
        plugin
            .export(vec![exported_event("id-1", "a", json!({}))])
            .expect("delivered");
        let request = &host.requests()[0];
        assert_eq!(header(request, "authorization"), Some("Bearer t0ken"));
        assert_eq!(
            header(request, "content-type"),
            Some("application/vnd.acme+json")
        );
    }

    #[test]
    fn each_mode_sends_one_request_per_event() {
        let host = answering(200);
        let mut plugin = webhook(json!({"url": URL, "mode": "each", "method": "PATCH"}));
        plugin
            .export(vec![
                exported_event("id-1", "a", json!({"n": 1})),
                exported_event("id-2", "b", json!({"n": 2})),
                exported_event("id-3", "c", json!({"n": 3})),
            ])
            .expect("delivered");

        let requests = host.requests();
        assert_eq!(requests.len(), 3);
        for (i, request) in requests.iter().enumerate() {
            let uuid = format!("id-{}", i + 1);
            assert_eq!(request.method, Method::Patch);
            assert_eq!(header(request, "x-sluice-event-ids"), Some(uuid.as_str()));
            let record = json_body(request);
            assert!(record.is_object(), "each mode sends a bare record");
            assert_eq!(record["uuid"], json!(uuid));
            assert_eq!(record["properties"]["n"], json!(i + 1));
        }
        assert_eq!(host.logs().len(), 3);
    }

    #[test]
    fn each_mode_stops_at_the_first_failure_and_returns_it() {
        let host = MockHost::install();
        host.on_http(|request| {
            let status = if header(request, "x-sluice-event-ids") == Some("id-2") {
                503
            } else {
                200
            };
            Ok(Response::new(status, "down"))
        });
        let mut plugin = webhook(json!({"url": URL, "mode": "each"}));
        let err = plugin
            .export(vec![
                exported_event("id-1", "a", json!({})),
                exported_event("id-2", "b", json!({})),
                exported_event("id-3", "c", json!({})),
            ])
            .unwrap_err();
        assert_eq!(
            err,
            ExportError::Retryable {
                message: "HTTP 503: down".into(),
                retry_after: None
            }
        );
        assert_eq!(host.requests().len(), 2, "id-3 is never sent");
    }

    #[test]
    fn only_listed_events_are_sent() {
        let host = answering(200);
        let mut plugin = webhook(json!({"url": URL, "events": ["signed up", "upgraded"]}));
        plugin
            .export(vec![
                exported_event("id-1", "pageview", json!({})),
                exported_event("id-2", "signed up", json!({})),
                exported_event("id-3", "upgraded", json!({})),
            ])
            .expect("delivered");
        let requests = host.requests();
        assert_eq!(requests.len(), 1);
        assert_eq!(
            header(&requests[0], "x-sluice-event-ids"),
            Some("id-2,id-3")
        );
        assert_eq!(json_body(&requests[0]).as_array().unwrap().len(), 2);
    }

    #[test]
    fn a_batch_with_every_event_filtered_out_sends_nothing() {
        let host = answering(500);
        let mut plugin = webhook(json!({"url": URL, "events": ["signed up"]}));
        plugin
            .export(vec![exported_event("id-1", "pageview", json!({}))])
            .expect("nothing to deliver is success");
        plugin
            .export(Vec::new())
            .expect("an empty batch is success");
        assert!(host.requests().is_empty());
    }

    #[test]
    fn server_errors_are_retryable() {
        let _host = answering(500);
        let mut plugin = webhook(json!({"url": URL}));
        let err = plugin
            .export(vec![exported_event("id-1", "a", json!({}))])
            .unwrap_err();
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
    }

    #[test]
    fn too_many_requests_is_retryable_after_the_requested_delay() {
        let host = MockHost::install();
        host.on_http(|_| Ok(Response::new(429, "slow down").with_header("Retry-After", "30")));
        let mut plugin = webhook(json!({"url": URL}));
        let err = plugin
            .export(vec![exported_event("id-1", "a", json!({}))])
            .unwrap_err();
        assert_eq!(
            err,
            ExportError::Retryable {
                message: "HTTP 429: slow down".into(),
                retry_after: Some(Duration::from_secs(30)),
            }
        );
    }

    #[test]
    fn a_bad_request_is_permanent() {
        let host = MockHost::install();
        host.on_http(|_| Ok(Response::new(400, "missing field email")));
        let mut plugin = webhook(json!({"url": URL}));
        let err = plugin
            .export(vec![exported_event("id-1", "a", json!({}))])
            .unwrap_err();
        assert_eq!(
            err,
            ExportError::Permanent("HTTP 400: missing field email".into())
        );
    }

    #[test]
    fn network_failures_are_retryable_and_refusals_are_permanent() {
        let host = MockHost::install();
        host.on_http(|_| Err(HttpError::Timeout));
        let mut plugin = webhook(json!({"url": URL}));
        let err = plugin
            .export(vec![exported_event("id-1", "a", json!({}))])
            .unwrap_err();
        assert!(matches!(err, ExportError::Retryable { .. }), "{err:?}");

        host.on_http(|_| Err(HttpError::Denied("hooks.example.com is not allowed".into())));
        let err = plugin
            .export(vec![exported_event("id-1", "a", json!({}))])
            .unwrap_err();
        assert!(matches!(err, ExportError::Permanent(_)), "{err:?}");
    }

    #[test]
    fn headers_that_are_not_an_object_of_strings_are_refused() {
        let refusal = testing::refusal::<Webhook>;
        let err = refusal(json!({"url": URL, "headers": ["Authorization: x"]}));
        assert!(
            err.contains("headers must be a JSON object") && err.contains("an array"),
            "{err}"
        );
        let err = refusal(json!({"url": URL, "headers": {"X-Count": 3}}));
        assert!(
            err.contains("value of `X-Count` must be a string, got the number 3"),
            "{err}"
        );
        let err = refusal(json!({"url": URL, "headers": {"Bad Name": "x"}}));
        assert!(
            err.contains("`Bad Name` is not a valid HTTP header name"),
            "{err}"
        );
        let err = refusal(json!({"url": URL, "headers": {"x-sluice-event-ids": "x"}}));
        assert!(err.contains("set by the plugin itself"), "{err}");
    }

    #[test]
    fn an_unknown_placeholder_is_refused_by_name_and_place() {
        let err = testing::refusal::<Webhook>(
            json!({"url": URL, "body_template": {"user": ["{{foo}}"]}}),
        );
        assert!(
            err.contains("body_template.user[0]: unknown placeholder `{{foo}}`"),
            "{err}"
        );
        assert!(err.contains("{{properties.NAME}}"), "{err}");
    }

    #[test]
    fn malformed_placeholders_are_refused() {
        let refusal = testing::refusal::<Webhook>;
        let err = refusal(json!({"url": URL, "body_template": "{{event.name}}"}));
        assert!(
            err.contains("`{{event.name}}` has a path, but only {{properties}}"),
            "{err}"
        );
        let err = refusal(json!({"url": URL, "body_template": "{{properties..a}}"}));
        assert!(err.contains("empty segment"), "{err}");
        let err = refusal(json!({"url": URL, "body_template": {"a": "hi {{event"}}));
        assert!(
            err.contains("body_template.a: `{{` is not closed by `}}`"),
            "{err}"
        );
    }

    #[test]
    fn other_bad_config_is_refused_with_a_clear_message() {
        let refusal = testing::refusal::<Webhook>;
        let err = refusal(json!({"url": "hooks.example.com/sluice"}));
        assert!(
            err.contains("url must be an absolute http:// or https:// URL"),
            "{err}"
        );
        let err = refusal(json!({"url": URL, "events": "signed up"}));
        assert!(err.contains("events must be a JSON array"), "{err}");
        let err = refusal(json!({"url": URL, "events": ["a", 1]}));
        assert!(err.contains("events[1] must be an event name"), "{err}");
        let err = refusal(json!({"url": URL, "secret": "k", "signature_header": ""}));
        assert!(err.contains("signature_header"), "{err}");
        let err = refusal(json!({"url": URL, "mode": "stream"}));
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
        let plugin = webhook(Value::Object(config));
        assert_eq!(plugin.mode, Mode::Batch);
        assert_eq!(plugin.method, Method::Post);
        assert!(plugin.events.is_empty());
        assert_eq!(
            plugin.headers,
            [("Content-Type".to_string(), "application/json".to_string())]
        );
    }
}
