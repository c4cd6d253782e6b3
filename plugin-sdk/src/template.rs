//! `{{placeholder}}` templates filled from an exported event: message text,
//! or a JSON body whose shape the install chooses.
//!
//! A placeholder names a field of the event: `{{uuid}}`, `{{event}}`,
//! `{{distinct_id}}`, `{{person_id}}`, `{{timestamp}}`, `{{properties}}`
//! (the whole object) or `{{properties.NAME}}`, where `NAME` is a path of
//! keys and array indexes such as `{{properties.order.items.0}}`. Spaces
//! inside the braces do not count.
//!
//! Compile a template once, in [`Plugin::new`](crate::Plugin::new): a
//! mistyped placeholder then fails the install with the config field named,
//! where the operator sees it, instead of dead-lettering every batch, and
//! rendering an event only walks the prepared pieces.
//!
//! ```
//! use sluice_plugin_sdk::template::{Json, Text};
//! use sluice_plugin_sdk::{ExportedEvent, json};
//!
//! let text = Text::compile("{{distinct_id}} upgraded to {{properties.plan}}", "text")?;
//! let body = Json::compile(
//!     &json!({"who": "{{distinct_id}}", "seats": "{{properties.seats}}", "source": "sluice"}),
//!     "body_template",
//! )?;
//!
//! let event: ExportedEvent = serde_json::from_value(json!({
//!     "uuid": "01890000-0000-7000-8000-000000000001",
//!     "event": "upgraded",
//!     "distinct_id": "ada",
//!     "timestamp": "2024-01-01T00:00:00.000Z",
//!     "properties": {"plan": "pro", "seats": 5},
//! }))?;
//! assert_eq!(text.render(&event), "ada upgraded to pro");
//! // A string that is one whole placeholder keeps the value's JSON type.
//! assert_eq!(body.render(&event), json!({"who": "ada", "seats": 5, "source": "sluice"}));
//!
//! let err = Text::compile("hi {{user}}", "text").unwrap_err();
//! assert!(err.to_string().starts_with("text: unknown placeholder `{{user}}`"));
//! # Ok::<(), sluice_plugin_sdk::Error>(())
//! ```

use serde_json::{Map, Value};

use crate::{Error, ExportedEvent, Result};

/// What a placeholder refers to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Field {
    /// `{{uuid}}`: the event's uuid.
    Uuid,
    /// `{{event}}`: the event name.
    Event,
    /// `{{distinct_id}}`: the distinct id the event was sent with.
    DistinctId,
    /// `{{person_id}}`: the person's id, missing when the host does not
    /// know it.
    PersonId,
    /// `{{timestamp}}`: when the event happened, RFC 3339 in UTC.
    Timestamp,
    /// `{{properties}}` followed by a path of keys (or array indexes); an
    /// empty path is the whole object.
    Properties(Vec<String>),
}

/// One part of a [`Text`] template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Piece {
    /// Text kept as written.
    Text(String),
    /// A placeholder.
    Field(Field),
}

/// A compiled text template: the template's own text, kept as written, with
/// placeholders between.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Text(Vec<Piece>);

/// A compiled JSON template: the tree with every string already split into
/// text and placeholders. Object keys are kept as written.
#[derive(Clone, Debug, PartialEq)]
pub enum Json {
    /// A subtree without placeholders, copied as is.
    Literal(Value),
    /// A string that is exactly one placeholder, replaced by the value with
    /// its own JSON type. Only [`Json::compile`] makes these.
    Value(Field),
    /// A string holding placeholders, rendered as a string.
    Text(Text),
    /// An array holding placeholders.
    Array(Vec<Json>),
    /// An object holding placeholders, in the template's key order.
    Object(Vec<(String, Json)>),
}

