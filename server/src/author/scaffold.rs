//! `sluice plugin new NAME`: a plugin crate that builds, tests and runs out
//! of the box.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// Where the SDK lives, for the new crate's dependency.
#[derive(Clone, Debug)]
pub enum SdkSource {
    /// A path dependency on a checkout's `plugin-sdk`.
    Path(PathBuf),
    /// A registry version.
    Version(String),
}

impl SdkSource {
    /// The `plugin-sdk` of the checkout this binary was built from, if it is
    /// still there.
    pub fn from_checkout() -> Option<SdkSource> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugin-sdk");
        dir.join("Cargo.toml")
            .exists()
            .then(|| dir.canonicalize().ok())
            .flatten()
            .map(SdkSource::Path)
    }

    fn dependency(&self) -> String {
        match self {
            SdkSource::Path(path) => format!("{{ path = {:?} }}", path.display().to_string()),
            SdkSource::Version(version) => format!("{version:?}"),
        }
    }
}

/// Creates `parent/NAME` with a working transformation plugin. Refuses to
/// touch an existing directory.
pub fn scaffold(name: &str, parent: &Path, sdk: &SdkSource) -> anyhow::Result<PathBuf> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-');
    if !valid {
        bail!(
            "plugin name `{name}` must be lowercase letters, digits and dashes, starting with a letter (e.g. `utm-tagger`)"
        );
    }
    let dir = parent.join(name);
    if dir.exists() {
        bail!(
            "{} already exists; pick another name or remove it",
            dir.display()
        );
    }
    let type_name: String = name
        .split('-')
        .map(|part| {
            let mut chars = part.chars();
            chars
                .next()
                .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .collect();
    let files = [
        ("Cargo.toml", cargo_toml(name, sdk)),
        ("plugin.toml", plugin_toml(name)),
        ("src/lib.rs", lib_rs(name, &type_name)),
        ("sample.json", SAMPLE_EVENT.to_string()),
        ("README.md", readme(name)),
        (".gitignore", "/target\n*.wasm\n".to_string()),
    ];
    std::fs::create_dir_all(dir.join("src"))
        .with_context(|| format!("failed to create {}", dir.display()))?;
    for (file, text) in files {
        let path = dir.join(file);
        std::fs::write(&path, text)
            .with_context(|| format!("failed to write {}", path.display()))?;
    }
    Ok(dir)
}

fn cargo_toml(name: &str, sdk: &SdkSource) -> String {
    format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

[lib]
# cdylib is the WebAssembly component; rlib lets `cargo test` run natively.
crate-type = ["cdylib", "rlib"]

[dependencies]
sluice-plugin-sdk = {sdk}
serde = {{ version = "1", features = ["derive"] }}

# A plugin is its own workspace, even inside another project's tree.
[workspace]
"#,
        sdk = sdk.dependency()
    )
}

fn plugin_toml(name: &str) -> String {
    format!(
        r#"name = "{name}"
version = "0.1.0"
description = "Tags every event with a property and can drop one event name."
author = "You <you@example.com>"
license = "Apache-2.0"
# transform: per-event changes. Add "export" for a destination.
hooks = ["transform"]

# What the plugin may use besides logs, metrics, clock and randomness.
[capabilities]
http_hosts = []
kv = false

[config.tag]
type = "string"
default = "processed_by_{snake}"
description = "Property set to true on every event."

[config.drop_event]
type = "string"
required = false
description = "Events with this name are dropped."
"#,
        snake = name.replace('-', "_")
    )
}

fn lib_rs(name: &str, type_name: &str) -> String {
    format!(
        r#"//! {name}: a Sluice transformation plugin.

use serde::Deserialize;
use sluice_plugin_sdk::{{EventRef, Outcome, Plugin, Result, debug, register_plugin}};

/// The install's config, checked by the host against `plugin.toml` first.
#[derive(Deserialize)]
pub struct Config {{
    tag: String,
    drop_event: Option<String>,
}}

pub struct {type_name} {{
    config: Config,
}}

impl Plugin for {type_name} {{
    type Config = Config;

    fn new(config: Config) -> Result<Self> {{
        Ok({type_name} {{ config }})
    }}

    fn transform(&mut self, event: &mut EventRef<'_>) -> Result<Outcome> {{
        if self.config.drop_event.as_deref() == Some(event.name().as_str()) {{
            return Ok(Outcome::Drop);
        }}
        event.set_property(&self.config.tag, true)?;
        debug!("tagged {{}}", event.uuid());
        Ok(Outcome::Keep)
    }}
}}

register_plugin!({type_name});

#[cfg(test)]
mod tests {{
    use super::*;
    use sluice_plugin_sdk::json;
    use sluice_plugin_sdk::testing::{{self, MockHost}};

    #[test]
    fn tags_events() {{
        MockHost::install();
        let mut plugin = testing::setup::<{type_name}>(json!({{"tag": "seen"}})).unwrap();
        let event = testing::event("$pageview", "user-1", json!({{"path": "/"}}));
        let out = testing::transform(&mut plugin, event).unwrap();
        assert_eq!(out[0].properties["seen"], json!(true));
    }}

    #[test]
    fn drops_the_configured_event() {{
        MockHost::install();
        let config = json!({{"tag": "seen", "drop_event": "$pageleave"}});
        let mut plugin = testing::setup::<{type_name}>(config).unwrap();
        let event = testing::event("$pageleave", "user-1", json!({{}}));
        assert!(testing::transform(&mut plugin, event).unwrap().is_empty());
    }}
}}
"#
    )
}

const SAMPLE_EVENT: &str = r#"{
  "event": "$pageview",
  "distinct_id": "user-42",
  "timestamp": "2024-05-01T12:00:00Z",
  "properties": {
    "$current_url": "https://example.com/pricing?utm_source=newsletter",
    "email": "ann@example.com"
  }
}
"#;

fn readme(name: &str) -> String {
    format!(
        r#"# {name}

A Sluice transformation plugin.

```sh
cargo test                                   # native unit tests, no wasm needed
sluice plugin build                          # writes {name}.wasm
sluice plugin test {name}.wasm --event sample.json
sluice plugin test {name}.wasm --event sample.json --config '{{"drop_event": "$pageview"}}'
```

See the Sluice plugin author guide (`docs/plugin-authors.md`) for the SDK,
the manifest, capabilities and limits.
"#
    )
}
