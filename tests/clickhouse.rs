//! Placeholder; filled in by the clickhouse work.

mod common;
