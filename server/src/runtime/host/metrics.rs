//! Plugin-reported counters, kept per install with a cap on series.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::HostState;
use crate::runtime::bindings::metrics::{Host, MetricsError};

/// A counter series: install, name and sorted labels.
pub type SeriesKey = (String, String, Vec<(String, String)>);

/// Counters from every install of a runtime.
#[derive(Default)]
pub struct Metrics {
    counters: Mutex<BTreeMap<SeriesKey, u64>>,
}

impl Metrics {
    /// Every series and its value.
    pub fn snapshot(&self) -> BTreeMap<SeriesKey, u64> {
        self.counters.lock().expect("metrics lock").clone()
    }

    /// Drops every series of an install that is gone.
    pub fn remove_install(&self, install: &str) {
        let mut counters = self.counters.lock().expect("metrics lock");
        counters.retain(|(owner, _, _), _| owner != install);
    }

    fn increment(
        &self,
        install: &str,
        name: String,
        mut labels: Vec<(String, String)>,
        delta: u64,
        max_series: u32,
    ) -> Result<(), MetricsError> {
        let valid = !name.is_empty()
            && name.len() <= 64
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(MetricsError::InvalidName(format!(
                "`{name}` must be 1-64 characters of [a-zA-Z0-9_], not starting with a digit"
            )));
        }
        labels.sort();
        let key = (install.to_string(), name, labels);
        let mut counters = self.counters.lock().expect("metrics lock");
        if !counters.contains_key(&key) {
            let series = counters.keys().filter(|(i, _, _)| i == install).count();
            if series >= max_series as usize {
                return Err(MetricsError::TooManySeries(format!(
                    "an install may have at most {max_series} series; use fewer label values"
                )));
            }
        }
        let value = counters.entry(key).or_default();
        *value = value.saturating_add(delta);
        Ok(())
    }
}

impl Host for HostState {
    fn increment(
        &mut self,
        name: String,
        delta: u64,
        labels: Vec<(String, String)>,
    ) -> wasmtime::Result<Result<(), MetricsError>> {
        let max_series = self.install.limits.max_metric_series;
        Ok(self.services.metrics.increment(
            &self.install.install_id,
            name,
            labels,
            delta,
            max_series,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_removed_install_keeps_no_series_and_others_keep_theirs() {
        let metrics = Metrics::default();
        for install in ["check", "kept"] {
            metrics
                .increment(install, "sent".into(), vec![], 2, 10)
                .unwrap();
        }
        metrics.remove_install("check");
        let installs: Vec<String> = metrics
            .snapshot()
            .into_keys()
            .map(|(install, _, _)| install)
            .collect();
        assert_eq!(installs, ["kept"]);
    }
}
