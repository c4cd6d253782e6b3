//! Retention: plugin log lines and dead letters are pruned in the
//! background, per project, by that project's quotas
//! (`log_retention_days`, `log_lines_per_config`,
//! `dead_letter_retention_days`). A plugin that logs a line per event, or
//! a destination that dead-letters everything, would otherwise grow the
//! shared database without bound.
//!
//! Each round deletes in chunks of `store::PRUNE_CHUNK` rows, each in its
//! own short write transaction, so capture's commits never wait long
//! behind it.

use std::time::Duration;

use chrono::Utc;
use tokio::sync::watch;

use crate::model::format_timestamp;
use crate::quotas::QuotaBook;
use crate::store::Store;
use crate::supervisor::Health;

/// What retention needs.
#[derive(Clone)]
pub struct Retention {
    pub store: Store,
    pub quotas: QuotaBook,
    /// Time between rounds.
    pub period: Duration,
}

/// What one round deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    pub log_lines: u64,
    pub dead_letters: u64,
}

impl Retention {
    /// Prunes every project once, as of `now`.
    pub async fn prune(&self, now: chrono::DateTime<Utc>) -> crate::store::Result<Pruned> {
        let mut pruned = Pruned::default();
        for project_id in self.store.project_ids().await? {
            let quotas = self.quotas.get(&project_id);
            let logs_before = days_before(now, quotas.log_retention_days);
            for config in self.store.plugin_configs(&project_id).await? {
                pruned.log_lines += self
                    .store
                    .prune_plugin_logs(&config.id, &logs_before, quotas.log_lines_per_config)
                    .await?;
            }
            let letters_before = days_before(now, quotas.dead_letter_retention_days);
            pruned.dead_letters += self
                .store
                .prune_dead_letters(&project_id, &letters_before)
                .await?;
        }
        Ok(pruned)
    }
}

fn days_before(now: chrono::DateTime<Utc>, days: u32) -> String {
    format_timestamp(now - chrono::Duration::days(i64::from(days)))
}

/// Prunes every `retention.period` until `stop`, starting at once. A
/// failed round is logged and tried again next period: nothing waits on
/// retention, so it is no reason to restart or to report not ready.
pub async fn run_retention(
    retention: Retention,
    health: Health,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    health.ready();
    loop {
        // Stopping drops a round between or inside its chunks; each chunk
        // is a transaction, so what it had deleted stays deleted and the
        // rest waits for the next start.
        let round = tokio::select! {
            round = retention.prune(Utc::now()) => round,
            _ = stop.changed() => return Ok(()),
        };
        match round {
            Ok(pruned) if pruned != Pruned::default() => tracing::info!(
                log_lines = pruned.log_lines,
                dead_letters = pruned.dead_letters,
                "pruned plugin log lines and dead letters past their projects' retention"
            ),
            Ok(_) => {}
            Err(err) => tracing::warn!(
                "failed to prune plugin logs and dead letters; trying again in {} s: {err}",
                retention.period.as_secs()
            ),
        }
        tokio::select! {
            _ = tokio::time::sleep(retention.period) => {}
            _ = stop.changed() => return Ok(()),
        }
    }
}
