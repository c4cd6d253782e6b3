//! Placeholder; filled in by the s3 work.

mod common;
