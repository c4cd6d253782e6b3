//! The plugin runtime against real built components: first-party plugins,
//! and adversarial plugins that must be stopped with a clear error while the
//! host and its healthy plugins carry on.

use crate::common;

use std::time::Duration;

use common::{event, install, runtime, wasm};
use serde_json::{Value, json};
use sluice::runtime::{
    ExportFailure, ExportedEvent, Install, Limits, LoadError, Phase, PluginError, Policy,
    TrapReason,
};

fn trap_of(result: Result<Vec<sluice::runtime::PluginEvent>, PluginError>) -> (String, TrapReason) {
    match result {
        Err(PluginError::Trapped { plugin, reason, .. }) => (plugin, reason),
        other => panic!("expected a trap, got {other:?}"),
    }
}

/// An install whose CPU deadline is far away, for tests about other
/// limits: a loaded machine must not turn them into deadline traps.
fn patient(install_id: &str) -> Install {
    Install {
        install_id: install_id.into(),
        project_id: common::PROJECT.into(),
        config: json!({}),
        limits: Some(Limits {
            transform_deadline: Duration::from_secs(20),
            ..Limits::default()
        }),
    }
}

/// After any adversarial call, a healthy plugin in the same runtime works.
fn assert_healthy_neighbour(runtime: &sluice::runtime::Runtime) {
    let plugin = runtime.load(&wasm("passthrough")).unwrap();
    let mut instance = plugin.install(install("neighbour", json!({}))).unwrap();
    let out = instance.transform(event("after", json!({"a": 1}))).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].properties["a"], json!(1));
}

#[test]
fn pii_scrubber_scrubs_events_through_the_runtime() {
    let runtime = runtime(Policy::default());
    let plugin = runtime.load(&wasm("pii-scrubber")).unwrap();
    assert_eq!(plugin.id(), "pii-scrubber@0.1.0");
    let mut instance = plugin
        .install(install(
            "scrub",
            json!({"drop": ["password"], "hash": ["user_id"], "salt": "s"}),
        ))
        .unwrap();
    let out = instance
        .transform(event(
            "signed up",
            json!({
                "password": "hunter2",
                "user_id": 42,
                "note": "reach me at ann@example.com or (415) 555-2671",
                "$set": {"password": "x", "plan": "pro"},
                "clean": "nothing to see"
            }),
        ))
        .unwrap();
    assert_eq!(out.len(), 1);
    let props = &out[0].properties;
    assert!(!props.contains_key("password"));
    assert_eq!(props["$set"], json!({"plan": "pro"}));
    assert_eq!(props["note"], json!("reach me at [redacted] or [redacted]"));
    assert_eq!(props["clean"], json!("nothing to see"));
    let hashed = props["user_id"].as_str().unwrap();
    assert_eq!(hashed.len(), 64, "a sha256 hex digest: {hashed}");
    assert_eq!(out[0].uuid, "01890000-0000-7000-8000-000000000001");
}

#[test]
fn property_renamer_renames_properties_and_events_through_the_runtime() {
    let runtime = runtime(Policy::default());
    let plugin = runtime.load(&wasm("property-renamer")).unwrap();
    assert_eq!(plugin.id(), "property-renamer@0.1.0");
    let mut instance = plugin
        .install(install(
            "rename",
            json!({
                "properties": {"plan": "subscription_plan", "$browser": "browser"},
                "events": {"signup": "signed_up"},
                "event_case": "snake_case",
            }),
        ))
        .unwrap();
    let out = instance
        .transform(event(
            "signup",
            json!({"plan": "pro", "$browser": "Firefox", "$set": {"plan": "pro"}, "kept": true}),
        ))
        .unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].name, "signed_up");
    let props = Value::Object(out[0].properties.clone());
    assert_eq!(
        props,
        json!({"kept": true, "$set": {"subscription_plan": "pro"}, "browser": "Firefox", "subscription_plan": "pro"})
    );
    let out = instance
        .transform(event("Order Completed", json!({})))
        .unwrap();
    assert_eq!(out[0].name, "order_completed");
}

