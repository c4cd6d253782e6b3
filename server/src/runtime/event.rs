//! The event a transformation chain works on. The host parses an event once,
//! lends it to each plugin in turn as a resource, and serialises it once at
//! the end: plugins read and write single fields, never the whole document.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use wasmtime::component::Resource;

use super::bindings::event::{EventError, Host, HostEvent};
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
        self.event_mut(&handle)?.timestamp = crate::runtime::format_timestamp(parsed.to_utc());
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
        self.event_mut(&handle)?.properties.insert(key, value);
        Ok(Ok(()))
    }

    fn remove_property(
        &mut self,
        handle: Resource<PluginEvent>,
        key: String,
    ) -> wasmtime::Result<bool> {
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
        self.event_mut(&handle)?.properties = properties;
        Ok(Ok(()))
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
}
