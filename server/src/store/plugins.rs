//! Installed plugins, their per-project configs, plugin logs and dead
//! letters.

use serde::Serialize;
use serde_json::Value;
use sqlx::Row;

use super::{DeliverySettings, Result, Store, now_rfc3339};
use crate::runtime::Manifest;

/// One plugin config of a project: which plugin, with what config, where in
/// the chain, and whether it runs.
#[derive(Clone, Debug, Serialize)]
pub struct PluginConfig {
    pub id: String,
    pub project_id: String,
    pub plugin_sha256: String,
    pub plugin: String,
    pub config: Value,
    pub enabled: bool,
    pub position: i64,
    /// `open`: a failing event goes on unchanged; `closed`: it goes to dead
    /// letters.
    pub failure_policy: String,
    pub consecutive_failures: i64,
    /// Why the host disabled it, if it did.
    pub disabled_reason: Option<String>,
    /// How a destination is fed; ignored for transformations.
    pub delivery: DeliverySettings,
    /// Set while a destination's deliveries are paused, saying why.
    pub paused_reason: Option<String>,
    /// Changes with every change to the install.
    pub updated_at: String,
    #[serde(skip)]
    pub manifest: Option<Manifest>,
}

/// Changes to a plugin config; `None` leaves a field as it is.
#[derive(Clone, Debug, Default)]
pub struct PluginConfigPatch {
    pub config: Option<Value>,
    pub enabled: Option<bool>,
    pub position: Option<i64>,
    pub failure_policy: Option<String>,
    pub delivery: Option<DeliverySettings>,
}

/// A plugin config to add to a project.
#[derive(Clone, Debug)]
pub struct NewPluginConfig {
    pub sha256: String,
    pub config: Value,
    pub enabled: bool,
    /// Place in the chain; the end when `None`.
    pub position: Option<i64>,
    pub failure_policy: String,
    pub delivery: DeliverySettings,
}

/// A line of a plugin config's log, as stored.
#[derive(Clone, Debug, Serialize)]
pub struct PluginLog {
    pub at: String,
    pub level: String,
    pub message: String,
    pub event_uuid: Option<String>,
}

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
    /// `transform` or `delivery`: where replay sends it back to.
    pub stage: String,
    pub event_uuid: Option<String>,
    pub event: Value,
    pub error: String,
    pub created_at: String,
}

/// What the pipeline learnt about a plugin config while processing a batch,
/// written in the same transaction as the batch's events.
#[derive(Clone, Debug)]
pub struct PluginHealth {
    pub plugin_config_id: String,
    pub consecutive_failures: i64,
    pub disabled_reason: Option<String>,
}

const CONFIG_COLUMNS: &str =
    "c.id, c.project_id, c.plugin_sha256, c.config, c.enabled, c.position, c.failure_policy,
    c.consecutive_failures, c.disabled_reason, c.delivery, c.paused_reason, c.updated_at, p.name, p.version, p.manifest";

fn config_from_row(row: &sqlx::any::AnyRow) -> PluginConfig {
    let config: String = row.get("config");
    let manifest: String = row.get("manifest");
    let name: String = row.get("name");
    let version: String = row.get("version");
    PluginConfig {
        id: row.get("id"),
        project_id: row.get("project_id"),
        plugin_sha256: row.get("plugin_sha256"),
        plugin: format!("{name}@{version}"),
        config: serde_json::from_str(&config).unwrap_or(Value::Null),
        enabled: row.get::<i64, _>("enabled") != 0,
        position: row.get("position"),
        failure_policy: row.get("failure_policy"),
        consecutive_failures: row.get("consecutive_failures"),
        disabled_reason: row.get("disabled_reason"),
        delivery: serde_json::from_str(&row.get::<String, _>("delivery")).unwrap_or_default(),
        paused_reason: row.get("paused_reason"),
        updated_at: row.get("updated_at"),
        manifest: serde_json::from_str(&manifest).ok(),
    }
}

impl Store {
    /// Stores a plugin's `.wasm` under its sha256; storing it again is a
    /// no-op.
    pub async fn save_plugin(&self, sha256: &str, manifest: &Manifest, wasm: &[u8]) -> Result<()> {
        sqlx::query(
            "INSERT INTO plugins (sha256, name, version, manifest, wasm, created_at) VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (sha256) DO NOTHING",
        )
        .bind(sha256)
        .bind(&manifest.name)
        .bind(manifest.version.to_string())
        .bind(serde_json::to_string(manifest).expect("manifests serialise"))
        .bind(wasm)
        .bind(now_rfc3339())
        .execute(&self.pool)
        .await
        .map(|_| ())
    }

    pub async fn plugin_wasm(&self, sha256: &str) -> Result<Option<Vec<u8>>> {
        sqlx::query_scalar("SELECT wasm FROM plugins WHERE sha256 = $1")
            .bind(sha256)
            .fetch_optional(&self.pool)
            .await
    }

