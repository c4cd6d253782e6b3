//! Slack destination: posts one message to a channel's incoming webhook for
//! each exported event whose name the install lists, so a team hears about
//! sign-ups, cancellations or failed payments as they happen.
//!
//! A webhook takes one message per request, so a batch becomes a series of
//! posts in event order. Slack has no idempotency key, and the host retries
//! a failed batch as a whole, so the plugin records each posted event's uuid
//! in the install's key-value store and skips those uuids when the batch
//! comes back. A batch stopped by a rate limit (Slack allows about one
//! message a second) therefore resumes where it stopped instead of posting
//! its first messages again. The only duplicate left is a post whose answer
//! was lost to a timeout.
//!
//! The webhook URL is the credential, so it never reaches a log line or an
//! error message.

use std::collections::HashSet;
use std::time::Duration;

use serde::Deserialize;
use sluice_plugin_sdk::http::{self, HttpError, Request, Response};
use sluice_plugin_sdk::template::{Json, Text};
use sluice_plugin_sdk::{
    Error, ExportError, ExportedEvent, Map, Plugin, Result, Value, info, json, kv, register_plugin,
    warn,
};

/// How long a posted uuid is remembered: longer than the host keeps
/// retrying a batch, short enough that the store stays small.
const POSTED_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// Slack refuses messages with more blocks than this.
const MAX_BLOCKS: usize = 50;

/// How much of Slack's answer an error message quotes.
const MAX_QUOTED_BODY: usize = 200;

#[derive(Deserialize)]
struct Config {
    webhook_url: String,
    // Taken untyped so `new` can say exactly what is wrong with it.
    #[serde(default)]
    events: Value,
    #[serde(default = "default_text")]
    text: String,
    #[serde(default)]
    blocks: Option<Value>,
}

fn default_text() -> String {
    "{{distinct_id}} did {{event}}".into()
}

struct Slack {
    webhook_url: String,
    events: HashSet<String>,
    text: Text,
    blocks: Option<Json>,
    /// Whether the missing key-value store was already reported, so an
    /// install without it logs that once rather than on every batch.
    kv_warned: bool,
}

impl Plugin for Slack {
    type Config = Config;

    fn new(config: Config) -> Result<Self> {
        let webhook_url = config.webhook_url.trim().to_string();
        if !http::is_absolute_url(&webhook_url) {
            // The value itself stays out of the message: it is a secret.
            return Err(Error::msg(
                "webhook_url must be the https:// URL Slack shows for the incoming webhook, such as https://hooks.slack.com/services/T…/B…/…",
            ));
        }
        let events = event_names(&config.events)?;
        let text = Text::compile(&config.text, "text")?;
        let blocks = match &config.blocks {
            None | Some(Value::Null) => None,
            Some(blocks) => Some(compile_blocks(blocks)?),
        };
        if config.text.trim().is_empty() && blocks.is_none() {
            return Err(Error::msg(
                "text is empty and no blocks are set: Slack needs one of them to post a message",
            ));
        }
        Ok(Slack {
            webhook_url,
            events,
            text,
            blocks,
            kv_warned: false,
        })
    }

    fn export(&mut self, events: Vec<ExportedEvent>) -> Result<(), ExportError> {
        let wanted: Vec<&ExportedEvent> = events
            .iter()
            .filter(|event| self.events.contains(&event.name))
            .collect();
        let mut posted = 0;
        let mut skipped = 0;
        let mut result = Ok(());
        for event in &wanted {
            if self.was_posted(event) {
                skipped += 1;
                continue;
            }
            if let Err(err) = self.post(event) {
                // Later events wait for the retry: after a 429 Slack asks
                // for silence, and after a refusal the batch is dead anyway.
                result = Err(self.stopped(err, posted, wanted.len()));
                break;
            }
            posted += 1;
            self.remember(event);
        }
        if posted + skipped > 0 {
            info!(
                "posted {posted} message(s) to Slack; skipped {skipped} already posted and {} of other events",
                events.len() - wanted.len()
            );
        }
        result
    }
}

