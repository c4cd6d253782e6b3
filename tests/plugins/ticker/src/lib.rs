//! Logs `tick` each time its every-second task runs, so tests can count runs
//! across processes.

use sluice_plugin_sdk::{EventRef, Outcome, Plugin, Result, Value, info, register_plugin};

struct Ticker;

impl Plugin for Ticker {
    type Config = Value;

    fn new(_config: Value) -> Result<Self> {
        Ok(Ticker)
    }

    fn transform(&mut self, _event: &mut EventRef<'_>) -> Result<Outcome> {
        Ok(Outcome::Keep)
    }

    fn run_task(&mut self, name: &str) -> Result<()> {
        info!("tick from task {name}");
        Ok(())
    }
}

register_plugin!(Ticker);
