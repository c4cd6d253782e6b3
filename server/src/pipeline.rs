//! The pipeline worker: leases events from the durable queue, runs each
//! through its project's chain of transformation plugins, stores what comes
//! out once per (project, uuid), and only then removes the events from the
//! queue, so a crash at any point leaves each event either queued or stored.
//!
//! A failing plugin follows its install's policy: fail-open (the default)
//! passes the event on unchanged, fail-closed sends it to dead letters. Both
//! log the error with the event's uuid. A plugin config that fails
//! [`AUTO_DISABLE_AFTER`] events in a row is disabled with the reason shown.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::watch;

use crate::runtime::{
    Hook, Install, LogLevel, LogRecord, PluginEvent, PluginInstance, Runtime, TransformFailure,
};
use crate::server::AppState;
use crate::store::{
    Backend, Claim, Claimed, DeadLetter, PluginConfig, PluginHealth, ProcessedBatch, QueuedEvent,
    Store,
};

/// Rows leased per round trip.
const CLAIM_BATCH: u32 = 500;

/// How long an idle worker waits before looking again, in case a wake-up
/// was missed (another process enqueued, or a lease expired).
const IDLE_POLL: Duration = Duration::from_millis(200);

/// How often a busy worker's claims start again from the head of the
/// queue; see [`ClaimCursor`].
const REWIND_EVERY: Duration = Duration::from_secs(1);

/// Consecutive failed events after which a plugin config is disabled.
pub const AUTO_DISABLE_AFTER: i64 = 10;

/// One plugin config of a chain, instantiated.
struct Link {
    config_id: String,
    fail_closed: bool,
    instance: PluginInstance,
    /// As stored; a change is written back with the batch.
    stored_failures: i64,
    failures: i64,
    disabled_reason: Option<String>,
}

/// Every project's chain, rebuilt when any plugin config changes.
#[derive(Default)]
struct Chains {
    stamp: String,
    by_project: HashMap<String, Vec<Link>>,
}

impl Chains {
    async fn refresh(&mut self, store: &Store, runtime: &Runtime) -> anyhow::Result<()> {
        let stamp = store.plugin_configs_stamp().await?;
        if stamp == self.stamp {
            return Ok(());
        }
        let mut by_project: HashMap<String, Vec<Link>> = HashMap::new();
        for config in store.enabled_plugin_configs().await? {
            // Destinations get their events from delivery, not the chain.
            let transforms = config
                .manifest
                .as_ref()
                .is_none_or(|m| m.has_hook(Hook::Transform));
            if !transforms {
                continue;
            }
            match instantiate(store, runtime, &config).await {
                Ok(instance) if !instance.plugin().manifest().has_hook(Hook::Transform) => {}
                Ok(instance) => by_project
                    .entry(config.project_id.clone())
                    .or_default()
                    .push(Link {
                        config_id: config.id,
                        fail_closed: config.failure_policy == "closed",
                        instance,
                        stored_failures: config.consecutive_failures,
                        failures: config.consecutive_failures,
                        disabled_reason: None,
                    }),
                Err(reason) => {
                    tracing::warn!(plugin_config = %config.id, "disabling plugin config: {reason}");
                    store.disable_plugin_config(&config.id, &reason).await?;
                }
            }
        }
        // Disabling changed the stamp; read it after, so the next round does
        // not rebuild for our own change.
        self.stamp = store.plugin_configs_stamp().await?;
        self.by_project = by_project;
        Ok(())
    }
}

pub(crate) async fn instantiate(
    store: &Store,
    runtime: &Runtime,
    config: &PluginConfig,
) -> Result<PluginInstance, String> {
    let wasm = store
        .plugin_wasm(&config.plugin_sha256)
        .await
        .map_err(|err| format!("failed to read the plugin: {err}"))?
        .ok_or_else(|| format!("plugin {} is not installed", config.plugin_sha256))?;
    let runtime = runtime.clone();
    let install = Install {
        install_id: config.id.clone(),
        config: config.config.clone(),
        limits: None,
    };
    tokio::task::spawn_blocking(move || {
        let plugin = runtime
            .load(&wasm)
            .map_err(|err| format!("failed to load the plugin: {err}"))?;
        plugin
            .install(install)
            .map_err(|err| format!("failed to start: {err}"))
    })
    .await
    .map_err(|err| format!("failed to start: {err}"))?
}

fn to_plugin_event(event: QueuedEvent) -> PluginEvent {
    PluginEvent {
        uuid: event.uuid,
        name: event.event,
        distinct_id: event.distinct_id,
        timestamp: event.timestamp,
        properties: event.properties,
    }
}

fn to_queued(event: PluginEvent, received_at: &str) -> QueuedEvent {
    QueuedEvent {
        uuid: event.uuid,
        event: event.name,
        distinct_id: event.distinct_id,
        timestamp: event.timestamp,
        received_at: received_at.to_string(),
        properties: event.properties,
    }
}

