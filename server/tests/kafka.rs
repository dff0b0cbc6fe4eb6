//! Kafka through the real gRPC server against a real Kafka-protocol broker
//! (tansu, started by ./scripts/test): produce and consume back exactly what
//! was sent, commits and resumes, start positions, per-tenant topic and
//! group isolation, limits, and the wrong kind of source.

mod common;

use std::time::Duration;

use common::*;
use tonic::Code;
use weir_client::weir_proto::v1 as pb;
use weir_client::WeirClient;

fn unique(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

async fn server(limits: &str) -> (TestServer, WeirClient) {
    server_with("", limits).await
}

/// With `settings` (e.g. a `[server]` table) before the tenants.
async fn server_with(settings: &str, limits: &str) -> (TestServer, WeirClient) {
    let config = settings.to_string()
        + &tenant("ka", limits, &kafka("ka", "events", "weir-a-"))
        + &tenant("kb", "", &kafka("kb", "events", "weir-b-"))
        // Shares tenant a's topics, not its consumer groups.
        + &tenant("kc", "", &kafka("kc", "events", "weir-a-"))
        + &sqlite_demo("ka", "demo");
    let server = TestServer::start(&config).await;
    let client = server.client("key-ka").await;
    (server, client)
}

fn record(i: usize) -> pb::ProducerRecord {
    pb::ProducerRecord {
        key: format!("k{}", i % 3).into_bytes(),
        value: format!("value {i}").into_bytes(),
        headers: vec![pb::RecordHeader {
            key: "n".into(),
            value: i.to_string().into_bytes(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// A server, a topic of this run with 1,500 records of 10 kB on each of its
/// two partitions, and a group of this run alone (members of a run cut
/// short stay in a group until the broker's rebalance timeout evicts them).
async fn ballast(name: &str) -> (TestServer, WeirClient, String, String) {
    let (server, client) = server("").await;
    let topic = unique(&format!("weir-a-{name}-"));
    create_topic(&topic, 2).await;
    produce_ballast(&client, &topic, 3_000).await;
    (server, client, topic, unique(&format!("{name}-")))
}

async fn open_consume(client: &WeirClient, request: pb::ConsumeRequest) -> tonic::Streaming<pb::ConsumeResponse> {
    client.stream().consume(request).await.expect("consume").into_inner()
}

/// The next batch of `stream`, which must come within 30 s (`who`: the
/// stream, in the message of a failure).
async fn next_batch(stream: &mut tonic::Streaming<pb::ConsumeResponse>, who: &str) -> pb::ConsumeResponse {
    tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .unwrap_or_else(|_| panic!("{who}: no records within 30 s"))
        .unwrap_or_else(|e| panic!("{who}: {e:?}"))
        .unwrap_or_else(|| panic!("{who}: the stream ended"))
}

/// The offsets of the records of `stream` until there are at least `n`
/// (each batch within 30 s).
async fn read_offsets(stream: &mut tonic::Streaming<pb::ConsumeResponse>, n: usize) -> Vec<i64> {
    let mut offsets = Vec::new();
    while offsets.len() < n {
        let batch = next_batch(stream, "stream").await;
        offsets.extend(batch.records.iter().map(|r| r.offset));
    }
    offsets
}

/// Every record of a Consume call (which must end by itself, through max_records).
async fn consume(client: &WeirClient, request: pb::ConsumeRequest) -> Vec<pb::ConsumedRecord> {
    let mut stream = open_consume(client, request).await;
    let mut records = Vec::new();
    let within = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(batch) = stream.message().await.expect("consume stream") {
            records.extend(batch.records);
        }
    });
    within.await.expect("the records arrive within a minute");
    records
}

/// A rolling restart: a replica stopped (SIGTERM) while a consumer with
/// automatic commits is reading has committed what it delivered, so the
/// group resumes after those records instead of reading them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_replica_has_committed_what_it_delivered() {
    let topic = unique("weir-a-restart-");
    create_topic(&topic, 1).await;
    let group = unique("restarted-");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("weir.toml");
    let config = format!(
        "[server]\nshutdown_grace = \"1s\"\n{}",
        tenant("ka", "", &kafka("ka", "events", "weir-a-"))
    );
    std::fs::write(&path, config).expect("config");
    let weir = WeirProcess::start(&["--config", path.to_str().expect("utf-8 path")]);
    let client = WeirClient::connect(&weir.addr, "key-ka").await.expect("connect");
    produce(&client, &topic, (0..10).map(record).collect())
        .await
        .expect("produce");
    // No max_records: the stream runs until the replica stops.
    let mut stream = open_consume(&client, consume_request(&topic, &group, 0, false)).await;
    read_offsets(&mut stream, 10).await;
    tokio::task::spawn_blocking(move || weir.stop()).await.expect("stopped");
    let ended = stream.message().await;
    assert!(
        matches!(&ended, Err(s) if s.code() == Code::Unavailable),
        "the stream ends as the replica stops: {ended:?}"
    );

    let (server, client) = server("").await;
    produce(&client, &topic, vec![record(10)]).await.expect("produce");
    let resumed = consume(&client, consume_request(&topic, &group, 1, false)).await;
    assert_eq!(
        resumed.first().map(|r| r.offset),
        Some(10),
        "the group resumes after the 10 records delivered before the stop"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produced_records_come_back_exactly() {
    let (server, client) = server("").await;
    let topic = unique("weir-a-exact-");
    create_topic(&topic, 1).await;
    // Every other record with a time of its own, to the millisecond; an
    // empty header value and a null one stay apart.
    let sent: Vec<_> = (0..25)
        .map(|i| {
            let mut r = record(i);
            r.headers.extend([
                pb::RecordHeader {
                    key: "empty".into(),
                    ..Default::default()
                },
                pb::RecordHeader {
                    key: "null".into(),
                    null_value: true,
                    ..Default::default()
                },
            ]);
            pb::ProducerRecord {
                timestamp: (i % 2 == 0).then(|| prost_types::Timestamp {
                    seconds: 1_704_164_645 + i as i64,
                    nanos: 678_000_000,
                }),
                ..r
            }
        })
        .collect();
    let mut acks = produce(&client, &topic, sent[..24].to_vec())
        .await
        .expect("produce")
        .acks;
    // A call of its own for the last record: tansu reports the high
    // watermark as the last record batch's base offset + 1.
    acks.extend(
        produce(&client, &topic, sent[24..].to_vec())
            .await
            .expect("produce")
            .acks,
    );
    assert_eq!(acks.len(), 25);
    let offsets: Vec<i64> = acks.iter().map(|a| a.offset).collect();
    assert_eq!(offsets, (0..25).collect::<Vec<i64>>(), "acks in request order");

    let got = consume(&client, consume_request(&topic, "exact", 25, false)).await;
    assert_eq!(got.len(), 25);
    for (i, (g, s)) in got.iter().zip(&sent).enumerate() {
        assert_eq!((g.offset, &g.key, &g.value), (i as i64, &s.key, &s.value));
        assert_eq!(g.headers, s.headers, "record {i}'s headers");
        assert_eq!(g.topic, topic);
        assert!(g.timestamp.is_some());
        if s.timestamp.is_some() {
            assert_eq!(g.timestamp, s.timestamp, "record {i}'s own time");
        }
    }

    let listed = list_topics(&client).await;
    let mine = listed
        .topics
        .iter()
        .find(|t| t.name == topic)
        .expect("the topic is listed");
    assert_eq!(mine.partitions.len(), 1);
    assert_eq!(mine.partitions[0].high_watermark, 25, "{mine:?}");
    assert!(
        listed.topics.iter().all(|t| t.name.starts_with("weir-a-")),
        "only the tenant's topics"
    );

    let ping = client.test_connection("events").await.expect("test connection");
    assert!(ping.brokers >= 1, "{ping:?}");
    server.stop().await;
}

/// Kafka's Java client's hash of a key (`Utils.murmur2`).
fn murmur2(data: &[u8]) -> i32 {
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let chunks = data.chunks_exact(4);
    let tail = chunks.remainder();
    for c in chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]).wrapping_mul(M);
        k ^= k >> 24;
        h = h.wrapping_mul(M) ^ k.wrapping_mul(M);
    }
    for (i, b) in tail.iter().enumerate().rev() {
        h ^= u32::from(*b) << (8 * i);
    }
    if !tail.is_empty() {
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    (h ^ (h >> 15)) as i32
}

/// A keyed record lands on the partition a Java producer (Kafka Streams,
/// Kafka Connect) would put it on, so that per-key order, compaction and
/// tombstones work across clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_go_to_the_partitions_java_clients_choose() {
    // Kafka's own test vectors for the hash.
    assert_eq!(murmur2(b"21"), -973_932_308);
    assert_eq!(murmur2(b"foobar"), -790_332_482);
    assert_eq!(murmur2(b"a-little-bit-long-string"), -985_981_536);
    assert_eq!(murmur2(b"abc"), 479_470_107);
    let (server, client) = server("").await;
    let topic = unique("weir-a-murmur-");
    create_topic(&topic, 8).await;
    let keys: Vec<String> = (0..24).map(|i| format!("customer-{i}")).collect();
    let records = keys
        .iter()
        .map(|k| pb::ProducerRecord {
            key: k.clone().into_bytes(),
            value: b"v".to_vec(),
            ..Default::default()
        })
        .collect();
    let acks = produce(&client, &topic, records).await.expect("produce").acks;
    let got: Vec<i32> = acks.iter().map(|a| a.partition).collect();
    let java: Vec<i32> = keys.iter().map(|k| (murmur2(k.as_bytes()) & 0x7fff_ffff) % 8).collect();
    assert_eq!(got, java);
    server.stop().await;
}

/// Produces one record whose header key is not UTF-8, as a client outside
/// Weir may write one (rdkafka's safe API takes only `&str` keys).
#[allow(unsafe_code)]
async fn produce_with_a_raw_header_key(topic: &str, key: &[u8]) {
    use rdkafka::message::{BorrowedHeaders, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .create()
        .expect("producer");
    let headers = OwnedHeaders::new();
    // SAFETY: in rdkafka 0.39 (the version Cargo.lock holds), a
    // `&BorrowedHeaders` is librdkafka's header list pointer itself (rdkafka
    // builds it by casting that pointer; check again when rdkafka changes);
    // the list is owned by `headers`, alive here, and name and value are copied in.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_header_add(
            headers.as_borrowed() as *const BorrowedHeaders as *mut rdkafka::bindings::rd_kafka_headers_t,
            key.as_ptr().cast(),
            key.len() as isize,
            b"v".as_ptr().cast(),
            1,
        )
    };
    assert_eq!(err, rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR);
    producer
        .send(
            FutureRecord::to(topic).payload("raw").key("r").headers(headers),
            Duration::from_secs(10),
        )
        .await
        .expect("produced");
}

/// A record with a header key that is not UTF-8 is delivered (the key read
/// lossily), and so are the records after it: it used to stop its group for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_key_that_is_not_utf8_stops_no_consumer() {
    let (server, client) = server("").await;
    let topic = unique("weir-a-rawheader-");
    create_topic(&topic, 1).await;
    produce_with_a_raw_header_key(&topic, b"k\xff").await;
    produce(&client, &topic, vec![record(1)]).await.expect("produce");
    let got = consume(&client, consume_request(&topic, &unique("raw-"), 2, false)).await;
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0].value, b"raw");
    assert_eq!(got[0].headers[0].key, "k\u{fffd}");
    assert_eq!(got[0].headers[0].value, b"v");
    assert_eq!(got[1].value, record(1).value);

    // Weir itself refuses a key that Kafka would cut short at its NUL.
    let mut nul = record(2);
    nul.headers[0].key = "a\0b".into();
    let refused = produce(&client, &topic, vec![nul])
        .await
        .expect_err("a NUL in a header key");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    server.stop().await;
}

