//! The event a transformation chain works on. The host parses an event once,
//! lends it to each plugin in turn as a resource, and serialises it once at
//! the end: plugins read and write single fields, never the whole document.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use wasmtime::component::Resource;

use sluice_plugin_sdk::props::{self, Change};

use super::bindings::event::{
    EventError, Host, HostEditPlan, HostEvent, LeafReplacement, LeafTable, PropertyChange,
};
use super::error::{LimitExceeded, TrapReason};
use super::host::HostState;

/// One event as plugins see it. Its JSON form is PostHog's:
/// `{"uuid", "event", "distinct_id", "timestamp", "properties"}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PluginEvent {
    pub uuid: String,
    #[serde(rename = "event")]
    pub name: String,
    pub distinct_id: String,
    /// RFC 3339, UTC.
    pub timestamp: String,
    #[serde(default)]
    pub properties: Map<String, Value>,
}

impl PluginEvent {
    /// Bytes of the scalar fields, charged to the output budget when a plugin
    /// creates an event (properties are charged as they are set).
    fn approx_len(&self) -> u64 {
        let fields =
            self.uuid.len() + self.name.len() + self.distinct_id.len() + self.timestamp.len();
        fields as u64
    }
}

/// A uuid for the `n`th event a plugin creates while transforming `parent`:
/// the same input always yields the same outputs, so a replayed event is
/// de-duplicated downstream instead of stored twice.
pub fn derived_uuid(parent: &str, n: u32) -> String {
    let namespace = uuid::Uuid::parse_str(parent)
        .unwrap_or_else(|_| uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, parent.as_bytes()));
    uuid::Uuid::new_v5(&namespace, format!("sluice-derived-{n}").as_bytes()).to_string()
}

/// Checked changes to properties: what `edit` applies once and an
/// `edit-plan` resource keeps for many events.
#[derive(Debug)]
pub struct EditPlan {
    changes: Vec<Change>,
    /// Bytes the changes write, charged to the output budget per use.
    written: u64,
}

/// Edit plans one instance may hold: each lives as long as the instance,
/// so without a cap a plugin could grow the host's memory without bound.
const MAX_EDIT_PLANS: u32 = 1024;

impl EditPlan {
    /// Checks every change before any is used, so a refused edit changes
    /// nothing.
    fn check(changes: Vec<PropertyChange>) -> Result<EditPlan, EventError> {
        let mut plan = EditPlan {
            changes: Vec::with_capacity(changes.len()),
            written: 0,
        };
        for change in changes {
            let (change, value_bytes) = checked_change(change)?;
            plan.written += match &change {
                Change::Set { path, .. } => {
                    (path.iter().map(String::len).sum::<usize>() + value_bytes) as u64
                }
                Change::Rename { to, .. } => to.len() as u64,
                Change::Remove(_) | Change::RemoveEverywhere(_) => 0,
            };
            plan.changes.push(change);
        }
        Ok(plan)
    }

    /// The top-level members applying the plan may alter, and whether it
    /// may remove one that is there.
    fn roots(&self, properties: &Map<String, Value>) -> (Vec<String>, bool) {
        // Members an earlier change alters are named by that change, so
        // looking every change up in the properties as they are now is
        // enough.
        let mut roots = Vec::new();
        let mut reorders = false;
        for change in &self.changes {
            roots.extend(props::roots_of(properties, change));
            reorders |= match change {
                Change::Remove(path) | Change::Rename { path, .. } => {
                    path.len() == 1 && properties.contains_key(&path[0])
                }
                Change::RemoveEverywhere(key) => properties.contains_key(key),
                Change::Set { .. } => false,
            };
        }
        (roots, reorders)
    }

    /// Applies the changes in order; returns how many took effect.
    fn apply(&self, properties: &mut Map<String, Value>) -> u32 {
        self.changes
            .iter()
            .filter(|change| props::apply(properties, change))
            .count() as u32
    }
}

/// What a `transform` call changed in its input event, kept so that a
/// failed call can hand the input back as it was (fail-open passes it on
/// unchanged, fail-closed dead-letters it) without a copy of every event
/// before every call. Each field and top-level member is kept once, when
/// the call first changes it.
#[derive(Debug, Default)]
pub struct Journal {
    name: Option<String>,
    distinct_id: Option<String>,
    timestamp: Option<String>,
    /// All properties, once the call replaced them wholesale.
    all: Option<Map<String, Value>>,
    /// The members' keys in their order before the first change: cheaper
    /// than their values, and what puts them back in place.
    order: Option<Vec<String>>,
    /// Top-level members and their values before the call, `None` if the
    /// call added them.
    members: Vec<(String, Option<Value>)>,
}

