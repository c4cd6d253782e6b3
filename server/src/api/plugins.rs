//! Plugins of a project: upload a `.wasm`, attach it with a config checked
//! against its manifest, enable, disable and reorder it, read its log and the
//! dead letters. Secret config values are never returned.

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, patch, post};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::ApiState;
use super::openapi::{ConfigPath, Errors, PluginConfigView, ProjectPath, UploadedPlugin, WasmFile};
use super::page::{Page, PageQuery};
use super::{ApiError, ApiPath, ApiQuery, Authorised, JsonBody, Read, Write};
use crate::model::FailurePolicy;
use crate::model::Scrubber;
use crate::model::manifest::{FieldType, Manifest};
use crate::model::quotas::Hit;
use crate::runtime::{Install, PluginError};
use crate::store::{self, DeliverySettings, PluginConfig, PluginConfigPatch, PluginLog, Upload};

pub(super) fn router<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    ApiState: axum::extract::FromRef<S>,
{
    Router::new()
        .route("/api/projects/{project_id}/plugins", post(upload_plugin))
        .route(
            "/api/projects/{project_id}/plugin-configs",
            post(create_plugin_config).get(list_plugin_configs),
        )
        .route(
            "/api/projects/{project_id}/plugin-configs/{config_id}",
            patch(update_plugin_config),
        )
        .route(
            "/api/projects/{project_id}/plugin-configs/{config_id}/logs",
            get(plugin_logs),
        )
}

/// Largest plugin a project may upload.
pub const MAX_PLUGIN_BYTES: usize = 50 << 20;

/// `POST /api/projects/{id}/plugins` with the `.wasm` as the body: checks
/// the embedded manifest, compiles it, and stores it under its sha256.
#[utoipa::path(post, path = "/api/projects/{project_id}/plugins", tag = "plugins",
    params(ProjectPath),
    request_body(content = WasmFile, description = "The plugin's `.wasm`.", content_type = "application/octet-stream"),
    responses((status = 201, description = "The plugin was stored.", body = UploadedPlugin), Errors),
    security(("api_key" = [])), extensions(("x-sluice-scope" = json!("write"))))]
async fn upload_plugin(
    State(state): State<ApiState>,
    Authorised(project_id, _): Authorised<Write>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    if body.len() > MAX_PLUGIN_BYTES {
        return Err(ApiError::Invalid(format!(
            "plugins are limited to {MAX_PLUGIN_BYTES} bytes"
        )));
    }
    // Compiling a plugin takes seconds of CPU: one at a time per project,
    // shared with the checks of new configs.
    let _turn = state.checks.begin(&project_id).ok_or_else(|| {
        ApiError::Busy(
            "another plugin of this project is being uploaded or checked; retry when it is done"
                .into(),
        )
    })?;
    let runtime = state.runtime.clone();
    let wasm = body.to_vec();
    let (plugin, wasm) =
        tokio::task::spawn_blocking(move || runtime.load(&wasm).map(|plugin| (plugin, wasm)))
            .await
            .map_err(|err| ApiError::Invalid(format!("failed to load the plugin: {err}")))?
            .map_err(|err| ApiError::Invalid(format!("this is not a usable plugin: {err}")))?;
    let quotas = state.quotas.get(&project_id);
    let saved = state
        .store
        .save_uploaded_plugin(
            &project_id,
            plugin.sha256(),
            plugin.manifest(),
            &wasm,
            quotas.plugins,
            quotas.plugin_bytes,
        )
        .await?;
    match saved {
        Upload::Saved => {}
        Upload::TooMany => {
            return Err(ApiError::OverQuota(format!(
                "the project has uploaded {} plugin files, its most: {}",
                quotas.plugins,
                Hit {
                    quota: "plugins",
                    limit: u64::from(quotas.plugins)
                }
            )));
        }
        Upload::TooLarge { stored } => {
            return Err(ApiError::OverQuota(format!(
                "this plugin's {} bytes would take the project's uploads from {stored} bytes over {}",
                wasm.len(),
                Hit {
                    quota: "plugin_bytes",
                    limit: quotas.plugin_bytes
                }
            )));
        }
    }
    let manifest = plugin.manifest();
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "sha256": plugin.sha256(),
            "name": manifest.name,
            "version": manifest.version.to_string(),
            "description": manifest.description,
            "hooks": manifest.hooks,
            "config_schema": manifest.config,
        })),
    ))
}

