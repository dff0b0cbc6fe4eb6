//! The connection to a Weir server and typed wrappers around its RPCs.

use std::time::Duration;

use arrow_array::RecordBatch;
use arrow_ipc::reader::StreamDecoder;
use arrow_schema::SchemaRef;

use tokio_stream::{Stream, StreamExt};
use tonic::codec::CompressionEncoding;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::{Request, Status, Streaming};
use weir_proto::raw::{RawExecuteStreamResponse, RawPayload, RawRows};
use weir_proto::v1::bulk_load_service_client::BulkLoadServiceClient;
use weir_proto::v1::execute_stream_response::Payload;
use weir_proto::v1::load_request::Message as LoadMessage;
use weir_proto::v1::query_service_client::QueryServiceClient;
use weir_proto::v1::schema_service_client::SchemaServiceClient;
use weir_proto::v1::stream_service_client::StreamServiceClient;
use weir_proto::v1::{
    BeginTransactionRequest, Column, CommitRequest, DescribeTableRequest, DescribeTableResponse, ExecuteRequest,
    ExecuteResponse, ExecuteStreamRequest, ExecuteStreamResponse, IsolationLevel, ListSchemasRequest,
    ListSourcesRequest, ListTablesRequest, ListTablesResponse, LoadAbort, LoadHeader, LoadRequest, LoadResponse,
    LoadRows, QueryStats, ResultFormat, RollbackRequest, Row, SchemaInfo, SourceInfo, TableInfo, TestConnectionRequest,
    TestConnectionResponse, Value,
};

use crate::status::{request_id, with_request_id};
use crate::transport::{self, H2Channel, Settings, Tls};

/// A channel that authenticates every call with the API key.
pub type AuthChannel = InterceptedService<H2Channel, ApiKeyInterceptor>;

/// Unary results may be larger than tonic's 4 MiB default; the server enforces
/// its own per-tenant cap and reports RESOURCE_EXHAUSTED beyond it.
const MAX_DECODING_MESSAGE_SIZE: usize = 64 * 1024 * 1024;

/// Frames of up to this size may come from the server (HTTP/2's default is
/// 16 KiB): a result batch of about 1 MiB then goes out in a few writes
/// instead of 64, and is read in a few.
const MAX_FRAME_SIZE: u32 = 1024 * 1024;

/// Without a timeout, connecting to an address that drops packets hangs for
/// the OS's TCP timeout, which is minutes.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Tables per ListTables answer: a few hundred KB at most.
const LIST_TABLES_PAGE: i32 = 1000;

/// Whether `page`, asked for with `sent`, is the listing's last. A page
/// before the last has tables and a token other than `sent`: one without
/// would be asked for again and again (a bug in a server or proxy).
fn is_last_page(sent: &str, page: &ListTablesResponse) -> Result<bool, Status> {
    if page.next_page_token.is_empty() {
        return Ok(true);
    }
    if page.tables.is_empty() || page.next_page_token == sent {
        return Err(Status::internal(
            "ListTables answered a page that does not move the listing on",
        ));
    }
    Ok(false)
}

/// Errors from [`WeirClient::connect`]; call errors are [`tonic::Status`].
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The address is not a valid URI.
    #[error("invalid server address {addr:?}")]
    InvalidAddress {
        addr: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The key holds characters that a header cannot carry.
    #[error("the API key is not a valid header value (it must be visible ASCII)")]
    InvalidApiKey,
    /// The TLS settings cannot be used.
    #[error("invalid TLS settings")]
    Tls(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The server could not be reached.
    #[error("cannot connect to {addr}")]
    Transport {
        addr: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Adds `authorization: Bearer <key>` (an API key or a JWT) to every request.
#[derive(Clone, Debug)]
pub struct ApiKeyInterceptor {
    /// None with client-certificate authentication alone.
    header: Option<MetadataValue<Ascii>>,
}

impl ApiKeyInterceptor {
    /// Fails when the key cannot be sent as a header value.
    pub fn new(api_key: &str) -> Result<Self, ClientError> {
        let mut header: MetadataValue<Ascii> = format!("Bearer {api_key}")
            .parse()
            .map_err(|_| ClientError::InvalidApiKey)?;
        // Keeps the key out of Debug output and out of HPACK's index.
        header.set_sensitive(true);
        Ok(Self { header: Some(header) })
    }

    /// Sends no bearer token (the client certificate authenticates).
    pub fn none() -> Self {
        Self { header: None }
    }
}

impl Interceptor for ApiKeyInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(header) = &self.header {
            request.metadata_mut().insert("authorization", header.clone());
        }
        Ok(request)
    }
}

/// TLS to the server: the CA that signed its certificate, and optionally a
/// client certificate for mutual TLS.
#[derive(Clone, Default)]
pub struct TlsOptions {
    /// PEM CA certificate(s) the server's certificate is verified against;
    /// None for the public web authorities (webpki-roots). An empty file is
    /// refused, never read as "the public authorities".
    pub ca_pem: Option<Vec<u8>>,
    /// PEM client certificate chain and private key, for mutual TLS.
    pub identity_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// The name the server's certificate must carry, when it is not the address's host.
    pub domain: Option<String>,
}

/// Without the client's private key, which a log line must never carry.
impl std::fmt::Debug for TlsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsOptions")
            .field(
                "ca_pem",
                &self.ca_pem.as_ref().map(|pem| format!("{} bytes", pem.len())),
            )
            .field(
                "identity_pem",
                &self.identity_pem.as_ref().map(|_| "<client certificate and key>"),
            )
            .field("domain", &self.domain)
            .finish()
    }
}

/// A connected, authenticated client. Cloning is cheap and clones share the
/// underlying HTTP/2 connection.
#[derive(Clone, Debug)]
pub struct WeirClient {
    /// For calls made without a generated client (raw result streams).
    channel: AuthChannel,
    /// Answers may come compressed (see [`WeirClient::uncompressed`]).
    compressed: bool,
    query: QueryServiceClient<AuthChannel>,
    schema: SchemaServiceClient<AuthChannel>,
    bulk: BulkLoadServiceClient<AuthChannel>,
    stream: StreamServiceClient<AuthChannel>,
}

