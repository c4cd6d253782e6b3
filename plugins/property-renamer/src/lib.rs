//! Property and event renamer: a taxonomy standardiser. Properties are
//! renamed by a configured map at the top level and inside `$set` and
//! `$set_once`; events by a map, then optionally by case.
//!
//! Every property rename is one edit made at setup and sent in one host
//! call per event, so an event costs the same however many names the map
//! holds or the event carries; the event name is read only when events are
//! renamed.

use std::collections::HashMap;

use serde::Deserialize;
use sluice_plugin_sdk::{
    EditPlan, Edits, Error, EventRef, Outcome, Plugin, Result, register_plugin,
};

#[derive(Deserialize)]
struct Config {
    #[serde(default)]
    properties: HashMap<String, String>,
    #[serde(default)]
    events: HashMap<String, String>,
    #[serde(default)]
    event_case: EventCase,
}

#[derive(Clone, Copy, Default, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
enum EventCase {
    #[default]
    Keep,
    SnakeCase,
}

struct PropertyRenamer {
    /// Every property rename, at the top level and in each person object,
    /// kept by the host and applied in one call per event; `None` if there
    /// are none.
    renames: Option<EditPlan>,
    events: HashMap<String, String>,
    event_case: EventCase,
}

/// Person-property objects whose keys are renamed like top-level ones.
const PERSON_OBJECTS: [&str; 2] = ["$set", "$set_once"];

impl Plugin for PropertyRenamer {
    type Config = Config;

    fn new(config: Config) -> Result<Self> {
        for (old, new) in &config.properties {
            if old.is_empty() || new.is_empty() {
                return Err(Error::msg(format!(
                    "`properties` maps `{old}` to `{new}`: names must not be empty"
                )));
            }
        }
        if let Some((old, _)) = config.events.iter().find(|(_, new)| new.is_empty()) {
            return Err(Error::msg(format!(
                "`events` renames `{old}` to an empty name"
            )));
        }
        // In a fixed order, so the result does not depend on hashing.
        let mut properties: Vec<(String, String)> = config
            .properties
            .into_iter()
            .filter(|(old, new)| old != new)
            .collect();
        properties.sort();
        let mut renames = Edits::new();
        for (old, new) in &properties {
            renames.rename(&[old], new);
        }
        for object in PERSON_OBJECTS {
            for (old, new) in &properties {
                renames.rename(&[object, old], new);
            }
        }
        Ok(PropertyRenamer {
            renames: (!renames.is_empty()).then(|| renames.plan()).transpose()?,
            events: config.events,
            event_case: config.event_case,
        })
    }

    fn transform(&mut self, event: &mut EventRef<'_>) -> Result<Outcome> {
        if !self.events.is_empty() || self.event_case != EventCase::Keep {
            let name = event.name();
            if let Some(renamed) = self.event_name(&name)
                && renamed != name
            {
                event.set_name(&renamed)?;
            }
        }
        if let Some(renames) = &self.renames {
            event.apply(renames)?;
        }
        Ok(Outcome::Keep)
    }
}

impl PropertyRenamer {
    /// The name an event should have, if it should change.
    fn event_name(&self, name: &str) -> Option<String> {
        if let Some(renamed) = self.events.get(name) {
            return Some(renamed.clone());
        }
        match self.event_case {
            EventCase::SnakeCase if !name.starts_with('$') => Some(snake_case(name)),
            _ => None,
        }
    }
}

/// `Order Completed`, `orderCompleted`, `order-completed` and
/// `OrderCompleted` all become `order_completed`. A run of capitals is one
/// word (`HTTPRequest Sent` becomes `http_request_sent`).
fn snake_case(name: &str) -> String {
    let chars: Vec<char> = name.chars().collect();
    let mut out = String::with_capacity(name.len() + 4);
    for (i, &c) in chars.iter().enumerate() {
        if c.is_alphanumeric() {
            let prev = i.checked_sub(1).map(|j| chars[j]);
            let next = chars.get(i + 1).copied();
            let starts_word = c.is_uppercase()
                && prev.is_some_and(|p| {
                    p.is_lowercase()
                        || p.is_ascii_digit()
                        || (p.is_uppercase() && next.is_some_and(char::is_lowercase))
                });
            if starts_word && !out.is_empty() && !out.ends_with('_') {
                out.push('_');
            }
            out.extend(c.to_lowercase());
        } else if !out.is_empty() && !out.ends_with('_') {
            out.push('_');
        }
    }
    while out.ends_with('_') {
        out.pop();
    }
    if out.is_empty() {
        name.to_string()
    } else {
        out
    }
}

