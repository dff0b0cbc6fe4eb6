//! The audit log: the real `weir` binary with JSON logs writes one line per
//! call on the `weir::audit` target, with tenant, key id, outcome and size,
//! and never the key itself.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use weir_client::WeirClient;

#[tokio::test]
async fn every_call_leaves_one_audit_line() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["--log-format", "json"])
        .env("WEIR__SERVER__LISTEN", "127.0.0.1:0")
        .env("WEIR__METRICS__ENABLED", "false")
        .env("WEIR_LOG", "warn,weir::audit=info,weir_server=info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start weir");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel::<serde_json::Value>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str(&line) {
                if tx.send(v).is_err() {
                    return;
                }
            }
        }
    });
    let next = |pred: &dyn Fn(&serde_json::Value) -> bool| loop {
        let line = rx.recv_timeout(Duration::from_secs(20)).expect("a log line");
        if pred(&line) {
            return line;
        }
    };
    let listening = next(&|l| l["message"] == "weir listening");
    let addr = listening["addr"].as_str().expect("addr").to_string();
    let client = WeirClient::connect(&addr, "demo").await.expect("connect");
    client
        .execute("demo", "SELECT 1 AS one", vec![])
        .await
        .expect("execute");
    let audit = next(&|l| l["target"] == "weir::audit");
    assert_eq!(audit["message"], "call");
    assert_eq!(audit["method"], "/weir.v1.QueryService/Execute");
    assert_eq!(audit["code"], "Ok");
    assert_eq!(audit["span"]["tenant"], "demo");
    assert_eq!(audit["span"]["key_id"], "demo");
    assert_eq!(audit["span"]["source"], "demo");
    assert_eq!(audit["span"]["rows"], 1);
    assert!(audit["duration_ms"].as_f64().is_some());

    let stranger = WeirClient::connect(&addr, "not-a-key").await.expect("connect");
    stranger
        .execute("demo", "SELECT 1", vec![])
        .await
        .expect_err("unknown key");
    let refused = next(&|l| l["target"] == "weir::audit");
    assert_eq!(refused["code"], "Unauthenticated");
    assert!(
        !refused.to_string().contains("not-a-key"),
        "keys are never logged: {refused}"
    );
    let _ = child.kill();
    let _ = child.wait();
}
