//! Keeps every event as it is and accepts every export batch: the cheapest
//! possible plugin, and the healthy neighbour the adversarial tests call after
//! a bad plugin was stopped.

use sluice_plugin_sdk::{
    EventRef, ExportError, ExportedEvent, Outcome, Plugin, Result, Value, register_plugin,
};

struct Passthrough;

impl Plugin for Passthrough {
    type Config = Value;

    fn new(_config: Value) -> Result<Self> {
        Ok(Passthrough)
    }

    fn transform(&mut self, _event: &mut EventRef<'_>) -> Result<Outcome> {
        Ok(Outcome::Keep)
    }

    fn export(&mut self, events: Vec<ExportedEvent>) -> Result<(), ExportError> {
        sluice_plugin_sdk::info!("accepted {} events", events.len());
        Ok(())
    }
}

register_plugin!(Passthrough);
