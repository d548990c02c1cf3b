//! TLS upstreams, on the suite's engine: a certificate authority made at run time, a TLS front
//! before the mock upstream, and `upstreams.<name>.ca_file` (issue 19).
//!
//! The front terminates TLS with a leaf certificate of the test's authority and relays the bytes
//! to a mock upstream (which speaks HTTP/1.1 and h2), recording the SNI and ALPN of each
//! handshake it completes.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
};

use base64::Engine as _;
use http::{Method, StatusCode, Version};
use llmgate::mock_upstream::MockUpstream;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_rustls::TlsAcceptor;

use crate::support::*;

const CHAT: &str = "/v1/chat/completions";
const H2: &[u8] = b"h2";
const HTTP1: &[u8] = b"http/1.1";

/// A certificate authority of the test's own, trusted nowhere else.
struct Authority {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Authority {
    fn new() -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let pem = params.self_signed(&key).unwrap().pem();
        Self { issuer: Issuer::new(params, key), pem }
    }

    /// A server certificate for `names`, signed by this authority.
    fn leaf(&self, names: &[&str]) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let names = names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let cert = CertificateParams::new(names).unwrap().signed_by(&key, &self.issuer).unwrap();
        Leaf { cert: cert.der().clone(), key: PrivatePkcs8KeyDer::from(key.serialize_der()).into() }
    }

    /// The authority's certificate in a PEM file under `dir`, for `ca_file`.
    fn ca_file(&self, dir: &TempDir) -> String {
        let path = dir.0.join("ca.pem");
        std::fs::write(&path, &self.pem).unwrap();
        path.display().to_string()
    }
}

struct Leaf {
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
}

/// What the front saw of one handshake.
#[derive(Clone, Debug, PartialEq)]
struct Handshake {
    sni: Option<String>,
    alpn: Option<Vec<u8>>,
}

/// The first address `localhost` resolves to (IPv4 or IPv6): where the fronts listen, so that
/// both engines reach them by name.
async fn localhost() -> IpAddr {
    tokio::net::lookup_host("localhost:0").await.unwrap().next().unwrap().ip()
}

/// A TLS front before a mock upstream, on [`localhost`].
struct TlsFront {
    addr: SocketAddr,
    handshakes: Arc<Mutex<Vec<Handshake>>>,
    task: JoinHandle<()>,
}

impl TlsFront {
    /// Serves `leaf`, offering the ALPN protocols `alpn` (in the server's order of preference).
    async fn start(backend: &MockUpstream, leaf: Leaf, alpn: &[&[u8]]) -> Self {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![leaf.cert], leaf.key)
            .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind((localhost().await, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handshakes = Arc::new(Mutex::new(Vec::new()));
        let backend = backend.addr();
        let seen = handshakes.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, seen) = (acceptor.clone(), seen.clone());
                tokio::spawn(async move {
                    // A client that refuses the certificate ends the handshake: nothing to relay.
                    let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                    let session = tls.get_ref().1;
                    let handshake = Handshake {
                        sni: session.server_name().map(str::to_string),
                        alpn: session.alpn_protocol().map(<[u8]>::to_vec),
                    };
                    seen.lock().unwrap().push(handshake);
                    let mut mock = tokio::net::TcpStream::connect(backend).await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut mock).await;
                });
            }
        });
        Self { addr, handshakes, task }
    }

    /// The base URL to configure: `https://localhost:{port}/v1`.
    fn url(&self) -> String {
        format!("https://localhost:{}/v1", self.addr.port())
    }

    fn handshakes(&self) -> Vec<Handshake> {
        self.handshakes.lock().unwrap().clone()
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A gateway whose one upstream `mock` is `front`, trusting `ca_file` if given.
async fn gateway(front: &TlsFront, ca_file: Option<&str>, extra_yaml: &str) -> TestGateway {
    gateway_at(&front.url(), ca_file, extra_yaml).await
}

async fn gateway_at(url: &str, ca_file: Option<&str>, extra_yaml: &str) -> TestGateway {
    let ca = ca_file.map_or(String::new(), |path| format!(", ca_file: \"{path}\""));
    let yaml = format!("upstreams:\n  mock: {{url: \"{url}\", mode: openai{ca}}}\n{extra_yaml}");
    TestGateway::start(&yaml, &[]).await
}

/// Asserts a 502 whose message is `Upstream unavailable: TLS handshake with {front} failed: {why}`
/// (the same words on both engines).
fn assert_handshake_failed(reply: &Reply, front: &TlsFront, why: &str) {
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());
    let body = reply.json();
    assert_eq!(body["error"]["code"], "upstream_unavailable", "{body}");
    let expected = format!("Upstream unavailable: TLS handshake with localhost:{} failed: {why}", front.addr.port());
    assert_eq!(body["error"]["message"], expected.as_str(), "{body}");
}

