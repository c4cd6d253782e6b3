//! Analytics queries over a project's stored events: trends, funnels and
//! event search (`POST /api/projects/{id}/query`).
//!
//! The store streams the rows a query needs through an index range scan
//! (`store::Scan`); filters, bucketing and arithmetic happen here, in one
//! implementation, so SQLite and PostgreSQL give identical answers. Each
//! query is bounded by a row budget and a deadline, checked as rows arrive,
//! and holds a [`QuerySlot`] while it runs (see `slots`); it reads on the
//! store's analytics readers, apart from the write path.

mod events;
mod filter;
mod funnel;
mod slots;
pub mod spec;
pub mod time;
mod trends;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde_json::Value;

pub use slots::{NoSlot, QuerySlot, QuerySlots, WAIT_FOR_A_SLOT};
pub use spec::Query;

use crate::store::{Scan, ScanRow, Store};
use spec::{DateRange, Filter, Operator, PropertyRef, Source};
use time::DateSpec;

/// Why a query got no answer.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The query is malformed; `attr` is the field at fault, as a path
    /// such as `series[0].properties[1].operator`.
    #[error("{message}")]
    Invalid { attr: String, message: String },
    #[error(
        "the query read more than {limit} events, the server's limit per query; narrow date_from/date_to or name the events (the operator sets the limit with --query-max-rows)"
    )]
    TooManyRows { limit: u64 },
    #[error(
        "the query ran longer than {seconds} s, the server's limit per query; narrow date_from/date_to or name the events (the operator sets the limit with --query-timeout-seconds)"
    )]
    Timeout { seconds: f64 },
    #[error("internal error")]
    Store(#[from] crate::store::Error),
}

/// What one query may cost.
#[derive(Clone, Copy, Debug)]
pub struct QueryLimits {
    pub timeout: Duration,
    /// Most events one query may read from the store.
    pub max_rows: u64,
}

impl Default for QueryLimits {
    fn default() -> Self {
        QueryLimits {
            timeout: Duration::from_secs(30),
            max_rows: 5_000_000,
        }
    }
}

/// Most intervals one trend has: an hourly trend of a year fits.
pub const MAX_BUCKETS: usize = 10_000;

/// Runs a query on a project, as of `now`.
pub async fn run(
    store: &Store,
    project_id: &str,
    query: &Query,
    limits: QueryLimits,
    now: DateTime<Utc>,
) -> Result<Value, QueryError> {
    let project_tz = store
        .project(project_id)
        .await?
        .and_then(|(_, timezone)| spec::parse_tz(&timezone))
        .unwrap_or(Tz::UTC);
    let context = Context {
        store,
        project_id,
        now,
        budget_limits: limits,
        started: Instant::now(),
    };
    let work = async {
        match query {
            Query::Trends(q) => trends::run(&context, q, q.timezone.unwrap_or(project_tz)).await,
            Query::Funnel(q) => funnel::run(&context, q, q.timezone.unwrap_or(project_tz)).await,
            Query::Events(q) => events::run(&context, q, q.timezone.unwrap_or(project_tz)).await,
        }
    };
    let timeout = QueryError::Timeout {
        seconds: limits.timeout.as_secs_f64(),
    };
    match tokio::time::timeout(limits.timeout, work).await {
        // The database cancelled a statement at `statement_timeout`.
        Ok(Err(QueryError::Store(crate::store::Error::Timeout(_)))) => Err(timeout),
        Ok(result) => result,
        Err(_) => Err(timeout),
    }
}

/// What every kind of query runs with.
struct Context<'a> {
    store: &'a Store,
    project_id: &'a str,
    now: DateTime<Utc>,
    budget_limits: QueryLimits,
    started: Instant,
}

impl Context<'_> {
    fn scan(&self) -> Scan {
        Scan {
            project_id: self.project_id.to_string(),
            statement_timeout: self.budget_limits.timeout,
            ..Scan::default()
        }
    }

    fn budget(&self) -> Budget {
        Budget {
            limits: self.budget_limits,
            deadline: self.started + self.budget_limits.timeout,
            seen: 0,
            exceeded: None,
        }
    }
}

