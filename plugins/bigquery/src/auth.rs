//! Signing in as a service account: a JWT signed RS256 with the key file's
//! private key, exchanged at the key file's `token_uri` for an access token
//! (the OAuth 2.0 JWT bearer grant).
//!
//! The access token is cached in the install's key-value store until five
//! minutes before it expires, so every instance of the install shares one
//! token and the RSA signature, the costly part, happens about once an hour.

use std::fmt::Write as _;
use std::time::Duration;

use rsa::RsaPrivateKey;
use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::pkcs1v15::SigningKey;
use rsa::pkcs8::DecodePrivateKey;
use rsa::signature::{RandomizedSigner, SignatureEncoding};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sluice_plugin_sdk::http::{HttpError, Request, Response};
use sluice_plugin_sdk::{Error, ExportError, Result, clock, info, json, kv, random, warn};

/// Enough to insert rows and nothing else.
pub const SCOPE: &str = "https://www.googleapis.com/auth/bigquery.insertdata";
/// Google accepts only this audience, whatever the key file's `token_uri`.
pub const AUDIENCE: &str = "https://oauth2.googleapis.com/token";
const DEFAULT_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// The longest assertion Google accepts.
const ASSERTION_LIFETIME_SECS: u64 = 3600;
/// A token this close to expiry is replaced rather than used, so a request
/// never starts with a token that dies on the way.
const EXPIRY_MARGIN: Duration = Duration::from_secs(5 * 60);

/// An access token and when it stops working.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Token {
    pub access_token: String,
    pub expires_at_ms: u64,
}

#[derive(Deserialize)]
struct KeyFile {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    client_email: String,
    #[serde(default)]
    private_key: String,
    #[serde(default)]
    private_key_id: String,
    #[serde(default)]
    token_uri: Option<String>,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default = "default_expires_in")]
    expires_in: u64,
}

fn default_expires_in() -> u64 {
    ASSERTION_LIFETIME_SECS
}

#[derive(Default, Deserialize)]
struct TokenError {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
}

/// The service account from the key file, and its token cache.
pub struct ServiceAccount {
    pub client_email: String,
    key_id: String,
    pub token_uri: String,
    signer: SigningKey<Sha256>,
    /// The key-value key of the token; it hashes the identity, so a new key
    /// file never reuses the old key's token.
    pub cache_key: String,
    /// Used when the operator's policy denies the key-value store.
    fallback: Option<Token>,
}

impl ServiceAccount {
    /// Reads a service-account JSON key file.
    pub fn parse(text: &str) -> Result<ServiceAccount> {
        let key: KeyFile = serde_json::from_str(text.trim()).map_err(|err| {
            Error::msg(format!(
                "service_account_key must be the JSON key file of a service account (IAM → Service accounts → Keys → Add key → JSON): {err}"
            ))
        })?;
        if let Some(kind) = key.kind.as_deref().filter(|k| *k != "service_account") {
            return Err(Error::msg(format!(
                "service_account_key is a `{kind}` credential; create a key for a service account instead"
            )));
        }
        for (name, value) in [
            ("client_email", &key.client_email),
            ("private_key", &key.private_key),
            ("private_key_id", &key.private_key_id),
        ] {
            if value.trim().is_empty() {
                return Err(Error::msg(format!(
                    "service_account_key has no `{name}`; paste the whole JSON key file"
                )));
            }
        }
        let pem = key.private_key.trim();
        let private_key = RsaPrivateKey::from_pkcs8_pem(pem)
            .or_else(|_| RsaPrivateKey::from_pkcs1_pem(pem))
            .map_err(|err| {
                Error::msg(format!(
                    "service_account_key: `private_key` is not a PEM RSA private key: {err}"
                ))
            })?;
        let token_uri = key
            .token_uri
            .filter(|uri| !uri.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_TOKEN_URI.to_string());
        let mut hash = Sha256::new();
        for part in [&key.client_email, &key.private_key_id, &token_uri] {
            hash.update(part.as_bytes());
            hash.update([0]);
        }
        let mut cache_key = String::from("token/");
        for byte in &hash.finalize()[..16] {
            let _ = write!(cache_key, "{byte:02x}");
        }
        Ok(ServiceAccount {
            client_email: key.client_email,
            key_id: key.private_key_id,
            token_uri,
            signer: SigningKey::<Sha256>::new(private_key),
            cache_key,
            fallback: None,
        })
    }

    /// A token good for at least a few more minutes.
    pub fn token(&mut self) -> Result<Token, ExportError> {
        match self.cached() {
            Some(token) => Ok(token),
            None => self.fetch(),
        }
    }

