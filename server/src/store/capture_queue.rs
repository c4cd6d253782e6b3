//! The `capture_queue` table, the durable capture queue: rows written
//! before capture answers 200, leased by workers, and deleted only in the
//! transaction that stores what the pipeline made of them (see `batch`).
//!
//! Everything here works on batches. Capture writes many requests in one
//! transaction (see `capture::commit`), a worker leases a batch with one
//! statement, and the rows of a stored batch go with one statement per
//! thousand, so the queue's cost is a handful of round trips whatever the
//! batch's size. Leases differ by backend: in memory on SQLite, in the
//! rows on PostgreSQL (see `claim_in`).

use std::collections::HashMap;
use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value};
use sqlx::Row;

use super::sql::{id_list, release_leases, values_placeholders};
use super::{Backend, Result, Store, now_rfc3339};

/// Rows per multi-row insert: three columns each, so 1,500 binds, far
/// under both backends' limits.
const ROWS_PER_STATEMENT: usize = 500;

/// How long a claimed queue row stays with a worker before another may take
/// it, by default: long enough for a slow plugin chain, short enough that a
/// killed worker's events move on quickly.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

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

/// Projects whose rows one claim takes at most; with more projects
/// waiting, the next claim starts where this one stopped.
pub const MAX_SLICES: usize = 32;

/// What a worker asks the queue for.
#[derive(Clone, Debug, Default)]
pub struct Claim {
    pub limit: u32,
    /// How long the rows stay with the worker.
    pub lease: Duration,
    /// Per project, only rows with a higher id. A worker starts where its
    /// last claim ended instead of at the head of the table: on PostgreSQL
    /// the head of a churning queue is a run of index entries for rows
    /// already deleted, and walking them made every claim cost tens of
    /// milliseconds. The worker forgets these now and then to pick up rows
    /// it passed (expired leases, rows another process gave back, capture
    /// transactions that committed after a later one).
    pub after: HashMap<String, i64>,
    /// Projects after this one (in id order) come first; see [`MAX_SLICES`].
    pub from_project: String,
    /// The most rows of a project one claim takes, for projects whose
    /// chains are slow: the worker sizes each project's slice so that it
    /// costs about the same time, not the same number of events.
    pub most: HashMap<String, u32>,
}

impl Claim {
    fn after(&self, project_id: &str) -> i64 {
        self.after.get(project_id).copied().unwrap_or(0)
    }

