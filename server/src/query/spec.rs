//! The query language: JSON in, typed and checked queries out. Every
//! rejection names the field it is about (`series[1].math`), so a client can
//! point at the mistake; unknown fields are rejected too, because a typo such
//! as `intreval` would otherwise silently change the answer.

use serde_json::{Map, Value};

use super::QueryError;
use super::time::{DateSpec, Interval};
use crate::store::Cursor;

/// Where a property lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    Event,
    Person,
}

/// A property of the event or of its person: a top-level key, or a path
/// into nested objects.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PropertyRef {
    pub source: Source,
    pub path: Vec<String>,
}

/// A literal a filter compares with.
#[derive(Clone, Debug)]
pub enum Literal {
    Number(f64),
    Text(String),
}

#[derive(Clone, Debug)]
pub enum Operator {
    /// Equal to any of the values.
    Eq(Vec<Literal>),
    /// Equal to none of the values (an unset property matches).
    Neq(Vec<Literal>),
    /// Contains the text, ignoring case; holds the lowercased text.
    Contains(String),
    Regex(regex::Regex),
    Gt(f64),
    Lt(f64),
    IsSet,
    IsNotSet,
}

#[derive(Clone, Debug)]
pub struct Filter {
    pub property: PropertyRef,
    pub operator: Operator,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Math {
    Total,
    UniqueUsers,
    Sum(PropertyRef),
    Avg(PropertyRef),
    Min(PropertyRef),
    Max(PropertyRef),
}

impl Math {
    pub fn name(&self) -> &'static str {
        match self {
            Math::Total => "total",
            Math::UniqueUsers => "unique_users",
            Math::Sum(_) => "sum",
            Math::Avg(_) => "avg",
            Math::Min(_) => "min",
            Math::Max(_) => "max",
        }
    }

    pub fn property(&self) -> Option<&PropertyRef> {
        match self {
            Math::Total | Math::UniqueUsers => None,
            Math::Sum(p) | Math::Avg(p) | Math::Min(p) | Math::Max(p) => Some(p),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Series {
    /// `None` counts every event.
    pub event: Option<String>,
    pub filters: Vec<Filter>,
    pub math: Math,
    pub label: String,
}

#[derive(Clone, Debug)]
pub struct Breakdown {
    pub property: PropertyRef,
    /// Values shown on their own; the rest are summed up as "other".
    pub limit: usize,
}

/// The time range as written; resolved against the clock and time zone
/// when the query runs.
#[derive(Clone, Debug, Default)]
pub struct DateRange {
    pub from: Option<DateSpec>,
    pub to: Option<DateSpec>,
}

#[derive(Clone, Debug)]
pub struct TrendsQuery {
    pub series: Vec<Series>,
    pub interval: Interval,
    pub range: DateRange,
    pub timezone: Option<chrono_tz::Tz>,
    pub filters: Vec<Filter>,
    pub breakdown: Option<Breakdown>,
}

#[derive(Clone, Debug)]
pub struct Step {
    pub event: Option<String>,
    pub filters: Vec<Filter>,
    pub label: String,
}

#[derive(Clone, Debug)]
pub struct FunnelQuery {
    pub steps: Vec<Step>,
    /// Longest time from the first step to the last, in milliseconds.
    pub window_ms: i64,
    pub range: DateRange,
    pub timezone: Option<chrono_tz::Tz>,
    pub filters: Vec<Filter>,
    pub breakdown: Option<Breakdown>,
}

#[derive(Clone, Debug)]
pub struct EventsQuery {
    pub event: Option<String>,
    pub distinct_id: Option<String>,
    pub filters: Vec<Filter>,
    pub range: DateRange,
    pub timezone: Option<chrono_tz::Tz>,
    pub limit: usize,
    /// Where the previous page stopped: results continue after it.
    pub cursor: Option<Cursor>,
}

#[derive(Clone, Debug)]
pub enum Query {
    Trends(TrendsQuery),
    Funnel(FunnelQuery),
    Events(EventsQuery),
}

/// Most series of one trends query, and most steps of one funnel: each
/// series is a scan of its own, and a funnel's work grows with its steps.
pub const MAX_SERIES: usize = 20;
pub const MAX_STEPS: usize = 20;
/// Most breakdown values shown on their own.
pub const MAX_BREAKDOWN_LIMIT: usize = 1000;
pub const DEFAULT_BREAKDOWN_LIMIT: usize = 25;
/// Most events one search returns.
pub const MAX_EVENTS_LIMIT: usize = 1000;
/// Regexes are compiled from client input: bound what one may cost.
const REGEX_SIZE_LIMIT: usize = 1 << 20;
const DEFAULT_WINDOW_MS: i64 = 14 * 86_400_000;
const MAX_WINDOW_MS: i64 = 366 * 86_400_000;

fn invalid(attr: &str, message: impl Into<String>) -> QueryError {
    QueryError::Invalid {
        attr: attr.to_string(),
        message: message.into(),
    }
}

/// A JSON object being read, which remembers the keys taken so the rest
/// can be reported as unknown.
struct Fields<'a> {
    attr: String,
    map: &'a Map<String, Value>,
    known: Vec<&'static str>,
}

impl<'a> Fields<'a> {
    fn new(attr: &str, value: &'a Value) -> Result<Self, QueryError> {
        let shown = if attr.is_empty() { "the query" } else { attr };
        let map = value
            .as_object()
            .ok_or_else(|| invalid(attr, format!("`{shown}` must be a JSON object")))?;
        Ok(Fields {
            attr: attr.to_string(),
            map,
            known: Vec::new(),
        })
    }

    fn path(&self, key: &str) -> String {
        if self.attr.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.attr)
        }
    }

