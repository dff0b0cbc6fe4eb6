//! Soak: the real `weir` process under mixed traffic from several tenants
//! (point queries, result streams, transactions, bulk loads, Kafka produce
//! and consume) for a bounded time. Afterwards there must be no errors
//! beyond limit rejections, and no growth in the server's memory, file
//! descriptors or database connections between the end of the warm-up and
//! the end of the run.
//!
//! Short mode (every test run): WEIR_SOAK_SECS, default 20 s. Long mode on
//! demand: `WEIR_SOAK_SECS=600 ./scripts/test -p weir-server --test soak -- --nocapture`.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{create_topic, kafka, key_hash, postgres, sqlite_demo, WeirProcess};
use tonic::Code;
use weir_client::weir_proto::v1 as pb;
use weir_client::WeirClient;

#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    limited: AtomicU64,
    failed: AtomicU64,
    /// Calls that succeeded, by kind: each kind must have got through.
    ok_by_kind: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
    /// Records the consumers read.
    consumed: AtomicU64,
}

impl Counts {
    /// Counts an outcome; a limited call backs off as a well-behaved client does.
    async fn record<T>(&self, what: &str, result: Result<T, tonic::Status>) {
        match result {
            Ok(_) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut kinds) = self.ok_by_kind.lock() {
                    *kinds.entry(what.to_string()).or_default() += 1;
                }
            }
            Err(e) if e.code() == Code::ResourceExhausted => {
                self.limited.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => {
                eprintln!("{what}: {e:?}");
                self.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Resident memory (kB) and open file descriptors of a process.
fn usage(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("fd").count();
    (rss, fds)
}

async fn weir_connections(pg: &tokio_postgres::Client) -> i64 {
    pg.query_one(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'weir'",
        &[],
    )
    .await
    .expect("pg_stat_activity")
    .get(0)
}

fn config(prefix: &str) -> String {
    let mut text = "[server]\nmax_concurrent_requests = 64\nmax_queue_wait = \"2s\"\n".to_string();
    for t in ["a", "b", "c"] {
        text.push_str(&format!(
            "[tenants.{t}]\napi_keys = [{{ id = \"k\", sha256 = \"{}\" }}]\n[tenants.{t}.limits]\nrequests_per_second = 400\nburst = 100\n",
            key_hash(&format!("key-{t}"))
        ));
        text.push_str(&postgres(t, "pg", ""));
        text.push_str(&sqlite_demo(t, "demo"));
    }
    text.push_str(&kafka("c", "events", prefix));
    text
}

#[tokio::test]
async fn mixed_traffic_leaves_no_growth() {
    let secs: u64 = std::env::var("WEIR_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let run = Duration::from_secs(secs);
    let prefix = format!("soak{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let topic = format!("{prefix}.events");
    create_topic(&topic, 2).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("weir.toml");
    std::fs::write(&path, config(&prefix)).expect("config");
    let weir = WeirProcess::start(&["--config", path.to_str().expect("path")]);
    let pg = common::pg_direct().await;
    let table = format!("soak_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    pg.batch_execute(&format!(
        "CREATE TABLE {table} (id BIGINT PRIMARY KEY, tenant TEXT, v TEXT)"
    ))
    .await
    .expect("create");

    let counts = Arc::new(Counts::default());
    let stop = Instant::now() + run;
    let mut workers = tokio::task::JoinSet::new();
    let next_id = Arc::new(AtomicU64::new(0));
    for t in ["a", "b", "c"] {
        let client = WeirClient::connect(&weir.addr, &format!("key-{t}"))
            .await
            .expect("connect");
        // Point queries, on PostgreSQL and SQLite.
        for w in 0..3 {
            let (client, counts) = (client.clone(), counts.clone());
            workers.spawn(async move {
                while Instant::now() < stop {
                    let source = if w == 0 { "demo" } else { "pg" };
                    counts
                        .record("query", client.execute(source, "SELECT 1", vec![]).await)
                        .await;
                }
            });
        }
        // Result streams, read to the end.
        let (c, counts2) = (client.clone(), counts.clone());
        workers.spawn(async move {
            while Instant::now() < stop {
                let result = async {
                    let mut s = c
                        .execute_stream("pg", "SELECT g, md5(g::text) FROM generate_series(1, 20000) g", vec![])
                        .await?;
                    while s.next_batch().await?.is_some() {}
                    Ok::<_, tonic::Status>(())
                }
                .await;
                counts2.record("stream", result).await;
            }
        });
        // Transactions and bulk loads into one table.
        let (c, counts3, table, ids) = (client.clone(), counts.clone(), table.clone(), next_id.clone());
        workers.spawn(async move {
            while Instant::now() < stop {
                let first = ids.fetch_add(200, Ordering::Relaxed) as i64;
                let rows: Vec<pb::Row> = (first..first + 200)
                    .map(|i| pb::Row {
                        values: vec![
                            pb::Value {
                                kind: Some(pb::value::Kind::Int64Value(i)),
                            },
                            pb::Value {
                                kind: Some(pb::value::Kind::StringValue(t.into())),
                            },
                            pb::Value {
                                kind: Some(pb::value::Kind::StringValue("x".repeat(100))),
                            },
                        ],
                    })
                    .collect();
                let header = pb::LoadHeader {
                    source: "pg".into(),
                    table: table.clone(),
                    columns: vec!["id".into(), "tenant".into(), "v".into()],
                    ..Default::default()
                };
                counts3
                    .record("load", c.load(header, tokio_stream::iter(vec![rows])).await)
                    .await;
                let tx = async {
                    let tx = c.begin("pg", pb::IsolationLevel::Unspecified, false).await?;
                    c.execute_in(&tx, "pg", &format!("DELETE FROM {table} WHERE id < {first}"), vec![])
                        .await?;
                    c.commit(&tx).await
                }
                .await;
                counts3.record("transaction", tx).await;
            }
        });
    }
    // Kafka: tenant c produces and consumes.
    let c = WeirClient::connect(&weir.addr, "key-c").await.expect("connect");
    {
        let (c, counts, topic) = (c.clone(), counts.clone(), topic.clone());
        workers.spawn(async move {
            while Instant::now() < stop {
                let records = (0..50)
                    .map(|i| pb::ProducerRecord {
                        value: format!("event {i}").into_bytes(),
                        ..Default::default()
                    })
                    .collect();
                let request = pb::ProduceRequest {
                    source: "events".into(),
                    topic: topic.clone(),
                    records,
                    options: None,
                };
                counts.record("produce", c.stream().produce(request).await).await;
            }
        });
    }
    {
        let (c, counts, topic) = (c.clone(), counts.clone(), topic.clone());
        workers.spawn(async move {
            while Instant::now() < stop {
                let request = pb::ConsumeRequest {
                    source: "events".into(),
                    topics: vec![topic.clone()],
                    group: "soak".into(),
                    max_records: 500,
                    ..Default::default()
                };
                let result = async {
                    let mut s = c.stream().consume(request).await?.into_inner();
                    // A quiet topic ends the read after 5 s; what was read counts.
                    let read = tokio::time::timeout(Duration::from_secs(5), async {
                        while let Some(batch) = s.message().await? {
                            counts.consumed.fetch_add(batch.records.len() as u64, Ordering::Relaxed);
                        }
                        Ok::<_, tonic::Status>(())
                    })
                    .await;
                    read.unwrap_or(Ok(()))
                }
                .await;
                counts.record("consume", result).await;
            }
        });
    }

    // Warm-up: a fifth of the run, at least 3 s.
    tokio::time::sleep((run / 5).max(Duration::from_secs(3))).await;
    let (rss_warm, fds_warm) = usage(weir.pid());
    let conns_warm = weir_connections(&pg).await;
    let mut peak_rss = rss_warm;
    while Instant::now() < stop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        peak_rss = peak_rss.max(usage(weir.pid()).0);
    }
    while workers.join_next().await.is_some() {}
    // Let pools and streams settle.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (rss_end, fds_end) = usage(weir.pid());
    let conns_end = weir_connections(&pg).await;
    let (ok, limited, failed) = (
        counts.ok.load(Ordering::Relaxed),
        counts.limited.load(Ordering::Relaxed),
        counts.failed.load(Ordering::Relaxed),
    );
    eprintln!(
        "soak {secs}s: {ok} calls ok, {limited} limited, {failed} failed; RSS {rss_warm} -> {rss_end} kB (peak {peak_rss}); fds {fds_warm} -> {fds_end}; PostgreSQL sessions {conns_warm} -> {conns_end}"
    );
    assert_eq!(failed, 0, "no errors beyond limit rejections");
    assert!(ok > 100, "traffic flowed: {ok}");
    let kinds = counts.ok_by_kind.lock().map(|k| k.clone()).unwrap_or_default();
    for kind in ["query", "stream", "load", "transaction", "produce", "consume"] {
        assert!(
            kinds.get(kind).is_some_and(|n| *n > 0),
            "no {kind} call got through: {kinds:?}"
        );
    }
    assert!(
        counts.consumed.load(Ordering::Relaxed) > 0,
        "the consumers read records"
    );
    assert!(
        rss_end <= rss_warm + (rss_warm / 4).max(32 * 1024),
        "memory grew from {rss_warm} kB to {rss_end} kB"
    );
    assert!(
        fds_end <= fds_warm + 8,
        "file descriptors grew from {fds_warm} to {fds_end}"
    );
    // Three tenants with one pool of eight each: never more.
    assert!(
        conns_end <= 24 && conns_end <= conns_warm.max(1) + 24,
        "sessions: {conns_warm} -> {conns_end}"
    );
    pg.batch_execute(&format!("DROP TABLE {table}")).await.expect("drop");
}
