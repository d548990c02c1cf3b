//! The `encoded_base_url` decoder and its allowlist.
//!
//! A client may ask, through the `encoded_base_url` path segment, that its request go to another
//! base URL. Honouring any URL would let a client make the gateway (or LiteLLM behind it) call
//! any host: a server-side request forgery hole. So a decoded URL is used only if it matches an
//! entry of the allowlist (`encoded_base_url.allow` in the config, empty by default):
//!
//! - the match is on the **parsed** URL: same scheme, same host (case-insensitive, exact: no
//!   suffix or subdomain match, so `https://api.example.com.evil.net` is not
//!   `https://api.example.com`), same port (the scheme's default when none is written), and
//!   the entry's path as a prefix on a segment boundary (`/inference` allows `/inference/v1`,
//!   not `/inferencex`);
//! - only `http` and `https`; no userinfo (`user@host`); no query or fragment; no `.`/`..`
//!   path segments and no encoded `/` or `\` in the path;
//! - `localhost`, loopback, link-local (`169.254.0.0/16`, `fe80::/10`, cloud metadata) and
//!   unspecified addresses are refused unless an entry names that exact host.
//!
//! **Redirects.** The gateway's upstream client never follows redirects, so an allowed host
//! cannot bounce the gateway elsewhere. In `litellm` mode the URL is handed to LiteLLM, whose
//! own client policy then applies. **DNS.** Hosts are compared by name; an allowed name that
//! resolves to an internal address is the allowlist owner's decision.

use std::{
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use base64::{
    Engine as _, alphabet,
    engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig},
};
use http::Uri;
use llmgate_core::GatewayError;

/// URL-safe alphabet, padding optional, no trailing bits, nothing outside the alphabet.
const URL_SAFE_ANY_PADDING: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

const HOW_TO_ALLOW: &str =
    "add its URL prefix (e.g. https://api.fireworks.ai/inference/v1) to encoded_base_url.allow in the config";

/// Decodes an `encoded_base_url` segment: URL-safe base64, padded or not, strict alphabet,
/// UTF-8. Failures are `BadRequest("Invalid encoded_base_url: …")`.
pub fn decode_base_url(encoded: &str) -> Result<String, GatewayError> {
    let invalid = |why: &dyn fmt::Display| GatewayError::BadRequest(format!("Invalid encoded_base_url: {why}"));
    if encoded.is_empty() {
        return Err(invalid(&"empty"));
    }
    let bytes = URL_SAFE_ANY_PADDING.decode(encoded).map_err(|error| invalid(&error))?;
    String::from_utf8(bytes).map_err(|_| invalid(&"the decoded value is not valid UTF-8"))
}

// === AllowlistError ===

/// An allowlist entry that is not an absolute `http(s)` URL prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowlistError {
    /// The entry as configured.
    pub entry: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl fmt::Display for AllowlistError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid encoded_base_url.allow entry '{}': {}", self.entry, self.reason)
    }
}

impl std::error::Error for AllowlistError {}

// === BaseUrlAllowlist ===

/// The base URLs a client may ask for through `encoded_base_url`. Empty (nothing allowed) by
/// default.
#[derive(Clone, Debug, Default)]
pub struct BaseUrlAllowlist {
    entries: Vec<Entry>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    https: bool,
    /// Lowercase; IPv6 in brackets as written in URLs.
    host: String,
    port: u16,
    /// Without trailing `/`; empty means any path.
    path: String,
}

/// The parsed parts of an absolute `http(s)` URL that matching looks at.
struct Parsed {
    https: bool,
    host: String,
    port: u16,
    path: String,
}

impl BaseUrlAllowlist {
    /// Nothing allowed.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Parses the configured entries (absolute `http(s)` URLs, e.g.
    /// `https://api.fireworks.ai/inference/v1`). Call this at start so that a bad entry stops
    /// the gateway with a message naming it.
    pub fn parse<I, S>(entries: I) -> Result<Self, AllowlistError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let entries = entries
            .into_iter()
            .map(|entry| {
                let entry = entry.as_ref();
                let fail = |reason| AllowlistError { entry: entry.to_owned(), reason };
                let parsed = parse_url(entry.trim()).map_err(fail)?;
                if has_dot_or_encoded_separator(&parsed.path) {
                    return Err(fail("the path must not contain '.', '..' or encoded separators"));
                }
                Ok(Entry { https: parsed.https, host: parsed.host, port: parsed.port, path: parsed.path })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { entries })
    }