#[test]
fn url_parser_adds_campaign_fields_through_the_runtime() {
    let runtime = runtime(Policy::default());
    let plugin = runtime.load(&wasm("url-parser")).unwrap();
    assert_eq!(plugin.id(), "url-parser@0.1.0");
    let mut instance = plugin
        .install(install("urls", json!({"query_parameters": ["gclid"]})))
        .unwrap();
    let out = instance
        .transform(event(
            "$pageview",
            json!({"$current_url": "https://shop.example.com/p/shoes?utm_source=news&utm_campaign=spring%20sale&gclid=xyz&other=1"}),
        ))
        .unwrap();
    let props = &out[0].properties;
    assert_eq!(props["url_host"], json!("shop.example.com"));
    assert_eq!(props["url_path"], json!("/p/shoes"));
    assert_eq!(props["utm_source"], json!("news"));
    assert_eq!(props["utm_campaign"], json!("spring sale"));
    assert_eq!(props["gclid"], json!("xyz"));
    assert!(!props.contains_key("other"));
    assert!(!props.contains_key("utm_medium"));
    let unchanged = json!({"$current_url": "not a url at all"});
    let out = instance
        .transform(event("$pageview", unchanged.clone()))
        .unwrap();
    assert_eq!(Value::Object(out[0].properties.clone()), unchanged);
}

#[test]
fn an_infinite_loop_is_stopped_at_its_deadline_and_the_host_carries_on() {
    let runtime = runtime(Policy::default());
    let plugin = runtime.load(&wasm("spin-forever")).unwrap();
    let mut instance = plugin.install(install("spin", json!({}))).unwrap();
    let err = instance.transform(event("e", json!({}))).unwrap_err();
    assert_eq!(
        err.to_string(),
        "spin-forever@0.1.0 was stopped during transform: it ran past its deadline of 100 ms"
    );
    // The trapped instance was discarded: the next call gets a fresh one,
    // which is stopped the same way rather than failing oddly.
    let (plugin_id, reason) = trap_of(instance.transform(event("e", json!({}))));
    assert_eq!(plugin_id, "spin-forever@0.1.0");
    assert_eq!(reason, TrapReason::Deadline(Duration::from_millis(100)));
    assert_healthy_neighbour(&runtime);
}

#[test]
fn an_export_that_never_returns_is_stopped_at_the_export_deadline() {
    let runtime = runtime(Policy::default());
    let plugin = runtime.load(&wasm("spin-forever")).unwrap();
    let limits = Limits {
        export_deadline: Duration::from_millis(300),
        ..Limits::default()
    };
    let mut instance = plugin
        .install(Install {
            install_id: "spin-export".into(),
            project_id: common::PROJECT.into(),
            config: json!({}),
            limits: Some(limits),
        })
        .unwrap();
    let batch = vec![ExportedEvent {
        uuid: "u".into(),
        name: "e".into(),
        distinct_id: "d".into(),
        person_id: None,
        timestamp: "2024-01-01T00:00:00.000Z".into(),
        properties: "{}".into(),
    }];
    match instance.export(batch) {
        Err(ExportFailure::Plugin(PluginError::Trapped { phase, reason, .. })) => {
            assert_eq!(phase, Phase::Export);
            assert_eq!(reason, TrapReason::Deadline(Duration::from_millis(300)));
        }
        other => panic!("expected a deadline trap, got {other:?}"),
    }
    assert_healthy_neighbour(&runtime);
}

#[test]
fn a_plugin_is_stopped_at_its_compute_limit_while_waiting_for_http_is_not_counted() {
    // A long deadline and a short compute limit, as exports have them.
    let limits = Limits {
        transform_deadline: Duration::from_secs(5),
        compute: Duration::from_millis(300),
        ..Limits::default()
    };
    let runtime = runtime(Policy {
        allow_loopback: true,
        limits: limits.clone(),
        ..Policy::default()
    });
    let install = |id: &str, config: Value| Install {
        install_id: id.into(),
        project_id: common::PROJECT.into(),
        config,
        limits: Some(limits.clone()),
    };

    // Computing: stopped at the compute limit, long before the deadline.
    let spinner = runtime.load(&wasm("spin-forever")).unwrap();
    let mut spinning = spinner.install(install("spin", json!({}))).unwrap();
    match spinning.transform(event("e", json!({}))) {
        Err(PluginError::Trapped { reason, .. }) => {
            assert_eq!(reason, TrapReason::Compute(Duration::from_millis(300)));
            assert!(
                reason.to_string().contains("compute limit of 300 ms"),
                "{reason}"
            );
        }
        other => panic!("expected a compute trap, got {other:?}"),
    }

    // Waiting on a slow answer for longer than the compute limit: fine.
    let slow = common::serve(axum::Router::new().route(
        "/slow",
        axum::routing::get(|| async {
            tokio::time::sleep(Duration::from_millis(800)).await;
            "late but here"
        }),
    ));
    let url = format!("http://127.0.0.1:{}/slow", slow.port());
    let prober = runtime.load(&wasm("http-probe")).unwrap();
    let mut probing = prober.install(install("probe", json!({}))).unwrap();
    let out = probing
        .transform(event("probe", json!({"url": url})))
        .expect("waiting is not computing");
    assert_eq!(out[0].properties["body"], json!("late but here"));
    assert_healthy_neighbour(&runtime);
}

