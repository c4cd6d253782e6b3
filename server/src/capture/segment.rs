//! Segment's HTTP tracking API: `/v1/track`, `/identify`, `/page`,
//! `/screen`, `/group`, `/alias` and `/batch`. The write key is the Basic-auth
//! user (or `writeKey` in the body) and is the project's capture token. Each
//! message is mapped onto the PostHog event model, then goes through the same
//! normalisation and queue as PostHog capture.

use std::collections::HashMap;
use std::net::SocketAddr;

use crate::listener::{Peer, client_ip};
use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, header};
use axum::response::Response;
use axum::routing::post;
use base64::Engine;
use serde_json::{Map, Value, json};

use super::CaptureState;
use super::{CaptureError, RawBatch, body};
use crate::api::openapi::{CaptureErrors, JsonObject, SegmentOk};

/// The path the handler's attribute documents; it is served with a
/// trailing slash too.
pub(super) const DOCUMENTED_PATH: &str = "/v1/{kind}";

pub fn router<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    CaptureState: axum::extract::FromRef<S>,
{
    Router::new()
        .route(DOCUMENTED_PATH, post(capture))
        .route(&format!("{DOCUMENTED_PATH}/"), post(capture))
}

/// The Segment call in the path.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
struct SegmentPath {
    /// `track`, `identify`, `page`, `screen`, `group`, `alias` or `batch`.
    kind: String,
}

/// A Segment message (or `{"batch": [...]}` for `/v1/batch`), mapped to
/// PostHog's events. The write key is the capture token, as the Basic-auth
/// user or as `writeKey` in the body.
#[utoipa::path(post, path = "/v1/{kind}", tag = "capture", operation_id = "post_v1_kind",
    params(SegmentPath),
    request_body(content = JsonObject, description = "A Segment message or batch."),
    responses((status = 200, description = "Every message was stored.", body = SegmentOk), CaptureErrors),
    security((), ("write_key" = [])))]
async fn capture(
    State(state): State<CaptureState>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    Path(kind): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let mut events = None;
    let result = receive(&state, peer, kind, &query, &headers, body, &mut events).await;
    super::answer(result.map(|()| Json(json!({"success": true}))), events)
}

/// Reads, checks and stores one call; sets `events` once the body says
/// how many messages it holds.
async fn receive(
    state: &CaptureState,
    peer: SocketAddr,
    kind: String,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: Body,
    events: &mut Option<usize>,
) -> Result<(), CaptureError> {
    let kind = match kind.as_str() {
        "track" | "identify" | "page" | "screen" | "group" | "alias" | "batch" => kind,
        other => {
            return Err(CaptureError::Invalid(format!(
                "unknown Segment call /v1/{other}: use track, identify, page, screen, group, alias or batch"
            )));
        }
    };
    // The write key is usually the Basic-auth user: then it is checked
    // before the body is read, and an unknown key costs no parsing.
    let auth_key = basic_auth_user(headers);
    let admitted = match &auth_key {
        Some(key) => Some(
            super::admit(state, key)
                .await
                .map_err(CaptureError::unread)?,
        ),
        None => None,
    };
    let limit = state.config.max_body_bytes;
    let bytes = body::read(body, limit, state.config.capture_body_timeout).await?;
    let Value::Object(mut body) = state.parsers.parse(headers, query, bytes, limit).await? else {
        return Err(CaptureError::Invalid(
            "the body must be a JSON object".into(),
        ));
    };
    *events = Some(if kind == "batch" {
        body.get("batch")
            .and_then(Value::as_array)
            .map_or(0, Vec::len)
    } else {
        1
    });
    let project_id = match admitted {
        Some(project_id) => project_id,
        None => {
            let write_key = body
                .get("writeKey")
                .and_then(Value::as_str)
                .ok_or(CaptureError::MissingToken)?;
            super::admit(state, write_key).await?
        }
    };
    let sent_at = body
        .get("sentAt")
        .and_then(Value::as_str)
        .map(str::to_string);
    let messages = if kind == "batch" {
        let shared_context = body.remove("context");
        match body.remove("batch") {
            Some(Value::Array(items)) => items
                .into_iter()
                .enumerate()
                .map(|(i, item)| match item {
                    Value::Object(mut message) => {
                        if let (Some(context), false) =
                            (&shared_context, message.contains_key("context"))
                        {
                            message.insert("context".into(), context.clone());
                        }
                        let kind = message
                            .get("type")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string();
                        to_posthog(&kind, message)
                            .map_err(|m| CaptureError::Invalid(format!("message #{}: {m}", i + 1)))
                    }
                    _ => Err(CaptureError::Invalid(format!(
                        "message #{} is not a JSON object",
                        i + 1
                    ))),
                })
                .collect::<Result<Vec<_>, _>>()?,
            _ => {
                return Err(CaptureError::Invalid(
                    "`batch` must be an array of messages".into(),
                ));
            }
        }
    } else {
        vec![to_posthog(&kind, body).map_err(CaptureError::Invalid)?]
    };
    let batch = RawBatch {
        token: None,
        sent_at,
        events: messages,
    };
    let ip = state
        .config
        .record_ip
        .then(|| client_ip(headers, peer, &state.config.trusted_proxies));
    super::accept(state, &project_id, batch, ip).await?;
    Ok(())
}

