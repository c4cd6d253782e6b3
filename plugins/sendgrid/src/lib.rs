//! SendGrid destination: adds and updates SendGrid Marketing contacts from
//! the person properties Sluice receives, through `PUT
//! /v3/marketing/contacts`, and optionally adds them to lists.
//!
//! An event updates a contact when it is an identify event (`$identify` or
//! `identify`) or carries `$set` / `$set_once`. SendGrid's contacts are for
//! mailing, so a contact needs an email address; person updates without one
//! are skipped with a log line. All events of one export batch for one
//! address are merged, in order, into one contact: `$set` overwrites,
//! `$set_once` only fills what the batch has not set.
//!
//! SendGrid queues the upsert and answers 202 with a job id, so success
//! means "accepted", not "applied". The upsert is keyed by the contact's
//! identifiers, which makes the host's whole-batch retries harmless.
//! Requests stay within SendGrid's limit of 30,000 contacts and 6 MB each;
//! a rate limit is retried when SendGrid's `X-RateLimit-Reset` says the
//! window ends.

use std::collections::HashMap;
use std::time::Duration;

use serde::Deserialize;
use sluice_plugin_sdk::http::{self, Request, Response};
use sluice_plugin_sdk::{
    Error, ExportError, ExportedEvent, Map, Plugin, Result, Value, clock, info, json, person,
    register_plugin, warn,
};

/// SendGrid's limits on one request: whichever is reached first.
const MAX_CONTACTS: usize = 30_000;
/// SendGrid says 6 MB; the decimal reading is the stricter one.
const MAX_BODY_BYTES: usize = 6_000_000;

const CONTACTS_PATH: &str = "/v3/marketing/contacts";

/// Reserved contact fields a person property may fill. Identifiers other
/// than email are left out: SendGrid updates a contact only when all of
/// its identifiers are sent, which a per-event mapping cannot promise.
const RESERVED_FIELDS: &[&str] = &[
    "email",
    "first_name",
    "last_name",
    "address_line_1",
    "address_line_2",
    "city",
    "state_province_region",
    "postal_code",
    "country",
];

/// How many event uuids a message lists before it says "and N more".
const LISTED_UUIDS: usize = 5;

#[derive(Deserialize)]
struct Config {
    api_key: String,
    // JSON fields are taken untyped so `new` can say exactly what is wrong.
    #[serde(default)]
    list_ids: Value,
    #[serde(default = "default_field_mapping")]
    field_mapping: Value,
    #[serde(default = "default_external_id")]
    external_id: String,
    #[serde(default)]
    custom_fields: Value,
    #[serde(default = "default_base_url")]
    base_url: String,
}

fn default_field_mapping() -> Value {
    json!({
        "email": "email",
        "first_name": "first_name",
        "firstName": "first_name",
        "last_name": "last_name",
        "lastName": "last_name",
    })
}

fn default_external_id() -> String {
    "distinct_id".into()
}

fn default_base_url() -> String {
    "https://api.sendgrid.com".into()
}

/// Where a contact's `external_id` comes from.
#[derive(Debug, PartialEq)]
enum ExternalId {
    None,
    DistinctId,
    Property(String),
}

struct SendGrid {
    api_key: String,
    endpoint: String,
    list_ids: Vec<String>,
    /// Sluice property → reserved field, in config order; includes email.
    fields: Vec<(String, String)>,
    /// Sluice properties that hold the email address, in lookup order.
    email_sources: Vec<String>,
    external_id: ExternalId,
    /// Sluice property → custom field id.
    custom_fields: Vec<(String, String)>,
}

/// A request body and the contacts it carries.
type Chunk<'a> = (Vec<u8>, &'a [Contact]);

/// One SendGrid contact with every update the batch has for it.
#[derive(Debug, Default, PartialEq)]
struct Contact {
    email: String,
    external_id: Option<String>,
    fields: Map<String, Value>,
    custom_fields: Map<String, Value>,
    /// Every event merged into it, in order.
    uuids: Vec<String>,
}

impl Contact {
    fn to_json(&self) -> Value {
        let mut contact = Map::new();
        contact.insert("email".into(), Value::String(self.email.clone()));
        for (field, value) in &self.fields {
            contact.insert(field.clone(), value.clone());
        }
        if let Some(id) = &self.external_id {
            contact.insert("external_id".into(), Value::String(id.clone()));
        }
        if !self.custom_fields.is_empty() {
            contact.insert(
                "custom_fields".into(),
                Value::Object(self.custom_fields.clone()),
            );
        }
        Value::Object(contact)
    }
}

