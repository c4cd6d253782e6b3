//! The plugin sandbox: one wasmtime `Engine`, compiled components cached on
//! disk, an `InstancePre` per plugin version and a store per install, with
//! memory, time, output and log limits. Capabilities come from
//! [`capability::Grants`]; a trapped instance is discarded and rebuilt on the
//! next call.

mod bindings;
mod cache;
pub mod capability;
pub mod error;
pub mod event;
pub mod host;
pub mod limits;
mod share;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};
use wasmtime::component::{Linker, Resource};
use wasmtime::{Engine, Store};

pub use crate::model::format_timestamp;
pub use crate::model::manifest::{self, Hook, Manifest};
pub use bindings::{ExportedEvent, RetryableError};
pub use error::{LoadError, Phase, PluginError, TrapReason};
pub use event::PluginEvent;
pub use host::{HttpCall, LogLevel, LogRecord};
pub use limits::{Limits, Policy};
pub use share::ProjectQuotas;

use crate::model::quotas::Hit;
use capability::Grants;
use host::{Activity, HostServices, HostState, InstallContext};
use share::{InstanceCounts, InstanceSlot};

/// How often the engine's epoch advances: the resolution of every deadline.
const EPOCH_TICK: Duration = Duration::from_millis(5);

/// How often expired key-value entries are swept away, in epoch ticks (about
/// two seconds): their memory and their place in the quotas come back
/// without anyone reading them.
const KV_SWEEP_TICKS: u32 = 400;

/// What one component may take of the pool, so no single plugin holds the
/// share of many. Every first-party and test plugin has 3 core instances,
/// 1 memory and 2 tables (its module, and the shims `wit-component` adds);
/// the room above that is for other toolchains' adapters. A component over
/// these fails to load (when uploaded), never later. The sizes of one
/// instance's metadata keep wasmtime's defaults (1 MiB each), and its
/// memory the policy's `memory_bytes`.
const CORE_INSTANCES_PER_COMPONENT: u32 = 8;
const MEMORIES_PER_COMPONENT: u32 = 2;
const TABLES_PER_COMPONENT: u32 = 4;

/// How to build a [`Runtime`].
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    pub policy: Policy,
    /// Where compiled components are cached; `None` compiles on every load.
    pub cache_dir: Option<PathBuf>,
    /// Instances the pooling allocator preallocates; 0 turns pooling off.
    pub pool_size: u32,
    /// Keep full URLs and request bodies in recorded HTTP calls (they may
    /// carry credentials). Otherwise query values are redacted and bodies
    /// left out.
    pub record_http_details: bool,
    /// Each project's quotas: its live instances, HTTP permits and
    /// key-value data.
    pub quotas: ProjectQuotas,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            policy: Policy::default(),
            cache_dir: cache::default_dir(),
            pool_size: 100,
            record_http_details: false,
            quotas: ProjectQuotas::default(),
        }
    }
}

