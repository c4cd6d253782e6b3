//! The durable capture queue: rows written before capture answers 200,
//! leased by workers, and deleted only in the transaction that stores what
//! the pipeline made of them.
//!
//! Everything here works on batches. Capture writes many requests in one
//! transaction (see `capture::commit`), a worker leases a batch with one
//! statement, and storing a batch (events, persons, outbox rows, the removal
//! from the queue) is one transaction with multi-row statements, so its cost
//! is a handful of round trips whatever the batch's size.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use sqlx::Row;

use super::db::Commit;
use super::{
    Backend, Claimed, ProcessedBatch, QueuedEvent, Result, Store, keyed_lookup, now_rfc3339,
    persons, values_placeholders,
};

/// Rows per multi-row statement. Events have eight columns: 250 rows are
/// 2,000 binds, far under both backends' limits.
const ROWS_PER_STATEMENT: usize = 250;

/// One capture request's events, serialised, ready for the queue.
#[derive(Clone, Debug)]
pub struct QueueWrite {
    pub project_id: String,
    pub payloads: Vec<String>,
}

impl QueueWrite {
    pub fn new(project_id: &str, events: &[QueuedEvent]) -> Self {
        QueueWrite {
            project_id: project_id.to_string(),
            payloads: events
                .iter()
                .map(|event| serde_json::to_string(event).expect("events serialise"))
                .collect(),
        }
    }
}

/// What a worker asks the queue for.
#[derive(Clone, Copy, Debug)]
pub struct Claim {
    pub limit: u32,
    /// How long the rows stay with the worker.
    pub lease: Duration,
    /// Only rows with a higher id. A worker starts where its last claim
    /// ended instead of at the head of the table: on PostgreSQL the head of
    /// a churning queue is a run of index entries for rows already
    /// deleted, and walking them made every claim cost tens of
    /// milliseconds. The worker goes back to 0 now and then to pick up
    /// rows it passed (expired leases, rows another process gave back,
    /// capture transactions that committed after a later one).
    pub after: i64,
}

/// How far the pipeline is behind capture.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStatus {
    /// Events accepted and not yet stored.
    pub depth: i64,
    /// When the oldest of them was accepted, in epoch milliseconds.
    pub oldest_enqueued_ms: Option<i64>,
}

impl Store {
    /// Writes accepted events to the queue in one transaction: all or none.
    pub async fn enqueue(&self, project_id: &str, events: &[QueuedEvent]) -> Result<()> {
        self.enqueue_requests(&[&QueueWrite::new(project_id, events)])
            .await
    }

    /// Writes several requests' events to the queue in one transaction and
    /// one commit (a group commit): all of them or none.
    pub async fn enqueue_requests(&self, requests: &[&QueueWrite]) -> Result<()> {
        let now = now_rfc3339();
        let rows: Vec<(&str, &str)> = requests
            .iter()
            .flat_map(|request| {
                request
                    .payloads
                    .iter()
                    .map(|payload| (request.project_id.as_str(), payload.as_str()))
            })
            .collect();
        let (mut tx, _turn) = self.write().await?;
        for chunk in rows.chunks(ROWS_PER_STATEMENT * 2) {
            let sql = format!(
                "INSERT INTO capture_queue (project_id, payload, enqueued_at) VALUES {}",
                values_placeholders(self.backend(), 1, chunk.len(), 3)
            );
            let mut query = sqlx::query(&sql);
            for (project_id, payload) in chunk {
                query = query.bind(*project_id).bind(*payload).bind(now.as_str());
            }
            query.execute(&mut *tx).await?;
        }
        tx.commit().await
    }

    pub async fn queue_depth(&self) -> Result<i64> {
        sqlx::query_scalar("SELECT COUNT(*) FROM capture_queue")
            .fetch_one(&self.pool)
            .await
    }

