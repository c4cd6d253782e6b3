//! What every HTTP route shares: the OpenAPI document at
//! `/api/openapi.json`, one error shape (`{"type", "code", "detail",
//! "attr"}`) for the API, capture and axum's own refusals alike, and cursor
//! pagination on every list.

use reqwest::Method;
use serde_json::{Value, json};
use sluice::store::Backend;

use crate::common::server::{TestServer, answer, wait_until};

/// Asserts `body` is the one error shape, with this type and code.
fn assert_error(body: &Value, kind: &str, code: &str) {
    let mut fields: Vec<&str> = body
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {body}"))
        .keys()
        .map(String::as_str)
        .collect();
    fields.sort();
    assert_eq!(fields, ["attr", "code", "detail", "type"], "{body}");
    assert_eq!(
        (body["type"].as_str(), body["code"].as_str()),
        (Some(kind), Some(code)),
        "{body}"
    );
    assert!(!body["detail"].as_str().unwrap().is_empty(), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_openapi_document_is_served_without_a_key_and_lists_every_route() {
    let server = TestServer::start(Backend::Sqlite).await;
    let (status, doc) = server.get_path("/api/openapi.json").await;
    assert_eq!(status, 200, "{doc}");
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    let parsed = oas3::from_json(doc.to_string()).unwrap();
    assert!(parsed.paths.unwrap().len() > 20);
    assert!(doc["components"]["securitySchemes"]["api_key"].is_object());

    // Every documented operation is routed: sent with no key and no body,
    // none gets the router's unknown-route or wrong-method answer.
    let project = &server.project.project_id;
    let mut probed = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        let url = format!(
            "{}{}",
            server.base,
            path.replace("{project_id}", project)
                .replace("{config_id}", "no-such-config")
                .replace("{kind}", "track")
        );
        for method in ["get", "post", "patch", "put", "delete"] {
            if item.get(method).is_none() {
                continue;
            }
            let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let response = server
                .client
                .request(method.clone(), &url)
                .send()
                .await
                .unwrap();
            let (status, _, body) = answer(response).await;
            let code = body["code"].as_str().unwrap_or_default();
            assert!(
                !["unknown_route", "method_not_allowed"].contains(&code),
                "{method} {path} is documented, not routed: {status} {body}"
            );
            assert!(status < 500, "{method} {path}: {status} {body}");
            probed += 1;
        }
    }
    assert!(probed > 25, "only {probed} operations");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_refusal_has_the_one_error_shape() {
    let server = TestServer::start(Backend::Sqlite).await;
    let base = &server.base;
    let project = &server.project.project_id;

    let response = server
        .client
        .get(format!("{base}/no/such/route"))
        .send()
        .await
        .unwrap();
    let (status, _, body) = answer(response).await;
    assert_eq!(status, 404);
    assert_error(&body, "not_found", "unknown_route");

    let response = server
        .client
        .delete(format!("{base}/api/projects/{project}/events"))
        .send()
        .await
        .unwrap();
    let (status, _, body) = answer(response).await;
    assert_eq!(status, 405);
    assert_error(&body, "validation_error", "method_not_allowed");

    let response = server
        .client
        .get(format!("{base}/api/projects/{project}/events"))
        .send()
        .await
        .unwrap();
    let (status, _, body) = answer(response).await;
    assert_eq!(status, 401);
    assert_error(&body, "authentication_error", "missing_api_key");

    let (status, body) = server
        .call_api_as(&server.other, Method::GET, "/events", None)
        .await;
    assert_eq!(status, 200, "{body}");
    let response = server
        .client
        .get(format!("{base}/api/projects/{project}/events"))
        .bearer_auth(&server.other.api_key)
        .send()
        .await
        .unwrap();
    let (status, _, body) = answer(response).await;
    assert_eq!(status, 403);
    assert_error(&body, "permission_denied", "not_this_keys_resource");
    let response = server
        .client
        .get(format!("{base}/api/projects/{project}/events"))
        .bearer_auth("phx_not_a_key")
        .send()
        .await
        .unwrap();
    let (status, _, body) = answer(response).await;
    assert_eq!(status, 401);
    assert_error(&body, "authentication_error", "invalid_api_key");

    let (status, body) = server.call_api(Method::GET, "/events?limit=0", None).await;
    assert_eq!(status, 400);
    assert_error(&body, "validation_error", "invalid_input");
    assert_eq!(body["attr"], "limit");

    let (status, body) = server
        .call_api(Method::GET, "/events?after=yesterday", None)
        .await;
    assert_eq!(status, 400);
    assert_eq!(body["attr"], "after", "{body}");

    let (status, body) = server
        .call_api(Method::POST, "/plugin-configs", Some(json!({"config": {}})))
        .await;
    assert_eq!(status, 400);
    assert_error(&body, "validation_error", "invalid_body");
    assert_eq!(body["attr"], "plugin_sha256");

    let (status, body) = server
        .call_api(
            Method::POST,
            "/plugin-configs",
            Some(json!({"plugin_sha256": "x", "enabeld": true})),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(body["attr"], "enabeld", "{body}");

    let response = server
        .client
        .post(format!("{base}/api/projects/{project}/plugin-configs"))
        .bearer_auth(&server.project.api_key)
        .body(r#"{"plugin_sha256": "x"}"#)
        .send()
        .await
        .unwrap();
    let (status, _, body) = answer(response).await;
    assert_eq!(status, 400);
    assert_error(&body, "validation_error", "unsupported_media_type");

    let (status, body) = server
        .call_api(
            Method::PATCH,
            "/plugin-configs/nope",
            Some(json!({"enabled": true})),
        )
        .await;
    assert_eq!(status, 404);
    assert_error(&body, "not_found", "not_found");

    let (status, body) = server
        .call_api(Method::PATCH, "", Some(json!({"timezone": "Mars/Olympus"})))
        .await;
    assert_eq!(status, 400);
    assert_eq!(body["attr"], "timezone", "{body}");

    let (status, body) = server
        .call_api(
            Method::POST,
            "/query",
            Some(json!({"kind": "trends", "intreval": "day"})),
        )
        .await;
    assert_eq!(status, 400);
    assert_error(&body, "validation_error", "invalid_query");

    // Capture answers the same shape.
    let response = server
        .client
        .post(format!("{base}/batch/"))
        .header("content-type", "application/json")
        .body(r#"{"batch": [{"event": "e", "distinct_id": "d"}]}"#)
        .send()
        .await
        .unwrap();
    let (status, _, body) = answer(response).await;
    assert_eq!(status, 401);
    assert_error(&body, "authentication_error", "missing_token");
    assert_eq!(body["attr"], "api_key");

    let response = server
        .client
        .post(format!("{base}/v1/nonsense"))
        .basic_auth(&server.project.capture_token, None::<&str>)
        .body("{}")
        .send()
        .await
        .unwrap();
    let (status, _, body) = answer(response).await;
    assert_eq!(status, 400);
    assert_error(&body, "validation_error", "invalid_payload");
}

/// Reads every page of `path` with `limit`, checking each page's size; the
/// results in order.
async fn all_pages(server: &TestServer, path: &str, limit: usize) -> Vec<Value> {
    let separator = if path.contains('?') { '&' } else { '?' };
    let mut results = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let url = match &cursor {
            Some(cursor) => format!("{path}{separator}limit={limit}&cursor={cursor}"),
            None => format!("{path}{separator}limit={limit}"),
        };
        let (status, page) = server.call_api(Method::GET, &url, None).await;
        assert_eq!(status, 200, "{url}: {page}");
        let rows = page["results"].as_array().unwrap();
        assert!(rows.len() <= limit, "{url}: {page}");
        results.extend(rows.iter().cloned());
        match page["next"].as_str() {
            Some(next) => {
                assert_eq!(rows.len(), limit, "a page before the last is full");
                cursor = Some(next.to_string());
            }
            None => {
                assert!(page["next"].is_null(), "{page}");
                return results;
            }
        }
    }
}

async fn every_list_pages_through_each_row_once(backend: Backend) {
    let server = TestServer::start(backend).await;
    // Five events a fail-closed plugin cannot handle: five dead letters,
    // and a log line for each, beside the stored events of another batch.
    let install = server
        .upload_and_install("wasi-file-read", json!({}), "closed")
        .await;
    let config_id = install["id"].as_str().unwrap().to_string();
    let events: Vec<Value> = (0..5)
        .map(|i| json!({"event": "e", "distinct_id": format!("d{i}")}))
        .collect();
    let (status, body) = server.capture_batch(Value::Array(events)).await;
    assert_eq!(status, 200, "{body}");
    wait_until("5 dead letters", || async {
        let (_, body) = server.call_api(Method::GET, "/dead-letters", None).await;
        (body["results"].as_array().unwrap().len() == 5).then_some(())
    })
    .await;
    let (status, body) = server
        .call_api(
            Method::PATCH,
            &format!("/plugin-configs/{config_id}"),
            Some(json!({"enabled": false})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // Same timestamp on several events: the uuid orders them.
    let events: Vec<Value> = (0..7)
        .map(|i| json!({"event": "page", "distinct_id": format!("u{i}"), "timestamp": "2026-01-01T00:00:00Z"}))
        .collect();
    let (status, body) = server.capture_batch(Value::Array(events)).await;
    assert_eq!(status, 200, "{body}");
    server.wait_events(7).await;

    let events = all_pages(&server, "/events?event=page", 2).await;
    assert_eq!(events.len(), 7);
    let keys: Vec<(String, String)> = events
        .iter()
        .map(|e| {
            (
                e["timestamp"].as_str().unwrap().into(),
                e["uuid"].as_str().unwrap().into(),
            )
        })
        .collect();
    let mut newest_first = keys.clone();
    newest_first.sort();
    newest_first.reverse();
    newest_first.dedup();
    assert_eq!(keys, newest_first, "newest first, each once");

    let letters = all_pages(&server, "/dead-letters", 2).await;
    let ids: Vec<i64> = letters.iter().map(|l| l["id"].as_i64().unwrap()).collect();
    let mut expected = ids.clone();
    expected.sort();
    expected.reverse();
    expected.dedup();
    assert_eq!((ids.len(), &ids), (5, &expected));

    let logs = all_pages(&server, &format!("/plugin-configs/{config_id}/logs"), 2).await;
    let (_, whole) = server
        .call_api(
            Method::GET,
            &format!("/plugin-configs/{config_id}/logs?limit=1000"),
            None,
        )
        .await;
    assert_eq!(&logs, whole["results"].as_array().unwrap());
    assert!(logs.len() >= 5, "{logs:?}");

    for _ in 0..2 {
        server
            .upload_and_install("wasi-file-read", json!({}), "open")
            .await;
    }
    let configs = all_pages(&server, "/plugin-configs", 2).await;
    let ids: Vec<&str> = configs.iter().map(|c| c["id"].as_str().unwrap()).collect();
    let (_, whole) = server.call_api(Method::GET, "/plugin-configs", None).await;
    let all: Vec<&str> = whole["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!((ids.len(), &ids), (3, &all));
    let (status, body) = server
        .call_api(Method::GET, "/destinations?limit=1", None)
        .await;
    assert_eq!(
        (status, &body),
        (200, &json!({"results": [], "next": null}))
    );

    for list in [
        "/events",
        "/dead-letters",
        "/plugin-configs",
        "/destinations",
        &format!("/plugin-configs/{config_id}/logs"),
    ] {
        let (status, body) = server
            .call_api(
                Method::GET,
                &format!("{list}?cursor=bm90LWEtY3Vyc29y"),
                None,
            )
            .await;
        assert_eq!(status, 400, "{list}: {body}");
        assert_error(&body, "validation_error", "invalid_cursor");
        assert_eq!(body["attr"], "cursor");
    }
}

on_both_backends!(every_list_pages_through_each_row_once);
