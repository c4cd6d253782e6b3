//! Counts events per distinct id in the key-value store and writes the count
//! into the event as `seen`, or the refusal as `kv_error` when the host does
//! not grant key-value access. Tests use it for grants and namespacing.

use sluice_plugin_sdk::{EventRef, Outcome, Plugin, Result, Value, kv, register_plugin};

struct KvCounter;

impl Plugin for KvCounter {
    type Config = Value;

    fn new(_config: Value) -> Result<Self> {
        Ok(KvCounter)
    }

    fn transform(&mut self, event: &mut EventRef<'_>) -> Result<Outcome> {
        let key = format!("seen:{}", event.distinct_id());
        match kv::increment(&key, 1, None) {
            Ok(count) => event.set_property("seen", count)?,
            Err(err) => event.set_property("kv_error", err.to_string())?,
        }
        Ok(Outcome::Keep)
    }
}

register_plugin!(KvCounter);