/// The plugin runtime. Cheap to clone; clones share the engine.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Engine,
    linker: Linker<HostState>,
    policy: Policy,
    cache: cache::ComponentCache,
    services: Arc<HostServices>,
    /// Instances the pool holds; 0 when pooling is off.
    pool_size: u32,
    instances: Arc<InstanceCounts>,
    ticker_stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.ticker_stop
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Runtime {
    pub fn new(config: RuntimeConfig) -> anyhow::Result<Runtime> {
        let policy = config.policy;
        policy.host_rules().map_err(anyhow::Error::msg)?;
        let mut wasm = wasmtime::Config::new();
        wasm.wasm_component_model(true).epoch_interruption(true);
        if config.pool_size > 0 {
            let n = config.pool_size;
            let mut pool = wasmtime::PoolingAllocationConfig::default();
            pool.total_component_instances(n)
                .total_core_instances(n * 4)
                .total_memories(n * 2)
                .total_tables(n * 4)
                .total_stacks(n)
                .max_core_instances_per_component(CORE_INSTANCES_PER_COMPONENT)
                .max_memories_per_component(MEMORIES_PER_COMPONENT)
                .max_tables_per_component(TABLES_PER_COMPONENT)
                .max_memory_size(policy.limits.memory_bytes as usize);
            wasm.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
        }
        let engine = Engine::new(&wasm)
            .map_err(|err| anyhow::anyhow!("failed to create the wasm engine: {err}"))?;

        let mut linker = Linker::new(&engine);
        bindings::add_to_linker(&mut linker)
            .map_err(|err| anyhow::anyhow!("failed to link host capabilities: {err}"))?;
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(|err| anyhow::anyhow!("failed to link WASI: {err}"))?;

        let kv: Arc<dyn host::kv::KvStore> = Arc::new(host::kv::MemoryKv::default());
        let services = Arc::new(HostServices {
            http: host::http::HttpClient::new(&policy)?,
            kv: kv.clone(),
            metrics: host::metrics::Metrics::default(),
            record_http_details: config.record_http_details,
            quotas: config.quotas,
        });

        let ticker_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let weak = engine.weak();
        let weak_kv = Arc::downgrade(&kv);
        let stop = ticker_stop.clone();
        std::thread::Builder::new()
            .name("sluice-epoch".into())
            .spawn(move || {
                let mut ticks = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    match weak.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => break,
                    }
                    ticks += 1;
                    if ticks >= KV_SWEEP_TICKS {
                        ticks = 0;
                        if let Some(kv) = weak_kv.upgrade() {
                            kv.sweep_expired();
                        }
                    }
                }
            })?;

        Ok(Runtime {
            inner: Arc::new(Inner {
                engine,
                linker,
                policy,
                cache: cache::ComponentCache::new(config.cache_dir),
                services,
                pool_size: config.pool_size,
                instances: Arc::default(),
                ticker_stop,
            }),
        })
    }

    pub fn policy(&self) -> &Policy {
        &self.inner.policy
    }

    /// Counters reported by plugins, per install.
    pub fn metrics(&self) -> &host::metrics::Metrics {
        &self.inner.services.metrics
    }

    /// Projects holding live plugin instances and how many, the most
    /// first: who fills the pool when it is full.
    pub fn instances_by_project(&self) -> Vec<(String, u32)> {
        self.inner.instances.by_project()
    }

    /// Drops what an install left in the shared host services (its
    /// key-value namespace and its counters), for an install that ran only
    /// once, such as the API's check of a new config.
    pub fn forget_install(&self, install_id: &str) {
        self.inner.services.kv.remove_namespace(install_id);
        self.inner.services.metrics.remove_install(install_id);
    }

    /// Loads a plugin from its `.wasm` bytes: reads and validates the
    /// embedded manifest before compiling, then compiles (or takes the
    /// compiled form from the cache) and type-checks it against the host.
    pub fn load(&self, bytes: &[u8]) -> Result<Arc<LoadedPlugin>, LoadError> {
        let manifest = read_manifest(bytes)?;
        let sha256 = hex::encode(Sha256::digest(bytes));
        let component = self
            .inner
            .cache
            .component(&self.inner.engine, bytes, &sha256)
            .map_err(|err| LoadError::Compile {
                plugin: manifest.id(),
                message: format!("{err:#}"),
            })?;
        let link_error = |err: wasmtime::Error| LoadError::Link {
            plugin: manifest.id(),
            message: format!("{err:#}"),
        };
        let pre = self
            .inner
            .linker
            .instantiate_pre(&component)
            .map_err(link_error)?;
        let pre = match bindings::WitVersion::of(&component, &self.inner.engine) {
            Some(bindings::WitVersion::V0_2) => {
                PluginPre::V0_2(bindings::v0_2::PluginPre::new(pre).map_err(link_error)?)
            }
            Some(bindings::WitVersion::V0_1) => {
                PluginPre::V0_1(bindings::v0_1::PluginPre::new(pre).map_err(link_error)?)
            }
            None => {
                return Err(link_error(wasmtime::Error::msg(
                    "it exports neither `sluice:plugin/transform@0.2.0` nor `@0.1.0`",
                )));
            }
        };
        Ok(Arc::new(LoadedPlugin {
            manifest,
            sha256,
            pre,
            runtime: self.clone(),
        }))
    }
}

