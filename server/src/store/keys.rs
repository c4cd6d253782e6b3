//! The `organisations`, `api_keys`, `retired_capture_tokens` and
//! `audit_log` tables: who may do what, and what they did.
//!
//! A personal API key belongs to an organisation, has a scope, and may be
//! limited to some of its projects. Only its sha256 is stored: keys are 48
//! random hex digits, so a slow hash would add nothing.

use serde::Serialize;
use sqlx::Row;

use super::projects::{hash_key, random_token};
use super::{Result, Store, now_rfc3339};

/// What a key may do. Each scope includes the ones before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Read events, persons, queries, plugin configs, logs and dead letters.
    Read,
    /// Also change the pipeline: upload plugins, install and configure
    /// them, pause destinations, replay dead letters.
    Write,
    /// Also manage projects, keys and capture tokens, and read the audit
    /// log.
    Admin,
}

impl Scope {
    pub const NAMES: [&'static str; 3] = ["read", "write", "admin"];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Scope> {
        match text {
            "read" => Some(Scope::Read),
            "write" => Some(Scope::Write),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }
}

/// An organisation: it owns projects and keys.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct Organisation {
    pub id: String,
    pub name: String,
    pub created_at: String,
}

/// A personal API key as listed: never the key itself.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct ApiKey {
    pub id: String,
    pub organisation_id: String,
    pub name: String,
    /// The key's first characters, to tell keys apart.
    pub prefix: String,
    pub scope: Scope,
    /// The projects the key is limited to; `None` for every project of
    /// its organisation, those created later included.
    pub projects: Option<Vec<String>>,
    /// The key that created it, or `cli`.
    pub created_by: String,
    pub created_at: String,
    pub last_used_at: Option<String>,
    pub revoked_at: Option<String>,
}

impl ApiKey {
    /// Whether the key may touch `project_id` (of its own organisation).
    pub fn reaches(&self, project_id: &str) -> bool {
        self.projects
            .as_ref()
            .is_none_or(|projects| projects.iter().any(|p| p == project_id))
    }

    /// Whether every project `other` reaches, this key reaches too.
    pub fn covers(&self, other: Option<&[String]>) -> bool {
        match (&self.projects, other) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(_), Some(wanted)) => wanted.iter().all(|p| self.reaches(p)),
        }
    }
}

/// A key just made: the only time the key itself is shown.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct NewKey {
    #[serde(flatten)]
    pub key: ApiKey,
    /// The key to send as `Authorization: Bearer KEY`; only its hash is
    /// kept, so it cannot be shown again.
    pub api_key: String,
}

/// What a new key may do.
#[derive(Clone, Debug)]
pub struct KeySpec {
    pub organisation_id: String,
    pub name: String,
    pub scope: Scope,
    pub projects: Option<Vec<String>>,
    pub created_by: String,
}

/// Keys not revoked an organisation may hold: any admin key can make
/// keys, and without a bound one project's key could grow the table
/// every tenant shares without end.
pub const MAX_KEYS: i64 = 1000;

/// Retired capture tokens a project keeps, newest first: rotating in a
/// loop must not grow the table without end either.
pub const MAX_RETIRED_TOKENS: i64 = 10;

/// Why a key could not be made.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("there is no organisation {0}")]
    NoOrganisation(String),
    #[error("project {0} is not a project of organisation {1}")]
    ForeignProject(String, String),
    #[error(
        "organisation {0} already has {MAX_KEYS} keys that are not revoked; revoke keys no longer used before making more"
    )]
    TooMany(String),
    #[error(transparent)]
    Store(#[from] super::Error),
}

/// A capture token of a project: the current one, or one a rotation
/// retired that is still accepted until `valid_until`.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct CaptureToken {
    pub token: String,
    pub current: bool,
    pub retired_at: Option<String>,
    pub valid_until: Option<String>,
}

/// One management write, as recorded.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct AuditEntry {
    pub id: i64,
    pub organisation_id: String,
    pub project_id: Option<String>,
    /// The key id that made the change, or `cli`.
    pub actor: String,
    /// The method and route, such as `PATCH /api/projects/{project_id}`.
    pub action: String,
    /// What the change was made to: the path's ids.
    pub target: Option<String>,
    /// The HTTP status it was answered with (0 for CLI changes).
    pub status: i64,
    pub at: String,
}

