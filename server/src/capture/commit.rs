//! Group commit: capture requests that arrive together are written to the
//! queue in one transaction, with one commit (one fsync), and each request
//! is answered only after the commit that holds its events.
//!
//! A commit costs about the same for one request as for a hundred, so a
//! request waits for at most the commit in progress and its own; under load
//! the groups grow by themselves, and an idle server commits each request
//! at once.

use std::sync::Arc;

use tokio::sync::{Mutex, mpsc, oneshot};

use crate::store::{Backend, QueueWrite, Store};

/// Most events in one group: a group is one transaction, and a very large
/// one would make the requests at its head wait for the rest.
const MAX_GROUP_EVENTS: usize = 5_000;

/// Requests waiting for a writer. Beyond this, senders wait for room.
const PENDING_REQUESTS: usize = 1_024;

struct Pending {
    write: QueueWrite,
    done: oneshot::Sender<Result<(), crate::store::Error>>,
}

/// The handle capture handlers write through; cheap to clone.
#[derive(Clone)]
pub struct GroupCommit {
    sender: mpsc::Sender<Pending>,
}

impl GroupCommit {
    /// Starts the writers. SQLite has one write lock, so one writer; on
    /// PostgreSQL a few run at once, each committing its own group.
    pub fn start(store: Store) -> GroupCommit {
        let writers = match store.backend() {
            Backend::Sqlite => 1,
            Backend::Postgres => 3,
        };
        let (sender, receiver) = mpsc::channel(PENDING_REQUESTS);
        let receiver = Arc::new(Mutex::new(receiver));
        for _ in 0..writers {
            tokio::spawn(write_groups(store.clone(), receiver.clone()));
        }
        GroupCommit { sender }
    }

    /// Returns once `write` is committed.
    pub async fn enqueue(&self, write: QueueWrite) -> Result<(), crate::store::Error> {
        let (done, committed) = oneshot::channel();
        self.sender
            .send(Pending { write, done })
            .await
            .map_err(|_| crate::store::Error::Unavailable(sqlx::Error::PoolClosed))?;
        committed
            .await
            .map_err(|_| crate::store::Error::Unavailable(sqlx::Error::PoolClosed))?
    }
}

/// Takes what is waiting (at least one request), writes it as one group
/// and answers every request in it; ends when capture is gone.
async fn write_groups(store: Store, receiver: Arc<Mutex<mpsc::Receiver<Pending>>>) {
    loop {
        let mut group = {
            let mut receiver = receiver.lock().await;
            let Some(first) = receiver.recv().await else {
                return;
            };
            let mut events = first.write.payloads.len();
            let mut group = vec![first];
            while events < MAX_GROUP_EVENTS {
                match receiver.try_recv() {
                    Ok(next) => {
                        events += next.write.payloads.len();
                        group.push(next);
                    }
                    Err(_) => break,
                }
            }
            group
        };
        let writes: Vec<&QueueWrite> = group.iter().map(|p| &p.write).collect();
        let result = store.enqueue_requests(&writes).await;
        drop(writes);
        match result {
            Ok(()) => {
                for pending in group {
                    let _ = pending.done.send(Ok(()));
                }
            }
            // One request's trouble must not fail the others: write each on
            // its own, so each gets its own answer.
            Err(err) if group.len() > 1 => {
                tracing::warn!(
                    requests = group.len(),
                    "a group commit failed ({err}); writing its requests one by one"
                );
                for pending in group {
                    let result = store.enqueue_requests(&[&pending.write]).await;
                    let _ = pending.done.send(result);
                }
            }
            Err(err) => {
                if let Some(pending) = group.pop() {
                    let _ = pending.done.send(Err(err));
                }
            }
        }
    }
}