register_plugin!(PropertyRenamer);

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_plugin_sdk::testing::{self, MockHost};
    use sluice_plugin_sdk::{Value, json};

    fn renamer(config: Value) -> PropertyRenamer {
        testing::setup::<PropertyRenamer>(config).expect("valid config")
    }

    fn run(plugin: &mut PropertyRenamer, name: &str, properties: Value) -> (String, Value) {
        MockHost::install();
        let event = testing::event(name, "user-1", properties);
        let mut out = testing::transform(plugin, event).expect("transform succeeds");
        assert_eq!(out.len(), 1, "the renamer never drops or splits events");
        let event = out.pop().unwrap();
        (event.name, Value::Object(event.properties))
    }

    #[test]
    fn renames_properties_at_the_top_level_and_in_person_objects() {
        let mut plugin =
            renamer(json!({"properties": {"plan": "subscription_plan", "$browser": "browser"}}));
        let (_, props) = run(
            &mut plugin,
            "$pageview",
            json!({"plan": "pro", "$browser": "Firefox", "kept": 1,
                   "$set": {"plan": "pro", "name": "Ann"}, "$set_once": {"$browser": "Chrome"}}),
        );
        assert_eq!(
            props,
            json!({"kept": 1, "$set": {"name": "Ann", "subscription_plan": "pro"},
                   "$set_once": {"browser": "Chrome"}, "browser": "Firefox", "subscription_plan": "pro"})
        );
    }

    #[test]
    fn a_renamed_value_replaces_one_under_the_new_name() {
        let mut plugin = renamer(json!({"properties": {"plan": "subscription_plan"}}));
        let (_, props) = run(
            &mut plugin,
            "e",
            json!({"plan": "pro", "subscription_plan": "old"}),
        );
        assert_eq!(props, json!({"subscription_plan": "pro"}));
    }

    #[test]
    fn renames_events_by_the_map_before_the_case_rule() {
        let mut plugin = renamer(json!({
            "events": {"Signed Up": "signed_up", "signup": "signed_up", "Purchase": "order_completed"},
            "event_case": "snake_case",
        }));
        for (name, expected) in [
            ("Signed Up", "signed_up"),
            ("signup", "signed_up"),
            ("Purchase", "order_completed"),
            ("Order Completed", "order_completed"),
            ("orderCompleted", "order_completed"),
            ("order-completed", "order_completed"),
            ("HTTPRequest Sent", "http_request_sent"),
            ("$pageview", "$pageview"),
            ("already_snake", "already_snake"),
        ] {
            assert_eq!(run(&mut plugin, name, json!({})).0, expected, "{name}");
        }
    }

    #[test]
    fn keeps_event_names_by_default() {
        let mut plugin = renamer(json!({"events": {"signup": "signed_up"}}));
        assert_eq!(
            run(&mut plugin, "Order Completed", json!({})).0,
            "Order Completed"
        );
        assert_eq!(run(&mut plugin, "signup", json!({})).0, "signed_up");
    }

    #[test]
    fn events_without_listed_properties_are_left_alone() {
        let mut plugin = renamer(json!({"properties": {"plan": "subscription_plan"}}));
        let props = json!({"a": 1, "$set": {"b": 2}});
        assert_eq!(run(&mut plugin, "e", props.clone()).1, props);
    }

    #[test]
    fn empty_names_are_refused() {
        let err = testing::setup::<PropertyRenamer>(json!({"properties": {"plan": ""}}))
            .err()
            .unwrap();
        assert!(err.to_string().contains("must not be empty"), "{err}");
        let err = testing::setup::<PropertyRenamer>(json!({"event_case": "camel"}))
            .err()
            .unwrap();
        assert!(err.to_string().contains("invalid config"), "{err}");
    }
}
