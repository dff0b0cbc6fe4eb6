//! TLS to PostgreSQL through rustls (no OpenSSL), for pooled, shared and
//! change-stream sessions alike: `tls = true` requires it and verifies the
//! server's certificate and name (libpq's `sslmode=verify-full`) against the
//! public web roots or `tls_ca_file`; `trust_server_certificate` still
//! encrypts but accepts any certificate (`sslmode=require`).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use tokio_rustls::TlsConnector;

use crate::config::SourceConfig;

/// Makes a TLS connector per server name; cheap to clone.
#[derive(Clone)]
pub struct Tls {
    connector: TlsConnector,
}

impl Tls {
    /// The source's TLS settings, or `None` when it connects in plaintext.
    pub fn new(config: &SourceConfig) -> Result<Option<Self>, String> {
        if !config.tls {
            return Ok(None);
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let client = if config.trust_server_certificate {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
                .with_no_client_auth()
        } else {
            let mut roots = RootCertStore::empty();
            match &config.tls_ca_file {
                Some(path) => {
                    for cert in crate::pem::certificates(path, "tls_ca_file")? {
                        roots
                            .add(cert)
                            .map_err(|e| format!("tls_ca_file {}: {e}", path.display()))?;
                    }
                }
                None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        };
        Ok(Some(Self {
            connector: TlsConnector::from(Arc::new(client)),
        }))
    }

    /// Wraps `stream` in TLS to `host`, verifying the server as configured.
    pub async fn connect<S>(&self, host: &str, stream: S) -> io::Result<tokio_rustls::client::TlsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let name =
            ServerName::try_from(host.to_string()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        self.connector.connect(name, stream).await.map_err(rejected)
    }
}

impl<S> MakeTlsConnect<S> for Tls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Stream<S>;
    type TlsConnect = ToHost;
    type Error = io::Error;

    fn make_tls_connect(&mut self, host: &str) -> io::Result<ToHost> {
        Ok(ToHost {
            tls: self.clone(),
            host: host.to_string(),
        })
    }
}

/// A rejected certificate says why without naming hosts; other errors pass as they are.
fn rejected(e: io::Error) -> io::Error {
    match crate::backend::tls::in_io(&e).and_then(crate::backend::tls::rejection) {
        Some(why) => io::Error::new(io::ErrorKind::InvalidData, why),
        None => e,
    }
}

/// A connector for one server name.
pub struct ToHost {
    tls: Tls,
    host: String,
}

impl<S> TlsConnect<S> for ToHost
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Stream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Stream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move { Ok(Stream(self.tls.connect(&self.host, stream).await?)) })
    }
}

/// A TLS session, as tokio-postgres takes it.
pub struct Stream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Stream<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Stream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for Stream<S> {
    /// No channel binding: SCRAM then authenticates without it, which every
    /// server accepts unless told to require it (`channel_binding=require`
    /// is a client setting of libpq, not a server one).
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

/// `trust_server_certificate`: any certificate is accepted; the handshake's
/// signatures are still checked, so the session is encrypted to whoever
/// holds the certificate's key.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn source(keys: &str) -> Result<crate::config::SourceConfig, String> {
        let toml = format!("[tenants.a.sources.s]\nengine = \"postgres\"\nhost = \"h\"\nuser = \"u\"\n{keys}");
        Config::from_toml(&toml)
            .map(|c| c.tenants["a"].sources["s"].clone())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn tls_settings_are_checked_and_their_files_read() {
        assert!(super::Tls::new(&source("").expect("plain")).expect("no TLS").is_none());
        assert!(super::Tls::new(&source("tls = true").expect("verify-full"))
            .expect("web roots")
            .is_some());
        let trusting = source("tls = true\ntrust_server_certificate = true").expect("require");
        assert!(super::Tls::new(&trusting).expect("any certificate").is_some());
        for (keys, named) in [
            ("trust_server_certificate = true", "trust_server_certificate"),
            ("tls_ca_file = \"/x.pem\"", "tls_ca_file"),
            (
                "tls = true\ntrust_server_certificate = true\ntls_ca_file = \"/x.pem\"",
                "tls_ca_file",
            ),
        ] {
            let err = source(keys).expect_err(keys);
            assert!(err.contains(named), "{keys}: {err}");
        }
        let socket =
            "[tenants.a.sources.s]\nengine = \"postgres\"\nhost = \"/run/postgresql\"\nuser = \"u\"\ntls = true\n";
        let err = Config::from_toml(socket)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("tenants.a.sources.s.tls") && err.contains("Unix socket"),
            "{err}"
        );
        let missing = source("tls = true\ntls_ca_file = \"/nonexistent/ca.pem\"").expect("checked when read");
        let err = super::Tls::new(&missing).err().unwrap_or_default();
        assert!(
            err.contains("tls_ca_file") && err.contains("/nonexistent/ca.pem"),
            "{err}"
        );
    }
}
