//! HubSpot destination: keeps HubSpot contacts in step with the person
//! properties Sluice receives, through the CRM v3 contacts batch upsert.
//!
//! An event updates a contact when it is an identify event (`$identify` or
//! `identify`) or carries `$set` / `$set_once`. The contact is named by the
//! install's `id_property` (email by default), whose value comes from the
//! event; events without one are skipped, since HubSpot could only create an
//! anonymous duplicate from them. Only properties listed in
//! `property_mapping` are sent, as strings, because HubSpot refuses a whole
//! request that names a property the account does not have.
//!
//! HubSpot refuses a batch that names the same contact twice, so all events
//! of one export batch for one contact are merged, in order, into a single
//! input: `$set` overwrites, `$set_once` only fills what the batch has not
//! set. HubSpot has no "set if empty", so a `$set_once` value still replaces
//! what HubSpot already holds. Upserts are idempotent, which makes the
//! host's whole-batch retries harmless; each input carries the uuid of its
//! latest event as `objectWriteTraceId`, which ties partial failures back to
//! events.

use std::collections::HashMap;
use std::time::Duration;

use serde::Deserialize;
use sluice_plugin_sdk::http::{self, Request, Response};
use sluice_plugin_sdk::{
    Error, ExportError, ExportedEvent, Map, Plugin, Result, Value, info, json, person,
    register_plugin,
};

/// HubSpot's limit on inputs in one batch request.
const MAX_INPUTS: usize = 100;

const UPSERT_PATH: &str = "/crm/v3/objects/contacts/batch/upsert";

/// HubSpot locks a portal for about two seconds during heavy syncs.
const LOCKED_WAIT: Duration = Duration::from_secs(2);

/// The daily limit resets at midnight in the account's time zone, which the
/// plugin cannot see; an hour keeps retries rare without waiting a day.
const DAILY_LIMIT_WAIT: Duration = Duration::from_secs(3600);

/// How many event uuids a message lists before it says "and N more".
const LISTED_UUIDS: usize = 5;

#[derive(Deserialize)]
struct Config {
    token: String,
    #[serde(default = "default_id_property")]
    id_property: String,
    // Taken untyped so `new` can say exactly what is wrong with it.
    #[serde(default = "default_mapping")]
    property_mapping: Value,
    #[serde(default = "default_base_url")]
    base_url: String,
}

fn default_id_property() -> String {
    "email".into()
}

fn default_mapping() -> Value {
    json!({
        "email": "email",
        "first_name": "firstname",
        "firstName": "firstname",
        "last_name": "lastname",
        "lastName": "lastname",
        "phone": "phone",
        "company": "company",
        "website": "website",
    })
}

fn default_base_url() -> String {
    "https://api.hubapi.com".into()
}

struct HubSpot {
    token: String,
    endpoint: String,
    id_property: String,
    /// Sluice person property → HubSpot property, in config order.
    mapping: Vec<(String, String)>,
    /// Sluice properties that hold the contact's id, in lookup order.
    id_sources: Vec<String>,
}

/// One HubSpot input: a contact with every update the batch has for it.
#[derive(Debug, PartialEq)]
struct Contact {
    id: String,
    /// HubSpot property → string value.
    properties: Map<String, Value>,
    /// Every event merged into it, in order.
    uuids: Vec<String>,
}

impl Contact {
    /// The latest event's uuid, sent as `objectWriteTraceId`.
    fn trace_id(&self) -> &str {
        self.uuids.last().map_or("", String::as_str)
    }
}

impl Plugin for HubSpot {
    type Config = Config;

    fn new(config: Config) -> Result<Self> {
        let token = config.token.trim().to_string();
        if token.is_empty() {
            return Err(Error::msg(
                "token is empty: paste the access token of a HubSpot private app",
            ));
        }
        let base_url = config.base_url.trim().trim_end_matches('/').to_string();
        if !http::is_absolute_url(&base_url) {
            return Err(Error::msg(format!(
                "base_url must be an absolute https:// URL such as https://api.hubapi.com; got {base_url:?}"
            )));
        }
        let id_property = config.id_property.trim().to_string();
        check_property_name(&id_property, "id_property")?;
        let mapping = mapping(&config.property_mapping)?;
        let mut id_sources: Vec<String> = mapping
            .iter()
            .filter(|(_, hubspot)| *hubspot == id_property)
            .map(|(sluice, _)| sluice.clone())
            .collect();
        if id_sources.is_empty() {
            id_sources.push(id_property.clone());
        }
        Ok(HubSpot {
            token,
            endpoint: format!("{base_url}{UPSERT_PATH}"),
            id_property,
            mapping,
            id_sources,
        })
    }

