//! One watcher of the enabled plugin configs for the whole process. The
//! pipeline's chains, delivery's lanes and the scheduler's timetable all
//! follow what it publishes, so the store is asked once, not once per
//! consumer.
//!
//! It reads the configs again when the store's stamp changes (another
//! process, or the pipeline disabling a failing plugin, changed them) and
//! at once when this process's API asks: [`ConfigWatch::changed`] returns
//! only after a read that began after the change, so a config changed
//! through the API applies to every event accepted after the response.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, watch};

use crate::store::{PluginConfig, Store};
use crate::supervisor::Health;

/// How often the stamp is read, for changes made by other processes.
const POLL: Duration = Duration::from_millis(250);

/// How long the API waits for the watcher before answering anyway; the
/// change is stored, and applies as soon as the watcher reads it.
const CHANGED_WAIT: Duration = Duration::from_secs(5);

/// Every enabled plugin config, by project and chain order.
pub type Snapshot = Arc<[PluginConfig]>;

/// A handle on the watcher; cheap to clone.
#[derive(Clone)]
pub struct ConfigWatch {
    inner: Arc<Inner>,
}

struct Inner {
    /// `None` until the first read.
    configs: watch::Sender<Option<Snapshot>>,
    /// The number of requests counted when the last published read began.
    served: watch::Sender<u64>,
    requested: AtomicU64,
    poke: Notify,
}

impl Default for ConfigWatch {
    fn default() -> Self {
        ConfigWatch {
            inner: Arc::new(Inner {
                configs: watch::Sender::new(None),
                served: watch::Sender::new(0),
                requested: AtomicU64::new(0),
                poke: Notify::new(),
            }),
        }
    }
}

impl ConfigWatch {
    /// Follows the published configs; [`first`] waits for the first.
    pub fn subscribe(&self) -> watch::Receiver<Option<Snapshot>> {
        self.inner.configs.subscribe()
    }

    /// Waits for the watcher to read the configs after a change this
    /// process made.
    pub async fn changed(&self) {
        let request = self.inner.requested.fetch_add(1, Ordering::SeqCst) + 1;
        let mut served = self.inner.served.subscribe();
        self.inner.poke.notify_one();
        let read = tokio::time::timeout(CHANGED_WAIT, served.wait_for(|n| *n >= request)).await;
        if read.is_err() {
            tracing::warn!(
                "the plugin config watcher has not read a change within {} s; it applies once it does",
                CHANGED_WAIT.as_secs()
            );
        }
    }

    /// Reads the configs whenever they change, until `stop`. A failed
    /// read ends the task, for the supervisor to report and restart.
    pub async fn run(
        self,
        store: Store,
        health: Health,
        mut stop: watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let mut stamp: Option<String> = None;
        loop {
            let request = self.inner.requested.load(Ordering::SeqCst);
            let now = store.plugin_configs_stamp().await?;
            if stamp.as_ref() != Some(&now) || request > *self.inner.served.borrow() {
                let (configs, unreadable) = store.enabled_plugin_configs().await?;
                // A config that does not read back cannot run as its owner
                // set it: it is switched off where operators see why,
                // rather than run with guessed settings or hold up every
                // other project. The next read no longer includes it.
                for (id, err) in unreadable {
                    tracing::error!(plugin_config = %id, "disabling a plugin config: {err}");
                    store
                        .disable_plugin_config(
                            &id,
                            &format!("its stored settings are unreadable: {err}"),
                        )
                        .await?;
                }
                let configs: Snapshot = configs.into();
                self.inner.configs.send_replace(Some(configs));
                stamp = Some(now);
            }
            self.inner.served.send_replace(request);
            health.ready();
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = self.inner.poke.notified() => {}
                _ = stop.changed() => return Ok(()),
            }
        }
    }
}

/// Waits for the first published configs; `None` if told to stop first.
pub async fn first(
    configs: &mut watch::Receiver<Option<Snapshot>>,
    stop: &mut watch::Receiver<bool>,
) -> Option<Snapshot> {
    tokio::select! {
        found = configs.wait_for(Option::is_some) => found.ok().and_then(|s| s.clone()),
        _ = stop.changed() => None,
    }
}

/// The configs published since `configs` last looked, if any.
pub fn newer(configs: &mut watch::Receiver<Option<Snapshot>>) -> Option<Snapshot> {
    if !configs.has_changed().unwrap_or(false) {
        return None;
    }
    configs.borrow_and_update().clone()
}
