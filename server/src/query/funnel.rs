//! Funnels: how many persons did the steps in order, each within the
//! conversion window of their first step, and how long each step took.
//!
//! A person's events are ordered by timestamp, ties by uuid. Every event
//! matching the first step is a possible start; from it, each later step is
//! the first matching event after the previous step, as long as it is
//! within the window of the start. The person counts at the deepest step
//! any start reaches, and the earliest start that reaches it gives the
//! step times and (for an event-property breakdown) the breakdown value.

use chrono_tz::Tz;
use serde_json::{Value, json};

use super::spec::FunnelQuery;
use super::{
    Columns, Context, Interner, QueryError, filter, local, rank_groups, resolve_range,
    scan_passing, shown_groups,
};

struct Row {
    person: u32,
    at_ms: i64,
    uuid: String,
    /// Bit `k` is set if the event matches step `k`.
    steps: u32,
    group: u32,
}

/// Where one person got to.
struct Reached {
    depth: usize,
    /// Milliseconds from each step to the next, for the steps reached.
    gaps_ms: Vec<i64>,
    group: u32,
}

pub(super) async fn run(
    context: &Context<'_>,
    query: &FunnelQuery,
    tz: Tz,
) -> Result<Value, QueryError> {
    let (from, to) = resolve_range(&query.range, tz, context.now)?;
    let mut columns = Columns::default();
    columns.add_filters(&query.filters);
    for step in &query.steps {
        columns.add_filters(&step.filters);
    }
    if let Some(breakdown) = &query.breakdown {
        columns.add(&breakdown.property);
    }
    let global = columns.compile(&query.filters);
    let steps: Vec<_> = query
        .steps
        .iter()
        .map(|step| (step.event.clone(), columns.compile(&step.filters)))
        .collect();
    let breakdown_column = query
        .breakdown
        .as_ref()
        .map(|b| columns.column(&b.property));
    let mut scan = columns.into_scan(context.scan());
    if query.steps.iter().all(|s| s.event.is_some()) {
        let mut names: Vec<String> = query.steps.iter().filter_map(|s| s.event.clone()).collect();
        names.sort();
        names.dedup();
        scan.events = Some(names);
    }
    scan.from = Some(crate::model::format_timestamp(from));
    scan.to = Some(crate::model::format_timestamp(to));

    let mut budget = context.budget();
    let mut persons = Interner::<String>::default();
    let mut groups = Interner::<Option<String>>::default();
    let mut rows = Vec::new();
    scan_passing(context, &scan, &mut budget, &global, |row, values| {
        let mut mask = 0u32;
        for (k, (event, filters)) in steps.iter().enumerate() {
            if event.as_ref().is_none_or(|e| *e == row.event) && values.pass(filters) {
                mask |= 1 << k;
            }
        }
        if mask == 0 {
            return;
        }
        let Some(at_ms) = super::time::stored_millis(&row.timestamp) else {
            return;
        };
        let group = match breakdown_column {
            Some(column) => groups.id(values.get(column).map(filter::as_text)),
            None => 0,
        };
        rows.push(Row {
            person: persons.id(row.person_id),
            at_ms,
            uuid: row.uuid,
            steps: mask,
            group,
        });
    })
    .await?;

    let step_count = query.steps.len();
    let window_ms = query.window_ms;
    // Sorting and walking a million rows is CPU work: off the async threads.
    let mut reached = tokio::task::spawn_blocking(move || {
        rows.sort_unstable_by(|a, b| {
            (a.person, a.at_ms, &a.uuid).cmp(&(b.person, b.at_ms, &b.uuid))
        });
        let mut reached = Vec::new();
        for person_rows in rows.chunk_by(|a, b| a.person == b.person) {
            if let Some(r) = walk(person_rows, step_count, window_ms) {
                reached.push(r);
            }
        }
        reached
    })
    .await
    .expect("the funnel walk does not panic");

    let group_labels = groups.keys;
    let results = match &query.breakdown {
        None => vec![funnel_result(query, &reached, |_| true, None)],
        Some(breakdown) => {
            // Only values that start a funnel are shown: one seen on a
            // later step alone has nothing to count.
            let mut used = Interner::<Option<String>>::default();
            for r in &mut reached {
                r.group = used.id(group_labels[r.group as usize].clone());
            }
            let labels = used.keys;
            let mut starts = vec![0f64; labels.len()];
            for r in &reached {
                starts[r.group as usize] += 1.0;
            }
            let (place, shown) = rank_groups(&labels, &starts, breakdown.limit);
            let mut results: Vec<Value> = shown_groups(&place, shown)
                .into_iter()
                .map(|group| {
                    let chosen = group as u32;
                    funnel_result(query, &reached, |r| r.group == chosen, Some(&labels[group]))
                })
                .collect();
            if labels.len() > shown {
                let mut other =
                    funnel_result(query, &reached, |r| place[r.group as usize] == shown, None);
                other["breakdown_value"] = Value::Null;
                other["other"] = Value::Bool(true);
                results.push(other);
            }
            results
        }
    };
    Ok(json!({
        "kind": "funnel",
        "timezone": tz.name(),
        "date_from": local(from, tz),
        "date_to": local(to, tz),
        "conversion_window_seconds": query.window_ms / 1000,
        "results": results,
    }))
}

