//! A logical replication connection (`replication=database`): after
//! `START_REPLICATION`, the server pushes each transaction as it decodes it,
//! from where the slot's reader last confirmed. tokio-postgres does not speak
//! this part of the protocol, so this module does, with postgres-protocol's
//! messages and authentication.

use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::mpsc;
use tokio_postgres::config::Host;

use super::net::{socket, tcp, Io};
use super::pgoutput::lsn_text;
use super::types::pg_epoch;
use super::{engine_error, Target};
use crate::backend::bulk::quote_ansi;
use crate::backend::BackendError;

/// The server ends a replication connection that says nothing for
/// `wal_sender_timeout` (60 s by default); a status report goes out at least
/// this often, whether or not the reader keeps up, and at least twice
/// within the server's timeout when it is shorter (`status_interval`).
const STATUS_INTERVAL: Duration = Duration::from_secs(10);

/// How often status reports go out for the server's `wal_sender_timeout`
/// (milliseconds; 0 turns the server's timeout off).
pub(super) fn status_interval(wal_sender_timeout_ms: i64) -> Duration {
    match u64::try_from(wal_sender_timeout_ms) {
        Ok(ms) if ms > 0 => STATUS_INTERVAL.min(Duration::from_millis(ms / 2).max(Duration::from_millis(100))),
        _ => STATUS_INTERVAL,
    }
}
/// How long to wait for a slot that an ending reader still holds: its
/// server process releases it as it exits.
pub(super) const SLOT_RETRY: Duration = Duration::from_secs(5);
/// PostgreSQL allocates no more than 1 GiB for a value, so no message it
/// sends is much larger; a length beyond this is a broken stream.
const MAX_MESSAGE: usize = (1 << 30) + (1 << 20);
/// SQLSTATE `object_in_use`: the slot is active for another process.
const OBJECT_IN_USE: &str = "55006";
// Authentication request codes.
const AUTH_OK: i32 = 0;
const AUTH_CLEARTEXT: i32 = 3;
const AUTH_MD5: i32 = 5;
const AUTH_SASL: i32 = 10;
const AUTH_SASL_CONTINUE: i32 = 11;
const AUTH_SASL_FINAL: i32 = 12;

/// What the server sent on the replication stream.
pub(super) enum Event {
    /// One pgoutput message.
    Data(Bytes),
    /// Nothing to send: every transaction committed before `wal_end` was sent.
    Keepalive { wal_end: u64 },
}

/// What the reader reports to the server: how far it has received
/// (`written`) and what the slot may forget (`flushed`).
#[derive(Clone, Copy)]
struct Status {
    written: u64,
    flushed: u64,
    reply: bool,
}

pub(super) struct Replication {
    read: ReadHalf<Box<dyn Io>>,
    buf: BytesMut,
    status: Status,
    reports: mpsc::UnboundedSender<Status>,
}

impl Replication {
    /// Streams `slot` from `start`, with the changes of its publication (of
    /// the same name) as pgoutput messages with binary tuples. `flushed` is
    /// what the slot may already forget; it must not be behind the slot's
    /// confirmed position (PostgreSQL 15 would move it back).
    pub(super) async fn start(
        target: &Target,
        slot: &str,
        (start, flushed): (u64, u64),
        every: Duration,
    ) -> Result<Self, BackendError> {
        let mut conn = Conn::open(target).await?;
        let command = format!(
            "START_REPLICATION SLOT {} LOGICAL {} (proto_version '1', publication_names '{}', binary 'true')",
            quote_ansi(slot),
            lsn_text(start),
            quote_ansi(slot).replace('\'', "''"),
        );
        // A reader that just ended (a reconnecting consumer, a take-over)
        // holds the slot until its server process has exited.
        let deadline = Instant::now() + SLOT_RETRY;
        loop {
            match conn.start(&command).await {
                Err(e) if slot_held(&e, deadline) => tokio::time::sleep(Duration::from_millis(50)).await,
                other => break other?,
            }
        }
        let Conn { read, write, buf } = conn;
        let (reports, rx) = mpsc::unbounded_channel();
        let status = Status {
            written: start,
            flushed,
            reply: false,
        };
        tokio::spawn(report(write, rx, status, every));
        Ok(Self {
            read,
            buf,
            status,
            reports,
        })
    }