    /// The queue's depth and the age of its oldest row. Rows are taken in
    /// id order, so the lowest id is the oldest waiting event.
    pub async fn queue_status(&self) -> Result<QueueStatus> {
        let depth = self.queue_depth().await?;
        let oldest: Option<String> =
            sqlx::query_scalar("SELECT enqueued_at FROM capture_queue ORDER BY id LIMIT 1")
                .fetch_optional(&self.pool)
                .await?;
        Ok(QueueStatus {
            depth,
            oldest_enqueued_ms: oldest
                .and_then(|at| chrono::DateTime::parse_from_rfc3339(&at).ok())
                .map(|at| at.timestamp_millis()),
        })
    }

    /// Leases up to `claim.limit` ready rows to `owner`, on its own. On
    /// SQLite, whose leases live in memory (see `claim_in`), that is a
    /// read and needs no turn at the write lock.
    pub async fn claim(&self, owner: &str, claim: &Claim) -> Result<Vec<Claimed>> {
        match self.backend() {
            Backend::Sqlite => {
                let mut conn = self.pool.acquire().await?;
                let rows = self.claim_in(&mut conn, owner, claim).await?;
                drop(conn);
                parse_claimed(rows)
            }
            Backend::Postgres => {
                let mut tx = self.pool.begin().await?;
                let rows = self.claim_in(&mut tx, owner, claim).await?;
                tx.commit().await?;
                parse_claimed(rows)
            }
        }
    }

    /// Leases ready rows with ids above `claim.after`. Rows whose lease
    /// expired (their worker died) are ready again. The rows come back as
    /// stored: parsing them is for after the transaction (see
    /// [`parse_claimed`]).
    async fn claim_in(
        &self,
        conn: &mut sqlx::AnyConnection,
        owner: &str,
        claim: &Claim,
    ) -> Result<Vec<sqlx::any::AnyRow>> {
        let rows = match self.backend() {
            // One process owns a SQLite file (its write lock serialises
            // writers anyway), so the worker's lease lives in memory: it
            // reads past what it holds with `after`, and a restarted
            // process takes every row again at once. Writing a lease would
            // rewrite each row, payload and all, only to delete it a moment
            // later. Were a second process to take the same rows anyway,
            // storing is idempotent: events already stored are skipped,
            // with their person changes and outbox rows.
            Backend::Sqlite => {
                sqlx::query(
                    "SELECT id, project_id, payload FROM capture_queue WHERE id > $1 ORDER BY id LIMIT $2",
                )
                .bind(claim.after)
                .bind(claim.limit as i64)
                .fetch_all(&mut *conn)
                .await?
            }
            // Several processes share one PostgreSQL queue: each skips the
            // rows another is claiming instead of waiting for them, and a
            // dead process's rows come back when their lease runs out.
            Backend::Postgres => {
                let now = chrono::Utc::now().timestamp_millis();
                sqlx::query(
                    "UPDATE capture_queue SET lease_owner = $1, lease_until = $2, attempts = attempts + 1
                     WHERE id IN (SELECT id FROM capture_queue
                                  WHERE id > $3 AND (lease_until IS NULL OR lease_until < $4)
                                  ORDER BY id LIMIT $5 FOR UPDATE SKIP LOCKED)
                     RETURNING id, project_id, payload",
                )
                .bind(owner)
                .bind(now + claim.lease.as_millis() as i64)
                .bind(claim.after)
                .bind(now)
                .bind(claim.limit as i64)
                .fetch_all(&mut *conn)
                .await?
            }
        };
        Ok(rows)
    }

