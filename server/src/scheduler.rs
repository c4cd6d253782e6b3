//! Scheduled tasks: the `[[schedule]]` entries of enabled installs, each
//! run through its plugin's `run-task` hook when its cron expression comes
//! due, once across every process sharing the store.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::configs::{self, ConfigWatch};
use crate::loader;
use crate::metrics::{FailureKind, Hook, Metrics};
use crate::model::{LogLevel, LogRecord, format_timestamp, now_rfc3339};
use crate::runtime::{PluginInstance, Runtime};
use crate::store::{PluginConfig, Store};
use crate::supervisor::Health;

/// The longest the scheduler sleeps, so a fire time that another process
/// made due is seen soon.
const REFRESH: Duration = Duration::from_secs(1);

/// What the scheduler needs.
#[derive(Clone)]
pub struct Scheduler {
    pub store: Store,
    pub runtime: Runtime,
    pub configs: ConfigWatch,
    pub metrics: Arc<Metrics>,
}

/// One scheduled task of one install.
struct Scheduled {
    config: PluginConfig,
    task: String,
    schedule: cron::Schedule,
    next: Option<chrono::DateTime<chrono::Utc>>,
}

/// Runs the `[[schedule]]` tasks of enabled installs. Every process keeps
/// the same timetable; the first to claim a fire time in the store runs it,
/// so each fire runs once however many processes there are.
pub async fn run_scheduler(
    scheduler: Scheduler,
    health: Health,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let owner = format!("scheduler-{}", uuid::Uuid::new_v4());
    let mut configs = scheduler.configs.subscribe();
    let Some(first) = configs::first(&mut configs, &mut stop).await else {
        return Ok(());
    };
    let mut tasks = timetable(&first, &[]);
    let mut instances: HashMap<String, PluginInstance> = HashMap::new();
    loop {
        if *stop.borrow() {
            break;
        }
        if let Some(snapshot) = configs::newer(&mut configs) {
            tasks = timetable(&snapshot, &tasks);
            instances.clear();
        }
        health.ready();
        let now = chrono::Utc::now();
        for scheduled in tasks.iter_mut() {
            let Some(due) = scheduled.next.filter(|due| *due <= now) else {
                continue;
            };
            scheduled.next = scheduled.schedule.after(&now).next();
            let fire_at = format_timestamp(due);
            match scheduler
                .store
                .claim_scheduled_run(&scheduled.config.id, &scheduled.task, &fire_at, &owner)
                .await
            {
                Ok(true) => {}
                Ok(false) => continue,
                Err(err) => {
                    tracing::error!("failed to claim a scheduled run: {err}");
                    continue;
                }
            }
            let logs = run_task(&scheduler, scheduled, &fire_at, &mut instances).await;
            if let Err(err) = scheduler
                .store
                .append_plugin_logs(&scheduled.config.id, &logs)
                .await
            {
                tracing::error!("failed to write a task's log: {err}");
            }
        }
        let wait = tasks
            .iter()
            .filter_map(|s| s.next)
            .min()
            .and_then(|next| (next - chrono::Utc::now()).to_std().ok())
            .unwrap_or(REFRESH)
            .min(REFRESH);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            // Waking marks the change seen; the top of the loop must still see it.
                    _ = configs.changed() => configs.mark_changed(),
            _ = stop.changed() => break,
        }
    }
    Ok(())
}

/// Runs one fire of a task and returns its log, with a line saying how it
/// ended.
async fn run_task(
    scheduler: &Scheduler,
    scheduled: &Scheduled,
    fire_at: &str,
    instances: &mut HashMap<String, PluginInstance>,
) -> Vec<LogRecord> {
    let config = &scheduled.config;
    let calls = scheduler.metrics.plugin(config, Hook::Task);
    let started = Instant::now();
    let instance = match instances.remove(&config.id) {
        Some(instance) => Ok(instance),
        None => loader::start(&scheduler.store, &scheduler.runtime, config).await,
    };
    let line = |level, message: String| LogRecord {
        at: now_rfc3339(),
        level,
        message,
        fields: Vec::new(),
        event_uuid: None,
    };
    let mut instance = match instance {
        Ok(instance) => instance,
        Err(reason) => {
            let kind = if reason.is_exhausted() {
                FailureKind::Exhausted
            } else {
                FailureKind::Error
            };
            calls.record(started.elapsed(), Some(kind));
            return vec![line(
                LogLevel::Error,
                format!(
                    "scheduled task `{}` ({fire_at}) did not run: {reason}",
                    scheduled.task
                ),
            )];
        }
    };
    let task = scheduled.task.clone();
    let call_started = Instant::now();
    let Ok((mut instance, result)) = tokio::task::spawn_blocking(move || {
        let result = instance.run_task(&task);
        (instance, result)
    })
    .await
    else {
        calls.record(call_started.elapsed(), Some(FailureKind::Trap));
        return vec![line(
            LogLevel::Error,
            format!(
                "scheduled task `{}` ({fire_at}) panicked in the host",
                scheduled.task
            ),
        )];
    };
    calls.record(
        call_started.elapsed(),
        result.as_ref().err().map(FailureKind::of),
    );
    let (mut logs, _) = instance.take_activity();
    logs.push(match result {
        Ok(()) => line(
            LogLevel::Info,
            format!("scheduled task `{}` ({fire_at}) finished", scheduled.task),
        ),
        Err(err) => line(
            LogLevel::Error,
            format!(
                "scheduled task `{}` ({fire_at}) failed: {err}",
                scheduled.task
            ),
        ),
    });
    instances.insert(config.id.clone(), instance);
    logs
}

/// Every scheduled task of `configs`, each with its next fire time: the one
/// it had in `previous` if its install did not change (so a fire that came
/// due while another task ran is not skipped), else the first after now.
fn timetable(configs: &[PluginConfig], previous: &[Scheduled]) -> Vec<Scheduled> {
    let after = chrono::Utc::now();
    configs
        .iter()
        .flat_map(|config| {
            let schedules = config
                .manifest
                .as_ref()
                .map(|m| m.schedule.clone())
                .unwrap_or_default();
            schedules.into_iter().filter_map(move |s| {
                let schedule = cron::Schedule::from_str(&s.cron).ok()?;
                let kept = previous.iter().find(|old| {
                    old.config.id == config.id
                        && old.config.updated_at == config.updated_at
                        && old.task == s.name
                });
                let next = match kept {
                    Some(old) => old.next,
                    None => schedule.after(&after).next(),
                };
                Some(Scheduled {
                    config: config.clone(),
                    task: s.name,
                    schedule,
                    next,
                })
            })
        })
        .collect()
}