#[tokio::test]
async fn a_private_authority_in_ca_file_is_trusted_for_chat_streams_and_the_catch_all() {
    let authority = Authority::new();
    let dir = TempDir::new();
    let mock = mock().await;
    let front = TlsFront::start(&mock, authority.leaf(&["localhost"]), &[HTTP1]).await;
    let gw = gateway(&front, Some(&authority.ca_file(&dir)), "").await;

    let reply = post_json(&gw.url(CHAT), &[], &chat_body("gpt-4o", false)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["choices"][0]["message"]["content"], "This is a mock completion.");

    let reply = post_json(&gw.url(CHAT), &[], &chat_body("gpt-4o", true)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let text = reply.text();
    assert_eq!(text.matches("\"delta\":{\"content\":\"tok").count(), 5, "{text}");
    assert!(text.contains("\"usage\""), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");

    let reply = send(Method::GET, &gw.url("/v1/models?limit=2"), &[], "").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["uri"], "/v1/models?limit=2");

    let requests = mock.requests();
    assert_eq!(requests.len(), 3);
    assert!(requests.iter().all(|r| r.version == Version::HTTP_11), "{requests:?}");
    // SNI is the URL's host; ALPN offered http/1.1 (the front's only protocol).
    let handshakes = front.handshakes();
    assert!(!handshakes.is_empty());
    let expected = Handshake { sni: Some("localhost".into()), alpn: Some(HTTP1.to_vec()) };
    assert!(handshakes.iter().all(|h| *h == expected), "{handshakes:?}");
}

#[tokio::test]
async fn h2_is_used_where_the_upstream_offers_it() {
    let authority = Authority::new();
    let dir = TempDir::new();
    let mock = mock().await;
    let front = TlsFront::start(&mock, authority.leaf(&["localhost"]), &[H2, HTTP1]).await;
    let gw = gateway(&front, Some(&authority.ca_file(&dir)), "").await;

    for stream in [false, true] {
        let reply = post_json(&gw.url(CHAT), &[], &chat_body("gpt-4o", stream)).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    let reply = send(Method::POST, &gw.url("/v1/embeddings"), &[("content-type", "application/json")], "{}").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());

    // A request body of unknown size is streamed as h2 DATA frames.
    let echo = put_streamed_body(&gw.url("/v1/files/abc")).await;
    assert_eq!(echo["body"], "one two three");

    let requests = mock.requests();
    assert_eq!(requests.len(), 4);
    assert!(requests.iter().all(|r| r.version == Version::HTTP_2), "{requests:?}");
    assert!(front.handshakes().iter().all(|h| h.alpn.as_deref() == Some(H2)), "{:?}", front.handshakes());
}

#[tokio::test]
async fn an_ip_address_upstream_is_verified_against_the_certificates_ip_names() {
    let authority = Authority::new();
    let dir = TempDir::new();
    let mock = mock().await;
    let ip = localhost().await.to_string();
    let front = TlsFront::start(&mock, authority.leaf(&[ip.as_str()]), &[HTTP1]).await;
    let gw = gateway_at(&format!("https://{}/v1", front.addr), Some(&authority.ca_file(&dir)), "").await;

    let reply = post_json(&gw.url(CHAT), &[], &chat_body("gpt-4o", false)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    // No SNI for an IP address.
    assert_eq!(front.handshakes(), [Handshake { sni: None, alpn: Some(HTTP1.to_vec()) }]);
}

#[tokio::test]
async fn without_ca_file_the_private_authority_is_an_unknown_issuer() {
    let authority = Authority::new();
    let mock = mock().await;
    let front = TlsFront::start(&mock, authority.leaf(&["localhost"]), &[HTTP1]).await;
    let gw = gateway(&front, None, "").await;

    let why = "invalid peer certificate: UnknownIssuer";
    for stream in [false, true] {
        let reply = post_json(&gw.url(CHAT), &[], &chat_body("gpt-4o", stream)).await;
        assert_handshake_failed(&reply, &front, why);
    }
    let reply = send(Method::GET, &gw.url("/v1/models"), &[], "").await;
    assert_handshake_failed(&reply, &front, why);
    assert!(mock.requests().is_empty(), "nothing reached the upstream");
    assert!(front.handshakes().is_empty(), "no handshake completed");
}

#[tokio::test]
async fn a_certificate_for_another_name_is_refused_even_from_a_trusted_authority() {
    let authority = Authority::new();
    let dir = TempDir::new();
    let mock = mock().await;
    let front = TlsFront::start(&mock, authority.leaf(&["api.example.com"]), &[HTTP1]).await;
    let gw = gateway(&front, Some(&authority.ca_file(&dir)), "").await;

    let reply = post_json(&gw.url(CHAT), &[], &chat_body("gpt-4o", false)).await;
    let why = "invalid peer certificate: certificate not valid for name \"localhost\"; certificate is only valid \
               for DnsName(\"api.example.com\")";
    assert_handshake_failed(&reply, &front, why);
    assert!(mock.requests().is_empty(), "nothing reached the upstream");
}

#[tokio::test]
async fn an_allowlisted_https_encoded_base_url_is_reached_with_the_upstreams_authority() {
    let authority = Authority::new();
    let dir = TempDir::new();
    let (configured, chosen) = (mock().await, mock().await);
    let configured_front = TlsFront::start(&configured, authority.leaf(&["localhost"]), &[HTTP1]).await;
    let chosen_front = TlsFront::start(&chosen, authority.leaf(&["localhost"]), &[H2, HTTP1]).await;
    let allow = format!("encoded_base_url: {{allow: [\"{}\"]}}\n", chosen_front.url());
    let gw = gateway(&configured_front, Some(&authority.ca_file(&dir)), &allow).await;

    let ids = "/rollout_id/r1/invocation_id/i1/experiment_id/e1/run_id/u1/row_id/w1";
    let encoded = base64::engine::general_purpose::URL_SAFE.encode(chosen_front.url());
    let path = format!("/v1{ids}/encoded_base_url/{encoded}/chat/completions");
    for stream in [false, true] {
        let reply =
            post_json(&gw.url(&path), &[("authorization", "Bearer sk-client")], &chat_body("gpt-4o", stream)).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    let seen = chosen.requests();
    assert_eq!(seen.len(), 2, "the chosen host got both requests");
    assert!(seen.iter().all(|r| r.uri == "/v1/chat/completions" && r.version == Version::HTTP_2), "{seen:?}");
    assert!(configured.requests().is_empty(), "the configured upstream is not called");

    // The configured upstream's own requests still go to it.
    let reply = post_json(&gw.url(CHAT), &[], &chat_body("gpt-4o", false)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(configured.requests().len(), 1);
}

#[tokio::test]
async fn check_config_names_a_bad_ca_file_and_its_key() {
    let dir = TempDir::new();
    let not_pem = dir.0.join("not.pem");
    std::fs::write(&not_pem, "not a certificate\n").unwrap();
    let yaml = format!(
        "upstreams:\n  private:\n    url: \"https://localhost:1/v1\"\n    ca_file: \"{}\"\n",
        not_pem.display()
    );
    let config = dir.0.join("llmgate.yaml");
    std::fs::write(&config, yaml).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_llmgate"))
        .arg("check-config")
        .arg("--config")
        .arg(&config)
        .env_clear()
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let expected = format!(
        "{}:4:14: upstreams.private.ca_file: upstream 'private': ca_file {}: not a PEM certificate file",
        config.display(),
        not_pem.display()
    );
    assert!(stderr.contains(&expected), "{stderr}\n want {expected}");
}
