//! Delivery: moves events from each destination's outbox into its plugin's
//! `export-batch`.
//!
//! Each enabled, unpaused destination install gets `concurrency` lanes per
//! process. A lane leases a batch from the outbox (waiting up to `linger_ms`
//! for a full one), exports it under the runtime's limits while keeping the
//! lease alive, and records the outcome in one transaction:
//! - delivered: the rows leave the outbox;
//! - retryable: the rows wait with exponential backoff and jitter, at least
//!   as long as the plugin asked, and the lane holds off the destination
//!   until then; once a batch has failed for `max_retry_seconds` it goes to
//!   dead letters and the destination is paused;
//! - permanent: the rows go to dead letters; after
//!   [`PAUSE_AFTER_DEAD_BATCHES`] such batches in a row the destination is
//!   paused, since its config is likely wrong.
//!
//! A batch whose plugin had no room to run (the sandbox's pool was full,
//! or the project held every instance its `instances` quota allows) is
//! given back as it was: no attempt counts, so waiting for room never ends
//! in dead letters or a paused destination.
//!
//! A crash leaves rows leased; the lease runs out and another lane takes
//! them, so every event is delivered at least once or dead-lettered.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::configs::{self, ConfigWatch};
use crate::loader;
use crate::metrics::{DestinationMetrics, FailureKind, Hook, Metrics, PluginMetrics};
use crate::model::{AttemptOutcome, format_timestamp};
use crate::queue::Wakeups;
use crate::quotas::QuotaBook;
use crate::runtime::{
    ExportFailure, ExportedEvent, LogLevel, LogRecord, PluginError, PluginInstance, Runtime,
    TrapReason,
};
use crate::store::{
    Attempt, DeliveryRecord, DeliverySettings, Disposition, OutboxRow, PluginConfig, Store,
    now_rfc3339,
};
use crate::supervisor::Health;

/// Batches dead-lettered in a row after which a destination is paused.
pub const PAUSE_AFTER_DEAD_BATCHES: i64 = 5;

/// How often the set of lanes is checked for lanes that ended.
const LANE_CHECK: Duration = Duration::from_secs(1);

/// How long an idle lane waits before looking again, in case a wake-up was
/// missed (another process stored events, or a retry came due).
const IDLE_POLL: Duration = Duration::from_millis(250);

/// How often a busy lane's claims start again from the head of the outbox,
/// for rows its cursor passed: retries that came due, leases that ran out,
/// rows another lane gave back, and rows of a transaction that committed
/// after a later one (PostgreSQL hands out ids before commit).
const REWIND_EVERY: Duration = Duration::from_secs(1);

/// How long a destination waits after its plugin found no room to run.
const NO_ROOM_WAIT: Duration = Duration::from_secs(1);

/// What delivery needs: the outboxes, the plugins, the published configs
/// and the wake-up the worker sends when events reach an outbox.
#[derive(Clone)]
pub struct Delivery {
    pub store: Store,
    pub runtime: Runtime,
    pub configs: ConfigWatch,
    pub wake: Wakeups,
    /// How long a leased batch stays with a lane.
    pub lease: Duration,
    pub quotas: QuotaBook,
    pub metrics: Arc<Metrics>,
}

/// Runs the lanes of every active destination until `stop`, restarting a
/// destination's lanes when its install changes.
pub async fn run_delivery(
    delivery: Delivery,
    health: Health,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut running: HashMap<String, Lanes> = HashMap::new();
    let mut configs = delivery.configs.subscribe();
    let mut snapshot = configs::first(&mut configs, &mut stop).await;
    while let Some(current) = snapshot {
        reconcile(&delivery, &mut running, &current).await;
        health.ready();
        snapshot = tokio::select! {
            changed = configs.changed() => match changed {
                Ok(()) => configs.borrow_and_update().clone(),
                Err(_) => None,
            },
            // Lanes that ended on their own (a failed write, a panic) are
            // started again even when no config changes.
            _ = tokio::time::sleep(LANE_CHECK) => configs.borrow().clone(),
            _ = stop.changed() => None,
        };
    }
    for (_, lanes) in running.drain() {
        lanes.stop().await;
    }
    Ok(())
}

