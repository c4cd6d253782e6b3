//! Placeholder; filled in by the salesforce work.

mod common;