    /// A token to replace one BigQuery refused. If another instance has
    /// fetched a new one meanwhile, that one is used.
    pub fn renew(&mut self, refused: &Token) -> Result<Token, ExportError> {
        match self.cached() {
            Some(token) if token.access_token != refused.access_token => Ok(token),
            _ => self.fetch(),
        }
    }

    /// The signed assertion: `base64url(header).base64url(claims).base64url(signature)`.
    pub fn assertion(&self, now_secs: u64) -> String {
        let header = json!({"alg": "RS256", "typ": "JWT", "kid": self.key_id});
        let claims = json!({
            "iss": self.client_email,
            "scope": SCOPE,
            "aud": AUDIENCE,
            "iat": now_secs,
            "exp": now_secs + ASSERTION_LIFETIME_SECS,
        });
        let mut jwt = base64url(header.to_string().as_bytes());
        jwt.push('.');
        jwt.push_str(&base64url(claims.to_string().as_bytes()));
        // PKCS#1 v1.5 signatures do not depend on the randomness; it only
        // blinds the private-key operation against timing attacks.
        let signature = self.signer.sign_with_rng(&mut HostRng, jwt.as_bytes());
        jwt.push('.');
        jwt.push_str(&base64url(&signature.to_bytes()));
        jwt
    }

    fn cached(&self) -> Option<Token> {
        let token = match kv::get_json::<Token>(&self.cache_key) {
            Ok(token) => token,
            Err(err) => {
                if self.fallback.is_none() {
                    warn!(
                        "cannot read the cached BigQuery token ({err}); keeping it in memory instead"
                    );
                }
                self.fallback.clone()
            }
        };
        let fresh_until = clock::now_millis() + EXPIRY_MARGIN.as_millis() as u64;
        token.filter(|token| token.expires_at_ms > fresh_until)
    }

    fn store(&mut self, token: &Token) {
        let left = token.expires_at_ms.saturating_sub(clock::now_millis());
        let ttl = Duration::from_millis(left).saturating_sub(EXPIRY_MARGIN);
        if !ttl.is_zero()
            && let Err(err) = kv::set_json(&self.cache_key, token, Some(ttl))
        {
            warn!("cannot cache the BigQuery token ({err}); each instance will sign in on its own");
        }
        self.fallback = Some(token.clone());
    }

    fn fetch(&mut self) -> Result<Token, ExportError> {
        let now = clock::now_millis();
        let assertion = self.assertion(now / 1000);
        let response = Request::post(&self.token_uri)
            .header("accept", "application/json")
            .form(&[("grant_type", GRANT_TYPE), ("assertion", &assertion)])
            .send()
            .map_err(|err| self.unreachable(err))?;
        if !response.is_success() {
            return Err(self.token_error(&response));
        }
        let body: TokenResponse = response.json().map_err(|err| {
            ExportError::retryable(format!(
                "Google's token endpoint answered 200 with an unexpected body: {err}"
            ))
        })?;
        let token = Token {
            access_token: body.access_token,
            expires_at_ms: now + body.expires_in * 1000,
        };
        info!(
            "signed in to Google as {} for {} s",
            self.client_email, body.expires_in
        );
        self.store(&token);
        Ok(token)
    }

    fn unreachable(&self, err: HttpError) -> ExportError {
        let uri = &self.token_uri;
        match err {
            HttpError::Denied(reason) => ExportError::permanent(format!(
                "cannot reach the key file's token_uri {uri}: {reason}. The plugin may reach oauth2.googleapis.com and the api_base host"
            )),
            other => ExportError::from(other).map_message(|message| {
                format!("cannot reach Google's token endpoint {uri}: {message}")
            }),
        }
    }

    /// Retries what Google's own clients retry; a refused key needs the
    /// operator.
    fn token_error(&self, response: &Response) -> ExportError {
        let body: TokenError = response.json().unwrap_or_default();
        let detail = match (body.error.is_empty(), body.error_description.is_empty()) {
            (true, _) => format!("HTTP {}", response.status),
            (false, true) => body.error.clone(),
            (false, false) => format!("{}: {}", body.error, body.error_description),
        };
        let transient = matches!(response.status, 408 | 429 | 500 | 503 | 504)
            || matches!(
                body.error.as_str(),
                "internal_failure" | "server_error" | "temporarily_unavailable"
            );
        if transient {
            return ExportError::Retryable {
                message: format!("Google's token endpoint is unavailable ({detail})"),
                retry_after: response.retry_after(),
            };
        }
        ExportError::permanent(format!(
            "Google refused to sign in service account {} ({detail}): the key may have been deleted or disabled, or the host's clock is off. Create a new JSON key, put it in `service_account_key`, then replay the dead letters",
            self.client_email
        ))
    }
}

