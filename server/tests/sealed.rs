//! Sealed credentials end to end: a MariaDB source whose password is sealed
//! in the configuration connects; after a key rotation the value sealed with
//! the older key still opens; a value whose key is gone fails clearly,
//! without the secret in the message.

mod common;

use common::*;
use weir_server::sealed;

/// One key set for the whole binary: the variable is process-wide.
fn keys() -> (String, String) {
    static KEYS: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| {
        let (v1, v2) = (sealed::generate_key(), sealed::generate_key());
        // Rotated: v2 is the newest, v1 still opens older values.
        std::env::set_var(sealed::KEYS_ENV, format!("v2={v2},v1={v1}"));
        (v1, v2)
    })
    .clone()
}

fn source_with(password_sealed: &str) -> String {
    let plain = mysql("sl", "db", "");
    let without_env: String = plain
        .lines()
        .filter(|l| !l.starts_with("password_env"))
        .map(|l| format!("{l}\n"))
        .collect();
    tenant(
        "sl",
        "",
        &format!("{without_env}password_sealed = \"{password_sealed}\"\n"),
    )
}

fn password() -> String {
    std::env::var("WEIR_TEST_MYSQL_PASSWORD").unwrap_or_else(|_| "weir".into())
}

#[tokio::test]
async fn a_password_sealed_with_an_older_key_still_connects_after_rotation() {
    let (v1, _) = keys();
    let sealed_v1 =
        sealed::seal_with(&sealed::parse_keys(&format!("v1={v1}")).expect("keys"), &password()).expect("seal");
    let server = TestServer::start(&source_with(&sealed_v1)).await;
    let client = server.client("key-sl").await;
    let r = client
        .execute("db", "SELECT 1", vec![])
        .await
        .expect("connects with the unsealed password");
    assert_eq!(int(&r.rows[0].values[0]), 1);
    // New values are sealed with the newest key, and open too.
    let sealed_now = sealed::seal(&password()).expect("seal");
    assert!(sealed_now.starts_with("weir-sealed:v2:"));
    assert_eq!(sealed::open(&sealed_now).ok(), Some(password()));
    server.stop().await;
}

#[tokio::test]
async fn a_value_sealed_with_a_retired_key_fails_without_showing_the_secret() {
    keys();
    let retired = sealed::parse_keys(&format!("v7={}", sealed::generate_key())).expect("keys");
    let sealed_v7 = sealed::seal_with(&retired, "never-shown-secret").expect("seal");
    let config = weir_server::Config::from_toml(&source_with(&sealed_v7)).expect("valid config");
    let source = &config.tenants["sl"].sources["db"];
    let e = source.password().expect_err("key v7 is not in WEIR_SEAL_KEYS");
    assert!(e.contains("v7"), "{e}");
    assert!(!e.contains("never-shown-secret"), "{e}");
}

/// Runs `weir <args>` with `input` on stdin: its exit success and stdout.
fn weir_fed(args: &[&str], input: &str) -> (bool, String) {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(args)
        .env(sealed::KEYS_ENV, format!("v1={}", keys().0))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start weir");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("weir exits");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    )
}

/// `hash-key` and `seal` read one line: its line ending goes, and a second
/// line is refused rather than hashed or sealed with the first.
#[test]
fn hash_key_and_seal_take_one_line_from_stdin() {
    let (ok, hashed) = weir_fed(&["hash-key"], "key-one\r\n");
    assert!(ok);
    assert_eq!(hashed, key_hash("key-one"));
    for args in [&["hash-key"][..], &["seal"]] {
        let (ok, out) = weir_fed(args, "key-one\nkey-two\n");
        assert!(!ok && out.is_empty(), "{args:?} printed {out:?} for two lines");
    }
    let (ok, out) = weir_fed(&["seal"], "pw\n");
    assert!(ok && out.starts_with("weir-sealed:v1:"), "{out}");
}