/// A plugin config to attach.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NewPluginConfig {
    /// The uploaded plugin's sha256.
    plugin_sha256: String,
    /// The config's values, as the plugin's manifest describes them.
    #[serde(default)]
    #[schema(value_type = Object)]
    config: Value,
    #[serde(default = "enabled_by_default")]
    enabled: bool,
    position: Option<i64>,
    /// `open` (the default) or `closed`.
    #[serde(default = "fail_open")]
    failure_policy: String,
    /// Destination settings; see `DeliverySettings`.
    #[schema(value_type = Option<DeliverySettings>)]
    delivery: Option<Value>,
}

fn enabled_by_default() -> bool {
    true
}

fn fail_open() -> String {
    "open".into()
}

fn check_policy(policy: &str) -> Result<FailurePolicy, ApiError> {
    policy
        .parse()
        .map_err(|err| ApiError::field("failure_policy", err))
}

/// Starts the plugin with `config` (running its setup), so a config the
/// plugin cannot use is refused now rather than on the first event.
async fn try_install(
    state: &ApiState,
    project_id: &str,
    sha256: &str,
    config: &Value,
) -> Result<Map<String, Value>, ApiError> {
    // Each check runs the plugin's setup, up to its setup deadline of CPU:
    // one at a time per project, so one project's requests cannot keep
    // every core busy.
    let _turn = state.checks.begin(project_id).ok_or_else(|| {
        ApiError::Busy(
            "another plugin config of this project is being checked; retry when it is done".into(),
        )
    })?;
    let wasm = state.store.plugin_wasm(sha256).await?.ok_or_else(|| {
        ApiError::field(
            "plugin_sha256",
            format!("no plugin with sha256 {sha256} is installed; upload it first"),
        )
    })?;
    let runtime = state.runtime.clone();
    let config = config.clone();
    let project_id = project_id.to_string();
    tokio::task::spawn_blocking(move || {
        let plugin = runtime
            .load(&wasm)
            .map_err(|err| ApiError::Invalid(format!("failed to load the plugin: {err}")))?;
        let validated = plugin.manifest().validate_config(&config).map_err(|err| {
            ApiError::field(
                "config",
                format!("{} cannot use this config: {err}", plugin.id()),
            )
        })?;
        // A namespace of its own for each check, dropped after it: the
        // checks of different projects run the same code with the same
        // host services, and must not read or leave what another wrote.
        let install_id = format!("api-check-{}", uuid::Uuid::new_v4());
        // The plugin's setup may quote the secret it refused.
        let scrubber = Scrubber::for_config(plugin.manifest(), &validated);
        let started = plugin
            .install(Install {
                install_id: install_id.clone(),
                project_id,
                config: Value::Object(validated.clone()),
                limits: None,
            })
            .map(drop)
            .map_err(|err| match err {
                // The check counts towards the project's instances like
                // any other; with no room for it the config is not wrong.
                PluginError::Exhausted { .. } => {
                    ApiError::Busy(format!("cannot check the config now: {err}; retry later"))
                }
                err => ApiError::Invalid(scrubber.scrub(&err.to_string()).into_owned()),
            });
        runtime.forget_install(&install_id);
        started.map(|()| validated)
    })
    .await
    .map_err(|err| ApiError::Invalid(format!("failed to start the plugin: {err}")))?
}

