//! Analytics queries against the real server on SQLite and PostgreSQL.
//!
//! A generated dataset (fixed seed, over 50,000 events across 60 days, with
//! identify and alias merges) goes in through the capture API on both
//! backends. A suite of trends, breakdown, funnel and event-search queries
//! must give byte-identical answers on both, and the same numbers as a
//! plain in-memory computation over the generated events written here,
//! apart from the server.

use crate::common;
use crate::common::server::{TestServer, wait_until};

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Datelike, TimeZone, Utc};
use chrono_tz::Tz;
use serde_json::{Value, json};
use sluice::query::QueryLimits;
use sluice::server::ServeConfig;
use sluice::store::{Backend, CreatedProject, StoreConfig};

const TZ: Tz = chrono_tz::America::New_York;

async fn start(backend: Backend, limits: QueryLimits) -> TestServer {
    TestServer::start_in(TZ.name(), backend, |config| ServeConfig {
        query_limits: limits,
        ..config
    })
    .await
}

/// A server whose project has stored `events`.
async fn start_with_events(backend: Backend, limits: QueryLimits, events: &[Value]) -> TestServer {
    let server = start(backend, limits).await;
    server
        .capture_events(&server.project.capture_token, events)
        .await;
    server.wait_stored(events.len()).await;
    server
}

impl TestServer {
    async fn capture_events(&self, token: &str, events: &[Value]) {
        for chunk in events.chunks(1000) {
            let response = self
                .client
                .post(format!("{}/batch", self.base))
                .header("content-type", "application/json")
                .body(serde_json::to_vec(&json!({"api_key": token, "batch": chunk})).unwrap())
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
        }
    }

    async fn query_as(&self, project: &CreatedProject, key: &str, query: &Value) -> (u16, Value) {
        let response = self
            .client
            .post(format!(
                "{}/api/projects/{}/query",
                self.base, project.project_id
            ))
            .bearer_auth(key)
            .header("content-type", "application/json")
            .body(serde_json::to_vec(query).unwrap())
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn query(&self, query: &Value) -> Value {
        let (status, body) = self
            .query_as(&self.project, &self.project.api_key, query)
            .await;
        assert_eq!(status, 200, "{query} gave {body}");
        body
    }

    /// Waits, through the events list (which query limits do not bound),
    /// until at least `n` events are stored.
    async fn wait_stored(&self, n: usize) {
        wait_until(&format!("{n} events to be stored"), || async {
            let page = self
                .call_api(reqwest::Method::GET, "/events?limit=1000", None)
                .await
                .1;
            (page["results"].as_array().unwrap().len() >= n).then_some(())
        })
        .await
    }

    /// Waits until the pipeline has stored `n` events of the project.
    async fn wait_for_count(&self, n: u64) {
        let count = json!({"kind": "trends", "series": [{}], "interval": "month",
                           "date_from": "2026-01-01", "date_to": "2026-12-31"});
        let stored = wait_until(&format!("{n} events to be stored"), || async {
            let stored = self.query(&count).await["results"][0]["total"]
                .as_u64()
                .unwrap();
            (stored >= n).then_some(stored)
        })
        .await;
        assert_eq!(stored, n, "more events were stored than captured");
    }
}

// ---------------------------------------------------------------------------
// The dataset.

/// splitmix64: a fixed seed gives the same events on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn uuid(&mut self) -> String {
        let a = self.next();
        let b = self.next();
        let hex = format!("{a:016x}{b:016x}");
        format!(
            "{}-{}-4{}-8{}-{}",
            &hex[0..8],
            &hex[8..12],
            &hex[13..16],
            &hex[17..20],
            &hex[20..32]
        )
    }
}

const BROWSERS: [&str; 8] = [
    "Chrome", "Safari", "Firefox", "Edge", "Opera", "Brave", "Vivaldi", "Arc",
];
const PLANS: [&str; 3] = ["free", "pro", "enterprise"];
const SECTIONS: [&str; 3] = ["docs", "pricing", "blog"];

/// An event as generated, before the server sees it.
#[derive(Clone, Debug)]
struct Generated {
    uuid: String,
    event: String,
    distinct_id: String,
    at: DateTime<Utc>,
    properties: serde_json::Map<String, Value>,
}

impl Generated {
    fn json(&self) -> Value {
        json!({
            "uuid": self.uuid,
            "event": self.event,
            "distinct_id": self.distinct_id,
            "timestamp": self.at.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
            "properties": self.properties,
        })
    }

    fn prop(&self, path: &[&str]) -> Option<&Value> {
        let mut value = self.properties.get(path[0])?;
        for key in &path[1..] {
            value = value.as_object()?.get(*key)?;
        }
        (!value.is_null()).then_some(value)
    }

