//! The OpenAPI 3 document served at `GET /api/openapi.json`, generated from
//! the handlers' `#[utoipa::path]` attributes and the wire types' derives.
//!
//! Every route the server serves is in it: `server::tests` compares the
//! router's own route table with [`document`], so a route added without
//! its attribute, or left out of [`ApiDoc`], fails the build's tests.
//! Each `/api` operation carries `x-sluice-scope`, the key scope it needs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::{Operation, PathItem};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{ContentBuilder, ObjectBuilder, RefOr, Response, ResponseBuilder, Type};
use utoipa::{IntoParams, IntoResponses, Modify, OpenApi, ToSchema};

use super::error::ErrorBody;
use crate::model::Quotas;
use crate::store::{Attempt, DestinationStats, PluginLog};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Sluice",
        description = "Capture (PostHog- and Segment-compatible) and the management and query API. \
            Every error answer has the `ErrorBody` shape; see docs/api.md for the codes."
    ),
    components(schemas(ErrorBody)),
    modifiers(&Security),
    tags(
        (name = "capture", description = "Events in: PostHog's and Segment's wire formats, authorised by the project's capture token."),
        (name = "events", description = "Stored events and persons."),
        (name = "plugins", description = "Plugin files and their configs in a project's chain."),
        (name = "destinations", description = "Delivery state, pause and resume, dead letters and replay."),
        (name = "query", description = "Analytics queries and the project settings they use."),
        (name = "operations", description = "Liveness, readiness and this document."),
    )
)]
struct ApiDoc;

/// The document of the `/api` routes; `server` adds capture's and its own
/// (health, readiness, the document itself) and serves it.
pub fn document() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.merge(super::Doc::openapi());
    doc.merge(super::plugins::Doc::openapi());
    doc.merge(super::destinations::Doc::openapi());
    doc.merge(super::query::Doc::openapi());
    doc.merge(super::tenancy::Doc::openapi());
    doc
}

/// The bearer key of every `/api` route but the document itself, and
/// Segment's write key (the capture token as the Basic-auth user).
struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        components.add_security_scheme(
            "write_key",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Basic)),
        );
    }
}

/// Documents `to` as serving what `from` serves, for a handler routed at
/// several paths; its operations get ids of their own.
pub(crate) fn copy_path(openapi: &mut utoipa::openapi::OpenApi, from: &str, to: &str) {
    let Some(mut item) = openapi.paths.paths.get(from).cloned() else {
        panic!("{from} is not documented");
    };
    let slug: String = to
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let slug = slug.trim_matches('_').to_string();
    let slash = if to.ends_with('/') { "_slash" } else { "" };
    for (method, operation) in operations(&mut item) {
        operation.operation_id = Some(format!("{method}_{slug}{slash}"));
    }
    openapi.paths.paths.insert(to.to_string(), item);
}

pub(crate) fn operations(item: &mut PathItem) -> Vec<(&'static str, &mut Operation)> {
    [
        ("get", item.get.as_mut()),
        ("post", item.post.as_mut()),
        ("put", item.put.as_mut()),
        ("patch", item.patch.as_mut()),
        ("delete", item.delete.as_mut()),
    ]
    .into_iter()
    .filter_map(|(name, op)| op.map(|op| (name, op)))
    .collect()
}

/// The methods each path of the document serves, for the route test.
#[cfg(test)]
pub fn methods_by_path(
    openapi: &utoipa::openapi::OpenApi,
) -> BTreeMap<String, std::collections::BTreeSet<String>> {
    openapi
        .paths
        .paths
        .iter()
        .map(|(path, item)| {
            let mut item = item.clone();
            let methods = operations(&mut item)
                .into_iter()
                .map(|(method, _)| method.to_string())
                .collect();
            (path.clone(), methods)
        })
        .collect()
}

fn error_response(description: &str, retry: bool) -> RefOr<Response> {
    let mut response = ResponseBuilder::new().description(description).content(
        "application/json",
        ContentBuilder::new()
            .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                "ErrorBody",
            ))))
            .build(),
    );
    if retry {
        response = response.header(
            "Retry-After",
            HeaderBuilder::new()
                .schema(ObjectBuilder::new().schema_type(Type::Integer))
                .description(Some("Seconds to wait before sending again."))
                .build(),
        );
    }
    RefOr::T(response.build())
}

/// The error answers of every `/api` route.
pub struct Errors;

