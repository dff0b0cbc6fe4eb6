//! Change-stream figures on PostgreSQL: single-row updates read back through
//! Weir's `WatchChanges` and by `pg_recvlogical` from a `pgoutput` slot of its
//! own (binary tuples, the slot type Weir uses), in the same run.
//!
//! - Latency: updates at a steady pace while both readers follow; each
//!   update writes a marker that both look for, and the time from the
//!   update's commit to its arrival is recorded (p50, p99).
//! - Throughput: a backlog of updates is applied first, then each reader
//!   reads all of it.

use std::collections::HashMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::AsyncReadExt;
use weir_client::weir_proto::v1 as pb;
use weir_client::weir_proto::v1::watch_changes_response::Message;
use weir_client::{ChangeWatch, WeirClient};

use crate::figures::{pg, pg_env};
use crate::{median, Args, Figure};

const TABLE: &str = "weir_bench_changes";
const SLOT: &str = "weir_bench_recvlogical";
const SUBSCRIPTION: &str = "bench-changes";
const KEYS: i32 = 1000;

fn sizes(args: &Args) -> (usize, usize) {
    // (updates in the latency run, updates in the backlog)
    if args.quick {
        (200, 2_000)
    } else {
        (5_000, 100_000)
    }
}

fn marker(i: usize) -> String {
    format!("m{i:08}x")
}

/// The marker numbers found in `bytes`, scanning from `from`.
fn markers(bytes: &[u8], from: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut at = from;
    while at + 10 <= bytes.len() {
        if bytes[at] == b'm' && bytes[at + 9] == b'x' && bytes[at + 1..at + 9].iter().all(u8::is_ascii_digit) {
            let n = std::str::from_utf8(&bytes[at + 1..at + 9])
                .ok()
                .and_then(|s| s.parse().ok());
            if let Some(n) = n {
                out.push((n, at + 10));
                at += 10;
                continue;
            }
        }
        at += 1;
    }
    out
}

/// Drops the bench's subscription, if a previous run left it.
async fn delete_subscription(client: &WeirClient) {
    let request = pb::DeleteSubscriptionRequest {
        source: "pg".into(),
        subscription: SUBSCRIPTION.into(),
    };
    // NOT_FOUND is the usual answer.
    let _ = client.stream().delete_subscription(request).await;
}

async fn setup(args: &Args, client: &WeirClient) -> anyhow::Result<tokio_postgres::Client> {
    let pg = pg(args).await?;
    delete_subscription(client).await;
    // One statement per call: a slot cannot be created in a transaction that wrote.
    for sql in [
        format!("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '{SLOT}'"),
        format!("DROP PUBLICATION IF EXISTS {SLOT}"),
        format!("DROP TABLE IF EXISTS {TABLE}"),
        format!("CREATE TABLE {TABLE} (id int PRIMARY KEY, v text NOT NULL)"),
        format!("INSERT INTO {TABLE} SELECT g, 'start' FROM generate_series(1, {KEYS}) g"),
        format!("CREATE PUBLICATION {SLOT} FOR TABLE {TABLE}"),
        format!("SELECT pg_create_logical_replication_slot('{SLOT}', 'pgoutput')"),
    ] {
        pg.batch_execute(&sql)
            .await
            .with_context(|| format!("{sql} (change streams need wal_level = logical; ./scripts/test sets it)"))?;
    }
    Ok(pg)
}

fn start(resume: Vec<u8>) -> pb::WatchStart {
    pb::WatchStart {
        source: "pg".into(),
        tables: vec![pb::TableRef {
            schema: String::new(),
            table: TABLE.into(),
        }],
        subscription: SUBSCRIPTION.into(),
        resume_position: resume,
        ..Default::default()
    }
}

