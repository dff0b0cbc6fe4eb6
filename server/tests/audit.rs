//! The audit log: the real `weir` binary with JSON logs writes one line per
//! call on the `weir::audit` target, with tenant, key id, outcome and size,
//! and never the key itself.

mod common;

use common::{kafka, sqlite_demo, tenant, WeirProcess};
use weir_client::WeirClient;

#[tokio::test]
async fn every_call_leaves_one_audit_line() {
    let weir = WeirProcess::start(&[]);
    let client = WeirClient::connect(&weir.addr, "demo").await.expect("connect");
    client
        .execute("demo", "SELECT 1 AS one", vec![])
        .await
        .expect("execute");
    let audit = weir.next_log(|l| l["target"] == "weir::audit");
    assert_eq!(audit["message"], "call");
    assert_eq!(audit["method"], "/weir.v1.QueryService/Execute");
    assert_eq!(audit["code"], "Ok");
    assert_eq!(audit["span"]["tenant"], "demo");
    assert_eq!(audit["span"]["key_id"], "demo");
    assert_eq!(audit["span"]["source"], "demo");
    assert_eq!(audit["span"]["rows"], 1);
    assert!(
        audit["span"]["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:")),
        "the client's address: {audit}"
    );
    assert!(audit["duration_ms"].as_f64().is_some());
    assert!(
        audit["span"].get("sql").is_none(),
        "SQL text only when the tenant enables it"
    );
    client.describe_table("demo", "", "customers").await.expect("describe");
    let described = weir.next_log(|l| l["target"] == "weir::audit");
    assert_eq!(described["method"], "/weir.v1.SchemaService/DescribeTable");
    assert_eq!(
        described["span"]["object"], "customers",
        "the table is named: {described}"
    );
    // A table name is the caller's to choose too, of any length: cut short.
    let long = "t".repeat(100_000);
    client
        .describe_table("demo", "", &long)
        .await
        .expect_err("no such table");
    let described = weir.next_log(|l| l["target"] == "weir::audit");
    let object = described["span"]["object"].as_str().unwrap_or_default();
    assert!(
        object.len() <= 256 && object.starts_with("ttt"),
        "{}",
        described.to_string().len()
    );

    let stranger = WeirClient::connect(&weir.addr, "not-a-key").await.expect("connect");
    stranger
        .execute("demo", "SELECT 1", vec![])
        .await
        .expect_err("unknown key");
    let refused = weir.next_log(|l| l["target"] == "weir::audit");
    assert_eq!(refused["code"], "Unauthenticated");
    assert!(
        !refused.to_string().contains("not-a-key"),
        "keys are never logged: {refused}"
    );
}

/// Anyone can send calls with a wrong key: a flood of them gets at most 20
/// audit lines a second, and the next line logged says how many were not.
#[tokio::test]
async fn a_flood_of_refused_calls_does_not_flood_the_log() {
    let weir = WeirProcess::start(&[]);
    let stranger = WeirClient::connect(&weir.addr, "not-a-key").await.expect("connect");
    let started = std::time::Instant::now();
    for _ in 0..400 {
        stranger
            .execute("demo", "SELECT 1", vec![])
            .await
            .expect_err("unknown key");
    }
    let seconds = started.elapsed().as_secs() + 2;
    // A refusal in a later second gets its line, after the count of those that did not.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    stranger
        .execute("demo", "SELECT 1", vec![])
        .await
        .expect_err("unknown key");
    let refused = std::cell::Cell::new(0u64);
    let summary = weir.next_log(|l| {
        if l["target"] == "weir::audit" && l["code"] == "Unauthenticated" {
            refused.set(refused.get() + 1);
        }
        l["target"] == "weir::audit" && l.get("unlogged").is_some()
    });
    let refused = refused.get();
    let unlogged = summary["unlogged"].as_u64().unwrap_or_default();
    assert!(unlogged > 0, "{summary}");
    assert!(
        refused <= 20 * seconds + 2,
        "{refused} lines for 401 refusals in about {seconds} s"
    );
}

