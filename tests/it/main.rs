//! Every integration test of the server, in one binary so that wasmtime
//! and the server are linked once. Each module tests one part as a user
//! meets it; `common` holds what they share.

#[macro_use]
#[path = "../common/mod.rs"]
mod common;

mod api;
mod architecture;
mod bigquery;
mod cli;
mod clickhouse;
mod delivery;
mod durability;
mod hubspot;
mod isolation;
mod isolation_capture;
mod isolation_query;
mod isolation_routes;
mod isolation_runtime;
mod metrics;
mod operations;
mod query;
mod runtime;
mod s3;
mod salesforce;
mod sdk_clients;
mod secrets;
mod sendgrid;
mod server;
mod slack;
mod tenancy;
mod webhook;
