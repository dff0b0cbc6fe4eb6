//! The cap on client connections (`server.max_connections`): a connection
//! is accepted only with a permit, which it holds for its life, TLS
//! handshake included. Past the cap, new connections wait in the kernel's
//! listen backlog.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::Connected;

/// The permits of `server.max_connections`.
pub fn cap(max: u32) -> Arc<Semaphore> {
    Arc::new(Semaphore::new(usize::try_from(max).unwrap_or(Semaphore::MAX_PERMITS)))
}

/// Waits for a connection's permit; `None` once the cap is closed.
pub async fn permit(cap: &Arc<Semaphore>) -> Option<OwnedSemaphorePermit> {
    cap.clone().acquire_owned().await.ok()
}

/// A connection and the permit it holds until it is dropped.
pub struct Counted<IO> {
    io: IO,
    _permit: OwnedSemaphorePermit,
}

impl<IO> Counted<IO> {
    pub fn new(io: IO, permit: OwnedSemaphorePermit) -> Self {
        Self { io, _permit: permit }
    }
}

impl<IO: Connected> Connected for Counted<IO> {
    type ConnectInfo = IO::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Counted<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Counted<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Plain TCP connections, accepted as the cap allows, with TCP_NODELAY
/// (without it, Nagle's algorithm holds the last frames of a response back
/// until the peer's delayed ACK, about 40 ms) and keepalives.
pub fn plain(
    listener: TcpListener,
    cap: Arc<Semaphore>,
    server: crate::config::ServerConfig,
) -> impl Stream<Item = std::io::Result<Counted<TcpStream>>> {
    futures::stream::unfold((listener, cap, server), |(listener, cap, server)| async move {
        let permit = permit(&cap).await?;
        let accepted = match listener.accept().await {
            Ok((tcp, _)) => {
                let _ = tcp.set_nodelay(true);
                super::keep_alive(&tcp, &server);
                Ok(Counted::new(tcp, permit))
            }
            Err(e) => {
                super::accept_failed(&e).await;
                Err(e)
            }
        };
        Some((accepted, (listener, cap, server)))
    })
}
