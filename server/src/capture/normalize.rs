//! Turns a client's events into the queue's form: a uuid on every event, a
//! timestamp corrected for client clock skew, `received_at`, and `$ip`.

use chrono::{DateTime, Datelike, Utc};
use serde_json::{Map, Value};

use super::CaptureError;
use crate::model::format_timestamp;
use crate::store::QueuedEvent;

/// Most events one request may carry. Official clients flush far smaller
/// batches; a request of tens of thousands of tiny events (a 20 MiB body
/// holds 200,000) would be one transaction on the shared write path, with
/// every other project's capture waiting behind it.
pub const MAX_EVENTS_PER_REQUEST: usize = 10_000;

/// Largest event, as JSON, that capture takes. Every plugin call, stored
/// row and query reads an event whole, so one of 20 MiB (or a million tiny
/// properties) costs every step after capture.
pub const MAX_EVENT_BYTES: usize = 1 << 20;

/// Events as a client sent them, with the batch-level token and `sent_at`.
#[derive(Debug, Default)]
pub struct RawBatch {
    pub token: Option<String>,
    pub sent_at: Option<String>,
    pub events: Vec<Map<String, Value>>,
}

/// Per-request context for normalisation.
pub struct Normalizer {
    pub now: DateTime<Utc>,
    /// The client address, recorded as `$ip` unless the event has one.
    pub ip: Option<String>,
}

fn string_field(map: &Map<String, Value>, key: &str) -> Option<String> {
    match map.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    }
}

fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.to_utc())
        .ok()
        .or_else(|| {
            // Some SDKs send naive ISO times; they mean UTC.
            chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f")
                .ok()
                .map(|t| t.and_utc())
        })
}

impl RawBatch {
    /// The capture token: the batch's, else the first event's `api_key`,
    /// `token` or `properties.token`.
    pub fn token(&self) -> Option<String> {
        self.token.clone().or_else(|| {
            self.events.iter().find_map(|event| {
                string_field(event, "api_key")
                    .or_else(|| string_field(event, "token"))
                    .or_else(|| {
                        event
                            .get("properties")
                            .and_then(Value::as_object)
                            .and_then(|p| string_field(p, "token"))
                    })
            })
        })
    }
}

impl Normalizer {
    /// Normalises every event of the batch, or refuses the whole batch
    /// naming the first bad event.
    pub fn normalize(&self, batch: RawBatch) -> Result<Vec<QueuedEvent>, CaptureError> {
        if batch.events.is_empty() {
            return Err(CaptureError::Invalid("the request holds no events".into()));
        }
        if batch.events.len() > MAX_EVENTS_PER_REQUEST {
            return Err(CaptureError::TooManyEvents {
                count: batch.events.len(),
                limit: MAX_EVENTS_PER_REQUEST,
            });
        }
        let sent_at = match &batch.sent_at {
            Some(text) => Some(parse_time(text).ok_or_else(|| {
                CaptureError::Invalid(format!("`sent_at` {text} is not an ISO 8601 time"))
            })?),
            None => None,
        };
        let many = batch.events.len() > 1;
        if let Some(i) = batch
            .events
            .iter()
            .position(|event| !fits(event, MAX_EVENT_BYTES))
        {
            return Err(CaptureError::EventTooLarge {
                which: if many {
                    format!("event #{} ", i + 1)
                } else {
                    "the event ".into()
                },
                limit: MAX_EVENT_BYTES,
            });
        }
        batch
            .events
            .into_iter()
            .enumerate()
            .map(|(i, event)| {
                self.event(event, sent_at).map_err(|message| {
                    CaptureError::Invalid(if many {
                        format!("event #{}: {message}", i + 1)
                    } else {
                        message
                    })
                })
            })
            .collect()
    }

