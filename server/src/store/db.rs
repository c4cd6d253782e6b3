//! The SQL store behind both backends: SQLite (one file under the data dir,
//! WAL mode, `synchronous = FULL`, so a committed capture survives a crash
//! or power loss) and PostgreSQL (several processes on one database, queue
//! rows claimed with `FOR UPDATE SKIP LOCKED`). One set of queries serves
//! both through sqlx's `Any` driver; the few that differ say so.

use std::path::Path;
use std::sync::Once;
use std::time::Duration;

use sqlx::AnyPool;
use sqlx::Row;
use sqlx::any::AnyPoolOptions;

use super::persons;
use super::{
    Claimed, CreatedProject, EventFilter, Person, ProcessedBatch, QueuedEvent, Result, StoreConfig,
    StoredEvent, hash_key, now_rfc3339, random_token,
};

/// Which database a store talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Clone)]
pub struct Store {
    pub(super) pool: AnyPool,
    backend: Backend,
}

/// SQLite settings for every connection: WAL so readers never block the
/// writer, FULL sync so an acknowledged write is on disk, and a busy timeout
/// because a second process (`sluice project create`) may hold the write
/// lock for a moment. Analytics queries read rows in time order, which is
/// not the order they were written in: memory-mapping the file and a 64 MiB
/// page cache spare them a read syscall per row, which halved query times
/// in the query benchmark.
const SQLITE_PRAGMAS: [&str; 6] = [
    "PRAGMA journal_mode = WAL",
    "PRAGMA synchronous = FULL",
    "PRAGMA busy_timeout = 10000",
    "PRAGMA foreign_keys = ON",
    "PRAGMA mmap_size = 1073741824",
    "PRAGMA cache_size = -65536",
];

impl Store {
    /// Connects to the configured database and runs its migrations.
    pub async fn open(config: &StoreConfig) -> anyhow::Result<Store> {
        static DRIVERS: Once = Once::new();
        DRIVERS.call_once(sqlx::any::install_default_drivers);
        match config {
            StoreConfig::Sqlite { data_dir } => Self::open_sqlite(data_dir).await,
            StoreConfig::Postgres { url } => Self::open_postgres(url).await,
        }
    }

