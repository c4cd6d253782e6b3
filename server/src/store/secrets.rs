//! Secret config values at rest, and the server key that seals them.
//!
//! A config field of type `secret` is stored sealed with AES-256-GCM under
//! the server key: `{"sealed": "v1:<key id>:<base64 of nonce and
//! ciphertext>"}` in place of the string. The key id (the first bytes of
//! the key's sha256) says which key opens it, so servers sharing one
//! PostgreSQL can tell when they do not hold the key another wrote with.
//! The plugin config's id and the field's name are the cipher's associated
//! data: a sealed value copied into another config, or another field, does
//! not open.
//!
//! The store seals whenever it writes a config and never opens one by
//! itself: [`Store::open_config`] opens a config for the one purpose of
//! handing it to the plugin's `setup`, and remembers the opened values so
//! that every error string and log line the store writes for that config
//! afterwards is scrubbed of them ([`Store::scrub`]).
//!
//! The key comes from `SLUICE_SECRET_KEY` or a key file (by default
//! `secret.key` in the data dir). Either may hold several keys, the first
//! being the one that seals; the others still open, so a key can be
//! rotated while servers run (see `sluice secrets rotate`).

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use sqlx::Row;

use super::{Error, PluginConfig, Result, Store, now_rfc3339};
use crate::model::manifest::{FieldType, Manifest};
use crate::model::{Scrubber, scrub};

/// The key file's name in the data dir, unless configured otherwise.
pub const KEY_FILE: &str = "secret.key";

/// The environment variable that holds the key itself.
pub const KEY_ENV: &str = "SLUICE_SECRET_KEY";

/// The field of a sealed value's JSON object.
const SEALED: &str = "sealed";

/// The sealing format's version, first in every sealed value.
const FORMAT: &str = "v1";

/// AES-GCM's nonce: 96 random bits per sealed value. A key seals few
/// values (one per secret field per config change), far below the 2^32
/// after which random nonces risk repeating.
const NONCE_BYTES: usize = 12;

/// Bytes of the key's sha256 that name it.
const KEY_ID_BYTES: usize = 4;

/// Where the server's key comes from.
#[derive(Clone)]
pub struct KeySource {
    /// The text of `SLUICE_SECRET_KEY`, if set: it wins over the file.
    pub key: Option<String>,
    /// The key file: read if it exists, written with a new key on first
    /// start if nothing is sealed yet.
    pub file: PathBuf,
}

impl fmt::Debug for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeySource")
            .field("key", &self.key.as_ref().map(|_| "[set]"))
            .field("file", &self.file)
            .finish()
    }
}

impl KeySource {
    /// The key file in `data_dir`.
    pub fn in_dir(data_dir: &Path) -> KeySource {
        KeySource {
            key: None,
            file: data_dir.join(KEY_FILE),
        }
    }

    /// Where the operator puts a key, for messages.
    fn place(&self) -> String {
        match self.key {
            Some(_) => KEY_ENV.to_string(),
            None => format!("the key file {}", self.file.display()),
        }
    }

    /// The keys it holds; `None` if there is no key at all.
    fn read(&self) -> anyhow::Result<Option<Keyring>> {
        let (text, from) = match &self.key {
            Some(text) => (text.clone(), KEY_ENV.to_string()),
            None => match std::fs::read_to_string(&self.file) {
                Ok(text) => (text, self.file.display().to_string()),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(err) => anyhow::bail!(
                    "failed to read the secret key file {}: {err}",
                    self.file.display()
                ),
            },
        };
        Keyring::parse(&text)
            .map(Some)
            .map_err(|err| anyhow::anyhow!("{from}: {err}"))
    }
}

/// One AES-256 key.
struct Key {
    id: String,
    cipher: Aes256Gcm,
}

impl Key {
    fn new(bytes: &[u8]) -> Key {
        let digest = Sha256::digest(bytes);
        Key {
            id: hex::encode(&digest[..KEY_ID_BYTES]),
            cipher: Aes256Gcm::new_from_slice(bytes).expect("a 32-byte key"),
        }
    }
}