/// Fills in the secrets a changed config leaves out with their stored
/// values, since the API never returns them. Unless the change moves where
/// the plugin sends requests (a field its `http_hosts` names, such as a
/// `base_url`): then a kept secret would go to the new host, so every
/// secret must be given again.
fn keep_secrets(
    manifest: &Manifest,
    stored: &Map<String, Value>,
    given: &mut Map<String, Value>,
) -> Result<(), ApiError> {
    // A field left out takes its default, as validation will give it.
    let effective = |config: &Map<String, Value>, field: &str| {
        config.get(field).cloned().or_else(|| {
            manifest
                .config
                .get(field)
                .and_then(|spec| spec.default.clone())
        })
    };
    let moved: Vec<&str> = manifest
        .host_fields()
        .into_iter()
        .filter(|field| effective(given, field) != effective(stored, field))
        .collect();
    let kept: Vec<&String> = manifest
        .config
        .iter()
        .filter(|(name, field)| {
            field.kind == FieldType::Secret
                && !given.contains_key(*name)
                && stored.contains_key(*name)
        })
        .map(|(name, _)| name)
        .collect();
    if !moved.is_empty() && !kept.is_empty() {
        let quoted = |names: Vec<&str>| {
            names
                .iter()
                .map(|name| format!("`{name}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(ApiError::field(
            "config",
            format!(
                "config: {} changes where the plugin sends requests, so its secrets must be given again with it: {} (a stored secret is never sent to a new host)",
                quoted(moved),
                quoted(kept.iter().map(|name| name.as_str()).collect())
            ),
        ));
    }
    for name in kept {
        given.insert(name.clone(), stored[name].clone());
    }
    Ok(())
}

fn delivery_settings(value: Option<&Value>) -> Result<Option<DeliverySettings>, ApiError> {
    value
        .map(|value| DeliverySettings::parse(value).map_err(|err| ApiError::field("delivery", err)))
        .transpose()
}

/// The config without secret values, which the API never returns; the names
/// of the secrets that are set are listed instead. Without a readable
/// manifest no value is returned at all.
pub(super) fn public_view(config: &PluginConfig) -> Value {
    let mut view = serde_json::to_value(config).unwrap_or(Value::Null);
    let secrets: Vec<String> = config
        .manifest
        .as_ref()
        .map(|m| {
            m.config
                .iter()
                .filter(|(_, field)| field.kind == FieldType::Secret)
                .map(|(name, _)| name.clone())
                .collect()
        })
        .unwrap_or_default();
    let mut set = Vec::new();
    if let Some(values) = view.get_mut("config").and_then(Value::as_object_mut) {
        for name in &secrets {
            if values.remove(name).is_some() {
                set.push(name.clone());
            }
        }
        // A sealed value is never shown, even under a field the manifest
        // no longer calls secret.
        values.retain(|_, value| !store::is_sealed(value));
    }
    if config.manifest.is_none() {
        // Which fields are secret is unknown: show none of the values
        // rather than all of them.
        view["config"] = json!({});
        view["config_hidden"] = json!(
            "this plugin's stored manifest cannot be read, so no config value is shown; upload the plugin again"
        );
    }
    view["secrets_set"] = json!(set);
    view["paused"] = json!(config.paused_reason.is_some());
    if !config.is_destination()
        && let Some(fields) = view.as_object_mut()
    {
        fields.remove("delivery");
        fields.remove("paused");
        fields.remove("paused_reason");
    }
    view
}

/// `POST /api/projects/{id}/plugin-configs`: attaches an uploaded plugin
/// with a config, checked by running the plugin's setup.
#[utoipa::path(post, path = "/api/projects/{project_id}/plugin-configs", tag = "plugins",
    params(ProjectPath), request_body = NewPluginConfig,
    responses((status = 201, description = "The config was attached.", body = PluginConfigView), Errors),
    security(("api_key" = [])), extensions(("x-sluice-scope" = json!("write"))))]
async fn create_plugin_config(
    State(state): State<ApiState>,
    Authorised(project_id, _): Authorised<Write>,
    JsonBody(body): JsonBody<NewPluginConfig>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let failure_policy = check_policy(&body.failure_policy)?;
    let delivery = delivery_settings(body.delivery.as_ref())?.unwrap_or_default();
    let max_configs = state.quotas.get(&project_id).plugin_configs;
    let over_quota = || {
        ApiError::OverQuota(format!(
            "the project has {max_configs} plugin configs, its most: {}; delete one first",
            Hit {
                quota: "plugin_configs",
                limit: u64::from(max_configs)
            }
        ))
    };
    // Checked before the plugin's setup runs as well as when storing: a
    // project at its quota should not make the server run setups it will
    // refuse.
    if state.store.plugin_configs(&project_id).await?.len() >= max_configs as usize {
        return Err(over_quota());
    }
    let validated = try_install(&state, &project_id, &body.plugin_sha256, &body.config).await?;
    let created = state
        .store
        .create_plugin_config(
            &project_id,
            &store::NewPluginConfig {
                sha256: body.plugin_sha256,
                config: Value::Object(validated),
                enabled: body.enabled,
                position: body.position,
                failure_policy,
                delivery,
            },
            max_configs,
        )
        .await?
        .ok_or_else(over_quota)?;
    state.configs.changed().await;
    Ok((StatusCode::CREATED, Json(public_view(&created))))
}

/// `GET /api/projects/{id}/plugin-configs`, in chain order (by position,
/// then id).
#[utoipa::path(get, path = "/api/projects/{project_id}/plugin-configs", tag = "plugins",
    params(ProjectPath, PageQuery),
    responses((status = 200, description = "A page of plugin configs.", body = Page<PluginConfigView>), Errors),
    security(("api_key" = [])), extensions(("x-sluice-scope" = json!("read"))))]
async fn list_plugin_configs(
    State(state): State<ApiState>,
    Authorised(project_id, _): Authorised<Read>,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> Result<Json<Page<Value>>, ApiError> {
    let request = page.request::<(i64, String)>(100)?;
    let configs = state.store.plugin_configs(&project_id).await?;
    let page = Page::from_sorted(configs, &request, |config| {
        (config.position, config.id.clone())
    });
    Ok(Json(page.map(|config| public_view(&config))))
}

/// Changes to a plugin config: the fields given change.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct PluginConfigChanges {
    /// A whole new config; secrets left out keep their stored values.
    #[schema(value_type = Option<Object>)]
    config: Option<Value>,
    enabled: Option<bool>,
    position: Option<i64>,
    failure_policy: Option<String>,
    #[schema(value_type = Option<DeliverySettings>)]
    delivery: Option<Value>,
    /// Pause (true) or resume (false) a destination's deliveries.
    paused: Option<bool>,
}

