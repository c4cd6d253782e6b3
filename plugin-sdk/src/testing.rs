//! A native stand-in for the Sluice host, so a plugin's `cargo test` runs
//! without WebAssembly.
//!
//! Each test thread has its own mock. Host calls made by plugin code (logs,
//! key-value, HTTP, metrics, clock, random) go to it, and tests read back what
//! happened:
//!
//! ```
//! use sluice_plugin_sdk::http::{Request, Response};
//! use sluice_plugin_sdk::testing::MockHost;
//!
//! let host = MockHost::install();
//! host.on_http(|request| Ok(Response::new(200, format!("echo {}", request.url))));
//! let response = Request::get("https://api.example.com/ping").send().unwrap();
//! assert_eq!(response.text().unwrap(), "echo https://api.example.com/ping");
//! assert_eq!(host.requests().len(), 1);
//! ```
//!
//! [`setup`] and [`transform`] run a plugin's hooks the way the host does;
//! the other functions are the fixtures and checks most plugin tests need:
//!
//! ```
//! use sluice_plugin_sdk::http::{Request, Response};
//! use sluice_plugin_sdk::testing::{self, MockHost};
//! use sluice_plugin_sdk::{Error, ExportError, ExportedEvent, Plugin, Result, Value, json};
//!
//! struct Forward {
//!     url: String,
//! }
//!
//! impl Plugin for Forward {
//!     type Config = Value;
//!
//!     fn new(config: Value) -> Result<Self> {
//!         match config["url"].as_str() {
//!             Some(url) => Ok(Forward { url: url.into() }),
//!             None => Err(Error::msg("url is required")),
//!         }
//!     }
//!
//!     fn export(&mut self, events: Vec<ExportedEvent>) -> Result<(), ExportError> {
//!         Request::post(&self.url).json(&events)?.send()?.error_for_status()?;
//!         Ok(())
//!     }
//! }
//!
//! assert_eq!(testing::refusal::<Forward>(json!({})), "url is required");
//!
//! let host = MockHost::install();
//! host.on_http(|_| Ok(Response::new(400, "no")));
//! let mut plugin: Forward = testing::plugin(json!({"url": "https://example.com"}));
//! let err = plugin
//!     .export(vec![testing::exported_event("id-1", "signed up", json!({}))])
//!     .unwrap_err();
//! assert_eq!(testing::permanent(err), "HTTP 400: no");
//! let request = &host.requests()[0];
//! assert_eq!(testing::header(request, "Content-Type"), Some("application/json"));
//! assert_eq!(testing::json_body(request)[0]["uuid"], json!("id-1"));
//! ```

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use serde_json::{Map, Value};

use crate::http::{HttpError, Request, Response};
use crate::kv::KvError;
use crate::log::Level;
use crate::metrics::MetricsError;
use crate::{Error, Event, EventRef, ExportError, ExportedEvent, Outcome, Plugin, Result};

/// One line a plugin logged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLine {
    /// Its level.
    pub level: Level,
    /// Its message.
    pub message: String,
    /// Its key/value fields.
    pub fields: Vec<(String, String)>,
}

type HttpHandler = Box<dyn FnMut(&Request) -> Result<Response, HttpError>>;

#[derive(Default)]
pub(crate) struct MockState {
    logs: Vec<LogLine>,
    kv: BTreeMap<String, Vec<u8>>,
    kv_denied: bool,
    requests: Vec<Request>,
    counters: BTreeMap<String, u64>,
    now_millis: u64,
    random_state: u64,
}

thread_local! {
    static STATE: RefCell<MockState> = RefCell::new(MockState {
        now_millis: DEFAULT_NOW_MILLIS,
        random_state: 0x853c_49e6_748f_ea9b,
        ..MockState::default()
    });
    // Kept apart from STATE so a handler may itself call host functions
    // (log, kv) without a re-entrant borrow.
    static HTTP: RefCell<Option<Rc<RefCell<HttpHandler>>>> = const { RefCell::new(None) };
}

/// 2024-01-01T00:00:00Z: a fixed clock keeps tests repeatable.
const DEFAULT_NOW_MILLIS: u64 = 1_704_067_200_000;

pub(crate) fn with_mock<R>(f: impl FnOnce(&mut MockState) -> R) -> R {
    STATE.with_borrow_mut(f)
}

pub(crate) fn mock_fetch(request: &Request) -> Result<Response, HttpError> {
    with_mock(|mock| mock.requests.push(request.clone()));
    let handler = HTTP.with_borrow(|handler| handler.clone());
    match handler {
        Some(handler) => (handler.borrow_mut())(request),
        None => Err(HttpError::Connection(format!(
            "no mock HTTP handler for {}: call MockHost::on_http in the test",
            request.url
        ))),
    }
}

impl MockState {
    pub(crate) fn log(&mut self, level: Level, message: &str, fields: &[(&str, &str)]) {
        self.logs.push(LogLine {
            level,
            message: message.to_string(),
            fields: fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        });
    }