/// Reads `n` changes, acknowledging every commit; returns each marker's
/// arrival time and the last acknowledged position.
async fn weir_read(watch: &mut ChangeWatch, n: usize) -> anyhow::Result<(HashMap<usize, Instant>, Vec<u8>)> {
    let mut arrived = HashMap::with_capacity(n);
    let mut last = Vec::new();
    let mut seen = 0;
    while seen < n {
        let message = tokio::time::timeout(Duration::from_secs(60), watch.next())
            .await
            .context("change events stopped coming through Weir")??
            .and_then(|r| r.message)
            .context("the change stream ended")?;
        match message {
            Message::Change(c) => {
                seen += 1;
                let v = c.after.as_ref().and_then(|r| r.values.get(1)).map(ToString::to_string);
                if let Some((i, _)) = v.and_then(|v| markers(v.as_bytes(), 0).first().copied()) {
                    arrived.insert(i, Instant::now());
                }
            }
            Message::Transaction(b) if !b.begin => {
                watch.ack(b.position.clone()).await?;
                last = b.position;
            }
            _ => {}
        }
    }
    Ok((arrived, last))
}

fn recvlogical(args: &Args, endpos: Option<&str>) -> tokio::process::Command {
    let mut std_cmd = std::process::Command::new("pg_recvlogical");
    pg_env(args, &mut std_cmd);
    let mut cmd = tokio::process::Command::from(std_cmd);
    // PGDATABASE is not enough: pg_recvlogical wants the database named.
    cmd.args([
        "--dbname",
        &args.pg_database,
        "--slot",
        SLOT,
        "--start",
        "--no-loop",
        "-f",
        "-",
    ])
    .args([
        "-o",
        "proto_version=1",
        "-o",
        &format!("publication_names={SLOT}"),
        "-o",
        "binary=true",
    ])
    .args(["--fsync-interval", "0", "--status-interval", "1"]);
    if let Some(lsn) = endpos {
        cmd.arg(format!("--endpos={lsn}"));
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::null()).kill_on_drop(true);
    cmd
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or(0.0)
}

