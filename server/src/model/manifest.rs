//! `plugin.toml`: what a plugin is, which hooks it implements, what it may
//! use and what config it takes. It travels inside the component as a custom
//! section, so one `.wasm` file is the unit of distribution.

use std::fmt;
use std::str::FromStr;

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Name of the component custom section that carries `plugin.toml`.
pub const MANIFEST_SECTION: &str = "sluice:manifest";

/// A parsed and validated `plugin.toml`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Lowercase letters, digits and dashes; unique in a catalogue.
    pub name: String,
    /// Semantic version of this build.
    pub version: semver::Version,
    /// One or two sentences for the catalogue.
    pub description: String,
    #[serde(default)]
    pub author: Option<String>,
    /// SPDX licence expression.
    #[serde(default)]
    pub license: Option<String>,
    /// Hooks the host may call.
    pub hooks: Vec<Hook>,
    #[serde(default)]
    pub capabilities: Capabilities,
    /// The install's config fields, in the order forms show them.
    #[serde(default)]
    pub config: IndexMap<String, ConfigField>,
    /// Scheduled tasks, each run by `run-task` with its name.
    #[serde(default)]
    pub schedule: Vec<Schedule>,
}

/// A hook a plugin implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Hook {
    /// Per-event transformation.
    Transform,
    /// Batch export to a destination.
    Export,
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Hook::Transform => "transform",
            Hook::Export => "export",
        })
    }
}

/// What the plugin asks to use beyond logging, metrics, the clock and
/// randomness, which every plugin has.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capabilities {
    /// Hosts the plugin may send HTTP requests to: `api.example.com`,
    /// `api.example.com:8443`, `*.example.com`, `*` (any), or
    /// `{config.FIELD}` for the host of a URL in the install's config.
    #[serde(default)]
    pub http_hosts: Vec<String>,
    /// Whether the plugin uses the key-value store.
    #[serde(default)]
    pub kv: bool,
}

/// A config field's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    String,
    Number,
    Boolean,
    /// One of `choices`.
    Choice,
    /// Any JSON value.
    Json,
    /// A string the API never returns and logs never show.
    Secret,
}

/// One config field.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigField {
    #[serde(rename = "type")]
    pub kind: FieldType,
    #[serde(default)]
    pub required: bool,
    #[serde(default)]
    pub default: Option<Value>,
    #[serde(default)]
    pub description: Option<String>,
    /// The allowed values of a `choice` field.
    #[serde(default)]
    pub choices: Vec<String>,
}

/// A scheduled task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// Passed to `run-task`.
    pub name: String,
    /// Cron expression with seconds: `sec min hour day-of-month month day-of-week`.
    pub cron: String,
}

/// Why a manifest or a config was refused. Lists every problem at once, so
/// an author fixes them in one pass.
#[derive(Clone, Debug, thiserror::Error, PartialEq)]
#[error("{}", .problems.join("; "))]
pub struct Invalid {
    pub problems: Vec<String>,
}

impl Manifest {
    /// The config fields whose URL's host the plugin may call
    /// (`{config.FIELD}` in `http_hosts`): where its secrets are sent.
    pub fn host_fields(&self) -> Vec<&str> {
        self.capabilities
            .http_hosts
            .iter()
            .filter_map(|host| host.strip_prefix("{config.")?.strip_suffix('}'))
            .collect()
    }