/// The host's secure randomness, for RSA blinding.
struct HostRng;

impl rand_core::RngCore for HostRng {
    fn next_u32(&mut self) -> u32 {
        random::u64() as u32
    }

    fn next_u64(&mut self) -> u64 {
        random::u64()
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for chunk in dest.chunks_mut(65536) {
            chunk.copy_from_slice(&random::bytes(chunk.len()));
        }
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl rand_core::CryptoRng for HostRng {}

/// Base64url without padding, as JWTs use.
pub fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (*b as u32) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rsa::pkcs1v15::{Signature, VerifyingKey};
    use rsa::pkcs8::DecodePublicKey;
    use rsa::signature::Verifier;
    use sluice_plugin_sdk::Value;
    use sluice_plugin_sdk::testing::MockHost;

    pub const PRIVATE_KEY: &str = include_str!("../../../tests/fixtures/bigquery-test-key.pem");
    const PUBLIC_KEY: &str = include_str!("../../../tests/fixtures/bigquery-test-key.pub.pem");

    fn key_file() -> String {
        json!({
            "type": "service_account",
            "project_id": "my-project",
            "private_key_id": "key-1",
            "private_key": PRIVATE_KEY,
            "client_email": "sluice@my-project.iam.gserviceaccount.com",
            "client_id": "1234",
            "token_uri": "https://oauth2.googleapis.com/token",
        })
        .to_string()
    }

    fn decode(part: &str) -> Vec<u8> {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut bits = 0u32;
        let mut count = 0;
        let mut out = Vec::new();
        for c in part.bytes() {
            let value = ALPHABET.iter().position(|&a| a == c).expect("base64url") as u32;
            bits = bits << 6 | value;
            count += 6;
            if count >= 8 {
                count -= 8;
                out.push((bits >> count) as u8);
            }
        }
        out
    }

    #[test]
    fn the_assertion_is_an_rs256_jwt_the_public_key_verifies() {
        let _host = MockHost::install();
        let account = ServiceAccount::parse(&key_file()).unwrap();
        let jwt = account.assertion(1_704_067_200);
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        let header: Value = serde_json::from_slice(&decode(parts[0])).unwrap();
        assert_eq!(
            header,
            json!({"alg": "RS256", "typ": "JWT", "kid": "key-1"})
        );
        let claims: Value = serde_json::from_slice(&decode(parts[1])).unwrap();
        assert_eq!(
            claims,
            json!({
                "iss": "sluice@my-project.iam.gserviceaccount.com",
                "scope": SCOPE,
                "aud": "https://oauth2.googleapis.com/token",
                "iat": 1_704_067_200,
                "exp": 1_704_070_800,
            })
        );
        let public = VerifyingKey::<Sha256>::from_public_key_pem(PUBLIC_KEY).unwrap();
        let signature = Signature::try_from(decode(parts[2]).as_slice()).unwrap();
        let signed = format!("{}.{}", parts[0], parts[1]);
        public
            .verify(signed.as_bytes(), &signature)
            .expect("valid signature");
        assert!(public.verify(b"tampered", &signature).is_err());
    }

    #[test]
    fn base64url_has_no_padding_and_url_safe_letters() {
        assert_eq!(base64url(b""), "");
        assert_eq!(base64url(b"f"), "Zg");
        assert_eq!(base64url(b"fo"), "Zm8");
        assert_eq!(base64url(b"foo"), "Zm9v");
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
    }

    #[test]
    fn a_bad_key_file_is_refused_with_the_reason() {
        let err = |text: &str| ServiceAccount::parse(text).err().unwrap().to_string();
        assert!(err("not json").contains("must be the JSON key file of a service account"));
        assert!(
            err(r#"{"type": "authorized_user"}"#).contains("is a `authorized_user` credential")
        );
        assert!(
            err(r#"{"client_email": "a@b", "private_key_id": "k"}"#)
                .contains("has no `private_key`")
        );
        let bad_pem = json!({"client_email": "a@b", "private_key_id": "k", "private_key": "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"});
        assert!(err(&bad_pem.to_string()).contains("`private_key` is not a PEM RSA private key"));
    }

    #[test]
    fn the_token_uri_defaults_to_googles() {
        let mut key: Value = serde_json::from_str(&key_file()).unwrap();
        key.as_object_mut().unwrap().remove("token_uri");
        let account = ServiceAccount::parse(&key.to_string()).unwrap();
        assert_eq!(account.token_uri, "https://oauth2.googleapis.com/token");
    }
}
