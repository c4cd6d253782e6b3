//! The s3 destination, built as a component and run by the real runtime
//! against two local S3s: moto (a real S3 emulator, installed from PyPI into
//! a throwaway virtualenv) for what lands in the bucket, and a small fake
//! that checks every request's SigV4 signature, which moto does not.

use crate::common;

use std::collections::{BTreeMap, VecDeque};
use std::io::Read as _;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use common::{install, runtime, wasm};
use flate2::read::GzDecoder;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sluice::runtime::{ExportFailure, ExportedEvent, PluginInstance, Policy};

const ACCESS_KEY_ID: &str = "AKIDSLUICETEST";
const SECRET: &str = "sluice/test+secret/KEY";
const BUCKET: &str = "sluice-events";
const EMPTY_HASH: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

fn exported(uuid: &str, timestamp: &str, name: &str, properties: Value) -> ExportedEvent {
    ExportedEvent {
        uuid: uuid.into(),
        name: name.into(),
        distinct_id: format!("user-{}", &uuid[uuid.len() - 2..]),
        person_id: Some(format!("person-{}", &uuid[uuid.len() - 2..])),
        timestamp: timestamp.into(),
        properties: properties.to_string(),
    }
}

/// The line the plugin must write for `event`.
fn line_for(event: &ExportedEvent) -> Value {
    json!({
        "uuid": event.uuid,
        "event": event.name,
        "distinct_id": event.distinct_id,
        "person_id": event.person_id,
        "timestamp": event.timestamp,
        "properties": serde_json::from_str::<Value>(&event.properties).unwrap(),
    })
}

fn s3_plugin(config: Value) -> PluginInstance {
    // Both S3s listen on loopback, which the operator must allow.
    let runtime = runtime(Policy {
        allow_loopback: true,
        ..Policy::default()
    });
    let plugin = runtime.load(&wasm("s3")).unwrap();
    plugin.install(install("s3", config)).unwrap()
}

fn gunzip(bytes: &[u8]) -> String {
    let mut text = String::new();
    GzDecoder::new(bytes)
        .read_to_string(&mut text)
        .expect("objects are gzip");
    text
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn hmac(key: &[u8], data: &str) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
    mac.update(data.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

/// SigV4 for S3, written apart from the plugin's so each checks the other:
/// the signature of `canonical_request` at `amz_date` in `region`.
fn sigv4_signature(secret: &str, amz_date: &str, region: &str, canonical_request: &str) -> String {
    let day = &amz_date[..8];
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{day}/{region}/s3/aws4_request\n{}",
        sha256_hex(canonical_request.as_bytes())
    );
    let key = hmac(format!("AWS4{secret}").as_bytes(), day);
    let key = hmac(&key, region);
    let key = hmac(&key, "s3");
    let key = hmac(&key, "aws4_request");
    hex::encode(hmac(&key, &to_sign))
}

/// Every `<name>` element's text.
fn xml_all(xml: &str, name: &str) -> Vec<String> {
    let (open, close) = (format!("<{name}>"), format!("</{name}>"));
    xml.split(&open)
        .skip(1)
        .map(|rest| rest.split(&close).next().unwrap().to_string())
        .collect()
}

/// A blocking request through reqwest on a throwaway runtime (the plugin
/// runtime blocks, so the test itself stays synchronous).
fn http(method: &str, url: &str, headers: &[(&str, String)], body: Vec<u8>) -> (u16, Vec<u8>) {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let mut request = reqwest::Client::new()
                .request(reqwest::Method::from_bytes(method.as_bytes()).unwrap(), url)
                .body(body);
            for (name, value) in headers {
                request = request.header(*name, value);
            }
            let response = request.send().await.expect("the S3 answers");
            let status = response.status().as_u16();
            (status, response.bytes().await.unwrap().to_vec())
        })
}

// ---------------------------------------------------------------------------
// moto