#[test]
fn an_install_cannot_raise_its_limits_above_the_operators_caps() {
    let runtime = runtime(Policy::default());
    let plugin = runtime.load(&wasm("spin-forever")).unwrap();
    let greedy = Limits {
        transform_deadline: Duration::from_secs(3600),
        memory_bytes: 1 << 40,
        ..Limits::default()
    };
    let instance = plugin
        .install(Install {
            install_id: "greedy".into(),
            project_id: common::PROJECT.into(),
            config: json!({}),
            limits: Some(greedy),
        })
        .unwrap();
    assert_eq!(
        instance.limits().transform_deadline,
        Duration::from_millis(100)
    );
    assert_eq!(instance.limits().memory_bytes, 64 << 20);
}

#[test]
fn a_memory_bomb_hits_the_memory_limit() {
    let runtime = runtime(Policy::default());
    let plugin = runtime.load(&wasm("memory-bomb")).unwrap();
    let mut instance = plugin.install(patient("bomb")).unwrap();
    let err = instance.transform(event("e", json!({}))).unwrap_err();
    assert_eq!(
        err.to_string(),
        "memory-bomb@0.1.0 was stopped during transform: it tried to use more than its memory limit of 64 MiB"
    );
    let (_, reason) = trap_of(instance.transform(event("e", json!({}))));
    assert_eq!(reason, TrapReason::Memory(64 << 20));
    assert_healthy_neighbour(&runtime);
}

#[test]
fn unbounded_recursion_overflows_the_stack_and_is_stopped() {
    let runtime = runtime(Policy::default());
    let plugin = runtime.load(&wasm("deep-recursion")).unwrap();
    let mut instance = plugin.install(patient("deep")).unwrap();
    let err = instance.transform(event("e", json!({}))).unwrap_err();
    assert_eq!(
        err.to_string(),
        "deep-recursion@0.1.0 was stopped during transform: it overflowed its stack (unbounded recursion?)"
    );
    let (_, reason) = trap_of(instance.transform(event("e", json!({"mode": "shadow"}))));
    assert_eq!(reason, TrapReason::OutOfBounds);
    assert_healthy_neighbour(&runtime);
}

#[test]
fn a_huge_property_is_stopped_by_the_output_limit() {
    let runtime = runtime(Policy::default());
    let plugin = runtime.load(&wasm("huge-output")).unwrap();
    let mut instance = plugin.install(patient("huge")).unwrap();
    let err = instance
        .transform(event("e", json!({"mode": "big"})))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "huge-output@0.1.0 was stopped during transform: it wrote more than its output limit of 1048576 bytes into events in one call"
    );
    assert_healthy_neighbour(&runtime);
}

#[test]
fn reading_one_large_property_many_times_in_one_call_is_stopped_at_the_memory_limit() {
    let runtime = runtime(Policy::default());
    let plugin = runtime.load(&wasm("huge-output")).unwrap();
    let mut instance = plugin.install(patient("huge-reads")).unwrap();
    let err = instance
        .transform(event("e", json!({"mode": "reads"})))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "huge-output@0.1.0 was stopped during transform: it tried to use more than its memory limit of 64 MiB"
    );
    assert_healthy_neighbour(&runtime);
}

#[test]
fn emitting_too_many_events_is_stopped_by_the_output_limit() {
    let runtime = runtime(Policy::default());
    let plugin = runtime.load(&wasm("huge-output")).unwrap();
    let mut instance = plugin.install(patient("many")).unwrap();
    let err = instance
        .transform(event("e", json!({"mode": "many"})))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "huge-output@0.1.0 was stopped during transform: it created more than its limit of 100 events in one call"
    );
    assert_healthy_neighbour(&runtime);
}

