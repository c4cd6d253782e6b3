//! PII scrubber: drops or hashes named properties and redacts e-mail
//! addresses and phone numbers found inside string values.
//!
//! It works in at most three host calls whatever the event's size: one edit
//! that drops the named properties everywhere, one read of every value
//! (`leaves`, packed by the host), and one write of the values it changed.

use std::collections::HashSet;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use sluice_plugin_sdk::{
    EditPlan, Edits, EventRef, LeafValue, Outcome, Plugin, Result, register_plugin,
};

#[derive(Deserialize)]
struct Config {
    #[serde(default)]
    drop: Vec<String>,
    #[serde(default)]
    hash: Vec<String>,
    #[serde(default)]
    salt: Option<String>,
    #[serde(default = "yes")]
    redact_emails: bool,
    #[serde(default = "yes")]
    redact_phones: bool,
    #[serde(default = "default_replacement")]
    replacement: String,
}

fn yes() -> bool {
    true
}

fn default_replacement() -> String {
    "[redacted]".into()
}

struct PiiScrubber {
    /// Removes every dropped name, at any depth, in one host call; `None`
    /// if nothing is dropped.
    drops: Option<EditPlan>,
    /// Names whose values are hashed whole. A short list is faster to scan
    /// than to hash into a set, once per value.
    hash: Vec<String>,
    salt: String,
    redact_emails: bool,
    redact_phones: bool,
    replacement: String,
}

impl Plugin for PiiScrubber {
    type Config = Config;

    fn new(config: Config) -> Result<Self> {
        let mut drops = Edits::new();
        for key in config.drop.iter().collect::<HashSet<_>>() {
            drops.remove_everywhere(key);
        }
        let mut hash = config.hash;
        hash.retain(|key| !config.drop.contains(key));
        hash.sort();
        hash.dedup();
        Ok(PiiScrubber {
            drops: (!drops.is_empty()).then(|| drops.plan()).transpose()?,
            hash,
            salt: config.salt.unwrap_or_default(),
            redact_emails: config.redact_emails,
            redact_phones: config.redact_phones,
            replacement: config.replacement,
        })
    }

    fn transform(&mut self, event: &mut EventRef<'_>) -> Result<Outcome> {
        if let Some(drops) = &self.drops {
            event.apply(drops)?;
        }
        let leaves = event.leaves(&self.hash);
        let mut changed = Vec::new();
        for leaf in leaves.iter() {
            if !self.hash.is_empty() && self.hash.iter().any(|name| name == leaf.key) {
                let text = match leaf.value {
                    LeafValue::String(text) | LeafValue::Json(text) => text,
                };
                changed.push((leaf.index, self.hash_text(text)));
            } else if let LeafValue::String(text) = leaf.value
                && let Some(redacted) = self.redact(text)
            {
                changed.push((leaf.index, redacted));
            }
        }
        event.replace_leaves(&self.hash, changed)?;
        Ok(Outcome::Keep)
    }
}

impl PiiScrubber {
    /// A string is hashed as its text, anything else as its JSON.
    fn hash_text(&self, text: &str) -> String {
        let digest = Sha256::new()
            .chain_update(self.salt.as_bytes())
            .chain_update(text.as_bytes())
            .finalize();
        // By hand: a `format!` per byte was an allocation and a trip
        // through the formatter for each of the 32, and showed in the load
        // benchmark's profile.
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut hex = String::with_capacity(digest.len() * 2);
        for byte in digest {
            hex.push(DIGITS[usize::from(byte >> 4)] as char);
            hex.push(DIGITS[usize::from(byte & 0xf)] as char);
        }
        hex
    }

    fn redact(&self, text: &str) -> Option<String> {
        let mut spans = Vec::new();
        if self.redact_emails {
            spans.extend(find_emails(text));
        }
        if self.redact_phones {
            spans.extend(find_phones(text));
        }
        if spans.is_empty() {
            return None;
        }
        spans.sort_unstable();
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        for (start, end) in spans {
            if start < at {
                continue; // overlaps a span already replaced
            }
            out.push_str(&text[at..start]);
            out.push_str(&self.replacement);
            at = end;
        }
        out.push_str(&text[at..]);
        Some(out)
    }
}