impl Journal {
    /// Keeps the members `keys` as they are; `reorders` says the change
    /// removes a member that is there (setting one in place keeps its
    /// place, and one added at the end goes by being removed again), and
    /// only then are the members' places kept too.
    fn keep_members(&mut self, properties: &Map<String, Value>, keys: Vec<String>, reorders: bool) {
        if self.all.is_some() {
            return;
        }
        if reorders && self.order.is_none() {
            self.order = Some(properties.keys().cloned().collect());
        }
        for key in keys {
            if self.members.iter().any(|(kept, _)| *kept == key) {
                continue;
            }
            let before = properties.get(&key).cloned();
            self.members.push((key, before));
        }
    }

    /// Puts `event` back as it was before the call, members in their
    /// order.
    pub fn restore(self, event: &mut PluginEvent) {
        if let Some(name) = self.name {
            event.name = name;
        }
        if let Some(id) = self.distinct_id {
            event.distinct_id = id;
        }
        if let Some(timestamp) = self.timestamp {
            event.timestamp = timestamp;
        }
        match self.all {
            Some(all) => event.properties = all,
            None => {
                let current = std::mem::take(&mut event.properties);
                event.properties = undo_members(self.members, self.order, current);
            }
        }
    }

    /// Before the call replaces all properties: keeps them as they were
    /// before the call.
    fn keep_all(&mut self, properties: &Map<String, Value>) {
        if self.all.is_none() {
            let members = std::mem::take(&mut self.members);
            let order = self.order.take();
            self.all = Some(undo_members(members, order, properties.clone()));
        }
    }
}

/// `current` with the kept members put back, in the kept order.
fn undo_members(
    members: Vec<(String, Option<Value>)>,
    order: Option<Vec<String>>,
    mut current: Map<String, Value>,
) -> Map<String, Value> {
    for (key, before) in members {
        match before {
            // In place if it is there; if not, it was removed, and `order`
            // puts it back in its place below.
            Some(value) => current.insert(key, value),
            // Added at the end: removing it keeps the others' order.
            None => current.shift_remove(&key),
        };
    }
    let Some(order) = order else {
        return current; // nothing was removed, so nothing moved
    };
    let mut restored = Map::with_capacity(order.len());
    for key in order {
        if let Some(value) = current.remove(&key) {
            restored.insert(key, value);
        }
    }
    restored
}

fn invalid(message: impl Into<String>) -> EventError {
    EventError::InvalidValue(message.into())
}

impl HostState {
    fn event(&self, handle: &Resource<PluginEvent>) -> wasmtime::Result<&PluginEvent> {
        Ok(self.table.get(handle)?)
    }

    fn event_mut(&mut self, handle: &Resource<PluginEvent>) -> wasmtime::Result<&mut PluginEvent> {
        Ok(self.table.get_mut(handle)?)
    }

    /// Before a change to `handle`: if it is the call's input, lets `keep`
    /// write what the change will overwrite into the call's journal.
    fn journal(
        &mut self,
        handle: &Resource<PluginEvent>,
        keep: impl FnOnce(&mut Journal, &PluginEvent),
    ) -> wasmtime::Result<()> {
        if self.call.input != Some(handle.rep()) {
            return Ok(());
        }
        let HostState { table, call, .. } = self;
        keep(&mut call.journal, table.get(handle)?);
        Ok(())
    }

    fn journal_members(
        &mut self,
        handle: &Resource<PluginEvent>,
        keys: impl FnOnce(&PluginEvent) -> (Vec<String>, bool),
    ) -> wasmtime::Result<()> {
        self.journal(handle, |journal, event| {
            let (keys, reorders) = keys(event);
            journal.keep_members(&event.properties, keys, reorders)
        })
    }
}

impl Host for HostState {}

impl HostEvent for HostState {
    fn new(
        &mut self,
        name: String,
        distinct_id: String,
    ) -> wasmtime::Result<Resource<PluginEvent>> {
        let n = self.call.created_events;
        self.call.created_events += 1;
        let event = PluginEvent {
            uuid: derived_uuid(&self.call.input_uuid, n),
            name,
            distinct_id,
            timestamp: self.call.input_timestamp.clone(),
            properties: Map::new(),
        };
        self.charge_output(event.approx_len())?;
        self.charge_event()?;
        Ok(self.table.push(event)?)
    }

