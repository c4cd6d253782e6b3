//! The one place capabilities are granted: manifest ∩ operator policy,
//! computed once when an install is instantiated and checked on every host
//! call. A refusal is a message for a typed WIT error, never a trap.

use serde_json::{Map, Value};

use super::limits::Policy;
use super::manifest::{HostRule, Manifest};

/// What one plugin install may do.
#[derive(Clone, Debug)]
pub struct Grants {
    plugin: String,
    /// The manifest's host rules with `{config.*}` resolved.
    manifest_hosts: Vec<HostRule>,
    /// The operator's host rules; `None` narrows nothing.
    policy_hosts: Option<Vec<HostRule>>,
    kv: KvGrant,
}

#[derive(Clone, Debug)]
enum KvGrant {
    Granted,
    NotRequested,
    DeniedByPolicy,
}

impl Grants {
    /// Grants for `manifest` installed with `config` (already validated)
    /// under `policy`.
    pub fn compute(
        manifest: &Manifest,
        config: &Map<String, Value>,
        policy: &Policy,
    ) -> Result<Grants, String> {
        let mut manifest_hosts = Vec::new();
        for entry in &manifest.capabilities.http_hosts {
            match entry.parse::<HostRule>()? {
                HostRule::ConfigField(field) => {
                    // An unset optional URL simply grants nothing.
                    let Some(url) = config
                        .get(&field)
                        .and_then(Value::as_str)
                        .filter(|u| !u.is_empty())
                    else {
                        continue;
                    };
                    let parsed = reqwest::Url::parse(url).map_err(|err| {
                        format!("config field `{field}` is not a URL ({err}): {url}")
                    })?;
                    let host = parsed
                        .host_str()
                        .ok_or_else(|| format!("config field `{field}` is a URL without a host"))?;
                    manifest_hosts.push(HostRule::Exact {
                        host: host
                            .trim_start_matches('[')
                            .trim_end_matches(']')
                            .to_ascii_lowercase(),
                        port: parsed.port_or_known_default(),
                    });
                }
                rule => manifest_hosts.push(rule),
            }
        }
        let kv = match (manifest.capabilities.kv, policy.kv) {
            (true, true) => KvGrant::Granted,
            (false, _) => KvGrant::NotRequested,
            (true, false) => KvGrant::DeniedByPolicy,
        };
        Ok(Grants {
            plugin: manifest.id(),
            manifest_hosts,
            policy_hosts: policy.host_rules()?,
            kv,
        })
    }

    /// Whether the plugin may send a request to `host:port`; on refusal, why.
    pub fn check_http(&self, host: &str, port: u16) -> Result<(), String> {
        if !self
            .manifest_hosts
            .iter()
            .any(|rule| rule.matches(host, port))
        {
            return Err(format!(
                "capability http for {host}:{port} is not granted to {}: add the host to http_hosts under [capabilities] in its plugin.toml",
                self.plugin
            ));
        }
        if let Some(rules) = &self.policy_hosts
            && !rules.iter().any(|rule| rule.matches(host, port))
        {
            return Err(format!(
                "capability http for {host}:{port} is not granted to {}: the operator's policy does not allow this host",
                self.plugin
            ));
        }
        Ok(())
    }

    /// Whether the plugin may use the key-value store; on refusal, why.
    pub fn check_kv(&self) -> Result<(), String> {
        match self.kv {
            KvGrant::Granted => Ok(()),
            KvGrant::NotRequested => Err(format!(
                "capability kv is not granted to {}: set kv = true under [capabilities] in its plugin.toml",
                self.plugin
            )),
            KvGrant::DeniedByPolicy => Err(format!(
                "capability kv is not granted to {}: the operator's policy disables the key-value store",
                self.plugin
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn manifest(extra: &str) -> Manifest {
        Manifest::parse(&format!(
            "name = \"p\"\nversion = \"1.0.0\"\ndescription = \"d\"\nhooks = [\"export\"]\n{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn config_urls_grant_exactly_their_host_and_port() {
        let m = manifest(
            "[capabilities]\nhttp_hosts = [\"{config.url}\"]\n[config.url]\ntype = \"string\"\n",
        );
        let config = json!({"url": "https://hooks.example.com/x"});
        let grants = Grants::compute(&m, config.as_object().unwrap(), &Policy::default()).unwrap();
        assert!(grants.check_http("hooks.example.com", 443).is_ok());
        assert!(grants.check_http("hooks.example.com", 80).is_err());
        assert!(grants.check_http("example.com", 443).is_err());
    }

    #[test]
    fn the_operator_narrows_what_the_manifest_asks_for() {
        let m = manifest("[capabilities]\nhttp_hosts = [\"*\"]\nkv = true\n");
        let policy = Policy {
            http_hosts: Some(vec!["api.example.com".into()]),
            kv: false,
            ..Policy::default()
        };
        let grants = Grants::compute(&m, &Map::new(), &policy).unwrap();
        assert!(grants.check_http("api.example.com", 443).is_ok());
        let err = grants.check_http("other.example.com", 443).unwrap_err();
        assert!(err.contains("operator's policy"), "{err}");
        assert!(grants.check_kv().unwrap_err().contains("operator's policy"));
    }

    #[test]
    fn refusals_name_the_plugin_and_the_fix() {
        let grants = Grants::compute(&manifest(""), &Map::new(), &Policy::default()).unwrap();
        let err = grants.check_http("evil.test", 443).unwrap_err();
        assert_eq!(
            err,
            "capability http for evil.test:443 is not granted to p@1.0.0: add the host to http_hosts under [capabilities] in its plugin.toml"
        );
        assert!(grants.check_kv().unwrap_err().contains("set kv = true"));
    }
}