/// p50 and p99 of arrival minus commit, in ms.
fn latencies(committed: &HashMap<usize, Instant>, arrived: &HashMap<usize, Instant>) -> (f64, f64) {
    let mut ms: Vec<f64> = committed
        .iter()
        .filter_map(|(i, c)| {
            arrived
                .get(i)
                .map(|a| a.saturating_duration_since(*c).as_secs_f64() * 1000.0)
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    (percentile(&ms, 0.5), percentile(&ms, 0.99))
}

async fn live(
    args: &Args,
    client: &WeirClient,
    pg: &tokio_postgres::Client,
    updates: usize,
) -> anyhow::Result<((f64, f64), (f64, f64), Vec<u8>)> {
    let mut watch = client.watch(start(Vec::new())).await?;
    let mut child = recvlogical(args, None).spawn().context("start pg_recvlogical")?;
    let mut stdout = child.stdout.take().context("pg_recvlogical stdout")?;
    let direct = tokio::spawn(async move {
        let (mut buf, mut scanned) = (Vec::new(), 0usize);
        let mut arrived = HashMap::new();
        let mut chunk = vec![0u8; 64 * 1024];
        while arrived.len() < updates {
            let n = stdout.read(&mut chunk).await?;
            anyhow::ensure!(n > 0, "pg_recvlogical ended early");
            buf.extend_from_slice(&chunk[..n]);
            let now = Instant::now();
            for (i, end) in markers(&buf, scanned.saturating_sub(9)) {
                arrived.entry(i).or_insert(now);
                scanned = end;
            }
            scanned = scanned.max(buf.len().saturating_sub(9));
        }
        anyhow::Ok(arrived)
    });
    // Both readers are following before the first update.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let statement = pg.prepare(&format!("UPDATE {TABLE} SET v = $1 WHERE id = $2")).await?;
    let mut committed = HashMap::with_capacity(updates);
    let pace = Duration::from_millis(2);
    let reading = weir_read(&mut watch, updates);
    let writing = async {
        for i in 0..updates {
            let key = (i as i32 % KEYS) + 1;
            pg.execute(&statement, &[&marker(i), &key]).await?;
            committed.insert(i, Instant::now());
            tokio::time::sleep(pace).await;
        }
        anyhow::Ok(())
    };
    let (read, written) = tokio::join!(reading, writing);
    written?;
    let (weir_arrived, last) = read?;
    let direct_arrived = tokio::time::timeout(Duration::from_secs(60), direct).await???;
    let _ = child.kill().await;
    Ok((
        latencies(&committed, &direct_arrived),
        latencies(&committed, &weir_arrived),
        last,
    ))
}

async fn backlog(
    args: &Args,
    client: &WeirClient,
    pg: &tokio_postgres::Client,
    updates: usize,
    resume: Vec<u8>,
) -> anyhow::Result<(f64, f64, Vec<u8>)> {
    let statement = pg.prepare(&format!("UPDATE {TABLE} SET v = $1 WHERE id = $2")).await?;
    for i in 0..updates {
        let key = (i as i32 % KEYS) + 1;
        pg.execute(&statement, &[&format!("b{i}"), &key]).await?;
    }
    let endpos: String = pg.query_one("SELECT pg_current_wal_lsn()::text", &[]).await?.get(0);
    let started = Instant::now();
    let status = recvlogical(args, Some(&endpos))
        .stdout(Stdio::null())
        .status()
        .await
        .context("run pg_recvlogical")?;
    anyhow::ensure!(status.success(), "pg_recvlogical failed: {status}");
    let direct = updates as f64 / started.elapsed().as_secs_f64();
    let started = Instant::now();
    let mut watch = client.watch(start(resume)).await?;
    let (_, last) = weir_read(&mut watch, updates).await?;
    let weir = updates as f64 / started.elapsed().as_secs_f64();
    Ok((direct, weir, last))
}

pub async fn figures(args: &Args, client: &WeirClient, figures: &mut Vec<Figure>) -> anyhow::Result<()> {
    let (live_updates, backlog_updates) = sizes(args);
    let pg = setup(args, client).await?;
    // Create the subscription now, so that it starts before the first update.
    drop(client.watch(start(Vec::new())).await?);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut d50, mut w50, mut d99, mut w99, mut dt, mut wt) = (vec![], vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..args.runs {
        println!("change stream: {live_updates} paced updates, commit-to-receipt latency...");
        let ((direct50, direct99), (weir50, weir99), last) = live(args, client, &pg, live_updates).await?;
        d50.push(direct50);
        d99.push(direct99);
        w50.push(weir50);
        w99.push(weir99);
        // Let the previous stream's session end before the subscription is resumed.
        tokio::time::sleep(Duration::from_millis(300)).await;
        println!("change stream: reading a backlog of {backlog_updates} updates...");
        let (direct, weir, _) = backlog(args, client, &pg, backlog_updates, last).await?;
        dt.push(direct);
        wt.push(weir);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut push = |name: String, unit, direct, weir, higher_is_better| {
        figures.push(Figure {
            name,
            unit,
            direct,
            weir,
            higher_is_better,
        })
    };
    push(
        format!("change stream: p50 commit-to-receipt, {live_updates} updates, vs pg_recvlogical"),
        "ms",
        median(d50),
        median(w50),
        false,
    );
    push(
        format!("change stream: p99 commit-to-receipt, {live_updates} updates, vs pg_recvlogical"),
        "ms",
        median(d99),
        median(w99),
        false,
    );
    push(
        format!("change stream: backlog of {backlog_updates} updates vs pg_recvlogical"),
        "events/s",
        median(dt),
        median(wt),
        true,
    );
    delete_subscription(client).await;
    for sql in [
        format!("SELECT pg_drop_replication_slot('{SLOT}')"),
        format!("DROP PUBLICATION {SLOT}"),
        format!("DROP TABLE {TABLE}"),
    ] {
        pg.batch_execute(&sql).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_are_found_in_binary_noise() {
        let mut bytes = b"\x00\x01m00000012x\xffmm00000003xm1234".to_vec();
        bytes.extend_from_slice(b"5678x");
        let found: Vec<usize> = markers(&bytes, 0).into_iter().map(|(i, _)| i).collect();
        assert_eq!(found, [12, 3, 12_345_678]);
    }
}
