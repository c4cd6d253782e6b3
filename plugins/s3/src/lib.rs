//! S3 destination: writes exported events to a bucket of AWS S3 or any
//! S3-compatible store (MinIO, Cloudflare R2, Ceph, …) as files a warehouse
//! or query engine reads in place.
//!
//! Each export batch becomes one object per hour it spans, under a
//! Hive-style partitioned key:
//!
//! ```text
//! {prefix}dt=2024-05-01/hour=12/{first uuid}-{count}-{digest}.ndjson.gz
//! ```
//!
//! The object is gzip-compressed NDJSON, one line per event:
//! `{"uuid", "event", "distinct_id", "person_id", "timestamp", "properties"}`
//! in the batch's order. An event's partition is its own timestamp in UTC.
//!
//! Delivery is at least once and the host retries whole batches, so the key
//! is a function of the events it holds: the smallest uuid, how many events
//! there are, and a digest of all their uuids. A retried batch, even one
//! retried in another order or after a later partition failed, puts the same
//! keys again and S3 keeps the last copy: no duplicate objects.
//!
//! Requests are signed with AWS Signature Version 4 ([`sigv4`]) over the
//! exact body hash, with the host's clock; no AWS SDK is involved, so the
//! plugin builds for wasm32.

mod sigv4;
mod time;

use std::collections::BTreeMap;
use std::io::Write as _;

use flate2::Compression;
use flate2::write::GzEncoder;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use sluice_plugin_sdk::http::{Request, Response};
use sluice_plugin_sdk::{
    Error, ExportError, ExportedEvent, Plugin, Result, clock, info, register_plugin, warn,
};

use chrono::Timelike;
use sigv4::{Canonical, Signer};

#[derive(Deserialize)]
struct Config {
    #[serde(default)]
    endpoint: Option<String>,
    region: String,
    bucket: String,
    access_key_id: String,
    secret_access_key: String,
    #[serde(default)]
    session_token: Option<String>,
    #[serde(default = "default_prefix")]
    prefix: String,
    #[serde(default)]
    path_style: Option<bool>,
}

fn default_prefix() -> String {
    "sluice/".into()
}

struct S3 {
    endpoint: Endpoint,
    bucket: String,
    /// Empty, or ends with `/`.
    prefix: String,
    path_style: bool,
    region: String,
    access_key_id: String,
    session_token: Option<String>,
    signer: Signer,
}

/// Where requests go: a scheme and a host, with the port only when it is
/// not the scheme's default, exactly as the `Host` header carries it.
#[derive(Clone, Debug, PartialEq)]
struct Endpoint {
    scheme: String,
    host: String,
    port: Option<u16>,
}

/// The hour an event belongs to, in UTC.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Partition {
    /// `YYYY-MM-DD`.
    date: String,
    /// `00` to `23`.
    hour: String,
}

impl Plugin for S3 {
    type Config = Config;

    fn new(config: Config) -> Result<Self> {
        let region = config.region.trim().to_string();
        let region_ok = !region.is_empty()
            && region
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !region_ok {
            return Err(Error::msg(format!(
                "region `{region}` must be an AWS-style region name such as eu-west-1 (lowercase letters, digits and dashes)"
            )));
        }

        let endpoint = match config.endpoint.as_deref().map(str::trim) {
            Some(url) if !url.is_empty() => Endpoint::parse(url)?,
            _ => Endpoint::aws(&region),
        };

        let bucket = config.bucket.trim().to_string();
        let bucket_ok = (1..=255).contains(&bucket.len())
            && bucket
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
        if !bucket_ok {
            return Err(Error::msg(format!(
                "bucket `{bucket}` is not a bucket name: use the name alone (letters, digits, dots, dashes), not a URL or an s3:// path"
            )));
        }

        let aws = endpoint.is_aws();
        let path_style = match config.path_style {
            Some(path_style) => path_style,
            // AWS's wildcard certificates cover one label, so a dotted
            // bucket name only verifies in the path.
            None => !aws || bucket.contains('.'),
        };
        if !path_style {
            if !aws {
                return Err(Error::msg(format!(
                    "path_style = false addresses {bucket}.{host}, and this plugin may only reach the endpoint's own host ({host}) outside AWS: set path_style to true or leave it unset",
                    host = endpoint.host
                )));
            }
            if !dns_compatible(&bucket) {
                return Err(Error::msg(format!(
                    "bucket `{bucket}` cannot be addressed in the host name (path_style = false): such names must be 3-63 lowercase letters, digits and dashes; set path_style to true"
                )));
            }
        }

        let access_key_id = config.access_key_id.trim().to_string();
        if access_key_id.is_empty() {
            return Err(Error::msg("access_key_id must not be empty"));
        }
        if config.secret_access_key.is_empty() {
            return Err(Error::msg("secret_access_key must not be empty"));
        }

        let mut prefix = config.prefix.trim().trim_start_matches('/').to_string();
        if !prefix.is_empty() && !prefix.ends_with('/') {
            prefix.push('/');
        }
        if prefix.contains("//") {
            return Err(Error::msg(format!(
                "prefix `{prefix}` has an empty folder name (`//`); remove the doubled slash"
            )));
        }

        Ok(S3 {
            signer: Signer::new(&access_key_id, &config.secret_access_key, &region, "s3"),
            endpoint,
            bucket,
            prefix,
            path_style,
            region,
            access_key_id,
            session_token: config.session_token.filter(|token| !token.is_empty()),
        })
    }

