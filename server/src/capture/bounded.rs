//! JSON parsed within a memory budget. A `serde_json::Value` tree can take
//! seventy times the bytes of its text (`[[[[1]]]]` makes a heap
//! allocation per bracket), so a 20 MiB body of nested arrays grew the
//! server by more than a gigabyte. This parser builds the same `Value`
//! while charging an estimate of each node's memory to a budget, and stops
//! with an error once the budget is spent.

use std::cell::Cell;
use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// What one value costs besides its text, as measured with the system
/// allocator: the `Value` itself, and for containers their first
/// allocation with its overhead (a vector starts at room for four) and,
/// for objects, the ordered map's index.
const SCALAR: usize = 32;
const STRING: usize = 48;
const ARRAY: usize = 192;
const OBJECT: usize = 256;
const OBJECT_ENTRY: usize = 80;

/// Parses `bytes` as JSON, or fails once the tree would take more than
/// `budget` bytes; `Err(None)` for the budget, `Err(Some(_))` for bad JSON.
pub fn parse(bytes: &[u8], budget: usize) -> Result<Value, Option<serde_json::Error>> {
    let left = Cell::new(budget);
    let over = Cell::new(false);
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let parsed = Node {
        left: &left,
        over: &over,
    }
    .deserialize(&mut deserializer)
    .and_then(|value| deserializer.end().map(|()| value));
    match parsed {
        Ok(value) => Ok(value),
        Err(_) if over.get() => Err(None),
        Err(err) => Err(Some(err)),
    }
}

#[derive(Clone, Copy)]
struct Node<'a> {
    left: &'a Cell<usize>,
    over: &'a Cell<bool>,
}

impl Node<'_> {
    fn charge<E: de::Error>(&self, bytes: usize) -> Result<(), E> {
        match self.left.get().checked_sub(bytes) {
            Some(left) => {
                self.left.set(left);
                Ok(())
            }
            None => {
                self.over.set(true);
                Err(E::custom("over the memory budget"))
            }
        }
    }
}

impl<'de> DeserializeSeed<'de> for Node<'_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Node<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        self.charge(SCALAR)?;
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        self.charge(SCALAR)?;
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        self.charge(SCALAR)?;
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        self.charge(SCALAR)?;
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        self.charge(STRING + v.len())?;
        Ok(Value::String(v.to_string()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        self.charge(STRING + v.len())?;
        Ok(Value::String(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        self.charge(SCALAR)?;
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        self.visit_unit()
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.charge(ARRAY)?;
        let mut values = Vec::new();
        while let Some(value) = seq.next_element_seed(self)? {
            values.push(value);
        }
        Ok(Value::Array(values))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        self.charge(OBJECT)?;
        let mut values = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            self.charge(OBJECT_ENTRY + key.len())?;
            let value = map.next_value_seed(self)?;
            values.insert(key, value);
        }
        Ok(Value::Object(values))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_reads_what_serde_json_reads() {
        let text = r#"{"a": [1, -2, 3.5, "x", null, true, {"b": {}}], "c": "\u00e9", "big": 18446744073709551615}"#;
        let ours = parse(text.as_bytes(), 1 << 20).unwrap();
        let theirs: Value = serde_json::from_str(text).unwrap();
        assert_eq!(ours, theirs);
        assert_eq!(
            serde_json::to_string(&ours).unwrap(),
            serde_json::to_string(&theirs).unwrap(),
            "the same order of keys"
        );
    }

    #[test]
    fn nested_arrays_stop_at_the_budget_and_bad_json_is_still_bad_json() {
        let bomb = format!("[{}]", vec!["[[[[[[[[1]]]]]]]]"; 10_000].join(","));
        assert!(matches!(parse(bomb.as_bytes(), 24 * bomb.len()), Err(None)));
        assert!(parse(bomb.as_bytes(), 1 << 30).is_ok());
        assert!(matches!(parse(b"{\"a\": ", 1 << 20), Err(Some(_))));
        assert!(matches!(parse(b"{} {}", 1 << 20), Err(Some(_))));
    }

    #[test]
    fn ordinary_events_fit_in_a_few_times_their_text() {
        let event = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../tests/fixtures/event-1k.json"),
        )
        .unwrap();
        let batch = format!("[{}]", vec![event.as_str(); 1000].join(","));
        assert!(parse(batch.as_bytes(), 8 * batch.len()).is_ok());
        let tiny = format!(
            "[{}]",
            vec![r#"{"event":"a","distinct_id":"b","properties":{"x":1}}"#; 10_000].join(",")
        );
        assert!(parse(tiny.as_bytes(), 24 * tiny.len()).is_ok());
    }
}
