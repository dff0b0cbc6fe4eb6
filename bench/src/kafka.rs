//! Kafka figures: 100,000 records of 100 bytes with 16-byte keys, produced
//! and consumed back, directly with rdkafka and through Weir, against the
//! same broker in the same run. Each side gets a topic of its own.

use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use weir_client::weir_proto::v1 as pb;
use weir_client::WeirClient;

use crate::{median, Args, Figure};

const VALUE_BYTES: usize = 100;
/// Records per Produce call through Weir, and calls in flight at once. A
/// call is answered once the broker has acknowledged its records, at least
/// `linger.ms` (5 ms) after they were queued, so the calls in flight bound
/// the rate: 4 held Weir to about 300,000 records/s while the direct
/// producer, with all 100,000 records in flight, made 500,000. 16 calls
/// (16,000 records in flight) are still far fewer than the direct side's.
const PRODUCE_BATCH: usize = 1000;
const PRODUCE_CALLS: usize = 16;

fn records(args: &Args) -> usize {
    if args.quick {
        10_000
    } else {
        100_000
    }
}

fn key(i: usize) -> Vec<u8> {
    format!("{i:016}").into_bytes()
}

async fn topic(args: &Args, name: &str) -> anyhow::Result<String> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &args.kafka_bootstrap)
        .create()?;
    let topic = format!("weir-bench-{name}-{:016x}", rand::random::<u64>());
    let results = admin
        .create_topics(
            [&NewTopic::new(&topic, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .context("create a topic on the Kafka broker (is it running? see WEIR_TEST_KAFKA_BOOTSTRAP)")?;
    for r in results {
        r.map_err(|(t, e)| anyhow::anyhow!("create topic {t}: {e:?}"))?;
    }
    Ok(topic)
}

/// Records per second producing with an idempotent FutureProducer, every record in flight.
async fn direct_produce(args: &Args, topic: &str, n: usize) -> anyhow::Result<f64> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &args.kafka_bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()?;
    // Connected and with the topic's metadata before the clock starts, as Weir's shared producer is.
    let warm = producer.clone();
    let name = topic.to_string();
    tokio::task::spawn_blocking(move || {
        rdkafka::producer::Producer::client(&warm).fetch_metadata(Some(&name), Duration::from_secs(10))
    })
    .await??;
    let value = vec![b'v'; VALUE_BYTES];
    let started = Instant::now();
    let keys: Vec<Vec<u8>> = (0..n).map(key).collect();
    let sends = keys.iter().map(|k| {
        producer.send(
            FutureRecord::to(topic).key(k.as_slice()).payload(value.as_slice()),
            Duration::from_secs(30),
        )
    });
    for r in futures::future::join_all(sends).await {
        r.map_err(|(e, _)| e)?;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

async fn weir_produce(client: &WeirClient, topic: &str, n: usize) -> anyhow::Result<f64> {
    let started = Instant::now();
    let batches: Vec<Vec<pb::ProducerRecord>> = (0..n)
        .step_by(PRODUCE_BATCH)
        .map(|start| {
            (start..(start + PRODUCE_BATCH).min(n))
                .map(|i| pb::ProducerRecord {
                    key: key(i),
                    value: vec![b'v'; VALUE_BYTES],
                    ..Default::default()
                })
                .collect()
        })
        .collect();
    let mut pending = futures::stream::iter(batches.into_iter().map(|records| {
        let mut stream = client.stream();
        let topic = topic.to_string();
        async move {
            stream
                .produce(pb::ProduceRequest {
                    source: "kafka".into(),
                    topic,
                    records,
                    options: None,
                })
                .await
        }
    }))
    .buffer_unordered(PRODUCE_CALLS);
    use futures::StreamExt;
    while let Some(r) = pending.next().await {
        r?;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// Records per second consuming with a StreamConsumer set up as the
/// gateway sets up its own for a Consume from explicit offsets (the same
/// settings, offset 0 of the partition assigned), created inside the
/// timing as the gateway's is.
async fn direct_consume(args: &Args, topic: &str, n: usize) -> anyhow::Result<f64> {
    let started = Instant::now();
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &args.kafka_bootstrap)
        .set("group.id", format!("weir-bench-direct-{:x}", rand::random::<u64>()))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("session.timeout.ms", "10000")
        .set("queued.max.messages.kbytes", "16384")
        .set("auto.offset.reset", "error")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(0))?;
    consumer.assign(&tpl)?;
    let mut bytes = 0usize;
    for _ in 0..n {
        let m = consumer.recv().await?;
        bytes += rdkafka::Message::payload(&m).map_or(0, <[u8]>::len);
    }
    std::hint::black_box(bytes);
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

async fn weir_consume(client: &WeirClient, topic: &str, n: usize) -> anyhow::Result<f64> {
    let started = Instant::now();
    let request = pb::ConsumeRequest {
        source: "kafka".into(),
        topics: vec![topic.to_string()],
        group: format!("bench-{:x}", rand::random::<u64>()),
        start: Some(pb::StartPosition {
            position: Some(pb::start_position::Position::Offsets(pb::PartitionOffsets {
                offsets: vec![pb::PartitionOffset {
                    topic: topic.to_string(),
                    partition: 0,
                    offset: 0,
                }],
            })),
        }),
        commit_mode: pb::CommitMode::Manual as i32,
        max_records: n as u64,
        options: None,
    };
    let mut stream = client.stream().consume(request).await?.into_inner();
    let (mut got, mut bytes) = (0usize, 0usize);
    while let Some(batch) = stream.message().await? {
        got += batch.records.len();
        bytes += batch.records.iter().map(|r| r.value.len()).sum::<usize>();
    }
    std::hint::black_box(bytes);
    anyhow::ensure!(got == n, "consumed {got} of {n} records through Weir");
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

pub async fn figures(args: &Args, client: &WeirClient, figures: &mut Vec<Figure>) -> anyhow::Result<()> {
    let n = records(args);
    println!("producing and consuming {n} Kafka records...");
    let (mut dp, mut wp, mut dc, mut wc) = (vec![], vec![], vec![], vec![]);
    for run in 0..args.runs {
        let (direct_topic, weir_topic) = (topic(args, "direct").await?, topic(args, "weir").await?);
        // Each side first in every other run (see `figures::in_turns`).
        if run % 2 == 0 {
            dp.push(direct_produce(args, &direct_topic, n).await?);
            wp.push(weir_produce(client, &weir_topic, n).await?);
            dc.push(direct_consume(args, &direct_topic, n).await?);
            wc.push(weir_consume(client, &weir_topic, n).await?);
        } else {
            wp.push(weir_produce(client, &weir_topic, n).await?);
            dp.push(direct_produce(args, &direct_topic, n).await?);
            wc.push(weir_consume(client, &weir_topic, n).await?);
            dc.push(direct_consume(args, &direct_topic, n).await?);
        }
    }
    figures.push(Figure {
        name: format!("Kafka: produce {n} records vs rdkafka"),
        unit: "records/s",
        direct: median(dp),
        weir: median(wp),
        higher_is_better: true,
    });
    figures.push(Figure {
        name: format!("Kafka: consume {n} records vs rdkafka"),
        unit: "records/s",
        direct: median(dc),
        weir: median(wc),
        higher_is_better: true,
    });
    Ok(())
}