    fn export(&mut self, events: Vec<ExportedEvent>) -> Result<(), ExportError> {
        let (contacts, skipped) = self.contacts(&events);
        if !skipped.is_empty() {
            info!(
                "skipped {} event(s) without a usable `{}`: {}",
                skipped.len(),
                self.id_property,
                list_uuids(skipped.iter().map(String::as_str))
            );
        }
        // A partly refused chunk does not stop the others: the refusal sends
        // the batch to dead letters anyway, and the rest is worth saving now.
        let mut refused: Vec<String> = Vec::new();
        let mut created = 0;
        for chunk in contacts.chunks(MAX_INPUTS) {
            match self.upsert(chunk)? {
                Outcome::Saved { new } => created += new,
                Outcome::PartlyRefused(message) => refused.push(message),
            }
        }
        if !contacts.is_empty() {
            info!(
                "upserted {} HubSpot contact(s), {created} new, from {} event(s)",
                contacts.len(),
                contacts.iter().map(|c| c.uuids.len()).sum::<usize>()
            );
        }
        if refused.is_empty() {
            Ok(())
        } else {
            Err(ExportError::Permanent(refused.join("; ")))
        }
    }
}

/// What one accepted request did.
enum Outcome {
    Saved {
        new: usize,
    },
    /// Some inputs were refused for good; the message names their events.
    PartlyRefused(String),
}

impl HubSpot {
    /// The batch's contacts in first-seen order, merged per id, and the
    /// uuids of person updates that name no contact.
    fn contacts(&self, events: &[ExportedEvent]) -> (Vec<Contact>, Vec<String>) {
        let mut contacts: Vec<Contact> = Vec::new();
        let mut by_id: HashMap<String, usize> = HashMap::new();
        let mut skipped = Vec::new();
        for event in events.iter().filter(|event| person::is_update(event)) {
            let Some(id) = self.contact_id(event) else {
                skipped.push(event.uuid.clone());
                continue;
            };
            let index = *by_id.entry(id.clone()).or_insert_with(|| {
                contacts.push(Contact {
                    id: id.clone(),
                    properties: Map::new(),
                    uuids: Vec::new(),
                });
                contacts.len() - 1
            });
            let contact = &mut contacts[index];
            contact.uuids.push(event.uuid.clone());
            for (key, value) in person::set_once(event) {
                if let Some(name) = self.hubspot_name(key) {
                    contact
                        .properties
                        .entry(name.to_string())
                        .or_insert_with(|| Value::String(stringify(value)));
                }
            }
            for (key, value) in person::set(event) {
                if let Some(name) = self.hubspot_name(key) {
                    contact
                        .properties
                        .insert(name.to_string(), Value::String(stringify(value)));
                }
            }
            // The id wins over a mapped property of the same HubSpot name,
            // so the contact HubSpot updates is the one the input names.
            contact
                .properties
                .insert(self.id_property.clone(), Value::String(id));
        }
        (contacts, skipped)
    }

    /// The contact's id from the event, normalised so that one contact
    /// spelled two ways is still one input.
    fn contact_id(&self, event: &ExportedEvent) -> Option<String> {
        let value = self
            .id_sources
            .iter()
            .find_map(|source| person::property(event, source).and_then(id_text))?;
        if self.id_property == "email" {
            // HubSpot compares emails without regard to case.
            let email = value.to_lowercase();
            return person::looks_like_email(&email).then_some(email);
        }
        Some(value)
    }

    fn hubspot_name(&self, sluice: &str) -> Option<&str> {
        self.mapping
            .iter()
            .find(|(key, _)| key == sluice)
            .map(|(_, name)| name.as_str())
    }

    fn upsert(&self, chunk: &[Contact]) -> Result<Outcome, ExportError> {
        let inputs: Vec<Value> = chunk
            .iter()
            .map(|contact| {
                json!({
                    "idProperty": self.id_property,
                    "id": contact.id,
                    "properties": contact.properties,
                    "objectWriteTraceId": contact.trace_id(),
                })
            })
            .collect();
        let response = Request::post(&self.endpoint)
            .bearer_auth(&self.token)
            .header("accept", "application/json")
            .json(&json!({ "inputs": inputs }))?
            .send()?;
        if !response.is_success() {
            return Err(refusal(&response, chunk));
        }
        // The write happened; an answer that does not parse must not turn
        // it into a failure.
        let answer: BatchAnswer = response.json().unwrap_or_default();
        if answer.errors.is_empty() {
            let new = answer
                .results
                .iter()
                .filter(|r| r.get("new") == Some(&Value::Bool(true)))
                .count();
            return Ok(Outcome::Saved { new });
        }
        partial_failure(&answer.errors, chunk)
    }
}

fn id_text(value: &Value) -> Option<String> {
    let text = match value {
        Value::String(text) => text.trim().to_string(),
        Value::Number(number) => number.to_string(),
        _ => return None,
    };
    (!text.is_empty()).then_some(text)
}

