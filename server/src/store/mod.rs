//! Storage: projects and keys, the durable capture queue, and stored events.
//! SQLite (WAL) is the embedded default. Every write that capture
//! acknowledges is committed before the 200.

mod db;
mod delivery;
mod persons;
mod plugins;
mod query;

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

pub use db::{Backend, Store};
pub use delivery::{
    Attempt, DeliveryRecord, DeliverySettings, DestinationStats, Disposition, OutboxRow,
    ReplaySelector,
};
pub use plugins::{
    DeadLetter, NewPluginConfig, PluginConfig, PluginConfigPatch, PluginHealth, PluginLog,
    StoredDeadLetter,
};
pub use query::{Cursor, Scan, ScanRow};

/// Everything the pipeline made of a claimed batch, written in one
/// transaction with the removal of the batch from the queue.
#[derive(Debug, Default)]
pub struct ProcessedBatch {
    /// Events to store, by project.
    pub events: Vec<(String, QueuedEvent)>,
    pub dead_letters: Vec<DeadLetter>,
    /// Plugin log lines, by plugin config id.
    pub logs: Vec<(String, crate::runtime::LogRecord)>,
    pub health: Vec<PluginHealth>,
}

/// Where data lives.
#[derive(Clone, Debug)]
pub enum StoreConfig {
    /// `DIR/sluice.db`, the embedded default.
    Sqlite { data_dir: PathBuf },
    /// A PostgreSQL database that several processes may share.
    Postgres { url: String },
}

/// What `sluice project create` prints.
#[derive(Clone, Debug, Serialize)]
pub struct CreatedProject {
    pub project_id: String,
    /// Public: goes into apps; also the Segment write key.
    pub capture_token: String,
    /// Secret: for the management and query APIs. Only its hash is stored.
    pub api_key: String,
}

/// An event accepted by capture, normalised, waiting in the queue.
#[derive(Clone, Debug, PartialEq, serde::Deserialize, Serialize)]
pub struct QueuedEvent {
    pub uuid: String,
    pub event: String,
    pub distinct_id: String,
    pub timestamp: String,
    pub received_at: String,
    #[serde(default)]
    pub properties: Map<String, Value>,
}

/// A claimed row of the queue.
#[derive(Clone, Debug)]
pub struct Claimed {
    pub id: i64,
    pub project_id: String,
    pub event: QueuedEvent,
}

/// A stored event, as the events API returns it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StoredEvent {
    pub uuid: String,
    pub event: String,
    pub distinct_id: String,
    pub person_id: Option<String>,
    pub timestamp: String,
    pub properties: Value,
}

/// A person: the distinct ids that resolve to it and its properties.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Person {
    pub id: String,
    pub distinct_ids: Vec<String>,
    pub properties: Value,
}

/// Filters of the events list.
#[derive(Clone, Debug, Default)]
pub struct EventFilter {
    pub event: Option<String>,
    pub distinct_id: Option<String>,
    pub after: Option<String>,
    pub before: Option<String>,
    pub limit: u32,
}

/// How long a claimed queue row stays with a worker before another may take
/// it, by default: long enough for a slow plugin chain, short enough that a
/// killed worker's events move on quickly.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

fn random_token(prefix: &str) -> String {
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes).expect("the OS has randomness");
    format!("{prefix}{}", hex::encode(bytes))
}

pub fn now_rfc3339() -> String {
    crate::runtime::format_timestamp(chrono::Utc::now())
}

pub type Result<T, E = sqlx::Error> = std::result::Result<T, E>;
