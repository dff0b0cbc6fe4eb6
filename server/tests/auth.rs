//! Authentication beyond API keys, through the real server: TLS, mutual TLS
//! with the tenant taken from the client certificate's subject or SAN,
//! certificate reload, and JWT bearer tokens (issuer, audience, expiry,
//! tenant claim). Every failure gets the same UNAUTHENTICATED answer.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{http_get, key_hash, sample, sqlite_demo, TestServer};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType};
use tonic::Code;
use weir_client::{TlsOptions, WeirClient};

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().expect("key");
    let pem = params.self_signed(&key).expect("self-signed").pem();
    Ca {
        issuer: Issuer::new(params, key),
        pem,
    }
}

/// A certificate and its key (PEM) signed by `ca`.
fn leaf(ca: &Ca, common_name: &str, sans: &[SanType], client: bool) -> (String, String) {
    leaf_valid_for(ca, common_name, sans, client, None)
}

/// The same, valid for only `valid` from now when given.
fn leaf_valid_for(
    ca: &Ca,
    common_name: &str,
    sans: &[SanType],
    client: bool,
    valid: Option<Duration>,
) -> (String, String) {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    if let Some(valid) = valid {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock");
        params.not_after = rcgen::date_time_ymd(1970, 1, 1) + now + valid;
    }
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.subject_alt_names = sans.to_vec();
    params.extended_key_usages = vec![if client {
        ExtendedKeyUsagePurpose::ClientAuth
    } else {
        ExtendedKeyUsagePurpose::ServerAuth
    }];
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, &ca.issuer).expect("signed");
    (cert.pem(), key.serialize_pem())
}

fn dns(name: &str) -> SanType {
    SanType::DnsName(name.try_into().expect("dns name"))
}

fn uri(name: &str) -> SanType {
    SanType::URI(name.try_into().expect("uri"))
}

struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Files {
        Files {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        let next = path.with_extension("next");
        std::fs::write(&next, text).expect("write");
        std::fs::rename(&next, &path).expect("rename");
        path
    }
}

fn toml_path(p: &Path) -> String {
    p.to_str().expect("utf-8 path").replace('\\', "\\\\")
}

/// Tenant `a` (API key `key-a`, identity `orders.internal`) and tenant `b`
/// (identity `spiffe://cluster/ns/b/sa/app`), each with a source named after it.
fn tenants() -> String {
    format!(
        "[tenants.a]\napi_keys = [{{ id = \"k\", sha256 = \"{}\" }}]\nclient_identities = [\"orders.internal\"]\n{}\
         [tenants.b]\nclient_identities = [\"spiffe://cluster/ns/b/sa/app\"]\n{}",
        key_hash("key-a"),
        sqlite_demo("a", "a_db"),
        sqlite_demo("b", "b_db"),
    )
}

/// A TLS server started on `weir.toml` in `files` (see `tls_section`), and
/// that file's text.
async fn tls_server(files: &Files, server_ca: &Ca, client_ca: &Ca, require: bool) -> (String, TestServer) {
    let config = format!("{}{}", tls_section(files, server_ca, client_ca, require), tenants());
    let server = TestServer::start_file(&files.write("weir.toml", &config)).await;
    (config, server)
}

fn tls_section(files: &Files, server_ca: &Ca, client_ca: &Ca, require: bool) -> String {
    let (cert, key) = leaf(server_ca, "weir", &[dns("localhost")], false);
    let cert = files.write("server.crt", &cert);
    let key = files.write("server.key", &key);
    let client_ca = files.write("client-ca.crt", &client_ca.pem);
    format!(
        "[server]\nreload_interval = \"100ms\"\n[server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nclient_ca_file = \"{}\"\nrequire_client_cert = {require}\n",
        toml_path(&cert),
        toml_path(&key),
        toml_path(&client_ca)
    )
}

fn tls(ca: &Ca, identity: Option<(String, String)>) -> TlsOptions {
    TlsOptions {
        ca_pem: Some(ca.pem.clone().into_bytes()),
        identity_pem: identity.map(|(c, k)| (c.into_bytes(), k.into_bytes())),
        domain: Some("localhost".into()),
    }
}

