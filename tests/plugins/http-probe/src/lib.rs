//! Fetches the URL named by the event's `url` property and writes what
//! happened into the event: `status` and `body` on a response, `http_error`
//! when the host refused or failed the request. Refusals must arrive as
//! typed errors, never as traps.

use sluice_plugin_sdk::http::Request;
use sluice_plugin_sdk::{EventRef, Outcome, Plugin, Result, Value, register_plugin};

struct HttpProbe;

impl Plugin for HttpProbe {
    type Config = Value;

    fn new(_config: Value) -> Result<Self> {
        Ok(HttpProbe)
    }

    fn transform(&mut self, event: &mut EventRef<'_>) -> Result<Outcome> {
        let url: String = event.property("url")?.unwrap_or_default();
        match Request::get(url).send() {
            Ok(response) => {
                event.set_property("status", response.status)?;
                event.set_property("body", String::from_utf8_lossy(&response.body))?;
            }
            Err(err) => event.set_property("http_error", err.to_string())?,
        }
        Ok(Outcome::Keep)
    }
}

register_plugin!(HttpProbe);