impl IntoResponses for Errors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        [
            (
                "400",
                error_response(
                    "The request is invalid; `attr` names the field or parameter.",
                    false,
                ),
            ),
            ("401", error_response("No API key was sent.", false)),
            (
                "403",
                error_response(
                    "The key may not act on this project, or a quota forbids the change.",
                    false,
                ),
            ),
            (
                "404",
                error_response("No such resource in this project.", false),
            ),
            (
                "429",
                error_response("Too many requests of this project at once.", true),
            ),
            (
                "500",
                error_response("The server failed; details are in its log.", false),
            ),
            (
                "503",
                error_response("The server cannot take the request now.", true),
            ),
        ]
        .into_iter()
        .map(|(status, response)| (status.to_string(), response))
        .collect()
    }
}

/// The error answers of the capture routes.
pub struct CaptureErrors;

impl IntoResponses for CaptureErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        [
            (
                "400",
                error_response("A request or event is invalid; nothing was stored.", false),
            ),
            (
                "401",
                error_response("No capture token, or an unknown one.", false),
            ),
            (
                "408",
                error_response("The body did not arrive in time.", false),
            ),
            (
                "413",
                error_response("The body, or its event count, is over the limit.", false),
            ),
            (
                "429",
                error_response(
                    "The token sends requests faster than its project's quota.",
                    true,
                ),
            ),
            (
                "503",
                error_response(
                    "The server is behind or busy; retry after `Retry-After`.",
                    true,
                ),
            ),
        ]
        .into_iter()
        .map(|(status, response)| (status.to_string(), response))
        .collect()
    }
}

/// The project in the path.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub struct ProjectPath {
    /// The project's id.
    project_id: String,
}

/// A plugin config of the project in the path.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub struct ConfigPath {
    /// The project's id.
    project_id: String,
    /// The plugin config's id.
    config_id: String,
}

/// A plugin file: the `.wasm` bytes.
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
#[allow(dead_code)]
pub struct WasmFile(Vec<u8>);

/// A free-form JSON object.
#[derive(ToSchema)]
#[schema(value_type = Object)]
#[allow(dead_code)]
pub struct JsonObject(Value);

/// One PostHog event.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct CaptureEvent {
    /// The event's name, such as `$pageview`.
    #[schema(min_length = 1)]
    event: String,
    /// Who did it; may instead be in `properties.distinct_id`.
    #[schema(min_length = 1)]
    distinct_id: String,
    #[schema(value_type = Option<Object>)]
    properties: Option<Value>,
    /// When it happened (RFC 3339); the time it arrived when left out.
    #[schema(format = DateTime)]
    timestamp: Option<String>,
    /// Its id (a UUID): an event sent twice with one uuid is stored once.
    uuid: Option<String>,
    /// The capture token, if not given elsewhere.
    api_key: Option<String>,
}

/// A batch of PostHog events.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct CaptureBatch {
    batch: Vec<CaptureEvent>,
    /// The capture token, if not given elsewhere.
    api_key: Option<String>,
    /// When the client sent the batch (RFC 3339): event times are
    /// corrected by the client's clock skew.
    #[schema(format = DateTime)]
    sent_at: Option<String>,
}

/// What PostHog's capture takes: an event, an array of events, or a batch.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
pub enum CaptureBody {
    Event(CaptureEvent),
    Events(Vec<CaptureEvent>),
    Batch(CaptureBatch),
}

/// An uploaded plugin, as its manifest describes it.
#[derive(Serialize, ToSchema)]
pub struct UploadedPlugin {
    pub sha256: String,
    pub name: String,
    pub version: String,
    pub description: Option<String>,
    /// `transform`, `export`, or both.
    pub hooks: Vec<String>,
    /// The manifest's config fields, by name.
    #[schema(value_type = Object)]
    pub config_schema: Value,
}

/// A plugin config as the API shows it: secret values are never returned;
/// `secrets_set` names the secrets that have one.
#[derive(Serialize, ToSchema)]
pub struct PluginConfigView {
    pub id: String,
    pub project_id: String,
    pub plugin_sha256: String,
    /// The plugin's name and version.
    pub plugin: String,
    /// The config's values, less its secrets.
    #[schema(value_type = Object)]
    pub config: Value,
    pub enabled: bool,
    /// Where it runs in the chain: lower first.
    pub position: i64,
    /// `open`: a failing event goes on; `closed`: it goes to dead letters.
    pub failure_policy: String,
    pub consecutive_failures: i64,
    /// Why the server disabled it, if it did.
    pub disabled_reason: Option<String>,
    /// A destination's delivery settings (destinations only).
    #[schema(value_type = Option<Object>)]
    pub delivery: Option<Value>,
    /// Whether a destination's deliveries are paused (destinations only).
    pub paused: Option<bool>,
    pub paused_reason: Option<String>,
    pub updated_at: String,
    /// The secrets that have a value.
    pub secrets_set: Vec<String>,
    /// Set when the stored manifest cannot be read, so no value is shown.
    pub config_hidden: Option<String>,
}