/// Counts the rows a query reads and watches its deadline.
struct Budget {
    limits: QueryLimits,
    deadline: Instant,
    seen: u64,
    exceeded: Option<QueryError>,
}

impl Budget {
    /// Whether one more row may be read.
    fn take(&mut self) -> bool {
        self.seen += 1;
        if self.seen > self.limits.max_rows {
            self.exceeded = Some(QueryError::TooManyRows {
                limit: self.limits.max_rows,
            });
            return false;
        }
        // The clock is cheap but not free; look at it every so often.
        if self.seen % 256 == 1 && Instant::now() > self.deadline {
            self.exceeded = Some(QueryError::Timeout {
                seconds: self.limits.timeout.as_secs_f64(),
            });
            return false;
        }
        true
    }

    fn finish(&mut self) -> Result<(), QueryError> {
        self.exceeded.take().map_or(Ok(()), Err)
    }
}

/// The properties a query reads, each extracted once per row however many
/// filters use it.
#[derive(Default)]
struct Columns {
    event: Vec<Vec<String>>,
    person: Vec<Vec<String>>,
}

/// Where a property's value sits in a row, once the columns are fixed.
#[derive(Clone, Copy, Debug)]
struct Column(usize);

impl Columns {
    fn add(&mut self, property: &PropertyRef) {
        let list = match property.source {
            Source::Event => &mut self.event,
            Source::Person => &mut self.person,
        };
        if !list.contains(&property.path) {
            list.push(property.path.clone());
        }
    }

    fn add_filters(&mut self, filters: &[Filter]) {
        for filter in filters {
            self.add(&filter.property);
        }
    }

    fn column(&self, property: &PropertyRef) -> Column {
        let position = |list: &Vec<Vec<String>>| {
            list.iter()
                .position(|p| *p == property.path)
                .expect("every property was added before its column is asked for")
        };
        Column(match property.source {
            Source::Event => position(&self.event),
            Source::Person => self.event.len() + position(&self.person),
        })
    }

    fn compile(&self, filters: &[Filter]) -> Vec<(Column, Operator)> {
        filters
            .iter()
            .map(|f| (self.column(&f.property), f.operator.clone()))
            .collect()
    }

    fn into_scan(self, mut scan: Scan) -> Scan {
        scan.event_paths = self.event;
        scan.person_paths = self.person;
        scan
    }
}

/// Property values of one row, parsed once each.
struct Values(Vec<Option<Value>>);

impl Values {
    fn of(row: &ScanRow) -> Values {
        Values(
            row.values
                .iter()
                .map(|v| filter::parse_value(v.as_deref()))
                .collect(),
        )
    }

    fn get(&self, column: Column) -> Option<&Value> {
        self.0[column.0].as_ref()
    }

    fn pass(&self, filters: &[(Column, Operator)]) -> bool {
        filters
            .iter()
            .all(|(column, op)| filter::matches(op, self.get(*column)))
    }
}

fn invalid(attr: &str, message: impl Into<String>) -> QueryError {
    QueryError::Invalid {
        attr: attr.to_string(),
        message: message.into(),
    }
}

/// The instants a range stands for, by default the last 7 days up to now.
fn resolve_range(
    range: &DateRange,
    tz: Tz,
    now: DateTime<Utc>,
) -> Result<(DateTime<Utc>, DateTime<Utc>), QueryError> {
    let from = range
        .from
        .clone()
        .unwrap_or(DateSpec::Relative(7, time::RelativeUnit::Day));
    let to = range.to.clone().unwrap_or(DateSpec::Now);
    let from = resolve_date(&from, "date_from", tz, now)?;
    let to = resolve_date(&to, "date_to", tz, now)?;
    check_order(from, to, tz)?;
    Ok((from, to))
}

/// `attr` is `date_from` or `date_to`; a bare date as `date_to` means the
/// end of that day.
fn resolve_date(
    spec: &DateSpec,
    attr: &str,
    tz: Tz,
    now: DateTime<Utc>,
) -> Result<DateTime<Utc>, QueryError> {
    spec.resolve(tz, now, attr == "date_to")
        .ok_or_else(|| invalid(attr, format!("`{attr}` is out of range")))
}

