//! URL and UTM campaign parser: reads one URL property and adds the UTM
//! campaign fields, the host, the path and chosen query parameters.
//!
//! It reads the one property it parses and writes what it found in one
//! edit (which leaves properties already set alone unless `overwrite`), so
//! it costs two host calls on a large event as on a small one.

use serde::Deserialize;
use sluice_plugin_sdk::{Edits, EventRef, Outcome, Plugin, Result, register_plugin};
use url::Url;

/// The campaign parameters every UTM-tagged link may carry, added under
/// their own names.
const UTM_PARAMETERS: [&str; 5] = [
    "utm_source",
    "utm_medium",
    "utm_campaign",
    "utm_term",
    "utm_content",
];

#[derive(Deserialize)]
struct Config {
    #[serde(default = "default_property")]
    property: String,
    #[serde(default = "default_host_property")]
    host_property: String,
    #[serde(default = "default_path_property")]
    path_property: String,
    #[serde(default)]
    query_parameters: Vec<String>,
    #[serde(default)]
    query_prefix: String,
    #[serde(default)]
    overwrite: bool,
}

fn default_property() -> String {
    "$current_url".into()
}

fn default_host_property() -> String {
    "url_host".into()
}

fn default_path_property() -> String {
    "url_path".into()
}

struct UrlParser {
    property: String,
    host_property: String,
    path_property: String,
    /// (query parameter, property it goes to), UTM fields first.
    parameters: Vec<(String, String)>,
    overwrite: bool,
}

impl Plugin for UrlParser {
    type Config = Config;

    fn new(config: Config) -> Result<Self> {
        let mut parameters: Vec<(String, String)> = UTM_PARAMETERS
            .iter()
            .map(|name| (name.to_string(), name.to_string()))
            .collect();
        for name in config.query_parameters {
            if !parameters.iter().any(|(known, _)| *known == name) {
                let property = format!("{}{name}", config.query_prefix);
                parameters.push((name, property));
            }
        }
        Ok(UrlParser {
            property: config.property,
            host_property: config.host_property,
            path_property: config.path_property,
            parameters,
            overwrite: config.overwrite,
        })
    }

    fn transform(&mut self, event: &mut EventRef<'_>) -> Result<Outcome> {
        let Some(text) = event.property::<String>(&self.property).ok().flatten() else {
            return Ok(Outcome::Keep);
        };
        let Ok(url) = Url::parse(text.trim()) else {
            return Ok(Outcome::Keep);
        };
        if url.cannot_be_a_base() {
            return Ok(Outcome::Keep); // mailto:, data: and the like
        }
        let mut found: Vec<(&str, String)> = Vec::new();
        if let Some(host) = url.host_str() {
            found.push((&self.host_property, host.to_string()));
        }
        found.push((&self.path_property, url.path().to_string()));
        for (name, value) in url.query_pairs() {
            if let Some((_, property)) = self.parameters.iter().find(|(p, _)| *p == name)
                && !found.iter().any(|(key, _)| key == property)
            {
                found.push((property, value.into_owned()));
            }
        }
        let mut edits = Edits::new();
        for (key, value) in found {
            if key.is_empty() {
                continue;
            }
            if self.overwrite {
                edits.set(&[key], value)?;
            } else {
                edits.set_if_absent(&[key], value)?;
            }
        }
        event.edit(&edits)?;
        Ok(Outcome::Keep)
    }
}

register_plugin!(UrlParser);

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_plugin_sdk::testing::{self, MockHost};
    use sluice_plugin_sdk::{Value, json};

    fn parser(config: Value) -> UrlParser {
        testing::setup::<UrlParser>(config).expect("valid config")
    }

    fn run(plugin: &mut UrlParser, properties: Value) -> Value {
        MockHost::install();
        let event = testing::event("$pageview", "user-1", properties);
        let mut out = testing::transform(plugin, event).expect("transform succeeds");
        assert_eq!(out.len(), 1, "the parser never drops or splits events");
        Value::Object(out.pop().unwrap().properties)
    }

    #[test]
    fn adds_utm_fields_host_and_path() {
        let mut plugin = parser(json!({}));
        let props = run(
            &mut plugin,
            json!({"$current_url": "https://shop.example.com/pricing/team?utm_source=news%20letter&utm_medium=email&utm_campaign=spring+sale&utm_term=crm&utm_content=hero&page=2#top"}),
        );
        assert_eq!(props["url_host"], json!("shop.example.com"));
        assert_eq!(props["url_path"], json!("/pricing/team"));
        assert_eq!(props["utm_source"], json!("news letter"));
        assert_eq!(props["utm_medium"], json!("email"));
        assert_eq!(props["utm_campaign"], json!("spring sale"));
        assert_eq!(props["utm_term"], json!("crm"));
        assert_eq!(props["utm_content"], json!("hero"));
        assert!(props.get("page").is_none(), "only parameters asked for");
    }

    #[test]
    fn copies_the_query_parameters_asked_for_with_the_prefix() {
        let mut plugin =
            parser(json!({"query_parameters": ["gclid", "ref"], "query_prefix": "q_"}));
        let props = run(
            &mut plugin,
            json!({"$current_url": "https://example.com/?gclid=abc&ref=twitter&other=1"}),
        );
        assert_eq!(props["q_gclid"], json!("abc"));
        assert_eq!(props["q_ref"], json!("twitter"));
        assert!(props.get("q_other").is_none());
    }

    #[test]
    fn keeps_existing_values_unless_told_to_overwrite() {
        let url = "https://example.com/a?utm_source=google";
        let mut plugin = parser(json!({}));
        let props = run(
            &mut plugin,
            json!({"$current_url": url, "utm_source": "set by the client"}),
        );
        assert_eq!(props["utm_source"], json!("set by the client"));
        let mut plugin = parser(json!({"overwrite": true}));
        let props = run(
            &mut plugin,
            json!({"$current_url": url, "utm_source": "set by the client"}),
        );
        assert_eq!(props["utm_source"], json!("google"));
    }

    #[test]
    fn reads_the_configured_property_and_can_leave_out_host_and_path() {
        let mut plugin =
            parser(json!({"property": "landing", "host_property": "", "path_property": ""}));
        let props = run(
            &mut plugin,
            json!({"landing": "https://example.com/x?utm_medium=cpc"}),
        );
        assert_eq!(
            props,
            json!({"landing": "https://example.com/x?utm_medium=cpc", "utm_medium": "cpc"})
        );
    }

    #[test]
    fn malformed_or_missing_urls_leave_the_event_unchanged() {
        let mut plugin = parser(json!({}));
        for props in [
            json!({"$current_url": "not a url"}),
            json!({"$current_url": "/relative/path?utm_source=x"}),
            json!({"$current_url": "http://[::1"}),
            json!({"$current_url": "mailto:ann@example.com"}),
            json!({"$current_url": 42}),
            json!({"other": "https://example.com/?utm_source=x"}),
        ] {
            assert_eq!(run(&mut plugin, props.clone()), props);
        }
    }
}