/// Automatic commits cover the batches the transport has taken, not those
/// still in the server's buffer: a client that stops reading and cancels
/// gets the buffered records again from its group's next consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_still_buffered_when_a_consumer_cancels_are_not_committed() {
    let (server, client) = server("").await;
    let topic = unique("weir-a-buffered-");
    create_topic(&topic, 1).await;
    // Records of 200 KiB: batches of 6 (just past 1 MiB each).
    for call in 0..8 {
        let records = (0..5)
            .map(|i| pb::ProducerRecord {
                key: b"k".to_vec(),
                value: vec![b'0' + (call * 5 + i) as u8 % 10; 200 * 1024],
                ..Default::default()
            })
            .collect();
        produce(&client, &topic, records).await.expect("produce");
    }
    // HTTP/2's smallest windows: the transport takes a batch only as the client reads.
    let mut raw = small_window_stream_client(&server.addr, "key-ka").await;
    let group = unique("buffered-");
    let mut stream = raw
        .consume(consume_request(&topic, &group, 0, false))
        .await
        .expect("consume")
        .into_inner();
    let first = stream.message().await.expect("a batch").expect("open");
    let read = first.records.last().expect("records").offset;
    // The server's reader fills its buffer meanwhile.
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(stream);
    drop(raw);
    let again = consume(&client, consume_request(&topic, &group, 1, false)).await;
    let resumed = again[0].offset;
    // At most the two batches past what was read that HTTP/2 holds (in
    // the client's window and the server's send buffer), not the server's
    // own buffer as well.
    assert!(
        (read + 1..=read + 13).contains(&resumed),
        "read up to {read}, resumed at {resumed}"
    );
    server.stop().await;
}

/// Large records come in batches of about 1 MiB, not 500 records: a batch
/// of 500 records of 150 KB would be a 75 MB message, past the 4 MiB that
/// gRPC clients take by default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_records_come_in_batches_of_about_a_mebibyte() {
    let (server, client) = server("").await;
    let topic = unique("weir-a-large-");
    create_topic(&topic, 1).await;
    const SIZE: usize = 150 * 1024;
    for call in 0..4u8 {
        let records = (0..6u8)
            .map(|i| pb::ProducerRecord {
                value: vec![call * 6 + i; SIZE],
                ..Default::default()
            })
            .collect();
        produce(&client, &topic, records).await.expect("produce");
    }
    let mut stream = client
        .stream()
        .consume(consume_request(&topic, "large", 24, false))
        .await
        .expect("consume")
        .into_inner();
    let mut sizes = Vec::new();
    let mut received = Vec::new();
    while let Some(batch) = stream.message().await.expect("consume stream") {
        sizes.push(batch.records.iter().map(|r| r.value.len()).sum::<usize>());
        received.extend(batch.records.iter().map(|r| r.value[0]));
    }
    assert_eq!(received, (0..24).collect::<Vec<u8>>(), "every record, in order");
    assert!(sizes.iter().all(|&s| s <= (1 << 20) + SIZE), "batch sizes {sizes:?}");
    server.stop().await;
}