/// HubSpot takes every property value as a string: null clears the
/// property, a list becomes `a;b` (the form of multiple-checkbox
/// properties), an object its JSON text.
fn stringify(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(text) => text.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::String(text) => text.clone(),
                other => other.to_string(),
            })
            .collect::<Vec<_>>()
            .join(";"),
        Value::Object(_) => value.to_string(),
    }
}

/// The body of a 2xx batch answer; only what the plugin reads.
#[derive(Default, Deserialize)]
struct BatchAnswer {
    #[serde(default)]
    results: Vec<Value>,
    #[serde(default)]
    errors: Vec<HubSpotError>,
}

/// HubSpot's error shape, for whole responses and per-input errors alike.
/// HubSpot says to treat every field as optional.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct HubSpotError {
    category: Option<String>,
    message: Option<String>,
    policy_name: Option<String>,
    context: Map<String, Value>,
    errors: Vec<ErrorDetail>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ErrorDetail {
    message: Option<String>,
}

impl HubSpotError {
    /// `CATEGORY: message (detail; detail)`, from whatever is present.
    fn describe(&self) -> String {
        let mut out = self.category.clone().unwrap_or_default();
        if let Some(message) = self.message.as_deref().filter(|m| !m.is_empty()) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(message);
        }
        let details: Vec<&str> = self
            .errors
            .iter()
            .filter_map(|detail| detail.message.as_deref())
            .filter(|detail| Some(*detail) != self.message.as_deref())
            .take(3)
            .collect();
        if !details.is_empty() {
            out.push_str(&format!(" ({})", details.join("; ")));
        }
        out
    }

    /// The trace ids HubSpot names in the error's context, whatever the key.
    fn mentions(&self, trace_id: &str) -> bool {
        self.context.values().any(|value| match value {
            Value::String(text) => text == trace_id,
            Value::Array(items) => items.iter().any(|item| item.as_str() == Some(trace_id)),
            _ => false,
        })
    }
}

/// Classifies a non-2xx answer: rate limits, locks and outages retry, with
/// HubSpot's wait when it gives one; credential and validation errors do
/// not.
fn refusal(response: &Response, chunk: &[Contact]) -> ExportError {
    let status = response.status;
    let error: HubSpotError = response.json().unwrap_or_else(|_| HubSpotError {
        message: Some(
            String::from_utf8_lossy(&response.body)
                .trim()
                .chars()
                .take(300)
                .collect(),
        ),
        ..HubSpotError::default()
    });
    let said = match error.describe() {
        text if text.is_empty() => format!("HTTP {status}"),
        text => format!("HTTP {status} {text}"),
    };
    let events = list_uuids(
        chunk
            .iter()
            .flat_map(|c| c.uuids.iter().map(String::as_str)),
    );
    match status {
        429 => {
            let policy = error.policy_name.as_deref().unwrap_or("");
            let advice = match policy {
                "DAILY" => {
                    "the account's daily API limit is used up; it resets at midnight in the account's time zone, and every app of the account shares it"
                }
                _ => "HubSpot's per-second limits are shared by every app of the account",
            };
            ExportError::Retryable {
                message: format!("HubSpot is rate limiting this account ({said}): {advice}"),
                retry_after: rate_limit_wait(response, policy),
            }
        }
        423 => ExportError::Retryable {
            message: format!("HubSpot has the account locked during a sync ({said})"),
            retry_after: response.retry_after().or(Some(LOCKED_WAIT)),
        },
        477 => ExportError::Retryable {
            message: format!("HubSpot is moving the account's data ({said})"),
            retry_after: response.retry_after(),
        },
        408 | 500..=599 => ExportError::Retryable {
            message: format!("HubSpot could not take the batch ({said})"),
            retry_after: response.retry_after(),
        },
        401 => ExportError::Permanent(format!(
            "HubSpot refused the token ({said}): check the private-app token in the `token` setting"
        )),
        403 => ExportError::Permanent(format!(
            "HubSpot refused access ({said}): give the private app the crm.objects.contacts.write scope, or check that the token belongs to the right account"
        )),
        400 => ExportError::Permanent(format!(
            "HubSpot refused the contacts of events {events} ({said}): check that every HubSpot property in `property_mapping` exists and accepts the values sent, and that `id_property` is email or a property marked unique"
        )),
        _ => ExportError::Permanent(format!(
            "HubSpot refused the contacts of events {events} ({said})"
        )),
    }
}