    fn export(&mut self, events: Vec<ExportedEvent>) -> Result<(), ExportError> {
        if events.is_empty() {
            return Ok(());
        }
        // Partitions go out in time order; if one fails after others were
        // stored, the retry puts those again under the same keys.
        for (partition, group) in partitions(&events, clock::now_millis()) {
            let key = self.object_key(&partition, &group);
            let body = ndjson_gzip(&group)?;
            self.put(&key, body, group.len())?;
        }
        Ok(())
    }
}

impl S3 {
    /// `{prefix}dt=YYYY-MM-DD/hour=HH/{smallest uuid}-{count}-{digest}.ndjson.gz`.
    ///
    /// Sorting the uuids makes the key independent of the batch's order; the
    /// digest over all of them keeps two different sets that share their
    /// smallest uuid and their size apart.
    fn object_key(&self, partition: &Partition, group: &[&ExportedEvent]) -> String {
        let mut uuids: Vec<&str> = group.iter().map(|event| event.uuid.as_str()).collect();
        uuids.sort_unstable();
        let mut digest = Sha256::new();
        for uuid in &uuids {
            digest.update(uuid.as_bytes());
            digest.update(b"\n");
        }
        let digest = sigv4::hex(&digest.finalize()[..8]);
        // Uuids come from the host, but a key is no place for surprises.
        let first: String = uuids[0]
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .take(64)
            .collect();
        format!(
            "{}dt={}/hour={}/{first}-{}-{digest}.ndjson.gz",
            self.prefix,
            partition.date,
            partition.hour,
            group.len()
        )
    }

    /// The URL, `Host` header value and canonical path of an object.
    fn address(&self, key: &str) -> (String, String, String) {
        let authority = self.endpoint.authority();
        let scheme = &self.endpoint.scheme;
        let key = sigv4::uri_encode_path(key);
        if self.path_style {
            let path = format!("/{}/{key}", sigv4::uri_encode(&self.bucket, true));
            (format!("{scheme}://{authority}{path}"), authority, path)
        } else {
            let host = format!("{}.{authority}", self.bucket);
            let path = format!("/{key}");
            (format!("{scheme}://{host}{path}"), host, path)
        }
    }

    fn put(&self, key: &str, body: Vec<u8>, count: usize) -> Result<(), ExportError> {
        let (url, host, path) = self.address(key);
        let payload_hash = sigv4::sha256_hex(&body);
        let amz_date = time::amz_date(&time::from_unix_millis(clock::now_millis()));
        let mut signed = vec![
            ("host", host.as_str()),
            ("x-amz-content-sha256", payload_hash.as_str()),
            ("x-amz-date", amz_date.as_str()),
        ];
        if let Some(token) = &self.session_token {
            signed.push(("x-amz-security-token", token.as_str()));
        }
        let authorization = self.signer.authorization(
            &amz_date,
            &Canonical {
                method: "PUT",
                path: &path,
                query: &[],
                headers: &signed,
                payload_hash: &payload_hash,
            },
        );

        // The HTTP client sets Host from the URL, to the value signed above.
        let mut request = Request::put(url).header("content-type", "application/gzip");
        for (name, value) in signed.iter().filter(|(name, _)| *name != "host") {
            request = request.header(*name, *value);
        }
        let request = request.header("authorization", authorization).body(body);
        let response = request.send()?;
        if response.is_success() {
            info!(
                "stored {count} event(s) in s3://{}/{key} (HTTP {})",
                self.bucket, response.status
            );
            return Ok(());
        }
        Err(self.failure(&response, key))
    }

