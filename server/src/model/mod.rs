//! The domain types that several rooms of the server share: what a plugin
//! declares ([`manifest`]), how a destination is fed ([`delivery`]), plugin
//! log lines ([`log`]), each project's share of what
//! projects share ([`quotas`]), blanking secrets out of text ([`scrub`])
//! and timestamps ([`time`]).
//!
//! This module imports nothing from the rest of the crate, so the store,
//! the runtime and the API can all depend on it without depending on each
//! other.

pub mod delivery;
pub mod install;
pub mod log;
pub mod manifest;
pub mod quotas;
pub mod scrub;
pub mod time;

pub use delivery::{AttemptOutcome, DeadLetterStage, DeliverySettings};
pub use install::FailurePolicy;
pub use log::{LogLevel, LogRecord};
pub use manifest::{Hook, Manifest};
pub use quotas::Quotas;
pub use scrub::Scrubber;
pub use time::{format_timestamp, now_rfc3339};