/// Reads the manifest embedded in a component, without compiling it.
pub fn read_manifest(bytes: &[u8]) -> Result<Manifest, LoadError> {
    let mut is_component = false;
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        let payload = payload.map_err(|err| LoadError::NotAComponent(err.to_string()))?;
        match payload {
            wasmparser::Payload::Version { encoding, .. } if !is_component => {
                if encoding != wasmparser::Encoding::Component {
                    return Err(LoadError::NotAComponent(
                        "it is a core wasm module; `sluice plugin build` turns a module into a component".into(),
                    ));
                }
                is_component = true;
            }
            wasmparser::Payload::CustomSection(section)
                if section.name() == manifest::MANIFEST_SECTION =>
            {
                let text = std::str::from_utf8(section.data()).map_err(|_| {
                    LoadError::BadManifest(manifest::Invalid {
                        problems: vec!["it is not UTF-8".into()],
                    })
                })?;
                return Manifest::parse(text).map_err(LoadError::BadManifest);
            }
            _ => {}
        }
    }
    Err(LoadError::NoManifest {
        section: manifest::MANIFEST_SECTION,
    })
}

/// One compiled, type-checked plugin version, ready to instantiate.
pub struct LoadedPlugin {
    manifest: Manifest,
    sha256: String,
    pre: PluginPre,
    runtime: Runtime,
}

/// A plugin ready to instantiate, by the contract version it was built
/// against.
enum PluginPre {
    V0_1(bindings::v0_1::PluginPre<HostState>),
    V0_2(bindings::v0_2::PluginPre<HostState>),
}

impl PluginPre {
    fn instantiate(&self, store: &mut Store<HostState>) -> wasmtime::Result<Hooks> {
        Ok(match self {
            PluginPre::V0_1(pre) => Hooks::V0_1(pre.instantiate(store)?),
            PluginPre::V0_2(pre) => Hooks::V0_2(pre.instantiate(store)?),
        })
    }
}

/// The hooks of a live instance. Calls into an older version convert its
/// exports' types to the newest ones, which have the same shape.
enum Hooks {
    V0_1(bindings::v0_1::Plugin),
    V0_2(bindings::v0_2::Plugin),
}

type HookResult<T, E = String> = wasmtime::Result<Result<T, E>>;

impl Hooks {
    fn setup(&self, store: &mut Store<HostState>, config: &str) -> HookResult<()> {
        match self {
            Hooks::V0_1(hooks) => hooks.sluice_plugin_lifecycle().call_setup(store, config),
            Hooks::V0_2(hooks) => hooks.sluice_plugin_lifecycle().call_setup(store, config),
        }
    }

    fn run_task(&self, store: &mut Store<HostState>, name: &str) -> HookResult<()> {
        match self {
            Hooks::V0_1(hooks) => hooks.sluice_plugin_lifecycle().call_run_task(store, name),
            Hooks::V0_2(hooks) => hooks.sluice_plugin_lifecycle().call_run_task(store, name),
        }
    }

    fn transform(
        &self,
        store: &mut Store<HostState>,
        event: Resource<PluginEvent>,
    ) -> HookResult<bindings::Outcome> {
        use bindings::v0_1::exports::sluice::plugin::transform::Outcome as OutcomeV0_1;
        match self {
            Hooks::V0_2(hooks) => hooks.sluice_plugin_transform().call_transform(store, event),
            Hooks::V0_1(hooks) => Ok(hooks
                .sluice_plugin_transform()
                .call_transform(store, event)?
                .map(|outcome| match outcome {
                    OutcomeV0_1::Keep => bindings::Outcome::Keep,
                    OutcomeV0_1::Drop => bindings::Outcome::Drop,
                    OutcomeV0_1::Replace(events) => bindings::Outcome::Replace(events),
                })),
        }
    }

