//! The Rust half of the side-by-side benchmark (`scripts/bench-peers.sh`
//! runs it with the JavaScript half and prints the ratios): the same three
//! transformations on the same event, on one thread, as
//!
//! - the floor: parse the event and serialise it again, nothing else;
//! - native Rust with no sandbox: parse, scrub, rename, parse the URL,
//!   serialise;
//! - Sluice: parse once, run `pii-scrubber` → `property-renamer` →
//!   `url-parser` through the real runtime (each a sandboxed component
//!   working on the event through the host), serialise once.
//!
//! Each prints one JSON line `{"name", "events_per_second"}`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use regex::Regex;
use serde_json::{Map, Value, json};
use sluice::runtime::{Install, PluginEvent, PluginInstance, Policy, Runtime, RuntimeConfig};

/// The allocator `sluice serve` runs with, so the host's side of the chain
/// costs here what it costs in the server; the floor and the native chain
/// get it too.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn seconds() -> f64 {
    std::env::var("SLUICE_PEERS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0)
}

/// Runs `step` for a second to warm up, then for the measuring time, and
/// prints events per second. With SLUICE_PEERS_ONLY set, only lines whose
/// name contains it run (to profile one line under callgrind).
fn measure(name: &str, mut step: impl FnMut() -> String) {
    if let Ok(only) = std::env::var("SLUICE_PEERS_ONLY")
        && !name.contains(&only)
    {
        return;
    }
    let mut sink = 0usize;
    let warm = Instant::now();
    while warm.elapsed() < Duration::from_secs(1) {
        sink += step().len();
    }
    let limit = Duration::from_secs_f64(seconds());
    let started = Instant::now();
    let mut steps = 0u64;
    while started.elapsed() < limit {
        for _ in 0..50 {
            sink += std::hint::black_box(step()).len();
        }
        steps += 50;
    }
    assert!(sink > 0);
    let rate = steps as f64 / started.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({"name": name, "events_per_second": rate.round() as u64})
    );
}

/// The native versions of the three transformations, written as a Rust
/// developer would without a sandbox: the same patterns as the JavaScript
/// ones, on the parsed event.
struct Native {
    email: Regex,
    phone: Regex,
}

impl Native {
    fn new() -> Self {
        Native {
            email: Regex::new(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}").unwrap(),
            phone: Regex::new(r"\+?\d[\d ().-]{7,}\d").unwrap(),
        }
    }

