use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::__private::{WitExportError, WitExportedEvent};
use crate::http::HttpError;
use crate::{Error, Result};

/// A stored event handed to [`crate::Plugin::export`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExportedEvent {
    /// The event's uuid. Send it on so the receiver can de-duplicate a
    /// redelivered batch.
    pub uuid: String,
    /// The event name.
    #[serde(rename = "event")]
    pub name: String,
    /// The distinct id the event was sent with.
    pub distinct_id: String,
    /// The person the distinct id resolves to, if known.
    #[serde(default)]
    pub person_id: Option<String>,
    /// When it happened, RFC 3339 in UTC.
    pub timestamp: String,
    /// The properties.
    #[serde(default)]
    pub properties: Map<String, Value>,
}

impl ExportedEvent {
    pub(crate) fn from_wit(event: WitExportedEvent) -> Result<Self> {
        let properties = serde_json::from_str(&event.properties).map_err(|err| {
            Error::msg(format!(
                "event {} has malformed properties: {err}",
                event.uuid
            ))
        })?;
        Ok(ExportedEvent {
            uuid: event.uuid,
            name: event.name,
            distinct_id: event.distinct_id,
            person_id: event.person_id,
            timestamp: event.timestamp,
            properties,
        })
    }
}

/// Why a batch was not delivered.
#[derive(Clone, Debug, PartialEq)]
pub enum ExportError {
    /// Worth retrying: the host retries the whole batch with backoff, waiting
    /// at least `retry_after` if given.
    Retryable {
        /// What went wrong, for the delivery log.
        message: String,
        /// How long the destination asked to wait.
        retry_after: Option<Duration>,
    },
    /// Retrying will not help: the batch goes to dead letters with this
    /// message, to be replayed after the cause is fixed.
    Permanent(String),
}

impl ExportError {
    /// A retryable error without a requested delay.
    pub fn retryable(message: impl fmt::Display) -> Self {
        ExportError::Retryable {
            message: message.to_string(),
            retry_after: None,
        }
    }

    /// A permanent error.
    pub fn permanent(message: impl fmt::Display) -> Self {
        ExportError::Permanent(message.to_string())
    }

    /// The same error with its message rewritten, keeping whether it is
    /// retryable and any requested delay: for saying what the plugin was
    /// doing, such as `err.map_message(|m| format!("cannot reach {url}: {m}"))`.
    pub fn map_message(self, f: impl FnOnce(String) -> String) -> Self {
        match self {
            ExportError::Retryable {
                message,
                retry_after,
            } => ExportError::Retryable {
                message: f(message),
                retry_after,
            },
            ExportError::Permanent(message) => ExportError::Permanent(f(message)),
        }
    }

    pub(crate) fn into_wit(self) -> WitExportError {
        use crate::__private::bindings::exports::sluice::plugin::destination::RetryableError;
        match self {
            ExportError::Retryable {
                message,
                retry_after,
            } => WitExportError::Retryable(RetryableError {
                message,
                retry_after_ms: retry_after.map(|d| d.as_millis().min(u64::MAX as u128) as u64),
            }),
            ExportError::Permanent(message) => WitExportError::Permanent(message),
        }
    }
}

impl fmt::Display for ExportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExportError::Retryable {
                message,
                retry_after: Some(after),
            } => write!(f, "{message} (retry after {}s)", after.as_secs_f64()),
            ExportError::Retryable { message, .. } => f.write_str(message),
            ExportError::Permanent(message) => f.write_str(message),
        }
    }
}

/// An unexpected error is retried: retries end in dead letters anyway, and
/// giving up at once could lose events to a passing fault.
impl From<Error> for ExportError {
    fn from(err: Error) -> Self {
        ExportError::retryable(err)
    }
}

/// Network trouble is retryable; a refused or malformed request is not.
impl From<HttpError> for ExportError {
    fn from(err: HttpError) -> Self {
        match err {
            HttpError::Timeout | HttpError::Connection(_) => ExportError::retryable(err),
            HttpError::Denied(_) | HttpError::InvalidRequest(_) | HttpError::TooLarge(_) => {
                ExportError::permanent(err)
            }
        }
    }
}

impl From<serde_json::Error> for ExportError {
    fn from(err: serde_json::Error) -> Self {
        ExportError::permanent(format!("failed to encode or decode JSON: {err}"))
    }
}

impl std::error::Error for ExportError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rewritten_message_keeps_the_kind_of_error_and_its_delay() {
        let prefix = |message: String| format!("cannot reach x: {message}");
        let retry = ExportError::Retryable {
            message: "timed out".into(),
            retry_after: Some(Duration::from_secs(3)),
        };
        assert_eq!(
            retry.map_message(prefix),
            ExportError::Retryable {
                message: "cannot reach x: timed out".into(),
                retry_after: Some(Duration::from_secs(3)),
            }
        );
        assert_eq!(
            ExportError::permanent("denied").map_message(prefix),
            ExportError::permanent("cannot reach x: denied")
        );
    }
}
