//! The `events` table: stored in batches by the pipeline (see `batch`),
//! and read by one statement, which the events API and the query engine
//! share: a project's events in a time range, optionally of some event
//! names or one distinct id, each with its person resolved through merges
//! as of now and with the properties the query needs extracted as JSON
//! text. Every statement starts with `project_id`, so it walks only that
//! project's part of an index (`events_by_name` with names,
//! `events_by_time` without).
//!
//! Only what both backends agree on happens in SQL: index range scans,
//! joins and JSON extraction. Filters and arithmetic happen in the caller,
//! identically for both.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use futures::TryStreamExt;
use serde::Serialize;
use serde_json::Value;
use sqlx::Row;
use sqlx::any::{AnyArguments, AnyRow};

use super::sql::{keyed_lookup, values_placeholders};
use super::{Backend, QueuedEvent, Result, Store};

/// Rows per multi-row statement. Events have eight columns: 250 rows are
/// 2,000 binds, far under both backends' limits.
const ROWS_PER_STATEMENT: usize = 250;

/// A stored event, as the events API returns it.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct StoredEvent {
    pub uuid: String,
    pub event: String,
    pub distinct_id: String,
    pub person_id: Option<String>,
    pub timestamp: String,
    pub properties: Value,
}

/// Filters of the events list.
#[derive(Clone, Debug, Default)]
pub struct EventFilter {
    pub event: Option<String>,
    pub distinct_id: Option<String>,
    pub after: Option<String>,
    pub before: Option<String>,
    /// Only events after this position in newest-first order.
    pub cursor: Option<Cursor>,
    pub limit: u32,
}

/// What to read.
#[derive(Clone, Debug, Default)]
pub struct Scan {
    pub project_id: String,
    /// Only these event names; `None` for every event.
    pub events: Option<Vec<String>>,
    /// Stored-timestamp text bounds, `from` inclusive, `to` exclusive.
    pub from: Option<String>,
    pub to: Option<String>,
    pub distinct_id: Option<String>,
    /// Paths into the event's properties to extract.
    pub event_paths: Vec<Vec<String>>,
    /// Paths into the person's properties to extract.
    pub person_paths: Vec<Vec<String>>,
    /// Also return all properties, for event search.
    pub with_properties: bool,
    /// How long the database may spend on one statement (PostgreSQL
    /// enforces it; SQLite is stopped by the caller dropping the scan).
    pub statement_timeout: Duration,
}

/// One event as a scan returns it.
#[derive(Clone, Debug)]
pub struct ScanRow {
    pub uuid: String,
    pub event: String,
    pub distinct_id: String,
    /// The person the distinct id belongs to now.
    pub person_id: String,
    pub timestamp: String,
    /// The JSON text of each path of `event_paths`, then of `person_paths`;
    /// `None` where the path leads nowhere.
    pub values: Vec<Option<String>>,
    pub properties: Option<String>,
}

/// A position in newest-first order, for paging.
#[derive(Clone, Debug)]
pub struct Cursor {
    pub timestamp: String,
    pub uuid: String,
}

/// A bounded read in newest-first order (ties by uuid).
struct Page<'a> {
    /// Only events after this position in that order.
    cursor: Option<&'a Cursor>,
    /// Only events stored with a later timestamp: the events API's
    /// `after`, which, unlike [`Scan::from`], leaves the bound out.
    after: Option<&'a str>,
    size: usize,
}

/// Adds a bound value and returns its placeholder.
fn bind(binds: &mut Vec<String>, value: String) -> String {
    binds.push(value);
    format!("${}", binds.len())
}

struct Statement {
    sql: String,
    binds: Vec<String>,
}

impl Statement {
    fn query(&self) -> sqlx::query::Query<'_, sqlx::Any, AnyArguments<'_>> {
        let mut query = sqlx::query(&self.sql);
        for value in &self.binds {
            query = query.bind(value);
        }
        query
    }
}

/// The column of the person, `COALESCE(pd.person_id, e.person_id)`:
/// `None` for an event stored before persons existed whose distinct id
/// never got one. The events API shows that as null; a scan counts the
/// distinct id as its person.
const PERSON: usize = 4;

