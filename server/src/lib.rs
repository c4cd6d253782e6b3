//! Sluice: a CDP event pipeline whose transformations and destinations are
//! sandboxed WebAssembly component plugins.
//!
//! Modules follow the data flow: [`capture`] accepts events into the durable
//! queue in [`store`], whose backlog [`queue`] watches; the [`pipeline`] worker stores them, [`query`]
//! answers analytics questions over them, [`api`] serves them; [`server`] wires these into `serve(config, listener, shutdown)`.
//! The plugin [`runtime`] and the [`author`] tooling (scaffold, build, test)
//! sit beside them.

pub mod api;
pub mod author;
pub mod capture;
pub mod cli;
pub mod delivery;
pub mod pipeline;
pub mod query;
pub mod queue;
pub mod runtime;
pub mod server;
pub mod store;
