//! Recurses without bound: the host's stack limit must stop it.

use sluice_plugin_sdk::{EventRef, Outcome, Plugin, Result, Value, register_plugin};

struct DeepRecursion;

#[inline(never)]
#[allow(unconditional_recursion)]
fn descend(depth: u64, pad: [u64; 16]) -> u64 {
    let next = std::hint::black_box(pad);
    descend(depth + 1, next) + next[(depth % 16) as usize]
}

impl Plugin for DeepRecursion {
    type Config = Value;

    fn new(_config: Value) -> Result<Self> {
        Ok(DeepRecursion)
    }

    fn transform(&mut self, event: &mut EventRef<'_>) -> Result<Outcome> {
        let depth = descend(0, [1; 16]);
        event.set_property("depth", depth)?;
        Ok(Outcome::Keep)
    }
}

register_plugin!(DeepRecursion);
