//! Sluice: a CDP event pipeline whose transformations and destinations are
//! sandboxed WebAssembly component plugins.
//!
//! Modules follow the data flow, each importing only those before it (see
//! `docs/architecture.md`): `capture` accepts events into the durable
//! queue in [`store`], whose backlog `queue` watches; the `pipeline`
//! worker runs them through the plugin [`runtime`] and stores them,
//! filling outboxes that `delivery` drains; `scheduler` runs plugins'
//! scheduled tasks; [`query`] answers analytics questions and `api` serves
//! them. [`model`] holds the domain types they share, `loader` starts an
//! install's plugin, `listener` bounds open connections, `configs` follows the installed
//! configs, `quotas`
//! holds each project's share of what projects share, `retention` prunes
//! what they keep, `metrics` counts what they all do for `/metrics`, and
//! `supervisor` keeps the background tasks running. [`server`] wires it
//! all into `serve(config, listener, shutdown)`; [`author`] is the plugin
//! authors' tooling (scaffold, build, test), and [`cli`] the command line.
//!
//! Only what the binary, the tests and the benchmarks use is public.

pub mod admin;
pub(crate) mod api;
pub mod author;
pub(crate) mod capture;
pub mod cli;
pub(crate) mod config;
pub(crate) mod configs;
pub(crate) mod delivery;
pub(crate) mod listener;
pub(crate) mod loader;
pub(crate) mod metrics;
pub mod model;
pub(crate) mod pipeline;
pub mod query;
pub(crate) mod queue;
pub(crate) mod quotas;
pub(crate) mod rates;
pub(crate) mod retention;
pub mod runtime;
pub(crate) mod scheduler;
pub mod server;
pub(crate) mod state;
pub mod store;
pub(crate) mod supervisor;
pub(crate) mod tokens;