    fn text(&self, path: &[&str]) -> Option<String> {
        self.prop(path).map(|v| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
    }

    fn number(&self, path: &[&str]) -> Option<f64> {
        match self.prop(path)? {
            Value::Number(n) => n.as_f64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }
    }
}

fn start_of_data() -> DateTime<Utc> {
    TZ.with_ymd_and_hms(2026, 9, 20, 0, 0, 0).unwrap().to_utc()
}

const DAYS: i64 = 60;

fn generate() -> Vec<Generated> {
    let mut rng = Rng(0x5eed_2026);
    let span_ms = DAYS * 86_400_000;
    let mut events = Vec::new();
    for user in 0..1600u64 {
        let anon = format!("anon-{user}");
        let identified = format!("user-{user}");
        let second_device = format!("device2-{user}");
        let plan = PLANS[rng.below(3) as usize];
        // A skewed spread of browsers, so a top five leaves an "other".
        let browser = BROWSERS[(rng.below(36) as f64).sqrt() as usize % BROWSERS.len()];
        let identifies = rng.chance(70);
        let aliases = identifies && rng.chance(15);
        let count = 20 + rng.below(26);
        let mut times: Vec<i64> = (0..count)
            .map(|_| rng.below(span_ms as u64) as i64)
            .collect();
        times.sort();
        let identify_at = times[rng.below(count) as usize];
        let start = start_of_data();
        let mut user_events = Vec::new();
        let mut push =
            |event: &str, distinct_id: &str, at_ms: i64, properties: Value, rng: &mut Rng| {
                user_events.push(Generated {
                    uuid: rng.uuid(),
                    event: event.into(),
                    distinct_id: distinct_id.into(),
                    at: start + chrono::Duration::milliseconds(at_ms),
                    properties: properties.as_object().unwrap().clone(),
                });
            };
        let mut signed_up = false;
        for (i, at_ms) in times.iter().copied().enumerate() {
            let after_identify = identifies && at_ms >= identify_at;
            let distinct_id = if aliases && i % 4 == 3 {
                second_device.as_str()
            } else if after_identify {
                identified.as_str()
            } else {
                anon.as_str()
            };
            let roll = rng.below(100);
            if roll < 62 {
                let section = SECTIONS[rng.below(3) as usize];
                let load = rng.below(1500);
                // Some clients send numbers as strings.
                let load_ms = if rng.chance(30) {
                    json!(load.to_string())
                } else {
                    json!(load)
                };
                let mut properties = json!({
                    "$browser": browser,
                    "$current_url": format!("https://example.com/{section}/{}", rng.below(40)),
                    "page": {"section": section, "depth": rng.below(5)},
                    "load_ms": load_ms,
                });
                if rng.chance(20) {
                    properties["utm_source"] = json!(["ads", "newsletter"][rng.below(2) as usize]);
                }
                push("$pageview", distinct_id, at_ms, properties, &mut rng);
            } else if roll < 72 && !signed_up {
                signed_up = true;
                push(
                    "signup",
                    distinct_id,
                    at_ms,
                    json!({"$browser": browser}),
                    &mut rng,
                );
            } else if roll < 85 {
                let quarters = 1 + rng.below(800);
                let amount = quarters as f64 / 4.0;
                let amount = if rng.chance(25) {
                    json!(format!("{amount}"))
                } else {
                    json!(amount)
                };
                push(
                    "purchase",
                    distinct_id,
                    at_ms,
                    json!({"amount": amount, "currency": "USD", "$browser": browser}),
                    &mut rng,
                );
            } else {
                push("checkout_started", distinct_id, at_ms, json!({}), &mut rng);
            }
            if identifies && at_ms == identify_at {
                push(
                    "$identify",
                    &identified,
                    at_ms,
                    json!({"$anon_distinct_id": anon, "$set": {"plan": plan}}),
                    &mut rng,
                );
            }
        }
        if aliases {
            let at_ms = times[times.len() - 1];
            push(
                "$create_alias",
                &identified,
                at_ms,
                json!({"alias": second_device}),
                &mut rng,
            );
        }
        events.extend(user_events);
    }
    events
}

/// Persons as merges leave them: a union of distinct ids per identify and
/// alias, and each person's plan from `$set`.
struct Persons {
    parent: HashMap<String, String>,
    plan: HashMap<String, String>,
}

impl Persons {
    fn of(events: &[Generated]) -> Persons {
        let mut persons = Persons {
            parent: HashMap::new(),
            plan: HashMap::new(),
        };
        for e in events {
            persons.root(&e.distinct_id);
            let other = match e.event.as_str() {
                "$identify" => e.text(&["$anon_distinct_id"]),
                "$create_alias" => e.text(&["alias"]),
                _ => None,
            };
            if let Some(other) = other {
                let (a, b) = (persons.root(&e.distinct_id), persons.root(&other));
                if a != b {
                    persons.parent.insert(b, a);
                }
            }
        }
        let mut plans = Vec::new();
        for e in events {
            if let Some(plan) = e.text(&["$set", "plan"]) {
                plans.push((persons.root(&e.distinct_id), plan));
            }
        }
        persons.plan.extend(plans);
        persons
    }

