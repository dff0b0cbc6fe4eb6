//! The gRPC server: transport settings, then auth and limits (one layer),
//! then the services; health and reflection on the same port.

pub mod auth;
pub mod jwt;
pub mod tls;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::codec::CompressionEncoding;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use weir_proto::v1::bulk_load_service_server::BulkLoadServiceServer;
use weir_proto::v1::query_service_server::QueryServiceServer;
use weir_proto::v1::schema_service_server::SchemaServiceServer;
use weir_proto::v1::stream_service_server::StreamServiceServer;

use crate::config::{Compression, Config};
use crate::limits::scheduler::Scheduler;
use crate::service::bulk::BulkApi;
use crate::service::query::QueryApi;
use crate::service::schema::SchemaApi;
use crate::service::stream::StreamApi;
use crate::service::transactions::Transactions;
use crate::service::Gate;
use crate::tenant::reload::Registry;
use auth::AuthLayer;

/// Calls and streams open at once on one client connection; a client with
/// more in flight opens more connections (tenants' own caps apply after).
const MAX_STREAMS_PER_CONNECTION: u32 = 1024;

/// Requests compressed with gzip or zstd are taken; responses are
/// compressed with `encoding`, if any, for clients that accept it. A macro
/// because each generated service has the methods, but no trait.
macro_rules! compression {
    ($service:expr, $encoding:expr) => {{
        let service = $service
            .accept_compressed(CompressionEncoding::Gzip)
            .accept_compressed(CompressionEncoding::Zstd);
        match $encoding {
            Some(Compression::Gzip) => service.send_compressed(CompressionEncoding::Gzip),
            Some(Compression::Zstd) => service.send_compressed(CompressionEncoding::Zstd),
            None => service,
        }
    }};
}

pub async fn serve(
    config: &Config,
    listener: TcpListener,
    tenants: Arc<Registry>,
    transactions: Arc<Transactions>,
    health: tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    cut: CancellationToken,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let max = config.server.max_request_bytes;
    let gate = Gate::new(
        Scheduler::new(config.server.max_concurrent_requests, config.server.max_queue_wait),
        cut.clone(),
    );
    let idle = config.server.stream_idle_timeout;
    let on = config.server.compression;
    let stream = compression!(
        StreamServiceServer::new(StreamApi::new(cut.clone(), config.changes.clone(), gate.clone(), idle))
            .max_decoding_message_size(max),
        on
    );
    let query = compression!(
        QueryServiceServer::new(QueryApi::new(transactions, cut.clone(), gate.clone(), idle))
            .max_decoding_message_size(max),
        on
    );
    let schema = compression!(
        SchemaServiceServer::new(SchemaApi::new(gate.clone())).max_decoding_message_size(max),
        on
    );
    let bulk = compression!(
        BulkLoadServiceServer::new(BulkApi::new(config.bulk.clone(), gate, cut)).max_decoding_message_size(max),
        on
    );
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(weir_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1();
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(weir_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha();
    let (reflection_v1, reflection_v1alpha) = (reflection_v1?, reflection_v1alpha?);
    let tls = tenants.tls();
    let mut builder = Server::builder();
    // Without a grace: tonic then sends GOAWAY at the age and lets the calls
    // in progress finish (with one, it closes the connection at age + grace
    // without a GOAWAY, cutting them).
    if let Some(age) = config.server.max_connection_age {
        builder = builder.max_connection_age(age);
    }
    let router = builder
        // tonic leaves both unlimited: streams that take no credential
        // (health Watch) could pile up on one connection without end, and a
        // peer could make the server reset streams without end.
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .http2_max_local_error_reset_streams(Some(1024))
        .layer(AuthLayer::new(tenants))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(query)
        .add_service(schema)
        .add_service(bulk)
        .add_service(stream);
    match tls {
        Some(tls) => {
            router
                .serve_with_incoming_shutdown(tls::incoming(listener, tls, config.server.clone()), shutdown)
                .await?;
        }
        // Without TCP_NODELAY, Nagle's algorithm holds the last frames of a
        // response back until the peer's delayed ACK, about 40 ms.
        None => {
            let server = Arc::new(config.server.clone());
            let incoming = TcpIncoming::from(listener).with_nodelay(Some(true)).then(move |conn| {
                let server = server.clone();
                async move {
                    match &conn {
                        Ok(socket) => keep_alive(socket, &server),
                        Err(e) => accept_failed(e).await,
                    }
                    conn
                }
            });
            router.serve_with_incoming_shutdown(incoming, shutdown).await?;
        }
    }
    Ok(())
}

/// A failed accept (out of file descriptors, say) fails again at once:
/// waits a moment rather than spin on it.
pub async fn accept_failed(e: &std::io::Error) {
    tracing::warn!(error = %e, "cannot accept a connection");
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
}

/// TCP keepalives for a client connection, and a bound on unacknowledged
/// data (TCP_USER_TIMEOUT: the kernel sends no keepalive probe while data is
/// in flight, such as a load's flow-control updates, and would retransmit
/// for about 15 minutes). Not HTTP/2 PINGs: hyper ends a connection whose
/// PING goes unanswered with NO_ERROR, which its request bodies report as a
/// clean end, so a client-streamed load cut that way would commit the rows it
/// had sent. A socket whose probes go unanswered fails with an error
/// instead, and the load is rolled back.
pub fn keep_alive(socket: &tokio::net::TcpStream, server: &crate::config::ServerConfig) {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(server.keepalive_time)
        .with_interval(server.keepalive_interval)
        .with_retries(server.keepalive_retries);
    let socket = socket2::SockRef::from(socket);
    let _ = socket.set_tcp_keepalive(&keepalive);
    let _ = socket.set_tcp_user_timeout(Some(
        server.keepalive_time + server.keepalive_interval * server.keepalive_retries,
    ));
}