    fn event(
        &self,
        mut raw: Map<String, Value>,
        batch_sent_at: Option<DateTime<Utc>>,
    ) -> Result<QueuedEvent, String> {
        let event =
            string_field(&raw, "event").ok_or("`event` (the event name) is missing or empty")?;
        let mut properties = match raw.remove("properties") {
            Some(Value::Object(map)) => map,
            None | Some(Value::Null) => Map::new(),
            Some(_) => return Err("`properties` must be a JSON object".into()),
        };
        let distinct_id = string_field(&raw, "distinct_id")
            .or_else(|| string_field(&raw, "$distinct_id"))
            .or_else(|| string_field(&properties, "distinct_id"))
            .or_else(|| string_field(&properties, "$distinct_id"))
            .ok_or("`distinct_id` is missing or empty")?;
        let uuid = match string_field(&raw, "uuid") {
            Some(text) => uuid::Uuid::parse_str(&text)
                .map_err(|_| format!("`uuid` {text} is not a UUID"))?
                .to_string(),
            None => uuid::Uuid::now_v7().to_string(),
        };
        let timestamp = self.timestamp(&raw, batch_sent_at)?;
        // Some SDKs send person updates beside the properties.
        for key in ["$set", "$set_once"] {
            if let Some(value) = raw.remove(key)
                && !properties.contains_key(key)
            {
                properties.insert(key.into(), value);
            }
        }
        properties.remove("token");
        if let Some(ip) = &self.ip
            && !properties.contains_key("$ip")
        {
            properties.insert("$ip".into(), Value::String(ip.clone()));
        }
        Ok(QueuedEvent {
            uuid,
            event,
            distinct_id,
            timestamp: format_timestamp(timestamp),
            received_at: format_timestamp(self.now),
            properties,
        })
    }

    /// The client's time for the event, moved by how far the client's clock
    /// is from ours: `offset` (ms before sending) wins, then `timestamp`
    /// shifted by `now - sent_at`, then `timestamp` as is, then now.
    fn timestamp(
        &self,
        raw: &Map<String, Value>,
        batch_sent_at: Option<DateTime<Utc>>,
    ) -> Result<DateTime<Utc>, String> {
        let time = if let Some(offset) = raw.get("offset").and_then(Value::as_i64) {
            chrono::TimeDelta::try_milliseconds(offset)
                .and_then(|offset| self.now.checked_sub_signed(offset))
                .ok_or_else(|| format!("`offset` {offset} ms is {OUT_OF_RANGE}"))?
        } else if let Some(text) = string_field(raw, "timestamp") {
            let timestamp = parse_time(&text)
                .ok_or_else(|| format!("`timestamp` {text} is not an ISO 8601 time"))?;
            let sent_at = match string_field(raw, "sent_at") {
                Some(own) => Some(
                    parse_time(&own)
                        .ok_or_else(|| format!("`sent_at` {own} is not an ISO 8601 time"))?,
                ),
                None => batch_sent_at,
            };
            match sent_at {
                Some(sent_at) => timestamp
                    .checked_add_signed(self.now.signed_duration_since(sent_at))
                    .ok_or_else(|| {
                        format!("`timestamp` {text} corrected by `sent_at` is {OUT_OF_RANGE}")
                    })?,
                None => timestamp,
            }
        } else {
            return Ok(self.now);
        };
        if !(1..=9999).contains(&time.year()) {
            return Err(format!(
                "the event's time, {time}, is {OUT_OF_RANGE}; check `timestamp`, `sent_at` and `offset`"
            ));
        }
        Ok(time)
    }
}

/// Whether `event` written as compact JSON takes at most `limit` bytes,
/// give or take escapes; stops counting once past it.
fn fits(event: &Map<String, Value>, limit: usize) -> bool {
    fn size(value: &Value, left: &mut usize) -> bool {
        let mut take = |n: usize| match left.checked_sub(n) {
            Some(rest) => {
                *left = rest;
                true
            }
            None => false,
        };
        match value {
            Value::Null | Value::Bool(_) => take(5),
            Value::Number(n) => take(match (n.as_u64(), n.as_i64()) {
                (Some(u), _) => digits(u),
                (None, Some(i)) => digits(i.unsigned_abs()) + 1,
                // A float prints in at most 24 characters.
                _ => 24,
            }),
            Value::String(text) => take(text.len() + 2),
            Value::Array(items) => take(items.len() + 2) && items.iter().all(|v| size(v, left)),
            Value::Object(fields) => {
                take(2)
                    && fields
                        .iter()
                        .all(|(key, v)| size_key(key, left) && size(v, left))
            }
        }
    }
    fn digits(n: u64) -> usize {
        n.checked_ilog10().map_or(1, |log| log as usize + 1)
    }
    fn size_key(key: &str, left: &mut usize) -> bool {
        match left.checked_sub(key.len() + 4) {
            Some(rest) => {
                *left = rest;
                true
            }
            None => false,
        }
    }
    let mut left = limit;
    event
        .iter()
        .all(|(key, value)| size_key(key, &mut left) && size(value, &mut left))
}

