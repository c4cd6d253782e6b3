//! The plugin log, read by operators through the API and printed by
//! `sluice plugin test`.
//!
//! Use the macros [`crate::trace!`], [`crate::debug!`], [`crate::info!`],
//! [`crate::warn!`] and [`crate::error!`], which take `format!` arguments.
//! The host caps lines per minute and the length of a line; lines over the
//! cap are dropped and counted, never an error.

/// How severe a log line is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Detail for following a single event.
    Trace,
    /// Detail for debugging a plugin.
    Debug,
    /// Normal operation worth recording.
    Info,
    /// Something unexpected that the plugin worked around.
    Warn,
    /// A failure.
    Error,
}

/// Writes one line with key/value fields, for example
/// `log::write(Level::Info, "sent", &[("status", "200")])`.
pub fn write(level: Level, message: &str, fields: &[(&str, &str)]) {
    crate::host::log_write(level, message, fields);
}

/// Logs at trace level: `trace!("looked up {key}")`.
#[macro_export]
macro_rules! trace {
    ($($arg:tt)+) => { $crate::log::write($crate::log::Level::Trace, &::std::format!($($arg)+), &[]) };
}

/// Logs at debug level: `debug!("config: {config:?}")`.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)+) => { $crate::log::write($crate::log::Level::Debug, &::std::format!($($arg)+), &[]) };
}

/// Logs at info level: `info!("delivered {} events", n)`.
#[macro_export]
macro_rules! info {
    ($($arg:tt)+) => { $crate::log::write($crate::log::Level::Info, &::std::format!($($arg)+), &[]) };
}

/// Logs at warn level: `warn!("skipped {uuid}: no email")`.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)+) => { $crate::log::write($crate::log::Level::Warn, &::std::format!($($arg)+), &[]) };
}

/// Logs at error level: `error!("vendor said {status}")`.
#[macro_export]
macro_rules! error {
    ($($arg:tt)+) => { $crate::log::write($crate::log::Level::Error, &::std::format!($($arg)+), &[]) };
}
