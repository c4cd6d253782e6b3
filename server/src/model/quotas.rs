//! What one project may take of the resources every project shares: the
//! worker, the plugin sandbox's instance pool, HTTP permits, the queue,
//! the database's connections and its disk. Each project gets the
//! operator's defaults, and the operator may raise or lower any of them
//! for one project (`sluice project quotas`).
//!
//! A quota guards the other projects, not the one it limits: hitting one
//! is never a plugin failure, and the client or plugin that hits it is
//! told which quota it was.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One project's quotas. Every field has a default; an override names only
/// what it changes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Quotas {
    /// Plugin configs (enabled or not) in the project.
    pub plugin_configs: u32,
    /// Distinct plugin files (`.wasm`) the project has uploaded, and their
    /// bytes together: each is kept in the database and compiled.
    pub plugins: u32,
    pub plugin_bytes: u64,
    /// Events one captured event may become across the whole chain of
    /// transformations. Over it, the captured event is dead-lettered with
    /// the reason: without a total, four links that each return 100 events
    /// turn one event into 10^8.
    pub events_per_input: u32,
    /// Time the chain may spend on one event, every link together. A link
    /// that uses up the rest is stopped, and a link whose calls keep
    /// taking more than half their deadline counts towards being disabled
    /// as a failure does.
    pub chain_time_ms: u64,
    /// Live plugin instances of the project at once, transformations and
    /// delivery lanes together: its share of the sandbox's pool.
    pub instances: u32,
    /// Key-value keys and bytes (keys plus values) of the whole project.
    pub kv_keys: u64,
    pub kv_bytes: u64,
    /// Key-value keys and bytes of one plugin config.
    pub kv_keys_per_config: u64,
    pub kv_bytes_per_config: u64,
    /// Outgoing HTTP requests of the project's plugins in flight at once:
    /// its share of the server's `http_concurrency`.
    pub http_permits: u32,
    /// Delivery lanes (batches in flight) of all the project's
    /// destinations together; each destination also keeps to its own
    /// `max_in_flight`.
    pub delivery_lanes: u32,
    /// Events of the project waiting in the capture queue. Over it, capture
    /// answers 503 to this project's tokens only.
    pub queued_events: u64,
    /// Capture requests per second per capture token, with bursts of up to
    /// twice as many. Over it, capture answers 429 with `Retry-After`.
    pub capture_requests_per_second: u32,
    /// Analytics queries of the project running at once.
    pub concurrent_queries: u32,
    /// Days plugin log lines are kept.
    pub log_retention_days: u32,
    /// Plugin log lines kept per plugin config; older ones are pruned first.
    pub log_lines_per_config: u64,
    /// Days dead letters are kept.
    pub dead_letter_retention_days: u32,
    /// Dead letters one replay request may queue again.
    pub replay_batch: u32,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            plugin_configs: 50,
            plugins: 100,
            plugin_bytes: 1 << 30,
            events_per_input: 1_000,
            chain_time_ms: 250,
            instances: 32,
            kv_keys: 100_000,
            kv_bytes: 64 << 20,
            kv_keys_per_config: 20_000,
            kv_bytes_per_config: 16 << 20,
            http_permits: 16,
            delivery_lanes: 16,
            queued_events: 200_000,
            capture_requests_per_second: 1_000,
            concurrent_queries: 2,
            log_retention_days: 7,
            log_lines_per_config: 100_000,
            dead_letter_retention_days: 30,
            replay_batch: 10_000,
        }
    }
}

/// An override that names no quota, or gives one a value it cannot take.
#[derive(Debug, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidQuota(pub String);

impl Quotas {
    /// The names of every quota, in the order the docs list them.
    pub fn names() -> Vec<String> {
        match serde_json::to_value(Quotas::default()) {
            Ok(Value::Object(map)) => map.keys().cloned().collect(),
            _ => Vec::new(),
        }
    }

    /// These quotas with `overrides` (a JSON object of quota names to
    /// numbers) applied.
    pub fn with_overrides(&self, overrides: &Map<String, Value>) -> Result<Quotas, InvalidQuota> {
        let Value::Object(mut merged) =
            serde_json::to_value(self).expect("quotas serialise to an object")
        else {
            unreachable!("quotas serialise to an object")
        };
        for (name, value) in overrides {
            if !merged.contains_key(name) {
                return Err(InvalidQuota(format!(
                    "there is no quota named `{name}`; the quotas are: {}",
                    Quotas::names().join(", ")
                )));
            }
            let ok = value.as_u64().is_some_and(|n| n >= 1);
            if !ok {
                return Err(InvalidQuota(format!(
                    "quota `{name}` must be a whole number of at least 1, got {value}"
                )));
            }
            merged.insert(name.clone(), value.clone());
        }
        serde_json::from_value(Value::Object(merged))
            .map_err(|err| InvalidQuota(format!("the quotas do not fit: {err}")))
    }

    /// Parses `NAME=VALUE` into an override entry.
    pub fn parse_assignment(text: &str) -> Result<(String, Value), InvalidQuota> {
        let (name, value) = text.split_once('=').ok_or_else(|| {
            InvalidQuota(format!(
                "`{text}` is not NAME=VALUE, for example events_per_input=500"
            ))
        })?;
        let value: u64 = value.trim().parse().map_err(|_| {
            InvalidQuota(format!(
                "quota `{}` must be a whole number, got `{}`",
                name.trim(),
                value.trim()
            ))
        })?;
        let name = name.trim().to_string();
        // Checked against the names and the range at once.
        Quotas::default().with_overrides(&Map::from_iter([(name.clone(), Value::from(value))]))?;
        Ok((name, Value::from(value)))
    }
}

/// A quota that was hit, for messages that name it.
#[derive(Clone, Copy, Debug)]
pub struct Hit<'a> {
    pub quota: &'a str,
    pub limit: u64,
}

impl fmt::Display for Hit<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the project's quota `{}` ({}); the operator can change it with `sluice project quotas`",
            self.quota, self.limit
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_override_changes_only_what_it_names() {
        let quotas = Quotas::default()
            .with_overrides(&Map::from_iter([(
                "events_per_input".to_string(),
                Value::from(10),
            )]))
            .unwrap();
        assert_eq!(quotas.events_per_input, 10);
        assert_eq!(quotas.plugin_configs, Quotas::default().plugin_configs);
    }

    #[test]
    fn an_unknown_name_or_a_bad_value_is_refused_with_the_names() {
        let err = Quotas::parse_assignment("events=5").unwrap_err();
        assert!(err.0.contains("no quota named `events`"), "{err}");
        assert!(err.0.contains("events_per_input"), "{err}");
        let err = Quotas::parse_assignment("events_per_input=0").unwrap_err();
        assert!(err.0.contains("at least 1"), "{err}");
        let err = Quotas::parse_assignment("events_per_input=many").unwrap_err();
        assert!(err.0.contains("whole number"), "{err}");
        assert!(Quotas::parse_assignment("events_per_input").is_err());
    }
}
