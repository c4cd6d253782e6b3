//! Placeholder; filled in by the delivery work.

mod common;