async fn connect(server: &TestServer, bearer: Option<&str>, tls: TlsOptions) -> Result<WeirClient, String> {
    WeirClient::connect_with(&format!("https://{}", server.host_port()), bearer, Some(tls))
        .await
        .map_err(|e| format!("{e:?}"))
}

/// The sources the caller sees: which tenant it was taken for.
async fn sources(client: &WeirClient) -> Result<Vec<String>, tonic::Status> {
    Ok(client.list_sources().await?.into_iter().map(|s| s.name).collect())
}

/// The error a call on `client` gets once a reload (checked every 100 ms)
/// stopped its connection; None if it still works after 5 s.
async fn refused_within_5s(client: &WeirClient) -> Option<tonic::Status> {
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Err(e) = sources(client).await {
            return Some(e);
        }
    }
    None
}

/// A connection that could not be made, or made but cannot call.
async fn refused(connected: Result<WeirClient, String>) -> bool {
    match connected {
        Err(_) => true,
        Ok(c) => sources(&c).await.is_err(),
    }
}

#[tokio::test]
async fn mutual_tls_takes_the_tenant_from_the_certificate() {
    let (server_ca, client_ca, other_ca) = (ca("server ca"), ca("client ca"), ca("other ca"));
    let files = Files::new();
    let config = format!("{}{}", tls_section(&files, &server_ca, &client_ca, false), tenants());
    let path = files.write("weir.toml", &config);
    let server = TestServer::start_file(&path).await;

    // Plain HTTP/2 to a TLS port does not get through.
    let plain = WeirClient::connect(&server.addr, "key-a")
        .await
        .map_err(|e| e.to_string());
    assert!(refused(plain).await, "plain HTTP/2 to a TLS port");
    // TLS without a client certificate: the API key authenticates.
    let by_key = connect(&server, Some("key-a"), tls(&server_ca, None))
        .await
        .expect("tls");
    assert_eq!(sources(&by_key).await.expect("by key"), vec!["a_db"]);
    // A client certificate alone: DNS SAN for a, URI SAN (SPIFFE) for b.
    let a_cert = leaf(&client_ca, "orders", &[dns("orders.internal")], true);
    let a = connect(&server, None, tls(&server_ca, Some(a_cert.clone())))
        .await
        .expect("mtls a");
    assert_eq!(sources(&a).await.expect("a by certificate"), vec!["a_db"]);
    let b_cert = leaf(&client_ca, "app", &[uri("spiffe://cluster/ns/b/sa/app")], true);
    let b = connect(&server, None, tls(&server_ca, Some(b_cert.clone())))
        .await
        .expect("mtls b");
    assert_eq!(sources(&b).await.expect("b by certificate"), vec!["b_db"]);
    // The subject CN counts too.
    let cn = leaf(&client_ca, "orders.internal", &[], true);
    let by_cn = connect(&server, None, tls(&server_ca, Some(cn)))
        .await
        .expect("mtls cn");
    assert_eq!(sources(&by_cn).await.expect("a by CN"), vec!["a_db"]);

    // A verified certificate that names no tenant, and a key of one tenant
    // with the certificate of another: the same answer as a bad key.
    let stranger = leaf(&client_ca, "stranger", &[dns("stranger.internal")], true);
    let stranger = connect(&server, None, tls(&server_ca, Some(stranger)))
        .await
        .expect("tls");
    let unknown = sources(&stranger).await.expect_err("no tenant");
    let mixed = connect(&server, Some("key-a"), tls(&server_ca, Some(b_cert)))
        .await
        .expect("tls");
    let mixed = sources(&mixed).await.expect_err("key and certificate disagree");
    let bad_key = connect(&server, Some("not-a-key"), tls(&server_ca, None))
        .await
        .expect("tls");
    let bad_key = sources(&bad_key).await.expect_err("bad key");
    for err in [&unknown, &mixed, &bad_key] {
        assert_eq!(err.code(), Code::Unauthenticated);
        assert_eq!(err.message(), bad_key.message(), "one answer for every failure");
    }

    // A certificate from a CA the server does not trust fails the handshake.
    let forged = leaf(&other_ca, "orders", &[dns("orders.internal")], true);
    assert!(
        refused(connect(&server, None, tls(&server_ca, Some(forged))).await).await,
        "an untrusted client certificate is refused"
    );
    server.stop().await;
}

