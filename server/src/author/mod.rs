//! Plugin author tooling behind `sluice plugin`: scaffold a crate, build it
//! into a component with its manifest embedded, and run the built `.wasm`
//! through the real runtime.

pub mod build;
pub mod scaffold;
pub mod test_run;