impl Slack {
    fn post(&self, event: &ExportedEvent) -> Result<(), ExportError> {
        let body = self.message(event);
        let response = Request::post(&self.webhook_url)
            .json(&body)?
            .send()
            .map_err(|err| self.network_error(err))?;
        classify(&response, &event.uuid)
    }

    /// The webhook payload: the rendered text, and the rendered blocks when
    /// set. Slack refuses a message with neither, so blank text without
    /// blocks falls back to the event name.
    fn message(&self, event: &ExportedEvent) -> Value {
        let mut message = Map::new();
        let text = self.text.render_escaped(event, escape);
        match &self.blocks {
            Some(blocks) => {
                if !text.trim().is_empty() {
                    message.insert("text".into(), Value::String(text));
                }
                message.insert("blocks".into(), blocks.render_escaped(event, escape));
            }
            None if text.trim().is_empty() => {
                message.insert("text".into(), Value::String(escaped(&event.name)));
            }
            None => {
                message.insert("text".into(), Value::String(text));
            }
        }
        Value::Object(message)
    }

    fn was_posted(&mut self, event: &ExportedEvent) -> bool {
        match kv::get(&posted_key(&event.uuid)) {
            Ok(found) => found.is_some(),
            Err(err) => {
                // Posting twice beats not posting: without the store the
                // plugin still delivers, only retries may repeat messages.
                self.warn_kv(&err);
                false
            }
        }
    }

    fn remember(&mut self, event: &ExportedEvent) {
        if let Err(err) = kv::set(&posted_key(&event.uuid), b"1", Some(POSTED_TTL)) {
            self.warn_kv(&err);
        }
    }

    fn warn_kv(&mut self, err: &kv::KvError) {
        if !self.kv_warned {
            self.kv_warned = true;
            warn!(
                "cannot record posted events ({err}); a retried batch may post some messages twice"
            );
        }
    }

    /// Adds how far the batch got, since the posted messages stay posted.
    fn stopped(&self, err: ExportError, posted: usize, total: usize) -> ExportError {
        let progress = match posted {
            0 => String::new(),
            n => format!(
                " ({n} of {total} message(s) were posted before and will not be posted again)"
            ),
        };
        err.map_message(|message| format!("{message}{progress}"))
    }

    /// The host's network errors may quote the URL, which holds the secret.
    fn network_error(&self, err: HttpError) -> ExportError {
        let redacted = self.redact(&err.to_string());
        match err {
            HttpError::Timeout | HttpError::Connection(_) => ExportError::retryable(format!(
                "could not reach Slack: {redacted}; Slack may have posted the message, so a retry can repeat it"
            )),
            HttpError::Denied(_) | HttpError::InvalidRequest(_) | HttpError::TooLarge(_) => {
                ExportError::permanent(format!("could not send to Slack: {redacted}"))
            }
        }
    }

    fn redact(&self, text: &str) -> String {
        let mut text = text.replace(&self.webhook_url, "[webhook_url]");
        // The secret is the path; clients may print the URL normalised.
        if let Some(path) = url_path(&self.webhook_url).filter(|path| path.len() > 1) {
            text = text.replace(path, "/[redacted]");
        }
        text
    }
}

