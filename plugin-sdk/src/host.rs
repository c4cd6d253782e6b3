//! The one place the SDK talks to its host: the WIT imports inside a
//! WebAssembly instance, the thread-local [`crate::testing::MockHost`]
//! everywhere else. Every capability module goes through here.

#[cfg(target_arch = "wasm32")]
mod imp {
    use crate::__private::bindings::sluice::plugin as wit;
    use crate::http::{HttpError, Method, Request, Response};
    use crate::kv::KvError;
    use crate::log::Level;
    use crate::metrics::MetricsError;

    pub fn log_write(level: Level, message: &str, fields: &[(&str, &str)]) {
        let level = match level {
            Level::Trace => wit::log::Level::Trace,
            Level::Debug => wit::log::Level::Debug,
            Level::Info => wit::log::Level::Info,
            Level::Warn => wit::log::Level::Warn,
            Level::Error => wit::log::Level::Error,
        };
        let fields: Vec<(String, String)> = fields
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        wit::log::write(level, message, &fields);
    }

    fn kv_error(err: wit::kv::KvError) -> KvError {
        match err {
            wit::kv::KvError::Denied(m) => KvError::Denied(m),
            wit::kv::KvError::TooLarge(m) => KvError::TooLarge(m),
            wit::kv::KvError::NotANumber(m) => KvError::NotANumber(m),
            wit::kv::KvError::Unavailable(m) => KvError::Unavailable(m),
        }
    }

    pub fn kv_get(key: &str) -> Result<Option<Vec<u8>>, KvError> {
        wit::kv::get(key).map_err(kv_error)
    }

    pub fn kv_set(key: &str, value: &[u8], ttl: Option<u32>) -> Result<(), KvError> {
        wit::kv::set(key, value, ttl).map_err(kv_error)
    }

    pub fn kv_delete(key: &str) -> Result<bool, KvError> {
        wit::kv::delete(key).map_err(kv_error)
    }

    pub fn kv_increment(key: &str, delta: i64, ttl: Option<u32>) -> Result<i64, KvError> {
        wit::kv::increment(key, delta, ttl).map_err(kv_error)
    }

    pub fn http_fetch(request: &Request) -> Result<Response, HttpError> {
        let method = match request.method {
            Method::Get => wit::http::Method::Get,
            Method::Head => wit::http::Method::Head,
            Method::Post => wit::http::Method::Post,
            Method::Put => wit::http::Method::Put,
            Method::Patch => wit::http::Method::Patch,
            Method::Delete => wit::http::Method::Delete,
        };
        let wit_request = wit::http::Request {
            method,
            url: request.url.clone(),
            headers: request.headers.clone(),
            body: request.body.clone(),
            timeout_ms: request
                .timeout
                .map(|t| t.as_millis().min(u32::MAX as u128) as u32),
        };
        match wit::http::fetch(&wit_request) {
            Ok(response) => Ok(Response {
                status: response.status,
                headers: response.headers,
                body: response.body,
            }),
            Err(wit::http::HttpError::Denied(m)) => Err(HttpError::Denied(m)),
            Err(wit::http::HttpError::InvalidRequest(m)) => Err(HttpError::InvalidRequest(m)),
            Err(wit::http::HttpError::Timeout) => Err(HttpError::Timeout),
            Err(wit::http::HttpError::TooLarge(m)) => Err(HttpError::TooLarge(m)),
            Err(wit::http::HttpError::Connection(m)) => Err(HttpError::Connection(m)),
        }
    }

    pub fn metrics_increment(
        name: &str,
        delta: u64,
        labels: &[(&str, &str)],
    ) -> Result<(), MetricsError> {
        let labels: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        wit::metrics::increment(name, delta, &labels).map_err(|err| match err {
            wit::metrics::MetricsError::InvalidName(m) => MetricsError::InvalidName(m),
            wit::metrics::MetricsError::TooManySeries(m) => MetricsError::TooManySeries(m),
        })
    }

    pub fn now_millis() -> u64 {
        wit::clock::now_millis()
    }

    pub fn random_bytes(len: u32) -> Vec<u8> {
        wit::random::get_bytes(len)
    }

    pub fn random_u64() -> u64 {
        wit::random::get_u64()
    }

    /// Sends panic messages to the plugin log, marked so the host can name
    /// the panic when it reports the trap that follows.
    pub fn install_panic_hook() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            std::panic::set_hook(Box::new(|info| {
                log_write(Level::Error, &info.to_string(), &[("sluice.panic", "true")]);
            }));
        });
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod imp {
    use crate::http::{HttpError, Request, Response};
    use crate::kv::KvError;
    use crate::log::Level;
    use crate::metrics::MetricsError;
    use crate::testing::with_mock;

    pub fn log_write(level: Level, message: &str, fields: &[(&str, &str)]) {
        with_mock(|mock| mock.log(level, message, fields));
    }

    pub fn kv_get(key: &str) -> Result<Option<Vec<u8>>, KvError> {
        with_mock(|mock| mock.kv_get(key))
    }

    pub fn kv_set(key: &str, value: &[u8], ttl: Option<u32>) -> Result<(), KvError> {
        with_mock(|mock| mock.kv_set(key, value, ttl))
    }

    pub fn kv_delete(key: &str) -> Result<bool, KvError> {
        with_mock(|mock| mock.kv_delete(key))
    }

    pub fn kv_increment(key: &str, delta: i64, ttl: Option<u32>) -> Result<i64, KvError> {
        with_mock(|mock| mock.kv_increment(key, delta, ttl))
    }

    pub fn http_fetch(request: &Request) -> Result<Response, HttpError> {
        crate::testing::mock_fetch(request)
    }

    pub fn metrics_increment(
        name: &str,
        delta: u64,
        labels: &[(&str, &str)],
    ) -> Result<(), MetricsError> {
        with_mock(|mock| mock.metrics_increment(name, delta, labels))
    }

    pub fn now_millis() -> u64 {
        with_mock(|mock| mock.now_millis())
    }

    pub fn random_bytes(len: u32) -> Vec<u8> {
        with_mock(|mock| mock.random_bytes(len))
    }

    pub fn random_u64() -> u64 {
        with_mock(|mock| mock.random_u64())
    }

    pub fn install_panic_hook() {}
}

pub(crate) use imp::*;