/// Runs claimed events through their projects' chains. CPU-bound: called on
/// a blocking thread.
fn process(chains: &mut Chains, claimed: Vec<Claimed>) -> ProcessedBatch {
    let mut batch = ProcessedBatch::default();
    for Claimed {
        project_id, event, ..
    } in claimed
    {
        let Some(chain) = chains.by_project.get_mut(&project_id) else {
            batch.events.push((project_id, event));
            continue;
        };
        let received_at = event.received_at.clone();
        let mut current = vec![to_plugin_event(event)];
        for link in chain
            .iter_mut()
            .filter(|link| link.disabled_reason.is_none())
        {
            let mut next = Vec::with_capacity(current.len());
            for event in current {
                // A failure hands the input back unchanged, for fail-open to
                // pass on and fail-closed to dead-letter.
                match link.instance.transform_keeping_input(event) {
                    Ok(out) => {
                        link.failures = 0;
                        next.extend(out);
                    }
                    Err(failure) => {
                        let TransformFailure {
                            error: err,
                            input: event,
                        } = *failure;
                        link.failures += 1;
                        let message = err.to_string();
                        batch.logs.push((
                            link.config_id.clone(),
                            LogRecord {
                                at: crate::store::now_rfc3339(),
                                level: LogLevel::Error,
                                message: format!(
                                    "{message} (event {}: {})",
                                    if link.fail_closed {
                                        "sent to dead letters"
                                    } else {
                                        "passed on unchanged"
                                    },
                                    event.uuid
                                ),
                                fields: Vec::new(),
                                event_uuid: Some(event.uuid.clone()),
                            },
                        ));
                        if link.fail_closed {
                            batch.dead_letters.push(DeadLetter {
                                project_id: project_id.clone(),
                                plugin_config_id: link.config_id.clone(),
                                event: serde_json::to_value(&event).unwrap_or(Value::Null),
                                error: message.clone(),
                            });
                        } else {
                            next.push(event);
                        }
                        if link.failures >= AUTO_DISABLE_AFTER {
                            link.disabled_reason = Some(format!(
                                "disabled after {AUTO_DISABLE_AFTER} consecutive failed events; the last: {message}"
                            ));
                        }
                    }
                }
                if link.disabled_reason.is_some() {
                    // The rest of this event's copies skip the disabled plugin.
                    break;
                }
            }
            current = next;
            if current.is_empty() {
                break;
            }
        }
        batch.events.extend(
            current
                .into_iter()
                .map(|e| (project_id.clone(), to_queued(e, &received_at))),
        );
    }
    for link in chains.by_project.values_mut().flatten() {
        let (logs, _) = link.instance.take_activity();
        batch.logs.extend(
            logs.into_iter()
                .map(|record| (link.config_id.clone(), record)),
        );
        if link.failures != link.stored_failures || link.disabled_reason.is_some() {
            batch.health.push(PluginHealth {
                plugin_config_id: link.config_id.clone(),
                consecutive_failures: link.failures,
                disabled_reason: link.disabled_reason.clone(),
            });
            link.stored_failures = link.failures;
        }
    }
    batch
}

/// Where the next claim starts: forward from the last claimed id, and
/// back to the start now and then (see [`Claim::after`]).
///
/// On PostgreSQL rows can appear behind the cursor at any time (another
/// process gives rows back, a lease runs out, a capture transaction commits
/// after a later one), so the cursor goes back every [`REWIND_EVERY`];
/// leased rows are skipped, so going back never takes a batch twice. On
/// SQLite one process writes, and ids are handed out in commit order, so
/// rows fall behind the cursor only when storing a batch failed, and the
/// cursor goes back only then: with leases kept in memory, going back
/// while a batch is in flight would take it again.
struct ClaimCursor {
    after: i64,
    rewound_at: Instant,
    periodic: bool,
}

impl ClaimCursor {
    fn new(backend: Backend) -> Self {
        ClaimCursor {
            after: 0,
            rewound_at: Instant::now(),
            periodic: backend == Backend::Postgres,
        }
    }

    fn next(&mut self, state: &AppState) -> Claim {
        if self.periodic && self.rewound_at.elapsed() >= REWIND_EVERY {
            self.rewind();
        }
        Claim {
            limit: CLAIM_BATCH,
            lease: state.config.lease,
            after: self.after,
        }
    }

    fn advance(&mut self, claimed: &[Claimed]) {
        if let Some(last) = claimed.last() {
            self.after = self.after.max(last.id);
        }
    }

    /// Returns whether there was anything behind the cursor to go back to.
    fn rewind(&mut self) -> bool {
        self.rewound_at = Instant::now();
        std::mem::replace(&mut self.after, 0) > 0
    }
}