/// Null and empty keys and values stay apart both ways: a tombstone is a
/// null value, not an empty one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tombstones_and_empty_values_stay_apart() {
    let (server, client) = server("").await;
    let topic = unique("weir-a-tombstones-");
    create_topic(&topic, 1).await;
    let record = |key: &[u8], value: &[u8], null_value| pb::ProducerRecord {
        key: key.to_vec(),
        value: value.to_vec(),
        null_value,
        ..Default::default()
    };
    let both = produce(&client, &topic, vec![record(b"a", b"x", true)])
        .await
        .expect_err("a value and null_value");
    assert_eq!(both.code(), tonic::Code::InvalidArgument, "{}", both.message());
    let sent = vec![
        record(b"a", b"x", false),
        record(b"a", b"", true),
        record(b"b", b"", false),
        record(b"", b"y", false),
    ];
    produce(&client, &topic, sent).await.expect("produce");
    let got = consume(&client, consume_request(&topic, "tombstones", 4, false)).await;
    let seen: Vec<_> = got
        .iter()
        .map(|r| (r.null_key, r.key.as_slice(), r.null_value, r.value.as_slice()))
        .collect();
    assert_eq!(
        seen,
        [
            (false, &b"a"[..], false, &b"x"[..]),
            (false, &b"a"[..], true, &b""[..]),
            (false, &b"b"[..], false, &b""[..]),
            (true, &b""[..], false, &b"y"[..]),
        ]
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_for_a_partition_the_topic_lacks_is_refused_as_such() {
    let (server, client) = server("").await;
    let topic = unique("weir-a-partitions-");
    create_topic(&topic, 1).await;
    let record = pb::ProducerRecord {
        value: b"v".to_vec(),
        partition: Some(7),
        ..Default::default()
    };
    let err = produce(&client, &topic, vec![record])
        .await
        .expect_err("no partition 7");
    assert_eq!(err.code(), tonic::Code::NotFound, "{}", err.message());
    assert!(err.message().contains("partition not found"), "{}", err.message());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_resume_where_the_group_left_off() {
    let (server, client) = server("").await;
    let topic = unique("weir-a-commit-");
    create_topic(&topic, 1).await;
    produce(&client, &topic, (0..30).map(record).collect())
        .await
        .expect("produce");

    // Automatic commits: what was delivered is not delivered again.
    let (auto, manual) = (unique("auto-"), unique("manual-"));
    let first = consume(&client, consume_request(&topic, &auto, 10, false)).await;
    let second = consume(&client, consume_request(&topic, &auto, 10, false)).await;
    assert_eq!(first.last().map(|r| r.offset), Some(9));
    assert_eq!(
        second.first().map(|r| r.offset),
        Some(10),
        "resumed after the delivered records"
    );

    // Manual commits: nothing is committed until CommitOffsets says so.
    let seen = consume(&client, consume_request(&topic, &manual, 5, true)).await;
    assert_eq!(seen.last().map(|r| r.offset), Some(4));
    let again = consume(&client, consume_request(&topic, &manual, 5, true)).await;
    assert_eq!(again.first().map(|r| r.offset), Some(0), "nothing was committed");
    client
        .stream()
        .commit_offsets(pb::CommitOffsetsRequest {
            source: "events".into(),
            group: manual.clone(),
            offsets: vec![pb::PartitionOffset {
                topic: topic.clone(),
                partition: 0,
                offset: 5,
            }],
        })
        .await
        .expect("commit");
    let resumed = consume(&client, consume_request(&topic, &manual, 25, true)).await;
    let offsets: Vec<i64> = resumed.iter().map(|r| r.offset).collect();
    assert_eq!(offsets, (5..30).collect::<Vec<i64>>(), "nothing lost, nothing repeated");

    // Explicit offsets start exactly there.
    let mut from = consume_request(&topic, "explicit", 3, true);
    from.start = Some(pb::StartPosition {
        position: Some(pb::start_position::Position::Offsets(pb::PartitionOffsets {
            offsets: vec![pb::PartitionOffset {
                topic: topic.clone(),
                partition: 0,
                offset: 20,
            }],
        })),
    });
    let explicit = consume(&client, from).await;
    assert_eq!(explicit.iter().map(|r| r.offset).collect::<Vec<_>>(), [20, 21, 22]);
    server.stop().await;
}

/// A replay from explicit offsets or a time reads outside the group it
/// names, and in the default commit mode leaves the group's offsets where
/// its members left them: a group whose consumers are away for a deploy is
/// not moved past records they never processed. Asked for
/// (`COMMIT_MODE_AUTOMATIC`), the replay's offsets become the group's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_leaves_the_groups_offsets_unless_asked_to_commit() {
    let (server, client) = server("").await;
    let topic = unique("weir-a-replay-");
    create_topic(&topic, 1).await;
    produce(&client, &topic, (0..30).map(record).collect())
        .await
        .expect("produce");
    let group = unique("billing-");
    let processed = consume(&client, consume_request(&topic, &group, 10, false)).await;
    assert_eq!(processed.last().map(|r| r.offset), Some(9));

    let replay = |start: pb::start_position::Position, mode: pb::CommitMode| {
        let mut request = consume_request(&topic, &group, 5, false);
        request.start = Some(pb::StartPosition { position: Some(start) });
        request.commit_mode = mode as i32;
        request
    };
    let from_20 = || {
        pb::start_position::Position::Offsets(pb::PartitionOffsets {
            offsets: vec![pb::PartitionOffset {
                topic: topic.clone(),
                partition: 0,
                offset: 20,
            }],
        })
    };
    let replayed = consume(&client, replay(from_20(), pb::CommitMode::Unspecified)).await;
    assert_eq!(
        replayed.iter().map(|r| r.offset).collect::<Vec<_>>(),
        (20..25).collect::<Vec<_>>()
    );
    let since_1970 = pb::start_position::Position::Timestamp(prost_types::Timestamp { seconds: 0, nanos: 0 });
    let timed = consume(&client, replay(since_1970, pb::CommitMode::Unspecified)).await;
    assert_eq!(timed.first().map(|r| r.offset), Some(0));
    let resumed = consume(&client, consume_request(&topic, &group, 1, false)).await;
    assert_eq!(resumed[0].offset, 10, "the group resumes where its members left off");

    // Asked for, a replay commits: the group resumes after it. (The broker
    // takes a commit from outside the group only once its last member has
    // left, which a stream's end does not wait for: tried again a few times.)
    let mut moved = 0;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        consume(&client, replay(from_20(), pb::CommitMode::Automatic)).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        moved = consume(&client, consume_request(&topic, &group, 1, true)).await[0].offset;
        if moved == 25 {
            break;
        }
    }
    assert_eq!(moved, 25, "the replay's offsets are the group's");

    // Kafka reads negative times as "latest" or "earliest": refused.
    let before_1970 = pb::start_position::Position::Timestamp(prost_types::Timestamp { seconds: -1, nanos: 0 });
    let err = client
        .stream()
        .consume(replay(before_1970, pb::CommitMode::Unspecified))
        .await
        .expect_err("a time before 1970");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("1970"), "{}", err.message());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_see_only_their_topics_and_groups() {
    let (server, a) = server("").await;
    let b = server.client("key-kb").await;
    let theirs = unique("weir-b-private-");
    create_topic(&theirs, 1).await;
    produce(&b, &theirs, (0..3).map(record).collect())
        .await
        .expect("b produces");
    // Tenant a cannot produce to, consume from or commit on b's topic: it does not exist for a.
    let err = produce(&a, &theirs, vec![record(0)]).await.expect_err("not a's topic");
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(reason(&err), "TOPIC_NOT_FOUND");
    let err = a
        .stream()
        .consume(consume_request(&theirs, "g", 1, false))
        .await
        .expect_err("not a's topic");
    assert_eq!(err.code(), Code::NotFound);

    // The same group name in two tenants is two groups: what tenant a's
    // group committed does not move tenant c's.
    let c = server.client("key-kc").await;
    let shared = unique("weir-a-shared-");
    create_topic(&shared, 1).await;
    produce(&a, &shared, (0..4).map(record).collect())
        .await
        .expect("produce");
    let same = unique("same-");
    let first = consume(&a, consume_request(&shared, &same, 4, false)).await;
    assert_eq!(first.len(), 4);
    let other = consume(&c, consume_request(&shared, &same, 4, false)).await;
    assert_eq!(
        other.first().map(|r| r.offset),
        Some(0),
        "c's group starts from the beginning"
    );
    produce(&a, &shared, vec![record(4)]).await.expect("produce");
    let resumed = consume(&a, consume_request(&shared, &same, 1, false)).await;
    assert_eq!(resumed[0].offset, 4, "a's group resumed after its own commit");
    server.stop().await;
}

/// The producer's own limit (librdkafka's `message.max.bytes`, 1,000,000
/// by default, less its framing) is checked with the tenant's larger
/// `max_record_bytes` (1 MiB): a record between the two is refused whole
/// before anything is sent, not failed by librdkafka with every record
/// after it; the largest it takes goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_past_what_the_producer_sends_are_refused_before_any_is_sent() {
    let (server, client) = server("").await;
    let topic = unique("weir-a-framed-");
    create_topic(&topic, 1).await;
    let sized = |bytes: usize| pb::ProducerRecord {
        value: vec![b'x'; bytes],
        ..Default::default()
    };
    let err = produce(&client, &topic, vec![record(0), sized(999_965)])
        .await
        .expect_err("past what the producer sends");
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::InvalidArgument, "RECORD_TOO_LARGE"),
        "{err:?}"
    );
    assert!(
        err.message().contains("record 1") && err.message().contains("999964"),
        "{err:?}"
    );
    let acks = produce(&client, &topic, vec![record(0), sized(999_964)])
        .await
        .expect("the largest record the producer sends");
    assert_eq!(acks.acks.len(), 2);
    let got = consume(&client, consume_request(&topic, &unique("framed-"), 2, false)).await;
    assert_eq!(
        got.iter().map(|r| r.offset).collect::<Vec<_>>(),
        [0, 1],
        "nothing of the refused call was sent"
    );
    assert_eq!(got[1].value.len(), 999_964);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_and_wrong_kinds_of_source_are_refused() {
    let (server, client) = server("max_record_bytes = 100\nmax_concurrent_consumers = 1").await;
    let topic = unique("weir-a-limits-");
    create_topic(&topic, 1).await;
    let big = pb::ProducerRecord {
        value: vec![b'x'; 200],
        ..Default::default()
    };
    let err = produce(&client, &topic, vec![record(0), big])
        .await
        .expect_err("too large");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(reason(&err), "RECORD_TOO_LARGE");
    assert!(err.message().contains("record 1"), "{}", err.message());

    // librdkafka reads a zero timestamp as "now" and a negative partition as
    // "let the partitioner choose": both would be stored otherwise than asked.
    for (bad, says) in [
        (
            pb::ProducerRecord {
                partition: Some(-1),
                ..record(0)
            },
            "partitions are never negative",
        ),
        (
            pb::ProducerRecord {
                timestamp: Some(prost_types::Timestamp { seconds: 0, nanos: 0 }),
                ..record(0)
            },
            "1 ms after 1970",
        ),
    ] {
        let err = produce(&client, &topic, vec![record(0), bad]).await.expect_err(says);
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(
            err.message().contains(says) && err.message().contains("record 1"),
            "{err:?}"
        );
    }

    let open = client
        .stream()
        .consume(consume_request(&topic, "one", 0, false))
        .await
        .expect("first consumer");
    let err = client
        .stream()
        .consume(consume_request(&topic, "two", 0, false))
        .await
        .expect_err("second consumer");
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(reason(&err), "CONSUMER_CONCURRENCY_LIMITED");
    drop(open);

    let err = client
        .execute("events", "SELECT 1", vec![])
        .await
        .expect_err("SQL on Kafka");
    assert_eq!(err.code(), Code::FailedPrecondition);
    let mut stream = client.stream();
    let err = stream
        .produce(pb::ProduceRequest {
            source: "demo".into(),
            topic: "t".into(),
            records: vec![record(0)],
            options: None,
        })
        .await
        .expect_err("Kafka on SQL");
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = stream
        .consume(consume_request(&topic, "bad group!", 1, false))
        .await
        .expect_err("bad group name");
    assert_eq!(err.code(), Code::InvalidArgument);
    // Each topic costs the broker a lookup: a bounded list, each named once.
    for (topics, says) in [
        (vec![topic.clone(); 2], "named twice"),
        (vec![topic.clone(); 101], "at most 100"),
    ] {
        let err = stream
            .consume(pb::ConsumeRequest {
                topics,
                ..consume_request(&topic, "many", 1, false)
            })
            .await
            .expect_err(says);
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains(says), "{}", err.message());
    }
    // So does each partition a start names (librdkafka searches them one
    // by one): a bounded list, each named once.
    let partition = |partition: i32| pb::PartitionOffset {
        topic: topic.clone(),
        partition,
        offset: 0,
    };
    for (offsets, says) in [
        (vec![partition(0), partition(0)], "named twice"),
        ((0..10_001).map(partition).collect(), "at most 10000"),
    ] {
        let mut from = consume_request(&topic, "many", 1, false);
        from.start = Some(pb::StartPosition {
            position: Some(pb::start_position::Position::Offsets(pb::PartitionOffsets { offsets })),
        });
        let err = stream.consume(from).await.expect_err(says);
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains(says), "{}", err.message());
    }
    // librdkafka would take an empty assignment and wait for ever.
    let mut from = consume_request(&topic, "none", 1, false);
    from.start = Some(pb::StartPosition {
        position: Some(pb::start_position::Position::Offsets(pb::PartitionOffsets::default())),
    });
    let err = tokio::time::timeout(Duration::from_secs(10), stream.consume(from))
        .await
        .expect("answered at once")
        .expect_err("no partitions");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("at least one"), "{}", err.message());
    // A name under the allowed prefix that is no Kafka topic name: a NUL
    // would reach rdkafka's bindings, which panic on it.
    for name in [format!("{topic}\0x"), format!("{topic} x"), format!("{topic}/x")] {
        let err = produce(&client, &name, vec![record(0)]).await.expect_err("produce");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        let err = stream
            .consume(pb::ConsumeRequest {
                topics: vec![name.clone()],
                ..consume_request(&topic, "named", 1, false)
            })
            .await
            .expect_err("consume");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        let err = stream
            .commit_offsets(pb::CommitOffsetsRequest {
                source: "events".into(),
                group: "named".into(),
                offsets: vec![pb::PartitionOffset {
                    topic: name.clone(),
                    partition: 0,
                    offset: 1,
                }],
            })
            .await
            .expect_err("commit");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    }
    server.stop().await;
}

