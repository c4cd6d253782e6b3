//! Produces far more output than any event should: the host's output caps
//! must stop it. The event's `mode` property picks how: `big` writes one
//! 4 MiB property (within memory, over the output cap), `many` emits 100,000 events,
//! `reads` asks the host for one 512 KiB property 65,536 times in one call.

use sluice_plugin_sdk::{Event, EventRef, Outcome, Plugin, Result, Value, register_plugin};

struct HugeOutput;

impl Plugin for HugeOutput {
    type Config = Value;

    fn new(_config: Value) -> Result<Self> {
        Ok(HugeOutput)
    }

    fn transform(&mut self, event: &mut EventRef<'_>) -> Result<Outcome> {
        let mode: Option<String> = event.property("mode")?;
        if mode.as_deref() == Some("reads") {
            event.set_property("blob", "x".repeat(512 << 10))?;
            // 32 GiB if the host built it all: more than the machine has.
            let keys = vec!["blob".to_string(); 1 << 16];
            let values = event.properties_of(&keys)?;
            event.set_property("read", values.len())?;
            return Ok(Outcome::Keep);
        }
        if mode.as_deref() == Some("many") {
            let events = (0..100_000)
                .map(|i| Event::new(format!("copy {i}"), "x"))
                .collect();
            return Ok(Outcome::Replace(events));
        }
        event.set_property("blob", "x".repeat(4 << 20))?;
        Ok(Outcome::Keep)
    }
}

register_plugin!(HugeOutput);
