//! Allocates without bound: the host's memory limit must stop it.

use sluice_plugin_sdk::{EventRef, Outcome, Plugin, Result, Value, register_plugin};

struct MemoryBomb {
    hoard: Vec<Vec<u8>>,
}

impl Plugin for MemoryBomb {
    type Config = Value;

    fn new(_config: Value) -> Result<Self> {
        Ok(MemoryBomb { hoard: Vec::new() })
    }

    fn transform(&mut self, _event: &mut EventRef<'_>) -> Result<Outcome> {
        loop {
            // Each reservation grows linear memory; the host must refuse the
            // growth that crosses its limit.
            self.hoard.push(Vec::with_capacity(8 << 20));
            std::hint::black_box(&self.hoard);
        }
    }
}

register_plugin!(MemoryBomb);
