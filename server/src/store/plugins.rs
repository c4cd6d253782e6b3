//! The `plugins` table: each installed plugin's `.wasm` and manifest,
//! stored once under the `.wasm`'s sha256 and shared by every install of
//! it (see `plugin_configs`). Rows are never changed, only added, so
//! storing the same plugin twice is a no-op.

use super::{Result, Store, now_rfc3339};
use crate::model::Manifest;

impl Store {
    /// Stores a plugin's `.wasm` under its sha256. Storing it again keeps
    /// the row but sets whether it is a destination, which a process of an
    /// older version (sharing a PostgreSQL database during an upgrade) may
    /// have stored without.
    pub async fn save_plugin(&self, sha256: &str, manifest: &Manifest, wasm: &[u8]) -> Result<()> {
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
        .execute(&self.pool)
        .await
        .map(|_| ())
        .map_err(Into::into)
    }

    pub async fn plugin_wasm(&self, sha256: &str) -> Result<Option<Vec<u8>>> {
        sqlx::query_scalar("SELECT wasm FROM plugins WHERE sha256 = $1")
            .bind(sha256)
            .fetch_optional(&self.pool)
            .await
            .map_err(Into::into)
    }
}