impl Plugin for SendGrid {
    type Config = Config;

    fn new(config: Config) -> Result<Self> {
        let api_key = config.api_key.trim().to_string();
        if api_key.is_empty() {
            return Err(Error::msg(
                "api_key is empty: paste a SendGrid API key with the Marketing permission",
            ));
        }
        let base_url = config.base_url.trim().trim_end_matches('/').to_string();
        if !http::is_absolute_url(&base_url) {
            return Err(Error::msg(format!(
                "base_url must be an absolute https:// URL such as https://api.sendgrid.com; got {base_url:?}"
            )));
        }
        let fields = string_map(&config.field_mapping, "field_mapping", "a reserved field")?;
        for (sluice, field) in &fields {
            if !RESERVED_FIELDS.contains(&field.as_str()) {
                return Err(Error::msg(format!(
                    "field_mapping.{sluice}: `{field}` is not a field this plugin fills; use one of {}, and custom_fields for your own fields",
                    RESERVED_FIELDS.join(", ")
                )));
            }
        }
        let mut email_sources: Vec<String> = fields
            .iter()
            .filter(|(_, field)| field == "email")
            .map(|(sluice, _)| sluice.clone())
            .collect();
        if email_sources.is_empty() {
            email_sources.push("email".into());
        }
        let custom_fields =
            string_map(&config.custom_fields, "custom_fields", "a custom field ID")?;
        for (sluice, id) in &custom_fields {
            if id.contains(char::is_whitespace) {
                return Err(Error::msg(format!(
                    "custom_fields.{sluice}: `{id}` looks like a field name; SendGrid wants the field's ID, such as e1_T, shown by its custom fields API"
                )));
            }
        }
        let external_id = match config.external_id.trim() {
            "" => ExternalId::None,
            "distinct_id" => ExternalId::DistinctId,
            property => ExternalId::Property(property.to_string()),
        };
        Ok(SendGrid {
            api_key,
            endpoint: format!("{base_url}{CONTACTS_PATH}"),
            list_ids: list_ids(&config.list_ids)?,
            fields,
            email_sources,
            external_id,
            custom_fields,
        })
    }

    fn export(&mut self, events: Vec<ExportedEvent>) -> Result<(), ExportError> {
        let contacts = self.contacts(&events);
        if contacts.is_empty() {
            return Ok(());
        }
        let mut jobs = Vec::new();
        for (body, chunk) in self.requests(&contacts)? {
            jobs.push(self.upsert(body, chunk)?);
        }
        info!(
            "SendGrid queued {} contact(s) from {} event(s) in {} request(s); job(s) {}",
            contacts.len(),
            contacts.iter().map(|c| c.uuids.len()).sum::<usize>(),
            jobs.len(),
            jobs.join(", ")
        );
        Ok(())
    }
}

impl SendGrid {
    /// The batch's contacts in first-seen order, merged per address.
    fn contacts(&self, events: &[ExportedEvent]) -> Vec<Contact> {
        let mut contacts: Vec<Contact> = Vec::new();
        let mut by_email: HashMap<String, usize> = HashMap::new();
        let mut skipped = Vec::new();
        let mut dropped = Vec::new();
        for event in events.iter().filter(|event| person::is_update(event)) {
            let Some(email) = self.email(event) else {
                skipped.push(event.uuid.as_str());
                continue;
            };
            let index = *by_email.entry(email.clone()).or_insert_with(|| {
                contacts.push(Contact {
                    email,
                    ..Contact::default()
                });
                contacts.len() - 1
            });
            let contact = &mut contacts[index];
            contact.uuids.push(event.uuid.clone());
            // `$set_once` first, so `$set` of the same event wins.
            let once = person::set_once(event).map(|(key, value)| (key, value, false));
            let set = person::set(event).map(|(key, value)| (key, value, true));
            for (key, value, overwrite) in once.chain(set) {
                // A null would clear the field; SendGrid keeps what is
                // not sent, which is the safer reading of "no value".
                if value.is_null() {
                    continue;
                }
                if let Some(field) = lookup(&self.fields, key).filter(|f| *f != "email") {
                    put(&mut contact.fields, field, text(value), overwrite);
                }
                if let Some(id) = lookup(&self.custom_fields, key) {
                    match custom_value(id, value) {
                        Some(value) => put(&mut contact.custom_fields, id, value, overwrite),
                        None => dropped.push(format!("{key} of {}", event.uuid)),
                    }
                }
            }
            if let Some(id) = self.external_id(event) {
                contact.external_id = Some(id);
            }
        }
        if !skipped.is_empty() {
            info!(
                "skipped {} event(s) without a usable email address: {}",
                skipped.len(),
                list(skipped.iter().copied())
            );
        }
        if !dropped.is_empty() {
            warn!(
                "left out values that are not numbers from number custom fields (IDs ending in _N): {}",
                list(dropped.iter().map(String::as_str))
            );
        }
        contacts
    }