    fn export_batch(
        &self,
        store: &mut Store<HostState>,
        events: &[ExportedEvent],
    ) -> HookResult<(), bindings::ExportError> {
        use bindings::v0_1::exports::sluice::plugin::destination as v0_1;
        match self {
            Hooks::V0_2(hooks) => hooks
                .sluice_plugin_destination()
                .call_export_batch(store, events),
            Hooks::V0_1(hooks) => {
                let events: Vec<v0_1::ExportedEvent> = events
                    .iter()
                    .map(|event| v0_1::ExportedEvent {
                        uuid: event.uuid.clone(),
                        name: event.name.clone(),
                        distinct_id: event.distinct_id.clone(),
                        person_id: event.person_id.clone(),
                        timestamp: event.timestamp.clone(),
                        properties: event.properties.clone(),
                    })
                    .collect();
                let result = hooks
                    .sluice_plugin_destination()
                    .call_export_batch(store, &events)?;
                Ok(result.map_err(|err| match err {
                    v0_1::ExportError::Retryable(v0_1::RetryableError {
                        message,
                        retry_after_ms,
                    }) => bindings::ExportError::Retryable(RetryableError {
                        message,
                        retry_after_ms,
                    }),
                    v0_1::ExportError::Permanent(message) => {
                        bindings::ExportError::Permanent(message)
                    }
                }))
            }
        }
    }
}

/// One install of a plugin: who it is for and with which config.
#[derive(Clone, Debug, Default)]
pub struct Install {
    /// Unique per install; namespaces key-value data and metrics.
    pub install_id: String,
    /// The project the install belongs to, whose quotas it keeps to.
    pub project_id: String,
    /// The config as given; checked against the manifest's schema.
    pub config: Value,
    /// Limits asked for by the install; capped by the operator's policy.
    pub limits: Option<Limits>,
}

impl LoadedPlugin {
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The sha256 of the `.wasm` file, hex.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// `name@version`.
    pub fn id(&self) -> String {
        self.manifest.id()
    }

    /// Validates the config, grants capabilities, instantiates the plugin
    /// and runs its `setup`, so a bad config is refused here and not on the
    /// first event.
    pub fn install(self: &Arc<Self>, install: Install) -> Result<PluginInstance, PluginError> {
        let plugin = self.id();
        let config = self
            .manifest
            .validate_config(&install.config)
            .map_err(|problems| PluginError::InvalidConfig {
                plugin: plugin.clone(),
                problems,
            })?;
        let policy = self.runtime.policy();
        let grants = Grants::compute(&self.manifest, &config, policy).map_err(|message| {
            PluginError::InvalidConfig {
                plugin: plugin.clone(),
                problems: manifest::Invalid {
                    problems: vec![message],
                },
            }
        })?;
        let limits = install
            .limits
            .unwrap_or_else(|| policy.limits.clone())
            .capped_by(&policy.limits);
        let mut instance = PluginInstance {
            plugin: self.clone(),
            context: InstallContext {
                plugin,
                install_id: install.install_id,
                project_id: install.project_id,
                grants: Arc::new(grants),
                limits,
                activity: Arc::new(Mutex::new(Activity::default())),
                secrets: Arc::new(crate::model::Scrubber::for_config(&self.manifest, &config)),
            },
            config_json: Value::Object(config).to_string(),
            live: None,
        };
        instance.ensure_live()?;
        Ok(instance)
    }
}

/// A plugin install ready to be called. Calls are one at a time (`&mut`);
/// keep one per worker for parallelism.
pub struct PluginInstance {
    plugin: Arc<LoadedPlugin>,
    context: InstallContext,
    config_json: String,
    live: Option<Live>,
}

struct Live {
    store: Store<HostState>,
    hooks: Hooks,
    /// Dropped after the store, so the count never says less than what
    /// lives.
    _slot: InstanceSlot,
}

