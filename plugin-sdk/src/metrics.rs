//! Counters about the plugin's own work, exported by the host with the
//! plugin's name and install as labels.

use std::fmt;

/// Why a counter was not recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetricsError {
    /// The name is not of `[a-zA-Z_][a-zA-Z0-9_]*` or is too long.
    InvalidName(String),
    /// The plugin already has as many series as the host allows.
    TooManySeries(String),
}

impl fmt::Display for MetricsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetricsError::InvalidName(m) => write!(f, "invalid metric name: {m}"),
            MetricsError::TooManySeries(m) => write!(f, "too many metric series: {m}"),
        }
    }
}

impl std::error::Error for MetricsError {}

/// Adds `delta` to the counter `name`.
pub fn increment(name: &str, delta: u64) -> Result<(), MetricsError> {
    increment_with(name, delta, &[])
}

/// Adds `delta` to the counter `name` with labels. Keep label values few:
/// each distinct set is a series, and series are capped per plugin.
pub fn increment_with(name: &str, delta: u64, labels: &[(&str, &str)]) -> Result<(), MetricsError> {
    crate::host::metrics_increment(name, delta, labels)
}