/// A produce whose turn at the record rate comes after its deadline is
/// answered before the deadline, with why, and produces nothing: it is not
/// cut by the client's timer with a bare CANCELLED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_produce_throttled_past_its_deadline_says_so() {
    let (server, client) = server("stream_records_per_second = 100").await;
    let topic = unique("weir-a-throttled-deadline-");
    create_topic(&topic, 1).await;
    let mut request = tonic::Request::new(pb::ProduceRequest {
        source: "events".into(),
        topic: topic.clone(),
        records: (0..500).map(record).collect(),
        options: None,
    });
    request.set_timeout(Duration::from_secs(2));
    let started = std::time::Instant::now();
    let err = client.stream().produce(request).await.expect_err("past its deadline");
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (tonic::Code::DeadlineExceeded, "THROTTLED_PAST_DEADLINE"),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    // Nothing of it was produced: the next record is the topic's first.
    let acks = produce(&client, &topic, vec![record(0)])
        .await
        .expect("one record")
        .acks;
    assert_eq!(acks[0].offset, 0, "nothing was produced before");
    server.stop().await;
}

/// Over `stream_records_per_second` a caller is slowed, not refused, and
/// told so: `throttled` in the produce answer and, growing, on the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_stream_says_so() {
    let (server, client) = server("stream_records_per_second = 100").await;
    let topic = unique("weir-a-throttle-");
    create_topic(&topic, 1).await;
    let as_duration = |d: Option<prost_types::Duration>| {
        let d = d.expect("throttled is always set");
        Duration::new(d.seconds as u64, d.nanos as u32)
    };
    // The first 100 records are the bucket's burst.
    let started = std::time::Instant::now();
    let first = produce(&client, &topic, (0..100).map(record).collect())
        .await
        .expect("within the burst");
    let first_took = started.elapsed();
    assert_eq!(as_duration(first.throttled), Duration::ZERO);
    // A produce that could never run (an unknown priority) is told so at
    // once, not after waiting out the emptied bucket, and costs nothing.
    let asked = std::time::Instant::now();
    let err = client
        .stream()
        .produce(pb::ProduceRequest {
            source: "events".into(),
            topic: topic.clone(),
            records: (0..100).map(record).collect(),
            options: common::unknown_priority(),
        })
        .await
        .expect_err("an unknown priority");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(asked.elapsed() < Duration::from_millis(500), "{:?}", asked.elapsed());
    // 100 more wait for what is left of the second the bucket takes to
    // refill: all of it but the time the first produce took (a slow broker
    // on a loaded machine can take most of it).
    let second = produce(&client, &topic, (100..200).map(record).collect())
        .await
        .expect("slowed, not refused");
    assert_eq!(second.acks.len(), 100);
    assert!(
        as_duration(second.throttled) + first_took >= Duration::from_millis(800),
        "{:?} after a first produce of {first_took:?}",
        second.throttled
    );
    // Reading them back costs from the same budget, and the stream reports it.
    let mut stream = client
        .stream()
        .consume(consume_request(&topic, &unique("slow-"), 200, false))
        .await
        .expect("consume")
        .into_inner();
    let (mut read, mut last) = (0, Duration::ZERO);
    while let Some(batch) = tokio::time::timeout(Duration::from_secs(60), stream.message())
        .await
        .expect("records within a minute")
        .expect("consume stream")
    {
        read += batch.records.len();
        let so_far = as_duration(batch.throttled);
        assert!(so_far >= last, "a running total");
        last = so_far;
    }
    assert_eq!(read, 200);
    assert!(
        last >= Duration::from_millis(500),
        "the consumer was slowed too: {last:?}"
    );
    server.stop().await;
}

/// A consumer waiting out its tenant's record rate (here 1 record/s, a
/// batch of 50 records) still sees its client leave: its slot is free again
/// at once, not after the wait.
#[tokio::test]
async fn a_throttled_consumer_whose_client_leaves_frees_its_slot_at_once() {
    let (server, client) = server("stream_records_per_second = 1\nmax_concurrent_consumers = 1").await;
    let topic = unique("weir-a-throttled-leave-");
    create_topic(&topic, 1).await;
    // Tenant kc shares the topics, without a rate.
    let producer = server.client("key-kc").await;
    produce(&producer, &topic, vec![record(0)]).await.expect("produce");
    let mut first = open_consume(&client, consume_request(&topic, &unique("leaves-"), 0, false)).await;
    // The first record is the bucket's burst; once it is read the consumer
    // has its partition, and the next 50 records wait about 50 s.
    assert_eq!(read_offsets(&mut first, 1).await, [0]);
    produce(&producer, &topic, (1..51).map(record).collect())
        .await
        .expect("produce");
    let waiting = tokio::time::timeout(Duration::from_secs(2), first.message()).await;
    assert!(waiting.is_err(), "the batch waits for the rate");
    drop(first);
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        match client
            .stream()
            .consume(consume_request(&topic, &unique("next-"), 1, false))
            .await
        {
            Ok(_) => break,
            Err(e) if reason(&e) == "CONSUMER_CONCURRENCY_LIMITED" && std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("the first consumer's slot is still held: {e:?}"),
        }
    }
    server.stop().await;
}