fn is_local_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'%' | b'+' | b'-')
}

fn is_domain_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-')
}

/// Byte spans of e-mail addresses: a local part, `@`, and a domain with at
/// least one dot and an alphabetic top-level label of two or more letters.
fn find_emails(text: &str) -> Vec<(usize, usize)> {
    let bytes = text.as_bytes();
    let mut spans = Vec::new();
    let mut search_from = 0;
    while let Some(offset) = text[search_from..].find('@') {
        let at = search_from + offset;
        search_from = at + 1;
        let mut start = at;
        while start > 0 && is_local_char(bytes[start - 1]) {
            start -= 1;
        }
        let mut end = at + 1;
        while end < bytes.len() && is_domain_char(bytes[end]) {
            end += 1;
        }
        // A sentence may end right after the address.
        while end > at + 1 && matches!(bytes[end - 1], b'.' | b'-') {
            end -= 1;
        }
        let domain = &text[at + 1..end];
        let tld = domain.rsplit('.').next().unwrap_or("");
        let valid = start < at
            && domain.contains('.')
            && !domain.starts_with('.')
            && tld.len() >= 2
            && tld.bytes().all(|b| b.is_ascii_alphabetic());
        if valid {
            spans.push((start, end));
            search_from = end;
        }
    }
    spans
}

/// Byte spans of phone numbers: digits with single separators (space, `-`,
/// `.`, parentheses), 10 to 15 digits, or 8 to 15 after a leading `+`. A
/// bare run of digits (ids, timestamps) needs a `+` to count, and a
/// candidate glued to letters, `-`, `_`, `:` or `/` (uuids, times, paths) or
/// shaped like an IPv4 address is not a phone number.
fn find_phones(text: &str) -> Vec<(usize, usize)> {
    let bytes = text.as_bytes();
    let glued = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b':' | b'/' | b'.');
    let mut spans = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let starts = b == b'+' || b == b'(' || b.is_ascii_digit();
        if !starts || (i > 0 && glued(bytes[i - 1])) {
            i += 1;
            continue;
        }
        let start = i;
        let plus = b == b'+';
        let mut end = if plus { i + 1 } else { i };
        let mut digits = 0;
        let mut separators = 0usize;
        // Counted, not collected: this runs on every digit of every string.
        let (mut groups, mut longest_group) = (0usize, 0usize);
        let mut dots_only = true;
        let mut current = 0;
        let mut last_was_separator = plus;
        while end < bytes.len() {
            let c = bytes[end];
            if c.is_ascii_digit() {
                digits += 1;
                current += 1;
                last_was_separator = false;
            } else if matches!(c, b' ' | b'-' | b'.' | b'(' | b')') {
                if last_was_separator && c != b'(' {
                    break;
                }
                if current > 0 {
                    groups += 1;
                    longest_group = longest_group.max(current);
                    current = 0;
                }
                dots_only &= c == b'.';
                separators += 1;
                last_was_separator = c != b')';
            } else {
                break;
            }
            end += 1;
        }
        if current > 0 {
            groups += 1;
            longest_group = longest_group.max(current);
        }
        // Give back trailing separators, such as the space before a word.
        while end > start && !bytes[end - 1].is_ascii_digit() && bytes[end - 1] != b')' {
            end -= 1;
            separators = separators.saturating_sub(1);
        }
        let followed_ok = end >= bytes.len() || !glued(bytes[end]) || bytes[end] == b'.';
        let ipv4_like = dots_only && groups == 4 && longest_group <= 3;
        let enough = if plus {
            (8..=15).contains(&digits)
        } else {
            (10..=15).contains(&digits) && separators > 0
        };
        if enough && followed_ok && !ipv4_like {
            spans.push((start, end));
            i = end;
        } else {
            i = end.max(i + 1);
        }
    }
    spans
}

