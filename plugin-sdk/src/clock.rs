//! Wall-clock time from the host, the plugin's only clock.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, UTC.
pub fn now_millis() -> u64 {
    crate::host::now_millis()
}

/// The current time as a [`SystemTime`].
pub fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(now_millis())
}
