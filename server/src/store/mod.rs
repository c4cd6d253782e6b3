//! Storage: projects and keys, the durable capture queue, and stored events.
//! SQLite (WAL) is the embedded default. Every write that capture
//! acknowledges is committed before the 200.

mod db;
mod delivery;
mod persons;
mod plugins;
mod query;
mod queue;

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
pub use queue::{Claim, QueueStatus, QueueWrite};

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

/// The placeholder of bind parameter `n` (counting from 1). PostgreSQL
/// numbers them (`$n`). SQLite gets plain `?`, bound in the order they
/// appear: it looks a named or numbered parameter up in a list on every
/// parse and every bind, which made a statement of a few thousand
/// parameters cost time quadratic in their number (a seventh of the
/// storage path's time in the load benchmark). A statement built with
/// these helpers must therefore use them for every parameter, in order.
pub(super) fn placeholder(backend: Backend, n: usize) -> String {
    match backend {
        Backend::Sqlite => "?".into(),
        Backend::Postgres => format!("${n}"),
    }
}

/// `($1, $2, $3), ($4, $5, $6), …` from parameter `first` on: the
/// placeholders of a multi-row `VALUES` list. On PostgreSQL each
/// statement is a round trip, so rows go in together.
pub(super) fn values_placeholders(
    backend: Backend,
    first: usize,
    rows: usize,
    columns: usize,
) -> String {
    (0..rows)
        .map(|row| {
            let cells: Vec<String> = (0..columns)
                .map(|column| placeholder(backend, first + row * columns + column))
                .collect();
            format!("({})", cells.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `$first, $first+1, …`: the placeholders of an `IN (…)` list.
pub(super) fn list_placeholders(backend: Backend, first: usize, count: usize) -> String {
    (first..first + count)
        .map(|n| placeholder(backend, n))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `SELECT columns FROM table WHERE project_id = ? AND key IN (…)`, with
/// `count` keys bound after the project: how a batch looks up its rows.
/// On PostgreSQL the keys are a `VALUES` list joined to the table, which
/// the planner probes the primary key with, one key at a time, even on a
/// table it has no statistics for; an `IN` list there was planned as a
/// scan of the whole project, every row compared with every key (100 ms
/// per batch at 100,000 events). Columns are named on the table `t`.
pub(super) fn keyed_lookup(
    backend: Backend,
    columns: &str,
    table: &str,
    key: &str,
    count: usize,
) -> String {
    match backend {
        Backend::Sqlite => format!(
            "SELECT {columns} FROM {table} t WHERE t.project_id = ? AND t.{key} IN ({})",
            list_placeholders(backend, 2, count)
        ),
        Backend::Postgres => format!(
            "SELECT {columns} FROM {table} t JOIN (VALUES {}) v (key) ON t.{key} = v.key WHERE t.project_id = $1",
            values_placeholders(backend, 2, count, 1)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_number_rows_then_columns_on_postgres() {
        assert_eq!(
            values_placeholders(Backend::Postgres, 1, 2, 3),
            "($1, $2, $3), ($4, $5, $6)"
        );
        assert_eq!(list_placeholders(Backend::Postgres, 2, 3), "$2, $3, $4");
    }

    #[test]
    fn lookups_join_a_values_list_on_postgres() {
        assert_eq!(
            keyed_lookup(Backend::Postgres, "t.uuid", "events", "uuid", 2),
            "SELECT t.uuid FROM events t JOIN (VALUES ($2), ($3)) v (key) ON t.uuid = v.key WHERE t.project_id = $1"
        );
        assert_eq!(
            keyed_lookup(Backend::Sqlite, "t.uuid", "events", "uuid", 2),
            "SELECT t.uuid FROM events t WHERE t.project_id = ? AND t.uuid IN (?, ?)"
        );
    }

    #[test]
    fn placeholders_are_anonymous_on_sqlite() {
        assert_eq!(
            values_placeholders(Backend::Sqlite, 1, 2, 2),
            "(?, ?), (?, ?)"
        );
        assert_eq!(list_placeholders(Backend::Sqlite, 2, 2), "?, ?");
    }
}
