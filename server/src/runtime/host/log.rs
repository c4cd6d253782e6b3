//! The plugin log and the record of HTTP calls, capped per install.

use std::time::Instant;

use serde::Serialize;

use super::HostState;
pub use crate::model::{LogLevel, LogRecord};
use crate::runtime::bindings::log::{Host, Level};

/// One HTTP request a plugin made.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HttpCall {
    pub method: String,
    pub url: String,
    /// Header values that carry credentials are replaced by `[redacted]`.
    pub request_headers: Vec<(String, String)>,
    /// The start of the request body, as text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_body: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub duration_ms: u64,
}

/// What an install did since it was last asked: log lines and HTTP calls.
/// Shared by all the stores of an install, so the log cap holds across
/// instances and nothing is lost when a trapped instance is discarded.
#[derive(Debug, Default)]
pub struct Activity {
    pub logs: Vec<LogRecord>,
    pub http_calls: Vec<HttpCall>,
    window_start: Option<Instant>,
    lines_in_window: u32,
    dropped_in_window: u32,
    /// The panic message the SDK logged just before a trap.
    pub panic: Option<String>,
}

/// The SDK marks the log line it writes from its panic hook with this field.
const PANIC_FIELD: &str = "sluice.panic";

/// Upper bound on stored records, so an install nobody drains cannot grow
/// without limit.
const MAX_BUFFERED: usize = 10_000;

impl Activity {
    /// Takes what has been recorded so far.
    pub fn take(&mut self) -> (Vec<LogRecord>, Vec<HttpCall>) {
        (
            std::mem::take(&mut self.logs),
            std::mem::take(&mut self.http_calls),
        )
    }

    fn push(&mut self, record: LogRecord) {
        if self.logs.len() >= MAX_BUFFERED {
            self.logs.remove(0);
        }
        self.logs.push(record);
    }

    /// Logs how many lines were dropped since the last note, if any.
    fn note_dropped(&mut self, per_minute: u32) {
        let dropped = std::mem::take(&mut self.dropped_in_window);
        if dropped > 0 {
            self.push(LogRecord {
                at: now_rfc3339(),
                level: LogLevel::Warn,
                message: format!(
                    "dropped {dropped} log lines over the limit of {per_minute} per minute"
                ),
                fields: Vec::new(),
                event_uuid: None,
            });
        }
    }

    pub fn record_http(&mut self, call: HttpCall) {
        if self.http_calls.len() >= MAX_BUFFERED {
            self.http_calls.remove(0);
        }
        self.http_calls.push(call);
    }
}

pub fn now_rfc3339() -> String {
    crate::model::format_timestamp(chrono::Utc::now())
}

impl HostState {
    /// Writes a line to the install's log, within the per-minute cap. When a
    /// new minute starts, the count of lines dropped in the last one is
    /// logged first, so operators see that the log has gaps.
    pub fn log(&mut self, level: LogLevel, message: String, fields: Vec<(String, String)>) {
        let limits = &self.install.limits;
        let max_line = limits.max_log_line_bytes as usize;
        let per_minute = limits.log_lines_per_minute;
        let is_panic = fields.iter().any(|(k, _)| k == PANIC_FIELD);
        let mut activity = self.install.activity.lock().expect("activity lock");
        let now = Instant::now();
        let window_over = activity
            .window_start
            .is_none_or(|start| now.duration_since(start).as_secs() >= 60);
        if window_over {
            activity.note_dropped(per_minute);
            activity.window_start = Some(now);
            activity.lines_in_window = 0;
            activity.dropped_in_window = 0;
        }
        // Counted before anything else is done with the line: a plugin
        // that logs thousands of lines per event costs the host a counter
        // for each one past the cap, not a scrub.
        let kept = activity.lines_in_window < per_minute;
        if kept {
            activity.lines_in_window += 1;
        } else {
            activity.dropped_in_window += 1;
        }
        if !kept && !is_panic {
            return;
        }
        // Plugin logs are shown to anyone with the project's API key, so a
        // secret (or a URL's token) a plugin prints by mistake is blanked
        // out here.
        let secrets = &self.install.secrets;
        let message = secrets.scrub(&message).into_owned();
        if is_panic {
            activity.panic = Some(message.clone());
        }
        if !kept {
            return;
        }
        let event_uuid = (!self.call.input_uuid.is_empty()).then(|| self.call.input_uuid.clone());
        activity.push(LogRecord {
            at: now_rfc3339(),
            level,
            message: truncate(message, max_line),
            fields: fields
                .into_iter()
                .map(|(k, v)| {
                    (
                        truncate(k, 256),
                        truncate(secrets.scrub(&v).into_owned(), max_line),
                    )
                })
                .collect(),
            event_uuid,
        });
    }

    /// Logs how many lines the current window dropped so far; called when a
    /// caller drains the activity, so a test run reports the gap at once.
    pub fn flush_dropped(&mut self) {
        let per_minute = self.install.limits.log_lines_per_minute;
        self.install
            .activity
            .lock()
            .expect("activity lock")
            .note_dropped(per_minute);
    }
}

fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("… [cut]");
    }
    text
}

impl Host for HostState {
    fn write(
        &mut self,
        level: Level,
        message: String,
        fields: Vec<(String, String)>,
    ) -> wasmtime::Result<()> {
        let level = match level {
            Level::Trace => LogLevel::Trace,
            Level::Debug => LogLevel::Debug,
            Level::Info => LogLevel::Info,
            Level::Warn => LogLevel::Warn,
            Level::Error => LogLevel::Error,
        };
        self.log(level, message, fields);
        Ok(())
    }
}