/// The server's keys: the first seals, every one opens.
pub struct Keyring {
    keys: Vec<Key>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring").field("ids", &self.ids()).finish()
    }
}

/// Why a sealed value did not open, or a value could not be sealed.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error(
        "config field `{field}` is sealed with secret key {key_id}, which this server does not hold; add that key to its key file or {KEY_ENV}"
    )]
    MissingKey { field: String, key_id: String },
    #[error(
        "config field `{field}` does not open with secret key {key_id}: it was altered, or copied from another plugin config"
    )]
    Tampered { field: String, key_id: String },
    #[error("config field `{field}` holds a sealed value in a form this version cannot read")]
    Malformed { field: String },
    #[error(
        "config field `{field}` is a secret, and no secret key is loaded to seal it with (only `sluice serve` loads one)"
    )]
    NoKey { field: String },
}

impl Keyring {
    /// Keys as base64 of 32 bytes each, separated by newlines, commas or
    /// spaces; `#` starts a comment. The first seals.
    pub fn parse(text: &str) -> std::result::Result<Keyring, String> {
        let mut keys = Vec::new();
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or_default();
            for entry in line.split([',', ' ', '\t']).filter(|e| !e.is_empty()) {
                let bytes = BASE64.decode(entry).map_err(|_| {
                    format!(
                        "key #{} is not base64; each key is the base64 of 32 random bytes (`sluice secrets new-key` makes one)",
                        keys.len() + 1
                    )
                })?;
                if bytes.len() != 32 {
                    return Err(format!(
                        "key #{} is {} bytes long; an AES-256 key is 32 bytes (`sluice secrets new-key` makes one)",
                        keys.len() + 1,
                        bytes.len()
                    ));
                }
                keys.push(Key::new(&bytes));
            }
        }
        if keys.is_empty() {
            return Err("holds no key".into());
        }
        Ok(Keyring { keys })
    }

    /// A new random key, as a keyring and as the text of a key file.
    pub fn generate() -> (Keyring, String) {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).expect("the OS has randomness");
        let text = BASE64.encode(bytes);
        (
            Keyring {
                keys: vec![Key::new(&bytes)],
            },
            text,
        )
    }

    /// The id of the key that seals.
    pub fn current_id(&self) -> &str {
        &self.keys[0].id
    }

    /// The ids of every key, the sealing one first.
    pub fn ids(&self) -> Vec<&str> {
        self.keys.iter().map(|key| key.id.as_str()).collect()
    }

    fn key(&self, id: &str) -> Option<&Key> {
        self.keys.iter().find(|key| key.id == id)
    }

    /// `plaintext` sealed for `field` of plugin config `config_id`.
    pub fn seal(&self, config_id: &str, field: &str, plaintext: &str) -> Value {
        let key = &self.keys[0];
        let mut nonce = [0u8; NONCE_BYTES];
        getrandom::fill(&mut nonce).expect("the OS has randomness");
        let aad = associated_data(config_id, field);
        let ciphertext = key
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext.as_bytes(),
                    aad: &aad,
                },
            )
            .expect("AES-GCM seals any length a config holds");
        let mut data = nonce.to_vec();
        data.extend_from_slice(&ciphertext);
        json!({ SEALED: format!("{FORMAT}:{}:{}", key.id, BASE64.encode(data)) })
    }

    /// The plaintext of a sealed `value`; `None` if it is not sealed.
    pub fn open(
        &self,
        config_id: &str,
        field: &str,
        value: &Value,
    ) -> std::result::Result<Option<String>, SecretError> {
        let Some(sealed) = sealed_text(value) else {
            return Ok(None);
        };
        let malformed = || SecretError::Malformed {
            field: field.to_string(),
        };
        let mut parts = sealed.splitn(3, ':');
        let (Some(FORMAT), Some(key_id), Some(data)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed());
        };
        let key = self.key(key_id).ok_or_else(|| SecretError::MissingKey {
            field: field.to_string(),
            key_id: key_id.to_string(),
        })?;
        let data = BASE64.decode(data).map_err(|_| malformed())?;
        if data.len() < NONCE_BYTES {
            return Err(malformed());
        }
        let (nonce, ciphertext) = data.split_at(NONCE_BYTES);
        let aad = associated_data(config_id, field);
        let tampered = || SecretError::Tampered {
            field: field.to_string(),
            key_id: key_id.to_string(),
        };
        let plaintext = key
            .cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: &aad,
                },
            )
            .map_err(|_| tampered())?;
        String::from_utf8(plaintext)
            .map(Some)
            .map_err(|_| tampered())
    }
}

