//! Every `/api` route, read from the server's own OpenAPI document so that a
//! new route cannot be left out, refuses keys that must not reach project
//! B's resources: a key of another organisation, a read-only key on
//! writes, a key limited to other projects, and a revoked key, each with
//! the status docs/api.md gives, and with nothing of B read or changed.

use reqwest::Method;
use serde_json::{Value, json};
use sluice::server::open_store;
use sluice::store::{Backend, KeySpec, Scope};

use crate::common::server::{TestServer, answer};

/// Project B's organisation, and what the attacks aim at.
struct Target {
    organisation: String,
    project: String,
    config: String,
    key_id: String,
    capture_token: String,
}

async fn key(
    server: &TestServer,
    organisation: &str,
    scope: Scope,
    projects: Option<Vec<String>>,
) -> (String, String) {
    let store = open_store(&server.store).await.unwrap();
    let made = store
        .create_key(&KeySpec {
            organisation_id: organisation.to_string(),
            name: format!("{scope:?}"),
            scope,
            projects,
            created_by: "cli".into(),
        })
        .await
        .unwrap();
    store.close().await;
    (made.api_key, made.key.id)
}

async fn call(server: &TestServer, key: &str, method: &Method, path: &str) -> (u16, Value) {
    let mut request = server
        .client
        .request(method.clone(), format!("{}{path}", server.base))
        .bearer_auth(key);
    if matches!(*method, Method::POST | Method::PATCH | Method::PUT) {
        request = request
            .header("content-type", "application/json")
            .body("{}");
    }
    let (status, _, body) = answer(request.send().await.unwrap()).await;
    (status, body)
}

/// The document's `/api` operations: (method, path template, scope).
async fn operations(server: &TestServer) -> Vec<(Method, String, String)> {
    let text = server
        .client
        .get(format!("{}/api/openapi.json", server.base))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let document: Value = serde_json::from_slice(&text).unwrap();
    let mut found = Vec::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        if !path.starts_with("/api/") || path == "/api/openapi.json" {
            continue;
        }
        for (method, operation) in item.as_object().unwrap() {
            let Ok(method) = method.to_uppercase().parse::<Method>() else {
                continue;
            };
            let scope = operation["x-sluice-scope"]
                .as_str()
                .unwrap_or_else(|| panic!("{method} {path} has no x-sluice-scope"))
                .to_string();
            found.push((method, path.clone(), scope));
        }
    }
    found
}

fn fill(template: &str, target: &Target) -> String {
    let filled = template
        .replace("{project_id}", &target.project)
        .replace("{organisation_id}", &target.organisation)
        .replace("{config_id}", &target.config)
        .replace("{key_id}", &target.key_id);
    assert!(
        !filled.contains('{'),
        "{template} has a parameter this test does not fill: add it to `fill`"
    );
    filled
}