    /// The next message from the server. Cancel-safe: a message is taken
    /// from the buffer only once it is whole.
    pub(super) async fn next(&mut self) -> Result<Event, BackendError> {
        loop {
            let (tag, mut body) = next_frame(&mut self.read, &mut self.buf).await?;
            match tag {
                b'd' if body.first() == Some(&b'w') && body.len() >= 25 => {
                    body.advance(9);
                    let wal_end = body.get_u64();
                    body.advance(8);
                    self.status.written = self.status.written.max(wal_end);
                    return Ok(Event::Data(body));
                }
                b'd' if body.first() == Some(&b'k') && body.len() >= 18 => {
                    body.advance(1);
                    let wal_end = body.get_u64();
                    body.advance(8);
                    self.status.written = self.status.written.max(wal_end);
                    if body.first() == Some(&1) {
                        self.send(false);
                    }
                    return Ok(Event::Keepalive { wal_end });
                }
                b'd' => return Err(protocol_error("an unknown replication message")),
                b'E' => return Err(server_error(&body)),
                b'c' => return Err(BackendError::Unavailable("the database ended replication".into())),
                // Notices and parameter changes.
                _ => {}
            }
        }
    }

    /// Lets the slot forget what came before `lsn` (the client acknowledged it).
    pub(super) fn confirm(&mut self, lsn: u64) {
        if lsn > self.status.flushed {
            self.status.flushed = lsn;
            self.send(false);
        }
    }

    /// Asks the server to say how far it has read (it answers with a keepalive).
    pub(super) fn ask_position(&mut self) {
        self.send(true);
    }

    fn send(&mut self, reply: bool) {
        // The reporting task ends only with the connection; `next` reports that.
        let _ = self.reports.send(Status { reply, ..self.status });
    }
}

/// Whether `e` says the slot is active elsewhere, and there is time to wait.
pub(super) fn slot_held(e: &BackendError, deadline: Instant) -> bool {
    matches!(e, BackendError::Engine { code, .. } if code == OBJECT_IN_USE) && Instant::now() < deadline
}

/// Sends each status report, and the last one again `every` so often,
/// until the reader is dropped or the connection fails.
async fn report(
    mut write: WriteHalf<Box<dyn Io>>,
    mut rx: mpsc::UnboundedReceiver<Status>,
    mut last: Status,
    every: Duration,
) {
    let mut interval = tokio::time::interval(every);
    let mut out = BytesMut::with_capacity(64);
    loop {
        tokio::select! {
            next = rx.recv() => match next {
                Some(status) => last = status,
                None => break,
            },
            _ = interval.tick() => last.reply = false,
        }
        out.clear();
        encode_status(last, now_micros(), &mut out);
        if write.write_all(&out).await.is_err() {
            return;
        }
    }
    // The reader is gone: end the session cleanly rather than by a reset.
    out.clear();
    frontend::copy_done(&mut out);
    frontend::terminate(&mut out);
    let _ = write.write_all(&out).await;
    let _ = write.shutdown().await;
}

/// A standby status update, inside CopyData.
fn encode_status(status: Status, now: i64, out: &mut BytesMut) {
    out.put_u8(b'd');
    out.put_i32(4 + 1 + 8 * 4 + 1);
    out.put_u8(b'r');
    out.put_u64(status.written);
    out.put_u64(status.flushed);
    out.put_u64(status.flushed);
    out.put_i64(now);
    out.put_u8(u8::from(status.reply));
}

/// Microseconds since PostgreSQL's epoch, as status updates carry the time.
fn now_micros() -> i64 {
    (chrono::Utc::now().naive_utc() - pg_epoch())
        .num_microseconds()
        .unwrap_or(i64::MAX)
}

/// Reads one whole backend message: its tag and body.
async fn next_frame(read: &mut ReadHalf<Box<dyn Io>>, buf: &mut BytesMut) -> Result<(u8, Bytes), BackendError> {
    loop {
        if buf.len() >= 5 {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if !(4..=MAX_MESSAGE).contains(&len) {
                return Err(protocol_error("a malformed message"));
            }
            if buf.len() > len {
                let mut frame = buf.split_to(1 + len).freeze();
                let tag = frame.get_u8();
                frame.advance(4);
                return Ok((tag, frame));
            }
            buf.reserve(1 + len - buf.len());
        }
        buf.reserve(64 * 1024);
        match read.read_buf(buf).await {
            Ok(0) => {
                return Err(BackendError::Unavailable(
                    "the connection to the database was lost".into(),
                ))
            }
            Ok(_) => {}
            Err(e) => {
                return Err(BackendError::Unavailable(format!(
                    "the connection to the database failed: {e}"
                )))
            }
        }
    }
}

