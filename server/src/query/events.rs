//! Event search: a project's events, newest first (ties by uuid), that
//! match property filters on the event or its person.

use chrono_tz::Tz;
use serde_json::{Value, json};

use super::spec::{EventsQuery, encode_cursor};
use super::{Columns, Context, QueryError, Values, check_order, resolve_date};
use crate::store::Cursor;

/// Rows read per round trip. Filters run here, so a page may yield few
/// matches; pages keep the planner on the index walk in time order.
const PAGE: usize = 500;

pub(super) async fn run(
    context: &Context<'_>,
    query: &EventsQuery,
    tz: Tz,
) -> Result<Value, QueryError> {
    // Unlike trends and funnels, a search without dates has no bounds.
    let from = query
        .range
        .from
        .as_ref()
        .map(|d| resolve_date(d, "date_from", tz, context.now))
        .transpose()?;
    let to = query
        .range
        .to
        .as_ref()
        .map(|d| resolve_date(d, "date_to", tz, context.now))
        .transpose()?;
    if let (Some(from), Some(to)) = (from, to) {
        check_order(from, to, tz)?;
    }
    let mut columns = Columns::default();
    columns.add_filters(&query.filters);
    let filters = columns.compile(&query.filters);
    let mut scan = columns.into_scan(context.scan());
    scan.events = query.event.clone().map(|e| vec![e]);
    scan.distinct_id = query.distinct_id.clone();
    scan.from = from.map(crate::model::format_timestamp);
    scan.to = to.map(crate::model::format_timestamp);
    scan.with_properties = true;

    let mut budget = context.budget();
    let mut cursor = query.cursor.clone();
    let mut results = Vec::new();
    // Set only when the search stopped at `limit` with rows left to read.
    let mut next_cursor = None;
    'pages: loop {
        let page = context.store.scan_page(&scan, &cursor, PAGE).await?;
        let last_page = page.len() < PAGE;
        let rows = page.len();
        for (i, row) in page.into_iter().enumerate() {
            if !budget.take() {
                break 'pages;
            }
            cursor = Some(Cursor {
                timestamp: row.timestamp.clone(),
                uuid: row.uuid.clone(),
            });
            if !Values::of(&row).pass(&filters) {
                continue;
            }
            let properties: Value = row
                .properties
                .as_deref()
                .and_then(|p| serde_json::from_str(p).ok())
                .unwrap_or(Value::Null);
            results.push(json!({
                "uuid": row.uuid,
                "event": row.event,
                "distinct_id": row.distinct_id,
                "person_id": row.person_id,
                "timestamp": row.timestamp,
                "properties": properties,
            }));
            if results.len() == query.limit {
                if !(last_page && i + 1 == rows) {
                    next_cursor = cursor.as_ref().map(encode_cursor);
                }
                break 'pages;
            }
        }
        if last_page {
            break;
        }
    }
    budget.finish()?;
    Ok(json!({
        "kind": "events",
        "results": results,
        "next_cursor": next_cursor,
    }))
}