    fn root(&mut self, id: &str) -> String {
        let mut current = id.to_string();
        loop {
            match self.parent.get(&current) {
                Some(parent) if *parent != current => current = parent.clone(),
                Some(_) => return current,
                None => {
                    self.parent.insert(current.clone(), current.clone());
                    return current;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Expected answers, computed over the generated events.

fn local_day(at: DateTime<Utc>) -> chrono::NaiveDate {
    at.with_timezone(&TZ).date_naive()
}

/// Days from 2026-09-20 to 2026-11-18 local: the 60 days of data.
fn days() -> Vec<chrono::NaiveDate> {
    let first = chrono::NaiveDate::from_ymd_opt(2026, 9, 20).unwrap();
    (0..DAYS)
        .map(|i| first + chrono::Duration::days(i))
        .collect()
}

const FULL_RANGE: (&str, &str) = ("2026-09-20", "2026-11-18");

fn in_range(e: &Generated) -> bool {
    let day = local_day(e.at);
    let days = days();
    day >= days[0] && day <= days[days.len() - 1]
}

fn daily<F: Fn(&Generated) -> bool>(
    events: &[Generated],
    keep: F,
    mut math: impl FnMut(&[&Generated]) -> f64,
) -> Vec<f64> {
    let mut by_day: BTreeMap<chrono::NaiveDate, Vec<&Generated>> = BTreeMap::new();
    for e in events.iter().filter(|e| in_range(e) && keep(e)) {
        by_day.entry(local_day(e.at)).or_default().push(e);
    }
    days()
        .iter()
        .map(|d| math(by_day.get(d).map(Vec::as_slice).unwrap_or(&[])))
        .collect()
}

fn numbers(values: &Value) -> Vec<f64> {
    values
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

fn sorted_sum(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.iter().sum()
}

/// The funnel a person reaches, computed the plain way: every start, each
/// step greedily, deepest wins, earliest start on ties.
fn person_funnel(
    events: &[&Generated],
    steps: &[&dyn Fn(&Generated) -> bool],
    window_ms: i64,
) -> Option<(usize, Vec<i64>, usize)> {
    let mut best: Option<(usize, Vec<i64>, usize)> = None;
    for start in 0..events.len() {
        if !steps[0](events[start]) {
            continue;
        }
        let mut matched = vec![start];
        for step in &steps[1..] {
            let previous = *matched.last().unwrap();
            let found = (previous + 1..events.len()).find(|&j| step(events[j]));
            match found {
                Some(j) if (events[j].at - events[start].at).num_milliseconds() <= window_ms => {
                    matched.push(j)
                }
                _ => break,
            }
        }
        let depth = matched.len();
        if best.as_ref().is_none_or(|b| depth > b.0) {
            let gaps = matched
                .windows(2)
                .map(|w| (events[w[1]].at - events[w[0]].at).num_milliseconds())
                .collect();
            best = Some((depth, gaps, start));
        }
    }
    best
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

struct ExpectedStep {
    count: u64,
    median: Option<f64>,
    average: Option<f64>,
}

fn expected_funnel(
    events: &[Generated],
    persons: &mut Persons,
    steps: &[&dyn Fn(&Generated) -> bool],
    window_ms: i64,
    group_of: impl Fn(&Generated) -> Option<String>,
) -> BTreeMap<Option<String>, Vec<ExpectedStep>> {
    let mut by_person: HashMap<String, Vec<&Generated>> = HashMap::new();
    for e in events.iter().filter(|e| in_range(e)) {
        if steps.iter().any(|s| s(e)) {
            by_person
                .entry(persons.root(&e.distinct_id))
                .or_default()
                .push(e);
        }
    }
    let mut reached: BTreeMap<Option<String>, Vec<(usize, Vec<i64>)>> = BTreeMap::new();
    for list in by_person.values_mut() {
        list.sort_by(|a, b| (a.at, &a.uuid).cmp(&(b.at, &b.uuid)));
        if let Some((depth, gaps, start)) = person_funnel(list, steps, window_ms) {
            reached
                .entry(group_of(list[start]))
                .or_default()
                .push((depth, gaps));
        }
    }
    reached
        .into_iter()
        .map(|(group, people)| {
            let steps = (0..steps.len())
                .map(|k| {
                    let count = people.iter().filter(|(d, _)| *d > k).count() as u64;
                    let times: Vec<f64> = if k == 0 {
                        Vec::new()
                    } else {
                        people
                            .iter()
                            .filter(|(d, _)| *d > k)
                            .map(|(_, gaps)| gaps[k - 1] as f64 / 1000.0)
                            .collect()
                    };
                    let average =
                        (!times.is_empty()).then(|| sorted_sum(times.clone()) / times.len() as f64);
                    ExpectedStep {
                        count,
                        median: median(times),
                        average,
                    }
                })
                .collect();
            (group, steps)
        })
        .collect()
}

fn check_funnel_result(result: &Value, expected: &[ExpectedStep]) {
    let steps = result["steps"].as_array().unwrap();
    assert_eq!(steps.len(), expected.len());
    let first = expected[0].count as f64;
    for (k, (step, want)) in steps.iter().zip(expected).enumerate() {
        assert_eq!(
            step["count"].as_u64().unwrap(),
            want.count,
            "step {k} of {result}"
        );
        assert_eq!(
            step["conversion_rate"].as_f64().unwrap(),
            if first == 0.0 {
                0.0
            } else {
                want.count as f64 / first
            },
            "step {k}"
        );
        assert_eq!(
            step["median_conversion_time_seconds"].as_f64(),
            want.median,
            "median of step {k}"
        );
        match (
            step["average_conversion_time_seconds"].as_f64(),
            want.average,
        ) {
            (Some(got), Some(want)) => assert!((got - want).abs() <= 1e-9 * want.abs()),
            (got, want) => assert_eq!(got, want, "average of step {k}"),
        }
    }
}

// ---------------------------------------------------------------------------
// The suite.

fn range(mut query: Value) -> Value {
    query["date_from"] = json!(FULL_RANGE.0);
    query["date_to"] = json!(FULL_RANGE.1);
    query
}

/// Runs each query on both servers; asserts the answers are identical and
/// returns them.
async fn both(sqlite: &TestServer, postgres: &TestServer, query: Value) -> Value {
    let (a, b) = tokio::join!(sqlite.query(&query), postgres.query(&query));
    assert_eq!(a, b, "SQLite and PostgreSQL disagree on {query}");
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_and_postgres_agree_with_an_independent_computation() {
    let events = generate();
    assert!(events.len() >= 50_000, "{} events", events.len());
    let mut persons = Persons::of(&events);
    assert!(
        persons.plan.len() > 1000,
        "identify merges give persons their plans"
    );

    let limits = QueryLimits::default();
    let (sqlite, postgres) = tokio::join!(
        start(Backend::Sqlite, limits),
        start(Backend::Postgres, limits)
    );
    let payload: Vec<Value> = events.iter().map(Generated::json).collect();
    // Noise in another project, which no query of ours may see.
    let noise: Vec<Value> = events.iter().take(3000).map(Generated::json).collect();
    tokio::join!(
        sqlite.capture_events(&sqlite.project.capture_token, &payload),
        postgres.capture_events(&postgres.project.capture_token, &payload),
        sqlite.capture_events(&sqlite.other.capture_token, &noise),
        postgres.capture_events(&postgres.other.capture_token, &noise),
    );
    tokio::join!(
        sqlite.wait_for_count(events.len() as u64),
        postgres.wait_for_count(events.len() as u64)
    );

    let is = |name: &'static str| move |e: &Generated| e.event == name;

    // 1. Daily totals and unique users over 60 days, in New York time
    //    across the end of daylight saving time.
    let answer = both(
        &sqlite,
        &postgres,
        range(json!({"kind": "trends", "interval": "day", "series": [
            {"event": "$pageview"},
            {"event": "$pageview", "math": "unique_users"},
            {"event": "purchase", "math": "sum", "math_property": "amount"},
        ]})),
    )
    .await;
    let labels = answer["labels"].as_array().unwrap();
    assert_eq!(labels.len(), DAYS as usize);
    assert_eq!(labels[0], "2026-09-20T00:00:00-04:00");
    assert_eq!(labels[labels.len() - 1], "2026-11-18T00:00:00-05:00");
    let results = answer["results"].as_array().unwrap();
    let pageviews = daily(&events, is("$pageview"), |es| es.len() as f64);
    assert_eq!(numbers(&results[0]["data"]), pageviews);
    assert_eq!(
        results[0]["total"].as_f64().unwrap(),
        pageviews.iter().sum::<f64>()
    );
    let unique = daily(&events, is("$pageview"), |es| {
        es.iter()
            .map(|e| persons.root(&e.distinct_id))
            .collect::<HashSet<_>>()
            .len() as f64
    });
    assert_eq!(numbers(&results[1]["data"]), unique);
    let sums = daily(&events, is("purchase"), |es| {
        sorted_sum(es.iter().filter_map(|e| e.number(&["amount"])).collect())
    });
    assert_eq!(numbers(&results[2]["data"]), sums);

    // 2. Weekly sum, average, minimum and maximum of an amount that some
    //    clients send as a string.
    let series: Vec<Value> = ["sum", "avg", "min", "max"]
        .iter()
        .map(|m| json!({"event": "purchase", "math": m, "math_property": "amount"}))
        .collect();
    let answer = both(
        &sqlite,
        &postgres,
        json!({"kind": "trends", "interval": "week",
               "date_from": "2026-09-21", "date_to": "2026-11-15", "series": series}),
    )
    .await;
    let mut weeks: BTreeMap<i64, Vec<f64>> = BTreeMap::new();
    let monday = chrono::NaiveDate::from_ymd_opt(2026, 9, 21).unwrap();
    for e in events.iter().filter(|e| e.event == "purchase") {
        let day = local_day(e.at);
        let week = (day - monday).num_days().div_euclid(7);
        if (0..8).contains(&week) {
            weeks
                .entry(week)
                .or_default()
                .push(e.number(&["amount"]).unwrap());
        }
    }
    assert_eq!(answer["labels"].as_array().unwrap().len(), 8);
    let results = answer["results"].as_array().unwrap();
    for week in 0..8usize {
        let values = weeks[&(week as i64)].clone();
        let sum = sorted_sum(values.clone());
        let expected = [
            sum,
            sum / values.len() as f64,
            values.iter().copied().reduce(f64::min).unwrap(),
            values.iter().copied().reduce(f64::max).unwrap(),
        ];
        for (series, want) in expected.iter().enumerate() {
            assert_eq!(
                results[series]["data"][week].as_f64().unwrap(),
                *want,
                "{} of week {week}",
                results[series]["math"]
            );
        }
    }

    // 3. A breakdown by browser, top five and the rest as "other".
    let answer = both(
        &sqlite,
        &postgres,
        range(json!({"kind": "trends", "interval": "day",
            "series": [{"event": "$pageview"}],
            "breakdown": {"property": "$browser", "limit": 5}})),
    )
    .await;
    let mut per_browser: BTreeMap<String, f64> = BTreeMap::new();
    for e in events
        .iter()
        .filter(|e| e.event == "$pageview" && in_range(e))
    {
        *per_browser
            .entry(e.text(&["$browser"]).unwrap())
            .or_default() += 1.0;
    }
    let mut ranked: Vec<(String, f64)> = per_browser.into_iter().collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    assert!(ranked.len() > 5, "the data has more than five browsers");
    let top: Vec<String> = ranked.iter().take(5).map(|r| r.0.clone()).collect();
    let results = answer["results"].as_array().unwrap();
    assert_eq!(results.len(), 6);
    for (i, browser) in top.iter().enumerate() {
        assert_eq!(results[i]["breakdown_value"], json!(browser));
        let b = browser.clone();
        let expected = daily(
            &events,
            move |e| e.event == "$pageview" && e.text(&["$browser"]).as_deref() == Some(&b),
            |es| es.len() as f64,
        );
        assert_eq!(numbers(&results[i]["data"]), expected, "{browser}");
    }
    assert_eq!(results[5]["other"], json!(true));
    let top_set: HashSet<String> = top.iter().cloned().collect();
    let expected_other = daily(
        &events,
        |e| e.event == "$pageview" && !top_set.contains(&e.text(&["$browser"]).unwrap()),
        |es| es.len() as f64,
    );
    assert_eq!(numbers(&results[5]["data"]), expected_other);

    // 4. Unique users by a person property set at identify: anonymous
    //    events count under the plan of the person they merged into.
    let answer = both(
        &sqlite,
        &postgres,
        range(json!({"kind": "trends", "interval": "month",
            "series": [{"event": "$pageview", "math": "unique_users"}],
            "breakdown": {"property": "plan", "type": "person"}})),
    )
    .await;
    let mut by_plan: BTreeMap<Option<String>, HashSet<String>> = BTreeMap::new();
    for e in events
        .iter()
        .filter(|e| e.event == "$pageview" && in_range(e))
    {
        let root = persons.root(&e.distinct_id);
        by_plan
            .entry(persons.plan.get(&root).cloned())
            .or_default()
            .insert(root);
    }
    let results = answer["results"].as_array().unwrap();
    assert_eq!(results.len(), by_plan.len());
    for result in results {
        let plan = result["breakdown_value"].as_str().map(str::to_string);
        assert_eq!(
            result["total"].as_u64().unwrap() as usize,
            by_plan[&plan].len(),
            "persons on plan {plan:?}"
        );
    }
    let shown: Vec<u64> = results
        .iter()
        .map(|r| r["total"].as_u64().unwrap())
        .collect();
    assert!(shown.windows(2).all(|w| w[0] >= w[1]), "ranked by total");

    // 5. Filters: nested keys, numbers sent as strings, text operators,
    //    set and not set, on the event and on the person.
    let filtered = |filters: Value| {
        range(json!({"kind": "trends", "interval": "day",
            "series": [{"event": "$pageview", "properties": filters}]}))
    };
    type Keep = Box<dyn Fn(&Generated, &mut Persons) -> bool>;
    let cases: Vec<(Value, Keep)> = vec![
        (
            json!([{"key": ["page", "section"], "value": "docs"},
                   {"key": "load_ms", "operator": "gt", "value": 900}]),
            Box::new(|e, _| {
                e.text(&["page", "section"]).as_deref() == Some("docs")
                    && e.number(&["load_ms"]).unwrap() > 900.0
            }),
        ),
        (
            json!([{"key": "load_ms", "operator": "lt", "value": "100"}]),
            Box::new(|e, _| e.number(&["load_ms"]).unwrap() < 100.0),
        ),
        (
            json!([{"key": "load_ms", "value": [7, 70, 700]}]),
            Box::new(|e, _| [7.0, 70.0, 700.0].contains(&e.number(&["load_ms"]).unwrap())),
        ),
        (
            json!([{"key": "$current_url", "operator": "regex", "value": "/(docs|blog)/1[0-9]$"}]),
            Box::new(|e, _| {
                let url = e.text(&["$current_url"]).unwrap();
                let tail = url.rsplit('/').next().unwrap();
                (url.contains("/docs/") || url.contains("/blog/"))
                    && tail.len() == 2
                    && tail.starts_with('1')
            }),
        ),
        (
            json!([{"key": "$current_url", "operator": "contains", "value": "PRICING"},
                   {"key": "$browser", "operator": "neq", "value": ["Chrome", "Safari"]}]),
            Box::new(|e, _| {
                e.text(&["$current_url"]).unwrap().contains("pricing")
                    && !["Chrome", "Safari"].contains(&e.text(&["$browser"]).unwrap().as_str())
            }),
        ),
        (
            json!([{"key": "utm_source", "operator": "is_set"}]),
            Box::new(|e, _| e.prop(&["utm_source"]).is_some()),
        ),
        (
            json!([{"key": "utm_source", "operator": "neq", "value": "ads"}]),
            Box::new(|e, _| e.text(&["utm_source"]).as_deref() != Some("ads")),
        ),
        (
            json!([{"key": "plan", "type": "person", "value": "enterprise"},
                   {"key": ["page", "depth"], "operator": "gt", "value": 2}]),
            Box::new(|e, persons| {
                let root = persons.root(&e.distinct_id);
                persons.plan.get(&root).map(String::as_str) == Some("enterprise")
                    && e.number(&["page", "depth"]).unwrap() > 2.0
            }),
        ),
        (
            json!([{"key": "plan", "type": "person", "operator": "is_not_set"}]),
            Box::new(|e, persons| {
                let root = persons.root(&e.distinct_id);
                !persons.plan.contains_key(&root)
            }),
        ),
    ];
    for (filters, keep) in cases {
        let answer = both(&sqlite, &postgres, filtered(filters.clone())).await;
        let mut by_day: BTreeMap<chrono::NaiveDate, f64> = BTreeMap::new();
        for e in events
            .iter()
            .filter(|e| e.event == "$pageview" && in_range(e))
        {
            if keep(e, &mut persons) {
                *by_day.entry(local_day(e.at)).or_default() += 1.0;
            }
        }
        let expected: Vec<f64> = days()
            .iter()
            .map(|d| by_day.get(d).copied().unwrap_or(0.0))
            .collect();
        assert!(
            expected.iter().sum::<f64>() > 0.0,
            "{filters} matches something"
        );
        assert_eq!(
            numbers(&answer["results"][0]["data"]),
            expected,
            "filters {filters}"
        );
    }

    // 6. Hours across the repeated hour of Nov 1: two buckets labelled 1 am.
    let answer = both(
        &sqlite,
        &postgres,
        json!({"kind": "trends", "interval": "hour", "series": [{}],
               "date_from": "2026-11-01", "date_to": "2026-11-01"}),
    )
    .await;
    let labels: Vec<&str> = answer["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    assert_eq!(labels.len(), 25);
    assert_eq!(labels[1], "2026-11-01T01:00:00-04:00");
    assert_eq!(labels[2], "2026-11-01T01:00:00-05:00");
    let mut per_hour = vec![0.0; 25];
    let day_start = TZ.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap().to_utc();
    for e in &events {
        let hours = (e.at - day_start).num_hours();
        if e.at >= day_start && hours < 25 {
            per_hour[hours as usize] += 1.0;
        }
    }
    assert_eq!(numbers(&answer["results"][0]["data"]), per_hour);

    // 7. A three-step funnel within seven days, conversion times included.
    let window_ms = 7 * 86_400_000;
    let pageview = is("$pageview");
    let signup = is("signup");
    let purchase = is("purchase");
    let steps: [&dyn Fn(&Generated) -> bool; 3] = [&pageview, &signup, &purchase];
    let funnel = range(json!({"kind": "funnel",
        "steps": [{"event": "$pageview"}, {"event": "signup"}, {"event": "purchase"}],
        "conversion_window": {"value": 7, "unit": "day"}}));
    let answer = both(&sqlite, &postgres, funnel.clone()).await;
    let expected = expected_funnel(&events, &mut persons, &steps, window_ms, |_| None);
    assert_eq!(answer["results"].as_array().unwrap().len(), 1);
    check_funnel_result(&answer["results"][0], &expected[&None]);
    assert!(expected[&None][2].count > 50, "people convert");

    // 8. The same funnel by the first step's browser, top three and other.
    let mut by_browser = funnel.clone();
    by_browser["breakdown"] = json!({"property": "$browser", "limit": 3});
    let answer = both(&sqlite, &postgres, by_browser).await;
    let expected = expected_funnel(&events, &mut persons, &steps, window_ms, |e| {
        e.text(&["$browser"])
    });
    let mut ranked: Vec<(&Option<String>, u64)> =
        expected.iter().map(|(g, s)| (g, s[0].count)).collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let results = answer["results"].as_array().unwrap();
    assert_eq!(results.len(), 4);
    for (i, (group, _)) in ranked.iter().take(3).enumerate() {
        assert_eq!(results[i]["breakdown_value"], json!(group));
        check_funnel_result(&results[i], &expected[*group]);
    }
    assert_eq!(results[3]["other"], json!(true));
    let other_first: u64 = ranked.iter().skip(3).map(|r| r.1).sum();
    assert_eq!(
        results[3]["steps"][0]["count"].as_u64().unwrap(),
        other_first
    );

    // 9. A step with a filter, a one-day window, and the plan breakdown.
    let big_purchase =
        |e: &Generated| e.event == "purchase" && e.number(&["amount"]).is_some_and(|a| a > 100.0);
    let steps: [&dyn Fn(&Generated) -> bool; 2] = [&signup, &big_purchase];
    let answer = both(
        &sqlite,
        &postgres,
        range(json!({"kind": "funnel",
            "steps": [{"event": "signup"},
                      {"event": "purchase", "properties": [{"key": "amount", "operator": "gt", "value": 100}]}],
            "conversion_window": {"value": 1, "unit": "day"},
            "breakdown": {"property": "plan", "type": "person"}})),
    )
    .await;
    let plan_of = |persons: &mut Persons, e: &Generated| {
        let root = persons.root(&e.distinct_id);
        persons.plan.get(&root).cloned()
    };
    let mut roots: HashMap<String, Option<String>> = HashMap::new();
    for e in &events {
        let plan = plan_of(&mut persons, e);
        roots.insert(e.distinct_id.clone(), plan);
    }
    let expected = expected_funnel(&events, &mut persons, &steps, 86_400_000, |e| {
        roots[&e.distinct_id].clone()
    });
    let results = answer["results"].as_array().unwrap();
    assert_eq!(results.len(), expected.len());
    for result in results {
        let group = result["breakdown_value"].as_str().map(str::to_string);
        check_funnel_result(result, &expected[&group]);
    }

    // 10. Event search: newest first with a filter, persons resolved.
    //    Person ids are derived from the project id, which differs between
    //    the two servers; everything else must be the same.
    let search = range(json!({"kind": "events", "event": "purchase", "limit": 40,
        "properties": [{"key": "amount", "operator": "gt", "value": 150}]}));
    let (answer, mut other_answer) = tokio::join!(sqlite.query(&search), postgres.query(&search));
    let without_person_ids = |answer: &Value| {
        let mut answer = answer.clone();
        for event in answer["results"].as_array_mut().unwrap() {
            event.as_object_mut().unwrap().remove("person_id");
        }
        answer
    };
    assert_eq!(
        without_person_ids(&answer),
        without_person_ids(&other_answer)
    );
    let mut matching: Vec<&Generated> = events
        .iter()
        .filter(|e| e.event == "purchase" && in_range(e) && e.number(&["amount"]).unwrap() > 150.0)
        .collect();
    matching.sort_by(|a, b| (b.at, &b.uuid).cmp(&(a.at, &a.uuid)));
    let got: Vec<&str> = answer["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["uuid"].as_str().unwrap())
        .collect();
    let want: Vec<&str> = matching.iter().take(40).map(|e| e.uuid.as_str()).collect();
    assert_eq!(got, want);
    // Every distinct id of one person shows the same person id.
    let mut person_ids: HashMap<String, HashSet<String>> = HashMap::new();
    for e in answer["results"].as_array().unwrap() {
        let root = persons.root(e["distinct_id"].as_str().unwrap());
        person_ids
            .entry(root)
            .or_default()
            .insert(e["person_id"].as_str().unwrap().to_string());
    }
    assert!(person_ids.values().all(|ids| ids.len() == 1));
    let mut groups: HashMap<String, HashSet<String>> = HashMap::new();
    for event in other_answer["results"].as_array_mut().unwrap() {
        let root = persons.root(event["distinct_id"].as_str().unwrap());
        groups
            .entry(root)
            .or_default()
            .insert(event["person_id"].as_str().unwrap().to_string());
    }
    assert!(groups.values().all(|ids| ids.len() == 1));
    assert_eq!(groups.len(), person_ids.len());

    // 10b. Paging through a search with `next_cursor` gives every match once,
    //    in order, with the same pages on both backends.
    let filter = |e: &&Generated| {
        e.event == "purchase" && in_range(e) && e.number(&["amount"]).unwrap() > 195.0
    };
    let mut want: Vec<&Generated> = events.iter().filter(filter).collect();
    want.sort_by(|a, b| (b.at, &b.uuid).cmp(&(a.at, &a.uuid)));
    let want: Vec<&str> = want.iter().map(|e| e.uuid.as_str()).collect();
    assert!(want.len() > 100, "the search spans several pages");
    let mut paged = Vec::new();
    let mut cursor = Value::Null;
    let mut pages = 0;
    loop {
        let mut search = range(json!({"kind": "events", "event": "purchase", "limit": 50,
            "properties": [{"key": "amount", "operator": "gt", "value": 195}]}));
        if !cursor.is_null() {
            search["cursor"] = cursor.clone();
        }
        let (answer, other_answer) = tokio::join!(sqlite.query(&search), postgres.query(&search));
        assert_eq!(
            without_person_ids(&answer),
            without_person_ids(&other_answer)
        );
        paged.extend(
            answer["results"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["uuid"].as_str().unwrap().to_string()),
        );
        pages += 1;
        cursor = answer["next_cursor"].clone();
        if cursor.is_null() {
            break;
        }
        assert!(pages <= want.len() / 50 + 1, "paging ends");
    }
    assert_eq!(paged, want);

    // 11. A day-of-week sanity check on the labels: weeks start on Monday.
    let answer = both(
        &sqlite,
        &postgres,
        range(json!({"kind": "trends", "interval": "week", "series": [{"event": "signup"}]})),
    )
    .await;
    for label in answer["labels"].as_array().unwrap() {
        let at = DateTime::parse_from_rfc3339(label.as_str().unwrap()).unwrap();
        assert_eq!(at.weekday(), chrono::Weekday::Mon, "{label}");
    }
    let signups = events
        .iter()
        .filter(|e| e.event == "signup" && in_range(e))
        .count();
    assert_eq!(
        answer["results"][0]["total"].as_u64().unwrap() as usize,
        signups
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_queries_get_400_naming_the_field() {
    let server = start(Backend::Sqlite, QueryLimits::default()).await;
    let cases = [
        (json!({"kind": "pie"}), "kind"),
        (json!({"series": [{"event": "a"}]}), "kind"),
        (
            json!({"kind": "trends", "series": [{"event": "a"}], "interval": "fortnight"}),
            "interval",
        ),
        (
            json!({"kind": "trends", "series": [{"event": "a",
                "properties": [{"key": "x", "operator": "between", "value": 1}]}]}),
            "series[0].properties[0].operator",
        ),
        (
            json!({"kind": "trends", "series": [{"event": "a"}],
                "properties": [{"operator": "eq", "value": 1}]}),
            "properties[0].key",
        ),
        (
            json!({"kind": "trends", "series": [{"event": "a"}],
                "date_from": "2026-11-10", "date_to": "2026-11-01"}),
            "date_to",
        ),
        (
            json!({"kind": "trends", "series": [{"event": "a"}],
                "date_from": "2025-01-01", "date_to": "2026-12-31", "interval": "hour"}),
            "interval",
        ),
        (
            json!({"kind": "funnel", "steps": [{"event": "a"}, {"event": "b"}],
                "conversion_window": {"value": -1}}),
            "conversion_window.value",
        ),
        (
            json!({"kind": "events", "properties": [{"key": "x", "operator": "regex", "value": "(unclosed"}]}),
            "properties[0].value",
        ),
        (
            json!({"kind": "events", "cursor": "not-a-cursor"}),
            "cursor",
        ),
    ];
    for (query, attr) in cases {
        let (status, body) = server
            .query_as(&server.project, &server.project.api_key, &query)
            .await;
        let shown: String = body.to_string().chars().take(300).collect();
        assert_eq!(status, 400, "{query} gave {shown}");
        assert_eq!(body["attr"], json!(attr), "{query} gave {body}");
        let detail = body["detail"].as_str().unwrap();
        assert!(
            detail.contains(&format!("`{attr}`")),
            "{detail} names {attr}"
        );
    }
    // Not JSON at all.
    let response = server
        .client
        .post(format!(
            "{}/api/projects/{}/query",
            server.base, server.project.project_id
        ))
        .bearer_auth(&server.project.api_key)
        .body("{kind: trends")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    assert!(body["detail"].as_str().unwrap().contains("JSON"), "{body}");
    // Another project's key.
    let (status, _) = server
        .query_as(
            &server.project,
            &server.other.api_key,
            &json!({"kind": "events"}),
        )
        .await;
    assert_eq!(status, 403);
}

#[tokio::test(flavor = "multi_thread")]
async fn queries_over_their_budget_get_a_clear_422() {
    let events: Vec<Value> = generate().iter().take(500).map(Generated::json).collect();
    let query = range(json!({"kind": "trends", "series": [{}]}));
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let small = QueryLimits {
            max_rows: 100,
            ..QueryLimits::default()
        };
        let server = start_with_events(backend, small, &events).await;
        let (status, body) = server
            .query_as(&server.project, &server.project.api_key, &query)
            .await;
        assert_eq!(status, 422, "{backend:?}: {body}");
        assert_eq!(body["type"], "validation_error");
        assert_eq!(body["code"], "query_too_large");
        assert!(
            body["detail"]
                .as_str()
                .unwrap()
                .contains("more than 100 events")
        );

        let hasty = QueryLimits {
            timeout: Duration::from_nanos(1),
            ..QueryLimits::default()
        };
        let server = start_with_events(backend, hasty, &events).await;
        let (status, body) = server
            .query_as(&server.project, &server.project.api_key, &query)
            .await;
        assert_eq!(status, 422, "{backend:?}: {body}");
        assert_eq!(body["type"], "validation_error");
        assert_eq!(body["code"], "query_timeout");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_project_time_zone_is_kept_and_checked() {
    let server = start(Backend::Sqlite, QueryLimits::default()).await;
    let url = format!("{}/api/projects/{}", server.base, server.project.project_id);
    let (status, project) = server.call_api(reqwest::Method::GET, "", None).await;
    assert_eq!(status, 200, "{project}");
    assert_eq!(project["timezone"], TZ.name());
    let answer = server
        .query(&json!({"kind": "trends", "series": [{}], "interval": "day",
                       "timezone": "Asia/Tokyo", "date_from": "2026-11-01", "date_to": "2026-11-01"}))
        .await;
    assert_eq!(
        answer["timezone"], "Asia/Tokyo",
        "a query may name its own zone"
    );
    assert_eq!(answer["labels"], json!(["2026-11-01T00:00:00+09:00"]));
    let response = server
        .client
        .patch(&url)
        .bearer_auth(&server.project.api_key)
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&json!({"timezone": "Mars/Olympus_Mons"})).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    assert!(body["detail"].as_str().unwrap().contains("`timezone`"));
    let response = server
        .client
        .patch(&url)
        .bearer_auth(&server.project.api_key)
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&json!({"timezone": "Asia/Kolkata"})).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let answer = server
        .query(&json!({"kind": "trends", "series": [{}], "interval": "day",
                       "date_from": "2026-11-01", "date_to": "2026-11-02"}))
        .await;
    assert_eq!(answer["timezone"], "Asia/Kolkata");
    assert_eq!(
        answer["labels"],
        json!(["2026-11-01T00:00:00+05:30", "2026-11-02T00:00:00+05:30"])
    );
}

/// With one project holding nearly all of `events`, PostgreSQL's planner
/// would rather read the whole table (and all of `person_distinct_ids`) than
/// the project's index range. Queries must read only their own project's
/// rows, whichever project is the big one.
#[tokio::test(flavor = "multi_thread")]
async fn postgres_queries_read_only_their_own_projects_index_range() {
    use sluice::store::{Scan, Store};
    let database = common::postgres::TestDatabase::create().await;
    let store = Store::open(&StoreConfig::Postgres {
        url: database.url.clone(),
    })
    .await
    .unwrap();
    let big = store.create_project("big").await.unwrap().project_id;
    let small = store.create_project("small").await.unwrap().project_id;
    let pool = sqlx::PgPool::connect(&database.url).await.unwrap();
    for (project, n) in [(&big, 40_000), (&small, 400)] {
        sqlx::query(
            "INSERT INTO events (project_id, uuid, event, distinct_id, person_id, timestamp, received_at, properties)
             SELECT $1, md5($1 || i), CASE WHEN i % 3 = 0 THEN 'purchase' ELSE '$pageview' END,
                    'user-' || (i % 2000), NULL,
                    to_char(timestamp '2026-09-01' + i * interval '1 minute', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
                    '2026-11-01T00:00:00.000Z', '{\"$browser\": \"Firefox\"}'
             FROM generate_series(1, $2) AS i",
        )
        .bind(project)
        .bind(n)
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO persons (project_id, id, properties, created_at)
             SELECT $1, 'person-' || i, '{}', '2026-09-01T00:00:00.000Z' FROM generate_series(0, 1999) AS i",
        )
        .bind(project)
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO person_distinct_ids (project_id, distinct_id, person_id)
             SELECT $1, 'user-' || i, 'person-' || i FROM generate_series(0, 1999) AS i",
        )
        .bind(project)
        .execute(&pool)
        .await
        .unwrap();
    }
    sqlx::query("ANALYZE").execute(&pool).await.unwrap();

    for project in [&big, &small] {
        let whole_range = Scan {
            project_id: project.clone(),
            from: Some("2026-08-01T00:00:00.000Z".into()),
            to: Some("2026-12-01T00:00:00.000Z".into()),
            event_paths: vec![vec!["$browser".into()]],
            person_paths: vec![vec!["plan".into()]],
            statement_timeout: Duration::from_secs(30),
            ..Scan::default()
        };
        let scans = [
            (
                "a trend of one event",
                Scan {
                    events: Some(vec!["$pageview".into()]),
                    ..whole_range.clone()
                },
                false,
            ),
            (
                "a funnel's events",
                Scan {
                    events: Some(vec!["$pageview".into(), "purchase".into()]),
                    ..whole_range.clone()
                },
                false,
            ),
            ("all events", whole_range.clone(), false),
            (
                "an event search page",
                Scan {
                    with_properties: true,
                    ..whole_range.clone()
                },
                true,
            ),
        ];
        for (name, scan, paged) in scans {
            let plan = store.explain_scan(&scan, paged).await.unwrap();
            assert!(
                !plan.contains("Seq Scan"),
                "{name} reads other projects' rows:\n{plan}"
            );
            assert!(plan.contains("project_id ="), "{name}:\n{plan}");
        }
    }
}
