//! Analytics query latency over a million stored events.
//!
//! ```sh
//! cargo bench -p sluice --bench query            # SQLite; SLUICE_QUERY_EVENTS (default 1000000)
//! SLUICE_QUERY_DATABASE_URL=postgres://postgres@127.0.0.1/sluice_query cargo bench -p sluice --bench query
//! ```
//!
//! The store is a fresh SQLite file, or the (empty) PostgreSQL database
//! named by `SLUICE_QUERY_DATABASE_URL`. Events are written straight into
//! the tables in multi-row INSERTs (going through capture would measure the
//! pipeline, not the queries): 50,000 users over 60 days, a third of them
//! identified with two distinct ids, plus 200,000 events of a second
//! project that no query may read. Each query then runs through
//! `sluice::query::run`, as the API does, five times; the median and the
//! fastest are printed, with the database's plan for the scan.

use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use serde_json::{Value, json};
use sluice::query::{Query, QueryLimits};
use sluice::store::{Scan, Store, StoreConfig};
use sqlx::AnyPool;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// splitmix64, so every run stores the same events.
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
}

const BROWSERS: [&str; 8] = [
    "Chrome", "Safari", "Firefox", "Edge", "Opera", "Brave", "Vivaldi", "Arc",
];

struct Row {
    uuid: String,
    event: &'static str,
    distinct_id: String,
    person_id: String,
    timestamp: String,
    properties: String,
}

fn generate(
    project: &str,
    count: usize,
    users: u64,
    seed: u64,
) -> (Vec<Row>, Vec<(String, String)>) {
    let mut rng = Rng(seed);
    let start = Utc.with_ymd_and_hms(2026, 9, 1, 0, 0, 0).unwrap();
    let span_ms = 60 * 86_400_000u64;
    let mut rows = Vec::with_capacity(count);
    for i in 0..count {
        let user = rng.below(users);
        let identified = user.is_multiple_of(3) && rng.below(2) == 0;
        let distinct_id = if identified {
            format!("user-{user}")
        } else {
            format!("anon-{user}")
        };
        let roll = rng.below(100);
        let event = match roll {
            0..70 => "$pageview",
            70..78 => "signup",
            78..88 => "purchase",
            _ => "checkout_started",
        };
        let at = start + chrono::Duration::milliseconds(rng.below(span_ms) as i64);
        let browser = BROWSERS[(rng.below(36) as f64).sqrt() as usize % BROWSERS.len()];
        let os = ["Mac OS X", "Windows", "Linux", "iOS", "Android"][rng.below(5) as usize];
        let section = ["docs", "pricing", "blog"][rng.below(3) as usize];
        let properties = json!({
            "$browser": browser,
            "$os": os,
            "$current_url": format!("https://example.com/{section}/{}", rng.below(500)),
            "$screen_width": 800 + rng.below(1200),
            "$lib": "web",
            "$lib_version": "1.160.0",
            "$session_id": format!("{:016x}", rng.next()),
            "plan_amount": rng.below(80_000) as f64 / 100.0,
            "page": {"section": "docs", "depth": rng.below(5)},
        });
        rows.push(Row {
            uuid: uuid::Uuid::from_u64_pair(rng.next(), i as u64).to_string(),
            event,
            distinct_id,
            person_id: format!("{project}-person-{user}"),
            timestamp: at.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
            properties: properties.to_string(),
        });
    }
    let mut links = Vec::new();
    for user in 0..users {
        links.push((format!("anon-{user}"), format!("{project}-person-{user}")));
        if user.is_multiple_of(3) {
            links.push((format!("user-{user}"), format!("{project}-person-{user}")));
        }
    }
    (rows, links)
}

async fn insert(pool: &AnyPool, project: &str, rows: &[Row], links: &[(String, String)]) {
    for chunk in rows.chunks(500) {
        let mut sql = String::from(
            "INSERT INTO events (project_id, uuid, event, distinct_id, person_id, timestamp, received_at, properties) VALUES ",
        );
        for i in 0..chunk.len() {
            let b = i * 7;
            if i > 0 {
                sql.push(',');
            }
            sql.push_str(&format!(
                "($1, ${}, ${}, ${}, ${}, ${}, ${}, ${})",
                b + 2,
                b + 3,
                b + 4,
                b + 5,
                b + 6,
                b + 7,
                b + 8
            ));
        }
        let mut query = sqlx::query(&sql).bind(project);
        for row in chunk {
            query = query
                .bind(&row.uuid)
                .bind(row.event)
                .bind(&row.distinct_id)
                .bind(&row.person_id)
                .bind(&row.timestamp)
                .bind(&row.timestamp)
                .bind(&row.properties);
        }
        query.execute(pool).await.unwrap();
    }
    for chunk in links.chunks(500) {
        let mut persons =
            String::from("INSERT INTO persons (project_id, id, properties, created_at) VALUES ");
        let mut ids = String::from(
            "INSERT INTO person_distinct_ids (project_id, distinct_id, person_id) VALUES ",
        );
        let mut person_binds = Vec::new();
        for (i, (distinct_id, person)) in chunk.iter().enumerate() {
            if i > 0 {
                ids.push(',');
            }
            ids.push_str(&format!("($1, ${}, ${})", 2 * i + 2, 2 * i + 3));
            if distinct_id.starts_with("anon-") {
                if !person_binds.is_empty() {
                    persons.push(',');
                }
                person_binds.push(person.clone());
                let n = person_binds.len() + 1;
                persons.push_str(&format!(
                    "($1, ${n}, '{{\"plan\": \"pro\"}}', '2026-09-01T00:00:00.000Z')"
                ));
            }
        }
        let mut query = sqlx::query(&ids).bind(project);
        for (distinct_id, person) in chunk {
            query = query.bind(distinct_id).bind(person);
        }
        query.execute(pool).await.unwrap();
        if person_binds.is_empty() {
            continue;
        }
        let mut query = sqlx::query(&persons).bind(project);
        for person in &person_binds {
            query = query.bind(person);
        }
        query.execute(pool).await.unwrap();
    }
}

