//! Which events become Salesforce records, and what those records say.

use std::collections::HashMap;

use sluice_plugin_sdk::{Error, ExportedEvent, Map, Result, Value, json};

/// The event a client sends when a user is identified.
const IDENTIFY: &str = "$identify";

/// `field_mapping`: Salesforce field ← Sluice property, in config order.
#[derive(Debug, PartialEq)]
pub struct Mapping {
    fields: Vec<(String, String)>,
}

/// One record to upsert: every event of one person in the batch, merged.
#[derive(Debug, PartialEq)]
pub struct Record {
    /// The distinct id, written to the external ID field.
    pub external_id: String,
    /// Salesforce field API name to value, in mapping order.
    pub fields: Map<String, Value>,
    /// The events merged into this record, so failures can name them.
    pub uuids: Vec<String>,
}

impl Mapping {
    /// Parses `field_mapping`, refusing what Salesforce would refuse for
    /// every batch: `Id` and the external ID field are set by the plugin.
    pub fn parse(config: &Value, external_id_field: &str) -> Result<Mapping> {
        let Value::Object(map) = config else {
            return Err(Error::msg(format!(
                "field_mapping must be a JSON object of Salesforce field to Sluice property, such as {{\"Email\": \"email\"}}; got {}",
                json::kind(config)
            )));
        };
        let mut fields = Vec::with_capacity(map.len());
        for (field, property) in map {
            check_api_name(field, "field_mapping")?;
            if field.eq_ignore_ascii_case("Id") || field.eq_ignore_ascii_case(external_id_field) {
                return Err(Error::msg(format!(
                    "field_mapping: `{field}` is set by the plugin itself (it holds the distinct id); remove it"
                )));
            }
            match property {
                Value::String(property) if !property.trim().is_empty() => {
                    fields.push((field.clone(), property.trim().to_string()));
                }
                other => {
                    return Err(Error::msg(format!(
                        "field_mapping: the value of `{field}` must be a Sluice property name, got {}",
                        json::kind(other)
                    )));
                }
            }
        }
        Ok(Mapping { fields })
    }

    /// The records a batch produces. `$identify` events and events carrying
    /// a `$set` object are a person's profile; other events are skipped, as
    /// is a `$set` event whose mapped properties are all absent, which would
    /// change nothing. Events of one distinct id merge into one record, the
    /// latest value of each field winning, because Salesforce fails every
    /// copy of an external ID repeated within one call.
    pub fn records(&self, events: &[ExportedEvent]) -> Vec<Record> {
        let mut order: Vec<&ExportedEvent> = events.iter().collect();
        // Stable, so events with equal timestamps keep batch order. Stored
        // timestamps share one RFC 3339 UTC format and sort as text.
        order.sort_by(|a, b| a.timestamp.cmp(&b.timestamp));

        let mut records: Vec<Record> = Vec::new();
        let mut by_id: HashMap<&str, usize> = HashMap::new();
        for event in order {
            let set = event.properties.get("$set").and_then(Value::as_object);
            let identify = event.name == IDENTIFY;
            if (!identify && set.is_none()) || event.distinct_id.is_empty() {
                continue;
            }
            let values: Vec<(&String, Value)> = self
                .fields
                .iter()
                .filter_map(|(field, property)| {
                    lookup(set, &event.properties, property).map(|v| (field, salesforce_value(v)))
                })
                .collect();
            if values.is_empty() && !identify {
                continue;
            }
            let index = *by_id.entry(&event.distinct_id).or_insert_with(|| {
                records.push(Record {
                    external_id: event.distinct_id.clone(),
                    fields: Map::new(),
                    uuids: Vec::new(),
                });
                records.len() - 1
            });
            let record = &mut records[index];
            record.uuids.push(event.uuid.clone());
            for (field, value) in values {
                record.fields.insert(field.clone(), value);
            }
        }
        // Mapping order reads better in Salesforce's debug logs and in tests
        // than the order fields happened to arrive in.
        for record in &mut records {
            let mut ordered = Map::new();
            for (field, _) in &self.fields {
                if let Some(value) = record.fields.remove(field) {
                    ordered.insert(field.clone(), value);
                }
            }
            record.fields = ordered;
        }
        records
    }
}