/// Why an export batch was not delivered.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ExportFailure {
    /// Worth retrying, after `retry_after` if the plugin gave one.
    #[error("{plugin} could not deliver the batch (will retry): {message}")]
    Retryable {
        plugin: String,
        message: String,
        retry_after: Option<Duration>,
    },
    /// Retrying will not help.
    #[error("{plugin} refused the batch: {message}")]
    Permanent { plugin: String, message: String },
    /// The plugin trapped or failed to start.
    #[error(transparent)]
    Plugin(#[from] PluginError),
}

/// A failed `transform`: why, and the input as it was before the call.
#[derive(Debug)]
pub struct TransformFailure {
    pub error: PluginError,
    pub input: PluginEvent,
}

pub(crate) fn epoch_ticks(deadline: Duration) -> u64 {
    // One extra tick: the current one may be about to end.
    (deadline.as_nanos() / EPOCH_TICK.as_nanos()) as u64 + 1
}

impl PluginInstance {
    pub fn plugin(&self) -> &Arc<LoadedPlugin> {
        &self.plugin
    }

    /// The limits this install runs under.
    pub fn limits(&self) -> &Limits {
        &self.context.limits
    }

    /// Log lines and HTTP calls since the last call of this method.
    pub fn take_activity(&mut self) -> (Vec<LogRecord>, Vec<HttpCall>) {
        if let Some(live) = &mut self.live {
            live.store.data_mut().flush_dropped();
        }
        self.context.activity.lock().expect("activity lock").take()
    }

    fn require(&self, hook: Hook) -> Result<(), PluginError> {
        if self.plugin.manifest.has_hook(hook) {
            return Ok(());
        }
        let hooks: Vec<String> = self
            .plugin
            .manifest
            .hooks
            .iter()
            .map(|h| format!("\"{h}\""))
            .collect();
        Err(PluginError::NoHook {
            plugin: self.context.plugin.clone(),
            hook: hook.to_string(),
            hooks: format!("[{}]", hooks.join(", ")),
        })
    }

    /// Instantiates and sets up the plugin if the last instance was
    /// discarded (or there never was one).
    fn ensure_live(&mut self) -> Result<(), PluginError> {
        if self.live.is_some() {
            return Ok(());
        }
        let runtime = &self.plugin.runtime.inner;
        let slot = self.take_slot()?;
        let state = HostState::new(self.context.clone(), runtime.services.clone());
        let mut store = Store::new(&runtime.engine, state);
        store.limiter(|state| state);
        store.epoch_deadline_callback(|store| store.data().on_deadline());
        let setup_deadline = self.context.limits.setup_deadline;
        store.set_epoch_deadline(epoch_ticks(setup_deadline));
        let hooks = self.plugin.pre.instantiate(&mut store).map_err(|err| {
            if let Some(full) = error::pool_limit(&err) {
                return self.pool_full(full);
            }
            let reason = error::trap_reason(&err, setup_deadline, None);
            match reason {
                TrapReason::Other(message) => PluginError::Instantiate {
                    plugin: self.context.plugin.clone(),
                    message,
                },
                reason => PluginError::Trapped {
                    plugin: self.context.plugin.clone(),
                    phase: Phase::Setup,
                    reason,
                },
            }
        })?;
        self.live = Some(Live {
            store,
            hooks,
            _slot: slot,
        });
        let config = self.config_json.clone();
        self.run(Phase::Setup, setup_deadline, None, |live| {
            live.hooks.setup(&mut live.store, &config)
        })
        .inspect_err(|_| self.live = None)
    }

    /// A place for one more live instance in the project's `instances`
    /// quota.
    fn take_slot(&self) -> Result<InstanceSlot, PluginError> {
        let runtime = &self.plugin.runtime.inner;
        let project = &self.context.project_id;
        let limit = runtime.services.quotas.get(project).instances;
        runtime.instances.take(project, limit).map_err(|held| {
            let hit = Hit {
                quota: "instances",
                limit: limit.into(),
            };
            PluginError::Exhausted {
                plugin: self.context.plugin.clone(),
                message: format!(
                    "project {project} already holds {held} live plugin instances, {hit}; its work waits until one of them ends"
                ),
            }
        })
    }