/// A connection outlives its client certificate: once the certificate has
/// expired, calls on the connection are refused (and calls still running
/// end, as a JWT's do at its expiry).
#[tokio::test]
async fn calls_on_a_connection_stop_with_its_client_certificate() {
    let (server_ca, client_ca) = (ca("server ca"), ca("client ca"));
    let files = Files::new();
    let config = format!("{}{}", tls_section(&files, &server_ca, &client_ca, false), tenants());
    let path = files.write("weir.toml", &config);
    let server = TestServer::start_file(&path).await;
    let short = leaf_valid_for(
        &client_ca,
        "orders",
        &[dns("orders.internal")],
        true,
        Some(Duration::from_secs(3)),
    );
    let client = connect(&server, None, tls(&server_ca, Some(short)))
        .await
        .expect("mtls");
    assert_eq!(sources(&client).await.expect("while valid"), vec!["a_db"]);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let err = sources(&client).await.expect_err("expired");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    server.stop().await;
}

/// Taking a CA out of `client_ca_file` (the documented way to stop its
/// certificates) stops them on connections already open too: from its next
/// call such a connection is refused, while one whose certificate the CA now
/// in force signed goes on, and a renewal that keeps the CA changes nothing.
#[tokio::test]
async fn a_client_ca_taken_away_stops_its_certificates_on_open_connections() {
    let (server_ca, old_ca, new_ca) = (ca("server ca"), ca("old client ca"), ca("new client ca"));
    let files = Files::new();
    let (_, server) = tls_server(&files, &server_ca, &old_ca, false).await;
    let old_cert = leaf(&old_ca, "orders", &[dns("orders.internal")], true);
    let open = connect(&server, None, tls(&server_ca, Some(old_cert)))
        .await
        .expect("mtls");
    assert_eq!(sources(&open).await.expect("by certificate"), vec!["a_db"]);
    // Both CAs for a while (a rotation), then the new one alone.
    files.write("client-ca.crt", &format!("{}{}", old_ca.pem, new_ca.pem));
    let new_cert = leaf(&new_ca, "orders", &[dns("orders.internal")], true);
    let mut under_both = None;
    for _ in 0..50 {
        if let Ok(c) = connect(&server, None, tls(&server_ca, Some(new_cert.clone()))).await {
            if sources(&c).await.is_ok() {
                under_both = Some(c);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let fresh = under_both.expect("the new CA is in force");
    assert_eq!(sources(&open).await.expect("the old CA is still trusted"), vec!["a_db"]);
    files.write("client-ca.crt", &new_ca.pem);
    let e = refused_within_5s(&open)
        .await
        .expect("the removed CA's certificate is refused on its open connection");
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert_eq!(sources(&fresh).await.expect("the new CA's certificate"), vec!["a_db"]);
    server.stop().await;
}

/// Where client certificates are required, a certificate the client CA in
/// force no longer accepts is as none, also when a bearer key comes with it
/// on a connection opened before the change.
#[tokio::test]
async fn a_required_certificate_its_ca_no_longer_accepts_is_not_made_up_for_by_a_key() {
    let (server_ca, old_ca, new_ca) = (ca("server ca"), ca("old client ca"), ca("new client ca"));
    let files = Files::new();
    let (_, server) = tls_server(&files, &server_ca, &old_ca, true).await;
    let unnamed = leaf(&old_ca, "nobody", &[dns("nobody.internal")], true);
    let open = connect(&server, Some("key-a"), tls(&server_ca, Some(unnamed)))
        .await
        .expect("mtls");
    assert_eq!(sources(&open).await.expect("by key"), vec!["a_db"]);
    files.write("client-ca.crt", &new_ca.pem);
    let e = refused_within_5s(&open)
        .await
        .expect("the removed CA's certificate is refused, key or not");
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    server.stop().await;
}

#[tokio::test]
async fn a_required_client_certificate_is_required() {
    let (server_ca, client_ca) = (ca("server ca"), ca("client ca"));
    let files = Files::new();
    let (_, server) = tls_server(&files, &server_ca, &client_ca, true).await;
    assert!(
        refused(connect(&server, Some("key-a"), tls(&server_ca, None)).await).await,
        "no client certificate, no connection"
    );
    let a_cert = leaf(&client_ca, "orders", &[dns("orders.internal")], true);
    let a = connect(&server, None, tls(&server_ca, Some(a_cert)))
        .await
        .expect("mtls");
    assert_eq!(sources(&a).await.expect("a"), vec!["a_db"]);
    server.stop().await;
}

/// A TLS server that does not require client certificates, started on a
/// configuration file, and a connection made with tenant a's key alone.
struct KeyedServer {
    server_ca: Ca,
    client_ca: Ca,
    files: Files,
    config: String,
    server: TestServer,
    by_key: WeirClient,
}

async fn keyed_server() -> KeyedServer {
    let (server_ca, client_ca) = (ca("server ca"), ca("client ca"));
    let files = Files::new();
    let (config, server) = tls_server(&files, &server_ca, &client_ca, false).await;
    let by_key = connect(&server, Some("key-a"), tls(&server_ca, None))
        .await
        .expect("tls without a client certificate");
    KeyedServer {
        server_ca,
        client_ca,
        files,
        config,
        server,
        by_key,
    }
}

/// `require_client_cert` turned on by a reload (after a key leaked, say)
/// stops connections made without a certificate before it, not only new
/// ones; connections with a certificate go on.
#[tokio::test]
async fn a_client_certificate_required_by_reload_stops_open_connections_without_one() {
    let KeyedServer {
        server_ca,
        client_ca,
        files,
        config,
        server,
        by_key,
    } = keyed_server().await;
    assert_eq!(sources(&by_key).await.expect("by key"), vec!["a_db"]);
    let a_cert = leaf(&client_ca, "orders", &[dns("orders.internal")], true);
    let by_cert = connect(&server, None, tls(&server_ca, Some(a_cert)))
        .await
        .expect("mtls");
    let required = config.replace("require_client_cert = false", "require_client_cert = true");
    assert_ne!(required, config);
    files.write("weir.toml", &required);
    let e = refused_within_5s(&by_key)
        .await
        .expect("the open connection without a certificate is refused");
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert_eq!(sources(&by_cert).await.expect("with a certificate"), vec!["a_db"]);
    server.stop().await;
}

/// A reload that requires client certificates against a CA file that
/// cannot be read is refused as a whole: nothing of it applies (a tenant it
/// adds does not exist), and keys go on working until it can be applied.
#[tokio::test]
async fn a_client_certificate_requirement_that_cannot_be_applied_refuses_the_reload() {
    let KeyedServer {
        server_ca,
        files,
        config,
        server,
        by_key,
        ..
    } = keyed_server().await;
    let tenant_c = format!(
        "[tenants.c]\napi_keys = [{{ id = \"k\", sha256 = \"{}\" }}]\n{}",
        key_hash("key-c"),
        sqlite_demo("c", "c_db")
    );
    let ca_file = toml_path(&files.path("client-ca.crt"));
    let required = format!("{config}{tenant_c}").replace("require_client_cert = false", "require_client_cert = true");
    files.write(
        "weir.toml",
        &required.replace(&ca_file, &toml_path(&files.path("missing-ca.crt"))),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let c = connect(&server, Some("key-c"), tls(&server_ca, None))
        .await
        .expect("tls without a client certificate");
    let e = sources(&c)
        .await
        .expect_err("the reload that adds tenant c was refused");
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert_eq!(sources(&by_key).await.expect("keys still work"), vec!["a_db"]);
    // Once the CA file is there, the whole reload applies.
    files.write("weir.toml", &required);
    let e = refused_within_5s(&by_key).await.expect("now a certificate is required");
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    server.stop().await;
}

/// Renews the server's certificate as cert-manager does (both files
/// replaced, signed by `ca`); a connection that gets the new one, within 5 s.
async fn renew(server: &TestServer, files: &Files, ca: &Ca) -> WeirClient {
    let (cert, key) = leaf(ca, "weir", &[dns("localhost")], false);
    files.write("server.key", &key);
    files.write("server.crt", &cert);
    for _ in 0..50 {
        if let Ok(c) = connect(server, Some("key-a"), tls(ca, None)).await {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("new connections never got the renewed certificate");
}

#[tokio::test]
async fn a_renewed_server_certificate_is_used_for_new_connections() {
    let (old_ca, new_ca, client_ca) = (ca("old ca"), ca("new ca"), ca("client ca"));
    let files = Files::new();
    let (_, server) = tls_server(&files, &old_ca, &client_ca, false).await;
    let before = connect(&server, Some("key-a"), tls(&old_ca, None))
        .await
        .expect("old certificate");
    sources(&before).await.expect("works");
    assert!(
        connect(&server, Some("key-a"), tls(&new_ca, None)).await.is_err(),
        "not yet the new certificate"
    );
    let renewed = renew(&server, &files, &new_ca).await;
    sources(&renewed).await.expect("works");
    // An https:// address without a CA trusts the public authorities only,
    // which did not sign this certificate.
    let public = WeirClient::connect_with(&format!("https://{}", server.host_port()), Some("key-a"), None)
        .await
        .map_err(|e| format!("{e:?}"));
    assert!(
        refused(public).await,
        "a certificate of a private CA is not trusted by default"
    );
    // The connection made before the renewal goes on.
    sources(&before).await.expect("an open connection keeps working");
    server.stop().await;
}

/// TLS is turned off only by a restart: a reload of a file without
/// `[server.tls]` keeps the TLS section in force and its files watched, so a
/// certificate renewed afterwards is still put in place (it was served
/// until it expired).
#[tokio::test]
async fn a_reload_without_tls_still_renews_the_certificate() {
    let (old_ca, new_ca, client_ca) = (ca("old ca"), ca("new ca"), ca("client ca"));
    let files = Files::new();
    let (_, server) = tls_server(&files, &old_ca, &client_ca, false).await;
    // Without client identities too, which need the TLS section to check.
    let key_only = format!(
        "[server]\nreload_interval = \"100ms\"\n[tenants.a]\napi_keys = [{{ id = \"k\", sha256 = \"{}\" }}]\n{}",
        key_hash("key-a"),
        sqlite_demo("a", "a_db"),
    );
    files.write("weir.toml", &key_only);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let before = connect(&server, Some("key-a"), tls(&old_ca, None))
        .await
        .expect("still TLS, with the old certificate");
    sources(&before).await.expect("works");
    let renewed = renew(&server, &files, &new_ca).await;
    sources(&renewed).await.expect("works");
    server.stop().await;
}

/// A reload refused for its tenants leaves the certificate as it was too:
/// nothing of a refused file is put in force.
#[tokio::test]
async fn a_refused_reload_keeps_the_old_certificate() {
    let (old_ca, new_ca, client_ca) = (ca("old ca"), ca("new ca"), ca("client ca"));
    let files = Files::new();
    let config = format!("{}{}", tls_section(&files, &old_ca, &client_ca, false), tenants());
    let path = files.write("weir.toml", &config);
    let server = TestServer::start_file(&path).await;
    let rejected = || async {
        let (_, metrics) = http_get(&server.metrics_url, "/metrics").await;
        sample(&metrics, "weir_config_reloads_total", &[("outcome", "rejected")])
    };
    let before = rejected().await;
    // New certificate files and a source whose password cannot be read.
    let (cert, key) = leaf(&new_ca, "weir", &[dns("localhost")], false);
    files.write("server.key", &key);
    files.write("server.crt", &cert);
    let broken = format!(
        "{config}[tenants.a.sources.pg]\nengine = \"postgres\"\nhost = \"127.0.0.1\"\nuser = \"u\"\npassword_env = \"WEIR_TEST_NEVER_SET\"\n"
    );
    files.write("weir.toml", &broken);
    for _ in 0..50 {
        if rejected().await > before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(rejected().await > before, "the reload was refused");
    assert!(
        connect(&server, Some("key-a"), tls(&new_ca, None)).await.is_err(),
        "the refused file's certificate is not in force"
    );
    let old = connect(&server, Some("key-a"), tls(&old_ca, None))
        .await
        .expect("the old certificate");
    sources(&old).await.expect("works");
    server.stop().await;
}

/// A renewed certificate that does not fit its key (the certificate written
/// before its key) keeps the files in force, and does not hold up the rest
/// of the reload: a key added in the same change works.
#[tokio::test]
async fn unusable_tls_files_keep_the_old_ones_and_the_rest_applies() {
    let (old_ca, new_ca, client_ca) = (ca("old ca"), ca("new ca"), ca("client ca"));
    let files = Files::new();
    let (config, server) = tls_server(&files, &old_ca, &client_ca, false).await;
    // Serving (its files read) before they change.
    let a = connect(&server, Some("key-a"), tls(&old_ca, None)).await.expect("a");
    sources(&a).await.expect("a works");
    let (cert, _key) = leaf(&new_ca, "weir", &[dns("localhost")], false);
    files.write("server.crt", &cert);
    let added = config.replace(
        "[tenants.b]\n",
        &format!(
            "[tenants.b]\napi_keys = [{{ id = \"kb\", sha256 = \"{}\" }}]\n",
            key_hash("key-b")
        ),
    );
    assert_ne!(added, config);
    files.write("weir.toml", &added);
    let mut applied = None;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Ok(b) = connect(&server, Some("key-b"), tls(&old_ca, None)).await {
            if sources(&b).await.is_ok() {
                applied = Some(b);
                break;
            }
        }
    }
    let b = applied.expect("the new key works, over the certificate in force");
    assert_eq!(sources(&b).await.expect("b"), vec!["b_db"]);
    assert!(
        connect(&server, Some("key-b"), tls(&new_ca, None)).await.is_err(),
        "the unusable certificate is not in force"
    );
    server.stop().await;
}

mod jwt {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    use serde_json::{json, Value};

    use super::*;

    fn now() -> i64 {
        chrono::Utc::now().timestamp()
    }

    /// An identity provider's ES256 key, and a server that trusts it (no leeway).
    struct Issuer {
        key: EncodingKey,
        /// The public key in PEM, which a forger might try as an HMAC secret.
        public: String,
        server: TestServer,
        _files: Files,
    }

    impl Issuer {
        async fn start() -> Issuer {
            Self::start_with("").await
        }

        /// As `start`, with `more` configuration after the tenants.
        async fn start_with(more: &str) -> Issuer {
            let signing = KeyPair::generate().expect("key");
            let files = Files::new();
            let public = files.write("issuer.pub", &signing.public_key_pem());
            let config = format!(
                "[auth.jwt]\nissuer = \"https://id.example\"\naudience = \"weir\"\nalgorithm = \"ES256\"\npublic_key_file = \"{}\"\nleeway = \"0s\"\n{}{more}",
                toml_path(&public),
                // Without TLS, so without client identities (refused without a client CA).
                tenants()
                    .lines()
                    .filter(|l| !l.starts_with("client_identities"))
                    .map(|l| format!("{l}\n"))
                    .collect::<String>()
            );
            Issuer {
                key: EncodingKey::from_ec_pem(signing.serialize_pem().as_bytes()).expect("encoding key"),
                public: signing.public_key_pem(),
                server: TestServer::start(&config).await,
                _files: files,
            }
        }

        fn token(&self, claims: &Value) -> String {
            encode(&Header::new(Algorithm::ES256), claims, &self.key).expect("token")
        }

        /// Tenant `b`'s claims, valid for `seconds` more.
        fn claims(seconds: i64) -> Value {
            json!({"iss": "https://id.example", "aud": "weir", "exp": now() + seconds, "sub": "svc-1", "tenant": "b"})
        }

        async fn client(&self, token: String) -> WeirClient {
            WeirClient::connect_with(&self.server.addr, Some(&token), None)
                .await
                .expect("connect")
        }
    }

    #[tokio::test]
    async fn tokens_are_checked_for_signature_issuer_audience_expiry_and_tenant() {
        // ES256: the issuer's public key in the configuration, as with an identity provider.
        let idp = Issuer::start().await;
        let token = |claims: Value| idp.token(&claims);
        let good = Issuer::claims(300);
        let client = |token: String| idp.client(token);
        let b = client(token(good.clone())).await;
        assert_eq!(sources(&b).await.expect("valid token"), vec!["b_db"]);

        let bad_key = sources(&client("not-a-key".into()).await).await.expect_err("bad key");
        let mut cases = Vec::new();
        let mut expired = good.clone();
        expired["exp"] = json!(now() - 5);
        cases.push(("expired", token(expired)));
        let mut audience = good.clone();
        audience["aud"] = json!("someone-else");
        cases.push(("wrong audience", token(audience)));
        let mut issuer = good.clone();
        issuer["iss"] = json!("https://evil.example");
        cases.push(("wrong issuer", token(issuer)));
        let mut stranger = good.clone();
        stranger["tenant"] = json!("nobody");
        cases.push(("unknown tenant", token(stranger)));
        let other = KeyPair::generate().expect("key");
        let forged_key = EncodingKey::from_ec_pem(other.serialize_pem().as_bytes()).expect("key");
        cases.push((
            "another signer",
            encode(&Header::new(Algorithm::ES256), &good, &forged_key).expect("token"),
        ));
        let hmac = EncodingKey::from_secret(idp.public.as_bytes());
        cases.push((
            "algorithm switched to HS256",
            encode(&Header::new(Algorithm::HS256), &good, &hmac).expect("token"),
        ));
        for (what, token) in cases {
            let err = sources(&client(token).await).await.expect_err(what);
            assert_eq!(err.code(), Code::Unauthenticated, "{what}");
            assert_eq!(err.message(), bad_key.message(), "{what}: one answer for every failure");
        }
        // API keys keep working beside JWTs.
        let a = WeirClient::connect(&idp.server.addr, "key-a").await.expect("connect");
        assert_eq!(sources(&a).await.expect("key"), vec!["a_db"]);
        idp.server.stop().await;
    }

    /// A token is checked when a call starts, and its `exp` also ends the
    /// calls it started: a result stream that would never end and a
    /// statement that would never finish both end with UNAUTHENTICATED
    /// (`CREDENTIAL_EXPIRED`). From then on the token is refused as any bad
    /// credential is.
    #[tokio::test]
    async fn calls_made_with_a_token_end_when_it_expires() {
        let issuer = Issuer::start().await;
        let client = issuer.client(issuer.token(&Issuer::claims(3))).await;
        let endless = "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n)";
        let mut stream = client
            .execute_stream_raw("b_db", &format!("{endless} SELECT x FROM n"), vec![])
            .await
            .expect("stream");
        let count = tokio::spawn({
            let client = client.clone();
            async move {
                client
                    .execute("b_db", &format!("{endless} SELECT count(*) FROM n"), vec![])
                    .await
            }
        });
        let mut rows = 0usize;
        let ended = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match stream.next_batch().await {
                    Ok(Some(batch)) => rows += batch.iter().count(),
                    Ok(None) => panic!("an endless stream ended as if complete after {rows} rows"),
                    Err(e) => break e,
                }
            }
        })
        .await
        .expect("the stream ends within 30 s of a token valid for 3");
        assert!(rows > 0, "the stream ran before the token expired");
        let expired =
            |e: &tonic::Status| e.code() == Code::Unauthenticated && common::reason(e) == "CREDENTIAL_EXPIRED";
        assert!(expired(&ended), "{ended:?}");
        let counted = count.await.expect("join").expect_err("an endless count");
        assert!(expired(&counted), "{counted:?}");
        let refused = sources(&client).await.expect_err("an expired token");
        assert_eq!(refused.code(), Code::Unauthenticated);
        assert_eq!(common::reason(&refused), "UNAUTHENTICATED");
        issuer.server.stop().await;
    }

    /// A token that expires while its call waits for its turn at the
    /// tenant's rate: the call is refused with CREDENTIAL_EXPIRED, even one
    /// (`BeginTransaction`) that would run to its end once started.
    #[tokio::test]
    async fn a_call_whose_token_expires_while_it_waits_never_runs() {
        let paced = "[tenants.b.limits]\nrequests_per_second = 1\nburst = 1\nmax_rate_wait = \"10s\"\n";
        let issuer = Issuer::start_with(paced).await;
        // Valid for one to two seconds: the clock's second decides.
        let client = issuer.client(issuer.token(&Issuer::claims(2))).await;
        let begin = || {
            let client = client.clone();
            async move {
                client
                    // Read-only: SQLite's write transactions would queue on its lock.
                    .begin("b_db", weir_client::weir_proto::v1::IsolationLevel::Unspecified, true)
                    .await
            }
        };
        // The bucket's one token: each later call waits a second more than the one before.
        begin().await.expect("the first call, at once");
        let waiting: Vec<_> = (0..3).map(|_| tokio::spawn(begin())).collect();
        let mut expired = 0;
        for call in waiting {
            match call.await.expect("join") {
                Ok(_) => {}
                Err(e) => {
                    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
                    assert_eq!(common::reason(&e), "CREDENTIAL_EXPIRED", "{e:?}");
                    expired += 1;
                }
            }
        }
        assert!(expired >= 1, "the call that waited 3 s outlived its token");
        issuer.server.stop().await;
    }
}

/// The keepalive timer `ss` shows on the server's side of connections to
/// `port` ("" when none has one).
fn keepalive_timers(port: &str) -> String {
    let out = std::process::Command::new("ss")
        .args(["-tnoH", "state", "established", &format!("( sport = :{port} )")])
        .output()
        .expect("run ss (iproute2)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split("timer:(keepalive,").nth(1))
        .map(|t| t.split(',').next().unwrap_or_default().to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Client connections, plain and TLS, carry TCP keepalives, so a client that
/// vanished without closing (its node lost) does not hold a load's
/// transaction or a consumer's partitions until restart. Seen from outside
/// with `ss`: the server side of the connection runs a keepalive timer no
/// longer than `keepalive_time`.
#[tokio::test]
async fn client_connections_carry_tcp_keepalives() {
    let keepalive = "[server]\nkeepalive_time = \"7s\"\n";
    let plain = TestServer::start(&format!(
        "{keepalive}{}",
        common::tenant("a", "", &sqlite_demo("a", "a_db"))
    ))
    .await;
    let client = plain.client("key-a").await;
    sources(&client).await.expect("plain call");
    let files = Files::new();
    let (server_ca, client_ca) = (ca("server ca"), ca("client ca"));
    let section = tls_section(&files, &server_ca, &client_ca, false).replace("[server]\n", keepalive);
    let path = files.write("weir.toml", &format!("{section}{}", tenants()));
    let secure = TestServer::start_file(&path).await;
    let over_tls = connect(&secure, Some("key-a"), tls(&server_ca, None))
        .await
        .expect("tls");
    sources(&over_tls).await.expect("tls call");
    for server in [&plain, &secure] {
        let port = server.host_port().rsplit(':').next().unwrap_or_default();
        let timers = keepalive_timers(port);
        // ss prints "119min", "29sec" or "6.868ms" (its units, as it prints them).
        let seconds = timers
            .split_whitespace()
            .next()
            .and_then(|t| {
                let (number, scale) = [("min", 60.0), ("sec", 1.0), ("ms", 0.001)]
                    .into_iter()
                    .find_map(|(unit, scale)| t.strip_suffix(unit).map(|n| (n, scale)))?;
                number.parse::<f64>().ok().map(|n| n * scale)
            })
            .unwrap_or_else(|| panic!("no keepalive timer on port {port}: {timers:?}"));
        assert!(seconds <= 7.0, "keepalive after {seconds} s, not within keepalive_time");
    }
}
