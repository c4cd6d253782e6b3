//! The `persons` and `person_distinct_ids` tables, always changed
//! together. Persons are resolved for a whole batch of events inside the
//! transaction that stores them (see `batch`): a distinct id resolves to a
//! person (created on first sight), `$identify` (with `$anon_distinct_id`)
//! and `$create_alias` merge two persons into one, and `$set`, `$set_once`
//! and `$unset` change the person's properties.
//!
//! Events are applied in order, exactly as if one at a time, but the
//! database sees a few statements per batch rather than several per event:
//! the links of every distinct id the batch names are read in one query,
//! the batch is worked out in memory, the properties of the persons it
//! changes are read in a second query, and what changed is written back
//! with multi-row statements. Merges, which are rare, move the merged
//! person's other distinct ids with a statement each. The person API
//! reads a person back here too.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;
use serde_json::{Map, Value};
use sqlx::{AnyConnection, Row};

use super::sql::{keyed_lookup, values_placeholders};
use super::{Backend, QueuedEvent, Result, Store};

/// Rows per multi-row statement: at most 4 binds each, far under both
/// backends' limits on binds per statement.
const ROWS_PER_STATEMENT: usize = 500;

/// A person: the distinct ids that resolve to it and its properties.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Person {
    pub id: String,
    pub distinct_ids: Vec<String>,
    pub properties: Value,
}

/// A person id derived from the project and the first distinct id seen, so
/// replaying the same events yields the same ids.
fn new_person_id(project_id: &str, distinct_id: &str) -> String {
    uuid::Uuid::new_v5(
        &uuid::Uuid::NAMESPACE_OID,
        format!("{project_id}\u{0}{distinct_id}").as_bytes(),
    )
    .to_string()
}

fn text_property(properties: &Map<String, Value>, key: &str) -> Option<String> {
    match properties.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    }
}

/// The distinct id an identify or alias event merges into its own.
fn other_distinct_id(event: &QueuedEvent) -> Option<String> {
    match event.event.as_str() {
        "$identify" => text_property(&event.properties, "$anon_distinct_id"),
        "$create_alias" => text_property(&event.properties, "alias"),
        _ => None,
    }
    .filter(|other| *other != event.distinct_id)
}

fn changes_properties(event: &QueuedEvent) -> bool {
    let props = &event.properties;
    props.get("$set").is_some_and(Value::is_object)
        || props.get("$set_once").is_some_and(Value::is_object)
        || match props.get("$unset") {
            Some(Value::Array(keys)) => keys.iter().any(Value::is_string),
            Some(Value::Object(keys)) => !keys.is_empty(),
            _ => false,
        }
}

/// A change to person properties, kept in event order: resolution decides
/// which persons they touch, then their properties are read and the
/// changes applied in the same order.
enum PropertyChange<'a> {
    /// The source's properties fill gaps in the target's.
    Merge { target: String, source: String },
    /// An event's `$set`, `$set_once` and `$unset`.
    Event {
        person: String,
        event: &'a QueuedEvent,
    },
}

/// One project's share of a batch, worked out in memory.
struct Resolution<'a> {
    project_id: &'a str,
    /// Distinct id → person, as read and as changed by the batch so far.
    links: HashMap<String, String>,
    /// Links to write back.
    changed_links: BTreeSet<String>,
    /// Persons first seen in this batch, with their creation time.
    created: BTreeMap<String, String>,
    /// (source, target) in order: the source's distinct ids move to the
    /// target and the source is deleted.
    merges: Vec<(String, String)>,
    changes: Vec<PropertyChange<'a>>,
}

impl<'a> Resolution<'a> {
    fn new(project_id: &'a str, links: HashMap<String, String>) -> Self {
        Resolution {
            project_id,
            links,
            changed_links: BTreeSet::new(),
            created: BTreeMap::new(),
            merges: Vec::new(),
            changes: Vec::new(),
        }
    }