    /// The error for a pool with no room, naming who holds the most of it.
    fn pool_full(&self, full: &wasmtime::PoolConcurrencyLimitError) -> PluginError {
        let runtime = &self.plugin.runtime.inner;
        let holders: Vec<String> = runtime
            .instances
            .by_project()
            .into_iter()
            .take(3)
            .map(|(project, n)| format!("{project} ({n})"))
            .collect();
        PluginError::Exhausted {
            plugin: self.context.plugin.clone(),
            message: format!(
                "the plugin sandbox's pool of {} instances, shared by every project, is full ({full}); the projects holding the most: {}. The work waits and is tried again; if this lasts, lower the `instances` quota of those projects with `sluice project quotas`",
                runtime.pool_size,
                holders.join(", ")
            ),
        }
    }

    /// Runs one hook on the live instance under a deadline. A trap discards
    /// the instance; the plugin's own error is returned as `Failed`.
    fn run<R>(
        &mut self,
        phase: Phase,
        deadline: Duration,
        input: Option<(&str, &str)>,
        hook: impl FnOnce(&mut Live) -> wasmtime::Result<Result<R, String>>,
    ) -> Result<R, PluginError> {
        let live = self.live.as_mut().expect("run needs a live instance");
        live.store.data_mut().begin_call(deadline, input);
        let compute = live.store.data().call.compute;
        live.store
            .set_epoch_deadline(epoch_ticks(deadline.min(compute)));
        let result = hook(live);
        live.store.data_mut().end_call();
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(message)) => Err(PluginError::Failed {
                plugin: self.context.plugin.clone(),
                phase,
                message,
            }),
            Err(err) => {
                let panic = self
                    .context
                    .activity
                    .lock()
                    .expect("activity lock")
                    .panic
                    .take();
                self.live = None;
                let reason = error::trap_reason(&err, deadline, panic);
                tracing::warn!(plugin = %self.context.plugin, %phase, "plugin trapped: {reason}");
                Err(PluginError::Trapped {
                    plugin: self.context.plugin.clone(),
                    phase,
                    reason,
                })
            }
        }
    }

    /// Runs `transform` on one event. Returns the events that go on: the
    /// changed event, none if dropped, or its replacements.
    pub fn transform(&mut self, event: PluginEvent) -> Result<Vec<PluginEvent>, PluginError> {
        self.transform_keeping_input(event)
            .map_err(|failure| failure.error)
    }

    /// Like [`PluginInstance::transform`], but a failure hands the input
    /// back as it was before the call, whatever the plugin changed in it
    /// before failing or trapping: what the failure policy passes on or
    /// dead-letters.
    pub fn transform_keeping_input(
        &mut self,
        event: PluginEvent,
    ) -> Result<Vec<PluginEvent>, Box<TransformFailure>> {
        self.transform_within(event, Duration::MAX)
    }

    /// Like [`PluginInstance::transform_keeping_input`], with the call's
    /// deadline cut to `at_most`: what a chain has left of its time for
    /// the event.
    pub fn transform_within(
        &mut self,
        event: PluginEvent,
        at_most: Duration,
    ) -> Result<Vec<PluginEvent>, Box<TransformFailure>> {
        if let Err(error) = self
            .require(Hook::Transform)
            .and_then(|()| self.ensure_live())
        {
            return Err(Box::new(TransformFailure {
                error,
                input: event,
            }));
        }
        let deadline = self.context.limits.transform_deadline.min(at_most);
        let (uuid, timestamp) = (event.uuid.clone(), event.timestamp.clone());
        let mut input = Some(event);
        let mut failed_input = None;
        let result = self.run(
            Phase::Transform,
            deadline,
            Some((&uuid, &timestamp)),
            |live| {
                let state = live.store.data_mut();
                let handle = state.table.push(input.take().expect("the input"))?;
                state.call.input = Some(handle.rep());
                let lent = Resource::<PluginEvent>::new_borrow(handle.rep());
                let outcome = live.hooks.transform(&mut live.store, lent);
                let state = live.store.data_mut();
                let mut input = state.table.delete(handle)?;
                let outcome = match outcome {
                    Ok(Ok(outcome)) => outcome,
                    failed => {
                        std::mem::take(&mut state.call.journal).restore(&mut input);
                        failed_input = Some(input);
                        return failed.map(|outcome| outcome.map(|_| Vec::new()));
                    }
                };
                Ok(Ok(match outcome {
                    bindings::Outcome::Keep => vec![input],
                    bindings::Outcome::Drop => Vec::new(),
                    bindings::Outcome::Replace(handles) => {
                        let mut seen = HashSet::new();
                        let mut events = Vec::with_capacity(handles.len());
                        for handle in handles {
                            let mut event = state.table.delete(handle)?;
                            // Two duplicates of one event must not share a uuid.
                            if !seen.insert(event.uuid.clone()) {
                                let n = state.call.created_events;
                                state.call.created_events += 1;
                                event.uuid = event::derived_uuid(&input.uuid, n);
                                seen.insert(event.uuid.clone());
                            }
                            events.push(event);
                        }
                        events
                    }
                }))
            },
        );
        result.map_err(|error| {
            Box::new(TransformFailure {
                error,
                // The table gives back what was pushed into it; without the
                // input a caller could only make one up, so a broken table
                // stops the caller instead (a worker's batch stays queued).
                input: failed_input
                    .or(input)
                    .expect("the resource table gives the input back"),
            })
        })
    }

    /// Runs `export-batch` on stored events.
    pub fn export(&mut self, events: Vec<ExportedEvent>) -> Result<(), ExportFailure> {
        self.require(Hook::Export)?;
        self.ensure_live()?;
        let deadline = self.context.limits.export_deadline;
        let result = self.run(Phase::Export, deadline, None, |live| {
            let result = live.hooks.export_batch(&mut live.store, &events)?;
            Ok(Ok(result))
        })?;
        let plugin = self.context.plugin.clone();
        result.map_err(|err| match err {
            bindings::ExportError::Retryable(RetryableError {
                message,
                retry_after_ms,
            }) => ExportFailure::Retryable {
                plugin,
                message,
                retry_after: retry_after_ms.map(Duration::from_millis),
            },
            bindings::ExportError::Permanent(message) => {
                ExportFailure::Permanent { plugin, message }
            }
        })
    }

    /// Runs the scheduled task `name`.
    pub fn run_task(&mut self, name: &str) -> Result<(), PluginError> {
        if !self.plugin.manifest.schedule.iter().any(|s| s.name == name) {
            return Err(PluginError::Failed {
                plugin: self.context.plugin.clone(),
                phase: Phase::Task,
                message: format!("its plugin.toml declares no [[schedule]] named `{name}`"),
            });
        }
        self.ensure_live()?;
        let deadline = self.context.limits.setup_deadline;
        self.run(Phase::Task, deadline, None, |live| {
            live.hooks.run_task(&mut live.store, name)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Quotas;
    use host::kv::Owner;

    #[test]
    fn expired_key_value_entries_are_swept_without_being_read() {
        let runtime = Runtime::new(RuntimeConfig {
            cache_dir: None,
            pool_size: 0,
            ..RuntimeConfig::default()
        })
        .unwrap();
        let kv = &runtime.inner.services.kv;
        let quotas = Quotas {
            kv_keys_per_config: 1,
            ..Quotas::default()
        };
        let owner = Owner {
            namespace: "install",
            project_id: "project",
            quotas: &quotas,
        };
        kv.set(owner, "gone", b"x".to_vec(), Some(Duration::ZERO))
            .unwrap();
        // Unread, the expired key holds the install's only place until the
        // runtime's sweep takes it away.
        let started = std::time::Instant::now();
        while kv.set(owner, "next", b"y".to_vec(), None).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the sweep never freed the expired key's place"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