    fn email(&self, event: &ExportedEvent) -> Option<String> {
        let email = self
            .email_sources
            .iter()
            .find_map(|source| person_value(event, source))?
            .trim()
            .to_lowercase();
        person::looks_like_email(&email).then_some(email)
    }

    fn external_id(&self, event: &ExportedEvent) -> Option<String> {
        let id = match &self.external_id {
            ExternalId::None => return None,
            ExternalId::DistinctId => event.distinct_id.trim().to_string(),
            ExternalId::Property(name) => match person::property(event, name)? {
                Value::String(text) => text.trim().to_string(),
                Value::Number(number) => number.to_string(),
                _ => return None,
            },
        };
        (!id.is_empty()).then_some(id)
    }

    /// Request bodies within SendGrid's limits, each with its contacts.
    fn requests<'a>(&self, contacts: &'a [Contact]) -> Result<Vec<Chunk<'a>>, ExportError> {
        let mut head = b"{".to_vec();
        if !self.list_ids.is_empty() {
            head.extend_from_slice(b"\"list_ids\":");
            head.extend(serde_json::to_vec(&self.list_ids)?);
            head.push(b',');
        }
        head.extend_from_slice(b"\"contacts\":[");
        let tail = b"]}";

        let mut requests = Vec::new();
        let mut body = head.clone();
        let mut start = 0;
        for (i, contact) in contacts.iter().enumerate() {
            let item = serde_json::to_vec(&contact.to_json())?;
            if head.len() + item.len() + tail.len() > MAX_BODY_BYTES {
                return Err(ExportError::permanent(format!(
                    "the contact {} from events {} is {} bytes, over SendGrid's limit of 6 MB a request: leave large properties out of `custom_fields`",
                    contact.email,
                    list(contact.uuids.iter().map(String::as_str)),
                    item.len()
                )));
            }
            let count = i - start;
            let separator = usize::from(count > 0);
            if count == MAX_CONTACTS
                || body.len() + separator + item.len() + tail.len() > MAX_BODY_BYTES
            {
                body.extend_from_slice(tail);
                requests.push((
                    std::mem::replace(&mut body, head.clone()),
                    &contacts[start..i],
                ));
                start = i;
            } else if separator == 1 {
                body.push(b',');
            }
            body.extend(item);
        }
        body.extend_from_slice(tail);
        requests.push((body, &contacts[start..]));
        Ok(requests)
    }

    /// Sends one request; SendGrid's job id on success.
    fn upsert(&self, body: Vec<u8>, chunk: &[Contact]) -> Result<String, ExportError> {
        let response = Request::put(&self.endpoint)
            .bearer_auth(&self.api_key)
            .header("accept", "application/json")
            .header("content-type", "application/json")
            .body(body)
            .send()?;
        if response.is_success() {
            #[derive(Deserialize)]
            struct Accepted {
                job_id: String,
            }
            // Queued is queued: an answer without a job id is not a failure.
            return Ok(response
                .json::<Accepted>()
                .map(|accepted| accepted.job_id)
                .unwrap_or_else(|_| "(none)".into()));
        }
        Err(refusal(&response, chunk))
    }
}

/// Classifies a non-2xx answer: rate limits and outages retry, everything
/// else is a refusal with what to fix.
fn refusal(response: &Response, chunk: &[Contact]) -> ExportError {
    let status = response.status;
    let said = format!("HTTP {status} {}", describe(response));
    let said = said.trim_end();
    let events = list(
        chunk
            .iter()
            .flat_map(|c| c.uuids.iter().map(String::as_str)),
    );
    match status {
        429 => ExportError::Retryable {
            message: format!(
                "SendGrid is rate limiting this API key ({said}); the limit is shared by everything using the key"
            ),
            retry_after: reset_wait(response).or_else(|| response.retry_after()),
        },
        408 | 500..=599 => ExportError::Retryable {
            message: format!("SendGrid could not take the contacts ({said})"),
            retry_after: response.retry_after(),
        },
        401 => ExportError::Permanent(format!(
            "SendGrid refused the API key ({said}): check `api_key`, and that the key still exists"
        )),
        403 => ExportError::Permanent(format!(
            "SendGrid refused access ({said}): give the API key the Marketing permission; SendGrid also blocks a key for a while after many bad requests"
        )),
        413 => ExportError::Permanent(format!(
            "SendGrid found the request for events {events} too large ({said}): leave large properties out of `custom_fields`"
        )),
        451 => ExportError::Permanent(format!(
            "SendGrid refused the request for data-residency reasons ({said}): an account with EU data residency needs base_url https://api.eu.sendgrid.com"
        )),
        400 => ExportError::Permanent(format!(
            "SendGrid refused the contacts of events {events} ({said}): check that the IDs in `custom_fields` and `list_ids` exist in SendGrid and that mapped values are valid"
        )),
        _ => ExportError::Permanent(format!(
            "SendGrid refused the contacts of events {events} ({said})"
        )),
    }
}

