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
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::watch;

use crate::runtime::{Hook, Install, LogLevel, LogRecord, PluginEvent, PluginInstance, Runtime};
use crate::server::AppState;
use crate::store::{
    Claimed, DeadLetter, PluginConfig, PluginHealth, ProcessedBatch, QueuedEvent, Store,
};

/// Rows leased per round trip.
const CLAIM_BATCH: u32 = 500;

/// How long an idle worker waits before looking again, in case a wake-up
/// was missed (another process enqueued, or a lease expired).
const IDLE_POLL: Duration = Duration::from_millis(200);

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
                // Kept for fail-open, which passes the input on unchanged.
                match link.instance.transform(event.clone()) {
                    Ok(out) => {
                        link.failures = 0;
                        next.extend(out);
                    }
                    Err(err) => {
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

pub async fn run_worker(state: AppState, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let owner = format!("worker-{}", uuid::Uuid::new_v4());
    let mut chains = Chains::default();
    loop {
        if *stop.borrow() {
            break;
        }
        if let Err(err) = chains.refresh(&state.store, &state.runtime).await {
            tracing::error!("failed to load plugin configs: {err:#}");
            tokio::time::sleep(IDLE_POLL).await;
            continue;
        }
        let claimed = match state
            .store
            .claim(&owner, CLAIM_BATCH, state.config.lease)
            .await
        {
            Ok(claimed) => claimed,
            Err(err) => {
                tracing::error!("failed to lease queued events: {err}");
                tokio::time::sleep(IDLE_POLL).await;
                continue;
            }
        };
        if claimed.is_empty() {
            if let Ok(depth) = state.store.queue_depth().await {
                state.queue_depth.store(depth, Ordering::Relaxed);
            }
            tokio::select! {
                _ = state.wake_worker.notified() => {}
                _ = tokio::time::sleep(IDLE_POLL) => {}
                _ = stop.changed() => {}
            }
            continue;
        }
        let ids: Vec<i64> = claimed.iter().map(|c| c.id).collect();
        let (returned, batch) = tokio::task::spawn_blocking(move || {
            let batch = process(&mut chains, claimed);
            (chains, batch)
        })
        .await?;
        chains = returned;
        match state.store.complete(&owner, &ids, &batch).await {
            Ok(()) => {
                state
                    .queue_depth
                    .fetch_sub(ids.len() as i64, Ordering::Relaxed);
                state.wake_delivery.notify_waiters();
            }
            Err(err) => {
                // The lease runs out and the rows are taken again.
                tracing::error!("failed to store {} events: {err}", batch.events.len());
                tokio::time::sleep(IDLE_POLL).await;
            }
        }
    }
    state.store.release(&owner).await?;
    Ok(())
}
