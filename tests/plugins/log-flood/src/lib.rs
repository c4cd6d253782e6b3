//! Logs far more than any plugin should: the host's log cap must drop the
//! excess and say how much it dropped.

use sluice_plugin_sdk::{EventRef, Outcome, Plugin, Result, Value, info, register_plugin};

struct LogFlood;

impl Plugin for LogFlood {
    type Config = Value;

    fn new(_config: Value) -> Result<Self> {
        Ok(LogFlood)
    }

    fn transform(&mut self, _event: &mut EventRef<'_>) -> Result<Outcome> {
        for i in 0..10_000 {
            info!("line {i}");
        }
        Ok(Outcome::Keep)
    }
}

register_plugin!(LogFlood);
