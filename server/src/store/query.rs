//! The one read that analytics queries make: a project's events in a time
//! range, optionally of some event names, each with its person resolved
//! through merges as of now and with the properties the query needs
//! extracted as JSON text. Every statement starts with `project_id`, so it
//! walks only that project's part of an index (`events_by_name` with names,
//! `events_by_time` without).
//!
//! Only what both backends agree on happens in SQL: index range scans,
//! joins and JSON extraction. Filters and arithmetic happen in the caller,
//! identically for both.

use std::time::Duration;

use futures::TryStreamExt;
use sqlx::Row;

use super::{Backend, Result, Store};

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

/// Adds a bound value and returns its placeholder.
fn bind(binds: &mut Vec<String>, value: String) -> String {
    binds.push(value);
    format!("${}", binds.len())
}

struct Statement {
    sql: String,
    binds: Vec<String>,
}

impl Store {
    fn scan_statement(&self, scan: &Scan, page: Option<(&Option<Cursor>, usize)>) -> Statement {
        let mut binds = vec![scan.project_id.clone()];
        let mut columns = String::from(
            "e.uuid, e.event, e.distinct_id, e.timestamp,
             COALESCE(pd.person_id, e.person_id, e.distinct_id) AS person_id",
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
        if let Some((cursor, size)) = page {
            if let Some(cursor) = cursor {
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
                " ORDER BY e.timestamp DESC, e.uuid DESC LIMIT {size}"
            ));
        }
        Statement { sql, binds }
    }

    fn row(scan: &Scan, row: &sqlx::any::AnyRow) -> Result<ScanRow> {
        let n = scan.event_paths.len() + scan.person_paths.len();
        let mut values = Vec::with_capacity(n);
        for i in 0..n {
            values.push(row.try_get::<Option<String>, _>(5 + i)?);
        }
        Ok(ScanRow {
            uuid: row.try_get(0)?,
            event: row.try_get(1)?,
            distinct_id: row.try_get(2)?,
            timestamp: row.try_get(3)?,
            person_id: row.try_get(4)?,
            values,
            properties: if scan.with_properties {
                Some(row.try_get(5 + n)?)
            } else {
                None
            },
        })
    }

    async fn read_transaction(
        &self,
        timeout: Duration,
    ) -> Result<sqlx::Transaction<'static, sqlx::Any>> {
        let mut tx = self.pool.begin().await?;
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
        let statement = self.scan_statement(scan, None);
        let mut tx = self.read_transaction(scan.statement_timeout).await?;
        {
            let mut query = sqlx::query(&statement.sql);
            for value in &statement.binds {
                query = query.bind(value);
            }
            let mut rows = query.fetch(&mut *tx);
            while let Some(row) = rows.try_next().await? {
                if !each(Self::row(scan, &row)?) {
                    break;
                }
            }
        }
        tx.rollback().await
    }

    /// One page of `scan`'s events, newest first (ties by uuid), after
    /// `cursor`.
    pub async fn scan_page(
        &self,
        scan: &Scan,
        cursor: &Option<Cursor>,
        size: usize,
    ) -> Result<Vec<ScanRow>> {
        let statement = self.scan_statement(scan, Some((cursor, size)));
        let mut tx = self.read_transaction(scan.statement_timeout).await?;
        let mut query = sqlx::query(&statement.sql);
        for value in &statement.binds {
            query = query.bind(value);
        }
        let rows = query.fetch_all(&mut *tx).await?;
        tx.rollback().await?;
        rows.iter().map(|row| Self::row(scan, row)).collect()
    }

    /// The database's plan for `scan`, for the docs and the benchmark.
    pub async fn explain_scan(&self, scan: &Scan, paged: bool) -> Result<String> {
        let none = None;
        let statement = self.scan_statement(scan, paged.then_some((&none, 100)));
        let prefix = match self.backend() {
            Backend::Sqlite => "EXPLAIN QUERY PLAN ",
            Backend::Postgres => "EXPLAIN ",
        };
        let sql = format!("{prefix}{}", statement.sql);
        let mut query = sqlx::query(&sql);
        for value in &statement.binds {
            query = query.bind(value);
        }
        // In the same settings as the query itself.
        let mut tx = self.read_transaction(scan.statement_timeout).await?;
        let rows = query.fetch_all(&mut *tx).await?;
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

    pub async fn set_project_timezone(&self, project_id: &str, timezone: &str) -> Result<()> {
        let (mut tx, _turn) = self.write().await?;
        sqlx::query("UPDATE projects SET timezone = $1 WHERE id = $2")
            .bind(timezone)
            .bind(project_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await
    }

    /// A project's name and time zone.
    pub async fn project(&self, project_id: &str) -> Result<Option<(String, String)>> {
        let row = sqlx::query("SELECT name, timezone FROM projects WHERE id = $1")
            .bind(project_id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .transpose()
    }
}
