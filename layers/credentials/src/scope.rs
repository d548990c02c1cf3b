//! Credential scopes: which client credentials and endpoint a request brings, as a digest.
//!
//! A provider's 429 belongs to the credentials and the endpoint that earned it. The gateway's
//! own credentials (an upstream's server-side key, or no key at all) at a configured upstream
//! are shared by every client, so a 429 there cools the model down for everyone. A client's own
//! key, or an endpoint the client chose with `encoded_base_url`, concerns that client only: the
//! routing layers key its cooldowns by the digest computed here, never by the secret.

use http::{HeaderMap, header};
use llmgate_core::ext::{BaseUrlOverride, ClientScope, ScopeId};

/// Bytes of SHA-256 kept (128 bits: no collision between clients in practice).
const DIGEST_BYTES: usize = 16;

/// The scope of what the client brought: its `Authorization` header as it will be forwarded
/// (with `auth.api_keys` the gateway consumes the header first, and it is not the client's
/// provider key) and its `encoded_base_url`, if any. `None` when it brought neither.
///
/// The id is 32 hex digits of SHA-256 over a domain tag and both values (length-prefixed), the
/// same in every replica, so a cooldown in a shared store follows the client across replicas.
pub fn client_scope(headers: &HeaderMap, base_url: Option<&BaseUrlOverride>) -> Option<ClientScope> {
    let authorization = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes());
    if authorization.is_none() && base_url.is_none() {
        return None;
    }
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    context.update(b"llmgate/credential-scope/v1");
    for (tag, value) in [(b'e', base_url.map(|b| b.0.as_bytes())), (b'a', authorization)] {
        if let Some(value) = value {
            context.update(&[tag]);
            context.update(&(value.len() as u64).to_le_bytes());
            context.update(value);
        }
    }
    let digest = context.finish();
    let hex: String = digest.as_ref()[..DIGEST_BYTES].iter().map(|b| format!("{b:02x}")).collect();
    Some(ClientScope { id: ScopeId::new(hex), endpoint: base_url.is_some() })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn auth(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn nothing_brought_is_no_scope() {
        assert_eq!(client_scope(&HeaderMap::new(), None), None);
    }

    #[test]
    fn the_id_is_a_stable_digest_that_never_shows_the_key() {
        let a = client_scope(&auth("Bearer sk-secret-a"), None).unwrap();
        assert_eq!(a, client_scope(&auth("Bearer sk-secret-a"), None).unwrap());
        assert!(!a.endpoint);
        assert_eq!(a.id.as_str().len(), 32);
        assert!(a.id.as_str().bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(!format!("{a:?} {}", a.id).contains("secret"));
        let b = client_scope(&auth("Bearer sk-secret-b"), None).unwrap();
        assert_ne!(a.id, b.id);
    }

    #[test]
    fn the_endpoint_is_part_of_the_scope() {
        let url = BaseUrlOverride("https://api.example.com/v1".into());
        let other = BaseUrlOverride("https://api.example.org/v1".into());
        let endpoint_only = client_scope(&HeaderMap::new(), Some(&url)).unwrap();
        assert!(endpoint_only.endpoint);
        let with_key = client_scope(&auth("Bearer k"), Some(&url)).unwrap();
        assert!(with_key.endpoint);
        assert_ne!(endpoint_only.id, with_key.id);
        assert_ne!(with_key.id, client_scope(&auth("Bearer k"), Some(&other)).unwrap().id);
        assert_ne!(with_key.id, client_scope(&auth("Bearer k"), None).unwrap().id);
    }
}