    /// The value of `key`; JSON null counts as absent.
    fn get(&mut self, key: &'static str) -> Option<&'a Value> {
        self.known.push(key);
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn string(&mut self, key: &'static str) -> Result<Option<&'a str>, QueryError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(invalid(
                &self.path(key),
                format!("`{}` must be a string, got {other}", self.path(key)),
            )),
        }
    }

    fn array(&mut self, key: &'static str) -> Result<Option<&'a Vec<Value>>, QueryError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => Ok(Some(items)),
            Some(other) => Err(invalid(
                &self.path(key),
                format!("`{}` must be an array, got {other}", self.path(key)),
            )),
        }
    }

    fn finish(self) -> Result<(), QueryError> {
        for key in self.map.keys() {
            if !self.known.contains(&key.as_str()) {
                let attr = self.path(key);
                return Err(invalid(
                    &attr,
                    format!(
                        "unknown field `{attr}`; the fields here are {}",
                        self.known
                            .iter()
                            .map(|k| format!("`{k}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl Query {
    /// Reads a query from its JSON form.
    pub fn parse(value: &Value) -> Result<Query, QueryError> {
        let mut fields = Fields::new("", value)?;
        let kind = fields
            .string("kind")?
            .ok_or_else(|| invalid("kind", "`kind` is required: trends, funnel or events"))?;
        let query = match kind {
            "trends" => Query::Trends(parse_trends(&mut fields)?),
            "funnel" | "funnels" => Query::Funnel(parse_funnel(&mut fields)?),
            "events" => Query::Events(parse_events(&mut fields)?),
            other => {
                return Err(invalid(
                    "kind",
                    format!("`kind` must be trends, funnel or events, got \"{other}\""),
                ));
            }
        };
        fields.finish()?;
        Ok(query)
    }
}

fn parse_trends(fields: &mut Fields) -> Result<TrendsQuery, QueryError> {
    let items = fields
        .array("series")?
        .ok_or_else(|| invalid("series", "`series` is required: a list of {\"event\": …}"))?;
    if items.is_empty() || items.len() > MAX_SERIES {
        return Err(invalid(
            "series",
            format!(
                "`series` must hold 1 to {MAX_SERIES} series, got {}",
                items.len()
            ),
        ));
    }
    let series = items
        .iter()
        .enumerate()
        .map(|(i, item)| parse_series(&format!("series[{i}]"), item))
        .collect::<Result<Vec<_>, _>>()?;
    let interval = match fields.string("interval")? {
        None => Interval::Day,
        Some(text) => Interval::parse(text).ok_or_else(|| {
            invalid(
                "interval",
                format!("`interval` must be hour, day, week or month, got \"{text}\""),
            )
        })?,
    };
    Ok(TrendsQuery {
        series,
        interval,
        range: parse_range(fields)?,
        timezone: parse_timezone(fields)?,
        filters: parse_filters(fields, "properties")?,
        breakdown: parse_breakdown(fields)?,
    })
}

fn parse_series(attr: &str, value: &Value) -> Result<Series, QueryError> {
    let mut fields = Fields::new(attr, value)?;
    let event = parse_event_name(&mut fields)?;
    let math = match fields.string("math")?.unwrap_or("total") {
        "total" => Math::Total,
        "unique_users" | "dau" => Math::UniqueUsers,
        name @ ("sum" | "avg" | "min" | "max") => {
            let attr = fields.path("math_property");
            let key = fields.get("math_property").ok_or_else(|| {
                invalid(
                    &attr,
                    format!("`{attr}` is required with math {name}: the numeric property"),
                )
            })?;
            let source = parse_source(&mut fields, "math_property_type")?;
            let property = parse_property(&attr, key, source)?;
            match name {
                "sum" => Math::Sum(property),
                "avg" => Math::Avg(property),
                "min" => Math::Min(property),
                _ => Math::Max(property),
            }
        }
        other => {
            let attr = fields.path("math");
            return Err(invalid(
                &attr,
                format!(
                    "`{attr}` must be total, unique_users, sum, avg, min or max, got \"{other}\""
                ),
            ));
        }
    };
    if math.property().is_none() {
        // Read them so they count as known, then refuse them: a property
        // with math total would be silently ignored.
        for key in ["math_property", "math_property_type"] {
            if fields.get(key).is_some() {
                let attr = fields.path(key);
                return Err(invalid(
                    &attr,
                    format!("`{attr}` only goes with math sum, avg, min or max"),
                ));
            }
        }
    }
    let filters = parse_filters(&mut fields, "properties")?;
    let label = match fields.string("name")? {
        Some(name) => name.to_string(),
        None => event.clone().unwrap_or_else(|| "All events".into()),
    };
    fields.finish()?;
    Ok(Series {
        event,
        filters,
        math,
        label,
    })
}

fn parse_event_name(fields: &mut Fields) -> Result<Option<String>, QueryError> {
    let event = fields.string("event")?;
    if event == Some("") {
        let attr = fields.path("event");
        return Err(invalid(
            &attr,
            format!("`{attr}` must not be empty; leave it out to match every event"),
        ));
    }
    Ok(event.map(str::to_string))
}

fn parse_funnel(fields: &mut Fields) -> Result<FunnelQuery, QueryError> {
    let items = fields
        .array("steps")?
        .ok_or_else(|| invalid("steps", "`steps` is required: a list of {\"event\": …}"))?;
    if items.len() < 2 || items.len() > MAX_STEPS {
        return Err(invalid(
            "steps",
            format!(
                "`steps` must hold 2 to {MAX_STEPS} steps, got {}",
                items.len()
            ),
        ));
    }
    let steps = items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let mut fields = Fields::new(&format!("steps[{i}]"), item)?;
            let event = parse_event_name(&mut fields)?;
            let filters = parse_filters(&mut fields, "properties")?;
            let label = match fields.string("name")? {
                Some(name) => name.to_string(),
                None => event.clone().unwrap_or_else(|| "All events".into()),
            };
            fields.finish()?;
            Ok(Step {
                event,
                filters,
                label,
            })
        })
        .collect::<Result<Vec<_>, QueryError>>()?;
    let window_ms = match fields.get("conversion_window") {
        None => DEFAULT_WINDOW_MS,
        Some(value) => parse_window(value)?,
    };
    Ok(FunnelQuery {
        steps,
        window_ms,
        range: parse_range(fields)?,
        timezone: parse_timezone(fields)?,
        filters: parse_filters(fields, "properties")?,
        breakdown: parse_breakdown(fields)?,
    })
}

fn parse_window(value: &Value) -> Result<i64, QueryError> {
    let mut fields = Fields::new("conversion_window", value)?;
    let amount = match fields.get("value") {
        Some(Value::Number(n)) => n.as_i64().filter(|n| *n > 0),
        _ => None,
    }
    .ok_or_else(|| {
        invalid(
            "conversion_window.value",
            "`conversion_window.value` must be a whole number above 0",
        )
    })?;
    let unit_ms: i64 = match fields.string("unit")?.unwrap_or("day") {
        "second" => 1000,
        "minute" => 60_000,
        "hour" => 3_600_000,
        "day" => 86_400_000,
        "week" => 7 * 86_400_000,
        other => {
            return Err(invalid(
                "conversion_window.unit",
                format!(
                    "`conversion_window.unit` must be second, minute, hour, day or week, got \"{other}\""
                ),
            ));
        }
    };
    fields.finish()?;
    amount
        .checked_mul(unit_ms)
        .filter(|ms| *ms <= MAX_WINDOW_MS)
        .ok_or_else(|| {
            invalid(
                "conversion_window",
                "`conversion_window` may be at most 366 days",
            )
        })
}

fn parse_events(fields: &mut Fields) -> Result<EventsQuery, QueryError> {
    let event = parse_event_name(fields)?;
    let distinct_id = fields.string("distinct_id")?.map(str::to_string);
    let limit = match fields.get("limit") {
        None => 100,
        Some(value) => value
            .as_u64()
            .map(|n| n as usize)
            .filter(|n| (1..=MAX_EVENTS_LIMIT).contains(n))
            .ok_or_else(|| {
                invalid(
                    "limit",
                    format!("`limit` must be a number from 1 to {MAX_EVENTS_LIMIT}, got {value}"),
                )
            })?,
    };
    let cursor = fields
        .string("cursor")?
        .map(|text| {
            decode_cursor(text).ok_or_else(|| {
                invalid(
                    "cursor",
                    "`cursor` must be a `next_cursor` from an earlier event search, unchanged",
                )
            })
        })
        .transpose()?;
    Ok(EventsQuery {
        event,
        distinct_id,
        filters: parse_filters(fields, "properties")?,
        range: parse_range(fields)?,
        timezone: parse_timezone(fields)?,
        limit,
        cursor,
    })
}

/// Cursors are opaque to clients, so the encoding may change; inside is the
/// (timestamp, uuid) of the last event the search read.
pub fn encode_cursor(cursor: &Cursor) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(format!("{} {}", cursor.timestamp, cursor.uuid))
}

fn decode_cursor(text: &str) -> Option<Cursor> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let (timestamp, uuid) = text.split_once(' ')?;
    // Stored timestamps compare as text, so only their exact form may pass.
    let parsed = chrono::DateTime::parse_from_rfc3339(timestamp).ok()?;
    if crate::model::format_timestamp(parsed.to_utc()) != timestamp || uuid.is_empty() {
        return None;
    }
    Some(Cursor {
        timestamp: timestamp.to_string(),
        uuid: uuid.to_string(),
    })
}

fn parse_range(fields: &mut Fields) -> Result<DateRange, QueryError> {
    let mut spec = |key: &'static str| -> Result<Option<DateSpec>, QueryError> {
        fields
            .string(key)?
            .map(|text| {
                DateSpec::parse(text).ok_or_else(|| {
                    invalid(
                        key,
                        format!(
                            "`{key}` must be a date (2026-01-31), a time (2026-01-31T12:00:00Z) or relative (-7d, -24h, -2w, -3m, -1y), got \"{text}\""
                        ),
                    )
                })
            })
            .transpose()
    };
    Ok(DateRange {
        from: spec("date_from")?,
        to: spec("date_to")?,
    })
}

fn parse_timezone(fields: &mut Fields) -> Result<Option<chrono_tz::Tz>, QueryError> {
    fields
        .string("timezone")?
        .map(|name| {
            parse_tz(name).ok_or_else(|| {
                invalid(
                    "timezone",
                    format!(
                        "`timezone` must be an IANA time zone such as Europe/Berlin or UTC, got \"{name}\""
                    ),
                )
            })
        })
        .transpose()
}

/// An IANA zone name.
pub fn parse_tz(name: &str) -> Option<chrono_tz::Tz> {
    name.parse().ok()
}

fn parse_breakdown(fields: &mut Fields) -> Result<Option<Breakdown>, QueryError> {
    let Some(value) = fields.get("breakdown") else {
        return Ok(None);
    };
    let mut inner = Fields::new("breakdown", value)?;
    let key = inner.get("property").ok_or_else(|| {
        invalid(
            "breakdown.property",
            "`breakdown.property` is required: the property to break down by",
        )
    })?;
    let source = parse_source(&mut inner, "type")?;
    let property = parse_property("breakdown.property", key, source)?;
    let limit = match inner.get("limit") {
        None => DEFAULT_BREAKDOWN_LIMIT,
        Some(value) => value
            .as_u64()
            .map(|n| n as usize)
            .filter(|n| (1..=MAX_BREAKDOWN_LIMIT).contains(n))
            .ok_or_else(|| {
                invalid(
                    "breakdown.limit",
                    format!(
                        "`breakdown.limit` must be a number from 1 to {MAX_BREAKDOWN_LIMIT}, got {value}"
                    ),
                )
            })?,
    };
    inner.finish()?;
    Ok(Some(Breakdown { property, limit }))
}

fn parse_source(fields: &mut Fields, key: &'static str) -> Result<Source, QueryError> {
    match fields.string(key)?.unwrap_or("event") {
        "event" => Ok(Source::Event),
        "person" => Ok(Source::Person),
        other => {
            let attr = fields.path(key);
            Err(invalid(
                &attr,
                format!("`{attr}` must be event or person, got \"{other}\""),
            ))
        }
    }
}

/// A property key: a string names a top-level key as it is (dots and all),
/// an array of strings is a path into nested objects.
fn parse_property(attr: &str, key: &Value, source: Source) -> Result<PropertyRef, QueryError> {
    let path: Vec<String> = match key {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) if !items.is_empty() => items
            .iter()
            .map(|item| item.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| invalid(attr, format!("`{attr}` must be a list of strings")))?,
        _ => {
            return Err(invalid(
                attr,
                format!(
                    "`{attr}` must be a property name or a path such as [\"address\", \"city\"], got {key}"
                ),
            ));
        }
    };
    for part in &path {
        // The SQLite JSON path syntax has no escape for a double quote.
        if part.is_empty() || part.contains('"') || part.chars().any(char::is_control) {
            return Err(invalid(
                attr,
                format!(
                    "`{attr}` has the key {part:?}: property keys must be non-empty, without double quotes or control characters"
                ),
            ));
        }
    }
    Ok(PropertyRef { source, path })
}

fn parse_filters(fields: &mut Fields, key: &'static str) -> Result<Vec<Filter>, QueryError> {
    let attr = fields.path(key);
    let Some(items) = fields.array(key)? else {
        return Ok(Vec::new());
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| parse_filter(&format!("{attr}[{i}]"), item))
        .collect()
}

fn parse_filter(attr: &str, value: &Value) -> Result<Filter, QueryError> {
    let mut fields = Fields::new(attr, value)?;
    let key_attr = fields.path("key");
    let key = fields.get("key").ok_or_else(|| {
        invalid(
            &key_attr,
            format!("`{key_attr}` is required: the property to filter on"),
        )
    })?;
    let source = parse_source(&mut fields, "type")?;
    let property = parse_property(&key_attr, key, source)?;
    let op_attr = fields.path("operator");
    let value_attr = fields.path("value");
    let operator_name = fields.string("operator")?.unwrap_or("eq");
    let value = fields.get("value");
    let needs_value = || {
        value.ok_or_else(|| {
            invalid(
                &value_attr,
                format!("`{value_attr}` is required with operator {operator_name}"),
            )
        })
    };
    let text = |value: &Value| match value {
        Value::String(s) => Ok(s.clone()),
        other => Err(invalid(
            &value_attr,
            format!("`{value_attr}` must be a string with operator {operator_name}, got {other}"),
        )),
    };
    let number = |value: &Value| {
        let parsed = match value {
            Value::Number(n) => n.as_f64(),
            Value::String(s) => s.trim().parse::<f64>().ok(),
            _ => None,
        };
        parsed.filter(|n| n.is_finite()).ok_or_else(|| {
            invalid(
                &value_attr,
                format!(
                    "`{value_attr}` must be a number with operator {operator_name}, got {value}"
                ),
            )
        })
    };
    let literals = |value: &Value| -> Result<Vec<Literal>, QueryError> {
        let items: Vec<&Value> = match value {
            Value::Array(items) if !items.is_empty() => items.iter().collect(),
            Value::Array(_) => {
                return Err(invalid(
                    &value_attr,
                    format!("`{value_attr}` must not be an empty list"),
                ));
            }
            single => vec![single],
        };
        items
            .into_iter()
            .map(|item| match item {
                Value::Number(n) => n.as_f64().map(Literal::Number).ok_or_else(|| {
                    invalid(&value_attr, format!("`{value_attr}` holds a number out of range"))
                }),
                Value::String(s) => Ok(Literal::Text(s.clone())),
                Value::Bool(b) => Ok(Literal::Text(b.to_string())),
                other => Err(invalid(
                    &value_attr,
                    format!(
                        "`{value_attr}` must be a string, number, boolean or a list of them, got {other}; use is_set or is_not_set for null"
                    ),
                )),
            })
            .collect()
    };
    let operator = match operator_name {
        "eq" | "exact" => Operator::Eq(literals(needs_value()?)?),
        "neq" | "is_not" => Operator::Neq(literals(needs_value()?)?),
        "contains" | "icontains" => Operator::Contains(text(needs_value()?)?.to_lowercase()),
        "regex" => {
            let pattern = text(needs_value()?)?;
            let regex = regex::RegexBuilder::new(&pattern)
                .size_limit(REGEX_SIZE_LIMIT)
                .build()
                .map_err(|err| {
                    invalid(
                        &value_attr,
                        format!("`{value_attr}` is not a valid regular expression: {err}"),
                    )
                })?;
            Operator::Regex(regex)
        }
        "gt" => Operator::Gt(number(needs_value()?)?),
        "lt" => Operator::Lt(number(needs_value()?)?),
        "is_set" | "is_not_set" => {
            if value.is_some() {
                return Err(invalid(
                    &value_attr,
                    format!("`{value_attr}` does not go with operator {operator_name}"),
                ));
            }
            if operator_name == "is_set" {
                Operator::IsSet
            } else {
                Operator::IsNotSet
            }
        }
        other => {
            return Err(invalid(
                &op_attr,
                format!(
                    "`{op_attr}` must be eq, neq, contains, regex, gt, lt, is_set or is_not_set, got \"{other}\""
                ),
            ));
        }
    };
    fields.finish()?;
    Ok(Filter { property, operator })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn attr_of(query: Value) -> String {
        match Query::parse(&query) {
            Err(QueryError::Invalid { attr, .. }) => attr,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn rejections_name_the_field() {
        assert_eq!(attr_of(json!({"kind": "pie"})), "kind");
        assert_eq!(attr_of(json!({})), "kind");
        assert_eq!(
            attr_of(json!({"kind": "trends", "series": [{"event": "a"}], "interval": "fortnight"})),
            "interval"
        );
        assert_eq!(
            attr_of(json!({"kind": "trends", "series": [{"event": "a", "math": "count"}]})),
            "series[0].math"
        );
        assert_eq!(
            attr_of(json!({"kind": "trends", "series": [{"event": "a", "math": "sum"}]})),
            "series[0].math_property"
        );
        assert_eq!(
            attr_of(json!({"kind": "trends", "series": [{"event": "a",
                "properties": [{"key": "x", "operator": "gt", "value": "many"}]}]})),
            "series[0].properties[0].value"
        );
        assert_eq!(
            attr_of(json!({"kind": "trends", "series": [{"event": "a"}],
                "properties": [{"key": "x", "operator": "like", "value": "y"}]})),
            "properties[0].operator"
        );
        assert_eq!(
            attr_of(
                json!({"kind": "events", "properties": [{"key": "x", "operator": "regex", "value": "("}]})
            ),
            "properties[0].value"
        );
        assert_eq!(
            attr_of(json!({"kind": "trends", "series": [{"event": "a"}], "intreval": "day"})),
            "intreval"
        );
        assert_eq!(
            attr_of(json!({"kind": "funnel", "steps": [{"event": "a"}]})),
            "steps"
        );
        assert_eq!(
            attr_of(
                json!({"kind": "funnel", "steps": [{"event": "a"}, {"event": "b"}],
                "conversion_window": {"value": 2, "unit": "year"}})
            ),
            "conversion_window.unit"
        );
        assert_eq!(
            attr_of(
                json!({"kind": "trends", "series": [{"event": "a"}], "date_from": "last week"})
            ),
            "date_from"
        );
        assert_eq!(
            attr_of(
                json!({"kind": "trends", "series": [{"event": "a"}], "timezone": "Mars/Olympus"})
            ),
            "timezone"
        );
        assert_eq!(
            attr_of(json!({"kind": "trends", "series": [{"event": "a"}],
                "breakdown": {"property": ["a", "b\"c"]}})),
            "breakdown.property"
        );
        assert_eq!(
            attr_of(
                json!({"kind": "events", "properties": [{"key": "x", "operator": "is_set", "value": 1}]})
            ),
            "properties[0].value"
        );
    }

    #[test]
    fn a_full_trends_query_reads() {
        let query = Query::parse(&json!({
            "kind": "trends",
            "series": [
                {"event": "purchase", "math": "sum", "math_property": ["order", "total"]},
                {"event": "$pageview", "math": "unique_users", "name": "visitors",
                 "properties": [{"key": "$browser", "value": ["Chrome", "Firefox"]}]}
            ],
            "interval": "week",
            "date_from": "-30d",
            "timezone": "Europe/Berlin",
            "breakdown": {"property": "plan", "type": "person", "limit": 5}
        }))
        .unwrap();
        let Query::Trends(trends) = query else {
            panic!()
        };
        assert_eq!(
            trends.series[0].math,
            Math::Sum(PropertyRef {
                source: Source::Event,
                path: vec!["order".into(), "total".into()]
            })
        );
        assert_eq!(trends.series[1].label, "visitors");
        assert_eq!(trends.interval, Interval::Week);
        let breakdown = trends.breakdown.unwrap();
        assert_eq!(breakdown.property.source, Source::Person);
        assert_eq!(breakdown.limit, 5);
    }
}
