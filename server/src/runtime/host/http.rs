//! Outbound HTTP for plugins: host allow-list from the install's grants,
//! address checks against SSRF (at resolution time, so DNS cannot smuggle a
//! private address past them), timeouts, a response-size cap and a
//! concurrency cap. Redirects are never followed.
//!
//! A request takes a permit of its project (the `http_permits` quota)
//! before one of the server's (`http_concurrency`), both within the
//! call's deadline, so one project's slow endpoints hold only its own
//! permits and every other project's requests still go out.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

use super::{HostState, HttpCall};
use crate::model::quotas::Hit;
use crate::runtime::bindings::http::{Host, HttpError, Method, Request, Response};
use crate::runtime::limits::Policy;

/// Which kinds of addresses the operator lets plugins reach.
#[derive(Clone, Copy, Debug)]
pub struct AddressPolicy {
    pub allow_loopback: bool,
    pub allow_private: bool,
    pub allow_link_local: bool,
}

impl AddressPolicy {
    pub fn from_policy(policy: &Policy) -> Self {
        AddressPolicy {
            allow_loopback: policy.allow_loopback,
            allow_private: policy.allow_private,
            allow_link_local: policy.allow_link_local,
        }
    }

    /// `Err` with the kind of address and the setting that would allow it.
    /// Every range of IANA's special-purpose registries that is not
    /// globally reachable is refused, and so is every IPv6 form that
    /// carries an IPv4 address (compatible, NAT64, 6to4, Teredo): a
    /// translator on the path would deliver it to that IPv4 address, which
    /// may be an internal one.
    pub fn check(&self, ip: IpAddr) -> Result<(), String> {
        // `::ffff:a.b.c.d` is the IPv4 address itself on a dual stack.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let Some((net, class)) = SPECIAL_PURPOSE.iter().find(|(net, _)| net.contains(&ip)) else {
            return Ok(());
        };
        let (allowed, setting) = match class.kind {
            Kind::Loopback => (self.allow_loopback, "allow_loopback"),
            Kind::LinkLocal => (self.allow_link_local, "allow_link_local"),
            Kind::Private | Kind::Embedded => (self.allow_private, "allow_private"),
            Kind::Reserved => (false, ""),
        };
        let what = class.what;
        if allowed {
            Ok(())
        } else if setting.is_empty() {
            Err(format!(
                "{ip} is a {what} address ({net}), special-purpose and not globally reachable, which no setting allows"
            ))
        } else {
            Err(format!(
                "{ip} is a {what} address, which the operator does not allow (policy setting {setting})"
            ))
        }
    }
}

/// Which setting opens a special-purpose range, if any.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Loopback,
    LinkLocal,
    Private,
    /// An IPv6 prefix that carries an IPv4 address to a translator.
    Embedded,
    /// Not globally reachable, and no plugin has business there.
    Reserved,
}

#[derive(Clone, Copy, Debug)]
struct Class {
    kind: Kind,
    what: &'static str,
}