    /// Adds a plugin config at the end of the project's chain unless a
    /// position is given.
    pub async fn create_plugin_config(
        &self,
        project_id: &str,
        new: &NewPluginConfig,
    ) -> Result<PluginConfig> {
        let NewPluginConfig {
            sha256,
            config,
            enabled,
            position,
            failure_policy,
            delivery,
        } = new;
        let id = uuid::Uuid::now_v7().to_string();
        let (mut tx, _turn) = self.write().await?;
        let position = match *position {
            Some(position) => position,
            None => sqlx::query_scalar::<_, i64>(
                "SELECT COALESCE(MAX(position), -1) + 1 FROM plugin_configs WHERE project_id = $1",
            )
            .bind(project_id)
            .fetch_one(&mut *tx)
            .await?,
        };
        sqlx::query(
            "INSERT INTO plugin_configs (id, project_id, plugin_sha256, config, enabled, position, failure_policy, updated_at, delivery)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&id)
        .bind(project_id)
        .bind(sha256.as_str())
        .bind(config.to_string())
        .bind(*enabled as i64)
        .bind(position)
        .bind(failure_policy.as_str())
        .bind(now_rfc3339())
        .bind(serde_json::to_string(delivery).expect("settings serialise"))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(self
            .plugin_config(project_id, &id)
            .await?
            .expect("just created"))
    }

    pub async fn plugin_config(&self, project_id: &str, id: &str) -> Result<Option<PluginConfig>> {
        let sql = format!(
            "SELECT {CONFIG_COLUMNS} FROM plugin_configs c JOIN plugins p ON p.sha256 = c.plugin_sha256
             WHERE c.project_id = $1 AND c.id = $2"
        );
        let row = sqlx::query(&sql)
            .bind(project_id)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(config_from_row))
    }

    /// A project's plugin configs in chain order.
    pub async fn plugin_configs(&self, project_id: &str) -> Result<Vec<PluginConfig>> {
        let sql = format!(
            "SELECT {CONFIG_COLUMNS} FROM plugin_configs c JOIN plugins p ON p.sha256 = c.plugin_sha256
             WHERE c.project_id = $1 ORDER BY c.position, c.id"
        );
        let rows = sqlx::query(&sql)
            .bind(project_id)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(config_from_row).collect())
    }

    /// Every enabled plugin config, by project and chain order.
    pub async fn enabled_plugin_configs(&self) -> Result<Vec<PluginConfig>> {
        let sql = format!(
            "SELECT {CONFIG_COLUMNS} FROM plugin_configs c JOIN plugins p ON p.sha256 = c.plugin_sha256
             WHERE c.enabled = 1 ORDER BY c.project_id, c.position, c.id"
        );
        let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
        Ok(rows.iter().map(config_from_row).collect())
    }

    /// Changes whenever any plugin config changes, so workers know when to
    /// rebuild their chains.
    pub async fn plugin_configs_stamp(&self) -> Result<String> {
        sqlx::query_scalar(
            "SELECT COUNT(*) || '/' || COALESCE(MAX(updated_at), '') FROM plugin_configs",
        )
        .fetch_one(&self.pool)
        .await
    }

    /// Applies a patch. Re-enabling clears the failure count and the reason
    /// the host disabled it.
    pub async fn update_plugin_config(
        &self,
        project_id: &str,
        id: &str,
        patch: &PluginConfigPatch,
    ) -> Result<Option<PluginConfig>> {
        let Some(current) = self.plugin_config(project_id, id).await? else {
            return Ok(None);
        };
        let enabled = patch.enabled.unwrap_or(current.enabled);
        let reenabled = patch.enabled == Some(true);
        sqlx::query(
            "UPDATE plugin_configs SET config = $1, enabled = $2, position = $3, failure_policy = $4,
                 consecutive_failures = CASE WHEN $5 THEN 0 ELSE consecutive_failures END,
                 disabled_reason = CASE WHEN $6 THEN NULL ELSE disabled_reason END,
                 updated_at = $7, delivery = $10
             WHERE project_id = $8 AND id = $9",
        )
        .bind(patch.config.as_ref().unwrap_or(&current.config).to_string())
        .bind(enabled as i64)
        .bind(patch.position.unwrap_or(current.position))
        .bind(
            patch
                .failure_policy
                .as_deref()
                .unwrap_or(&current.failure_policy),
        )
        .bind(reenabled)
        .bind(reenabled)
        .bind(now_rfc3339())
        .bind(project_id)
        .bind(id)
        .bind(
            serde_json::to_string(patch.delivery.as_ref().unwrap_or(&current.delivery))
                .expect("settings serialise"),
        )
        .execute(&self.pool)
        .await?;
        self.plugin_config(project_id, id).await
    }

    /// When a plugin config last changed, if it still exists.
    pub async fn plugin_config_updated_at(&self, id: &str) -> Result<Option<String>> {
        sqlx::query_scalar("SELECT updated_at FROM plugin_configs WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
    }

    /// Turns a plugin config off with the reason shown to operators.
    pub async fn disable_plugin_config(&self, id: &str, reason: &str) -> Result<()> {
        sqlx::query("UPDATE plugin_configs SET enabled = 0, disabled_reason = $1, updated_at = $2 WHERE id = $3")
            .bind(reason)
            .bind(now_rfc3339())
            .bind(id)
            .execute(&self.pool)
            .await
            .map(|_| ())
    }

    /// The newest log lines of a plugin config, newest first.
    pub async fn plugin_logs(&self, plugin_config_id: &str, limit: u32) -> Result<Vec<PluginLog>> {
        let rows = sqlx::query(
            "SELECT at, level, message, event_uuid FROM plugin_logs WHERE plugin_config_id = $1 ORDER BY id DESC LIMIT $2",
        )
        .bind(plugin_config_id)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|row| PluginLog {
                at: row.get("at"),
                level: row.get("level"),
                message: row.get("message"),
                event_uuid: row.get("event_uuid"),
            })
            .collect())
    }

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
        Ok(rows
            .iter()
            .map(|row| {
                let event: String = row.get("event");
                StoredDeadLetter {
                    id: row.get("id"),
                    plugin_config_id: row.get("plugin_config_id"),
                    stage: row.get("stage"),
                    event_uuid: row.get("event_uuid"),
                    event: serde_json::from_str(&event).unwrap_or(Value::Null),
                    error: row.get("error"),
                    created_at: row.get("created_at"),
                }
            })
            .collect())
    }
}
