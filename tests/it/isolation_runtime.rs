//! Projects sharing one plugin runtime: a full pool, a project at its
//! `instances` quota, its `http_permits` and its key-value quotas each
//! stop only that project's work, with an error naming the quota, and
//! never count as the plugin's failure.

use crate::common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{event, wasm};
use serde_json::{Value, json};
use sluice::model::Quotas;
use sluice::runtime::{
    Install, Limits, PluginError, PluginInstance, Policy, ProjectQuotas, Runtime, RuntimeConfig,
};

/// A runtime whose projects have `quotas` where named, the defaults
/// otherwise.
fn runtime_with(policy: Policy, pool_size: u32, quotas: &[(&str, Quotas)]) -> Runtime {
    let by_project: HashMap<String, Arc<Quotas>> = quotas
        .iter()
        .map(|(project, quotas)| (project.to_string(), Arc::new(quotas.clone())))
        .collect();
    let defaults = Arc::new(Quotas::default());
    Runtime::new(RuntimeConfig {
        policy,
        pool_size,
        quotas: ProjectQuotas::new(move |project| {
            by_project.get(project).unwrap_or(&defaults).clone()
        }),
        ..RuntimeConfig::default()
    })
    .expect("runtime starts")
}

fn install_in(project_id: &str, install_id: &str) -> Install {
    Install {
        install_id: install_id.into(),
        project_id: project_id.into(),
        config: json!({}),
        limits: None,
    }
}

fn start(runtime: &Runtime, plugin: &str, project_id: &str, install_id: &str) -> PluginInstance {
    runtime
        .load(&wasm(plugin))
        .unwrap()
        .install(install_in(project_id, install_id))
        .unwrap_or_else(|err| panic!("{install_id} of project {project_id} should start: {err}"))
}

fn exhausted_message(result: Result<PluginInstance, PluginError>) -> String {
    match result {
        Err(err @ PluginError::Exhausted { .. }) => {
            assert!(err.is_exhausted());
            err.to_string()
        }
        Err(other) => panic!("expected no room to run, got {other:?}"),
        Ok(_) => panic!("expected no room to run, but the plugin started"),
    }
}

#[test]
fn a_full_pool_is_no_room_to_run_naming_the_pool_and_who_holds_it() {
    let runtime = runtime_with(Policy::default(), 2, &[]);
    let plugin = runtime.load(&wasm("passthrough")).unwrap();
    let first = plugin.install(install_in("big", "one")).unwrap();
    let _second = plugin.install(install_in("big", "two")).unwrap();

    let message = exhausted_message(plugin.install(install_in("small", "three")));
    assert!(
        message
            .starts_with("passthrough@0.1.0 has to wait: the plugin sandbox's pool of 2 instances"),
        "{message}"
    );
    assert!(
        message.contains("the projects holding the most: big (2)"),
        "{message}"
    );
    assert!(message.contains("`instances` quota"), "{message}");

    drop(first);
    let mut third = plugin
        .install(install_in("small", "three"))
        .expect("an ended instance gives its place in the pool back");
    assert_eq!(third.transform(event("e", json!({}))).unwrap().len(), 1);
}

#[test]
fn a_project_at_its_instance_quota_waits_while_another_project_still_starts_plugins() {
    let runtime = runtime_with(
        Policy::default(),
        10,
        &[(
            "a",
            Quotas {
                instances: 2,
                ..Quotas::default()
            },
        )],
    );
    let first = start(&runtime, "passthrough", "a", "a-1");
    let _second = start(&runtime, "kv-counter", "a", "a-2");

    let plugin = runtime.load(&wasm("passthrough")).unwrap();
    let message = exhausted_message(plugin.install(install_in("a", "a-3")));
    assert_eq!(
        message,
        "passthrough@0.1.0 has to wait: project a already holds 2 live plugin instances, the project's quota `instances` (2); the operator can change it with `sluice project quotas`; its work waits until one of them ends"
    );

    let _other = start(&runtime, "passthrough", "b", "b-1");
    assert_eq!(
        runtime.instances_by_project(),
        vec![("a".to_string(), 2), ("b".to_string(), 1)]
    );

    drop(first);
    assert_eq!(
        runtime.instances_by_project(),
        vec![("a".to_string(), 1), ("b".to_string(), 1)]
    );
    start(&runtime, "passthrough", "a", "a-3");
}