    /// Classifies an S3 error response by its `<Error><Code>`, falling back
    /// to the status when the body is not S3's XML (a proxy, a load
    /// balancer).
    fn failure(&self, response: &Response, key: &str) -> ExportError {
        let status = response.status;
        let body = String::from_utf8_lossy(&response.body);
        let code = xml_text(&body, "Code").unwrap_or_default();
        let message = xml_text(&body, "Message").unwrap_or_default();
        let object = format!("s3://{}/{key}", self.bucket);
        let said = if code.is_empty() {
            let snippet: String = body.trim().chars().take(300).collect();
            format!("HTTP {status}: {snippet}")
        } else if message.is_empty() {
            format!("HTTP {status} {code}")
        } else {
            format!("HTTP {status} {code}: {message}")
        };
        warn!("S3 refused {object}: {said}");
        let retryable = |text: String| ExportError::Retryable {
            message: text,
            retry_after: response.retry_after(),
        };

        match code.as_str() {
            "SlowDown"
            | "Throttling"
            | "ThrottlingException"
            | "RequestLimitExceeded"
            | "TooManyRequestsException" => retryable(format!(
                "S3 asked Sluice to slow down ({said}); the batch will be retried"
            )),
            "InternalError"
            | "ServiceUnavailable"
            | "RequestTimeout"
            | "RequestTimeoutException"
            | "PriorRequestNotComplete"
            | "OperationAborted" => retryable(format!(
                "S3 could not store {object} ({said}); the batch will be retried"
            )),
            // The signature carries the host's clock; once the clock is
            // fixed the same batch goes through, so dead-lettering every
            // batch meanwhile would only make work.
            "RequestTimeTooSkewed" => retryable(format!(
                "S3 refused the request time ({said}): the Sluice server's clock is more than 15 minutes off; sync it (NTP). Batches are retried until it is fixed"
            )),
            "AccessDenied" | "AllAccessDisabled" | "AccountProblem" => {
                ExportError::Permanent(format!(
                    "S3 denied writing {object} ({said}): allow s3:PutObject on arn:aws:s3:::{}/{}* for access key {} in its IAM policy and the bucket policy (and kms:GenerateDataKey if the bucket encrypts with a KMS key)",
                    self.bucket, self.prefix, self.access_key_id
                ))
            }
            "SignatureDoesNotMatch" => ExportError::Permanent(format!(
                "S3 refused the request signature ({said}): check secret_access_key, and that region `{}` is the bucket's region",
                self.region
            )),
            "InvalidAccessKeyId" => ExportError::Permanent(format!(
                "S3 does not know access key {} ({said}): check access_key_id, and that the endpoint is the service that issued it",
                self.access_key_id
            )),
            "ExpiredToken" | "InvalidToken" | "TokenRefreshRequired" => {
                ExportError::Permanent(format!(
                    "S3 refused the session token ({said}): temporary credentials expire; set fresh access_key_id, secret_access_key and session_token, or use long-lived keys without a session token"
                ))
            }
            "NoSuchBucket" => ExportError::Permanent(format!(
                "bucket `{}` does not exist at {} ({said}): create it, or fix bucket, region and endpoint",
                self.bucket,
                self.endpoint.authority()
            )),
            "PermanentRedirect"
            | "AuthorizationHeaderMalformed"
            | "IllegalLocationConstraintException" => ExportError::Permanent(format!(
                "S3 says bucket `{}` is not in region `{}` ({said}): set region to the bucket's region",
                self.bucket, self.region
            )),
            "" if status == 307 => retryable(format!(
                "S3 redirected the request while the bucket's address propagates ({said}); the batch will be retried"
            )),
            _ if status == 408 || status == 429 || status >= 500 => retryable(format!(
                "S3 could not store {object} ({said}); the batch will be retried"
            )),
            _ => ExportError::Permanent(format!("S3 refused to store {object} ({said})")),
        }
    }
}

impl Endpoint {
    /// AWS's regional endpoint.
    fn aws(region: &str) -> Endpoint {
        let domain = if region.starts_with("cn-") {
            "amazonaws.com.cn"
        } else {
            "amazonaws.com"
        };
        Endpoint {
            scheme: "https".into(),
            host: format!("s3.{region}.{domain}"),
            port: None,
        }
    }

    /// `scheme://host[:port]`, with an optional trailing `/`.
    fn parse(url: &str) -> Result<Endpoint> {
        let refuse = |why: &str| {
            Error::msg(format!(
                "endpoint `{url}` {why}: give the scheme and host only, such as https://s3.eu-west-1.amazonaws.com or http://localhost:9000"
            ))
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| refuse("is not an http:// or https:// URL"))?;
        let scheme = scheme.to_ascii_lowercase();
        if scheme != "http" && scheme != "https" {
            return Err(refuse("is not an http:// or https:// URL"));
        }
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains(['/', '?', '#', '@']) {
            return Err(refuse("has a path, query or user name"));
        }
        let (host, port) = match authority.rsplit_once(':') {
            // An IPv6 literal's colons are inside its brackets.
            Some((host, port)) if !port.contains(']') => {
                let port = port
                    .parse::<u16>()
                    .map_err(|_| refuse("has an invalid port"))?;
                (host, Some(port))
            }
            _ => (authority, None),
        };
        if host.is_empty() || host.contains(char::is_whitespace) {
            return Err(refuse("has no host"));
        }
        let default_port = if scheme == "https" { 443 } else { 80 };
        Ok(Endpoint {
            host: host.to_ascii_lowercase(),
            port: port.filter(|port| *port != default_port),
            scheme,
        })
    }