    fn uuid(&mut self, handle: Resource<PluginEvent>) -> wasmtime::Result<String> {
        Ok(self.event(&handle)?.uuid.clone())
    }

    fn name(&mut self, handle: Resource<PluginEvent>) -> wasmtime::Result<String> {
        Ok(self.event(&handle)?.name.clone())
    }

    fn set_name(
        &mut self,
        handle: Resource<PluginEvent>,
        name: String,
    ) -> wasmtime::Result<Result<(), EventError>> {
        if name.is_empty() {
            return Ok(Err(invalid("the event name must not be empty")));
        }
        self.charge_output(name.len() as u64)?;
        self.journal(&handle, |journal, event| {
            journal.name.get_or_insert_with(|| event.name.clone());
        })?;
        self.event_mut(&handle)?.name = name;
        Ok(Ok(()))
    }

    fn distinct_id(&mut self, handle: Resource<PluginEvent>) -> wasmtime::Result<String> {
        Ok(self.event(&handle)?.distinct_id.clone())
    }

    fn set_distinct_id(
        &mut self,
        handle: Resource<PluginEvent>,
        id: String,
    ) -> wasmtime::Result<Result<(), EventError>> {
        if id.is_empty() {
            return Ok(Err(invalid("the distinct id must not be empty")));
        }
        self.charge_output(id.len() as u64)?;
        self.journal(&handle, |journal, event| {
            journal
                .distinct_id
                .get_or_insert_with(|| event.distinct_id.clone());
        })?;
        self.event_mut(&handle)?.distinct_id = id;
        Ok(Ok(()))
    }

    fn timestamp(&mut self, handle: Resource<PluginEvent>) -> wasmtime::Result<String> {
        Ok(self.event(&handle)?.timestamp.clone())
    }

    fn set_timestamp(
        &mut self,
        handle: Resource<PluginEvent>,
        timestamp: String,
    ) -> wasmtime::Result<Result<(), EventError>> {
        let parsed = match chrono::DateTime::parse_from_rfc3339(&timestamp) {
            Ok(parsed) => parsed,
            Err(err) => {
                return Ok(Err(invalid(format!(
                    "timestamp `{timestamp}` is not RFC 3339 ({err}); use e.g. 2024-01-31T12:00:00Z"
                ))));
            }
        };
        self.charge_output(timestamp.len() as u64)?;
        self.journal(&handle, |journal, event| {
            journal
                .timestamp
                .get_or_insert_with(|| event.timestamp.clone());
        })?;
        self.event_mut(&handle)?.timestamp = crate::model::format_timestamp(parsed.to_utc());
        Ok(Ok(()))
    }

    fn property(
        &mut self,
        handle: Resource<PluginEvent>,
        key: String,
    ) -> wasmtime::Result<Option<String>> {
        Ok(self
            .event(&handle)?
            .properties
            .get(&key)
            .map(Value::to_string))
    }

    fn set_property(
        &mut self,
        handle: Resource<PluginEvent>,
        key: String,
        value: String,
    ) -> wasmtime::Result<Result<(), EventError>> {
        self.charge_output((key.len() + value.len()) as u64)?;
        let value: Value = match serde_json::from_str(&value) {
            Ok(value) => value,
            Err(err) => {
                return Ok(Err(EventError::InvalidJson(format!(
                    "property `{key}`: {err}"
                ))));
            }
        };
        self.journal_members(&handle, |_| (vec![key.clone()], false))?;
        self.event_mut(&handle)?.properties.insert(key, value);
        Ok(Ok(()))
    }

    fn remove_property(
        &mut self,
        handle: Resource<PluginEvent>,
        key: String,
    ) -> wasmtime::Result<bool> {
        self.journal_members(&handle, |event| {
            (vec![key.clone()], event.properties.contains_key(&key))
        })?;
        Ok(self
            .event_mut(&handle)?
            .properties
            .shift_remove(&key)
            .is_some())
    }

    fn property_keys(&mut self, handle: Resource<PluginEvent>) -> wasmtime::Result<Vec<String>> {
        Ok(self.event(&handle)?.properties.keys().cloned().collect())
    }

    fn properties(&mut self, handle: Resource<PluginEvent>) -> wasmtime::Result<String> {
        Ok(serde_json::to_string(&self.event(&handle)?.properties)?)
    }

