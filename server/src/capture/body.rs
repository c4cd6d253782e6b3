//! A capture request's body: read within a time bound, then decoded (gzip,
//! form `data=` base64) and parsed as JSON. Small bodies are parsed where
//! the request runs; large ones on the blocking pool, a few at a time, so
//! a stream of 20 MiB bodies cannot stall the async runtime every other
//! request (and every other project) runs on.

use std::collections::HashMap;
use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, header};
use base64::Engine;
use serde_json::Value;
use tokio::sync::Semaphore;

use super::CaptureError;

/// Decoded bytes up to which a body is parsed on the async runtime: tens
/// of microseconds of work, less than a trip to the blocking pool costs.
/// The bound is on the decoded size, so a small gzip body that inflates
/// past it is started again off the runtime, at the cost of at most this
/// much inflating done twice.
const INLINE_BYTES: usize = 64 << 10;

/// Reads the whole body, up to `limit` bytes, within `timeout`: a client
/// that sends its body a byte at a time (slowloris) must not hold one of
/// capture's request slots for longer.
pub(super) async fn read(
    body: Body,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, CaptureError> {
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(_)) => Err(CaptureError::TooLarge { limit }),
        Err(_) => Err(CaptureError::BodyTimeout {
            seconds: timeout.as_secs_f64(),
        }),
    }
}

/// Memory the parsed JSON of one body may take, per byte of its decoded
/// text, on top of [`PARSE_FLOOR`]: ordinary event batches take 5 to 18
/// times their text (the most for many tiny events), nested arrays 70.
const PARSE_FACTOR: usize = 24;

/// Memory any body may take to parse, however small.
const PARSE_FLOOR: usize = 1 << 20;

/// Memory all large bodies being parsed at once may take, in MiB.
const PARSE_MEMORY_MIB: u32 = 256;

/// A refused body whose parse could have taken this much memory (MiB)
/// gives what it freed back to the system; see [`release_freed_memory`].
const TRIM_AFTER_MIB: u32 = 16;

/// Gives freed heap memory back to the system where the allocator is
/// glibc's, as in the tests and in programs that embed the server. glibc
/// keeps what a thread freed in that thread's arena for reuse, and parses
/// run on whichever blocking thread is free: a stream of refused 20 MiB
/// bodies of nested arrays left a gigabyte resident across arenas, though
/// nothing was live. Only refused large bodies pay for it (a few
/// milliseconds); an accepted one's memory is reused by the next. The
/// `sluice` binary allocates with mimalloc, which gives freed pages back by
/// itself, and there this finds next to nothing to do.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of the allocator's own
    // arenas to the system; it touches no memory in use.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// What parsing a body of `decoded` bytes may take.
fn parse_budget(decoded: usize) -> usize {
    (decoded.saturating_mul(PARSE_FACTOR) + PARSE_FLOOR).min((PARSE_MEMORY_MIB as usize) << 20)
}

/// Where large bodies are parsed: the blocking pool, behind a permit per
/// core, so parsing uses the cores and no more while requests wait for a
/// permit (within the request's time bound) instead of piling up threads;
/// and within a shared memory budget, so that however many large bodies
/// arrive at once, their parsed trees take at most [`PARSE_MEMORY_MIB`].
#[derive(Clone)]
pub struct Parsers {
    permits: Arc<Semaphore>,
    /// MiB of [`PARSE_MEMORY_MIB`].
    memory: Arc<Semaphore>,
}

impl Default for Parsers {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Parsers {
            permits: Arc::new(Semaphore::new(cores)),
            memory: Arc::new(Semaphore::new(PARSE_MEMORY_MIB as usize)),
        }
    }
}