fn protocol_error(what: &str) -> BackendError {
    BackendError::Internal(format!("the database sent {what} on the replication connection"))
}

/// An ErrorResponse body as the engine's error (SQLSTATE attached).
fn server_error(body: &[u8]) -> BackendError {
    let (mut code, mut message, mut detail) = (String::new(), String::new(), None);
    // Fields: a type byte, then its text up to a NUL.
    for field in cstrings(body) {
        let Some((kind, value)) = field.split_first() else {
            continue;
        };
        let value = String::from_utf8_lossy(value).into_owned();
        match kind {
            b'C' => code = value,
            b'M' => message = value,
            b'D' => detail = Some(value),
            _ => {}
        }
    }
    // A replication session runs no caller's statement: these codes can
    // only be its own login's.
    if super::refuses_login(&code) {
        return crate::backend::error::login_refused(&code, &message);
    }
    engine_error(&code, &message, detail.as_deref(), None, false)
}

/// The NUL-terminated strings of a message body, up to the first empty one.
fn cstrings(body: &[u8]) -> impl Iterator<Item = &[u8]> {
    body.split(|b| *b == 0).take_while(|s| !s.is_empty())
}

/// A connection in its startup phase.
struct Conn {
    read: ReadHalf<Box<dyn Io>>,
    write: WriteHalf<Box<dyn Io>>,
    buf: BytesMut,
}

/// The name the replication connection gives the server, which
/// `synchronous_standby_names` matches standbys by.
pub(super) fn application_name(target: &Target) -> &str {
    target.config.get_application_name().unwrap_or("weir-changes")
}

impl Conn {
    async fn open(target: &Target) -> Result<Self, BackendError> {
        let io = connect(target).await?;
        let config = &target.config;
        let (read, write) = tokio::io::split(io);
        let mut conn = Conn {
            read,
            write,
            buf: BytesMut::new(),
        };
        let user = config.get_user().unwrap_or("postgres");
        let mut params = vec![("user", user), ("replication", "database"), ("client_encoding", "UTF8")];
        if let Some(db) = config.get_dbname() {
            params.push(("database", db));
        }
        params.push(("application_name", application_name(target)));
        let mut out = BytesMut::new();
        frontend::startup_message(params, &mut out).map_err(|e| BackendError::Internal(e.to_string()))?;
        conn.send(&out).await?;
        conn.authenticate(user.as_bytes(), config.get_password()).await?;
        conn.ready().await?;
        Ok(conn)
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), BackendError> {
        self.write
            .write_all(bytes)
            .await
            .map_err(|e| BackendError::Unavailable(format!("the connection to the database failed: {e}")))
    }

    /// The next authentication request: its code and data.
    async fn auth_request(&mut self) -> Result<(i32, Bytes), BackendError> {
        loop {
            let (tag, mut body) = next_frame(&mut self.read, &mut self.buf).await?;
            match tag {
                b'R' if body.len() >= 4 => {
                    let code = body.get_i32();
                    return Ok((code, body));
                }
                b'E' => return Err(server_error(&body)),
                b'N' => {}
                _ => return Err(protocol_error("an unexpected message while authenticating")),
            }
        }
    }

