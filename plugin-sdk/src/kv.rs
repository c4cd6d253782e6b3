//! A key-value store private to one install of the plugin, for tokens,
//! cursors and counters that must outlive an instance.
//!
//! Needs `kv = true` under `[capabilities]` in `plugin.toml`; without it every
//! call returns [`KvError::Denied`].

use std::fmt;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{Error, Result};

/// Why a key-value call failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvError {
    /// The capability is not granted. The message says what to change.
    Denied(String),
    /// The key or value is over the host's limit.
    TooLarge(String),
    /// `increment` found a value that is not an integer.
    NotANumber(String),
    /// The store is unreachable; retrying may work.
    Unavailable(String),
}

impl fmt::Display for KvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvError::Denied(m) => write!(f, "key-value access denied: {m}"),
            KvError::TooLarge(m) => write!(f, "key-value entry too large: {m}"),
            KvError::NotANumber(m) => write!(f, "key-value entry is not a number: {m}"),
            KvError::Unavailable(m) => write!(f, "key-value store unavailable: {m}"),
        }
    }
}

impl std::error::Error for KvError {}

fn ttl_seconds(ttl: Option<Duration>) -> Option<u32> {
    // A TTL under a second still expires: round up rather than to "never".
    ttl.map(|ttl| ttl.as_secs_f64().ceil().clamp(1.0, u32::MAX as f64) as u32)
}

/// Reads a value; `None` if unset or expired.
pub fn get(key: &str) -> Result<Option<Vec<u8>>, KvError> {
    crate::host::kv_get(key)
}

/// Stores a value, expiring after `ttl` if given.
pub fn set(key: &str, value: &[u8], ttl: Option<Duration>) -> Result<(), KvError> {
    crate::host::kv_set(key, value, ttl_seconds(ttl))
}

/// Removes a key; returns whether it was set.
pub fn delete(key: &str) -> Result<bool, KvError> {
    crate::host::kv_delete(key)
}

/// Adds `delta` to an integer counter (missing counts as 0) and returns the
/// new value. `ttl` applies only when this call creates the key.
pub fn increment(key: &str, delta: i64, ttl: Option<Duration>) -> Result<i64, KvError> {
    crate::host::kv_increment(key, delta, ttl_seconds(ttl))
}

/// Reads a JSON value stored with [`set_json`].
pub fn get_json<T: DeserializeOwned>(key: &str) -> Result<Option<T>> {
    match get(key)? {
        Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|err| {
            Error::msg(format!(
                "key `{key}` does not hold the expected JSON: {err}"
            ))
        }),
        None => Ok(None),
    }
}

/// Stores any serialisable value as JSON.
pub fn set_json<T: Serialize + ?Sized>(key: &str, value: &T, ttl: Option<Duration>) -> Result<()> {
    let bytes = serde_json::to_vec(value)?;
    Ok(set(key, &bytes, ttl)?)
}
