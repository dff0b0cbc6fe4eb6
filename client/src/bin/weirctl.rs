//! `weirctl`: run queries against Weir and look at its sources from a shell.

use std::error::Error;
use std::fmt;
use std::io::{self, BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::json;
use tokio::sync::mpsc::error::TryRecvError;
use tonic::{Code, Status};
use tonic_types::StatusExt;
use weir_client::load_input::{match_columns, CsvReader, JsonLinesReader, RowLines, RowReader};
use weir_client::output;
use weir_client::output::{Format, RowWriter};
use weir_client::weir_proto::v1::{
    BadRowPolicy, BulkLoadMode, Capabilities, ChangeEvent, ChangeOperation, Column, ColumnInfo, ColumnType,
    DeleteSubscriptionRequest, DescribeTableResponse, LoadHeader, Row, TableInfo, TableKind, TableRef, Value,
    WatchStart,
};
use weir_client::{describe_status, parse_param, request_id, with_request_id, ClientError, TlsOptions, WeirClient};

#[derive(Parser)]
#[command(version, about = "Command line client for Weir")]
struct Cli {
    /// Server address, "http://host:port", "https://host:port" or "host:port"
    /// [default: 127.0.0.1:50051, over TLS when a TLS option is given]
    #[arg(long, env = "WEIR_ADDR", global = true)]
    addr: Option<String>,
    /// API key, sent as a bearer token [default: demo]. Visible to other users
    /// in the process list: prefer WEIR_API_KEY or --key-file.
    #[arg(long, env = "WEIR_API_KEY", hide_env_values = true, global = true)]
    key: Option<String>,
    /// Reads the API key from this file (its first line) instead of --key or
    /// WEIR_API_KEY. (Not a conflict with them: an exported WEIR_API_KEY
    /// would make every --key-file a usage error.)
    #[arg(long, env = "WEIR_API_KEY_FILE", global = true)]
    key_file: Option<PathBuf>,
    /// Connect with TLS, verifying the server against this PEM CA certificate.
    #[arg(long, env = "WEIR_CA_CERT", global = true)]
    ca_cert: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS; with it, --key is not sent unless given explicitly.
    #[arg(long, env = "WEIR_CLIENT_CERT", global = true, requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// Private key (PEM) of --client-cert.
    #[arg(long, env = "WEIR_CLIENT_KEY", global = true, requires = "client_cert")]
    client_key: Option<PathBuf>,
    /// Name the server's certificate must carry, when it is not the address's host (implies TLS).
    #[arg(long, global = true)]
    tls_domain: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table, global = true)]
    format: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one SQL statement and print its result as it streams in.
    Query {
        /// Name of the source.
        source: String,
        /// The statement, with the engine's placeholders ($1, ? or @P1).
        sql: String,
        /// A positional parameter (repeat for each placeholder): 42, 1.5, true,
        /// null, text, or typed as int:, uint:, float:, bool:, str:, decimal:,
        /// bytes:HEX, date:YYYY-MM-DD, ts:RFC3339, uuid:, json:.
        #[arg(long = "param", short = 'p', value_name = "P", value_parser = parse_param, allow_hyphen_values = true)]
        params: Vec<Value>,
    },
    /// List the sources the API key can use.
    Sources,
    /// List the tables of a source.
    Tables {
        /// Name of the source.
        source: String,
        /// Only this schema (default: every non-system schema).
        #[arg(long)]
        schema: Option<String>,
    },
    /// Show a table's columns, keys and indexes.
    Describe {
        /// Name of the source.
        source: String,
        table: String,
        /// Schema of the table (default: the source's default schema).
        #[arg(long)]
        schema: Option<String>,
    },
    /// Load a CSV (with a header line) or JSON Lines file into a table, in
    /// one transaction: a bad value anywhere loads nothing.
    Load {
        /// Name of the source.
        source: String,
        table: String,
        /// The file; "-" reads standard input.
        file: std::path::PathBuf,
        /// Schema of the table (default: the source's default schema).
        #[arg(long)]
        schema: Option<String>,
        #[arg(long, value_enum, default_value_t = LoadMode::Append)]
        mode: LoadMode,
        /// Unique key columns an upsert matches on, comma-separated.
        #[arg(long, value_delimiter = ',')]
        conflict: Vec<String>,
        /// Idempotency key: rerunning the same load with it loads nothing again.
        #[arg(long)]
        load_id: Option<String>,
        /// Input format (default: from the file's extension, else CSV).
        #[arg(long, value_enum)]
        input: Option<InputFormat>,
        /// CSV text that means NULL when unquoted (a quoted field is never NULL).
        #[arg(long, default_value = "")]
        null: String,
        /// Rows per message sent to the server, at most 100,000 (a message also ends at about 4 MiB).
        #[arg(long, default_value_t = 5000)]
        batch_rows: usize,
        /// Skip rows the server finds invalid and report them, instead of failing the load.
        #[arg(long)]
        skip_bad_rows: bool,
    },
    /// Produce records to a Kafka topic: the VALUES given, else the lines of
    /// --file, else the lines of standard input.
    Produce {
        /// Name of the Kafka source.
        source: String,
        topic: String,
        /// Values of the records; put `--` before values that start with
        /// `-` and are not numbers.
        #[arg(allow_negative_numbers = true)]
        values: Vec<String>,
        /// Read one record per line from this file.
        #[arg(long)]
        file: Option<std::path::PathBuf>,
        /// Key of every record (--key is the API key).
        #[arg(long)]
        record_key: Option<String>,
    },
    /// Consume records from a Kafka topic and print them as they arrive.
    Consume {
        /// Name of the Kafka source.
        source: String,
        topic: String,
        /// Consumer group (namespaced for your tenant).
        #[arg(long)]
        group: String,
        /// Where to start: earliest or latest (where the group left off,
        /// else the first or the next record), or an RFC 3339 time (every
        /// partition from the first record at or after it, read outside the
        /// group: nothing is committed, and the group's offsets stay).
        #[arg(long, default_value = "earliest")]
        from: String,
        /// Stop after this many records (default: run until interrupted).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        max: Option<u64>,
        /// Do not commit offsets (commit them with `weirctl commit` once
        /// processed). Without it, a stream from earliest or latest commits
        /// offsets as records are handed over, before they are printed: at
        /// most once (a stream from a time commits nothing either way).
        #[arg(long)]
        manual: bool,
    },
    /// Commit a consumer group's offsets: where the group resumes, for each
    /// partition the offset of the next record to read (the last processed
    /// one plus 1).
    Commit {
        /// Name of the Kafka source.
        source: String,
        /// Consumer group (namespaced for your tenant).
        #[arg(long)]
        group: String,
        /// TOPIC:PARTITION:OFFSET, one per partition.
        #[arg(required = true, value_parser = parse_partition_offset)]
        offsets: Vec<weir_client::weir_proto::v1::PartitionOffset>,
    },
    /// Follow row changes of tables as JSON lines, acknowledging each as it
    /// is printed. Restarted with the same --state file, it resumes exactly
    /// after the last change it printed.
    Watch {
        /// Name of the SQL source.
        source: String,
        /// Tables to watch, as `table` or `schema.table`.
        #[arg(required = true)]
        tables: Vec<String>,
        /// Subscription name (namespaced for your tenant).
        #[arg(long)]
        subscription: String,
        /// Stream the tables' current rows first.
        #[arg(long)]
        snapshot: bool,
        /// Resume after this position (hex, as printed in "position").
        #[arg(long)]
        from: Option<String>,
        /// File keeping the last acknowledged position: read at start, written as it advances.
        #[arg(long)]
        state: Option<std::path::PathBuf>,
        /// Replace a consumer already reading the subscription.
        #[arg(long)]
        take_over: bool,
        /// Stop after this many changes (default: run until interrupted).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        max: Option<u64>,
    },
    /// Delete a change-stream subscription so the database stops keeping changes for it.
    Unwatch {
        /// Name of the SQL source.
        source: String,
        subscription: String,
    },
    /// List a Kafka source's topics with partitions and watermarks.
    Topics {
        /// Name of the Kafka source.
        source: String,
    },
    /// Test the connection to a source and measure a round trip.
    Ping {
        /// Name of the source.
        source: String,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LoadMode {
    Append,
    Upsert,
    Replace,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum InputFormat {
    Csv,
    Jsonl,
}

/// Why a command failed; printed as one `error:` line.
enum Failure {
    Connect(ClientError),
    Rpc(Status),
    Output(io::Error),
    Input(String),
    /// The output closed (`| head`) before the result's end: the statement
    /// was stopped there.
    CutShort,
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Failure::Connect(e)
    }
}

impl From<Status> for Failure {
    fn from(s: Status) -> Self {
        Failure::Rpc(s)
    }
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        Failure::Output(e)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Transport errors say little at the top ("transport error"); the
            // cause, such as "Connection refused", is further down the chain.
            Failure::Connect(e) => {
                write!(f, "{e}")?;
                let mut last = String::new();
                let mut source = e.source();
                while let Some(cause) = source {
                    // Some layers repeat their cause's message.
                    let text = cause.to_string();
                    if text != last {
                        write!(f, ": {text}")?;
                    }
                    last = text;
                    source = cause.source();
                }
                Ok(())
            }
            Failure::Rpc(status) => f.write_str(&describe_status(status)),
            Failure::Output(e) => write!(f, "cannot write output: {e}"),
            Failure::CutShort => f.write_str(
                "the output closed before the result ended, so the statement was stopped there \
                 (if it was a write that returns rows, it was rolled back: redirect to a file instead)",
            ),
            Failure::Input(message) => f.write_str(message),
        }
    }
}

