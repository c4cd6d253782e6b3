//! How far the pipeline is behind capture: the capture queue's depth and
//! the age of its oldest event, sampled from the store, logged when they
//! grow, and read by capture on every request to decide whether to push
//! back.
//!
//! Between samples, capture adds what it enqueued and the worker takes off
//! what it stored, so the depth a request sees is fresh; the sample then
//! corrects for other processes sharing the same PostgreSQL queue.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::store::{QueueStatus, Store};

/// How often the store is asked.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// The oldest event's age from which a growing queue is worth a log line.
const LOG_AGE: Duration = Duration::from_secs(5);

/// The least time between two "growing" log lines.
const LOG_EVERY: Duration = Duration::from_secs(10);

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
}

impl QueueGauge {
    pub fn depth(&self) -> i64 {
        self.depth.load(Ordering::Relaxed)
    }

    /// How long the oldest queued event has waited.
    pub fn oldest_age(&self) -> Duration {
        match self.oldest_enqueued_ms.load(Ordering::Relaxed) {
            0 => Duration::ZERO,
            at => Duration::from_millis((chrono::Utc::now().timestamp_millis() - at).max(0) as u64),
        }
    }

    /// How long an event accepted now would wait to be stored: the
    /// queue's depth at the rate this process stores while busy. `None`
    /// until the pipeline has been busy once, and when the queue is empty.
    ///
    /// The oldest event's age alone bounds only the head of the queue:
    /// offered twice what the pipeline stores, the events accepted just
    /// before the age bound tripped waited three times the bound. With
    /// several processes on one PostgreSQL each divides the whole queue by
    /// its own rate, so the estimate errs towards refusing early.
    pub fn predicted_wait(&self) -> Option<Duration> {
        let depth = self.depth();
        let rate = self.capacity_per_second.load(Ordering::Relaxed);
        (depth > 0 && rate > 0).then(|| Duration::from_secs_f64(depth as f64 / rate as f64))
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

    pub fn added(&self, events: usize) {
        let before = self.depth.fetch_add(events as i64, Ordering::Relaxed);
        if before <= 0 {
            // The queue was empty: these events are now its oldest.
            let _ = self.oldest_enqueued_ms.compare_exchange(
                0,
                chrono::Utc::now().timestamp_millis(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    pub fn removed(&self, events: usize) {
        let before = self.depth.fetch_sub(events as i64, Ordering::Relaxed);
        if before <= events as i64 {
            // Caught up, as far as this process knows; the next sample
            // corrects it if another process still has events queued.
            self.oldest_enqueued_ms.store(0, Ordering::Relaxed);
        }
    }

    pub fn set(&self, status: QueueStatus) {
        self.depth.store(status.depth, Ordering::Relaxed);
        self.oldest_enqueued_ms
            .store(status.oldest_enqueued_ms.unwrap_or(0), Ordering::Relaxed);
    }
}

/// Samples the queue until `stop`, logging when it grows: a warning while
/// the oldest event has waited [`LOG_AGE`] or more (at most every
/// [`LOG_EVERY`]), and a line when it has caught up again.
pub async fn run_monitor(
    store: Store,
    gauge: std::sync::Arc<QueueGauge>,
    max_age: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut last_warned: Option<Instant> = None;
    let mut behind = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(SAMPLE_EVERY) => {}
            _ = stop.changed() => return,
        }
        let status = match store.queue_status().await {
            Ok(status) => status,
            Err(err) => {
                tracing::warn!("failed to read the capture queue's depth: {err}");
                continue;
            }
        };
        gauge.set(status);
        let age = gauge.oldest_age();
        if age >= LOG_AGE {
            if last_warned.is_none_or(|at| at.elapsed() >= LOG_EVERY) {
                tracing::warn!(
                    depth = status.depth,
                    oldest_age_seconds = age.as_secs(),
                    max_queue_age_seconds = max_age.as_secs(),
                    "the capture queue is growing: the pipeline stores less than capture accepts{}",
                    if age >= max_age {
                        "; capture is answering 503 until it catches up"
                    } else {
                        ""
                    }
                );
                last_warned = Some(Instant::now());
            }
            behind = true;
        } else if behind {
            tracing::info!(
                depth = status.depth,
                oldest_age_seconds = age.as_secs(),
                "the capture queue has caught up"
            );
            behind = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_is_unknown_until_the_pipeline_has_been_busy() {
        let gauge = QueueGauge::default();
        gauge.added(10_000);
        assert_eq!(gauge.predicted_wait(), None);
        gauge.record_round(500, Duration::from_millis(100));
        assert_eq!(gauge.predicted_wait(), Some(Duration::from_secs(2)));
    }

    #[test]
    fn one_slow_round_moves_the_estimate_only_part_of_the_way() {
        let gauge = QueueGauge::default();
        gauge.added(5_000);
        gauge.record_round(500, Duration::from_millis(100)); // 5,000 a second
        gauge.record_round(500, Duration::from_millis(1_000)); // 500 a second
        let wait = gauge.predicted_wait().unwrap();
        assert!(
            wait > Duration::from_secs(1) && wait < Duration::from_secs(2),
            "{wait:?}"
        );
    }

    #[test]
    fn an_empty_queue_has_no_wait() {
        let gauge = QueueGauge::default();
        gauge.record_round(500, Duration::from_millis(100));
        assert_eq!(gauge.predicted_wait(), None);
        gauge.added(100);
        gauge.removed(100);
        assert_eq!(gauge.predicted_wait(), None);
        assert_eq!(gauge.oldest_age(), Duration::ZERO);
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
