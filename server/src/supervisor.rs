//! Background tasks under supervision, and what `/_ready` reports.
//!
//! Capture acknowledges an event once it is queued; the worker, delivery
//! and the config watcher must be running for it to get anywhere. So each
//! background task runs in one [`JoinSet`] that the server watches beside
//! the HTTP listener: a task that returns an error, returns early or
//! panics is logged with its error and started again after a backoff that
//! doubles up to [`MAX_BACKOFF`], and the server reports not ready until
//! the task says it is working again ([`Health::ready`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::{Id, JoinSet};

/// The first wait before a failed task starts again.
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);

/// The longest wait before a failed task starts again.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// How long a run must last, ready, for the next failure to count as a
/// first one again.
const HEALTHY_RUN: Duration = Duration::from_secs(30);

/// Where each supervised task stands.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum TaskState {
    /// Started and not yet working.
    Starting,
    Ready,
    /// Ended with this error; restarting after a backoff.
    Failed {
        error: String,
        restarts: u32,
    },
}

/// What every supervised task last said of itself, and whether the
/// server is shutting down.
#[derive(Debug, Default)]
pub struct Readiness {
    tasks: Mutex<BTreeMap<&'static str, TaskState>>,
    stopping: AtomicBool,
}

impl Readiness {
    /// Marks the server as shutting down: from now on it is not ready,
    /// whatever its tasks say, so load balancers send it no more traffic
    /// while it drains.
    pub fn stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    fn set(&self, task: &'static str, state: TaskState) {
        self.tasks
            .lock()
            .expect("readiness lock")
            .insert(task, state);
    }

    fn get(&self, task: &'static str) -> Option<TaskState> {
        self.tasks
            .lock()
            .expect("readiness lock")
            .get(task)
            .cloned()
    }

    /// Every task that is not ready, with its state.
    pub fn not_ready(&self) -> BTreeMap<&'static str, TaskState> {
        self.tasks
            .lock()
            .expect("readiness lock")
            .iter()
            .filter(|(_, state)| **state != TaskState::Ready)
            .map(|(task, state)| (*task, state.clone()))
            .collect()
    }
}

/// A task's way to say it is working.
#[derive(Clone)]
pub struct Health {
    task: &'static str,
    readiness: Arc<Readiness>,
}

impl Health {
    /// Marks the task ready; called each time it has done a round of real
    /// work, so a restarted task turns ready again only once it works.
    pub fn ready(&self) {
        if self.readiness.get(self.task) != Some(TaskState::Ready) {
            self.readiness.set(self.task, TaskState::Ready);
        }
    }
}

/// Starts one run of a task.
pub type TaskFn = Arc<
    dyn Fn(Health, watch::Receiver<bool>) -> BoxFuture<'static, anyhow::Result<()>> + Send + Sync,
>;

struct Task {
    name: &'static str,
    start: TaskFn,
    restarts: u32,
    backoff: Duration,
    /// When the current run began (after its delay).
    started: Instant,
}

/// The background tasks of one server.
pub struct Supervisor {
    set: JoinSet<anyhow::Result<()>>,
    running: HashMap<Id, Task>,
    readiness: Arc<Readiness>,
    stop: watch::Receiver<bool>,
}

impl Supervisor {
    pub fn new(readiness: Arc<Readiness>, stop: watch::Receiver<bool>) -> Self {
        Supervisor {
            set: JoinSet::new(),
            running: HashMap::new(),
            readiness,
            stop,
        }
    }

    /// Starts `name` now, to be restarted whenever it ends before `stop`.
    pub fn spawn(&mut self, name: &'static str, start: TaskFn) {
        self.run(
            Task {
                name,
                start,
                restarts: 0,
                backoff: INITIAL_BACKOFF,
                started: Instant::now(),
            },
            Duration::ZERO,
        );
    }

    fn run(&mut self, mut task: Task, delay: Duration) {
        task.started = Instant::now() + delay;
        let health = Health {
            task: task.name,
            readiness: self.readiness.clone(),
        };
        if delay.is_zero() {
            self.readiness.set(task.name, TaskState::Starting);
        }
        let run = (task.start)(health, self.stop.clone());
        let mut stop = self.stop.clone();
        let handle = self.set.spawn(async move {
            if !delay.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.changed() => return Ok(()),
                }
            }
            run.await
        });
        self.running.insert(handle.id(), task);
    }

    /// Waits for a task to end and, unless the server is stopping, logs why
    /// and schedules its restart. Pending forever while every task runs.
    pub async fn watch(&mut self) {
        let Some(ended) = self.set.join_next_with_id().await else {
            return std::future::pending().await;
        };
        let (id, result) = match ended {
            Ok((id, result)) => (id, result),
            Err(err) => {
                let id = err.id();
                let why = if err.is_panic() {
                    anyhow::anyhow!("it panicked: {}", panic_message(err.into_panic()))
                } else {
                    anyhow::anyhow!("it was cancelled")
                };
                (id, Err(why))
            }
        };
        let Some(mut task) = self.running.remove(&id) else {
            return;
        };
        if *self.stop.borrow() {
            return;
        }
        let error = match result {
            Ok(()) => "it returned before the server stopped".to_string(),
            Err(err) => format!("{err:#}"),
        };
        // A task that had been working for a while starts again at once;
        // one that fails again and again, even after a moment of work,
        // waits longer each time (each start may cost its plugins' setup).
        if self.readiness.get(task.name) == Some(TaskState::Ready)
            && task.started.elapsed() >= HEALTHY_RUN
        {
            task.backoff = INITIAL_BACKOFF;
        }
        let delay = task.backoff;
        task.backoff = (task.backoff * 2).min(MAX_BACKOFF);
        task.restarts += 1;
        tracing::error!(
            task = task.name,
            restarts = task.restarts,
            "background task `{}` stopped: {error}; starting it again in {} ms",
            task.name,
            delay.as_millis()
        );
        self.readiness.set(
            task.name,
            TaskState::Failed {
                error,
                restarts: task.restarts,
            },
        );
        self.run(task, delay);
    }

    /// After `stop` was sent: waits for every task to finish its work.
    pub async fn shutdown(mut self) {
        while let Some(ended) = self.set.join_next_with_id().await {
            let (id, failure) = match ended {
                Ok((id, result)) => (id, result.err().map(|err| format!("{err:#}"))),
                Err(err) => (err.id(), Some(err.to_string())),
            };
            if let (Some(task), Some(failure)) = (self.running.remove(&id), failure) {
                tracing::error!(
                    task = task.name,
                    "background task `{}` failed while stopping: {failure}",
                    task.name
                );
            }
        }
    }
}

fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// Makes a [`TaskFn`] from an async function of the task's health and stop
/// signal.
pub fn task<F, Fut>(start: F) -> TaskFn
where
    F: Fn(Health, watch::Receiver<bool>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    Arc::new(move |health, stop| Box::pin(start(health, stop)))
}