impl Parsers {
    /// The body as JSON.
    pub async fn parse(
        &self,
        headers: &HeaderMap,
        query: &HashMap<String, String>,
        bytes: Bytes,
        limit: usize,
    ) -> Result<Value, CaptureError> {
        let framing = Framing::of(headers, query);
        if bytes.len() <= INLINE_BYTES
            && let Some(value) = decode(&framing, &bytes, limit, INLINE_BYTES.min(limit))?
        {
            return Ok(value);
        }
        // A gzip body's decoded size is known only once inflated: it takes
        // what the largest decoded body may.
        let decoded = if framing.may_expand(&bytes) {
            limit
        } else {
            bytes.len()
        };
        let memory = parse_budget(decoded);
        let mib = memory.div_ceil(1 << 20).min(PARSE_MEMORY_MIB as usize) as u32;
        let reserved = self
            .memory
            .clone()
            .acquire_many_owned(mib)
            .await
            .expect("the parsers' semaphores are never closed");
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the parsers' semaphores are never closed");
        let decoded = tokio::task::spawn_blocking(move || {
            let _held = (permit, reserved);
            let decoded = decode(&framing, &bytes, limit, limit);
            if decoded.is_err() && mib >= TRIM_AFTER_MIB {
                release_freed_memory();
            }
            decoded
        })
        .await;
        match decoded {
            Ok(decoded) => Ok(decoded?.expect("with the whole limit to use, decoding finishes")),
            Err(err) => std::panic::resume_unwind(err.into_panic()),
        }
    }
}

/// How the request says its body is encoded. PostHog's SDKs put it in
/// the query (`?compression=gzip-js`, `lz64`), in the form beside `data`
/// (older posthog-js), or in `Content-Encoding`.
struct Framing {
    /// `Content-Encoding: gzip`: the body must be gzip.
    gzip_encoded: bool,
    /// `compression=gzip-js` or `gzip`: a hint only, since posthog-js 1.78
    /// says it while sending a form of plain base64 JSON, which PostHog
    /// stores; the bytes decide.
    gzip_hinted: bool,
    /// `compression=lz64`: the form's `data` is LZ-string base64.
    lz64: bool,
    form: bool,
}

impl Framing {
    fn of(headers: &HeaderMap, query: &HashMap<String, String>) -> Framing {
        let text = |name| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
        };
        let compression = query.get("compression").map(String::as_str).unwrap_or("");
        Framing {
            gzip_encoded: text(header::CONTENT_ENCODING).contains("gzip"),
            gzip_hinted: compression.starts_with("gzip"),
            lz64: compression == "lz64",
            form: text(header::CONTENT_TYPE).starts_with("application/x-www-form-urlencoded"),
        }
    }

    /// Whether the decoded size may be larger than the body's.
    fn may_expand(&self, bytes: &[u8]) -> bool {
        self.gzip_encoded || self.gzip_hinted || self.lz64 || self.form || is_gzip(bytes)
    }
}

fn is_gzip(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0x1f, 0x8b])
}

/// The inflated bytes, or `None` once they pass `budget`; past `limit`
/// they are refused.
fn gunzip(bytes: &[u8], limit: usize, budget: usize) -> Result<Option<Vec<u8>>, CaptureError> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .take(budget as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|err| CaptureError::Invalid(format!("the body is not valid gzip: {err}")))?;
    if out.len() <= budget {
        Ok(Some(out))
    } else if budget >= limit {
        Err(CaptureError::TooLarge { limit })
    } else {
        Ok(None)
    }
}