#[test]
fn a_panic_in_setup_is_reported_with_its_message() {
    let runtime = runtime(Policy::default());
    let plugin = runtime.load(&wasm("panic-in-setup")).unwrap();
    let err = plugin
        .install(install("panic", json!({})))
        .err()
        .expect("setup must fail");
    match &err {
        PluginError::Trapped {
            plugin,
            phase,
            reason: TrapReason::Panic(message),
        } => {
            assert_eq!(plugin, "panic-in-setup@0.1.0");
            assert_eq!(*phase, Phase::Setup);
            assert!(message.contains("setup exploded on purpose"), "{message}");
        }
        other => panic!("expected a panic trap, got {other:?}"),
    }
    assert!(
        err.to_string()
            .starts_with("panic-in-setup@0.1.0 was stopped during setup: it panicked: ")
    );
    assert_healthy_neighbour(&runtime);
}

fn probe(runtime: &sluice::runtime::Runtime, url: &str) -> serde_json::Map<String, Value> {
    let plugin = runtime.load(&wasm("http-probe")).unwrap();
    let mut instance = plugin.install(install("probe", json!({}))).unwrap();
    let mut out = instance
        .transform(event("probe", json!({"url": url})))
        .expect("a refused request is an error value, not a trap");
    out.pop().unwrap().properties
}

#[test]
fn http_to_a_host_missing_from_the_manifest_is_denied_as_a_wit_error() {
    let runtime = runtime(Policy {
        allow_loopback: true,
        ..Policy::default()
    });
    let props = probe(&runtime, "https://not-allowed.test/steal");
    assert_eq!(
        props["http_error"],
        json!(
            "HTTP request denied: capability http for not-allowed.test:443 is not granted to http-probe@0.1.0: add the host to http_hosts under [capabilities] in its plugin.toml"
        )
    );
    assert!(!props.contains_key("status"));
}

#[test]
fn http_to_loopback_is_denied_unless_the_operator_allows_it() {
    let addr =
        common::serve(axum::Router::new().route("/ping", axum::routing::get(|| async { "pong" })));
    let url = format!("http://127.0.0.1:{}/ping", addr.port());

    let strict = runtime(Policy::default());
    let props = probe(&strict, &url);
    assert_eq!(
        props["http_error"],
        json!(format!(
            "HTTP request denied: http-probe@0.1.0 may not call {url}: 127.0.0.1 is a loopback address, which the operator does not allow (policy setting allow_loopback)"
        ))
    );

    // localhost goes through DNS, and is refused at resolution time.
    let by_name = probe(&strict, &format!("http://localhost:{}/ping", addr.port()));
    let error = by_name["http_error"].as_str().unwrap();
    assert!(error.contains("loopback address"), "{error}");

    let permissive = runtime(Policy {
        allow_loopback: true,
        ..Policy::default()
    });
    let props = probe(&permissive, &url);
    assert_eq!(props["status"], json!(200));
    assert_eq!(props["body"], json!("pong"));
}

#[test]
fn the_cloud_metadata_address_stays_denied_when_loopback_is_allowed() {
    let runtime = runtime(Policy {
        allow_loopback: true,
        ..Policy::default()
    });
    let props = probe(&runtime, "http://169.254.169.254/latest/meta-data/");
    let error = props["http_error"].as_str().unwrap();
    assert!(
        error
            .contains("169.254.169.254 is a link-local address, which the operator does not allow"),
        "{error}"
    );
}

#[test]
fn a_wasi_component_gets_no_files_no_environment_and_its_stdout_in_the_log() {
    // A deadline far above the call's cost: under a loaded machine the
    // default 100 ms was once spent before the file read was reached, and
    // this test is about what the sandbox lets through, not time.
    let limits = sluice::runtime::Limits {
        transform_deadline: std::time::Duration::from_secs(10),
        ..Default::default()
    };
    let runtime = runtime(Policy {
        limits: limits.clone(),
        ..Policy::default()
    });
    let plugin = runtime.load(&wasm("wasi-file-read")).unwrap();
    let mut instance = plugin
        .install(sluice::runtime::Install {
            limits: Some(limits),
            ..install("wasi", json!({}))
        })
        .unwrap();
    let err = instance.transform(event("e", json!({}))).unwrap_err();
    assert_eq!(
        err,
        PluginError::Failed {
            plugin: "wasi-file-read@0.1.0".into(),
            phase: Phase::Transform,
            message: "cannot read /etc/passwd: no preopened directories".into(),
        }
    );
    let (logs, _) = instance.take_activity();
    assert!(
        logs.iter().any(|l| l.message == "hello from wasi stdout"),
        "stdout should reach the plugin log: {logs:?}"
    );
    assert_healthy_neighbour(&runtime);
}

