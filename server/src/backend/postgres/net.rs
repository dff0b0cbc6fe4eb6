//! Plain connections to a source's server, before any TLS: pooled and
//! shared sessions', the replication session's and cancel requests'.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio_postgres::config::Host;

pub(super) trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// A TCP connection, without Nagle's delay: the protocol's messages are small.
pub(super) async fn tcp(to: impl ToSocketAddrs) -> io::Result<TcpStream> {
    let s = TcpStream::connect(to).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// A plain connection to `host`, before any TLS.
pub(super) async fn socket(host: &Host, port: u16) -> io::Result<Box<dyn Io>> {
    Ok(match host {
        Host::Tcp(name) => Box::new(tcp((name.as_str(), port)).await?),
        #[cfg(unix)]
        Host::Unix(dir) => Box::new(tokio::net::UnixStream::connect(dir.join(format!(".s.PGSQL.{port}"))).await?),
    })
}

/// The addresses of `name`: a session tries each in turn, as libpq and
/// tokio-postgres do.
pub(super) async fn addresses(name: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    Ok(tokio::net::lookup_host((name, port)).await?.collect())
}

/// Keepalives of pooled sessions: one the path dropped without a word (a
/// NAT's or load balancer's idle timeout, a server gone in a failover) is
/// found within about a minute, in the background, and closed, instead of
/// being handed to a caller whose statement then waits for its deadline
/// (the driver's default waits 2 hours before the first probe). No bound
/// on unacknowledged data (TCP_USER_TIMEOUT): Linux applies it to a closed
/// receive window too, and a COPY the server stopped reading while it waits
/// for a lock would be cut after it.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_RETRIES: u32 = 3;

/// A session's TCP connection to `address`, with TCP keepalives unless
/// `config` turns them off.
pub(super) async fn session_tcp(address: SocketAddr, config: &tokio_postgres::Config) -> io::Result<TcpStream> {
    let s = tcp(address).await?;
    if config.get_keepalives() {
        let keepalive = TcpKeepalive::new()
            .with_time(KEEPALIVE_IDLE)
            .with_interval(KEEPALIVE_INTERVAL)
            .with_retries(KEEPALIVE_RETRIES);
        SockRef::from(&s).set_tcp_keepalive(&keepalive)?;
    }
    Ok(s)
}