    /// Whether nothing is allowed.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Decodes `encoded` and returns the URL if it is allowed.
    ///
    /// 400 (`BadRequest`) when it does not decode or is not a URL; 403 (`Forbidden`, with a
    /// message saying how to allow it) when it is not allowed.
    pub fn check(&self, encoded: &str) -> Result<Arc<str>, GatewayError> {
        let url = decode_base_url(encoded)?;
        self.check_url(&url)?;
        Ok(url.into())
    }

    /// Checks an already decoded URL (see [`check`](Self::check)).
    pub fn check_url(&self, url: &str) -> Result<(), GatewayError> {
        if self.entries.is_empty() {
            return Err(GatewayError::Forbidden(format!(
                "encoded_base_url is not allowed: no base URL is allowed by this gateway; to allow one, {HOW_TO_ALLOW}"
            )));
        }
        let parsed = match parse_url(url) {
            Ok(parsed) => parsed,
            Err(reason @ ("only http and https URLs are allowed" | "userinfo (user@host) is not allowed")) => {
                return Err(GatewayError::Forbidden(format!("encoded_base_url is not allowed: {reason}")));
            }
            Err(reason) => {
                return Err(GatewayError::BadRequest(format!("Invalid encoded_base_url: {reason}")));
            }
        };
        let forbidden = |why: String| GatewayError::Forbidden(format!("encoded_base_url is not allowed: {why}"));
        if has_dot_or_encoded_separator(&parsed.path) {
            return Err(forbidden("its path has '.', '..' or encoded separators".into()));
        }
        let named_exactly = self.entries.iter().any(|e| e.host == parsed.host);
        if !named_exactly && is_internal_host(&parsed.host) {
            return Err(forbidden(format!(
                "host '{}' is a local, loopback, link-local or unspecified address; only an \
                 encoded_base_url.allow entry naming exactly this host allows it",
                parsed.host
            )));
        }
        if self.entries.iter().any(|entry| entry.allows(&parsed)) {
            Ok(())
        } else {
            Err(forbidden(format!("'{}' is not in the allowlist; to allow it, {HOW_TO_ALLOW}", origin(&parsed))))
        }
    }
}

impl Entry {
    fn allows(&self, url: &Parsed) -> bool {
        self.https == url.https
            && self.host == url.host
            && self.port == url.port
            && (self.path.is_empty()
                || url.path == self.path
                || url.path.strip_prefix(&self.path).is_some_and(|rest| rest.starts_with('/')))
    }
}

fn origin(url: &Parsed) -> String {
    let scheme = if url.https { "https" } else { "http" };
    let default = if url.https { 443 } else { 80 };
    if url.port == default {
        format!("{scheme}://{}{}", url.host, url.path)
    } else {
        format!("{scheme}://{}:{}{}", url.host, url.port, url.path)
    }
}

/// Parses an absolute `http(s)` URL; the error says why it is not one.
fn parse_url(url: &str) -> Result<Parsed, &'static str> {
    // The scheme first, by hand: `file:/x` or `gopher:` must read as "wrong scheme", whatever
    // `http::Uri` makes of the rest.
    let scheme = url.split_once(':').map(|(scheme, _)| scheme.to_ascii_lowercase());
    let https = match scheme.as_deref() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err("only http and https URLs are allowed"),
    };
    if url.contains(['#', '\\']) {
        return Err("not an absolute http(s) URL (fragment or backslash)");
    }
    let uri: Uri = url.parse().map_err(|_| "not an absolute http(s) URL")?;
    let authority = uri.authority().ok_or("not an absolute http(s) URL (no host)")?;
    if authority.as_str().contains('@') {
        return Err("userinfo (user@host) is not allowed");
    }
    let host = authority.host().to_ascii_lowercase();
    if host.is_empty() {
        return Err("not an absolute http(s) URL (no host)");
    }
    if uri.query().is_some() || url.contains('?') {
        return Err("a base URL must not have a query string");
    }
    let port = match authority.port_u16() {
        Some(port) => port,
        None if authority.as_str().ends_with(':') => return Err("empty port"),
        None if https => 443,
        None => 80,
    };
    let path = uri.path().trim_end_matches('/').to_owned();
    Ok(Parsed { https, host, port, path })
}

