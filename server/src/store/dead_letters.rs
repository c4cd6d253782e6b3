//! The `dead_letters` table: events a fail-closed transformation could
//! not handle, and events a destination gave up on, kept until an
//! operator replays them. Both kinds are written inside the transaction
//! of the work that failed (storing a batch, recording a delivery), with
//! one multi-row statement; replay sends a bounded batch of letters back
//! where they failed (see `replay_dead_letters`) and deletes them in one
//! transaction. Retention deletes letters past the project's quota of days.

use serde::Serialize;
use serde_json::Value;
use sqlx::Row;

use super::db::{Bound, PRUNE_CHUNK};
use super::secrets::Secrets;
use super::sql::{ROWS_PER_INSERT, corrupt, id_list, values_placeholders};
use super::{
    Backend, DeliveryRecord, OutboxRow, Result, Store, capture_queue, now_ms, now_rfc3339, outbox,
};
use crate::model::DeadLetterStage;

/// An event a fail-closed plugin could not transform, or a destination
/// could not take.
#[derive(Clone, Debug, Serialize)]
pub struct DeadLetter {
    pub project_id: String,
    pub plugin_config_id: String,
    pub event: Value,
    pub error: String,
}

/// A stored dead letter, as the API lists it.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct StoredDeadLetter {
    pub id: i64,
    pub plugin_config_id: String,
    pub stage: DeadLetterStage,
    pub event_uuid: Option<String>,
    /// The event as it was when it failed.
    #[schema(value_type = Object)]
    pub event: Value,
    pub error: String,
    pub created_at: String,
}

/// Which dead letters to replay.
#[derive(Clone, Debug)]
pub enum ReplaySelector {
    Ids(Vec<i64>),
    PluginConfig(String),
    All,
}

/// What one replay did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Replayed {
    pub replayed: u64,
    /// Letters the selector still names that a replay can send back.
    pub remaining: u64,
}

/// A dead letter as written.
struct NewLetter<'a> {
    project_id: &'a str,
    plugin_config_id: &'a str,
    event: String,
    error: &'a str,
    stage: DeadLetterStage,
    event_uuid: Option<&'a str>,
}

impl Store {
    /// Dead letters of a project, newest first, optionally of one plugin
    /// config.
    pub async fn dead_letters(
        &self,
        project_id: &str,
        plugin_config_id: Option<&str>,
        limit: u32,
    ) -> Result<Vec<StoredDeadLetter>> {
        self.dead_letters_before(project_id, plugin_config_id, None, limit)
            .await
    }

