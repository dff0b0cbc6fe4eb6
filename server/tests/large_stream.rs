//! A 1,000,000-row result streamed through the gateway with bounded memory.
//! Alone in its test binary so that the process's memory is this test's.

mod common;

use std::time::Instant;

use common::*;
use futures::StreamExt;

const ROWS: i64 = 1_000_000;
const SQL: &str = "SELECT g, md5(g::text) AS h, g * 1.5 AS n FROM generate_series(1, 1000000) g";

/// The process's resident memory; a reading that fails fails the test (as
/// 0 it would pass every bound).
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .expect("VmRSS in /proc/self/status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_rows_stream_in_bounded_memory() {
    let server = TestServer::start(&tenant("big", "", &postgres("big", "pg", ""))).await;
    let client = server.client("key-big").await;

    // Direct baseline in the same run: tokio-postgres decoding every value.
    let pg = pg_direct().await;
    let started = Instant::now();
    let rows = pg
        .query_raw(SQL, std::iter::empty::<i32>())
        .await
        .expect("direct query");
    futures::pin_mut!(rows);
    let mut direct = 0i64;
    while let Some(row) = rows.next().await {
        let row = row.expect("row");
        let (_g, _h): (i32, &str) = (row.get(0), row.get(1));
        direct += 1;
    }
    let direct_elapsed = started.elapsed();
    assert_eq!(direct, ROWS);

    let baseline = rss_bytes();
    let mut peak = baseline;
    let started = Instant::now();
    let mut stream = client.execute_stream("pg", SQL, vec![]).await.expect("stream");
    let (mut count, mut sum) = (0i64, 0i64);
    while let Some(batch) = stream.next_batch().await.expect("batch") {
        for row in &batch {
            sum += int(&row.values[0]);
            assert_eq!(text(&row.values[1]).len(), 32);
        }
        count += batch.len() as i64;
        peak = peak.max(rss_bytes());
    }
    let gateway_elapsed = started.elapsed();
    assert_eq!(count, ROWS);
    assert_eq!(sum, ROWS * (ROWS + 1) / 2, "every row arrived once, in order or not");
    let stats = stream.stats().expect("stats");
    assert_eq!(stats.rows_returned, ROWS as u64);

    let growth = peak.saturating_sub(baseline);
    println!(
        "1M rows: direct tokio-postgres {:.2}s, through Weir {:.2}s (ratio {:.2}); memory growth {:.1} MiB over {:.1} MiB",
        direct_elapsed.as_secs_f64(),
        gateway_elapsed.as_secs_f64(),
        direct_elapsed.as_secs_f64() / gateway_elapsed.as_secs_f64(),
        growth as f64 / 1048576.0,
        baseline as f64 / 1048576.0
    );
    // The encoded result is about 60 MiB and its decoded form several times
    // that; bounded buffering keeps the growth to a small fraction of it.
    assert!(
        growth < 48 * 1024 * 1024,
        "memory grew by {} MiB while streaming",
        growth / 1048576
    );
    server.stop().await;
}
