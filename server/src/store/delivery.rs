//! The store's side of delivery: per-destination outboxes filled in the
//! transaction that stores events, leased batches, the outcome of each
//! attempt written in one transaction, running totals, dead-letter replay,
//! and claimed runs of scheduled tasks.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::Row;

use super::{Backend, Result, Store, now_rfc3339};
use crate::runtime::{Hook, LogRecord, Manifest};

/// How one destination install is fed: batch size and linger, retries,
/// concurrency, rate and which events it gets. Every field has a default,
/// so `{}` is a valid setting.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeliverySettings {
    /// Most events handed to the plugin in one export call.
    pub batch_size: u32,
    /// How long a batch smaller than `batch_size` may wait for more events.
    pub linger_ms: u64,
    /// How long a batch is retried after its first failure before it goes
    /// to dead letters.
    pub max_retry_seconds: u64,
    /// First retry delay; it doubles per attempt, with jitter.
    pub retry_initial_backoff_ms: u64,
    /// Longest delay between two attempts (a plugin's retry-after may be
    /// longer).
    pub retry_max_backoff_ms: u64,
    /// Export calls in flight at once, per process.
    pub concurrency: u32,
    /// Most export calls started per second, per process; none when unset.
    pub max_batches_per_second: Option<f64>,
    /// Event names to deliver; empty delivers every event.
    pub events: Vec<String>,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        DeliverySettings {
            batch_size: 100,
            linger_ms: 1_000,
            max_retry_seconds: 4 * 60 * 60,
            retry_initial_backoff_ms: 1_000,
            retry_max_backoff_ms: 5 * 60 * 1_000,
            concurrency: 1,
            max_batches_per_second: None,
            events: Vec::new(),
        }
    }
}

impl DeliverySettings {
    /// Reads settings given through the API, naming the field at fault.
    pub fn parse(value: &Value) -> std::result::Result<Self, String> {
        let settings: DeliverySettings = serde_json::from_value(value.clone())
            .map_err(|err| format!("`delivery` is invalid: {err}"))?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let check = |ok: bool, field: &str, rule: &str| {
            if ok {
                Ok(())
            } else {
                Err(format!("`delivery.{field}` must be {rule}"))
            }
        };
        check(
            (1..=10_000).contains(&self.batch_size),
            "batch_size",
            "between 1 and 10000",
        )?;
        check(
            self.linger_ms <= 600_000,
            "linger_ms",
            "at most 600000 (10 minutes)",
        )?;
        check(
            self.max_retry_seconds <= 7 * 24 * 3600,
            "max_retry_seconds",
            "at most 604800 (a week)",
        )?;
        check(
            (1..=3_600_000).contains(&self.retry_initial_backoff_ms),
            "retry_initial_backoff_ms",
            "between 1 and 3600000",
        )?;
        check(
            self.retry_max_backoff_ms >= self.retry_initial_backoff_ms
                && self.retry_max_backoff_ms <= 24 * 3_600_000,
            "retry_max_backoff_ms",
            "at least retry_initial_backoff_ms and at most 86400000 (a day)",
        )?;
        check(
            (1..=64).contains(&self.concurrency),
            "concurrency",
            "between 1 and 64",
        )?;
        check(
            self.max_batches_per_second
                .is_none_or(|rate| rate.is_finite() && rate > 0.0),
            "max_batches_per_second",
            "a positive number, or left out for no limit",
        )?;
        Ok(())
    }

    fn from_stored(text: &str) -> Self {
        serde_json::from_str(text).unwrap_or_default()
    }

    fn wants(&self, event: &str) -> bool {
        self.events.is_empty() || self.events.iter().any(|name| name == event)
    }
}

/// An event waiting in a destination's outbox, leased to one worker.
#[derive(Clone, Debug)]
pub struct OutboxRow {
    pub id: i64,
    pub event_uuid: String,
    /// `{uuid, event, distinct_id, person_id, timestamp, properties}`.
    pub payload: Value,
    pub attempts: i64,
    /// Epoch milliseconds of the first failed attempt.
    pub first_failed_at: Option<i64>,
}

/// What happened to a leased batch; written by [`Store::record_delivery`].
#[derive(Clone, Debug)]
pub enum Disposition {
    Delivered,
    /// Try again at this epoch millisecond.
    Retry {
        at: i64,
    },
    DeadLetter,
}