    fn scrub(&self, value: &mut Value) {
        match value {
            Value::String(text) => {
                let redacted = self.email.replace_all(text, "[redacted]");
                let redacted = self.phone.replace_all(&redacted, "[redacted]");
                if redacted != *text {
                    *text = redacted.into_owned();
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|item| self.scrub(item)),
            Value::Object(map) => map.values_mut().for_each(|item| self.scrub(item)),
            _ => {}
        }
    }

    fn rename(map: &mut Map<String, Value>) {
        for (from, to) in [
            ("plan", "subscription_plan"),
            ("$browser", "browser"),
            ("$os", "os"),
        ] {
            if let Some(value) = map.shift_remove(from) {
                map.insert(to.into(), value);
            }
        }
    }

    fn parse_url(map: &mut Map<String, Value>) {
        let Some(Value::String(raw)) = map.get("$current_url") else {
            return;
        };
        let Ok(url) = reqwest::Url::parse(raw.trim()) else {
            return;
        };
        let mut found: Vec<(String, String)> = Vec::new();
        if let Some(host) = url.host_str() {
            found.push(("url_host".into(), host.into()));
        }
        found.push(("url_path".into(), url.path().into()));
        for (key, value) in url.query_pairs() {
            if key.starts_with("utm_")
                && matches!(
                    &*key,
                    "utm_source" | "utm_medium" | "utm_campaign" | "utm_term" | "utm_content"
                )
            {
                found.push((key.into_owned(), value.into_owned()));
            }
        }
        for (key, value) in found {
            map.entry(key).or_insert(Value::String(value));
        }
    }

    fn run(&self, event: &mut PluginEvent) {
        let props = &mut event.properties;
        props.shift_remove("phone");
        for value in props.values_mut() {
            self.scrub(value);
        }
        Self::rename(props);
        for key in ["$set", "$set_once"] {
            if let Some(Value::Object(inner)) = props.get_mut(key) {
                Self::rename(inner);
            }
        }
        Self::parse_url(props);
    }
}

fn install(runtime: &Runtime, name: &str, config: Value) -> PluginInstance {
    let path = root().join("target/plugins").join(format!("{name}.wasm"));
    let bytes = std::fs::read(&path).unwrap_or_else(|err| {
        panic!(
            "{}: {err}; scripts/bench-peers.sh builds the plugins",
            path.display()
        )
    });
    runtime
        .load(&bytes)
        .expect("plugin loads")
        .install(Install {
            install_id: format!("peers-{name}"),
            project_id: "bench".into(),
            config,
            limits: None,
        })
        .expect("plugin installs")
}

fn main() {
    // `cargo bench` passes `--bench`; there are no options to read.
    let text = std::fs::read_to_string(root().join("server/benches/peers/event.json"))
        .expect("the peers event exists");

    measure("floor: serde_json parse + serialise", || {
        let event: PluginEvent = serde_json::from_str(&text).unwrap();
        serde_json::to_string(&event).unwrap()
    });

    let native = Native::new();
    measure("native Rust, no sandbox", || {
        let mut event: PluginEvent = serde_json::from_str(&text).unwrap();
        native.run(&mut event);
        serde_json::to_string(&event).unwrap()
    });

    // Valgrind cannot reserve the pooling allocator's address space, so a
    // profile under callgrind runs with SLUICE_PEERS_POOL_SIZE=0; calls
    // cost the same either way, only instantiation differs.
    let pool_size = std::env::var("SLUICE_PEERS_POOL_SIZE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(RuntimeConfig::default().pool_size);
    let runtime = Runtime::new(RuntimeConfig {
        policy: Policy::default(),
        pool_size,
        ..RuntimeConfig::default()
    })
    .expect("runtime starts");
    let mut chain = [
        install(&runtime, "pii-scrubber", json!({"drop": ["phone"]})),
        install(
            &runtime,
            "property-renamer",
            json!({"properties": {"plan": "subscription_plan", "$browser": "browser", "$os": "os"}}),
        ),
        install(&runtime, "url-parser", json!({})),
    ];
    // The sandboxed chain must do what the native one does, or the
    // comparison means nothing.
    let mut expected: PluginEvent = serde_json::from_str(&text).unwrap();
    native.run(&mut expected);
    let mut through_chain: PluginEvent = serde_json::from_str(&text).unwrap();
    for link in &mut chain {
        through_chain = link.transform(through_chain).unwrap().pop().unwrap();
    }
    for key in expected.properties.keys() {
        assert!(
            through_chain.properties.contains_key(key),
            "the sandboxed chain lost or did not add `{key}`"
        );
    }
    assert_eq!(
        expected.properties.len(),
        through_chain.properties.len(),
        "the sandboxed chain and the native one made different events"
    );

    measure("Sluice: 3 sandboxed plugins", || {
        let mut event: PluginEvent = serde_json::from_str(&text).unwrap();
        for link in &mut chain {
            event = link.transform(event).unwrap().pop().unwrap();
        }
        serde_json::to_string(&event).unwrap()
    });

    // Where the chain's time goes: each plugin alone, parse and serialise
    // included, so each line's cost minus the floor's is the plugin's.
    for (link, name) in chain
        .iter_mut()
        .zip(["pii-scrubber", "property-renamer", "url-parser"])
    {
        measure(&format!("(detail) Sluice: {name} alone"), || {
            let event: PluginEvent = serde_json::from_str(&text).unwrap();
            let event = link.transform(event).unwrap().pop().unwrap();
            serde_json::to_string(&event).unwrap()
        });
    }
}
