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

    /// Whether a property is set, to anything (`null` included). Cheaper
    /// than reading it when only its presence matters.
    pub fn has_property(&self, key: &str) -> bool {
        match &self.inner {
            #[cfg(target_arch = "wasm32")]
            Inner::Host(event) => event.has_property(key),
            Inner::Local(event) => event.properties.contains_key(key),
        }
    }

    /// Several properties in one host call, in the order of `keys`; `None`
    /// where one is not set. Keep the key list in the plugin (built once in
    /// [`crate::Plugin::new`]) to avoid building it per event.
    pub fn properties_of(&self, keys: &[String]) -> Result<Vec<Option<Value>>> {
        match &self.inner {
            #[cfg(target_arch = "wasm32")]
            Inner::Host(event) => event
                .properties_of(keys)
                .into_iter()
                .map(|value| value.map(|text| serde_json::from_str(&text)).transpose())
                .collect::<Result<_, _>>()
                .map_err(Error::from),
            Inner::Local(event) => Ok(keys
                .iter()
                .map(|key| event.properties.get(key).cloned())
                .collect()),
        }
    }

    /// Applies `edits` to the properties in one host call and returns how
    /// many changes took effect (a rename of a missing property, or a
    /// `set_if_absent` of one that is set, does not). Nothing changes if an
    /// edit is refused.
    pub fn edit(&mut self, edits: &Edits) -> Result<u32> {
        match &mut self.inner {
            #[cfg(target_arch = "wasm32")]
            Inner::Host(event) => event.edit(&edits.changes).map_err(event_error),
            Inner::Local(event) => edits.apply_local(&mut event.properties),
        }
    }

    /// Applies an [`EditPlan`]'s changes, as [`EventRef::edit`] would, and
    /// returns how many took effect. Only a handle crosses to the host.
    pub fn apply(&mut self, plan: &EditPlan) -> Result<u32> {
        match &mut self.inner {
            #[cfg(target_arch = "wasm32")]
            Inner::Host(event) => Ok(event.apply(&plan.handle)),
            Inner::Local(event) => plan.edits.apply_local(&mut event.properties),
        }
    }

    /// Every string, number and boolean in the properties, at any depth,
    /// with the key holding it, in one host call. Members named in `whole`
    /// come as one value each, not descended into. Use it to look at every
    /// value (a PII scrubber does); replace values with
    /// [`EventRef::replace_leaves`].
    pub fn leaves(&self, whole: &[String]) -> Leaves {
        match &self.inner {
            #[cfg(target_arch = "wasm32")]
            Inner::Host(event) => {
                let table = event.leaves(whole);
                Leaves {
                    text: table.text,
                    spans: table.leaves,
                }
            }
            Inner::Local(event) => {
                let (text, spans) = crate::props::leaves(&event.properties, whole);
                Leaves { text, spans }
            }
        }
    }

    /// Replaces values found by [`EventRef::leaves`] (called with the same
    /// `whole`, with no change in between) by strings: pairs of
    /// [`Leaf::index`] and the new text.
    pub fn replace_leaves(
        &mut self,
        whole: &[String],
        replacements: Vec<(u32, String)>,
    ) -> Result<()> {
        if replacements.is_empty() {
            return Ok(());
        }
        match &mut self.inner {
            #[cfg(target_arch = "wasm32")]
            Inner::Host(event) => {
                use crate::__private::bindings::sluice::plugin::event::LeafReplacement;
                let replacements: Vec<LeafReplacement> = replacements
                    .into_iter()
                    .map(|(index, value)| LeafReplacement { index, value })
                    .collect();
                event
                    .replace_leaves(whole, &replacements)
                    .map_err(event_error)
            }
            Inner::Local(event) => {
                crate::props::replace_leaves(&mut event.properties, whole, replacements)
                    .map_err(|message| Error::msg(format!("invalid value: {message}")))
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

/// Changes to an event's properties, made in one host call by
/// [`EventRef::edit`]. Build it once (in [`crate::Plugin::new`]) when the
/// changes are the same for every event, and it costs nothing per event to
/// describe them.
///
/// A path is the keys from the top-level properties down: `&["plan"]` is
/// the top-level `plan`, `&["$set", "plan"]` the `plan` inside `$set`.
///
/// ```
/// use sluice_plugin_sdk::{Edits, Event, EventRef, json};
///
/// let mut edits = Edits::new();
/// edits
///     .rename(&["plan"], "subscription_plan")
///     .rename(&["$set", "plan"], "subscription_plan")
///     .remove_everywhere("phone");
/// edits.set_if_absent(&["source"], "web").unwrap();
///
/// let mut event = Event::new("signed up", "user-1")
///     .with_property("plan", "pro")
///     .with_property("phone", "+14155552671")
///     .with_property("$set", json!({"plan": "pro"}));
/// let changed = EventRef::new(&mut event).edit(&edits).unwrap();
/// assert_eq!(changed, 4);
/// assert_eq!(
///     sluice_plugin_sdk::Value::Object(event.properties),
///     json!({"$set": {"subscription_plan": "pro"}, "subscription_plan": "pro", "source": "web"})
/// );
/// ```
#[derive(Clone, Debug, Default)]
pub struct Edits {
    #[cfg(target_arch = "wasm32")]
    changes: Vec<crate::__private::bindings::sluice::plugin::event::PropertyChange>,
    #[cfg(not(target_arch = "wasm32"))]
    changes: Vec<crate::props::Change>,
}

fn owned_path(path: &[&str]) -> Vec<String> {
    path.iter().map(|key| key.to_string()).collect()
}

impl Edits {
    /// No changes yet.
    pub fn new() -> Self {
        Edits::default()
    }

    /// Whether there are no changes.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// Forgets every change, keeping the allocation for the next event.
    pub fn clear(&mut self) {
        self.changes.clear();
    }

    /// Turns these changes into an [`EditPlan`]: checked and kept by the
    /// host, so that applying them to an event sends only a handle. Make
    /// plans in [`crate::Plugin::new`], for changes that are the same for
    /// every event; an instance may hold 1,024 at a time.
    pub fn plan(&self) -> Result<EditPlan> {
        #[cfg(target_arch = "wasm32")]
        let handle =
            crate::__private::bindings::sluice::plugin::event::EditPlan::create(&self.changes)
                .map_err(event_error)?;
        Ok(EditPlan {
            edits: self.clone(),
            #[cfg(target_arch = "wasm32")]
            handle,
        })
    }

    fn apply_local(&self, properties: &mut Map<String, Value>) -> Result<u32> {
        let changes = self.local_changes()?;
        Ok(changes
            .iter()
            .filter(|change| crate::props::apply(properties, change))
            .count() as u32)
    }

    /// The changes as plain values, for an event held by the plugin.
    #[cfg(not(target_arch = "wasm32"))]
    fn local_changes(&self) -> Result<std::borrow::Cow<'_, [crate::props::Change]>> {
        Ok(std::borrow::Cow::Borrowed(&self.changes))
    }

    #[cfg(target_arch = "wasm32")]
    fn local_changes(&self) -> Result<std::borrow::Cow<'_, [crate::props::Change]>> {
        use crate::__private::bindings::sluice::plugin::event::PropertyChange;
        use crate::props::Change;
        self.changes
            .iter()
            .map(|change| {
                Ok(match change {
                    PropertyChange::Set(entry) | PropertyChange::SetIfAbsent(entry) => {
                        Change::Set {
                            path: entry.path.clone(),
                            value: serde_json::from_str(&entry.value)?,
                            only_if_absent: matches!(change, PropertyChange::SetIfAbsent(_)),
                        }
                    }
                    PropertyChange::Remove(path) => Change::Remove(path.clone()),
                    PropertyChange::RemoveEverywhere(key) => Change::RemoveEverywhere(key.clone()),
                    PropertyChange::Rename(rename) => Change::Rename {
                        path: rename.path.clone(),
                        to: rename.to.clone(),
                    },
                })
            })
            .collect::<Result<Vec<_>>>()
            .map(std::borrow::Cow::Owned)
    }

    fn set_value(
        &mut self,
        path: &[&str],
        value: impl Serialize,
        only_if_absent: bool,
    ) -> Result<&mut Self> {
        non_empty_path(path)?;
        let path = owned_path(path);
        #[cfg(target_arch = "wasm32")]
        {
            use crate::__private::bindings::sluice::plugin::event::{
                PropertyChange, PropertyEntry,
            };
            let entry = PropertyEntry {
                path,
                value: serde_json::to_string(&value)?,
            };
            self.changes.push(if only_if_absent {
                PropertyChange::SetIfAbsent(entry)
            } else {
                PropertyChange::Set(entry)
            });
        }
        #[cfg(not(target_arch = "wasm32"))]
        self.changes.push(crate::props::Change::Set {
            path,
            value: serde_json::to_value(value)?,
            only_if_absent,
        });
        Ok(self)
    }

    /// Sets the value at `path`, replacing what is there and creating
    /// missing objects on the way. Fails on an empty path or a value that
    /// does not serialise to JSON.
    pub fn set(&mut self, path: &[&str], value: impl Serialize) -> Result<&mut Self> {
        self.set_value(path, value, false)
    }

    /// Sets the value at `path` only if nothing (not even `null`) is there.
    pub fn set_if_absent(&mut self, path: &[&str], value: impl Serialize) -> Result<&mut Self> {
        self.set_value(path, value, true)
    }

    /// Removes the member at `path`, if it is there.
    pub fn remove(&mut self, path: &[&str]) -> &mut Self {
        let path = owned_path(path);
        #[cfg(target_arch = "wasm32")]
        self.changes
            .push(crate::__private::bindings::sluice::plugin::event::PropertyChange::Remove(path));
        #[cfg(not(target_arch = "wasm32"))]
        self.changes.push(crate::props::Change::Remove(path));
        self
    }

    /// Removes every member named `key`, at any depth (nested objects and
    /// objects inside arrays included).
    pub fn remove_everywhere(&mut self, key: &str) -> &mut Self {
        #[cfg(target_arch = "wasm32")]
        self.changes.push(
            crate::__private::bindings::sluice::plugin::event::PropertyChange::RemoveEverywhere(
                key.to_string(),
            ),
        );
        #[cfg(not(target_arch = "wasm32"))]
        self.changes
            .push(crate::props::Change::RemoveEverywhere(key.to_string()));
        self
    }

    /// Moves the member at `path` to the key `to` of the same object,
    /// replacing a value already there; nothing happens if the member is
    /// not there.
    pub fn rename(&mut self, path: &[&str], to: &str) -> &mut Self {
        let path = owned_path(path);
        let to = to.to_string();
        #[cfg(target_arch = "wasm32")]
        self.changes.push(
            crate::__private::bindings::sluice::plugin::event::PropertyChange::Rename(
                crate::__private::bindings::sluice::plugin::event::PropertyRename { path, to },
            ),
        );
        #[cfg(not(target_arch = "wasm32"))]
        self.changes.push(crate::props::Change::Rename { path, to });
        self
    }
}

/// Changes made once and applied to many events with [`EventRef::apply`];
/// from [`Edits::plan`]. The host keeps the checked changes, so an event
/// pays only for applying them.
#[derive(Debug)]
pub struct EditPlan {
    edits: Edits,
    #[cfg(target_arch = "wasm32")]
    handle: crate::__private::bindings::sluice::plugin::event::EditPlan,
}

fn non_empty_path(path: &[&str]) -> Result<()> {
    if path.is_empty() {
        return Err(Error::msg(
            "invalid value: a property path needs at least one key",
        ));
    }
    Ok(())
}

/// The values of an event's properties, from [`EventRef::leaves`].
#[derive(Clone, Debug)]
pub struct Leaves {
    text: String,
    /// `props::LEAF_FIELDS` numbers per leaf.
    spans: Vec<u32>,
}

/// One value from [`Leaves::iter`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leaf<'a> {
    /// Its position, for [`EventRef::replace_leaves`].
    pub index: u32,
    /// The key of the member holding it (for an array item, the array's).
    pub key: &'a str,
    /// The value.
    pub value: LeafValue<'a>,
}

/// A value from [`Leaves`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeafValue<'a> {
    /// A string's text.
    String(&'a str),
    /// A number or a boolean, or a member taken whole, as JSON.
    Json(&'a str),
}

impl Leaves {
    /// How many values there are.
    pub fn len(&self) -> usize {
        self.spans.len() / crate::props::LEAF_FIELDS
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.spans.len() < crate::props::LEAF_FIELDS
    }

    /// The values in depth-first order.
    pub fn iter(&self) -> impl Iterator<Item = Leaf<'_>> {
        let at = |start: u32, len: u32| {
            self.text
                .get(start as usize..start as usize + len as usize)
                .unwrap_or_default()
        };
        self.spans
            .chunks_exact(crate::props::LEAF_FIELDS)
            .enumerate()
            .map(move |(index, span)| {
                let value = at(span[2], span[3]);
                Leaf {
                    index: index as u32,
                    key: at(span[0], span[1]),
                    value: if span[4] == 1 {
                        LeafValue::String(value)
                    } else {
                        LeafValue::Json(value)
                    },
                }
            })
    }
}
