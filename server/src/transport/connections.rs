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
use tonic::transport::server::{Connected, TcpConnectInfo};

/// The permits of `server.max_connections`.
pub fn cap(max: u32) -> Arc<Semaphore> {
    Arc::new(Semaphore::new(usize::try_from(max).unwrap_or(Semaphore::MAX_PERMITS)))
}

/// Waits for a connection's permit; `None` once the cap is closed.
pub async fn permit(cap: &Arc<Semaphore>) -> Option<OwnedSemaphorePermit> {
    cap.clone().acquire_owned().await.ok()
}

/// A connection, what its calls are told of its peer (in their request
/// extensions), and the permit it holds until it is dropped.
pub struct Counted<IO, Info> {
    io: IO,
    info: Info,
    _permit: OwnedSemaphorePermit,
}

impl<IO, Info> Counted<IO, Info> {
    pub fn new(io: IO, info: Info, permit: OwnedSemaphorePermit) -> Self {
        Self {
            io,
            info,
            _permit: permit,
        }
    }
}

impl<IO, Info: Clone + Send + Sync + 'static> Connected for Counted<IO, Info> {
    type ConnectInfo = Info;
    fn connect_info(&self) -> Info {
        self.info.clone()
    }
}

impl<IO: AsyncRead + Unpin, Info: Unpin> AsyncRead for Counted<IO, Info> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin, Info: Unpin> AsyncWrite for Counted<IO, Info> {
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

/// A plain TCP connection.
pub type PlainConn = Counted<TcpStream, TcpConnectInfo>;

/// Plain TCP connections, accepted as the cap allows, with TCP_NODELAY
/// (without it, Nagle's algorithm holds the last frames of a response back
/// until the peer's delayed ACK, about 40 ms) and keepalives.
pub fn plain(
    listener: TcpListener,
    cap: Arc<Semaphore>,
    server: crate::config::ServerConfig,
) -> impl Stream<Item = std::io::Result<PlainConn>> {
    futures::stream::unfold((listener, cap, server), |(listener, cap, server)| async move {
        let permit = permit(&cap).await?;
        let accepted = match listener.accept().await {
            Ok((tcp, _)) => {
                let _ = tcp.set_nodelay(true);
                super::keep_alive(&tcp, &server);
                let info = tcp.connect_info();
                Ok(Counted::new(tcp, info, permit))
            }
            Err(e) => {
                super::accept_failed(&e).await;
                Err(e)
            }
        };
        Some((accepted, (listener, cap, server)))
    })
}