/// Sorts Slack's answer into delivered, retry or dead letter, with what the
/// operator should do. Slack answers errors with a short code as plain text.
fn classify(response: &Response, uuid: &str) -> Result<(), ExportError> {
    if response.is_success() {
        return Ok(());
    }
    let status = response.status;
    let body = String::from_utf8_lossy(&response.body);
    let code: String = body.trim().chars().take(MAX_QUOTED_BODY).collect();
    let said = format!("HTTP {status} {code}");
    let said = said.trim_end();
    if status == 429 {
        return Err(ExportError::Retryable {
            message: format!(
                "Slack is rate limiting this webhook ({said}); it allows about one message per second"
            ),
            retry_after: response.retry_after(),
        });
    }
    if status == 408 || status >= 500 {
        return Err(ExportError::Retryable {
            message: format!("Slack could not take the message for event {uuid} ({said})"),
            retry_after: response.retry_after(),
        });
    }
    let advice = match (status, code.as_str()) {
        (400, "invalid_payload") => format!(
            "Slack could not read the message for event {uuid} ({said}): check that `blocks` is a JSON array of Block Kit blocks"
        ),
        (400, "invalid_blocks" | "invalid_blocks_format") => format!(
            "Slack refused the blocks of the message for event {uuid} ({said}): check `blocks` against Block Kit; section text is limited to 3000 characters, so long properties may need a shorter template"
        ),
        (400, "no_text") => format!(
            "Slack found no text in the message for event {uuid} ({said}): give `text` a template that is never empty"
        ),
        (403, _) => format!(
            "Slack refused to post to the channel ({said}): a workspace admin may restrict posting there, or the webhook is no longer valid; fix the channel's settings or create a new webhook and set `webhook_url`"
        ),
        (404, _) => format!(
            "Slack does not know this webhook ({said}): it was removed, or its app or channel is gone; create a new incoming webhook and set `webhook_url`"
        ),
        (410, _) => format!(
            "the webhook's Slack channel is archived ({said}): unarchive it, or create a webhook for another channel and set `webhook_url`"
        ),
        _ => format!("Slack refused the message for event {uuid} ({said})"),
    };
    Err(ExportError::Permanent(advice))
}

fn posted_key(uuid: &str) -> String {
    format!("posted:{uuid}")
}

/// The path of an absolute URL, without its query.
fn url_path(url: &str) -> Option<&str> {
    let after_scheme = &url[url.find("://")? + 3..];
    let path = &after_scheme[after_scheme.find('/')?..];
    Some(path.split(['?', '#']).next().unwrap_or(path))
}