    /// Dead letters of a project older than the letter `before` (an id),
    /// newest first: a page of the API's list.
    pub async fn dead_letters_before(
        &self,
        project_id: &str,
        plugin_config_id: Option<&str>,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<StoredDeadLetter>> {
        let rows = sqlx::query(
            "SELECT id, plugin_config_id, stage, event_uuid, event, error, created_at FROM dead_letters
             WHERE project_id = $1 AND ($2 IS NULL OR plugin_config_id = $3) AND id < $4
             ORDER BY id DESC LIMIT $5",
        )
        .bind(project_id)
        .bind(plugin_config_id)
        .bind(plugin_config_id)
        .bind(before.unwrap_or(i64::MAX))
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let id: i64 = row.get("id");
                let letter = || format!("dead letter {id}");
                let event: String = row.get("event");
                let stage: String = row.get("stage");
                Ok(StoredDeadLetter {
                    id,
                    plugin_config_id: row.get("plugin_config_id"),
                    stage: stage
                        .parse()
                        .map_err(|err| corrupt("stage", &letter(), err))?,
                    event_uuid: row.get("event_uuid"),
                    event: serde_json::from_str(&event)
                        .map_err(|err| corrupt("event", &letter(), err))?,
                    error: row.get("error"),
                    created_at: row.get("created_at"),
                })
            })
            .collect()
    }
    /// How many letters of a destination wait for replay.
    pub(super) async fn delivery_dead_letters(&self, plugin_config_id: &str) -> Result<i64> {
        sqlx::query_scalar(
            "SELECT COUNT(*) FROM dead_letters WHERE plugin_config_id = $1 AND stage = 'delivery'",
        )
        .bind(plugin_config_id)
        .fetch_one(&self.pool)
        .await
        .map_err(Into::into)
    }

    /// Sends up to `limit` dead letters back where they failed, oldest
    /// first, in one transaction: delivery letters to their destination's
    /// outbox, transformation letters to the capture queue to run through
    /// the chain again. Letters of a destination that no longer exists
    /// stay, and are not counted as remaining.
    ///
    /// The limit keeps the transaction (on SQLite, a hold on the one write
    /// lock) and what it adds to the queue bounded, however many letters
    /// the selector names.
    pub async fn replay_dead_letters(
        &self,
        project_id: &str,
        selector: &ReplaySelector,
        limit: u64,
    ) -> Result<Replayed> {
        let mut filter = String::from(
            " FROM dead_letters d
             WHERE d.project_id = $1
               AND (d.stage <> 'delivery' OR EXISTS (SELECT 1 FROM plugin_configs c WHERE c.id = d.plugin_config_id))",
        );
        let mut config = None;
        match selector {
            ReplaySelector::Ids(ids) => {
                filter.push_str(&format!(" AND d.id IN ({})", id_list(ids.iter().copied())));
            }
            ReplaySelector::PluginConfig(id) => {
                filter.push_str(" AND d.plugin_config_id = $2");
                config = Some(id);
            }
            ReplaySelector::All => {}
        }
        if matches!(selector, ReplaySelector::Ids(ids) if ids.is_empty()) {
            return Ok(Replayed {
                replayed: 0,
                remaining: 0,
            });
        }
        let select = format!(
            "SELECT d.id, d.plugin_config_id, d.event, d.stage{filter} ORDER BY d.id LIMIT {}",
            i64::try_from(limit).unwrap_or(i64::MAX)
        );
        let count = format!("SELECT COUNT(*){filter}");
        let (mut tx, _turn) = self.write().await?;
        let mut query = sqlx::query(&select).bind(project_id);
        if let Some(id) = config {
            query = query.bind(id);
        }
        let letters = query.fetch_all(&mut *tx).await?;
        let now_ms = now_ms();
        let now = now_rfc3339();
        for letter in &letters {
            let event: String = letter.get("event");
            let stage: String = letter.get("stage");
            if stage == DeadLetterStage::Delivery.as_str() {
                let uuid = serde_json::from_str::<Value>(&event)
                    .ok()
                    .and_then(|v| v["uuid"].as_str().map(str::to_string))
                    .unwrap_or_default();
                let config_id: String = letter.get("plugin_config_id");
                outbox::insert(
                    &mut tx,
                    self.backend(),
                    &[(project_id, &config_id, &uuid, &event)],
                    now_ms,
                )
                .await?;
            } else {
                let mut queued: Value = serde_json::from_str(&event).unwrap_or(Value::Null);
                if let Some(fields) = queued.as_object_mut() {
                    fields.insert("received_at".into(), Value::String(now.clone()));
                }
                let payload = queued.to_string();
                capture_queue::insert(&mut tx, self.backend(), &[(project_id, &payload)], &now)
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
        let mut remaining = sqlx::query_scalar::<_, i64>(&count).bind(project_id);
        if let Some(id) = config {
            remaining = remaining.bind(id);
        }
        let remaining = remaining.fetch_one(&mut *tx).await?;
        tx.commit().await?;
        Ok(Replayed {
            replayed: letters.len() as u64,
            remaining: remaining.max(0) as u64,
        })
    }

    /// Deletes a project's dead letters created before `before` (a time as
    /// [`crate::model::format_timestamp`] writes it), in chunks. Returns
    /// how many it deleted.
    pub async fn prune_dead_letters(&self, project_id: &str, before: &str) -> Result<u64> {
        let delete = format!(
            "DELETE FROM dead_letters WHERE id IN
               (SELECT id FROM dead_letters WHERE project_id = $1 AND created_at < $2 LIMIT {PRUNE_CHUNK})"
        );
        self.prune_in_chunks(&delete, project_id, Bound::Text(before))
            .await
    }
}

/// Each error scrubbed of its config's secrets (see `Store::scrub`).
async fn insert(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    backend: Backend,
    secrets: &Secrets,
    letters: &[NewLetter<'_>],
    now: &str,
) -> Result<()> {
    for chunk in letters.chunks(ROWS_PER_INSERT) {
        let sql = format!(
            "INSERT INTO dead_letters (project_id, plugin_config_id, event, error, created_at, stage, event_uuid) VALUES {}",
            values_placeholders(backend, 1, chunk.len(), 7)
        );
        let mut query = sqlx::query(&sql);
        for letter in chunk {
            query = query
                .bind(letter.project_id)
                .bind(letter.plugin_config_id)
                .bind(letter.event.as_str())
                .bind(
                    secrets
                        .scrub(letter.plugin_config_id, letter.error)
                        .into_owned(),
                )
                .bind(now)
                .bind(letter.stage.as_str())
                .bind(letter.event_uuid);
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}

/// Events a fail-closed transformation could not handle.
pub(super) async fn insert_transform(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    backend: Backend,
    secrets: &Secrets,
    letters: &[DeadLetter],
    now: &str,
) -> Result<()> {
    let letters: Vec<NewLetter> = letters
        .iter()
        .map(|letter| NewLetter {
            project_id: &letter.project_id,
            plugin_config_id: &letter.plugin_config_id,
            event: letter.event.to_string(),
            error: &letter.error,
            stage: DeadLetterStage::Transform,
            event_uuid: letter.event["uuid"].as_str(),
        })
        .collect();
    insert(tx, backend, secrets, &letters, now).await
}

/// Outbox rows a destination gave up on, with the error of its last
/// attempt.
pub(super) async fn insert_delivery(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    backend: Backend,
    secrets: &Secrets,
    record: &DeliveryRecord,
    rows: &[&OutboxRow],
    error: &str,
    now: &str,
) -> Result<()> {
    let letters: Vec<NewLetter> = rows
        .iter()
        .map(|row| NewLetter {
            project_id: &record.project_id,
            plugin_config_id: &record.plugin_config_id,
            event: row.payload.to_string(),
            error,
            stage: DeadLetterStage::Delivery,
            event_uuid: Some(&row.event_uuid),
        })
        .collect();
    insert(tx, backend, secrets, &letters, now).await
}
