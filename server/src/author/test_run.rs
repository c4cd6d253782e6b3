//! `sluice plugin test`: runs a built plugin on sample events through the real
//! runtime and reports the output events, the plugin's log lines and the HTTP
//! calls it made, as JSON.

use std::path::Path;

use anyhow::{Context, bail};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::runtime::{
    ExportFailure, ExportedEvent, HttpCall, Install, LogRecord, PluginEvent, Policy, Runtime,
    RuntimeConfig, format_timestamp,
};

/// What `sluice plugin test` prints.
#[derive(Debug, Serialize)]
pub struct Report {
    pub plugin: PluginInfo,
    pub hook: String,
    /// Transform: the events that go on. Export: the events handed over.
    pub events: Vec<PluginEvent>,
    /// Transform: input events the plugin dropped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dropped: Option<usize>,
    /// The first failure, if any; the run stops there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub logs: Vec<LogRecord>,
    pub http_calls: Vec<HttpCall>,
}

#[derive(Debug, Serialize)]
pub struct PluginInfo {
    pub name: String,
    pub version: String,
    pub sha256: String,
}

/// What to run.
#[derive(Clone, Debug, Default)]
pub struct TestOptions {
    /// Inline JSON or a file: one event, an array of events, or
    /// `{"batch": [...]}`.
    pub events: String,
    /// Inline JSON or a file; `{}` if absent.
    pub config: Option<String>,
    /// Let the plugin reach loopback addresses (local test servers).
    pub allow_loopback: bool,
    /// Call `export` even if the plugin also transforms.
    pub export: bool,
}

fn read_json(what: &str, source: &str) -> anyhow::Result<Value> {
    let text = if source.trim_start().starts_with(['{', '[']) {
        source.to_string()
    } else {
        std::fs::read_to_string(source)
            .with_context(|| format!("failed to read the {what} file {source}"))?
    };
    serde_json::from_str(&text).with_context(|| format!("the {what} in {source} is not valid JSON"))
}

/// Turns sample JSON into events the way capture will: uuid and timestamp
/// are filled in if missing, and a missing name or distinct id is an error.
pub fn parse_events(value: Value) -> anyhow::Result<Vec<PluginEvent>> {
    let items = match value {
        Value::Array(items) => items,
        Value::Object(mut map) if map.contains_key("batch") => match map.remove("batch") {
            Some(Value::Array(items)) => items,
            _ => bail!("`batch` must be an array of events"),
        },
        object @ Value::Object(_) => vec![object],
        _ => {
            bail!("the events must be a JSON object, an array of objects, or {{\"batch\": [...]}}")
        }
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| parse_event(item).with_context(|| format!("event #{} is invalid", i + 1)))
        .collect()
}

fn parse_event(value: Value) -> anyhow::Result<PluginEvent> {
    let Value::Object(mut map) = value else {
        bail!("it must be a JSON object");
    };
    let mut text = |key: &str| -> anyhow::Result<Option<String>> {
        match map.remove(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => bail!("`{key}` must be a string, got {other}"),
        }
    };
    let name = text("event")?.context("`event` (the event name) is missing")?;
    let distinct_id = text("distinct_id")?.context("`distinct_id` is missing")?;
    let uuid = match text("uuid")? {
        Some(uuid) => uuid::Uuid::parse_str(&uuid)
            .with_context(|| format!("`uuid` {uuid} is not a UUID"))?
            .to_string(),
        None => uuid::Uuid::now_v7().to_string(),
    };
    let timestamp = match text("timestamp")? {
        Some(ts) => format_timestamp(
            chrono::DateTime::parse_from_rfc3339(&ts)
                .with_context(|| {
                    format!("`timestamp` {ts} is not RFC 3339 (e.g. 2024-05-01T12:00:00Z)")
                })?
                .to_utc(),
        ),
        None => format_timestamp(chrono::Utc::now()),
    };
    let properties = match map.remove("properties") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(properties)) => properties,
        Some(_) => bail!("`properties` must be a JSON object"),
    };
    Ok(PluginEvent {
        uuid,
        name,
        distinct_id,
        timestamp,
        properties,
    })
}

/// Runs the plugin at `wasm`. `Ok(report)` even when the plugin failed on an
/// event (the report says so in `error`); `Err` when the plugin, the events
/// or the config cannot be used at all.
pub fn run(wasm: &Path, options: &TestOptions) -> anyhow::Result<Report> {
    let bytes =
        std::fs::read(wasm).with_context(|| format!("failed to read {}", wasm.display()))?;
    let events = parse_events(read_json("events", &options.events)?)?;
    let config = match &options.config {
        Some(source) => read_json("config", source)?,
        None => Value::Object(Map::new()),
    };
    let runtime = Runtime::new(RuntimeConfig {
        policy: Policy {
            allow_loopback: options.allow_loopback,
            ..Policy::default()
        },
        pool_size: 0,
        record_http_details: true,
        ..RuntimeConfig::default()
    })?;
    let plugin = runtime
        .load(&bytes)
        .map_err(|err| anyhow::anyhow!("failed to load {}: {err}", wasm.display()))?;
    let mut instance = plugin.install(Install {
        install_id: format!("plugin-test:{}", plugin.id()),
        // One install alone in its runtime: the default quotas apply.
        project_id: "plugin-test".into(),
        config,
        limits: None,
    })?;
    let manifest = plugin.manifest();
    let export = options.export || !manifest.is_transformation();

    let mut report = Report {
        plugin: PluginInfo {
            name: manifest.name.clone(),
            version: manifest.version.to_string(),
            sha256: plugin.sha256().to_string(),
        },
        hook: if export { "export" } else { "transform" }.into(),
        events: Vec::new(),
        dropped: None,
        error: None,
        logs: Vec::new(),
        http_calls: Vec::new(),
    };
    if export {
        let batch = events
            .iter()
            .map(|e| ExportedEvent {
                uuid: e.uuid.clone(),
                name: e.name.clone(),
                distinct_id: e.distinct_id.clone(),
                person_id: None,
                timestamp: e.timestamp.clone(),
                properties: Value::Object(e.properties.clone()).to_string(),
            })
            .collect();
        match instance.export(batch) {
            Ok(()) => {}
            Err(ExportFailure::Retryable {
                message,
                retry_after: Some(after),
                plugin,
            }) => {
                report.error = Some(format!(
                    "{plugin} could not deliver the batch (retryable, retry after {} ms): {message}",
                    after.as_millis()
                ))
            }
            Err(err) => report.error = Some(err.to_string()),
        }
        report.events = events;
    } else {
        let mut dropped = 0;
        for event in events {
            match instance.transform(event) {
                Ok(out) if out.is_empty() => dropped += 1,
                Ok(out) => report.events.extend(out),
                Err(err) => {
                    report.error = Some(err.to_string());
                    break;
                }
            }
        }
        report.dropped = Some(dropped);
    }
    (report.logs, report.http_calls) = instance.take_activity();
    Ok(report)
}
