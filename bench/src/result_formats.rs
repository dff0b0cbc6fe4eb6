//! Results as Arrow IPC against results as rows: the same narrow (4
//! columns) and wide (11 columns) results read with every value decoded,
//! directly with tokio-postgres' `query_raw`, through Weir as rows, and
//! through Weir as Arrow record batches. Then what gRPC compression costs
//! (the wide result as rows, compressed with zstd and plain) and saves.

use std::io::Write;
use std::sync::Mutex;
use std::time::Instant;

use flate2::write::GzEncoder;
use futures::{pin_mut, TryStreamExt};
use prost::Message;
use tonic::codec::CompressionEncoding;
use weir_client::arrow_array::cast::AsArray;
use weir_client::arrow_array::types::{Date32Type, Float64Type, Int64Type, TimestampMicrosecondType};
use weir_client::arrow_array::{Array, RecordBatch};
use weir_client::arrow_schema::DataType;
use weir_client::weir_proto::v1::{ExecuteStreamRequest, RowBatch};
use weir_client::{ResultStream, ValueRef, WeirClient};

use crate::cpu::{Cpu, Snapshot};
use crate::figures::{account, all_rows, in_turns, pg, settle, Side};
use crate::{Args, Figure};

const NARROW: &str = "SELECT aid, bid, abalance, filler FROM pgbench_accounts";
const WIDE: &str = "SELECT aid, bid, abalance, filler, aid::int8 * 1000 AS big, aid::float8 / 7 AS ratio, \
                    abalance::float8 AS bal, aid % 2 = 0 AS even, 'acct-' || aid AS label, \
                    timestamptz '2024-01-01 00:00:00+00' + aid * interval '1 second' AS opened, \
                    date '2024-01-01' + bid AS day FROM pgbench_accounts";

/// Rows per second with `query_raw`, every value decoded.
async fn direct(args: &Args, sql: &str, wide: bool, expected: u64, spent: &Mutex<Cpu>) -> anyhow::Result<f64> {
    let client = pg(args).await?;
    let cpu = Snapshot::now(None, "postgres");
    let started = Instant::now();
    let rows = client.query_raw(sql, std::iter::empty::<i32>()).await?;
    pin_mut!(rows);
    let (mut n, mut checksum) = (0u64, 0i64);
    while let Some(row) = rows.try_next().await? {
        checksum += account(&row);
        if wide {
            let (big, ratio, bal, even, label): (i64, f64, f64, bool, &str) =
                (row.get(4), row.get(5), row.get(6), row.get(7), row.get(8));
            let opened: chrono::DateTime<chrono::Utc> = row.get(9);
            let day: chrono::NaiveDate = row.get(10);
            checksum += big + (ratio + bal) as i64 + i64::from(even) + label.len() as i64;
            checksum += opened.timestamp_subsec_micros() as i64 + i64::from(chrono::Datelike::day(&day));
        }
        n += 1;
    }
    all_rows("query_raw", n, expected)?;
    Ok(settle(n, checksum, started, &cpu, spent))
}

/// Rows per second through Weir as rows, read value by value in wire form.
async fn rows(client: &WeirClient, sql: &str, expected: u64) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut stream = client.execute_stream_raw("pg", sql, vec![]).await?;
    let (mut n, mut checksum) = (0u64, 0i64);
    while let Some(batch) = stream.next_batch().await? {
        for row in batch.iter() {
            for v in row?.values() {
                checksum += match v? {
                    ValueRef::Int64(i) => i,
                    ValueRef::Double(f) => f as i64,
                    ValueRef::Bool(b) => i64::from(b),
                    ValueRef::String(s) => s.len() as i64,
                    ValueRef::Other(kind) => std::hint::black_box(kind).encoded_len() as i64,
                    _ => 0,
                };
            }
            n += 1;
        }
    }
    all_rows("ExecuteStream as rows", n, expected)?;
    std::hint::black_box(checksum);
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// Every value of a record batch, column by column.
fn read_columns(batch: &RecordBatch) -> i64 {
    let mut checksum = 0i64;
    for column in batch.columns() {
        let sum = match column.data_type() {
            DataType::Int64 => wrapping_sum(column.as_primitive::<Int64Type>().iter().flatten()),
            DataType::Float64 => column.as_primitive::<Float64Type>().iter().flatten().sum::<f64>() as i64,
            DataType::Boolean => column.as_boolean().true_count() as i64,
            DataType::Utf8 => column.as_string::<i32>().iter().flatten().map(|s| s.len() as i64).sum(),
            DataType::Timestamp(..) => wrapping_sum(column.as_primitive::<TimestampMicrosecondType>().iter().flatten()),
            DataType::Date32 => column
                .as_primitive::<Date32Type>()
                .iter()
                .flatten()
                .map(i64::from)
                .sum(),
            _ => column.len() as i64,
        };
        checksum = checksum.wrapping_add(sum);
    }
    checksum
}

fn wrapping_sum(values: impl Iterator<Item = i64>) -> i64 {
    values.fold(0, i64::wrapping_add)
}

