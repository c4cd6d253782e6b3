//! What the batched event calls of `sluice:plugin@0.2.0` do to an event's
//! properties: `edit`, `leaves` and `replace-leaves`. The Sluice host and
//! the SDK's mock host both call these functions, so a plugin's native tests
//! see exactly what the host will do.

use serde_json::{Map, Value};

/// One change, as `edit` applies it. See `property-change` in
/// `wit/v0.2.0/event.wit`.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// `set`, or `set-if-absent` when `only_if_absent`.
    Set {
        /// Where the value goes; never empty.
        path: Vec<String>,
        /// The value.
        value: Value,
        /// Keep a value already there.
        only_if_absent: bool,
    },
    /// `remove`.
    Remove(Vec<String>),
    /// `remove-everywhere`.
    RemoveEverywhere(String),
    /// `rename`.
    Rename {
        /// Where the member is now; never empty.
        path: Vec<String>,
        /// Its new key in the same object.
        to: String,
    },
}

/// Applies one change; returns whether it took effect.
pub fn apply(properties: &mut Map<String, Value>, change: &Change) -> bool {
    match change {
        Change::Set {
            path,
            value,
            only_if_absent,
        } => {
            let Some((key, parents)) = path.split_last() else {
                return false;
            };
            let Some(object) = object_at(properties, parents, true) else {
                return false;
            };
            if *only_if_absent && object.contains_key(key) {
                return false;
            }
            object.insert(key.clone(), value.clone());
            true
        }
        Change::Remove(path) => {
            let Some((key, parents)) = path.split_last() else {
                return false;
            };
            object_at(properties, parents, false)
                .and_then(|object| object.shift_remove(key))
                .is_some()
        }
        Change::RemoveEverywhere(key) => remove_everywhere(properties, key),
        Change::Rename { path, to } => {
            let Some((key, parents)) = path.split_last() else {
                return false;
            };
            let Some(object) = object_at(properties, parents, false) else {
                return false;
            };
            if key == to {
                return object.contains_key(key);
            }
            match object.shift_remove(key) {
                Some(value) => {
                    object.insert(to.clone(), value);
                    true
                }
                None => false,
            }
        }
    }
}

/// The top-level members `change` may alter, looked up before it is
/// applied: what must be kept to undo it.
pub fn roots_of(properties: &Map<String, Value>, change: &Change) -> Vec<String> {
    match change {
        Change::Set { path, .. } | Change::Remove(path) => {
            path.first().cloned().into_iter().collect()
        }
        Change::Rename { path, to } => match path.as_slice() {
            [key] => vec![key.clone(), to.clone()],
            _ => path.first().cloned().into_iter().collect(),
        },
        Change::RemoveEverywhere(key) => properties
            .iter()
            .filter(|(member, value)| *member == key || contains_key(value, key))
            .map(|(member, _)| member.clone())
            .collect(),
    }
}

fn contains_key(value: &Value, key: &str) -> bool {
    match value {
        Value::Object(object) => object
            .iter()
            .any(|(member, value)| member == key || contains_key(value, key)),
        Value::Array(items) => items.iter().any(|item| contains_key(item, key)),
        _ => false,
    }
}

/// The object at `path`, creating missing objects on the way if `create`.
/// `None` if something on the way is not an object.
fn object_at<'a>(
    mut object: &'a mut Map<String, Value>,
    path: &[String],
    create: bool,
) -> Option<&'a mut Map<String, Value>> {
    for key in path {
        if create && !object.contains_key(key) {
            object.insert(key.clone(), Value::Object(Map::new()));
        }
        object = object.get_mut(key)?.as_object_mut()?;
    }
    Some(object)
}

fn remove_everywhere(object: &mut Map<String, Value>, key: &str) -> bool {
    let mut removed = object.shift_remove(key).is_some();
    for value in object.values_mut() {
        removed |= remove_in_value(value, key);
    }
    removed
}

