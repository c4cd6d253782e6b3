//! Capture at the edges of what clients send: the quirks of old SDKs,
//! bodies at and past every limit, impossible client times, and clients
//! too slow to finish a request. Every refusal is a clear JSON error, the
//! server stays up, and nothing of a refused request is stored.

use std::io::Write;
use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};
use sluice::store::Backend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::server::{TestServer, wait_until};

fn form(fields: &[(&str, &str)]) -> String {
    let mut form = form_urlencoded::Serializer::new(String::new());
    for (name, value) in fields {
        form.append_pair(name, value);
    }
    form.finish()
}

fn gzip_fast(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// A batch as posthog-js sends it: each event carries the token in its
/// properties.
fn posthog_js_batch(token: &str, distinct_id: &str, version: &str) -> Value {
    json!([{
        "event": "$pageview",
        "properties": {
            "$os": "Linux",
            "$browser": "Chrome",
            "$current_url": "https://app.example.com/pricing?utm_source=news",
            "$lib": "web",
            "$lib_version": version,
            "distinct_id": distinct_id,
            "$device_id": "18b7c1f2e3d4",
            "token": token,
            "$time": 1_700_000_000.123
        },
        "timestamp": "2023-11-14T22:13:20.123Z"
    }])
}

async fn post_form(server: &TestServer, query: &str, body: String) -> (u16, Value) {
    let response = server
        .client
        .post(format!("{}/e/?{query}", server.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (
        status,
        serde_json::from_str(&response.text().await.unwrap()).unwrap_or(Value::Null),
    )
}

async fn post_raw(
    server: &TestServer,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (u16, Value) {
    let mut request = server.client.post(format!("{}{path}", server.base));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.body(body).send().await.unwrap();
    let status = response.status().as_u16();
    (
        status,
        serde_json::from_str(&response.text().await.unwrap()).unwrap_or(Value::Null),
    )
}

async fn posthog_js_compression_quirks_are_stored(backend: Backend) {
    let server = TestServer::start(backend).await;
    let token = server.project.capture_token.clone();
    let b64 = base64::engine::general_purpose::STANDARD;

    // posthog-js 1.78 says gzip-js in the query while its form holds plain
    // base64 JSON; PostHog stores it.
    let text = posthog_js_batch(&token, "says-gzip-sends-base64", "1.78.0").to_string();
    let (status, body) = post_form(
        &server,
        "compression=gzip-js&ip=1&_=1700000000123&ver=1.78.0",
        form(&[("data", &b64.encode(&text))]),
    )
    .await;
    assert_eq!((status, &body), (200, &json!({"status": 1})));

    // Older posthog-js compressed with LZ-string, named in the query...
    let text = posthog_js_batch(&token, "lz64-in-query", "1.20.0").to_string();
    let (status, body) = post_form(
        &server,
        "compression=lz64&ip=1&_=1600000000000&ver=1.20.0",
        form(&[("data", &lz_str::compress_to_base64(&text))]),
    )
    .await;
    assert_eq!((status, &body), (200, &json!({"status": 1})));

    // ...or beside `data` in the form.
    let text = posthog_js_batch(&token, "lz64-in-form", "1.10.0").to_string();
    let (status, body) = post_form(
        &server,
        "ip=1&_=1500000000000",
        form(&[
            ("data", &lz_str::compress_to_base64(&text)),
            ("compression", "lz64"),
        ]),
    )
    .await;
    assert_eq!((status, &body), (200, &json!({"status": 1})));

    // gzip-js with a real gzip body, as posthog-js sends today.
    let text = posthog_js_batch(&token, "real-gzip", "1.200.0").to_string();
    let (status, _) = post_raw(
        &server,
        "/e/?compression=gzip-js&ip=1&_=1700000000000&ver=1.200.0",
        &[("content-type", "text/plain")],
        gzip_fast(text.as_bytes()),
    )
    .await;
    assert_eq!(status, 200);

    let stored = server.wait_events(4).await;
    let mut ids: Vec<&str> = stored
        .iter()
        .map(|e| e["distinct_id"].as_str().unwrap())
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        [
            "lz64-in-form",
            "lz64-in-query",
            "real-gzip",
            "says-gzip-sends-base64"
        ]
    );
    for event in &stored {
        assert_eq!(event["event"], "$pageview");
        assert_eq!(
            event["properties"]["$current_url"],
            "https://app.example.com/pricing?utm_source=news"
        );
    }

    // A body that claims LZ-string and is not gets a 400 naming it.
    let (status, body) = post_form(
        &server,
        "compression=lz64",
        form(&[("data", "!!not lz-string!!")]),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("not LZ-string base64"),
        "{body}"
    );
    // So does a body labelled `Content-Encoding: gzip` that is not gzip.
    let (status, body) = post_raw(
        &server,
        "/batch/",
        &[
            ("content-encoding", "gzip"),
            ("content-type", "application/json"),
        ],
        json!({"api_key": token, "batch": [{"event": "e", "distinct_id": "d"}]})
            .to_string()
            .into_bytes(),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("is not gzip"),
        "{body}"
    );
}

/// A server whose capture takes bodies of at most 1 MiB.
async fn small_bodies(backend: Backend) -> TestServer {
    TestServer::start_with(backend, |mut config| {
        config.max_body_bytes = 1 << 20;
        config
    })
    .await
}

async fn bodies_past_the_limits_get_clear_errors_and_store_nothing(backend: Backend) {
    let server = small_bodies(backend).await;
    let token = server.project.capture_token.clone();
    let json_headers = [("content-type", "application/json")];
    let event = |properties: Value| json!({"api_key": token, "batch": [{"event": "e", "distinct_id": "d", "properties": properties}]});
    // What is sent, and the status and code it must get.
    type Refusal<'a> = (&'a str, u16, &'a str, Vec<u8>, Vec<(&'a str, &'a str)>);
    let refusals: Vec<Refusal> = vec![
        (
            "oversized",
            413,
            "payload_too_large",
            event(json!({"blob": "x".repeat(2 << 20)}))
                .to_string()
                .into_bytes(),
            json_headers.to_vec(),
        ),
        (
            "gzip bomb",
            413,
            "payload_too_large",
            gzip_fast(&vec![b' '; 64 << 20]),
            vec![
                ("content-type", "application/json"),
                ("content-encoding", "gzip"),
            ],
        ),
        (
            "LZ-string bomb",
            413,
            "payload_too_large",
            form(&[("data", &lz_str::compress_to_base64(&"a".repeat(3_000_000)))]).into_bytes(),
            vec![("content-type", "application/x-www-form-urlencoded")],
        ),
        (
            "deeply nested",
            400,
            "invalid_payload",
            {
                let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
                format!(
                    r#"{{"api_key":"{token}","batch":[{{"event":"e","distinct_id":"d","properties":{{"x":{deep}}}}}]}}"#
                )
                .into_bytes()
            },
            json_headers.to_vec(),
        ),
        (
            "invalid UTF-8",
            400,
            "invalid_payload",
            [
                format!(r#"{{"api_key":"{token}","batch":[{{"event":"bad "#).as_bytes(),
                &[0xff, 0xfe],
                br#"","distinct_id":"d"}]}"#,
            ]
            .concat(),
            json_headers.to_vec(),
        ),
        (
            "invalid UTF-8 in a base64 form",
            400,
            "invalid_payload",
            form(&[(
                "data",
                &base64::engine::general_purpose::STANDARD.encode(
                    [
                        br#"[{"event":"bad "#.as_slice(),
                        &[0xc3, 0x28],
                        format!(r#"","distinct_id":"d","api_key":"{token}"}}]"#).as_bytes(),
                    ]
                    .concat(),
                ),
            )])
            .into_bytes(),
            vec![("content-type", "application/x-www-form-urlencoded")],
        ),
    ];
    let path = "/batch/?compression=lz64";
    for (what, status, code, body, headers) in refusals {
        let path = if what.starts_with("LZ") {
            path
        } else {
            "/batch/"
        };
        let (got, answer) = post_raw(&server, path, &headers, body).await;
        assert_eq!(
            (got, answer["code"].as_str()),
            (status, Some(code)),
            "{what}: {answer}"
        );
        assert!(
            answer["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{what}: {answer}"
        );
        if what == "deeply nested" {
            let detail = answer["detail"].as_str().unwrap();
            assert!(detail.contains("deeper than 128 levels"), "{detail}");
        }
    }

    // The server is up, and only what came after is stored.
    let stored = stored_through(&server, "after").await;
    assert_eq!(stored.len(), 1, "{stored:?}");
}

/// Sends an event named `sentinel` and waits until it is stored; every
/// event stored by then. The worker stores in queue order, so anything a
/// refused request had wrongly queued would be stored by then too.
async fn stored_through(server: &TestServer, sentinel: &str) -> Vec<Value> {
    let (status, answer) = server
        .capture_batch(json!([{"event": sentinel, "distinct_id": "d"}]))
        .await;
    assert_eq!(status, 200, "{answer}");
    wait_until(&format!("the event {sentinel} to be stored"), || async {
        let (status, body) = server
            .call_api(reqwest::Method::GET, "/events?limit=1000", None)
            .await;
        assert_eq!(status, 200, "{body}");
        let stored = body["results"].as_array().unwrap().clone();
        stored
            .iter()
            .any(|event| event["event"] == sentinel)
            .then_some(stored)
    })
    .await
}

async fn an_event_of_a_million_properties_is_refused_whole(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut body = String::with_capacity(16 << 20);
    body.push_str(&format!(
        r#"{{"api_key":"{}","batch":[{{"event":"ok","distinct_id":"d"}},{{"event":"huge","distinct_id":"d","properties":{{"#,
        server.project.capture_token
    ));
    for i in 0..1_000_000 {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&format!(r#""p{i}":0"#));
    }
    body.push_str("}}]}");
    assert!(body.len() < 20 << 20);
    let (status, answer) = post_raw(
        &server,
        "/batch/",
        &[("content-type", "application/json")],
        body.into_bytes(),
    )
    .await;
    assert_eq!(status, 413, "{answer}");
    assert_eq!(answer["code"], "event_too_large");
    assert!(
        answer["detail"]
            .as_str()
            .unwrap()
            .starts_with("event #2 is larger than the limit of 1048576 bytes per event"),
        "{answer}"
    );
    let stored = stored_through(&server, "after").await;
    assert_eq!(stored.len(), 1, "nothing of the refused batch: {stored:?}");
}

async fn impossible_client_times_get_a_400_and_the_server_stays_up(backend: Backend) {
    let server = TestServer::start(backend).await;
    let cases = [
        json!([{"event": "e", "distinct_id": "d", "offset": i64::MIN}]),
        json!([{"event": "e", "distinct_id": "d", "offset": i64::MAX}]),
        json!([{"event": "e", "distinct_id": "d", "timestamp": "0000-06-01T00:00:00Z"}]),
        json!([{"event": "e", "distinct_id": "d", "timestamp": "0001-01-01T00:00:00Z",
                "sent_at": "9999-12-31T00:00:00Z"}]),
        json!([{"event": "e", "distinct_id": "d", "timestamp": "9999-12-31T00:00:00Z",
                "sent_at": "0001-01-01T00:00:00Z"}]),
    ];
    for events in cases {
        let (status, answer) = server.capture_batch(events.clone()).await;
        assert_eq!(status, 400, "{events}: {answer}");
        assert!(
            answer["detail"]
                .as_str()
                .unwrap()
                .contains("outside the years 1 to 9999"),
            "{answer}"
        );
    }
    // Segment's `sentAt` and `timestamp` go the same way.
    let response = server
        .client
        .post(format!("{}/v1/track", server.base))
        .basic_auth(&server.project.capture_token, Some(""))
        .header("content-type", "application/json")
        .body(
            (json!({"userId": "u", "event": "e", "timestamp": "9999-12-31T00:00:00Z",
                      "sentAt": "0001-01-01T00:00:00Z"}))
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let stored = stored_through(&server, "after").await;
    assert_eq!(stored.len(), 1, "{stored:?}");
}

/// A client that opens a connection and sends a request's headers a line
/// every 200 ms, for ever; true once the server has closed it.
async fn slowloris(base: &str) -> bool {
    let addr = base.trim_start_matches("http://").to_string();
    let Ok(mut stream) = tokio::net::TcpStream::connect(&addr).await else {
        return false;
    };
    if stream
        .write_all(b"POST /e/ HTTP/1.1\r\nHost: sluice\r\n")
        .await
        .is_err()
    {
        return true;
    }
    let mut buf = [0u8; 1024];
    for i in 0.. {
        let header = format!("X-Slow-{i}: a\r\n");
        if stream.write_all(header.as_bytes()).await.is_err() {
            return true;
        }
        // Closed (EOF or reset), or an answer (408) before the close.
        if let Ok(read) =
            tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await
        {
            let _ = read;
            return true;
        }
    }
    unreachable!()
}

async fn slow_clients_are_cut_off_and_do_not_stop_others(backend: Backend) {
    let server = TestServer::start_with(backend, |mut config| {
        config.max_connections = 32;
        config.header_timeout = Duration::from_secs(1);
        config
    })
    .await;
    // Three times as many slow clients as the server holds connections.
    let attackers: Vec<_> = (0..96)
        .map(|_| tokio::spawn(slowloris_until_closed(server.base.clone())))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Meanwhile an ordinary client, each request on a new connection,
    // gets every request through.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    for i in 0..10 {
        let response = client
            .post(format!("{}/batch/", server.base))
            .header("content-type", "application/json")
            .body(
                (json!({"api_key": server.project.capture_token,
                          "batch": [{"event": "ordinary", "distinct_id": format!("d{i}")}]}))
                .to_string(),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    // Every slow client was cut off by the server.
    for attacker in attackers {
        assert!(attacker.await.unwrap(), "a slow client was never cut off");
    }
    assert_eq!(server.wait_events(10).await.len(), 10);
}

/// [`slowloris`], bounded: false if the server had not closed the
/// connection after a minute.
async fn slowloris_until_closed(base: String) -> bool {
    tokio::time::timeout(Duration::from_secs(60), slowloris(&base))
        .await
        .unwrap_or(false)
}

async fn a_slow_api_body_gets_408_while_the_api_answers_others(backend: Backend) {
    let server = TestServer::start_with(backend, |mut config| {
        config.api_body_timeout = Duration::from_secs(1);
        config
    })
    .await;
    let addr = server.base.trim_start_matches("http://").to_string();
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /api/projects/{}/plugin-configs HTTP/1.1\r\nHost: sluice\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{",
        server.project.project_id, server.project.api_key
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // A byte every 100 ms, far slower than the body needs, until the
    // server answers.
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let answered = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if stream.write_all(b" ").await.is_err() {
                break;
            }
            if let Ok(read) =
                tokio::time::timeout(Duration::from_millis(100), stream.read(&mut buf)).await
            {
                match read {
                    Ok(0) | Err(_) => break,
                    Ok(n) => answer.extend_from_slice(&buf[..n]),
                }
            }
        }
    })
    .await;
    assert!(answered.is_ok(), "the slow body was never cut off");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"code\":\"body_timeout\""), "{text}");
    // Meanwhile, and after, the API answers others.
    let (status, body) = server
        .call_api(reqwest::Method::GET, "/plugin-configs", None)
        .await;
    assert_eq!(status, 200, "{body}");
}

on_both_backends!(
    posthog_js_compression_quirks_are_stored,
    bodies_past_the_limits_get_clear_errors_and_store_nothing,
    an_event_of_a_million_properties_is_refused_whole,
    impossible_client_times_get_a_400_and_the_server_stays_up,
    slow_clients_are_cut_off_and_do_not_stop_others,
    a_slow_api_body_gets_408_while_the_api_answers_others,
);
