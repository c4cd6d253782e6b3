//! AWS Signature Version 4 for requests signed in the `Authorization`
//! header, as S3 documents it: a canonical request, a string to sign over
//! its hash, and an HMAC-SHA256 chain from the secret key down to a key for
//! one day, region and service.
//!
//! Only what S3 needs is here: callers pass the path already URI-encoded
//! (S3 does not encode it a second time) and the payload hash they also send
//! as `x-amz-content-sha256`.

use std::fmt::Write as _;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// What the signature covers.
pub struct Canonical<'a> {
    /// `GET`, `PUT`, …
    pub method: &'a str,
    /// The absolute path as sent, encoded with [`uri_encode_path`].
    pub path: &'a str,
    /// Query parameters, not yet encoded; an empty value is `name=`.
    pub query: &'a [(&'a str, &'a str)],
    /// Every header to sign, `host` included, in any order and case.
    pub headers: &'a [(&'a str, &'a str)],
    /// Hex SHA-256 of the body, or `UNSIGNED-PAYLOAD`.
    pub payload_hash: &'a str,
}

/// Signs for one set of credentials in one region and service.
pub struct Signer {
    access_key_id: String,
    secret_access_key: String,
    region: String,
    service: String,
}

impl Signer {
    pub fn new(access_key_id: &str, secret_access_key: &str, region: &str, service: &str) -> Self {
        Signer {
            access_key_id: access_key_id.to_string(),
            secret_access_key: secret_access_key.to_string(),
            region: region.to_string(),
            service: service.to_string(),
        }
    }

    /// The `Authorization` header value for `request` made at `amz_date`
    /// (`YYYYMMDDTHHMMSSZ`, the value of `x-amz-date`).
    pub fn authorization(&self, amz_date: &str, request: &Canonical<'_>) -> String {
        let (canonical, signed_headers) = canonical_request(request);
        let scope = self.scope(amz_date);
        let signature = self.signature(amz_date, &string_to_sign(amz_date, &scope, &canonical));
        format!(
            "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature}",
            self.access_key_id
        )
    }

    /// `YYYYMMDD/region/service/aws4_request`.
    pub fn scope(&self, amz_date: &str) -> String {
        let day = amz_date.get(..8).unwrap_or(amz_date);
        format!("{day}/{}/{}/aws4_request", self.region, self.service)
    }

    /// Hex HMAC of `string_to_sign` with the key derived for the day of
    /// `amz_date`.
    pub fn signature(&self, amz_date: &str, string_to_sign: &str) -> String {
        let day = amz_date.get(..8).unwrap_or(amz_date);
        let secret = format!("AWS4{}", self.secret_access_key);
        let key = hmac(secret.as_bytes(), day.as_bytes());
        let key = hmac(&key, self.region.as_bytes());
        let key = hmac(&key, self.service.as_bytes());
        let key = hmac(&key, b"aws4_request");
        hex(&hmac(&key, string_to_sign.as_bytes()))
    }
}

/// The canonical request and its `SignedHeaders` list.
pub fn canonical_request(request: &Canonical<'_>) -> (String, String) {
    let mut query: Vec<(String, String)> = request
        .query
        .iter()
        .map(|(name, value)| (uri_encode(name, true), uri_encode(value, true)))
        .collect();
    query.sort();
    let query = query
        .iter()
        .map(|(name, value)| format!("{name}={value}"))
        .collect::<Vec<_>>()
        .join("&");

    let mut headers: Vec<(String, String)> = Vec::with_capacity(request.headers.len());
    for (name, value) in request.headers {
        let name = name.to_ascii_lowercase();
        let value = value.split_whitespace().collect::<Vec<_>>().join(" ");
        // A repeated header is signed once, its values joined by commas.
        match headers.iter_mut().find(|(known, _)| *known == name) {
            Some((_, joined)) => {
                joined.push(',');
                joined.push_str(&value);
            }
            None => headers.push((name, value)),
        }
    }
    headers.sort_by(|a, b| a.0.cmp(&b.0));
    let signed_headers = headers
        .iter()
        .map(|(name, _)| name.as_str())
        .collect::<Vec<_>>()
        .join(";");

    let mut canonical = String::new();
    canonical.push_str(request.method);
    canonical.push('\n');
    canonical.push_str(request.path);
    canonical.push('\n');
    canonical.push_str(&query);
    canonical.push('\n');
    for (name, value) in &headers {
        let _ = writeln!(canonical, "{name}:{value}");
    }
    canonical.push('\n');
    canonical.push_str(&signed_headers);
    canonical.push('\n');
    canonical.push_str(request.payload_hash);
    (canonical, signed_headers)
}