    /// How many of `project_id`'s rows to take when each project's even
    /// share is `even`; 0 leaves the project out of the claim.
    fn slice(&self, project_id: &str, even: i64) -> i64 {
        self.most
            .get(project_id)
            .map_or(even, |most| even.min(i64::from(*most)))
    }
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
        insert(&mut tx, self.backend(), &rows, &now).await?;
        tx.commit().await.map_err(Into::into)
    }

    pub async fn queue_depth(&self) -> Result<i64> {
        sqlx::query_scalar("SELECT COUNT(*) FROM capture_queue")
            .fetch_one(&self.pool)
            .await
            .map_err(Into::into)
    }

    /// How many of a project's events wait in the queue, claimed or not:
    /// a range of `capture_queue_by_project`.
    pub async fn project_queue_depth(&self, project_id: &str) -> Result<i64> {
        sqlx::query_scalar("SELECT COUNT(*) FROM capture_queue WHERE project_id = $1")
            .bind(project_id)
            .fetch_one(&self.pool)
            .await
            .map_err(Into::into)
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

    /// Each project's part of the queue: its depth, and when its oldest
    /// row was accepted. The counts come from one pass over
    /// `capture_queue_by_project` (project, id), and each project's oldest
    /// row is one seek by its lowest id; a project with nothing queued is
    /// not listed.
    pub async fn queue_status_by_project(&self) -> Result<Vec<(String, QueueStatus)>> {
        let rows = sqlx::query(
            "SELECT q.project_id, q.depth, c.enqueued_at
             FROM (SELECT project_id, COUNT(*) AS depth, MIN(id) AS first
                   FROM capture_queue GROUP BY project_id) q
             JOIN capture_queue c ON c.id = q.first",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|row| {
                let enqueued_at: String = row.get("enqueued_at");
                let status = QueueStatus {
                    depth: row.get("depth"),
                    oldest_enqueued_ms: chrono::DateTime::parse_from_rfc3339(&enqueued_at)
                        .ok()
                        .map(|at| at.timestamp_millis()),
                };
                (row.get("project_id"), status)
            })
            .collect())
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

    /// Leases ready rows with ids above `claim.after`, an equal slice of
    /// each project's: a project with a backlog of a million events delays
    /// another's next event by one batch, not by the million. Rows whose
    /// lease expired (their worker died) are ready again. The rows come
    /// back as stored: parsing them is for after the transaction (see
    /// [`parse_claimed`]).
    pub(super) async fn claim_in(
        &self,
        conn: &mut sqlx::AnyConnection,
        owner: &str,
        claim: &Claim,
    ) -> Result<Vec<sqlx::any::AnyRow>> {
        let mut projects = waiting_projects(conn, &claim.from_project, MAX_SLICES).await?;
        if projects.len() < MAX_SLICES && !claim.from_project.is_empty() {
            for project in waiting_projects(conn, "", MAX_SLICES - projects.len()).await? {
                if project > claim.from_project || projects.contains(&project) {
                    break;
                }
                projects.push(project);
            }
        }
        projects.retain(|project| claim.slice(project, 1) > 0);
        if projects.is_empty() {
            return Ok(Vec::new());
        }
        let shares = share_out(claim, &projects);
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
                let slices: Vec<String> = (0..projects.len())
                    .map(|i| {
                        format!(
                            "SELECT * FROM (SELECT id, project_id, payload FROM capture_queue
                             WHERE project_id = ${} AND id > ${} ORDER BY id LIMIT ${})",
                            3 * i + 1,
                            3 * i + 2,
                            3 * i + 3
                        )
                    })
                    .collect();
                let sql = slices.join(" UNION ALL ");
                bind_slices(sqlx::query(&sql), &projects, &shares)
                    .fetch_all(&mut *conn)
                    .await?
            }
            // Several processes share one PostgreSQL queue: each skips the
            // rows another is claiming instead of waiting for them, and a
            // dead process's rows come back when their lease runs out.
            Backend::Postgres => {
                let now = chrono::Utc::now().timestamp_millis();
                let slices: Vec<String> = (0..projects.len())
                    .map(|i| {
                        format!(
                            "s{i} AS (SELECT id FROM capture_queue
                                      WHERE project_id = ${} AND id > ${} AND (lease_until IS NULL OR lease_until < $3)
                                      ORDER BY id LIMIT ${} FOR UPDATE SKIP LOCKED)",
                            3 * i + 4,
                            3 * i + 5,
                            3 * i + 6
                        )
                    })
                    .collect();
                let picked: Vec<String> = (0..projects.len())
                    .map(|i| format!("SELECT id FROM s{i}"))
                    .collect();
                let sql = format!(
                    "WITH {} UPDATE capture_queue SET lease_owner = $1, lease_until = $2, attempts = attempts + 1
                     WHERE id IN ({})
                     RETURNING id, project_id, payload",
                    slices.join(", "),
                    picked.join(" UNION ALL ")
                );
                let query = sqlx::query(&sql)
                    .bind(owner)
                    .bind(now + claim.lease.as_millis() as i64)
                    .bind(now);
                bind_slices(query, &projects, &shares)
                    .fetch_all(&mut *conn)
                    .await?
            }
        };
        Ok(rows)
    }

    /// Queued rows by id, as a claim returns them: for rows a worker holds
    /// and must look at again.
    pub async fn queued_rows(&self, ids: &[i64]) -> Result<Vec<Claimed>> {
        let mut rows = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(1_000) {
            let list = id_list(chunk.iter().copied());
            rows.extend(
                sqlx::query(&format!(
                    "SELECT id, project_id, payload FROM capture_queue WHERE id IN ({list})"
                ))
                .fetch_all(&self.pool)
                .await?,
            );
        }
        parse_claimed(rows)
    }

    /// Gives back the rows `owner` holds, for a graceful shutdown.
    pub async fn release(&self, owner: &str) -> Result<()> {
        release_leases(&self.pool, "capture_queue", owner, None).await
    }

    /// Gives back some claimed rows at once, after a batch failed to store,
    /// so the next attempt need not wait for the lease to run out.
    pub async fn release_rows(&self, owner: &str, ids: &[i64]) -> Result<()> {
        release_leases(&self.pool, "capture_queue", owner, Some(ids)).await
    }
}

