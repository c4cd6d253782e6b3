//! A transformation that succeeds on every event, but only after burning
//! `ms` milliseconds of CPU: the chain that stays just inside its deadline,
//! which the pipeline must count against the link's health and bound with
//! the project's time per event.

use sluice_plugin_sdk::{EventRef, Outcome, Plugin, Result, Value, clock, register_plugin};

struct SlowLink {
    ms: u64,
}

impl Plugin for SlowLink {
    type Config = Value;

    fn new(config: Value) -> Result<Self> {
        Ok(SlowLink {
            ms: config["ms"].as_u64().unwrap_or(60),
        })
    }

    fn transform(&mut self, _event: &mut EventRef<'_>) -> Result<Outcome> {
        let until = clock::now_millis() + self.ms;
        let mut n: u64 = 0;
        while clock::now_millis() < until {
            n = std::hint::black_box(n.wrapping_add(1));
        }
        Ok(Outcome::Keep)
    }
}

register_plugin!(SlowLink);