    /// Parses and validates `plugin.toml` text.
    pub fn parse(text: &str) -> Result<Manifest, Invalid> {
        let manifest: Manifest = toml::from_str(text).map_err(|err| Invalid {
            problems: vec![err.message().to_string() + &location(text, err.span())],
        })?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// `name@version`, the way errors and logs name a plugin.
    pub fn id(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }

    pub fn has_hook(&self, hook: Hook) -> bool {
        self.hooks.contains(&hook)
    }

    /// A destination gets its events from delivery (through `export`);
    /// everything else runs in the transformation chain.
    pub fn is_destination(&self) -> bool {
        self.has_hook(Hook::Export)
    }

    /// A transformation runs in its project's chain, on every event.
    pub fn is_transformation(&self) -> bool {
        self.has_hook(Hook::Transform)
    }

    fn validate(&self) -> Result<(), Invalid> {
        let mut problems = Vec::new();
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !name_ok {
            problems.push(format!(
                "name `{}` must be 1-64 lowercase letters, digits and dashes, starting with a letter or digit",
                self.name
            ));
        }
        if self.description.trim().is_empty() {
            problems.push("description must not be empty".into());
        }
        if self.hooks.is_empty() {
            problems.push("hooks must list at least one of \"transform\", \"export\"".into());
        }
        for (i, hook) in self.hooks.iter().enumerate() {
            if self.hooks[..i].contains(hook) {
                problems.push(format!("hook `{hook}` is listed twice"));
            }
        }
        for host in &self.capabilities.http_hosts {
            if let Err(err) = HostRule::from_str(host) {
                problems.push(format!("capabilities.http_hosts: {err}"));
            } else if let Some(field) = host
                .strip_prefix("{config.")
                .and_then(|r| r.strip_suffix('}'))
            {
                match self.config.get(field) {
                    Some(f) if matches!(f.kind, FieldType::String | FieldType::Secret) => {}
                    _ => problems.push(format!(
                        "capabilities.http_hosts: `{host}` names no string config field `{field}`"
                    )),
                }
            }
        }
        for (name, field) in &self.config {
            field.validate(name, &mut problems);
        }
        for (i, schedule) in self.schedule.iter().enumerate() {
            if schedule.name.trim().is_empty() {
                problems.push(format!("schedule #{} has an empty name", i + 1));
            }
            if self.schedule[..i].iter().any(|s| s.name == schedule.name) {
                problems.push(format!("schedule `{}` is declared twice", schedule.name));
            }
            if let Err(err) = cron::Schedule::from_str(&schedule.cron) {
                problems.push(format!(
                    "schedule `{}`: cron `{}` is invalid ({err}); use six fields: sec min hour day month weekday",
                    schedule.name, schedule.cron
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Invalid { problems })
        }
    }

    /// Checks an install's config against the schema and fills in defaults.
    /// Unknown fields are refused, so a typo does not silently do nothing.
    pub fn validate_config(&self, config: &Value) -> Result<Map<String, Value>, Invalid> {
        let empty = Map::new();
        let given = match config {
            Value::Object(map) => map,
            Value::Null => &empty,
            other => {
                return Err(Invalid {
                    problems: vec![format!(
                        "config must be a JSON object, got {}",
                        json_kind(other)
                    )],
                });
            }
        };
        let mut problems = Vec::new();
        for key in given.keys() {
            if !self.config.contains_key(key) {
                let known: Vec<&str> = self.config.keys().map(String::as_str).collect();
                problems.push(format!(
                    "unknown config field `{key}`; {} accepts: {}",
                    self.id(),
                    if known.is_empty() {
                        "no fields".to_string()
                    } else {
                        known.join(", ")
                    }
                ));
            }
        }
        let mut out = Map::new();
        for (name, field) in &self.config {
            match given.get(name).filter(|v| !v.is_null()) {
                Some(value) => match field.check(value) {
                    Ok(()) => {
                        out.insert(name.clone(), value.clone());
                    }
                    Err(expected) => problems.push(format!(
                        "config field `{name}` must be {expected}, got {}",
                        json_kind(value)
                    )),
                },
                None => {
                    if let Some(default) = &field.default {
                        out.insert(name.clone(), default.clone());
                    } else if field.required {
                        problems.push(format!("config field `{name}` is required"));
                    }
                }
            }
        }
        if problems.is_empty() {
            Ok(out)
        } else {
            Err(Invalid { problems })
        }
    }
}

impl ConfigField {
    fn validate(&self, name: &str, problems: &mut Vec<String>) {
        if self.kind == FieldType::Choice && self.choices.is_empty() {
            problems.push(format!(
                "config field `{name}` is a choice but lists no `choices`"
            ));
        }
        if self.kind != FieldType::Choice && !self.choices.is_empty() {
            problems.push(format!(
                "config field `{name}` has `choices` but is not of type choice"
            ));
        }
        if let Some(default) = &self.default {
            if self.kind == FieldType::Secret {
                problems.push(format!(
                    "config field `{name}` is a secret and must not have a default"
                ));
            } else if let Err(expected) = self.check(default) {
                problems.push(format!(
                    "config field `{name}` has a default that is not {expected}"
                ));
            }
            if self.required {
                problems.push(format!(
                    "config field `{name}` is required and has a default; drop one of them"
                ));
            }
        }
    }

    /// Whether `value` fits the field; on a misfit, what was expected.
    fn check(&self, value: &Value) -> Result<(), String> {
        let ok = match self.kind {
            FieldType::String | FieldType::Secret => value.is_string(),
            FieldType::Number => value.is_number(),
            FieldType::Boolean => value.is_boolean(),
            FieldType::Json => true,
            FieldType::Choice => value
                .as_str()
                .is_some_and(|v| self.choices.iter().any(|c| c == v)),
        };
        if ok {
            return Ok(());
        }
        Err(match self.kind {
            FieldType::String => "a string".into(),
            FieldType::Secret => "a string (secret)".into(),
            FieldType::Number => "a number".into(),
            FieldType::Boolean => "true or false".into(),
            FieldType::Json => "JSON".into(),
            FieldType::Choice => format!("one of {}", self.choices.join(", ")),
        })
    }
}

/// Names a value for an error message. A short string is quoted bare
/// (`got "yes"`): the manifest's messages read better without the SDK's
/// "the string" before it, and plugin authors have seen them so since
/// the first release.
fn json_kind(value: &Value) -> String {
    match value {
        Value::String(s) if s.chars().count() <= 40 => format!("\"{s}\""),
        other => sluice_plugin_sdk::json::kind(other),
    }
}

fn location(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!(" (plugin.toml line {line})")
        }
        None => String::new(),
    }
}

/// One entry of `http_hosts`, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostRule {
    /// `*`: any host.
    Any,
    /// `*.example.com`: any subdomain, not the bare domain.
    Suffix { suffix: String, port: Option<u16> },
    /// `example.com` or `example.com:8443`.
    Exact { host: String, port: Option<u16> },
    /// `{config.FIELD}`: resolved against the install's config.
    ConfigField(String),
}

