//! Starting the plugin of an install: its `.wasm` read from the store,
//! compiled (or taken from the cache), and set up with the install's
//! config. The pipeline, delivery and the scheduler all start plugins
//! here.
//!
//! A failure says whose fault it is, because the two are handled in
//! opposite ways: a plugin that cannot start with its config will not
//! start on the next try either, and its install is disabled with the
//! reason shown; a host that could not start it (the database did not
//! answer, the instance pool was full, a worker thread died) may well on
//! the next try, and disabling a customer's transformation for it would
//! turn a blip into lost work.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::runtime::{Install, LoadError, PluginError, PluginInstance, Runtime};
use crate::store::{PluginConfig, SecretError, Store};

/// How often at most the log lists who holds the plugin instances: while
/// there is no room, every lane and chain asks again every second.
const HOLDERS_LOG_EVERY: Duration = Duration::from_secs(10);

/// Why an install's plugin did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The plugin's own fault: starting it again will fail the same way.
    #[error("{0}")]
    Plugin(String),
    /// The host's: try again later.
    #[error("{0}")]
    Host(String),
    /// There was no room to run it (the sandbox's pool is full, or its
    /// project holds every instance its quota allows): the work waits,
    /// without counting as a failed attempt.
    #[error("{0}")]
    Exhausted(String),
}

impl StartError {
    fn map(self, f: impl FnOnce(String) -> String) -> StartError {
        match self {
            StartError::Plugin(message) => StartError::Plugin(f(message)),
            StartError::Host(message) => StartError::Host(f(message)),
            StartError::Exhausted(message) => StartError::Exhausted(f(message)),
        }
    }

    /// Whether the install should be disabled for it.
    pub fn is_plugin_fault(&self) -> bool {
        matches!(self, StartError::Plugin(_))
    }

    /// Whether it did not start for want of room (see
    /// [`StartError::Exhausted`]).
    pub fn is_exhausted(&self) -> bool {
        matches!(self, StartError::Exhausted(_))
    }
}

/// Starts the plugin of `config`.
pub async fn start(
    store: &Store,
    runtime: &Runtime,
    config: &PluginConfig,
) -> Result<PluginInstance, StartError> {
    let wasm = store
        .plugin_wasm(&config.plugin_sha256)
        .await
        .map_err(|err| {
            StartError::Host(format!("failed to read the plugin from the store: {err}"))
        })?
        .ok_or_else(|| {
            StartError::Plugin(format!(
                "plugin {} is not installed; upload it again",
                config.plugin_sha256
            ))
        })?;
    // Opened here and only here, for the plugin's setup: the plugin
    // instance keeps the config, so batches never open it again.
    let opened = store.open_config(config).map_err(|err| {
        let message = format!("failed to read its config: {err}");
        match err {
            // Another server sealed it with a key this one is not given
            // yet: the operator's to fix, not the config's.
            SecretError::MissingKey { .. } => StartError::Host(message),
            _ => StartError::Plugin(message),
        }
    })?;
    let runtime = runtime.clone();
    let project_id = config.project_id.clone();
    let install = Install {
        install_id: config.id.clone(),
        project_id: config.project_id.clone(),
        config: opened,
        limits: None,
    };
    let started = tokio::task::spawn_blocking(move || {
        let plugin = runtime.load(&wasm).map_err(|err| {
            let message = format!("failed to load the plugin: {err}");
            match err {
                // It compiled when it was uploaded, so failing now is the
                // host's (its cache or its memory), not the plugin's.
                LoadError::Compile { .. } => StartError::Host(message),
                _ => StartError::Plugin(message),
            }
        })?;
        plugin.install(install).map_err(|err| {
            let message = format!("failed to start: {err}");
            match err {
                PluginError::Exhausted { .. } => {
                    log_holders(&runtime, &project_id);
                    StartError::Exhausted(message)
                }
                PluginError::Instantiate { .. } => StartError::Host(message),
                _ => StartError::Plugin(message),
            }
        })
    })
    .await
    .map_err(|err| StartError::Host(format!("failed to start: {err}")))?;
    // A setup error may quote the config it refused.
    started.map_err(|err| err.map(|message| store.scrub(&config.id, &message).into_owned()))
}

/// Logs which projects hold the live instances, so the operator sees who
/// fills the pool or a quota; at most every [`HOLDERS_LOG_EVERY`].
fn log_holders(runtime: &Runtime, project_id: &str) {
    static LAST: Mutex<Option<Instant>> = Mutex::new(None);
    let mut last = LAST.lock().expect("not poisoned");
    if last.is_some_and(|at| at.elapsed() < HOLDERS_LOG_EVERY) {
        return;
    }
    *last = Some(Instant::now());
    let holders: Vec<String> = runtime
        .instances_by_project()
        .into_iter()
        .map(|(project, n)| format!("{project}: {n}"))
        .collect();
    tracing::warn!(
        project = %project_id,
        "no room for a plugin instance; live instances by project: {}",
        holders.join(", ")
    );
}