/// IANA's IPv4 and IPv6 special-purpose address registries, less the
/// entries marked globally reachable, and the rest of IPv6 outside global
/// unicast (2000::/3). Checked in order.
static SPECIAL_PURPOSE: std::sync::LazyLock<Vec<(ipnet::IpNet, Class)>> =
    std::sync::LazyLock::new(|| {
        use Kind::*;
        [
            ("127.0.0.0/8", Loopback, "loopback"),
            ("::1/128", Loopback, "loopback"),
            ("169.254.0.0/16", LinkLocal, "link-local"),
            ("fe80::/10", LinkLocal, "link-local"),
            ("10.0.0.0/8", Private, "private"),
            ("172.16.0.0/12", Private, "private"),
            ("192.168.0.0/16", Private, "private"),
            ("100.64.0.0/10", Private, "private"),
            ("fc00::/7", Private, "private"),
            ("fec0::/10", Private, "private"),
            ("::/128", Reserved, "unspecified"),
            ("::/96", Embedded, "IPv4-compatible IPv6"),
            ("64:ff9b::/96", Embedded, "NAT64"),
            ("64:ff9b:1::/48", Embedded, "local-use NAT64"),
            ("2002::/16", Embedded, "6to4"),
            ("2001::/32", Embedded, "Teredo"),
            ("0.0.0.0/8", Reserved, "this network"),
            ("192.0.0.0/24", Reserved, "IETF protocol assignments"),
            ("192.0.2.0/24", Reserved, "documentation"),
            ("192.88.99.0/24", Reserved, "6to4 relay anycast"),
            ("198.18.0.0/15", Reserved, "benchmarking"),
            ("198.51.100.0/24", Reserved, "documentation"),
            ("203.0.113.0/24", Reserved, "documentation"),
            ("224.0.0.0/4", Reserved, "multicast"),
            ("240.0.0.0/4", Reserved, "reserved"),
            ("100::/64", Reserved, "discard-only"),
            ("2001::/23", Reserved, "IETF protocol assignments"),
            ("2001:db8::/32", Reserved, "documentation"),
            ("3fff::/20", Reserved, "documentation"),
            ("5f00::/16", Reserved, "segment routing"),
            ("ff00::/8", Reserved, "multicast"),
            ("::/3", Reserved, "non-global-unicast"),
            ("4000::/2", Reserved, "non-global-unicast"),
            ("8000::/1", Reserved, "non-global-unicast"),
        ]
        .into_iter()
        .map(|(net, kind, what)| {
            let net = net.parse().expect("the table's networks parse");
            (net, Class { kind, what })
        })
        .collect()
    });

/// The error a resolver returns when every address of a host is refused,
/// found again in reqwest's error chain to answer `denied`, not
/// `connection`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct AddressDenied(String);

struct PolicyResolver {
    policy: AddressPolicy,
}

impl Resolve for PolicyResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy;
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed = allowed_addresses(&policy, &host, addrs).map_err(
                |denied| -> Box<dyn std::error::Error + Send + Sync> { Box::new(denied) },
            )?;
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

/// The addresses of `host` the policy allows, which are the only ones the
/// client then connects to: the address checked is the address used, so a
/// name that resolves differently a moment later (DNS rebinding) gains
/// nothing.
fn allowed_addresses(
    policy: &AddressPolicy,
    host: &str,
    addrs: Vec<SocketAddr>,
) -> Result<Vec<SocketAddr>, AddressDenied> {
    let mut refusals = Vec::new();
    let allowed: Vec<SocketAddr> = addrs
        .into_iter()
        .filter(|addr| match policy.check(addr.ip()) {
            Ok(()) => true,
            Err(why) => {
                refusals.push(why);
                false
            }
        })
        .collect();
    if allowed.is_empty() {
        let why = refusals
            .pop()
            .unwrap_or_else(|| "it has no addresses".into());
        return Err(AddressDenied(format!(
            "host {host} resolves only to refused addresses: {why}"
        )));
    }
    Ok(allowed)
}

/// The HTTP client of a runtime. Requests run on its own small I/O runtime,
/// so a plugin call can wait for one from any thread, async or not.
pub struct HttpClient {
    client: reqwest::Client,
    policy: AddressPolicy,
    /// Always `Some` until drop.
    io: Option<tokio::runtime::Runtime>,
    /// The server's permits, shared by every project.
    permits: Arc<Semaphore>,
    /// How many there are.
    concurrency: usize,
    /// Each project's permits, created at its first request with its
    /// quota then. A project whose quota has changed since gets a new
    /// semaphore of the new size at its next request; requests in flight
    /// keep their permits of the old one, so for as long as they last the
    /// project may have up to both sizes in flight.
    project_permits: Mutex<HashMap<String, (u32, Arc<Semaphore>)>>,
}