impl Store {
    /// The one statement that reads events: every row of `scan`, or with
    /// `page`, one page of them, newest first.
    fn statement(&self, scan: &Scan, page: Option<&Page>) -> Statement {
        let mut binds = vec![scan.project_id.clone()];
        let mut columns = String::from(
            "e.uuid, e.event, e.distinct_id, e.timestamp,
             COALESCE(pd.person_id, e.person_id) AS person_id",
        );
        let paths = scan
            .event_paths
            .iter()
            .map(|p| ("e", p))
            .chain(scan.person_paths.iter().map(|p| ("pp", p)));
        for (i, (table, path)) in paths.enumerate() {
            let extract = match self.backend() {
                // `->` gives the JSON text of what the path selects.
                Backend::Sqlite => {
                    let json_path: String = std::iter::once("$".to_string())
                        .chain(path.iter().map(|key| format!(".\"{key}\"")))
                        .collect();
                    format!("{table}.properties -> {}", bind(&mut binds, json_path))
                }
                // `json -> text` selects object members only, as SQLite's
                // quoted path labels do: an array is never indexed by a
                // key that looks like a number. The `json` type keeps the
                // stored text, so numbers come back spelled as stored.
                Backend::Postgres => {
                    let mut expr = format!("CAST({table}.properties AS JSON)");
                    for key in path {
                        expr = format!("{expr} -> CAST({} AS TEXT)", bind(&mut binds, key.clone()));
                    }
                    format!("CAST({expr} AS TEXT)")
                }
            };
            columns.push_str(&format!(", {extract} AS v{i}"));
        }
        if scan.with_properties {
            columns.push_str(", e.properties");
        }
        // The person is looked up at read time, so events sent before an
        // identify or alias show the person they were merged into.
        let mut sql = format!(
            "SELECT {columns} FROM events e
             LEFT JOIN person_distinct_ids pd
                    ON pd.project_id = e.project_id AND pd.distinct_id = e.distinct_id"
        );
        if !scan.person_paths.is_empty() {
            sql.push_str(
                " LEFT JOIN persons pp
                        ON pp.project_id = e.project_id AND pp.id = COALESCE(pd.person_id, e.person_id)",
            );
        }
        sql.push_str(" WHERE e.project_id = $1");
        if let Some(from) = &scan.from {
            let p = bind(&mut binds, from.clone());
            sql.push_str(&format!(" AND e.timestamp >= {p}"));
        }
        if let Some(to) = &scan.to {
            let p = bind(&mut binds, to.clone());
            sql.push_str(&format!(" AND e.timestamp < {p}"));
        }
        if let Some(events) = &scan.events {
            let list: Vec<String> = events
                .iter()
                .map(|name| bind(&mut binds, name.clone()))
                .collect();
            sql.push_str(&format!(" AND e.event IN ({})", list.join(", ")));
        }
        if let Some(distinct_id) = &scan.distinct_id {
            let p = bind(&mut binds, distinct_id.clone());
            sql.push_str(&format!(" AND e.distinct_id = {p}"));
        }
        if let Some(page) = page {
            if let Some(after) = page.after {
                let p = bind(&mut binds, after.to_string());
                sql.push_str(&format!(" AND e.timestamp > {p}"));
            }
            if let Some(cursor) = page.cursor {
                let ts = bind(&mut binds, cursor.timestamp.clone());
                let ts_again = bind(&mut binds, cursor.timestamp.clone());
                let uuid = bind(&mut binds, cursor.uuid.clone());
                // Spelled out rather than as a row value, so both
                // planners see a range on the index's timestamp column.
                sql.push_str(&format!(
                    " AND e.timestamp <= {ts} AND (e.timestamp < {ts_again} OR e.uuid < {uuid})"
                ));
            }
            sql.push_str(&format!(
                " ORDER BY e.timestamp DESC, e.uuid DESC LIMIT {}",
                page.size
            ));
        }
        Statement { sql, binds }
    }

