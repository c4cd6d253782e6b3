//! Recurses without bound: the host's stack limits must stop it. By default
//! the recursion lives on the wasm stack, which wasmtime bounds. With the
//! event property `mode` = `shadow`, each frame also takes an array by
//! reference, so it lives on the shadow stack Rust keeps in linear memory,
//! which overflows into an out-of-bounds access first.

use sluice_plugin_sdk::{EventRef, Outcome, Plugin, Result, Value, register_plugin};

struct DeepRecursion;

#[inline(never)]
#[allow(unconditional_recursion)]
fn descend(depth: u64) -> u64 {
    std::hint::black_box(descend(std::hint::black_box(depth + 1))) ^ depth
}

#[inline(never)]
#[allow(unconditional_recursion)]
fn descend_shadow(depth: u64, pad: &[u64; 64]) -> u64 {
    let next = std::hint::black_box(*pad);
    descend_shadow(depth + 1, &next) + next[(depth % 64) as usize]
}

impl Plugin for DeepRecursion {
    type Config = Value;

    fn new(_config: Value) -> Result<Self> {
        Ok(DeepRecursion)
    }

    fn transform(&mut self, event: &mut EventRef<'_>) -> Result<Outcome> {
        let mode: Option<String> = event.property("mode")?;
        let depth = if mode.as_deref() == Some("shadow") {
            descend_shadow(0, &[1; 64])
        } else {
            descend(0)
        };
        event.set_property("depth", depth)?;
        Ok(Outcome::Keep)
    }
}

register_plugin!(DeepRecursion);
