//! Trends: per series, a number for each interval (events, unique persons,
//! or the sum, average, minimum or maximum of a numeric property),
//! optionally broken down by a property into its top values and "other".

use std::collections::HashSet;

use chrono_tz::Tz;
use serde_json::{Map, Value, json};

use super::spec::{Math, Series, TrendsQuery};
use super::time::Buckets;
use super::{
    Budget, Columns, Context, Interner, MAX_BUCKETS, QueryError, filter, invalid, json_number,
    local, rank_groups, resolve_range, scan_passing, shown_groups,
};

/// One counted event.
struct Point {
    bucket: u32,
    group: u32,
    person: u32,
    /// The math property's value; 0 for total and unique users.
    value: f64,
}

/// What an aggregate is computed from.
#[derive(Default, Clone)]
struct Acc {
    count: u64,
    persons: HashSet<u32>,
    values: Vec<f64>,
}

impl Acc {
    fn add(&mut self, math: &Math, point: &Point) {
        match math {
            Math::Total => self.count += 1,
            Math::UniqueUsers => {
                self.persons.insert(point.person);
            }
            _ => self.values.push(point.value),
        }
    }

    fn result(&mut self, math: &Math) -> f64 {
        match math {
            Math::Total => self.count as f64,
            Math::UniqueUsers => self.persons.len() as f64,
            Math::Sum(_) | Math::Avg(_) => {
                // Summed in sorted order: floating-point addition depends
                // on order, and rows arrive in whatever order the backend
                // scans them.
                self.values.sort_by(f64::total_cmp);
                let sum: f64 = self.values.iter().sum();
                match (math, self.values.len()) {
                    (Math::Sum(_), _) => sum,
                    (_, 0) => 0.0,
                    (_, n) => sum / n as f64,
                }
            }
            Math::Min(_) => self.values.iter().copied().reduce(f64::min).unwrap_or(0.0),
            Math::Max(_) => self.values.iter().copied().reduce(f64::max).unwrap_or(0.0),
        }
    }
}

pub(super) async fn run(
    context: &Context<'_>,
    query: &TrendsQuery,
    tz: Tz,
) -> Result<Value, QueryError> {
    let (from, to) = resolve_range(&query.range, tz, context.now)?;
    let buckets = Buckets::new(query.interval, tz, from, to, MAX_BUCKETS).ok_or_else(|| {
        invalid(
            "interval",
            format!(
                "`interval` {} gives more than {MAX_BUCKETS} intervals from {} to {}; use a longer interval or a shorter range",
                query.interval.name(),
                local(from, tz),
                local(to, tz)
            ),
        )
    })?;
    // One budget for the whole query, however many series it has.
    let mut budget = context.budget();
    let mut results = Vec::new();
    for (index, series) in query.series.iter().enumerate() {
        let points = scan_series(context, &mut budget, query, series, &buckets, from, to).await?;
        results.extend(aggregate(query, series, index, points, buckets.len()));
    }
    Ok(json!({
        "kind": "trends",
        "interval": query.interval.name(),
        "timezone": tz.name(),
        "date_from": local(from, tz),
        "date_to": local(to, tz),
        "labels": buckets.labels(),
        "results": results,
    }))
}

struct Scanned {
    points: Vec<Point>,
    groups: Vec<Option<String>>,
}

