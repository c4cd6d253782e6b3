//! The `plugin_configs` table: the plugins installed in each project,
//! with their config, place in the chain, health and, for destinations,
//! delivery settings and pause. Every read joins `plugins` for the name,
//! version and manifest, so a config reads as one whole install.
//!
//! Besides the API's reads and writes, the pipeline records health in the
//! transaction that stores a batch, and delivery pauses a destination in
//! the transaction that records an attempt: both take that transaction.

use serde::Serialize;
use serde_json::Value;
use sqlx::Row;

use super::secrets::Secrets;
use super::sql::corrupt;
use super::{DeliverySettings, Error, Result, Store, now_rfc3339};
use crate::model::{FailurePolicy, Manifest};

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
    pub failure_policy: FailurePolicy,
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

impl PluginConfig {
    /// See [`Manifest::is_destination`]. A config whose manifest could not
    /// be read is neither a destination nor, in the chain, anything that
    /// would run.
    pub fn is_destination(&self) -> bool {
        self.manifest.as_ref().is_some_and(Manifest::is_destination)
    }

    /// See [`Manifest::is_transformation`]. A config whose stored manifest
    /// could not be read counts as one, so that starting it reads the
    /// plugin's own manifest and says what is wrong.
    pub fn is_transformation(&self) -> bool {
        self.manifest
            .as_ref()
            .is_none_or(Manifest::is_transformation)
    }
}

/// Changes to a plugin config; `None` leaves a field as it is.
#[derive(Clone, Debug, Default)]
pub struct PluginConfigPatch {
    pub config: Option<Value>,
    pub enabled: Option<bool>,
    pub position: Option<i64>,
    pub failure_policy: Option<FailurePolicy>,
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
    pub failure_policy: FailurePolicy,
    pub delivery: DeliverySettings,
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

fn config_from_row(row: &sqlx::any::AnyRow) -> Result<PluginConfig> {
    let id: String = row.get("id");
    let config: String = row.get("config");
    let name: String = row.get("name");
    let version: String = row.get("version");
    let failure_policy: String = row.get("failure_policy");
    Ok(PluginConfig {
        project_id: row.get("project_id"),
        plugin_sha256: row.get("plugin_sha256"),
        plugin: format!("{name}@{version}"),
        config: serde_json::from_str(&config)
            .map_err(|err| corrupt("config", &format!("plugin config {id}"), err))?,
        enabled: row.get::<i64, _>("enabled") != 0,
        position: row.get("position"),
        failure_policy: failure_policy
            .parse()
            .map_err(|err| corrupt("failure policy", &format!("plugin config {id}"), err))?,
        consecutive_failures: row.get("consecutive_failures"),
        disabled_reason: row.get("disabled_reason"),
        delivery: DeliverySettings::from_stored(&row.get::<String, _>("delivery"))
            .map_err(|err| corrupt("delivery settings", &format!("plugin config {id}"), err))?,
        paused_reason: row.get("paused_reason"),
        updated_at: row.get("updated_at"),
        // A manifest this version cannot read is left out rather than
        // failing every config: the plugin's own copy, embedded in its
        // `.wasm`, is what starts it, with a precise error if it is bad.
        manifest: serde_json::from_str(&row.get::<String, _>("manifest")).ok(),
        id,
    })
}

impl Store {
    /// Adds a plugin config at the end of the project's chain unless a
    /// position is given; `None` if the project already has `max_configs`
    /// (counted in the same transaction, so concurrent requests cannot
    /// both squeeze under it).
    pub async fn create_plugin_config(
        &self,
        project_id: &str,
        new: &NewPluginConfig,
        max_configs: u32,
    ) -> Result<Option<PluginConfig>> {
        let NewPluginConfig {
            sha256,
            config,
            enabled,
            position,
            failure_policy,
            delivery,
        } = new;
        let id = uuid::Uuid::now_v7().to_string();
        let manifest: Option<String> =
            sqlx::query_scalar("SELECT manifest FROM plugins WHERE sha256 = $1")
                .bind(sha256.as_str())
                .fetch_optional(&self.pool)
                .await?;
        let manifest = manifest.and_then(|text| serde_json::from_str::<Manifest>(&text).ok());
        // Bound to the id: a sealed value opens in this config only.
        let config = self.seal_config(manifest.as_ref(), &id, config)?;
        let (mut tx, _turn) = self.write().await?;
        super::projects::lock_project(&mut tx, self.backend(), project_id).await?;
        let existing: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM plugin_configs WHERE project_id = $1")
                .bind(project_id)
                .fetch_one(&mut *tx)
                .await?;
        if existing >= i64::from(max_configs) {
            return Ok(None);
        }
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
        Ok(Some(
            self.plugin_config(project_id, &id)
                .await?
                .expect("just created"),
        ))
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
        row.as_ref().map(config_from_row).transpose()
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
        rows.iter().map(config_from_row).collect()
    }

    /// Every enabled plugin config, by project and chain order.
    ///
    /// A config whose stored settings do not read back is returned apart,
    /// with its id and the error, so that one bad row does not hide every
    /// other project's configs.
    pub async fn enabled_plugin_configs(
        &self,
    ) -> Result<(Vec<PluginConfig>, Vec<(String, Error)>)> {
        let sql = format!(
            "SELECT {CONFIG_COLUMNS} FROM plugin_configs c JOIN plugins p ON p.sha256 = c.plugin_sha256
             WHERE c.enabled = 1 ORDER BY c.project_id, c.position, c.id"
        );
        let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
        let mut configs = Vec::with_capacity(rows.len());
        let mut unreadable = Vec::new();
        for row in &rows {
            match config_from_row(row) {
                Ok(config) => configs.push(config),
                Err(err) => unreadable.push((row.get::<String, _>("id"), err)),
            }
        }
        Ok((configs, unreadable))
    }