/// A `moto_server` process, killed when dropped (also when a test panics).
struct Moto {
    child: Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Moto {
    fn start() -> Moto {
        let dir = tempfile::tempdir().unwrap();
        let server = venv_with_moto(dir.path());
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(server)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server starts");
        let moto = Moto {
            child,
            base: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        };
        // Waiting for the port is not a timing assertion: the deadline only
        // turns a moto that never starts into a clear failure.
        let deadline = Instant::now() + Duration::from_secs(60);
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        while TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "moto_server did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        moto
    }

    /// Creates a bucket with a plain, unsigned PUT (us-east-1 needs no
    /// location constraint).
    fn create_bucket(&self, bucket: &str) {
        let (status, body) = http("PUT", &format!("{}/{bucket}", self.base), &[], Vec::new());
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    }

    /// A signed GET: moto refuses anonymous reads of private objects.
    fn get(&self, path: &str, query: &str) -> Vec<u8> {
        let amz_date = chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
        let host = self.base.trim_start_matches("http://");
        let canonical = format!(
            "GET\n{path}\n{query}\nhost:{host}\nx-amz-content-sha256:{EMPTY_HASH}\nx-amz-date:{amz_date}\n\nhost;x-amz-content-sha256;x-amz-date\n{EMPTY_HASH}"
        );
        let signature = sigv4_signature(SECRET, &amz_date, "us-east-1", &canonical);
        let authorization = format!(
            "AWS4-HMAC-SHA256 Credential={ACCESS_KEY_ID}/{}/us-east-1/s3/aws4_request, SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature={signature}",
            &amz_date[..8]
        );
        let url = if query.is_empty() {
            format!("{}{path}", self.base)
        } else {
            format!("{}{path}?{query}", self.base)
        };
        let (status, body) = http(
            "GET",
            &url,
            &[
                ("x-amz-content-sha256", EMPTY_HASH.into()),
                ("x-amz-date", amz_date),
                ("authorization", authorization),
            ],
            Vec::new(),
        );
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        body
    }

    /// Every key in the bucket, through ListObjectsV2.
    fn keys(&self, bucket: &str) -> Vec<String> {
        let xml = String::from_utf8(self.get(&format!("/{bucket}"), "list-type=2")).unwrap();
        assert_eq!(xml_all(&xml, "IsTruncated"), ["false"], "{xml}");
        xml_all(&xml, "Key")
    }

    fn object(&self, bucket: &str, key: &str) -> Vec<u8> {
        let path: String = key
            .split('/')
            .map(|segment| segment.replace('=', "%3D"))
            .collect::<Vec<_>>()
            .join("/");
        self.get(&format!("/{bucket}/{path}"), "")
    }
}

fn venv_with_moto(dir: &Path) -> std::path::PathBuf {
    common::python::venv(dir, &[common::python::MOTO]).join("moto_server")
}

/// The key's partition folder and its file name's `{uuid}-{count}` start.
fn split_key(key: &str) -> (&str, &str) {
    let (folder, file) = key.rsplit_once('/').unwrap();
    let digest_and_ext = file.rsplit_once('-').unwrap().1;
    assert_eq!(digest_and_ext.len(), 16 + ".ndjson.gz".len(), "{key}");
    assert!(
        digest_and_ext[..16].chars().all(|c| c.is_ascii_hexdigit()),
        "{key}"
    );
    assert!(digest_and_ext.ends_with(".ndjson.gz"), "{key}");
    (folder, &file[..file.len() - digest_and_ext.len() - 1])
}

#[test]
fn exports_batches_to_moto_as_hourly_gzip_ndjson_objects_that_retries_overwrite() {
    let moto = Moto::start();
    moto.create_bucket(BUCKET);
    let mut instance = s3_plugin(json!({
        "endpoint": moto.base,
        "region": "us-east-1",
        "bucket": BUCKET,
        "access_key_id": ACCESS_KEY_ID,
        "secret_access_key": SECRET,
        "prefix": "events",
    }));

    let first = vec![
        exported(
            "01890000-0000-7000-8000-000000000011",
            "2024-05-01T12:00:00.000Z",
            "signed up",
            json!({"plan": "pro", "seats": 5}),
        ),
        exported(
            "01890000-0000-7000-8000-000000000012",
            "2024-05-01T12:15:30.250Z",
            "paid",
            json!({"amount": 30.5, "currency": "EUR", "items": [{"sku": "a"}, {"sku": "b"}]}),
        ),
        exported(
            "01890000-0000-7000-8000-000000000013",
            "2024-05-01T12:59:59.999Z",
            "viewed page",
            json!({"url": "https://example.com/ü?x=1&y=2", "text": "line\nbreak \"quoted\""}),
        ),
    ];
    // Spans two days: two objects.
    let second = vec![
        exported(
            "01890000-0000-7000-8000-000000000021",
            "2024-05-01T23:30:00.000Z",
            "a",
            json!({}),
        ),
        exported(
            "01890000-0000-7000-8000-000000000023",
            "2024-05-02T00:10:00.000Z",
            "b",
            json!({"n": 1}),
        ),
        exported(
            "01890000-0000-7000-8000-000000000022",
            "2024-05-01T23:45:00.000Z",
            "c",
            json!({"n": 2}),
        ),
        exported(
            "01890000-0000-7000-8000-000000000024",
            "2024-05-02T00:20:00.000Z",
            "d",
            json!({"nested": {"deep": [1, null, true]}}),
        ),
    ];
    let mut anonymous = exported(
        "01890000-0000-7000-8000-000000000031",
        "2024-05-03T08:00:00.000Z",
        "anonymous visit",
        json!({"$browser": "Firefox"}),
    );
    anonymous.person_id = None;
    let third = vec![anonymous];

    instance.export(first.clone()).expect("first batch stored");
    instance
        .export(second.clone())
        .expect("second batch stored");
    instance.export(third.clone()).expect("third batch stored");

    // Each object's lines, in batch order, by its partition and name start.
    let expected: BTreeMap<(&str, &str), Vec<&ExportedEvent>> = BTreeMap::from([
        (
            (
                "events/dt=2024-05-01/hour=12",
                "01890000-0000-7000-8000-000000000011-3",
            ),
            first.iter().collect(),
        ),
        (
            (
                "events/dt=2024-05-01/hour=23",
                "01890000-0000-7000-8000-000000000021-2",
            ),
            vec![&second[0], &second[2]],
        ),
        (
            (
                "events/dt=2024-05-02/hour=00",
                "01890000-0000-7000-8000-000000000023-2",
            ),
            vec![&second[1], &second[3]],
        ),
        (
            (
                "events/dt=2024-05-03/hour=08",
                "01890000-0000-7000-8000-000000000031-1",
            ),
            third.iter().collect(),
        ),
    ]);

    let keys = moto.keys(BUCKET);
    assert_eq!(keys.len(), expected.len(), "{keys:#?}");
    for key in &keys {
        let events = expected
            .get(&split_key(key))
            .unwrap_or_else(|| panic!("unexpected object {key}"));
        let text = gunzip(&moto.object(BUCKET, key));
        assert!(text.ends_with('\n'), "every line ends with a newline");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), events.len(), "{key}: {text}");
        for (line, event) in lines.iter().zip(events) {
            let record: Value = serde_json::from_str(line).expect("each line is JSON");
            assert_eq!(record, line_for(event), "{key}");
            // Exactly these fields, in this order, for readers that map
            // columns by position.
            let fields: Vec<&String> = record.as_object().unwrap().keys().collect();
            assert_eq!(
                fields,
                [
                    "uuid",
                    "event",
                    "distinct_id",
                    "person_id",
                    "timestamp",
                    "properties"
                ]
            );
        }
    }

    // A retried batch, even reordered, overwrites its objects.
    instance.export(first.clone()).expect("retry stored");
    instance
        .export(second.iter().rev().cloned().collect())
        .expect("reordered retry stored");
    assert_eq!(moto.keys(BUCKET), keys, "no duplicate objects");
}