    fn check_kv(&self) -> Result<(), KvError> {
        if self.kv_denied {
            return Err(KvError::Denied(
                "kv is denied by MockHost::deny_kv in this test".into(),
            ));
        }
        Ok(())
    }

    pub(crate) fn kv_get(&self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        self.check_kv()?;
        Ok(self.kv.get(key).cloned())
    }

    pub(crate) fn kv_set(
        &mut self,
        key: &str,
        value: &[u8],
        _ttl: Option<u32>,
    ) -> Result<(), KvError> {
        self.check_kv()?;
        self.kv.insert(key.to_string(), value.to_vec());
        Ok(())
    }

    pub(crate) fn kv_delete(&mut self, key: &str) -> Result<bool, KvError> {
        self.check_kv()?;
        Ok(self.kv.remove(key).is_some())
    }

    pub(crate) fn kv_increment(
        &mut self,
        key: &str,
        delta: i64,
        _ttl: Option<u32>,
    ) -> Result<i64, KvError> {
        self.check_kv()?;
        let current = match self.kv.get(key) {
            Some(bytes) => std::str::from_utf8(bytes)
                .ok()
                .and_then(|text| text.parse::<i64>().ok())
                .ok_or_else(|| KvError::NotANumber(format!("key `{key}`")))?,
            None => 0,
        };
        let next = current.saturating_add(delta);
        self.kv
            .insert(key.to_string(), next.to_string().into_bytes());
        Ok(next)
    }

    pub(crate) fn metrics_increment(
        &mut self,
        name: &str,
        delta: u64,
        labels: &[(&str, &str)],
    ) -> Result<(), MetricsError> {
        let valid = !name.is_empty()
            && name.len() <= 64
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(MetricsError::InvalidName(name.to_string()));
        }
        let mut series = name.to_string();
        for (k, v) in labels {
            series.push_str(&format!(",{k}={v}"));
        }
        *self.counters.entry(series).or_default() += delta;
        Ok(())
    }

    pub(crate) fn now_millis(&self) -> u64 {
        self.now_millis
    }

    pub(crate) fn random_u64(&mut self) -> u64 {
        // splitmix64: deterministic, so tests that use randomness repeat.
        self.random_state = self.random_state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.random_state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub(crate) fn random_bytes(&mut self, len: u32) -> Vec<u8> {
        let len = len.min(65536) as usize;
        let mut bytes = Vec::with_capacity(len + 8);
        while bytes.len() < len {
            bytes.extend_from_slice(&self.random_u64().to_le_bytes());
        }
        bytes.truncate(len);
        bytes
    }
}

/// The mock host of the current test thread.
///
/// It has a fixed clock (2024-01-01T00:00:00Z), deterministic randomness,
/// an empty key-value store and no HTTP handler: requests fail with
/// [`HttpError::Connection`] until the test installs one.
pub struct MockHost {
    _not_send: std::marker::PhantomData<*const ()>,
}

impl MockHost {
    /// Resets this thread's mock host and returns a handle to it.
    pub fn install() -> MockHost {
        with_mock(|mock| {
            *mock = MockState {
                now_millis: DEFAULT_NOW_MILLIS,
                random_state: 0x853c_49e6_748f_ea9b,
                ..MockState::default()
            }
        });
        HTTP.with_borrow_mut(|handler| *handler = None);
        MockHost {
            _not_send: std::marker::PhantomData,
        }
    }

    /// Answers the plugin's HTTP requests with `handler`.
    pub fn on_http(&self, handler: impl FnMut(&Request) -> Result<Response, HttpError> + 'static) {
        let handler: HttpHandler = Box::new(handler);
        HTTP.with_borrow_mut(|slot| *slot = Some(Rc::new(RefCell::new(handler))));
    }

    /// Every request the plugin sent, in order.
    pub fn requests(&self) -> Vec<Request> {
        with_mock(|mock| mock.requests.clone())
    }

    /// Every line the plugin logged, in order.
    pub fn logs(&self) -> Vec<LogLine> {
        with_mock(|mock| mock.logs.clone())
    }

    /// The value stored under `key`.
    pub fn kv(&self, key: &str) -> Option<Vec<u8>> {
        with_mock(|mock| mock.kv.get(key).cloned())
    }

    /// Makes every key-value call fail with [`KvError::Denied`], as the host
    /// does when `plugin.toml` does not ask for the capability.
    pub fn deny_kv(&self) {
        with_mock(|mock| mock.kv_denied = true);
    }

    /// Counter values by series (`name,label=value,…`).
    pub fn counters(&self) -> BTreeMap<String, u64> {
        with_mock(|mock| mock.counters.clone())
    }

    /// Sets the clock.
    pub fn set_now_millis(&self, millis: u64) {
        with_mock(|mock| mock.now_millis = millis);
    }
}

