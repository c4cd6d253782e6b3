//! Storage: projects and keys, the durable capture queue, and stored events.
//! SQLite (WAL) is the embedded default. Every write that capture
//! acknowledges is committed before the 200.
//!
//! One file per table (or per aggregate of tables always written
//! together), each owning every statement on its tables; `db` holds the
//! connection and the write lock, `sql` how statements are spelled for
//! both backends. A transaction that spans tables (storing a processed
//! batch, recording a delivery, replaying dead letters) lives with the
//! table it is about and calls the other tables' functions with its
//! transaction.

mod batch;
mod capture_queue;
mod db;
mod dead_letters;
mod error;
mod events;
mod keys;
mod outbox;
mod persons;
mod plugin_configs;
mod plugin_logs;
mod plugins;
pub use plugins::Upload;
mod projects;
mod scheduled_runs;
mod secrets;
mod sql;

pub use batch::ProcessedBatch;
pub use capture_queue::{
    Claim, Claimed, DEFAULT_LEASE, MAX_SLICES, QueueStatus, QueueWrite, QueuedEvent,
};
pub use db::{Backend, PRUNE_CHUNK, Store, StoreConfig};
pub use dead_letters::{DeadLetter, ReplaySelector, Replayed, StoredDeadLetter};
pub use events::{Cursor, EventFilter, Scan, ScanRow, StoredEvent};
pub use keys::{
    ApiKey, AuditEntry, CaptureToken, KeyError, KeySpec, MAX_KEYS, MAX_RETIRED_TOKENS,
    NewAuditEntry, NewKey, Organisation, Scope,
};
pub use outbox::{Attempt, DeliveryRecord, DestinationStats, Disposition, OutboxRow};
pub use persons::Person;
pub use plugin_configs::{NewPluginConfig, PluginConfig, PluginConfigPatch, PluginHealth};
pub use plugin_logs::PluginLog;
pub use projects::{CreatedProject, ProjectSummary, TokenOwner, hash_key};
pub use secrets::{
    KEY_ENV, KEY_FILE, KeyLoaded, KeySource, Keyring, Rotated, SecretError, is_sealed,
};

pub use crate::model::{DeliverySettings, now_rfc3339};

pub use error::Error;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Now in epoch milliseconds, as lease and retry times are stored.
fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