/// How long until the rate-limit window ends: `X-RateLimit-Reset` is that
/// moment in Unix seconds, read against the host's clock.
fn reset_wait(response: &Response) -> Option<Duration> {
    let reset_secs: u64 = response.header("x-ratelimit-reset")?.trim().parse().ok()?;
    let reset_millis = reset_secs.saturating_mul(1000);
    Some(Duration::from_millis(
        reset_millis.saturating_sub(clock::now_millis()),
    ))
}

/// SendGrid's `errors` as `field: message; …`, or the start of the body.
fn describe(response: &Response) -> String {
    #[derive(Deserialize)]
    struct Errors {
        errors: Vec<Detail>,
    }
    #[derive(Deserialize)]
    struct Detail {
        #[serde(default)]
        field: Option<String>,
        #[serde(default)]
        message: Option<String>,
    }
    match response.json::<Errors>() {
        Ok(body) => body
            .errors
            .iter()
            .take(5)
            .map(|detail| match (&detail.field, &detail.message) {
                (Some(field), Some(message)) => format!("{field}: {message}"),
                (None, Some(message)) => message.clone(),
                (Some(field), None) => field.clone(),
                (None, None) => String::new(),
            })
            .collect::<Vec<_>>()
            .join("; "),
        Err(_) => String::from_utf8_lossy(&response.body)
            .trim()
            .chars()
            .take(300)
            .collect(),
    }
}

fn person_value<'a>(event: &'a ExportedEvent, name: &str) -> Option<&'a str> {
    person::property(event, name).and_then(Value::as_str)
}

fn lookup<'a>(mapping: &'a [(String, String)], key: &str) -> Option<&'a str> {
    mapping
        .iter()
        .find(|(sluice, _)| sluice == key)
        .map(|(_, target)| target.as_str())
}

fn put(map: &mut Map<String, Value>, key: &str, value: Value, overwrite: bool) {
    if overwrite || !map.contains_key(key) {
        map.insert(key.to_string(), value);
    }
}

/// Reserved fields take text.
fn text(value: &Value) -> Value {
    match value {
        Value::String(text) => Value::String(text.clone()),
        other => Value::String(other.to_string()),
    }
}

/// Custom fields by their type suffix: `_N` takes a number (numeric text
/// is converted; anything else is left out), the rest take text.
fn custom_value(id: &str, value: &Value) -> Option<Value> {
    if !id.ends_with("_N") {
        return Some(text(value));
    }
    match value {
        Value::Number(_) => Some(value.clone()),
        Value::String(text) => text
            .trim()
            .parse::<serde_json::Number>()
            .ok()
            .map(Value::Number),
        _ => None,
    }
}

fn list<'a>(items: impl Iterator<Item = &'a str>) -> String {
    let items: Vec<&str> = items.collect();
    let mut out = items
        .iter()
        .take(LISTED_UUIDS)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > LISTED_UUIDS {
        out.push_str(&format!(" and {} more", items.len() - LISTED_UUIDS));
    }
    out
}

fn list_ids(config: &Value) -> Result<Vec<String>> {
    let items = match config {
        Value::Null => return Ok(Vec::new()),
        Value::Array(items) => items,
        other => {
            return Err(Error::msg(format!(
                "list_ids must be a JSON array of list IDs, such as [\"ca7a3796-e8a8-4029-9ccb-df8937940562\"]; got {}",
                json::kind(other)
            )));
        }
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::String(id) if !id.trim().is_empty() => Ok(id.trim().to_string()),
            other => Err(Error::msg(format!(
                "list_ids[{i}] must be a list ID (a non-empty string), got {}",
                json::kind(other)
            ))),
        })
        .collect()
}

