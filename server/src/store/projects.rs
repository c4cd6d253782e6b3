//! The `projects` and `api_keys` tables: a project is created with its
//! capture token and its first API key in one transaction, and both are
//! looked up on every request, so they live together. Only a key's hash
//! is stored.

use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::Row;

use super::{Result, Store, now_rfc3339};

/// What `sluice project create` prints.
#[derive(Clone, Debug, Serialize)]
pub struct CreatedProject {
    pub project_id: String,
    /// Public: goes into apps; also the Segment write key.
    pub capture_token: String,
    /// Secret: for the management and query APIs. Only its hash is stored.
    pub api_key: String,
}

pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

fn random_token(prefix: &str) -> String {
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes).expect("the OS has randomness");
    format!("{prefix}{}", hex::encode(bytes))
}

impl Store {
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
        let (mut tx, _turn) = self.write().await?;
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
            .map_err(Into::into)
    }

    /// The project a personal API key belongs to.
    pub async fn project_for_key(&self, key: &str) -> Result<Option<String>> {
        sqlx::query_scalar("SELECT project_id FROM api_keys WHERE key_hash = $1")
            .bind(hash_key(key))
            .fetch_optional(&self.pool)
            .await
            .map_err(Into::into)
    }

    pub async fn set_project_timezone(&self, project_id: &str, timezone: &str) -> Result<()> {
        let (mut tx, _turn) = self.write().await?;
        sqlx::query("UPDATE projects SET timezone = $1 WHERE id = $2")
            .bind(timezone)
            .bind(project_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await.map_err(Into::into)
    }

    /// Every project's id.
    pub async fn project_ids(&self) -> Result<Vec<String>> {
        sqlx::query_scalar("SELECT id FROM projects ORDER BY id")
            .fetch_all(&self.pool)
            .await
            .map_err(Into::into)
    }

    /// A project's name and time zone.
    pub async fn project(&self, project_id: &str) -> Result<Option<(String, String)>> {
        let row = sqlx::query("SELECT name, timezone FROM projects WHERE id = $1")
            .bind(project_id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .transpose()
    }
}

impl Store {
    /// The quota overrides of every project that has any, as stored (a
    /// JSON object's text).
    pub async fn quota_overrides(&self) -> Result<Vec<(String, String)>> {
        let rows = sqlx::query("SELECT id, quotas FROM projects WHERE quotas IS NOT NULL")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect()
    }

    /// One project's quota overrides, as stored; `None` for an unknown
    /// project, `Some(None)` for one with none.
    pub async fn project_quota_overrides(
        &self,
        project_id: &str,
    ) -> Result<Option<Option<String>>> {
        let row = sqlx::query("SELECT quotas FROM projects WHERE id = $1")
            .bind(project_id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| row.try_get(0).map_err(Into::into))
            .transpose()
    }

    /// Replaces a project's quota overrides (`None` clears them). Returns
    /// whether the project exists.
    pub async fn set_project_quota_overrides(
        &self,
        project_id: &str,
        overrides: Option<&str>,
    ) -> Result<bool> {
        let (mut tx, _turn) = self.write().await?;
        let updated = sqlx::query("UPDATE projects SET quotas = $1 WHERE id = $2")
            .bind(overrides)
            .bind(project_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(updated == 1)
    }
}

/// Makes a project's counted writes (a new plugin config, an upload) of
/// concurrent transactions take turns, so that two of them cannot both
/// count the project under a quota and both go over it. On SQLite the
/// write lock already does.
pub(super) async fn lock_project(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    backend: super::Backend,
    project_id: &str,
) -> Result<()> {
    if backend == super::Backend::Postgres {
        sqlx::query("SELECT id FROM projects WHERE id = $1 FOR UPDATE")
            .bind(project_id)
            .fetch_optional(&mut **tx)
            .await?;
    }
    Ok(())
}