/// HubSpot's wait for a 429: `Retry-After` if sent, else the window of the
/// policy that was hit.
fn rate_limit_wait(response: &Response, policy: &str) -> Option<Duration> {
    if let Some(wait) = response.retry_after() {
        return Some(wait);
    }
    let interval = response
        .header("x-hubspot-ratelimit-interval-milliseconds")
        .and_then(|ms| ms.trim().parse::<u64>().ok())
        .map(Duration::from_millis);
    match policy {
        "DAILY" => Some(DAILY_LIMIT_WAIT),
        "SECONDLY" => Some(Duration::from_secs(1)),
        "TEN_SECONDLY_ROLLING" => interval.or(Some(Duration::from_secs(10))),
        _ => interval,
    }
}

/// A 207 (or a 200 with errors): retryable if any input may succeed later,
/// otherwise a refusal naming the failed events and HubSpot's reasons.
fn partial_failure(errors: &[HubSpotError], chunk: &[Contact]) -> Result<Outcome, ExportError> {
    let mut reasons = Vec::new();
    let mut failed = 0;
    let mut retryable = false;
    for error in errors {
        let contacts: Vec<&Contact> = chunk
            .iter()
            .filter(|contact| error.mentions(contact.trace_id()))
            .collect();
        failed += contacts.len().max(1);
        retryable |= error.category.as_deref() == Some("RATE_LIMITS");
        let events = match contacts.is_empty() {
            true => "unidentified events".to_string(),
            false => format!(
                "events {}",
                list_uuids(
                    contacts
                        .iter()
                        .flat_map(|c| c.uuids.iter().map(String::as_str))
                )
            ),
        };
        reasons.push(format!("{events}: {}", error.describe()));
    }
    let failed = failed.min(chunk.len());
    if retryable {
        return Err(ExportError::retryable(format!(
            "HubSpot could not save {failed} of {} contact(s) for now: {}",
            chunk.len(),
            reasons.join("; ")
        )));
    }
    Ok(Outcome::PartlyRefused(format!(
        "HubSpot refused {failed} of {} contact(s) and saved the rest: {}; fix the data or `property_mapping`, then replay",
        chunk.len(),
        reasons.join("; ")
    )))
}

fn list_uuids<'a>(uuids: impl Iterator<Item = &'a str>) -> String {
    let uuids: Vec<&str> = uuids.collect();
    let mut out = uuids
        .iter()
        .take(LISTED_UUIDS)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    if uuids.len() > LISTED_UUIDS {
        out.push_str(&format!(" and {} more", uuids.len() - LISTED_UUIDS));
    }
    out
}

fn mapping(config: &Value) -> Result<Vec<(String, String)>> {
    let Value::Object(map) = config else {
        return Err(Error::msg(format!(
            "property_mapping must be a JSON object of Sluice property name to HubSpot property name, such as {{\"first_name\": \"firstname\"}}; got {}",
            json::kind(config)
        )));
    };
    map.iter()
        .map(|(sluice, hubspot)| {
            let Value::String(hubspot) = hubspot else {
                return Err(Error::msg(format!(
                    "property_mapping: `{sluice}` must map to a HubSpot property name (a string), got {}",
                    json::kind(hubspot)
                )));
            };
            let hubspot = hubspot.trim();
            check_property_name(hubspot, &format!("property_mapping.{sluice}"))?;
            Ok((sluice.clone(), hubspot.to_string()))
        })
        .collect()
}

/// HubSpot's internal property names are letters, digits and underscores;
/// a label such as "First Name" is the usual mistake.
fn check_property_name(name: &str, at: &str) -> Result<()> {
    let valid = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(Error::msg(format!(
            "{at}: `{name}` is not a HubSpot property's internal name (letters, digits and _ only, such as firstname); HubSpot shows it under the property's details"
        )));
    }
    Ok(())
}

