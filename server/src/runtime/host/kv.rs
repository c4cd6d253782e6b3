//! Key-value storage, namespaced per install, with each install's and
//! each project's keys and bytes (key plus value) counted against their
//! quotas.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::HostState;
use crate::model::Quotas;
use crate::model::quotas::Hit;
use crate::runtime::bindings::kv::{Host, KvError};

/// Longest key a plugin may use.
const MAX_KEY_BYTES: usize = 512;

/// Whose data a write is, and what it may hold.
#[derive(Clone, Copy)]
pub struct Owner<'a> {
    /// The install's namespace.
    pub namespace: &'a str,
    pub project_id: &'a str,
    pub quotas: &'a Quotas,
}

/// Where key-value data lives. Each method takes the install's namespace;
/// implementations never let one namespace see another's keys, and refuse a
/// write that would take its install or its project over their quotas.
pub trait KvStore: Send + Sync {
    fn get(&self, namespace: &str, key: &str) -> Result<Option<Vec<u8>>, KvError>;
    fn set(
        &self,
        owner: Owner<'_>,
        key: &str,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> Result<(), KvError>;
    fn delete(&self, namespace: &str, key: &str) -> Result<bool, KvError>;
    fn increment(
        &self,
        owner: Owner<'_>,
        key: &str,
        delta: i64,
        ttl: Option<Duration>,
    ) -> Result<i64, KvError>;
    /// Drops every key of a namespace: its install is gone.
    fn remove_namespace(&self, namespace: &str);
    /// Drops entries whose TTL has passed, whether or not anyone reads
    /// them; the runtime calls it every few seconds.
    fn sweep_expired(&self) {}
}

/// Keys and bytes (keys plus values) held.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub keys: u64,
    pub bytes: u64,
}

struct Entry {
    value: Vec<u8>,
    expiry: Option<Instant>,
}

fn size(key: &str, value: &[u8]) -> u64 {
    (key.len() + value.len()) as u64
}

/// Everything behind the store's lock.
#[derive(Default)]
struct Data {
    entries: HashMap<(String, String), Entry>,
    /// Entries with a TTL, soonest first, for the sweep.
    expiries: BTreeSet<(Instant, String, String)>,
    /// Per namespace: its project and what it holds.
    namespaces: HashMap<String, (String, Usage)>,
    projects: HashMap<String, Usage>,
}

impl Data {
    fn count(&mut self, namespace: &str, keys: i64, bytes: i64) {
        let Some((project, usage)) = self.namespaces.get_mut(namespace) else {
            return;
        };
        let apply = |usage: &mut Usage| {
            usage.keys = usage.keys.saturating_add_signed(keys);
            usage.bytes = usage.bytes.saturating_add_signed(bytes);
        };
        apply(usage);
        let empty = usage.keys == 0;
        let project = project.clone();
        if let Some(total) = self.projects.get_mut(&project) {
            apply(total);
            if total.keys == 0 {
                self.projects.remove(&project);
            }
        }
        if empty {
            self.namespaces.remove(namespace);
        }
    }

    fn remove(&mut self, id: &(String, String)) -> Option<Entry> {
        let entry = self.entries.remove(id)?;
        if let Some(at) = entry.expiry {
            self.expiries.remove(&(at, id.0.clone(), id.1.clone()));
        }
        self.count(&id.0, -1, -(size(&id.1, &entry.value) as i64));
        Some(entry)
    }

    /// The entry, unless its TTL has passed (then it is dropped).
    fn live(&mut self, id: &(String, String)) -> Option<&Entry> {
        let expired = self
            .entries
            .get(id)
            .is_some_and(|entry| entry.expiry.is_some_and(|at| at <= Instant::now()));
        if expired {
            self.remove(id);
        }
        self.entries.get(id)
    }