    async fn open_sqlite(data_dir: &Path) -> anyhow::Result<Store> {
        std::fs::create_dir_all(data_dir).map_err(|err| {
            anyhow::anyhow!(
                "failed to create the data dir {}: {err}",
                data_dir.display()
            )
        })?;
        let path = data_dir.join("sluice.db");
        let pool = AnyPoolOptions::new()
            .max_connections(4)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    for pragma in SQLITE_PRAGMAS {
                        sqlx::query(pragma).execute(&mut *conn).await?;
                    }
                    Ok(())
                })
            })
            .connect(&format!("sqlite://{}?mode=rwc", path.display()))
            .await
            .map_err(|err| anyhow::anyhow!("failed to open {}: {err}", path.display()))?;
        sqlx::migrate!("../migrations/sqlite")
            .run(&pool)
            .await
            .map_err(|err| anyhow::anyhow!("failed to migrate {}: {err}", path.display()))?;
        Ok(Store {
            pool,
            backend: Backend::Sqlite,
        })
    }

    async fn open_postgres(url: &str) -> anyhow::Result<Store> {
        let shown = redact_url(url);
        let pool = AnyPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await
            .map_err(|err| anyhow::anyhow!("failed to connect to {shown}: {err}"))?;
        sqlx::migrate!("../migrations/postgres")
            .run(&pool)
            .await
            .map_err(|err| anyhow::anyhow!("failed to migrate {shown}: {err}"))?;
        Ok(Store {
            pool,
            backend: Backend::Postgres,
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// A write transaction. On SQLite it takes the write lock at once: a
    /// deferred one that reads first cannot upgrade after another writer
    /// committed, and would fail with "database is locked".
    pub(super) async fn write(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>> {
        match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await,
            Backend::Postgres => self.pool.begin().await,
        }
    }

    pub async fn create_project(&self, name: &str) -> Result<CreatedProject> {
        self.create_project_in(name, "UTC").await
    }

    /// Creates a project whose queries bucket days in `timezone`, an IANA
    /// zone name the caller has checked.
    pub async fn create_project_in(&self, name: &str, timezone: &str) -> Result<CreatedProject> {
        let created = CreatedProject {
            project_id: uuid::Uuid::now_v7().to_string(),
            capture_token: random_token("phc_"),
            api_key: random_token("phx_"),
        };
        let now = now_rfc3339();
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO projects (id, name, capture_token, created_at, timezone) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&created.project_id)
        .bind(name)
        .bind(&created.capture_token)
        .bind(&now)
        .bind(timezone)
        .execute(&mut *tx)
        .await?;
        sqlx::query("INSERT INTO api_keys (id, project_id, key_hash, scope, created_at) VALUES ($1, $2, $3, 'write', $4)")
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
        sqlx::query_scalar("SELECT id FROM projects WHERE capture_token = $1")
            .bind(token)
            .fetch_optional(&self.pool)
            .await
    }

    /// The project a personal API key belongs to.
    pub async fn project_for_key(&self, key: &str) -> Result<Option<String>> {
        sqlx::query_scalar("SELECT project_id FROM api_keys WHERE key_hash = $1")
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
                "INSERT INTO capture_queue (project_id, payload, enqueued_at) VALUES ($1, $2, $3)",
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
        // Several processes share one PostgreSQL queue: each skips the rows
        // another is claiming instead of waiting for them.
        let lock = match self.backend {
            Backend::Sqlite => "",
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
        };
        let sql = format!(
            "UPDATE capture_queue SET lease_owner = $1, lease_until = $2, attempts = attempts + 1
             WHERE id IN (SELECT id FROM capture_queue WHERE lease_until IS NULL OR lease_until < $3
                          ORDER BY id LIMIT $4{lock})
             RETURNING id, project_id, payload"
        );
        let rows = sqlx::query(&sql)
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
                "INSERT INTO dead_letters (project_id, plugin_config_id, event, error, created_at, stage, event_uuid)
                 VALUES ($1, $2, $3, $4, $5, 'transform', $6)",
            )
            .bind(&letter.project_id)
            .bind(&letter.plugin_config_id)
            .bind(letter.event.to_string())
            .bind(&letter.error)
            .bind(&now)
            .bind(letter.event["uuid"].as_str())
            .execute(&mut *tx)
            .await?;
        }
        for (config_id, record) in &batch.logs {
            super::delivery::insert_logs(&mut tx, config_id, std::slice::from_ref(record)).await?;
        }
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
        let mut stored_events = Vec::with_capacity(batch.events.len());
        for (project_id, event) in &batch.events {
            let stored: Option<i64> = sqlx::query_scalar(
                "SELECT CAST(1 AS BIGINT) FROM events WHERE project_id = $1 AND uuid = $2",
            )
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
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
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
            stored_events.push((
                project_id.clone(),
                super::delivery::outbox_payload(event, Some(&person_id)),
            ));
        }
        Self::fan_out(&mut tx, &stored_events).await?;
        // One statement per chunk, not per row: on PostgreSQL each statement
        // is a round trip. The ids are integers, so inlining them is safe.
        for chunk in ids.chunks(500) {
            let list = super::delivery::id_list(chunk.iter().copied());
            sqlx::query(&format!(
                "DELETE FROM capture_queue WHERE lease_owner = $1 AND id IN ({list})"
            ))
            .bind(owner)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await
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

    /// Stored events of a project, newest first.
    pub async fn list_events(
        &self,
        project_id: &str,
        filter: &EventFilter,
    ) -> Result<Vec<StoredEvent>> {
        // The person is looked up at read time, so events sent before an
        // identify or alias show the person they were merged into.
        let mut sql = String::from(
            "SELECT e.uuid, e.event, e.distinct_id, e.timestamp, e.properties,
                    COALESCE(p.person_id, e.person_id) AS person_id
             FROM events e
             LEFT JOIN person_distinct_ids p ON p.project_id = e.project_id AND p.distinct_id = e.distinct_id
             WHERE e.project_id = $1",
        );
        let mut binds = vec![project_id.to_string()];
        for (column, op, value) in [
            ("e.event", "=", &filter.event),
            ("e.distinct_id", "=", &filter.distinct_id),
            ("e.timestamp", ">", &filter.after),
            ("e.timestamp", "<", &filter.before),
        ] {
            if let Some(value) = value {
                binds.push(value.clone());
                sql.push_str(&format!(" AND {column} {op} ${}", binds.len()));
            }
        }
        sql.push_str(&format!(
            " ORDER BY e.timestamp DESC, e.uuid DESC LIMIT {}",
            filter.limit
        ));
        let mut query = sqlx::query(&sql);
        for value in &binds {
            query = query.bind(value);
        }
        let rows = query.fetch_all(&self.pool).await?;
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
            "SELECT person_id FROM person_distinct_ids WHERE project_id = $1 AND distinct_id = $2",
        )
        .bind(project_id)
        .bind(distinct_id)
        .fetch_optional(&mut *conn)
        .await?
        else {
            return Ok(None);
        };
        let properties: Option<String> =
            sqlx::query_scalar("SELECT properties FROM persons WHERE project_id = $1 AND id = $2")
                .bind(project_id)
                .bind(&id)
                .fetch_optional(&mut *conn)
                .await?;
        let distinct_ids: Vec<String> = sqlx::query_scalar(
            "SELECT distinct_id FROM person_distinct_ids WHERE project_id = $1 AND person_id = $2 ORDER BY distinct_id",
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

/// The URL without its password, for error messages.
fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            parsed.to_string()
        }
        Err(_) => "the database URL".into(),
    }
}
