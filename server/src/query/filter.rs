//! Property values and the filters on them, evaluated here rather than in
//! SQL so both backends give the same answer by construction.
//!
//! A property that is absent and one that is JSON null are the same: not
//! set. Numbers compare as numbers: a JSON number, or a string that reads
//! as one (`"12.5"`), so `gt 10` matches both `12.5` and `"12.5"`. Text
//! comparisons use the value's text: a string as it is, a number in its
//! shortest form (`1.0` reads `1`), `true`/`false`, and objects and arrays
//! as JSON with sorted keys.

use serde_json::Value;

use super::spec::{Literal, Operator};

/// A property value read from a row: the JSON text the database extracted,
/// parsed. `None` when not set.
pub fn parse_value(extracted: Option<&str>) -> Option<Value> {
    let value: Value = serde_json::from_str(extracted?).ok()?;
    (!value.is_null()).then_some(value)
}

/// The value as a number, if it is one or a string that reads as one.
pub fn as_number(value: &Value) -> Option<f64> {
    match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    }
    .filter(|n| n.is_finite())
}

/// A number's text, the same however the database spelled it: integral
/// values without a fraction, others in the shortest form that reads back
/// as the same `f64`.
pub fn number_text(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 9.007_199_254_740_992e15 {
        format!("{}", n as i64)
    } else {
        format!("{n}")
    }
}

/// The text a value compares and breaks down by.
pub fn as_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.as_f64().map(number_text).unwrap_or_else(|| n.to_string()),
        Value::Bool(b) => b.to_string(),
        Value::Null => String::new(),
        Value::Array(_) | Value::Object(_) => canonical_json(value),
    }
}

fn canonical_json(value: &Value) -> String {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            let fields: Vec<String> = keys
                .into_iter()
                .map(|k| {
                    format!(
                        "{}:{}",
                        Value::String(k.clone()),
                        canonical_json(&map[k.as_str()])
                    )
                })
                .collect();
            format!("{{{}}}", fields.join(","))
        }
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(canonical_json).collect();
            format!("[{}]", items.join(","))
        }
        Value::Number(n) => n.as_f64().map(number_text).unwrap_or_else(|| n.to_string()),
        other => other.to_string(),
    }
}

fn equals(value: &Value, literal: &Literal) -> bool {
    match literal {
        Literal::Number(expected) => as_number(value) == Some(*expected),
        Literal::Text(expected) => as_text(value) == *expected,
    }
}

/// Whether a property value passes a filter.
pub fn matches(operator: &Operator, value: Option<&Value>) -> bool {
    match (operator, value) {
        (Operator::IsSet, value) => value.is_some(),
        (Operator::IsNotSet, value) => value.is_none(),
        (Operator::Neq(literals), Some(value)) => !literals.iter().any(|l| equals(value, l)),
        (Operator::Neq(_), None) => true,
        (_, None) => false,
        (Operator::Eq(literals), Some(value)) => literals.iter().any(|l| equals(value, l)),
        (Operator::Contains(needle), Some(value)) => {
            as_text(value).to_lowercase().contains(needle.as_str())
        }
        (Operator::Regex(regex), Some(value)) => regex.is_match(&as_text(value)),
        (Operator::Gt(bound), Some(value)) => as_number(value).is_some_and(|n| n > *bound),
        (Operator::Lt(bound), Some(value)) => as_number(value).is_some_and(|n| n < *bound),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn numbers_compare_as_numbers_whatever_their_spelling() {
        for text in ["12.5", "\"12.5\"", "1.25e1", "\" 12.5 \""] {
            let value = parse_value(Some(text)).unwrap();
            assert!(matches(&Operator::Gt(10.0), Some(&value)), "{text}");
            assert!(!matches(&Operator::Lt(10.0), Some(&value)), "{text}");
            assert!(
                matches(&Operator::Eq(vec![Literal::Number(12.5)]), Some(&value)),
                "{text}"
            );
        }
        // "9" < "10" as numbers, though not as text.
        let nine = json!("9");
        assert!(matches(&Operator::Lt(10.0), Some(&nine)));
        assert!(!matches(&Operator::Gt(1.0), Some(&json!("many"))));
        assert!(!matches(&Operator::Gt(1.0), Some(&json!("NaN"))));
    }

    #[test]
    fn text_forms_are_canonical() {
        assert_eq!(as_text(&parse_value(Some("1.0")).unwrap()), "1");
        assert_eq!(as_text(&parse_value(Some("1e3")).unwrap()), "1000");
        assert_eq!(as_text(&parse_value(Some("0.1")).unwrap()), "0.1");
        assert_eq!(
            as_text(&parse_value(Some("{\"b\": [1, 2.50], \"a\": true}")).unwrap()),
            "{\"a\":true,\"b\":[1,2.5]}"
        );
        assert_eq!(parse_value(Some("null")), None);
        assert_eq!(parse_value(None), None);
    }

    #[test]
    fn unset_properties_match_only_neq_and_is_not_set() {
        let eq = Operator::Eq(vec![Literal::Text("x".into())]);
        let neq = Operator::Neq(vec![Literal::Text("x".into())]);
        assert!(!matches(&eq, None));
        assert!(matches(&neq, None));
        assert!(matches(&Operator::IsNotSet, None));
        assert!(!matches(&Operator::IsSet, None));
        assert!(!matches(&Operator::Contains("x".into()), None));
        assert!(matches(
            &Operator::Contains("chr".into()),
            Some(&json!("Chrome"))
        ));
        assert!(matches(&eq, Some(&json!("x"))));
        assert!(matches(
            &Operator::Eq(vec![Literal::Text("true".into())]),
            Some(&json!(true))
        ));
    }
}
