//! The host side of each WIT capability, one module per capability, and the
//! per-store state they share. Every call checks the install's [`Grants`]
//! and [`Limits`]; a policy refusal is a WIT error value, a limit overrun is
//! a trap that discards the instance.

pub mod http;
pub mod kv;
pub mod log;
pub mod metrics;
mod misc;
mod stdio;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::capability::Grants;
use super::error::{LimitExceeded, TrapReason};
use super::limits::Limits;

pub use log::{Activity, HttpCall, LogLevel, LogRecord};

/// Services shared by every store of a runtime.
pub struct HostServices {
    pub http: http::HttpClient,
    pub kv: Arc<dyn kv::KvStore>,
    pub metrics: metrics::Metrics,
    /// Keep full URLs and request bodies in recorded HTTP calls. Off in the
    /// server, where they may carry credentials; on for `sluice plugin test`.
    pub record_http_details: bool,
    /// Each project's quotas.
    pub quotas: super::ProjectQuotas,
}

/// What one install (plugin version + project + config) carries into each of
/// its stores.
#[derive(Clone)]
pub struct InstallContext {
    /// `name@version`.
    pub plugin: String,
    /// Names the install in key-value namespaces and metrics.
    pub install_id: String,
    /// Whose quotas the install's instances, requests and data count
    /// towards.
    pub project_id: String,
    pub grants: Arc<Grants>,
    pub limits: Limits,
    pub activity: Arc<Mutex<Activity>>,
    /// The install's `secret` config values, blanked out of its log and
    /// recorded HTTP calls wherever they appear (a Slack webhook URL is its
    /// own credential).
    pub secrets: Arc<crate::model::Scrubber>,
}

/// Bookkeeping for the call in progress.
#[derive(Default)]
pub struct CallState {
    pub deadline: Option<Instant>,
    /// When the call began, and how long it has waited on the host's HTTP
    /// requests since: the rest is time the plugin ran its own code.
    pub started: Option<Instant>,
    pub waited: Duration,
    /// How long it may run its own code (see `Limits::compute`).
    pub compute: Duration,
    pub output_bytes: u64,
    pub output_events: u32,
    pub created_events: u32,
    pub input_uuid: String,
    pub input_timestamp: String,
    /// The input event's handle during `transform`, and what the call
    /// changed in it.
    pub input: Option<u32>,
    pub journal: super::event::Journal,
}

/// The data of one store: one live instance of one install.
pub struct HostState {
    pub install: InstallContext,
    pub services: Arc<HostServices>,
    pub table: ResourceTable,
    pub call: CallState,
    /// Edit plans the instance holds now; capped, they outlive calls.
    pub edit_plans: u32,
    wasi: Option<WasiCtx>,
    stdout: stdio::LogPipe,
    stderr: stdio::LogPipe,
}

impl HostState {
    pub fn new(install: InstallContext, services: Arc<HostServices>) -> Self {
        let pipe_cap = install.limits.max_log_line_bytes as usize * 16;
        HostState {
            install,
            services,
            table: ResourceTable::new(),
            call: CallState::default(),
            edit_plans: 0,
            wasi: None,
            stdout: stdio::LogPipe::new(pipe_cap),
            stderr: stdio::LogPipe::new(pipe_cap),
        }
    }

    /// Starts a call: resets the per-call budgets.
    pub fn begin_call(&mut self, deadline: Duration, input: Option<(&str, &str)>) {
        let (uuid, timestamp) = input.unwrap_or_default();
        let now = Instant::now();
        self.call = CallState {
            deadline: Some(now + deadline),
            started: Some(now),
            compute: self.install.limits.compute.min(deadline),
            input_uuid: uuid.to_string(),
            input_timestamp: timestamp.to_string(),
            ..CallState::default()
        };
    }

    /// Ends a call: moves WASI stdout and stderr into the plugin log.
    pub fn end_call(&mut self) {
        if self.wasi.is_none() {
            return; // only WASI components have stdio
        }
        let pipes = [
            (self.stdout.clone(), LogLevel::Info),
            (self.stderr.clone(), LogLevel::Warn),
        ];
        for (pipe, level) in pipes {
            for line in pipe.take_lines() {
                self.log(level, line, Vec::new());
            }
        }
    }

    /// Time left before the current call's deadline.
    /// Called when the epoch deadline set for the call passes: traps once
    /// the call is past its deadline or has run its own code for longer
    /// than its compute limit, and otherwise sets the next check at the
    /// nearer of the two. Before any call (instantiation) the deadline set
    /// for it simply traps.
    pub fn on_deadline(&self) -> wasmtime::Result<wasmtime::UpdateDeadline> {
        let call = &self.call;
        let (Some(deadline), Some(started)) = (call.deadline, call.started) else {
            return Err(wasmtime::Trap::Interrupt.into());
        };
        let now = Instant::now();
        if now >= deadline {
            return Err(wasmtime::Trap::Interrupt.into());
        }
        let computed = now.duration_since(started).saturating_sub(call.waited);
        if computed >= call.compute {
            return Err(wasmtime::Error::new(LimitExceeded(TrapReason::Compute(
                call.compute,
            ))));
        }
        let next = (deadline - now).min(call.compute - computed);
        Ok(wasmtime::UpdateDeadline::Continue(super::epoch_ticks(next)))
    }

    pub fn remaining(&self) -> Duration {
        self.call
            .deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::ZERO)
    }

    /// Counts bytes a plugin writes into events; traps past the cap.
    pub fn charge_output(&mut self, bytes: u64) -> wasmtime::Result<()> {
        self.call.output_bytes += bytes;
        let cap = self.install.limits.max_output_bytes;
        if self.call.output_bytes > cap {
            return Err(wasmtime::Error::new(LimitExceeded(
                TrapReason::OutputLimit(format!(
                    "it wrote more than its output limit of {cap} bytes into events in one call"
                )),
            )));
        }
        Ok(())
    }

    /// Counts events a plugin creates; traps past the cap.
    pub fn charge_event(&mut self) -> wasmtime::Result<()> {
        self.call.output_events += 1;
        let cap = self.install.limits.max_output_events;
        if self.call.output_events > cap {
            return Err(wasmtime::Error::new(LimitExceeded(
                TrapReason::OutputLimit(format!(
                    "it created more than its limit of {cap} events in one call"
                )),
            )));
        }
        Ok(())
    }
}

impl ResourceLimiter for HostState {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let cap = self.install.limits.memory_bytes;
        if desired as u64 > cap {
            return Err(wasmtime::Error::new(LimitExceeded(TrapReason::Memory(cap))));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Tables hold function references; no honest plugin needs millions.
        const MAX_TABLE_ELEMENTS: usize = 1 << 20;
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        let (stdout, stderr) = (self.stdout.clone(), self.stderr.clone());
        let ctx = self
            .wasi
            .get_or_insert_with(|| deny_all_wasi(stdout, stderr));
        WasiCtxView {
            ctx,
            table: &mut self.table,
        }
    }
}

/// WASI for components from other toolchains: no preopened directories, no
/// environment, no arguments, no network, stdin empty, stdout and stderr into
/// the plugin log. Clocks and randomness are the host's, as through WIT.
fn deny_all_wasi(stdout: stdio::LogPipe, stderr: stdio::LogPipe) -> WasiCtx {
    let mut builder = WasiCtx::builder();
    builder
        .stdout(stdout)
        .stderr(stderr)
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .socket_addr_check(|_, _| Box::pin(async { false }));
    builder.build()
}
