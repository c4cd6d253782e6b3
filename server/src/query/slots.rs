//! How many analytics queries run at once: at most the operator's
//! `--max-concurrent-queries` across the server, and each project's
//! `concurrent_queries` quota of those. Without the second, one project
//! sending year-long trends in a loop would hold every slot, and every
//! other project's dashboards would wait behind it.
//!
//! A [`QuerySlot`] is held for as long as its query runs and gives both
//! places back when dropped, so a query that ends early (a timeout, a
//! client that went away and dropped the request) frees them too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::model::quotas::Hit;

/// How long a query waits for one of the server's slots before it is
/// refused: long enough to ride out a moment when the server is full,
/// short enough that a client is told soon that it is.
pub const WAIT_FOR_A_SLOT: Duration = Duration::from_secs(2);

/// The server's query slots and each project's count of them; cheap to
/// clone.
#[derive(Clone)]
pub struct QuerySlots {
    server: Arc<Semaphore>,
    size: u32,
    wait: Duration,
    running: Arc<Mutex<HashMap<String, u32>>>,
}

/// Why a query may not run now; worth retrying soon.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoSlot {
    #[error(
        "the project already runs {limit} analytics queries at once, {}; retry when one of them has finished",
        Hit { quota: "concurrent_queries", limit: u64::from(*limit) }
    )]
    Project { limit: u32 },
    #[error(
        "the server is running its most analytics queries at once ({limit}, set with --max-concurrent-queries); retry in a few seconds"
    )]
    Server { limit: u32 },
}

/// One running query's place, given back when dropped.
#[must_use = "the slot is given back when dropped"]
pub struct QuerySlot {
    _server: OwnedSemaphorePermit,
    _project: ProjectTurn,
}

/// One of a project's places, given back when dropped.
struct ProjectTurn {
    running: Arc<Mutex<HashMap<String, u32>>>,
    project_id: String,
}

impl Drop for ProjectTurn {
    fn drop(&mut self) {
        let mut running = self.running.lock().expect("not poisoned");
        if let Some(count) = running.get_mut(&self.project_id) {
            *count -= 1;
            if *count == 0 {
                running.remove(&self.project_id);
            }
        }
    }
}

impl QuerySlots {
    /// `size` queries at once across the server; a query finding them all
    /// taken waits up to `wait` for one.
    pub fn new(size: u32, wait: Duration) -> Self {
        QuerySlots {
            server: Arc::new(Semaphore::new(size as usize)),
            size,
            wait,
            running: Arc::default(),
        }
    }

    /// A slot for one query of `project_id`, whose quota is `quota`
    /// queries at once. The project's count is checked first and never
    /// waited on: a project over its own quota is told so at once, and
    /// does not queue for the server's slots ahead of other projects.
    pub async fn acquire(&self, project_id: &str, quota: u32) -> Result<QuerySlot, NoSlot> {
        let project = self.project_turn(project_id, quota)?;
        let server = tokio::time::timeout(self.wait, self.server.clone().acquire_owned())
            .await
            .map_err(|_| NoSlot::Server { limit: self.size })?
            .expect("the semaphore is never closed");
        Ok(QuerySlot {
            _server: server,
            _project: project,
        })
    }

    fn project_turn(&self, project_id: &str, quota: u32) -> Result<ProjectTurn, NoSlot> {
        let mut running = self.running.lock().expect("not poisoned");
        let count = running.entry(project_id.to_string()).or_insert(0);
        if *count >= quota {
            return Err(NoSlot::Project { limit: quota });
        }
        *count += 1;
        Ok(ProjectTurn {
            running: self.running.clone(),
            project_id: project_id.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_project_over_its_quota_is_refused_naming_it_while_others_run() {
        let slots = QuerySlots::new(4, Duration::from_millis(10));
        let _first = slots.acquire("a", 1).await.unwrap();
        let refused = slots.acquire("a", 1).await.err().unwrap();
        assert_eq!(refused, NoSlot::Project { limit: 1 });
        let message = refused.to_string();
        assert!(message.contains("`concurrent_queries` (1)"), "{message}");
        assert!(message.contains("sluice project quotas"), "{message}");
        assert!(slots.acquire("b", 1).await.is_ok());
    }

    #[tokio::test]
    async fn a_full_server_refuses_after_its_wait_and_gives_the_project_its_place_back() {
        let slots = QuerySlots::new(1, Duration::from_millis(10));
        let held = slots.acquire("a", 2).await.unwrap();
        let refused = slots.acquire("b", 2).await.err().unwrap();
        assert_eq!(refused, NoSlot::Server { limit: 1 });
        assert!(refused.to_string().contains("--max-concurrent-queries"));
        drop(held);
        // Neither refusal nor release left a count behind.
        let _b1 = slots.acquire("b", 2).await.unwrap();
        assert!(slots.running.lock().unwrap().get("a").is_none());
        assert_eq!(slots.running.lock().unwrap().get("b"), Some(&1));
    }

    #[tokio::test]
    async fn a_waiting_query_gets_the_slot_a_finished_one_gives_back() {
        let slots = QuerySlots::new(1, Duration::from_secs(60));
        let held = slots.acquire("a", 1).await.unwrap();
        let waiting = tokio::spawn({
            let slots = slots.clone();
            async move { slots.acquire("b", 1).await.map(|_| ()) }
        });
        drop(held);
        assert_eq!(waiting.await.unwrap(), Ok(()));
    }

    #[tokio::test]
    async fn a_query_dropped_mid_run_gives_both_places_back() {
        let slots = QuerySlots::new(1, Duration::from_millis(10));
        let run = {
            let slots = slots.clone();
            async move {
                let _slot = slots.acquire("a", 1).await.unwrap();
                std::future::pending::<()>().await
            }
        };
        // As a request is dropped when its client goes away, or a query
        // at its deadline.
        let ended = tokio::time::timeout(Duration::from_millis(10), run).await;
        assert!(ended.is_err());
        assert!(slots.acquire("a", 1).await.is_ok());
    }
}