/// How an impossible client time is described: years past 9999 cannot be
/// stored or compared as text, and some clients' clocks are that wrong.
const OUT_OF_RANGE: &str = "outside the years 1 to 9999 that events may have";

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn normalizer() -> Normalizer {
        Normalizer {
            now: DateTime::parse_from_rfc3339("2024-05-01T12:00:10Z")
                .unwrap()
                .to_utc(),
            ip: Some("203.0.113.9".into()),
        }
    }

    fn batch(events: Value, sent_at: Option<&str>) -> RawBatch {
        RawBatch {
            token: None,
            sent_at: sent_at.map(str::to_string),
            events: events
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e.as_object().unwrap().clone())
                .collect(),
        }
    }

    #[test]
    fn a_request_over_the_event_limit_is_refused_whole() {
        let events = |n: usize| Value::Array(vec![json!({"event": "e", "distinct_id": "d"}); n]);
        let at_limit = normalizer().normalize(batch(events(MAX_EVENTS_PER_REQUEST), None));
        assert_eq!(at_limit.unwrap().len(), MAX_EVENTS_PER_REQUEST);
        let over = normalizer()
            .normalize(batch(events(MAX_EVENTS_PER_REQUEST + 1), None))
            .unwrap_err();
        assert_eq!(
            over.to_string(),
            "the request holds 10001 events, over the limit of 10000 per request; send them in smaller batches"
        );
    }

    #[test]
    fn corrects_timestamps_for_client_clock_skew() {
        // The client's clock is 1 h behind: it sent at 11:00:10 our 12:00:10.
        let out = normalizer()
            .normalize(batch(
                json!([{"event": "e", "distinct_id": "d", "timestamp": "2024-05-01T11:00:05Z"}]),
                Some("2024-05-01T11:00:10Z"),
            ))
            .unwrap();
        assert_eq!(out[0].timestamp, "2024-05-01T12:00:05.000Z");
        assert_eq!(out[0].received_at, "2024-05-01T12:00:10.000Z");
    }

    #[test]
    fn offset_means_milliseconds_before_receipt() {
        let out = normalizer()
            .normalize(batch(
                json!([{"event": "e", "distinct_id": "d", "offset": 2500}]),
                None,
            ))
            .unwrap();
        assert_eq!(out[0].timestamp, "2024-05-01T12:00:07.500Z");
    }

    #[test]
    fn an_event_over_the_size_limit_refuses_the_request_and_is_named() {
        let tiny: Map<String, Value> = (0..100_000).map(|i| (format!("p{i}"), json!(0))).collect();
        let big = json!({"event": "e", "distinct_id": "d", "properties": tiny});
        let small = json!({"event": "e", "distinct_id": "d"});
        let err = normalizer()
            .normalize(batch(json!([small, big]), None))
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("event #2 is larger than the limit of 1048576 bytes per event"),
            "{err}"
        );
        let at_limit = json!({"event": "e", "distinct_id": "d",
            "properties": {"blob": "x".repeat(MAX_EVENT_BYTES - 100)}});
        assert!(
            normalizer()
                .normalize(batch(json!([at_limit]), None))
                .is_ok()
        );
        // Written out, an event that fits is no larger than the limit.
        let written = serde_json::to_string(&at_limit).unwrap();
        assert!(written.len() <= MAX_EVENT_BYTES);
    }

    #[test]
    fn times_out_of_range_are_refused_not_a_panic() {
        let refused = |event: Value, sent_at: Option<&str>| {
            normalizer()
                .normalize(batch(Value::Array(vec![event]), sent_at))
                .unwrap_err()
                .to_string()
        };
        for offset in [
            i64::MIN,
            i64::MAX,
            -300_000_000_000_000,
            300_000_000_000_000,
        ] {
            let err = refused(
                json!({"event": "e", "distinct_id": "d", "offset": offset}),
                None,
            );
            assert!(
                err.contains("outside the years 1 to 9999"),
                "{offset}: {err}"
            );
        }
        let err = refused(
            json!({"event": "e", "distinct_id": "d", "timestamp": "0000-06-01T00:00:00Z"}),
            None,
        );
        assert!(err.contains("outside the years"), "{err}");
        // Years of five digits are no ISO 8601 time chrono reads.
        let err = refused(
            json!({"event": "e", "distinct_id": "d", "timestamp": "99999-12-31T00:00:00"}),
            None,
        );
        assert!(err.contains("is not an ISO 8601 time"), "{err}");
        let err = refused(
            json!({"event": "e", "distinct_id": "d", "timestamp": "9999-12-31T00:00:00Z"}),
            Some("1000-01-01T00:00:00Z"),
        );
        assert!(err.contains("outside the years"), "{err}");
        let err = refused(
            json!({"event": "e", "distinct_id": "d", "timestamp": "0001-01-01T00:00:00Z",
                   "sent_at": "9999-12-31T00:00:00Z"}),
            None,
        );
        assert!(err.contains("outside the years"), "{err}");
        // At the edge of the range, still stored.
        let out = normalizer()
            .normalize(batch(
                json!([{"event": "e", "distinct_id": "d", "timestamp": "9999-12-31T23:59:59Z"}]),
                None,
            ))
            .unwrap();
        assert_eq!(out[0].timestamp, "9999-12-31T23:59:59.000Z");
    }

    #[test]
    fn keeps_client_uuids_and_adds_ip_and_uuids() {
        let out = normalizer()
            .normalize(batch(
                json!([
                    {"event": "e", "distinct_id": "d", "uuid": "0190A0A0-0000-7000-8000-000000000001"},
                    {"event": "e", "properties": {"distinct_id": 7, "$ip": "1.2.3.4", "token": "phc_x"}}
                ]),
                None,
            ))
            .unwrap();
        assert_eq!(out[0].uuid, "0190a0a0-0000-7000-8000-000000000001");
        assert_eq!(out[0].properties["$ip"], json!("203.0.113.9"));
        assert_eq!(out[1].distinct_id, "7");
        assert_eq!(out[1].properties["$ip"], json!("1.2.3.4"));
        assert!(!out[1].properties.contains_key("token"));
        assert_ne!(out[1].uuid, out[0].uuid);
    }

    #[test]
    fn one_bad_event_refuses_the_batch_and_names_it() {
        let err = normalizer()
            .normalize(batch(
                json!([{"event": "e", "distinct_id": "d"}, {"event": "e"}]),
                None,
            ))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "event #2: `distinct_id` is missing or empty"
        );
        let err = normalizer()
            .normalize(batch(
                json!([{"event": "e", "distinct_id": "d", "uuid": "nope"}]),
                None,
            ))
            .unwrap_err();
        assert_eq!(err.to_string(), "`uuid` nope is not a UUID");
    }

    /// A JSON value of any shape, a few levels deep.
    fn any_json() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            "\\PC{0,30}".prop_map(Value::from),
            // Times, near and far, in the forms clients send.
            prop_oneof![
                Just("9999-12-31T23:59:59Z".to_string()),
                Just("0000-01-01T00:00:00Z".to_string()),
                Just("2024-05-01T12:00:00.123Z".to_string()),
                Just("2024-05-01T12:00:00".to_string()),
                Just("-0001-01-01T00:00:00Z".to_string()),
            ]
            .prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 32, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
                proptest::collection::btree_map("[a-z_$]{1,10}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        /// Whatever a client puts in an event's fields, normalising gives
        /// an event or a clear refusal, never a panic, and a stored time
        /// is always within the years events may have.
        #[test]
        fn any_event_is_normalised_or_refused(
            fields in proptest::collection::btree_map(
                proptest::sample::select(vec!["event", "distinct_id", "uuid", "timestamp", "sent_at", "offset", "properties", "$set"]),
                any_json(),
                0..8,
            ),
            offset in proptest::option::of(proptest::num::i64::ANY),
            sent_at in proptest::option::of(proptest::sample::select(vec!["9999-12-31T00:00:00Z", "0001-01-01T00:00:00Z", "2024-05-01T12:00:00Z", "not a time"])),
        ) {
            let mut event: Map<String, Value> = fields.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            if let Some(offset) = offset {
                event.insert("offset".into(), Value::from(offset));
            }
            let raw = RawBatch {
                token: None,
                sent_at: sent_at.map(str::to_string),
                events: vec![event],
            };
            if let Ok(events) = normalizer().normalize(raw) {
                let year: i32 = events[0].timestamp[..4].parse().unwrap();
                proptest::prop_assert!((1..=9999).contains(&year), "{}", events[0].timestamp);
            }
        }
    }
}