#[test]
fn a_trapped_instance_gives_its_place_back_and_its_restart_waits_for_room() {
    let runtime = runtime_with(
        Policy::default(),
        10,
        &[(
            "a",
            Quotas {
                instances: 1,
                ..Quotas::default()
            },
        )],
    );
    let mut spinning = start(&runtime, "spin-forever", "a", "spin");
    let err = spinning.transform(event("e", json!({}))).unwrap_err();
    assert!(err.is_trap(), "{err:?}");
    assert_eq!(runtime.instances_by_project(), vec![]);

    // The place the trapped instance gave back is taken by another plugin
    // of the project: the next call has no room, and is told so rather
    // than failing as the plugin's own fault.
    let _taken = start(&runtime, "passthrough", "a", "other");
    let err = spinning.transform(event("e", json!({}))).unwrap_err();
    assert!(err.is_exhausted(), "{err:?}");
    assert!(err.to_string().contains("quota `instances` (1)"), "{err}");
}

/// A local server whose `/slow` answers once released, and says when a
/// request has arrived; `/ping` answers at once.
struct SlowServer {
    base: String,
    arrived: std::sync::mpsc::Receiver<()>,
    release: tokio::sync::watch::Sender<bool>,
}

fn slow_server() -> SlowServer {
    let (arrived_tx, arrived) = std::sync::mpsc::channel();
    let arrived_tx = Arc::new(Mutex::new(arrived_tx));
    let (release, released) = tokio::sync::watch::channel(false);
    let router = axum::Router::new()
        .route("/ping", axum::routing::get(|| async { "pong" }))
        .route(
            "/slow",
            axum::routing::get(move || {
                let arrived_tx = arrived_tx.clone();
                let mut released = released.clone();
                async move {
                    let _ = arrived_tx.lock().unwrap().send(());
                    let _ = released.wait_for(|done| *done).await;
                    "finally"
                }
            }),
        );
    let addr = common::serve(router);
    SlowServer {
        base: format!("http://127.0.0.1:{}", addr.port()),
        arrived,
        release,
    }
}

fn fetch(instance: &mut PluginInstance, url: &str) -> serde_json::Map<String, Value> {
    let mut out = instance
        .transform(event("probe", json!({"url": url})))
        .expect("an HTTP failure is an error value, not a trap");
    out.pop().unwrap().properties
}

#[test]
fn a_project_whose_requests_hold_its_http_permits_waits_alone() {
    let server = slow_server();
    let runtime = runtime_with(
        Policy {
            allow_loopback: true,
            // Room for the installs' long deadlines below.
            limits: Limits {
                transform_deadline: Duration::from_secs(60),
                http_timeout: Duration::from_secs(60),
                ..Limits::default()
            },
            ..Policy::default()
        },
        10,
        &[(
            "a",
            Quotas {
                http_permits: 1,
                ..Quotas::default()
            },
        )],
    );
    let plugin = runtime.load(&wasm("http-probe")).unwrap();
    // Calls that outlast their requests, so a request's failure reaches
    // the plugin as an error value before the call's own deadline.
    let patient = |project: &str, id: &str, http_timeout: Duration| Install {
        limits: Some(Limits {
            transform_deadline: Duration::from_secs(60),
            http_timeout,
            ..Limits::default()
        }),
        ..install_in(project, id)
    };
    let mut holder = plugin
        .install(patient("a", "a-slow", Duration::from_secs(60)))
        .unwrap();
    let slow_url = format!("{}/slow", server.base);
    let held = std::thread::spawn(move || fetch(&mut holder, &slow_url));
    server
        .arrived
        .recv()
        .expect("project a's slow request reaches the server");

    let ping = format!("{}/ping", server.base);
    let mut neighbour = plugin
        .install(patient("b", "b-probe", Duration::from_secs(30)))
        .unwrap();
    let props = fetch(&mut neighbour, &ping);
    assert_eq!(props["status"], json!(200), "{props:?}");
    assert_eq!(props["body"], json!("pong"));

    let mut second = plugin
        .install(patient("a", "a-probe", Duration::from_millis(300)))
        .unwrap();
    let props = fetch(&mut second, &ping);
    assert!(!props.contains_key("status"), "{props:?}");
    let error = props["http_error"].as_str().unwrap();
    assert!(
        error.contains("project a's plugins already have 1 requests in flight, the project's quota `http_permits` (1)"),
        "{error}"
    );

    server.release.send(true).unwrap();
    let props = held.join().unwrap();
    assert_eq!(props["body"], json!("finally"));
    let props = fetch(&mut second, &ping);
    assert_eq!(
        props["status"],
        json!(200),
        "the permit came back: {props:?}"
    );
}

