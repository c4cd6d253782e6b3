use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{Context, Error, Result};

/// A whole event, as plugins see it in [`crate::Plugin::transform_event`] and
/// as `sluice plugin test` reads and prints it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Identifies the event for de-duplication. Empty on an event made with
    /// [`Event::new`] until the host assigns one.
    #[serde(default)]
    pub uuid: String,
    /// The event name, for example `$pageview`.
    #[serde(rename = "event")]
    pub name: String,
    /// The distinct id of the user the event belongs to.
    pub distinct_id: String,
    /// When it happened, RFC 3339 in UTC. Empty on a new event means "the
    /// same time as the event being transformed".
    #[serde(default)]
    pub timestamp: String,
    /// The event's properties.
    #[serde(default)]
    pub properties: Map<String, Value>,
}

impl Event {
    /// A new event to return next to (or instead of) the one being
    /// transformed. The host gives it a uuid derived from the input's, so a
    /// replayed input produces the same output.
    pub fn new(name: impl Into<String>, distinct_id: impl Into<String>) -> Self {
        Event {
            uuid: String::new(),
            name: name.into(),
            distinct_id: distinct_id.into(),
            timestamp: String::new(),
            properties: Map::new(),
        }
    }

    /// Sets a property from any serialisable value, for building events.
    pub fn with_property(mut self, key: impl Into<String>, value: impl Serialize) -> Self {
        let value = serde_json::to_value(value).unwrap_or(Value::Null);
        self.properties.insert(key.into(), value);
        self
    }
}

/// What becomes of the event a transformation was given.
#[derive(Debug)]
pub enum Outcome {
    /// Keep it, with the changes made through its [`EventRef`].
    Keep,
    /// Drop it: it is counted, not stored.
    Drop,
    /// Replace it by these events. Keep the input's uuid on the event that
    /// continues the input (see [`EventRef::to_event`]); events made with
    /// [`Event::new`] get new uuids.
    Replace(Vec<Event>),
}

/// A handle to the event being transformed.
///
/// In the host, each call reads or writes one field, so a plugin pays only for
/// what it touches. In native tests it wraps an [`Event`] you own (see
/// [`EventRef::new`]).
pub struct EventRef<'a> {
    inner: Inner<'a>,
}