    async fn read_transaction(
        &self,
        timeout: Duration,
    ) -> Result<sqlx::Transaction<'static, sqlx::Any>> {
        let mut tx = self.read.begin().await?;
        if self.backend() == Backend::Postgres {
            // `set_config(…, true)` is `SET LOCAL`: both settings apply to
            // this transaction only, and the connection goes back to the pool
            // without them. One statement, so one round trip per read.
            //
            // Sequential scans are off because, when one project holds most
            // of the table, the planner would rather read all of `events`
            // (and `person_distinct_ids`) than walk the project's index
            // range, so reading other projects' rows. A query reads only its
            // own project's range.
            sqlx::query(
                "SELECT set_config('statement_timeout', $1, true), set_config('enable_seqscan', 'off', true)",
            )
            .bind(timeout.as_millis().max(1).to_string())
            .execute(&mut *tx)
            .await?;
        }
        Ok(tx)
    }

    /// Streams the events of `scan` to `each`, in no particular order,
    /// until it returns false.
    pub async fn scan_events(
        &self,
        scan: &Scan,
        mut each: impl FnMut(ScanRow) -> bool,
    ) -> Result<()> {
        let statement = self.statement(scan, None);
        let mut tx = self.read_transaction(scan.statement_timeout).await?;
        {
            let mut rows = statement.query().fetch(&mut *tx);
            while let Some(row) = rows.try_next().await? {
                if !each(decode(scan, &row)?) {
                    break;
                }
            }
        }
        tx.rollback().await.map_err(Into::into)
    }

    /// One page of `scan`'s events, newest first (ties by uuid), after
    /// `cursor`.
    pub async fn scan_page(
        &self,
        scan: &Scan,
        cursor: &Option<Cursor>,
        size: usize,
    ) -> Result<Vec<ScanRow>> {
        let page = Page {
            cursor: cursor.as_ref(),
            after: None,
            size,
        };
        let statement = self.statement(scan, Some(&page));
        let mut tx = self.read_transaction(scan.statement_timeout).await?;
        let rows = statement.query().fetch_all(&mut *tx).await?;
        tx.rollback().await?;
        rows.iter().map(|row| decode(scan, row)).collect()
    }

    /// Stored events of a project, newest first: the first page of a scan
    /// with all properties and no paths.
    ///
    /// It reads on the analytics readers' pool, but not in the read
    /// transaction of scans: the events API sets no statement timeout, and
    /// one statement is one round trip.
    pub async fn list_events(
        &self,
        project_id: &str,
        filter: &EventFilter,
    ) -> Result<Vec<StoredEvent>> {
        let scan = Scan {
            project_id: project_id.to_string(),
            events: filter.event.clone().map(|name| vec![name]),
            to: filter.before.clone(),
            distinct_id: filter.distinct_id.clone(),
            with_properties: true,
            ..Scan::default()
        };
        let page = Page {
            cursor: filter.cursor.as_ref(),
            after: filter.after.as_deref(),
            size: filter.limit as usize,
        };
        let rows = self
            .statement(&scan, Some(&page))
            .query()
            .fetch_all(&self.read)
            .await?;
        rows.iter()
            .map(|row| {
                let ScanRow {
                    uuid,
                    event,
                    distinct_id,
                    timestamp,
                    properties,
                    ..
                } = decode(&scan, row)?;
                Ok(StoredEvent {
                    uuid,
                    event,
                    distinct_id,
                    person_id: row.try_get(PERSON)?,
                    timestamp,
                    properties: properties
                        .and_then(|text| serde_json::from_str(&text).ok())
                        .unwrap_or(Value::Null),
                })
            })
            .collect()
    }

    /// The database's plan for `scan`, for the docs and the benchmark.
    pub async fn explain_scan(&self, scan: &Scan, paged: bool) -> Result<String> {
        let page = Page {
            cursor: None,
            after: None,
            size: 100,
        };
        let statement = self.statement(scan, paged.then_some(&page));
        let prefix = match self.backend() {
            Backend::Sqlite => "EXPLAIN QUERY PLAN ",
            Backend::Postgres => "EXPLAIN ",
        };
        let explain = Statement {
            sql: format!("{prefix}{}", statement.sql),
            binds: statement.binds,
        };
        // In the same settings as the query itself.
        let mut tx = self.read_transaction(scan.statement_timeout).await?;
        let rows = explain.query().fetch_all(&mut *tx).await?;
        let mut lines = Vec::new();
        for row in rows {
            lines.push(match self.backend() {
                // id, parent, notused, detail
                Backend::Sqlite => row.try_get::<String, _>(3)?,
                Backend::Postgres => row.try_get::<String, _>(0)?,
            });
        }
        Ok(lines.join("\n"))
    }
}

/// A row of [`Store::statement`] as a scan returns it.
fn decode(scan: &Scan, row: &AnyRow) -> Result<ScanRow> {
    let n = scan.event_paths.len() + scan.person_paths.len();
    let mut values = Vec::with_capacity(n);
    for i in 0..n {
        values.push(row.try_get::<Option<String>, _>(5 + i)?);
    }
    let distinct_id: String = row.try_get(2)?;
    Ok(ScanRow {
        uuid: row.try_get(0)?,
        event: row.try_get(1)?,
        timestamp: row.try_get(3)?,
        person_id: row
            .try_get::<Option<String>, _>(PERSON)?
            .unwrap_or_else(|| distinct_id.clone()),
        distinct_id,
        values,
        properties: if scan.with_properties {
            Some(row.try_get(5 + n)?)
        } else {
            None
        },
    })
}