impl WeirClient {
    /// Connects to `addr` ("http://host:port", or "host:port" for plain
    /// HTTP/2) and authenticates every call with `api_key`.
    pub async fn connect(addr: &str, api_key: &str) -> Result<WeirClient, ClientError> {
        Self::connect_with(addr, Some(api_key), None).await
    }

    /// Connects with an optional bearer token (API key or JWT) and optional
    /// TLS ("https://host:port"); with a client certificate the token may be
    /// left out. An https:// address without TLS settings trusts the public
    /// web authorities.
    pub async fn connect_with(
        addr: &str,
        bearer: Option<&str>,
        tls: Option<TlsOptions>,
    ) -> Result<WeirClient, ClientError> {
        let tls = match tls {
            None if addr.starts_with("https://") => Some(TlsOptions::default()),
            other => other,
        };
        let interceptor = match bearer {
            Some(token) => ApiKeyInterceptor::new(token)?,
            None => ApiKeyInterceptor::none(),
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let addr = if addr.contains("://") {
            addr.to_owned()
        } else {
            format!("{scheme}://{addr}")
        };
        let invalid = |source: Box<dyn std::error::Error + Send + Sync>| ClientError::InvalidAddress {
            addr: addr.clone(),
            source,
        };
        let uri: http::Uri = addr.parse().map_err(|e: http::uri::InvalidUri| invalid(e.into()))?;
        match uri.scheme_str() {
            Some(s) if s == scheme => {}
            Some("http") => return Err(invalid("TLS settings need an https:// address".into())),
            _ => return Err(invalid("use host:port, http://host:port or https://host:port".into())),
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| invalid("the address has no host".into()))?;
        let tls = match tls {
            Some(options) => Some(Tls::new(options, transport::host(&authority)).map_err(ClientError::Tls)?),
            None => None,
        };
        let settings = Settings {
            connect_timeout: CONNECT_TIMEOUT,
            max_frame_size: MAX_FRAME_SIZE,
            tls,
        };
        let channel = H2Channel::connect(authority, settings)
            .await
            .map_err(|reason| ClientError::Transport {
                addr: addr.clone(),
                source: reason.into(),
            })?;
        Ok(WeirClient::with_channel(
            InterceptedService::new(channel, interceptor),
            true,
        ))
    }

    /// The clients of `channel`; `compressed`: every call names gzip and
    /// zstd as encodings it accepts, so a server with `server.compression`
    /// set compresses its answers.
    fn with_channel(channel: AuthChannel, compressed: bool) -> WeirClient {
        macro_rules! accepting {
            ($client:expr) => {{
                let client = $client;
                if compressed {
                    client
                        .accept_compressed(CompressionEncoding::Gzip)
                        .accept_compressed(CompressionEncoding::Zstd)
                } else {
                    client
                }
            }};
        }
        WeirClient {
            query: accepting!(QueryServiceClient::new(channel.clone()))
                .max_decoding_message_size(MAX_DECODING_MESSAGE_SIZE),
            schema: accepting!(SchemaServiceClient::new(channel.clone()))
                .max_decoding_message_size(MAX_DECODING_MESSAGE_SIZE),
            bulk: accepting!(BulkLoadServiceClient::new(channel.clone()))
                .max_encoding_message_size(MAX_DECODING_MESSAGE_SIZE),
            stream: accepting!(StreamServiceClient::new(channel.clone()))
                .max_encoding_message_size(MAX_DECODING_MESSAGE_SIZE)
                .max_decoding_message_size(MAX_DECODING_MESSAGE_SIZE),
            channel,
            compressed,
        }
    }

    /// The same client (and connection), its answers never compressed
    /// whatever `server.compression` says: on a fast network compressing
    /// only costs CPU. A generated client's `accept_compressed` still asks.
    pub fn uncompressed(&self) -> WeirClient {
        WeirClient::with_channel(self.channel.clone(), false)
    }

    /// The generated QueryService client, for calls the helpers do not cover.
    pub fn query(&self) -> QueryServiceClient<AuthChannel> {
        self.query.clone()
    }

    /// The generated SchemaService client, for calls the helpers do not cover.
    pub fn schema(&self) -> SchemaServiceClient<AuthChannel> {
        self.schema.clone()
    }

    /// The generated StreamService client (Kafka produce, consume, commit, topics).
    pub fn stream(&self) -> StreamServiceClient<AuthChannel> {
        self.stream.clone()
    }

    /// The generated BulkLoadService client, for calls the helpers do not cover.
    pub fn bulk(&self) -> BulkLoadServiceClient<AuthChannel> {
        self.bulk.clone()
    }

    /// Loads row batches into a table: the header goes first, then every
    /// batch `rows` yields. The server commits only when the stream ends.
    pub async fn load(
        &self,
        header: LoadHeader,
        rows: impl Stream<Item = Vec<Row>> + Send + 'static,
    ) -> Result<LoadResponse, Status> {
        self.load_or_abort(header, rows.map(Ok)).await
    }

    /// Like [`Self::load`], for input that can turn out bad part way: an
    /// `Err(reason)` aborts the load (nothing is committed, the call fails
    /// with ABORTED) and ends the stream.
    pub async fn load_or_abort(
        &self,
        header: LoadHeader,
        rows: impl Stream<Item = Result<Vec<Row>, String>> + Send + 'static,
    ) -> Result<LoadResponse, Status> {
        let first = LoadRequest {
            message: Some(LoadMessage::Header(header)),
        };
        // Up to and including the first abort.
        let mut aborted = false;
        let batches = rows
            .take_while(move |batch| {
                let more = !aborted;
                aborted |= batch.is_err();
                more
            })
            .map(|batch| LoadRequest {
                message: Some(match batch {
                    Ok(rows) => LoadMessage::Rows(LoadRows { rows }),
                    Err(reason) => LoadMessage::Abort(LoadAbort { reason }),
                }),
            });
        let requests = tokio_stream::once(first).chain(batches);
        Ok(self.bulk().load(requests).await?.into_inner())
    }

    /// Runs one statement in autocommit mode and returns its whole result.
    pub async fn execute(&self, source: &str, sql: &str, params: Vec<Value>) -> Result<ExecuteResponse, Status> {
        self.execute_in(&[], source, sql, params).await
    }

    /// Runs one statement in the transaction `tx_id` (from [`Self::begin`]);
    /// an empty `tx_id` means autocommit.
    pub async fn execute_in(
        &self,
        tx_id: &[u8],
        source: &str,
        sql: &str,
        params: Vec<Value>,
    ) -> Result<ExecuteResponse, Status> {
        let request = ExecuteRequest {
            source: source.to_owned(),
            sql: sql.to_owned(),
            params,
            transaction_id: tx_id.to_vec(),
            options: None,
        };
        Ok(self.query().execute(request).await?.into_inner())
    }

    /// Runs one statement and streams its result in batches.
    pub async fn execute_stream(&self, source: &str, sql: &str, params: Vec<Value>) -> Result<ResultStream, Status> {
        let request = stream_request(source, sql, params);
        ResultStream::from_response(self.query().execute_stream(request).await?).await
    }

    /// Like [`Self::execute_stream`], with each batch left in wire form: its
    /// values are read on demand, text and bytes borrowed from the batch
    /// instead of copied into a `String` each. For large results read value
    /// by value.
    pub async fn execute_stream_raw(
        &self,
        source: &str,
        sql: &str,
        params: Vec<Value>,
    ) -> Result<ResultStream<RawExecuteStreamResponse>, Status> {
        let request = stream_request(source, sql, params);
        let mut grpc =
            tonic::client::Grpc::new(self.channel.clone()).max_decoding_message_size(MAX_DECODING_MESSAGE_SIZE);
        if self.compressed {
            grpc = grpc
                .accept_compressed(CompressionEncoding::Gzip)
                .accept_compressed(CompressionEncoding::Zstd);
        }
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(format!("the connection is not ready: {e}")))?;
        let codec = tonic_prost::ProstCodec::<ExecuteStreamRequest, RawExecuteStreamResponse>::default();
        let path = PathAndQuery::from_static("/weir.v1.QueryService/ExecuteStream");
        let response = grpc.server_streaming(Request::new(request), path, codec).await?;
        ResultStream::from_response(response).await
    }