/// A tenant's Produce calls waiting out its record rate hold no gateway
/// slot meanwhile: another tenant's call still runs at once.
#[tokio::test]
async fn produces_waiting_out_their_rate_leave_the_gateway_to_others() {
    let (server, client) = server_with(
        "[server]\nmax_concurrent_requests = 2\nmax_queue_wait = \"1s\"\n",
        "stream_records_per_second = 10",
    )
    .await;
    let topic = unique("weir-a-throttled-gate-");
    create_topic(&topic, 1).await;
    // The burst first, then two calls that each wait about 5 s for their turn.
    produce(&client, &topic, (0..10).map(record).collect())
        .await
        .expect("within the burst");
    let waiting: Vec<_> = (0..2)
        .map(|_| {
            let (client, topic) = (client.clone(), topic.clone());
            tokio::spawn(async move { produce(&client, &topic, (0..50).map(record).collect()).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let other = server.client("key-kb").await;
    let other_topic = unique("weir-b-gate-");
    create_topic(&other_topic, 1).await;
    // Refused with GATEWAY_SATURATED after max_queue_wait when the throttled calls hold the slots.
    produce(&other, &other_topic, vec![record(0)])
        .await
        .expect("another tenant's call is not held up by a throttled one");
    for call in waiting {
        let acks = call.await.expect("task").expect("slowed, not refused");
        assert_eq!(acks.acks.len(), 50);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_producer_queue_delays_records_without_losing_or_reordering_them() {
    // librdkafka's queue holds 3 records here: a call of 300 waits for room again and again.
    let source = kafka("kq", "events", "weir-q-") + "\"queue.buffering.max.messages\" = \"3\"\n";
    let server = TestServer::start(&tenant("kq", "", &source)).await;
    let client = server.client("key-kq").await;
    let topic = unique("weir-q-full-");
    create_topic(&topic, 1).await;
    let sent: Vec<_> = (0..300).map(record).collect();
    let acks = produce(&client, &topic, sent.clone()).await.expect("produce").acks;
    let offsets: Vec<i64> = acks.iter().map(|a| a.offset).collect();
    assert_eq!(
        offsets,
        (0..300).collect::<Vec<i64>>(),
        "every record, in request order"
    );
    let got = consume(&client, consume_request(&topic, "full", 300, false)).await;
    let values: Vec<&Vec<u8>> = got.iter().map(|g| &g.value).collect();
    assert_eq!(values, sent.iter().map(|s| &s.value).collect::<Vec<_>>());
    server.stop().await;
}

/// A source's own `message.max.bytes` (in `kafka_options`, below the
/// tenant's max_record_bytes here) is the limit records are checked
/// against: a larger one fails the call before any record is sent, where
/// librdkafka would have refused it part way, after the records before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sources_message_max_bytes_limits_its_records() {
    let source = kafka("kt", "events", "weir-t-") + "\"message.max.bytes\" = \"100000\"\n";
    let server = TestServer::start(&tenant("kt", "", &source)).await;
    let client = server.client("key-kt").await;
    let topic = unique("weir-t-order-");
    create_topic(&topic, 1).await;
    let mut records: Vec<_> = (0..3).map(record).collect();
    records[1].value = vec![b'x'; 200_000];
    let err = produce(&client, &topic, records)
        .await
        .expect_err("the large record is refused");
    assert_eq!(
        (
            err.code(),
            reason(&err).as_str(),
            error_metadata(&err, "limit").as_str()
        ),
        (Code::InvalidArgument, "RECORD_TOO_LARGE", "99964"),
        "{err:?}"
    );
    let acks = produce(&client, &topic, (0..3).map(record).collect())
        .await
        .expect("records within the limit");
    assert_eq!(
        acks.acks.iter().map(|a| a.offset).collect::<Vec<_>>(),
        [0, 1, 2],
        "nothing of the refused call was written"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_that_find_no_room_in_the_producer_queue_fail_as_unavailable() {
    // Room for one record, which is held 7 s before it is sent: the second
    // waits its 5 s for room in vain, and the third is not queued after it.
    let source =
        kafka("kw", "events", "weir-w-") + "\"queue.buffering.max.messages\" = \"1\"\n\"linger.ms\" = \"7000\"\n";
    let server = TestServer::start(&tenant("kw", "", &source)).await;
    let client = server.client("key-kw").await;
    let topic = unique("weir-w-full-");
    create_topic(&topic, 1).await;
    let started = std::time::Instant::now();
    let err = produce(&client, &topic, (0..3).map(record).collect())
        .await
        .expect_err("no room for the second record");
    assert_eq!(err.code(), Code::Unavailable, "a transient overload: {}", err.message());
    assert!(err.message().contains("queue stayed full"), "{}", err.message());
    assert_eq!(error_metadata(&err, "acknowledged_records"), "0");
    assert_eq!(error_metadata(&err, "failed_records"), "1,2");
    assert!(started.elapsed() >= Duration::from_secs(5), "{:?}", started.elapsed());
    // The acknowledged record is there once; the failed ones can be sent again.
    let got = consume(&client, consume_request(&topic, "w", 1, false)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].value, record(0).value);
    server.stop().await;
}

#[tokio::test]
async fn an_unreachable_broker_is_unavailable() {
    let config = tenant(
        "kz",
        "",
        "[tenants.kz.sources.events]\nengine = \"kafka\"\nbootstrap_servers = \"127.0.0.1:1\"\ntopics = [\"t\"]\n\
         [tenants.kz.sources.events.kafka_options]\n\"message.timeout.ms\" = \"1500\"\n",
    );
    let server = TestServer::start(&config).await;
    let client = server.client("key-kz").await;
    let err = produce(&client, "t", vec![record(0)]).await.expect_err("no broker");
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(
        !err.message().contains("127.0.0.1"),
        "no addresses in errors: {}",
        err.message()
    );
    server.stop().await;
}

type Mock = rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>;

/// A mock cluster of one broker holding `topic` (with `partitions`), and a
/// server whose Kafka source it is, with `more_options` for librdkafka
/// (`"name" = "value"` lines).
async fn mock_topic(
    topic: &str,
    partitions: i32,
    message_timeout_ms: u32,
    more_options: &str,
) -> (Mock, TestServer, WeirClient) {
    let cluster = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
    cluster.create_topic(topic, partitions, 1).expect("topic");
    let (server, client) = mock_server(&cluster, topic, message_timeout_ms, more_options).await;
    (cluster, server, client)
}

/// The producer's `message.timeout.ms` for mock clusters, unless a test says otherwise.
const MOCK_MESSAGE_TIMEOUT_MS: u32 = 30_000;

/// A server whose Kafka source is librdkafka's in-process mock cluster.
async fn mock_server(
    cluster: &Mock,
    topic: &str,
    message_timeout_ms: u32,
    more_options: &str,
) -> (TestServer, WeirClient) {
    mock_server_with(cluster, topic, message_timeout_ms, more_options, "").await
}

/// The same, with `limits` for its tenant.
async fn mock_server_with(
    cluster: &Mock,
    topic: &str,
    message_timeout_ms: u32,
    more_options: &str,
    limits: &str,
) -> (TestServer, WeirClient) {
    let config = tenant(
        "km",
        limits,
        &format!(
            "[tenants.km.sources.events]\nengine = \"kafka\"\nbootstrap_servers = \"{}\"\ntopics = [\"{topic}\"]\n\
             [tenants.km.sources.events.kafka_options]\n\"session.timeout.ms\" = \"6000\"\n\
             \"message.timeout.ms\" = \"{message_timeout_ms}\"\n{more_options}",
            cluster.bootstrap_servers()
        ),
    );
    let server = TestServer::start(&config).await;
    let client = server.client("key-km").await;
    (server, client)
}

/// CommitOffsets for a group goes through a member of the group, not
/// through a consumer of the same group name given explicit partitions
/// (which has no generation, so the broker would refuse its commit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_offsets_goes_through_a_member_of_the_group() {
    let (server, client) = server("").await;
    let topic = unique("weir-a-commit-member-");
    create_topic(&topic, 1).await;
    produce(&client, &topic, (0..10).map(record).collect())
        .await
        .expect("produce");
    let group = unique("member-");
    let mut explicit = consume_request(&topic, &group, 0, true);
    explicit.start = Some(pb::StartPosition {
        position: Some(pb::start_position::Position::Offsets(pb::PartitionOffsets {
            offsets: vec![pb::PartitionOffset {
                topic: topic.clone(),
                partition: 0,
                offset: 0,
            }],
        })),
    });
    let mut assigned = open_consume(&client, explicit).await;
    assert_eq!(read_offsets(&mut assigned, 1).await[0], 0);
    let mut member = open_consume(&client, consume_request(&topic, &group, 0, true)).await;
    read_offsets(&mut member, 1).await;
    let commit = pb::CommitOffsetsRequest {
        source: "events".into(),
        group: group.clone(),
        offsets: vec![pb::PartitionOffset {
            topic: topic.clone(),
            partition: 0,
            offset: 4,
        }],
    };
    client
        .stream()
        .commit_offsets(commit)
        .await
        .expect("committed through the group's member");
    drop((assigned, member));
    let resumed = consume(&client, consume_request(&topic, &group, 1, true)).await;
    assert_eq!(resumed[0].offset, 4, "the group resumes at the committed offset");
    server.stop().await;
}

/// A client that reads nothing for longer than `max.poll.interval.ms` (the
/// consumer stops polling while the stream's buffers are full) makes its
/// member leave the group; the stream rejoins and reads on instead of
/// ending with an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_slower_than_the_poll_interval_reads_on() {
    let config = tenant(
        "ka",
        "",
        &format!(
            "[tenants.ka.sources.events]\nengine = \"kafka\"\nbootstrap_servers = \"{}\"\ntopic_prefix = \"weir-a-\"\n\
             [tenants.ka.sources.events.kafka_options]\n\"session.timeout.ms\" = \"2000\"\n\
             \"heartbeat.interval.ms\" = \"500\"\n\"max.poll.interval.ms\" = \"2000\"\n",
            kafka_bootstrap()
        ),
    );
    let server = TestServer::start(&config).await;
    let client = server.client("key-ka").await;
    let topic = unique("weir-a-slow-reader-");
    create_topic(&topic, 1).await;
    // 16 MiB: more than the stream's buffers and HTTP/2 windows hold, so
    // the consumer stops polling while the client reads nothing.
    for chunk in 0..16 {
        let records = (0..4)
            .map(|i| pb::ProducerRecord {
                value: vec![b'a' + (chunk * 4 + i) as u8 % 26; 256 * 1024],
                ..Default::default()
            })
            .collect();
        produce(&client, &topic, records).await.expect("produce");
    }
    let mut stream = open_consume(&client, consume_request(&topic, &unique("slow-"), 0, false)).await;
    let first = read_offsets(&mut stream, 1).await;
    // Nothing read for well past max.poll.interval.ms.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let later = read_offsets(&mut stream, 60).await;
    assert!(
        later.iter().max() > first.iter().max(),
        "the stream reads on: {:?}..{:?}",
        later.first(),
        later.last()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_shares_partitions_between_its_consumers() {
    let (server, client) = server("").await;
    let topic = unique("weir-a-shared-group-");
    create_topic(&topic, 2).await;
    // A group of its own per run: a broker kept running between runs still knows the old members.
    let group = unique("sharing-");
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let mut streams = Vec::new();
    for consumer in 0..2 {
        let mut stream = client
            .stream()
            .consume(consume_request(&topic, &group, 0, false))
            .await
            .expect("consume")
            .into_inner();
        let tx = tx.clone();
        streams.push(tokio::spawn(async move {
            while let Ok(Some(batch)) = stream.message().await {
                for r in batch.records {
                    let _ = tx.send((consumer, r.partition, r.offset)).await;
                }
            }
        }));
    }
    // Both members join and the group settles before anything is produced.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let records: Vec<_> = (0..20)
        .map(|i| pb::ProducerRecord {
            partition: Some((i % 2) as i32),
            ..record(i)
        })
        .collect();
    produce(&client, &topic, records).await.expect("produce");
    let mut seen = Vec::new();
    while seen.len() < 20 {
        let got = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await;
        let Ok(Some(next)) = got else {
            panic!("only {} of 20 records arrived: {seen:?}", seen.len());
        };
        seen.push(next);
    }
    // The newer member leaves; a commit for the group still goes through
    // the member left here, not as an outsider the broker refuses.
    streams[1].abort();
    tokio::time::sleep(Duration::from_secs(8)).await;
    client
        .stream()
        .commit_offsets(pb::CommitOffsetsRequest {
            source: "events".into(),
            group: group.clone(),
            offsets: (0..2)
                .map(|partition| pb::PartitionOffset {
                    topic: topic.clone(),
                    partition,
                    offset: 10,
                })
                .collect(),
        })
        .await
        .expect("a commit through the member still consuming");
    streams[0].abort();
    let mut delivered: Vec<(i32, i64)> = seen.iter().map(|(_, p, o)| (*p, *o)).collect();
    delivered.sort();
    let expected: Vec<(i32, i64)> = (0..2).flat_map(|p| (0..10).map(move |o| (p, o))).collect();
    assert_eq!(delivered, expected, "every record once");
    for consumer in 0..2 {
        let partitions: std::collections::BTreeSet<i32> = seen
            .iter()
            .filter(|(c, _, _)| *c == consumer)
            .map(|(_, p, _)| *p)
            .collect();
        assert_eq!(partitions.len(), 1, "consumer {consumer} owns one partition: {seen:?}");
    }
    server.stop().await;
}

/// Closing a consumer (leaving its group, sending its last commits) waits
/// for the broker. When the broker is gone, that wait must not hold up the
/// gateway's other calls: here one runtime thread serves the server, as
/// with `server.worker_threads = 1` (a close on that thread would hang
/// this test: nothing else could run).
#[test]
fn a_consumer_closing_against_a_lost_broker_holds_up_no_other_call() {
    // Made first, dropped last: the consumer's close goes on after the test.
    let cluster = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
    cluster.create_topic("lost", 1, 1).expect("topic");
    // As the gateway's process does: the close gets a bounded time to finish.
    on_own_runtime(1, async {
        let (server, client) = mock_server(&cluster, "lost", MOCK_MESSAGE_TIMEOUT_MS, "").await;
        produce(&client, "lost", (0..3).map(record).collect())
            .await
            .expect("produce");
        let mut stream = open_consume(&client, consume_request("lost", "closers", 0, false)).await;
        read_offsets(&mut stream, 3).await;
        cluster.broker_down(1).expect("broker down");
        let left = std::time::Instant::now();
        // The client leaves; the server ends its side and lets go of the consumer.
        drop(stream);
        tokio::time::sleep(Duration::from_millis(300)).await;
        client.list_sources().await.expect("another call");
        let waited = left.elapsed();
        assert!(
            waited < Duration::from_secs(3),
            "a call waited {waited:?} behind the consumer's close"
        );
        cluster.broker_up(1).expect("broker up");
        server.stop().await;
    });
}

/// A CommitOffsets of partition 0 of `topic` for `group`, on source `events`.
fn commit_request(topic: &str, group: &str, offset: i64) -> pb::CommitOffsetsRequest {
    pb::CommitOffsetsRequest {
        source: "events".into(),
        group: group.into(),
        offsets: vec![pb::PartitionOffset {
            topic: topic.into(),
            partition: 0,
            offset,
        }],
    }
}

/// Only commits whose callers gave up on them count against the source's
/// few waiting commits: many at once on a healthy cluster all go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_commits_at_once_on_a_healthy_cluster_all_go_through() {
    let (_cluster, server, client) = mock_topic("many-commits", 1, MOCK_MESSAGE_TIMEOUT_MS, "").await;
    let commits = (0..12).map(|i| {
        let client = client.clone();
        async move {
            client
                .stream()
                .commit_offsets(commit_request("many-commits", &format!("group-{i}"), i))
                .await
        }
    });
    for (i, outcome) in futures::future::join_all(commits).await.into_iter().enumerate() {
        outcome.unwrap_or_else(|e| panic!("commit {i}: {e:?}"));
    }
    server.stop().await;
}

/// A stream's last commit is tried again while the coordinator may come
/// back, but not when the group refuses it for good: the stream then ends
/// at once instead of after the whole wait for a last commit (5 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_last_commit_refused_for_good_does_not_hold_the_end_of_the_stream() {
    use rdkafka::types::RDKafkaRespErr as E;
    let (cluster, server, client) = mock_topic("unauthorized", 1, MOCK_MESSAGE_TIMEOUT_MS, "").await;
    produce(&client, "unauthorized", (0..3).map(record).collect())
        .await
        .expect("produce");
    // Every commit of the stream is refused (more than the wait could try).
    cluster.request_errors(
        rdkafka::types::RDKafkaApiKey::OffsetCommit,
        &[E::RD_KAFKA_RESP_ERR_GROUP_AUTHORIZATION_FAILED; 100],
    );
    let mut stream = open_consume(&client, consume_request("unauthorized", "refused", 3, false)).await;
    read_offsets(&mut stream, 3).await;
    let last = std::time::Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .expect("the stream ends");
    assert!(matches!(end, Ok(None)), "{end:?}");
    assert!(last.elapsed() < Duration::from_secs(3), "{:?}", last.elapsed());
    server.stop().await;
}

/// A CommitOffsets the cluster does not confirm (librdkafka's synchronous
/// commit waits for a coordinator without end) is answered within the
/// tenant's statement timeout, as UNAVAILABLE, instead of holding the call
/// for as long as the broker is gone.
#[test]
fn a_commit_the_cluster_does_not_confirm_is_answered_in_time() {
    let cluster = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
    cluster.create_topic("unconfirmed", 1, 1).expect("topic");
    // The commit's thread may still wait in librdkafka, as the gateway's would.
    on_own_runtime(2, async {
        let (server, client) = mock_server_with(
            &cluster,
            "unconfirmed",
            MOCK_MESSAGE_TIMEOUT_MS,
            "",
            "statement_timeout = \"1s\"",
        )
        .await;
        cluster.broker_down(1).expect("broker down");
        let commit = || {
            let client = client.clone();
            async move {
                let started = std::time::Instant::now();
                let err = client
                    .stream()
                    .commit_offsets(commit_request("unconfirmed", "unconfirmed", 1))
                    .await
                    .expect_err("no broker");
                assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
                assert_eq!(err.code(), Code::Unavailable, "{err:?}");
                (err, started.elapsed())
            }
        };
        let (first, _) = commit().await;
        assert!(first.message().contains("did not confirm"), "{first:?}");
        // Each answered one still waits in librdkafka, on a blocking
        // thread: past 4 of them, the next is refused at once.
        for _ in 0..3 {
            commit().await;
        }
        let (refused, took) = commit().await;
        assert!(refused.message().contains("still waiting"), "{refused:?}");
        assert!(took < Duration::from_millis(500), "{took:?}");
        cluster.broker_up(1).expect("broker up");
        // The waiting commits go through once the broker is back, and the
        // source takes commits again.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while let Err(e) = client
            .stream()
            .commit_offsets(commit_request("unconfirmed", "unconfirmed", 1))
            .await
        {
            assert!(std::time::Instant::now() < deadline, "commits stay refused: {e:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        server.stop().await;
    });
}

/// (On its own runtime: a consumer's last synchronous commit after the
/// restart can wait in librdkafka without end.)
#[test]
fn a_consumer_rides_out_a_broker_restart() {
    on_own_runtime(2, rides_out_a_broker_restart());
}

/// Runs `test` on a runtime of its own with `threads` workers, whose end is
/// bounded (10 s) as the gateway's shutdown is: a consumer's close or a
/// commit can wait in librdkafka without end, and a `#[tokio::test]`
/// runtime would wait for it.
fn on_own_runtime(threads: usize, test: impl std::future::Future<Output = ()>) {
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(threads);
        builder
    };
    let runtime = builder.enable_all().build().expect("runtime");
    runtime.block_on(test);
    runtime.shutdown_timeout(Duration::from_secs(10));
}

async fn rides_out_a_broker_restart() {
    let (cluster, server, client) = mock_topic("outage", 1, MOCK_MESSAGE_TIMEOUT_MS, "").await;
    produce(&client, "outage", (0..5).map(record).collect())
        .await
        .expect("produce");
    let mut stream = open_consume(&client, consume_request("outage", "riders", 10, false)).await;
    let mut offsets = read_offsets(&mut stream, 5).await;
    cluster.broker_down(1).expect("broker down");
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.broker_up(1).expect("broker up");
    produce(&client, "outage", (5..10).map(record).collect())
        .await
        .expect("produce after the outage");
    // The same stream goes on: librdkafka's connection errors meanwhile do not end it.
    offsets.extend(read_offsets(&mut stream, 5).await);
    assert_eq!(offsets, (0..10).collect::<Vec<i64>>(), "nothing lost, nothing repeated");
    server.stop().await;
}

/// A first record produced to `topic` at the mock broker's own pace, then
/// its answers slowed to 4 s, and the request for `records` to send next.
async fn slowed_produce(
    cluster: &Mock,
    client: &WeirClient,
    topic: &str,
    records: std::ops::Range<usize>,
) -> tonic::Request<pb::ProduceRequest> {
    produce(client, topic, vec![record(0)]).await.expect("a first record");
    cluster
        .broker_round_trip_time(1, Duration::from_secs(4))
        .expect("slow answers");
    tonic::Request::new(pb::ProduceRequest {
        source: "events".into(),
        topic: topic.into(),
        records: records.map(record).collect(),
        options: None,
    })
}

/// The broker's answer to a second record slowed past what the call waits
/// for (`message.timeout.ms`, or the call's own `deadline`): the call fails
/// with `code` and lists the record as unknown, not failed, since it may
/// have been written; here it was (the answer was slow, not the write).
async fn a_slow_answer_leaves_its_record_unknown(
    topic: &str,
    message_timeout_ms: u32,
    deadline: Option<Duration>,
    code: Code,
) {
    let (cluster, server, client) = mock_topic(topic, 1, message_timeout_ms, "").await;
    let mut request = slowed_produce(&cluster, &client, topic, 1..2).await;
    if let Some(deadline) = deadline {
        request.set_timeout(deadline);
    }
    let err = client.stream().produce(request).await.expect_err("no answer in time");
    assert_eq!(err.code(), code, "{err:?}");
    assert_eq!(
        (
            error_metadata(&err, "unknown_records"),
            error_metadata(&err, "failed_records")
        ),
        ("0".to_string(), String::new()),
        "{err:?}"
    );
    cluster.broker_round_trip_time(1, Duration::ZERO).expect("fast answers");
    let got = consume(&client, consume_request(topic, "slow-check", 2, false)).await;
    let offsets: Vec<i64> = got.iter().map(|r| r.offset).collect();
    assert_eq!(offsets, [0, 1], "the record reported unknown was written");
    server.stop().await;
}

/// A record whose broker answer does not come within `message.timeout.ms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_whose_answer_timed_out_is_unknown_not_failed() {
    a_slow_answer_leaves_its_record_unknown("slow", 2000, None, Code::Unavailable).await;
}

/// A Produce whose deadline passes before the broker answers says so itself,
/// in time, instead of being cut by the client's timer with no lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_produce_past_its_deadline_lists_its_unconfirmed_records() {
    a_slow_answer_leaves_its_record_unknown(
        "late",
        MOCK_MESSAGE_TIMEOUT_MS,
        Some(Duration::from_secs(2)),
        Code::DeadlineExceeded,
    )
    .await;
}

/// A Produce waiting for room in a full producer queue stops waiting at its
/// deadline too: the record queued is unknown, those never queued failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_produce_waiting_for_queue_room_answers_by_its_deadline() {
    let topic = "crowded";
    let (cluster, server, client) = mock_topic(
        topic,
        1,
        MOCK_MESSAGE_TIMEOUT_MS,
        "\"queue.buffering.max.messages\" = \"1\"\n",
    )
    .await;
    let mut request = slowed_produce(&cluster, &client, topic, 1..4).await;
    request.set_timeout(Duration::from_secs(2));
    let started = std::time::Instant::now();
    let err = client.stream().produce(request).await.expect_err("no room in time");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert_eq!(
        (
            error_metadata(&err, "unknown_records"),
            error_metadata(&err, "failed_records")
        ),
        ("0".to_string(), "1,2".to_string()),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    server.stop().await;
}

/// A topic the source's login may not describe is refused as such when a
/// stream starts at a time (it looks the topic's partitions up), not
/// reported as missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timestamp_start_on_a_topic_not_authorized_is_permission_denied() {
    use rdkafka::types::RDKafkaRespErr as E;
    let (cluster, server, client) = mock_topic("guarded", 1, MOCK_MESSAGE_TIMEOUT_MS, "").await;
    cluster
        .topic_error("guarded", E::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED)
        .expect("topic error");
    let mut request = consume_request("guarded", "timed", 1, true);
    request.start = Some(pb::StartPosition {
        position: Some(pb::start_position::Position::Timestamp(prost_types::Timestamp {
            seconds: 0,
            nanos: 0,
        })),
    });
    let err = client.stream().consume(request).await.expect_err("not authorized");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(engine_code(&err), "TopicAuthorizationFailed");
    server.stop().await;
}

/// A record the broker refuses as such (a tombstone without a key on a
/// compacted topic) is the caller's to fix: INVALID_ARGUMENT with the
/// broker's code, not INTERNAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_the_broker_refuses_are_invalid_arguments() {
    use rdkafka::types::RDKafkaRespErr as E;
    let (cluster, server, client) = mock_topic("refusing", 1, 2000, "").await;
    let produce_key = rdkafka::types::RDKafkaApiKey::Produce;
    cluster.request_errors(produce_key, &[E::RD_KAFKA_RESP_ERR_INVALID_RECORD]);
    let err = produce(&client, "refusing", vec![record(0)])
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(engine_code(&err), "InvalidRecord");
    produce(&client, "refusing", vec![record(1)])
        .await
        .expect("the next record goes");
    server.stop().await;
}

/// An idempotent producer that met a fatal error (here a sequence number
/// the broker did not expect) takes no more records; the source replaces
/// it, so the next Produce goes through instead of failing until a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_that_met_a_fatal_error_is_replaced() {
    use rdkafka::types::RDKafkaRespErr as E;
    let (cluster, server, client) = mock_topic("fatal", 1, 2000, "").await;
    let produce_key = rdkafka::types::RDKafkaApiKey::Produce;
    cluster.request_errors(produce_key, &[E::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER]);
    let err = produce(&client, "fatal", vec![record(0)]).await.expect_err("refused");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("fatal"), "{err:?}");
    // librdkafka counts an out-of-order sequence as possibly written.
    assert_eq!(
        (
            error_metadata(&err, "failed_records"),
            error_metadata(&err, "unknown_records")
        ),
        (String::new(), "0".to_string()),
        "{err:?}"
    );
    produce(&client, "fatal", vec![record(1)])
        .await
        .expect("a new producer takes the next record");
    server.stop().await;
}