/// An audit entry to record.
#[derive(Clone, Debug)]
pub struct NewAuditEntry {
    pub organisation_id: String,
    pub project_id: Option<String>,
    pub actor: String,
    pub action: String,
    pub target: Option<String>,
    pub status: u16,
}

const KEY_COLUMNS: &str = "id, organisation_id, name, key_prefix, scope, projects, created_by, created_at, last_used_at, revoked_at";

fn key_from_row(row: &sqlx::any::AnyRow) -> Result<ApiKey> {
    let scope: String = row.try_get(4)?;
    let projects: Option<String> = row.try_get(5)?;
    Ok(ApiKey {
        id: row.try_get(0)?,
        organisation_id: row.try_get(1)?,
        name: row.try_get(2)?,
        prefix: row.try_get(3)?,
        scope: Scope::parse(&scope)
            .ok_or_else(|| super::Error::Corrupt(format!("api key scope `{scope}`")))?,
        projects: projects
            .map(|text| {
                serde_json::from_str(&text)
                    .map_err(|err| super::Error::Corrupt(format!("api key projects: {err}")))
            })
            .transpose()?,
        created_by: row.try_get(6)?,
        created_at: row.try_get(7)?,
        last_used_at: row.try_get(8)?,
        revoked_at: row.try_get(9)?,
    })
}

/// How many characters of a key its listing shows: the `phx_` prefix and
/// four hex digits, 16 bits of a 192-bit key.
const SHOWN_PREFIX: usize = 8;

impl Store {
    pub async fn create_organisation(&self, name: &str) -> Result<Organisation> {
        let organisation = Organisation {
            id: uuid::Uuid::now_v7().to_string(),
            name: name.to_string(),
            created_at: now_rfc3339(),
        };
        let (mut tx, _turn) = self.write().await?;
        sqlx::query("INSERT INTO organisations (id, name, created_at) VALUES ($1, $2, $3)")
            .bind(&organisation.id)
            .bind(&organisation.name)
            .bind(&organisation.created_at)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(organisation)
    }