    /// Like [`Self::execute_stream`], with the rows as Arrow record batches
    /// (`RESULT_FORMAT_ARROW_IPC`): for analytics clients, and for wide
    /// results read column by column.
    pub async fn execute_stream_arrow(
        &self,
        source: &str,
        sql: &str,
        params: Vec<Value>,
    ) -> Result<ArrowStream, Status> {
        let request = ExecuteStreamRequest {
            format: ResultFormat::ArrowIpc.into(),
            ..stream_request(source, sql, params)
        };
        let response = self.query().execute_stream(request).await?;
        Ok(ArrowStream {
            rows: ResultStream::from_response(response).await?,
            decoder: StreamDecoder::new(),
            unread: None,
            ended: false,
        })
    }

    /// Opens a transaction and returns its handle.
    pub async fn begin(&self, source: &str, isolation: IsolationLevel, read_only: bool) -> Result<Vec<u8>, Status> {
        let request = BeginTransactionRequest {
            source: source.to_owned(),
            isolation: isolation.into(),
            read_only,
            options: None,
        };
        let response = self.query().begin_transaction(request).await?;
        Ok(response.into_inner().transaction_id)
    }

    /// Commits the transaction `tx_id`.
    pub async fn commit(&self, tx_id: &[u8]) -> Result<(), Status> {
        let request = CommitRequest {
            transaction_id: tx_id.to_vec(),
        };
        self.query().commit(request).await?;
        Ok(())
    }

    /// Rolls the transaction `tx_id` back.
    pub async fn rollback(&self, tx_id: &[u8]) -> Result<(), Status> {
        let request = RollbackRequest {
            transaction_id: tx_id.to_vec(),
        };
        self.query().rollback(request).await?;
        Ok(())
    }

    /// The tenant's sources.
    pub async fn list_sources(&self) -> Result<Vec<SourceInfo>, Status> {
        let response = self.schema().list_sources(ListSourcesRequest {}).await?;
        Ok(response.into_inner().sources)
    }

    /// Reaches the source and measures a round trip.
    pub async fn test_connection(&self, source: &str) -> Result<TestConnectionResponse, Status> {
        let request = TestConnectionRequest {
            source: source.to_owned(),
        };
        Ok(self.schema().test_connection(request).await?.into_inner())
    }

    /// The source's schemas, without the engine's system schemas.
    pub async fn list_schemas(&self, source: &str) -> Result<Vec<SchemaInfo>, Status> {
        let request = ListSchemasRequest {
            source: source.to_owned(),
            include_system: false,
        };
        Ok(self.schema().list_schemas(request).await?.into_inner().schemas)
    }

    /// Tables of `schema`, or of every non-system schema when it is empty.
    /// Read a page at a time, so that a catalog of any size fits the
    /// message size limit.
    pub async fn list_tables(&self, source: &str, schema: &str) -> Result<Vec<TableInfo>, Status> {
        let mut tables = Vec::new();
        let mut page_token = String::new();
        loop {
            let request = ListTablesRequest {
                source: source.to_owned(),
                schema: schema.to_owned(),
                page_size: LIST_TABLES_PAGE,
                page_token: page_token.clone(),
            };
            let page = self.schema().list_tables(request).await?.into_inner();
            let last = is_last_page(&page_token, &page)?;
            tables.extend(page.tables);
            if last {
                return Ok(tables);
            }
            page_token = page.next_page_token;
        }
    }

    /// Describes `table`; an empty `schema` means the source's default one.
    pub async fn describe_table(
        &self,
        source: &str,
        schema: &str,
        table: &str,
    ) -> Result<DescribeTableResponse, Status> {
        let request = DescribeTableRequest {
            source: source.to_owned(),
            schema: schema.to_owned(),
            table: table.to_owned(),
        };
        Ok(self.schema().describe_table(request).await?.into_inner())
    }
}

