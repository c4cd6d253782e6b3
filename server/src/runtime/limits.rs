//! Resource limits for plugin instances and the operator's policy that caps
//! them. Every limit here guards against guest-controlled resource
//! exhaustion: a plugin is untrusted code.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::manifest::HostRule;

/// Limits for one plugin install. An install may ask for different values;
/// [`Limits::capped_by`] keeps them within the operator's caps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Linear memory per instance.
    pub memory_bytes: u64,
    /// Time limit for one `transform` call, enforced by epoch interruption
    /// (wall-clock time, HTTP waits included).
    #[serde(with = "millis", rename = "transform_deadline_ms")]
    pub transform_deadline: Duration,
    /// Deadline for one `export-batch` call, HTTP waits included.
    #[serde(with = "millis", rename = "export_deadline_ms")]
    pub export_deadline: Duration,
    /// Deadline for `setup` and for one scheduled task.
    #[serde(with = "millis", rename = "setup_deadline_ms")]
    pub setup_deadline: Duration,
    /// Time one call may spend running the plugin's own code, as opposed
    /// to waiting for its HTTP requests: an export may wait 30 s on a slow
    /// vendor, but a plugin that computes for 30 s would hold a core all
    /// that time, and its retries again.
    #[serde(with = "millis", rename = "compute_ms")]
    pub compute: Duration,
    /// Bytes a `transform` call may write into events (set-* calls and new
    /// events).
    pub max_output_bytes: u64,
    /// Events a `transform` call may return.
    pub max_output_events: u32,
    /// Log lines per plugin instance per minute; the rest are dropped and
    /// counted.
    pub log_lines_per_minute: u32,
    /// Longer log lines are cut.
    pub max_log_line_bytes: u32,
    /// Timeout of one HTTP request.
    #[serde(with = "millis", rename = "http_timeout_ms")]
    pub http_timeout: Duration,
    /// Size of one HTTP response body.
    pub max_http_response_bytes: u64,
    /// Size of one key-value value.
    pub max_kv_value_bytes: u64,
    /// Distinct metric series per install.
    pub max_metric_series: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 64 << 20,
            transform_deadline: Duration::from_millis(100),
            export_deadline: Duration::from_secs(30),
            setup_deadline: Duration::from_secs(5),
            compute: Duration::from_secs(1),
            max_output_bytes: 1 << 20,
            max_output_events: 100,
            log_lines_per_minute: 600,
            max_log_line_bytes: 8 << 10,
            http_timeout: Duration::from_secs(10),
            max_http_response_bytes: 10 << 20,
            max_kv_value_bytes: 1 << 20,
            max_metric_series: 100,
        }
    }
}

impl Limits {
    /// These limits with every value at most the operator's cap.
    pub fn capped_by(&self, caps: &Limits) -> Limits {
        Limits {
            memory_bytes: self.memory_bytes.min(caps.memory_bytes),
            transform_deadline: self.transform_deadline.min(caps.transform_deadline),
            export_deadline: self.export_deadline.min(caps.export_deadline),
            setup_deadline: self.setup_deadline.min(caps.setup_deadline),
            compute: self.compute.min(caps.compute),
            max_output_bytes: self.max_output_bytes.min(caps.max_output_bytes),
            max_output_events: self.max_output_events.min(caps.max_output_events),
            log_lines_per_minute: self.log_lines_per_minute.min(caps.log_lines_per_minute),
            max_log_line_bytes: self.max_log_line_bytes.min(caps.max_log_line_bytes),
            http_timeout: self.http_timeout.min(caps.http_timeout),
            max_http_response_bytes: self
                .max_http_response_bytes
                .min(caps.max_http_response_bytes),
            max_kv_value_bytes: self.max_kv_value_bytes.min(caps.max_kv_value_bytes),
            max_metric_series: self.max_metric_series.min(caps.max_metric_series),
        }
    }
}

/// What the operator allows plugins, on top of what each manifest asks for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// Hosts any plugin may reach, narrowing the manifests' lists. `None`
    /// leaves the manifests' lists as they are.
    pub http_hosts: Option<Vec<String>>,
    /// Whether plugins may use the key-value store at all.
    pub kv: bool,
    /// Allow requests to loopback addresses (127.0.0.0/8, ::1).
    pub allow_loopback: bool,
    /// Allow requests to private networks (10/8, 172.16/12, 192.168/16,
    /// 100.64/10, fc00::/7).
    pub allow_private: bool,
    /// Allow requests to link-local addresses (169.254/16, fe80::/10), where
    /// cloud metadata services live.
    pub allow_link_local: bool,
    /// HTTP requests in flight at once across all plugins.
    pub http_concurrency: usize,
    /// The caps on every install's [`Limits`].
    pub limits: Limits,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            http_hosts: None,
            kv: true,
            allow_loopback: false,
            allow_private: false,
            allow_link_local: false,
            http_concurrency: 64,
            limits: Limits::default(),
        }
    }
}

impl Policy {
    /// The operator's host rules, parsed.
    pub fn host_rules(&self) -> Result<Option<Vec<HostRule>>, String> {
        self.http_hosts
            .as_ref()
            .map(|hosts| {
                hosts
                    .iter()
                    .map(|h| {
                        h.parse::<HostRule>()
                            .map_err(|e| format!("policy http_hosts: {e}"))
                    })
                    .collect()
            })
            .transpose()
    }
}

mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}
