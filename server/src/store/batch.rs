//! Storing a processed batch: the one transaction that writes what the
//! pipeline made of claimed queue rows (dead letters, plugin logs and
//! health, events, persons, outbox rows) and removes those rows from the
//! queue. It owns no table; each statement is in its table's file and
//! takes this transaction.
//!
//! Everything here works on batches: storing one is a handful of
//! multi-row statements, so its cost is a few round trips whatever the
//! batch's size.

use super::db::Commit;
use super::{
    Backend, Claim, Claimed, DeadLetter, PluginHealth, QueuedEvent, Result, Store, capture_queue,
    dead_letters, events, now_rfc3339, outbox, persons, plugin_configs, plugin_logs,
};

/// Everything the pipeline made of a claimed batch, written in one
/// transaction with the removal of the batch from the queue.
#[derive(Debug, Default)]
pub struct ProcessedBatch {
    /// Events to store, by project.
    pub events: Vec<(String, QueuedEvent)>,
    pub dead_letters: Vec<DeadLetter>,
    /// Plugin log lines, by plugin config id.
    pub logs: Vec<(String, crate::model::LogRecord)>,
    pub health: Vec<PluginHealth>,
}

impl Store {
    /// Stores the events made from claimed rows, applying their person
    /// changes in order, writes their outbox rows, and removes the claimed
    /// rows, in one transaction; with `next`, the same transaction leases
    /// the next batch, which saves the worker a transaction (on SQLite, a
    /// turn at the write lock) per batch. An event already stored under its
    /// (project, uuid) is left as it is, so a replay stores nothing twice.
    pub async fn complete(
        &self,
        owner: &str,
        ids: &[i64],
        batch: &ProcessedBatch,
        next: Option<&Claim>,
    ) -> Result<Vec<Claimed>> {
        // Everything that needs no database is done before the write lock
        // is taken, or after it is given back: on SQLite every capture
        // commit waits for this transaction, and serialising 500 events'
        // properties inside it, or parsing the next 500, held them up.
        let properties: Vec<String> = batch
            .events
            .iter()
            .map(|(_, event)| {
                serde_json::to_string(&event.properties).expect("properties serialise")
            })
            .collect();
        let (mut tx, turn) = self.write_with(Commit::Redoable).await?;
        let now = now_rfc3339();
        let backend = self.backend();
        if backend == Backend::Postgres {
            // The statements below look rows up by long key lists (see
            // `keyed_lookup`). A plan cached while a table was still small
            // keeps reading every row of the project and comparing it with
            // each key: 1.5 s per batch once `events` held 100,000 rows,
            // until the next ANALYZE. Planning each statement for its
            // values costs well under a millisecond and follows the table
            // as it grows.
            sqlx::query("SET LOCAL plan_cache_mode = force_custom_plan")
                .execute(&mut *tx)
                .await?;
        }
        let secrets = &self.secrets;
        dead_letters::insert_transform(&mut tx, backend, secrets, &batch.dead_letters, &now)
            .await?;
        plugin_logs::insert_config_logs(&mut tx, backend, secrets, &batch.logs).await?;
        plugin_configs::record_health(&mut tx, secrets, &batch.health, &now).await?;

        let fresh_indexes = events::unstored(&mut tx, backend, &batch.events).await?;
        let fresh: Vec<(&str, &QueuedEvent)> = fresh_indexes
            .iter()
            .map(|&i| (batch.events[i].0.as_str(), &batch.events[i].1))
            .collect();
        let person_ids = persons::resolve(&mut tx, backend, &fresh).await?;
        let rows: Vec<(&str, &QueuedEvent, &str, &str)> = fresh
            .iter()
            .zip(&fresh_indexes)
            .zip(&person_ids)
            .map(|(((project_id, event), &i), person_id)| {
                (
                    *project_id,
                    *event,
                    person_id.as_str(),
                    properties[i].as_str(),
                )
            })
            .collect();
        events::insert(&mut tx, backend, &rows).await?;
        let stored: Vec<(&str, &QueuedEvent, &str)> = fresh
            .iter()
            .zip(&person_ids)
            .map(|((project_id, event), person_id)| (*project_id, *event, person_id.as_str()))
            .collect();
        outbox::fan_out(&mut tx, backend, &stored).await?;
        capture_queue::delete_claimed(&mut tx, backend, owner, ids).await?;
        let claimed = match next {
            Some(claim) => self.claim_in(&mut tx, owner, claim).await?,
            None => Vec::new(),
        };
        tx.commit().await?;
        drop(turn);
        capture_queue::parse_claimed(claimed)
    }
}
