//! What an exported event says about its person, for destinations that keep
//! contacts or profiles in step (CRMs, mailing tools).
//!
//! Clients identify a user with an `$identify` (or `identify`) event, and
//! any event may carry person properties in two objects: `$set`, whose
//! values overwrite, and `$set_once`, whose values only fill what is not set
//! yet. A destination that merges several events of one person should apply
//! `$set_once` before `$set`, event by event, so the later value wins.
//!
//! ```
//! use sluice_plugin_sdk::{ExportedEvent, json, person};
//!
//! let event: ExportedEvent = serde_json::from_value(json!({
//!     "uuid": "01890000-0000-7000-8000-000000000001",
//!     "event": "signed up",
//!     "distinct_id": "user-1",
//!     "timestamp": "2024-01-01T00:00:00.000Z",
//!     "properties": {"$set": {"email": "ada@example.com"}, "plan": "pro"},
//! }))?;
//! assert!(person::is_update(&event));
//! assert_eq!(person::property(&event, "email"), Some(&json!("ada@example.com")));
//! assert_eq!(person::property(&event, "plan"), Some(&json!("pro")));
//! assert_eq!(person::set(&event).count(), 1);
//! # Ok::<(), serde_json::Error>(())
//! ```

use serde_json::Value;

use crate::ExportedEvent;

/// Whether the event changes its person: an identify event, or one with a
/// non-empty `$set` or `$set_once`.
pub fn is_update(event: &ExportedEvent) -> bool {
    let has = |bag: &str| {
        event
            .properties
            .get(bag)
            .and_then(Value::as_object)
            .is_some_and(|map| !map.is_empty())
    };
    matches!(event.name.as_str(), "$identify" | "identify") || has("$set") || has("$set_once")
}

/// The person properties the event overwrites (its `$set`), in order.
pub fn set(event: &ExportedEvent) -> impl Iterator<Item = (&str, &Value)> {
    bag(event, "$set")
}

/// The person properties the event sets only where unset (its
/// `$set_once`), in order.
pub fn set_once(event: &ExportedEvent) -> impl Iterator<Item = (&str, &Value)> {
    bag(event, "$set_once")
}

fn bag<'a>(event: &'a ExportedEvent, name: &str) -> impl Iterator<Item = (&'a str, &'a Value)> {
    event
        .properties
        .get(name)
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .map(|(key, value)| (key.as_str(), value))
}

/// A person property by name: from `$set`, else `$set_once`, else the
/// event's own properties.
pub fn property<'a>(event: &'a ExportedEvent, name: &str) -> Option<&'a Value> {
    ["$set", "$set_once"]
        .iter()
        .find_map(|bag| event.properties.get(*bag)?.as_object()?.get(name))
        .or_else(|| event.properties.get(name))
}

/// Whether `text` could be an email address: one `@`, something before it,
/// a dot inside the domain and no spaces. Enough to keep obvious
/// non-addresses ("unknown", "") out of a request that a destination keying
/// contacts by email would refuse as a whole; the destination still has the
/// last word.
pub fn looks_like_email(text: &str) -> bool {
    match text.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && !text.contains(char::is_whitespace)
                && !domain.contains('@')
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(name: &str, properties: Value) -> ExportedEvent {
        ExportedEvent {
            uuid: "id-1".into(),
            name: name.into(),
            distinct_id: "user-1".into(),
            person_id: None,
            timestamp: "2024-01-01T00:00:00.000Z".into(),
            properties: properties.as_object().cloned().unwrap_or_default(),
        }
    }

    #[test]
    fn identify_events_and_person_properties_update_a_person_and_empty_bags_do_not() {
        assert!(is_update(&event("$identify", json!({}))));
        assert!(is_update(&event("identify", json!({}))));
        assert!(is_update(&event("paid", json!({"$set_once": {"a": 1}}))));
        assert!(!is_update(&event("paid", json!({"$set": {}}))));
        assert!(!is_update(&event("paid", json!({"$set": "a"}))));
        assert!(!is_update(&event("paid", json!({"email": "a@b.co"}))));
    }

    #[test]
    fn a_property_is_read_from_set_then_set_once_then_the_event() {
        let event = event(
            "paid",
            json!({"$set": {"a": 1}, "$set_once": {"a": 2, "b": 2}, "b": 3, "c": 3}),
        );
        assert_eq!(property(&event, "a"), Some(&json!(1)));
        assert_eq!(property(&event, "b"), Some(&json!(2)));
        assert_eq!(property(&event, "c"), Some(&json!(3)));
        assert_eq!(property(&event, "d"), None);
        assert_eq!(
            set_once(&event).collect::<Vec<_>>(),
            [("a", &json!(2)), ("b", &json!(2))]
        );
    }

    #[test]
    fn only_plausible_addresses_look_like_email() {
        assert!(looks_like_email("ada@example.com"));
        for text in [
            "",
            "unknown",
            "@example.com",
            "ada@example",
            "ada@.com",
            "ada@example.",
            "a da@example.com",
            "a@b@example.com",
        ] {
            assert!(!looks_like_email(text), "{text}");
        }
    }
}