/// The indexes of the events of a batch that are not stored yet, in
/// order, each (project, uuid) once: a client may send an event twice
/// in one batch, and a replayed event may already be stored.
pub(super) async fn unstored(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    backend: Backend,
    events: &[(String, QueuedEvent)],
) -> Result<Vec<usize>> {
    let mut by_project: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (project_id, event) in events {
        by_project.entry(project_id).or_default().push(&event.uuid);
    }
    let mut seen: HashSet<(String, String)> = HashSet::new();
    for (project_id, uuids) in by_project {
        for chunk in uuids.chunks(ROWS_PER_STATEMENT * 2) {
            let sql = keyed_lookup(backend, "t.uuid", "events", "uuid", chunk.len());
            let mut query = sqlx::query_scalar::<_, String>(&sql).bind(project_id);
            for uuid in chunk {
                query = query.bind(*uuid);
            }
            for uuid in query.fetch_all(&mut **tx).await? {
                seen.insert((project_id.to_string(), uuid));
            }
        }
    }
    Ok(events
        .iter()
        .enumerate()
        .filter(|(_, (project_id, event))| seen.insert((project_id.clone(), event.uuid.clone())))
        .map(|(i, _)| i)
        .collect())
}

/// Stores events as `(project_id, event, person_id, properties)`, the
/// properties already serialised.
pub(super) async fn insert(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    backend: Backend,
    rows: &[(&str, &QueuedEvent, &str, &str)],
) -> Result<()> {
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "INSERT INTO events (project_id, uuid, event, distinct_id, person_id, timestamp, received_at, properties) VALUES {}",
            values_placeholders(backend, 1, chunk.len(), 8)
        );
        let mut query = sqlx::query(&sql);
        for (project_id, event, person_id, properties) in chunk {
            query = query
                .bind(*project_id)
                .bind(event.uuid.as_str())
                .bind(event.event.as_str())
                .bind(event.distinct_id.as_str())
                .bind(*person_id)
                .bind(event.timestamp.as_str())
                .bind(event.received_at.as_str())
                .bind(*properties);
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreConfig;

    #[tokio::test]
    async fn the_events_api_leaves_its_after_bound_out_and_an_unknown_person_null() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&StoreConfig::Sqlite {
            data_dir: dir.path().into(),
        })
        .await
        .unwrap();
        let project = store.create_project("p").await.unwrap().project_id;
        // As stored before persons existed: no person, and no link.
        for (uuid, second) in [("a", 1), ("b", 2), ("c", 3)] {
            sqlx::query(
                "INSERT INTO events (project_id, uuid, event, distinct_id, timestamp, received_at, properties)
                 VALUES ($1, $2, 'e', 'u', $3, $3, '{\"n\":1}')",
            )
            .bind(&project)
            .bind(uuid)
            .bind(format!("2024-05-01T12:00:0{second}.000Z"))
            .execute(&store.pool)
            .await
            .unwrap();
        }
        let bound = "2024-05-01T12:00:01.000Z";

        let filter = EventFilter {
            after: Some(bound.into()),
            limit: 10,
            ..EventFilter::default()
        };
        let listed = store.list_events(&project, &filter).await.unwrap();
        let uuids: Vec<&str> = listed.iter().map(|e| e.uuid.as_str()).collect();
        assert_eq!(uuids, ["c", "b"]);
        assert_eq!(listed[0].person_id, None);
        assert_eq!(listed[0].properties, serde_json::json!({"n": 1}));

        let scan = Scan {
            project_id: project.clone(),
            from: Some(bound.into()),
            with_properties: true,
            statement_timeout: Duration::from_secs(5),
            ..Scan::default()
        };
        let scanned = store.scan_page(&scan, &None, 10).await.unwrap();
        let uuids: Vec<&str> = scanned.iter().map(|e| e.uuid.as_str()).collect();
        assert_eq!(uuids, ["c", "b", "a"]);
        assert_eq!(scanned[0].person_id, "u", "a scan counts the distinct id");
        store.close().await;
    }
}