fn basic_auth_user(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value
        .strip_prefix("Basic ")
        .or_else(|| value.strip_prefix("basic "))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let user = text.split_once(':').map(|(user, _)| user).unwrap_or(&text);
    (!user.is_empty()).then(|| user.to_string())
}

fn text(message: &Map<String, Value>, key: &str) -> Option<String> {
    match message.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    }
}

fn object(message: &mut Map<String, Value>, key: &str) -> Map<String, Value> {
    match message.remove(key) {
        Some(Value::Object(map)) => map,
        _ => Map::new(),
    }
}

/// A Segment message as a PostHog event: `userId` (else `anonymousId`) is
/// the distinct id, `messageId` the uuid (hashed into one if it is not a
/// UUID, so a retried message keeps its uuid), traits become `$set`.
fn to_posthog(kind: &str, mut message: Map<String, Value>) -> Result<Map<String, Value>, String> {
    let user_id = text(&message, "userId");
    let anonymous_id = text(&message, "anonymousId");
    let distinct_id = user_id
        .clone()
        .or_else(|| anonymous_id.clone())
        .ok_or("`userId` or `anonymousId` is required")?;
    let mut properties = object(&mut message, "properties");
    let traits = object(&mut message, "traits");
    let context = object(&mut message, "context");
    let event = match kind {
        "track" => text(&message, "event").ok_or("a track call needs `event`")?,
        "identify" => {
            if let Some(anonymous_id) = anonymous_id.filter(|a| Some(a) != user_id.as_ref()) {
                properties.insert("$anon_distinct_id".into(), Value::String(anonymous_id));
            }
            "$identify".into()
        }
        "page" => {
            if let Some(url) = properties.get("url").cloned() {
                properties.insert("$current_url".into(), url);
            }
            if let Some(name) = text(&message, "name") {
                properties.insert("name".into(), Value::String(name));
            }
            "$pageview".into()
        }
        "screen" => {
            if let Some(name) = text(&message, "name") {
                properties.insert("$screen_name".into(), Value::String(name));
            }
            "$screen".into()
        }
        "group" => {
            let group_id = text(&message, "groupId").ok_or("a group call needs `groupId`")?;
            properties.insert("$group_type".into(), Value::String("company".into()));
            properties.insert("$group_key".into(), Value::String(group_id));
            properties.insert("$group_set".into(), Value::Object(traits.clone()));
            "$groupidentify".into()
        }
        "alias" => {
            let previous =
                text(&message, "previousId").ok_or("an alias call needs `previousId`")?;
            properties.insert("alias".into(), Value::String(previous));
            "$create_alias".into()
        }
        "" => return Err("`type` is missing".into()),
        other => return Err(format!("unknown message type `{other}`")),
    };
    if !traits.is_empty() && kind != "group" {
        properties.insert("$set".into(), Value::Object(traits));
    }
    if let Some(traits) = context
        .get("traits")
        .and_then(Value::as_object)
        .filter(|t| !t.is_empty())
        && !properties.contains_key("$set")
    {
        properties.insert("$set".into(), Value::Object(traits.clone()));
    }
    map_context(&context, &mut properties);

    let mut out = Map::new();
    out.insert("event".into(), Value::String(event));
    out.insert("distinct_id".into(), Value::String(distinct_id));
    if let Some(message_id) = text(&message, "messageId") {
        let uuid = uuid::Uuid::parse_str(&message_id).unwrap_or_else(|_| {
            uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, message_id.as_bytes())
        });
        out.insert("uuid".into(), Value::String(uuid.to_string()));
    }
    for (from, to) in [("timestamp", "timestamp"), ("sentAt", "sent_at")] {
        if let Some(value) = message.remove(from) {
            out.insert(to.into(), value);
        }
    }
    out.insert("properties".into(), Value::Object(properties));
    Ok(out)
}