/// What a sealed value is bound to: its config and its field.
fn associated_data(config_id: &str, field: &str) -> Vec<u8> {
    format!("sluice secret {FORMAT}\0{config_id}\0{field}").into_bytes()
}

/// The `"v1:…"` text of a sealed value, if it is one.
fn sealed_text(value: &Value) -> Option<&str> {
    match value {
        Value::Object(fields) if fields.len() == 1 => fields.get(SEALED)?.as_str(),
        _ => None,
    }
}

/// The id of the key a sealed value needs.
fn sealed_key_id(value: &Value) -> Option<&str> {
    let mut parts = sealed_text(value)?.splitn(3, ':');
    parts.next();
    parts.next()
}

/// Whether `value` is a sealed secret, as the store keeps it.
pub fn is_sealed(value: &Value) -> bool {
    sealed_text(value).is_some()
}

/// What the store holds about secrets: the key, once loaded, and what each
/// opened config's secrets are, to scrub them from what it writes.
#[derive(Default)]
pub(super) struct Secrets {
    keyring: OnceLock<Arc<Keyring>>,
    scrubbers: RwLock<HashMap<String, Arc<Scrubber>>>,
}

impl Secrets {
    /// See [`Store::scrub`].
    pub(super) fn scrub<'a>(&self, plugin_config_id: &str, text: &'a str) -> Cow<'a, str> {
        let scrubber = self
            .scrubbers
            .read()
            .expect("scrubbers lock")
            .get(plugin_config_id)
            .cloned();
        match scrubber {
            Some(scrubber) => scrubber.scrub(text),
            None => scrub::scrub_urls(text),
        }
    }

    fn remember(&self, plugin_config_id: &str, scrubber: Scrubber) {
        let mut scrubbers = self.scrubbers.write().expect("scrubbers lock");
        // The values of an earlier version of the config stay blanked
        // too: an instance started with them may still be running.
        let merged = match scrubbers.get(plugin_config_id) {
            Some(known) => known.merged(&scrubber),
            None => scrubber,
        };
        scrubbers.insert(plugin_config_id.to_string(), Arc::new(merged));
    }
}

/// What [`Store::load_secret_key`] did.
#[derive(Debug)]
pub struct KeyLoaded {
    /// The ids of the keys held, the sealing one first.
    pub ids: Vec<String>,
    /// Where a new key was written, if one was made.
    pub generated: Option<PathBuf>,
    /// Plaintext secrets found and sealed.
    pub sealed: usize,
}

/// What `sluice secrets rotate` did.
#[derive(Debug, serde::Serialize)]
pub struct Rotated {
    pub key_id: String,
    /// Secret values sealed again under the current key.
    pub resealed: usize,
    /// Plaintext values (from before secrets were sealed) sealed.
    pub sealed: usize,
    /// Configs whose manifest cannot be read, left as they are.
    pub skipped: Vec<String>,
}