enum Inner<'a> {
    #[cfg(target_arch = "wasm32")]
    Host(crate::__private::EventBorrow<'a>),
    Local(&'a mut Event),
}

#[cfg(target_arch = "wasm32")]
fn event_error(err: crate::__private::bindings::sluice::plugin::event::EventError) -> Error {
    use crate::__private::bindings::sluice::plugin::event::EventError;
    match err {
        EventError::InvalidJson(message) => Error::msg(format!("invalid JSON: {message}")),
        EventError::InvalidValue(message) => Error::msg(format!("invalid value: {message}")),
    }
}

impl<'a> EventRef<'a> {
    /// Wraps an event you own, for native tests of [`crate::Plugin::transform`].
    pub fn new(event: &'a mut Event) -> Self {
        EventRef {
            inner: Inner::Local(event),
        }
    }

    #[cfg(target_arch = "wasm32")]
    pub(crate) fn from_host(event: crate::__private::EventBorrow<'a>) -> Self {
        EventRef {
            inner: Inner::Host(event),
        }
    }

    #[cfg(not(target_arch = "wasm32"))]
    pub(crate) fn from_host(_event: crate::__private::EventBorrow<'a>) -> Self {
        unreachable!("host events exist only inside a WebAssembly instance")
    }

    /// The event's uuid.
    pub fn uuid(&self) -> String {
        match &self.inner {
            #[cfg(target_arch = "wasm32")]
            Inner::Host(event) => event.uuid(),
            Inner::Local(event) => event.uuid.clone(),
        }
    }

    /// The event name.
    pub fn name(&self) -> String {
        match &self.inner {
            #[cfg(target_arch = "wasm32")]
            Inner::Host(event) => event.name(),
            Inner::Local(event) => event.name.clone(),
        }
    }

    /// Renames the event. Fails on an empty name.
    pub fn set_name(&mut self, name: &str) -> Result<()> {
        match &mut self.inner {
            #[cfg(target_arch = "wasm32")]
            Inner::Host(event) => event.set_name(name).map_err(event_error),
            Inner::Local(event) => {
                non_empty(name, "event name")?;
                event.name = name.to_string();
                Ok(())
            }
        }
    }

    /// The distinct id.
    pub fn distinct_id(&self) -> String {
        match &self.inner {
            #[cfg(target_arch = "wasm32")]
            Inner::Host(event) => event.distinct_id(),
            Inner::Local(event) => event.distinct_id.clone(),
        }
    }

    /// Changes the distinct id. Fails on an empty id.
    pub fn set_distinct_id(&mut self, id: &str) -> Result<()> {
        match &mut self.inner {
            #[cfg(target_arch = "wasm32")]
            Inner::Host(event) => event.set_distinct_id(id).map_err(event_error),
            Inner::Local(event) => {
                non_empty(id, "distinct id")?;
                event.distinct_id = id.to_string();
                Ok(())
            }
        }
    }

    /// When the event happened, RFC 3339 in UTC.
    pub fn timestamp(&self) -> String {
        match &self.inner {
            #[cfg(target_arch = "wasm32")]
            Inner::Host(event) => event.timestamp(),
            Inner::Local(event) => event.timestamp.clone(),
        }
    }

    /// Changes when the event happened. The host refuses anything but an
    /// RFC 3339 date-time.
    pub fn set_timestamp(&mut self, timestamp: &str) -> Result<()> {
        match &mut self.inner {
            #[cfg(target_arch = "wasm32")]
            Inner::Host(event) => event.set_timestamp(timestamp).map_err(event_error),
            Inner::Local(event) => {
                non_empty(timestamp, "timestamp")?;
                event.timestamp = timestamp.to_string();
                Ok(())
            }
        }
    }

    /// One property as raw JSON, or `None` if it is not set.
    pub fn property_json(&self, key: &str) -> Option<Value> {
        match &self.inner {
            #[cfg(target_arch = "wasm32")]
            Inner::Host(event) => event
                .property(key)
                .and_then(|text| serde_json::from_str(&text).ok()),
            Inner::Local(event) => event.properties.get(key).cloned(),
        }
    }

    /// One property deserialised as `T`. `Ok(None)` if it is not set; an
    /// error if it is set but is not a `T`.
    pub fn property<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        match &self.inner {
            #[cfg(target_arch = "wasm32")]
            Inner::Host(event) => event
                .property(key)
                .map(|text| serde_json::from_str(&text))
                .transpose()
                .context(format_args!("property `{key}` has an unexpected type")),
            Inner::Local(event) => event
                .properties
                .get(key)
                .map(|value| T::deserialize(value))
                .transpose()
                .context(format_args!("property `{key}` has an unexpected type")),
        }
    }

    /// Sets one property to any serialisable value.
    pub fn set_property(&mut self, key: &str, value: impl Serialize) -> Result<()> {
        match &mut self.inner {
            #[cfg(target_arch = "wasm32")]
            Inner::Host(event) => {
                let text = serde_json::to_string(&value)?;
                event.set_property(key, &text).map_err(event_error)
            }
            Inner::Local(event) => {
                event
                    .properties
                    .insert(key.to_string(), serde_json::to_value(value)?);
                Ok(())
            }
        }
    }

    /// Removes one property. Returns whether it was set.
    pub fn remove_property(&mut self, key: &str) -> bool {
        match &mut self.inner {
            #[cfg(target_arch = "wasm32")]
            Inner::Host(event) => event.remove_property(key),
            Inner::Local(event) => event.properties.shift_remove(key).is_some(),
        }
    }

    /// The names of all properties.
    pub fn property_keys(&self) -> Vec<String> {
        match &self.inner {
            #[cfg(target_arch = "wasm32")]
            Inner::Host(event) => event.property_keys(),
            Inner::Local(event) => event.properties.keys().cloned().collect(),
        }
    }

    /// All properties at once. Costs a copy of every value; prefer
    /// [`EventRef::property`] when you know the keys.
    pub fn properties(&self) -> Result<Map<String, Value>> {
        match &self.inner {
            #[cfg(target_arch = "wasm32")]
            Inner::Host(event) => Ok(serde_json::from_str(&event.properties())?),
            Inner::Local(event) => Ok(event.properties.clone()),
        }
    }

    /// Replaces all properties.
    pub fn set_properties(&mut self, properties: &Map<String, Value>) -> Result<()> {
        match &mut self.inner {
            #[cfg(target_arch = "wasm32")]
            Inner::Host(event) => {
                let text = serde_json::to_string(properties)?;
                event.set_properties(&text).map_err(event_error)
            }
            Inner::Local(event) => {
                event.properties = properties.clone();
                Ok(())
            }
        }
    }

    /// The whole event as an [`Event`]. It keeps this event's uuid, so
    /// returning it in [`Outcome::Replace`] continues this event.
    pub fn to_event(&self) -> Result<Event> {
        Ok(Event {
            uuid: self.uuid(),
            name: self.name(),
            distinct_id: self.distinct_id(),
            timestamp: self.timestamp(),
            properties: self.properties()?,
        })
    }

    /// Writes every field of `event` but the uuid into this handle.
    #[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
    pub(crate) fn overwrite(&mut self, event: Event) -> Result<()> {
        self.set_name(&event.name)?;
        self.set_distinct_id(&event.distinct_id)?;
        if !event.timestamp.is_empty() {
            self.set_timestamp(&event.timestamp)?;
        }
        self.set_properties(&event.properties)
    }

    /// Writes into this handle the fields of `changed` that differ from
    /// `original`, the event this handle held before.
    pub(crate) fn apply_changes(&mut self, original: &Event, changed: Event) -> Result<()> {
        if changed.name != original.name {
            self.set_name(&changed.name)?;
        }
        if changed.distinct_id != original.distinct_id {
            self.set_distinct_id(&changed.distinct_id)?;
        }
        if !changed.timestamp.is_empty() && changed.timestamp != original.timestamp {
            self.set_timestamp(&changed.timestamp)?;
        }
        for key in original.properties.keys() {
            if !changed.properties.contains_key(key) {
                self.remove_property(key);
            }
        }
        for (key, value) in &changed.properties {
            if original.properties.get(key) != Some(value) {
                self.set_property(key, value)?;
            }
        }
        Ok(())
    }

    /// Turns an [`Event`] returned in [`Outcome::Replace`] into a host event:
    /// a duplicate of this one if it carries this uuid, a new one otherwise.
    #[cfg(target_arch = "wasm32")]
    pub(crate) fn to_host_event(
        &self,
        event: Event,
    ) -> Result<crate::__private::bindings::sluice::plugin::event::Event> {
        use crate::__private::bindings::sluice::plugin::event::Event as HostEvent;
        let Inner::Host(input) = &self.inner else {
            unreachable!("a wasm32 transform always has a host event")
        };
        let continues_input = !event.uuid.is_empty() && event.uuid == input.uuid();
        let output = if continues_input {
            input.duplicate()
        } else {
            HostEvent::new(&event.name, &event.distinct_id)
        };
        let mut handle = EventRef::from_host(&output);
        handle.overwrite(event)?;
        Ok(output)
    }

    #[cfg(not(target_arch = "wasm32"))]
    pub(crate) fn to_host_event(
        &self,
        _event: Event,
    ) -> Result<crate::__private::bindings::sluice::plugin::event::Event> {
        unreachable!("host events exist only inside a WebAssembly instance")
    }
}

fn non_empty(value: &str, what: &str) -> Result<()> {
    if value.is_empty() {
        return Err(Error::msg(format!(
            "invalid value: the {what} must not be empty"
        )));
    }
    Ok(())
}
