//! Secrets in plugin configs: the API never returns them, and a change
//! that moves where a plugin sends its requests must give them again, so
//! a key holder cannot point a destination at their own host and have the
//! stored token sent there.

use reqwest::Method;
use serde_json::{Value, json};
use sluice::store::Backend;

use crate::common::server::TestServer;

/// Installs `plugin` with `config`; the install's id.
async fn install(server: &TestServer, plugin: &str, config: Value) -> String {
    server.upload_and_install(plugin, config, "open").await["id"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn patch(server: &TestServer, id: &str, config: Value) -> (u16, Value) {
    server
        .call_api(
            Method::PATCH,
            &format!("/plugin-configs/{id}"),
            Some(json!({"config": config})),
        )
        .await
}

#[tokio::test]
async fn moving_a_destinations_host_needs_its_secrets_again() {
    let server = TestServer::start(Backend::Sqlite).await;
    // (plugin, config, the field naming its host, the secrets)
    let cases = [
        (
            "webhook",
            json!({"url": "https://hooks.example.com/in", "secret": "hmac-key-123456"}),
            "url",
            vec!["secret"],
        ),
        (
            "sendgrid",
            json!({"api_key": "SG.secret-key-123456"}),
            "base_url",
            vec!["api_key"],
        ),
        (
            "hubspot",
            json!({"token": "pat-na1-secret-123456"}),
            "base_url",
            vec!["token"],
        ),
    ];
    for (plugin, config, host_field, secrets) in cases {
        let id = install(&server, plugin, config.clone()).await;

        // The host moves and the secrets are left out: refused, naming both.
        let mut moved = config.clone();
        for secret in &secrets {
            moved.as_object_mut().unwrap().remove(*secret);
        }
        moved[host_field] = json!("https://collector.attacker.example/steal");
        let (status, body) = patch(&server, &id, moved.clone()).await;
        assert_eq!(status, 400, "{plugin}: {body}");
        let detail = body["detail"].as_str().unwrap();
        assert!(
            detail.contains(&format!("`{host_field}`")),
            "{plugin}: {detail}"
        );
        for secret in &secrets {
            assert!(
                detail.contains(&format!("`{secret}`")),
                "{plugin}: {detail}"
            );
        }
        let stored = server.plugin_config_view(&id).await;
        assert_ne!(
            stored["config"][host_field],
            json!("https://collector.attacker.example/steal"),
            "{plugin}: nothing changed"
        );

        // Given again with the new host: accepted.
        let mut given = moved.clone();
        for secret in &secrets {
            given[*secret] = json!("a-new-secret-654321");
        }
        let (status, body) = patch(&server, &id, given).await;
        assert_eq!(status, 200, "{plugin}: {body}");

        // A change that leaves the host alone keeps the stored secrets.
        let (status, body) = patch(&server, &id, moved).await;
        assert_eq!(status, 200, "{plugin}: {body}");
        assert_eq!(
            body["secrets_set"],
            json!(secrets),
            "{plugin}: the secrets are still set: {body}"
        );
    }
}

#[tokio::test]
async fn a_config_whose_manifest_cannot_be_read_shows_no_values() {
    let server = TestServer::start(Backend::Sqlite).await;
    let id = install(
        &server,
        "webhook",
        json!({"url": "https://hooks.example.com/in", "secret": "hmac-key-123456"}),
    )
    .await;
    // Which fields are secret comes from the stored manifest.
    server
        .execute_sql("UPDATE plugins SET manifest = 'not a manifest'")
        .await;
    let view = server.plugin_config_view(&id).await;
    assert_eq!(view["config"], json!({}), "{view}");
    assert!(!view.to_string().contains("hmac-key-123456"), "{view}");
    assert!(
        view["config_hidden"]
            .as_str()
            .unwrap()
            .contains("upload the plugin again"),
        "{view}"
    );
}
