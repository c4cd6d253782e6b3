//! The pipeline worker: leases events from the durable queue, stores them
//! once per (project, uuid), and only then removes them from the queue, so a
//! crash at any point leaves each event either queued or stored.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;

use crate::server::AppState;
use crate::store::LEASE;

/// Rows leased per round trip.
const CLAIM_BATCH: u32 = 500;

/// How long an idle worker waits before looking again, in case a wake-up
/// was missed (another process enqueued, or a lease expired).
const IDLE_POLL: Duration = Duration::from_millis(200);

pub async fn run_worker(state: AppState, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let owner = format!("worker-{}", uuid::Uuid::new_v4());
    loop {
        if *stop.borrow() {
            break;
        }
        let claimed = match state.store.claim(&owner, CLAIM_BATCH, LEASE).await {
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
        let events: Vec<_> = claimed
            .into_iter()
            .map(|c| (c.project_id, c.event))
            .collect();
        match state.store.complete(&owner, &ids, &events).await {
            Ok(()) => {
                state
                    .queue_depth
                    .fetch_sub(ids.len() as i64, Ordering::Relaxed);
            }
            Err(err) => {
                // The lease runs out and the rows are taken again.
                tracing::error!("failed to store {} events: {err}", events.len());
                tokio::time::sleep(IDLE_POLL).await;
            }
        }
    }
    state.store.release(&owner).await?;
    Ok(())
}