/// Records for a topic that does not exist, on a cluster that does not
/// create topics on use, fail within seconds as not found and not written,
/// instead of timing out as possibly written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_for_a_topic_that_does_not_exist_are_not_found() {
    let source = kafka("kn", "events", "weir-n-") + "\"allow.auto.create.topics\" = \"false\"\n";
    let server = TestServer::start(&tenant("kn", "", &source)).await;
    let client = server.client("key-kn").await;
    let topic = unique("weir-n-missing-");
    let started = std::time::Instant::now();
    let err = produce(&client, &topic, (0..3).map(record).collect())
        .await
        .expect_err("no such topic");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert_eq!(
        (
            error_metadata(&err, "failed_records"),
            error_metadata(&err, "unknown_records")
        ),
        ("0-2".to_string(), String::new()),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(8), "{:?}", started.elapsed());
    server.stop().await;
}

/// A member that gave a partition away and got it back does not, at its
/// end, commit its old offset for it over what the other member committed
/// meanwhile: the group would read those records again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaving_member_does_not_rewind_what_another_member_committed() {
    let (_cluster, server, client) = mock_topic("shared", 2, MOCK_MESSAGE_TIMEOUT_MS, "").await;
    let to_both = |range: std::ops::Range<usize>| {
        range
            .flat_map(|i| {
                (0..2).map(move |partition| pb::ProducerRecord {
                    partition: Some(partition),
                    ..record(i)
                })
            })
            .collect::<Vec<_>>()
    };
    produce(&client, "shared", to_both(0..5)).await.expect("produce");
    let mut a = open_consume(&client, consume_request("shared", "rewind", 0, false)).await;
    read_offsets(&mut a, 10).await;
    // B joins: each member gets one partition, and each reads 5 more records.
    let mut b = open_consume(&client, consume_request("shared", "rewind", 0, false)).await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    produce(&client, "shared", to_both(5..10)).await.expect("produce");
    let (from_a, from_b) = tokio::join!(read_offsets(&mut a, 5), read_offsets(&mut b, 5));
    assert_eq!((from_a.len(), from_b.len()), (5, 5));
    // B leaves (committing 10 for its partition); A gets it back, then ends.
    drop(b);
    tokio::time::sleep(Duration::from_secs(8)).await;
    drop(a);
    tokio::time::sleep(Duration::from_secs(1)).await;
    produce(&client, "shared", to_both(10..11)).await.expect("produce");
    let next = consume(&client, consume_request("shared", "rewind", 2, false)).await;
    let offsets: Vec<(i32, i64)> = next.iter().map(|r| (r.partition, r.offset)).collect();
    assert!(
        offsets.iter().all(|(_, o)| *o == 10),
        "the group reads again from {offsets:?}"
    );
    server.stop().await;
}