/// A field's value in one event, borrowed until it is rendered.
enum Found<'a> {
    Missing,
    Text(&'a str),
    Json(&'a Value),
    Object(&'a Map<String, Value>),
}

/// Writes an inserted value to the output.
type Escape<'e> = &'e dyn Fn(&str, &mut String);

fn verbatim(text: &str, out: &mut String) {
    out.push_str(text);
}

impl Field {
    /// Parses what stands between `{{` and `}}`, such as `properties.plan`.
    /// `at` names the config field for error messages.
    pub fn parse(placeholder: &str, at: &str) -> Result<Field> {
        let name = placeholder.trim();
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

    /// The field's value in `event` with its JSON type: text fields as
    /// strings, properties as they are, and null when missing.
    pub fn value(&self, event: &ExportedEvent) -> Value {
        match self.find(event) {
            Found::Missing => Value::Null,
            Found::Text(text) => Value::String(text.to_string()),
            Found::Json(value) => value.clone(),
            Found::Object(map) => Value::Object(map.clone()),
        }
    }

    /// Appends the field's value as text: strings as they are, missing
    /// values and null as nothing, anything else as compact JSON.
    fn write_text(&self, event: &ExportedEvent, out: &mut String, escape: Escape<'_>) {
        match self.find(event) {
            Found::Missing | Found::Json(Value::Null) => {}
            Found::Text(text) => escape(text, out),
            Found::Json(Value::String(text)) => escape(text, out),
            Found::Json(value) => escape(&value.to_string(), out),
            Found::Object(map) => escape(&serde_json::to_string(map).unwrap_or_default(), out),
        }
    }

    fn find<'a>(&self, event: &'a ExportedEvent) -> Found<'a> {
        match self {
            Field::Uuid => Found::Text(&event.uuid),
            Field::Event => Found::Text(&event.name),
            Field::DistinctId => Found::Text(&event.distinct_id),
            Field::PersonId => event
                .person_id
                .as_deref()
                .map_or(Found::Missing, Found::Text),
            Field::Timestamp => Found::Text(&event.timestamp),
            Field::Properties(path) => {
                let Some((first, rest)) = path.split_first() else {
                    return Found::Object(&event.properties);
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
                value.map_or(Found::Missing, Found::Json)
            }
        }
    }
}

impl Text {
    /// Splits `text` into text and placeholders. `at` names the config
    /// field for error messages.
    pub fn compile(text: &str, at: &str) -> Result<Text> {
        let mut pieces = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                pieces.push(Piece::Text(rest[..open].to_string()));
            }
            let inner = &rest[open + 2..];
            let close = inner.find("}}").ok_or_else(|| {
                Error::msg(format!("{at}: `{{{{` is not closed by `}}}}` in {text:?}"))
            })?;
            pieces.push(Piece::Field(Field::parse(&inner[..close], at)?));
            rest = &inner[close + 2..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_string()));
        }
        Ok(Text(pieces))
    }

    /// The pieces, in order.
    pub fn pieces(&self) -> &[Piece] {
        &self.0
    }

    fn has_fields(&self) -> bool {
        self.0.iter().any(|piece| matches!(piece, Piece::Field(_)))
    }

    /// Fills in the placeholders from `event`: strings as they are, missing
    /// values and null as nothing, anything else as compact JSON.
    pub fn render(&self, event: &ExportedEvent) -> String {
        self.render_with(event, &verbatim)
    }

    /// Like [`Text::render`], but what the placeholders insert goes through
    /// `escape`, which appends its first argument to the second in the
    /// target's escaped form. The template's own text is kept as written,
    /// so the install may use the target's markup while event data cannot.
    pub fn render_escaped(
        &self,
        event: &ExportedEvent,
        escape: impl Fn(&str, &mut String),
    ) -> String {
        self.render_with(event, &escape)
    }

    fn render_with(&self, event: &ExportedEvent, escape: Escape<'_>) -> String {
        let mut out = String::new();
        for piece in &self.0 {
            match piece {
                Piece::Text(text) => out.push_str(text),
                Piece::Field(field) => field.write_text(event, &mut out, escape),
            }
        }
        out
    }
}

impl From<Vec<Piece>> for Text {
    fn from(pieces: Vec<Piece>) -> Self {
        Text(pieces)
    }
}

impl Json {
    /// Compiles a JSON template in which a string that is exactly one
    /// placeholder, such as `"{{properties.seats}}"`, is replaced by the
    /// value with its own JSON type (a number stays a number, a missing
    /// value becomes null), and other strings with placeholders become
    /// text. `at` locates `value` in the config for error messages, such as
    /// `body_template.user[0]`.
    pub fn compile(value: &Value, at: &str) -> Result<Json> {
        Json::compile_with(value, at, true)
    }

    /// Compiles a JSON template in which every string with placeholders
    /// renders as a string, for targets that want text wherever a template
    /// has a placeholder (chat blocks, for instance).
    pub fn compile_as_text(value: &Value, at: &str) -> Result<Json> {
        Json::compile_with(value, at, false)
    }