    fn set_properties(
        &mut self,
        handle: Resource<PluginEvent>,
        value: String,
    ) -> wasmtime::Result<Result<(), EventError>> {
        self.charge_output(value.len() as u64)?;
        let properties = match serde_json::from_str::<Value>(&value) {
            Ok(Value::Object(map)) => map,
            Ok(_) => return Ok(Err(invalid("properties must be a JSON object"))),
            Err(err) => return Ok(Err(EventError::InvalidJson(err.to_string()))),
        };
        self.journal(&handle, |journal, event| {
            journal.keep_all(&event.properties)
        })?;
        self.event_mut(&handle)?.properties = properties;
        Ok(Ok(()))
    }

    fn has_property(
        &mut self,
        handle: Resource<PluginEvent>,
        key: String,
    ) -> wasmtime::Result<bool> {
        Ok(self.event(&handle)?.properties.contains_key(&key))
    }

    fn properties_of(
        &mut self,
        handle: Resource<PluginEvent>,
        keys: Vec<String>,
    ) -> wasmtime::Result<Vec<Option<String>>> {
        // The same large property asked for many times would make the host
        // build far more than the plugin could ever receive: stop at what
        // fits in its memory.
        let cap = self.install.limits.memory_bytes;
        let properties = &self.event(&handle)?.properties;
        let mut values = Vec::with_capacity(keys.len());
        let mut total = 0u64;
        for key in &keys {
            let value = properties.get(key).map(Value::to_string);
            total += value.as_ref().map_or(0, |text| text.len() as u64);
            if total > cap {
                return Err(wasmtime::Error::new(LimitExceeded(TrapReason::Memory(cap))));
            }
            values.push(value);
        }
        Ok(values)
    }

    fn edit(
        &mut self,
        handle: Resource<PluginEvent>,
        changes: Vec<PropertyChange>,
    ) -> wasmtime::Result<Result<u32, EventError>> {
        let plan = match EditPlan::check(changes) {
            Ok(plan) => plan,
            Err(err) => return Ok(Err(err)),
        };
        self.charge_output(plan.written)?;
        self.journal_members(&handle, |event| plan.roots(&event.properties))?;
        Ok(Ok(plan.apply(&mut self.event_mut(&handle)?.properties)))
    }

    fn apply(
        &mut self,
        handle: Resource<PluginEvent>,
        plan: Resource<EditPlan>,
    ) -> wasmtime::Result<u32> {
        let written = self.table.get(&plan)?.written;
        self.charge_output(written)?;
        if self.call.input == Some(handle.rep()) {
            let roots = self
                .table
                .get(&plan)?
                .roots(&self.event(&handle)?.properties);
            self.journal_members(&handle, |_| roots)?;
        }
        // The plan and the event are both in the table: take the event out
        // for the moment it is changed.
        let mut properties = std::mem::take(&mut self.event_mut(&handle)?.properties);
        let applied = self.table.get(&plan)?.apply(&mut properties);
        self.event_mut(&handle)?.properties = properties;
        Ok(applied)
    }

    fn leaves(
        &mut self,
        handle: Resource<PluginEvent>,
        whole: Vec<String>,
    ) -> wasmtime::Result<LeafTable> {
        let (text, leaves) = props::leaves(&self.event(&handle)?.properties, &whole);
        Ok(LeafTable { text, leaves })
    }

    fn replace_leaves(
        &mut self,
        handle: Resource<PluginEvent>,
        whole: Vec<String>,
        replacements: Vec<LeafReplacement>,
    ) -> wasmtime::Result<Result<(), EventError>> {
        let written: usize = replacements.iter().map(|r| r.value.len()).sum();
        self.charge_output(written as u64)?;
        let replacements: Vec<(u32, String)> = replacements
            .into_iter()
            .map(|r| (r.index, r.value))
            .collect();
        self.journal_members(&handle, |event| {
            let mut indexes: Vec<u32> = replacements.iter().map(|(index, _)| *index).collect();
            indexes.sort_unstable();
            (
                props::leaf_roots(&event.properties, &whole, &indexes),
                false,
            )
        })?;
        let properties = &mut self.event_mut(&handle)?.properties;
        Ok(props::replace_leaves(properties, &whole, replacements)
            .map_err(EventError::InvalidValue))
    }

    fn duplicate(
        &mut self,
        handle: Resource<PluginEvent>,
    ) -> wasmtime::Result<Resource<PluginEvent>> {
        let copy = self.event(&handle)?.clone();
        // A duplicate costs its whole size: it is the way to multiply output.
        self.charge_output(
            copy.approx_len() + serde_json::to_string(&copy.properties)?.len() as u64,
        )?;
        self.charge_event()?;
        Ok(self.table.push(copy)?)
    }

