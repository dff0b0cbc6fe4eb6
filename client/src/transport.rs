//! How calls reach the server: straight onto one `h2` connection (over
//! TLS when asked), so that a unary call's request and response are driven
//! by the caller's own task. tonic's `Channel` hands every call through a
//! buffer task and hyper's dispatch task, and spawns a task per response; on
//! a busy machine each hand-over can wake another thread.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{Reason, RecvStream, SendStream};
use http::uri::{Authority, Scheme, Uri};
use http::{HeaderValue, Request, Response};
use http_body::{Body as _, Frame};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_rustls::TlsConnector;
use tonic::body::Body;
use tonic::{Code, Status};

use crate::client::TlsOptions;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type CallFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>>;

/// How to open a connection.
#[derive(Clone)]
pub(crate) struct Settings {
    pub connect_timeout: Duration,
    /// Largest frame the server may send.
    pub max_frame_size: u32,
    /// None for plain-text HTTP/2.
    pub tls: Option<Tls>,
}

/// A TLS client configuration and the name the server's certificate must carry.
#[derive(Clone)]
pub(crate) struct Tls {
    connector: TlsConnector,
    server_name: ServerName<'static>,
}

impl Tls {
    /// Trusts only `options.ca_pem` (the public web authorities when there
    /// is none), presents the client certificate if given, and checks the
    /// server's certificate for `options.domain` or else the address's `host`.
    pub(crate) fn new(options: TlsOptions, host: &str) -> Result<Tls, BoxError> {
        let mut roots = RootCertStore::empty();
        match &options.ca_pem {
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
            Some(pem) => {
                for cert in CertificateDer::pem_slice_iter(pem) {
                    roots.add(cert?)?;
                }
            }
        }
        if roots.is_empty() {
            return Err("the CA file holds no PEM certificate".into());
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
        let mut config = match options.identity_pem {
            Some((cert, key)) => {
                let chain = CertificateDer::pem_slice_iter(&cert).collect::<Result<Vec<_>, _>>()?;
                builder.with_client_auth_cert(chain, PrivateKeyDer::from_pem_slice(&key)?)?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        let name = options.domain.unwrap_or_else(|| host.to_owned());
        Ok(Tls {
            connector: TlsConnector::from(Arc::new(config)),
            server_name: ServerName::try_from(name)?,
        })
    }
}

/// hyper's defaults, which tonic's `Channel` uses: a result stream is not
/// held up by HTTP/2's 64 KiB default windows.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
const MAX_SEND_BUFFER: usize = 1024 * 1024;

/// Probes after 30 s of silence, every 10 s, 3 times: a dead peer is found
/// within a minute, as the server finds a dead client.
const KEEPALIVE: socket2::TcpKeepalive = socket2::TcpKeepalive::new()
    .with_time(Duration::from_secs(30))
    .with_interval(Duration::from_secs(10))
    .with_retries(3);

static USER_AGENT: HeaderValue = HeaderValue::from_static(concat!("weir-client/", env!("CARGO_PKG_VERSION")));

impl tower::Service<Request<Body>> for H2Channel {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = CallFuture;

    /// Calls wait for the connection's stream limit inside `call`.
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> CallFuture {
        Box::pin(self.clone().call(request))
    }
}

/// One HTTP/2 connection, opened again by the next call after it is lost.
#[derive(Clone)]
pub struct H2Channel {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for H2Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Channel")
            .field("authority", &self.shared.authority)
            .finish()
    }
}

struct Shared {
    authority: Authority,
    settings: Settings,
    /// The open connection and its number; None once it is known to be lost.
    current: Mutex<Option<(u64, SendRequest<Bytes>)>>,
    /// Held while connecting, so that callers who find the connection lost
    /// at the same moment open one new connection, not one each.
    connecting: tokio::sync::Mutex<u64>,
}

impl H2Channel {
    /// Opens the connection to `authority` ("host:port"); the error says why it could not.
    pub(crate) async fn connect(authority: Authority, settings: Settings) -> Result<H2Channel, String> {
        let channel = H2Channel {
            shared: Arc::new(Shared {
                authority,
                settings,
                current: Mutex::new(None),
                connecting: tokio::sync::Mutex::new(0),
            }),
        };
        channel.connected().await?;
        Ok(channel)
    }

    fn current(&self) -> Option<(u64, SendRequest<Bytes>)> {
        self.shared.current.lock().ok()?.clone()
    }

    /// The open connection, or a new one when the last was lost.
    async fn sender(&self) -> Result<(u64, SendRequest<Bytes>), Status> {
        self.connected()
            .await
            .map_err(|reason| Status::unavailable(format!("cannot connect to {}: {reason}", self.shared.authority)))
    }

    /// Like [`Self::sender`], failing with the reason alone.
    async fn connected(&self) -> Result<(u64, SendRequest<Bytes>), String> {
        if let Some(current) = self.current() {
            return Ok(current);
        }
        let mut generation = self.shared.connecting.lock().await;
        if let Some(current) = self.current() {
            return Ok(current);
        }
        let sender = open(&self.shared.authority, &self.shared.settings).await?;
        *generation += 1;
        if let Ok(mut current) = self.shared.current.lock() {
            *current = Some((*generation, sender.clone()));
        }
        Ok((*generation, sender))
    }

    /// Forgets connection `generation` (unless a newer one replaced it).
    fn lost(&self, generation: u64) {
        if let Ok(mut current) = self.shared.current.lock() {
            if current.as_ref().is_some_and(|(g, _)| *g == generation) {
                *current = None;
            }
        }
    }

    /// Sends the request's head once a connection can take another stream.
    /// A connection found lost while waiting has sent nothing of the
    /// request, so it is tried once more on a new connection.
    async fn open_stream(&self, head: Request<()>) -> Result<(h2::client::ResponseFuture, SendStream<Bytes>), Status> {
        let mut retried = false;
        loop {
            let (generation, sender) = self.sender().await?;
            match sender.ready().await {
                Ok(mut sender) => {
                    return sender.send_request(head, false).map_err(|e| {
                        // A connection going away takes no new streams: the
                        // next call opens another.
                        if e.is_go_away() || e.is_io() {
                            self.lost(generation);
                        }
                        status(e)
                    });
                }
                Err(e) => {
                    self.lost(generation);
                    if retried {
                        return Err(status(e));
                    }
                    retried = true;
                }
            }
        }
    }

    /// The request head with the origin h2 needs (tonic gives a path only).
    fn head(&self, parts: http::request::Parts) -> Request<()> {
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(match self.shared.settings.tls {
            Some(_) => Scheme::HTTPS,
            None => Scheme::HTTP,
        });
        uri.authority = Some(self.shared.authority.clone());
        uri.path_and_query = parts.uri.path_and_query().cloned();
        let mut request = Request::from_parts(parts, ());
        if let Ok(uri) = Uri::from_parts(uri) {
            *request.uri_mut() = uri;
        }
        request
            .headers_mut()
            .entry(http::header::USER_AGENT)
            .or_insert_with(|| USER_AGENT.clone());
        request
    }

    /// The call, failing with DEADLINE_EXCEEDED once its `grpc-timeout` has
    /// passed without an answer, as a gRPC client must: a server that
    /// cannot be reached or does not answer does not hold the caller longer.
    async fn call(self, request: Request<Body>) -> Result<Response<Body>, BoxError> {
        match grpc_timeout(request.headers()) {
            None => self.start(request, None).await,
            Some(timeout) => {
                let deadline = tokio::time::Instant::now() + timeout;
                match tokio::time::timeout_at(deadline, self.start(request, Some((deadline, timeout)))).await {
                    Ok(answer) => answer,
                    Err(_) => Err(Status::deadline_exceeded(format!(
                        "the call's deadline of {timeout:?} passed before the server answered"
                    ))
                    .into()),
                }
            }
        }
    }

    /// Sends the request; the response's body ends at `deadline` too, so a
    /// stream whose server stops sending midway does not hold the caller.
    async fn start(
        self,
        request: Request<Body>,
        deadline: Option<(tokio::time::Instant, Duration)>,
    ) -> Result<Response<Body>, BoxError> {
        let (head, mut body) = request.into_parts();
        // Read before the stream opens: opening it wakes the connection task,
        // which then finds the whole of a unary request queued and writes it
        // in one go, instead of the headers alone and the message after.
        let (ready, ended) = ready_frames(&mut body).await?;
        let (response, mut send) = self.open_stream(self.head(head)).await?;
        let last = ready.len();
        for (i, frame) in ready.into_iter().enumerate() {
            // A failed send shows in the response, which says why.
            let _ = send_frame(&mut send, frame, ended && i + 1 == last);
        }
        if ended && last == 0 {
            let _ = send.send_data(Bytes::new(), true);
        }
        let (cancel, cancelled) = oneshot::channel();
        if !ended {
            // A request stream goes on from a task of its own once it waits.
            let mut upload = Upload { body, send, cancelled };
            match poll_fn(|cx| Poll::Ready(Pin::new(&mut upload).poll(cx))).await {
                Poll::Ready(Err(e)) => return Err(e.into()),
                Poll::Ready(Ok(())) => {}
                Poll::Pending => {
                    tokio::spawn(upload);
                }
            }
        }
        let response = response.await.map_err(status)?;
        Ok(response.map(|recv| {
            Body::new(Download {
                recv,
                data_done: false,
                deadline: deadline.map(|(at, timeout)| (Box::pin(tokio::time::sleep_until(at)), timeout)),
                expired: false,
                _cancel: cancel,
            })
        }))
    }
}

/// The first frames `body` has ready without waiting (at most two: a unary
/// request's message), and whether the body ended after them.
async fn ready_frames(body: &mut Body) -> Result<(Vec<Frame<Bytes>>, bool), Status> {
    let mut frames = Vec::with_capacity(2);
    let ended = poll_fn(|cx| {
        while frames.len() < 2 {
            match Pin::new(&mut *body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => frames.push(frame),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                Poll::Ready(None) => return Poll::Ready(Ok(true)),
                Poll::Pending => break,
            }
        }
        Poll::Ready(Ok(false))
    })
    .await?;
    Ok((frames, ended))
}

/// The call's deadline, from its `grpc-timeout` header.
fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    weir_proto::deadline::parse_grpc_timeout(headers.get("grpc-timeout")?.to_str().ok()?)
}

/// The address's host, an IPv6 one without its brackets.
pub(crate) fn host(authority: &Authority) -> &str {
    authority.host().trim_start_matches('[').trim_end_matches(']')
}

/// A new connection, or why there is none.
async fn open(authority: &Authority, settings: &Settings) -> Result<SendRequest<Bytes>, String> {
    let host = host(authority);
    let port = authority
        .port_u16()
        .unwrap_or(if settings.tls.is_some() { 443 } else { 80 });
    let connect = async {
        let tcp = TcpStream::connect((host, port)).await.map_err(|e| e.to_string())?;
        // Calls are small and latency-bound; Nagle would hold them back.
        tcp.set_nodelay(true).map_err(|e| e.to_string())?;
        // A server or middlebox that vanishes without closing (a dropped idle
        // connection, a host that went away) ends the connection's calls
        // instead of leaving a stream that waits forever.
        socket2::SockRef::from(&tcp)
            .set_tcp_keepalive(&KEEPALIVE)
            .map_err(|e| e.to_string())?;
        match &settings.tls {
            None => handshake(tcp, settings).await,
            Some(tls) => {
                let tls = tls
                    .connector
                    .connect(tls.server_name.clone(), tcp)
                    .await
                    .map_err(|e| e.to_string())?;
                handshake(tls, settings).await
            }
        }
        .map_err(|e| e.to_string())
    };
    tokio::time::timeout(settings.connect_timeout, connect)
        .await
        .map_err(|_| format!("no answer within {:?}", settings.connect_timeout))?
}

/// The HTTP/2 handshake on `io`; the connection is then driven by a task of
/// its own, whose end the calls see: a lost connection fails their streams.
async fn handshake<T>(io: T, settings: &Settings) -> Result<SendRequest<Bytes>, h2::Error>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = h2::client::Builder::new()
        .enable_push(false)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(settings.max_frame_size)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .handshake(io)
        .await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// A transport error as a gRPC status: a lost connection is UNAVAILABLE, as
/// tonic's `Channel` reports it, so callers retry alike on either transport.
fn status(e: h2::Error) -> Status {
    let code = if e.is_io() || e.is_go_away() {
        Code::Unavailable
    } else {
        match e.reason() {
            Some(Reason::REFUSED_STREAM) => Code::Unavailable,
            Some(Reason::CANCEL) => Code::Cancelled,
            Some(Reason::ENHANCE_YOUR_CALM) => Code::ResourceExhausted,
            Some(Reason::INADEQUATE_SECURITY) => Code::PermissionDenied,
            Some(_) => Code::Internal,
            None => Code::Unknown,
        }
    };
    Status::new(code, format!("HTTP/2 stream to the Weir server: {e}"))
}

/// Sends a request body, keeping at most one frame beyond the stream's
/// window buffered.
struct Upload {
    body: Body,
    send: SendStream<Bytes>,
    /// Closed when the caller drops the response: the stream is reset
    /// rather than kept open by a request stream that never ends.
    cancelled: oneshot::Receiver<()>,
}

impl Future for Upload {
    type Output = Result<(), Status>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        let this = &mut *self;
        loop {
            if Pin::new(&mut this.cancelled).poll(cx).is_ready() {
                this.send.send_reset(Reason::CANCEL);
                return Poll::Ready(Ok(()));
            }
            // The server answered (or refused) early; the rest is not wanted.
            if this.send.poll_reset(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
            if this.send.capacity() == 0 {
                this.send.reserve_capacity(1);
                match ready!(this.send.poll_capacity(cx)) {
                    Some(Ok(_)) => {}
                    // Closed: the response says why.
                    None | Some(Err(_)) => return Poll::Ready(Ok(())),
                }
            }
            let frame = match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                None => {
                    let _ = this.send.send_data(Bytes::new(), true);
                    return Poll::Ready(Ok(()));
                }
                Some(Err(e)) => {
                    this.send.send_reset(Reason::CANCEL);
                    return Poll::Ready(Err(e));
                }
                Some(Ok(frame)) => frame,
            };
            let end = this.body.is_end_stream();
            if send_frame(&mut this.send, frame, end).is_err() || end {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// Sends one request body frame; `end` ends the stream with a data frame
/// (trailers end it anyway).
fn send_frame(send: &mut SendStream<Bytes>, frame: Frame<Bytes>, end: bool) -> Result<(), h2::Error> {
    match frame.into_data() {
        Ok(data) => send.send_data(data, end),
        Err(frame) => frame.into_trailers().map_or(Ok(()), |t| send.send_trailers(t)),
    }
}

/// A response body read straight from the h2 stream.
struct Download {
    recv: RecvStream,
    data_done: bool,
    /// The call's deadline, and its timeout for the message.
    deadline: Option<(Pin<Box<tokio::time::Sleep>>, Duration)>,
    /// The deadline passed: the body is over.
    expired: bool,
    /// Dropped with the body, which stops the request's upload.
    _cancel: oneshot::Sender<()>,
}

impl Download {
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.expired {
            return Poll::Ready(None);
        }
        if !self.data_done {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Read by the caller now: the server may send as much again.
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(status(e)))),
                None => self.data_done = true,
            }
        }
        match ready!(self.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(status(e)))),
        }
    }
}

impl http_body::Body for Download {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        let frame = this.poll_recv(cx);
        // Only while nothing is there to read: a response that arrived in
        // time is the caller's, however late it reads it.
        if frame.is_pending() {
            if let Some((at, timeout)) = &mut this.deadline {
                if at.as_mut().poll(cx).is_ready() {
                    let timeout = *timeout;
                    // Once: the body is over, and dropping it resets the stream.
                    this.deadline = None;
                    this.expired = true;
                    return Poll::Ready(Some(Err(Status::deadline_exceeded(format!(
                        "the call's deadline of {timeout:?} passed before the server finished answering"
                    )))));
                }
            }
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }
}
