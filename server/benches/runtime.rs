//! Costs of the plugin boundary, measured against the floor of parsing and
//! re-serialising the same event with serde_json natively.
//!
//! Needs the built plugins in `target/plugins` (`scripts/test.sh` builds
//! them). Run with `cargo bench -p sluice --bench runtime`; the method and
//! latest figures are in docs/BENCHMARKS.md.

use std::path::PathBuf;
use std::sync::Arc;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use serde_json::{Value, json};
use sluice::runtime::{
    Install, LoadedPlugin, PluginEvent, PluginInstance, Policy, Runtime, RuntimeConfig,
};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn event_json() -> String {
    std::fs::read_to_string(root().join("tests/fixtures/event-1k.json")).expect("fixture exists")
}

fn load(runtime: &Runtime, name: &str) -> Arc<LoadedPlugin> {
    let path = root().join("target/plugins").join(format!("{name}.wasm"));
    let bytes = std::fs::read(&path).unwrap_or_else(|err| {
        panic!(
            "{}: {err}; run scripts/test.sh first to build the plugins",
            path.display()
        )
    });
    runtime.load(&bytes).expect("plugin loads")
}

fn install(plugin: &Arc<LoadedPlugin>, config: Value) -> PluginInstance {
    plugin
        .install(Install {
            install_id: format!("bench-{}", plugin.id()),
            project_id: "bench".into(),
            config,
            limits: None,
        })
        .expect("plugin installs")
}

fn runtime(pool_size: u32) -> Runtime {
    Runtime::new(RuntimeConfig {
        policy: Policy::default(),
        pool_size,
        ..RuntimeConfig::default()
    })
    .expect("runtime starts")
}

fn benches(c: &mut Criterion) {
    let text = event_json();
    let parsed: PluginEvent = serde_json::from_str(&text).unwrap();

    c.bench_function("floor/serde_json parse+serialise 1.3KB event", |b| {
        b.iter(|| {
            let event: PluginEvent = serde_json::from_str(std::hint::black_box(&text)).unwrap();
            serde_json::to_string(&event).unwrap()
        })
    });

    for (label, pool) in [("pooling", 100), ("on-demand", 0)] {
        let runtime = runtime(pool);
        let plugin = load(&runtime, "passthrough");
        c.bench_function(&format!("instantiate+setup/{label}"), |b| {
            b.iter(|| install(&plugin, json!({})))
        });
    }

    let runtime = runtime(100);
    let passthrough = load(&runtime, "passthrough");
    let scrubber = load(&runtime, "pii-scrubber");

    let mut one = install(&passthrough, json!({}));
    c.bench_function("transform/passthrough (event already parsed)", |b| {
        b.iter_batched(
            || parsed.clone(),
            |event| one.transform(event).unwrap(),
            BatchSize::SmallInput,
        )
    });

    let mut scrub = install(
        &scrubber,
        json!({"drop": ["$set_once"], "hash": ["email"], "salt": "s"}),
    );
    c.bench_function("transform/pii-scrubber (event already parsed)", |b| {
        b.iter_batched(
            || parsed.clone(),
            |event| scrub.transform(event).unwrap(),
            BatchSize::SmallInput,
        )
    });

    let mut chain: Vec<PluginInstance> = (0..3).map(|_| install(&passthrough, json!({}))).collect();
    c.bench_function("chain/3 x passthrough, parse+serialise included", |b| {
        b.iter(|| run_chain(&mut chain, &text))
    });

    let mut chain = vec![
        install(&scrubber, json!({"drop": ["$set_once"]})),
        install(
            &scrubber,
            json!({"hash": ["email"], "salt": "s", "redact_phones": false}),
        ),
        install(&scrubber, json!({"redact_emails": false})),
    ];
    c.bench_function("chain/3 x pii-scrubber, parse+serialise included", |b| {
        b.iter(|| run_chain(&mut chain, &text))
    });
}

/// What the pipeline does per event: parse once, run the chain, serialise
/// once.
fn run_chain(chain: &mut [PluginInstance], text: &str) -> Vec<String> {
    let mut events: Vec<PluginEvent> =
        vec![serde_json::from_str(std::hint::black_box(text)).unwrap()];
    for instance in chain.iter_mut() {
        events = events
            .into_iter()
            .flat_map(|event| instance.transform(event).unwrap())
            .collect();
    }
    events
        .iter()
        .map(|e| serde_json::to_string(e).unwrap())
        .collect()
}

criterion_group!(runtime_benches, benches);
criterion_main!(runtime_benches);