async fn every_route_refuses_keys_that_must_not_reach_project_b(backend: Backend) {
    let server = TestServer::start(backend).await;
    // B: an organisation with two projects, an admin key of all of it, and
    // a destination whose config the attacks aim at.
    let store = open_store(&server.store).await.unwrap();
    let organisation = store.create_organisation("b").await.unwrap().id;
    let b = store
        .create_project_with(Some(&organisation), "b", "UTC", true)
        .await
        .unwrap()
        .unwrap();
    let b2 = store
        .create_project_with(Some(&organisation), "b2", "UTC", false)
        .await
        .unwrap()
        .unwrap();
    store.close().await;
    let installed = server
        .upload_and_install_as(
            &b,
            "webhook",
            json!({"url": "http://127.0.0.1:9/in", "secret": "b-secret-123456"}),
            "open",
        )
        .await;
    let (reader, reader_id) = key(&server, &organisation, Scope::Read, None).await;
    let (limited, _) = key(
        &server,
        &organisation,
        Scope::Admin,
        Some(vec![b2.project_id.clone()]),
    )
    .await;
    let (revoked, revoked_id) = key(&server, &organisation, Scope::Admin, None).await;
    let (root, _) = key(&server, &organisation, Scope::Admin, None).await;
    let (writer, _) = key(&server, &organisation, Scope::Write, None).await;
    let store = open_store(&server.store).await.unwrap();
    store.revoke_key_by_id(&revoked_id).await.unwrap();
    store.close().await;
    let target = Target {
        organisation: organisation.clone(),
        project: b.project_id.clone(),
        config: installed["id"].as_str().unwrap().to_string(),
        key_id: reader_id.clone(),
        capture_token: b.capture_token.clone(),
    };
    let before = server
        .call_api_as(&b, Method::GET, "/plugin-configs", None)
        .await;

    let operations = operations(&server).await;
    assert!(
        operations.len() >= 25,
        "the document lists the API: {operations:?}"
    );
    let foreign = server.project.api_key.clone();
    for (method, template, scope) in &operations {
        let path = fill(template, &target);
        let what = format!("{method} {template}");
        let own_key_only = template == "/api/me";

        // A key of another organisation.
        if !own_key_only {
            let (status, body) = call(&server, &foreign, method, &path).await;
            assert_eq!(
                status, 403,
                "{what} with another organisation's key: {body}"
            );
            assert_eq!(body["code"], "not_this_keys_resource", "{what}: {body}");
        }

        // A read-only key of B's organisation, on writes.
        if scope != "read" {
            let (status, body) = call(&server, &reader, method, &path).await;
            assert_eq!(status, 403, "{what} with a read-only key: {body}");
            assert_eq!(body["code"], "scope_too_low", "{what}: {body}");
        }

        // A key of B's organisation limited to B2: refused on B's routes;
        // on the organisation's routes it may act on B2 alone, so nothing
        // of B may show.
        if template.contains("{project_id}") {
            let (status, body) = call(&server, &limited, method, &path).await;
            assert_eq!(
                status, 403,
                "{what} with a key limited to another project: {body}"
            );
            assert_eq!(body["code"], "not_this_keys_resource", "{what}: {body}");
        } else if !own_key_only {
            let (status, body) = call(&server, &limited, method, &path).await;
            assert!(
                status >= 400 || !body.to_string().contains(&target.project),
                "{what} with a key limited to another project showed project B: {status} {body}"
            );
        }

        // A revoked key of B's organisation, anywhere.
        let (status, body) = call(&server, &revoked, method, &path).await;
        assert_eq!(status, 401, "{what} with a revoked key: {body}");
        assert_eq!(body["code"], "revoked_api_key", "{what}: {body}");
    }

    // Nothing of B changed: its configs, its capture token, its keys.
    let after = server
        .call_api_as(&b, Method::GET, "/plugin-configs", None)
        .await;
    assert_eq!(before, after);
    let (_, tokens) = server
        .call_api_as(&b, Method::GET, "/capture-tokens", None)
        .await;
    assert_eq!(tokens["results"].as_array().unwrap().len(), 1, "{tokens}");
    assert_eq!(tokens["results"][0]["token"], target.capture_token);
    let (status, me) = call(&server, &reader, &Method::GET, "/api/me").await;
    assert_eq!(status, 200, "the read key was not revoked: {me}");
    let (_, keys) = call(
        &server,
        &root,
        &Method::GET,
        &format!("/api/organisations/{organisation}/keys"),
    )
    .await;
    assert!(
        keys["results"]
            .as_array()
            .unwrap()
            .iter()
            .all(|k| (k["id"] == revoked_id) != k["revoked_at"].is_null()),
        "{keys}"
    );

    // The scope the document gives each route is the one it enforces: a
    // key of that scope gets past the check (whatever the empty body then
    // earns it), one a step below does not. Admin routes are not called
    // with an admin key here: a rotation would change what was checked.
    for (method, template, scope) in &operations {
        let path = fill(template, &target);
        let what = format!("{method} {template} ({scope})");
        let (holder, below) = match scope.as_str() {
            "read" => (Some(&reader), None),
            "write" => (Some(&writer), Some(&reader)),
            "admin" => (None, Some(&writer)),
            other => panic!("{what}: unknown scope {other}"),
        };
        if let Some(holder) = holder {
            let (status, body) = call(&server, holder, method, &path).await;
            assert!(
                status != 403 && status != 401,
                "{what} refused a key of its own scope: {status} {body}"
            );
        }
        if let Some(below) = below {
            let (status, body) = call(&server, below, method, &path).await;
            assert_eq!(status, 403, "{what} with a key below its scope: {body}");
            assert_eq!(body["code"], "scope_too_low", "{what}: {body}");
        }
    }
}

on_both_backends!(every_route_refuses_keys_that_must_not_reach_project_b);