    async fn authenticate(&mut self, user: &[u8], password: Option<&[u8]>) -> Result<(), BackendError> {
        let password = || {
            password.ok_or_else(|| {
                BackendError::Unavailable("the database asks for a password and the source has none".into())
            })
        };
        let mut out = BytesMut::new();
        let (code, data) = self.auth_request().await?;
        match code {
            AUTH_OK => return Ok(()),
            AUTH_CLEARTEXT => frontend::password_message(password()?, &mut out).map_err(encode_error)?,
            AUTH_MD5 if data.len() >= 4 => {
                let salt = [data[0], data[1], data[2], data[3]];
                let hash = md5_hash(user, password()?, salt);
                frontend::password_message(hash.as_bytes(), &mut out).map_err(encode_error)?;
            }
            AUTH_SASL => {
                if !cstrings(&data).any(|m| m == sasl::SCRAM_SHA_256.as_bytes()) {
                    return Err(BackendError::Unavailable(
                        "the database asks for a SASL mechanism other than SCRAM-SHA-256".into(),
                    ));
                }
                let mut client = sasl::ScramSha256::new(password()?, sasl::ChannelBinding::unsupported());
                frontend::sasl_initial_response(sasl::SCRAM_SHA_256, client.message(), &mut out)
                    .map_err(encode_error)?;
                self.send(&out).await?;
                let (AUTH_SASL_CONTINUE, data) = self.auth_request().await? else {
                    return Err(protocol_error("an unexpected SASL message"));
                };
                client.update(&data).map_err(auth_error)?;
                out.clear();
                frontend::sasl_response(client.message(), &mut out).map_err(encode_error)?;
                self.send(&out).await?;
                let (AUTH_SASL_FINAL, data) = self.auth_request().await? else {
                    return Err(protocol_error("an unexpected SASL message"));
                };
                client.finish(&data).map_err(auth_error)?;
                out.clear();
            }
            _ => return Err(protocol_error("an unsupported authentication request")),
        }
        if !out.is_empty() {
            self.send(&out).await?;
        }
        match self.auth_request().await? {
            (AUTH_OK, _) => Ok(()),
            _ => Err(protocol_error("an unexpected message after authentication")),
        }
    }

    /// Waits for ReadyForQuery, skipping parameter statuses and notices.
    async fn ready(&mut self) -> Result<(), BackendError> {
        loop {
            let (tag, body) = next_frame(&mut self.read, &mut self.buf).await?;
            match tag {
                b'Z' => return Ok(()),
                b'E' => return Err(server_error(&body)),
                _ => {}
            }
        }
    }

    /// Sends START_REPLICATION; an error leaves the connection ready for another try.
    async fn start(&mut self, command: &str) -> Result<(), BackendError> {
        let mut out = BytesMut::new();
        frontend::query(command, &mut out).map_err(encode_error)?;
        self.send(&out).await?;
        loop {
            let (tag, body) = next_frame(&mut self.read, &mut self.buf).await?;
            match tag {
                b'W' => return Ok(()),
                b'E' => {
                    let e = server_error(&body);
                    self.ready().await?;
                    return Err(e);
                }
                _ => {}
            }
        }
    }
}

/// Sends PostgreSQL's SSLRequest; the stream is ready for the TLS handshake
/// once the server answered 'S'.
async fn ask_for_tls(mut stream: tokio::net::TcpStream) -> std::io::Result<tokio::net::TcpStream> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut request = BytesMut::new();
    frontend::ssl_request(&mut request);
    stream.write_all(&request).await?;
    match stream.read_u8().await? {
        b'S' => Ok(stream),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "the server does not accept TLS connections (ssl = off)",
        )),
    }
}

fn encode_error(e: std::io::Error) -> BackendError {
    BackendError::Internal(format!("cannot encode a message: {e}"))
}

fn auth_error(e: std::io::Error) -> BackendError {
    BackendError::Unavailable(format!("the database's SCRAM authentication failed: {e}"))
}

