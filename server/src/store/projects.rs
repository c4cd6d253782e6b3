//! The `projects` table: a project is created with its capture token and
//! its first API key in one transaction, and its capture token is looked
//! up on every capture request.

use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::Row;

use super::keys::{ApiKey, Scope, insert_key};
use super::{Result, Store, now_rfc3339};

/// What `sluice project create` prints.
#[derive(Clone, Debug, Serialize)]
pub struct CreatedProject {
    pub project_id: String,
    pub organisation_id: String,
    /// Public: goes into apps; also the Segment write key.
    pub capture_token: String,
    /// Secret: an admin key of this project alone, for the management and
    /// query APIs. Only its hash is stored.
    pub api_key: String,
}

/// A project as listed.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct ProjectSummary {
    pub id: String,
    pub organisation_id: String,
    pub name: String,
    pub timezone: String,
    pub created_at: String,
}

pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

pub(super) fn random_token(prefix: &str) -> String {
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes).expect("the OS has randomness");
    format!("{prefix}{}", hex::encode(bytes))
}

/// A capture token's project, and until when a retired token is still
/// accepted (`None` for a project's current token).
#[derive(Clone, Debug)]
pub struct TokenOwner {
    pub project_id: String,
    pub valid_until: Option<String>,
}

impl Store {
    /// Creates a project in a new organisation of the same name, with an
    /// admin key of the project.
    pub async fn create_project(&self, name: &str) -> Result<CreatedProject> {
        self.create_project_in(name, "UTC").await
    }

    /// Creates a project whose queries bucket days in `timezone`, an IANA
    /// zone name the caller has checked, in a new organisation.
    pub async fn create_project_in(&self, name: &str, timezone: &str) -> Result<CreatedProject> {
        self.create_project_with(None, name, timezone, true)
            .await
            .map(|created| created.expect("a new organisation exists"))
    }

    /// Creates a project in `organisation` (a new one of the project's
    /// name if `None`), with an admin key of the project alone if
    /// `with_key` (the key is empty otherwise). `None` if the
    /// organisation does not exist.
    pub async fn create_project_with(
        &self,
        organisation: Option<&str>,
        name: &str,
        timezone: &str,
        with_key: bool,
    ) -> Result<Option<CreatedProject>> {
        let now = now_rfc3339();
        let project_id = uuid::Uuid::now_v7().to_string();
        let (mut tx, _turn) = self.write().await?;
        let organisation_id = match organisation {
            Some(id) => {
                let exists: Option<String> =
                    sqlx::query_scalar("SELECT id FROM organisations WHERE id = $1")
                        .bind(id)
                        .fetch_optional(&mut *tx)
                        .await?;
                match exists {
                    Some(id) => id,
                    None => return Ok(None),
                }
            }
            None => {
                let id = uuid::Uuid::now_v7().to_string();
                sqlx::query("INSERT INTO organisations (id, name, created_at) VALUES ($1, $2, $3)")
                    .bind(&id)
                    .bind(name)
                    .bind(&now)
                    .execute(&mut *tx)
                    .await?;
                id
            }
        };
        let created = CreatedProject {
            project_id,
            organisation_id,
            capture_token: random_token("phc_"),
            api_key: if with_key {
                random_token("phx_")
            } else {
                String::new()
            },
        };
        sqlx::query(
            "INSERT INTO projects (id, name, capture_token, created_at, timezone, organisation_id) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&created.project_id)
        .bind(name)
        .bind(&created.capture_token)
        .bind(&now)
        .bind(timezone)
        .bind(&created.organisation_id)
        .execute(&mut *tx)
        .await?;
        if with_key {
            let key = ApiKey {
                id: uuid::Uuid::now_v7().to_string(),
                organisation_id: created.organisation_id.clone(),
                name: format!("created with project {name}"),
                prefix: created.api_key[..8].to_string(),
                scope: Scope::Admin,
                projects: Some(vec![created.project_id.clone()]),
                created_by: "cli".into(),
                created_at: now.clone(),
                last_used_at: None,
                revoked_at: None,
            };
            insert_key(&mut tx, &key, &created.api_key).await?;
        }
        tx.commit().await?;
        Ok(Some(created))
    }

    /// The project a capture token belongs to: its current token, or a
    /// retired one still in its grace period.
    pub async fn project_for_token(&self, token: &str) -> Result<Option<TokenOwner>> {
        let current: Option<String> =
            sqlx::query_scalar("SELECT id FROM projects WHERE capture_token = $1")
                .bind(token)
                .fetch_optional(&self.pool)
                .await?;
        if let Some(project_id) = current {
            return Ok(Some(TokenOwner {
                project_id,
                valid_until: None,
            }));
        }
        let row = sqlx::query(
            "SELECT project_id, valid_until FROM retired_capture_tokens WHERE token = $1 AND valid_until > $2",
        )
        .bind(token)
        .bind(now_rfc3339())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            Ok(TokenOwner {
                project_id: row.try_get(0)?,
                valid_until: Some(row.try_get(1)?),
            })
        })
        .transpose()
    }

    /// The projects of an organisation by id, after `after`.
    pub async fn projects_of(
        &self,
        organisation_id: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<ProjectSummary>> {
        let rows = sqlx::query(
            "SELECT id, organisation_id, name, timezone, created_at FROM projects WHERE organisation_id = $1 AND id > $2 ORDER BY id LIMIT $3",
        )
        .bind(organisation_id)
        .bind(after.unwrap_or(""))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(ProjectSummary {
                    id: row.try_get(0)?,
                    organisation_id: row.try_get(1)?,
                    name: row.try_get(2)?,
                    timezone: row.try_get(3)?,
                    created_at: row.try_get(4)?,
                })
            })
            .collect()
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
