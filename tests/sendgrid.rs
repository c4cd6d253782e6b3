//! Placeholder; filled in by the sendgrid work.

mod common;
