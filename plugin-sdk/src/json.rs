//! Helpers for reading JSON config, so a plugin can say exactly what is
//! wrong with a field instead of passing on serde's message.
//!
//! Take a field whose shape you check yourself as a [`Value`] in your
//! `Config`, then name what you got in the error:
//!
//! ```
//! use sluice_plugin_sdk::{Error, Result, Value, json};
//!
//! fn event_names(config: &Value) -> Result<Vec<String>> {
//!     let Value::Array(items) = config else {
//!         return Err(Error::msg(format!(
//!             "events must be a JSON array of event names; got {}",
//!             json::kind(config)
//!         )));
//!     };
//!     // …
//! #   Ok(Vec::new())
//! }
//!
//! let err = event_names(&json!("signed up")).unwrap_err();
//! assert_eq!(
//!     err.to_string(),
//!     "events must be a JSON array of event names; got the string \"signed up\""
//! );
//! ```

use serde_json::Value;

/// Strings longer than this are named only as "a string": an operator's
/// pasted blob or secret should not fill (or leak into) the message.
const QUOTED_STRING_CHARS: usize = 40;

/// Names a JSON value for an error message, such as `null`, `true`,
/// `the number 3`, `the string "pro"`, `a string` (when longer than 40
/// characters), `an array` or `an object`.
///
/// It reads at the end of a sentence: `"… must be a string, got {}"`.
pub fn kind(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) if s.chars().count() > QUOTED_STRING_CHARS => "a string".into(),
        Value::String(s) => format!("the string \"{s}\""),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_kind_of_value_is_named_the_way_messages_quote_it() {
        assert_eq!(kind(&json!(null)), "null");
        assert_eq!(kind(&json!(false)), "false");
        assert_eq!(kind(&json!(3)), "the number 3");
        assert_eq!(kind(&json!(2.5)), "the number 2.5");
        assert_eq!(kind(&json!("pro")), "the string \"pro\"");
        assert_eq!(kind(&json!([1])), "an array");
        assert_eq!(kind(&json!({"a": 1})), "an object");
    }

    #[test]
    fn only_short_strings_are_quoted() {
        let forty = "x".repeat(40);
        assert_eq!(kind(&json!(forty)), format!("the string \"{forty}\""));
        assert_eq!(kind(&json!("x".repeat(41))), "a string");
        // Characters, not bytes: 40 accented letters are still quoted.
        assert!(kind(&json!("é".repeat(40))).starts_with("the string"));
    }
}
