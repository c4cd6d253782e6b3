//! Write [Sluice](https://github.com/sluice-cdp/sluice) plugins in Rust.
//!
//! A plugin is a type that implements [`Plugin`], registered once with
//! [`register_plugin!`]. `sluice plugin build` compiles it to a WebAssembly
//! component with its `plugin.toml` embedded, and the Sluice host runs it
//! sandboxed for every event of the projects that install it.
//!
//! ```no_run
//! use sluice_plugin_sdk::{Event, Plugin, Result, register_plugin};
//! use serde::Deserialize;
//!
//! #[derive(Deserialize)]
//! struct Config {
//!     prefix: String,
//! }
//!
//! struct Renamer {
//!     config: Config,
//! }
//!
//! impl Plugin for Renamer {
//!     type Config = Config;
//!
//!     fn new(config: Config) -> Result<Self> {
//!         Ok(Renamer { config })
//!     }
//!
//!     fn transform_event(&mut self, mut event: Event) -> Result<Vec<Event>> {
//!         event.name = format!("{}{}", self.config.prefix, event.name);
//!         Ok(vec![event])
//!     }
//! }
//!
//! register_plugin!(Renamer);
//! ```
//!
//! Host capabilities live in modules: [`log`] (and the [`info!`] family of
//! macros), [`kv`], [`http`], [`metrics`], [`clock`] and [`random`]. On
//! native targets they talk to the [`testing::MockHost`], so a plugin's own
//! `cargo test` runs without WebAssembly.
//!
//! Other modules help with common plugin work: [`json`](mod@json) names
//! config values in error messages, [`template`] fills `{{placeholder}}`
//! text and JSON from an event, and [`person`] reads the person updates
//! (`$identify`, `$set`, `$set_once`) that CRM-like destinations keep in
//! step.

#![warn(missing_docs)]

extern crate self as sluice_plugin_sdk;

mod destination;
mod error;
mod event;
mod host;
#[doc(hidden)]
pub mod props;

pub mod clock;
pub mod http;
pub mod json;
pub mod kv;
pub mod log;
pub mod metrics;
pub mod person;
pub mod random;
pub mod template;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;

pub use destination::{ExportError, ExportedEvent};
pub use error::{Context, Error, Result};
pub use event::{EditPlan, Edits, Event, EventRef, Leaf, LeafValue, Leaves, Outcome};

/// Re-exported so plugins can name JSON values without their own dependency.
pub use serde_json::{self, Map, Value, json};

use serde::de::DeserializeOwned;

/// A Sluice plugin: a transformation, a destination, or both.
///
/// Every method but [`Plugin::new`] has a default, so a plugin implements
/// only the hooks it lists in its `plugin.toml`. The host creates one value
/// per instance with [`Plugin::new`] and then calls the hooks on it one at a
/// time, so `&mut self` state is safe to keep between calls. An instance may
/// be discarded at any time (after a trap, an upgrade or a restart), so state
/// that must survive belongs in [`kv`].
pub trait Plugin: Sized + 'static {
    /// The install's config, deserialised from the JSON object the host
    /// passes after checking it against the manifest's `[config]` schema.
    /// Use `serde_json::Value` to take it untyped.
    type Config: DeserializeOwned;

    /// Creates the plugin from its config. An error here is shown on the
    /// install and no other hook is called.
    fn new(config: Self::Config) -> Result<Self>;

    /// Transforms one event through its host handle.
    ///
    /// This is the fast path: read and write only the fields you need, and
    /// the host never re-serialises the rest of the event. The default
    /// converts the whole event to an [`Event`], calls
    /// [`Plugin::transform_event`] and writes back the fields that changed,
    /// which is simpler to write and costs a full copy of the event in.
    ///
    /// An error applies the install's failure policy: by default the event
    /// goes on unchanged and the error is logged with the event's uuid.
    fn transform(&mut self, event: &mut EventRef<'_>) -> Result<Outcome> {
        let input = event.to_event()?;
        let original = input.clone();
        let mut output = self.transform_event(input)?;
        match output.len() {
            0 => Ok(Outcome::Drop),
            1 if output[0].uuid == original.uuid => {
                // Only changed fields cross back to the host.
                event.apply_changes(&original, output.pop().expect("one event"))?;
                Ok(Outcome::Keep)
            }
            _ => Ok(Outcome::Replace(output)),
        }
    }

    /// Transforms one whole event: return it changed, return nothing to drop
    /// it, or return several events to split it. Events you create with
    /// [`Event::new`] get a uuid from the host. Called by the default
    /// [`Plugin::transform`]; the default keeps the event as it is.
    fn transform_event(&mut self, event: Event) -> Result<Vec<Event>> {
        Ok(vec![event])
    }

    /// Delivers a batch of stored events to a destination, all or nothing.
    ///
    /// Return [`ExportError::Retryable`] for failures worth retrying (5xx,
    /// 429, timeouts) and [`ExportError::Permanent`] for the rest; the host
    /// retries with backoff or sends the batch to dead letters.
    /// [`http::Response::error_for_status`] makes that split for you.
    fn export(&mut self, events: Vec<ExportedEvent>) -> Result<(), ExportError> {
        let _ = events;
        Err(ExportError::Permanent(
            "this plugin does not export events: remove `export` from hooks in plugin.toml".into(),
        ))
    }

    /// Runs the scheduled task `name` declared under `[[schedule]]` in
    /// `plugin.toml`. An error is logged and the task runs again at its next
    /// time.
    fn run_task(&mut self, name: &str) -> Result<()> {
        Err(Error::msg(format!(
            "this plugin has no task named `{name}`: implement Plugin::run_task"
        )))
    }
}