/// Decodes and parses a body, or gives up (`None`) once the decoded bytes
/// pass `budget`, which is below `limit` when the work is done inline.
fn decode(
    framing: &Framing,
    bytes: &[u8],
    limit: usize,
    budget: usize,
) -> Result<Option<Value>, CaptureError> {
    let mut bytes = if is_gzip(bytes) {
        match gunzip(bytes, limit, budget)? {
            Some(inflated) => inflated,
            None => return Ok(None),
        }
    } else if framing.gzip_encoded {
        return Err(CaptureError::Invalid(
            "the request says `Content-Encoding: gzip`, but the body is not gzip (it does not start with the bytes 1f 8b); send it compressed or drop the header".into(),
        ));
    } else {
        bytes.to_vec()
    };
    // `curl -d '{...}'` labels JSON as a form: trust the bytes over the label.
    let looks_like_json = bytes
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'{' || *b == b'[');
    if (framing.form && !looks_like_json) || bytes.starts_with(b"data=") {
        let fields: HashMap<String, String> = form_urlencoded::parse(&bytes).into_owned().collect();
        let data = fields.get("data").ok_or_else(|| {
            CaptureError::Invalid("a form body needs a `data` field holding base64 JSON".into())
        })?;
        // A `+` the client did not percent-encode reads as a space; a
        // space is never part of either encoding.
        let data = data.trim().replace(' ', "+");
        let lz64 = framing.lz64 || fields.get("compression").is_some_and(|c| c == "lz64");
        let decoded = if lz64 {
            lz64_text(&data, limit, budget)?.map(String::into_bytes)
        } else {
            base64_gunzip(&data, limit, budget)?
        };
        bytes = match decoded {
            Some(bytes) => bytes,
            None => return Ok(None),
        };
    } else if framing.lz64 && !looks_like_json {
        let text = std::str::from_utf8(&bytes).map_err(|_| {
            CaptureError::Invalid("a `compression=lz64` body must be LZ-string base64 text".into())
        })?;
        bytes = match lz64_text(text, limit, budget)? {
            Some(text) => text.into_bytes(),
            None => return Ok(None),
        };
    }
    parse_json(&bytes).map(Some)
}

/// The form field `data` as base64, inflated if it holds gzip; `None`
/// once past `budget`.
fn base64_gunzip(data: &str, limit: usize, budget: usize) -> Result<Option<Vec<u8>>, CaptureError> {
    let trimmed = data.trim_end_matches('=');
    let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(trimmed)
        .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(trimmed))
        .map_err(|err| {
            CaptureError::Invalid(format!("the form field `data` is not base64: {err}"))
        })?;
    if is_gzip(&bytes) {
        gunzip(&bytes, limit, budget)
    } else {
        Ok(Some(bytes))
    }
}

/// LZ-string base64 text decoded; `None` once past `budget`, refused past
/// `limit`. The decoder's budget is in two-byte units and covers its
/// dictionary too, about as large as the text.
fn lz64_text(data: &str, limit: usize, budget: usize) -> Result<Option<String>, CaptureError> {
    match super::lz64::decompress(data, budget) {
        Ok(text) => Ok(Some(text)),
        Err(super::lz64::Lz64Error::TooLarge) if budget < limit => Ok(None),
        Err(super::lz64::Lz64Error::TooLarge) => Err(CaptureError::TooLarge { limit }),
        Err(super::lz64::Lz64Error::Invalid(why)) => Err(CaptureError::Invalid(format!(
            "the body says `compression=lz64`, but it is not LZ-string base64: {why}"
        ))),
    }
}

/// Deepest nesting of arrays and objects a body may have: serde_json's
/// own recursion limit, named in the error so a client knows what to fix.
const MAX_DEPTH: usize = 128;

