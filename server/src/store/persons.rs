//! Persons, applied in event order inside the transaction that stores the
//! events: a distinct id resolves to a person (created on first sight),
//! `$identify` (with `$anon_distinct_id`) and `$create_alias` merge two
//! persons into one, and `$set`, `$set_once` and `$unset` change the
//! person's properties.

use serde_json::{Map, Value};
use sqlx::AnyConnection;

use super::{QueuedEvent, Result};

/// A person id derived from the project and the first distinct id seen, so
/// replaying the same events yields the same ids.
fn new_person_id(project_id: &str, distinct_id: &str) -> String {
    uuid::Uuid::new_v5(
        &uuid::Uuid::NAMESPACE_OID,
        format!("{project_id}\u{0}{distinct_id}").as_bytes(),
    )
    .to_string()
}

async fn person_of(
    tx: &mut AnyConnection,
    project_id: &str,
    distinct_id: &str,
) -> Result<Option<String>> {
    sqlx::query_scalar(
        "SELECT person_id FROM person_distinct_ids WHERE project_id = $1 AND distinct_id = $2",
    )
    .bind(project_id)
    .bind(distinct_id)
    .fetch_optional(&mut *tx)
    .await
}

async fn link(
    tx: &mut AnyConnection,
    project_id: &str,
    distinct_id: &str,
    person_id: &str,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO person_distinct_ids (project_id, distinct_id, person_id) VALUES ($1, $2, $3)
         ON CONFLICT (project_id, distinct_id) DO UPDATE SET person_id = excluded.person_id",
    )
    .bind(project_id)
    .bind(distinct_id)
    .bind(person_id)
    .execute(&mut *tx)
    .await
    .map(|_| ())
}

async fn create(
    tx: &mut AnyConnection,
    project_id: &str,
    distinct_id: &str,
    now: &str,
) -> Result<String> {
    let id = new_person_id(project_id, distinct_id);
    sqlx::query(
        "INSERT INTO persons (project_id, id, properties, created_at) VALUES ($1, $2, '{}', $3)
         ON CONFLICT (project_id, id) DO NOTHING",
    )
    .bind(project_id)
    .bind(&id)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    link(tx, project_id, distinct_id, &id).await?;
    Ok(id)
}

async fn properties(
    tx: &mut AnyConnection,
    project_id: &str,
    person_id: &str,
) -> Result<Map<String, Value>> {
    let text: Option<String> =
        sqlx::query_scalar("SELECT properties FROM persons WHERE project_id = $1 AND id = $2")
            .bind(project_id)
            .bind(person_id)
            .fetch_optional(&mut *tx)
            .await?;
    Ok(text
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default())
}

async fn save_properties(
    tx: &mut AnyConnection,
    project_id: &str,
    person_id: &str,
    props: &Map<String, Value>,
) -> Result<()> {
    sqlx::query("UPDATE persons SET properties = $1 WHERE project_id = $2 AND id = $3")
        .bind(Value::Object(props.clone()).to_string())
        .bind(project_id)
        .bind(person_id)
        .execute(&mut *tx)
        .await
        .map(|_| ())
}

/// Makes `other`'s distinct id part of `target`'s person. If `other`
/// already has a person of its own, that person is merged in: its distinct
/// ids move over and its properties fill gaps in the target's.
async fn merge(
    tx: &mut AnyConnection,
    project_id: &str,
    target: &str,
    other_distinct_id: &str,
) -> Result<()> {
    let Some(source) = person_of(tx, project_id, other_distinct_id).await? else {
        return link(tx, project_id, other_distinct_id, target).await;
    };
    if source == target {
        return Ok(());
    }
    let mut merged = properties(tx, project_id, target).await?;
    for (key, value) in properties(tx, project_id, &source).await? {
        merged.entry(key).or_insert(value);
    }
    save_properties(tx, project_id, target, &merged).await?;
    sqlx::query(
        "UPDATE person_distinct_ids SET person_id = $1 WHERE project_id = $2 AND person_id = $3",
    )
    .bind(target)
    .bind(project_id)
    .bind(&source)
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM persons WHERE project_id = $1 AND id = $2")
        .bind(project_id)
        .bind(&source)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

fn text_property(properties: &Map<String, Value>, key: &str) -> Option<String> {
    match properties.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    }
}

/// Applies what `event` says about persons and returns the person it
/// belongs to.
pub async fn apply(
    tx: &mut AnyConnection,
    project_id: &str,
    event: &QueuedEvent,
) -> Result<String> {
    let now = &event.received_at;
    let other = match event.event.as_str() {
        "$identify" => text_property(&event.properties, "$anon_distinct_id"),
        "$create_alias" => text_property(&event.properties, "alias"),
        _ => None,
    }
    .filter(|other| *other != event.distinct_id);
    let person = match (person_of(tx, project_id, &event.distinct_id).await?, other) {
        (Some(person), Some(other)) => {
            merge(tx, project_id, &person, &other).await?;
            person
        }
        // A new distinct id that identifies or aliases a known one joins
        // its person, as the anonymous history belongs to this user.
        (None, Some(other)) => match person_of(tx, project_id, &other).await? {
            Some(person) => {
                link(tx, project_id, &event.distinct_id, &person).await?;
                person
            }
            None => {
                let person = create(tx, project_id, &event.distinct_id, now).await?;
                link(tx, project_id, &other, &person).await?;
                person
            }
        },
        (Some(person), None) => person,
        (None, None) => create(tx, project_id, &event.distinct_id, now).await?,
    };
    let set = event.properties.get("$set").and_then(Value::as_object);
    let set_once = event.properties.get("$set_once").and_then(Value::as_object);
    let unset: Vec<String> = match event.properties.get("$unset") {
        Some(Value::Array(keys)) => keys
            .iter()
            .filter_map(|k| k.as_str().map(str::to_string))
            .collect(),
        Some(Value::Object(keys)) => keys.keys().cloned().collect(),
        _ => Vec::new(),
    };
    if set.is_some() || set_once.is_some() || !unset.is_empty() {
        let mut props = properties(tx, project_id, &person).await?;
        for (key, value) in set_once.into_iter().flatten() {
            props.entry(key.clone()).or_insert_with(|| value.clone());
        }
        for (key, value) in set.into_iter().flatten() {
            props.insert(key.clone(), value.clone());
        }
        for key in unset {
            props.shift_remove(&key);
        }
        save_properties(tx, project_id, &person, &props).await?;
    }
    Ok(person)
}