    fn drop(&mut self, handle: Resource<PluginEvent>) -> wasmtime::Result<()> {
        self.table.delete(handle)?;
        Ok(())
    }
}

impl HostEditPlan for HostState {
    fn create(
        &mut self,
        changes: Vec<PropertyChange>,
    ) -> wasmtime::Result<Result<Resource<EditPlan>, EventError>> {
        let plan = match EditPlan::check(changes) {
            Ok(plan) => plan,
            Err(err) => return Ok(Err(err)),
        };
        if self.edit_plans >= MAX_EDIT_PLANS {
            return Err(wasmtime::Error::new(LimitExceeded(
                TrapReason::OutputLimit(format!(
                    "it held more than {MAX_EDIT_PLANS} edit plans at once"
                )),
            )));
        }
        self.edit_plans += 1;
        Ok(Ok(self.table.push(plan)?))
    }

    fn drop(&mut self, plan: Resource<EditPlan>) -> wasmtime::Result<()> {
        self.table.delete(plan)?;
        self.edit_plans -= 1;
        Ok(())
    }
}

/// A change as the host applies it, with the bytes of its JSON value;
/// refused if its value is not JSON or its path is empty.
fn checked_change(change: PropertyChange) -> Result<(Change, usize), EventError> {
    let empty = |path: &[String]| {
        path.is_empty()
            .then(|| invalid("a property path needs at least one key"))
    };
    let set = |entry: super::bindings::event::PropertyEntry, only_if_absent: bool| {
        if let Some(err) = empty(&entry.path) {
            return Err(err);
        }
        let value = serde_json::from_str(&entry.value).map_err(|err| {
            EventError::InvalidJson(format!("property `{}`: {err}", entry.path.join(".")))
        })?;
        Ok((
            Change::Set {
                path: entry.path,
                value,
                only_if_absent,
            },
            entry.value.len(),
        ))
    };
    match change {
        PropertyChange::Set(entry) => set(entry, false),
        PropertyChange::SetIfAbsent(entry) => set(entry, true),
        PropertyChange::Remove(path) => match empty(&path) {
            Some(err) => Err(err),
            None => Ok((Change::Remove(path), 0)),
        },
        PropertyChange::RemoveEverywhere(key) => Ok((Change::RemoveEverywhere(key), 0)),
        PropertyChange::Rename(rename) => match empty(&rename.path) {
            Some(err) => Err(err),
            None => Ok((
                Change::Rename {
                    path: rename.path,
                    to: rename.to,
                },
                0,
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_uuids_are_stable_and_distinct() {
        let parent = "01890000-0000-7000-8000-000000000001";
        assert_eq!(derived_uuid(parent, 0), derived_uuid(parent, 0));
        assert_ne!(derived_uuid(parent, 0), derived_uuid(parent, 1));
        assert_ne!(derived_uuid(parent, 0), parent);
        assert_eq!(derived_uuid("not-a-uuid", 3), derived_uuid("not-a-uuid", 3));
    }

    #[test]
    fn an_edit_with_bad_json_or_an_empty_path_is_refused_naming_it() {
        use crate::runtime::bindings::event::{PropertyEntry, PropertyRename};
        let entry = |path: &[&str], value: &str| PropertyEntry {
            path: path.iter().map(|k| k.to_string()).collect(),
            value: value.into(),
        };
        match checked_change(PropertyChange::Set(entry(&["$set", "plan"], "{nope"))) {
            Err(EventError::InvalidJson(message)) => {
                assert!(message.contains("property `$set.plan`"), "{message}")
            }
            other => panic!("expected invalid-json, got {other:?}"),
        }
        for change in [
            PropertyChange::SetIfAbsent(entry(&[], "1")),
            PropertyChange::Remove(Vec::new()),
            PropertyChange::Rename(PropertyRename {
                path: Vec::new(),
                to: "x".into(),
            }),
        ] {
            assert!(matches!(
                checked_change(change),
                Err(EventError::InvalidValue(message)) if message.contains("at least one key")
            ));
        }
        let (change, bytes) = checked_change(PropertyChange::Set(entry(&["a"], "[1,2]"))).unwrap();
        assert_eq!(bytes, 5);
        assert_eq!(
            change,
            Change::Set {
                path: vec!["a".into()],
                value: serde_json::json!([1, 2]),
                only_if_absent: false
            }
        );
    }
}