async fn time_query(store: &Store, project: &str, query: &Value) -> (Duration, Duration, Value) {
    let parsed = Query::parse(query).unwrap();
    let now = Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap();
    let mut times = Vec::new();
    let mut answer = Value::Null;
    for _ in 0..5 {
        let started = Instant::now();
        answer = sluice::query::run(store, project, &parsed, QueryLimits::default(), now)
            .await
            .unwrap();
        times.push(started.elapsed());
    }
    times.sort();
    (times[2], times[0], answer)
}

#[tokio::main]
async fn main() {
    let total = env("SLUICE_QUERY_EVENTS", 1_000_000);
    let dir = tempfile::tempdir().unwrap();
    let (config, url) = match std::env::var("SLUICE_QUERY_DATABASE_URL") {
        Ok(url) => (StoreConfig::Postgres { url: url.clone() }, url),
        Err(_) => (
            StoreConfig::Sqlite {
                data_dir: dir.path().to_path_buf(),
            },
            format!("sqlite://{}", dir.path().join("sluice.db").display()),
        ),
    };
    let store = Store::open(&config).await.unwrap();
    let backend = format!("{:?}", store.backend());
    let project = store.create_project("bench").await.unwrap().project_id;
    let other = store.create_project("other").await.unwrap().project_id;
    let pool = AnyPool::connect(&url).await.unwrap();

    let started = Instant::now();
    let (rows, links) = generate(&project, total, 50_000, 1);
    insert(&pool, &project, &rows, &links).await;
    let (rows, links) = generate(&other, 200_000, 10_000, 2);
    insert(&pool, &other, &rows, &links).await;
    drop(rows);
    if store.backend() == sluice::store::Backend::Postgres {
        // What autovacuum would have done by the time anyone queries.
        sqlx::query("ANALYZE").execute(&pool).await.unwrap();
    }
    eprintln!(
        "{backend}: stored {total} + 200000 events in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let trend = json!({"kind": "trends", "interval": "day",
        "date_from": "2026-09-15", "date_to": "2026-10-14",
        "series": [{"event": "$pageview"}],
        "breakdown": {"property": "$browser", "limit": 5}});
    let unique = json!({"kind": "trends", "interval": "day",
        "date_from": "2026-09-15", "date_to": "2026-10-14",
        "series": [{"event": "$pageview", "math": "unique_users"}]});
    let funnel = json!({"kind": "funnel",
        "date_from": "2026-09-15", "date_to": "2026-10-14",
        "steps": [{"event": "$pageview"}, {"event": "signup"}, {"event": "purchase"}],
        "conversion_window": {"value": 7, "unit": "day"}});
    let person_breakdown = json!({"kind": "trends", "interval": "week",
        "date_from": "2026-09-15", "date_to": "2026-10-14",
        "series": [{"event": "purchase", "math": "sum", "math_property": "plan_amount"}],
        "breakdown": {"property": "plan", "type": "person"}});
    let search = json!({"kind": "events", "event": "purchase", "limit": 100,
        "properties": [{"key": "plan_amount", "operator": "gt", "value": 790}]});
    for (name, query) in [
        (
            "30-day daily trend, breakdown by $browser (top 5 + other)",
            &trend,
        ),
        ("30-day daily unique users", &unique),
        ("30-day 3-step funnel, 7-day window", &funnel),
        (
            "30-day weekly sum, breakdown by a person property",
            &person_breakdown,
        ),
        ("event search, filter matching 1.3%, newest 100", &search),
    ] {
        let (median, fastest, answer) = time_query(&store, &project, query).await;
        let summary = match answer["kind"].as_str() {
            Some("trends") => format!(
                "{} results, first total {}",
                answer["results"].as_array().unwrap().len(),
                answer["results"][0]["total"]
            ),
            Some("funnel") => format!(
                "steps {:?}",
                answer["results"][0]["steps"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| s["count"].as_u64().unwrap())
                    .collect::<Vec<_>>()
            ),
            _ => format!("{} events", answer["results"].as_array().unwrap().len()),
        };
        println!(
            "{backend} | {name} | median {:.0} ms | fastest {:.0} ms | {summary}",
            median.as_secs_f64() * 1000.0,
            fastest.as_secs_f64() * 1000.0
        );
    }

    let scan = |events: Vec<&str>, paths: Vec<Vec<&str>>| Scan {
        project_id: project.clone(),
        events: Some(events.into_iter().map(String::from).collect()),
        from: Some("2026-09-15T00:00:00.000Z".into()),
        to: Some("2026-10-15T00:00:00.000Z".into()),
        event_paths: paths
            .into_iter()
            .map(|p| p.into_iter().map(String::from).collect())
            .collect(),
        statement_timeout: Duration::from_secs(30),
        ..Scan::default()
    };
    let plans = [
        (
            "trend with breakdown",
            scan(vec!["$pageview"], vec![vec!["$browser"]]),
            false,
        ),
        (
            "funnel",
            scan(vec!["$pageview", "purchase", "signup"], vec![]),
            false,
        ),
        (
            "event search page",
            Scan {
                from: None,
                to: None,
                with_properties: true,
                ..scan(vec!["purchase"], vec![vec!["plan_amount"]])
            },
            true,
        ),
    ];
    for (name, scan, paged) in plans {
        println!(
            "\n{backend} plan, {name}:\n{}",
            store.explain_scan(&scan, paged).await.unwrap()
        );
    }
}
