//! How far the pipeline is behind capture: the capture queue's depth and
//! the age of its oldest event, in all and for each project, sampled from
//! the store, logged when they grow, and read by capture on every request
//! to decide whether to push back, and on whom.
//!
//! Between samples, capture adds what it enqueued and the worker takes off
//! what it stored, so the depth a request sees is fresh; the sample then
//! corrects for other processes sharing the same PostgreSQL queue.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::store::{QueueStatus, Store};

/// How often the store is asked for the queue's depth.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// Samples between two reads of every project's share. That read groups
/// the whole queue by project, dearer than the count; between reads,
/// capture and the worker keep each project's figures in memory.
const SAMPLE_PROJECTS_EVERY: u32 = 2;

/// The oldest event's age from which a growing queue is worth a log line.
const LOG_AGE: Duration = Duration::from_secs(5);

/// The least time between two rounds of "growing" log lines.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Projects named in one round of "growing" log lines; the rest are
/// counted, so a thousand projects behind make one line, not a thousand.
const LOG_PROJECTS: usize = 5;

/// The capture queue as last seen; shared by capture, the worker and the
/// monitor.
#[derive(Debug, Default)]
pub struct QueueGauge {
    depth: AtomicI64,
    /// Epoch milliseconds; 0 when the queue is empty.
    oldest_enqueued_ms: AtomicI64,
    /// What this process's pipeline stores per second while it has more
    /// work than it can take at once, smoothed; 0 until it has been busy.
    capacity_per_second: AtomicU64,
    /// Each project with events queued (and only those). The worker takes
    /// an equal slice of every waiting project's events (see
    /// `store::Claim`), so how long a project's events wait depends on its
    /// own backlog, not on the whole queue's: one project's flood must not
    /// get every project refused.
    projects: Mutex<HashMap<String, Share>>,
    /// What the worker stores per second of each project that has more
    /// queued than one round takes, smoothed. The worker sizes each
    /// project's slice by its chain's cost, so a project's own rate, not
    /// the pipeline's, says how long its events will wait: a slow or
    /// multiplying neighbour makes rounds slow without slowing anyone's
    /// slice by as much.
    drain: Mutex<HashMap<String, f64>>,
}

/// One project's part of the queue.
#[derive(Clone, Copy, Debug)]
struct Share {
    depth: i64,
    /// Epoch milliseconds.
    oldest_enqueued_ms: i64,
}

/// One project's part of the queue, as capture judges it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Backlog {
    pub depth: i64,
    /// How long the project's oldest queued event has waited.
    pub oldest_age: Duration,
    /// How long an event of the project accepted now would wait; see
    /// [`QueueGauge::backlog`].
    pub predicted_wait: Option<Duration>,
    /// Projects with events queued, this one included.
    pub projects_waiting: usize,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn age_since(epoch_ms: i64) -> Duration {
    match epoch_ms {
        0 => Duration::ZERO,
        at => Duration::from_millis((now_ms() - at).max(0) as u64),
    }
}

impl QueueGauge {
    pub fn depth(&self) -> i64 {
        self.depth.load(Ordering::Relaxed)
    }

    /// How long the oldest queued event, of any project, has waited.
    pub fn oldest_age(&self) -> Duration {
        age_since(self.oldest_enqueued_ms.load(Ordering::Relaxed))
    }

    /// The project's part of the queue.
    ///
    /// Its predicted wait is its own depth times the projects waiting, at
    /// the rate this process stores while busy: each claim takes an equal
    /// slice of every waiting project's events, so with `k` projects
    /// waiting a project's events go at about `1/k` of the rate. A project
    /// with less waiting than its slice leaves the rest of the batch to
    /// the others, so the estimate errs towards refusing early. `None`
    /// until the pipeline has been busy once, and when the project has
    /// nothing queued.
    ///
    /// The oldest event's age alone bounds only the head of the queue:
    /// offered twice what the pipeline stores, the events accepted just
    /// before the age bound tripped waited three times the bound. With
    /// several processes on one PostgreSQL each divides the queue by its
    /// own rate, which errs towards refusing early too.
    pub fn backlog(&self, project_id: &str) -> Backlog {
        let rate = self.capacity_per_second.load(Ordering::Relaxed);
        let projects = self.projects.lock().expect("not poisoned");
        let Some(share) = projects.get(project_id) else {
            return Backlog {
                projects_waiting: projects.len(),
                ..Backlog::default()
            };
        };
        let waiting = projects.len();
        Backlog {
            depth: share.depth,
            oldest_age: age_since(share.oldest_enqueued_ms),
            predicted_wait: match self.drain.lock().expect("not poisoned").get(project_id) {
                Some(drain) if share.depth > 0 => {
                    Some(Duration::from_secs_f64(share.depth as f64 / drain))
                }
                _ => (share.depth > 0 && rate > 0).then(|| {
                    Duration::from_secs_f64(share.depth as f64 * waiting as f64 / rate as f64)
                }),
            },
            projects_waiting: waiting,
        }
    }