    /// Changes whenever any plugin config changes, so workers know when to
    /// rebuild their chains.
    pub async fn plugin_configs_stamp(&self) -> Result<String> {
        sqlx::query_scalar(
            "SELECT COUNT(*) || '/' || COALESCE(MAX(updated_at), '') FROM plugin_configs",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(Into::into)
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
        let config = match &patch.config {
            Some(config) => self.seal_config(current.manifest.as_ref(), id, config)?,
            None => current.config.clone(),
        };
        sqlx::query(
            "UPDATE plugin_configs SET config = $1, enabled = $2, position = $3, failure_policy = $4,
                 consecutive_failures = CASE WHEN $5 THEN 0 ELSE consecutive_failures END,
                 disabled_reason = CASE WHEN $6 THEN NULL ELSE disabled_reason END,
                 updated_at = $7, delivery = $10
             WHERE project_id = $8 AND id = $9",
        )
        .bind(config.to_string())
        .bind(enabled as i64)
        .bind(patch.position.unwrap_or(current.position))
        .bind(
            patch
                .failure_policy
                .unwrap_or(current.failure_policy)
                .as_str(),
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
            .map_err(Into::into)
    }

    /// Turns a plugin config off with the reason shown to operators.
    pub async fn disable_plugin_config(&self, id: &str, reason: &str) -> Result<()> {
        sqlx::query("UPDATE plugin_configs SET enabled = 0, disabled_reason = $1, updated_at = $2 WHERE id = $3")
            .bind(self.scrub(id, reason).into_owned())
            .bind(now_rfc3339())
            .bind(id)
            .execute(&self.pool)
            .await
            .map(|_| ()).map_err(Into::into)
    }
}

/// A destination install that new events of a project are copied to.
pub(super) struct Route {
    pub(super) plugin_config_id: String,
    pub(super) settings: DeliverySettings,
}

/// The enabled destination installs of a project, read inside the
/// transaction that stores events, so an install created a moment ago
/// gets every event stored after it.
pub(super) async fn routes(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    project_id: &str,
) -> Result<Vec<Route>> {
    let rows = sqlx::query(
        "SELECT c.id, c.delivery FROM plugin_configs c JOIN plugins p ON p.sha256 = c.plugin_sha256
         WHERE c.project_id = $1 AND c.enabled = 1 AND p.destination = 1 ORDER BY c.position, c.id",
    )
    .bind(project_id)
    .fetch_all(&mut **tx)
    .await?;
    rows.iter()
        .map(|row| {
            let id: String = row.get("id");
            let settings = DeliverySettings::from_stored(&row.get::<String, _>("delivery"))
                .map_err(|err| corrupt("delivery settings", &format!("plugin config {id}"), err))?;
            Ok(Route {
                plugin_config_id: id,
                settings,
            })
        })
        .collect()
}

/// Writes what the pipeline learnt about plugin configs while processing
/// a batch: the failure count, and a host-made disable with its reason.
pub(super) async fn record_health(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    secrets: &Secrets,
    health: &[PluginHealth],
    now: &str,
) -> Result<()> {
    for health in health {
        let reason = health
            .disabled_reason
            .as_deref()
            .map(|reason| secrets.scrub(&health.plugin_config_id, reason).into_owned());
        sqlx::query(
            "UPDATE plugin_configs SET consecutive_failures = $1,
                 enabled = CASE WHEN $2 IS NULL THEN enabled ELSE 0 END,
                 disabled_reason = COALESCE($3, disabled_reason),
                 updated_at = CASE WHEN $4 IS NULL THEN updated_at ELSE $5 END
             WHERE id = $6",
        )
        .bind(health.consecutive_failures)
        .bind(&reason)
        .bind(&reason)
        .bind(&reason)
        .bind(now)
        .bind(&health.plugin_config_id)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// Pauses a destination with `reason` (scrubbed by the caller, see
/// `Store::scrub`), unless it is paused already: the first reason stays.
pub(super) async fn pause(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    plugin_config_id: &str,
    reason: &str,
    now: &str,
) -> Result<()> {
    sqlx::query(
        "UPDATE plugin_configs SET paused_reason = $1, updated_at = $2 WHERE id = $3 AND paused_reason IS NULL",
    )
    .bind(reason)
    .bind(now)
    .bind(plugin_config_id)
    .execute(&mut **tx)
    .await
    .map(|_| ()).map_err(Into::into)
}

/// Sets or (with `None`) clears a destination's pause, whatever it was;
/// the reason scrubbed by the caller.
pub(super) async fn set_paused_reason(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    project_id: &str,
    plugin_config_id: &str,
    reason: Option<&str>,
) -> Result<()> {
    sqlx::query(
        "UPDATE plugin_configs SET paused_reason = $1, updated_at = $2 WHERE project_id = $3 AND id = $4",
    )
    .bind(reason)
    .bind(now_rfc3339())
    .bind(project_id)
    .bind(plugin_config_id)
    .execute(&mut **tx)
    .await
    .map(|_| ()).map_err(Into::into)
}