register_plugin!(HubSpot);

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;

    use super::*;
    use sluice_plugin_sdk::http::{HttpError, Method};
    use sluice_plugin_sdk::testing::{self, MockHost, header, json_body, permanent};

    const ENDPOINT: &str = "https://api.hubapi.com/crm/v3/objects/contacts/batch/upsert";

    fn hubspot(config: Value) -> HubSpot {
        testing::plugin(config)
    }

    fn event(uuid: &str, name: &str, properties: Value) -> ExportedEvent {
        ExportedEvent {
            person_id: None,
            ..testing::exported_event(uuid, name, properties)
        }
    }

    fn identify(uuid: &str, set: Value) -> ExportedEvent {
        event(uuid, "$identify", json!({ "$set": set }))
    }

    /// A mock HubSpot that saves everything and reports each input as new.
    fn saving() -> MockHost {
        let host = MockHost::install();
        host.on_http(|request| {
            let inputs = json_body(request)["inputs"].as_array().unwrap().clone();
            let results: Vec<Value> = inputs
                .iter()
                .map(|input| json!({"id": "1", "properties": input["properties"], "new": true}))
                .collect();
            Ok(Response::new(
                200,
                json!({"status": "COMPLETE", "results": results}).to_string(),
            ))
        });
        host
    }

    fn answering(status: u16, body: Value) -> MockHost {
        let host = MockHost::install();
        let text = body.to_string();
        host.on_http(move |_| Ok(Response::new(status, text.clone())));
        host
    }

    fn inputs(host: &MockHost) -> Vec<Value> {
        host.requests()
            .iter()
            .flat_map(|r| json_body(r)["inputs"].as_array().unwrap().clone())
            .collect()
    }

    #[test]
    fn identify_events_become_upserts_by_email_with_string_values() {
        let host = saving();
        let mut plugin = hubspot(json!({"token": "pat-na1-abc"}));
        plugin
            .export(vec![identify(
                "id-1",
                json!({
                    "email": "Ada@Example.com",
                    "first_name": "Ada",
                    "lastName": "Lovelace",
                    "phone": 442_079_460_000_u64,
                    "company": null,
                    "website": ["a", "b"],
                    "plan": "pro",
                    "$browser": "Firefox",
                }),
            )])
            .expect("delivered");

        let requests = host.requests();
        assert_eq!(requests.len(), 1);
        let request = &requests[0];
        assert_eq!(request.method, Method::Post);
        assert_eq!(request.url, ENDPOINT);
        assert_eq!(header(request, "authorization"), Some("Bearer pat-na1-abc"));
        assert_eq!(header(request, "content-type"), Some("application/json"));
        assert_eq!(
            json_body(request),
            json!({"inputs": [{
                "idProperty": "email",
                "id": "ada@example.com",
                "properties": {
                    "email": "ada@example.com",
                    "firstname": "Ada",
                    "lastname": "Lovelace",
                    "phone": "442079460000",
                    "company": "",
                    "website": "a;b",
                },
                "objectWriteTraceId": "id-1",
            }]})
        );
        assert_eq!(
            host.logs().last().unwrap().message,
            "upserted 1 HubSpot contact(s), 1 new, from 1 event(s)"
        );
    }

    #[test]
    fn any_event_with_person_properties_counts_and_others_are_ignored() {
        let host = saving();
        let mut plugin = hubspot(json!({"token": "t"}));
        plugin
            .export(vec![
                event("id-1", "$pageview", json!({"email": "a@x.io"})),
                event(
                    "id-2",
                    "order paid",
                    json!({"email": "b@x.io", "$set": {"first_name": "Bo"}}),
                ),
                event("id-3", "signup", json!({"$set_once": {"email": "c@x.io"}})),
                event("id-4", "identify", json!({"email": "d@x.io"})),
                event("id-5", "x", json!({"$set": {}, "email": "e@x.io"})),
            ])
            .expect("delivered");
        let ids: Vec<Value> = inputs(&host).iter().map(|i| i["id"].clone()).collect();
        assert_eq!(ids, [json!("b@x.io"), json!("c@x.io"), json!("d@x.io")]);
    }

    #[test]
    fn events_for_one_contact_are_merged_in_order_into_one_input() {
        let host = saving();
        let mut plugin = hubspot(json!({"token": "t", "property_mapping": {
            "email": "email", "plan": "plan_tier", "first_name": "firstname", "source": "first_source",
        }}));
        plugin
            .export(vec![
                identify("id-1", json!({"email": "ada@example.com", "plan": "free", "first_name": "Ada"})),
                event("id-2", "upgraded", json!({
                    "$set": {"email": "ADA@example.com", "plan": "pro"},
                    "$set_once": {"source": "ads", "first_name": "Not Ada"},
                })),
                identify("id-3", json!({"email": "bob@example.com"})),
                event("id-4", "seen", json!({"email": "ada@example.com", "$set_once": {"source": "organic", "plan": "x"}})),
            ])
            .expect("delivered");
        assert_eq!(
            inputs(&host),
            [
                json!({
                    "idProperty": "email",
                    "id": "ada@example.com",
                    "properties": {"email": "ada@example.com", "plan_tier": "pro", "firstname": "Ada", "first_source": "ads"},
                    "objectWriteTraceId": "id-4",
                }),
                json!({
                    "idProperty": "email",
                    "id": "bob@example.com",
                    "properties": {"email": "bob@example.com"},
                    "objectWriteTraceId": "id-3",
                }),
            ]
        );
        assert_eq!(
            host.logs().last().unwrap().message,
            "upserted 2 HubSpot contact(s), 2 new, from 4 event(s)"
        );
    }

    #[test]
    fn events_without_a_usable_id_are_skipped_with_one_log_line() {
        let host = saving();
        let mut plugin = hubspot(json!({"token": "t"}));
        plugin
            .export(vec![
                identify("id-1", json!({"first_name": "Anon"})),
                identify("id-2", json!({"email": "not an email"})),
                identify("id-3", json!({"email": "  "})),
                identify("id-4", json!({"email": "ok@example.com"})),
            ])
            .expect("skipping is not a failure");
        assert_eq!(inputs(&host).len(), 1);
        let logs = host.logs();
        assert_eq!(
            logs[0].message,
            "skipped 3 event(s) without a usable `email`: id-1, id-2, id-3"
        );

        let host = saving();
        plugin
            .export(vec![identify("id-9", json!({"name": "x"}))])
            .expect("nothing to send is success");
        assert!(host.requests().is_empty());
    }

    #[test]
    fn a_custom_unique_property_is_found_through_the_mapping_or_by_its_own_name() {
        let host = saving();
        let mut plugin = hubspot(json!({
            "token": "t",
            "id_property": "app_user_id",
            "property_mapping": {"user_id": "app_user_id", "plan": "plan_tier"},
        }));
        plugin
            .export(vec![
                event("id-1", "x", json!({"$set": {"plan": "pro"}, "user_id": 42})),
                event(
                    "id-2",
                    "x",
                    json!({"$set": {"plan": "team", "user_id": " U-7 "}}),
                ),
            ])
            .expect("delivered");
        assert_eq!(
            inputs(&host),
            [
                json!({"idProperty": "app_user_id", "id": "42", "properties": {"plan_tier": "pro", "app_user_id": "42"}, "objectWriteTraceId": "id-1"}),
                json!({"idProperty": "app_user_id", "id": "U-7", "properties": {"plan_tier": "team", "app_user_id": "U-7"}, "objectWriteTraceId": "id-2"}),
            ]
        );

        let host = saving();
        let mut plugin =
            hubspot(json!({"token": "t", "id_property": "app_user_id", "property_mapping": {}}));
        plugin
            .export(vec![identify(
                "id-3",
                json!({"app_user_id": "u-3", "plan": "x"}),
            )])
            .expect("delivered");
        assert_eq!(
            inputs(&host)[0]["properties"],
            json!({"app_user_id": "u-3"})
        );
    }

    #[test]
    fn batches_are_split_into_requests_of_at_most_100_inputs() {
        let host = saving();
        let mut plugin = hubspot(json!({"token": "t"}));
        let events: Vec<ExportedEvent> = (0..250)
            .map(|i| {
                identify(
                    &format!("id-{i}"),
                    json!({"email": format!("u{i}@example.com")}),
                )
            })
            .collect();
        plugin.export(events).expect("delivered");
        let sizes: Vec<usize> = host
            .requests()
            .iter()
            .map(|r| json_body(r)["inputs"].as_array().unwrap().len())
            .collect();
        assert_eq!(sizes, [100, 100, 50]);
        let all = inputs(&host);
        assert_eq!(all[0]["id"], "u0@example.com");
        assert_eq!(all[249]["id"], "u249@example.com");
    }

    #[test]
    fn a_failing_later_chunk_returns_its_error() {
        let host = MockHost::install();
        let calls = Rc::new(RefCell::new(0));
        let seen = calls.clone();
        host.on_http(move |_| {
            *seen.borrow_mut() += 1;
            Ok(match *seen.borrow() {
                1 => Response::new(200, r#"{"status":"COMPLETE","results":[]}"#),
                _ => Response::new(502, "bad gateway"),
            })
        });
        let mut plugin = hubspot(json!({"token": "t"}));
        let events: Vec<ExportedEvent> = (0..150)
            .map(|i| {
                identify(
                    &format!("id-{i}"),
                    json!({"email": format!("u{i}@example.com")}),
                )
            })
            .collect();
        let err = plugin.export(events).unwrap_err();
        assert!(matches!(err, ExportError::Retryable { .. }), "{err:?}");
        assert!(err.to_string().contains("HTTP 502 bad gateway"), "{err}");
        assert_eq!(*calls.borrow(), 2);
    }

    #[test]
    fn rate_limits_retry_after_the_window_of_the_policy_that_was_hit() {
        let cases = [
            (
                "TEN_SECONDLY_ROLLING",
                Some("10000"),
                None,
                Duration::from_secs(10),
            ),
            ("TEN_SECONDLY_ROLLING", None, None, Duration::from_secs(10)),
            ("SECONDLY", None, None, Duration::from_secs(1)),
            ("DAILY", Some("10000"), None, Duration::from_secs(3600)),
            ("DAILY", None, Some("120"), Duration::from_secs(120)),
            ("", Some("10000"), None, Duration::from_secs(10)),
        ];
        for (policy, interval, retry_after, expected) in cases {
            let host = MockHost::install();
            let text = json!({
                "status": "error",
                "message": "You have reached your ten_secondly_rolling limit.",
                "errorType": "RATE_LIMIT",
                "correlationId": "c-1",
                "policyName": policy,
            })
            .to_string();
            host.on_http(move |_| {
                let mut response = Response::new(429, text.clone());
                if let Some(ms) = interval {
                    response =
                        response.with_header("X-HubSpot-RateLimit-Interval-Milliseconds", ms);
                }
                if let Some(secs) = retry_after {
                    response = response.with_header("Retry-After", secs);
                }
                Ok(response)
            });
            let mut plugin = hubspot(json!({"token": "t"}));
            let err = plugin
                .export(vec![identify("id-1", json!({"email": "a@example.com"}))])
                .unwrap_err();
            let ExportError::Retryable {
                message,
                retry_after,
            } = err
            else {
                panic!("429 is retryable, got {err:?}");
            };
            assert_eq!(retry_after, Some(expected), "{policy} {interval:?}");
            assert!(
                message.contains("HubSpot is rate limiting this account (HTTP 429"),
                "{message}"
            );
        }
        let _host = answering(429, json!({"status": "error"}));
        let mut plugin = hubspot(json!({"token": "t"}));
        let err = plugin
            .export(vec![identify("id-1", json!({"email": "a@example.com"}))])
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
    fn locks_migrations_and_outages_are_retryable() {
        for (status, wait) in [
            (423, Some(2)),
            (477, None),
            (500, None),
            (503, None),
            (504, None),
        ] {
            let _host = answering(status, json!({"status": "error", "message": "busy"}));
            let mut plugin = hubspot(json!({"token": "t"}));
            let err = plugin
                .export(vec![identify("id-1", json!({"email": "a@example.com"}))])
                .unwrap_err();
            let ExportError::Retryable { retry_after, .. } = err else {
                panic!("{status} is retryable, got {err:?}");
            };
            assert_eq!(retry_after, wait.map(Duration::from_secs), "{status}");
        }
        let host = MockHost::install();
        host.on_http(|_| Ok(Response::new(477, "{}").with_header("Retry-After", "3600")));
        let mut plugin = hubspot(json!({"token": "t"}));
        let err = plugin
            .export(vec![identify("id-1", json!({"email": "a@example.com"}))])
            .unwrap_err();
        assert!(
            matches!(err, ExportError::Retryable { retry_after: Some(d), .. } if d == Duration::from_secs(3600)),
            "{err:?}"
        );
    }

    #[test]
    fn credential_and_validation_errors_are_permanent_and_say_what_to_fix() {
        let cases = [
            (
                401,
                "INVALID_AUTHENTICATION",
                "check the private-app token in the `token` setting",
            ),
            (403, "MISSING_SCOPES", "crm.objects.contacts.write scope"),
            (
                400,
                "VALIDATION_ERROR",
                "check that every HubSpot property in `property_mapping` exists",
            ),
            (
                409,
                "CONFLICT",
                "HubSpot refused the contacts of events id-1",
            ),
        ];
        for (status, category, advice) in cases {
            let _host = answering(
                status,
                json!({
                    "status": "error",
                    "message": "it went wrong",
                    "category": category,
                    "correlationId": "c-1",
                    "errors": [{"message": "Property \"plan_tier\" does not exist", "code": "PROPERTY_DOESNT_EXIST"}],
                }),
            );
            let mut plugin = hubspot(json!({"token": "secret-token"}));
            let message = permanent(
                plugin
                    .export(vec![identify("id-1", json!({"email": "a@example.com"}))])
                    .unwrap_err(),
            );
            assert!(
                message.contains(&format!("HTTP {status} {category}: it went wrong (Property \"plan_tier\" does not exist)")),
                "{message}"
            );
            assert!(message.contains(advice), "{status}: {message}");
            assert!(!message.contains("secret-token"));
        }
        let _host = answering(400, json!("not the usual shape"));
        let mut plugin = hubspot(json!({"token": "t"}));
        let message = permanent(
            plugin
                .export(vec![identify("id-1", json!({"email": "a@example.com"}))])
                .unwrap_err(),
        );
        assert!(
            message.contains("HTTP 400 \"not the usual shape\""),
            "{message}"
        );
    }

    #[test]
    fn a_partial_failure_names_the_refused_events_and_keeps_sending_other_chunks() {
        let host = MockHost::install();
        host.on_http(|request| {
            let inputs = json_body(request)["inputs"].as_array().unwrap().clone();
            let bad: Vec<&Value> = inputs
                .iter()
                .filter(|i| i["id"].as_str().unwrap().ends_with(".invalid"))
                .collect();
            if bad.is_empty() {
                return Ok(Response::new(200, r#"{"status":"COMPLETE","results":[]}"#));
            }
            let errors: Vec<Value> = bad
                .iter()
                .map(|input| {
                    json!({
                        "status": "error",
                        "category": "VALIDATION_ERROR",
                        "message": format!("Email address {} is invalid", input["id"].as_str().unwrap()),
                        "context": {"objectWriteTraceId": [input["objectWriteTraceId"]]},
                    })
                })
                .collect();
            Ok(Response::new(
                207,
                json!({"status": "COMPLETE", "results": [], "numErrors": errors.len(), "errors": errors}).to_string(),
            ))
        });
        let mut plugin = hubspot(json!({"token": "t"}));
        let mut events: Vec<ExportedEvent> = (0..120)
            .map(|i| {
                identify(
                    &format!("id-{i}"),
                    json!({"email": format!("u{i}@example.com")}),
                )
            })
            .collect();
        events[3] = identify("id-3", json!({"email": "bad@mail.invalid"}));
        events.push(identify("id-late", json!({"email": "bad@mail.invalid"})));
        let message = permanent(plugin.export(events).unwrap_err());
        assert_eq!(
            message,
            "HubSpot refused 1 of 100 contact(s) and saved the rest: events id-3, id-late: VALIDATION_ERROR: Email address bad@mail.invalid is invalid; fix the data or `property_mapping`, then replay"
        );
        assert_eq!(host.requests().len(), 2, "the second chunk is still sent");
    }

    #[test]
    fn a_partial_failure_over_rate_limits_is_retryable() {
        let _host = answering(
            207,
            json!({
                "status": "COMPLETE",
                "results": [],
                "errors": [
                    {"status": "error", "category": "VALIDATION_ERROR", "message": "bad", "context": {"objectWriteTraceId": ["id-1"]}},
                    {"status": "error", "category": "RATE_LIMITS", "message": "slow down", "context": {"objectWriteTraceId": ["id-2"]}},
                ],
            }),
        );
        let mut plugin = hubspot(json!({"token": "t"}));
        let err = plugin
            .export(vec![
                identify("id-1", json!({"email": "a@example.com"})),
                identify("id-2", json!({"email": "b@example.com"})),
            ])
            .unwrap_err();
        let ExportError::Retryable { message, .. } = err else {
            panic!("a rate-limited input may succeed later: {err:?}");
        };
        assert!(
            message.contains("could not save 2 of 2 contact(s) for now"),
            "{message}"
        );
        assert!(
            message.contains("events id-2: RATE_LIMITS: slow down"),
            "{message}"
        );
    }

    #[test]
    fn network_failures_are_retryable() {
        let host = MockHost::install();
        host.on_http(|_| Err(HttpError::Timeout));
        let mut plugin = hubspot(json!({"token": "t"}));
        let err = plugin
            .export(vec![identify("id-1", json!({"email": "a@example.com"}))])
            .unwrap_err();
        assert!(matches!(err, ExportError::Retryable { .. }), "{err:?}");
    }

    #[test]
    fn the_base_url_can_point_elsewhere() {
        let host = saving();
        let mut plugin = hubspot(json!({"token": "t", "base_url": "http://127.0.0.1:9999/"}));
        plugin
            .export(vec![identify("id-1", json!({"email": "a@example.com"}))])
            .expect("delivered");
        assert_eq!(
            host.requests()[0].url,
            "http://127.0.0.1:9999/crm/v3/objects/contacts/batch/upsert"
        );
    }

    #[test]
    fn bad_config_is_refused_with_a_clear_message() {
        let refusal = testing::refusal::<HubSpot>;
        let err = refusal(json!({"token": " "}));
        assert!(err.contains("token is empty"), "{err}");
        let err = refusal(json!({"token": "t", "base_url": "api.hubapi.com"}));
        assert!(
            err.contains("base_url must be an absolute https:// URL"),
            "{err}"
        );
        let err = refusal(json!({"token": "t", "id_property": "E-mail address"}));
        assert!(
            err.contains("id_property: `E-mail address` is not a HubSpot property's internal name"),
            "{err}"
        );
        let err = refusal(json!({"token": "t", "property_mapping": ["email"]}));
        assert!(
            err.contains("property_mapping must be a JSON object"),
            "{err}"
        );
        let err = refusal(json!({"token": "t", "property_mapping": {"plan": 3}}));
        assert!(
            err.contains("`plan` must map to a HubSpot property name"),
            "{err}"
        );
        let err = refusal(json!({"token": "t", "property_mapping": {"name": "First Name"}}));
        assert!(err.contains("property_mapping.name: `First Name`"), "{err}");
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
        assert_eq!(manifest["config"]["token"]["type"], json!("secret"));
        let mut config = testing::manifest_defaults(&manifest);
        assert_eq!(config["property_mapping"], default_mapping());
        assert_eq!(config["base_url"], json!(default_base_url()));
        assert_eq!(config["id_property"], json!(default_id_property()));
        config.insert("token".into(), json!("t"));
        let plugin = hubspot(Value::Object(config));
        assert_eq!(plugin.endpoint, ENDPOINT);
        assert_eq!(plugin.id_sources, ["email"]);
    }
}
