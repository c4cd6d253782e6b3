//! A plugin of the first released contract, `sluice:plugin@0.1.0`, written
//! against the generated bindings with no SDK: the SDK now builds against a
//! newer version, and plugins already published must keep working.

#[cfg(target_arch = "wasm32")]
mod guest {
    wit_bindgen::generate!({
        path: "../../../wit/v0.1.0",
        world: "plugin",
    });

    use exports::sluice::plugin::destination::{self, ExportError, ExportedEvent};
    use exports::sluice::plugin::lifecycle;
    use exports::sluice::plugin::transform::{self, Outcome};
    use sluice::plugin::event::{Event, EventError};
    use sluice::plugin::log::{Level, write};

    struct V0_1;

    fn message(err: EventError) -> String {
        match err {
            EventError::InvalidJson(message) | EventError::InvalidValue(message) => message,
        }
    }

    impl lifecycle::Guest for V0_1 {
        fn setup(_config: String) -> Result<(), String> {
            Ok(())
        }

        fn run_task(name: String) -> Result<(), String> {
            Err(format!("no task named `{name}`"))
        }
    }

    impl transform::Guest for V0_1 {
        fn transform(event: &Event) -> Result<Outcome, String> {
            if let Some(plan) = event.property("plan") {
                event.remove_property("plan");
                event
                    .set_property("subscription_plan", &plan)
                    .map_err(message)?;
            }
            event
                .set_property("wit_version", "\"0.1.0\"")
                .map_err(message)?;
            Ok(Outcome::Keep)
        }
    }

    impl destination::Guest for V0_1 {
        fn export_batch(events: Vec<ExportedEvent>) -> Result<(), ExportError> {
            let names: Vec<&str> = events.iter().map(|event| event.name.as_str()).collect();
            write(
                Level::Info,
                &format!("exported {} events: {}", events.len(), names.join(", ")),
                &[],
            );
            Ok(())
        }
    }

    export!(V0_1);
}