/// The string to sign: algorithm, time, scope and the canonical request's
/// hash, one per line.
pub fn string_to_sign(amz_date: &str, scope: &str, canonical_request: &str) -> String {
    format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        sha256_hex(canonical_request.as_bytes())
    )
}

/// Percent-encodes all but the unreserved characters `A-Z a-z 0-9 - . _ ~`
/// with uppercase hex, and also `/` when `slash` is set, as SigV4 requires.
pub fn uri_encode(text: &str, slash: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(byte as char)
            }
            b'/' if !slash => out.push('/'),
            _ => {
                let _ = write!(out, "%{byte:02X}");
            }
        }
    }
    out
}

/// An object key (or bucket and key) encoded for the request path, `/`
/// kept as the separator.
pub fn uri_encode_path(path: &str) -> String {
    uri_encode(path, false)
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

pub fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// AWS's published examples for S3 (the "Examples" of "Signature
/// Calculations for the Authorization Header" in the S3 API reference):
/// bucket `examplebucket` in us-east-1, credentials
/// `AKIAIOSFODNN7EXAMPLE` / `wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY`, made
/// at 2013-05-24T00:00:00Z.
#[cfg(test)]
mod tests {
    use super::*;

    const AMZ_DATE: &str = "20130524T000000Z";
    const HOST: &str = "examplebucket.s3.amazonaws.com";
    const EMPTY_HASH: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn example_signer() -> Signer {
        Signer::new(
            "AKIAIOSFODNN7EXAMPLE",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            "us-east-1",
            "s3",
        )
    }

    fn signature_of(authorization: &str) -> &str {
        authorization
            .rsplit_once("Signature=")
            .expect("has a signature")
            .1
    }

    #[test]
    fn the_get_object_example_matches_every_intermediate_value() {
        let headers = [
            ("Host", HOST),
            ("Range", "bytes=0-9"),
            ("x-amz-content-sha256", EMPTY_HASH),
            ("x-amz-date", AMZ_DATE),
        ];
        let request = Canonical {
            method: "GET",
            path: "/test.txt",
            query: &[],
            headers: &headers,
            payload_hash: EMPTY_HASH,
        };

        let (canonical, signed_headers) = canonical_request(&request);
        assert_eq!(
            canonical,
            "GET\n/test.txt\n\n\
             host:examplebucket.s3.amazonaws.com\n\
             range:bytes=0-9\n\
             x-amz-content-sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\n\
             x-amz-date:20130524T000000Z\n\n\
             host;range;x-amz-content-sha256;x-amz-date\n\
             e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(signed_headers, "host;range;x-amz-content-sha256;x-amz-date");

        let signer = example_signer();
        let scope = signer.scope(AMZ_DATE);
        assert_eq!(scope, "20130524/us-east-1/s3/aws4_request");
        let to_sign = string_to_sign(AMZ_DATE, &scope, &canonical);
        assert_eq!(
            to_sign,
            "AWS4-HMAC-SHA256\n20130524T000000Z\n20130524/us-east-1/s3/aws4_request\n\
             7344ae5b7ee6c3e7e6b0fe0640412a37625d1fbfff95c48bbb2dc43964946972"
        );
        assert_eq!(
            signer.signature(AMZ_DATE, &to_sign),
            "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
        assert_eq!(
            signer.authorization(AMZ_DATE, &request),
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, \
             SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, \
             Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
    }

    #[test]
    fn the_put_object_example_signs_the_body_hash_and_an_encoded_key() {
        let body = b"Welcome to Amazon S3.";
        let body_hash = sha256_hex(body);
        assert_eq!(
            body_hash,
            "44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072"
        );
        let path = format!("/{}", uri_encode_path("test$file.text"));
        assert_eq!(path, "/test%24file.text");
        let headers = [
            ("Date", "Fri, 24 May 2013 00:00:00 GMT"),
            ("Host", HOST),
            ("x-amz-date", AMZ_DATE),
            ("x-amz-storage-class", "REDUCED_REDUNDANCY"),
            ("x-amz-content-sha256", body_hash.as_str()),
        ];
        let authorization = example_signer().authorization(
            AMZ_DATE,
            &Canonical {
                method: "PUT",
                path: &path,
                query: &[],
                headers: &headers,
                payload_hash: &body_hash,
            },
        );
        assert!(
            authorization.contains(
                "SignedHeaders=date;host;x-amz-content-sha256;x-amz-date;x-amz-storage-class,"
            ),
            "{authorization}"
        );
        assert_eq!(
            signature_of(&authorization),
            "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd"
        );
    }

    #[test]
    fn the_bucket_lifecycle_example_signs_a_query_parameter_without_a_value() {
        let headers = [
            ("Host", HOST),
            ("x-amz-date", AMZ_DATE),
            ("x-amz-content-sha256", EMPTY_HASH),
        ];
        let authorization = example_signer().authorization(
            AMZ_DATE,
            &Canonical {
                method: "GET",
                path: "/",
                query: &[("lifecycle", "")],
                headers: &headers,
                payload_hash: EMPTY_HASH,
            },
        );
        assert_eq!(
            signature_of(&authorization),
            "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543"
        );
    }

    #[test]
    fn the_list_objects_example_sorts_the_query_parameters() {
        let headers = [
            ("Host", HOST),
            ("x-amz-date", AMZ_DATE),
            ("x-amz-content-sha256", EMPTY_HASH),
        ];
        let request = Canonical {
            method: "GET",
            path: "/",
            // Given out of order on purpose: the canonical form sorts them.
            query: &[("prefix", "J"), ("max-keys", "2")],
            headers: &headers,
            payload_hash: EMPTY_HASH,
        };
        let (canonical, _) = canonical_request(&request);
        assert!(
            canonical.starts_with("GET\n/\nmax-keys=2&prefix=J\n"),
            "{canonical}"
        );
        assert_eq!(
            signature_of(&example_signer().authorization(AMZ_DATE, &request)),
            "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"
        );
    }

    #[test]
    fn header_values_are_trimmed_and_repeated_headers_joined() {
        let headers = [
            ("X-Amz-Meta-A", "  one   two "),
            ("host", "h"),
            ("x-amz-meta-a", "three"),
        ];
        let (canonical, signed) = canonical_request(&Canonical {
            method: "PUT",
            path: "/k",
            query: &[],
            headers: &headers,
            payload_hash: "UNSIGNED-PAYLOAD",
        });
        assert_eq!(signed, "host;x-amz-meta-a");
        assert!(
            canonical.contains("\nhost:h\nx-amz-meta-a:one two,three\n\n"),
            "{canonical}"
        );
    }

    #[test]
    fn uri_encoding_keeps_only_unreserved_characters() {
        assert_eq!(
            uri_encode_path("dt=2024-05-01/a b~c.gz"),
            "dt%3D2024-05-01/a%20b~c.gz"
        );
        assert_eq!(uri_encode("a/b+c", true), "a%2Fb%2Bc");
        assert_eq!(uri_encode("é", true), "%C3%A9");
    }
}