fn parse_json(bytes: &[u8]) -> Result<Value, CaptureError> {
    let budget = parse_budget(bytes.len());
    match super::bounded::parse(bytes, budget) {
        Ok(value) => Ok(value),
        Err(Some(err)) if err.to_string().starts_with("recursion limit exceeded") => {
            Err(CaptureError::Invalid(format!(
                "the body nests arrays and objects deeper than {MAX_DEPTH} levels ({err}); flatten the properties"
            )))
        }
        Err(Some(err)) => Err(CaptureError::Invalid(format!(
            "the body is not valid JSON: {err}"
        ))),
        Err(None) => Err(CaptureError::TooComplex {
            budget_mib: budget.div_ceil(1 << 20),
        }),
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    fn plain() -> Framing {
        Framing {
            gzip_encoded: false,
            gzip_hinted: false,
            lz64: false,
            form: false,
        }
    }

    #[test]
    fn a_small_gzip_body_that_inflates_past_the_budget_is_left_for_the_blocking_pool() {
        let big = format!("[{}]", vec!["{\"event\":\"e\"}"; 10_000].join(","));
        let compressed = gzip(big.as_bytes());
        assert!(compressed.len() < INLINE_BYTES);
        assert!(matches!(
            decode(&plain(), &compressed, 20 << 20, INLINE_BYTES),
            Ok(None)
        ));
        let value = decode(&plain(), &compressed, 20 << 20, 20 << 20)
            .unwrap()
            .unwrap();
        assert_eq!(value.as_array().unwrap().len(), 10_000);
        assert!(matches!(
            decode(&plain(), &compressed, 1_000, 1_000),
            Err(CaptureError::TooLarge { limit: 1_000 })
        ));
    }

    #[tokio::test]
    async fn large_and_small_bodies_parse_the_same() {
        let parsers = Parsers::default();
        let (headers, query) = (HeaderMap::new(), HashMap::new());
        for n in [1, 10_000] {
            let body = format!("[{}]", vec!["{\"event\":\"e\"}"; n].join(","));
            let value = parsers
                .parse(&headers, &query, Bytes::from(body), 20 << 20)
                .await
                .unwrap();
            assert_eq!(value.as_array().unwrap().len(), n);
        }
        let err = parsers
            .parse(&headers, &query, Bytes::from(vec![b'x'; 100_000]), 20 << 20)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not valid JSON"), "{err}");
    }

    fn framing(gzip_encoded: bool, gzip_hinted: bool, lz64: bool, form: bool) -> Framing {
        Framing {
            gzip_encoded,
            gzip_hinted,
            lz64,
            form,
        }
    }

    proptest::proptest! {
        /// Whatever the bytes and however they are labelled, decoding
        /// answers (a value, or an error) and never panics, and it never
        /// returns more than the limit allowed.
        #[test]
        fn any_body_is_decoded_or_refused(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..2_000),
            labels in (proptest::bool::ANY, proptest::bool::ANY, proptest::bool::ANY, proptest::bool::ANY),
        ) {
            let framing = framing(labels.0, labels.1, labels.2, labels.3);
            let _ = decode(&framing, &bytes, 4_096, 4_096);
            let mut form = b"data=".to_vec();
            form.extend_from_slice(&bytes);
            let _ = decode(&framing, &form, 4_096, 4_096);
        }

        /// A JSON body reads the same plain, gzipped, as a base64 form, as
        /// a base64 form of gzip, and as an LZ-string form.
        #[test]
        fn every_encoding_of_a_body_reads_the_same(
            events in proptest::collection::vec(("[a-z$]{1,12}", "\\PC{0,20}", proptest::num::i64::ANY), 1..20),
        ) {
            let value = serde_json::Value::Array(
                events
                    .iter()
                    .map(|(name, id, n)| serde_json::json!({"event": name, "distinct_id": id, "properties": {"n": n}}))
                    .collect(),
            );
            let text = value.to_string();
            let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
            let as_form = |data: &str| {
                form_urlencoded::Serializer::new(String::new())
                    .append_pair("data", data)
                    .finish()
                    .into_bytes()
            };
            let limit = 1 << 20;
            let plain = decode(&framing(false, false, false, false), text.as_bytes(), limit, limit);
            proptest::prop_assert_eq!(plain.unwrap().unwrap(), value.clone());
            for (framing, body) in [
                (framing(true, false, false, false), gzip(text.as_bytes())),
                (framing(false, true, false, true), as_form(&b64(text.as_bytes()))),
                (framing(false, true, false, true), as_form(&b64(&gzip(text.as_bytes())))),
                (framing(false, false, true, true), as_form(&lz_str::compress_to_base64(&text))),
            ] {
                let decoded = decode(&framing, &body, limit, limit).unwrap().unwrap();
                proptest::prop_assert_eq!(&decoded, &value);
            }
        }
    }
}
