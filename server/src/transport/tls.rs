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

use parking_lot::{Mutex, RwLock};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
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
    current: RwLock<Arc<Installed>>,
}

/// A rustls configuration (HTTP/2 only) and its client certificate verifier.
pub struct ServerTls {
    config: ServerConfig,
    /// None without `client_ca_file`.
    clients: Option<Arc<dyn ClientCertVerifier>>,
    require_client_cert: bool,
}

/// The configuration in force.
struct Installed {
    config: Arc<ServerConfig>,
    clients: Option<Arc<dyn ClientCertVerifier>>,
    require_client_cert: bool,
    /// One more at each install: a connection's certificate, verified when
    /// it connected, is checked again against the client CA now in force
    /// once the generation has moved on (a CA removed to stop certificates
    /// stops them on connections already open too).
    generation: u64,
}

/// Reads the files of `config` into a rustls configuration.
pub fn server_config(config: &TlsConfig) -> Result<ServerTls, String> {
    let chain = crate::pem::certificates(&config.cert_file, "server.tls.cert_file")?;
    let key = PrivateKeyDer::from_pem_file(&config.key_file)
        .map_err(|e| format!("server.tls.key_file {}: {e}", config.key_file.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let clients = match &config.client_ca_file {
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
            Some(verifier.build().map_err(|e| e.to_string())?)
        }
        None => None,
    };
    let builder = match &clients {
        Some(verifier) => builder.with_client_cert_verifier(verifier.clone()),
        None => builder.with_no_client_auth(),
    };
    let mut server = builder
        .with_single_cert(chain, key)
        .map_err(|e| format!("server.tls: the key does not fit the certificate: {e}"))?;
    server.alpn_protocols = vec![b"h2".to_vec()];
    Ok(ServerTls {
        config: server,
        clients,
        require_client_cert: config.require_client_cert,
    })
}

impl TlsReloader {
    pub fn new(config: &TlsConfig) -> Result<Self, String> {
        let first = server_config(config)?;
        Ok(Self {
            current: RwLock::new(Arc::new(Installed {
                config: Arc::new(first.config),
                clients: first.clients,
                require_client_cert: first.require_client_cert,
                generation: 0,
            })),
        })
    }

    /// Serves new connections with `fresh` (from `server_config`); on any
    /// error reading the files the caller keeps the configuration in force.
    pub fn install(&self, fresh: ServerTls) {
        let mut current = self.current.write();
        *current = Arc::new(Installed {
            config: Arc::new(fresh.config),
            clients: fresh.clients,
            require_client_cert: fresh.require_client_cert,
            generation: current.generation + 1,
        });
    }

    fn installed(&self) -> Arc<Installed> {
        self.current.read().clone()
    }

    /// Whether `peer` holds no client certificate the server would take
    /// where one is now required: none at all (`require_client_cert` turned
    /// on stops such connections already open too, not only new ones), one
    /// the client CA in force no longer accepts, or one past its end. A
    /// bearer token does not stand in for it. `trusted`: what
    /// [`Self::still_trusts`] says of `peer`.
    pub fn wants_certificate_of(&self, peer: &PeerInfo, trusted: bool) -> bool {
        self.installed().require_client_cert
            && (peer.certificate.is_none() || !trusted || peer.not_after.is_some_and(|end| end <= SystemTime::now()))
    }

    /// Whether the client certificate `peer` connected with is still one
    /// the client CA in force accepts. Checked once per connection and
    /// install; a connection without a certificate has nothing to check.
    pub fn still_trusts(&self, peer: &PeerInfo) -> bool {
        let Some(verified) = &peer.certificate else {
            return true;
        };
        let now = self.installed();
        if now.generation == verified.generation {
            return true;
        }
        if let Some((generation, trusted)) = *verified.rechecked.lock() {
            if generation == now.generation {
                return trusted;
            }
        }
        let trusted = match (&now.clients, verified.chain.split_first()) {
            (Some(clients), Some((leaf, intermediates))) => {
                clients.verify_client_cert(leaf, intermediates, UnixTime::now()).is_ok()
            }
            _ => false,
        };
        *verified.rechecked.lock() = Some((now.generation, trusted));
        trusted
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
    /// The certificate itself, for [`TlsReloader::still_trusts`].
    pub certificate: Option<Arc<VerifiedChain>>,
}

/// A client certificate chain and the TLS generation it was verified under.
#[derive(Debug)]
pub struct VerifiedChain {
    chain: Vec<CertificateDer<'static>>,
    generation: u64,
    /// The last check against a later generation: (generation, trusted).
    rechecked: Mutex<Option<(u64, bool)>>,
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
                    super::accept_failed(&e).await;
                    continue;
                }
            };
            // As on plain connections: no Nagle delay on the last frames of a response.
            let _ = tcp.set_nodelay(true);
            super::keep_alive(&tcp, &server);
            let installed = tls.installed();
            let acceptor = TlsAcceptor::from(installed.config.clone());
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let chain = stream.get_ref().1.peer_certificates().filter(|c| !c.is_empty());
                        let (names, not_after) = chain
                            .and_then(|c| c.first())
                            .map(|leaf| certificate_facts(leaf))
                            .unwrap_or_default();
                        let certificate = chain.map(|chain| {
                            Arc::new(VerifiedChain {
                                chain: chain.iter().map(|c| c.clone().into_owned()).collect(),
                                generation: installed.generation,
                                rechecked: Mutex::new(None),
                            })
                        });
                        let peer = PeerInfo {
                            addr: Some(addr),
                            identities: names.into(),
                            not_after,
                            certificate,
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