    pub async fn organisation(&self, id: &str) -> Result<Option<Organisation>> {
        let row = sqlx::query("SELECT id, name, created_at FROM organisations WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| {
            Ok(Organisation {
                id: row.try_get(0)?,
                name: row.try_get(1)?,
                created_at: row.try_get(2)?,
            })
        })
        .transpose()
    }

    /// Organisations by id, after `after`.
    pub async fn organisations(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Organisation>> {
        let rows = sqlx::query(
            "SELECT id, name, created_at FROM organisations WHERE id > $1 ORDER BY id LIMIT $2",
        )
        .bind(after.unwrap_or(""))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(Organisation {
                    id: row.try_get(0)?,
                    name: row.try_get(1)?,
                    created_at: row.try_get(2)?,
                })
            })
            .collect()
    }

    /// Makes a key. Its projects must all belong to its organisation.
    pub async fn create_key(&self, spec: &KeySpec) -> Result<NewKey, KeyError> {
        let secret = random_token("phx_");
        let key = ApiKey {
            id: uuid::Uuid::now_v7().to_string(),
            organisation_id: spec.organisation_id.clone(),
            name: spec.name.clone(),
            prefix: secret[..SHOWN_PREFIX].to_string(),
            scope: spec.scope,
            projects: spec.projects.clone(),
            created_by: spec.created_by.clone(),
            created_at: now_rfc3339(),
            last_used_at: None,
            revoked_at: None,
        };
        let (mut tx, _turn) = self.write().await?;
        let exists: Option<String> =
            sqlx::query_scalar("SELECT id FROM organisations WHERE id = $1")
                .bind(&key.organisation_id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(super::Error::from)?;
        if exists.is_none() {
            return Err(KeyError::NoOrganisation(key.organisation_id));
        }
        let held: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM api_keys WHERE organisation_id = $1 AND revoked_at IS NULL",
        )
        .bind(&key.organisation_id)
        .fetch_one(&mut *tx)
        .await
        .map_err(super::Error::from)?;
        if held >= MAX_KEYS {
            return Err(KeyError::TooMany(key.organisation_id));
        }
        for project in key.projects.iter().flatten() {
            let owner: Option<Option<String>> =
                sqlx::query_scalar("SELECT organisation_id FROM projects WHERE id = $1")
                    .bind(project)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(super::Error::from)?;
            if owner.flatten().as_deref() != Some(key.organisation_id.as_str()) {
                return Err(KeyError::ForeignProject(
                    project.clone(),
                    key.organisation_id.clone(),
                ));
            }
        }
        insert_key(&mut tx, &key, &secret).await?;
        tx.commit().await.map_err(super::Error::from)?;
        Ok(NewKey {
            key,
            api_key: secret,
        })
    }

    /// The key whose secret this is, revoked or not: the caller tells a
    /// revoked key from an unknown one.
    pub async fn key_by_secret(&self, secret: &str) -> Result<Option<ApiKey>> {
        let row = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE key_hash = $1"
        ))
        .bind(hash_key(secret))
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(key_from_row).transpose()
    }

    pub async fn key(&self, organisation_id: &str, id: &str) -> Result<Option<ApiKey>> {
        let row = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE organisation_id = $1 AND id = $2"
        ))
        .bind(organisation_id)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(key_from_row).transpose()
    }

    /// The organisation's keys by id, after `after`.
    pub async fn keys(
        &self,
        organisation_id: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<ApiKey>> {
        let rows = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE organisation_id = $1 AND id > $2 ORDER BY id LIMIT $3"
        ))
        .bind(organisation_id)
        .bind(after.unwrap_or(""))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(key_from_row).collect()
    }

    /// Revokes a key at once; revoking it again keeps the first time.
    /// Returns the key as it now is, or `None` if there is no such key.
    pub async fn revoke_key(&self, organisation_id: &str, id: &str) -> Result<Option<ApiKey>> {
        {
            let (mut tx, _turn) = self.write().await?;
            sqlx::query(
                "UPDATE api_keys SET revoked_at = $1 WHERE organisation_id = $2 AND id = $3 AND revoked_at IS NULL",
            )
            .bind(now_rfc3339())
            .bind(organisation_id)
            .bind(id)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
        }
        self.key(organisation_id, id).await
    }

    /// Revokes a key by id alone, for the operator's CLI.
    pub async fn revoke_key_by_id(&self, id: &str) -> Result<Option<ApiKey>> {
        let organisation: Option<String> =
            sqlx::query_scalar("SELECT organisation_id FROM api_keys WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        match organisation {
            Some(organisation) => self.revoke_key(&organisation, id).await,
            None => Ok(None),
        }
    }

    /// Records that a key was used at `at`.
    pub async fn touch_key(&self, id: &str, at: &str) -> Result<()> {
        let (mut tx, _turn) = self.write().await?;
        sqlx::query("UPDATE api_keys SET last_used_at = $1 WHERE id = $2")
            .bind(at)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await.map_err(Into::into)
    }

    /// The organisation a project belongs to.
    pub async fn project_organisation(&self, project_id: &str) -> Result<Option<String>> {
        let owner: Option<Option<String>> =
            sqlx::query_scalar("SELECT organisation_id FROM projects WHERE id = $1")
                .bind(project_id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(owner.flatten())
    }

    /// Makes the project's current capture token a retired one accepted
    /// until `valid_until`, and gives it a new one. Returns the new token
    /// and the old.
    pub async fn rotate_capture_token(
        &self,
        project_id: &str,
        valid_until: &str,
    ) -> Result<Option<(String, String)>> {
        let token = random_token("phc_");
        let (mut tx, _turn) = self.write().await?;
        let old: Option<String> =
            sqlx::query_scalar("SELECT capture_token FROM projects WHERE id = $1")
                .bind(project_id)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(old) = old else {
            return Ok(None);
        };
        sqlx::query(
            "INSERT INTO retired_capture_tokens (token, project_id, retired_at, valid_until) VALUES ($1, $2, $3, $4)",
        )
        .bind(&old)
        .bind(project_id)
        .bind(now_rfc3339())
        .bind(valid_until)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE projects SET capture_token = $1 WHERE id = $2")
            .bind(&token)
            .bind(project_id)
            .execute(&mut *tx)
            .await?;
        // Tokens past their grace are of no use to anyone, and past the
        // newest few a rotation ends the oldest grace early.
        sqlx::query(
            "DELETE FROM retired_capture_tokens WHERE project_id = $1 AND (valid_until <= $2 OR token NOT IN (SELECT token FROM retired_capture_tokens WHERE project_id = $1 ORDER BY retired_at DESC, token LIMIT $3))",
        )
        .bind(project_id)
        .bind(now_rfc3339())
        .bind(MAX_RETIRED_TOKENS)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some((token, old)))
    }

    /// The project's capture tokens still accepted: the current one first.
    pub async fn capture_tokens(&self, project_id: &str) -> Result<Option<Vec<CaptureToken>>> {
        let current: Option<String> =
            sqlx::query_scalar("SELECT capture_token FROM projects WHERE id = $1")
                .bind(project_id)
                .fetch_optional(&self.pool)
                .await?;
        let Some(current) = current else {
            return Ok(None);
        };
        let mut tokens = vec![CaptureToken {
            token: current,
            current: true,
            retired_at: None,
            valid_until: None,
        }];
        let rows = sqlx::query(
            "SELECT token, retired_at, valid_until FROM retired_capture_tokens WHERE project_id = $1 AND valid_until > $2 ORDER BY retired_at DESC",
        )
        .bind(project_id)
        .bind(now_rfc3339())
        .fetch_all(&self.pool)
        .await?;
        for row in rows {
            tokens.push(CaptureToken {
                token: row.try_get(0)?,
                current: false,
                retired_at: Some(row.try_get(1)?),
                valid_until: Some(row.try_get(2)?),
            });
        }
        Ok(Some(tokens))
    }

    pub async fn record_audit(&self, entry: &NewAuditEntry) -> Result<()> {
        let (mut tx, _turn) = self.write().await?;
        sqlx::query(
            "INSERT INTO audit_log (organisation_id, project_id, actor, action, target, status, at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&entry.organisation_id)
        .bind(&entry.project_id)
        .bind(&entry.actor)
        .bind(&entry.action)
        .bind(&entry.target)
        .bind(i64::from(entry.status))
        .bind(now_rfc3339())
        .execute(&mut *tx)
        .await?;
        tx.commit().await.map_err(Into::into)
    }

    /// The organisation's audit log, newest first, before entry `before`;
    /// limited to `projects` when given (entries of no project are then
    /// left out: they are organisation-wide).
    pub async fn audit_log(
        &self,
        organisation_id: &str,
        projects: Option<&[String]>,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<AuditEntry>> {
        let mut sql = String::from(
            "SELECT id, organisation_id, project_id, actor, action, target, status, at FROM audit_log WHERE organisation_id = $1 AND id < $2",
        );
        if let Some(projects) = projects {
            if projects.is_empty() {
                return Ok(Vec::new());
            }
            let placeholders: Vec<String> =
                (0..projects.len()).map(|i| format!("${}", i + 4)).collect();
            sql.push_str(&format!(" AND project_id IN ({})", placeholders.join(", ")));
        }
        sql.push_str(" ORDER BY id DESC LIMIT $3");
        let mut query = sqlx::query(&sql)
            .bind(organisation_id)
            .bind(before.unwrap_or(i64::MAX))
            .bind(i64::from(limit));
        for project in projects.into_iter().flatten() {
            query = query.bind(project);
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter()
            .map(|row| {
                Ok(AuditEntry {
                    id: row.try_get(0)?,
                    organisation_id: row.try_get(1)?,
                    project_id: row.try_get(2)?,
                    actor: row.try_get(3)?,
                    action: row.try_get(4)?,
                    target: row.try_get(5)?,
                    status: row.try_get(6)?,
                    at: row.try_get(7)?,
                })
            })
            .collect()
    }
}

pub(super) async fn insert_key(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    key: &ApiKey,
    secret: &str,
) -> Result<()> {
    let projects = key
        .projects
        .as_ref()
        .map(|projects| serde_json::to_string(projects).expect("strings serialise"));
    sqlx::query(
        "INSERT INTO api_keys (id, organisation_id, name, key_hash, key_prefix, scope, projects, created_by, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(&key.id)
    .bind(&key.organisation_id)
    .bind(&key.name)
    .bind(hash_key(secret))
    .bind(&key.prefix)
    .bind(key.scope.as_str())
    .bind(projects)
    .bind(&key.created_by)
    .bind(&key.created_at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
