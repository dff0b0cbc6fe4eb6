//! How calls reach the server: straight onto one `h2` connection (over
//! TLS when asked), so that a unary call's request and response are driven
//! by the caller's own task. tonic's `Channel` hands every call through a
//! buffer task and hyper's dispatch task, and spawns a task per response; on
//! a busy machine each hand-over can wake another thread.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{Ping, PingPong, Reason, RecvStream, SendStream};
use http::uri::{Authority, Scheme, Uri};
use http::{HeaderMap, HeaderValue, Request, Response};
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

/// The same minute for data the server never acknowledges (TCP_USER_TIMEOUT):
/// the kernel sends no keepalive probe while data is in flight, and would
/// retransmit it for about 15 minutes.
#[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
const USER_TIMEOUT: Duration = Duration::from_secs(30 + 10 * 3);

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
    /// The open connection; None once it is known to be lost.
    current: Mutex<Option<Conn>>,
    /// Held while connecting, so that callers who find the connection lost
    /// at the same moment open one new connection, not one each.
    connecting: tokio::sync::Mutex<Attempts>,
    /// Connection attempts finished so far (changed under `connecting`).
    attempts: AtomicU64,
}

/// What connecting has given so far.
#[derive(Default)]
struct Attempts {
    /// The number of the last connection opened.
    generation: u64,
    /// Why the last attempt failed; None after one that succeeded.
    last_error: Option<String>,
}

/// An open connection: its number, the handle that opens streams on it,
/// and its PINGs (h2 allows one at a time).
#[derive(Clone)]
struct Conn {
    generation: u64,
    sender: SendRequest<Bytes>,
    pings: Arc<tokio::sync::Mutex<PingPong>>,
}

/// Put in a request's extensions, fired once the whole request body has
/// been sent and the server's HTTP/2 layer has read it; dropped unfired
/// when the request stream ends otherwise.
#[derive(Clone)]
pub(crate) struct SentNotice(Arc<Mutex<Option<oneshot::Sender<()>>>>);

impl SentNotice {
    pub(crate) fn new() -> (SentNotice, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        (SentNotice(Arc::new(Mutex::new(Some(tx)))), rx)
    }

    fn fire(&self) {
        if let Some(tx) = self.0.lock().ok().and_then(|mut tx| tx.take()) {
            let _ = tx.send(());
        }
    }
}

impl H2Channel {
    /// Opens the connection to `authority` ("host:port"); the error says why it could not.
    pub(crate) async fn connect(authority: Authority, settings: Settings) -> Result<H2Channel, String> {
        let channel = H2Channel::new(authority, settings);
        channel.connected().await?;
        Ok(channel)
    }

    /// A channel whose first call connects.
    fn new(authority: Authority, settings: Settings) -> H2Channel {
        H2Channel {
            shared: Arc::new(Shared {
                authority,
                settings,
                current: Mutex::new(None),
                connecting: tokio::sync::Mutex::new(Attempts::default()),
                attempts: AtomicU64::new(0),
            }),
        }
    }

    fn current(&self) -> Option<Conn> {
        self.shared.current.lock().ok()?.clone()
    }

    /// The open connection, or a new one when the last was lost.
    async fn sender(&self) -> Result<Conn, Status> {
        self.connected()
            .await
            .map_err(|reason| Status::unavailable(format!("cannot connect to {}: {reason}", self.shared.authority)))
    }

    /// Like [`Self::sender`], failing with the reason alone.
    async fn connected(&self) -> Result<Conn, String> {
        if let Some(current) = self.current() {
            return Ok(current);
        }
        let seen = self.shared.attempts.load(Ordering::Acquire);
        let mut attempts = self.shared.connecting.lock().await;
        if let Some(current) = self.current() {
            return Ok(current);
        }
        // An attempt that failed while this caller waited answers it too:
        // queued callers do not each wait out a connect timeout in turn.
        if self.shared.attempts.load(Ordering::Acquire) != seen {
            if let Some(reason) = &attempts.last_error {
                return Err(reason.clone());
            }
        }
        let opened = open(&self.shared.authority, &self.shared.settings).await;
        self.shared.attempts.fetch_add(1, Ordering::Release);
        let (sender, pings) = opened.inspect_err(|reason| attempts.last_error = Some(reason.clone()))?;
        attempts.last_error = None;
        attempts.generation += 1;
        let conn = Conn {
            generation: attempts.generation,
            sender,
            pings: Arc::new(tokio::sync::Mutex::new(pings)),
        };
        if let Ok(mut current) = self.shared.current.lock() {
            *current = Some(conn.clone());
        }
        Ok(conn)
    }