impl Store {
    /// Loads the server key from `source`, and seals any secret still
    /// stored in plain text. With no key anywhere and nothing sealed or
    /// registered yet, a new key is made and written to the key file
    /// (mode 0600). With sealed values, or keys other servers registered,
    /// that it does not hold it fails, naming the key ids needed: a second
    /// key made then would seal what the other servers cannot open.
    pub async fn load_secret_key(&self, source: &KeySource) -> anyhow::Result<KeyLoaded> {
        let mut in_use = self.sealed_key_ids().await?;
        in_use.extend(self.registered_key_ids().await?);
        let mut generated = None;
        let keyring = match source.read()? {
            Some(keyring) => keyring,
            None if in_use.is_empty() => {
                let (keyring, text) = Keyring::generate();
                write_key_file(&source.file, &text)?;
                generated = Some(source.file.clone());
                keyring
            }
            None => anyhow::bail!(
                "this database's secrets are sealed with secret key {}, and {} does not exist; put that key there (or in {KEY_ENV}), or point --secret-key-file at the file that holds it. Without it those secrets cannot be read.",
                join(&in_use),
                source.file.display()
            ),
        };
        let mut missing: BTreeSet<String> = in_use
            .into_iter()
            .filter(|id| keyring.key(id).is_none())
            .collect();
        if missing.is_empty() {
            // Servers starting together, each with a key of its own: the
            // first to register wins, and the others learn of it here.
            missing = self.register_key(&keyring).await?;
        }
        if !missing.is_empty() {
            if let Some(path) = &generated {
                let _ = std::fs::remove_file(path);
                anyhow::bail!(
                    "another server of this database made its secret key {} a moment ago; copy its key file to {} (or give this server the same {KEY_ENV}) and start again",
                    join(&missing),
                    path.display()
                );
            }
            anyhow::bail!(
                "this database's secrets are sealed with secret key {}, which {} does not hold (it holds {}); add that key to it, after the current one, as the other servers of this database have it",
                join(&missing),
                source.place(),
                keyring.ids().join(", ")
            );
        }
        let ids = keyring.ids().iter().map(|id| id.to_string()).collect();
        let _ = self.secrets.keyring.set(Arc::new(keyring));
        let (sealed, _) = self.seal_stored(false).await?;
        Ok(KeyLoaded {
            ids,
            generated,
            sealed,
        })
    }

    /// The key ids servers of this database registered.
    async fn registered_key_ids(&self) -> Result<BTreeSet<String>> {
        let ids: Vec<String> = sqlx::query_scalar("SELECT key_id FROM secret_keys")
            .fetch_all(&self.pool)
            .await?;
        Ok(ids.into_iter().collect())
    }