    fn link(&mut self, distinct_id: &str, person: &str) {
        self.links
            .insert(distinct_id.to_string(), person.to_string());
        self.changed_links.insert(distinct_id.to_string());
    }

    fn create(&mut self, distinct_id: &str, now: &str) -> String {
        let id = new_person_id(self.project_id, distinct_id);
        self.created
            .entry(id.clone())
            .or_insert_with(|| now.to_string());
        self.link(distinct_id, &id);
        id
    }

    /// Makes `other`'s distinct id part of `target`'s person. If `other`
    /// already has a person of its own, that person is merged in: its
    /// distinct ids move over and its properties fill gaps in the target's.
    fn merge(&mut self, target: &str, other_distinct_id: &str) {
        let Some(source) = self.links.get(other_distinct_id).cloned() else {
            self.link(other_distinct_id, target);
            return;
        };
        if source == target {
            return;
        }
        for person in self.links.values_mut() {
            if *person == source {
                *person = target.to_string();
            }
        }
        self.merges.push((source.clone(), target.to_string()));
        self.changes.push(PropertyChange::Merge {
            target: target.to_string(),
            source,
        });
    }

    /// Applies what `event` says about persons and returns the person it
    /// belongs to.
    fn apply(&mut self, event: &'a QueuedEvent) -> String {
        let now = &event.received_at;
        let other = other_distinct_id(event);
        let known = self.links.get(&event.distinct_id).cloned();
        let person = match (known, other) {
            (Some(person), Some(other)) => {
                self.merge(&person, &other);
                person
            }
            // A new distinct id that identifies or aliases a known one joins
            // its person, as the anonymous history belongs to this user.
            (None, Some(other)) => match self.links.get(&other).cloned() {
                Some(person) => {
                    self.link(&event.distinct_id, &person);
                    person
                }
                None => {
                    let person = self.create(&event.distinct_id, now);
                    self.link(&other, &person);
                    person
                }
            },
            (Some(person), None) => person,
            (None, None) => self.create(&event.distinct_id, now),
        };
        if changes_properties(event) {
            self.changes.push(PropertyChange::Event {
                person: person.clone(),
                event,
            });
        }
        person
    }
}

impl Store {
    /// The person a distinct id belongs to now, with all its distinct ids.
    pub async fn person_by_distinct_id(
        &self,
        project_id: &str,
        distinct_id: &str,
    ) -> Result<Option<Person>> {
        let mut conn = self.pool.acquire().await?;
        let Some(id): Option<String> = sqlx::query_scalar(
            "SELECT person_id FROM person_distinct_ids WHERE project_id = $1 AND distinct_id = $2",
        )
        .bind(project_id)
        .bind(distinct_id)
        .fetch_optional(&mut *conn)
        .await?
        else {
            return Ok(None);
        };
        let properties: Option<String> =
            sqlx::query_scalar("SELECT properties FROM persons WHERE project_id = $1 AND id = $2")
                .bind(project_id)
                .bind(&id)
                .fetch_optional(&mut *conn)
                .await?;
        let distinct_ids: Vec<String> = sqlx::query_scalar(
            "SELECT distinct_id FROM person_distinct_ids WHERE project_id = $1 AND person_id = $2 ORDER BY distinct_id",
        )
        .bind(project_id)
        .bind(&id)
        .fetch_all(&mut *conn)
        .await?;
        Ok(Some(Person {
            id,
            distinct_ids,
            properties: properties
                .and_then(|p| serde_json::from_str(&p).ok())
                .unwrap_or(Value::Object(Default::default())),
        }))
    }
}

