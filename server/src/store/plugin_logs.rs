//! The `plugin_logs` table: the lines plugins log through the host. Most
//! are written in the transaction of the work that logged them (storing a
//! batch, recording a delivery), so they take that transaction and go in
//! with multi-row statements; the rest on their own. The API reads them
//! back newest first. Retention prunes them per plugin config, by age
//! and by count (see [`Store::prune_plugin_logs`]).

use serde::Serialize;
use sqlx::Row;

use super::db::{Bound, PRUNE_CHUNK};
use super::secrets::Secrets;
use super::sql::{ROWS_PER_INSERT, values_placeholders};
use super::{Backend, Result, Store};
use crate::model::LogRecord;

/// A line of a plugin config's log, as stored.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct PluginLog {
    /// Its place in the log, for paging.
    #[serde(skip)]
    pub id: i64,
    pub at: String,
    pub level: String,
    pub message: String,
    pub event_uuid: Option<String>,
}

impl Store {
    /// The newest log lines of a plugin config, newest first.
    pub async fn plugin_logs(&self, plugin_config_id: &str, limit: u32) -> Result<Vec<PluginLog>> {
        self.plugin_logs_before(plugin_config_id, None, limit).await
    }

    /// Log lines of a plugin config older than the line `before` (an id),
    /// newest first: a page of the API's list.
    pub async fn plugin_logs_before(
        &self,
        plugin_config_id: &str,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<PluginLog>> {
        let rows = sqlx::query(
            "SELECT id, at, level, message, event_uuid FROM plugin_logs
             WHERE plugin_config_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3",
        )
        .bind(plugin_config_id)
        .bind(before.unwrap_or(i64::MAX))
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|row| PluginLog {
                id: row.get("id"),
                at: row.get("at"),
                level: row.get("level"),
                message: row.get("message"),
                event_uuid: row.get("event_uuid"),
            })
            .collect())
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
        insert_logs(
            &mut tx,
            self.backend(),
            &self.secrets,
            plugin_config_id,
            logs,
        )
        .await?;
        tx.commit().await.map_err(Into::into)
    }

    /// Deletes a plugin config's log lines older than `before` (a time as
    /// [`crate::model::format_timestamp`] writes it) and all but its
    /// newest `keep`. Returns how many it deleted.
    pub async fn prune_plugin_logs(
        &self,
        plugin_config_id: &str,
        before: &str,
        keep: u64,
    ) -> Result<u64> {
        let old = format!(
            "DELETE FROM plugin_logs WHERE id IN
               (SELECT id FROM plugin_logs WHERE plugin_config_id = $1 AND at < $2 LIMIT {PRUNE_CHUNK})"
        );
        let mut deleted = self
            .prune_in_chunks(&old, plugin_config_id, Bound::Text(before))
            .await?;
        // The newest line past the ones kept; it and every older line go.
        let boundary: Option<i64> = sqlx::query_scalar(
            "SELECT id FROM plugin_logs WHERE plugin_config_id = $1 ORDER BY id DESC LIMIT 1 OFFSET $2",
        )
        .bind(plugin_config_id)
        .bind(i64::try_from(keep).unwrap_or(i64::MAX))
        .fetch_optional(&self.pool)
        .await?;
        if let Some(boundary) = boundary {
            let surplus = format!(
                "DELETE FROM plugin_logs WHERE id IN
                   (SELECT id FROM plugin_logs WHERE plugin_config_id = $1 AND id <= $2 LIMIT {PRUNE_CHUNK})"
            );
            deleted += self
                .prune_in_chunks(&surplus, plugin_config_id, Bound::Id(boundary))
                .await?;
        }
        Ok(deleted)
    }
}

pub(super) async fn insert_logs(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    backend: Backend,
    secrets: &Secrets,
    plugin_config_id: &str,
    logs: &[LogRecord],
) -> Result<()> {
    let rows: Vec<(&str, &LogRecord)> = logs.iter().map(|r| (plugin_config_id, r)).collect();
    insert_log_rows(tx, backend, secrets, &rows).await
}

/// Log lines of several plugin configs, as the pipeline collects them.
pub(super) async fn insert_config_logs(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    backend: Backend,
    secrets: &Secrets,
    logs: &[(String, LogRecord)],
) -> Result<()> {
    let rows: Vec<(&str, &LogRecord)> = logs.iter().map(|(id, r)| (id.as_str(), r)).collect();
    insert_log_rows(tx, backend, secrets, &rows).await
}

/// Each line scrubbed of its config's secrets (see `Store::scrub`).
async fn insert_log_rows(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    backend: Backend,
    secrets: &Secrets,
    rows: &[(&str, &LogRecord)],
) -> Result<()> {
    for chunk in rows.chunks(ROWS_PER_INSERT) {
        let sql = format!(
            "INSERT INTO plugin_logs (plugin_config_id, at, level, message, event_uuid) VALUES {}",
            values_placeholders(backend, 1, chunk.len(), 5)
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
                .bind(
                    secrets
                        .scrub(plugin_config_id, &record.message)
                        .into_owned(),
                )
                .bind(record.event_uuid.as_deref());
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}
