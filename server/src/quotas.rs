//! Every project's quotas, in memory: read on every capture request and
//! for every event's chain, so they cannot cost a query each. The
//! overrides are read again every [`REFRESH`], so a change made with
//! `sluice project quotas` (from any process) applies within that.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::sync::watch;

use crate::model::Quotas;
use crate::store::Store;
use crate::supervisor::Health;

/// How often the overrides are read again.
pub const REFRESH: Duration = Duration::from_secs(2);

/// The defaults and each project's quotas; cheap to clone.
#[derive(Clone)]
pub struct QuotaBook {
    inner: Arc<Inner>,
}

struct Inner {
    defaults: Arc<Quotas>,
    by_project: RwLock<HashMap<String, Arc<Quotas>>>,
}

impl QuotaBook {
    pub fn new(defaults: Quotas) -> Self {
        QuotaBook {
            inner: Arc::new(Inner {
                defaults: Arc::new(defaults),
                by_project: RwLock::default(),
            }),
        }
    }

    /// A project's quotas.
    pub fn get(&self, project_id: &str) -> Arc<Quotas> {
        self.inner
            .by_project
            .read()
            .expect("not poisoned")
            .get(project_id)
            .cloned()
            .unwrap_or_else(|| self.inner.defaults.clone())
    }

    /// Reads every project's overrides from the store. An override that no
    /// longer parses (written by a newer version, say) is logged and the
    /// project keeps the defaults for it.
    pub async fn refresh(&self, store: &Store) -> crate::store::Result<()> {
        let rows = store.quota_overrides().await?;
        let mut by_project = HashMap::with_capacity(rows.len());
        for (project_id, text) in rows {
            match self.resolve(&text) {
                Ok(quotas) => {
                    by_project.insert(project_id, Arc::new(quotas));
                }
                Err(message) => tracing::warn!(
                    project = %project_id,
                    "ignoring the project's quota overrides: {message}"
                ),
            }
        }
        *self.inner.by_project.write().expect("not poisoned") = by_project;
        Ok(())
    }

    /// The defaults with an override's text applied.
    pub fn resolve(&self, overrides: &str) -> Result<Quotas, String> {
        let map: Map<String, Value> = serde_json::from_str(overrides)
            .map_err(|err| format!("they are not a JSON object: {err}"))?;
        self.inner
            .defaults
            .with_overrides(&map)
            .map_err(|err| err.0)
    }

    /// Reads the overrides every [`REFRESH`] until `stop`.
    pub async fn run(
        self,
        store: Store,
        health: Health,
        mut stop: watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        loop {
            match self.refresh(&store).await {
                Ok(()) => health.ready(),
                Err(err) => tracing::warn!("failed to read the projects' quotas: {err}"),
            }
            tokio::select! {
                _ = tokio::time::sleep(REFRESH) => {}
                _ = stop.changed() => return Ok(()),
            }
        }
    }
}
