//! Splits each event into the original (marked `split: true`) and `copies`
//! new "NAME part" events, using `transform_event`, the SDK's whole-event
//! convenience path. Tests use it for uuids of new events and for that path.

use serde_json::Value;
use sluice_plugin_sdk::{Event, Plugin, Result, register_plugin};

struct Splitter {
    copies: usize,
}

impl Plugin for Splitter {
    type Config = Value;

    fn new(config: Value) -> Result<Self> {
        let copies = config["copies"].as_u64().unwrap_or(2) as usize;
        Ok(Splitter { copies })
    }

    fn transform_event(&mut self, mut event: Event) -> Result<Vec<Event>> {
        event.properties.insert("split".into(), Value::Bool(true));
        let parts = (0..self.copies).map(|i| {
            Event::new(format!("{} part", event.name), event.distinct_id.clone())
                .with_property("part", i)
        });
        let mut out: Vec<Event> = parts.collect();
        out.insert(0, event);
        Ok(out)
    }
}

register_plugin!(Splitter);