/// The lanes of one destination install.
struct Lanes {
    /// Everything that, changed, needs new lanes.
    fingerprint: String,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Lanes {
    /// Lets each lane finish its batch and give back its leases.
    async fn stop(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Lanes restart on any change to their install, since they stop at one,
/// and when their number changes.
fn fingerprint(config: &PluginConfig, lanes: usize) -> String {
    format!(
        "{}/{}/{lanes}",
        config.updated_at,
        config.paused_reason.is_some()
    )
}

async fn reconcile(
    delivery: &Delivery,
    running: &mut HashMap<String, Lanes>,
    configs: &[PluginConfig],
) {
    let active: HashMap<String, PluginConfig> = configs
        .iter()
        .filter(|c| c.is_destination() && c.paused_reason.is_none())
        .map(|c| (c.id.clone(), c.clone()))
        .collect();
    let allotted = allot_lanes(&active.values().collect::<Vec<_>>(), &delivery.quotas);
    let stale: Vec<String> = running
        .iter()
        .filter(|(id, lanes)| {
            lanes.tasks.iter().any(JoinHandle::is_finished)
                || active.get(*id).is_none_or(|config| {
                    fingerprint(config, allotted.get(*id).copied().unwrap_or(1))
                        != lanes.fingerprint
                })
        })
        .map(|(id, _)| id.clone())
        .collect();
    for id in stale {
        if let Some(lanes) = running.remove(&id) {
            lanes.stop().await;
        }
    }
    for (id, config) in active {
        if running.contains_key(&id) {
            continue;
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        let count = allotted.get(&id).copied().unwrap_or(1);
        let destination = Arc::new(Destination::new(config, &delivery.metrics));
        let tasks = (0..count)
            .map(|_| tokio::spawn(lane(delivery.clone(), destination.clone(), stop_rx.clone())))
            .collect();
        running.insert(
            id,
            Lanes {
                fingerprint: fingerprint(&destination.config, count),
                stop: stop_tx,
                tasks,
            },
        );
    }
}

/// How many lanes each destination gets: what it asks for (`concurrency`),
/// within its project's `delivery_lanes` quota. Every lane keeps a plugin
/// instance, so without the quota one project's destinations asking for 64
/// lanes each would fill the sandbox's pool. Each destination gets one
/// lane whatever the quota, so none is starved; the rest of the project's
/// lanes go round its destinations one at a time.
fn allot_lanes(configs: &[&PluginConfig], quotas: &QuotaBook) -> HashMap<String, usize> {
    let mut by_project: HashMap<&str, Vec<&PluginConfig>> = HashMap::new();
    for config in configs {
        by_project
            .entry(config.project_id.as_str())
            .or_default()
            .push(config);
    }
    let mut lanes = HashMap::new();
    for (project_id, mut destinations) in by_project {
        destinations.sort_by(|a, b| a.id.cmp(&b.id));
        let mut left =
            (quotas.get(project_id).delivery_lanes as usize).saturating_sub(destinations.len());
        let mut counts: Vec<usize> = vec![1; destinations.len()];
        while left > 0 {
            let mut gave = false;
            for (count, config) in counts.iter_mut().zip(&destinations) {
                if left > 0 && *count < config.delivery.concurrency as usize {
                    *count += 1;
                    left -= 1;
                    gave = true;
                }
            }
            if !gave {
                break;
            }
        }
        for (config, count) in destinations.iter().zip(counts) {
            lanes.insert(config.id.clone(), count);
        }
    }
    lanes
}

/// What the lanes of one destination share.
struct Destination {
    config: PluginConfig,
    settings: DeliverySettings,
    /// No lane starts a batch before this, after a retryable failure.
    hold_until: Mutex<Option<Instant>>,
    /// The earliest start of the next export, for the rate limit.
    next_start: Mutex<Instant>,
    /// Its export calls.
    calls: PluginMetrics,
    /// What became of its batches.
    outcomes: DestinationMetrics,
}

impl Destination {
    fn new(config: PluginConfig, metrics: &Metrics) -> Self {
        Destination {
            settings: config.delivery.clone(),
            calls: metrics.plugin(&config, Hook::Export),
            outcomes: metrics.destination(&config),
            config,
            hold_until: Mutex::new(None),
            next_start: Mutex::new(Instant::now()),
        }
    }

    fn held_for(&self) -> Option<Duration> {
        let hold = *self.hold_until.lock().expect("hold lock");
        hold.and_then(|until| until.checked_duration_since(Instant::now()))
    }

    fn hold(&self, until: Instant) {
        let mut hold = self.hold_until.lock().expect("hold lock");
        *hold = Some(hold.map_or(until, |current| current.max(until)));
    }

    fn release_hold(&self) {
        *self.hold_until.lock().expect("hold lock") = None;
    }

    /// Takes the next export slot and says how long to wait for it.
    fn rate_slot(&self, now: Instant) -> Duration {
        let Some(rate) = self.settings.max_batches_per_second else {
            return Duration::ZERO;
        };
        let mut next = self.next_start.lock().expect("rate lock");
        let start = (*next).max(now);
        *next = start + Duration::from_secs_f64(1.0 / rate);
        start - now
    }
}

/// Sleeps for `wait` unless told to stop; true if told to stop.
async fn pause_for(wait: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(wait) => false,
        _ = stop.changed() => true,
    }
}

async fn lane(delivery: Delivery, destination: Arc<Destination>, mut stop: watch::Receiver<bool>) {
    let owner = format!("delivery-{}", uuid::Uuid::new_v4());
    let store = &delivery.store;
    let config = &destination.config;
    let settings = &destination.settings;
    let mut instance: Option<PluginInstance> = None;
    // Claims start after the last id this lane claimed; see
    // `Store::claim_outbox`.
    let mut after: i64 = 0;
    let mut rewound_at = Instant::now();
    // Whether the destination's log already says its batches wait for
    // room, so a long wait is one line, not one a second.
    let mut told_no_room = false;
    loop {
        if *stop.borrow() {
            break;
        }
        if let Some(wait) = destination.held_for() {
            if pause_for(wait, &mut stop).await {
                break;
            }
            continue;
        }
        if rewound_at.elapsed() >= REWIND_EVERY {
            after = 0;
            rewound_at = Instant::now();
        }
        let (ready, oldest) = match store
            .outbox_ready(&config.id, after, settings.batch_size)
            .await
        {
            Ok(found) => found,
            Err(err) => {
                tracing::error!(destination = %config.id, "failed to read the outbox: {err}");
                if pause_for(IDLE_POLL, &mut stop).await {
                    break;
                }
                continue;
            }
        };
        if ready == 0 && after > 0 {
            // Nothing past the cursor: look again from the head at once.
            after = 0;
            rewound_at = Instant::now();
            continue;
        }
        if ready == 0 {
            tokio::select! {
                _ = delivery.wake.delivery.notified() => {}
                _ = tokio::time::sleep(IDLE_POLL) => {}
                _ = stop.changed() => break,
            }
            continue;
        }
        let age = chrono::Utc::now().timestamp_millis() - oldest;
        let linger = settings.linger_ms as i64;
        if ready < settings.batch_size as i64 && age < linger {
            let wait = Duration::from_millis((linger - age) as u64).min(IDLE_POLL);
            if pause_for(wait, &mut stop).await {
                break;
            }
            continue;
        }
        // A changed install (a fixed URL, a pause from another process)
        // must not get another batch under its old config.
        match store.plugin_config_updated_at(&config.id).await {
            Ok(Some(at)) if at == config.updated_at => {}
            Ok(_) => break,
            Err(err) => {
                tracing::error!(destination = %config.id, "failed to check the install: {err}");
                if pause_for(IDLE_POLL, &mut stop).await {
                    break;
                }
                continue;
            }
        }
        let slot = destination.rate_slot(Instant::now());
        if !slot.is_zero() && pause_for(slot, &mut stop).await {
            break;
        }
        let lease = delivery.lease;
        let rows = match store
            .claim_outbox(
                &config.id,
                &config.updated_at,
                &owner,
                after,
                settings.batch_size,
                lease,
            )
            .await
        {
            Ok(rows) if rows.is_empty() => continue,
            Ok(rows) => {
                after = after.max(rows.last().map_or(0, |row| row.id));
                rows
            }
            Err(err) => {
                tracing::error!(destination = %config.id, "failed to lease from the outbox: {err}");
                if pause_for(IDLE_POLL, &mut stop).await {
                    break;
                }
                continue;
            }
        };
        let record = match deliver(&delivery, &destination, &owner, &mut instance, rows).await {
            Ok(record) => record,
            Err(NoRoom(reason)) => {
                if let Err(err) = store.release_outbox(&owner).await {
                    tracing::warn!(destination = %config.id, "failed to give back a batch: {err}");
                }
                if !told_no_room {
                    tracing::warn!(destination = %config.id, "batches wait for room to run the plugin: {reason}");
                    let line = LogRecord {
                        at: now_rfc3339(),
                        level: LogLevel::Warn,
                        message: format!(
                            "batches wait, without counting as attempts, for room to run the plugin: {reason}"
                        ),
                        fields: Vec::new(),
                        event_uuid: None,
                    };
                    told_no_room = store.append_plugin_logs(&config.id, &[line]).await.is_ok();
                }
                destination.hold(Instant::now() + NO_ROOM_WAIT);
                after = 0;
                continue;
            }
        };
        told_no_room = false;
        match record.disposition {
            Disposition::Retry { at } => {
                let wait = at - chrono::Utc::now().timestamp_millis();
                destination.hold(Instant::now() + Duration::from_millis(wait.max(0) as u64));
            }
            Disposition::Delivered => destination.release_hold(),
            Disposition::DeadLetter => {}
        }
        if let Err(err) = store.record_delivery(&owner, &record).await {
            // The lease runs out and the batch is tried again.
            tracing::error!(destination = %config.id, "failed to record a delivery: {err}");
            if pause_for(IDLE_POLL, &mut stop).await {
                break;
            }
        }
        if record.pause.is_some() {
            // The refresh stops this destination's lanes.
            break;
        }
    }
    if let Err(err) = store.release_outbox(&owner).await {
        tracing::warn!("failed to give back outbox leases: {err}");
    }
}

fn exported(row: &OutboxRow) -> ExportedEvent {
    let text = |field: &str| row.payload[field].as_str().unwrap_or_default().to_string();
    ExportedEvent {
        uuid: row.event_uuid.clone(),
        name: text("event"),
        distinct_id: text("distinct_id"),
        person_id: row.payload["person_id"].as_str().map(str::to_string),
        timestamp: text("timestamp"),
        properties: match &row.payload["properties"] {
            Value::Object(map) => Value::Object(map.clone()).to_string(),
            _ => "{}".into(),
        },
    }
}

/// What an export call came to, before it is turned into a disposition.
enum Outcome {
    Delivered,
    Retryable {
        message: String,
        retry_after: Option<Duration>,
    },
    Permanent(String),
    /// The plugin computed past its compute limit: its own fault, which
    /// the next batch would most likely repeat at a core-second a time.
    Runaway(String),
}

/// The plugin had no room to run (see `PluginError::Exhausted`): why.
struct NoRoom(String);

/// Exports one leased batch and decides what becomes of it, unless the
/// plugin had no room to run and the batch should wait untouched.
async fn deliver(
    delivery: &Delivery,
    destination: &Destination,
    owner: &str,
    instance: &mut Option<PluginInstance>,
    rows: Vec<OutboxRow>,
) -> Result<DeliveryRecord, NoRoom> {
    let config = &destination.config;
    let started = Instant::now();
    let mut logs = Vec::new();
    let mut status_code = None;
    let outcome = match take_instance(delivery, config, instance).await {
        Err(err) if err.is_exhausted() => {
            let calls = &destination.calls;
            calls.record(started.elapsed(), Some(FailureKind::Exhausted));
            return Err(NoRoom(err.to_string()));
        }
        Err(err) => {
            let calls = &destination.calls;
            calls.record(started.elapsed(), Some(FailureKind::Error));
            Outcome::Retryable {
                message: err.to_string(),
                retry_after: None,
            }
        }
        Ok(live) => {
            let events: Vec<ExportedEvent> = rows.iter().map(exported).collect();
            let ids: Vec<i64> = rows.iter().map(|row| row.id).collect();
            let call_started = Instant::now();
            let done =
                export_keeping_lease(&delivery.store, owner, &ids, delivery.lease, live, events)
                    .await;
            let failure = match &done {
                Some((_, result)) => result.as_ref().err().map(FailureKind::of_export),
                None => Some(FailureKind::Trap),
            };
            destination.calls.record(call_started.elapsed(), failure);
            match done {
                Some((mut live, result)) => {
                    let (plugin_logs, calls) = live.take_activity();
                    logs.extend(plugin_logs);
                    status_code = calls.iter().rev().find_map(|call| call.status);
                    *instance = Some(live);
                    match result {
                        Ok(()) => Outcome::Delivered,
                        Err(ExportFailure::Retryable {
                            message,
                            retry_after,
                            ..
                        }) => Outcome::Retryable {
                            message,
                            retry_after,
                        },
                        Err(ExportFailure::Permanent { message, .. }) => {
                            Outcome::Permanent(message)
                        }
                        // A trap discarded the instance and no room was
                        // left to start another.
                        Err(ExportFailure::Plugin(err)) if err.is_exhausted() => {
                            return Err(NoRoom(err.to_string()));
                        }
                        // Computing past the compute limit is the plugin's
                        // own doing, and the same batch (or the next) would
                        // do it again: retrying would spend a core for the
                        // limit at every attempt.
                        Err(ExportFailure::Plugin(
                            err @ PluginError::Trapped {
                                reason: TrapReason::Compute(_),
                                ..
                            },
                        )) => Outcome::Runaway(err.to_string()),
                        // A trap (a deadline, memory) may pass; retries end
                        // in dead letters if it does not.
                        Err(ExportFailure::Plugin(err)) => Outcome::Retryable {
                            message: err.to_string(),
                            retry_after: None,
                        },
                    }
                }
                None => Outcome::Retryable {
                    message: "the plugin call panicked in the host".into(),
                    retry_after: None,
                },
            }
        }
    };
    let settings = &destination.settings;
    let now = chrono::Utc::now().timestamp_millis();
    let attempts = rows.iter().map(|row| row.attempts).max().unwrap_or(0) + 1;
    let first_failed = rows
        .iter()
        .filter_map(|row| row.first_failed_at)
        .min()
        .unwrap_or(now);
    let (disposition, error, mut pause) = match outcome {
        Outcome::Delivered => (Disposition::Delivered, None, None),
        Outcome::Retryable {
            message,
            retry_after,
        } => {
            if now - first_failed >= settings.max_retry_seconds as i64 * 1000 {
                let error = format!(
                    "gave up after {attempts} attempts over {}s; the last error: {message}",
                    (now - first_failed) / 1000
                );
                let pause = format!(
                    "paused because a batch was still failing after {}s of retries; fix the cause, then resume and replay the dead letters. The last error: {message}",
                    settings.max_retry_seconds
                );
                (Disposition::DeadLetter, Some(error), Some(pause))
            } else {
                let wait = backoff(settings, attempts).max(retry_after.unwrap_or_default());
                let at = now + wait.as_millis() as i64;
                (Disposition::Retry { at }, Some(message), None)
            }
        }
        Outcome::Permanent(message) => (Disposition::DeadLetter, Some(message), None),
        Outcome::Runaway(message) => {
            let pause = format!(
                "paused because the plugin ran past its compute limit; every attempt would hold a core that long. Fix or replace the plugin, then resume and replay the dead letters. The error: {message}"
            );
            (Disposition::DeadLetter, Some(message), Some(pause))
        }
    };
    if matches!(disposition, Disposition::DeadLetter) && pause.is_none() {
        let in_row = delivery
            .store
            .dead_batches_in_row(&config.id)
            .await
            .unwrap_or(0)
            + 1;
        if in_row >= PAUSE_AFTER_DEAD_BATCHES {
            pause = Some(format!(
                "paused after {in_row} batches in a row went to dead letters; fix the config, then resume and replay the dead letters. The last error: {}",
                error.as_deref().unwrap_or_default()
            ));
        }
    }
    let outcome = match disposition {
        Disposition::Delivered => AttemptOutcome::Delivered,
        Disposition::Retry { .. } => AttemptOutcome::Retrying,
        Disposition::DeadLetter => AttemptOutcome::DeadLettered,
    };
    destination.outcomes.record(outcome, rows.len());
    if let Some(error) = &error {
        logs.push(LogRecord {
            at: now_rfc3339(),
            level: if outcome == AttemptOutcome::Retrying {
                LogLevel::Warn
            } else {
                LogLevel::Error
            },
            message: format!("batch of {} events {outcome}: {error}", rows.len()),
            fields: Vec::new(),
            event_uuid: None,
        });
    }
    if let Some(reason) = &pause {
        let reason = delivery.store.scrub(&config.id, reason);
        tracing::warn!(destination = %config.id, "{reason}");
    }
    Ok(DeliveryRecord {
        project_id: config.project_id.clone(),
        plugin_config_id: config.id.clone(),
        attempt: Attempt {
            at: format_timestamp(chrono::Utc::now()),
            events: rows.len() as i64,
            outcome,
            status_code: status_code.map(i64::from),
            latency_ms: started.elapsed().as_millis() as i64,
            error,
        },
        rows,
        disposition,
        logs,
        pause,
    })
}

/// The lane's instance, started if it has none. Any failure to start is
/// retried like a failed export: a plugin that cannot start by its own
/// fault ends in dead letters and a paused destination, the usual outcome
/// of retries that never succeed.
async fn take_instance(
    delivery: &Delivery,
    config: &PluginConfig,
    instance: &mut Option<PluginInstance>,
) -> Result<PluginInstance, loader::StartError> {
    match instance.take() {
        Some(live) => Ok(live),
        None => loader::start(&delivery.store, &delivery.runtime, config).await,
    }
}

/// Runs the export on a blocking thread, renewing the batch's lease while
/// it runs so a slow destination is not handed to a second worker.
async fn export_keeping_lease(
    store: &Store,
    owner: &str,
    ids: &[i64],
    lease: Duration,
    mut instance: PluginInstance,
    events: Vec<ExportedEvent>,
) -> Option<(PluginInstance, Result<(), ExportFailure>)> {
    let call = tokio::task::spawn_blocking(move || {
        let result = instance.export(events);
        (instance, result)
    });
    tokio::pin!(call);
    let mut renew = tokio::time::interval(lease / 3);
    renew.tick().await;
    loop {
        tokio::select! {
            done = &mut call => return done.ok(),
            _ = renew.tick() => {
                if let Err(err) = store.extend_outbox_lease(owner, ids, lease).await {
                    tracing::warn!("failed to renew an outbox lease: {err}");
                }
            }
        }
    }
}

/// Exponential backoff with jitter: the `attempts`-th wait is drawn from the
/// upper half of `initial × 2^(attempts-1)`, capped, so retries of many
/// batches spread out instead of arriving together.
fn backoff(settings: &DeliverySettings, attempts: i64) -> Duration {
    let exponent = (attempts - 1).clamp(0, 32) as u32;
    let ceiling = settings
        .retry_initial_backoff_ms
        .saturating_mul(1u64 << exponent)
        .min(settings.retry_max_backoff_ms);
    let mut bytes = [0u8; 4];
    getrandom::fill(&mut bytes).expect("the OS has randomness");
    let fraction = 0.5 + 0.5 * (u32::from_le_bytes(bytes) as f64 / u32::MAX as f64);
    Duration::from_millis((ceiling as f64 * fraction) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::FailurePolicy;

    #[test]
    fn backoff_doubles_from_the_initial_delay_with_jitter_up_to_the_cap() {
        let settings = DeliverySettings {
            retry_initial_backoff_ms: 1_000,
            retry_max_backoff_ms: 60_000,
            ..DeliverySettings::default()
        };
        for (attempt, ceiling) in [
            (1, 1_000),
            (2, 2_000),
            (3, 4_000),
            (7, 60_000),
            (40, 60_000),
        ] {
            for _ in 0..50 {
                let wait = backoff(&settings, attempt).as_millis() as u64;
                assert!(
                    (ceiling / 2..=ceiling).contains(&wait),
                    "attempt {attempt}: {wait} ms is outside {}..={ceiling}",
                    ceiling / 2
                );
            }
        }
    }

    #[test]
    fn the_rate_limit_spaces_export_starts() {
        let mut config_settings = DeliverySettings {
            max_batches_per_second: Some(10.0),
            ..DeliverySettings::default()
        };
        let metrics = Metrics::new();
        let config = PluginConfig {
            id: "d".into(),
            project_id: "p".into(),
            plugin_sha256: String::new(),
            plugin: "x@1".into(),
            config: Value::Null,
            enabled: true,
            position: 0,
            failure_policy: FailurePolicy::Open,
            consecutive_failures: 0,
            disabled_reason: None,
            delivery: config_settings.clone(),
            paused_reason: None,
            updated_at: String::new(),
            manifest: None,
        };
        let destination = Destination::new(config, &metrics);
        let now = Instant::now();
        assert_eq!(destination.rate_slot(now), Duration::ZERO);
        assert_eq!(destination.rate_slot(now), Duration::from_millis(100));
        assert_eq!(destination.rate_slot(now), Duration::from_millis(200));
        config_settings.max_batches_per_second = None;
        let unlimited = Destination::new(
            PluginConfig {
                delivery: config_settings,
                ..destination.config.clone()
            },
            &metrics,
        );
        assert_eq!(unlimited.rate_slot(now), Duration::ZERO);
        assert_eq!(unlimited.rate_slot(now), Duration::ZERO);
    }
}