/// A batch that has been through the chains, waiting to be stored.
struct Processed {
    ids: Vec<i64>,
    batch: ProcessedBatch,
    chain_time: Duration,
}

/// The worker: each round runs one claimed batch through the chains on a
/// blocking thread while, at the same time, one transaction stores the
/// batch processed in the round before and leases the next. Batches are
/// stored in the order they were claimed, and the chains and the database
/// keep both cores busy.
pub async fn run_worker(state: AppState, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let owner = format!("worker-{}", uuid::Uuid::new_v4());
    let mut chains = Chains::default();
    let mut cursor = ClaimCursor::new(state.store.backend());
    let mut claimed: Vec<Claimed> = Vec::new();
    let mut processed: Option<Processed> = None;
    loop {
        if *stop.borrow() {
            break;
        }
        if let Err(err) = chains.refresh(&state.store, &state.runtime).await {
            tracing::error!("failed to load plugin configs: {err:#}");
            tokio::time::sleep(IDLE_POLL).await;
            continue;
        }
        if claimed.is_empty() && processed.is_none() {
            claimed = match state.store.claim(&owner, &cursor.next(&state)).await {
                Ok(claimed) => claimed,
                Err(err) => {
                    tracing::error!("failed to lease queued events: {err}");
                    tokio::time::sleep(IDLE_POLL).await;
                    continue;
                }
            };
            if claimed.is_empty() {
                if cursor.rewind() {
                    continue;
                }
                tokio::select! {
                    _ = state.wake_worker.notified() => {}
                    _ = tokio::time::sleep(IDLE_POLL) => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
            cursor.advance(&claimed);
        }

        let to_process = std::mem::take(&mut claimed);
        let processing = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let ids: Vec<i64> = to_process.iter().map(|c| c.id).collect();
            let batch = (!to_process.is_empty()).then(|| process(&mut chains, to_process));
            (chains, ids, batch, started.elapsed())
        });
        let next = cursor.next(&state);
        let stored = match processed.take() {
            Some(done) => (store(&state, &owner, &done, Some(&next)).await, Some(done)),
            // Nothing to store yet: lease the next batch on its own, so the
            // next round has both a batch to process and one to store.
            None => (state.store.claim(&owner, &next).await, None),
        };
        let (returned, ids, batch, chain_time) = processing.await?;
        chains = returned;
        processed = batch.map(|batch| Processed {
            ids,
            batch,
            chain_time,
        });
        match stored {
            (Ok(next_batch), _) => {
                cursor.advance(&next_batch);
                claimed = next_batch;
            }
            (Err(err), Some(done)) => {
                tracing::error!(
                    "failed to store {} events of {} queued rows: {err}; they will be retried",
                    done.batch.events.len(),
                    done.ids.len()
                );
                if let Err(err) = state.store.release_rows(&owner, &done.ids).await {
                    tracing::error!(
                        "failed to give back queued rows: {err}; their lease will run out"
                    );
                }
                cursor.rewind();
                tokio::time::sleep(IDLE_POLL).await;
            }
            (Err(err), None) => {
                tracing::error!("failed to lease queued events: {err}");
                tokio::time::sleep(IDLE_POLL).await;
            }
        }
    }
    if let Some(done) = processed.take()
        && let Err(err) = store(&state, &owner, &done, None).await
    {
        tracing::error!(
            "failed to store the last {} events before stopping: {err}; they stay queued",
            done.batch.events.len()
        );
    }
    state.store.release(&owner).await?;
    Ok(())
}

/// Stores a processed batch and, with `next`, leases the next one in the
/// same transaction.
async fn store(
    state: &AppState,
    owner: &str,
    done: &Processed,
    next: Option<&Claim>,
) -> crate::store::Result<Vec<Claimed>> {
    let started = Instant::now();
    let claimed = state
        .store
        .complete(owner, &done.ids, &done.batch, next)
        .await?;
    stored(state, done, started);
    Ok(claimed)
}

fn stored(state: &AppState, done: &Processed, started: Instant) {
    state.queue.removed(done.ids.len());
    // Only a round with a large batch says what the pipeline can do: a
    // small one means it keeps up, and its fixed costs would make the
    // pipeline look slower than it is. Chains and storing overlap, so a
    // round takes the longer of the two.
    if done.ids.len() >= CLAIM_BATCH as usize / 2 {
        state
            .queue
            .record_round(done.ids.len(), started.elapsed().max(done.chain_time));
    }
    state.wake_delivery.notify_waiters();
    tracing::debug!(
        rows = done.ids.len(),
        events = done.batch.events.len(),
        chain_ms = done.chain_time.as_secs_f64() * 1000.0,
        store_ms = started.elapsed().as_secs_f64() * 1000.0,
        "stored a batch"
    );
}