/// The path is the caller's to choose: a long one, unauthenticated, reaches
/// the audit line cut short, not whole.
#[tokio::test]
async fn a_callers_long_path_is_cut_short_in_its_audit_line() {
    use weir_client::weir_proto::v1 as pb;
    let weir = WeirProcess::start(&[]);
    let mut grpc = common::raw_grpc(format!("http://{}", weir.addr)).await;
    let junk = "x".repeat(8000);
    let path = tonic::codegen::http::uri::PathAndQuery::try_from(format!("/weir.{junk}/Call")).expect("path");
    let refused: Result<tonic::Response<pb::ListSourcesResponse>, _> = grpc
        .unary(
            tonic::Request::new(pb::ListSourcesRequest {}),
            path,
            tonic_prost::ProstCodec::default(),
        )
        .await;
    assert_eq!(
        refused.expect_err("no credentials").code(),
        tonic::Code::Unauthenticated
    );
    let audit = weir.next_log(|l| l["target"] == "weir::audit");
    let line = audit.to_string();
    assert!(line.len() < 2000, "{} bytes: {}", line.len(), &line[..300]);
    assert!(
        audit["method"].as_str().is_some_and(|m| m.starts_with("/weir.xxx")),
        "{audit}"
    );
}

#[tokio::test]
async fn text_logs_carry_the_call_span_and_no_colour_codes() {
    let weir = WeirProcess::start_logging("text", &[]);
    let client = WeirClient::connect(&weir.addr, "demo").await.expect("connect");
    client
        .execute("demo", "SELECT 1 AS one", vec![])
        .await
        .expect("execute");
    let audit = weir.next_log(|l| l.as_str().is_some_and(|l| l.contains(" weir::audit: ")));
    let line = audit.as_str().expect("a text line");
    // 2026-12-04T05:30:10.123456Z  INFO call{...}: weir::audit: call method=...
    let (time, rest) = line.split_once(' ').expect("a timestamp");
    assert_eq!(time.len(), "2026-12-04T05:30:10.123456Z".len(), "{line}");
    assert!(time.ends_with('Z') && time.as_bytes()[10] == b'T', "{line}");
    assert!(
        rest.trim_start()
            .starts_with("INFO call{otel.name=/weir.v1.QueryService/Execute request_id=\""),
        "{line}"
    );
    for part in [
        r#"tenant="demo" key_id="demo" source="demo" engine="sqlite" rows=1 bytes="#,
        r#"}: weir::audit: call method="/weir.v1.QueryService/Execute" code=Ok duration_ms="#,
    ] {
        assert!(line.contains(part), "{part} in {line}");
    }
    // The event carries the code; the span records it only for exported traces.
    assert_eq!(line.matches("code=").count(), 1, "{line}");
    assert!(
        !line.contains('\x1b'),
        "no colour codes in a log that is not a terminal: {line}"
    );
}

#[tokio::test]
async fn a_refused_call_names_its_limit_in_its_audit_line() {
    let config = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile()
        .expect("config file");
    let limits = "requests_per_second = 1\nburst = 1\nmax_rate_wait = \"0s\"";
    std::fs::write(config.path(), tenant("tight", limits, &sqlite_demo("tight", "db"))).expect("write config");
    let weir = WeirProcess::start(&["--config", config.path().to_str().expect("path")]);
    let client = WeirClient::connect(&weir.addr, "key-tight").await.expect("connect");
    client.execute("db", "SELECT 1", vec![]).await.expect("the burst");
    let admitted = weir.next_log(|l| l["target"] == "weir::audit");
    assert!(admitted["span"].get("limit").is_none(), "{admitted}");
    client
        .execute("db", "SELECT 1", vec![])
        .await
        .expect_err("over the rate");
    // One line for the refusal, the audit line, which says which limit.
    let refused = weir.next_log(|l| l["target"] != "weir::audit" || l["code"] != "Ok");
    assert_eq!(refused["target"], "weir::audit", "no other line before it: {refused}");
    assert_eq!(refused["code"], "ResourceExhausted");
    assert_eq!(refused["span"]["limit"], "rate");
    assert_eq!(refused["span"]["tenant"], "tight");
}

