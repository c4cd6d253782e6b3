//! Never returns from a hook: the host's CPU deadline must stop it.

use sluice_plugin_sdk::{
    EventRef, ExportError, ExportedEvent, Outcome, Plugin, Result, Value, register_plugin,
};

struct SpinForever;

fn spin() -> ! {
    let mut n: u64 = 0;
    loop {
        n = std::hint::black_box(n.wrapping_add(1));
    }
}

impl Plugin for SpinForever {
    type Config = Value;

    fn new(_config: Value) -> Result<Self> {
        Ok(SpinForever)
    }

    fn transform(&mut self, _event: &mut EventRef<'_>) -> Result<Outcome> {
        spin()
    }

    fn export(&mut self, _events: Vec<ExportedEvent>) -> Result<(), ExportError> {
        spin()
    }
}

register_plugin!(SpinForever);