/// Applies what each event says about persons, in order, and returns the
/// person each event belongs to.
pub(super) async fn resolve(
    tx: &mut AnyConnection,
    backend: Backend,
    events: &[(&str, &QueuedEvent)],
) -> Result<Vec<String>> {
    let mut by_project: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, (project_id, _)) in events.iter().enumerate() {
        by_project.entry(project_id).or_default().push(i);
    }
    let mut persons = vec![String::new(); events.len()];
    for (project_id, indexes) in by_project {
        let mut names: BTreeSet<&str> = BTreeSet::new();
        for &i in &indexes {
            let event = events[i].1;
            names.insert(&event.distinct_id);
        }
        let others: Vec<String> = indexes
            .iter()
            .filter_map(|&i| other_distinct_id(events[i].1))
            .collect();
        names.extend(others.iter().map(String::as_str));

        let links = read_links(tx, backend, project_id, &names).await?;
        let mut resolution = Resolution::new(project_id, links);
        for &i in &indexes {
            persons[i] = resolution.apply(events[i].1);
        }
        write(tx, backend, resolution).await?;
    }
    Ok(persons)
}

async fn read_links(
    tx: &mut AnyConnection,
    backend: Backend,
    project_id: &str,
    distinct_ids: &BTreeSet<&str>,
) -> Result<HashMap<String, String>> {
    let mut links = HashMap::with_capacity(distinct_ids.len());
    let ids: Vec<&str> = distinct_ids.iter().copied().collect();
    for chunk in ids.chunks(ROWS_PER_STATEMENT) {
        let sql = keyed_lookup(
            backend,
            "t.distinct_id, t.person_id",
            "person_distinct_ids",
            "distinct_id",
            chunk.len(),
        );
        let mut query = sqlx::query(&sql).bind(project_id);
        for id in chunk {
            query = query.bind(*id);
        }
        for row in query.fetch_all(&mut *tx).await? {
            links.insert(row.get("distinct_id"), row.get("person_id"));
        }
    }
    Ok(links)
}

async fn read_properties(
    tx: &mut AnyConnection,
    backend: Backend,
    project_id: &str,
    person_ids: &BTreeSet<&str>,
) -> Result<HashMap<String, Map<String, Value>>> {
    let mut found = HashMap::with_capacity(person_ids.len());
    let ids: Vec<&str> = person_ids.iter().copied().collect();
    for chunk in ids.chunks(ROWS_PER_STATEMENT) {
        let sql = keyed_lookup(backend, "t.id, t.properties", "persons", "id", chunk.len());
        let mut query = sqlx::query(&sql).bind(project_id);
        for id in chunk {
            query = query.bind(*id);
        }
        for row in query.fetch_all(&mut *tx).await? {
            let text: String = row.get("properties");
            found.insert(
                row.get("id"),
                serde_json::from_str(&text).unwrap_or_default(),
            );
        }
    }
    Ok(found)
}