/// The result of `ExecuteStream`: columns up front, then row batches, then
/// statistics. `M` is how the messages are decoded: into [`Row`]s (the
/// default), or left in wire form ([`RawExecuteStreamResponse`], from
/// [`WeirClient::execute_stream_raw`]).
#[derive(Debug)]
pub struct ResultStream<M = ExecuteStreamResponse> {
    stream: Streaming<M>,
    columns: Vec<Column>,
    stats: Option<QueryStats>,
    done: bool,
    /// The server's `x-request-id`, from the response headers, for errors
    /// that come later in trailers without it.
    request_id: Option<MetadataValue<Ascii>>,
}

/// What one `ExecuteStream` message carries, however its rows are decoded.
#[derive(Debug)]
pub enum Part<B> {
    Metadata(Vec<Column>),
    Batch(B),
    /// A piece of the Arrow IPC stream of a `RESULT_FORMAT_ARROW_IPC` call.
    Arrow(Vec<u8>),
    Stats(QueryStats),
}

/// A decoding of `ExecuteStreamResponse`.
pub trait StreamMessage {
    /// What a batch of rows decodes to.
    type Batch;
    /// The message's payload; `None` when it has none.
    fn into_part(self) -> Option<Part<Self::Batch>>;
}

impl StreamMessage for ExecuteStreamResponse {
    type Batch = Vec<Row>;
    fn into_part(self) -> Option<Part<Vec<Row>>> {
        Some(match self.payload? {
            Payload::Metadata(m) => Part::Metadata(m.columns),
            Payload::Batch(b) => Part::Batch(b.rows),
            Payload::ArrowIpc(piece) => Part::Arrow(piece),
            Payload::Stats(s) => Part::Stats(s),
        })
    }
}

impl StreamMessage for RawExecuteStreamResponse {
    type Batch = RawRows;
    fn into_part(self) -> Option<Part<RawRows>> {
        Some(match self.payload? {
            RawPayload::Metadata(m) => Part::Metadata(m.columns),
            RawPayload::Batch(b) => Part::Batch(b),
            RawPayload::Stats(s) => Part::Stats(s),
            RawPayload::ArrowIpc(piece) => Part::Arrow(piece),
        })
    }
}

impl<M: StreamMessage> ResultStream<M> {
    /// Reads the leading `ResultMetadata` message of an `ExecuteStream` call,
    /// for callers that issue the call themselves through [`WeirClient::query`].
    pub async fn new(stream: Streaming<M>) -> Result<Self, Status> {
        Self::begin(stream, None).await
    }

    /// Like [`Self::new`], keeping the response's request id for its errors.
    async fn from_response(response: tonic::Response<Streaming<M>>) -> Result<Self, Status> {
        let request_id = request_id(&response);
        let stream = response.into_inner();
        Self::begin(stream, request_id.clone())
            .await
            .map_err(|status| with_request_id(status, request_id.as_ref()))
    }

    async fn begin(mut stream: Streaming<M>, request_id: Option<MetadataValue<Ascii>>) -> Result<Self, Status> {
        let Some(first) = stream.message().await? else {
            return Err(protocol_violation("the stream ended before result metadata"));
        };
        let columns = match first.into_part() {
            Some(Part::Metadata(columns)) => columns,
            Some(Part::Batch(_) | Part::Arrow(_)) => {
                return Err(protocol_violation("a row batch came before the result metadata"))
            }
            Some(Part::Stats(_)) => return Err(protocol_violation("statistics came before the result metadata")),
            None => return Err(protocol_violation("a message had no payload")),
        };
        Ok(ResultStream {
            stream,
            columns,
            stats: None,
            done: false,
            request_id,
        })
    }

    /// The result's columns, known before any row arrives.
    pub fn columns(&self) -> &[Column] {
        &self.columns
    }

    /// The next batch of rows, or `None` once the stream ended with its
    /// statistics.
    pub async fn next_batch(&mut self) -> Result<Option<M::Batch>, Status> {
        match self.next_rows().await? {
            Some(Part::Batch(batch)) => Ok(Some(batch)),
            Some(_) => Err(protocol_violation("an Arrow IPC piece came in a stream of rows")),
            None => Ok(None),
        }
    }

    /// The next row batch or Arrow IPC piece, or `None` once the stream
    /// ended with its statistics.
    async fn next_rows(&mut self) -> Result<Option<Part<M::Batch>>, Status> {
        let next = self.read_rows().await;
        next.map_err(|status| with_request_id(status, self.request_id.as_ref()))
    }

    async fn read_rows(&mut self) -> Result<Option<Part<M::Batch>>, Status> {
        while !self.done {
            let Some(message) = self.stream.message().await? else {
                self.done = true;
                if self.stats.is_none() {
                    // Catches a stream cut short without a gRPC error.
                    return Err(protocol_violation("the stream ended without statistics"));
                }
                break;
            };
            match (message.into_part(), &self.stats) {
                (Some(Part::Stats(stats)), None) => self.stats = Some(stats),
                (Some(Part::Metadata(_)), _) => return Err(protocol_violation("result metadata came twice")),
                (Some(part), None) => return Ok(Some(part)),
                (Some(_), Some(_)) => return Err(protocol_violation("a message came after the statistics")),
                (None, _) => return Err(protocol_violation("a message had no payload")),
            }
        }
        Ok(None)
    }

    /// The statistics, once [`Self::next_batch`] has returned `None`.
    pub fn stats(&self) -> Option<&QueryStats> {
        self.stats.as_ref()
    }
}

/// The result of `ExecuteStream` with `RESULT_FORMAT_ARROW_IPC`, from
/// [`WeirClient::execute_stream_arrow`]: Weir's columns up front, then Arrow
/// record batches, then statistics.
pub struct ArrowStream {
    rows: ResultStream,
    decoder: StreamDecoder,
    /// The piece being decoded.
    unread: Option<Piece>,
    /// The end-of-stream marker was read.
    ended: bool,
}

/// What ends an Arrow IPC stream: the continuation marker and a zero length.
const END_OF_STREAM: [u8; 8] = [0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0];

