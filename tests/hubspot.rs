//! Placeholder; filled in by the hubspot work.

mod common;