#[test]
fn a_log_flood_is_capped_and_the_gap_is_reported() {
    let runtime = runtime(Policy::default());
    let plugin = runtime.load(&wasm("log-flood")).unwrap();
    let mut instance = plugin.install(install("flood", json!({}))).unwrap();
    instance.transform(event("e", json!({}))).unwrap();
    let (logs, _) = instance.take_activity();
    assert_eq!(logs.len(), 601, "600 lines plus the note about the rest");
    assert_eq!(logs[599].message, "line 599");
    assert_eq!(
        logs[599].event_uuid.as_deref(),
        Some("01890000-0000-7000-8000-000000000001")
    );
    assert_eq!(
        logs[600].message,
        "dropped 9400 log lines over the limit of 600 per minute"
    );
}

#[test]
fn a_forgotten_install_leaves_no_key_value_data_behind() {
    let runtime = runtime(Policy::default());
    let plugin = runtime.load(&wasm("kv-counter")).unwrap();
    let seen = |instance: &mut sluice::runtime::PluginInstance| {
        instance.transform(event("e", json!({}))).unwrap()[0].properties["seen"].clone()
    };
    let mut once = plugin.install(install("check", json!({}))).unwrap();
    assert_eq!(seen(&mut once), json!(1));
    assert_eq!(seen(&mut once), json!(2));
    let mut other = plugin.install(install("kept", json!({}))).unwrap();
    assert_eq!(seen(&mut other), json!(1));
    drop(once);

    runtime.forget_install("check");
    let mut again = plugin.install(install("check", json!({}))).unwrap();
    assert_eq!(seen(&mut again), json!(1), "the namespace starts empty");
    assert_eq!(seen(&mut other), json!(2), "other installs keep their data");
}

#[test]
fn key_value_data_is_granted_by_manifest_and_policy_and_namespaced_per_install() {
    let runtime = runtime(Policy::default());
    let plugin = runtime.load(&wasm("kv-counter")).unwrap();
    let mut first = plugin.install(install("install-a", json!({}))).unwrap();
    let mut second = plugin.install(install("install-b", json!({}))).unwrap();
    let seen = |instance: &mut sluice::runtime::PluginInstance| {
        instance.transform(event("e", json!({}))).unwrap()[0].properties["seen"].clone()
    };
    assert_eq!(seen(&mut first), json!(1));
    assert_eq!(seen(&mut first), json!(2));
    assert_eq!(
        seen(&mut second),
        json!(1),
        "another install has its own namespace"
    );

    let locked = common::runtime(Policy {
        kv: false,
        ..Policy::default()
    });
    let plugin = locked.load(&wasm("kv-counter")).unwrap();
    let mut instance = plugin.install(install("locked", json!({}))).unwrap();
    let out = instance.transform(event("e", json!({}))).unwrap();
    assert_eq!(
        out[0].properties["kv_error"],
        json!(
            "key-value access denied: capability kv is not granted to kv-counter@0.1.0: the operator's policy disables the key-value store"
        )
    );
}