/// An `arrow_ipc` piece being decoded, and what tells whether it ends the
/// stream: the server's last piece is the end-of-stream marker alone, or
/// (for an empty result) the schema and the marker. A piece holding a
/// record batch may end with the marker's bytes too (eight int64 values
/// ending in 4294967295, say), so ending so is not enough.
struct Piece {
    /// Bytes not decoded yet.
    buffer: arrow_buffer::Buffer,
    /// Its last bytes are the marker's.
    ends_as_marker: bool,
    /// It is the marker alone (which may complete a batch begun before it).
    only_marker: bool,
    /// A record batch came out of it.
    gave_batch: bool,
}

impl Piece {
    fn ends_stream(&self) -> bool {
        self.ends_as_marker && (self.only_marker || !self.gave_batch)
    }
}

impl ArrowStream {
    /// The result's columns as Weir describes them (engine type names included).
    pub fn columns(&self) -> &[Column] {
        self.rows.columns()
    }

    /// The Arrow schema, once the first piece has been read (it comes with
    /// the first batch, or alone for an empty result).
    pub fn schema(&self) -> Option<SchemaRef> {
        self.decoder.schema()
    }

    /// The next record batch, or `None` once the stream ended with its statistics.
    pub async fn next_batch(&mut self) -> Result<Option<RecordBatch>, Status> {
        loop {
            if let Some(mut piece) = self.unread.take() {
                while !piece.buffer.is_empty() {
                    let decoded = self
                        .decoder
                        .decode(&mut piece.buffer)
                        .map_err(|e| protocol_violation(&format!("an Arrow IPC piece does not decode: {e}")))?;
                    if let Some(batch) = decoded {
                        // A piece may end inside the next message (a batch
                        // without columns is read only when more bytes come).
                        piece.gave_batch = true;
                        self.unread = Some(piece);
                        return Ok(Some(batch));
                    }
                }
                self.ended = piece.ends_stream() && self.decoder.finish().is_ok() && self.decoder.schema().is_some();
                continue;
            }
            match self.rows.next_rows().await? {
                Some(Part::Arrow(_)) if self.ended => {
                    return Err(protocol_violation("an Arrow IPC piece came after the end of its stream"))
                }
                Some(Part::Arrow(piece)) => {
                    self.unread = Some(Piece {
                        ends_as_marker: piece.ends_with(&END_OF_STREAM),
                        only_marker: piece == END_OF_STREAM,
                        buffer: arrow_buffer::Buffer::from(piece),
                        gave_batch: false,
                    })
                }
                Some(_) => return Err(protocol_violation("a row batch came in an Arrow IPC stream")),
                // The statistics came: the server's last piece must have ended the stream.
                None if self.ended => return Ok(None),
                None => {
                    return Err(protocol_violation(
                        "the statistics came before the end of the Arrow IPC stream (a server without Arrow IPC results sends rows instead)",
                    ))
                }
            }
        }
    }

    /// The statistics, once [`Self::next_batch`] has returned `None`.
    pub fn stats(&self) -> Option<&QueryStats> {
        self.rows.stats()
    }
}

fn stream_request(source: &str, sql: &str, params: Vec<Value>) -> ExecuteStreamRequest {
    ExecuteStreamRequest {
        source: source.to_owned(),
        sql: sql.to_owned(),
        params,
        ..Default::default()
    }
}

fn protocol_violation(what: &str) -> Status {
    Status::internal(format!("protocol violation in ExecuteStream response: {what}"))
}

#[cfg(test)]
mod tests {
    use tokio_stream::wrappers::TcpListenerStream;
    use tonic::transport::Server;
    use tonic::{Code, Response};
    use weir_proto::v1::query_service_server::{QueryService, QueryServiceServer};
    use weir_proto::v1::{BeginTransactionResponse, CommitResponse, ResultMetadata, RollbackResponse, RowBatch};

    use super::*;

    #[test]
    fn a_page_that_does_not_move_the_listing_on_is_an_error() {
        let page = |tables: usize, next: &str| ListTablesResponse {
            tables: vec![TableInfo::default(); tables],
            next_page_token: next.into(),
        };
        assert!(is_last_page("", &page(0, "")).expect("an empty listing"));
        assert!(is_last_page("t1", &page(3, "")).expect("the last page"));
        assert!(!is_last_page("", &page(3, "t1")).expect("a page before the last"));
        assert!(is_last_page("t1", &page(3, "t1")).is_err(), "the same token again");
        assert!(is_last_page("", &page(0, "t1")).is_err(), "no tables, yet a next page");
    }

    /// A QueryService that plays the ExecuteStream script named by the SQL
    /// text and answers Execute with the authorization header it received.
    struct Fake;

    fn message(payload: Payload) -> Result<ExecuteStreamResponse, Status> {
        Ok(ExecuteStreamResponse { payload: Some(payload) })
    }

    fn metadata() -> Result<ExecuteStreamResponse, Status> {
        message(Payload::Metadata(ResultMetadata {
            columns: vec![Column {
                name: "n".into(),
                ..Default::default()
            }],
        }))
    }

    fn batch(n: i64) -> Result<ExecuteStreamResponse, Status> {
        message(Payload::Batch(RowBatch {
            rows: vec![Row { values: vec![n.into()] }],
            ..Default::default()
        }))
    }

    fn stats() -> Result<ExecuteStreamResponse, Status> {
        message(Payload::Stats(QueryStats {
            rows_returned: 2,
            ..Default::default()
        }))
    }

    fn script(name: &str) -> Vec<Result<ExecuteStreamResponse, Status>> {
        match name {
            "ok" => vec![metadata(), batch(1), batch(2), stats()],
            "batch first" => vec![batch(1)],
            "empty" => vec![],
            "no stats" => vec![metadata(), batch(1)],
            "metadata twice" => vec![metadata(), metadata()],
            "batch after stats" => vec![metadata(), stats(), batch(1)],
            "fails midway" => vec![metadata(), batch(1), Err(Status::aborted("deadlock"))],
            _ => vec![Err(Status::invalid_argument("unknown script"))],
        }
    }

    #[tonic::async_trait]
    impl QueryService for Fake {
        async fn execute(&self, request: Request<ExecuteRequest>) -> Result<Response<ExecuteResponse>, Status> {
            let auth = request
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            Ok(Response::new(ExecuteResponse {
                rows: vec![Row {
                    values: vec![auth.into()],
                }],
                ..Default::default()
            }))
        }

