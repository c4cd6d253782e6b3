//! Signing in with the OAuth 2.0 refresh-token flow, and keeping the access
//! token where every instance of the install finds it.
//!
//! The session (access token and instance URL) lives in the install's
//! key-value store, so instances running side by side and instances started
//! later reuse it instead of each asking Salesforce for a token. Salesforce
//! does not say how long an access token lives (it follows the org's session
//! timeout), so the cached session is used until a call answers 401 and is
//! then renewed.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sluice_plugin_sdk::http::{HttpError, Request, Response};
use sluice_plugin_sdk::{ExportError, info, kv, warn};

/// A signed-in session.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Session {
    pub access_token: String,
    /// Where the org's data API lives, such as https://acme.my.salesforce.com.
    pub instance_url: String,
    /// A replacement refresh token, when the connected app rotates them:
    /// the configured one no longer works once it has been used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
}

/// The configured credentials and the cache they key.
pub struct Credentials {
    /// Without a trailing slash.
    pub login_url: String,
    pub client_id: String,
    pub client_secret: Option<String>,
    pub refresh_token: String,
    /// The key-value key of the session. It hashes the credentials, so an
    /// install whose credentials change never reuses the old session.
    pub cache_key: String,
    /// Used when the operator's policy denies the key-value store.
    fallback: Option<Session>,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    instance_url: String,
    #[serde(default)]
    refresh_token: Option<String>,
}

#[derive(Default, Deserialize)]
struct TokenError {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
}

impl Credentials {
    pub fn new(
        login_url: String,
        client_id: String,
        client_secret: Option<String>,
        refresh_token: String,
    ) -> Credentials {
        let mut hash = Sha256::new();
        for part in [&login_url, &client_id, &refresh_token] {
            hash.update(part.as_bytes());
            hash.update([0]);
        }
        let mut cache_key = String::from("session/");
        for byte in &hash.finalize()[..16] {
            let _ = write!(cache_key, "{byte:02x}");
        }
        Credentials {
            login_url,
            client_id,
            client_secret,
            refresh_token,
            cache_key,
            fallback: None,
        }
    }

    /// The cached session, or a new one.
    pub fn session(&mut self) -> Result<Session, ExportError> {
        match self.cached() {
            Some(session) => Ok(session),
            None => self.refresh(None),
        }
    }

    /// A session to replace one whose access token Salesforce refused. If
    /// another instance has renewed it meanwhile, that session is used.
    pub fn renew(&mut self, refused: &Session) -> Result<Session, ExportError> {
        match self.cached() {
            Some(session) if session.access_token != refused.access_token => Ok(session),
            _ => self.refresh(refused.refresh_token.as_deref()),
        }
    }

    fn cached(&self) -> Option<Session> {
        match kv::get_json::<Session>(&self.cache_key) {
            Ok(Some(session)) => Some(session),
            Ok(None) => None,
            Err(err) => {
                if self.fallback.is_none() {
                    warn!(
                        "cannot read the cached Salesforce session ({err}); keeping it in memory instead"
                    );
                }
                self.fallback.clone()
            }
        }
    }

    fn store(&mut self, session: &Session) {
        if let Err(err) = kv::set_json(&self.cache_key, session, None) {
            warn!(
                "cannot cache the Salesforce session ({err}); each instance will sign in on its own"
            );
        }
        self.fallback = Some(session.clone());
    }

    /// Exchanges the refresh token for an access token.
    fn refresh(&mut self, rotated: Option<&str>) -> Result<Session, ExportError> {
        let refresh_token = rotated.unwrap_or(&self.refresh_token);
        let mut form = vec![
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token),
            ("client_id", self.client_id.as_str()),
        ];
        if let Some(secret) = &self.client_secret {
            form.push(("client_secret", secret));
        }
        let url = format!("{}/services/oauth2/token", self.login_url);
        let response = Request::post(&url)
            .header("accept", "application/json")
            .form(&form)
            .send()
            .map_err(|err| login_unreachable(&self.login_url, err))?;
        if !response.is_success() {
            return Err(token_error(&response));
        }
        let token: TokenResponse = response.json().map_err(|err| {
            ExportError::retryable(format!(
                "Salesforce's token endpoint answered 200 with an unexpected body: {err}"
            ))
        })?;
        let instance_url = token.instance_url.trim_end_matches('/').to_string();
        if !(instance_url.starts_with("https://") || instance_url.starts_with("http://")) {
            return Err(ExportError::permanent(format!(
                "Salesforce's token response names instance_url {instance_url:?}, which is not an http(s) URL; check `login_url`"
            )));
        }
        let session = Session {
            access_token: token.access_token,
            instance_url,
            // Once rotated, the newest token is the only one that works.
            refresh_token: token.refresh_token.or_else(|| rotated.map(str::to_string)),
        };
        info!("signed in to Salesforce; instance {}", session.instance_url);
        self.store(&session);
        Ok(session)
    }
}

fn login_unreachable(login_url: &str, err: HttpError) -> ExportError {
    match err {
        HttpError::Denied(reason) => {
            ExportError::permanent(format!("cannot reach login_url {login_url}: {reason}"))
        }
        other => ExportError::from(other).map_message(|message| {
            format!("cannot reach Salesforce at {login_url} to sign in: {message}")
        }),
    }
}

/// Classifies a failed token request. A refused grant or client needs the
/// operator; only Salesforce's own trouble is worth retrying.
fn token_error(response: &Response) -> ExportError {
    let body: TokenError = response.json().unwrap_or_default();
    let detail = if body.error.is_empty() {
        format!("HTTP {}", response.status)
    } else if body.error_description.is_empty() {
        body.error.clone()
    } else {
        format!("{}: {}", body.error, body.error_description)
    };
    match body.error.as_str() {
        "invalid_grant" => ExportError::permanent(format!(
            "Salesforce refused the refresh token ({detail}). It was revoked or has expired, or the integration user cannot sign in: issue a new refresh token for the connected app, put it in the `refresh_token` setting, then replay the dead letters"
        )),
        "invalid_client_id" | "invalid_client" | "invalid_client_credentials" => {
            ExportError::permanent(format!(
                "Salesforce refused the connected app's credentials ({detail}): check `client_id` and `client_secret` against the app's consumer key and secret"
            ))
        }
        _ if response.status == 429 || response.status >= 500 => ExportError::Retryable {
            message: format!("Salesforce's token endpoint is unavailable ({detail})"),
            retry_after: response.retry_after(),
        },
        _ => ExportError::permanent(format!(
            "Salesforce refused to sign in ({detail}); check `login_url`, `client_id`, `client_secret` and `refresh_token`"
        )),
    }
}
