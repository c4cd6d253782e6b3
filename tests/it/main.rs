//! Every integration test of the server, in one binary so that wasmtime
//! and the server are linked once. Each module tests one part as a user
//! meets it; `common` holds what they share.

#[macro_use]
#[path = "../common/mod.rs"]
mod common;

mod api;
mod architecture;
mod bigquery;
mod capture_limits;
mod cli;
mod clickhouse;
mod crash;
mod delivery;
mod durability;
mod hostile_fleet;
mod hubspot;
mod isolation;
mod isolation_capture;
mod isolation_query;
mod isolation_routes;
mod isolation_runtime;
mod metrics;
mod operations;
mod outages;
mod query;
mod runtime;
mod s3;
mod salesforce;
mod sandbox_escape;
mod sdk_clients;
mod secrets;
mod sendgrid;
mod server;
mod slack;
mod tenancy;
mod webhook;