/// `PATCH`: a new config is checked like a new install; secrets left out of
/// it keep their stored values, since the API never returned them.
#[utoipa::path(patch, path = "/api/projects/{project_id}/plugin-configs/{config_id}", tag = "plugins",
    params(ConfigPath), request_body = PluginConfigChanges,
    responses((status = 200, description = "The changed config.", body = PluginConfigView), Errors),
    security(("api_key" = [])), extensions(("x-sluice-scope" = json!("write"))))]
async fn update_plugin_config(
    State(state): State<ApiState>,
    Authorised(project_id, _): Authorised<Write>,
    ApiPath((_, config_id)): ApiPath<(String, String)>,
    JsonBody(body): JsonBody<PluginConfigChanges>,
) -> Result<Json<Value>, ApiError> {
    let current = state
        .store
        .plugin_config(&project_id, &config_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("plugin config {config_id}")))?;
    let failure_policy = body
        .failure_policy
        .as_deref()
        .map(check_policy)
        .transpose()?;
    let delivery = delivery_settings(body.delivery.as_ref())?;
    if !current.is_destination() && (delivery.is_some() || body.paused.is_some()) {
        return Err(ApiError::Invalid(format!(
            "`delivery` and `paused` apply to destinations only, and {} has no export hook",
            current.plugin
        )));
    }
    let config = match body.config {
        Some(Value::Object(mut given)) => {
            // The stored secrets, opened for the plugin's setup in the
            // check below; the store seals them again as it writes.
            // One that does not open is left out, to be given again.
            let stored = state.store.open_config(&current).unwrap_or_else(|err| {
                tracing::warn!(plugin_config = %current.id, "{err}");
                let mut stored = current.config.clone();
                if let Some(fields) = stored.as_object_mut() {
                    fields.retain(|_, value| !store::is_sealed(value));
                }
                stored
            });
            if let (Some(manifest), Some(stored)) = (&current.manifest, stored.as_object()) {
                keep_secrets(manifest, stored, &mut given)?;
            }
            Some(Value::Object(
                try_install(
                    &state,
                    &project_id,
                    &current.plugin_sha256,
                    &Value::Object(given),
                )
                .await?,
            ))
        }
        Some(_) => return Err(ApiError::field("config", "`config` must be a JSON object")),
        None => None,
    };
    let patch = PluginConfigPatch {
        config,
        enabled: body.enabled,
        position: body.position,
        failure_policy,
        delivery,
    };
    let mut updated = state
        .store
        .update_plugin_config(&project_id, &config_id, &patch)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("plugin config {config_id}")))?;
    if let Some(paused) = body.paused {
        let reason = paused.then_some("paused through the API");
        state
            .store
            .set_paused(&project_id, &config_id, reason)
            .await?;
        updated.paused_reason = reason.map(str::to_string);
    }
    state.configs.changed().await;
    state.wake.delivery.notify_waiters();
    Ok(Json(public_view(&updated)))
}

/// `GET /api/projects/{id}/plugin-configs/{config_id}/logs`, newest
/// first.
#[utoipa::path(get, path = "/api/projects/{project_id}/plugin-configs/{config_id}/logs", tag = "plugins",
    params(ConfigPath, PageQuery),
    responses((status = 200, description = "A page of log lines.", body = Page<PluginLog>), Errors),
    security(("api_key" = [])), extensions(("x-sluice-scope" = json!("read"))))]
async fn plugin_logs(
    State(state): State<ApiState>,
    Authorised(project_id, _): Authorised<Read>,
    ApiPath((_, config_id)): ApiPath<(String, String)>,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> Result<Json<Page<PluginLog>>, ApiError> {
    let request = page.request::<i64>(100)?;
    if state
        .store
        .plugin_config(&project_id, &config_id)
        .await?
        .is_none()
    {
        return Err(ApiError::NotFound(format!("plugin config {config_id}")));
    }
    let logs = state
        .store
        .plugin_logs_before(&config_id, request.after, request.fetch())
        .await?;
    Ok(Json(Page::new(logs, &request, |log| log.id)))
}

/// The routes of this module, for the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(
    upload_plugin,
    create_plugin_config,
    list_plugin_configs,
    update_plugin_config,
    plugin_logs
))]
pub(super) struct Doc;