    /// Registers the sealing key of `keyring`, unless another key it does
    /// not hold is registered already: then those ids, and nothing changes.
    /// One at a time across processes, so two servers starting together
    /// cannot each register a key of their own.
    async fn register_key(&self, keyring: &Keyring) -> Result<BTreeSet<String>> {
        let (mut tx, _turn) = self.write().await?;
        if self.backend() == super::Backend::Postgres {
            sqlx::query("LOCK TABLE secret_keys IN SHARE ROW EXCLUSIVE MODE")
                .execute(&mut *tx)
                .await?;
        }
        let registered: Vec<String> = sqlx::query_scalar("SELECT key_id FROM secret_keys")
            .fetch_all(&mut *tx)
            .await?;
        let missing: BTreeSet<String> = registered
            .iter()
            .filter(|id| keyring.key(id).is_none())
            .cloned()
            .collect();
        if !missing.is_empty() {
            return Ok(missing);
        }
        if !registered.iter().any(|id| id == keyring.current_id()) {
            sqlx::query("INSERT INTO secret_keys (key_id, added_at) VALUES ($1, $2)")
                .bind(keyring.current_id())
                .bind(now_rfc3339())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(missing)
    }

    /// After a rotation: only the current key seals anything now.
    async fn unregister_keys_but(&self, key_id: &str) -> Result<()> {
        let (mut tx, _turn) = self.write().await?;
        sqlx::query("DELETE FROM secret_keys WHERE key_id <> $1")
            .bind(key_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO secret_keys (key_id, added_at) VALUES ($1, $2) ON CONFLICT (key_id) DO NOTHING",
        )
        .bind(key_id)
        .bind(now_rfc3339())
        .execute(&mut *tx)
        .await?;
        tx.commit().await.map_err(Into::into)
    }

    /// Seals every secret under the current key: values sealed with an
    /// older key are opened and sealed again, plaintext ones sealed. Once
    /// done, the older keys may be dropped from every server's key file.
    pub async fn rotate_secrets(&self, source: &KeySource) -> anyhow::Result<Rotated> {
        let Some(keyring) = source.read()? else {
            anyhow::bail!(
                "{} does not exist: give the keys to rotate with, the new one first",
                source.place()
            );
        };
        let key_id = keyring.current_id().to_string();
        let _ = self.secrets.keyring.set(Arc::new(keyring));
        let (sealed, resealed, skipped) = self.seal_all(true).await?;
        // Every value is sealed with the current key now, unless a server
        // that still seals with an older one wrote since: then that key
        // stays registered, and rotating again finishes the job.
        if self.sealed_key_ids().await?.iter().all(|id| *id == key_id) {
            self.unregister_keys_but(&key_id).await?;
        }
        Ok(Rotated {
            key_id,
            resealed,
            sealed,
            skipped,
        })
    }

    /// For a key that is lost: drops every value sealed with `key_id` (no
    /// one can open them) and its registration, so servers start without
    /// it. Returns the (plugin config id, field) of each value dropped,
    /// whose secrets must be given again through the API.
    pub async fn forget_secret_key(&self, key_id: &str) -> Result<Vec<(String, String)>> {
        let rows = sqlx::query("SELECT id, config FROM plugin_configs")
            .fetch_all(&self.pool)
            .await?;
        let mut dropped = Vec::new();
        for row in rows {
            let id: String = row.get("id");
            let stored: String = row.get("config");
            let Ok(Value::Object(mut config)) = serde_json::from_str::<Value>(&stored) else {
                continue;
            };
            let lost: Vec<String> = config
                .iter()
                .filter(|(_, value)| sealed_key_id(value) == Some(key_id))
                .map(|(name, _)| name.clone())
                .collect();
            for name in &lost {
                config.remove(name);
            }
            if !lost.is_empty() && self.replace_config(&id, &stored, &config).await? {
                dropped.extend(lost.into_iter().map(|name| (id.clone(), name)));
            }
        }
        let (mut tx, _turn) = self.write().await?;
        sqlx::query("DELETE FROM secret_keys WHERE key_id = $1")
            .bind(key_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(dropped)
    }

    /// The ids of the keys that sealed the stored secrets.
    async fn sealed_key_ids(&self) -> Result<BTreeSet<String>> {
        let rows = sqlx::query("SELECT config FROM plugin_configs")
            .fetch_all(&self.pool)
            .await?;
        let mut ids = BTreeSet::new();
        for row in rows {
            let config: String = row.get("config");
            if let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(&config) {
                ids.extend(fields.values().filter_map(sealed_key_id).map(String::from));
            }
        }
        Ok(ids)
    }

    /// Seals plaintext secrets, and with `rotate` reseals values sealed
    /// with another key than the current one: (sealed, resealed).
    async fn seal_stored(&self, rotate: bool) -> Result<(usize, usize)> {
        let (sealed, resealed, skipped) = self.seal_all(rotate).await?;
        for id in skipped {
            tracing::warn!(
                plugin_config = %id,
                "cannot tell which of this plugin config's fields are secret, as its plugin's stored manifest does not read; upload the plugin again so its secrets are sealed"
            );
        }
        Ok((sealed, resealed))
    }

    async fn seal_all(&self, rotate: bool) -> Result<(usize, usize, Vec<String>)> {
        let keyring = self.secrets.keyring.get().cloned().ok_or_else(|| {
            Error::Secret(SecretError::NoKey {
                field: "(every field)".into(),
            })
        })?;
        let rows = sqlx::query(
            "SELECT c.id, c.config, p.manifest FROM plugin_configs c JOIN plugins p ON p.sha256 = c.plugin_sha256",
        )
        .fetch_all(&self.pool)
        .await?;
        let (mut sealed, mut resealed, mut skipped) = (0, 0, Vec::new());
        for row in rows {
            let id: String = row.get("id");
            let stored: String = row.get("config");
            let Ok(Value::Object(mut config)) = serde_json::from_str::<Value>(&stored) else {
                continue;
            };
            let manifest = serde_json::from_str::<Manifest>(&row.get::<String, _>("manifest")).ok();
            let mut plain = 0;
            match &manifest {
                Some(manifest) => {
                    for name in secret_fields(manifest) {
                        if let Some(Value::String(text)) = config.get(name) {
                            let value = keyring.seal(&id, name, text);
                            config.insert(name.to_string(), value);
                            plain += 1;
                        }
                    }
                }
                None => skipped.push(id.clone()),
            }
            // Sealed values are found by their shape, manifest or not.
            let again = if rotate {
                reseal(&keyring, &id, &mut config)?
            } else {
                0
            };
            // Another process may have changed the config meanwhile; its
            // write sealed what it wrote.
            if plain + again > 0 && self.replace_config(&id, &stored, &config).await? {
                sealed += plain;
                resealed += again;
            }
        }
        Ok((sealed, resealed, skipped))
    }

    /// Writes `config` over a plugin config if it still holds `stored`.
    async fn replace_config(
        &self,
        id: &str,
        stored: &str,
        config: &Map<String, Value>,
    ) -> Result<bool> {
        let (mut tx, _turn) = self.write().await?;
        let done = sqlx::query(
            "UPDATE plugin_configs SET config = $1, updated_at = $2 WHERE id = $3 AND config = $4",
        )
        .bind(Value::Object(config.clone()).to_string())
        .bind(now_rfc3339())
        .bind(id)
        .bind(stored)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    /// `config` with the fields `manifest` declares secret sealed for
    /// plugin config `id`. Values sealed already are kept as they are.
    pub(super) fn seal_config(
        &self,
        manifest: Option<&Manifest>,
        id: &str,
        config: &Value,
    ) -> Result<Value> {
        let Value::Object(fields) = config else {
            return Ok(config.clone());
        };
        let Some(manifest) = manifest else {
            return Err(Error::Corrupt(
                "the plugin's stored manifest cannot be read, so which config fields are secret is unknown; upload the plugin again".into(),
            ));
        };
        let mut out = fields.clone();
        for name in secret_fields(manifest) {
            if let Some(Value::String(text)) = fields.get(name) {
                let keyring = self.secrets.keyring.get().ok_or_else(|| {
                    Error::Secret(SecretError::NoKey {
                        field: name.to_string(),
                    })
                })?;
                out.insert(name.to_string(), keyring.seal(id, name, text));
            }
        }
        Ok(Value::Object(out))
    }

    /// The config of `config` with its secrets opened, to hand to the
    /// plugin's `setup` (or the API's check of a change, which keeps the
    /// secrets a request leaves out). From now on the store scrubs these
    /// values from every string it writes for the config.
    pub fn open_config(&self, config: &PluginConfig) -> std::result::Result<Value, SecretError> {
        let Value::Object(fields) = &config.config else {
            return Ok(config.config.clone());
        };
        let mut opened = fields.clone();
        let mut values = Vec::new();
        for (name, value) in fields {
            if !is_sealed(value) {
                continue;
            }
            let keyring = self.secrets.keyring.get().ok_or_else(|| {
                // Without a key nothing opens; say which key it needs.
                SecretError::MissingKey {
                    field: name.clone(),
                    key_id: sealed_key_id(value).unwrap_or("?").to_string(),
                }
            })?;
            let plaintext = keyring
                .open(&config.id, name, value)?
                .expect("a sealed value");
            values.push(plaintext.clone());
            opened.insert(name.clone(), Value::String(plaintext));
        }
        let mut scrubber = Scrubber::new(values);
        if let Some(manifest) = &config.manifest {
            scrubber = scrubber.merged(&Scrubber::for_config(manifest, &opened));
        }
        self.secrets.remember(&config.id, scrubber);
        Ok(Value::Object(opened))
    }

    /// `text` as the store may keep it for plugin config
    /// `plugin_config_id`: without the config's secret values (those of
    /// every version of it this process opened) and without URLs'
    /// credentials and query strings. Every plugin log line, dead letter
    /// error, last error, and pause or disable reason is written through
    /// this; callers that log such a string do the same.
    pub fn scrub<'a>(&self, plugin_config_id: &str, text: &'a str) -> Cow<'a, str> {
        self.secrets.scrub(plugin_config_id, text)
    }
}

/// Seals again under the current key every value sealed with another.
fn reseal(keyring: &Keyring, id: &str, config: &mut Map<String, Value>) -> Result<usize> {
    let mut changed = 0;
    let names: Vec<String> = config.keys().cloned().collect();
    for name in names {
        let value = &config[&name];
        if sealed_key_id(value).is_none_or(|key| key == keyring.current_id()) {
            continue;
        }
        let plaintext = keyring
            .open(id, &name, value)
            .map_err(Error::Secret)?
            .expect("a sealed value");
        config.insert(name.clone(), keyring.seal(id, &name, &plaintext));
        changed += 1;
    }
    Ok(changed)
}

fn secret_fields(manifest: &Manifest) -> impl Iterator<Item = &str> {
    manifest
        .config
        .iter()
        .filter(|(_, field)| field.kind == FieldType::Secret)
        .map(|(name, _)| name.as_str())
}

fn join(ids: &BTreeSet<String>) -> String {
    ids.iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Writes a new key file readable by its owner only; never over an
/// existing file.
fn write_key_file(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|err| anyhow::anyhow!("failed to create {}: {err}", dir.display()))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|err| {
            anyhow::anyhow!(
                "failed to write a new secret key to {}: {err}",
                path.display()
            )
        })?;
    let content = format!(
        "# The Sluice server key that seals secret config values. Without it they\n# cannot be read: back it up. The first key seals, the others only open.\n{text}\n"
    );
    file.write_all(content.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|err| anyhow::anyhow!("failed to write {}: {err}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_value_opens_only_in_its_own_config_and_field() {
        let (keyring, _) = Keyring::generate();
        let sealed = keyring.seal("config-a", "token", "pat-123456");
        assert!(!sealed.to_string().contains("pat-123456"));
        assert_eq!(
            keyring
                .open("config-a", "token", &sealed)
                .unwrap()
                .as_deref(),
            Some("pat-123456")
        );
        assert!(matches!(
            keyring.open("config-b", "token", &sealed),
            Err(SecretError::Tampered { .. })
        ));
        assert!(matches!(
            keyring.open("config-a", "api_key", &sealed),
            Err(SecretError::Tampered { .. })
        ));
        assert_eq!(
            keyring.open("config-a", "token", &json!("plain")).unwrap(),
            None
        );
    }

    #[test]
    fn every_listed_key_opens_and_the_first_seals() {
        let (old, old_text) = Keyring::generate();
        let (new, new_text) = Keyring::generate();
        let sealed_old = old.seal("c", "f", "secret-old");
        let both =
            Keyring::parse(&format!("# rotated\n{new_text}\n{old_text} # previous\n")).unwrap();
        assert_eq!(both.current_id(), new.current_id());
        assert_eq!(
            both.open("c", "f", &sealed_old).unwrap().as_deref(),
            Some("secret-old")
        );
        assert_eq!(
            sealed_key_id(&both.seal("c", "f", "x")),
            Some(new.current_id())
        );
        let err = new.open("c", "f", &sealed_old).unwrap_err().to_string();
        assert!(err.contains(old.current_id()), "{err}");
    }

    #[test]
    fn a_key_that_is_not_32_bytes_of_base64_is_refused() {
        assert!(Keyring::parse("").unwrap_err().contains("no key"));
        assert!(
            Keyring::parse("not base64!")
                .unwrap_err()
                .contains("base64")
        );
        assert!(
            Keyring::parse(&BASE64.encode([0u8; 16]))
                .unwrap_err()
                .contains("16 bytes")
        );
    }
}