impl HttpClient {
    pub fn new(policy: &Policy) -> anyhow::Result<Self> {
        let address_policy = AddressPolicy::from_policy(policy);
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(Arc::new(PolicyResolver {
                policy: address_policy,
            }))
            .user_agent(concat!("sluice/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let io = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("sluice-plugin-http")
            .enable_all()
            .build()?;
        Ok(HttpClient {
            client,
            policy: address_policy,
            io: Some(io),
            permits: Arc::new(Semaphore::new(policy.http_concurrency.max(1))),
            concurrency: policy.http_concurrency.max(1),
            project_permits: Mutex::default(),
        })
    }

    /// The permits of `project_id`, sized by its `http_permits` quota.
    fn project_permits(&self, project_id: &str, quota: u32) -> Arc<Semaphore> {
        let mut by_project = self.project_permits.lock().expect("permits lock");
        match by_project.get(project_id) {
            Some((size, permits)) if *size == quota => permits.clone(),
            _ => {
                let permits = Arc::new(Semaphore::new(quota.max(1) as usize));
                by_project.insert(project_id.to_string(), (quota, permits.clone()));
                permits
            }
        }
    }

    fn send(
        &self,
        request: reqwest::Request,
        timeout: Duration,
        max_body: u64,
        project_id: &str,
        quota: u32,
    ) -> Result<Response, HttpError> {
        let client = self.client.clone();
        let permits = self.permits.clone();
        let total = self.concurrency;
        let ours = self.project_permits(project_id, quota);
        let project_id = project_id.to_string();
        let task = async move {
            let deadline = tokio::time::Instant::now() + timeout;
            let shutting_down = |_| HttpError::Connection("the host is shutting down".into());
            let _ours = tokio::time::timeout_at(deadline, ours.acquire_owned())
                .await
                .map_err(|_| {
                    let hit = Hit {
                        quota: "http_permits",
                        limit: quota.into(),
                    };
                    HttpError::Connection(format!(
                        "no HTTP permit came free within the call's deadline: project {project_id}'s plugins already have {quota} requests in flight, {hit}"
                    ))
                })?
                .map_err(shutting_down)?;
            let _permit = tokio::time::timeout_at(deadline, permits.acquire_owned())
                .await
                .map_err(|_| {
                    HttpError::Connection(format!(
                        "no HTTP permit came free within the call's deadline: every project's plugins together have the server's {total} requests in flight (the operator's policy http_concurrency)"
                    ))
                })?
                .map_err(shutting_down)?;
            let exchange = async {
                let mut response = client.execute(request).await.map_err(classify)?;
                let status = response.status().as_u16();
                let headers: Vec<(String, String)> = response
                    .headers()
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.as_str().to_string(),
                            String::from_utf8_lossy(v.as_bytes()).into_owned(),
                        )
                    })
                    .collect();
                let mut headers: Vec<(String, String)> = headers;
                let mut body = Vec::new();
                while let Some(chunk) = response.chunk().await.map_err(classify)? {
                    let room = (max_body as usize).saturating_sub(body.len());
                    if chunk.len() > room {
                        // The status is what a destination judges an answer
                        // by: a vendor that accepted a batch and answered
                        // with a huge page still accepted it, and a huge
                        // 500 is still worth retrying. The rest is dropped
                        // unread, and the cut is marked.
                        body.extend_from_slice(&chunk[..room]);
                        headers.push((TRUNCATED_HEADER.into(), max_body.to_string()));
                        break;
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(Response {
                    status,
                    headers,
                    body,
                })
            };
            tokio::time::timeout_at(deadline, exchange)
                .await
                .map_err(|_| HttpError::Timeout)?
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let io = self.io.as_ref().expect("I/O runtime lives until drop");
        io.spawn(async move {
            let _ = tx.send(task.await);
        });
        rx.recv()
            .unwrap_or_else(|_| Err(HttpError::Connection("the HTTP task was cancelled".into())))
    }
}

impl Drop for HttpClient {
    fn drop(&mut self) {
        // A runtime may be dropped from async code, where a blocking
        // shutdown would panic.
        if let Some(io) = self.io.take() {
            io.shutdown_background();
        }
    }
}

fn classify(err: reqwest::Error) -> HttpError {
    if err.is_timeout() {
        return HttpError::Timeout;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    while let Some(cause) = source {
        if let Some(denied) = cause.downcast_ref::<AddressDenied>() {
            return HttpError::Denied(denied.0.clone());
        }
        source = cause.source();
    }
    let mut message = err.to_string();
    let mut cause = std::error::Error::source(&err);
    while let Some(inner) = cause {
        message.push_str(": ");
        message.push_str(&inner.to_string());
        cause = inner.source();
    }
    HttpError::Connection(message)
}

/// Added to a response whose body was cut at the size limit; its value is
/// the limit in bytes.
pub const TRUNCATED_HEADER: &str = "x-sluice-body-truncated";

/// Header names whose values are credentials, hidden in recorded calls.
const SENSITIVE_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "x-api-key",
    "api-key",
    "x-clickhouse-key",
    "x-amz-security-token",
];

/// Header names holding these words are treated as credentials too.
const SENSITIVE_WORDS: &[&str] = &["token", "secret", "password", "api-key", "apikey"];

fn is_sensitive(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    SENSITIVE_HEADERS.contains(&lower.as_str())
        || SENSITIVE_WORDS.iter().any(|word| lower.contains(word))
}

/// How much of a request body a recorded call keeps.
const RECORDED_BODY_BYTES: usize = 4096;

impl HostState {
    /// `text` with the install's secret config values blanked out.
    pub(crate) fn scrub(&self, text: &str) -> String {
        self.install.secrets.blank_secrets(text).into_owned()
    }

    fn build_request(&self, request: &Request) -> Result<(reqwest::Request, Duration), HttpError> {
        let url = reqwest::Url::parse(&request.url).map_err(|err| {
            HttpError::InvalidRequest(format!("`{}` is not a URL: {err}", request.url))
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(HttpError::InvalidRequest(format!(
                "only http and https URLs are allowed, got `{}`",
                url.scheme()
            )));
        }
        let host = url
            .host_str()
            .ok_or_else(|| HttpError::InvalidRequest(format!("`{}` has no host", request.url)))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        let port = url.port_or_known_default().unwrap_or(443);
        self.install
            .grants
            .check_http(&host, port)
            .map_err(HttpError::Denied)?;
        if let Ok(ip) = host.parse::<IpAddr>() {
            self.services.http.policy.check(ip).map_err(|why| {
                HttpError::Denied(format!(
                    "{} may not call {}: {why}",
                    self.install.plugin, request.url
                ))
            })?;
        }
        let method = reqwest::Method::from_bytes(method_name(request.method).as_bytes())
            .expect("standard method");
        let mut builder = self.services.http.client.request(method, url);
        for (name, value) in &request.headers {
            let name = reqwest::header::HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                HttpError::InvalidRequest(format!("`{name}` is not a valid header name"))
            })?;
            let value = reqwest::header::HeaderValue::from_str(value).map_err(|_| {
                HttpError::InvalidRequest(format!("the value of header `{name}` is not valid"))
            })?;
            builder = builder.header(name, value);
        }
        if let Some(body) = &request.body {
            builder = builder.body(body.clone());
        }
        let mut timeout = self.install.limits.http_timeout.min(self.remaining());
        if let Some(ms) = request.timeout_ms {
            timeout = timeout.min(Duration::from_millis(ms.into()));
        }
        let built = builder
            .build()
            .map_err(|err| HttpError::InvalidRequest(err.to_string()))?;
        Ok((built, timeout))
    }

    fn record(
        &mut self,
        request: &Request,
        started: Instant,
        result: &Result<Response, HttpError>,
    ) {
        let request_headers = request
            .headers
            .iter()
            .map(|(name, value)| {
                (
                    name.clone(),
                    if is_sensitive(name) {
                        "[redacted]".into()
                    } else {
                        self.scrub(value)
                    },
                )
            })
            .collect();
        let details = self.services.record_http_details;
        let request_body = request.body.as_ref().filter(|_| details).map(|body| {
            let text =
                String::from_utf8_lossy(&body[..body.len().min(RECORDED_BODY_BYTES)]).into_owned();
            let text = self.scrub(&text);
            if body.len() > RECORDED_BODY_BYTES {
                text + "… [cut]"
            } else {
                text
            }
        });
        let (status, error) = match result {
            Ok(response) => (Some(response.status), None),
            // reqwest's errors print the URL, query string and all.
            Err(err) if details => (None, Some(self.scrub(&describe(err)))),
            Err(err) => (
                None,
                Some(self.install.secrets.scrub(&describe(err)).into_owned()),
            ),
        };
        let call = HttpCall {
            method: method_name(request.method).into(),
            url: self.scrub(&if details {
                request.url.clone()
            } else {
                redact_query(&request.url)
            }),
            request_headers,
            request_body,
            status,
            error,
            duration_ms: started.elapsed().as_millis() as u64,
        };
        self.install
            .activity
            .lock()
            .expect("activity lock")
            .record_http(call);
    }
}

/// The URL with every query value replaced, since tokens often travel there.
fn redact_query(url: &str) -> String {
    let Ok(mut parsed) = reqwest::Url::parse(url) else {
        return "[unparseable URL]".into();
    };
    if parsed.query().is_some() {
        let names: Vec<String> = parsed.query_pairs().map(|(k, _)| k.into_owned()).collect();
        parsed.query_pairs_mut().clear();
        for name in names {
            parsed.query_pairs_mut().append_pair(&name, "[redacted]");
        }
    }
    parsed.set_password(None).ok();
    parsed.to_string()
}

fn method_name(method: Method) -> &'static str {
    match method {
        Method::Get => "GET",
        Method::Head => "HEAD",
        Method::Post => "POST",
        Method::Put => "PUT",
        Method::Patch => "PATCH",
        Method::Delete => "DELETE",
    }
}