/// The first of the configured hosts that accepts a connection, in TLS
/// when the source asks for it.
async fn connect(target: &Target) -> Result<Box<dyn Io>, BackendError> {
    let config = &target.config;
    let ports = config.get_ports();
    let timeout = config.get_connect_timeout().copied().unwrap_or(Duration::from_secs(10));
    let mut last = BackendError::Unavailable("the source names no host".into());
    for (i, host) in config.get_hosts().iter().enumerate() {
        let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
        let attempt = async {
            let io: Box<dyn Io> = match (host, &target.tls) {
                (Host::Tcp(name), Some(tls)) => {
                    let s = tcp((name.as_str(), port)).await?;
                    Box::new(tls.connect(name, ask_for_tls(s).await?).await?)
                }
                _ => socket(host, port).await?,
            };
            Ok::<_, std::io::Error>(io)
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(Ok(io)) => return Ok(io),
            // Connect errors name no host or credential.
            Ok(Err(e)) => last = BackendError::Unavailable(format!("cannot connect to the database: {e}")),
            Err(_) => last = BackendError::Unavailable("connecting to the database timed out".into()),
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_reports_go_out_twice_within_a_short_wal_sender_timeout() {
        assert_eq!(status_interval(60_000), STATUS_INTERVAL);
        assert_eq!(status_interval(5_000), Duration::from_millis(2_500));
        // Off (0): the server ends nothing; the default keeps the slot moving.
        assert_eq!(status_interval(0), STATUS_INTERVAL);
        assert_eq!(status_interval(1), Duration::from_millis(100));
    }

    #[test]
    fn a_status_report_is_a_standby_status_update() {
        let mut out = BytesMut::new();
        let status = Status {
            written: 0x10,
            flushed: 0x08,
            reply: true,
        };
        encode_status(status, 7, &mut out);
        assert_eq!(out.len(), 1 + 4 + 34);
        assert_eq!(&out[..6], &[b'd', 0, 0, 0, 38, b'r']);
        assert_eq!(&out[6..14], &0x10u64.to_be_bytes());
        assert_eq!(&out[14..22], &0x08u64.to_be_bytes());
        assert_eq!(&out[22..30], &0x08u64.to_be_bytes());
        assert_eq!(&out[30..38], &7i64.to_be_bytes());
        assert_eq!(out[38], 1);
    }

    /// `bytes` as the server's side of a connection that then closes.
    fn server_sends(bytes: &[u8]) -> ReadHalf<Box<dyn Io>> {
        let (ours, mut theirs) = tokio::io::duplex(7);
        let bytes = bytes.to_vec();
        tokio::spawn(async move {
            // Small writes into a small pipe: messages arrive in pieces.
            for piece in bytes.chunks(3) {
                if theirs.write_all(piece).await.is_err() {
                    return;
                }
            }
        });
        let io: Box<dyn Io> = Box::new(ours);
        tokio::io::split(io).0
    }

    #[tokio::test]
    async fn messages_arriving_in_pieces_are_read_whole_and_a_cut_one_is_an_error() {
        let mut bytes = vec![b'd', 0, 0, 0, 9, b'k', 1, 2, 3, 4];
        bytes.extend_from_slice(&[b'Z', 0, 0, 0, 5, b'I']);
        bytes.extend_from_slice(&[b'd', 0, 0, 0, 40, b'w']);
        let mut read = server_sends(&bytes);
        let mut buf = BytesMut::new();
        let (tag, body) = next_frame(&mut read, &mut buf).await.expect("first");
        assert_eq!((tag, &body[..]), (b'd', &[b'k', 1, 2, 3, 4][..]));
        let (tag, body) = next_frame(&mut read, &mut buf).await.expect("second");
        assert_eq!((tag, &body[..]), (b'Z', &b"I"[..]));
        let cut = next_frame(&mut read, &mut buf).await;
        assert!(matches!(cut, Err(BackendError::Unavailable(_))), "{cut:?}");
    }

    #[tokio::test]
    async fn a_length_no_server_sends_is_refused_before_any_allocation() {
        for len in [0u32, 3, u32::MAX] {
            let mut bytes = vec![b'd'];
            bytes.extend_from_slice(&len.to_be_bytes());
            let mut read = server_sends(&bytes);
            let e = next_frame(&mut read, &mut BytesMut::new()).await;
            assert!(matches!(e, Err(BackendError::Internal(_))), "{len}: {e:?}");
        }
    }

    #[test]
    fn a_server_error_keeps_its_sqlstate_and_message() {
        let body = b"SERROR\0VERROR\0C55006\0Mreplication slot \"s\" is active for PID 7\0\0";
        match server_error(body) {
            BackendError::Engine { code, message, .. } => {
                assert_eq!(code, OBJECT_IN_USE);
                assert_eq!(message, "replication slot \"s\" is active for PID 7");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_rejected_login_names_no_one() {
        let body = b"SFATAL\0C28P01\0Mpassword authentication failed for user \"alice\"\0\0";
        let e = server_error(body).to_string();
        assert!(e.contains("28P01"), "{e}");
        assert!(!e.contains("alice"), "{e}");
    }
}
