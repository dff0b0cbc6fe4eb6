//! Cancelling a session's statement, and knowing when the server has acted.
//!
//! tokio-postgres' `cancel_query` returns once the request is written; the
//! server signals the session a moment later. A session given to its next
//! caller in that moment has the next statement cancelled instead (libpq
//! waits for the server to close the cancel connection for this reason).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::Host;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{CancelToken, NoTls};

use super::net::{socket, tcp, Io};
use super::Target;

/// Longest wait for the server to take a cancel request.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(10);

/// Asks the server at `address` (the session's own, or over the Unix
/// socket of `target`) to cancel what the session of `token` runs, over TLS
/// when the session is, and returns once the server has closed the cancel
/// connection: by then it has signalled the session.
pub async fn cancel(token: &CancelToken, address: Option<SocketAddr>, target: &Target) -> Result<(), String> {
    let host = target.config.get_hosts().first().ok_or("the source names no host")?;
    let request = async {
        let io: Box<dyn Io> = match address {
            Some(address) => Box::new(tcp(address).await.map_err(|e| e.to_string())?),
            None => socket(host, target.port()).await.map_err(|e| e.to_string())?,
        };
        let stream = AwaitClose { io, shut: false };
        match (host, &target.tls) {
            (Host::Tcp(name), Some(tls)) => {
                let connect = MakeTlsConnect::<AwaitClose>::make_tls_connect(&mut tls.clone(), name)
                    .map_err(|e| e.to_string())?;
                token.cancel_query_raw(stream, connect).await
            }
            _ => token.cancel_query_raw(stream, NoTls).await,
        }
        .map_err(|e| e.to_string())
    };
    tokio::time::timeout(CANCEL_TIMEOUT, request)
        .await
        .map_err(|_| "the server did not take the cancel request in time".to_string())?
}

/// The cancel connection: shutting it down waits for the server to close it.
struct AwaitClose {
    io: Box<dyn Io>,
    shut: bool,
}

impl AsyncRead for AwaitClose {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for AwaitClose {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.shut {
            ready!(Pin::new(&mut self.io).poll_shutdown(cx))?;
            self.shut = true;
        }
        // The server sends nothing: the end of the stream, or a reset, is its answer.
        let mut scrap = [0u8; 64];
        loop {
            let mut buf = ReadBuf::new(&mut scrap);
            match ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf)) {
                Ok(()) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Ok(()) => {}
                Err(_) => return Poll::Ready(Ok(())),
            }
        }
    }
}