fn count(instance: &mut PluginInstance, distinct_id: &str) -> serde_json::Map<String, Value> {
    let mut input = event("e", json!({}));
    input.distinct_id = distinct_id.into();
    instance.transform(input).unwrap().pop().unwrap().properties
}

#[test]
fn key_value_writes_stop_at_the_configs_and_the_projects_quota_naming_it() {
    let runtime = runtime_with(
        Policy::default(),
        10,
        &[(
            "a",
            Quotas {
                kv_keys_per_config: 2,
                kv_keys: 3,
                ..Quotas::default()
            },
        )],
    );
    let mut x = start(&runtime, "kv-counter", "a", "x");
    let mut y = start(&runtime, "kv-counter", "a", "y");
    assert_eq!(count(&mut x, "u1")["seen"], json!(1));
    assert_eq!(count(&mut x, "u2")["seen"], json!(1));
    assert_eq!(count(&mut x, "u1")["seen"], json!(2), "a key counts once");
    let refused = count(&mut x, "u3");
    let error = refused["kv_error"].as_str().unwrap();
    assert!(
        error.contains("the plugin config's key-value data holds 2 keys")
            && error.contains("quota `kv_keys_per_config` (2)"),
        "{error}"
    );

    assert_eq!(count(&mut y, "u1")["seen"], json!(1));
    let refused = count(&mut y, "u2");
    let error = refused["kv_error"].as_str().unwrap();
    assert!(
        error.contains("the project's key-value data holds 3 keys")
            && error.contains("quota `kv_keys` (3)"),
        "{error}"
    );

    let mut elsewhere = start(&runtime, "kv-counter", "b", "z");
    for id in ["u1", "u2", "u3", "u4"] {
        assert_eq!(count(&mut elsewhere, id)["seen"], json!(1));
    }

    // A removed install's keys leave the project's count.
    drop(x);
    runtime.forget_install("x");
    assert_eq!(count(&mut y, "u2")["seen"], json!(1));
}

/// Request bodies by the path they were posted to.
type Bodies = Arc<Mutex<HashMap<String, Vec<String>>>>;