fn check_order(from: DateTime<Utc>, to: DateTime<Utc>, tz: Tz) -> Result<(), QueryError> {
    if to <= from {
        return Err(invalid(
            "date_to",
            format!(
                "`date_to` ({}) must be after `date_from` ({})",
                local(to, tz),
                local(from, tz)
            ),
        ));
    }
    Ok(())
}

/// Streams `scan`'s rows that pass `filters` to `each`, within `budget`.
async fn scan_passing(
    context: &Context<'_>,
    scan: &Scan,
    budget: &mut Budget,
    filters: &[(Column, Operator)],
    mut each: impl FnMut(ScanRow, &Values),
) -> Result<(), QueryError> {
    context
        .store
        .scan_events(scan, |row| {
            if !budget.take() {
                return false;
            }
            let values = Values::of(&row);
            if values.pass(filters) {
                each(row, &values);
            }
            true
        })
        .await?;
    budget.finish()
}

fn local(at: DateTime<Utc>, tz: Tz) -> String {
    at.with_timezone(&tz)
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// A JSON number: whole values as integers, so a sum of whole amounts
/// reads `30`, not `30.0`.
fn json_number(n: f64) -> Value {
    if n.fract() == 0.0 && n.abs() < 9.007_199_254_740_992e15 {
        Value::from(n as i64)
    } else {
        Value::from(n)
    }
}

/// Gives each distinct string a small number, so rows hold numbers.
#[derive(Default)]
struct Interner<K> {
    ids: HashMap<K, u32>,
    keys: Vec<K>,
}

impl<K: std::hash::Hash + Eq + Clone> Interner<K> {
    fn id(&mut self, key: K) -> u32 {
        if let Some(id) = self.ids.get(&key) {
            return *id;
        }
        let id = self.keys.len() as u32;
        self.ids.insert(key.clone(), id);
        self.keys.push(key);
        id
    }
}

/// Picks the breakdown values shown on their own: the `limit` with the
/// largest `score`, ties by value (not set last), so the choice is the same
/// on every backend. Returns, for each group id, its place in the output,
/// with the rest mapped to one "other" place after them.
fn rank_groups(labels: &[Option<String>], scores: &[f64], limit: usize) -> (Vec<usize>, usize) {
    let mut order: Vec<usize> = (0..labels.len()).collect();
    order.sort_by(|&a, &b| {
        scores[b]
            .total_cmp(&scores[a])
            .then_with(|| match (&labels[a], &labels[b]) {
                (Some(x), Some(y)) => x.cmp(y),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (None, None) => std::cmp::Ordering::Equal,
            })
    });
    let shown = order.len().min(limit);
    let mut place = vec![shown; labels.len()];
    for (rank, group) in order.iter().take(shown).enumerate() {
        place[*group] = rank;
    }
    (place, shown)
}

/// The ids of groups in output order, for labelling.
fn shown_groups(place: &[usize], shown: usize) -> Vec<usize> {
    let mut groups = vec![0; shown];
    for (group, rank) in place.iter().enumerate() {
        if *rank < shown {
            groups[*rank] = group;
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breakdown_ranking_is_by_score_then_value() {
        let labels = vec![
            Some("b".to_string()),
            None,
            Some("a".to_string()),
            Some("c".to_string()),
        ];
        let (place, shown) = rank_groups(&labels, &[5.0, 5.0, 5.0, 9.0], 3);
        assert_eq!(shown, 3);
        assert_eq!(place, vec![2, 3, 1, 0]);
        assert_eq!(shown_groups(&place, shown), vec![3, 2, 0]);
    }

    #[test]
    fn the_budget_stops_at_its_row_limit() {
        let mut budget = Budget {
            limits: QueryLimits {
                timeout: Duration::from_secs(60),
                max_rows: 3,
            },
            deadline: Instant::now() + Duration::from_secs(60),
            seen: 0,
            exceeded: None,
        };
        assert!(budget.take() && budget.take() && budget.take());
        assert!(!budget.take());
        assert!(matches!(
            budget.finish(),
            Err(QueryError::TooManyRows { limit: 3 })
        ));
    }
}