/// The deepest step one person's events reach, from the earliest start that
/// reaches it.
fn walk(rows: &[Row], step_count: usize, window_ms: i64) -> Option<Reached> {
    let n = rows.len();
    // next[k * (n + 1) + i]: the first row at or after i matching step k,
    // or n; it makes each start cost one jump per step.
    let mut next = vec![n as u32; step_count * (n + 1)];
    for k in 0..step_count {
        let base = k * (n + 1);
        for i in (0..n).rev() {
            next[base + i] = if rows[i].steps & (1 << k) != 0 {
                i as u32
            } else {
                next[base + i + 1]
            };
        }
    }
    let mut best: Option<(usize, Vec<usize>)> = None;
    for start in 0..n {
        if rows[start].steps & 1 == 0 {
            continue;
        }
        let mut matched = vec![start];
        let mut position = start;
        for k in 1..step_count {
            let j = next[k * (n + 1) + position + 1] as usize;
            if j == n || rows[j].at_ms - rows[start].at_ms > window_ms {
                break;
            }
            matched.push(j);
            position = j;
        }
        if best
            .as_ref()
            .is_none_or(|(depth, _)| matched.len() > *depth)
        {
            let depth = matched.len();
            best = Some((depth, matched));
            if depth == step_count {
                break;
            }
        }
    }
    let (depth, matched) = best?;
    Some(Reached {
        depth,
        gaps_ms: matched
            .windows(2)
            .map(|w| rows[w[1]].at_ms - rows[w[0]].at_ms)
            .collect(),
        group: rows[matched[0]].group,
    })
}

fn median(sorted: &[f64]) -> Option<f64> {
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

fn funnel_result(
    query: &FunnelQuery,
    reached: &[Reached],
    include: impl Fn(&Reached) -> bool,
    breakdown: Option<&Option<String>>,
) -> Value {
    let step_count = query.steps.len();
    let mut counts = vec![0u64; step_count];
    let mut gaps: Vec<Vec<f64>> = vec![Vec::new(); step_count];
    for r in reached.iter().filter(|r| include(r)) {
        for count in counts.iter_mut().take(r.depth) {
            *count += 1;
        }
        for (k, gap) in r.gaps_ms.iter().enumerate() {
            gaps[k + 1].push(*gap as f64 / 1000.0);
        }
    }
    let first = counts[0];
    let steps: Vec<Value> = query
        .steps
        .iter()
        .enumerate()
        .map(|(k, step)| {
            let times = &mut gaps[k];
            times.sort_by(f64::total_cmp);
            let average = (!times.is_empty())
                .then(|| times.iter().sum::<f64>() / times.len() as f64);
            let rate = |n: u64, of: u64| if of == 0 { 0.0 } else { n as f64 / of as f64 };
            json!({
                "step": k + 1,
                "label": step.label,
                "event": step.event,
                "count": counts[k],
                "conversion_rate": rate(counts[k], first),
                "conversion_rate_from_previous": if k == 0 { rate(counts[0], first) } else { rate(counts[k], counts[k - 1]) },
                "median_conversion_time_seconds": median(times),
                "average_conversion_time_seconds": average,
            })
        })
        .collect();
    let mut result = json!({ "steps": steps });
    if let Some(value) = breakdown {
        result["breakdown_value"] = value.clone().map_or(Value::Null, Value::from);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(at_ms: i64, steps: u32) -> Row {
        Row {
            person: 0,
            at_ms,
            uuid: format!("{at_ms:08}"),
            steps,
            group: 0,
        }
    }

    #[test]
    fn the_deepest_start_wins_and_ties_go_to_the_earliest() {
        // Step 1 at 0 reaches step 2 at 50 but step 3 only at 200, outside
        // a window of 100; the start at 120 reaches all three.
        let rows = [row(0, 1), row(50, 2), row(120, 1), row(150, 2), row(200, 4)];
        let reached = walk(&rows, 3, 100).unwrap();
        assert_eq!(reached.depth, 3);
        assert_eq!(reached.gaps_ms, vec![30, 50]);
        let rows = [row(0, 1), row(10, 2), row(20, 1), row(25, 2)];
        let reached = walk(&rows, 3, 100).unwrap();
        assert_eq!(reached.depth, 2);
        assert_eq!(reached.gaps_ms, vec![10]);
    }

    #[test]
    fn one_event_is_one_step() {
        // The same event name for two steps needs two events.
        let rows = [row(0, 3)];
        assert_eq!(walk(&rows, 2, 100).unwrap().depth, 1);
        let rows = [row(0, 3), row(5, 3)];
        assert_eq!(walk(&rows, 2, 100).unwrap().depth, 2);
        assert!(walk(&[row(0, 2)], 2, 100).is_none());
    }

    #[test]
    fn medians_of_even_counts_average_the_middle_two() {
        assert_eq!(median(&[1.0, 2.0, 3.0, 10.0]), Some(2.5));
        assert_eq!(median(&[1.0, 2.0, 30.0]), Some(2.0));
        assert_eq!(median(&[]), None);
    }
}