        type ExecuteStreamStream = tokio_stream::Iter<std::vec::IntoIter<Result<ExecuteStreamResponse, Status>>>;

        async fn execute_stream(
            &self,
            request: Request<ExecuteStreamRequest>,
        ) -> Result<Response<Self::ExecuteStreamStream>, Status> {
            let sql = request.into_inner().sql;
            Ok(Response::new(tokio_stream::iter(script(&sql))))
        }

        async fn begin_transaction(
            &self,
            _: Request<BeginTransactionRequest>,
        ) -> Result<Response<BeginTransactionResponse>, Status> {
            Err(Status::unimplemented("not faked"))
        }

        async fn commit(&self, _: Request<CommitRequest>) -> Result<Response<CommitResponse>, Status> {
            Err(Status::unimplemented("not faked"))
        }

        async fn rollback(&self, _: Request<RollbackRequest>) -> Result<Response<RollbackResponse>, Status> {
            Err(Status::unimplemented("not faked"))
        }
    }

    async fn fake_client() -> WeirClient {
        let (listener, addr) = local_listener().await;
        tokio::spawn(
            Server::builder()
                .add_service(QueryServiceServer::new(Fake))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        // Without a scheme, as users may type it.
        WeirClient::connect(&addr.to_string(), "secret")
            .await
            .expect("connect to the fake")
    }

    async fn stream_error(client: &WeirClient, script: &str) -> Status {
        match client.execute_stream("src", script, vec![]).await {
            Ok(_) => panic!("{script}: the stream was accepted"),
            Err(status) => status,
        }
    }

    async fn batch_error(client: &WeirClient, script: &str) -> Status {
        let mut stream = client
            .execute_stream("src", script, vec![])
            .await
            .expect("the stream starts");
        loop {
            match stream.next_batch().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("{script}: the stream ended without error"),
                Err(status) => return status,
            }
        }
    }

    #[tokio::test]
    async fn every_call_carries_the_api_key() {
        let client = fake_client().await;
        let response = client.execute("src", "", vec![]).await.expect("execute");
        assert_eq!(response.rows[0].values[0], Value::from("Bearer secret"));
    }

    #[tokio::test]
    async fn result_stream_yields_columns_batches_then_stats() {
        let client = fake_client().await;
        let mut stream = client
            .execute_stream("src", "ok", vec![])
            .await
            .expect("execute_stream");
        assert_eq!(stream.columns()[0].name, "n");
        assert!(stream.stats().is_none());
        let mut values = Vec::new();
        while let Some(rows) = stream.next_batch().await.expect("next_batch") {
            values.extend(rows.into_iter().flat_map(|r| r.values));
        }
        assert_eq!(values, [Value::from(1i64), Value::from(2i64)]);
        assert_eq!(stream.stats().map(|s| s.rows_returned), Some(2));
        assert_eq!(stream.next_batch().await.expect("after the end"), None);
    }

    #[tokio::test]
    async fn result_stream_requires_metadata_first() {
        let client = fake_client().await;
        for script in ["batch first", "empty"] {
            let status = stream_error(&client, script).await;
            assert_eq!(status.code(), Code::Internal, "{script}");
            assert!(status.message().contains("protocol violation"), "{script}");
        }
    }

    #[tokio::test]
    async fn result_stream_rejects_out_of_order_messages() {
        let client = fake_client().await;
        for script in ["no stats", "metadata twice", "batch after stats"] {
            let status = batch_error(&client, script).await;
            assert_eq!(status.code(), Code::Internal, "{script}");
            assert!(status.message().contains("protocol violation"), "{script}");
        }
    }

    #[tokio::test]
    async fn result_stream_passes_server_errors_through() {
        let client = fake_client().await;
        let status = batch_error(&client, "fails midway").await;
        assert_eq!(status.code(), Code::Aborted);
        assert_eq!(status.message(), "deadlock");
    }