async fn scan_series(
    context: &Context<'_>,
    budget: &mut Budget,
    query: &TrendsQuery,
    series: &Series,
    buckets: &Buckets,
    from: chrono::DateTime<chrono::Utc>,
    to: chrono::DateTime<chrono::Utc>,
) -> Result<Scanned, QueryError> {
    let mut columns = Columns::default();
    columns.add_filters(&query.filters);
    columns.add_filters(&series.filters);
    if let Some(property) = series.math.property() {
        columns.add(property);
    }
    if let Some(breakdown) = &query.breakdown {
        columns.add(&breakdown.property);
    }
    let filters: Vec<_> = columns
        .compile(&query.filters)
        .into_iter()
        .chain(columns.compile(&series.filters))
        .collect();
    let math_column = series.math.property().map(|p| columns.column(p));
    let breakdown_column = query
        .breakdown
        .as_ref()
        .map(|b| columns.column(&b.property));
    let mut scan = columns.into_scan(context.scan());
    scan.events = series.event.clone().map(|e| vec![e]);
    scan.from = Some(crate::model::format_timestamp(from));
    scan.to = Some(crate::model::format_timestamp(to));

    let mut persons = Interner::<String>::default();
    let mut groups = Interner::<Option<String>>::default();
    let mut points = Vec::new();
    scan_passing(context, &scan, budget, &filters, |row, values| {
        let value = match math_column {
            Some(column) => match values.get(column).and_then(filter::as_number) {
                Some(n) => n,
                None => return, // nothing to sum or average
            },
            None => 0.0,
        };
        let Some(bucket) = buckets.index_of(&row.timestamp) else {
            return;
        };
        let group = match breakdown_column {
            Some(column) => groups.id(values.get(column).map(filter::as_text)),
            None => 0,
        };
        points.push(Point {
            bucket: bucket as u32,
            group,
            person: persons.id(row.person_id),
            value,
        });
    })
    .await?;
    Ok(Scanned {
        points,
        groups: groups.keys,
    })
}

fn aggregate(
    query: &TrendsQuery,
    series: &Series,
    index: usize,
    scanned: Scanned,
    bucket_count: usize,
) -> Vec<Value> {
    let math = &series.math;
    let Some(breakdown) = &query.breakdown else {
        let mut total = Acc::default();
        let mut per_bucket = vec![Acc::default(); bucket_count];
        for point in &scanned.points {
            total.add(math, point);
            per_bucket[point.bucket as usize].add(math, point);
        }
        let mut result = series_result(series, index, &mut per_bucket, &mut total);
        result.shift_remove("breakdown_value");
        return vec![Value::Object(result)];
    };
    // First each value's aggregate over the whole range, to rank them.
    let mut overall = vec![Acc::default(); scanned.groups.len()];
    for point in &scanned.points {
        overall[point.group as usize].add(math, point);
    }
    let scores: Vec<f64> = overall.iter_mut().map(|acc| acc.result(math)).collect();
    drop(overall);
    let (place, shown) = rank_groups(&scanned.groups, &scores, breakdown.limit);
    let has_other = scanned.groups.len() > shown;
    let places = shown + usize::from(has_other);
    let mut totals = vec![Acc::default(); places];
    let mut per_bucket = vec![vec![Acc::default(); bucket_count]; places];
    for point in &scanned.points {
        let place = place[point.group as usize];
        totals[place].add(math, point);
        per_bucket[place][point.bucket as usize].add(math, point);
    }
    let labels = shown_groups(&place, shown);
    let mut results = Vec::with_capacity(places);
    for (rank, (buckets, total)) in per_bucket.iter_mut().zip(totals.iter_mut()).enumerate() {
        let mut result = series_result(series, index, buckets, total);
        if rank < shown {
            result.insert(
                "breakdown_value".into(),
                scanned.groups[labels[rank]].clone().into(),
            );
        } else {
            result.insert("breakdown_value".into(), Value::Null);
            result.insert("other".into(), Value::Bool(true));
        }
        results.push(Value::Object(result));
    }
    results
}

fn series_result(
    series: &Series,
    index: usize,
    buckets: &mut [Acc],
    total: &mut Acc,
) -> Map<String, Value> {
    let math = &series.math;
    let data: Vec<Value> = buckets
        .iter_mut()
        .map(|acc| json_number(acc.result(math)))
        .collect();
    let mut result = Map::new();
    result.insert("series".into(), index.into());
    result.insert("label".into(), series.label.clone().into());
    result.insert(
        "event".into(),
        series.event.clone().map_or(Value::Null, Value::from),
    );
    result.insert("math".into(), math.name().into());
    result.insert("breakdown_value".into(), Value::Null);
    result.insert("data".into(), data.into());
    result.insert("total".into(), json_number(total.result(math)));
    result
}