fn remove_in_value(value: &mut Value, key: &str) -> bool {
    match value {
        Value::Object(object) => remove_everywhere(object, key),
        Value::Array(items) => items
            .iter_mut()
            .fold(false, |removed, item| remove_in_value(item, key) | removed),
        _ => false,
    }
}

/// Numbers per leaf in what [`leaves`] returns: key start, key length,
/// value start, value length, 1 for a string or 0 for JSON.
pub const LEAF_FIELDS: usize = 5;

/// Every string, number and boolean in `properties` in depth-first order,
/// members named in `whole` taken whole: the text they point into, and
/// [`LEAF_FIELDS`] numbers per leaf.
pub fn leaves(properties: &Map<String, Value>, whole: &[String]) -> (String, Vec<u32>) {
    let mut walk = Walk {
        text: String::with_capacity(1024),
        leaves: Vec::with_capacity(32 * LEAF_FIELDS),
        whole,
    };
    walk.object(properties);
    (walk.text, walk.leaves)
}

struct Walk<'w> {
    text: String,
    leaves: Vec<u32>,
    whole: &'w [String],
}

impl Walk<'_> {
    fn object(&mut self, object: &Map<String, Value>) {
        for (key, value) in object {
            if value.is_null() {
                continue;
            }
            let taken_whole = self.whole.iter().any(|name| name == key);
            let key_start = self.text.len() as u32;
            self.text.push_str(key);
            let key = (key_start, key.len() as u32);
            match value {
                Value::String(text) if taken_whole => self.push(key, text, true),
                other if taken_whole => {
                    let json = other.to_string();
                    self.push(key, &json, false);
                }
                other => self.value(key, other),
            }
        }
    }

    fn value(&mut self, key: (u32, u32), value: &Value) {
        match value {
            Value::Null => {}
            Value::String(text) => self.push(key, text, true),
            Value::Bool(flag) => self.push(key, if *flag { "true" } else { "false" }, false),
            Value::Number(number) => {
                let json = number.to_string();
                self.push(key, &json, false);
            }
            Value::Array(items) => items.iter().for_each(|item| self.value(key, item)),
            Value::Object(object) => self.object(object),
        }
    }

    fn push(&mut self, (key_start, key_len): (u32, u32), value: &str, is_string: bool) {
        let value_start = self.text.len() as u32;
        self.text.push_str(value);
        self.leaves.extend([
            key_start,
            key_len,
            value_start,
            value.len() as u32,
            is_string as u32,
        ]);
    }
}

/// Replaces the leaves [`leaves`] found (with the same `whole`) at the
/// given indexes by strings. Refused, with nothing changed, if an index is
/// past the last leaf; of two replacements of one leaf the last wins.
pub fn replace_leaves(
    properties: &mut Map<String, Value>,
    whole: &[String],
    mut replacements: Vec<(u32, String)>,
) -> Result<(), String> {
    if replacements.is_empty() {
        return Ok(());
    }
    // Stable, so the last of two replacements of one leaf comes last.
    replacements.sort_by_key(|(index, _)| *index);
    let last = replacements.last().map(|(index, _)| *index).unwrap_or(0);
    let count = count_leaves(properties, whole);
    if last >= count {
        return Err(format!(
            "leaf {last} does not exist: the properties have {count} leaves"
        ));
    }
    let mut replace = Replace {
        whole,
        next: 0,
        pending: replacements.into_iter().peekable(),
    };
    replace.object(properties);
    Ok(())
}