    /// Projects whose oldest queued event has waited `age` or more, the
    /// longest waiting first.
    pub fn behind(&self, age: Duration) -> Vec<(String, Backlog)> {
        let ids: Vec<String> = {
            let projects = self.projects.lock().expect("not poisoned");
            projects
                .iter()
                .filter(|(_, share)| age_since(share.oldest_enqueued_ms) >= age)
                .map(|(id, _)| id.clone())
                .collect()
        };
        let mut behind: Vec<(String, Backlog)> = ids
            .into_iter()
            .map(|id| {
                let backlog = self.backlog(&id);
                (id, backlog)
            })
            .filter(|(_, backlog)| backlog.depth > 0)
            .collect();
        behind.sort_by_key(|(_, backlog)| std::cmp::Reverse(backlog.oldest_age));
        behind
    }

    /// Records a stored batch: `events` in a round of the worker that took
    /// `took` (the longer of its chains and its transaction).
    pub fn record_round(&self, events: usize, took: Duration) {
        if events == 0 || took.is_zero() {
            return;
        }
        let rate = events as f64 / took.as_secs_f64();
        let previous = self.capacity_per_second.load(Ordering::Relaxed) as f64;
        // A moving average over the last few batches: one slow batch
        // (a checkpoint, a cold cache) should not refuse capture.
        let smoothed = if previous == 0.0 {
            rate
        } else {
            previous * 0.8 + rate * 0.2
        };
        self.capacity_per_second
            .store(smoothed.round().max(1.0) as u64, Ordering::Relaxed);
    }

