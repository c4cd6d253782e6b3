//! The `dead_letters` table: events a fail-closed transformation could
//! not handle, and events a destination gave up on, kept until an
//! operator replays them. Both kinds are written inside the transaction
//! of the work that failed (storing a batch, recording a delivery), with
//! one multi-row statement; replay sends each letter back where it failed
//! (see `replay_dead_letters`) and deletes it in one transaction.

use serde::Serialize;
use serde_json::Value;
use sqlx::Row;

use super::sql::{ROWS_PER_INSERT, corrupt, id_list, values_placeholders};
use super::{Backend, OutboxRow, Result, Store, capture_queue, now_ms, now_rfc3339, outbox};
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
#[derive(Clone, Debug, Serialize)]
pub struct StoredDeadLetter {
    pub id: i64,
    pub plugin_config_id: String,
    pub stage: DeadLetterStage,
    pub event_uuid: Option<String>,
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
        let rows = sqlx::query(
            "SELECT id, plugin_config_id, stage, event_uuid, event, error, created_at FROM dead_letters
             WHERE project_id = $1 AND ($2 IS NULL OR plugin_config_id = $3) ORDER BY id DESC LIMIT $4",
        )
        .bind(project_id)
        .bind(plugin_config_id)
        .bind(plugin_config_id)
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
        tx.commit().await?;
        Ok(letters.len() as u64)
    }
}

async fn insert(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    backend: Backend,
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
                .bind(letter.error)
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
    insert(tx, backend, &letters, now).await
}

/// Outbox rows a destination gave up on, with the error of its last
/// attempt.
pub(super) async fn insert_delivery(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    backend: Backend,
    project_id: &str,
    plugin_config_id: &str,
    rows: &[&OutboxRow],
    error: &str,
    now: &str,
) -> Result<()> {
    let letters: Vec<NewLetter> = rows
        .iter()
        .map(|row| NewLetter {
            project_id,
            plugin_config_id,
            event: row.payload.to_string(),
            error,
            stage: DeadLetterStage::Delivery,
            event_uuid: Some(&row.event_uuid),
        })
        .collect();
    insert(tx, backend, &letters, now).await
}