    async fn local_listener() -> (tokio::net::TcpListener, std::net::SocketAddr) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a local port");
        let addr = listener.local_addr().expect("local address");
        (listener, addr)
    }

    /// Serves the fake on `listener` until the returned sender fires or drops.
    fn serve(listener: tokio::net::TcpListener) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let _ = Server::builder()
                .add_service(QueryServiceServer::new(Fake))
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                })
                .await;
        });
        (stop, server)
    }

    #[tokio::test]
    async fn a_lost_connection_is_opened_again_by_the_next_call() {
        let (listener, addr) = local_listener().await;
        let (stop, server) = serve(listener);
        let client = WeirClient::connect(&addr.to_string(), "secret")
            .await
            .expect("connect to the fake");
        let response = client.execute("src", "x", vec![]).await.expect("served");
        assert_eq!(response.rows[0].values[0], Value::from("Bearer secret"));

        let _ = stop.send(());
        server.await.expect("the server stops");
        let status = client.execute("src", "x", vec![]).await.expect_err("nothing serves");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(status.message().contains("cannot connect"), "{status:?}");

        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind the port again");
        let (_stop, _server) = serve(listener);
        for value in concurrently(&client).await {
            assert_eq!(value, Value::from("Bearer secret"));
        }
    }

    #[tokio::test]
    async fn a_connection_lost_mid_call_fails_the_call_as_unavailable_and_the_next_call_reconnects() {
        let (listener, addr) = local_listener().await;
        // The first connection takes one call and dies before answering it.
        let dies = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.expect("accept");
            let mut connection = h2::server::handshake(socket).await.expect("HTTP/2 handshake");
            let call = connection.accept().await;
            assert!(matches!(call, Some(Ok(_))), "the call arrived");
            drop(connection);
            listener
        });
        let client = WeirClient::connect(&addr.to_string(), "secret").await.expect("connect");
        let status = client.execute("src", "x", vec![]).await.expect_err("no answer");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");

        let (_stop, _server) = serve(dies.await.expect("the first connection ends"));
        let response = client
            .execute("src", "x", vec![])
            .await
            .expect("served on a new connection");
        assert_eq!(response.rows[0].values[0], Value::from("Bearer secret"));
    }

    /// Eight calls at once on a client whose connection must be opened again.
    async fn concurrently(client: &WeirClient) -> Vec<Value> {
        let calls: Vec<_> = (0..8)
            .map(|_| {
                let client = client.clone();
                tokio::spawn(async move { client.execute("src", "x", vec![]).await })
            })
            .collect();
        let mut served = Vec::new();
        for call in calls {
            let response = call.await.expect("the call task").expect("served by the new server");
            served.push(response.rows[0].values[0].clone());
        }
        served
    }

    /// Answers a request on a raw h2 server with one `ExecuteResponse` holding `text`.
    fn answer(mut respond: h2::server::SendResponse<bytes::Bytes>, text: &str) {
        let head = http::Response::builder()
            .header("content-type", "application/grpc")
            .body(())
            .expect("head");
        let mut send = respond.send_response(head, false).expect("headers sent");
        let message = prost::Message::encode_to_vec(&ExecuteResponse {
            rows: vec![Row {
                values: vec![text.into()],
            }],
            ..Default::default()
        });
        let mut framed = vec![0u8];
        framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
        framed.extend_from_slice(&message);
        send.send_data(framed.into(), false).expect("message sent");
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        send.send_trailers(trailers).expect("trailers sent");
    }

    /// A server that refuses the first stream with REFUSED_STREAM after
    /// `delay`, then answers the second; it reports the `grpc-timeout`
    /// each call was sent with.
    fn refusing_once(
        listener: tokio::net::TcpListener,
        delay: Duration,
    ) -> tokio::task::JoinHandle<Vec<Option<Duration>>> {
        tokio::spawn(async move {
            let (socket, _) = listener.accept().await.expect("accept");
            let mut connection = h2::server::handshake(socket).await.expect("HTTP/2 handshake");
            let mut sent = Vec::new();
            while let Some(Ok((request, mut respond))) = connection.accept().await {
                let timeout = request.headers().get("grpc-timeout").and_then(|v| v.to_str().ok());
                sent.push(timeout.and_then(weir_proto::deadline::parse_grpc_timeout));
                if sent.len() == 1 {
                    tokio::time::sleep(delay).await;
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                } else {
                    answer(respond, "second");
                    // Serves the connection until the client is done with it.
                    tokio::spawn(async move { while connection.accept().await.is_some() {} });
                    return sent;
                }
            }
            sent
        })
    }

    #[tokio::test]
    async fn a_call_the_server_refused_before_running_it_is_sent_again() {
        let (listener, addr) = local_listener().await;
        let server = refusing_once(listener, Duration::ZERO);
        let client = WeirClient::connect(&addr.to_string(), "secret").await.expect("connect");
        let response = client.execute("src", "x", vec![]).await.expect("sent again, answered");
        assert_eq!(response.rows[0].values[0], Value::from("second"));
        assert_eq!(server.await.expect("the server").len(), 2);
    }

    /// The deadline a call sends again tells the server the time left, not
    /// the whole timeout again: the server answers with its reason just
    /// before the deadline it is told, which must come before the client's.
    #[tokio::test]
    async fn a_call_sent_again_tells_the_server_the_time_left() {
        let (listener, addr) = local_listener().await;
        let server = refusing_once(listener, Duration::from_millis(500));
        let client = WeirClient::connect(&addr.to_string(), "secret").await.expect("connect");
        let mut request = tonic::Request::new(ExecuteRequest {
            source: "src".into(),
            sql: "x".into(),
            ..Default::default()
        });
        request.set_timeout(Duration::from_secs(5));
        client.query().execute(request).await.expect("sent again, answered");
        let sent = server.await.expect("the server");
        let [Some(first), Some(second)] = sent[..] else {
            panic!("two calls with a grpc-timeout each: {sent:?}");
        };
        assert!(
            first <= Duration::from_secs(5) && first > Duration::from_millis(4500),
            "{first:?}"
        );
        assert!(
            second <= first - Duration::from_millis(450),
            "{first:?} then {second:?}"
        );
    }

    #[tokio::test]
    async fn a_call_beyond_a_goaway_is_sent_again_on_a_new_connection() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (listener, addr) = local_listener().await;
        // The first connection, in raw frames: GOAWAY with last stream 0 as
        // soon as the call's HEADERS come, so the call was never run.
        let first = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            let mut preface = [0u8; 24];
            socket.read_exact(&mut preface).await.expect("preface");
            // An empty SETTINGS.
            socket.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.expect("settings");
            loop {
                let mut header = [0u8; 9];
                socket.read_exact(&mut header).await.expect("a frame");
                let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
                let mut payload = vec![0u8; length];
                socket.read_exact(&mut payload).await.expect("its payload");
                match (header[3], header[4] & 1) {
                    // SETTINGS: acknowledged.
                    (4, 0) => socket.write_all(&[0, 0, 0, 4, 1, 0, 0, 0, 0]).await.expect("ack"),
                    // HEADERS: GOAWAY, last stream 0, NO_ERROR.
                    (1, _) => {
                        let goaway = [0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
                        socket.write_all(&goaway).await.expect("goaway");
                        break;
                    }
                    _ => {}
                }
            }
            // Held open: the client must not wait for it to close.
            (listener, socket)
        });
        let client = WeirClient::connect(&addr.to_string(), "secret").await.expect("connect");
        let call = tokio::spawn(async move { client.execute("src", "x", vec![]).await });
        let (listener, _held) = first.await.expect("the first connection");
        let (_stop, _server) = serve(listener);
        let response = call.await.expect("the call").expect("served on a new connection");
        assert_eq!(response.rows[0].values[0], Value::from("Bearer secret"));
    }

    #[tokio::test]
    async fn a_server_that_never_answers_fails_the_call_at_its_deadline() {
        let (listener, addr) = local_listener().await;
        // Accepts connections and holds them open without a word.
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let client = WeirClient::connect(&addr.to_string(), "secret").await.expect("connect");
        let mut request = Request::new(ExecuteRequest::default());
        request.set_timeout(Duration::from_millis(100));
        let started = std::time::Instant::now();
        let status = client.query().execute(request).await.expect_err("no answer comes");
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    }

    /// Accepts one call on a raw h2 server and answers its headers (with
    /// `request_id` if given); the caller drives the connection on.
    async fn headers_only(
        listener: tokio::net::TcpListener,
        request_id: Option<&'static str>,
    ) -> Option<(
        h2::server::Connection<tokio::net::TcpStream, bytes::Bytes>,
        h2::SendStream<bytes::Bytes>,
    )> {
        let (socket, _) = listener.accept().await.expect("accept");
        let mut connection = h2::server::handshake(socket).await.expect("HTTP/2 handshake");
        let Some(Ok((_, mut respond))) = connection.accept().await else {
            return None;
        };
        let mut head = http::Response::builder().header("content-type", "application/grpc");
        if let Some(id) = request_id {
            head = head.header("x-request-id", id);
        }
        let stream = respond
            .send_response(head.body(()).expect("head"), false)
            .expect("headers sent");
        Some((connection, stream))
    }

    #[tokio::test]
    async fn a_stream_whose_server_stops_sending_ends_at_its_deadline() {
        let (listener, addr) = local_listener().await;
        // Answers the call's headers, then says nothing more.
        tokio::spawn(async move {
            let Some((mut connection, _stream)) = headers_only(listener, None).await else {
                return;
            };
            // Keeps the connection served (PINGs, window updates) meanwhile.
            while connection.accept().await.is_some() {}
        });
        let client = WeirClient::connect(&addr.to_string(), "secret").await.expect("connect");
        let mut request = Request::new(ExecuteStreamRequest::default());
        request.set_timeout(Duration::from_millis(300));
        let started = std::time::Instant::now();
        let mut stream = client
            .query()
            .execute_stream(request)
            .await
            .expect("the headers came")
            .into_inner();
        let status = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .expect("the deadline ends the wait")
            .expect_err("no message comes");
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    }

    /// A change stream cut after the server's headers fails on the client's
    /// side (no grpc-status came); the error still names the call by the
    /// request id the headers gave, as the server's own errors do.
    #[tokio::test]
    async fn a_change_stream_cut_midway_names_its_request_id() {
        let (listener, addr) = local_listener().await;
        let (cut, when) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let Some((mut connection, mut stream)) = headers_only(listener, Some("req-7")).await else {
                return;
            };
            // Reset once the client has the headers: the cut is midway.
            tokio::select! {
                _ = when => stream.send_reset(h2::Reason::INTERNAL_ERROR),
                _ = async { while connection.accept().await.is_some() {} } => return,
            }
            while connection.accept().await.is_some() {}
        });
        let client = WeirClient::connect(&addr.to_string(), "secret").await.expect("connect");
        let mut watch = client.watch(Default::default()).await.expect("the headers came");
        cut.send(()).expect("the server waits");
        let status = watch.next().await.expect_err("the stream was reset");
        let id = status.metadata().get("x-request-id").and_then(|v| v.to_str().ok());
        assert_eq!(id, Some("req-7"), "{status:?}");
        assert!(crate::describe_status(&status).contains("request id req-7"));
    }

    #[tokio::test]
    async fn a_stream_that_arrived_in_time_is_read_whole_however_late() {
        let client = fake_client().await;
        let mut request = Request::new(stream_request("src", "ok", vec![]));
        request.set_timeout(Duration::from_millis(200));
        let mut stream = client
            .query()
            .execute_stream(request)
            .await
            .expect("the stream starts")
            .into_inner();
        // Everything has arrived; the caller reads it after its deadline.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let mut messages = 0;
        while let Some(_message) = stream.message().await.expect("no deadline error for what arrived") {
            messages += 1;
        }
        assert_eq!(messages, 4);
    }

    #[tokio::test]
    async fn tls_settings_and_the_scheme_must_agree_and_be_usable() {
        // https:// alone trusts the public authorities: it gets as far as connecting.
        assert!(matches!(
            WeirClient::connect("https://127.0.0.1:1", "key").await,
            Err(ClientError::Transport { .. })
        ));
        let no_ca = TlsOptions {
            ca_pem: Some(b"not a certificate".to_vec()),
            ..Default::default()
        };
        // An empty CA file (an unfilled secret) is refused, not taken for the public authorities.
        let empty_ca = TlsOptions {
            ca_pem: Some(Vec::new()),
            ..Default::default()
        };
        assert!(matches!(
            WeirClient::connect_with("127.0.0.1:1", Some("key"), Some(empty_ca)).await,
            Err(ClientError::Tls(_))
        ));
        assert!(matches!(
            WeirClient::connect_with("http://127.0.0.1:1", Some("key"), Some(no_ca.clone())).await,
            Err(ClientError::InvalidAddress { .. })
        ));
        assert!(matches!(
            WeirClient::connect_with("127.0.0.1:1", Some("key"), Some(no_ca)).await,
            Err(ClientError::Tls(_))
        ));
        // The client's private key never shows in a log line.
        let identity = TlsOptions {
            identity_pem: Some((b"CERT".to_vec(), b"-----BEGIN PRIVATE KEY----- secret".to_vec())),
            ..Default::default()
        };
        let shown = format!("{identity:?}");
        assert!(!shown.contains("secret") && !shown.contains("PRIVATE"), "{shown}");
    }

    #[tokio::test]
    async fn connect_reports_bad_input_and_unreachable_servers() {
        assert!(matches!(
            WeirClient::connect("127.0.0.1:1", "bad\nkey").await,
            Err(ClientError::InvalidApiKey)
        ));
        assert!(matches!(
            WeirClient::connect("http://[::1", "key").await,
            Err(ClientError::InvalidAddress { .. })
        ));
        // Another scheme: say which addresses are taken.
        match WeirClient::connect("grpc://weir.ns.svc:50051", "key").await {
            Err(e @ ClientError::InvalidAddress { .. }) => {
                let said = std::error::Error::source(&e).map_or(String::new(), |s| s.to_string());
                assert!(said.contains("host:port"), "{said}");
            }
            other => panic!("{:?}", other.err()),
        }
        // A port that was just free has nothing listening.
        let (listener, addr) = local_listener().await;
        drop(listener);
        assert!(matches!(
            WeirClient::connect(&format!("http://{addr}"), "key").await,
            Err(ClientError::Transport { .. })
        ));
    }
}