    /// Stores the events made from claimed rows, applying their person
    /// changes in order, writes their outbox rows, and removes the claimed
    /// rows, in one transaction; with `next`, the same transaction leases
    /// the next batch, which saves the worker a transaction (on SQLite, a
    /// turn at the write lock) per batch. An event already stored under its
    /// (project, uuid) is left as it is, so a replay stores nothing twice.
    pub async fn complete(
        &self,
        owner: &str,
        ids: &[i64],
        batch: &ProcessedBatch,
        next: Option<&Claim>,
    ) -> Result<Vec<Claimed>> {
        // Everything that needs no database is done before the write lock
        // is taken, or after it is given back: on SQLite every capture
        // commit waits for this transaction, and serialising 500 events'
        // properties inside it, or parsing the next 500, held them up.
        let properties: Vec<String> = batch
            .events
            .iter()
            .map(|(_, event)| {
                serde_json::to_string(&event.properties).expect("properties serialise")
            })
            .collect();
        let (mut tx, turn) = self.write_with(Commit::Redoable).await?;
        let now = now_rfc3339();
        let backend = self.backend();
        if backend == Backend::Postgres {
            // The statements below look rows up by long key lists (see
            // `keyed_lookup`). A plan cached while a table was still small
            // keeps reading every row of the project and comparing it with
            // each key: 1.5 s per batch once `events` held 100,000 rows,
            // until the next ANALYZE. Planning each statement for its
            // values costs well under a millisecond and follows the table
            // as it grows.
            sqlx::query("SET LOCAL plan_cache_mode = force_custom_plan")
                .execute(&mut *tx)
                .await?;
        }
        super::delivery::insert_transform_dead_letters(&mut tx, backend, &batch.dead_letters, &now)
            .await?;
        super::delivery::insert_config_logs(&mut tx, backend, &batch.logs).await?;
        for health in &batch.health {
            sqlx::query(
                "UPDATE plugin_configs SET consecutive_failures = $1,
                     enabled = CASE WHEN $2 IS NULL THEN enabled ELSE 0 END,
                     disabled_reason = COALESCE($3, disabled_reason),
                     updated_at = CASE WHEN $4 IS NULL THEN updated_at ELSE $5 END
                 WHERE id = $6",
            )
            .bind(health.consecutive_failures)
            .bind(&health.disabled_reason)
            .bind(&health.disabled_reason)
            .bind(&health.disabled_reason)
            .bind(&now)
            .bind(&health.plugin_config_id)
            .execute(&mut *tx)
            .await?;
        }

        let fresh_indexes = Self::unstored(&mut tx, backend, &batch.events).await?;
        let fresh: Vec<(&str, &QueuedEvent)> = fresh_indexes
            .iter()
            .map(|&i| (batch.events[i].0.as_str(), &batch.events[i].1))
            .collect();
        let person_ids = persons::resolve(&mut tx, backend, &fresh).await?;
        let rows: Vec<(&str, &QueuedEvent, &str, &str)> = fresh
            .iter()
            .zip(&fresh_indexes)
            .zip(&person_ids)
            .map(|(((project_id, event), &i), person_id)| {
                (
                    *project_id,
                    *event,
                    person_id.as_str(),
                    properties[i].as_str(),
                )
            })
            .collect();
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "INSERT INTO events (project_id, uuid, event, distinct_id, person_id, timestamp, received_at, properties) VALUES {}",
                values_placeholders(self.backend(), 1, chunk.len(), 8)
            );
            let mut query = sqlx::query(&sql);
            for (project_id, event, person_id, properties) in chunk {
                query = query
                    .bind(*project_id)
                    .bind(event.uuid.as_str())
                    .bind(event.event.as_str())
                    .bind(event.distinct_id.as_str())
                    .bind(*person_id)
                    .bind(event.timestamp.as_str())
                    .bind(event.received_at.as_str())
                    .bind(*properties);
            }
            query.execute(&mut *tx).await?;
        }
        let stored: Vec<(&str, &QueuedEvent, &str)> = fresh
            .iter()
            .zip(&person_ids)
            .map(|((project_id, event), person_id)| (*project_id, *event, person_id.as_str()))
            .collect();
        Self::fan_out(&mut tx, backend, &stored).await?;
        Self::delete_claimed(&mut tx, backend, owner, ids).await?;
        let claimed = match next {
            Some(claim) => self.claim_in(&mut tx, owner, claim).await?,
            None => Vec::new(),
        };
        tx.commit().await?;
        drop(turn);
        parse_claimed(claimed)
    }

    /// The indexes of the events of a batch that are not stored yet, in
    /// order, each (project, uuid) once: a client may send an event twice
    /// in one batch, and a replayed event may already be stored.
    async fn unstored(
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        backend: Backend,
        events: &[(String, QueuedEvent)],
    ) -> Result<Vec<usize>> {
        let mut by_project: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (project_id, event) in events {
            by_project.entry(project_id).or_default().push(&event.uuid);
        }
        let mut seen: HashSet<(String, String)> = HashSet::new();
        for (project_id, uuids) in by_project {
            for chunk in uuids.chunks(ROWS_PER_STATEMENT * 2) {
                let sql = keyed_lookup(backend, "t.uuid", "events", "uuid", chunk.len());
                let mut query = sqlx::query_scalar::<_, String>(&sql).bind(project_id);
                for uuid in chunk {
                    query = query.bind(*uuid);
                }
                for uuid in query.fetch_all(&mut **tx).await? {
                    seen.insert((project_id.to_string(), uuid));
                }
            }
        }
        Ok(events
            .iter()
            .enumerate()
            .filter(|(_, (project_id, event))| {
                seen.insert((project_id.clone(), event.uuid.clone()))
            })
            .map(|(i, _)| i)
            .collect())
    }

    async fn delete_claimed(
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        backend: Backend,
        owner: &str,
        ids: &[i64],
    ) -> Result<()> {
        // One statement per chunk, not per row: on PostgreSQL each statement
        // is a round trip. The ids are integers, so inlining them is safe.
        // On PostgreSQL only rows still leased to `owner` go: if the lease
        // ran out and another worker took them, that worker removes them.
        for chunk in ids.chunks(1_000) {
            let list = super::delivery::id_list(chunk.iter().copied());
            match backend {
                Backend::Sqlite => {
                    sqlx::query(&format!("DELETE FROM capture_queue WHERE id IN ({list})"))
                        .execute(&mut **tx)
                        .await?
                }
                Backend::Postgres => {
                    sqlx::query(&format!(
                        "DELETE FROM capture_queue WHERE lease_owner = $1 AND id IN ({list})"
                    ))
                    .bind(owner)
                    .execute(&mut **tx)
                    .await?
                }
            };
        }
        Ok(())
    }

    /// Gives back the rows `owner` holds, for a graceful shutdown.
    pub async fn release(&self, owner: &str) -> Result<()> {
        sqlx::query(
            "UPDATE capture_queue SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = $1",
        )
        .bind(owner)
        .execute(&self.pool)
        .await
        .map(|_| ())
    }

    /// Gives back some claimed rows at once, after a batch failed to store,
    /// so the next attempt need not wait for the lease to run out.
    pub async fn release_rows(&self, owner: &str, ids: &[i64]) -> Result<()> {
        for chunk in ids.chunks(1_000) {
            let list = super::delivery::id_list(chunk.iter().copied());
            sqlx::query(&format!(
                "UPDATE capture_queue SET lease_owner = NULL, lease_until = NULL
                 WHERE lease_owner = $1 AND id IN ({list})"
            ))
            .bind(owner)
            .execute(&self.pool)
            .await?;
        }
        Ok(())
    }
}

/// Parses leased queue rows into events, in id order.
fn parse_claimed(rows: Vec<sqlx::any::AnyRow>) -> Result<Vec<Claimed>> {
    let mut claimed = Vec::with_capacity(rows.len());
    for row in rows {
        let payload: String = row.get("payload");
        let event: QueuedEvent = serde_json::from_str(&payload).map_err(|err| {
            sqlx::Error::Decode(format!("queue row holds a malformed event: {err}").into())
        })?;
        claimed.push(Claimed {
            id: row.get("id"),
            project_id: row.get("project_id"),
            event,
        });
    }
    claimed.sort_by_key(|c| c.id);
    Ok(claimed)
}
