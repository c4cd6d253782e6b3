//! How a destination install is fed, as its `delivery` setting says.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How one destination install is fed: batch size and linger, retries,
/// concurrency, rate and which events it gets. Every field has a default,
/// so `{}` is a valid setting.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct DeliverySettings {
    /// Most events handed to the plugin in one export call.
    pub batch_size: u32,
    /// How long a batch smaller than `batch_size` may wait for more events.
    pub linger_ms: u64,
    /// How long a batch is retried after its first failure before it goes
    /// to dead letters.
    pub max_retry_seconds: u64,
    /// First retry delay; it doubles per attempt, with jitter.
    pub retry_initial_backoff_ms: u64,
    /// Longest delay between two attempts (a plugin's retry-after may be
    /// longer).
    pub retry_max_backoff_ms: u64,
    /// Export calls in flight at once, per process.
    pub concurrency: u32,
    /// Most export calls started per second, per process; none when unset.
    pub max_batches_per_second: Option<f64>,
    /// Event names to deliver; empty delivers every event.
    pub events: Vec<String>,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        DeliverySettings {
            batch_size: 100,
            linger_ms: 1_000,
            max_retry_seconds: 4 * 60 * 60,
            retry_initial_backoff_ms: 1_000,
            retry_max_backoff_ms: 5 * 60 * 1_000,
            concurrency: 1,
            max_batches_per_second: None,
            events: Vec::new(),
        }
    }
}

impl DeliverySettings {
    /// Reads settings given through the API, naming the field at fault.
    pub fn parse(value: &Value) -> std::result::Result<Self, String> {
        let settings: DeliverySettings = serde_json::from_value(value.clone())
            .map_err(|err| format!("`delivery` is invalid: {err}"))?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let check = |ok: bool, field: &str, rule: &str| {
            if ok {
                Ok(())
            } else {
                Err(format!("`delivery.{field}` must be {rule}"))
            }
        };
        check(
            (1..=10_000).contains(&self.batch_size),
            "batch_size",
            "between 1 and 10000",
        )?;
        check(
            self.linger_ms <= 600_000,
            "linger_ms",
            "at most 600000 (10 minutes)",
        )?;
        check(
            self.max_retry_seconds <= 7 * 24 * 3600,
            "max_retry_seconds",
            "at most 604800 (a week)",
        )?;
        check(
            (1..=3_600_000).contains(&self.retry_initial_backoff_ms),
            "retry_initial_backoff_ms",
            "between 1 and 3600000",
        )?;
        check(
            self.retry_max_backoff_ms >= self.retry_initial_backoff_ms
                && self.retry_max_backoff_ms <= 24 * 3_600_000,
            "retry_max_backoff_ms",
            "at least retry_initial_backoff_ms and at most 86400000 (a day)",
        )?;
        check(
            (1..=64).contains(&self.concurrency),
            "concurrency",
            "between 1 and 64",
        )?;
        check(
            self.max_batches_per_second
                .is_none_or(|rate| rate.is_finite() && rate > 0.0),
            "max_batches_per_second",
            "a positive number, or left out for no limit",
        )?;
        Ok(())
    }

    /// Reads settings as the store keeps them. Unlike [`Self::parse`] it
    /// does not validate again: the bounds may have been wider when they
    /// were written.
    pub fn from_stored(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// Whether an event of this name goes to the destination.
    pub fn wants(&self, event: &str) -> bool {
        self.events.is_empty() || self.events.iter().any(|name| name == event)
    }
}

/// Where an event was when it went to dead letters, which is where replay
/// sends it back to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeadLetterStage {
    /// A fail-closed transformation failed on it: replay queues it again.
    Transform,
    /// A destination refused it or ran out of retries: replay puts it back
    /// in that destination's outbox.
    Delivery,
}

/// What became of one export call, as the attempts list shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AttemptOutcome {
    Delivered,
    Retrying,
    DeadLettered,
}

/// Stored enums are written by [`as_str`](DeadLetterStage::as_str) and read
/// back by `FromStr`; anything else in the column is corrupt data, not a
/// value to guess at.
macro_rules! stored_names {
    ($type:ident { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $type {
            pub fn as_str(self) -> &'static str {
                match self {
                    $($type::$variant => $name),+
                }
            }
        }

        impl std::fmt::Display for $type {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $type {
            type Err = String;

            fn from_str(text: &str) -> Result<Self, String> {
                match text {
                    $($name => Ok($type::$variant),)+
                    other => Err(format!(
                        "`{other}` is not a {}",
                        stringify!($type)
                    )),
                }
            }
        }
    };
}

stored_names!(DeadLetterStage {
    Transform => "transform",
    Delivery => "delivery",
});

stored_names!(AttemptOutcome {
    Delivered => "delivered",
    Retrying => "retrying",
    DeadLettered => "dead_lettered",
});
