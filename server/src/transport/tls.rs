//! Server TLS that can be reloaded: every handshake takes the current
//! rustls configuration, so a renewed certificate (a cert-manager Secret
//! update) applies to new connections while open ones keep theirs. The
//! names of a verified client certificate (subject CN, DNS, URI and email
//! SANs) travel with the connection for mutual TLS.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use parking_lot::RwLock;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::config::TlsConfig;

/// A handshake that takes longer is dropped, so a silent peer holds nothing.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The current server configuration; `reload` swaps it.
pub struct TlsReloader {
    current: RwLock<Arc<ServerConfig>>,
}

/// Reads the files of `config` into a rustls configuration (HTTP/2 only).
pub fn server_config(config: &TlsConfig) -> Result<ServerConfig, String> {
    let chain = crate::pem::certificates(&config.cert_file, "server.tls.cert_file")?;
    let key = PrivateKeyDer::from_pem_file(&config.key_file)
        .map_err(|e| format!("server.tls.key_file {}: {e}", config.key_file.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match &config.client_ca_file {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in crate::pem::certificates(path, "server.tls.client_ca_file")? {
                roots
                    .add(cert)
                    .map_err(|e| format!("server.tls.client_ca_file {}: {e}", path.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if config.require_client_cert {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(verifier.build().map_err(|e| e.to_string())?)
        }
        None => builder.with_no_client_auth(),
    };
    let mut server = builder
        .with_single_cert(chain, key)
        .map_err(|e| format!("server.tls: the key does not fit the certificate: {e}"))?;
    server.alpn_protocols = vec![b"h2".to_vec()];
    Ok(server)
}

impl TlsReloader {
    pub fn new(config: &TlsConfig) -> Result<Self, String> {
        Ok(Self {
            current: RwLock::new(Arc::new(server_config(config)?)),
        })
    }

    /// Rereads the files; on any error the configuration in force stays.
    /// Serves new connections with `fresh` (from `server_config`).
    pub fn install(&self, fresh: ServerConfig) {
        *self.current.write() = Arc::new(fresh);
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.read().clone())
    }
}

/// Who is on the other end of a connection, in the request extensions of its calls.
#[derive(Clone, Debug, Default)]
pub struct PeerInfo {
    pub addr: Option<SocketAddr>,
    /// Names of the verified client certificate; empty without one.
    pub identities: Arc<[String]>,
    /// When that certificate stops being valid: the connection may outlive it.
    pub not_after: Option<SystemTime>,
}

/// The subject CNs and the DNS, URI and email SANs of a certificate, and
/// when it stops being valid; no names for one that does not parse.
pub fn certificate_facts(der: &[u8]) -> (Vec<String>, Option<SystemTime>) {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return (Vec::new(), None);
    };
    let not_after = u64::try_from(cert.validity().not_after.timestamp())
        .ok()
        .and_then(|seconds| SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(seconds)));
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_string))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        use x509_parser::extensions::GeneralName;
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(s) | GeneralName::URI(s) | GeneralName::RFC822Name(s) => {
                    names.push((*s).to_string());
                }
                _ => {}
            }
        }
    }
    (names, not_after)
}

/// A TLS connection with its peer, for tonic.
pub struct TlsConn {
    inner: TlsStream<TcpStream>,
    peer: PeerInfo,
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Accepts TCP connections and hands the ones that complete a TLS handshake
/// to the server. Handshakes run on tasks of their own, so a slow one does
/// not hold up the others.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<TlsReloader>,
    server: crate::config::ServerConfig,
) -> ReceiverStream<Result<TlsConn, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = tx.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let (tcp, addr) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, for example: wait instead of spinning.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // As on plain connections: no Nagle delay on the last frames of a response.
            let _ = tcp.set_nodelay(true);
            super::keep_alive(&tcp, &server);
            let acceptor = tls.acceptor();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let leaf = stream.get_ref().1.peer_certificates().and_then(|chain| chain.first());
                        let (names, not_after) = leaf.map(|leaf| certificate_facts(leaf)).unwrap_or_default();
                        let peer = PeerInfo {
                            addr: Some(addr),
                            identities: names.into(),
                            not_after,
                        };
                        let _ = tx.send(Ok(TlsConn { inner: stream, peer })).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%addr, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%addr, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