/// Rows per second through Weir as Arrow record batches, every value read.
async fn arrow(client: &WeirClient, sql: &str, expected: u64) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut stream = client.execute_stream_arrow("pg", sql, vec![]).await?;
    let (mut n, mut checksum) = (0u64, 0i64);
    while let Some(batch) = stream.next_batch().await? {
        checksum = checksum.wrapping_add(read_columns(&batch));
        n += batch.num_rows() as u64;
    }
    all_rows("ExecuteStream as Arrow IPC", n, expected)?;
    std::hint::black_box(checksum);
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// Rows per second through Weir as decoded `Row` messages, the responses
/// compressed with `encoding` when given.
async fn messages(
    client: &WeirClient,
    sql: &str,
    encoding: Option<CompressionEncoding>,
    expected: u64,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut query = client.query();
    if let Some(encoding) = encoding {
        query = query.accept_compressed(encoding);
    }
    let request = ExecuteStreamRequest {
        source: "pg".into(),
        sql: sql.into(),
        ..Default::default()
    };
    let response = query.execute_stream(request).await?;
    let compressed = response.metadata().get("grpc-encoding").is_some();
    anyhow::ensure!(compressed == encoding.is_some(), "the server did not compress as asked");
    let mut stream = ResultStream::new(response.into_inner()).await?;
    let (mut n, mut checksum) = (0u64, 0usize);
    while let Some(batch) = stream.next_batch().await? {
        n += batch.len() as u64;
        checksum += batch.iter().map(|r| r.values.len()).sum::<usize>();
    }
    all_rows("ExecuteStream as messages", n, expected)?;
    std::hint::black_box(checksum);
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// Bytes of the row batches of a result as sent plain, with gzip and with
/// zstd, each batch compressed alone at tonic's levels (6 and 3), as tonic
/// compresses each message.
async fn compressed_sizes(client: &WeirClient, sql: &str) -> anyhow::Result<[usize; 3]> {
    let mut stream = client.execute_stream("pg", sql, vec![]).await?;
    let mut sizes = [0; 3];
    while let Some(rows) = stream.next_batch().await? {
        let plain = RowBatch {
            rows,
            ..Default::default()
        }
        .encode_to_vec();
        let mut gzip = GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        gzip.write_all(&plain)?;
        sizes[0] += plain.len();
        sizes[1] += gzip.finish()?.len();
        sizes[2] += zstd::bulk::compress(&plain, 3)?.len();
    }
    Ok(sizes)
}

pub async fn figures(
    args: &Args,
    client: &WeirClient,
    gateway: Option<u32>,
    rows_in_table: i64,
    figures: &mut Vec<Figure>,
) -> anyhow::Result<()> {
    // Per 1,000 rows, over all runs.
    let thousands = (rows_in_table as f64 * args.runs as f64 / 1000.0).max(1.0);
    let expected = u64::try_from(rows_in_table)?;
    for (name, sql, wide) in [("4 columns", NARROW, false), ("11 columns", WIDE, true)] {
        println!("streaming {rows_in_table} rows of {name} as rows and as Arrow IPC...");
        let spent = Mutex::new(Cpu::default());
        let [(direct_rate, _), (rows_rate, rows_cpu), (arrow_rate, arrow_cpu)] = in_turns(
            args.runs,
            [
                Side::new(None, "", || direct(args, sql, wide, expected, &spent)),
                Side::new(gateway, "postgres", || rows(client, sql, expected)),
                Side::new(gateway, "postgres", || arrow(client, sql, expected)),
            ],
        )
        .await?;
        let direct_cpu = spent.into_inner().unwrap_or_default();
        crate::detail(format!(
            "{name}, {rows_in_table} rows, per 1,000 rows: query_raw {}; Weir rows {}; Weir Arrow IPC {}",
            direct_cpu.per(thousands, "PostgreSQL"),
            rows_cpu.per(thousands, "PostgreSQL"),
            arrow_cpu.per(thousands, "PostgreSQL")
        ));
        for (format, rate) in [("rows", rows_rate), ("Arrow IPC", arrow_rate)] {
            figures.push(Figure {
                name: format!("{name}: stream {rows_in_table} rows as {format} vs query_raw"),
                unit: "rows/s",
                direct: direct_rate,
                weir: rate,
                higher_is_better: true,
            });
        }
        figures.push(Figure {
            name: format!("{name}: Arrow IPC (Weir column) vs rows (direct column), both through Weir"),
            unit: "rows/s",
            direct: rows_rate,
            weir: arrow_rate,
            higher_is_better: true,
        });
    }
    println!("streaming {rows_in_table} rows of 11 columns with and without zstd...");
    let [(plain, plain_cpu), (zstd, zstd_cpu)] = in_turns(
        args.runs,
        [
            Side::new(gateway, "postgres", || messages(client, WIDE, None, expected)),
            Side::new(gateway, "postgres", || {
                messages(client, WIDE, Some(CompressionEncoding::Zstd), expected)
            }),
        ],
    )
    .await?;
    crate::detail(format!(
        "11 columns, {rows_in_table} rows as messages, per 1,000 rows: plain {}; zstd {}",
        plain_cpu.per(thousands, "PostgreSQL"),
        zstd_cpu.per(thousands, "PostgreSQL")
    ));
    let [plain_bytes, gzip_bytes, zstd_bytes] = compressed_sizes(client, WIDE).await?;
    let share = |bytes: usize| 100.0 * bytes as f64 / plain_bytes.max(1) as f64;
    crate::detail(format!(
        "11 columns, {rows_in_table} rows: row batches {:.1} MB plain, {:.1} MB with gzip ({:.0} %), {:.1} MB with zstd ({:.0} %)",
        plain_bytes as f64 / 1e6,
        gzip_bytes as f64 / 1e6,
        share(gzip_bytes),
        zstd_bytes as f64 / 1e6,
        share(zstd_bytes)
    ));
    figures.push(Figure {
        name: "11 columns: rows compressed with zstd (Weir column) vs plain (direct column), both through Weir".into(),
        unit: "rows/s",
        direct: plain,
        weir: zstd,
        higher_is_better: true,
    });
    Ok(())
}
