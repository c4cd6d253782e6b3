//! What each project takes of what every project's plugins share: the
//! runtime reads each project's quotas through [`ProjectQuotas`] (it may
//! not import the server's quota book) and counts live instances per
//! project, so one project cannot fill the sandbox's pool.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use crate::model::Quotas;

/// Looks up one project's quotas.
type Lookup = dyn Fn(&str) -> Arc<Quotas> + Send + Sync;

/// Reads a project's quotas. The server hands in its quota book, so a
/// change made with `sluice project quotas` reaches running plugins.
#[derive(Clone)]
pub struct ProjectQuotas(Arc<Lookup>);

impl ProjectQuotas {
    pub fn new(get: impl Fn(&str) -> Arc<Quotas> + Send + Sync + 'static) -> Self {
        ProjectQuotas(Arc::new(get))
    }

    /// The quotas of `project_id`.
    pub fn get(&self, project_id: &str) -> Arc<Quotas> {
        (self.0)(project_id)
    }
}

/// Every project gets the default quotas: what `sluice plugin test` and a
/// runtime built without a server need.
impl Default for ProjectQuotas {
    fn default() -> Self {
        let defaults = Arc::new(Quotas::default());
        ProjectQuotas::new(move |_| defaults.clone())
    }
}

impl fmt::Debug for ProjectQuotas {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ProjectQuotas(..)")
    }
}

/// Live instances per project, across the whole runtime.
#[derive(Default)]
pub(crate) struct InstanceCounts {
    by_project: Mutex<HashMap<String, u32>>,
}

impl InstanceCounts {
    /// A slot for one more live instance of `project_id`, or how many it
    /// holds already when that is `limit` or more.
    pub(crate) fn take(
        self: &Arc<Self>,
        project_id: &str,
        limit: u32,
    ) -> Result<InstanceSlot, u32> {
        let mut counts = self.by_project.lock().expect("instance counts lock");
        let held = counts.entry(project_id.to_string()).or_default();
        if *held >= limit {
            return Err(*held);
        }
        *held += 1;
        Ok(InstanceSlot {
            counts: self.clone(),
            project_id: project_id.to_string(),
        })
    }

    /// Projects holding live instances, the most first.
    pub(crate) fn by_project(&self) -> Vec<(String, u32)> {
        let counts = self.by_project.lock().expect("instance counts lock");
        let mut held: Vec<(String, u32)> = counts
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(project, n)| (project.clone(), *n))
            .collect();
        held.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        held
    }
}

/// One live instance's place in its project's count, given back on drop:
/// however the instance ends (discarded after a trap, its install dropped,
/// a panic unwinding through the holder), the count cannot leak.
pub(crate) struct InstanceSlot {
    counts: Arc<InstanceCounts>,
    project_id: String,
}

impl Drop for InstanceSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.by_project.lock().expect("instance counts lock");
        if let Some(held) = counts.get_mut(&self.project_id) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                counts.remove(&self.project_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_project_at_its_limit_gets_no_slot_until_one_is_dropped() {
        let counts = Arc::new(InstanceCounts::default());
        let first = counts.take("a", 2).unwrap();
        let _second = counts.take("a", 2).unwrap();
        assert_eq!(counts.take("a", 2).err(), Some(2));
        assert!(
            counts.take("b", 2).is_ok(),
            "another project has its own count"
        );
        drop(first);
        let _third = counts.take("a", 2).unwrap();
        assert_eq!(counts.by_project(), vec![("a".to_string(), 2)]);
    }
}
