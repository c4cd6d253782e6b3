//! Panics in setup: the host must report the panic message and refuse the
//! plugin, not crash.

use sluice_plugin_sdk::{Plugin, Result, Value, register_plugin};

struct PanicInSetup;

impl Plugin for PanicInSetup {
    type Config = Value;

    fn new(_config: Value) -> Result<Self> {
        panic!("setup exploded on purpose");
    }
}

register_plugin!(PanicInSetup);
