//! Errors of the plugin runtime. Each names the plugin as `name@version`,
//! keeps a plugin's own failure apart from the host stopping it, and says
//! what to do where there is something to do.

use std::fmt;
use std::time::Duration;

use super::manifest::Invalid;

/// Why the host stopped a plugin call. The instance is discarded.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum TrapReason {
    #[error("it ran past its deadline of {} ms", .0.as_millis())]
    Deadline(Duration),
    #[error(
        "it ran its own code for more than its compute limit of {} ms in one call (time waiting for HTTP responses does not count)",
        .0.as_millis()
    )]
    Compute(Duration),
    #[error("it tried to use more than its memory limit of {} MiB", .0 >> 20)]
    Memory(u64),
    #[error("it overflowed its stack (unbounded recursion?)")]
    StackOverflow,
    /// Rust and C keep a shadow stack in linear memory; overflowing it ends
    /// here rather than in `StackOverflow`.
    #[error("it accessed memory out of bounds (a bug, or its in-memory stack overflowed)")]
    OutOfBounds,
    #[error("it panicked: {0}")]
    Panic(String),
    #[error("{0}")]
    OutputLimit(String),
    #[error("it trapped: {0}")]
    Other(String),
}

/// Raised by host code to trap a plugin that went over a limit.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LimitExceeded(pub TrapReason);

/// The hook that was running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Setup,
    Transform,
    Export,
    Task,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Setup => "setup",
            Phase::Transform => "transform",
            Phase::Export => "export",
            Phase::Task => "a scheduled task",
        })
    }
}

/// A plugin call that did not succeed.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PluginError {
    /// The plugin returned an error of its own.
    #[error("{plugin} failed in {phase}: {message}")]
    Failed {
        plugin: String,
        phase: Phase,
        message: String,
    },
    /// The host stopped the plugin; its instance was discarded.
    #[error("{plugin} was stopped during {phase}: {reason}")]
    Trapped {
        plugin: String,
        phase: Phase,
        reason: TrapReason,
    },
    /// The install's config does not fit the plugin's schema.
    #[error("{plugin} cannot use this config: {problems}")]
    InvalidConfig { plugin: String, problems: Invalid },
    /// The host was asked for a hook the manifest does not list.
    #[error("{plugin} does not implement the {hook} hook: its plugin.toml lists hooks = {hooks}")]
    NoHook {
        plugin: String,
        hook: String,
        hooks: String,
    },
    /// Creating the instance failed for a host-side reason.
    #[error("failed to instantiate {plugin}: {message}")]
    Instantiate { plugin: String, message: String },
    /// There was no room to run the plugin: the sandbox's instance pool is
    /// full, or its project holds every instance its quota allows. Not the
    /// plugin's fault, so it is never disabled for it: the work waits and
    /// is tried again.
    #[error("{plugin} has to wait: {message}")]
    Exhausted { plugin: String, message: String },
}

impl PluginError {
    /// Whether the host stopped the plugin (as opposed to the plugin
    /// reporting an error).
    pub fn is_trap(&self) -> bool {
        matches!(self, PluginError::Trapped { .. })
    }

    /// Whether the call did not run for want of room (see
    /// [`PluginError::Exhausted`]): the work should wait, not fail.
    pub fn is_exhausted(&self) -> bool {
        matches!(self, PluginError::Exhausted { .. })
    }
}

/// Why a `.wasm` file could not be loaded as a plugin.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("this file is not a WebAssembly component: {0}")]
    NotAComponent(String),
    #[error(
        "this component has no embedded plugin.toml (custom section `{section}`): build it with `sluice plugin build`, which embeds the manifest"
    )]
    NoManifest { section: &'static str },
    #[error("the embedded plugin.toml is invalid: {0}")]
    BadManifest(Invalid),
    #[error("failed to compile {plugin}: {message}")]
    Compile { plugin: String, message: String },
    #[error(
        "{plugin} does not fit this host's plugin API (sluice:plugin@0.1.0 or @0.2.0): {message}. Rebuild it against a matching plugin-sdk"
    )]
    Link { plugin: String, message: String },
}

/// The pool limit an instantiation ran into, if that is why it failed: no
/// room, rather than anything wrong with the plugin.
pub fn pool_limit(err: &wasmtime::Error) -> Option<&wasmtime::PoolConcurrencyLimitError> {
    err.chain()
        .find_map(|cause| cause.downcast_ref::<wasmtime::PoolConcurrencyLimitError>())
}

/// Classifies a wasmtime error from a call into a trap reason.
pub fn trap_reason(err: &wasmtime::Error, deadline: Duration, panic: Option<String>) -> TrapReason {
    if let Some(LimitExceeded(reason)) = err.downcast_ref::<LimitExceeded>() {
        return reason.clone();
    }
    match err.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => TrapReason::Deadline(deadline),
        Some(wasmtime::Trap::StackOverflow) => TrapReason::StackOverflow,
        Some(wasmtime::Trap::MemoryOutOfBounds) => TrapReason::OutOfBounds,
        Some(wasmtime::Trap::UnreachableCodeReached) if panic.is_some() => {
            TrapReason::Panic(panic.unwrap_or_default())
        }
        Some(trap) => TrapReason::Other(trap.to_string()),
        None => TrapReason::Other(format!("{err:#}")),
    }
}