/// Creates a plugin from a JSON config, as the host's `setup` does.
pub fn setup<P: Plugin>(config: Value) -> Result<P> {
    let config: P::Config = serde_json::from_value(config)
        .map_err(|err| Error::msg(format!("invalid config: {err}")))?;
    P::new(config)
}

/// Creates a plugin from a JSON config the test expects it to accept.
///
/// # Panics
///
/// With the plugin's message when it refuses the config.
pub fn plugin<P: Plugin>(config: Value) -> P {
    match setup::<P>(config) {
        Ok(plugin) => plugin,
        Err(err) => panic!("config refused: {err}"),
    }
}

/// The message a plugin refuses a JSON config with, as the operator would
/// see it on the install.
///
/// # Panics
///
/// When the plugin accepts the config.
pub fn refusal<P: Plugin>(config: Value) -> String {
    match setup::<P>(config) {
        Ok(_) => panic!("config accepted, but the test expects a refusal"),
        Err(err) => err.to_string(),
    }
}

/// `base` with the top-level fields of `changes` put in, replacing any it
/// has: a valid test config with a few fields changed.
///
/// # Panics
///
/// When either is not a JSON object.
pub fn merged(base: Value, changes: Value) -> Value {
    let (Value::Object(mut config), Value::Object(changes)) = (base, changes) else {
        panic!("a config and its changes must be JSON objects");
    };
    config.extend(changes);
    Value::Object(config)
}

/// The config a plugin's manifest gives by default, after checking that
/// every field under `[config]` has a description, since the console shows
/// it to the operator.
///
/// `manifest` is the plugin's `plugin.toml` read into a [`Value`], with the
/// `toml` crate for instance. Add the required fields to the result and
/// [`setup`] the plugin with it, to check that the defaults are valid.
///
/// # Panics
///
/// When a field has no description.
pub fn manifest_defaults(manifest: &Value) -> Map<String, Value> {
    let empty = Map::new();
    let fields = manifest["config"].as_object().unwrap_or(&empty);
    let mut defaults = Map::new();
    for (name, field) in fields {
        let description = field["description"].as_str().unwrap_or("");
        assert!(!description.trim().is_empty(), "{name} has no description");
        if let Some(default) = field.get("default") {
            defaults.insert(name.clone(), default.clone());
        }
    }
    defaults
}

/// Runs `Plugin::transform` on an event and returns what the host would go
/// on with: the changed event, nothing if dropped, or the replacements.
pub fn transform<P: Plugin>(plugin: &mut P, mut event: Event) -> Result<Vec<Event>> {
    let outcome = plugin.transform(&mut EventRef::new(&mut event))?;
    Ok(match outcome {
        Outcome::Keep => vec![event],
        Outcome::Drop => Vec::new(),
        Outcome::Replace(events) => events,
    })
}

/// A test event with a fixed uuid and timestamp.
pub fn event(name: &str, distinct_id: &str, properties: Value) -> Event {
    Event {
        uuid: "01890000-0000-7000-8000-000000000001".into(),
        name: name.into(),
        distinct_id: distinct_id.into(),
        timestamp: "2024-01-01T00:00:00.000Z".into(),
        properties: match properties {
            Value::Object(map) => map,
            Value::Null => serde_json::Map::new(),
            other => panic!("test event properties must be a JSON object, got {other}"),
        },
    }
}

/// A stored event for testing [`Plugin::export`]: distinct id `user-1`,
/// person `person-1` and timestamp 2024-01-01T00:00:00.000Z. Change the
/// rest with struct update syntax, such as
/// `ExportedEvent { person_id: None, ..exported_event("id-1", "paid", json!({})) }`.
pub fn exported_event(uuid: &str, name: &str, properties: Value) -> ExportedEvent {
    ExportedEvent {
        uuid: uuid.into(),
        name: name.into(),
        distinct_id: "user-1".into(),
        person_id: Some("person-1".into()),
        timestamp: "2024-01-01T00:00:00.000Z".into(),
        properties: match properties {
            Value::Object(map) => map,
            Value::Null => Map::new(),
            other => panic!("test event properties must be a JSON object, got {other}"),
        },
    }
}

/// The value of a header the plugin sent, by case-insensitive name.
///
/// # Panics
///
/// When the request carries the header more than once: receivers differ in
/// which copy they read.
pub fn header<'a>(request: &'a Request, name: &str) -> Option<&'a str> {
    let mut values = request
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name));
    let value = values.next().map(|(_, v)| v.as_str());
    assert!(values.next().is_none(), "header {name} is sent twice");
    value
}

/// The request's body read as JSON.
///
/// # Panics
///
/// When the request has no body or the body is not JSON.
pub fn json_body(request: &Request) -> Value {
    let body = request.body.as_deref().expect("the request has a body");
    serde_json::from_slice(body).expect("the request body is JSON")
}

/// The message of a permanent export error.
///
/// # Panics
///
/// When the error is retryable.
pub fn permanent(err: ExportError) -> String {
    match err {
        ExportError::Permanent(message) => message,
        other => panic!("expected a permanent error, got {other:?}"),
    }
}