/// Parses `defaults`: field API name to a value Salesforce can store.
pub fn parse_defaults(config: &Value, external_id_field: &str) -> Result<Map<String, Value>> {
    let Value::Object(map) = config else {
        return Err(Error::msg(format!(
            "defaults must be a JSON object of Salesforce field to value, such as {{\"Company\": \"Unknown\"}}; got {}",
            json::kind(config)
        )));
    };
    for (field, value) in map {
        check_api_name(field, "defaults")?;
        if field.eq_ignore_ascii_case("Id") || field.eq_ignore_ascii_case(external_id_field) {
            return Err(Error::msg(format!(
                "defaults: `{field}` is set by the plugin itself; remove it"
            )));
        }
        if !matches!(value, Value::String(_) | Value::Number(_) | Value::Bool(_)) {
            return Err(Error::msg(format!(
                "defaults: the value of `{field}` must be a string, number or boolean, got {}",
                json::kind(value)
            )));
        }
    }
    Ok(map.clone())
}

/// Refuses names Salesforce could never accept, so the mistake shows on the
/// install instead of dead-lettering every batch. Standard names are
/// letters, digits and underscores; custom ones end in `__c`.
pub fn check_api_name(name: &str, setting: &str) -> Result<()> {
    let valid = name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(Error::msg(format!(
            "{setting}: `{name}` is not a Salesforce field API name (letters, digits and underscores, such as Email or Sluice_Id__c)"
        )));
    }
    Ok(())
}

/// A property from `$set`, else from the event's own properties. An exact
/// key wins over a dotted path, since property names may contain dots.
fn lookup<'a>(
    set: Option<&'a Map<String, Value>>,
    properties: &'a Map<String, Value>,
    name: &str,
) -> Option<&'a Value> {
    set.and_then(|set| find(set, name))
        .or_else(|| find(properties, name))
}

