//! A plugin written without the SDK, importing WASI the way components from
//! componentize-js or componentize-py do. On each event it prints to stdout,
//! lists preopened directories and reads the environment, and reports what it
//! found in the event. Under Sluice's deny-all WASI context it must find no
//! directories (so no file, /etc/passwd included, can be opened) and no
//! environment, and its stdout must land in the plugin log.

#![allow(missing_docs)]

wit_bindgen::generate!({
    path: ["../../../wit/v0.1.0", "wit"],
    world: "sluice-test:wasi-file-read/wasi-plugin",
    generate_all,
});

use exports::sluice::plugin::destination::{ExportError, ExportedEvent};
use exports::sluice::plugin::transform::Outcome;
use sluice::plugin::event::Event;

struct WasiFileRead;

impl exports::sluice::plugin::lifecycle::Guest for WasiFileRead {
    fn setup(_config: String) -> Result<(), String> {
        Ok(())
    }

    fn run_task(name: String) -> Result<(), String> {
        Err(format!("no task {name}"))
    }
}

impl exports::sluice::plugin::transform::Guest for WasiFileRead {
    fn transform(event: &Event) -> Result<Outcome, String> {
        let stdout = wasi::cli::stdout::get_stdout();
        let _ = stdout.blocking_write_and_flush(b"hello from wasi stdout\n");
        let directories = wasi::filesystem::preopens::get_directories();
        let environment = wasi::cli::environment::get_environment();
        let names: Vec<String> = directories
            .iter()
            .map(|(_, name)| format!("\"{name}\""))
            .collect();
        event
            .set_property("preopened_directories", &format!("[{}]", names.join(",")))
            .map_err(|err| format!("{err:?}"))?;
        event
            .set_property("environment_variables", &environment.len().to_string())
            .map_err(|err| format!("{err:?}"))?;
        if directories.is_empty() {
            return Err("cannot read /etc/passwd: no preopened directories".into());
        }
        Ok(Outcome::Keep)
    }
}

impl exports::sluice::plugin::destination::Guest for WasiFileRead {
    fn export_batch(_events: Vec<ExportedEvent>) -> Result<(), ExportError> {
        Err(ExportError::Permanent("not a destination".into()))
    }
}

export!(WasiFileRead);
