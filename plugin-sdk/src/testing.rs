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
//! [`setup`] and [`transform`] run a plugin's hooks the way the host does.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use serde_json::Value;

use crate::http::{HttpError, Request, Response};
use crate::kv::KvError;
use crate::log::Level;
use crate::metrics::MetricsError;
use crate::{Error, Event, EventRef, Outcome, Plugin, Result};

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
