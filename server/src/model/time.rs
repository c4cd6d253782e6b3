//! The one way Sluice writes a time as text.

/// Formats a time the way events carry it: RFC 3339, UTC, milliseconds.
/// Stored timestamps compare as text, so every writer must use this.
pub fn format_timestamp(at: chrono::DateTime<chrono::Utc>) -> String {
    at.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// Now, as [`format_timestamp`] writes it.
pub fn now_rfc3339() -> String {
    format_timestamp(chrono::Utc::now())
}