    /// Forgets connection `generation` (unless a newer one replaced it).
    fn lost(&self, generation: u64) {
        if let Ok(mut current) = self.shared.current.lock() {
            if current.as_ref().is_some_and(|c| c.generation == generation) {
                *current = None;
            }
        }
    }

    /// Sends the request's head once a connection can take another stream.
    /// A connection found lost or going away (GOAWAY) before the head went
    /// out has sent nothing of the request, so it is tried once more on a
    /// new connection.
    async fn open_stream(
        &self,
        head: &Request<()>,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<(Conn, h2::client::ResponseFuture, SendStream<Bytes>), Status> {
        let mut retried = false;
        loop {
            let conn = self.sender().await?;
            let failed = match conn.sender.clone().ready().await {
                Ok(mut sender) => match sender.send_request(with_time_left(copy_head(head), deadline), false) {
                    Ok((response, send)) => return Ok((conn, response, send)),
                    // GOAWAY came after `ready`: the stream was never opened.
                    Err(e) if e.is_go_away() => e,
                    Err(e) => {
                        if e.is_io() {
                            self.lost(conn.generation);
                        }
                        return Err(status(e));
                    }
                },
                Err(e) => e,
            };
            self.lost(conn.generation);
            if retried {
                return Err(status(failed));
            }
            retried = true;
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
        let (mut head, mut body) = request.into_parts();
        let mut notice = head.extensions.remove::<SentNotice>();
        // Read before the stream opens: opening it wakes the connection task,
        // which then finds the whole of a unary request queued and writes it
        // in one go, instead of the headers alone and the message after.
        let (ready, ended) = ready_frames(&mut body).await?;
        let head = self.head(head);
        let (cancel, cancelled) = oneshot::channel();
        let mut upload = (!ended).then_some((body, cancelled));
        // Only a request held whole can be sent again.
        let mut retried = !ended;
        loop {
            let (conn, response, mut send) = self.open_stream(&head, deadline.map(|(at, _)| at)).await?;
            let last = ready.len();
            for (i, piece) in ready.iter().enumerate() {
                // A failed send shows in the response, which says why.
                let _ = piece.clone().send(&mut send, ended && i + 1 == last);
            }
            if ended && last == 0 {
                let _ = send.send_data(Bytes::new(), true);
            }
            if let Some((body, cancelled)) = upload.take() {
                // A request stream goes on from a task of its own once it waits.
                let mut upload = Upload { body, send, cancelled };
                match poll_fn(|cx| Poll::Ready(Pin::new(&mut upload).poll(cx))).await {
                    Poll::Ready(Err(e)) => return Err(e.into()),
                    Poll::Ready(Ok(sent)) => {
                        if let Some(notice) = notice.take().filter(|_| sent) {
                            tokio::spawn(confirm(conn.pings.clone(), notice));
                        }
                    }
                    Poll::Pending => {
                        let (pings, notice) = (conn.pings.clone(), notice.take());
                        tokio::spawn(async move {
                            if let (Ok(true), Some(notice)) = (upload.await, notice) {
                                confirm(pings, notice).await;
                            }
                        });
                    }
                }
            } else if let Some(notice) = notice.take() {
                tokio::spawn(confirm(conn.pings.clone(), notice));
            }
            match response.await {
                Ok(response) => {
                    return Ok(response.map(|recv| {
                        Body::new(Download {
                            recv,
                            data_done: false,
                            deadline: deadline.map(|(at, timeout)| (Box::pin(tokio::time::sleep_until(at)), timeout)),
                            expired: false,
                            _cancel: cancel,
                        })
                    }))
                }
                // Refused before it ran: sent once more, on a new connection
                // when this one is going away.
                Err(e) if !retried && unprocessed(&e) => {
                    if e.is_go_away() {
                        self.lost(conn.generation);
                    }
                    retried = true;
                }
                Err(e) => return Err(status(e).into()),
            }
        }
    }
}

/// The request's `grpc-timeout` set to the time left before `deadline`:
/// what went on connecting, waiting for a stream, or a first attempt the
/// server refused, is not the server's to spend, which answers with its
/// reason just before the deadline it is told (docs/api.md).
fn with_time_left(mut head: Request<()>, deadline: Option<tokio::time::Instant>) -> Request<()> {
    if let Some(at) = deadline {
        let left = at.saturating_duration_since(tokio::time::Instant::now());
        let value = weir_proto::deadline::format_grpc_timeout(left);
        if let Ok(value) = http::HeaderValue::from_str(&value) {
            head.headers_mut().insert("grpc-timeout", value);
        }
    }
    head
}

/// A frame of a request body, kept to be sent again.
#[derive(Clone)]
enum Piece {
    Data(Bytes),
    Trailers(HeaderMap),
}

impl Piece {
    fn of(frame: Frame<Bytes>) -> Option<Piece> {
        match frame.into_data() {
            Ok(data) => Some(Piece::Data(data)),
            Err(frame) => frame.into_trailers().ok().map(Piece::Trailers),
        }
    }

    /// Sends it; `end` ends the stream with a data frame (trailers end it anyway).
    fn send(self, send: &mut SendStream<Bytes>, end: bool) -> Result<(), h2::Error> {
        match self {
            Piece::Data(data) => send.send_data(data, end),
            Piece::Trailers(trailers) => send.send_trailers(trailers),
        }
    }
}

/// Whether the server refused a stream without running it: RST_STREAM with
/// REFUSED_STREAM, or a graceful GOAWAY whose last stream id is below it
/// (h2 fails only those streams with the GOAWAY itself; RFC 9113, 6.8).
fn unprocessed(e: &h2::Error) -> bool {
    e.is_remote()
        && ((e.is_reset() && e.reason() == Some(Reason::REFUSED_STREAM))
            || (e.is_go_away() && e.reason() == Some(Reason::NO_ERROR)))
}

/// Fires `notice` once the server's HTTP/2 layer has read what this
/// connection sent so far. h2 writes a PING ahead of DATA queued with it,
/// so the first answer shows only that the data went out with it; the
/// second PING goes after the data, and is answered after it was read.
async fn confirm(pings: Arc<tokio::sync::Mutex<PingPong>>, notice: SentNotice) {
    let mut pings = pings.lock().await;
    for _ in 0..2 {
        if pings.ping(Ping::opaque()).await.is_err() {
            return;
        }
    }
    notice.fire();
}

/// A copy of a request head, for a second attempt.
fn copy_head(head: &Request<()>) -> Request<()> {
    let mut copy = Request::new(());
    *copy.method_mut() = head.method().clone();
    *copy.uri_mut() = head.uri().clone();
    *copy.version_mut() = head.version();
    *copy.headers_mut() = head.headers().clone();
    copy
}

/// The first frames `body` has ready without waiting (at most two: a unary
/// request's message), and whether the body ended after them.
async fn ready_frames(body: &mut Body) -> Result<(Vec<Piece>, bool), Status> {
    let mut frames = Vec::with_capacity(2);
    let ended = poll_fn(|cx| {
        while frames.len() < 2 {
            match Pin::new(&mut *body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => frames.extend(Piece::of(frame)),
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

/// A new connection and its PINGs, or why there is none.
async fn open(authority: &Authority, settings: &Settings) -> Result<(SendRequest<Bytes>, PingPong), String> {
    let host = host(authority);
    let port = authority
        .port_u16()
        .unwrap_or(if settings.tls.is_some() { 443 } else { 80 });
    let connect = async {
        let tcp = TcpStream::connect((host, port)).await.map_err(|e| e.to_string())?;
        tune(&tcp).map_err(|e| e.to_string())?;
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
    };
    tokio::time::timeout(settings.connect_timeout, connect)
        .await
        .map_err(|_| format!("no answer within {:?}", settings.connect_timeout))?
}

/// Socket options of every connection.
fn tune(tcp: &TcpStream) -> std::io::Result<()> {
    // Calls are small and latency-bound; Nagle would hold them back.
    tcp.set_nodelay(true)?;
    // A server or middlebox that vanishes without closing (a dropped idle
    // connection, a host that went away) ends the connection's calls
    // instead of leaving a stream that waits forever.
    let socket = socket2::SockRef::from(tcp);
    socket.set_tcp_keepalive(&KEEPALIVE)?;
    #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
    socket.set_tcp_user_timeout(Some(USER_TIMEOUT))?;
    Ok(())
}

/// The HTTP/2 handshake on `io`; the connection is then driven by a task of
/// its own, whose end the calls see: a lost connection fails their streams.
async fn handshake<T>(io: T, settings: &Settings) -> Result<(SendRequest<Bytes>, PingPong), String>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, mut connection) = h2::client::Builder::new()
        .enable_push(false)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(settings.max_frame_size)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    let pings = connection.ping_pong().ok_or("the connection's PINGs were taken")?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok((sender, pings))
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
    /// Whether the whole body was sent.
    type Output = Result<bool, Status>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<bool, Status>> {
        let this = &mut *self;
        loop {
            // The server answered (or refused) early; the rest is not wanted.
            if this.send.poll_reset(cx).is_ready() {
                return Poll::Ready(Ok(false));
            }
            if this.send.capacity() == 0 {
                this.send.reserve_capacity(1);
                match this.send.poll_capacity(cx) {
                    Poll::Pending => return this.wait(cx),
                    Poll::Ready(Some(Ok(_))) => {}
                    // Closed: the response says why.
                    Poll::Ready(None | Some(Err(_))) => return Poll::Ready(Ok(false)),
                }
            }
            let frame = match Pin::new(&mut this.body).poll_frame(cx) {
                Poll::Pending => return this.wait(cx),
                Poll::Ready(None) => return Poll::Ready(Ok(this.send.send_data(Bytes::new(), true).is_ok())),
                Poll::Ready(Some(Err(e))) => {
                    this.send.send_reset(Reason::CANCEL);
                    return Poll::Ready(Err(e));
                }
                Poll::Ready(Some(Ok(frame))) => frame,
            };
            let end = this.body.is_end_stream();
            if send_frame(&mut this.send, frame, end).is_err() {
                return Poll::Ready(Ok(false));
            }
            if end {
                return Poll::Ready(Ok(true));
            }
        }
    }
}

impl Upload {
    /// Nothing can be sent now: a dropped response ends the stream. Only
    /// then, so that what the body had ready when the caller dropped the
    /// response still goes out before the stream ends (a watch's last
    /// acknowledgements, queued just before).
    fn wait(&mut self, cx: &mut Context<'_>) -> Poll<Result<bool, Status>> {
        if Pin::new(&mut self.cancelled).poll(cx).is_ready() {
            self.send.send_reset(Reason::CANCEL);
            return Poll::Ready(Ok(false));
        }
        Poll::Pending
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A port whose accept queue is full: a connection attempt is never
    /// answered, as at an address that drops packets. The listener and the
    /// connection filling the queue are returned to be kept.
    fn unanswering_port() -> (socket2::Socket, std::net::TcpStream, Authority) {
        let listener = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
        let any: std::net::SocketAddr = "127.0.0.1:0".parse().expect("address");
        listener.bind(&any.into()).expect("bind");
        listener.listen(0).expect("listen");
        let addr = listener
            .local_addr()
            .expect("address")
            .as_socket()
            .expect("an IP address");
        // Fills the queue, which is never accepted from.
        let filler = std::net::TcpStream::connect(addr).expect("the first connection is queued");
        let authority = addr.to_string().parse().expect("authority");
        (listener, filler, authority)
    }

    #[tokio::test]
    async fn callers_waiting_on_a_failing_connection_attempt_share_its_failure() {
        let (_listener, _filler, authority) = unanswering_port();
        let timeout = Duration::from_millis(300);
        let channel = H2Channel::new(
            authority,
            Settings {
                connect_timeout: timeout,
                max_frame_size: 16 * 1024,
                tls: None,
            },
        );
        let started = std::time::Instant::now();
        let callers: Vec<_> = (0..20)
            .map(|_| {
                let channel = channel.clone();
                tokio::spawn(async move { channel.sender().await.map(|_| ()) })
            })
            .collect();
        for caller in callers {
            let status = caller.await.expect("the caller's task").expect_err("nothing answers");
            assert_eq!(status.code(), Code::Unavailable);
            assert!(status.message().contains("no answer within"), "{status:?}");
        }
        // One attempt (a second for a caller that came after it ended), not twenty in turn.
        assert!(started.elapsed() < timeout * 4, "{:?}", started.elapsed());
        // A later caller tries again.
        let started = std::time::Instant::now();
        assert!(channel.sender().await.is_err());
        assert!(started.elapsed() >= timeout, "{:?}", started.elapsed());
    }

    #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
    #[tokio::test]
    async fn unacknowledged_data_ends_a_connection_as_soon_as_silence_does() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let tcp = TcpStream::connect(listener.local_addr().expect("address"))
            .await
            .expect("connect");
        tune(&tcp).expect("socket options");
        let socket = socket2::SockRef::from(&tcp);
        let keepalive = socket.tcp_keepalive_time().expect("keepalive time")
            + socket.tcp_keepalive_interval().expect("interval") * socket.tcp_keepalive_retries().expect("retries");
        assert_eq!(socket.tcp_user_timeout().expect("user timeout"), Some(keepalive));
        assert_eq!(keepalive, Duration::from_secs(60));
        assert!(tcp.nodelay().expect("nodelay"));
    }
}