/// The top-level members holding the leaves at `indexes` (ascending), as
/// [`leaves`] numbers them: what must be kept to undo [`replace_leaves`].
pub fn leaf_roots(
    properties: &Map<String, Value>,
    whole: &[String],
    indexes: &[u32],
) -> Vec<String> {
    let mut roots = Vec::new();
    let mut first = 0;
    let mut wanted = indexes.iter().peekable();
    for (key, value) in properties {
        let count = match value {
            Value::Null => 0,
            _ if whole.iter().any(|name| name == key) => 1,
            value => count_in_value(value, whole),
        };
        let end = first + count;
        let mut holds = false;
        while wanted.next_if(|index| **index < end).is_some() {
            holds = true;
        }
        if holds {
            roots.push(key.clone());
        }
        if wanted.peek().is_none() {
            break;
        }
        first = end;
    }
    roots
}

fn count_leaves(object: &Map<String, Value>, whole: &[String]) -> u32 {
    object
        .iter()
        .map(|(key, value)| match value {
            Value::Null => 0,
            _ if whole.iter().any(|name| name == key) => 1,
            value => count_in_value(value, whole),
        })
        .sum()
}

fn count_in_value(value: &Value, whole: &[String]) -> u32 {
    match value {
        Value::Null => 0,
        Value::Array(items) => items.iter().map(|item| count_in_value(item, whole)).sum(),
        Value::Object(object) => count_leaves(object, whole),
        _ => 1,
    }
}

struct Replace<'w, I: Iterator<Item = (u32, String)>> {
    whole: &'w [String],
    next: u32,
    pending: std::iter::Peekable<I>,
}

