//! Sluice: a CDP event pipeline whose transformations and destinations are
//! sandboxed WebAssembly component plugins.
//!
//! Modules follow the data flow; this foundation holds the plugin
//! [`runtime`] and the [`author`] tooling (scaffold, build, test) behind
//! `sluice plugin`.

pub mod author;
pub mod cli;
pub mod runtime;
