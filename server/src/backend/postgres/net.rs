//! Plain connections to a source's server, before any TLS: the replication
//! session's and the cancel requests' (tokio-postgres opens its own).

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_postgres::config::Host;

pub(super) trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// A TCP connection, without Nagle's delay: the protocol's messages are small.
pub(super) async fn tcp(name: &str, port: u16) -> std::io::Result<tokio::net::TcpStream> {
    let s = tokio::net::TcpStream::connect((name, port)).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// A plain connection to `host`, before any TLS.
pub(super) async fn socket(host: &Host, port: u16) -> std::io::Result<Box<dyn Io>> {
    Ok(match host {
        Host::Tcp(name) => Box::new(tcp(name, port).await?),
        #[cfg(unix)]
        Host::Unix(dir) => Box::new(tokio::net::UnixStream::connect(dir.join(format!(".s.PGSQL.{port}"))).await?),
    })
}