impl<I: Iterator<Item = (u32, String)>> Replace<'_, I> {
    fn object(&mut self, object: &mut Map<String, Value>) {
        for (key, value) in object.iter_mut() {
            if self.pending.peek().is_none() {
                return;
            }
            if value.is_null() {
                continue;
            }
            if self.whole.iter().any(|name| name == key) {
                self.leaf(value);
            } else {
                self.value(value);
            }
        }
    }

    fn value(&mut self, value: &mut Value) {
        match value {
            Value::Null => {}
            Value::Array(items) => items.iter_mut().for_each(|item| self.value(item)),
            Value::Object(object) => self.object(object),
            leaf => self.leaf(leaf),
        }
    }

    fn leaf(&mut self, value: &mut Value) {
        let index = self.next;
        self.next += 1;
        while let Some((_, text)) = self.pending.next_if(|(at, _)| *at == index) {
            *value = Value::String(text);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => unreachable!(),
        }
    }

    fn path(keys: &[&str]) -> Vec<String> {
        keys.iter().map(|k| k.to_string()).collect()
    }

    #[test]
    fn set_creates_missing_objects_and_set_if_absent_keeps_what_is_there() {
        let mut props = map(json!({"a": 1, "s": "x"}));
        let set = |keys: &[&str], value: Value, only_if_absent| Change::Set {
            path: path(keys),
            value,
            only_if_absent,
        };
        assert!(apply(
            &mut props,
            &set(&["$set", "plan"], json!("pro"), false)
        ));
        assert!(!apply(&mut props, &set(&["a"], json!(2), true)));
        assert!(apply(&mut props, &set(&["b"], json!(null), true)));
        assert!(
            !apply(&mut props, &set(&["b"], json!(3), true)),
            "null counts as set"
        );
        assert!(
            !apply(&mut props, &set(&["s", "inner"], json!(1), false)),
            "s is a string"
        );
        assert!(!apply(&mut props, &set(&[], json!(1), false)));
        assert_eq!(
            Value::Object(props),
            json!({"a": 1, "s": "x", "$set": {"plan": "pro"}, "b": null})
        );
    }

    #[test]
    fn rename_keeps_the_value_and_replaces_the_target() {
        let mut props = map(
            json!({"plan": "pro", "x": 1, "$set": {"plan": "team", "subscription_plan": "old"}}),
        );
        let rename = |keys: &[&str], to: &str| Change::Rename {
            path: path(keys),
            to: to.into(),
        };
        assert!(apply(&mut props, &rename(&["plan"], "subscription_plan")));
        assert!(apply(
            &mut props,
            &rename(&["$set", "plan"], "subscription_plan")
        ));
        assert!(!apply(&mut props, &rename(&["missing"], "y")));
        assert!(!apply(&mut props, &rename(&["$set_once", "plan"], "y")));
        assert_eq!(
            Value::Object(props),
            json!({"x": 1, "$set": {"subscription_plan": "team"}, "subscription_plan": "pro"})
        );
    }

    #[test]
    fn remove_everywhere_reaches_nested_objects_and_arrays() {
        let mut props =
            map(json!({"phone": 1, "$set": {"phone": 2, "n": 1}, "list": [{"phone": 3}, "phone"]}));
        assert!(apply(&mut props, &Change::RemoveEverywhere("phone".into())));
        assert!(!apply(
            &mut props,
            &Change::RemoveEverywhere("phone".into())
        ));
        assert!(apply(&mut props, &Change::Remove(path(&["$set", "n"]))));
        assert_eq!(
            Value::Object(props),
            json!({"$set": {}, "list": [{}, "phone"]})
        );
    }

    #[test]
    fn leaves_walk_depth_first_and_take_whole_members_whole() {
        let props = map(json!({
            "a": "x\"y",
            "n": 1.5,
            "z": null,
            "list": ["p", true, null, {"k": "q"}],
            "email": {"home": "h@example.com"},
        }));
        let whole = path(&["email"]);
        let (text, spans) = leaves(&props, &whole);
        let seen: Vec<(&str, &str, bool)> = spans
            .chunks(LEAF_FIELDS)
            .map(|s| {
                let key = &text[s[0] as usize..][..s[1] as usize];
                let value = &text[s[2] as usize..][..s[3] as usize];
                (key, value, s[4] == 1)
            })
            .collect();
        assert_eq!(
            seen,
            vec![
                ("a", "x\"y", true),
                ("n", "1.5", false),
                ("list", "p", true),
                ("list", "true", false),
                ("k", "q", true),
                ("email", r#"{"home":"h@example.com"}"#, false),
            ]
        );
    }

    #[test]
    fn replace_leaves_writes_strings_at_the_indexes_leaves_gave() {
        let mut props =
            map(json!({"a": "x", "list": ["p", 2, {"k": "q"}], "email": {"home": "h"}}));
        let whole = path(&["email"]);
        replace_leaves(
            &mut props,
            &whole,
            vec![(4, "hashed".into()), (0, "X".into()), (2, "two".into())],
        )
        .unwrap();
        assert_eq!(
            Value::Object(props.clone()),
            json!({"a": "X", "list": ["p", "two", {"k": "q"}], "email": "hashed"})
        );
        let err = replace_leaves(&mut props, &whole, vec![(5, "no".into())]).unwrap_err();
        assert!(err.contains("leaf 5 does not exist"), "{err}");
    }

    #[test]
    fn roots_name_every_top_level_member_a_change_may_alter() {
        let props =
            map(json!({"a": 1, "b": {"phone": 1}, "c": [{"phone": 2}], "phone": 3, "d": "x"}));
        assert_eq!(
            roots_of(&props, &Change::RemoveEverywhere("phone".into())),
            vec!["b", "c", "phone"]
        );
        let rename = Change::Rename {
            path: path(&["a"]),
            to: "z".into(),
        };
        assert_eq!(roots_of(&props, &rename), vec!["a", "z"]);
        let nested = Change::Rename {
            path: path(&["b", "phone"]),
            to: "tel".into(),
        };
        assert_eq!(roots_of(&props, &nested), vec!["b"]);
        // Leaves: a=0, b.phone=1, c[0].phone=2, phone=3, d=4.
        assert_eq!(leaf_roots(&props, &[], &[1, 2, 4]), vec!["b", "c", "d"]);
        assert_eq!(leaf_roots(&props, &path(&["b"]), &[1]), vec!["b"]);
        assert!(leaf_roots(&props, &[], &[]).is_empty());
    }
}