fn event_names(config: &Value) -> Result<HashSet<String>> {
    let Value::Array(items) = config else {
        return Err(Error::msg(format!(
            "events must be a JSON array of the event names to post, such as [\"signed up\"]; got {}",
            json::kind(config)
        )));
    };
    if items.is_empty() {
        return Err(Error::msg(
            "events is empty: list the event names that should post a message, such as [\"signed up\"]",
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::String(name) if !name.is_empty() => Ok(name.clone()),
            other => Err(Error::msg(format!(
                "events[{i}] must be an event name (a non-empty string), got {}",
                json::kind(other)
            ))),
        })
        .collect()
}

/// Checks what Slack would refuse on every message, so the mistake shows on
/// the install instead of dead-lettering every batch.
fn compile_blocks(blocks: &Value) -> Result<Json> {
    let Value::Array(items) = blocks else {
        return Err(Error::msg(format!(
            "blocks must be a JSON array of Block Kit blocks, such as [{{\"type\": \"section\", \"text\": {{\"type\": \"mrkdwn\", \"text\": \"{{{{event}}}}\"}}}}]; got {}",
            json::kind(blocks)
        )));
    };
    if items.is_empty() || items.len() > MAX_BLOCKS {
        return Err(Error::msg(format!(
            "blocks must hold 1 to {MAX_BLOCKS} blocks, Slack's limit per message; it holds {}",
            items.len()
        )));
    }
    for (i, block) in items.iter().enumerate() {
        if !block.get("type").is_some_and(Value::is_string) {
            return Err(Error::msg(format!(
                "blocks[{i}] must be an object with a \"type\", such as {{\"type\": \"section\", …}}"
            )));
        }
    }
    // Block Kit wants text wherever a template has a placeholder.
    Json::compile_as_text(blocks, "blocks")
}

/// `text` escaped for Slack.
fn escaped(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    escape(text, &mut out);
    out
}

/// Slack reads `&`, `<` and `>` as control characters in message text;
/// those three, and only those, are written as HTML entities. Templates
/// escape only what placeholders insert, so the operator may format with
/// mrkdwn and links while an event property can neither break the layout
/// nor smuggle in a `<!channel>` mention.
fn escape(text: &str, out: &mut String) {
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
}

register_plugin!(Slack);

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::rc::Rc;

    use super::*;
    use sluice_plugin_sdk::http::Method;
    use sluice_plugin_sdk::log::Level;
    use sluice_plugin_sdk::testing::{self, MockHost, json_body, permanent};

    const URL: &str = "https://hooks.slack.com/services/T0001/B0001/s3cr3tT0k3n";

    fn slack(config: Value) -> Slack {
        testing::plugin(config)
    }

    fn event(uuid: &str, name: &str, properties: Value) -> ExportedEvent {
        ExportedEvent {
            distinct_id: "ada@example.com".into(),
            ..testing::exported_event(uuid, name, properties)
        }
    }

    /// A mock Slack that answers `ok` to everything.
    fn slack_ok() -> MockHost {
        let host = MockHost::install();
        host.on_http(|_| Ok(Response::new(200, "ok").with_header("content-type", "text/plain")));
        host
    }

    fn answering(status: u16, body: &'static str) -> MockHost {
        let host = MockHost::install();
        host.on_http(move |_| Ok(Response::new(status, body)));
        host
    }

    #[test]
    fn posts_one_json_message_per_listed_event_to_the_webhook() {
        let host = slack_ok();
        let mut plugin = slack(json!({"webhook_url": URL, "events": ["signed up", "paid"]}));
        plugin
            .export(vec![
                event("id-1", "signed up", json!({})),
                event("id-2", "pageview", json!({})),
                event("id-3", "paid", json!({})),
            ])
            .expect("delivered");

        let requests = host.requests();
        assert_eq!(requests.len(), 2, "pageview is not listed");
        for request in &requests {
            assert_eq!(request.method, Method::Post);
            assert_eq!(request.url, URL);
            assert_eq!(
                request.headers,
                [("content-type".to_string(), "application/json".to_string())],
                "the URL is the credential; nothing else is sent"
            );
        }
        assert_eq!(
            json_body(&requests[0]),
            json!({"text": "ada@example.com did signed up"})
        );
        assert_eq!(
            json_body(&requests[1]),
            json!({"text": "ada@example.com did paid"})
        );
    }

    #[test]
    fn text_fills_in_nested_properties_and_escapes_only_what_events_insert() {
        let host = slack_ok();
        let mut plugin = slack(json!({
            "webhook_url": URL,
            "events": ["paid"],
            "text": "<!here> *{{distinct_id}}* paid {{properties.order.total}} for {{properties.order.items.0}} via <https://x.test/{{uuid}}|{{properties.source}}>{{properties.nope}} {{properties.flags}}",
        }));
        plugin
            .export(vec![event(
                "id-1",
                "paid",
                json!({
                    "order": {"total": 42.5, "items": ["<b>Tea & cake</b>"]},
                    "source": "<!channel>",
                    "flags": {"vip": true},
                }),
            )])
            .expect("delivered");
        assert_eq!(
            json_body(&host.requests()[0])["text"],
            json!(
                "<!here> *ada@example.com* paid 42.5 for &lt;b&gt;Tea &amp; cake&lt;/b&gt; via <https://x.test/id-1|&lt;!channel&gt;> {\"vip\":true}"
            )
        );
    }

    #[test]
    fn blocks_are_rendered_per_event_with_text_as_the_fallback() {
        let host = slack_ok();
        let mut plugin = slack(json!({
            "webhook_url": URL,
            "events": ["paid"],
            "text": "{{event}}: {{properties.plan}}",
            "blocks": [
                {"type": "header", "text": {"type": "plain_text", "text": "New payment"}},
                {"type": "section", "text": {"type": "mrkdwn", "text": "*{{distinct_id}}* paid {{properties.amount}}"},
                 "fields": [{"type": "mrkdwn", "text": "Plan: {{properties.plan}}"}]},
            ],
        }));
        plugin
            .export(vec![event(
                "id-1",
                "paid",
                json!({"plan": "pro", "amount": 30}),
            )])
            .expect("delivered");
        assert_eq!(
            json_body(&host.requests()[0]),
            json!({
                "text": "paid: pro",
                "blocks": [
                    {"type": "header", "text": {"type": "plain_text", "text": "New payment"}},
                    {"type": "section", "text": {"type": "mrkdwn", "text": "*ada@example.com* paid 30"},
                     "fields": [{"type": "mrkdwn", "text": "Plan: pro"}]},
                ],
            })
        );
    }

    #[test]
    fn blank_text_is_left_out_with_blocks_and_replaced_by_the_event_name_without() {
        let host = slack_ok();
        let mut with_blocks = slack(json!({
            "webhook_url": URL,
            "events": ["paid"],
            "text": "{{properties.note}}",
            "blocks": [{"type": "divider"}],
        }));
        with_blocks
            .export(vec![event("id-1", "paid", json!({}))])
            .expect("delivered");
        let mut text_only = slack(json!({
            "webhook_url": URL,
            "events": ["a<b"],
            "text": "{{properties.note}}",
        }));
        text_only
            .export(vec![event("id-2", "a<b", json!({"note": "  "}))])
            .expect("delivered");

        let requests = host.requests();
        assert_eq!(
            json_body(&requests[0]),
            json!({"blocks": [{"type": "divider"}]})
        );
        assert_eq!(json_body(&requests[1]), json!({"text": "a&lt;b"}));
    }

    #[test]
    fn a_batch_without_listed_events_sends_nothing() {
        let host = answering(500, "rollup_error");
        let mut plugin = slack(json!({"webhook_url": URL, "events": ["signed up"]}));
        plugin
            .export(vec![event("id-1", "pageview", json!({}))])
            .expect("nothing to post is success");
        plugin
            .export(Vec::new())
            .expect("an empty batch is success");
        assert!(host.requests().is_empty());
        assert!(host.logs().is_empty());
    }

    #[test]
    fn a_rate_limit_stops_the_batch_and_the_retry_resumes_after_the_posted_messages() {
        let host = MockHost::install();
        let posts = Rc::new(Cell::new(0));
        let counter = posts.clone();
        host.on_http(move |_| {
            counter.set(counter.get() + 1);
            Ok(if counter.get() == 3 {
                Response::new(429, "").with_header("Retry-After", "30")
            } else {
                Response::new(200, "ok")
            })
        });
        let mut plugin = slack(json!({"webhook_url": URL, "events": ["e"]}));
        let batch: Vec<ExportedEvent> = (1..=4)
            .map(|i| event(&format!("id-{i}"), "e", json!({"n": i})))
            .collect();

        let err = plugin.export(batch.clone()).unwrap_err();
        let ExportError::Retryable {
            message,
            retry_after,
        } = err
        else {
            panic!("429 is retryable, got {err:?}");
        };
        assert_eq!(retry_after, Some(Duration::from_secs(30)));
        assert!(
            message.contains("rate limiting") && message.contains("HTTP 429"),
            "{message}"
        );
        assert!(
            message.contains("2 of 4 message(s) were posted"),
            "{message}"
        );
        assert_eq!(host.requests().len(), 3, "nothing is sent after the 429");

        plugin.export(batch).expect("the retry goes through");
        let texts: Vec<Value> = host
            .requests()
            .iter()
            .map(|r| json_body(r)["text"].clone())
            .collect();
        assert_eq!(texts.len(), 5, "only id-3 and id-4 are posted again");
        assert_eq!(posts.get(), 5);
        assert_eq!(
            host.logs().last().map(|l| l.message.clone()),
            Some(
                "posted 2 message(s) to Slack; skipped 2 already posted and 0 of other events"
                    .into()
            )
        );
        assert_eq!(host.kv("posted:id-4"), Some(b"1".to_vec()));
    }

    #[test]
    fn without_the_key_value_store_messages_are_still_posted_and_the_gap_is_logged_once() {
        let host = slack_ok();
        host.deny_kv();
        let mut plugin = slack(json!({"webhook_url": URL, "events": ["e"]}));
        let batch = vec![event("id-1", "e", json!({})), event("id-2", "e", json!({}))];
        plugin.export(batch.clone()).expect("delivered");
        plugin.export(batch).expect("delivered again");
        assert_eq!(host.requests().len(), 4);
        let warnings: Vec<_> = host
            .logs()
            .into_iter()
            .filter(|line| line.level == Level::Warn)
            .collect();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].message.contains("may post some messages twice"));
    }

    #[test]
    fn server_errors_are_retryable() {
        let _host = answering(500, "rollup_error");
        let mut plugin = slack(json!({"webhook_url": URL, "events": ["e"]}));
        let err = plugin
            .export(vec![event("id-1", "e", json!({}))])
            .unwrap_err();
        assert_eq!(
            err,
            ExportError::Retryable {
                message: "Slack could not take the message for event id-1 (HTTP 500 rollup_error)"
                    .into(),
                retry_after: None,
            }
        );
    }

    #[test]
    fn refusals_are_permanent_and_say_what_to_fix() {
        let cases = [
            (
                400,
                "invalid_payload",
                "check that `blocks` is a JSON array",
            ),
            (400, "invalid_blocks", "check `blocks` against Block Kit"),
            (400, "no_text", "give `text` a template"),
            (
                400,
                "user_not_found",
                "Slack refused the message for event id-1",
            ),
            (
                403,
                "action_prohibited",
                "a workspace admin may restrict posting",
            ),
            (
                404,
                "no_service",
                "create a new incoming webhook and set `webhook_url`",
            ),
            (
                410,
                "channel_is_archived",
                "the webhook's Slack channel is archived",
            ),
        ];
        for (status, code, advice) in cases {
            let _host = answering(status, code);
            let mut plugin = slack(json!({"webhook_url": URL, "events": ["e"]}));
            let message = permanent(
                plugin
                    .export(vec![event("id-1", "e", json!({}))])
                    .unwrap_err(),
            );
            assert!(
                message.contains(&format!("HTTP {status} {code}")),
                "{message}"
            );
            assert!(message.contains(advice), "{status} {code}: {message}");
            assert!(!message.contains("s3cr3t"), "{message}");
        }
    }

    #[test]
    fn a_refusal_after_some_posts_says_how_far_the_batch_got() {
        let host = MockHost::install();
        host.on_http(|request| {
            Ok(
                if json_body(request)["text"]
                    .as_str()
                    .unwrap()
                    .contains("boom")
                {
                    Response::new(400, "invalid_blocks")
                } else {
                    Response::new(200, "ok")
                },
            )
        });
        let mut plugin =
            slack(json!({"webhook_url": URL, "events": ["e"], "text": "{{properties.t}}"}));
        let message = permanent(
            plugin
                .export(vec![
                    event("id-1", "e", json!({"t": "fine"})),
                    event("id-2", "e", json!({"t": "boom"})),
                    event("id-3", "e", json!({"t": "never"})),
                ])
                .unwrap_err(),
        );
        assert!(message.contains("for event id-2"), "{message}");
        assert!(
            message.contains("1 of 3 message(s) were posted before"),
            "{message}"
        );
        assert_eq!(host.requests().len(), 2);
    }

    #[test]
    fn network_errors_never_reveal_the_webhook_url() {
        let host = MockHost::install();
        host.on_http(|request| {
            Err(HttpError::Connection(format!(
                "error sending request for url ({}): connection reset",
                request.url
            )))
        });
        let mut plugin = slack(json!({"webhook_url": URL, "events": ["e"]}));
        let err = plugin
            .export(vec![event("id-1", "e", json!({}))])
            .unwrap_err();
        let ExportError::Retryable { message, .. } = &err else {
            panic!("a connection failure is retryable, got {err:?}");
        };
        assert!(!message.contains("s3cr3t"), "{message}");
        assert!(message.contains("[webhook_url]"), "{message}");

        host.on_http(|_| {
            Err(HttpError::Connection(
                "error sending request for url (https://HOOKS.slack.com/services/T0001/B0001/s3cr3tT0k3n)".into(),
            ))
        });
        let err = plugin
            .export(vec![event("id-2", "e", json!({}))])
            .unwrap_err();
        assert!(!err.to_string().contains("s3cr3t"), "{err}");

        host.on_http(|_| {
            Err(HttpError::Denied(
                "hooks.slack.com:443 is not allowed".into(),
            ))
        });
        let message = permanent(
            plugin
                .export(vec![event("id-3", "e", json!({}))])
                .unwrap_err(),
        );
        assert!(message.contains("is not allowed"), "{message}");
    }

    #[test]
    fn bad_config_is_refused_with_a_clear_message() {
        let refusal = testing::refusal::<Slack>;
        let err =
            refusal(json!({"webhook_url": "hooks.slack.com/services/T/B/secret", "events": ["e"]}));
        assert!(
            err.contains("webhook_url must be the https:// URL"),
            "{err}"
        );
        assert!(!err.contains("secret"), "the value is not echoed: {err}");
        let err = refusal(json!({"webhook_url": URL}));
        assert!(err.contains("events must be a JSON array"), "{err}");
        let err = refusal(json!({"webhook_url": URL, "events": []}));
        assert!(err.contains("events is empty"), "{err}");
        let err = refusal(json!({"webhook_url": URL, "events": ["a", 1]}));
        assert!(err.contains("events[1] must be an event name"), "{err}");
        let err = refusal(json!({"webhook_url": URL, "events": ["e"], "text": "{{user}}"}));
        assert!(
            err.contains("text: unknown placeholder `{{user}}`"),
            "{err}"
        );
        let err = refusal(json!({"webhook_url": URL, "events": ["e"], "text": "hi {{event"}));
        assert!(err.contains("text: `{{` is not closed"), "{err}");
        let err = refusal(json!({"webhook_url": URL, "events": ["e"], "text": "{{event.name}}"}));
        assert!(
            err.contains("only {{properties}} has nested fields"),
            "{err}"
        );
        let err = refusal(json!({"webhook_url": URL, "events": ["e"], "text": " "}));
        assert!(err.contains("text is empty and no blocks are set"), "{err}");
    }

    #[test]
    fn blocks_that_slack_would_always_refuse_are_refused_at_install() {
        let refusal = testing::refusal::<Slack>;
        let err =
            refusal(json!({"webhook_url": URL, "events": ["e"], "blocks": {"type": "section"}}));
        assert!(
            err.contains("blocks must be a JSON array of Block Kit blocks"),
            "{err}"
        );
        let err = refusal(json!({"webhook_url": URL, "events": ["e"], "blocks": []}));
        assert!(err.contains("1 to 50 blocks"), "{err}");
        let many: Vec<Value> = (0..51).map(|_| json!({"type": "divider"})).collect();
        let err = refusal(json!({"webhook_url": URL, "events": ["e"], "blocks": many}));
        assert!(err.contains("it holds 51"), "{err}");
        let err = refusal(json!({"webhook_url": URL, "events": ["e"], "blocks": [{"text": "x"}]}));
        assert!(
            err.contains("blocks[0] must be an object with a \"type\""),
            "{err}"
        );
        let err = refusal(json!({
            "webhook_url": URL,
            "events": ["e"],
            "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": "{{who}}"}}],
        }));
        assert!(
            err.contains("blocks[0].text.text: unknown placeholder `{{who}}`"),
            "{err}"
        );
    }

    #[test]
    fn placeholder_free_parts_of_blocks_compile_to_literals() {
        let template = compile_blocks(&json!([
            {"type": "divider"},
            {"type": "section", "text": {"type": "mrkdwn", "text": "{{event}}!"}},
        ]))
        .unwrap();
        let Json::Array(items) = template else {
            panic!("blocks with a placeholder stay a tree: {template:?}");
        };
        assert_eq!(items[0], Json::Literal(json!({"type": "divider"})));
        assert!(matches!(items[1], Json::Object(_)));
    }

    #[test]
    fn the_manifest_describes_every_field_and_its_defaults_are_accepted() {
        let manifest: Value =
            toml::from_str(include_str!("../plugin.toml")).expect("plugin.toml parses");
        assert_eq!(manifest["hooks"], json!(["export"]));
        assert_eq!(
            manifest["capabilities"]["http_hosts"],
            json!(["{config.webhook_url}"])
        );
        assert_eq!(manifest["capabilities"]["kv"], json!(true));
        assert_eq!(manifest["config"]["webhook_url"]["type"], json!("secret"));
        let mut config = testing::manifest_defaults(&manifest);
        config.insert("webhook_url".into(), json!(URL));
        config.insert("events".into(), json!(["e"]));
        let plugin = slack(Value::Object(config));
        assert_eq!(plugin.text, Text::compile(&default_text(), "text").unwrap());
        assert!(plugin.blocks.is_none());
    }
}
