//! Blanking secrets out of text the server keeps or shows: plugin log
//! lines, dead letters' errors, a destination's last error, pause and
//! disable reasons, recorded HTTP calls, and error messages of the API.
//!
//! Two kinds of thing are blanked: the values of an install's `secret`
//! config fields, in the forms they are likely to be printed in, and the
//! credentials and query strings of every URL in the text, since tokens
//! travel there and HTTP clients print the URL of a failed request (reqwest
//! does: "error sending request for url (https://…?api_key=…)").
//! [`Scrubber::scrub`] does both, and is the one function every such
//! string passes through.

use std::borrow::Cow;

use serde_json::{Map, Value};

use super::manifest::{FieldType, Manifest};

/// What a blanked-out secret reads as.
pub const REDACTED: &str = "[redacted]";

/// Secret values shorter than this are not blanked out: a three-letter
/// password would blank out ordinary words.
pub const MIN_SECRET_LEN: usize = 6;

/// Strings of a JSON secret (a service-account key file) at least this
/// long are blanked out on their own too, so a plugin that prints only the
/// private key inside it is caught.
const MIN_INNER_LEN: usize = 16;

/// The secrets of one install, in every form worth looking for.
#[derive(Clone, Debug, Default)]
pub struct Scrubber {
    /// Longest first, so a secret that contains another is blanked whole.
    needles: Vec<String>,
}

impl Scrubber {
    /// Blanks out `values` and the forms they are printed in: as they are,
    /// percent-encoded (in a URL or a form body) and JSON-escaped (inside a
    /// JSON document); for a JSON secret, its long strings too.
    pub fn new<I, S>(values: I) -> Scrubber
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut needles = Vec::new();
        for value in values {
            let value = value.as_ref();
            variants(value, &mut needles);
            if let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(value) {
                for inner in fields.values().filter_map(Value::as_str) {
                    if inner.len() >= MIN_INNER_LEN {
                        variants(inner, &mut needles);
                    }
                }
            }
        }
        needles.retain(|needle| needle.len() >= MIN_SECRET_LEN);
        needles.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        needles.dedup();
        Scrubber { needles }
    }

    /// The values of `config`'s fields that `manifest` declares `secret`.
    /// Sealed values (not yet opened) are skipped: their text is no secret.
    pub fn for_config(manifest: &Manifest, config: &Map<String, Value>) -> Scrubber {
        Scrubber::new(
            manifest
                .config
                .iter()
                .filter(|(_, field)| field.kind == FieldType::Secret)
                .filter_map(|(name, _)| config.get(name)?.as_str()),
        )
    }

    /// Adds the secrets of `other`.
    pub fn merged(&self, other: &Scrubber) -> Scrubber {
        Scrubber::new(self.needles.iter().chain(&other.needles))
    }

    /// `text` without the secrets, URLs left whole: for what an author
    /// asked to see in full (`sluice plugin test`'s recorded calls).
    pub fn blank_secrets<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut out = Cow::Borrowed(text);
        for needle in &self.needles {
            if out.contains(needle.as_str()) {
                out = Cow::Owned(out.replace(needle.as_str(), REDACTED));
            }
        }
        out
    }

    /// Whether there is any secret to blank out (URLs are scrubbed anyway).
    pub fn is_empty(&self) -> bool {
        self.needles.is_empty()
    }

    /// `text` without the secrets and without URLs' credentials and query
    /// strings.
    pub fn scrub<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let out = self.blank_secrets(text);
        match scrub_urls(&out) {
            Cow::Borrowed(_) => out,
            Cow::Owned(scrubbed) => Cow::Owned(scrubbed),
        }
    }
}

fn variants(value: &str, into: &mut Vec<String>) {
    into.push(value.to_string());
    let form: String = form_urlencoded::byte_serialize(value.as_bytes()).collect();
    into.push(form.replace('+', "%20"));
    into.push(form);
    let json = serde_json::to_string(value).expect("a string serialises");
    into.push(json[1..json.len() - 1].to_string());
}

/// Characters that end a URL in running text.
fn ends_url(c: char) -> bool {
    c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>' | '`' | ')' | '\\')
}

/// `text` with every `scheme://` URL's user and password removed and its
/// query string and fragment replaced by [`REDACTED`]. Done on the text as
/// it is, without parsing and printing the URL again, so nothing else in
/// it changes.
pub fn scrub_urls(text: &str) -> Cow<'_, str> {
    if !text.contains("://") {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut changed = false;
    while let Some(at) = rest.find("://") {
        let (before, after) = rest.split_at(at + 3);
        out.push_str(before);
        let end = after.find(ends_url).unwrap_or(after.len());
        let (url, tail) = after.split_at(end);
        let scrubbed = scrub_url_tail(url);
        changed |= scrubbed != url;
        out.push_str(&scrubbed);
        rest = tail;
    }
    out.push_str(rest);
    if changed {
        Cow::Owned(out)
    } else {
        Cow::Borrowed(text)
    }
}

/// What follows `scheme://`, scrubbed.
fn scrub_url_tail(url: &str) -> String {
    let authority_end = url.find(['/', '?', '#']).unwrap_or(url.len());
    let (authority, path) = url.split_at(authority_end);
    let host = match authority.rfind('@') {
        Some(at) => &authority[at + 1..],
        None => authority,
    };
    let mut out = String::from(host);
    match path.find(['?', '#']) {
        Some(at) => {
            out.push_str(&path[..at]);
            out.push(path.as_bytes()[at] as char);
            out.push_str(REDACTED);
        }
        None => out.push_str(path),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_blanked_in_every_printed_form() {
        let scrubber = Scrubber::new(["s3cr3t/with+slash", "short"]);
        assert_eq!(
            scrubber.scrub("key s3cr3t/with+slash, as s3cr3t%2Fwith%2Bslash, short"),
            "key [redacted], as [redacted], short"
        );
        let key = r#"{"client_email":"a@b.c","private_key":"-----BEGIN PRIVATE KEY-----\nMIIabc\n-----END PRIVATE KEY-----\n"}"#;
        let scrubber = Scrubber::new([key]);
        assert_eq!(
            scrubber
                .scrub("bad key -----BEGIN PRIVATE KEY-----\nMIIabc\n-----END PRIVATE KEY-----\n!"),
            "bad key [redacted]!"
        );
        assert!(
            !scrubber
                .scrub(&format!("config: {}", Value::from(key)))
                .contains("MIIabc")
        );
    }

    #[test]
    fn urls_lose_credentials_query_and_fragment_and_nothing_else() {
        assert_eq!(
            scrub_urls(
                "error sending request for url (https://user:pw@api.example.com:8443/v1/x?api_key=abc&y=1): connection refused"
            ),
            "error sending request for url (https://api.example.com:8443/v1/x?[redacted]): connection refused"
        );
        assert_eq!(
            scrub_urls("see http://a.example/cb#access_token=xyz and ftp://h/p"),
            "see http://a.example/cb#[redacted] and ftp://h/p"
        );
        assert!(matches!(
            scrub_urls("no url here, 3 items"),
            Cow::Borrowed(_)
        ));
        assert!(matches!(
            scrub_urls("plain https://example.com/path"),
            Cow::Borrowed(_)
        ));
    }
}