/// A destination with its delivery counts.
#[derive(Serialize, ToSchema)]
pub struct DestinationView {
    #[serde(flatten)]
    pub config: PluginConfigView,
    pub stats: DestinationStats,
}

/// A destination with its counts, recent attempts and log.
#[derive(Serialize, ToSchema)]
pub struct DestinationDetail {
    #[serde(flatten)]
    pub destination: DestinationView,
    pub recent_attempts: Vec<Attempt>,
    pub logs: Vec<PluginLog>,
}

/// A project's settings.
#[derive(Serialize, ToSchema)]
pub struct ProjectView {
    pub id: String,
    pub name: String,
    /// The IANA time zone queries bucket days in.
    pub timezone: String,
}

/// A change to a project's settings.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct ProjectPatch {
    /// An IANA time zone such as `Europe/Berlin` or `UTC`.
    pub timezone: Option<String>,
}

/// A project's quotas, and which of them the operator set for it.
#[derive(Serialize, ToSchema)]
pub struct QuotasView {
    pub project_id: String,
    pub quotas: Quotas,
    /// The quotas the operator set for this project, by name.
    #[schema(value_type = Object)]
    pub overrides: Value,
}

/// The persons a distinct id belongs to: none or one.
#[derive(Serialize, ToSchema)]
pub struct PersonList {
    pub results: Vec<crate::store::Person>,
    /// Always null: there is at most one.
    #[schema(required = true)]
    pub next: Option<String>,
}

/// A posthog-compatible capture answer.
#[derive(Serialize, ToSchema)]
pub struct CaptureOk {
    /// Always 1.
    pub status: i64,
}

/// A Segment-compatible capture answer.
#[derive(Serialize, ToSchema)]
pub struct SegmentOk {
    /// Always true.
    pub success: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `$ref` names a schema the document has.
    #[test]
    fn every_reference_resolves() {
        let json = serde_json::to_value(document()).unwrap();
        let schemas = json["components"]["schemas"].as_object().unwrap();
        let mut refs = Vec::new();
        collect_refs(&json, &mut refs);
        assert!(!refs.is_empty());
        for reference in refs {
            let name = reference
                .strip_prefix("#/components/schemas/")
                .unwrap_or_else(|| panic!("unexpected reference {reference}"));
            assert!(schemas.contains_key(name), "{reference} does not resolve");
        }
    }

    fn collect_refs(value: &Value, refs: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                if let Some(Value::String(reference)) = map.get("$ref") {
                    refs.push(reference.clone());
                }
                map.values().for_each(|v| collect_refs(v, refs));
            }
            Value::Array(items) => items.iter().for_each(|v| collect_refs(v, refs)),
            _ => {}
        }
    }

    /// The document reads back as OpenAPI 3.1, and every `/api` operation
    /// needs a key and says which scope.
    #[test]
    fn the_document_is_openapi_3_with_a_scope_on_every_api_operation() {
        let text = serde_json::to_string(&document()).unwrap();
        let spec = oas3::from_json(&text).unwrap();
        assert!(spec.openapi.starts_with("3.1"), "{}", spec.openapi);
        let json: Value = serde_json::from_str(&text).unwrap();
        let mut checked = 0;
        for (path, item) in json["paths"].as_object().unwrap() {
            assert!(
                path.starts_with("/api/projects/")
                    || path.starts_with("/api/organisations/")
                    || path == "/api/me",
                "{path}"
            );
            for (method, operation) in item.as_object().unwrap() {
                assert!(
                    operation["operationId"].is_string(),
                    "{method} {path} has no operation id"
                );
                assert!(
                    !operation["responses"].as_object().unwrap().is_empty(),
                    "{method} {path} documents no response"
                );
                let admin = matches!(
                    (method.as_str(), path.as_str()),
                    ("patch", "/api/projects/{project_id}")
                        | ("post", "/api/projects/{project_id}/capture-tokens/rotate")
                        | (_, "/api/organisations/{organisation_id}/keys")
                        | (_, "/api/organisations/{organisation_id}/keys/{key_id}")
                        | (_, "/api/organisations/{organisation_id}/audit-log")
                        | ("post", "/api/organisations/{organisation_id}/projects")
                );
                let expected = if admin {
                    "admin"
                } else if method == "get" || path.ends_with("/query") {
                    "read"
                } else {
                    "write"
                };
                assert_eq!(
                    operation["x-sluice-scope"].as_str(),
                    Some(expected),
                    "{method} {path}"
                );
                assert_eq!(
                    operation["security"],
                    serde_json::json!([{"api_key": []}]),
                    "{method} {path}"
                );
                checked += 1;
            }
        }
        assert!(checked >= 15, "only {checked} /api operations");
    }
}