impl FromStr for HostRule {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text == "*" {
            return Ok(HostRule::Any);
        }
        if let Some(field) = text
            .strip_prefix("{config.")
            .and_then(|r| r.strip_suffix('}'))
        {
            if field.is_empty() {
                return Err(format!("`{text}` names no config field"));
            }
            return Ok(HostRule::ConfigField(field.to_string()));
        }
        if text.contains("://") || text.contains('/') {
            return Err(format!(
                "`{text}` must be a host name, optionally with a port, not a URL"
            ));
        }
        let (host, port) = split_port(text).ok_or_else(|| format!("`{text}` has a bad port"))?;
        let host = host.to_ascii_lowercase();
        let valid_label = |label: &str| {
            !label.is_empty()
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        };
        if let Some(suffix) = host.strip_prefix("*.") {
            if suffix.split('.').all(valid_label) {
                return Ok(HostRule::Suffix {
                    suffix: suffix.to_string(),
                    port,
                });
            }
        } else if host.parse::<std::net::IpAddr>().is_ok() || host.split('.').all(valid_label) {
            return Ok(HostRule::Exact { host, port });
        }
        Err(format!("`{text}` is not a host name, `*.domain` or `*`"))
    }
}

fn split_port(text: &str) -> Option<(&str, Option<u16>)> {
    // A bare IPv6 address has colons but no port.
    if text.parse::<std::net::Ipv6Addr>().is_ok() {
        return Some((text, None));
    }
    if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        return match after.strip_prefix(':') {
            Some(port) => Some((host, Some(port.parse().ok()?))),
            None if after.is_empty() => Some((host, None)),
            None => None,
        };
    }
    match text.rsplit_once(':') {
        Some((host, port)) => Some((host, Some(port.parse().ok()?))),
        None => Some((text, None)),
    }
}