/// One export attempt as the API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct Attempt {
    pub at: String,
    pub events: i64,
    /// `delivered`, `retrying` or `dead_lettered`.
    pub outcome: String,
    /// Status of the plugin's last HTTP response, if it made a call.
    pub status_code: Option<i64>,
    pub latency_ms: i64,
    pub error: Option<String>,
}

/// The outcome of one export call, written in one transaction.
#[derive(Clone, Debug)]
pub struct DeliveryRecord {
    pub project_id: String,
    pub plugin_config_id: String,
    pub rows: Vec<OutboxRow>,
    pub disposition: Disposition,
    pub attempt: Attempt,
    pub logs: Vec<LogRecord>,
    /// Pause the destination with this reason.
    pub pause: Option<String>,
}

/// A destination's numbers for the API.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DestinationStats {
    /// Events delivered since the install was created.
    pub delivered: i64,
    /// Waiting for their first attempt.
    pub pending: i64,
    /// Failed at least once and waiting for another attempt.
    pub retrying: i64,
    /// In dead letters now, waiting for replay.
    pub dead_lettered: i64,
    /// Sent to dead letters since the install was created.
    pub dead_lettered_total: i64,
    pub failed_attempts: i64,
    pub consecutive_failures: i64,
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
    pub last_delivered_at: Option<String>,
}

/// Which dead letters to replay.
#[derive(Clone, Debug)]
pub enum ReplaySelector {
    Ids(Vec<i64>),
    PluginConfig(String),
    All,
}

/// Attempts kept per destination for the API.
const ATTEMPTS_KEPT: i64 = 1_000;

/// Values per multi-row insert: well under both backends' bind limits.
const ROWS_PER_INSERT: usize = 100;