    /// Stores an entry, refusing it if it would take the namespace or its
    /// project over a quota. A replaced entry counts only the difference,
    /// and a write that does not grow anything is never refused (a
    /// lowered quota must not stop a plugin from shrinking its data).
    fn put(&mut self, owner: Owner<'_>, key: &str, entry: Entry) -> Result<(), KvError> {
        let id = (owner.namespace.to_string(), key.to_string());
        let old = self
            .entries
            .get(&id)
            .map_or(0, |old| size(key, &old.value) as i64);
        let new_keys = i64::from(!self.entries.contains_key(&id));
        let new_bytes = size(key, &entry.value) as i64 - old;
        let here = self
            .namespaces
            .get(owner.namespace)
            .map(|(_, usage)| *usage)
            .unwrap_or_default();
        let project = self
            .projects
            .get(owner.project_id)
            .copied()
            .unwrap_or_default();
        let quotas = owner.quotas;
        let checks = [
            (
                "kv_keys_per_config",
                here.keys,
                new_keys,
                quotas.kv_keys_per_config,
                "the plugin config",
            ),
            (
                "kv_bytes_per_config",
                here.bytes,
                new_bytes,
                quotas.kv_bytes_per_config,
                "the plugin config",
            ),
            (
                "kv_keys",
                project.keys,
                new_keys,
                quotas.kv_keys,
                "the project",
            ),
            (
                "kv_bytes",
                project.bytes,
                new_bytes,
                quotas.kv_bytes,
                "the project",
            ),
        ];
        for (quota, held, more, limit, whose) in checks {
            if more > 0 && held.saturating_add(more as u64) > limit {
                let unit = if quota.contains("keys") {
                    "keys"
                } else {
                    "bytes"
                };
                return Err(KvError::TooLarge(format!(
                    "{whose}'s key-value data holds {held} {unit}: storing `{key}` would take it past {hit}. Delete keys, or give them a TTL, to make room",
                    hit = Hit { quota, limit },
                )));
            }
        }
        if let Some(Entry {
            expiry: Some(at), ..
        }) = self.entries.remove(&id)
        {
            self.expiries.remove(&(at, id.0.clone(), id.1.clone()));
        }
        if let Some(at) = entry.expiry {
            self.expiries.insert((at, id.0.clone(), id.1.clone()));
        }
        self.namespaces
            .entry(id.0.clone())
            .or_insert_with(|| (owner.project_id.to_string(), Usage::default()));
        self.projects
            .entry(owner.project_id.to_string())
            .or_default();
        self.entries.insert(id, entry);
        self.count(owner.namespace, new_keys, new_bytes);
        Ok(())
    }
}

/// An in-process store with TTLs, for `sluice plugin test` and single-process
/// use. Contents do not survive a restart.
#[derive(Default)]
pub struct MemoryKv {
    data: Mutex<Data>,
}

impl MemoryKv {
    /// What one namespace (install) holds.
    pub fn namespace_usage(&self, namespace: &str) -> Usage {
        let data = self.data.lock().expect("kv lock");
        data.namespaces
            .get(namespace)
            .map(|(_, usage)| *usage)
            .unwrap_or_default()
    }

    /// What one project's installs hold together.
    pub fn project_usage(&self, project_id: &str) -> Usage {
        let data = self.data.lock().expect("kv lock");
        data.projects.get(project_id).copied().unwrap_or_default()
    }
}

impl KvStore for MemoryKv {
    fn get(&self, namespace: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        let mut data = self.data.lock().expect("kv lock");
        let id = (namespace.to_string(), key.to_string());
        Ok(data.live(&id).map(|entry| entry.value.clone()))
    }