    /// Records events of `project_id` written to the queue.
    pub fn added(&self, project_id: &str, events: usize) {
        if events == 0 {
            return;
        }
        let now = now_ms();
        let before = self.depth.fetch_add(events as i64, Ordering::Relaxed);
        if before <= 0 {
            // The queue was empty: these events are now its oldest.
            let _ = self.oldest_enqueued_ms.compare_exchange(
                0,
                now,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        let mut projects = self.projects.lock().expect("not poisoned");
        match projects.get_mut(project_id) {
            Some(share) => share.depth += events as i64,
            None => {
                projects.insert(
                    project_id.to_string(),
                    Share {
                        depth: events as i64,
                        oldest_enqueued_ms: now,
                    },
                );
            }
        }
    }

    /// Records queue rows the worker stored, counted per project.
    ///
    /// A project's oldest event is known again only at the next sample:
    /// until then its age is that of the oldest event it had, which errs
    /// towards refusing early. A project caught up (as far as this process
    /// knows) has no age at all.
    /// Records a stored round: `per_project` rows in `took`. A project
    /// that still has events queued had more than the round took, so the
    /// round says how fast its own events drain.
    pub fn removed_in(&self, per_project: &HashMap<String, usize>, took: Duration) {
        self.removed(per_project);
        if took.is_zero() {
            return;
        }
        let projects = self.projects.lock().expect("not poisoned");
        let mut drain = self.drain.lock().expect("not poisoned");
        drain.retain(|project_id, _| projects.contains_key(project_id));
        for (project_id, n) in per_project {
            if !projects.contains_key(project_id) || *n == 0 {
                continue;
            }
            let rate = *n as f64 / took.as_secs_f64();
            let smoothed = drain
                .get(project_id)
                .map_or(rate, |previous| previous * 0.8 + rate * 0.2);
            drain.insert(project_id.clone(), smoothed);
        }
    }

    pub fn removed(&self, per_project: &HashMap<String, usize>) {
        let events: usize = per_project.values().sum();
        let before = self.depth.fetch_sub(events as i64, Ordering::Relaxed);
        if before <= events as i64 {
            // Caught up, as far as this process knows; the next sample
            // corrects it if another process still has events queued.
            self.oldest_enqueued_ms.store(0, Ordering::Relaxed);
        }
        let mut projects = self.projects.lock().expect("not poisoned");
        for (project_id, n) in per_project {
            if let Some(share) = projects.get_mut(project_id) {
                share.depth -= *n as i64;
                if share.depth <= 0 {
                    projects.remove(project_id);
                }
            }
        }
    }

    pub fn set(&self, status: QueueStatus) {
        self.depth.store(status.depth, Ordering::Relaxed);
        self.oldest_enqueued_ms
            .store(status.oldest_enqueued_ms.unwrap_or(0), Ordering::Relaxed);
    }

    /// Replaces every project's figures with a sample of the store.
    pub fn set_projects(&self, sample: Vec<(String, QueueStatus)>) {
        let projects: HashMap<String, Share> = sample
            .into_iter()
            .filter(|(_, status)| status.depth > 0)
            .map(|(project_id, status)| {
                let share = Share {
                    depth: status.depth,
                    oldest_enqueued_ms: status.oldest_enqueued_ms.unwrap_or_else(now_ms),
                };
                (project_id, share)
            })
            .collect();
        *self.projects.lock().expect("not poisoned") = projects;
    }
}

/// Samples the queue until `stop`, logging when a project's part of it
/// grows: a warning per project whose oldest event has waited [`LOG_AGE`]
/// or more (a round of them at most every [`LOG_EVERY`]), and a line when
/// it has caught up again.
pub async fn run_monitor(
    store: Store,
    gauge: std::sync::Arc<QueueGauge>,
    max_age: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut last_warned: Option<Instant> = None;
    let mut behind: HashSet<String> = HashSet::new();
    let mut samples: u32 = 0;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(SAMPLE_EVERY) => {}
            _ = stop.changed() => return,
        }
        match store.queue_status().await {
            Ok(status) => gauge.set(status),
            Err(err) => {
                tracing::warn!("failed to read the capture queue's depth: {err}");
                continue;
            }
        }
        if samples.is_multiple_of(SAMPLE_PROJECTS_EVERY) {
            match store.queue_status_by_project().await {
                Ok(sample) => gauge.set_projects(sample),
                Err(err) => {
                    tracing::warn!("failed to read each project's part of the capture queue: {err}")
                }
            }
        }
        samples = samples.wrapping_add(1);
        let growing = gauge.behind(LOG_AGE);
        if !growing.is_empty() && last_warned.is_none_or(|at| at.elapsed() >= LOG_EVERY) {
            for (project_id, backlog) in growing.iter().take(LOG_PROJECTS) {
                tracing::warn!(
                    project = %project_id,
                    depth = backlog.depth,
                    oldest_age_seconds = backlog.oldest_age.as_secs(),
                    max_queue_age_seconds = max_age.as_secs(),
                    queue_depth = gauge.depth(),
                    queue_oldest_age_seconds = gauge.oldest_age().as_secs(),
                    "the capture queue is growing for project {project_id}: the pipeline stores its events slower than capture accepts them{}",
                    if backlog.oldest_age >= max_age {
                        "; capture is answering 503 to its tokens until it catches up"
                    } else {
                        ""
                    }
                );
            }
            if growing.len() > LOG_PROJECTS {
                tracing::warn!(
                    "the capture queue is growing for {} more projects",
                    growing.len() - LOG_PROJECTS
                );
            }
            last_warned = Some(Instant::now());
        }
        let now_behind: HashSet<String> = growing.into_iter().map(|(id, _)| id).collect();
        for project_id in behind.difference(&now_behind) {
            let backlog = gauge.backlog(project_id);
            tracing::info!(
                project = %project_id,
                depth = backlog.depth,
                oldest_age_seconds = backlog.oldest_age.as_secs(),
                "the capture queue has caught up for project {project_id}"
            );
        }
        behind = now_behind;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(project_id: &str, events: usize) -> HashMap<String, usize> {
        HashMap::from([(project_id.to_string(), events)])
    }

    #[test]
    fn the_wait_is_unknown_until_the_pipeline_has_been_busy() {
        let gauge = QueueGauge::default();
        gauge.added("a", 10_000);
        assert_eq!(gauge.backlog("a").predicted_wait, None);
        gauge.record_round(500, Duration::from_millis(100));
        assert_eq!(
            gauge.backlog("a").predicted_wait,
            Some(Duration::from_secs(2))
        );
    }

    #[test]
    fn one_slow_round_moves_the_estimate_only_part_of_the_way() {
        let gauge = QueueGauge::default();
        gauge.added("a", 5_000);
        gauge.record_round(500, Duration::from_millis(100)); // 5,000 a second
        gauge.record_round(500, Duration::from_millis(1_000)); // 500 a second
        let wait = gauge.backlog("a").predicted_wait.unwrap();
        assert!(
            wait > Duration::from_secs(1) && wait < Duration::from_secs(2),
            "{wait:?}"
        );
    }

    #[test]
    fn an_empty_queue_has_no_wait() {
        let gauge = QueueGauge::default();
        gauge.record_round(500, Duration::from_millis(100));
        assert_eq!(gauge.backlog("a").predicted_wait, None);
        gauge.added("a", 100);
        gauge.removed(&stored("a", 100));
        assert_eq!(gauge.backlog("a"), Backlog::default());
        assert_eq!(gauge.oldest_age(), Duration::ZERO);
        assert_eq!(gauge.depth(), 0);
    }

    #[test]
    fn a_project_waits_for_its_own_backlog_shared_by_the_projects_waiting() {
        let gauge = QueueGauge::default();
        gauge.record_round(1_000, Duration::from_secs(1)); // 1,000 a second
        gauge.added("flood", 100_000);
        gauge.added("quiet", 10);
        assert_eq!(gauge.depth(), 100_010);
        // Two projects share the rate: each is taken at 500 a second.
        assert_eq!(
            gauge.backlog("flood").predicted_wait,
            Some(Duration::from_secs(200))
        );
        assert_eq!(
            gauge.backlog("quiet").predicted_wait,
            Some(Duration::from_millis(20))
        );
        assert_eq!(gauge.backlog("idle").depth, 0);
        gauge.removed(&stored("quiet", 10));
        assert_eq!(gauge.backlog("quiet").depth, 0);
        assert_eq!(gauge.backlog("flood").projects_waiting, 1);
    }

    #[test]
    fn a_project_that_drains_at_its_own_rate_waits_by_that_rate() {
        let gauge = QueueGauge::default();
        // The pipeline looks slow: a neighbour's costly events fill rounds.
        gauge.record_round(500, Duration::from_secs(5));
        gauge.added("steady", 3_000);
        gauge.added("costly", 10_000);
        // But each round takes 250 of `steady`'s events in 100 ms.
        let round = HashMap::from([("steady".to_string(), 250), ("costly".to_string(), 1)]);
        gauge.removed_in(&round, Duration::from_millis(100));
        let wait = gauge.backlog("steady").predicted_wait.unwrap();
        assert_eq!(wait, Duration::from_secs_f64(2_750.0 / 2_500.0));
        // Drained: nothing to predict, and the rate is forgotten.
        gauge.removed_in(
            &HashMap::from([("steady".to_string(), 2_750)]),
            Duration::from_millis(100),
        );
        assert_eq!(gauge.backlog("steady").predicted_wait, None);
        assert!(!gauge.drain.lock().unwrap().contains_key("steady"));
    }

    #[test]
    fn a_sample_replaces_what_memory_says_of_each_project() {
        let gauge = QueueGauge::default();
        gauge.added("a", 10);
        let an_hour_ago = now_ms() - 3_600_000;
        gauge.set_projects(vec![
            (
                "b".to_string(),
                QueueStatus {
                    depth: 7,
                    oldest_enqueued_ms: Some(an_hour_ago),
                },
            ),
            ("c".to_string(), QueueStatus::default()),
        ]);
        assert_eq!(gauge.backlog("a").depth, 0);
        assert_eq!(gauge.backlog("b").depth, 7);
        assert!(gauge.backlog("b").oldest_age >= Duration::from_secs(3_599));
        let behind = gauge.behind(Duration::from_secs(60));
        assert_eq!(behind.len(), 1);
        assert_eq!(behind[0].0, "b");
        assert_eq!(gauge.backlog("c").projects_waiting, 1);
    }
}

/// Wake-ups between the rooms of the data flow: capture and replay wake the
/// worker when events are queued; the worker and the API wake delivery
/// when events reach an outbox or a destination changes. Each side also
/// polls, so a missed wake-up only delays.
#[derive(Clone, Debug, Default)]
pub struct Wakeups {
    pub worker: std::sync::Arc<tokio::sync::Notify>,
    pub delivery: std::sync::Arc<tokio::sync::Notify>,
}