/// A member whose client has stopped reading still answers its group's
/// rebalances (its partitions are paused, not left unpolled): a member that
/// joins meanwhile gets its share within seconds, instead of the whole group
/// standing still for up to the slow member's max.poll.interval.ms (5 min).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_client_reads_slowly_does_not_hold_its_group_still() {
    // librdkafka's mock cluster evicts a member that does not rejoin within
    // its session timeout; a broker waits for its rebalance timeout.
    let (server, client, topic, group) = ballast("slow").await;
    let mut slow = open_consume(&client, consume_request(&topic, &group, 0, false)).await;
    read_offsets(&mut slow, 1).await;
    // Its client reads no more: the buffers fill and its reader waits.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut joining = open_consume(&client, consume_request(&topic, &group, 0, false)).await;
    let got = tokio::time::timeout(Duration::from_secs(25), joining.message()).await;
    assert!(
        matches!(got, Ok(Ok(Some(_)))),
        "the joining member got nothing within 25 s: {got:?}"
    );
    // The slow client reads again (its partitions are resumed) while the
    // joining member has one of them, then that member leaves: the
    // partition it gave back was paused by the slow member before the
    // rebalance took it away, and is read to its end all the same.
    let reader = tokio::spawn(async move {
        let mut last = std::collections::HashMap::new();
        while let Ok(Ok(Some(batch))) = tokio::time::timeout(Duration::from_secs(40), slow.message()).await {
            for r in batch.records {
                let furthest = last.entry(r.partition).or_insert(r.offset);
                *furthest = r.offset.max(*furthest);
            }
            if last.len() == 2 && last.values().all(|&o| o == 1_499) {
                break;
            }
        }
        last
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    drop(joining);
    let last = reader.await.expect("reader");
    assert_eq!(
        (last.get(&0), last.get(&1)),
        (Some(&1_499), Some(&1_499)),
        "the slow member reads both partitions to their end"
    );
    server.stop().await;
}

/// The offsets of batches a member read before a rebalance took their
/// partition away are not committed once it has the partition back (the
/// batches are still handed out): committed then, they sent the group back
/// behind what the member that had the partition meanwhile read and
/// committed, and the group read those records again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_given_back_keeps_the_offset_its_other_member_committed() {
    let (server, client, topic, group) = ballast("given-back").await;
    let mut first = open_consume(&client, consume_request(&topic, &group, 0, false)).await;
    let read = next_batch(&mut first, "the first member").await;
    // Its client reads no more: the batches after its first, of the same
    // partition (librdkafka hands a partition's fetch over in order), wait
    // in its buffers.
    let buffered = read.records[0].partition;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // A second member that gets that partition (a member gets one of the
    // two, by its random member id) reads it to its end.
    let mut tries = 0;
    let mut second = loop {
        tries += 1;
        let mut second = open_consume(&client, consume_request(&topic, &group, 0, false)).await;
        let got = next_batch(&mut second, "the second member").await;
        if got.records[0].partition == buffered {
            break second;
        }
        assert!(tries < 8, "no new member got partition {buffered} in {tries} tries");
    };
    tokio::time::timeout(Duration::from_secs(60), async {
        while !second
            .message()
            .await
            .expect("the second member")
            .expect("open")
            .records
            .iter()
            .any(|r| r.offset == 1_499)
        {}
    })
    .await
    .expect("the second member reads its partition to its end");
    // It leaves (its last commit made), and the first has both partitions again.
    drop(second);
    tokio::time::sleep(Duration::from_secs(8)).await;
    while let Ok(Some(batch)) = tokio::time::timeout(Duration::from_secs(5), first.message())
        .await
        .map(|m| m.expect("the first member"))
    {
        assert!(!batch.records.is_empty());
    }
    drop(first);
    // One more record on each partition: a member that starts now gets only those.
    produce(
        &client,
        &topic,
        (0..2)
            .map(|p| pb::ProducerRecord {
                partition: Some(p),
                value: b"after".to_vec(),
                ..Default::default()
            })
            .collect(),
    )
    .await
    .expect("produce");
    let mut third = open_consume(&client, consume_request(&topic, &group, 0, false)).await;
    let mut fresh = std::collections::HashSet::new();
    while fresh.len() < 2 {
        let batch = next_batch(&mut third, "the third member").await;
        for r in batch.records {
            assert!(
                r.offset >= 1_500,
                "partition {} (the second member's: {buffered}) was sent back to offset {}",
                r.partition,
                r.offset
            );
            fresh.insert(r.partition);
        }
    }
    server.stop().await;
}