/// Registers the plugin type, generating the component's exports.
///
/// Call it once, at the root of the plugin crate:
///
/// ```ignore
/// sluice_plugin_sdk::register_plugin!(MyPlugin);
/// ```
#[macro_export]
macro_rules! register_plugin {
    ($plugin:ty) => {
        #[doc(hidden)]
        #[allow(dead_code)]
        struct __SluiceExports;

        impl $crate::__private::LifecycleGuest for __SluiceExports {
            fn setup(config: ::std::string::String) -> ::std::result::Result<(), ::std::string::String> {
                $crate::__private::setup::<$plugin>(config)
            }
            fn run_task(name: ::std::string::String) -> ::std::result::Result<(), ::std::string::String> {
                $crate::__private::run_task::<$plugin>(name)
            }
        }

        impl $crate::__private::TransformGuest for __SluiceExports {
            fn transform(
                event: $crate::__private::EventBorrow<'_>,
            ) -> ::std::result::Result<$crate::__private::WitOutcome, ::std::string::String> {
                $crate::__private::transform::<$plugin>(event)
            }
        }

        impl $crate::__private::DestinationGuest for __SluiceExports {
            fn export_batch(
                events: ::std::vec::Vec<$crate::__private::WitExportedEvent>,
            ) -> ::std::result::Result<(), $crate::__private::WitExportError> {
                $crate::__private::export_batch::<$plugin>(events)
            }
        }

        #[cfg(target_arch = "wasm32")]
        $crate::__private::export_plugin!(__SluiceExports with_types_in $crate::__private::bindings);

        // Natively nothing exports the hooks; naming them keeps the plugin
        // type "used" so native builds and tests compile without warnings.
        #[cfg(not(target_arch = "wasm32"))]
        const _: [fn(::std::string::String) -> ::std::result::Result<(), ::std::string::String>; 2] = [
            <__SluiceExports as $crate::__private::LifecycleGuest>::setup,
            <__SluiceExports as $crate::__private::LifecycleGuest>::run_task,
        ];
    };
}

/// Generated WIT bindings and the glue `register_plugin!` expands to. Not
/// part of the API: it changes without notice.
#[doc(hidden)]
pub mod __private {
    use std::any::Any;
    use std::cell::RefCell;

    pub use wit_bindgen;

    #[allow(missing_docs, clippy::all)]
    pub mod bindings {
        wit_bindgen::generate!({
            path: "wit/v0.2.0",
            world: "plugin",
            pub_export_macro: true,
            export_macro_name: "__sluice_export_plugin",
            default_bindings_module: "::sluice_plugin_sdk::__private::bindings",
            runtime_path: "::sluice_plugin_sdk::__private::wit_bindgen::rt",
        });
    }

    pub use bindings::__sluice_export_plugin as export_plugin;
    pub use bindings::exports::sluice::plugin::destination::{
        ExportError as WitExportError, ExportedEvent as WitExportedEvent, Guest as DestinationGuest,
    };
    pub use bindings::exports::sluice::plugin::lifecycle::Guest as LifecycleGuest;
    pub use bindings::exports::sluice::plugin::transform::{
        Guest as TransformGuest, Outcome as WitOutcome,
    };
    pub type EventBorrow<'a> = &'a bindings::sluice::plugin::event::Event;

    use crate::{Error, EventRef, ExportError, ExportedEvent, Outcome, Plugin};

    thread_local! {
        // A component instance is single-threaded and runs one hook at a time,
        // so a thread-local is the plugin's whole lifetime.
        static PLUGIN: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
    }

    fn with_plugin<P: Plugin, R>(f: impl FnOnce(&mut P) -> R) -> Result<R, String> {
        PLUGIN.with_borrow_mut(
            |slot| match slot.as_mut().and_then(|p| p.downcast_mut::<P>()) {
                Some(plugin) => Ok(f(plugin)),
                None => Err("the host called a hook before setup succeeded".to_string()),
            },
        )
    }

    pub fn setup<P: Plugin>(config: String) -> Result<(), String> {
        crate::host::install_panic_hook();
        let config: P::Config =
            serde_json::from_str(&config).map_err(|err| format!("invalid config: {err}"))?;
        let plugin = P::new(config).map_err(|err| err.to_string())?;
        PLUGIN.with_borrow_mut(|slot| *slot = Some(Box::new(plugin)));
        Ok(())
    }

    pub fn run_task<P: Plugin>(name: String) -> Result<(), String> {
        with_plugin::<P, _>(|plugin| plugin.run_task(&name))?.map_err(|err| err.to_string())
    }

    pub fn transform<P: Plugin>(event: EventBorrow<'_>) -> Result<WitOutcome, String> {
        let mut handle = EventRef::from_host(event);
        let outcome = with_plugin::<P, _>(|plugin| plugin.transform(&mut handle))?
            .map_err(|err: Error| err.to_string())?;
        Ok(match outcome {
            Outcome::Keep => WitOutcome::Keep,
            Outcome::Drop => WitOutcome::Drop,
            Outcome::Replace(events) => WitOutcome::Replace(
                events
                    .into_iter()
                    .map(|event| handle.to_host_event(event))
                    .collect::<Result<_, Error>>()
                    .map_err(|err| err.to_string())?,
            ),
        })
    }

    pub fn export_batch<P: Plugin>(events: Vec<WitExportedEvent>) -> Result<(), WitExportError> {
        let events = events
            .into_iter()
            .map(ExportedEvent::from_wit)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| WitExportError::Permanent(err.to_string()))?;
        with_plugin::<P, _>(|plugin| plugin.export(events))
            .map_err(WitExportError::Permanent)?
            .map_err(ExportError::into_wit)
    }
}