    fn set(
        &self,
        owner: Owner<'_>,
        key: &str,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> Result<(), KvError> {
        let expiry = ttl.map(|ttl| Instant::now() + ttl);
        let mut data = self.data.lock().expect("kv lock");
        data.put(owner, key, Entry { value, expiry })
    }

    fn delete(&self, namespace: &str, key: &str) -> Result<bool, KvError> {
        let mut data = self.data.lock().expect("kv lock");
        let id = (namespace.to_string(), key.to_string());
        let existed = data.live(&id).is_some();
        data.remove(&id);
        Ok(existed)
    }

    fn increment(
        &self,
        owner: Owner<'_>,
        key: &str,
        delta: i64,
        ttl: Option<Duration>,
    ) -> Result<i64, KvError> {
        let mut data = self.data.lock().expect("kv lock");
        let id = (owner.namespace.to_string(), key.to_string());
        let (current, expiry) = match data.live(&id) {
            Some(entry) => {
                let number = std::str::from_utf8(&entry.value)
                    .ok()
                    .and_then(|text| text.parse::<i64>().ok())
                    .ok_or_else(|| {
                        KvError::NotANumber(format!("key `{key}` does not hold an integer"))
                    })?;
                (number, entry.expiry)
            }
            None => (0, ttl.map(|ttl| Instant::now() + ttl)),
        };
        let next = current.saturating_add(delta);
        let value = next.to_string().into_bytes();
        data.put(owner, key, Entry { value, expiry })?;
        Ok(next)
    }

    fn remove_namespace(&self, namespace: &str) {
        let mut data = self.data.lock().expect("kv lock");
        let ids: Vec<(String, String)> = data
            .entries
            .keys()
            .filter(|(owner, _)| owner == namespace)
            .cloned()
            .collect();
        for id in ids {
            data.remove(&id);
        }
    }

    fn sweep_expired(&self) {
        let mut data = self.data.lock().expect("kv lock");
        let now = Instant::now();
        while let Some(first) = data.expiries.first() {
            if first.0 > now {
                break;
            }
            let (_, namespace, key) = data.expiries.pop_first().expect("a first entry");
            data.remove(&(namespace, key));
        }
    }
}

impl HostState {
    fn kv_owner<'a>(&'a self, quotas: &'a Quotas) -> Owner<'a> {
        Owner {
            namespace: &self.install.install_id,
            project_id: &self.install.project_id,
            quotas,
        }
    }

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
            let quotas = self.services.quotas.get(&self.install.project_id);
            self.services
                .kv
                .set(self.kv_owner(&quotas), &key, value, ttl(ttl_seconds))
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
            let quotas = self.services.quotas.get(&self.install.project_id);
            self.services
                .kv
                .increment(self.kv_owner(&quotas), &key, delta, ttl(ttl_seconds))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner<'a>(namespace: &'a str, project_id: &'a str, quotas: &'a Quotas) -> Owner<'a> {
        Owner {
            namespace,
            project_id,
            quotas,
        }
    }

    #[test]
    fn namespaces_never_see_each_others_keys() {
        let kv = MemoryKv::default();
        let quotas = Quotas::default();
        kv.set(owner("a", "p", &quotas), "k", b"1".to_vec(), None)
            .unwrap();
        assert_eq!(kv.get("b", "k").unwrap(), None);
        assert_eq!(kv.get("a", "k").unwrap(), Some(b"1".to_vec()));
    }

    #[test]
    fn expired_keys_are_gone() {
        let kv = MemoryKv::default();
        let quotas = Quotas::default();
        kv.set(
            owner("a", "p", &quotas),
            "k",
            b"1".to_vec(),
            Some(Duration::ZERO),
        )
        .unwrap();
        assert_eq!(kv.get("a", "k").unwrap(), None);
        assert!(!kv.delete("a", "k").unwrap());
        assert_eq!(kv.namespace_usage("a"), Usage::default());
    }

    #[test]
    fn increment_counts_from_zero_and_refuses_text() {
        let kv = MemoryKv::default();
        let quotas = Quotas::default();
        let a = owner("a", "p", &quotas);
        assert_eq!(kv.increment(a, "n", 2, None).unwrap(), 2);
        assert_eq!(kv.increment(a, "n", -5, None).unwrap(), -3);
        kv.set(a, "t", b"abc".to_vec(), None).unwrap();
        assert!(matches!(
            kv.increment(a, "t", 1, None),
            Err(KvError::NotANumber(_))
        ));
    }

    #[test]
    fn keys_and_bytes_are_counted_per_config_and_per_project_and_a_replacement_counts_the_difference()
     {
        let kv = MemoryKv::default();
        let quotas = Quotas::default();
        kv.set(owner("a", "p", &quotas), "key", vec![0; 10], None)
            .unwrap();
        kv.set(owner("b", "p", &quotas), "k", vec![0; 4], None)
            .unwrap();
        assert_eq!(kv.namespace_usage("a"), Usage { keys: 1, bytes: 13 });
        assert_eq!(kv.project_usage("p"), Usage { keys: 2, bytes: 18 });
        kv.set(owner("a", "p", &quotas), "key", vec![0; 2], None)
            .unwrap();
        assert_eq!(kv.namespace_usage("a"), Usage { keys: 1, bytes: 5 });
        assert_eq!(kv.project_usage("p"), Usage { keys: 2, bytes: 10 });
        assert!(kv.delete("b", "k").unwrap());
        assert_eq!(kv.project_usage("p"), Usage { keys: 1, bytes: 5 });
        kv.remove_namespace("a");
        assert_eq!(kv.project_usage("p"), Usage::default());
        assert_eq!(kv.namespace_usage("a"), Usage::default());
    }

    #[test]
    fn a_write_past_a_config_quota_is_refused_naming_it_and_a_shrinking_one_is_not() {
        let kv = MemoryKv::default();
        let quotas = Quotas {
            kv_keys_per_config: 2,
            kv_bytes_per_config: 100,
            ..Quotas::default()
        };
        let a = owner("a", "p", &quotas);
        kv.set(a, "one", vec![0; 10], None).unwrap();
        kv.increment(a, "two", 1, None).unwrap();
        let err = kv.set(a, "three", vec![], None).unwrap_err();
        let KvError::TooLarge(message) = err else {
            panic!("expected too-large, got {err:?}")
        };
        assert!(message.contains("`kv_keys_per_config` (2)"), "{message}");
        assert!(message.contains("sluice project quotas"), "{message}");
        let err = kv.increment(a, "three", 1, None).unwrap_err();
        assert!(matches!(err, KvError::TooLarge(_)), "{err:?}");
        kv.increment(a, "two", 1, None)
            .expect("replacing a key adds no key");

        let err = kv.set(a, "one", vec![0; 100], None).unwrap_err();
        let KvError::TooLarge(message) = err else {
            panic!("expected too-large, got {err:?}")
        };
        assert!(message.contains("`kv_bytes_per_config` (100)"), "{message}");
        kv.set(a, "one", vec![0; 90], None)
            .expect("the difference fits");

        let lowered = Quotas {
            kv_bytes_per_config: 10,
            ..quotas
        };
        kv.set(owner("a", "p", &lowered), "one", vec![0; 1], None)
            .expect("shrinking is allowed over a lowered quota");
        assert_eq!(kv.get("a", "one").unwrap(), Some(vec![0]));
    }

    #[test]
    fn a_project_quota_counts_every_config_of_the_project_and_no_other_project() {
        let kv = MemoryKv::default();
        let quotas = Quotas {
            kv_keys: 2,
            kv_bytes: 1_000,
            ..Quotas::default()
        };
        kv.set(owner("a", "p", &quotas), "k", vec![], None).unwrap();
        kv.set(owner("b", "p", &quotas), "k", vec![], None).unwrap();
        let err = kv
            .set(owner("c", "p", &quotas), "k", vec![], None)
            .unwrap_err();
        let KvError::TooLarge(message) = err else {
            panic!("expected too-large, got {err:?}")
        };
        assert!(
            message.starts_with("the project's key-value data holds 2 keys"),
            "{message}"
        );
        assert!(message.contains("`kv_keys` (2)"), "{message}");
        kv.set(owner("d", "q", &quotas), "k", vec![], None)
            .expect("another project has its own quota");
        let err = kv
            .set(owner("a", "p", &quotas), "k", vec![0; 1_000], None)
            .unwrap_err();
        assert!(format!("{err:?}").contains("`kv_bytes` (1000)"), "{err:?}");
    }

    #[test]
    fn the_sweep_drops_expired_entries_unread_and_gives_back_their_quota() {
        let kv = MemoryKv::default();
        let quotas = Quotas {
            kv_keys_per_config: 2,
            ..Quotas::default()
        };
        let a = owner("a", "p", &quotas);
        kv.set(a, "short", vec![0; 5], Some(Duration::ZERO))
            .unwrap();
        kv.set(a, "long", vec![0; 5], Some(Duration::from_secs(3600)))
            .unwrap();
        assert_eq!(kv.namespace_usage("a"), Usage { keys: 2, bytes: 19 });
        kv.sweep_expired();
        assert_eq!(kv.namespace_usage("a"), Usage { keys: 1, bytes: 9 });
        assert_eq!(kv.project_usage("p"), Usage { keys: 1, bytes: 9 });
        kv.set(a, "again", vec![], None)
            .expect("the swept key's place is free");
        assert_eq!(kv.get("a", "long").unwrap(), Some(vec![0; 5]));
    }

    #[test]
    fn replacing_a_key_moves_its_expiry() {
        let kv = MemoryKv::default();
        let quotas = Quotas::default();
        let a = owner("a", "p", &quotas);
        kv.set(a, "k", b"old".to_vec(), Some(Duration::ZERO))
            .unwrap();
        kv.set(a, "k", b"new".to_vec(), None).unwrap();
        kv.sweep_expired();
        assert_eq!(kv.get("a", "k").unwrap(), Some(b"new".to_vec()));
        assert_eq!(kv.namespace_usage("a"), Usage { keys: 1, bytes: 4 });
    }
}