/// A Consume with a deadline ends itself just before it, with every record
/// it committed on its way to the client ahead of the status: a client
/// whose deadline cut the stream lost what its connection held, which the
/// automatic commits had committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consume_ends_before_its_deadline_with_every_committed_record_delivered() {
    let (server, client, topic, group) = ballast("deadline").await;
    let mut request = tonic::Request::new(consume_request(&topic, &group, 0, false));
    request.set_timeout(Duration::from_secs(5));
    let started = std::time::Instant::now();
    let mut stream = client.stream().consume(request).await.expect("consume").into_inner();
    // A slow reader: what it has not read waits in its connection's window.
    let mut last = std::collections::HashMap::new();
    let ended = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match stream.message().await {
                Ok(Some(batch)) => {
                    for r in batch.records {
                        last.insert(r.partition, r.offset);
                    }
                    // About 15 of the 30 batches within the deadline.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                Ok(None) => panic!("the stream ended with OK"),
                Err(e) => return e,
            }
        }
    })
    .await
    .expect("the stream ends at its deadline");
    assert_eq!(ended.code(), Code::DeadlineExceeded, "{ended:?}");
    assert_eq!(reason(&ended), "DEADLINE_REACHED", "{ended:?}");
    // (The records on their way when it ended are read after, at the same pace.)
    assert!(started.elapsed() < Duration::from_secs(9), "{:?}", started.elapsed());
    assert!(!last.is_empty(), "no record came before the deadline");
    // The group resumes right after the last record the client got.
    let mut next = open_consume(&client, consume_request(&topic, &group, 0, false)).await;
    let mut first = std::collections::HashMap::new();
    while !last.keys().all(|p| first.contains_key(p)) {
        let batch = next_batch(&mut next, "the next stream").await;
        for r in batch.records {
            first.entry(r.partition).or_insert(r.offset);
        }
    }
    for (partition, offset) in &last {
        assert_eq!(first.get(partition), Some(&(offset + 1)), "partition {partition}");
    }
    server.stop().await;
}

/// A partition without a leader (an election under way) is listed without
/// watermarks (-1) instead of failing the whole listing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_are_listed_while_a_partition_has_no_leader() {
    let (cluster, server, client) = mock_topic("elect", 2, MOCK_MESSAGE_TIMEOUT_MS, "").await;
    produce(&client, "elect", (0..3).map(record).collect())
        .await
        .expect("produce");
    cluster.partition_leader("elect", 1, None).expect("no leader");
    let started = std::time::Instant::now();
    let listed = list_topics(&client).await;
    let topic = listed.topics.iter().find(|t| t.name == "elect").expect("listed");
    let marks: Vec<_> = topic
        .partitions
        .iter()
        .map(|p| (p.partition, p.low_watermark >= 0, p.high_watermark))
        .collect();
    assert_eq!(marks[1], (1, false, -1), "{marks:?}");
    assert_eq!((marks[0].0, marks[0].1), (0, true), "{marks:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    server.stop().await;
}

/// Explicit start offsets a partition does not hold are refused, not read
/// from the partition's start again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_offsets_past_the_end_of_a_partition_are_out_of_range() {
    let topic = "offsets".to_string();
    let (_cluster, server, client) = mock_topic(&topic, 1, MOCK_MESSAGE_TIMEOUT_MS, "").await;
    produce(&client, &topic, (0..3).map(record).collect())
        .await
        .expect("produce");
    let from = |offset: i64, max: u64| {
        let mut request = consume_request(&topic, "explicit", max, true);
        request.start = Some(pb::StartPosition {
            position: Some(pb::start_position::Position::Offsets(pb::PartitionOffsets {
                offsets: vec![pb::PartitionOffset {
                    topic: topic.clone(),
                    partition: 0,
                    offset,
                }],
            })),
        });
        request
    };
    let mut stream = open_consume(&client, from(100, 1)).await;
    let answer = tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .expect("an answer within 30 s");
    let err = answer.expect_err("offset 100 is past the end");
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    let got = consume(&client, from(1, 2)).await;
    assert_eq!(got.iter().map(|r| r.offset).collect::<Vec<_>>(), [1, 2]);
    server.stop().await;
}