#[tokio::test]
async fn a_burst_of_calls_leaves_every_line_and_exit_writes_the_last_ones() {
    let config = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile()
        .expect("config file");
    let limits = "requests_per_second = 100000\nburst = 100000";
    std::fs::write(config.path(), tenant("busy", limits, &sqlite_demo("busy", "db"))).expect("write config");
    let weir = WeirProcess::start(&["--config", config.path().to_str().expect("path")]);
    let client = WeirClient::connect(&weir.addr, "key-busy").await.expect("connect");
    // Lines are written by the server's log thread, in batches: a burst of
    // calls from 8 callers must still leave one line per call.
    const CALLERS: usize = 8;
    const CALLS: usize = 250;
    let callers: Vec<_> = (0..CALLERS)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                for _ in 0..CALLS {
                    client.execute("db", "SELECT 1", vec![]).await.expect("execute");
                }
            })
        })
        .collect();
    for caller in callers {
        caller.await.expect("caller");
    }
    // Stopping the server writes what is left, up to its last line. The
    // client's connection task runs meanwhile, to see the server's GOAWAY.
    drop(client);
    let stopping = std::time::Instant::now();
    let lines = tokio::task::spawn_blocking(move || weir.stop()).await.expect("stopped");
    assert!(
        stopping.elapsed() < std::time::Duration::from_secs(5),
        "an idle server stops without waiting out its grace period"
    );
    let calls = lines
        .iter()
        .filter(|l| l["target"] == "weir::audit" && l["method"] == "/weir.v1.QueryService/Execute")
        .count();
    assert_eq!(calls, CALLERS * CALLS, "one audit line per call");
    assert!(
        lines.last().is_some_and(|l| l["message"] == "weir stopped"),
        "the last line, logged just before the process exits, is written: {:?}",
        lines.last()
    );
}

/// A Kafka stream's audit line carries the records and bytes it returned,
/// as a query's carries its rows: they are put on the call's span by the
/// task that streams them, which runs inside that span.
#[tokio::test]
async fn a_consume_call_tells_what_it_returned_in_its_audit_line() {
    let config = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile()
        .expect("config file");
    std::fs::write(config.path(), tenant("ka", "", &kafka("ka", "events", "weir-audit-"))).expect("write config");
    let weir = WeirProcess::start(&["--config", config.path().to_str().expect("path")]);
    let client = WeirClient::connect(&weir.addr, "key-ka").await.expect("connect");
    let topic = format!("weir-audit-{}", uuid::Uuid::new_v4().simple());
    common::create_topic(&topic, 1).await;
    let records = (0..5)
        .map(|i| weir_client::weir_proto::v1::ProducerRecord {
            value: format!("record {i}").into_bytes(),
            ..Default::default()
        })
        .collect();
    common::produce(&client, &topic, records).await.expect("produce");
    let produced = weir.next_log(|l| l["target"] == "weir::audit");
    assert_eq!(produced["method"], "/weir.v1.StreamService/Produce");
    let mut stream = client
        .stream()
        .consume(common::consume_request(&topic, "audited", 5, false))
        .await
        .expect("consume")
        .into_inner();
    let mut got = 0;
    while let Some(batch) = stream.message().await.expect("records") {
        got += batch.records.len();
    }
    assert_eq!(got, 5);
    let consumed = weir.next_log(|l| l["target"] == "weir::audit");
    assert_eq!(consumed["method"], "/weir.v1.StreamService/Consume", "{consumed}");
    assert_eq!(consumed["span"]["rows"], 5, "{consumed}");
    assert!(
        consumed["span"]["bytes"].as_i64().is_some_and(|b| b >= 40),
        "{consumed}"
    );
}
