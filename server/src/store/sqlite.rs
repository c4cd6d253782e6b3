//! The embedded SQLite store: one file under the data dir, WAL mode,
//! `synchronous = FULL` so a committed capture survives a crash or power loss.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row};

use super::persons;
use super::{
    Claimed, CreatedProject, EventFilter, Person, ProcessedBatch, QueuedEvent, Result, StoredEvent,
    hash_key, now_rfc3339, random_token,
};

#[derive(Clone)]
pub struct SqliteStore {
    pub(super) pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if needed) `data_dir/sluice.db` and runs migrations.
    pub async fn open(data_dir: &Path) -> anyhow::Result<SqliteStore> {
        std::fs::create_dir_all(data_dir).map_err(|err| {
            anyhow::anyhow!(
                "failed to create the data dir {}: {err}",
                data_dir.display()
            )
        })?;
        let path = data_dir.join("sluice.db");
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            // A second process (`sluice project create`) may hold the write
            // lock for a moment.
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(|err| anyhow::anyhow!("failed to open {}: {err}", path.display()))?;
        sqlx::migrate!("../migrations/sqlite")
            .run(&pool)
            .await
            .map_err(|err| anyhow::anyhow!("failed to migrate {}: {err}", path.display()))?;
        Ok(SqliteStore { pool })
    }

    /// A write transaction that takes SQLite's write lock at once. A
    /// deferred one that reads first cannot upgrade after another writer
    /// committed, and would fail with "database is locked".
    pub(super) async fn write(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>> {
        self.pool.begin_with("BEGIN IMMEDIATE").await
    }

    pub async fn create_project(&self, name: &str) -> Result<CreatedProject> {
        let created = CreatedProject {
            project_id: uuid::Uuid::now_v7().to_string(),
            capture_token: random_token("phc_"),
            api_key: random_token("phx_"),
        };
        let now = now_rfc3339();
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO projects (id, name, capture_token, created_at) VALUES (?, ?, ?, ?)",
        )
        .bind(&created.project_id)
        .bind(name)
        .bind(&created.capture_token)
        .bind(&now)
        .execute(&mut *tx)
        .await?;
        sqlx::query("INSERT INTO api_keys (id, project_id, key_hash, scope, created_at) VALUES (?, ?, ?, 'write', ?)")
            .bind(uuid::Uuid::now_v7().to_string())
            .bind(&created.project_id)
            .bind(hash_key(&created.api_key))
            .bind(&now)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(created)
    }

    /// The project a capture token belongs to.
    pub async fn project_for_token(&self, token: &str) -> Result<Option<String>> {
        sqlx::query_scalar("SELECT id FROM projects WHERE capture_token = ?")
            .bind(token)
            .fetch_optional(&self.pool)
            .await
    }

    /// The project a personal API key belongs to.
    pub async fn project_for_key(&self, key: &str) -> Result<Option<String>> {
        sqlx::query_scalar("SELECT project_id FROM api_keys WHERE key_hash = ?")
            .bind(hash_key(key))
            .fetch_optional(&self.pool)
            .await
    }

    /// Writes accepted events to the queue in one transaction: all or none.
    pub async fn enqueue(&self, project_id: &str, events: &[QueuedEvent]) -> Result<()> {
        let now = now_rfc3339();
        let mut tx = self.write().await?;
        for event in events {
            let payload = serde_json::to_string(event).expect("events serialise");
            sqlx::query(
                "INSERT INTO capture_queue (project_id, payload, enqueued_at) VALUES (?, ?, ?)",
            )
            .bind(project_id)
            .bind(payload)
            .bind(&now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await
    }

    pub async fn queue_depth(&self) -> Result<i64> {
        sqlx::query_scalar("SELECT COUNT(*) FROM capture_queue")
            .fetch_one(&self.pool)
            .await
    }

    /// Leases up to `limit` ready rows to `owner`. Rows whose lease expired
    /// (their worker died) are ready again.
    pub async fn claim(&self, owner: &str, limit: u32, lease: Duration) -> Result<Vec<Claimed>> {
        let now = chrono::Utc::now().timestamp_millis();
        let until = now + lease.as_millis() as i64;
        let rows = sqlx::query(
            "UPDATE capture_queue SET lease_owner = ?, lease_until = ?, attempts = attempts + 1
             WHERE id IN (SELECT id FROM capture_queue WHERE lease_until IS NULL OR lease_until < ? ORDER BY id LIMIT ?)
             RETURNING id, project_id, payload",
        )
        .bind(owner)
        .bind(until)
        .bind(now)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
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

    /// Stores the events made from claimed rows, applying their person
    /// changes in order, and removes those rows, in one transaction. An event
    /// already stored under its (project, uuid) is left as it is, so a replay
    /// stores nothing twice.
    pub async fn complete(&self, owner: &str, ids: &[i64], batch: &ProcessedBatch) -> Result<()> {
        let mut tx = self.write().await?;
        let now = now_rfc3339();
        for letter in &batch.dead_letters {
            sqlx::query(
                "INSERT INTO dead_letters (project_id, plugin_config_id, event, error, created_at) VALUES (?, ?, ?, ?, ?)",
            )
            .bind(&letter.project_id)
            .bind(&letter.plugin_config_id)
            .bind(letter.event.to_string())
            .bind(&letter.error)
            .bind(&now)
            .execute(&mut *tx)
            .await?;
        }
        for (config_id, record) in &batch.logs {
            sqlx::query("INSERT INTO plugin_logs (plugin_config_id, at, level, message, event_uuid) VALUES (?, ?, ?, ?, ?)")
                .bind(config_id)
                .bind(&record.at)
                .bind(serde_json::to_value(record.level).ok().and_then(|v| v.as_str().map(str::to_string)))
                .bind(&record.message)
                .bind(&record.event_uuid)
                .execute(&mut *tx)
                .await?;
        }
        for health in &batch.health {
            sqlx::query(
                "UPDATE plugin_configs SET consecutive_failures = ?,
                     enabled = CASE WHEN ? IS NULL THEN enabled ELSE 0 END,
                     disabled_reason = COALESCE(?, disabled_reason),
                     updated_at = CASE WHEN ? IS NULL THEN updated_at ELSE ? END
                 WHERE id = ?",
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
        for (project_id, event) in &batch.events {
            let stored: Option<i64> =
                sqlx::query_scalar("SELECT 1 FROM events WHERE project_id = ? AND uuid = ?")
                    .bind(project_id)
                    .bind(&event.uuid)
                    .fetch_optional(&mut *tx)
                    .await?;
            if stored.is_some() {
                continue; // a replay: its person changes were applied the first time
            }
            let person_id = persons::apply(&mut tx, project_id, event).await?;
            sqlx::query(
                "INSERT INTO events (project_id, uuid, event, distinct_id, person_id, timestamp, received_at, properties)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(project_id)
            .bind(&event.uuid)
            .bind(&event.event)
            .bind(&event.distinct_id)
            .bind(&person_id)
            .bind(&event.timestamp)
            .bind(&event.received_at)
            .bind(serde_json::to_string(&event.properties).expect("properties serialise"))
            .execute(&mut *tx)
            .await?;
        }
        for id in ids {
            sqlx::query("DELETE FROM capture_queue WHERE id = ? AND lease_owner = ?")
                .bind(id)
                .bind(owner)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await
    }

    /// Gives back the rows `owner` holds, for a graceful shutdown.
    pub async fn release(&self, owner: &str) -> Result<()> {
        sqlx::query(
            "UPDATE capture_queue SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = ?",
        )
        .bind(owner)
        .execute(&self.pool)
        .await
        .map(|_| ())
    }

    /// Stored events of a project, newest first.
    pub async fn list_events(
        &self,
        project_id: &str,
        filter: &EventFilter,
    ) -> Result<Vec<StoredEvent>> {
        // The person is looked up at read time, so events sent before an
        // identify or alias show the person they were merged into.
        let mut query = QueryBuilder::new(
            "SELECT e.uuid, e.event, e.distinct_id, e.timestamp, e.properties,
                    COALESCE(p.person_id, e.person_id) AS person_id
             FROM events e
             LEFT JOIN person_distinct_ids p ON p.project_id = e.project_id AND p.distinct_id = e.distinct_id
             WHERE e.project_id = ",
        );
        query.push_bind(project_id);
        if let Some(event) = &filter.event {
            query.push(" AND e.event = ").push_bind(event);
        }
        if let Some(distinct_id) = &filter.distinct_id {
            query.push(" AND e.distinct_id = ").push_bind(distinct_id);
        }
        if let Some(after) = &filter.after {
            query.push(" AND e.timestamp > ").push_bind(after);
        }
        if let Some(before) = &filter.before {
            query.push(" AND e.timestamp < ").push_bind(before);
        }
        query
            .push(" ORDER BY timestamp DESC, uuid DESC LIMIT ")
            .push_bind(filter.limit as i64);
        let rows = query.build().fetch_all(&self.pool).await?;
        Ok(rows
            .into_iter()
            .map(|row| {
                let properties: String = row.get("properties");
                StoredEvent {
                    uuid: row.get("uuid"),
                    event: row.get("event"),
                    distinct_id: row.get("distinct_id"),
                    person_id: row.get("person_id"),
                    timestamp: row.get("timestamp"),
                    properties: serde_json::from_str(&properties)
                        .unwrap_or(serde_json::Value::Null),
                }
            })
            .collect())
    }

    /// The person a distinct id belongs to now, with all its distinct ids.
    pub async fn person_by_distinct_id(
        &self,
        project_id: &str,
        distinct_id: &str,
    ) -> Result<Option<Person>> {
        let mut conn = self.pool.acquire().await?;
        let Some(id): Option<String> = sqlx::query_scalar(
            "SELECT person_id FROM person_distinct_ids WHERE project_id = ? AND distinct_id = ?",
        )
        .bind(project_id)
        .bind(distinct_id)
        .fetch_optional(&mut *conn)
        .await?
        else {
            return Ok(None);
        };
        let properties: Option<String> =
            sqlx::query_scalar("SELECT properties FROM persons WHERE project_id = ? AND id = ?")
                .bind(project_id)
                .bind(&id)
                .fetch_optional(&mut *conn)
                .await?;
        let distinct_ids: Vec<String> = sqlx::query_scalar(
            "SELECT distinct_id FROM person_distinct_ids WHERE project_id = ? AND person_id = ? ORDER BY distinct_id",
        )
        .bind(project_id)
        .bind(&id)
        .fetch_all(&mut *conn)
        .await?;
        Ok(Some(Person {
            id,
            distinct_ids,
            properties: properties
                .and_then(|p| serde_json::from_str(&p).ok())
                .unwrap_or(serde_json::Value::Object(Default::default())),
        }))
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}