/// Writes what the batch changed. Rows go in key order, so two processes
/// writing overlapping persons take their row locks in the same order.
async fn write(tx: &mut AnyConnection, backend: Backend, resolution: Resolution<'_>) -> Result<()> {
    let Resolution {
        project_id,
        links,
        changed_links,
        created,
        merges,
        changes,
    } = resolution;

    let created: Vec<(&String, &String)> = created.iter().collect();
    for chunk in created.chunks(ROWS_PER_STATEMENT) {
        // Properties start as the column's default, `{}`.
        let sql = format!(
            "INSERT INTO persons (project_id, id, created_at) VALUES {}
             ON CONFLICT (project_id, id) DO NOTHING",
            values_placeholders(backend, 1, chunk.len(), 3)
        );
        let mut query = sqlx::query(&sql);
        for (id, created_at) in chunk {
            query = query
                .bind(project_id)
                .bind(id.as_str())
                .bind(created_at.as_str());
        }
        query.execute(&mut *tx).await?;
    }

    for (source, target) in &merges {
        sqlx::query(
            "UPDATE person_distinct_ids SET person_id = $1 WHERE project_id = $2 AND person_id = $3",
        )
        .bind(target)
        .bind(project_id)
        .bind(source)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM persons WHERE project_id = $1 AND id = $2")
            .bind(project_id)
            .bind(source)
            .execute(&mut *tx)
            .await?;
    }

    let changed: Vec<(&String, &String)> = changed_links
        .iter()
        .map(|distinct_id| (distinct_id, &links[distinct_id]))
        .collect();
    for chunk in changed.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "INSERT INTO person_distinct_ids (project_id, distinct_id, person_id) VALUES {}
             ON CONFLICT (project_id, distinct_id) DO UPDATE SET person_id = excluded.person_id",
            values_placeholders(backend, 1, chunk.len(), 3)
        );
        let mut query = sqlx::query(&sql);
        for (distinct_id, person) in chunk {
            query = query
                .bind(project_id)
                .bind(distinct_id.as_str())
                .bind(person.as_str());
        }
        query.execute(&mut *tx).await?;
    }

    if changes.is_empty() {
        return Ok(());
    }
    let mut wanted: BTreeSet<&str> = BTreeSet::new();
    for change in &changes {
        match change {
            PropertyChange::Merge { target, source } => {
                wanted.insert(target);
                wanted.insert(source);
            }
            PropertyChange::Event { person, .. } => {
                wanted.insert(person);
            }
        }
    }
    let mut properties = read_properties(tx, backend, project_id, &wanted).await?;
    // Most `$set` and `$set_once` repeat what the person already has
    // (posthog-js sends its `$initial_…` properties with every event), so
    // only persons whose properties end up different are written.
    let before = properties.clone();
    let mut dirty: BTreeSet<String> = BTreeSet::new();
    for change in &changes {
        match change {
            PropertyChange::Merge { target, source } => {
                let from = properties.remove(source).unwrap_or_default();
                let into = properties.entry(target.clone()).or_default();
                for (key, value) in from {
                    into.entry(key).or_insert(value);
                }
                dirty.remove(source);
                dirty.insert(target.clone());
            }
            PropertyChange::Event { person, event } => {
                let props = properties.entry(person.clone()).or_default();
                apply_property_changes(props, event);
                dirty.insert(person.clone());
            }
        }
    }
    let merged_away: BTreeSet<&String> = merges.iter().map(|(source, _)| source).collect();
    dirty.retain(|person| {
        !merged_away.contains(person) && properties.get(person) != before.get(person)
    });
    let dirty: Vec<(String, String)> = dirty
        .into_iter()
        .map(|person| {
            let text = Value::Object(properties.remove(&person).unwrap_or_default()).to_string();
            (person, text)
        })
        .collect();
    let now = super::now_rfc3339();
    for chunk in dirty.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "INSERT INTO persons (project_id, id, properties, created_at) VALUES {}
             ON CONFLICT (project_id, id) DO UPDATE SET properties = excluded.properties",
            values_placeholders(backend, 1, chunk.len(), 4)
        );
        let mut query = sqlx::query(&sql);
        for (person, text) in chunk {
            query = query
                .bind(project_id)
                .bind(person.as_str())
                .bind(text.as_str())
                .bind(now.as_str());
        }
        query.execute(&mut *tx).await?;
    }
    Ok(())
}

fn apply_property_changes(props: &mut Map<String, Value>, event: &QueuedEvent) {
    let set = event.properties.get("$set").and_then(Value::as_object);
    let set_once = event.properties.get("$set_once").and_then(Value::as_object);
    for (key, value) in set_once.into_iter().flatten() {
        props.entry(key.clone()).or_insert_with(|| value.clone());
    }
    for (key, value) in set.into_iter().flatten() {
        props.insert(key.clone(), value.clone());
    }
    match event.properties.get("$unset") {
        Some(Value::Array(keys)) => {
            for key in keys.iter().filter_map(Value::as_str) {
                props.shift_remove(key);
            }
        }
        Some(Value::Object(keys)) => {
            for key in keys.keys() {
                props.shift_remove(key);
            }
        }
        _ => {}
    }
}
