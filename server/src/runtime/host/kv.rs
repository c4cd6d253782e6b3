//! Key-value storage, namespaced per install.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::HostState;
use crate::runtime::bindings::kv::{Host, KvError};

/// Longest key a plugin may use.
const MAX_KEY_BYTES: usize = 512;

/// Where key-value data lives. Each method takes the install's namespace;
/// implementations never let one namespace see another's keys.
pub trait KvStore: Send + Sync {
    fn get(&self, namespace: &str, key: &str) -> Result<Option<Vec<u8>>, KvError>;
    fn set(
        &self,
        namespace: &str,
        key: &str,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> Result<(), KvError>;
    fn delete(&self, namespace: &str, key: &str) -> Result<bool, KvError>;
    fn increment(
        &self,
        namespace: &str,
        key: &str,
        delta: i64,
        ttl: Option<Duration>,
    ) -> Result<i64, KvError>;
    /// Drops every key of a namespace: its install is gone.
    fn remove_namespace(&self, namespace: &str);
}

/// Entries by (namespace, key): the value and when it expires.
type Entries = HashMap<(String, String), (Vec<u8>, Option<Instant>)>;

/// An in-process store with TTLs, for `sluice plugin test` and single-process
/// use. Contents do not survive a restart.
#[derive(Default)]
pub struct MemoryKv {
    entries: Mutex<Entries>,
}

impl MemoryKv {
    fn live<'a>(
        entries: &'a mut Entries,
        id: &(String, String),
    ) -> Option<&'a mut (Vec<u8>, Option<Instant>)> {
        let expired = entries
            .get(id)
            .is_some_and(|(_, expiry)| expiry.is_some_and(|at| at <= Instant::now()));
        if expired {
            entries.remove(id);
        }
        entries.get_mut(id)
    }
}

impl KvStore for MemoryKv {
    fn get(&self, namespace: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        let mut entries = self.entries.lock().expect("kv lock");
        let id = (namespace.to_string(), key.to_string());
        Ok(Self::live(&mut entries, &id).map(|(value, _)| value.clone()))
    }

    fn set(
        &self,
        namespace: &str,
        key: &str,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> Result<(), KvError> {
        let expiry = ttl.map(|ttl| Instant::now() + ttl);
        let mut entries = self.entries.lock().expect("kv lock");
        entries.insert((namespace.to_string(), key.to_string()), (value, expiry));
        Ok(())
    }

    fn delete(&self, namespace: &str, key: &str) -> Result<bool, KvError> {
        let mut entries = self.entries.lock().expect("kv lock");
        let id = (namespace.to_string(), key.to_string());
        let existed = Self::live(&mut entries, &id).is_some();
        entries.remove(&id);
        Ok(existed)
    }

    fn increment(
        &self,
        namespace: &str,
        key: &str,
        delta: i64,
        ttl: Option<Duration>,
    ) -> Result<i64, KvError> {
        let mut entries = self.entries.lock().expect("kv lock");
        let id = (namespace.to_string(), key.to_string());
        let (current, expiry) = match Self::live(&mut entries, &id) {
            Some((value, expiry)) => {
                let number = std::str::from_utf8(value)
                    .ok()
                    .and_then(|text| text.parse::<i64>().ok())
                    .ok_or_else(|| {
                        KvError::NotANumber(format!("key `{key}` does not hold an integer"))
                    })?;
                (number, *expiry)
            }
            None => (0, ttl.map(|ttl| Instant::now() + ttl)),
        };
        let next = current.saturating_add(delta);
        entries.insert(id, (next.to_string().into_bytes(), expiry));
        Ok(next)
    }

    fn remove_namespace(&self, namespace: &str) {
        let mut entries = self.entries.lock().expect("kv lock");
        entries.retain(|(owner, _), _| owner != namespace);
    }
}

impl HostState {
    fn kv_check(&self, key: &str, value_len: usize) -> Result<(), KvError> {
        self.install.grants.check_kv().map_err(KvError::Denied)?;
        if key.len() > MAX_KEY_BYTES {
            return Err(KvError::TooLarge(format!(
                "keys are limited to {MAX_KEY_BYTES} bytes"
            )));
        }
        let max_value = self.install.limits.max_kv_value_bytes;
        if value_len as u64 > max_value {
            return Err(KvError::TooLarge(format!(
                "values are limited to {max_value} bytes"
            )));
        }
        Ok(())
    }
}

fn ttl(seconds: Option<u32>) -> Option<Duration> {
    seconds.map(|s| Duration::from_secs(s.into()))
}

impl Host for HostState {
    fn get(&mut self, key: String) -> wasmtime::Result<Result<Option<Vec<u8>>, KvError>> {
        Ok(self
            .kv_check(&key, 0)
            .and_then(|()| self.services.kv.get(&self.install.install_id, &key)))
    }

    fn set(
        &mut self,
        key: String,
        value: Vec<u8>,
        ttl_seconds: Option<u32>,
    ) -> wasmtime::Result<Result<(), KvError>> {
        Ok(self.kv_check(&key, value.len()).and_then(|()| {
            self.services
                .kv
                .set(&self.install.install_id, &key, value, ttl(ttl_seconds))
        }))
    }

    fn delete(&mut self, key: String) -> wasmtime::Result<Result<bool, KvError>> {
        Ok(self
            .kv_check(&key, 0)
            .and_then(|()| self.services.kv.delete(&self.install.install_id, &key)))
    }

    fn increment(
        &mut self,
        key: String,
        delta: i64,
        ttl_seconds: Option<u32>,
    ) -> wasmtime::Result<Result<i64, KvError>> {
        Ok(self.kv_check(&key, 0).and_then(|()| {
            self.services
                .kv
                .increment(&self.install.install_id, &key, delta, ttl(ttl_seconds))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_never_see_each_others_keys() {
        let kv = MemoryKv::default();
        kv.set("a", "k", b"1".to_vec(), None).unwrap();
        assert_eq!(kv.get("b", "k").unwrap(), None);
        assert_eq!(kv.get("a", "k").unwrap(), Some(b"1".to_vec()));
    }

    #[test]
    fn expired_keys_are_gone() {
        let kv = MemoryKv::default();
        kv.set("a", "k", b"1".to_vec(), Some(Duration::ZERO))
            .unwrap();
        assert_eq!(kv.get("a", "k").unwrap(), None);
        assert!(!kv.delete("a", "k").unwrap());
    }

    #[test]
    fn increment_counts_from_zero_and_refuses_text() {
        let kv = MemoryKv::default();
        assert_eq!(kv.increment("a", "n", 2, None).unwrap(), 2);
        assert_eq!(kv.increment("a", "n", -5, None).unwrap(), -3);
        kv.set("a", "t", b"abc".to_vec(), None).unwrap();
        assert!(matches!(
            kv.increment("a", "t", 1, None),
            Err(KvError::NotANumber(_))
        ));
    }
}