/// A JSON object of Sluice property name to a non-empty string.
fn string_map(config: &Value, at: &str, what: &str) -> Result<Vec<(String, String)>> {
    let map = match config {
        Value::Null => return Ok(Vec::new()),
        Value::Object(map) => map,
        other => {
            return Err(Error::msg(format!(
                "{at} must be a JSON object of Sluice property name to {what}; got {}",
                json::kind(other)
            )));
        }
    };
    map.iter()
        .map(|(sluice, target)| match target {
            Value::String(target) if !target.trim().is_empty() => {
                Ok((sluice.clone(), target.trim().to_string()))
            }
            other => Err(Error::msg(format!(
                "{at}.{sluice} must be {what} (a non-empty string), got {}",
                json::kind(other)
            ))),
        })
        .collect()
}

register_plugin!(SendGrid);

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;

    use super::*;
    use sluice_plugin_sdk::http::{HttpError, Method};
    use sluice_plugin_sdk::log::Level;
    use sluice_plugin_sdk::testing::{self, MockHost, header, json_body, permanent};

    const ENDPOINT: &str = "https://api.sendgrid.com/v3/marketing/contacts";
    /// The mock host's clock, 2024-01-01T00:00:00Z, in seconds.
    const NOW_SECS: u64 = 1_704_067_200;

    fn sendgrid(config: Value) -> SendGrid {
        testing::plugin(config)
    }

    fn event(uuid: &str, name: &str, distinct_id: &str, properties: Value) -> ExportedEvent {
        ExportedEvent {
            distinct_id: distinct_id.into(),
            person_id: None,
            ..testing::exported_event(uuid, name, properties)
        }
    }

    fn identify(uuid: &str, set: Value) -> ExportedEvent {
        event(uuid, "$identify", "user-1", json!({ "$set": set }))
    }

    /// A mock SendGrid that queues everything.
    fn accepting() -> MockHost {
        let host = MockHost::install();
        let jobs = Rc::new(RefCell::new(0));
        host.on_http(move |_| {
            *jobs.borrow_mut() += 1;
            Ok(Response::new(
                202,
                json!({"job_id": format!("job-{}", jobs.borrow())}).to_string(),
            ))
        });
        host
    }

    fn answering(status: u16, body: &'static str) -> MockHost {
        let host = MockHost::install();
        host.on_http(move |_| Ok(Response::new(status, body)));
        host
    }

    fn contacts(host: &MockHost) -> Vec<Value> {
        host.requests()
            .iter()
            .flat_map(|r| json_body(r)["contacts"].as_array().unwrap().clone())
            .collect()
    }

    #[test]
    fn person_updates_become_one_put_of_contacts_with_the_api_key() {
        let host = accepting();
        let mut plugin = sendgrid(json!({
            "api_key": "SG.key",
            "list_ids": ["ca7a3796-e8a8-4029-9ccb-df8937940562"],
            "custom_fields": {"plan": "e1_T", "seats": "e2_N"},
        }));
        plugin
            .export(vec![
                identify(
                    "id-1",
                    json!({"email": " Ada@Example.com ", "first_name": "Ada", "lastName": "Lovelace",
                           "plan": "pro", "seats": "12", "city": "London", "$os": "Mac"}),
                ),
                event("id-2", "$pageview", "user-2", json!({"email": "b@example.com"})),
            ])
            .expect("delivered");

        let requests = host.requests();
        assert_eq!(requests.len(), 1);
        let request = &requests[0];
        assert_eq!(request.method, Method::Put);
        assert_eq!(request.url, ENDPOINT);
        assert_eq!(header(request, "authorization"), Some("Bearer SG.key"));
        assert_eq!(header(request, "accept"), Some("application/json"));
        assert_eq!(header(request, "content-type"), Some("application/json"));
        assert_eq!(
            json_body(request),
            json!({
                "list_ids": ["ca7a3796-e8a8-4029-9ccb-df8937940562"],
                "contacts": [{
                    "email": "ada@example.com",
                    "first_name": "Ada",
                    "last_name": "Lovelace",
                    "external_id": "user-1",
                    "custom_fields": {"e1_T": "pro", "e2_N": 12},
                }],
            })
        );
        assert_eq!(
            host.logs().last().unwrap().message,
            "SendGrid queued 1 contact(s) from 1 event(s) in 1 request(s); job(s) job-1"
        );
    }

    #[test]
    fn events_for_one_address_are_merged_in_order() {
        let host = accepting();
        let mut plugin = sendgrid(json!({"api_key": "k", "custom_fields": {"source": "e3_T"}}));
        plugin
            .export(vec![
                identify("id-1", json!({"email": "ada@example.com", "first_name": "A"})),
                event(
                    "id-2",
                    "upgraded",
                    "user-9",
                    json!({"email": "ADA@example.com", "$set": {"first_name": "Ada"},
                           "$set_once": {"source": "ads", "last_name": "Lovelace"}}),
                ),
                event(
                    "id-3",
                    "seen",
                    "user-9",
                    json!({"$set_once": {"email": "ada@example.com", "source": "organic", "first_name": "X"},
                           "$set": {"last_name": null}}),
                ),
            ])
            .expect("delivered");
        assert_eq!(
            contacts(&host),
            [json!({
                "email": "ada@example.com",
                "first_name": "Ada",
                "last_name": "Lovelace",
                "external_id": "user-9",
                "custom_fields": {"e3_T": "ads"},
            })]
        );
    }

    #[test]
    fn list_ids_are_left_out_when_empty_and_external_id_follows_the_config() {
        let host = accepting();
        let mut by_property = sendgrid(json!({"api_key": "k", "external_id": "user_id"}));
        by_property
            .export(vec![
                identify("id-1", json!({"email": "a@example.com", "user_id": 42})),
                identify("id-2", json!({"email": "b@example.com"})),
            ])
            .expect("delivered");
        let mut without = sendgrid(json!({"api_key": "k", "external_id": ""}));
        without
            .export(vec![identify("id-3", json!({"email": "c@example.com"}))])
            .expect("delivered");

        let requests = host.requests();
        assert_eq!(
            json_body(&requests[0]),
            json!({"contacts": [
                {"email": "a@example.com", "external_id": "42"},
                {"email": "b@example.com"},
            ]})
        );
        assert_eq!(
            json_body(&requests[1]),
            json!({"contacts": [{"email": "c@example.com"}]})
        );
    }

    #[test]
    fn updates_without_an_email_address_are_skipped_with_one_log_line() {
        let host = accepting();
        let mut plugin = sendgrid(json!({"api_key": "k"}));
        plugin
            .export(vec![
                identify("id-1", json!({"first_name": "Anon"})),
                identify("id-2", json!({"email": "nope"})),
                event("id-3", "x", "u", json!({"$set": {"plan": "pro"}})),
            ])
            .expect("skipping is not a failure");
        assert!(host.requests().is_empty());
        assert_eq!(
            host.logs()[0].message,
            "skipped 3 event(s) without a usable email address: id-1, id-2, id-3"
        );
    }

    #[test]
    fn values_that_are_not_numbers_are_left_out_of_number_fields_with_a_warning() {
        let host = accepting();
        let mut plugin =
            sendgrid(json!({"api_key": "k", "custom_fields": {"seats": "e2_N", "vip": "e4_T"}}));
        plugin
            .export(vec![identify(
                "id-1",
                json!({"email": "a@example.com", "seats": "a dozen", "vip": true}),
            )])
            .expect("delivered");
        assert_eq!(contacts(&host)[0]["custom_fields"], json!({"e4_T": "true"}));
        let warning = host
            .logs()
            .into_iter()
            .find(|line| line.level == Level::Warn)
            .expect("a warning");
        assert!(
            warning.message.contains("seats of id-1"),
            "{}",
            warning.message
        );
    }

    #[test]
    fn requests_hold_at_most_30000_contacts() {
        let host = accepting();
        let mut plugin = sendgrid(json!({"api_key": "k", "external_id": ""}));
        let events: Vec<ExportedEvent> = (0..60_001)
            .map(|i| identify(&format!("id-{i}"), json!({"email": format!("u{i}@x.io")})))
            .collect();
        plugin.export(events).expect("delivered");
        let requests = host.requests();
        let sizes: Vec<usize> = requests
            .iter()
            .map(|r| json_body(r)["contacts"].as_array().unwrap().len())
            .collect();
        assert_eq!(sizes, [30_000, 30_000, 1]);
        assert_eq!(
            json_body(&requests[2])["contacts"][0]["email"],
            "u60000@x.io"
        );
        assert!(
            host.logs()
                .last()
                .unwrap()
                .message
                .contains("job(s) job-1, job-2, job-3")
        );
    }

    #[test]
    fn requests_stay_under_6_mb() {
        let host = accepting();
        let mut plugin = sendgrid(json!({
            "api_key": "k",
            "list_ids": ["l-1"],
            "custom_fields": {"bio": "e1_T"},
        }));
        let bio = "x".repeat(500_000);
        let events: Vec<ExportedEvent> = (0..25)
            .map(|i| {
                identify(
                    &format!("id-{i}"),
                    json!({"email": format!("u{i}@x.io"), "bio": bio}),
                )
            })
            .collect();
        plugin.export(events).expect("delivered");
        let requests = host.requests();
        let mut total = 0;
        for request in &requests {
            let bytes = request.body.as_ref().unwrap().len();
            assert!(bytes <= MAX_BODY_BYTES, "{bytes} bytes");
            let parsed = json_body(request);
            assert_eq!(parsed["list_ids"], json!(["l-1"]));
            total += parsed["contacts"].as_array().unwrap().len();
        }
        assert_eq!(requests.len(), 3, "11 contacts of ~500 KB fit in 6 MB");
        assert_eq!(total, 25);
        // Full requests are filled: the next contact would not have fitted.
        let first = requests[0].body.as_ref().unwrap().len();
        assert!(first + 500_000 > MAX_BODY_BYTES);
    }

    #[test]
    fn a_contact_larger_than_a_request_is_refused() {
        let host = accepting();
        let mut plugin = sendgrid(json!({"api_key": "k", "custom_fields": {"bio": "e1_T"}}));
        let message = permanent(
            plugin
                .export(vec![identify(
                    "id-1",
                    json!({"email": "a@x.io", "bio": "x".repeat(MAX_BODY_BYTES)}),
                )])
                .unwrap_err(),
        );
        assert!(message.contains("from events id-1"), "{message}");
        assert!(
            message.contains("over SendGrid's limit of 6 MB"),
            "{message}"
        );
        assert!(host.requests().is_empty());
    }

    #[test]
    fn a_rate_limit_retries_when_the_window_resets_by_the_host_clock() {
        let host = MockHost::install();
        host.on_http(|_| {
            Ok(Response::new(
                429,
                r#"{"errors":[{"field":null,"message":"too many requests"}]}"#,
            )
            .with_header("X-RateLimit-Limit", "600")
            .with_header("X-RateLimit-Remaining", "0")
            .with_header("X-RateLimit-Reset", &(NOW_SECS + 42).to_string()))
        });
        let mut plugin = sendgrid(json!({"api_key": "k"}));
        let batch = || vec![identify("id-1", json!({"email": "a@x.io"}))];
        let err = plugin.export(batch()).unwrap_err();
        assert_eq!(
            err,
            ExportError::Retryable {
                message: "SendGrid is rate limiting this API key (HTTP 429 too many requests); the limit is shared by everything using the key".into(),
                retry_after: Some(Duration::from_secs(42)),
            }
        );

        host.set_now_millis(NOW_SECS * 1000 + 41_250);
        let err = plugin.export(batch()).unwrap_err();
        assert!(
            matches!(err, ExportError::Retryable { retry_after: Some(d), .. } if d == Duration::from_millis(750)),
            "{err:?}"
        );
        host.set_now_millis((NOW_SECS + 100) * 1000);
        let err = plugin.export(batch()).unwrap_err();
        assert!(
            matches!(
                err,
                ExportError::Retryable {
                    retry_after: Some(Duration::ZERO),
                    ..
                }
            ),
            "a reset in the past means now: {err:?}"
        );
    }

    #[test]
    fn outages_are_retryable() {
        for status in [500, 502, 503] {
            let _host = answering(status, "");
            let mut plugin = sendgrid(json!({"api_key": "k"}));
            let err = plugin
                .export(vec![identify("id-1", json!({"email": "a@x.io"}))])
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
        let host = MockHost::install();
        host.on_http(|_| Err(HttpError::Timeout));
        let mut plugin = sendgrid(json!({"api_key": "k"}));
        let err = plugin
            .export(vec![identify("id-1", json!({"email": "a@x.io"}))])
            .unwrap_err();
        assert!(matches!(err, ExportError::Retryable { .. }), "{err:?}");
    }

    #[test]
    fn refusals_are_permanent_and_say_what_to_fix() {
        let cases = [
            (
                401,
                r#"{"errors":[{"field":null,"message":"authorization required"}]}"#,
                "HTTP 401 authorization required",
                "check `api_key`",
            ),
            (
                403,
                r#"{"errors":[{"field":null,"message":"access forbidden"}]}"#,
                "HTTP 403 access forbidden",
                "Marketing permission",
            ),
            (
                400,
                r#"{"errors":[{"field":"custom_fields","message":"e9_T is not a valid custom field ID"}]}"#,
                "HTTP 400 custom_fields: e9_T is not a valid custom field ID",
                "events id-1",
            ),
            (
                413,
                "payload too large",
                "HTTP 413 payload too large",
                "too large",
            ),
            (451, "", "HTTP 451", "https://api.eu.sendgrid.com"),
            (
                406,
                "",
                "HTTP 406",
                "SendGrid refused the contacts of events id-1",
            ),
        ];
        for (status, answer, said, advice) in cases {
            let _host = answering(status, answer);
            let mut plugin = sendgrid(json!({"api_key": "SG.secret"}));
            let message = permanent(
                plugin
                    .export(vec![identify("id-1", json!({"email": "a@x.io"}))])
                    .unwrap_err(),
            );
            assert!(message.contains(said), "{status}: {message}");
            assert!(message.contains(advice), "{status}: {message}");
            assert!(!message.contains("SG.secret"));
        }
    }

    #[test]
    fn a_failing_later_request_returns_its_error() {
        let host = MockHost::install();
        let calls = Rc::new(RefCell::new(0));
        let seen = calls.clone();
        host.on_http(move |_| {
            *seen.borrow_mut() += 1;
            Ok(match *seen.borrow() {
                1 => Response::new(202, r#"{"job_id":"j1"}"#),
                _ => Response::new(503, ""),
            })
        });
        let mut plugin = sendgrid(json!({"api_key": "k"}));
        let events: Vec<ExportedEvent> = (0..30_001)
            .map(|i| identify(&format!("id-{i}"), json!({"email": format!("u{i}@x.io")})))
            .collect();
        let err = plugin.export(events).unwrap_err();
        assert!(matches!(err, ExportError::Retryable { .. }), "{err:?}");
        assert_eq!(*calls.borrow(), 2);
    }

    #[test]
    fn the_base_url_can_point_at_the_eu_region() {
        let host = accepting();
        let mut plugin =
            sendgrid(json!({"api_key": "k", "base_url": "https://api.eu.sendgrid.com/"}));
        plugin
            .export(vec![identify("id-1", json!({"email": "a@x.io"}))])
            .expect("delivered");
        assert_eq!(
            host.requests()[0].url,
            "https://api.eu.sendgrid.com/v3/marketing/contacts"
        );
    }

    #[test]
    fn bad_config_is_refused_with_a_clear_message() {
        let refusal = testing::refusal::<SendGrid>;
        let err = refusal(json!({"api_key": ""}));
        assert!(err.contains("api_key is empty"), "{err}");
        let err = refusal(json!({"api_key": "k", "base_url": "api.sendgrid.com"}));
        assert!(
            err.contains("base_url must be an absolute https:// URL"),
            "{err}"
        );
        let err = refusal(json!({"api_key": "k", "list_ids": "ca7a"}));
        assert!(err.contains("list_ids must be a JSON array"), "{err}");
        let err = refusal(json!({"api_key": "k", "list_ids": [""]}));
        assert!(err.contains("list_ids[0] must be a list ID"), "{err}");
        let err = refusal(json!({"api_key": "k", "field_mapping": {"phone": "phone_number_id"}}));
        assert!(
            err.contains("field_mapping.phone: `phone_number_id` is not a field this plugin fills"),
            "{err}"
        );
        let err = refusal(json!({"api_key": "k", "field_mapping": ["email"]}));
        assert!(err.contains("field_mapping must be a JSON object"), "{err}");
        let err = refusal(json!({"api_key": "k", "custom_fields": {"plan": "Plan Tier"}}));
        assert!(err.contains("looks like a field name"), "{err}");
        let err = refusal(json!({"api_key": "k", "custom_fields": {"plan": 1}}));
        assert!(
            err.contains("custom_fields.plan must be a custom field ID"),
            "{err}"
        );
    }

    #[test]
    fn the_manifest_describes_every_field_and_its_defaults_are_accepted() {
        let manifest: Value =
            toml::from_str(include_str!("../plugin.toml")).expect("plugin.toml parses");
        assert_eq!(manifest["hooks"], json!(["export"]));
        assert_eq!(
            manifest["capabilities"]["http_hosts"],
            json!(["{config.base_url}"])
        );
        assert_eq!(manifest["config"]["api_key"]["type"], json!("secret"));
        let mut config = testing::manifest_defaults(&manifest);
        assert_eq!(config["field_mapping"], default_field_mapping());
        assert_eq!(config["external_id"], json!(default_external_id()));
        assert_eq!(config["base_url"], json!(default_base_url()));
        config.insert("api_key".into(), json!("k"));
        let plugin = sendgrid(Value::Object(config));
        assert_eq!(plugin.endpoint, ENDPOINT);
        assert_eq!(plugin.email_sources, ["email"]);
        assert_eq!(plugin.external_id, ExternalId::DistinctId);
        assert!(plugin.list_ids.is_empty() && plugin.custom_fields.is_empty());
    }
}