#[test]
fn a_config_that_does_not_fit_the_schema_is_refused_before_setup() {
    let runtime = runtime(Policy::default());
    let plugin = runtime.load(&wasm("pii-scrubber")).unwrap();
    let err = plugin
        .install(install("bad", json!({"redact_emails": "yes", "dorp": []})))
        .err()
        .unwrap();
    let text = err.to_string();
    assert!(
        text.starts_with("pii-scrubber@0.1.0 cannot use this config: "),
        "{text}"
    );
    assert!(text.contains("unknown config field `dorp`"), "{text}");
    assert!(
        text.contains("config field `redact_emails` must be true or false, got \"yes\""),
        "{text}"
    );

    // Valid for the schema, refused by the plugin's own setup.
    let err = plugin
        .install(install("bad2", json!({"drop": "password"})))
        .err()
        .unwrap();
    assert!(
        matches!(
            err,
            PluginError::Failed {
                phase: Phase::Setup,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("invalid config"), "{err}");
}

#[test]
fn files_that_are_not_plugins_are_refused_with_a_reason() {
    let runtime = runtime(Policy::default());
    let garbage = runtime.load(b"definitely not wasm").err().unwrap();
    assert!(matches!(garbage, LoadError::NotAComponent(_)), "{garbage}");

    let module = wat_module();
    let core = runtime.load(&module).err().unwrap();
    assert!(core.to_string().contains("core wasm module"), "{core}");

    let component = wit_component_without_manifest();
    let err = runtime.load(&component).err().unwrap();
    assert!(matches!(err, LoadError::NoManifest { .. }), "{err}");
    assert!(err.to_string().contains("sluice plugin build"), "{err}");
}

fn wat_module() -> Vec<u8> {
    // The smallest valid core module: magic and version.
    b"\0asm\x01\0\0\0".to_vec()
}

fn wit_component_without_manifest() -> Vec<u8> {
    // The smallest valid component: magic and the component layer/version.
    b"\0asm\x0d\0\x01\0".to_vec()
}

#[test]
fn splitting_an_event_keeps_its_uuid_and_gives_new_events_stable_distinct_uuids() {
    let runtime = runtime(Policy::default());
    let plugin = runtime.load(&wasm("splitter")).unwrap();
    let mut instance = plugin
        .install(install("split", json!({"copies": 3})))
        .unwrap();
    let input = event("order", json!({"total": 30}));
    let first = instance.transform(input.clone()).unwrap();
    assert_eq!(first.len(), 4);
    assert_eq!(
        first[0].uuid, input.uuid,
        "the original continues under its uuid"
    );
    assert_eq!(first[0].properties["split"], json!(true));
    assert_eq!(first[1].name, "order part");
    assert_eq!(
        first[1].timestamp, input.timestamp,
        "new events take the input's time"
    );
    let uuids: std::collections::HashSet<_> = first.iter().map(|e| e.uuid.clone()).collect();
    assert_eq!(uuids.len(), 4, "every output has its own uuid");
    let again = instance.transform(input).unwrap();
    assert_eq!(
        first, again,
        "a replayed input yields the same outputs, uuids included"
    );
}

#[test]
fn a_plugin_built_against_wit_0_1_0_still_transforms_and_exports() {
    let runtime = runtime(Policy::default());
    let plugin = runtime.load(&wasm("wit-v0-1-0")).unwrap();
    let mut instance = plugin.install(install("v0-1-0", json!({}))).unwrap();
    let out = instance
        .transform(event("signed up", json!({"plan": "pro", "n": 1})))
        .unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(
        Value::Object(out[0].properties.clone()),
        json!({"n": 1, "subscription_plan": "pro", "wit_version": "0.1.0"})
    );

    let exported = |name: &str| ExportedEvent {
        uuid: "01890000-0000-7000-8000-000000000009".into(),
        name: name.into(),
        distinct_id: "user-1".into(),
        person_id: None,
        timestamp: "2024-01-01T00:00:00.000Z".into(),
        properties: "{}".into(),
    };
    instance.export(vec![exported("a"), exported("b")]).unwrap();
    let (logs, _) = instance.take_activity();
    assert!(
        logs.iter()
            .any(|line| line.message == "exported 2 events: a, b"),
        "{logs:?}"
    );
}

#[test]
fn a_failed_transform_hands_back_its_input_as_it_was_whatever_it_changed_first() {
    let runtime = runtime(Policy::default());
    let plugin = runtime.load(&wasm("change-then-fail")).unwrap();
    let mut instance = plugin.install(patient("change-then-fail")).unwrap();
    for mode in ["error", "panic", "replace-all"] {
        let input = event(
            "signed up",
            json!({
                "mode": mode,
                "plan": "pro",
                "note": "keep me",
                "n": 1,
                "secret": "s",
                "$set": {"name": "Ann", "secret": "t"},
                "list": [{"secret": 1}, "x"],
                "last": "z",
            }),
        );
        let failure = instance.transform_keeping_input(input.clone()).unwrap_err();
        assert!(
            failure.error.to_string().contains("change-then-fail@0.1.0"),
            "{mode}: {}",
            failure.error
        );
        assert_eq!(failure.input, input, "{mode}: the input as it was");
        assert_eq!(
            failure.input.properties.keys().collect::<Vec<_>>(),
            input.properties.keys().collect::<Vec<_>>(),
            "{mode}: its properties in their order"
        );
    }
    // Without a failure the changes stand, so the plugin did make them.
    let out = instance
        .transform(event("signed up", json!({"plan": "pro", "note": "n"})))
        .unwrap();
    assert_eq!(out[0].name, "changed");
    assert_eq!(
        Value::Object(out[0].properties.clone()),
        json!({"note": "OVERWRITTEN", "subscription_plan": "PRO", "added": true, "$set_once": {"first": "X"}})
    );
}
