//! The `plugins` table: each installed plugin's `.wasm` and manifest,
//! stored once under the `.wasm`'s sha256 and shared by every install of
//! it (see `plugin_configs`). Rows are never changed, only added, so
//! storing the same plugin twice is a no-op.

use sqlx::Row;

use super::{Result, Store, now_rfc3339};
use crate::model::Manifest;

/// What became of an upload.
#[derive(Debug, PartialEq, Eq)]
pub enum Upload {
    Saved,
    /// The project has uploaded its `plugins` quota of files.
    TooMany,
    /// The file would take the project over its `plugin_bytes` quota.
    TooLarge {
        stored: u64,
    },
}

impl Store {
    /// Stores a plugin uploaded by `project_id` under its sha256, unless it
    /// is new to the project and would take the project over `max_plugins`
    /// files or `max_bytes` bytes. Uploading a file the project uploaded
    /// before counts once. Storing a file again keeps the row but sets
    /// whether it is a destination, which a process of an older version
    /// (sharing a PostgreSQL database during an upgrade) may have stored
    /// without.
    pub async fn save_uploaded_plugin(
        &self,
        project_id: &str,
        sha256: &str,
        manifest: &Manifest,
        wasm: &[u8],
        max_plugins: u32,
        max_bytes: u64,
    ) -> Result<Upload> {
        let (mut tx, _turn) = self.write().await?;
        super::projects::lock_project(&mut tx, self.backend(), project_id).await?;
        let known: Option<i64> = sqlx::query_scalar(
            "SELECT bytes FROM plugin_uploads WHERE project_id = $1 AND sha256 = $2",
        )
        .bind(project_id)
        .bind(sha256)
        .fetch_optional(&mut *tx)
        .await?;
        if known.is_none() {
            let row = sqlx::query(
                "SELECT COUNT(*), CAST(COALESCE(SUM(bytes), 0) AS BIGINT) FROM plugin_uploads WHERE project_id = $1",
            )
            .bind(project_id)
            .fetch_one(&mut *tx)
            .await?;
            let (files, bytes): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
            if files >= i64::from(max_plugins) {
                return Ok(Upload::TooMany);
            }
            if bytes as u64 + wasm.len() as u64 > max_bytes {
                return Ok(Upload::TooLarge {
                    stored: bytes as u64,
                });
            }
            sqlx::query(
                "INSERT INTO plugin_uploads (project_id, sha256, bytes, created_at) VALUES ($1, $2, $3, $4)",
            )
            .bind(project_id)
            .bind(sha256)
            .bind(wasm.len() as i64)
            .bind(now_rfc3339())
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(
            "INSERT INTO plugins (sha256, name, version, manifest, wasm, created_at, destination)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (sha256) DO UPDATE SET destination = excluded.destination",
        )
        .bind(sha256)
        .bind(&manifest.name)
        .bind(manifest.version.to_string())
        .bind(serde_json::to_string(manifest).expect("manifests serialise"))
        .bind(wasm)
        .bind(now_rfc3339())
        .bind(manifest.is_destination() as i64)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Upload::Saved)
    }

    pub async fn plugin_wasm(&self, sha256: &str) -> Result<Option<Vec<u8>>> {
        sqlx::query_scalar("SELECT wasm FROM plugins WHERE sha256 = $1")
            .bind(sha256)
            .fetch_optional(&self.pool)
            .await
            .map_err(Into::into)
    }
}