/// `.`/`..` segments (also percent-encoded) or encoded `/` and `\`: things a server might
/// normalise into a path the prefix check did not see.
fn has_dot_or_encoded_separator(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    lower.contains("%2f")
        || lower.contains("%5c")
        || lower.split('/').any(|seg| {
            let seg = seg.replace("%2e", ".");
            seg == "." || seg == ".."
        })
}

/// `localhost`, loopback, link-local and unspecified addresses (IPv4, IPv6, IPv4-mapped).
fn is_internal_host(host: &str) -> bool {
    let name = host.trim_end_matches('.');
    if name == "localhost" || name.ends_with(".localhost") || name.is_empty() {
        return true;
    }
    let v4 = |ip: Ipv4Addr| ip.is_loopback() || ip.is_link_local() || ip.is_unspecified() || ip.is_broadcast();
    if let Ok(ip) = name.parse::<Ipv4Addr>() {
        return v4(ip);
    }
    if let Some(inner) = name.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        // Zone ids (`%25eth0`) do not parse: refuse what cannot be classified.
        let Ok(ip) = inner.parse::<Ipv6Addr>() else {
            return true;
        };
        if let Some(mapped) = ip.to_ipv4_mapped() {
            return v4(mapped);
        }
        return ip.is_loopback() || ip.is_unspecified() || (ip.segments()[0] & 0xffc0) == 0xfe80;
    }
    false
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};

    use super::*;

    fn allow(entries: &[&str]) -> BaseUrlAllowlist {
        BaseUrlAllowlist::parse(entries).unwrap()
    }

    fn padded(url: &str) -> String {
        URL_SAFE.encode(url)
    }

    #[test]
    fn decodes_padded_and_unpadded() {
        let url = "https://api.fireworks.ai/inference/v1";
        assert_eq!(decode_base_url(&padded(url)).unwrap(), url);
        assert!(padded(url).ends_with('='));
        assert_eq!(decode_base_url(&URL_SAFE_NO_PAD.encode(url)).unwrap(), url);
        // The client's own example.
        assert_eq!(
            decode_base_url("aHR0cHM6Ly9hcGkuZmlyZXdvcmtzLmFpL2luZmVyZW5jZS92MQ==").unwrap(),
            "https://api.fireworks.ai/inference/v1"
        );
    }

    #[test]
    fn bad_base64_is_400() {
        for bad in ["", "a", "aGk*", "aGk+", "aGk/", "a GVsbG8=", "aGk===", "=aGk", "_w"] {
            let error = decode_base_url(bad).unwrap_err();
            assert!(
                matches!(&error, GatewayError::BadRequest(m) if m.starts_with("Invalid encoded_base_url: ")),
                "{bad}: {error:?}"
            );
        }
        // Valid base64, invalid UTF-8.
        let error = decode_base_url(&URL_SAFE.encode([0xff, 0xfe])).unwrap_err();
        assert!(error.to_string().contains("UTF-8"), "{error}");
    }

    #[test]
    fn empty_allowlist_refuses_with_how_to() {
        let error = BaseUrlAllowlist::empty().check(&padded("https://api.fireworks.ai/inference/v1")).unwrap_err();
        assert_eq!(error.status(), http::StatusCode::FORBIDDEN);
        assert!(error.to_string().contains("encoded_base_url.allow"), "{error}");
    }

    #[test]
    fn ssrf_table() {
        let list = allow(&["https://api.example.com/inference", "http://10.0.0.5:8080"]);
        let allowed = [
            "https://api.example.com/inference",
            "https://api.example.com/inference/",
            "https://api.example.com/inference/v1",
            "https://API.Example.com/inference/v1",
            "https://api.example.com:443/inference/v1",
            "HTTPS://api.example.com/inference/v1",
            "http://10.0.0.5:8080",
            "http://10.0.0.5:8080/anything",
        ];
        for url in allowed {
            assert_eq!(list.check(&padded(url)).as_deref().ok(), Some(url), "{url}");
            assert!(list.check(&URL_SAFE_NO_PAD.encode(url)).is_ok(), "{url} unpadded");
        }
        let refused = [
            "file:///etc/passwd",
            "file:/etc/passwd",
            "gopher://api.example.com/inference",
            "ftp://api.example.com/inference",
            "https://api.example.com.evil.net/inference",
            "https://evil.net/api.example.com/inference",
            "https://api.example.com@evil.net/inference",
            "https://user:pass@api.example.com/inference",
            "https://user@api.example.com/inference",
            "https://api.example.com/inferencex",
            "https://api.example.com/",
            "https://api.example.com",
            "https://api.example.com/inference/../admin",
            "https://api.example.com/inference/%2e%2e/admin",
            "https://api.example.com/inference%2F..%2Fadmin",
            "https://api.example.com:8443/inference",
            "http://api.example.com/inference",
            "https://api.example.com./inference",
            "http://localhost/inference",
            "http://localhost:8080",
            "http://LOCALHOST.",
            "http://foo.localhost",
            "http://127.0.0.1",
            "http://127.0.0.1:8080/inference",
            "http://127.1.2.3",
            "http://0.0.0.0",
            "http://169.254.169.254/latest/meta-data/",
            "http://[::1]/",
            "http://[::]/",
            "http://[fe80::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::ffff:169.254.169.254]/",
            "http://2130706433/",
            "http://10.0.0.5:8081",
            "https://10.0.0.5:8080",
        ];
        for url in refused {
            let error = list.check(&padded(url)).unwrap_err();
            assert_eq!(error.status(), http::StatusCode::FORBIDDEN, "{url}: {error}");
            // Userinfo is never echoed.
            assert!(!error.to_string().contains("pass"), "{error}");
        }
        // Not URLs at all: 400.
        for url in [
            "not a url",
            "https://",
            "https://exa mple.com/",
            "https://api.example.com/inference?x=1",
            "https://api.example.com/inference#f",
        ] {
            let error = list.check(&padded(url)).unwrap_err();
            assert!(
                matches!(error.status(), http::StatusCode::BAD_REQUEST | http::StatusCode::FORBIDDEN),
                "{url}: {error}"
            );
            assert!(list.check(&padded(url)).is_err());
        }
    }

    #[test]
    fn internal_hosts_need_an_exact_entry() {
        let list = allow(&["http://localhost:8000", "http://[::1]:9000/v1", "http://127.0.0.1:4000"]);
        assert!(list.check_url("http://localhost:8000/v1").is_ok());
        assert!(list.check_url("http://[::1]:9000/v1/x").is_ok());
        assert!(list.check_url("http://127.0.0.1:4000").is_ok());
        // Exact host only: another loopback spelling or port stays refused.
        assert!(list.check_url("http://127.0.0.2:4000").is_err());
        assert!(list.check_url("http://localhost:8001").is_err());
        assert!(list.check_url("http://[::1]:9000/v2").is_err());
        assert!(list.check_url("http://169.254.169.254/").is_err());
    }

    #[test]
    fn internal_host_classification() {
        for host in [
            "localhost",
            "localhost.",
            "a.localhost",
            "127.0.0.1",
            "127.9.9.9",
            "0.0.0.0",
            "169.254.169.254",
            "255.255.255.255",
            "[::1]",
            "[::]",
            "[fe80::1]",
            "[febf::1]",
            "[::ffff:127.0.0.1]",
            "[::ffff:a9fe:a9fe]",
            "[fe80::1%25eth0]",
        ] {
            assert!(is_internal_host(host), "{host}");
        }
        for host in ["api.example.com", "10.0.0.5", "8.8.8.8", "[2001:db8::1]", "[fec0::1]", "localhost.example.com"] {
            assert!(!is_internal_host(host), "{host}");
        }
        // What `http::Uri` hands over for an IPv6 literal keeps the brackets.
        let parsed = parse_url("http://[::1]:8080/x").unwrap();
        assert_eq!((parsed.host.as_str(), parsed.port, parsed.path.as_str()), ("[::1]", 8080, "/x"));
    }

    #[test]
    fn bad_entries_are_rejected() {
        for entry in [
            "",
            "api.example.com",
            "file:///x",
            "https://u@api.example.com",
            "https://a.com/x/../y",
            "https://a.com/?q",
        ] {
            let error = BaseUrlAllowlist::parse([entry]).unwrap_err();
            assert_eq!(error.entry, entry);
            assert!(error.to_string().contains("encoded_base_url.allow"));
        }
    }
}