    /// `host[:port]`, as the `Host` header carries it.
    fn authority(&self) -> String {
        match self.port {
            Some(port) => format!("{}:{port}", self.host),
            None => self.host.clone(),
        }
    }

    /// Whether AWS serves this host, so `*.amazonaws.com` in the manifest
    /// also covers its virtual-hosted bucket names.
    fn is_aws(&self) -> bool {
        ["amazonaws.com", "amazonaws.com.cn"]
            .iter()
            .any(|domain| self.host.ends_with(&format!(".{domain}")))
    }
}

/// Whether a bucket name can be a DNS label in front of the endpoint.
fn dns_compatible(bucket: &str) -> bool {
    (3..=63).contains(&bucket.len())
        && bucket
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !bucket.starts_with('-')
        && !bucket.ends_with('-')
}

/// Groups events by the UTC hour of their timestamp, keeping the batch's
/// order inside each group.
fn partitions(
    events: &[ExportedEvent],
    now_millis: u64,
) -> BTreeMap<Partition, Vec<&ExportedEvent>> {
    let mut groups: BTreeMap<Partition, Vec<&ExportedEvent>> = BTreeMap::new();
    for event in events {
        let at = match time::parse_rfc3339(&event.timestamp) {
            Some(at) => at,
            None => {
                // The host stores RFC 3339 timestamps, so this is a host
                // bug; filing the event under the export time keeps it.
                warn!(
                    "event {} has timestamp `{}`, which is not RFC 3339; it is filed under the export time",
                    event.uuid, event.timestamp
                );
                time::from_unix_millis(now_millis)
            }
        };
        let partition = Partition {
            date: at.format("%Y-%m-%d").to_string(),
            hour: format!("{:02}", at.hour()),
        };
        groups.entry(partition).or_default().push(event);
    }
    groups
}

/// One JSON object per line, gzip-compressed. The gzip header carries no
/// time or name, so the same events always make the same bytes.
fn ndjson_gzip(events: &[&ExportedEvent]) -> Result<Vec<u8>, ExportError> {
    let mut gzip = GzEncoder::new(Vec::new(), Compression::default());
    for event in events {
        serde_json::to_writer(&mut gzip, event)?;
        gzip.write_all(b"\n")
            .map_err(|err| ExportError::permanent(format!("failed to compress events: {err}")))?;
    }
    gzip.finish()
        .map_err(|err| ExportError::permanent(format!("failed to compress events: {err}")))
}

/// The text of the first `<name>` element, with XML's predefined entities
/// decoded. S3's error bodies are flat, so no parser is needed.
fn xml_text(xml: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let start = xml.find(&open)? + open.len();
    let end = start + xml[start..].find(&close)?;
    Some(
        xml[start..end]
            .trim()
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&amp;", "&"),
    )
}

register_plugin!(S3);

#[cfg(test)]
mod tests {
    use std::io::Read as _;
    use std::time::Duration;

    use flate2::read::GzDecoder;
    use sluice_plugin_sdk::http::{HttpError, Method};
    use sluice_plugin_sdk::testing::{self, MockHost, header};
    use sluice_plugin_sdk::{Value, json};

    use super::*;

    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";

    fn config(extra: Value) -> Value {
        let required = json!({
            "region": "eu-west-1",
            "bucket": "events-bucket",
            "access_key_id": "AKIAIOSFODNN7EXAMPLE",
            "secret_access_key": SECRET,
        });
        testing::merged(required, extra)
    }

    fn s3(extra: Value) -> S3 {
        testing::plugin(config(extra))
    }

    fn refusal(extra: Value) -> String {
        testing::refusal::<S3>(config(extra))
    }

    fn event(uuid: &str, timestamp: &str, properties: Value) -> ExportedEvent {
        ExportedEvent {
            timestamp: timestamp.into(),
            ..testing::exported_event(uuid, "signed up", properties)
        }
    }

    fn answering(status: u16, body: &'static str) -> MockHost {
        let host = MockHost::install();
        host.on_http(move |_| {
            Ok(Response::new(status, body).with_header("content-type", "application/xml"))
        });
        host
    }