register_plugin!(PiiScrubber);

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_plugin_sdk::testing::{self, MockHost};
    use sluice_plugin_sdk::{Map, Value, json};

    fn scrubber(config: Value) -> PiiScrubber {
        testing::setup::<PiiScrubber>(config).expect("valid config")
    }

    fn run(plugin: &mut PiiScrubber, properties: Value) -> Map<String, Value> {
        MockHost::install();
        let event = testing::event("signed up", "user-1", properties);
        let mut out = testing::transform(plugin, event).expect("transform succeeds");
        assert_eq!(out.len(), 1, "the scrubber never drops or splits events");
        out.pop().unwrap().properties
    }

    #[test]
    fn drops_named_properties_at_any_depth() {
        let mut plugin = scrubber(json!({"drop": ["email", "ssn"]}));
        let props = run(
            &mut plugin,
            json!({"email": "a@b.co", "plan": "pro", "$set": {"email": "a@b.co", "name": "Ann"}, "ssn": "1"}),
        );
        assert_eq!(
            Value::Object(props),
            json!({"plan": "pro", "$set": {"name": "Ann"}})
        );
    }

    #[test]
    fn hashes_named_properties_with_the_salt() {
        let mut plugin = scrubber(json!({"hash": ["user_email"], "salt": "pepper"}));
        let props = run(&mut plugin, json!({"user_email": "ann@example.com"}));
        let expected: String = Sha256::digest(b"pepperann@example.com")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(props["user_email"], json!(expected));
    }

    #[test]
    fn hashes_numbers_and_whole_objects_as_their_json_and_leaves_nulls() {
        let mut plugin = scrubber(json!({"hash": ["id", "email"], "drop": ["phone"]}));
        let props = run(
            &mut plugin,
            json!({"id": 42, "$set": {"email": {"home": "h@example.com"}, "phone": "x"}, "email": null}),
        );
        let digest = |text: &str| -> String {
            Sha256::digest(text.as_bytes())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        };
        assert_eq!(props["id"], json!(digest("42")));
        assert_eq!(
            props["$set"],
            json!({"email": digest(r#"{"home":"h@example.com"}"#)})
        );
        assert_eq!(props["email"], json!(null));
    }

    #[test]
    fn redacts_emails_and_phone_numbers_inside_strings() {
        let mut plugin = scrubber(json!({}));
        let props = run(
            &mut plugin,
            json!({
                "note": "Mail ann.lee+x@mail.example.co.uk or call +1 415 555 2671.",
                "other": "US: (415) 555-2671, FR: 01 23 45 67 89",
                "list": ["bob@example.org", 3],
            }),
        );
        assert_eq!(props["note"], json!("Mail [redacted] or call [redacted]."));
        assert_eq!(props["other"], json!("US: [redacted], FR: [redacted]"));
        assert_eq!(props["list"], json!(["[redacted]", 3]));
    }

    #[test]
    fn leaves_ids_dates_times_and_addresses_alone() {
        let mut plugin = scrubber(json!({}));
        let clean = json!({
            "uuid": "01890000-0000-7000-8000-000000000001",
            "at": "2024-01-01 12:00:00",
            "ms": "1704067200000",
            "ip": "192.168.100.200",
            "handle": "@ann",
            "version": "1.2.3",
            "price": 1234567890,
        });
        let props = run(&mut plugin, clean.clone());
        assert_eq!(Value::Object(props), clean);
    }

    #[test]
    fn redaction_can_be_turned_off() {
        let mut plugin = scrubber(json!({"redact_emails": false, "redact_phones": false}));
        let props = run(&mut plugin, json!({"note": "ann@example.com +14155552671"}));
        assert_eq!(props["note"], json!("ann@example.com +14155552671"));
    }

    #[test]
    fn a_non_list_drop_config_is_refused() {
        let err = testing::setup::<PiiScrubber>(json!({"drop": "email"}))
            .err()
            .unwrap();
        assert!(err.to_string().contains("invalid config"), "{err}");
    }
}
