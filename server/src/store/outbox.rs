//! The delivery aggregate: the `outbox` (per-destination queues of events,
//! filled in the transaction that stores them and leased in batches),
//! `delivery_attempts` (the newest attempts, for the API) and
//! `destination_stats` (running totals and failure streaks). The outcome
//! of an export call changes all three in one transaction
//! ([`Store::record_delivery`]), so they live together; that transaction
//! also writes the batch's dead letters, logs and pause through their
//! tables' files. Pausing and resuming a destination lives here too:
//! resuming clears the streaks and makes waiting retries due.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use sqlx::Row;

use super::db::Commit;
use super::plugin_configs::Route;
use super::sql::{ROWS_PER_INSERT, corrupt, id_list, release_leases, values_placeholders};
use super::{
    Backend, QueuedEvent, Result, Store, dead_letters, now_ms, now_rfc3339, plugin_configs,
    plugin_logs,
};
use crate::model::{AttemptOutcome, LogRecord};

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
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct Attempt {
    pub at: String,
    pub events: i64,
    pub outcome: AttemptOutcome,
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
#[derive(Clone, Debug, Default, Serialize, utoipa::ToSchema)]
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

/// Attempts kept per destination for the API.
const ATTEMPTS_KEPT: i64 = 1_000;

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

fn outbox_payload(event: &QueuedEvent, person_id: Option<&str>) -> String {
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

impl Store {
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
    ///
    /// Rows are leased only while the install is still the one the lane
    /// started with (`install_version` is its `updated_at`), enabled and
    /// not paused, checked in the same statement: once a pause or a new
    /// config is committed, no lane leases another batch under the old
    /// one.
    pub async fn claim_outbox(
        &self,
        plugin_config_id: &str,
        install_version: &str,
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
               AND EXISTS (SELECT 1 FROM plugin_configs c
                           WHERE c.id = $3 AND c.updated_at = $7 AND c.enabled = 1
                             AND c.paused_reason IS NULL)
             RETURNING id, event_uuid, payload, attempts, first_failed_at"
        );
        let query = sqlx::query(&sql)
            .bind(owner)
            .bind(now + lease.as_millis() as i64)
            .bind(plugin_config_id)
            .bind(after)
            .bind(now)
            .bind(limit as i64)
            .bind(install_version);
        let rows = match self.backend() {
            Backend::Sqlite => {
                let (mut tx, _turn) = self.write_with(Commit::Redoable).await?;
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
            .map(|row| {
                let id: i64 = row.get("id");
                Ok(OutboxRow {
                    id,
                    event_uuid: row.get("event_uuid"),
                    payload: serde_json::from_str(&row.get::<String, _>("payload"))
                        .map_err(|err| corrupt("payload", &format!("outbox row {id}"), err))?,
                    attempts: row.get("attempts"),
                    first_failed_at: row.get("first_failed_at"),
                })
            })
            .collect::<Result<_>>()?;
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
        .map_err(Into::into)
    }

    /// Gives back every outbox lease `owner` holds, for a graceful stop.
    pub async fn release_outbox(&self, owner: &str) -> Result<()> {
        release_leases(&self.pool, "outbox", owner, None).await
    }

    /// Writes what an export attempt did, in one transaction. Only rows
    /// still leased to `owner` change: if the lease ran out and another
    /// worker took them, that worker's outcome counts.
    pub async fn record_delivery(&self, owner: &str, record: &DeliveryRecord) -> Result<()> {
        let now = now_rfc3339();
        let ids = id_list(record.rows.iter().map(|row| row.id));
        let error = record
            .attempt
            .error
            .as_deref()
            .map(|error| self.scrub(&record.plugin_config_id, error));
        let error = error.as_deref();
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
                .bind(error)
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
                let error = error.unwrap_or("delivery failed");
                let letters: Vec<&OutboxRow> = record
                    .rows
                    .iter()
                    .filter(|row| removed.contains(&row.id))
                    .collect();
                dead_letters::insert_delivery(
                    &mut tx,
                    self.backend(),
                    &self.secrets,
                    record,
                    &letters,
                    error,
                    &now,
                )
                .await?;
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
        .bind(error)
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
        .bind(attempt.outcome.as_str())
        .bind(attempt.status_code)
        .bind(attempt.latency_ms)
        .bind(error)
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
        plugin_logs::insert_logs(
            &mut tx,
            self.backend(),
            &self.secrets,
            &record.plugin_config_id,
            &record.logs,
        )
        .await?;
        if let Some(reason) = &record.pause {
            let reason = self.scrub(&record.plugin_config_id, reason);
            plugin_configs::pause(&mut tx, &record.plugin_config_id, &reason, &now).await?;
        }
        tx.commit().await.map_err(Into::into)
    }

    /// Events waiting in each destination's outbox, retries included, by
    /// plugin config id: one pass over `outbox_by_destination`. A
    /// destination with an empty outbox is not listed.
    pub async fn outbox_depths(&self) -> Result<HashMap<String, i64>> {
        let rows = sqlx::query(
            "SELECT plugin_config_id, COUNT(*) AS depth FROM outbox GROUP BY plugin_config_id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|row| (row.get("plugin_config_id"), row.get("depth")))
            .collect())
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
        let reason = reason.map(|reason| self.scrub(plugin_config_id, reason));
        let (mut tx, _turn) = self.write().await?;
        plugin_configs::set_paused_reason(&mut tx, project_id, plugin_config_id, reason.as_deref())
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
        tx.commit().await.map_err(Into::into)
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
        stats.dead_lettered = self.delivery_dead_letters(plugin_config_id).await?;
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
        rows.iter()
            .map(|row| {
                let outcome: String = row.get("outcome");
                Ok(Attempt {
                    at: row.get("at"),
                    events: row.get("events"),
                    outcome: outcome.parse().map_err(|err| {
                        corrupt("outcome", &format!("an attempt of {plugin_config_id}"), err)
                    })?,
                    status_code: row.get("status_code"),
                    latency_ms: row.get("latency_ms"),
                    error: row.get("error"),
                })
            })
            .collect()
    }
}

/// Copies newly stored events, each with the person it resolved to,
/// into the outboxes of the destinations whose filter they match. An
/// event's payload is made only when some destination wants it.
pub(super) async fn fan_out(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    backend: Backend,
    stored: &[(&str, &QueuedEvent, &str)],
) -> Result<()> {
    let mut routes: HashMap<&str, Vec<Route>> = HashMap::new();
    let mut rows: Vec<(&str, String, &str, String)> = Vec::new();
    for &(project_id, event, person_id) in stored {
        if !routes.contains_key(project_id) {
            let found = plugin_configs::routes(tx, project_id).await?;
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
    let rows: Vec<(&str, &str, &str, &str)> = rows
        .iter()
        .map(|(project_id, config_id, uuid, payload)| {
            (*project_id, config_id.as_str(), *uuid, payload.as_str())
        })
        .collect();
    insert(tx, backend, &rows, now_ms()).await
}

/// Appends `(project_id, plugin_config_id, event_uuid, payload)` rows to
/// the outbox, due at once, with multi-row statements.
pub(super) async fn insert(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    backend: Backend,
    rows: &[(&str, &str, &str, &str)],
    created_at: i64,
) -> Result<()> {
    for chunk in rows.chunks(ROWS_PER_INSERT) {
        let values = values_placeholders(backend, 1, chunk.len(), 5);
        let sql = format!(
            "INSERT INTO outbox (project_id, plugin_config_id, event_uuid, payload, created_at) VALUES {values}"
        );
        let mut query = sqlx::query(&sql);
        for (project_id, config_id, uuid, payload) in chunk {
            query = query
                .bind(*project_id)
                .bind(*config_id)
                .bind(*uuid)
                .bind(*payload)
                .bind(created_at);
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}