    fn gunzip(bytes: &[u8]) -> String {
        let mut text = String::new();
        GzDecoder::new(bytes).read_to_string(&mut text).unwrap();
        text
    }

    fn s3_error(code: &str) -> String {
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>It went wrong &amp; here is why.</Message><Resource>/events-bucket/k</Resource><RequestId>4442587FB7D0A2F9</RequestId></Error>"
        )
    }

    fn failing_with(status: u16, code: &str) -> ExportError {
        let host = MockHost::install();
        let body = s3_error(code);
        host.on_http(move |_| Ok(Response::new(status, body.clone())));
        s3(json!({}))
            .export(vec![event("id-1", "2024-05-01T12:00:00Z", json!({}))])
            .unwrap_err()
    }

    #[test]
    fn a_batch_becomes_one_signed_gzip_ndjson_object_per_hour() {
        let host = answering(200, "");
        let mut plugin = s3(json!({}));
        plugin
            .export(vec![
                event("id-2", "2024-05-01T12:59:59.999Z", json!({"plan": "pro"})),
                event("id-1", "2024-05-01T12:00:00.000Z", json!({"n": 1})),
            ])
            .expect("stored");

        let requests = host.requests();
        assert_eq!(requests.len(), 1);
        let request = &requests[0];
        assert_eq!(request.method, Method::Put);
        let key = request
            .url
            .strip_prefix("https://events-bucket.s3.eu-west-1.amazonaws.com/sluice/dt%3D2024-05-01/hour%3D12/id-1-2-")
            .unwrap_or_else(|| panic!("unexpected url {}", request.url));
        assert!(key.ends_with(".ndjson.gz") && key.len() == 16 + 10, "{key}");

        let body = request.body.as_deref().unwrap();
        let lines: Vec<Value> = gunzip(body)
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(
            lines,
            [
                json!({"uuid": "id-2", "event": "signed up", "distinct_id": "user-1", "person_id": "person-1", "timestamp": "2024-05-01T12:59:59.999Z", "properties": {"plan": "pro"}}),
                json!({"uuid": "id-1", "event": "signed up", "distinct_id": "user-1", "person_id": "person-1", "timestamp": "2024-05-01T12:00:00.000Z", "properties": {"n": 1}}),
            ]
        );

        assert_eq!(header(request, "content-type"), Some("application/gzip"));
        assert_eq!(
            header(request, "x-amz-content-sha256"),
            Some(sigv4::sha256_hex(body).as_str())
        );
        // The mock host's clock.
        assert_eq!(header(request, "x-amz-date"), Some("20240101T000000Z"));
        assert_eq!(header(request, "x-amz-security-token"), None);
        let authorization = header(request, "authorization").unwrap();
        assert!(
            authorization.starts_with(
                "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20240101/eu-west-1/s3/aws4_request, SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature="
            ),
            "{authorization}"
        );
        assert!(!authorization.contains(SECRET));
    }

    #[test]
    fn the_signature_is_the_one_sigv4_gives_for_the_request_as_sent() {
        let host = answering(200, "");
        let mut plugin = s3(json!({"session_token": "FQoGZXIvYXdzEXAMPLE"}));
        host.set_now_millis(1_714_564_800_000);
        plugin
            .export(vec![event("id-1", "2024-05-01T12:00:00Z", json!({}))])
            .expect("stored");

        let request = &host.requests()[0];
        let path = request
            .url
            .strip_prefix("https://events-bucket.s3.eu-west-1.amazonaws.com")
            .unwrap();
        let body_hash = sigv4::sha256_hex(request.body.as_deref().unwrap());
        let headers = [
            ("host", "events-bucket.s3.eu-west-1.amazonaws.com"),
            ("x-amz-content-sha256", body_hash.as_str()),
            ("x-amz-date", "20240501T120000Z"),
            ("x-amz-security-token", "FQoGZXIvYXdzEXAMPLE"),
        ];
        let expected = Signer::new("AKIAIOSFODNN7EXAMPLE", SECRET, "eu-west-1", "s3")
            .authorization(
                "20240501T120000Z",
                &Canonical {
                    method: "PUT",
                    path,
                    query: &[],
                    headers: &headers,
                    payload_hash: &body_hash,
                },
            );
        assert_eq!(header(request, "authorization"), Some(expected.as_str()));
        assert!(
            expected.contains(
                "SignedHeaders=host;x-amz-content-sha256;x-amz-date;x-amz-security-token,"
            )
        );
        assert_eq!(
            header(request, "x-amz-security-token"),
            Some("FQoGZXIvYXdzEXAMPLE")
        );
    }

    #[test]
    fn a_batch_spanning_days_writes_one_object_per_partition_in_time_order() {
        let host = answering(200, "");
        let mut plugin = s3(json!({}));
        plugin
            .export(vec![
                event("c", "2024-05-02T00:00:01Z", json!({})),
                event("a", "2024-05-01T23:59:59Z", json!({})),
                event("d", "2024-05-02T00:30:00Z", json!({})),
                // 02:00 in Berlin is the previous day in UTC.
                event("b", "2024-05-02T01:00:00+02:00", json!({})),
            ])
            .expect("stored");

        let requests = host.requests();
        let partitions: Vec<&str> = requests
            .iter()
            .map(|r| r.url.split("/sluice/").nth(1).unwrap())
            .map(|rest| rest.rsplit_once('/').unwrap().0)
            .collect();
        assert_eq!(
            partitions,
            ["dt%3D2024-05-01/hour%3D23", "dt%3D2024-05-02/hour%3D00"]
        );
        let uuids = |request: &Request| -> Vec<String> {
            gunzip(request.body.as_deref().unwrap())
                .lines()
                .map(|line| {
                    serde_json::from_str::<Value>(line).unwrap()["uuid"]
                        .as_str()
                        .unwrap()
                        .to_string()
                })
                .collect()
        };
        assert_eq!(uuids(&requests[0]), ["a", "b"]);
        assert_eq!(uuids(&requests[1]), ["c", "d"]);
        assert!(requests[0].url.contains("/a-2-"), "{}", requests[0].url);
        assert!(requests[1].url.contains("/c-2-"), "{}", requests[1].url);
    }

    #[test]
    fn a_retried_batch_puts_the_same_keys_whatever_its_order() {
        let host = answering(200, "");
        let mut plugin = s3(json!({}));
        let batch = vec![
            event("id-1", "2024-05-01T12:00:00Z", json!({})),
            event("id-2", "2024-05-01T12:00:01Z", json!({})),
            event("id-3", "2024-05-01T13:00:00Z", json!({})),
        ];
        plugin.export(batch.clone()).unwrap();
        plugin
            .export(batch.iter().rev().cloned().collect())
            .unwrap();
        // The clock moving on changes nothing but the signature.
        host.set_now_millis(1_800_000_000_000);
        plugin.export(batch.clone()).unwrap();

        let urls: Vec<String> = host.requests().into_iter().map(|r| r.url).collect();
        assert_eq!(urls.len(), 6);
        assert_eq!(urls[0..2], urls[2..4]);
        assert_eq!(urls[0..2], urls[4..6]);
        let requests = host.requests();
        assert_eq!(
            requests[0].body, requests[4].body,
            "same events, same bytes"
        );

        // Another set sharing the smallest uuid and the size gets another key.
        plugin
            .export(vec![
                event("id-1", "2024-05-01T12:00:00Z", json!({})),
                event("id-9", "2024-05-01T12:00:01Z", json!({})),
            ])
            .unwrap();
        let other = host.requests().last().unwrap().url.clone();
        assert!(other.contains("/id-1-2-"), "{other}");
        assert_ne!(other, urls[0]);
    }

    #[test]
    fn an_empty_batch_sends_nothing() {
        let host = answering(500, "");
        s3(json!({})).export(Vec::new()).expect("nothing to store");
        assert!(host.requests().is_empty());
    }

    #[test]
    fn a_custom_endpoint_is_addressed_path_style_with_its_port_in_the_host() {
        let host = answering(200, "");
        let mut plugin = s3(json!({"endpoint": "http://LocalHost:9000/", "prefix": "/raw/events"}));
        plugin
            .export(vec![event("id-1", "2024-05-01T12:00:00Z", json!({}))])
            .unwrap();
        let request = &host.requests()[0];
        assert!(
            request.url.starts_with(
                "http://localhost:9000/events-bucket/raw/events/dt%3D2024-05-01/hour%3D12/id-1-1-"
            ),
            "{}",
            request.url
        );

        let plugin = s3(json!({"endpoint": "https://minio.example.com:443"}));
        assert_eq!(plugin.endpoint.authority(), "minio.example.com");
        assert!(plugin.path_style);
        let (url, host_header, path) = plugin.address("k");
        assert_eq!(url, "https://minio.example.com/events-bucket/k");
        assert_eq!(host_header, "minio.example.com");
        assert_eq!(path, "/events-bucket/k");
    }

    #[test]
    fn aws_is_virtual_hosted_unless_the_bucket_name_has_dots_or_path_style_is_set() {
        let plugin = s3(json!({}));
        assert!(!plugin.path_style);
        assert_eq!(
            plugin.address("k").0,
            "https://events-bucket.s3.eu-west-1.amazonaws.com/k"
        );

        let dotted = s3(json!({"bucket": "events.example.com"}));
        assert_eq!(
            dotted.address("k").0,
            "https://s3.eu-west-1.amazonaws.com/events.example.com/k"
        );

        let forced = s3(json!({"path_style": true}));
        assert_eq!(
            forced.address("k").0,
            "https://s3.eu-west-1.amazonaws.com/events-bucket/k"
        );

        let china = s3(json!({"region": "cn-north-1"}));
        assert_eq!(
            china.address("k").0,
            "https://events-bucket.s3.cn-north-1.amazonaws.com.cn/k"
        );
    }

    #[test]
    fn slow_down_and_server_errors_are_retryable() {
        for (status, code) in [
            (503, "SlowDown"),
            (503, "ServiceUnavailable"),
            (500, "InternalError"),
            (400, "RequestTimeout"),
            (409, "OperationAborted"),
        ] {
            let err = failing_with(status, code);
            let ExportError::Retryable {
                message,
                retry_after,
            } = &err
            else {
                panic!("{code} should be retryable, got {err:?}");
            };
            assert!(
                message.contains(&format!(
                    "HTTP {status} {code}: It went wrong & here is why."
                )),
                "{message}"
            );
            assert_eq!(*retry_after, None);
        }
    }

    #[test]
    fn a_clock_skew_is_retryable_and_says_to_fix_the_clock() {
        let err = failing_with(403, "RequestTimeTooSkewed");
        let ExportError::Retryable { message, .. } = &err else {
            panic!("expected retryable, got {err:?}");
        };
        assert!(
            message.contains("clock is more than 15 minutes off"),
            "{message}"
        );
    }

    #[test]
    fn auth_and_bucket_errors_are_permanent_and_say_what_to_fix() {
        let cases = [
            (
                403,
                "AccessDenied",
                "allow s3:PutObject on arn:aws:s3:::events-bucket/sluice/*",
            ),
            (403, "SignatureDoesNotMatch", "check secret_access_key"),
            (
                403,
                "InvalidAccessKeyId",
                "does not know access key AKIAIOSFODNN7EXAMPLE",
            ),
            (
                400,
                "ExpiredToken",
                "set fresh access_key_id, secret_access_key and session_token",
            ),
            (
                404,
                "NoSuchBucket",
                "bucket `events-bucket` does not exist at s3.eu-west-1.amazonaws.com",
            ),
            (
                400,
                "AuthorizationHeaderMalformed",
                "set region to the bucket's region",
            ),
            (
                301,
                "PermanentRedirect",
                "set region to the bucket's region",
            ),
            (
                400,
                "InvalidArgument",
                "S3 refused to store s3://events-bucket/sluice/dt=2024-05-01/hour=12/id-1-1-",
            ),
        ];
        for (status, code, hint) in cases {
            match failing_with(status, code) {
                ExportError::Permanent(message) => {
                    assert!(message.contains(hint), "{code}: {message}");
                    assert!(
                        message.contains(&format!("HTTP {status} {code}")),
                        "{message}"
                    );
                    assert!(!message.contains(SECRET));
                }
                other => panic!("{code} should be permanent, got {other:?}"),
            }
        }
    }

    #[test]
    fn a_response_that_is_not_s3_xml_is_classified_by_status() {
        let host = answering(502, "<html>Bad Gateway</html>");
        let mut plugin = s3(json!({}));
        let batch = || vec![event("id-1", "2024-05-01T12:00:00Z", json!({}))];
        let err = plugin.export(batch()).unwrap_err();
        assert!(
            matches!(&err, ExportError::Retryable { message, .. } if message.contains("HTTP 502: <html>Bad Gateway</html>")),
            "{err:?}"
        );

        host.on_http(|_| Ok(Response::new(429, "").with_header("Retry-After", "12")));
        match plugin.export(batch()).unwrap_err() {
            ExportError::Retryable {
                message,
                retry_after,
            } => {
                assert!(
                    message.starts_with(
                        "S3 could not store s3://events-bucket/sluice/dt=2024-05-01/hour=12/id-1-1-"
                    ),
                    "{message}"
                );
                assert!(
                    message.ends_with(".ndjson.gz (HTTP 429: ); the batch will be retried"),
                    "{message}"
                );
                assert_eq!(retry_after, Some(Duration::from_secs(12)));
            }
            other => panic!("429 should be retryable, got {other:?}"),
        }

        host.on_http(|_| Ok(Response::new(400, "nope")));
        assert!(matches!(
            plugin.export(batch()).unwrap_err(),
            ExportError::Permanent(_)
        ));
    }

    #[test]
    fn a_failed_partition_fails_the_batch_after_the_earlier_ones_were_stored() {
        let host = MockHost::install();
        host.on_http(|request| {
            if request.url.contains("hour%3D13") {
                Ok(Response::new(503, s3_error("SlowDown")))
            } else {
                Ok(Response::new(200, ""))
            }
        });
        let mut plugin = s3(json!({}));
        let err = plugin
            .export(vec![
                event("id-1", "2024-05-01T12:00:00Z", json!({})),
                event("id-2", "2024-05-01T13:00:00Z", json!({})),
                event("id-3", "2024-05-01T14:00:00Z", json!({})),
            ])
            .unwrap_err();
        assert!(matches!(err, ExportError::Retryable { .. }), "{err:?}");
        assert_eq!(host.requests().len(), 2, "hour 14 is not attempted");
    }

    #[test]
    fn network_failures_are_retryable() {
        let host = MockHost::install();
        host.on_http(|_| Err(HttpError::Timeout));
        let err = s3(json!({}))
            .export(vec![event("id-1", "2024-05-01T12:00:00Z", json!({}))])
            .unwrap_err();
        assert!(matches!(err, ExportError::Retryable { .. }), "{err:?}");
    }

    #[test]
    fn an_event_with_a_malformed_timestamp_is_filed_under_the_export_time() {
        let host = answering(200, "");
        s3(json!({}))
            .export(vec![event("id-1", "not a time", json!({}))])
            .unwrap();
        assert!(
            host.requests()[0]
                .url
                .contains("/dt%3D2024-01-01/hour%3D00/id-1-1-"),
            "{}",
            host.requests()[0].url
        );
        assert!(
            host.logs()
                .iter()
                .any(|line| line.message.contains("not RFC 3339"))
        );
    }

    #[test]
    fn bad_config_is_refused_with_a_clear_message() {
        let err = refusal(json!({"region": "EU West"}));
        assert!(
            err.contains("region `EU West` must be an AWS-style region name"),
            "{err}"
        );
        let err = refusal(json!({"bucket": "s3://events-bucket/x"}));
        assert!(err.contains("not a bucket name"), "{err}");
        let err = refusal(json!({"endpoint": "localhost:9000"}));
        assert!(err.contains("is not an http:// or https:// URL"), "{err}");
        let err = refusal(json!({"endpoint": "http://localhost:9000/bucket"}));
        assert!(err.contains("has a path"), "{err}");
        let err = refusal(json!({"endpoint": "http://localhost:99999"}));
        assert!(err.contains("invalid port"), "{err}");
        let err = refusal(json!({"endpoint": "http://localhost:9000", "path_style": false}));
        assert!(err.contains("set path_style to true"), "{err}");
        let err = refusal(json!({"bucket": "Events_Bucket", "path_style": false}));
        assert!(
            err.contains("cannot be addressed in the host name"),
            "{err}"
        );
        let err = refusal(json!({"access_key_id": " "}));
        assert!(err.contains("access_key_id must not be empty"), "{err}");
        let err = refusal(json!({"secret_access_key": ""}));
        assert!(err.contains("secret_access_key must not be empty"), "{err}");
        let err = refusal(json!({"prefix": "a//b"}));
        assert!(err.contains("doubled slash"), "{err}");
        let err = refusal(json!({"region": null}));
        assert!(err.contains("invalid config"), "{err}");
    }

    #[test]
    fn xml_text_decodes_entities_and_tolerates_missing_elements() {
        let xml = s3_error("NoSuchKey");
        assert_eq!(xml_text(&xml, "Code").as_deref(), Some("NoSuchKey"));
        assert_eq!(
            xml_text(&xml, "Message").as_deref(),
            Some("It went wrong & here is why.")
        );
        assert_eq!(xml_text(&xml, "HostId"), None);
        assert_eq!(xml_text("<Code>unclosed", "Code"), None);
    }

    #[test]
    fn the_manifest_describes_every_field_and_its_defaults_are_accepted() {
        let manifest: Value =
            toml::from_str(include_str!("../plugin.toml")).expect("plugin.toml parses");
        assert_eq!(manifest["hooks"], json!(["export"]));
        let mut config = testing::manifest_defaults(&manifest);
        for (name, field) in manifest["config"].as_object().unwrap() {
            if field.get("required") == Some(&json!(true)) {
                config.insert(name.clone(), self::config(json!({}))[name].clone());
            }
        }
        let plugin = testing::setup::<S3>(Value::Object(config)).expect("defaults are valid");
        assert_eq!(plugin.prefix, "sluice/");
        assert!(!plugin.path_style);
        assert_eq!(plugin.endpoint, Endpoint::aws("eu-west-1"));
    }
}
