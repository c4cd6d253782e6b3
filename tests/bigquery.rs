//! Placeholder; filled in by the bigquery work.

mod common;
