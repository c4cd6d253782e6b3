//! Placeholder; filled in by the slack work.

mod common;