// ---------------------------------------------------------------------------
// A fake S3 that checks signatures

/// An error reply: status and S3 error code.
type Scripted = (u16, &'static str);

/// A path-style S3 with one bucket that recomputes every request's SigV4
/// signature with the secret it knows and refuses what S3 refuses.
#[derive(Clone)]
struct FakeS3 {
    objects: Arc<Mutex<BTreeMap<String, Vec<u8>>>>,
    /// Errors to answer signed requests with, in order, before storing.
    script: Arc<Mutex<VecDeque<Scripted>>>,
    /// The fake's idea of the time, off the real clock by this much.
    skew: chrono::Duration,
    requests: Arc<Mutex<usize>>,
}

impl FakeS3 {
    fn start() -> (FakeS3, String) {
        Self::start_skewed(chrono::Duration::zero())
    }

    fn start_skewed(skew: chrono::Duration) -> (FakeS3, String) {
        let fake = FakeS3 {
            objects: Arc::default(),
            script: Arc::default(),
            skew,
            requests: Arc::default(),
        };
        let me = fake.clone();
        let router = axum::Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let me = me.clone();
                async move { me.handle(method, uri, headers, body) }
            },
        );
        let addr = common::serve(router);
        (fake, format!("http://127.0.0.1:{}", addr.port()))
    }

    fn script(&self, status: u16, code: &'static str) {
        self.script.lock().unwrap().push_back((status, code));
    }

    fn objects(&self) -> BTreeMap<String, Vec<u8>> {
        self.objects.lock().unwrap().clone()
    }

    fn handle(
        &self,
        method: Method,
        uri: Uri,
        headers: HeaderMap,
        body: Bytes,
    ) -> axum::response::Response {
        *self.requests.lock().unwrap() += 1;
        let path = uri.path().to_string();
        if method != Method::PUT {
            return error(405, "MethodNotAllowed", "Only PUT is faked.", &path);
        }
        let Some((bucket, key)) = path.trim_start_matches('/').split_once('/') else {
            return error(
                400,
                "InvalidRequest",
                "Path-style requests name a bucket and a key.",
                &path,
            );
        };
        if bucket != BUCKET {
            return error(
                404,
                "NoSuchBucket",
                "The specified bucket does not exist",
                &path,
            );
        }
        if let Err((status, code, message)) = self.check_signature(&method, &uri, &headers, &body) {
            return error(status, code, &message, &path);
        }
        if let Some((status, code)) = self.script.lock().unwrap().pop_front() {
            return error(status, code, "Scripted by the test.", &path);
        }
        let key = percent_decode(key);
        let etag = format!("\"{}\"", &sha256_hex(&body)[..32]);
        self.objects.lock().unwrap().insert(key, body.to_vec());
        axum::response::Response::builder()
            .status(200)
            .header("etag", etag)
            .header("x-amz-request-id", "FAKE0001")
            .body(axum::body::Body::empty())
            .unwrap()
    }

    fn check_signature(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<(), (u16, &'static str, String)> {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let authorization = header("authorization").ok_or((
            403,
            "AccessDenied",
            "Anonymous access is not allowed.".to_string(),
        ))?;
        let malformed = || {
            (
                400,
                "AuthorizationHeaderMalformed",
                authorization.to_string(),
            )
        };
        let fields = authorization
            .strip_prefix("AWS4-HMAC-SHA256 ")
            .ok_or_else(malformed)?;
        let mut credential = None;
        let mut signed_headers = None;
        let mut signature = None;
        for part in fields.split(',').map(str::trim) {
            match part.split_once('=') {
                Some(("Credential", v)) => credential = Some(v),
                Some(("SignedHeaders", v)) => signed_headers = Some(v),
                Some(("Signature", v)) => signature = Some(v),
                _ => return Err(malformed()),
            }
        }
        let (credential, signed_headers, signature) = (
            credential.ok_or_else(malformed)?,
            signed_headers.ok_or_else(malformed)?,
            signature.ok_or_else(malformed)?,
        );
        let scope: Vec<&str> = credential.split('/').collect();
        let [access_key, day, region, "s3", "aws4_request"] = scope[..] else {
            return Err(malformed());
        };
        if access_key != ACCESS_KEY_ID {
            return Err((
                403,
                "InvalidAccessKeyId",
                "The AWS Access Key Id you provided does not exist in our records.".into(),
            ));
        }
        let amz_date = header("x-amz-date").ok_or_else(malformed)?;
        if !amz_date.starts_with(day) || region != "us-east-1" {
            return Err(malformed());
        }
        let sent = chrono::NaiveDateTime::parse_from_str(amz_date, "%Y%m%dT%H%M%SZ")
            .map_err(|_| malformed())?
            .and_utc();
        let now = chrono::Utc::now() + self.skew;
        if (now - sent).num_seconds().abs() > 15 * 60 {
            return Err((
                403,
                "RequestTimeTooSkewed",
                "The difference between the request time and the current time is too large.".into(),
            ));
        }
        let payload_hash = header("x-amz-content-sha256").ok_or_else(malformed)?;
        if payload_hash != sha256_hex(body) {
            return Err((
                400,
                "XAmzContentSHA256Mismatch",
                "The provided 'x-amz-content-sha256' header does not match what was computed."
                    .into(),
            ));
        }
        for required in ["host", "x-amz-content-sha256", "x-amz-date"] {
            if !signed_headers.split(';').any(|name| name == required) {
                return Err(malformed());
            }
        }
        let mut canonical = format!("{method}\n{}\n{}\n", uri.path(), uri.query().unwrap_or(""));
        for name in signed_headers.split(';') {
            let value = header(name).ok_or_else(malformed)?;
            canonical.push_str(&format!("{name}:{}\n", value.trim()));
        }
        canonical.push_str(&format!("\n{signed_headers}\n{payload_hash}"));
        if sigv4_signature(SECRET, amz_date, region, &canonical) != signature {
            return Err((
                403,
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you provided. Check your key and signing method.".into(),
            ));
        }
        Ok(())
    }
}

