//! Plugin log lines: written by the runtime, stored by the pipeline and
//! delivery, listed by the API.

use serde::Serialize;

/// Severity of a plugin log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

/// One line of a plugin log.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LogRecord {
    /// RFC 3339.
    pub at: String,
    pub level: LogLevel,
    pub message: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<(String, String)>,
    /// The event being transformed when the line was written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_uuid: Option<String>,
}