/// Writes to stderr: one closed early (`2>&1 | head`) is not worth a
/// panic, whose exit status (101) scripts would take for another failure.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// As `say!`, without ending the line.
macro_rules! say_on {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stderr(), $($arg)*);
    }};
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            say!("error: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(run(cli));
    // Not waiting for an input reader blocked on stdin (a load the server
    // refused while rows still trickle in): the answer is already given.
    runtime.shutdown_background();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`weirctl query ... | head`): not an error.
        Err(Failure::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        // As a program killed by SIGPIPE, which `set -o pipefail` reports.
        Err(Failure::CutShort) => {
            say!("weirctl: {}", Failure::CutShort);
            ExitCode::from(141)
        }
        Err(failure) => {
            say!("error: {failure}");
            ExitCode::FAILURE
        }
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, Failure> {
    std::fs::read(path).map_err(|e| Failure::Input(format!("cannot read {}: {e}", path.display())))
}

async fn run(cli: Cli) -> Result<(), Failure> {
    // Any TLS option means TLS: never send the key in plaintext because
    // one of them was given without another. Without --ca-cert the server
    // is checked against the public web authorities.
    let wants_tls = cli.ca_cert.is_some() || cli.client_cert.is_some() || cli.tls_domain.is_some();
    let tls = if wants_tls {
        Some(TlsOptions {
            ca_pem: cli.ca_cert.as_deref().map(read_file).transpose()?,
            identity_pem: match (&cli.client_cert, &cli.client_key) {
                (Some(cert), Some(key)) => Some((read_file(cert)?, read_file(key)?)),
                _ => None,
            },
            domain: cli.tls_domain.clone(),
        })
    } else {
        None
    };
    // With a client certificate the demo key default is not sent; an explicit key still is.
    let key = match &cli.key_file {
        Some(path) => {
            let key = std::fs::read_to_string(path)
                .map_err(|e| Failure::Input(format!("cannot read --key-file {}: {e}", path.display())))?
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_string();
            // An unfilled secret would send `Bearer ` and fail as a bad key.
            if key.is_empty() {
                return Err(Failure::Input(format!(
                    "--key-file {}: its first line is empty",
                    path.display()
                )));
            }
            key
        }
        None => cli.key.clone().unwrap_or_else(|| "demo".into()),
    };
    let explicit_key = cli.key_file.is_some() || cli.key.is_some();
    let bearer = (cli.client_cert.is_none() || explicit_key).then_some(key.as_str());
    // Without a scheme the TLS options decide: the default address must not
    // say http:// when WEIR_CA_CERT (shared with the Python client) is set.
    let addr = cli.addr.as_deref().unwrap_or("127.0.0.1:50051");
    let client = WeirClient::connect_with(addr, bearer, tls).await?;
    let mut out = BufWriter::new(io::stdout().lock());
    match cli.command {
        Command::Query { source, sql, params } => query(&client, cli.format, &source, &sql, params, &mut out).await,
        Command::Sources => sources(&client, cli.format, &mut out).await,
        Command::Tables { source, schema } => {
            let tables = client
                .list_tables(&source, schema.as_deref().unwrap_or_default())
                .await?;
            print_tables(cli.format, &tables, &mut out)
        }
        Command::Describe { source, table, schema } => {
            let schema = schema.unwrap_or_default();
            let description = client.describe_table(&source, &schema, &table).await?;
            let info = description.table.clone().unwrap_or(TableInfo {
                schema,
                name: table,
                ..Default::default()
            });
            print_description(cli.format, &info, &description, &mut out)
        }
        Command::Ping { source } => ping(&client, cli.format, &source, &mut out).await,
        Command::Produce {
            source,
            topic,
            values,
            file,
            record_key,
        } => produce(&client, cli.format, &source, &topic, values, file, record_key, &mut out).await,
        Command::Consume {
            source,
            topic,
            group,
            from,
            max,
            manual,
        } => {
            if cli.format == Format::Csv {
                return Err(Failure::Input(
                    "consume prints records as table lines or JSON lines, not CSV".into(),
                ));
            }
            let request = weir_client::weir_proto::v1::ConsumeRequest {
                source,
                topics: vec![topic],
                group,
                start: Some(start_position(&from)?),
                commit_mode: if manual {
                    weir_client::weir_proto::v1::CommitMode::Manual as i32
                } else {
                    weir_client::weir_proto::v1::CommitMode::Unspecified as i32
                },
                max_records: max.unwrap_or(0),
                options: None,
            };
            consume(&client, cli.format, request, &mut out).await
        }
        Command::Topics { source } => topics(&client, cli.format, &source, &mut out).await,
        Command::Commit { source, group, offsets } => {
            let n = offsets.len() as u64;
            client
                .stream()
                .commit_offsets(weir_client::weir_proto::v1::CommitOffsetsRequest { source, group, offsets })
                .await?;
            if cli.format == Format::Json {
                writeln!(out, "{}", json!({"committed": n}))?;
            } else {
                writeln!(out, "committed {n} {}", plural(n, "offset"))?;
            }
            Ok(out.flush()?)
        }
        Command::Watch {
            source,
            tables,
            subscription,
            snapshot,
            from,
            state,
            take_over,
            max,
        } => {
            let from_given = from.is_some();
            let resume = match (from, &state) {
                (Some(hex_position), _) => {
                    hex::decode(hex_position.trim()).map_err(|_| Failure::Input("--from must be hex".into()))?
                }
                (None, Some(path)) if path.exists() => {
                    let text = std::fs::read_to_string(path)
                        .map_err(|e| Failure::Input(format!("cannot read the state file {}: {e}", path.display())))?;
                    match hex::decode(text.trim()) {
                        Ok(position) if !position.is_empty() => position,
                        _ => return Err(Failure::Input(format!("{} does not hold a position", path.display()))),
                    }
                }
                _ => Vec::new(),
            };
            let snapshot = wants_snapshot(snapshot, from_given, &resume);
            let start = WatchStart {
                source,
                tables: tables.iter().map(|t| table_ref(t)).collect(),
                subscription,
                resume_position: resume,
                snapshot,
                take_over,
                options: None,
            };
            watch(&client, start, state, max, &mut out).await
        }
        Command::Unwatch { source, subscription } => {
            client
                .stream()
                .delete_subscription(DeleteSubscriptionRequest { source, subscription })
                .await?;
            Ok(())
        }
        Command::Load {
            source,
            table,
            file,
            schema,
            mode,
            conflict,
            load_id,
            input,
            null,
            batch_rows,
            skip_bad_rows,
        } => {
            let header = LoadHeader {
                source,
                schema: schema.unwrap_or_default(),
                table,
                mode: match mode {
                    LoadMode::Append => BulkLoadMode::Append,
                    LoadMode::Upsert => BulkLoadMode::Upsert,
                    LoadMode::Replace => BulkLoadMode::Replace,
                } as i32,
                conflict_columns: conflict,
                load_id: load_id.unwrap_or_default(),
                bad_rows: if skip_bad_rows {
                    BadRowPolicy::Skip as i32
                } else {
                    BadRowPolicy::Unspecified as i32
                },
                ..Default::default()
            };
            let format_in = input.unwrap_or_else(|| match file.extension().and_then(|e| e.to_str()) {
                Some("jsonl" | "ndjson" | "json") => InputFormat::Jsonl,
                _ => InputFormat::Csv,
            });
            load(
                &client,
                cli.format,
                header,
                &file,
                format_in,
                &null,
                // The server takes at most 100,000 rows per message.
                batch_rows.clamp(1, 100_000),
                &mut out,
            )
            .await
        }
    }
}

/// Records per Produce call when reading lines, and their bytes: a call
/// stays under the server's request size limit (16 MiB by default) unless
/// one line is near it, which the server refuses with OUT_OF_RANGE.
const PRODUCE_BATCH: usize = 1000;
const PRODUCE_BATCH_BYTES: usize = 4 << 20;
/// How long a batch of `produce` waits, from its first line, for more lines
/// its reader does not have at hand yet.
const PRODUCE_LINGER: Duration = Duration::from_millis(20);
/// How long a query whose output closed waits to see whether its result
/// had ended anyway.
const END_WAIT: Duration = Duration::from_secs(1);

/// A timestamp as milliseconds since the epoch, saturating: the server's
/// numbers, whatever they are, must not panic a debug build.
fn millis(t: &prost_types::Timestamp) -> i64 {
    t.seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(t.nanos) / 1_000_000)
}