/// Text of an `http-error`, for logs and recorded calls.
pub fn describe(err: &HttpError) -> String {
    match err {
        HttpError::Denied(m) => format!("denied: {m}"),
        HttpError::InvalidRequest(m) => format!("invalid request: {m}"),
        HttpError::Timeout => "timed out".into(),
        HttpError::TooLarge(m) => format!("response too large: {m}"),
        HttpError::Connection(m) => format!("connection failed: {m}"),
    }
}

impl Host for HostState {
    fn fetch(&mut self, request: Request) -> wasmtime::Result<Result<Response, HttpError>> {
        let started = Instant::now();
        let result = self.build_request(&request).and_then(|(built, timeout)| {
            let max_body = self.install.limits.max_http_response_bytes;
            let project_id = &self.install.project_id;
            let quota = self.services.quotas.get(project_id).http_permits;
            self.services
                .http
                .send(built, timeout, max_body, project_id, quota)
        });
        // Waiting on the network is not the plugin's compute.
        self.call.waited += started.elapsed();
        self.record(&request, started, &result);
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strict() -> AddressPolicy {
        AddressPolicy {
            allow_loopback: false,
            allow_private: false,
            allow_link_local: false,
        }
    }

    #[test]
    fn private_loopback_and_link_local_are_refused_by_default() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.0.1",
            "172.20.0.1",
            "169.254.169.254",
            "::1",
            "fe80::1",
            "fd00::1",
            "fec0::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::",
        ] {
            assert!(
                strict().check(ip.parse().unwrap()).is_err(),
                "{ip} should be refused"
            );
        }
        for ip in ["93.184.216.34", "2606:4700::1111", "::ffff:93.184.216.34"] {
            assert!(
                strict().check(ip.parse().unwrap()).is_ok(),
                "{ip} should be allowed"
            );
        }
    }

    #[test]
    fn special_purpose_ranges_are_refused_even_with_every_setting_on() {
        let open = AddressPolicy {
            allow_loopback: true,
            allow_private: true,
            allow_link_local: true,
        };
        for ip in [
            "192.0.0.8",
            "192.0.2.1",
            "192.88.99.1",
            "198.18.0.1",
            "198.19.255.255",
            "198.51.100.7",
            "203.0.113.9",
            "224.0.0.1",
            "240.0.0.1",
            "255.255.255.255",
            "0.1.2.3",
            "ff02::1",
            "100::1",
            "2001:db8::1",
            "2001:2::1",
            "3fff::1",
            "5f00::1",
            "4000::1",
        ] {
            let err = open.check(ip.parse().unwrap()).unwrap_err();
            assert!(err.contains("no setting allows"), "{ip}: {err}");
        }
        // Neighbours of those ranges are ordinary addresses.
        for ip in [
            "192.0.1.1",
            "198.17.0.1",
            "198.20.0.1",
            "203.0.114.1",
            "2001:4860::1",
        ] {
            assert!(strict().check(ip.parse().unwrap()).is_ok(), "{ip}");
        }
    }

    #[test]
    fn ipv6_forms_that_carry_an_ipv4_address_are_refused() {
        for ip in [
            "64:ff9b::7f00:1",    // NAT64 of 127.0.0.1
            "64:ff9b::a9fe:a9fe", // NAT64 of 169.254.169.254
            "64:ff9b::808:808",   // NAT64 of a public address, still refused
            "64:ff9b:1::a00:1",   // local-use NAT64
            "::7f00:1",           // IPv4-compatible
            "::a9fe:a9fe",
            "::808:808",
            "2002:7f00:1::1",      // 6to4 of 127.0.0.1
            "2001:0:4136:e378::1", // Teredo
        ] {
            let err = strict().check(ip.parse().unwrap()).unwrap_err();
            assert!(err.contains("allow_private"), "{ip}: {err}");
        }
    }

    #[test]
    fn a_name_resolving_to_refused_and_allowed_addresses_is_connected_only_to_the_allowed() {
        let addrs = |list: &[&str]| -> Vec<SocketAddr> {
            list.iter()
                .map(|a| format!("{a}:443").parse().unwrap())
                .collect()
        };
        let mixed = addrs(&[
            "127.0.0.1",
            "93.184.216.34",
            "[fd00::1]",
            "[2606:4700::1111]",
        ]);
        assert_eq!(
            allowed_addresses(&strict(), "rebind.example", mixed).unwrap(),
            addrs(&["93.184.216.34", "[2606:4700::1111]"])
        );
        let private = addrs(&["10.0.0.1", "[::ffff:169.254.169.254]"]);
        let err = allowed_addresses(&strict(), "rebind.example", private).unwrap_err();
        assert!(
            err.0
                .starts_with("host rebind.example resolves only to refused addresses"),
            "{}",
            err.0
        );
    }

    #[test]
    fn recorded_urls_hide_query_values_and_passwords() {
        assert_eq!(
            redact_query("https://u:pw@hooks.example.com/x?token=abc&v=1"),
            "https://u@hooks.example.com/x?token=%5Bredacted%5D&v=%5Bredacted%5D"
        );
    }

    #[test]
    fn allowing_loopback_does_not_open_metadata_addresses() {
        let policy = AddressPolicy {
            allow_loopback: true,
            ..strict()
        };
        assert!(policy.check("127.0.0.1".parse().unwrap()).is_ok());
        let err = policy
            .check("169.254.169.254".parse().unwrap())
            .unwrap_err();
        assert!(
            err.contains("link-local") && err.contains("allow_link_local"),
            "{err}"
        );
    }
}