/// A comma-separated list of ids, inlined: they are integers, and one
/// statement per batch is one round trip on PostgreSQL.
pub(super) fn id_list(ids: impl IntoIterator<Item = i64>) -> String {
    ids.into_iter()
        .map(|id| id.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// An event as an outbox row carries it, and as destinations receive it:
/// `{uuid, event, distinct_id, person_id, timestamp, properties}`,
/// serialised from the stored event without copying it.
#[derive(Serialize)]
struct OutboxPayload<'a> {
    uuid: &'a str,
    event: &'a str,
    distinct_id: &'a str,
    person_id: Option<&'a str>,
    timestamp: &'a str,
    properties: &'a serde_json::Map<String, Value>,
}

pub fn outbox_payload(event: &super::QueuedEvent, person_id: Option<&str>) -> String {
    serde_json::to_string(&OutboxPayload {
        uuid: &event.uuid,
        event: &event.event,
        distinct_id: &event.distinct_id,
        person_id,
        timestamp: &event.timestamp,
        properties: &event.properties,
    })
    .expect("events serialise")
}

/// A destination install that new events of a project are copied to.
pub(super) struct Route {
    plugin_config_id: String,
    settings: DeliverySettings,
}

impl Store {
    /// The enabled destination installs of a project, read inside the
    /// transaction that stores events, so an install created a moment ago
    /// gets every event stored after it.
    pub(super) async fn routes(
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        project_id: &str,
    ) -> Result<Vec<Route>> {
        let rows = sqlx::query(
            "SELECT c.id, c.delivery, p.manifest FROM plugin_configs c JOIN plugins p ON p.sha256 = c.plugin_sha256
             WHERE c.project_id = $1 AND c.enabled = 1 ORDER BY c.position, c.id",
        )
        .bind(project_id)
        .fetch_all(&mut **tx)
        .await?;
        Ok(rows
            .iter()
            .filter(|row| {
                serde_json::from_str::<Manifest>(&row.get::<String, _>("manifest"))
                    .is_ok_and(|manifest| manifest.has_hook(Hook::Export))
            })
            .map(|row| Route {
                plugin_config_id: row.get("id"),
                settings: DeliverySettings::from_stored(&row.get::<String, _>("delivery")),
            })
            .collect())
    }

    /// Copies newly stored events, each with the person it resolved to,
    /// into the outboxes of the destinations whose filter they match. An
    /// event's payload is made only when some destination wants it.
    pub(super) async fn fan_out(
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        backend: Backend,
        stored: &[(&str, &super::QueuedEvent, &str)],
    ) -> Result<()> {
        let mut routes: HashMap<&str, Vec<Route>> = HashMap::new();
        let mut rows: Vec<(&str, String, &str, String)> = Vec::new();
        for &(project_id, event, person_id) in stored {
            if !routes.contains_key(project_id) {
                let found = Self::routes(tx, project_id).await?;
                routes.insert(project_id, found);
            }
            let wanted: Vec<&Route> = routes[project_id]
                .iter()
                .filter(|route| route.settings.wants(&event.event))
                .collect();
            if wanted.is_empty() {
                continue;
            }
            let payload = outbox_payload(event, Some(person_id));
            for route in wanted {
                rows.push((
                    project_id,
                    route.plugin_config_id.clone(),
                    event.uuid.as_str(),
                    payload.clone(),
                ));
            }
        }
        let now = now_ms();
        for chunk in rows.chunks(ROWS_PER_INSERT) {
            let values = super::values_placeholders(backend, 1, chunk.len(), 5);
            let sql = format!(
                "INSERT INTO outbox (project_id, plugin_config_id, event_uuid, payload, created_at) VALUES {values}"
            );
            let mut query = sqlx::query(&sql);
            for (project_id, config_id, uuid, payload) in chunk {
                query = query
                    .bind(*project_id)
                    .bind(config_id.as_str())
                    .bind(*uuid)
                    .bind(payload.as_str())
                    .bind(now);
            }
            query.execute(&mut **tx).await?;
        }
        Ok(())
    }

    /// How many events of a destination with ids above `after` are ready
    /// now (up to `limit`), and when the oldest of them entered the
    /// outbox, in epoch milliseconds.
    pub async fn outbox_ready(
        &self,
        plugin_config_id: &str,
        after: i64,
        limit: u32,
    ) -> Result<(i64, i64)> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS ready, COALESCE(MIN(created_at), 0) AS oldest FROM (
                 SELECT created_at FROM outbox
                 WHERE plugin_config_id = $1 AND id > $2 AND next_attempt_at <= $3
                   AND (lease_until IS NULL OR lease_until < $3)
                 ORDER BY id LIMIT $4) ready_rows",
        )
        .bind(plugin_config_id)
        .bind(after)
        .bind(now_ms())
        .bind(limit as i64)
        .fetch_one(&self.pool)
        .await?;
        Ok((row.get("ready"), row.get("oldest")))
    }

    /// Leases up to `limit` ready events of one destination with ids above
    /// `after`, oldest first.
    ///
    /// A lane starts where its last claim ended rather than at the head of
    /// the outbox: on PostgreSQL the head of a churning outbox is a long
    /// run of index entries for rows already delivered and deleted, and
    /// walking them made each claim cost 30 to 80 ms. The lane goes back to
    /// 0 now and then for rows it passed (retries that came due, leases
    /// that ran out).
    ///
    /// On SQLite the claim takes its turn at the write lock with the other
    /// writers of the process, rather than retrying in SQLite's busy
    /// handler, and its commit need not survive power loss: a lost lease
    /// only lets the rows be claimed again.
    pub async fn claim_outbox(
        &self,
        plugin_config_id: &str,
        owner: &str,
        after: i64,
        limit: u32,
        lease: Duration,
    ) -> Result<Vec<OutboxRow>> {
        let now = now_ms();
        let lock = match self.backend() {
            Backend::Sqlite => "",
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
        };
        let sql = format!(
            "UPDATE outbox SET lease_owner = $1, lease_until = $2
             WHERE id IN (SELECT id FROM outbox
                          WHERE plugin_config_id = $3 AND id > $4 AND next_attempt_at <= $5
                            AND (lease_until IS NULL OR lease_until < $5)
                          ORDER BY id LIMIT $6{lock})
             RETURNING id, event_uuid, payload, attempts, first_failed_at"
        );
        let query = sqlx::query(&sql)
            .bind(owner)
            .bind(now + lease.as_millis() as i64)
            .bind(plugin_config_id)
            .bind(after)
            .bind(now)
            .bind(limit as i64);
        let rows = match self.backend() {
            Backend::Sqlite => {
                let (mut tx, _turn) = self.write_with(super::db::Commit::Redoable).await?;
                let rows = query.fetch_all(&mut *tx).await?;
                tx.commit().await?;
                rows
            }
            // One statement, one round trip: a transaction around it would
            // add three.
            Backend::Postgres => query.fetch_all(&self.pool).await?,
        };
        let mut claimed: Vec<OutboxRow> = rows
            .iter()
            .map(|row| OutboxRow {
                id: row.get("id"),
                event_uuid: row.get("event_uuid"),
                payload: serde_json::from_str(&row.get::<String, _>("payload"))
                    .unwrap_or(Value::Null),
                attempts: row.get("attempts"),
                first_failed_at: row.get("first_failed_at"),
            })
            .collect();
        claimed.sort_by_key(|row| row.id);
        Ok(claimed)
    }

    /// Keeps a lease alive while a slow export runs.
    pub async fn extend_outbox_lease(
        &self,
        owner: &str,
        ids: &[i64],
        lease: Duration,
    ) -> Result<()> {
        sqlx::query(&format!(
            "UPDATE outbox SET lease_until = $1 WHERE lease_owner = $2 AND id IN ({})",
            id_list(ids.iter().copied())
        ))
        .bind(now_ms() + lease.as_millis() as i64)
        .bind(owner)
        .execute(&self.pool)
        .await
        .map(|_| ())
    }

    /// Gives back every outbox lease `owner` holds, for a graceful stop.
    pub async fn release_outbox(&self, owner: &str) -> Result<()> {
        sqlx::query(
            "UPDATE outbox SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = $1",
        )
        .bind(owner)
        .execute(&self.pool)
        .await
        .map(|_| ())
    }

    /// Writes what an export attempt did, in one transaction. Only rows
    /// still leased to `owner` change: if the lease ran out and another
    /// worker took them, that worker's outcome counts.
    pub async fn record_delivery(&self, owner: &str, record: &DeliveryRecord) -> Result<()> {
        let now = now_rfc3339();
        let ids = id_list(record.rows.iter().map(|row| row.id));
        let (mut tx, _turn) = self.write().await?;
        let (delivered, dead) = match record.disposition {
            Disposition::Delivered => {
                let done = sqlx::query(&format!(
                    "DELETE FROM outbox WHERE lease_owner = $1 AND id IN ({ids})"
                ))
                .bind(owner)
                .execute(&mut *tx)
                .await?;
                (done.rows_affected() as i64, 0)
            }
            Disposition::Retry { at } => {
                sqlx::query(&format!(
                    "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = $1,
                         first_failed_at = COALESCE(first_failed_at, $2), last_error = $3,
                         lease_owner = NULL, lease_until = NULL
                     WHERE lease_owner = $4 AND id IN ({ids})"
                ))
                .bind(at)
                .bind(now_ms())
                .bind(&record.attempt.error)
                .bind(owner)
                .execute(&mut *tx)
                .await?;
                (0, 0)
            }
            Disposition::DeadLetter => {
                let removed: HashSet<i64> = sqlx::query_scalar(&format!(
                    "DELETE FROM outbox WHERE lease_owner = $1 AND id IN ({ids}) RETURNING id"
                ))
                .bind(owner)
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .collect();
                let error = record.attempt.error.as_deref().unwrap_or("delivery failed");
                let letters: Vec<&OutboxRow> = record
                    .rows
                    .iter()
                    .filter(|row| removed.contains(&row.id))
                    .collect();
                for chunk in letters.chunks(ROWS_PER_INSERT) {
                    insert_dead_letters(&mut tx, self.backend(), record, chunk, error, &now)
                        .await?;
                }
                (0, letters.len() as i64)
            }
        };
        let failed = !matches!(record.disposition, Disposition::Delivered);
        sqlx::query(
            "INSERT INTO destination_stats (plugin_config_id, delivered, dead_lettered, failed_attempts,
                 consecutive_failures, dead_batches_in_row, last_error, last_error_at, last_delivered_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (plugin_config_id) DO UPDATE SET
                 delivered = destination_stats.delivered + excluded.delivered,
                 dead_lettered = destination_stats.dead_lettered + excluded.dead_lettered,
                 failed_attempts = destination_stats.failed_attempts + excluded.failed_attempts,
                 consecutive_failures = CASE WHEN excluded.consecutive_failures = 0 THEN 0
                     ELSE destination_stats.consecutive_failures + 1 END,
                 dead_batches_in_row = CASE WHEN excluded.dead_batches_in_row = 0 THEN 0
                     ELSE destination_stats.dead_batches_in_row + 1 END,
                 last_error = COALESCE(excluded.last_error, destination_stats.last_error),
                 last_error_at = COALESCE(excluded.last_error_at, destination_stats.last_error_at),
                 last_delivered_at = COALESCE(excluded.last_delivered_at, destination_stats.last_delivered_at)",
        )
        .bind(&record.plugin_config_id)
        .bind(delivered)
        .bind(dead)
        .bind(failed as i64)
        .bind(failed as i64)
        .bind(matches!(record.disposition, Disposition::DeadLetter) as i64)
        .bind(record.attempt.error.as_deref())
        .bind(failed.then_some(now.as_str()))
        .bind((!failed).then_some(now.as_str()))
        .execute(&mut *tx)
        .await?;
        let attempt = &record.attempt;
        sqlx::query(
            "INSERT INTO delivery_attempts (plugin_config_id, at, events, outcome, status_code, latency_ms, error)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&record.plugin_config_id)
        .bind(&attempt.at)
        .bind(attempt.events)
        .bind(&attempt.outcome)
        .bind(attempt.status_code)
        .bind(attempt.latency_ms)
        .bind(attempt.error.as_deref())
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "DELETE FROM delivery_attempts WHERE plugin_config_id = $1 AND id <= (
                 SELECT id FROM delivery_attempts WHERE plugin_config_id = $1 ORDER BY id DESC LIMIT 1 OFFSET $2)",
        )
        .bind(&record.plugin_config_id)
        .bind(ATTEMPTS_KEPT)
        .execute(&mut *tx)
        .await?;
        insert_logs(
            &mut tx,
            self.backend(),
            &record.plugin_config_id,
            &record.logs,
        )
        .await?;
        if let Some(reason) = &record.pause {
            sqlx::query(
                "UPDATE plugin_configs SET paused_reason = $1, updated_at = $2 WHERE id = $3 AND paused_reason IS NULL",
            )
            .bind(reason)
            .bind(&now)
            .bind(&record.plugin_config_id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await
    }

    /// Batches dead-lettered in a row by a destination.
    pub async fn dead_batches_in_row(&self, plugin_config_id: &str) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT dead_batches_in_row FROM destination_stats WHERE plugin_config_id = $1",
        )
        .bind(plugin_config_id)
        .fetch_optional(&self.pool)
        .await?
        .unwrap_or(0))
    }

    /// Pauses (with a reason) or resumes a destination. Resuming clears the
    /// failure streaks that may have paused it and makes waiting retries due
    /// at once, since the operator says the cause is fixed.
    pub async fn set_paused(
        &self,
        project_id: &str,
        plugin_config_id: &str,
        reason: Option<&str>,
    ) -> Result<()> {
        let (mut tx, _turn) = self.write().await?;
        sqlx::query(
            "UPDATE plugin_configs SET paused_reason = $1, updated_at = $2 WHERE project_id = $3 AND id = $4",
        )
        .bind(reason)
        .bind(now_rfc3339())
        .bind(project_id)
        .bind(plugin_config_id)
        .execute(&mut *tx)
        .await?;
        if reason.is_none() {
            sqlx::query(
                "UPDATE destination_stats SET consecutive_failures = 0, dead_batches_in_row = 0 WHERE plugin_config_id = $1",
            )
            .bind(plugin_config_id)
            .execute(&mut *tx)
            .await?;
            sqlx::query("UPDATE outbox SET next_attempt_at = 0 WHERE plugin_config_id = $1")
                .bind(plugin_config_id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await
    }

    /// A destination's numbers.
    pub async fn destination_stats(&self, plugin_config_id: &str) -> Result<DestinationStats> {
        let mut stats = DestinationStats::default();
        let row = sqlx::query(
            "SELECT COALESCE(SUM(CASE WHEN attempts = 0 THEN 1 ELSE 0 END), 0) AS pending,
                    COALESCE(SUM(CASE WHEN attempts > 0 THEN 1 ELSE 0 END), 0) AS retrying
             FROM outbox WHERE plugin_config_id = $1",
        )
        .bind(plugin_config_id)
        .fetch_one(&self.pool)
        .await?;
        stats.pending = row.get("pending");
        stats.retrying = row.get("retrying");
        stats.dead_lettered = sqlx::query_scalar(
            "SELECT COUNT(*) FROM dead_letters WHERE plugin_config_id = $1 AND stage = 'delivery'",
        )
        .bind(plugin_config_id)
        .fetch_one(&self.pool)
        .await?;
        if let Some(row) = sqlx::query(
            "SELECT delivered, dead_lettered, failed_attempts, consecutive_failures, last_error, last_error_at,
                    last_delivered_at
             FROM destination_stats WHERE plugin_config_id = $1",
        )
        .bind(plugin_config_id)
        .fetch_optional(&self.pool)
        .await?
        {
            stats.delivered = row.get("delivered");
            stats.dead_lettered_total = row.get("dead_lettered");
            stats.failed_attempts = row.get("failed_attempts");
            stats.consecutive_failures = row.get("consecutive_failures");
            stats.last_error = row.get("last_error");
            stats.last_error_at = row.get("last_error_at");
            stats.last_delivered_at = row.get("last_delivered_at");
        }
        Ok(stats)
    }

    /// The newest export attempts of a destination, newest first.
    pub async fn delivery_attempts(
        &self,
        plugin_config_id: &str,
        limit: u32,
    ) -> Result<Vec<Attempt>> {
        let rows = sqlx::query(
            "SELECT at, events, outcome, status_code, latency_ms, error FROM delivery_attempts
             WHERE plugin_config_id = $1 ORDER BY id DESC LIMIT $2",
        )
        .bind(plugin_config_id)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|row| Attempt {
                at: row.get("at"),
                events: row.get("events"),
                outcome: row.get("outcome"),
                status_code: row.get("status_code"),
                latency_ms: row.get("latency_ms"),
                error: row.get("error"),
            })
            .collect())
    }

    /// Sends dead letters back where they failed, in one transaction:
    /// delivery letters to their destination's outbox, transformation
    /// letters to the capture queue to run through the chain again. Letters
    /// of a destination that no longer exists stay. Returns how many were
    /// replayed.
    pub async fn replay_dead_letters(
        &self,
        project_id: &str,
        selector: &ReplaySelector,
    ) -> Result<u64> {
        let mut sql = String::from(
            "SELECT d.id, d.plugin_config_id, d.event, d.stage FROM dead_letters d
             WHERE d.project_id = $1
               AND (d.stage <> 'delivery' OR EXISTS (SELECT 1 FROM plugin_configs c WHERE c.id = d.plugin_config_id))",
        );
        let mut config = None;
        match selector {
            ReplaySelector::Ids(ids) => {
                sql.push_str(&format!(" AND d.id IN ({})", id_list(ids.iter().copied())));
            }
            ReplaySelector::PluginConfig(id) => {
                sql.push_str(" AND d.plugin_config_id = $2");
                config = Some(id);
            }
            ReplaySelector::All => {}
        }
        sql.push_str(" ORDER BY d.id");
        if matches!(selector, ReplaySelector::Ids(ids) if ids.is_empty()) {
            return Ok(0);
        }
        let (mut tx, _turn) = self.write().await?;
        let mut query = sqlx::query(&sql).bind(project_id);
        if let Some(id) = config {
            query = query.bind(id);
        }
        let letters = query.fetch_all(&mut *tx).await?;
        let now_ms = now_ms();
        let now = now_rfc3339();
        for letter in &letters {
            let event: String = letter.get("event");
            let stage: String = letter.get("stage");
            if stage == "delivery" {
                let uuid = serde_json::from_str::<Value>(&event)
                    .ok()
                    .and_then(|v| v["uuid"].as_str().map(str::to_string))
                    .unwrap_or_default();
                sqlx::query(
                    "INSERT INTO outbox (project_id, plugin_config_id, event_uuid, payload, created_at) VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(project_id)
                .bind(letter.get::<String, _>("plugin_config_id"))
                .bind(uuid)
                .bind(&event)
                .bind(now_ms)
                .execute(&mut *tx)
                .await?;
            } else {
                let mut queued: Value = serde_json::from_str(&event).unwrap_or(Value::Null);
                if let Some(fields) = queued.as_object_mut() {
                    fields.insert("received_at".into(), Value::String(now.clone()));
                }
                sqlx::query(
                    "INSERT INTO capture_queue (project_id, payload, enqueued_at) VALUES ($1, $2, $3)",
                )
                .bind(project_id)
                .bind(queued.to_string())
                .bind(&now)
                .execute(&mut *tx)
                .await?;
            }
        }
        if !letters.is_empty() {
            sqlx::query(&format!(
                "DELETE FROM dead_letters WHERE id IN ({})",
                id_list(letters.iter().map(|row| row.get::<i64, _>("id")))
            ))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(letters.len() as u64)
    }

    /// Claims the run of `task` due at `fire_at`; true for exactly one
    /// caller across every process sharing the store.
    pub async fn claim_scheduled_run(
        &self,
        plugin_config_id: &str,
        task: &str,
        fire_at: &str,
        owner: &str,
    ) -> Result<bool> {
        let done = sqlx::query(
            "INSERT INTO scheduled_runs (plugin_config_id, task, fire_at, owner) VALUES ($1, $2, $3, $4)
             ON CONFLICT (plugin_config_id, task, fire_at) DO NOTHING",
        )
        .bind(plugin_config_id)
        .bind(task)
        .bind(fire_at)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Appends plugin log lines outside any other write.
    pub async fn append_plugin_logs(
        &self,
        plugin_config_id: &str,
        logs: &[LogRecord],
    ) -> Result<()> {
        if logs.is_empty() {
            return Ok(());
        }
        let (mut tx, _turn) = self.write().await?;
        insert_logs(&mut tx, self.backend(), plugin_config_id, logs).await?;
        tx.commit().await
    }
}

async fn insert_dead_letters(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    backend: Backend,
    record: &DeliveryRecord,
    rows: &[&OutboxRow],
    error: &str,
    now: &str,
) -> Result<()> {
    let values = super::values_placeholders(backend, 1, rows.len(), 7);
    let sql = format!(
        "INSERT INTO dead_letters (project_id, plugin_config_id, event, error, created_at, stage, event_uuid) VALUES {values}"
    );
    let mut query = sqlx::query(&sql);
    for row in rows {
        query = query
            .bind(record.project_id.as_str())
            .bind(record.plugin_config_id.as_str())
            .bind(row.payload.to_string())
            .bind(error)
            .bind(now)
            .bind("delivery")
            .bind(row.event_uuid.as_str());
    }
    query.execute(&mut **tx).await.map(|_| ())
}

pub(super) async fn insert_logs(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    backend: Backend,
    plugin_config_id: &str,
    logs: &[LogRecord],
) -> Result<()> {
    let rows: Vec<(&str, &LogRecord)> = logs.iter().map(|r| (plugin_config_id, r)).collect();
    insert_log_rows(tx, backend, &rows).await
}

/// Log lines of several plugin configs, as the pipeline collects them.
pub(super) async fn insert_config_logs(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    backend: Backend,
    logs: &[(String, LogRecord)],
) -> Result<()> {
    let rows: Vec<(&str, &LogRecord)> = logs.iter().map(|(id, r)| (id.as_str(), r)).collect();
    insert_log_rows(tx, backend, &rows).await
}

async fn insert_log_rows(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    backend: Backend,
    rows: &[(&str, &LogRecord)],
) -> Result<()> {
    for chunk in rows.chunks(ROWS_PER_INSERT) {
        let sql = format!(
            "INSERT INTO plugin_logs (plugin_config_id, at, level, message, event_uuid) VALUES {}",
            super::values_placeholders(backend, 1, chunk.len(), 5)
        );
        let mut query = sqlx::query(&sql);
        for (plugin_config_id, record) in chunk {
            query = query
                .bind(*plugin_config_id)
                .bind(record.at.as_str())
                .bind(
                    serde_json::to_value(record.level)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string)),
                )
                .bind(record.message.as_str())
                .bind(record.event_uuid.as_deref());
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}

/// Events a fail-closed transformation could not handle.
pub(super) async fn insert_transform_dead_letters(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    backend: Backend,
    letters: &[super::DeadLetter],
    now: &str,
) -> Result<()> {
    for chunk in letters.chunks(ROWS_PER_INSERT) {
        let sql = format!(
            "INSERT INTO dead_letters (project_id, plugin_config_id, event, error, created_at, stage, event_uuid) VALUES {}",
            super::values_placeholders(backend, 1, chunk.len(), 7)
        );
        let mut query = sqlx::query(&sql);
        for letter in chunk {
            query = query
                .bind(letter.project_id.as_str())
                .bind(letter.plugin_config_id.as_str())
                .bind(letter.event.to_string())
                .bind(letter.error.as_str())
                .bind(now)
                .bind("transform")
                .bind(letter.event["uuid"].as_str());
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}
