//! `{{placeholder}}` templates for the message text and the Block Kit
//! blocks, compiled once when the install starts.
//!
//! Everything a placeholder inserts is written as text and escaped for
//! Slack, while the template's own text is kept as written: the operator may
//! format with mrkdwn and links, but an event property can neither break the
//! layout nor smuggle in a `<!channel>` mention.

use sluice_plugin_sdk::{Error, ExportedEvent, Result, Value};

/// A compiled text template.
#[derive(Debug, PartialEq)]
pub(crate) struct Text(Vec<Piece>);

/// A compiled JSON template: the tree with every string already split into
/// text and placeholders.
#[derive(Debug, PartialEq)]
pub(crate) enum Json {
    /// A subtree without placeholders, copied as is.
    Literal(Value),
    /// A string holding at least one placeholder.
    Text(Text),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

#[derive(Debug, PartialEq)]
enum Piece {
    Literal(String),
    Field(Field),
}

/// What a placeholder refers to.
#[derive(Debug, PartialEq)]
enum Field {
    Uuid,
    Event,
    DistinctId,
    PersonId,
    Timestamp,
    /// `properties` followed by a path of keys (or array indexes); an empty
    /// path is the whole object.
    Properties(Vec<String>),
}

impl Text {
    /// `at` names the config field for error messages.
    pub(crate) fn compile(text: &str, at: &str) -> Result<Text> {
        let mut pieces = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                pieces.push(Piece::Literal(rest[..open].to_string()));
            }
            let inner = &rest[open + 2..];
            let close = inner.find("}}").ok_or_else(|| {
                Error::msg(format!("{at}: `{{{{` is not closed by `}}}}` in {text:?}"))
            })?;
            pieces.push(Piece::Field(Field::parse(&inner[..close], at)?));
            rest = &inner[close + 2..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Literal(rest.to_string()));
        }
        Ok(Text(pieces))
    }

    fn has_fields(&self) -> bool {
        self.0.iter().any(|piece| matches!(piece, Piece::Field(_)))
    }

    pub(crate) fn render(&self, event: &ExportedEvent) -> String {
        let mut out = String::new();
        for piece in &self.0 {
            match piece {
                Piece::Literal(text) => out.push_str(text),
                Piece::Field(field) => field.write_escaped(event, &mut out),
            }
        }
        out
    }
}

impl Json {
    /// `at` locates `value` in the config for error messages.
    pub(crate) fn compile(value: &Value, at: &str) -> Result<Json> {
        let template = match value {
            Value::String(text) => {
                let text_template = Text::compile(text, at)?;
                if text_template.has_fields() {
                    Json::Text(text_template)
                } else {
                    Json::Literal(value.clone())
                }
            }
            Value::Array(items) => Json::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| Json::compile(item, &format!("{at}[{i}]")))
                    .collect::<Result<_>>()?,
            ),
            Value::Object(map) => Json::Object(
                map.iter()
                    .map(|(key, item)| {
                        Ok((key.clone(), Json::compile(item, &format!("{at}.{key}"))?))
                    })
                    .collect::<Result<_>>()?,
            ),
            _ => Json::Literal(value.clone()),
        };
        // A placeholder-free subtree renders as one clone instead of a walk.
        Ok(match template {
            Json::Array(items) if items.iter().all(Json::is_literal) => {
                Json::Literal(value.clone())
            }
            Json::Object(entries) if entries.iter().all(|(_, t)| t.is_literal()) => {
                Json::Literal(value.clone())
            }
            other => other,
        })
    }

    fn is_literal(&self) -> bool {
        matches!(self, Json::Literal(_))
    }

    pub(crate) fn render(&self, event: &ExportedEvent) -> Value {
        match self {
            Json::Literal(value) => value.clone(),
            Json::Text(text) => Value::String(text.render(event)),
            Json::Array(items) => {
                Value::Array(items.iter().map(|item| item.render(event)).collect())
            }
            Json::Object(entries) => Value::Object(
                entries
                    .iter()
                    .map(|(key, item)| (key.clone(), item.render(event)))
                    .collect(),
            ),
        }
    }
}

impl Field {
    fn parse(inner: &str, at: &str) -> Result<Field> {
        let name = inner.trim();
        let placeholder = format!("{{{{{name}}}}}");
        let (root, path) = match name.split_once('.') {
            Some((root, path)) => (root, Some(path)),
            None => (name, None),
        };
        let field = match root {
            "uuid" => Field::Uuid,
            "event" => Field::Event,
            "distinct_id" => Field::DistinctId,
            "person_id" => Field::PersonId,
            "timestamp" => Field::Timestamp,
            "properties" => {
                let path: Vec<String> = path
                    .map(|p| p.split('.').map(str::to_string).collect())
                    .unwrap_or_default();
                if path.iter().any(String::is_empty) {
                    return Err(Error::msg(format!(
                        "{at}: placeholder `{placeholder}` has an empty segment in its path"
                    )));
                }
                return Ok(Field::Properties(path));
            }
            _ => {
                return Err(Error::msg(format!(
                    "{at}: unknown placeholder `{placeholder}`; use {{{{uuid}}}}, {{{{event}}}}, {{{{distinct_id}}}}, {{{{person_id}}}}, {{{{timestamp}}}}, {{{{properties}}}} or {{{{properties.NAME}}}}"
                )));
            }
        };
        if path.is_some() {
            return Err(Error::msg(format!(
                "{at}: placeholder `{placeholder}` has a path, but only {{{{properties}}}} has nested fields"
            )));
        }
        Ok(field)
    }

    /// Appends the field's value as escaped text: strings as they are,
    /// missing values and null as nothing, anything else as compact JSON.
    fn write_escaped(&self, event: &ExportedEvent, out: &mut String) {
        match self {
            Field::Uuid => escape(&event.uuid, out),
            Field::Event => escape(&event.name, out),
            Field::DistinctId => escape(&event.distinct_id, out),
            Field::PersonId => escape(event.person_id.as_deref().unwrap_or(""), out),
            Field::Timestamp => escape(&event.timestamp, out),
            Field::Properties(path) => {
                let Some((first, rest)) = path.split_first() else {
                    let json = serde_json::to_string(&event.properties).unwrap_or_default();
                    return escape(&json, out);
                };
                let mut value = event.properties.get(first);
                for key in rest {
                    value = match value {
                        Some(Value::Object(map)) => map.get(key),
                        Some(Value::Array(items)) => {
                            key.parse::<usize>().ok().and_then(|i| items.get(i))
                        }
                        _ => None,
                    };
                }
                match value {
                    None | Some(Value::Null) => {}
                    Some(Value::String(text)) => escape(text, out),
                    Some(other) => escape(&other.to_string(), out),
                }
            }
        }
    }
}

/// `text` escaped for Slack.
pub(crate) fn escaped(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    escape(text, &mut out);
    out
}

/// Slack reads `&`, `<` and `>` as control characters in message text;
/// those three, and only those, are written as HTML entities.
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