/// Segment's context fields that PostHog has names for.
fn map_context(context: &Map<String, Value>, properties: &mut Map<String, Value>) {
    let mut set = |key: &str, value: Option<&Value>| {
        if let Some(value) = value.filter(|v| !v.is_null())
            && !properties.contains_key(key)
        {
            properties.insert(key.into(), value.clone());
        }
    };
    set("$ip", context.get("ip"));
    set("$raw_user_agent", context.get("userAgent"));
    set("$lib", context.get("library").and_then(|l| l.get("name")));
    set(
        "$lib_version",
        context.get("library").and_then(|l| l.get("version")),
    );
    set(
        "$current_url",
        context.get("page").and_then(|p| p.get("url")),
    );
    set(
        "$referrer",
        context.get("page").and_then(|p| p.get("referrer")),
    );
    set("$locale", context.get("locale"));
    set("$timezone", context.get("timezone"));
}

/// The route of this module, for the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(capture))]
pub(super) struct Doc;

#[cfg(test)]
mod tests {
    use super::*;

    fn map(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn identify_sets_traits_and_links_the_anonymous_id() {
        let out = to_posthog(
            "identify",
            map(json!({"userId": "u1", "anonymousId": "anon", "traits": {"email": "a@b.co"}, "messageId": "m-1"})),
        )
        .unwrap();
        assert_eq!(out["event"], json!("$identify"));
        assert_eq!(out["distinct_id"], json!("u1"));
        assert_eq!(out["properties"]["$set"], json!({"email": "a@b.co"}));
        assert_eq!(out["properties"]["$anon_distinct_id"], json!("anon"));
        let again =
            to_posthog("identify", map(json!({"userId": "u1", "messageId": "m-1"}))).unwrap();
        assert_eq!(
            out["uuid"], again["uuid"],
            "a retried message keeps its uuid"
        );
    }

    #[test]
    fn alias_page_screen_and_group_map_to_posthog_events() {
        let alias =
            to_posthog("alias", map(json!({"userId": "new", "previousId": "old"}))).unwrap();
        assert_eq!(
            (alias["event"].clone(), alias["properties"]["alias"].clone()),
            (json!("$create_alias"), json!("old"))
        );
        let page = to_posthog("page", map(json!({"anonymousId": "a", "name": "Home", "properties": {"url": "https://x.test/"}})))
            .unwrap();
        assert_eq!(page["properties"]["$current_url"], json!("https://x.test/"));
        let screen = to_posthog("screen", map(json!({"userId": "u", "name": "Cart"}))).unwrap();
        assert_eq!(screen["properties"]["$screen_name"], json!("Cart"));
        let group = to_posthog(
            "group",
            map(json!({"userId": "u", "groupId": "acme", "traits": {"plan": "pro"}})),
        )
        .unwrap();
        assert_eq!(group["properties"]["$group_key"], json!("acme"));
        assert_eq!(group["properties"]["$group_set"], json!({"plan": "pro"}));
    }

    #[test]
    fn messages_without_an_id_are_refused() {
        let err = to_posthog("track", map(json!({"event": "e"}))).unwrap_err();
        assert_eq!(err, "`userId` or `anonymousId` is required");
    }
}
