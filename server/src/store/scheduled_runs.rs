//! The `scheduled_runs` table: one row per run of a plugin's scheduled
//! task that some process claimed. Its primary key is the whole claim
//! (config, task, due time), so an insert that conflicts is a run another
//! process already took: every process sharing the store may fire the
//! same schedule, and exactly one runs it.

use super::{Result, Store};

impl Store {
    /// Claims the run of `task` due at `fire_at`; true for exactly one
    /// caller across every process sharing the store.
    pub async fn claim_scheduled_run(
        &self,
        plugin_config_id: &str,
        task: &str,
        fire_at: &str,
        owner: &str,
    ) -> Result<bool> {
        let done = sqlx::query(
            "INSERT INTO scheduled_runs (plugin_config_id, task, fire_at, owner) VALUES ($1, $2, $3, $4)
             ON CONFLICT (plugin_config_id, task, fire_at) DO NOTHING",
        )
        .bind(plugin_config_id)
        .bind(task)
        .bind(fire_at)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }
}