fn find<'a>(map: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    let present = |value: &&Value| !value.is_null();
    if let Some(value) = map.get(name) {
        return Some(value).filter(present);
    }
    let (first, rest) = name.split_once('.')?;
    let mut value = map.get(first)?;
    for key in rest.split('.') {
        value = match value {
            Value::Object(inner) => inner.get(key)?,
            Value::Array(items) => items.get(key.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(value).filter(present)
}

/// Salesforce fields hold scalars; a nested value goes as its JSON text,
/// which a text field stores, rather than failing the whole call.
fn salesforce_value(value: &Value) -> Value {
    match value {
        Value::Object(_) | Value::Array(_) => Value::String(value.to_string()),
        scalar => scalar.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_plugin_sdk::json;

    fn event(
        uuid: &str,
        name: &str,
        distinct_id: &str,
        timestamp: &str,
        properties: Value,
    ) -> ExportedEvent {
        ExportedEvent {
            uuid: uuid.into(),
            name: name.into(),
            distinct_id: distinct_id.into(),
            person_id: Some("person-1".into()),
            timestamp: timestamp.into(),
            properties: properties.as_object().unwrap().clone(),
        }
    }

    fn mapping(config: Value) -> Mapping {
        Mapping::parse(&config, "Sluice_Id__c").unwrap()
    }

    #[test]
    fn identify_and_set_events_become_records_and_others_are_skipped() {
        let mapping = mapping(json!({"Email": "email", "LastName": "last_name"}));
        let records = mapping.records(&[
            event(
                "e1",
                "$identify",
                "u1",
                "2024-05-01T10:00:00.000Z",
                json!({"$set": {"email": "ada@example.com", "last_name": "Lovelace"}}),
            ),
            event(
                "e2",
                "$pageview",
                "u2",
                "2024-05-01T10:00:01.000Z",
                json!({"email": "ignored@example.com"}),
            ),
            event(
                "e3",
                "upgraded",
                "u3",
                "2024-05-01T10:00:02.000Z",
                json!({"$set": {"email": "grace@example.com"}}),
            ),
            event(
                "e4",
                "upgraded",
                "u4",
                "2024-05-01T10:00:03.000Z",
                json!({"$set": {"plan": "pro"}}),
            ),
            event(
                "e5",
                "$identify",
                "u5",
                "2024-05-01T10:00:04.000Z",
                json!({}),
            ),
        ]);
        assert_eq!(
            records,
            vec![
                Record {
                    external_id: "u1".into(),
                    fields: json!({"Email": "ada@example.com", "LastName": "Lovelace"})
                        .as_object()
                        .unwrap()
                        .clone(),
                    uuids: vec!["e1".into()],
                },
                Record {
                    external_id: "u3".into(),
                    fields: json!({"Email": "grace@example.com"})
                        .as_object()
                        .unwrap()
                        .clone(),
                    uuids: vec!["e3".into()],
                },
                // An identify with nothing mapped still makes sure the person exists.
                Record {
                    external_id: "u5".into(),
                    fields: Map::new(),
                    uuids: vec!["e5".into()]
                },
            ]
        );
    }

    #[test]
    fn events_of_one_person_merge_with_the_latest_value_winning() {
        let mapping = mapping(json!({"Email": "email", "Title": "title", "LastName": "last_name"}));
        let records = mapping.records(&[
            // Out of order in the batch: the timestamp decides.
            event(
                "late",
                "$identify",
                "u1",
                "2024-05-01T10:00:05.000Z",
                json!({"$set": {"email": "new@example.com"}}),
            ),
            event(
                "early",
                "$identify",
                "u1",
                "2024-05-01T10:00:00.000Z",
                json!({"$set": {"email": "old@example.com", "title": "CTO"}}),
            ),
            event(
                "other",
                "$identify",
                "u2",
                "2024-05-01T10:00:01.000Z",
                json!({"$set": {"last_name": "Hopper"}}),
            ),
        ]);
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].external_id, "u1");
        assert_eq!(
            records[0].fields,
            *json!({"Email": "new@example.com", "Title": "CTO"})
                .as_object()
                .unwrap()
        );
        assert_eq!(records[0].uuids, ["early", "late"]);
        assert_eq!(records[1].uuids, ["other"]);
    }

    #[test]
    fn set_wins_over_event_properties_and_dotted_names_reach_nested_values() {
        let mapping = mapping(json!({
            "Email": "email",
            "Company": "company.name",
            "LeadSource": "$referring_domain",
            "NumberOfEmployees": "company.size",
            "Description": "tags",
            "Phone": "phone",
        }));
        let records = mapping.records(&[event(
            "e1",
            "$identify",
            "u1",
            "2024-05-01T10:00:00.000Z",
            json!({
                "email": "event@example.com",
                "$referring_domain": "news.example.com",
                "phone": "+1 555",
                "$set": {"email": "set@example.com", "company": {"name": "Analytical", "size": 12}, "tags": ["a", "b"], "phone": null},
            }),
        )]);
        assert_eq!(
            Value::Object(records[0].fields.clone()),
            json!({
                "Email": "set@example.com",
                "Company": "Analytical",
                "LeadSource": "news.example.com",
                "NumberOfEmployees": 12,
                "Description": "[\"a\",\"b\"]",
                // A null in $set is no value: the event's own property is used.
                "Phone": "+1 555",
            })
        );
    }

    #[test]
    fn a_bad_mapping_is_refused_with_the_reason() {
        let err = |config: Value| {
            Mapping::parse(&config, "Sluice_Id__c")
                .unwrap_err()
                .to_string()
        };
        assert!(err(json!(["Email"])).contains("field_mapping must be a JSON object"));
        assert!(
            err(json!({"E mail": "email"})).contains("`E mail` is not a Salesforce field API name")
        );
        assert!(
            err(json!({"Email": 3})).contains("must be a Sluice property name, got the number 3")
        );
        assert!(err(json!({"sluice_id__c": "x"})).contains("set by the plugin itself"));
        assert!(err(json!({"Id": "x"})).contains("set by the plugin itself"));
    }

    #[test]
    fn defaults_must_be_scalars_on_real_field_names() {
        assert!(
            parse_defaults(
                &json!({"Company": "Unknown", "NumberOfEmployees": 1}),
                "X__c"
            )
            .is_ok()
        );
        let err = parse_defaults(&json!({"Company": {"name": "x"}}), "X__c")
            .unwrap_err()
            .to_string();
        assert!(err.contains("must be a string, number or boolean"), "{err}");
        let err = parse_defaults(&json!("Unknown"), "X__c")
            .unwrap_err()
            .to_string();
        assert!(err.contains("defaults must be a JSON object"), "{err}");
    }
}