fn error(status: u16, code: &str, message: &str, resource: &str) -> axum::response::Response {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message><Resource>{resource}</Resource><RequestId>FAKE0001</RequestId><HostId>ZmFrZQ==</HostId></Error>"
    );
    axum::response::Response::builder()
        .status(StatusCode::from_u16(status).unwrap())
        .header("content-type", "application/xml")
        .body(axum::body::Body::from(body))
        .unwrap()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            out.push(u8::from_str_radix(&text[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

pub(crate) fn fake_config(endpoint: &str, extra: Value) -> Value {
    let mut config = json!({
        "endpoint": endpoint,
        "region": "us-east-1",
        "bucket": BUCKET,
        "access_key_id": ACCESS_KEY_ID,
        "secret_access_key": SECRET,
    });
    for (key, value) in extra.as_object().unwrap() {
        config[key] = value.clone();
    }
    config
}

fn one_event() -> Vec<ExportedEvent> {
    vec![exported(
        "01890000-0000-7000-8000-000000000041",
        "2024-05-01T12:00:00.000Z",
        "signed up",
        json!({"plan": "pro"}),
    )]
}

#[test]
fn a_fake_s3_that_checks_sigv4_accepts_the_plugins_signatures() {
    let (fake, endpoint) = FakeS3::start();
    let mut instance = s3_plugin(fake_config(
        &endpoint,
        json!({"session_token": "IQoJb3JpZ2luX2VjEXAMPLE"}),
    ));
    let batch = vec![
        exported(
            "01890000-0000-7000-8000-000000000051",
            "2024-05-01T12:00:00.000Z",
            "signed up",
            json!({"plan": "pro"}),
        ),
        exported(
            "01890000-0000-7000-8000-000000000052",
            "2024-05-01T13:00:00.000Z",
            "paid",
            json!({"amount": 30}),
        ),
    ];
    instance
        .export(batch.clone())
        .expect("both objects accepted");

    let objects = fake.objects();
    assert_eq!(objects.len(), 2, "{:?}", objects.keys());
    let mut found = objects.iter();
    for event in &batch {
        let (key, body) = found.next().unwrap();
        assert!(key.starts_with("sluice/dt=2024-05-01/hour="), "{key}");
        let lines: Vec<Value> = gunzip(body)
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(lines, [line_for(event)]);
    }

    let (_, calls) = instance.take_activity();
    assert_eq!(calls.len(), 2);
    assert!(
        calls
            .iter()
            .all(|call| call.method == "PUT" && call.status == Some(200))
    );
    // The secret never travels; the signature in the Authorization header
    // is hidden from the recorded calls.
    for call in &calls {
        for (name, value) in &call.request_headers {
            assert!(!value.contains(SECRET), "{name}");
            if name.eq_ignore_ascii_case("authorization") {
                assert_eq!(value, "[redacted]");
            }
        }
    }
}

#[test]
fn a_wrong_secret_or_key_id_is_permanent_and_names_the_setting_to_fix() {
    let (fake, endpoint) = FakeS3::start();
    let mut wrong_secret = s3_plugin(fake_config(
        &endpoint,
        json!({"secret_access_key": "not-the-secret"}),
    ));
    match wrong_secret.export(one_event()) {
        Err(ExportFailure::Permanent { plugin, message }) => {
            assert_eq!(plugin, "s3@0.1.0");
            assert!(
                message.contains("HTTP 403 SignatureDoesNotMatch"),
                "{message}"
            );
            assert!(message.contains("check secret_access_key"), "{message}");
        }
        other => panic!("a bad signature should be permanent, got {other:?}"),
    }

    let mut wrong_key = s3_plugin(fake_config(
        &endpoint,
        json!({"access_key_id": "AKIDUNKNOWN"}),
    ));
    match wrong_key.export(one_event()) {
        Err(ExportFailure::Permanent { message, .. }) => {
            assert!(message.contains("HTTP 403 InvalidAccessKeyId"), "{message}");
            assert!(message.contains("check access_key_id"), "{message}");
        }
        other => panic!("an unknown key should be permanent, got {other:?}"),
    }
    assert!(fake.objects().is_empty());
}

#[test]
fn slow_down_is_retryable_and_the_retry_stores_the_same_key_once() {
    let (fake, endpoint) = FakeS3::start();
    fake.script(503, "SlowDown");
    fake.script(500, "InternalError");
    let mut instance = s3_plugin(fake_config(&endpoint, json!({})));

    for code in ["SlowDown", "InternalError"] {
        match instance.export(one_event()) {
            Err(ExportFailure::Retryable {
                message,
                retry_after,
                ..
            }) => {
                assert!(message.contains(code), "{message}");
                // S3 gives no wait; the engine's backoff decides.
                assert_eq!(retry_after, None);
            }
            other => panic!("{code} should be retryable, got {other:?}"),
        }
    }
    assert!(fake.objects().is_empty());

    instance.export(one_event()).expect("the retry is stored");
    instance
        .export(one_event())
        .expect("a second retry overwrites");
    let objects = fake.objects();
    assert_eq!(objects.len(), 1, "{:?}", objects.keys());
    assert_eq!(*fake.requests.lock().unwrap(), 4);
}

#[test]
fn a_missing_bucket_and_a_refused_argument_are_permanent() {
    let (fake, endpoint) = FakeS3::start();
    let mut missing = s3_plugin(fake_config(&endpoint, json!({"bucket": "no-such-bucket"})));
    match missing.export(one_event()) {
        Err(ExportFailure::Permanent { message, .. }) => {
            assert!(message.contains("HTTP 404 NoSuchBucket"), "{message}");
            assert!(
                message.contains("bucket `no-such-bucket` does not exist"),
                "{message}"
            );
        }
        other => panic!("a missing bucket should be permanent, got {other:?}"),
    }

    fake.script(400, "InvalidArgument");
    let mut instance = s3_plugin(fake_config(&endpoint, json!({})));
    match instance.export(one_event()) {
        Err(ExportFailure::Permanent { message, .. }) => {
            assert!(
                message.contains("HTTP 400 InvalidArgument: Scripted by the test."),
                "{message}"
            )
        }
        other => panic!("InvalidArgument should be permanent, got {other:?}"),
    }
    assert!(fake.objects().is_empty());
}

#[test]
fn a_clock_too_far_from_s3s_is_retryable() {
    let (fake, endpoint) = FakeS3::start_skewed(chrono::Duration::hours(1));
    let mut instance = s3_plugin(fake_config(&endpoint, json!({})));
    match instance.export(one_event()) {
        Err(ExportFailure::Retryable { message, .. }) => {
            assert!(message.contains("RequestTimeTooSkewed"), "{message}");
            assert!(message.contains("sync it (NTP)"), "{message}");
        }
        other => panic!("a skewed clock should be retryable, got {other:?}"),
    }
    assert!(fake.objects().is_empty());
}