    fn compile_with(value: &Value, at: &str, typed: bool) -> Result<Json> {
        let template = match value {
            Value::String(string) => {
                let text = Text::compile(string, at)?;
                match text.pieces() {
                    [Piece::Field(field)] if typed => Json::Value(field.clone()),
                    _ if text.has_fields() => Json::Text(text),
                    _ => Json::Literal(value.clone()),
                }
            }
            Value::Array(items) => Json::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| Json::compile_with(item, &format!("{at}[{i}]"), typed))
                    .collect::<Result<_>>()?,
            ),
            Value::Object(map) => Json::Object(
                map.iter()
                    .map(|(key, item)| {
                        let item = Json::compile_with(item, &format!("{at}.{key}"), typed)?;
                        Ok((key.clone(), item))
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

    /// Fills in the placeholders from `event`.
    pub fn render(&self, event: &ExportedEvent) -> Value {
        self.render_with(event, &verbatim)
    }

    /// Like [`Json::render`], but what placeholders insert into strings goes
    /// through `escape`, as in [`Text::render_escaped`]. Whole-placeholder
    /// values keep their JSON type and are not escaped.
    pub fn render_escaped(
        &self,
        event: &ExportedEvent,
        escape: impl Fn(&str, &mut String),
    ) -> Value {
        self.render_with(event, &escape)
    }

    fn render_with(&self, event: &ExportedEvent, escape: Escape<'_>) -> Value {
        match self {
            Json::Literal(value) => value.clone(),
            Json::Value(field) => field.value(event),
            Json::Text(text) => Value::String(text.render_with(event, escape)),
            Json::Array(items) => Value::Array(
                items
                    .iter()
                    .map(|item| item.render_with(event, escape))
                    .collect(),
            ),
            Json::Object(entries) => Value::Object(
                entries
                    .iter()
                    .map(|(key, item)| (key.clone(), item.render_with(event, escape)))
                    .collect(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(person_id: Option<&str>, properties: Value) -> ExportedEvent {
        ExportedEvent {
            uuid: "id-1".into(),
            name: "paid".into(),
            distinct_id: "ada".into(),
            person_id: person_id.map(str::to_string),
            timestamp: "2024-01-01T00:00:00.000Z".into(),
            properties: properties.as_object().cloned().unwrap_or_default(),
        }
    }

    fn angle_brackets(text: &str, out: &mut String) {
        out.push_str(&text.replace('<', "&lt;"));
    }

    #[test]
    fn text_inserts_strings_as_they_are_other_values_as_json_and_missing_ones_as_nothing() {
        let text = Text::compile(
            "{{event}} {{properties.order.items.1}} {{properties.total}}{{properties.nope}}{{person_id}} {{properties.order}}",
            "text",
        )
        .unwrap();
        let event = event(None, json!({"order": {"items": ["a", "b"]}, "total": 4.5}));
        assert_eq!(text.render(&event), "paid b 4.5 {\"items\":[\"a\",\"b\"]}");
    }

    #[test]
    fn escaping_touches_what_placeholders_insert_and_not_the_template() {
        let text = Text::compile("<b>{{properties.name}}</b>", "text").unwrap();
        let event = event(None, json!({"name": "<script>"}));
        assert_eq!(
            text.render_escaped(&event, angle_brackets),
            "<b>&lt;script></b>"
        );
    }

    #[test]
    fn only_compile_keeps_whole_placeholders_typed() {
        let template = json!({"n": "{{properties.n}}", "who": "{{person_id}}", "fixed": [1, "x"]});
        let event = event(None, json!({"n": 5}));
        assert_eq!(
            Json::compile(&template, "body").unwrap().render(&event),
            json!({"n": 5, "who": null, "fixed": [1, "x"]})
        );
        assert_eq!(
            Json::compile_as_text(&template, "body")
                .unwrap()
                .render(&event),
            json!({"n": "5", "who": "", "fixed": [1, "x"]})
        );
    }

    #[test]
    fn placeholder_free_subtrees_compile_to_one_literal() {
        let template =
            Json::compile_as_text(&json!([{"a": [1, "c"]}, {"b": "{{uuid}}"}]), "t").unwrap();
        let uuid = Text::compile("{{uuid}}", "t").unwrap();
        assert_eq!(uuid.pieces(), [Piece::Field(Field::Uuid)]);
        assert_eq!(
            template,
            Json::Array(vec![
                Json::Literal(json!({"a": [1, "c"]})),
                Json::Object(vec![("b".into(), Json::Text(uuid))]),
            ])
        );
    }

    #[test]
    fn mistakes_are_refused_naming_the_place_in_the_config() {
        let err = |value: Value| Json::compile(&value, "body").unwrap_err().to_string();
        assert!(
            err(json!({"a": ["{{who}}"]})).starts_with("body.a[0]: unknown placeholder `{{who}}`")
        );
        assert!(err(json!("{{ event.name }}")).contains("`{{event.name}}` has a path"));
        assert!(err(json!("{{properties.a..b}}")).contains("has an empty segment"));
        assert!(err(json!("hi {{event")).contains("body: `{{` is not closed by `}}`"));
    }
}