/// A receiver that keeps every request body by path.
fn receiver() -> (String, Bodies) {
    let bodies: Bodies = Arc::default();
    let kept = bodies.clone();
    let router = axum::Router::new().route(
        "/{path}",
        axum::routing::post(
            move |axum::extract::Path(path): axum::extract::Path<String>, body: String| {
                let kept = kept.clone();
                async move {
                    kept.lock().unwrap().entry(path).or_default().push(body);
                    "ok"
                }
            },
        ),
    );
    let addr = common::serve(router);
    (format!("http://127.0.0.1:{}", addr.port()), bodies)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_destination_with_no_room_to_run_waits_without_failing_and_delivers_once_there_is_room() {
    use common::server::{TestServer, wait_until};
    use reqwest::Method;
    use sluice::server::ServeConfig;
    use sluice::store::Backend;

    let server = TestServer::start_with(Backend::Sqlite, |config| ServeConfig {
        policy: Policy {
            allow_loopback: true,
            ..Policy::default()
        },
        quotas: Quotas {
            instances: 1,
            ..Quotas::default()
        },
        ..config
    })
    .await;
    let (base, bodies) = receiver();
    // With no time for retries, a batch counted as failed would go to dead
    // letters and pause its destination at once.
    let delivery = json!({"batch_size": 100, "linger_ms": 50, "max_retry_seconds": 0});
    let mut ids = Vec::new();
    for path in ["one", "two"] {
        let (status, uploaded) = server
            .call_api_raw(Method::POST, "/plugins", Some(wasm("webhook")))
            .await;
        assert_eq!(status, 201, "{uploaded}");
        let (status, created) = server
            .call_api(
                Method::POST,
                "/plugin-configs",
                Some(json!({
                    "plugin_sha256": uploaded["sha256"],
                    "config": {"url": format!("{base}/{path}")},
                    "delivery": delivery,
                })),
            )
            .await;
        assert_eq!(status, 201, "{created}");
        ids.push(created["id"].as_str().unwrap().to_string());
    }
    let (status, body) = server
        .capture_batch(json!([
            {"event": "e1", "distinct_id": "u"},
            {"event": "e2", "distinct_id": "u"},
        ]))
        .await;
    assert_eq!(status, 200, "{body}");

    // One destination's lane holds the project's only instance; the
    // other's batch waits, and says so in its log.
    let view = |id: String| {
        let server = &server;
        async move {
            let (status, view) = server
                .call_api(Method::GET, &format!("/destinations/{id}"), None)
                .await;
            assert_eq!(status, 200, "{view}");
            view
        }
    };
    let waiting = wait_until("a destination to wait for room", || async {
        for id in &ids {
            let view = view(id.clone()).await;
            let told = view["logs"].as_array().unwrap().iter().any(|line| {
                line["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("wait, without counting as attempts, for room"))
            });
            if told {
                return Some(view);
            }
        }
        None
    })
    .await;
    let message = waiting["logs"][0]["message"].as_str().unwrap().to_string();
    assert!(message.contains("quota `instances` (1)"), "{message}");
    assert_eq!(waiting["paused"], false, "{waiting}");
    assert_eq!(waiting["stats"]["failed_attempts"], 0, "{waiting}");
    assert_eq!(waiting["stats"]["dead_lettered"], 0, "{waiting}");
    assert_eq!(waiting["recent_attempts"], json!([]), "{waiting}");

    // A config checked now has no room either: the API says to retry,
    // and does not call the config wrong.
    let (status, uploaded) = server
        .call_api_raw(Method::POST, "/plugins", Some(wasm("passthrough")))
        .await;
    assert_eq!(status, 201, "{uploaded}");
    let (status, refused) = server
        .call_api(
            Method::POST,
            "/plugin-configs",
            Some(json!({"plugin_sha256": uploaded["sha256"], "config": {}})),
        )
        .await;
    assert_eq!(status, 429, "{refused}");
    assert!(
        refused.to_string().contains("quota `instances` (1)"),
        "{refused}"
    );

    // The operator gives the project room: the batch that waited goes out.
    let store = sluice::server::open_store(&server.store).await.unwrap();
    store
        .set_project_quota_overrides(&server.project.project_id, Some(r#"{"instances": 4}"#))
        .await
        .unwrap();
    let waiting_id = waiting["id"].as_str().unwrap().to_string();
    let delivered = wait_until("the waiting destination to deliver", || async {
        let view = view(waiting_id.clone()).await;
        (view["stats"]["delivered"] == 2).then_some(view)
    })
    .await;
    assert_eq!(delivered["stats"]["failed_attempts"], 0, "{delivered}");
    assert_eq!(delivered["stats"]["dead_lettered_total"], 0, "{delivered}");
    let outcomes: Vec<&Value> = delivered["recent_attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|attempt| &attempt["outcome"])
        .collect();
    assert_eq!(outcomes, vec![&json!("delivered")], "{delivered}");
    let bodies = bodies.lock().unwrap();
    assert_eq!(bodies.len(), 2, "both destinations got their batch");
}