#[allow(clippy::too_many_arguments)]
async fn produce(
    client: &WeirClient,
    format: Format,
    source: &str,
    topic: &str,
    values: Vec<String>,
    file: Option<std::path::PathBuf>,
    key: Option<String>,
    out: &mut impl Write,
) -> Result<(), Failure> {
    use weir_client::weir_proto::v1::{ProduceRequest, ProducerRecord};
    // Lines as bytes: a Kafka value need not be UTF-8. Read on a thread of
    // their own, so that lines coming slowly (`tail -F log | weirctl produce`)
    // are sent as they come, not held until a batch is full.
    let input = match (&values[..], &file) {
        ([], Some(path)) => Some(open_input(path)?),
        ([], None) => Some(Box::new(io::stdin()) as Box<dyn io::Read + Send>),
        _ => None,
    };
    let (lines_tx, mut lines) = tokio::sync::mpsc::channel(PRODUCE_BATCH);
    tokio::task::spawn_blocking(move || {
        let read: Box<dyn Iterator<Item = io::Result<Vec<u8>>>> = match input {
            Some(input) => Box::new(byte_lines(io::BufReader::new(input))),
            None => Box::new(values.into_iter().map(|v| Ok(v.into_bytes()))),
        };
        for line in read {
            if lines_tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    let key = key.map(String::into_bytes).unwrap_or_default();
    let (mut produced, mut last) = (0u64, None);
    // What to send again after a failure: everything from the failed call's first record on.
    let report = |produced: u64| {
        say!(
            "{produced} {} produced before this failure; the failed call started at record {} of the input \
             (its failed_records and acknowledged_records count from there, from 0)",
            if produced == 1 { "record was" } else { "records were" },
            produced + 1
        )
    };
    let mut batch = Vec::with_capacity(PRODUCE_BATCH);
    while let Some(first) = lines.recv().await {
        let (mut next, mut bytes) = (Some(first), 0);
        let send_by = tokio::time::Instant::now() + PRODUCE_LINGER;
        while let Some(line) = next.take() {
            let line = line.map_err(|e| {
                report(produced);
                Failure::Input(format!("cannot read the records: {e}"))
            })?;
            bytes += key.len() + line.len();
            batch.push(ProducerRecord {
                key: key.clone(),
                value: line,
                ..Default::default()
            });
            if batch.len() >= PRODUCE_BATCH || bytes >= PRODUCE_BATCH_BYTES {
                break;
            }
            next = match lines.try_recv() {
                Ok(line) => Some(line),
                // Nothing more read yet: what is here goes after a moment.
                Err(TryRecvError::Empty) => tokio::time::timeout_at(send_by, lines.recv()).await.ok().flatten(),
                Err(TryRecvError::Disconnected) => None,
            };
        }
        let request = ProduceRequest {
            source: source.to_string(),
            topic: topic.to_string(),
            records: std::mem::take(&mut batch),
            options: None,
        };
        let acks = match client.stream().produce(request).await {
            Ok(answer) => answer.into_inner().acks,
            Err(status) => {
                report(produced);
                return Err(status.into());
            }
        };
        produced += acks.len() as u64;
        last = acks.last().copied().or(last);
    }
    if format == Format::Json {
        let last = last.map(|a| json!({"partition": a.partition, "offset": a.offset}));
        writeln!(out, "{}", json!({"produced": produced, "last": last}))?;
    } else {
        let at = last.map_or(String::new(), |a| {
            format!(", last at partition {} offset {}", a.partition, a.offset)
        });
        writeln!(out, "produced {produced} {} to {topic}{at}", plural(produced, "record"))?;
    }
    Ok(out.flush()?)
}

/// Lines without their `\n` or `\r\n`, as bytes.
fn byte_lines(input: impl io::BufRead) -> impl Iterator<Item = io::Result<Vec<u8>>> {
    input.split(b'\n').map(|line| {
        line.map(|mut l| {
            if l.last() == Some(&b'\r') {
                l.pop();
            }
            l
        })
    })
}

fn start_position(from: &str) -> Result<weir_client::weir_proto::v1::StartPosition, Failure> {
    use weir_client::weir_proto::v1::start_position::Position;
    let position = match from {
        "earliest" => Position::Earliest(true),
        "latest" => Position::Latest(true),
        time => {
            let t = chrono::DateTime::parse_from_rfc3339(time).map_err(|_| {
                Failure::Input(format!(
                    "--from takes earliest, latest or an RFC 3339 time, not '{time}'"
                ))
            })?;
            Position::Timestamp(prost_types::Timestamp {
                seconds: t.timestamp(),
                nanos: t.timestamp_subsec_nanos() as i32,
            })
        }
    };
    Ok(weir_client::weir_proto::v1::StartPosition {
        position: Some(position),
    })
}

/// Text when it is UTF-8, else hex.
fn bytes_text(b: &[u8]) -> String {
    std::str::from_utf8(b).map_or_else(|_| format!("\\x{}", hex::encode(b)), str::to_string)
}

/// A record's key or value in JSON: a string when it is UTF-8, else
/// `{"hex": ...}` (a string `\x41` and the byte `A` must not print alike).
fn bytes_json(b: &[u8]) -> serde_json::Value {
    std::str::from_utf8(b).map_or_else(|_| json!({"hex": hex::encode(b)}), |text| json!(text))
}

/// A record's key or value on a table line: NULL apart from empty, and
/// control characters escaped so that a record stays on one line.
fn bytes_cell(null: bool, b: &[u8]) -> String {
    if null {
        "NULL".into()
    } else {
        weir_client::output::escape_controls(&bytes_text(b))
    }
}

async fn consume(
    client: &WeirClient,
    format: Format,
    request: weir_client::weir_proto::v1::ConsumeRequest,
    out: &mut impl Write,
) -> Result<(), Failure> {
    let response = client.stream().consume(request).await?;
    // Errors made on this side (a stream cut) name the call too.
    let id = request_id(&response);
    let mut stream = response.into_inner();
    while let Some(batch) = stream.message().await.map_err(|s| with_request_id(s, id.as_ref()))? {
        for r in batch.records {
            if format == Format::Json {
                // Pairs in the record's order: a key may come more than once.
                let headers: Vec<serde_json::Value> = r
                    .headers
                    .iter()
                    .map(|h| json!([h.key, (!h.null_value).then(|| bytes_json(&h.value))]))
                    .collect();
                let line = json!({
                    "topic": r.topic,
                    "partition": r.partition,
                    "offset": r.offset,
                    "timestamp_ms": r.timestamp.map(|t| millis(&t)),
                    "key": (!r.null_key).then(|| bytes_json(&r.key)),
                    "value": (!r.null_value).then(|| bytes_json(&r.value)),
                    "headers": headers,
                });
                writeln!(out, "{line}")?;
            } else {
                writeln!(
                    out,
                    "{}/{}@{}\t{}\t{}",
                    r.topic,
                    r.partition,
                    r.offset,
                    bytes_cell(r.null_key, &r.key),
                    bytes_cell(r.null_value, &r.value)
                )?;
            }
        }
        // Records show up as they arrive, not when a buffer fills.
        out.flush()?;
    }
    Ok(())
}

fn table_ref(name: &str) -> TableRef {
    match name.split_once('.') {
        Some((schema, table)) => TableRef {
            schema: schema.into(),
            table: table.into(),
        },
        None => TableRef {
            schema: String::new(),
            table: name.into(),
        },
    }
}

/// A change as one JSON line. The rows are written as `row_json` writes
/// them, not parsed and written again, which would round numbers inside
/// JSON documents to doubles.
fn change_json(c: &ChangeEvent) -> Result<String, Failure> {
    let op = ChangeOperation::try_from(c.op).map_or("unknown", |o| match o {
        ChangeOperation::Insert => "insert",
        ChangeOperation::Update => "update",
        ChangeOperation::Delete => "delete",
        ChangeOperation::SnapshotRead => "snapshot",
        ChangeOperation::Truncate => "truncate",
        ChangeOperation::Unspecified => "unknown",
    });
    let row = |r: &Option<Row>| -> Result<String, Failure> {
        Ok(match r {
            Some(r) => output::row_json(&c.columns, r)?,
            None => "null".into(),
        })
    };
    let head = json!({
        "op": op,
        "schema": c.schema,
        "table": c.table,
        "transaction": c.transaction_id,
        "commit_time": c.commit_time.as_ref().map(millis),
        "key": c.primary_key,
        "position": hex::encode(&c.position),
        "unchanged": c.unchanged_columns,
    })
    .to_string();
    // The object without its closing brace, then the rows.
    let head = head.strip_suffix('}').unwrap_or(&head);
    Ok(format!(
        r#"{head},"before":{},"after":{}}}"#,
        row(&c.before)?,
        row(&c.after)?
    ))
}

/// How long `watch --max` waits for the commit of the transaction its last
/// change belongs to (it comes right after that change).
const COMMIT_WAIT: Duration = Duration::from_secs(2);

async fn watch(
    client: &WeirClient,
    start: WatchStart,
    state: Option<std::path::PathBuf>,
    max: Option<u64>,
    out: &mut impl Write,
) -> Result<(), Failure> {
    use weir_client::weir_proto::v1::watch_changes_response::Message;
    let mut stream = client.watch(start).await?;
    let mut printed = 0u64;
    // The transaction begun last and not committed yet.
    let mut open = None;
    while let Some(response) = stream.next().await? {
        let Some(message) = response.message else {
            continue;
        };
        let last = match &message {
            Message::Transaction(b) => {
                open = b.begin.then(|| b.transaction_id.clone());
                None
            }
            Message::Change(c) => Some(c.transaction_id.clone()),
            Message::Heartbeat(_) => None,
        };
        printed += u64::from(show(&mut stream, message, state.as_deref(), out).await?);
        if max.is_some_and(|m| printed >= m) {
            if let Some(tx) = last.filter(|tx| open.as_ref() == Some(tx)) {
                show_commit(&mut stream, &tx, state.as_deref(), out).await?;
            }
            // The last acknowledgement is only queued: sent before exiting,
            // or the next run would print that change again.
            return Ok(stream.finish().await?);
        }
    }
    Ok(())
}

/// After the last change `--max` allows, the commit of its transaction `tx`
/// when it comes next: acknowledged, it lets a restart without `--state`
/// go on after the change, where PostgreSQL, which resumes whole
/// transactions, would send the whole transaction again.
async fn show_commit(
    stream: &mut weir_client::ChangeWatch,
    tx: &str,
    state: Option<&Path>,
    out: &mut impl Write,
) -> Result<(), Failure> {
    use weir_client::weir_proto::v1::watch_changes_response::Message;
    let deadline = tokio::time::Instant::now() + COMMIT_WAIT;
    while let Ok(next) = tokio::time::timeout_at(deadline, stream.next()).await {
        match next?.and_then(|r| r.message) {
            Some(Message::Heartbeat(_)) => continue,
            Some(message @ Message::Transaction(_)) if is_commit_of(&message, tx) => {
                show(stream, message, state, out).await?;
                return Ok(());
            }
            _ => return Ok(()),
        }
    }
    Ok(())
}

fn is_commit_of(message: &weir_client::weir_proto::v1::watch_changes_response::Message, tx: &str) -> bool {
    use weir_client::weir_proto::v1::watch_changes_response::Message;
    matches!(message, Message::Transaction(b) if !b.begin && b.transaction_id == tx)
}

/// Prints `message` (a change or a commit) and acknowledges its position;
/// whether it was a change.
async fn show(
    stream: &mut weir_client::ChangeWatch,
    message: weir_client::weir_proto::v1::watch_changes_response::Message,
    state: Option<&Path>,
    out: &mut impl Write,
) -> Result<bool, Failure> {
    use weir_client::weir_proto::v1::watch_changes_response::Message;
    let position = resume_point(&message).map(<[u8]>::to_vec);
    let change = matches!(message, Message::Change(_));
    let line = match message {
        Message::Change(c) => Some(change_json(&c)?),
        Message::Transaction(b) => (!b.begin).then(|| json!({"op": "commit", "transaction": b.transaction_id, "events": b.event_count, "position": hex::encode(&b.position)}).to_string()),
        Message::Heartbeat(_) => None,
    };
    if let Some(line) = line {
        writeln!(out, "{line}")?;
        out.flush()?;
    }
    if let Some(position) = position {
        // Kept, then acknowledged, once printed: a restart resumes right
        // after it. Kept first: a stop between the two leaves the file
        // ahead of the server's position, which a resume accepts, not
        // behind it, which a resume is refused.
        if let Some(path) = state {
            keep_position(path, &position)
                .map_err(|e| Failure::Input(format!("cannot write the state file {}: {e}", path.display())))?;
        }
        stream.ack(position).await?;
    }
    Ok(change)
}

/// `TOPIC:PARTITION:OFFSET`; the topic may itself contain colons.
fn parse_partition_offset(s: &str) -> Result<weir_client::weir_proto::v1::PartitionOffset, String> {
    let bad = || format!("{s:?} is not TOPIC:PARTITION:OFFSET");
    let (rest, offset) = s.rsplit_once(':').ok_or_else(bad)?;
    let (topic, partition) = rest.rsplit_once(':').ok_or_else(bad)?;
    if topic.is_empty() {
        return Err(bad());
    }
    Ok(weir_client::weir_proto::v1::PartitionOffset {
        topic: topic.to_string(),
        partition: partition.parse().map_err(|_| bad())?,
        offset: offset.parse().map_err(|_| bad())?,
    })
}

/// Keeps `position` in `path`: written beside it, synced and renamed over
/// it, so that a stop at any moment (Ctrl-C is how `watch` ends) leaves the
/// old position or the new one, never a truncated file. The directory is
/// synced too, before the position is acknowledged: a rename lost to a
/// power cut would leave the file behind the server's position, from
/// which a resume is refused.
fn keep_position(path: &std::path::Path, position: &[u8]) -> io::Result<()> {
    let mut next = path.as_os_str().to_owned();
    next.push(".next");
    let next = std::path::PathBuf::from(next);
    let mut file = std::fs::File::create(&next)?;
    file.write_all(hex::encode(position).as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&next, path)?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    std::fs::File::open(dir.unwrap_or(std::path::Path::new(".")))?.sync_all()
}

/// Where a restart may resume after `message`. Not after a snapshot row: a
/// snapshot cut short is taken again in full, so its rows are neither
/// acknowledged nor kept, and a kept position always lies past the snapshot.
fn resume_point(message: &weir_client::weir_proto::v1::watch_changes_response::Message) -> Option<&[u8]> {
    use weir_client::weir_proto::v1::watch_changes_response::Message;
    match message {
        Message::Change(c) if c.op == ChangeOperation::SnapshotRead as i32 => None,
        Message::Change(c) => Some(&c.position),
        Message::Transaction(b) => Some(&b.position),
        Message::Heartbeat(h) => Some(&h.position),
    }
}

/// Whether to ask for a snapshot: not when resuming from a kept position,
/// which lies past a snapshot read in full; as told with an explicit `--from`.
fn wants_snapshot(asked: bool, from_given: bool, resume: &[u8]) -> bool {
    asked && (from_given || resume.is_empty())
}

async fn topics(client: &WeirClient, format: Format, source: &str, out: &mut impl Write) -> Result<(), Failure> {
    let listed = client
        .stream()
        .list_topics(weir_client::weir_proto::v1::ListTopicsRequest {
            source: source.to_string(),
        })
        .await?
        .into_inner();
    let columns = [
        column("topic", ColumnType::String),
        column("partitions", ColumnType::Int),
        column("records", ColumnType::Int),
    ];
    let rows: Vec<Row> = listed
        .topics
        .iter()
        .map(|t| {
            // Saturating: the numbers are the server's, whatever they are.
            let records = t
                .partitions
                .iter()
                .map(|p| p.high_watermark.saturating_sub(p.low_watermark))
                .fold(0i64, i64::saturating_add);
            row([
                Value::from(t.name.as_str()),
                Value::from(t.partitions.len() as i64),
                Value::from(records),
            ])
        })
        .collect();
    print_rows(format, &columns, &rows, out)
}

fn open_input(file: &std::path::Path) -> Result<Box<dyn io::Read + Send>, Failure> {
    if file.as_os_str() == "-" {
        return Ok(Box::new(io::stdin()));
    }
    std::fs::File::open(file)
        .map(|f| Box::new(f) as Box<dyn io::Read + Send>)
        .map_err(|e| Failure::Input(format!("cannot open {}: {e}", file.display())))
}

/// Bytes of rows per load message at most, whatever `--batch-rows` says:
/// wide rows stay under the server's `max_request_bytes` (16 MiB by default).
const LOAD_BATCH_BYTES: usize = 4 << 20;

/// Rows gathered into load messages of `max_rows` rows or `LOAD_BATCH_BYTES`.
struct Batch {
    rows: Vec<Row>,
    bytes: usize,
    max_rows: usize,
}

impl Batch {
    fn new(max_rows: usize) -> Self {
        Self {
            rows: Vec::new(),
            bytes: 0,
            max_rows: max_rows.max(1),
        }
    }

    /// Adds a row; the full batch, when this row filled it.
    fn push(&mut self, row: Row) -> Option<Vec<Row>> {
        self.bytes += prost::Message::encoded_len(&row);
        self.rows.push(row);
        if self.rows.len() < self.max_rows && self.bytes < LOAD_BATCH_BYTES {
            return None;
        }
        self.bytes = 0;
        Some(std::mem::take(&mut self.rows))
    }
}

/// Reads the file on a blocking thread into typed row batches and streams
/// them to the server; a value that does not parse aborts the load, so
/// nothing is committed. Progress goes to stderr when it is a terminal.
#[allow(clippy::too_many_arguments)]
async fn load(
    client: &WeirClient,
    format: Format,
    mut header: LoadHeader,
    file: &std::path::Path,
    input: InputFormat,
    null: &str,
    batch_rows: usize,
    out: &mut impl Write,
) -> Result<(), Failure> {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let description = client
        .describe_table(&header.source, &header.schema, &header.table)
        .await?;
    let table_columns: Vec<Column> = description.columns.iter().filter_map(|c| c.column.clone()).collect();
    let reader = open_input(file)?;
    let mut rows: Box<dyn RowReader> = match input {
        InputFormat::Csv => Box::new(CsvReader::new(reader, null).map_err(|e| Failure::Input(e.to_string()))?),
        InputFormat::Jsonl => {
            Box::new(JsonLinesReader::new(io::BufReader::new(reader)).map_err(|e| Failure::Input(e.to_string()))?)
        }
    };
    let columns = match_columns(rows.column_names(), &table_columns).map_err(Failure::Input)?;
    header.columns = columns.iter().map(|c| c.name.clone()).collect();
    let (rows_read, bytes_read) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    // The server names rows by index; the user knows the file by line.
    let lines = Arc::new(std::sync::Mutex::new(RowLines::default()));
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let progress = (rows_read.clone(), bytes_read.clone(), lines.clone());
    let ended = Arc::new(AtomicBool::new(false));
    let ended_at_reader = ended.clone();
    tokio::task::spawn_blocking(move || {
        let mut batch = Batch::new(batch_rows);
        let mut index = 0u64;
        while let Some(row) = rows.next_row(&columns) {
            let full = match row {
                Ok(row) => {
                    if let Ok(mut lines) = progress.2.lock() {
                        lines.record(index, rows.row_line());
                    }
                    index += 1;
                    batch.push(row)
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(e.to_string()));
                    return;
                }
            };
            if let Some(full) = full {
                progress.0.fetch_add(full.len() as u64, Ordering::Relaxed);
                progress.1.store(rows.bytes_read(), Ordering::Relaxed);
                if tx.blocking_send(Ok(full)).is_err() {
                    return;
                }
            }
        }
        let rest = batch.rows;
        progress.0.fetch_add(rest.len() as u64, Ordering::Relaxed);
        progress.1.store(rows.bytes_read(), Ordering::Relaxed);
        if !rest.is_empty() && tx.blocking_send(Ok(rest)).is_err() {
            return;
        }
        ended_at_reader.store(true, Ordering::Relaxed);
    });
    let started = std::time::Instant::now();
    let ticker = io::stderr().is_terminal().then(|| {
        let (rows_read, bytes_read) = (rows_read.clone(), bytes_read.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let rows = rows_read.load(Ordering::Relaxed);
                let rate = rows as f64 / started.elapsed().as_secs_f64().max(0.001);
                say_on!(
                    "\r{rows} rows, {:.1} MB, {rate:.0} rows/s   ",
                    bytes_read.load(Ordering::Relaxed) as f64 / 1e6
                );
            }
        })
    });
    let load_id = header.load_id.clone();
    let result = client
        .load_or_abort(header, tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    if let Some(ticker) = ticker {
        ticker.abort();
        say!();
    }
    let line_of = |row: u64| lines.lock().ok().and_then(|l| l.line_of(row));
    let response = result.map_err(|status| {
        let row = status
            .get_error_details()
            .error_info()
            .and_then(|i| i.metadata.get("row_index").and_then(|r| r.parse().ok()));
        // Lost with no answer from Weir once every row was sent: the load's
        // COMMIT may have run.
        let lost_at_end = ended.load(Ordering::Relaxed)
            && status.get_error_details().error_info().is_none()
            && matches!(
                status.code(),
                Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
            );
        match row.and_then(line_of) {
            Some(line) => Failure::Input(format!("{} (input line {line})", describe_status(&status))),
            None if lost_at_end => Failure::Input(format!(
                "{}\nthe connection was lost after the last row was sent, so the load may have committed: {}",
                describe_status(&status),
                if load_id.is_empty() {
                    "check the table before loading again (with --load-id, a load sent again loads once)"
                } else {
                    "send it again with the same --load-id, which loads it once"
                }
            )),
            None => status.into(),
        }
    })?;
    let seconds = response.elapsed.map_or(started.elapsed().as_secs_f64(), |d| {
        d.seconds as f64 + f64::from(d.nanos) / 1e9
    });
    let loaded = response.rows_inserted.saturating_add(response.rows_updated);
    if format == Format::Json {
        let summary = json!({
            "rows_inserted": response.rows_inserted,
            "rows_updated": response.rows_updated,
            "bytes": response.bytes_received,
            "seconds": seconds,
            "engine_path": response.engine_path,
            "replayed": response.replayed,
            "rows_skipped": response.rows_skipped,
            "row_errors": response.row_errors.iter().map(|e| json!({
                "row_index": e.row_index, "line": line_of(e.row_index), "column": e.column, "message": e.message,
            })).collect::<Vec<_>>(),
        });
        writeln!(out, "{summary}")?;
        return Ok(out.flush()?);
    }
    for e in &response.row_errors {
        let column = if e.column.is_empty() {
            String::new()
        } else {
            format!(", column \"{}\"", e.column)
        };
        let line = line_of(e.row_index).map_or(String::new(), |l| format!(" (input line {l})"));
        writeln!(out, "skipped row {}{line}{column}: {}", e.row_index, e.message)?;
    }
    if response.replayed {
        writeln!(
            out,
            "load id already committed: nothing loaded again (that load: {} inserted, {} updated)",
            response.rows_inserted, response.rows_updated
        )?;
    } else {
        writeln!(
            out,
            "loaded {loaded} {} ({} inserted, {} updated) in {seconds:.2} s, {:.0} rows/s, via {}",
            plural(loaded, "row"),
            response.rows_inserted,
            response.rows_updated,
            loaded as f64 / seconds.max(0.001),
            response.engine_path
        )?;
    }
    let unlisted = response.rows_skipped.saturating_sub(response.row_errors.len() as u64);
    if unlisted > 0 {
        writeln!(
            out,
            "skipped {} rows in all ({unlisted} not listed)",
            response.rows_skipped
        )?;
    }
    Ok(out.flush()?)
}

async fn query(
    client: &WeirClient,
    format: Format,
    source: &str,
    sql: &str,
    params: Vec<Value>,
    out: &mut impl Write,
) -> Result<(), Failure> {
    let mut stream = client.execute_stream(source, sql, params).await?;
    let mut writer = RowWriter::new(format, stream.columns(), out);
    let mut rows = 0;
    while let Some(batch) = stream.next_batch().await? {
        rows += batch.len();
        if let Err(e) = writer.write_rows(&batch) {
            // A write that returns rows in its own transaction commits only
            // once its client has taken every row: leaving now rolls it back.
            // Unless the result had in fact ended (what a small one has).
            let ended = tokio::time::timeout(END_WAIT, stream.next_batch()).await;
            return Err(match ended {
                Ok(Ok(None)) => Failure::Output(e),
                _ if e.kind() == io::ErrorKind::BrokenPipe => Failure::CutShort,
                _ => Failure::Output(e),
            });
        }
    }
    writer.finish()?;
    if format == Format::Table {
        let affected = stream.stats().and_then(|s| s.rows_affected);
        let summary = match (stream.columns().is_empty(), affected) {
            (false, _) => format!("({rows} {})", plural(rows as u64, "row")),
            (true, Some(n)) => format!("{n} {} affected", plural(n, "row")),
            (true, None) => "OK".to_owned(),
        };
        say!("{summary}");
    }
    Ok(())
}

async fn sources(client: &WeirClient, format: Format, out: &mut impl Write) -> Result<(), Failure> {
    let sources = client.list_sources().await?;
    let columns = [
        column("name", ColumnType::String),
        column("engine", ColumnType::String),
        column("version", ColumnType::String),
        column("healthy", ColumnType::Bool),
        column("read_only", ColumnType::Bool),
        column("capabilities", ColumnType::String),
    ];
    let rows: Vec<Row> = sources
        .iter()
        .map(|s| {
            row([
                s.name.as_str().into(),
                label(s.engine().as_str_name(), "ENGINE_").into(),
                s.server_version.as_str().into(),
                s.healthy.into(),
                s.read_only.into(),
                s.capabilities
                    .as_ref()
                    .map(capability_summary)
                    .unwrap_or_default()
                    .into(),
            ])
        })
        .collect();
    print_rows(format, &columns, &rows, out)
}

fn print_tables(format: Format, tables: &[TableInfo], out: &mut impl Write) -> Result<(), Failure> {
    let columns = [
        column("schema", ColumnType::String),
        column("name", ColumnType::String),
        column("kind", ColumnType::String),
        column("rows", ColumnType::Int),
        column("comment", ColumnType::String),
    ];
    let rows: Vec<Row> = tables
        .iter()
        .map(|t| {
            row([
                t.schema.as_str().into(),
                t.name.as_str().into(),
                label(t.kind().as_str_name(), "TABLE_KIND_").into(),
                t.row_estimate.map_or_else(Value::null, Value::from),
                t.comment.as_str().into(),
            ])
        })
        .collect();
    print_rows(format, &columns, &rows, out)
}

fn print_description(
    format: Format,
    table: &TableInfo,
    description: &DescribeTableResponse,
    out: &mut impl Write,
) -> Result<(), Failure> {
    if format == Format::Json {
        writeln!(out, "{}", description_json(table, description))?;
        return Ok(out.flush()?);
    }
    if format == Format::Table {
        let kind = match table.kind() {
            TableKind::Unspecified => "table".to_owned(),
            kind => label(kind.as_str_name(), "TABLE_KIND_"),
        };
        let name = qualified(&table.schema, &table.name);
        writeln!(out, "{} {name}", capitalize(&kind))?;
    }
    let columns = [
        column("column", ColumnType::String),
        column("native_type", ColumnType::String),
        column("type", ColumnType::String),
        column("nullable", ColumnType::Bool),
        column("default", ColumnType::String),
    ];
    let rows: Vec<Row> = description
        .columns
        .iter()
        .map(|c| {
            let meta = c.column.clone().unwrap_or_default();
            row([
                meta.name.as_str().into(),
                meta.native_type.as_str().into(),
                type_name(&meta).into(),
                meta.nullable.into(),
                default_value(c),
            ])
        })
        .collect();
    print_rows(format, &columns, &rows, out)?;
    // CSV holds one table only: the column list.
    if format == Format::Table {
        write_constraints(description, out)?;
        out.flush()?;
    }
    Ok(())
}

fn write_constraints(description: &DescribeTableResponse, out: &mut impl Write) -> io::Result<()> {
    if let Some(pk) = &description.primary_key {
        writeln!(out, "\nPrimary key: {} ({})", pk.name, pk.columns.join(", "))?;
    }
    if !description.foreign_keys.is_empty() {
        writeln!(out, "\nForeign keys:")?;
        for fk in &description.foreign_keys {
            write!(
                out,
                "  {} ({}) REFERENCES {} ({})",
                fk.name,
                fk.columns.join(", "),
                qualified(&fk.referenced_schema, &fk.referenced_table),
                fk.referenced_columns.join(", ")
            )?;
            if !fk.on_update.is_empty() {
                write!(out, " ON UPDATE {}", fk.on_update)?;
            }
            if !fk.on_delete.is_empty() {
                write!(out, " ON DELETE {}", fk.on_delete)?;
            }
            writeln!(out)?;
        }
    }
    if !description.indexes.is_empty() {
        writeln!(out, "\nIndexes:")?;
        for index in &description.indexes {
            let kind = if index.primary {
                " PRIMARY KEY"
            } else if index.unique {
                " UNIQUE"
            } else {
                ""
            };
            let method = if index.method.is_empty() {
                String::new()
            } else {
                format!(" {}", index.method)
            };
            writeln!(out, "  {}{kind}{method} ({})", index.name, index.columns.join(", "))?;
        }
    }
    Ok(())
}

fn description_json(table: &TableInfo, description: &DescribeTableResponse) -> serde_json::Value {
    let columns: Vec<_> = description
        .columns
        .iter()
        .map(|c| {
            let meta = c.column.clone().unwrap_or_default();
            json!({
                "name": meta.name,
                "native_type": meta.native_type,
                "type": type_name(&meta),
                "nullable": meta.nullable,
                "default": (!c.default_expression.is_empty()).then_some(&c.default_expression),
            })
        })
        .collect();
    let foreign_keys: Vec<_> = description
        .foreign_keys
        .iter()
        .map(|fk| {
            json!({
                "name": fk.name,
                "columns": fk.columns,
                "referenced_schema": fk.referenced_schema,
                "referenced_table": fk.referenced_table,
                "referenced_columns": fk.referenced_columns,
                "on_update": fk.on_update,
                "on_delete": fk.on_delete,
            })
        })
        .collect();
    let indexes: Vec<_> = description
        .indexes
        .iter()
        .map(|i| {
            json!({
                "name": i.name,
                "columns": i.columns,
                "unique": i.unique,
                "primary": i.primary,
                "method": i.method,
            })
        })
        .collect();
    json!({
        "schema": table.schema,
        "table": table.name,
        "kind": label(table.kind().as_str_name(), "TABLE_KIND_"),
        "columns": columns,
        "primary_key": description.primary_key.as_ref().map(|pk| json!({
            "name": pk.name,
            "columns": pk.columns,
        })),
        "foreign_keys": foreign_keys,
        "indexes": indexes,
    })
}

async fn ping(client: &WeirClient, format: Format, source: &str, out: &mut impl Write) -> Result<(), Failure> {
    let response = client.test_connection(source).await?;
    let round_trip_ms = response.round_trip.map_or_else(Value::null, |d| {
        let ms = d.seconds as f64 * 1e3 + f64::from(d.nanos) / 1e6;
        // Microsecond precision is plenty for a network round trip.
        Value::from((ms * 1e3).round() / 1e3)
    });
    let columns = [
        column("engine", ColumnType::String),
        column("version", ColumnType::String),
        column("database", ColumnType::String),
        column("user", ColumnType::String),
        column("round_trip_ms", ColumnType::Float),
    ];
    let rows = [row([
        label(response.engine().as_str_name(), "ENGINE_").into(),
        response.server_version.as_str().into(),
        response.database.as_str().into(),
        response.user.as_str().into(),
        round_trip_ms,
    ])];
    print_rows(format, &columns, &rows, out)
}

fn print_rows(format: Format, columns: &[Column], rows: &[Row], out: &mut impl Write) -> Result<(), Failure> {
    let mut writer = RowWriter::new(format, columns, out);
    writer.write_rows(rows)?;
    writer.finish()?;
    Ok(())
}

fn column(name: &str, r#type: ColumnType) -> Column {
    Column {
        name: name.to_owned(),
        r#type: r#type.into(),
        nullable: true,
        ..Default::default()
    }
}

fn row<const N: usize>(values: [Value; N]) -> Row {
    Row { values: values.into() }
}

/// "ENGINE_POSTGRES" -> "postgres", "TABLE_KIND_MATERIALIZED_VIEW" ->
/// "materialized view".
fn label(proto_name: &str, prefix: &str) -> String {
    proto_name
        .strip_prefix(prefix)
        .unwrap_or(proto_name)
        .to_ascii_lowercase()
        .replace('_', " ")
}

fn capitalize(s: &str) -> String {
    let mut chars = s.chars();
    chars
        .next()
        .map(|first| first.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

/// The normalized type, with the element type for lists: "INT",
/// "TIMESTAMP_TZ", "LIST<TEXT>".
fn type_name(column: &Column) -> String {
    let name = |t: ColumnType| {
        let n = t.as_str_name();
        n.strip_prefix("COLUMN_TYPE_").unwrap_or(n).to_owned()
    };
    match column.r#type() {
        ColumnType::List => format!("LIST<{}>", name(column.element_type())),
        t => name(t),
    }
}

fn default_value(column: &ColumnInfo) -> Value {
    if column.default_expression.is_empty() {
        Value::null()
    } else {
        column.default_expression.as_str().into()
    }
}

fn qualified(schema: &str, table: &str) -> String {
    if schema.is_empty() {
        table.to_owned()
    } else {
        format!("{schema}.{table}")
    }
}

/// For example "query, transactions, bulk (append/upsert), change streams,
/// params $1".
fn capability_summary(c: &Capabilities) -> String {
    let mut parts = Vec::new();
    if c.query {
        parts.push("query".to_owned());
    }
    if c.transactions {
        parts.push("transactions".to_owned());
    }
    let modes: Vec<String> = c
        .bulk_load_modes()
        .map(|m| label(m.as_str_name(), "BULK_LOAD_MODE_"))
        .filter(|m| m != "unspecified")
        .collect();
    if !modes.is_empty() {
        parts.push(format!("bulk ({})", modes.join("/")));
    }
    if c.change_streams {
        parts.push("change streams".to_owned());
    }
    if c.kafka {
        parts.push("kafka".to_owned());
    }
    if !c.parameter_style.is_empty() {
        parts.push(format!("params {}", c.parameter_style));
    }
    parts.join(", ")
}

fn plural(n: u64, word: &str) -> String {
    if n == 1 {
        word.to_owned()
    } else {
        format!("{word}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_client::weir_proto::v1::watch_changes_response::Message;
    use weir_client::weir_proto::v1::{Heartbeat, TransactionBoundary};

    /// Wide rows end a load message at about 4 MiB, before `--batch-rows`:
    /// 5,000 rows of 1 MiB would be a message past any server's limit.
    #[test]
    fn load_messages_end_at_their_row_count_or_about_four_mebibytes() {
        let wide = || row([Value::from("x".repeat(1 << 20).as_str())]);
        let mut batch = Batch::new(5000);
        let sizes: Vec<usize> = (0..10).filter_map(|_| batch.push(wide()).map(|b| b.len())).collect();
        assert_eq!(sizes, [4, 4]);
        assert_eq!(batch.rows.len(), 2);
        let mut narrow = Batch::new(3);
        let sizes: Vec<usize> = (0..7)
            .filter_map(|i| narrow.push(row([Value::from(i as i64)])).map(|b| b.len()))
            .collect();
        assert_eq!(sizes, [3, 3]);
    }

    #[test]
    fn consumed_bytes_print_unambiguously() {
        assert_eq!(bytes_json(b"\\x41"), json!("\\x41"));
        assert_eq!(bytes_json(b"\xff"), json!({"hex": "ff"}));
        assert_eq!(bytes_cell(false, b"a\nb\tc"), "a\\nb\\tc");
        assert_eq!(bytes_cell(true, b""), "NULL");
        assert_eq!(bytes_cell(false, b""), "");
    }

    #[test]
    fn records_are_read_as_bytes_line_by_line() {
        let input: &[u8] = b"a\r\n\xff\xfe\n\nlast";
        let lines = byte_lines(input).collect::<io::Result<Vec<_>>>().expect("reads");
        assert_eq!(
            lines,
            [b"a".to_vec(), b"\xff\xfe".to_vec(), Vec::new(), b"last".to_vec()]
        );
    }

    #[test]
    fn a_key_file_is_taken_while_weir_api_key_is_set() {
        std::env::set_var("WEIR_API_KEY", "from-the-environment");
        let cli = Cli::try_parse_from(["weirctl", "--key-file", "/run/key", "sources"]).expect("parses");
        assert_eq!(cli.key_file, Some(PathBuf::from("/run/key")));
    }

    fn change(op: ChangeOperation) -> Message {
        Message::Change(ChangeEvent {
            op: op as i32,
            position: vec![7],
            ..Default::default()
        })
    }

    #[test]
    fn a_restart_resumes_after_changes_never_inside_a_snapshot() {
        assert_eq!(resume_point(&change(ChangeOperation::SnapshotRead)), None);
        assert_eq!(resume_point(&change(ChangeOperation::Insert)), Some(&[7u8][..]));
        let commit = Message::Transaction(TransactionBoundary {
            position: vec![8],
            ..Default::default()
        });
        assert_eq!(resume_point(&commit), Some(&[8u8][..]));
        let beat = Message::Heartbeat(Heartbeat {
            position: vec![9],
            ..Default::default()
        });
        assert_eq!(resume_point(&beat), Some(&[9u8][..]));
    }

    #[test]
    fn a_snapshot_is_taken_unless_a_kept_position_follows_one() {
        assert!(wants_snapshot(true, false, &[]), "first start");
        assert!(!wants_snapshot(true, false, &[1]), "restart from the state file");
    }

    #[test]
    fn offsets_to_commit_are_topic_partition_offset() {
        let cli = Cli::try_parse_from([
            "weirctl",
            "commit",
            "events",
            "--group",
            "billing",
            "orders:0:42",
            "a:b:1:7",
        ])
        .expect("parses");
        let Command::Commit { offsets, group, .. } = cli.command else {
            panic!("a commit");
        };
        assert_eq!(group, "billing");
        let got: Vec<_> = offsets
            .iter()
            .map(|o| (o.topic.as_str(), o.partition, o.offset))
            .collect();
        assert_eq!(got, [("orders", 0, 42), ("a:b", 1, 7)]);
        for bad in ["orders", "orders:0", ":0:1", "orders:x:1", "orders:0:y"] {
            assert!(parse_partition_offset(bad).is_err(), "{bad}");
        }
        assert!(
            Cli::try_parse_from(["weirctl", "commit", "events", "--group", "g"]).is_err(),
            "at least one"
        );
    }

    #[test]
    fn negative_numbers_are_values_not_flags() {
        let cli =
            Cli::try_parse_from(["weirctl", "query", "db", "SELECT $1, $2", "-p", "-5", "-p", "-1.5"]).expect("parses");
        let Command::Query { params, .. } = cli.command else {
            panic!("a query");
        };
        assert_eq!(params, [Value::from(-5_i64), Value::from(-1.5)]);
        // Options after the values stay options, not records.
        let cli = Cli::try_parse_from(["weirctl", "produce", "events", "t", "-1", "hello", "--record-key", "k"])
            .expect("parses");
        assert!(matches!(
            cli.command,
            Command::Produce { values, record_key: Some(key), .. } if values == ["-1", "hello"] && key == "k"
        ));
        let cli = Cli::try_parse_from(["weirctl", "produce", "events", "t", "--", "-x"]).expect("parses");
        assert!(matches!(cli.command, Command::Produce { values, .. } if values == ["-x"]));
    }

    #[tokio::test]
    async fn a_tls_option_alone_never_sends_the_key_in_plaintext() {
        // --tls-domain without --ca-cert means TLS with the public
        // authorities: the connection fails at the handshake (a plain
        // server here), not by sending the key over plain HTTP/2.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let plain = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().expect("accept");
            let mut first = [0u8; 3];
            std::io::Read::read_exact(&mut conn, &mut first).expect("read");
            first
        });
        let cli = Cli::try_parse_from([
            "weirctl",
            "--addr",
            &addr.to_string(),
            "--tls-domain",
            "weir.internal",
            "sources",
        ])
        .expect("parses");
        assert!(run(cli).await.is_err());
        // A TLS record starts 0x16 0x03; HTTP/2's preface "PRI".
        assert_eq!(plain.join().expect("server")[..2], [0x16, 0x03]);
    }

    #[test]
    fn a_change_line_keeps_the_numbers_in_json_documents() {
        use weir_client::weir_proto::v1::Column;
        let column = Column {
            name: "doc".into(),
            r#type: weir_client::weir_proto::v1::ColumnType::Json as i32,
            ..Default::default()
        };
        let doc = "{\"id\":123456789012345678901}";
        let event = ChangeEvent {
            op: ChangeOperation::Insert as i32,
            table: "t".into(),
            columns: vec![column],
            after: Some(row([Value::from(weir_client::weir_proto::v1::value::Kind::JsonValue(
                doc.into(),
            ))])),
            position: vec![0xab],
            ..Default::default()
        };
        let Ok(line) = change_json(&event) else {
            panic!("no line");
        };
        assert!(
            line.contains(r#""after":{"doc":{"id":123456789012345678901}}"#),
            "{line}"
        );
        let parsed: serde_json::Value = serde_json::from_str(&line).expect("one JSON object");
        assert_eq!(parsed["op"], "insert");
        assert_eq!(parsed["position"], "ab");
        assert!(parsed["before"].is_null());
        // Columns NULL in "after" only because the engine did not resend them.
        let toasted = change_json(&ChangeEvent {
            unchanged_columns: vec!["doc".into()],
            ..event
        })
        .unwrap_or_default();
        let parsed: serde_json::Value = serde_json::from_str(&toasted).expect("one JSON object");
        assert_eq!(parsed["unchanged"], serde_json::json!(["doc"]));
    }

    #[test]
    fn a_kept_position_replaces_the_last_one_whole() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("state");
        keep_position(&path, &[1, 2]).expect("first");
        keep_position(&path, &[0xab, 0xcd, 0xef]).expect("second");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "abcdef");
        let left: Vec<_> = std::fs::read_dir(dir.path()).expect("list").collect();
        assert_eq!(left.len(), 1, "no file beside it is left");
        assert!(
            wants_snapshot(true, true, &[1]),
            "--from says where, --snapshot is kept"
        );
        assert!(!wants_snapshot(false, false, &[]));
    }
}