impl HostRule {
    /// Whether a request to `host:port` matches. Config rules never match
    /// here: they are resolved to exact rules first.
    pub fn matches(&self, host: &str, port: u16) -> bool {
        match self {
            HostRule::Any => true,
            HostRule::Exact { host: h, port: p } => {
                h.trim_start_matches('[').trim_end_matches(']') == host
                    && p.is_none_or(|p| p == port)
            }
            HostRule::Suffix { suffix, port: p } => {
                host.len() > suffix.len() + 1
                    && host.ends_with(suffix.as_str())
                    && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
                    && p.is_none_or(|p| p == port)
            }
            HostRule::ConfigField(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const GOOD: &str = r#"
name = "demo"
version = "1.2.3"
description = "A demo."
hooks = ["transform"]

[capabilities]
http_hosts = ["api.example.com", "*.example.org:8443", "{config.url}"]
kv = true

[config.url]
type = "string"
required = true

[config.mode]
type = "choice"
choices = ["drop", "hash"]
default = "drop"

[config.token]
type = "secret"

[[schedule]]
name = "refresh"
cron = "0 */5 * * * *"
"#;

    #[test]
    fn parses_a_complete_manifest_in_declared_order() {
        let manifest = Manifest::parse(GOOD).unwrap();
        assert_eq!(manifest.id(), "demo@1.2.3");
        assert_eq!(
            manifest.config.keys().collect::<Vec<_>>(),
            ["url", "mode", "token"]
        );
        assert!(manifest.capabilities.kv);
        assert_eq!(manifest.schedule[0].name, "refresh");
    }

    #[test]
    fn reports_every_problem_at_once() {
        let bad = r#"
name = "Bad Name"
version = "1.0.0"
description = ""
hooks = []
[config.level]
type = "choice"
default = "high"
[[schedule]]
name = "x"
cron = "every day"
"#;
        let err = Manifest::parse(bad).unwrap_err();
        let text = err.to_string();
        for expected in [
            "name `Bad Name`",
            "description",
            "hooks",
            "lists no `choices`",
            "cron `every day`",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in {text}");
        }
    }

    #[test]
    fn refuses_unknown_keys_with_their_line() {
        let err = Manifest::parse("name = \"a\"\nversion = \"1.0.0\"\ndescription = \"d\"\nhooks = [\"transform\"]\nhookz = 1\n")
            .unwrap_err();
        assert!(err.to_string().contains("unknown field `hookz`"), "{err}");
        assert!(err.to_string().contains("line 5"), "{err}");
    }

    #[test]
    fn config_gets_defaults_and_type_errors_name_the_field() {
        let manifest = Manifest::parse(GOOD).unwrap();
        let config = manifest
            .validate_config(&json!({"url": "https://x.test/hook"}))
            .unwrap();
        assert_eq!(config["mode"], json!("drop"));
        assert!(!config.contains_key("token"));

        let err = manifest
            .validate_config(&json!({"mode": "shred", "extra": 1}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown config field `extra`"), "{err}");
        assert!(err.contains("`mode` must be one of drop, hash"), "{err}");
        assert!(err.contains("`url` is required"), "{err}");
    }

    #[test]
    fn host_rules_match_exactly_what_they_say() {
        let exact: HostRule = "api.example.com".parse().unwrap();
        assert!(exact.matches("api.example.com", 443));
        assert!(!exact.matches("evil-api.example.com", 443));
        let suffix: HostRule = "*.example.org:8443".parse().unwrap();
        assert!(suffix.matches("a.example.org", 8443));
        assert!(!suffix.matches("a.example.org", 443));
        assert!(!suffix.matches("example.org", 8443));
        assert!(!suffix.matches("badexample.org", 8443));
        assert!("https://x.com".parse::<HostRule>().is_err());
    }
}