/// Appends `(project_id, payload)` rows to the queue, in order, with
/// multi-row statements.
pub(super) async fn insert(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    backend: Backend,
    rows: &[(&str, &str)],
    enqueued_at: &str,
) -> Result<()> {
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "INSERT INTO capture_queue (project_id, payload, enqueued_at) VALUES {}",
            values_placeholders(backend, 1, chunk.len(), 3)
        );
        let mut query = sqlx::query(&sql);
        for (project_id, payload) in chunk {
            query = query.bind(*project_id).bind(*payload).bind(enqueued_at);
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}

/// Removes the rows of a stored batch.
pub(super) async fn delete_claimed(
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
        let list = id_list(chunk.iter().copied());
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

type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;

/// Binds each project's slice of a claim: the project, the id its rows
/// start after, and how many of them.
fn bind_slices<'q>(
    mut query: AnyQuery<'q>,
    projects: &'q [String],
    slices: &[(i64, i64)],
) -> AnyQuery<'q> {
    for (project, (after, rows)) in projects.iter().zip(slices) {
        query = query.bind(project.as_str()).bind(*after).bind(*rows);
    }
    query
}

/// Each project's (after, rows) in a claim: the claim's rows shared out
/// evenly, except that a project capped below its even share (see
/// [`Claim::most`]) leaves the rest to the others, so a slow project
/// taking one row does not halve what the fast ones may take.
fn share_out(claim: &Claim, projects: &[String]) -> Vec<(i64, i64)> {
    let limit = i64::from(claim.limit);
    let cap = |project: &String| claim.slice(project, limit);
    let mut order: Vec<usize> = (0..projects.len()).collect();
    order.sort_by_key(|i| cap(&projects[*i]));
    let mut rows = vec![0; projects.len()];
    let mut left = limit;
    for (taken, i) in order.iter().enumerate() {
        let open = (projects.len() - taken) as i64;
        let share = (left + open - 1) / open;
        rows[*i] = cap(&projects[*i]).min(share);
        left -= rows[*i];
    }
    projects
        .iter()
        .zip(rows)
        .map(|(project, rows)| (claim.after(project), rows))
        .collect()
}

/// Up to `limit` projects with queued rows, in id order, after `after`:
/// one index seek each on `capture_queue_by_project`, however many rows
/// each project has queued.
async fn waiting_projects(
    conn: &mut sqlx::AnyConnection,
    after: &str,
    limit: usize,
) -> Result<Vec<String>> {
    sqlx::query_scalar(
        "WITH RECURSIVE p(project_id, n) AS (
             SELECT (SELECT MIN(project_id) FROM capture_queue WHERE project_id > $1), 1
             UNION ALL
             SELECT (SELECT MIN(project_id) FROM capture_queue WHERE project_id > p.project_id), n + 1
             FROM p WHERE p.project_id IS NOT NULL AND n < $2
         )
         SELECT project_id FROM p WHERE project_id IS NOT NULL",
    )
    .bind(after)
    .bind(limit as i64)
    .fetch_all(&mut *conn)
    .await
    .map_err(Into::into)
}

/// Parses leased queue rows into events, in id order.
pub(super) fn parse_claimed(rows: Vec<sqlx::any::AnyRow>) -> Result<Vec<Claimed>> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capped_project_leaves_the_rest_of_the_claim_to_the_others() {
        let claim = Claim {
            limit: 500,
            most: HashMap::from([("slow".to_string(), 1), ("middling".to_string(), 100)]),
            after: HashMap::from([("fast".to_string(), 42)]),
            ..Claim::default()
        };
        let projects: Vec<String> = ["fast", "slow", "middling", "other"]
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(
            share_out(&claim, &projects),
            vec![(42, 200), (0, 1), (0, 100), (0, 199)]
        );
        let even = Claim {
            limit: 500,
            ..Claim::default()
        };
        assert_eq!(share_out(&even, &projects[..2]), vec![(0, 250), (0, 250)]);
    }
}
