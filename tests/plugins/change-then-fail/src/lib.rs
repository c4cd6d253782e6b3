//! Changes an event through every kind of host call, then fails: the host
//! must hand the input back exactly as it was, for fail-open to pass on
//! and fail-closed to dead-letter, however much the plugin changed first.

use sluice_plugin_sdk::{
    EditPlan, Edits, EventRef, LeafValue, Outcome, Plugin, Result, Value, register_plugin,
};

struct ChangeThenFail {
    renames: EditPlan,
}

impl Plugin for ChangeThenFail {
    type Config = Value;

    fn new(_config: Value) -> Result<Self> {
        let mut renames = Edits::new();
        renames
            .rename(&["plan"], "subscription_plan")
            .rename(&["$set", "name"], "full_name")
            .remove_everywhere("secret");
        Ok(ChangeThenFail {
            renames: renames.plan()?,
        })
    }

    fn transform(&mut self, event: &mut EventRef<'_>) -> Result<Outcome> {
        let mode: Option<String> = event.property("mode")?;
        event.set_name("changed")?;
        event.set_distinct_id("someone-else")?;
        event.set_timestamp("2030-01-01T00:00:00Z")?;
        event.apply(&self.renames)?;
        let mut edits = Edits::new();
        edits
            .set(&["added"], true)?
            .set(&["$set_once", "first"], "x")?
            .remove(&["mode"]);
        event.edit(&edits)?;
        event.set_property("note", "overwritten")?;
        let leaves = event.leaves(&[]);
        let upper: Vec<(u32, String)> = leaves
            .iter()
            .filter_map(|leaf| match leaf.value {
                LeafValue::String(text) => Some((leaf.index, text.to_uppercase())),
                LeafValue::Json(_) => None,
            })
            .collect();
        event.replace_leaves(&[], upper)?;
        match mode.as_deref() {
            Some("error") => Err(sluice_plugin_sdk::Error::msg(
                "failed after changing everything",
            )),
            Some("panic") => panic!("trapped after changing everything"),
            Some("replace-all") => {
                let all = sluice_plugin_sdk::Map::new();
                event.set_properties(&all)?;
                Err(sluice_plugin_sdk::Error::msg(
                    "failed after replacing all properties",
                ))
            }
            _ => Ok(Outcome::Keep),
        }
    }
}

register_plugin!(ChangeThenFail);
