//! Bulk-load figures: the accounts, exported once to a text file, loaded
//! by the engine's own client (`psql \copy`, `mariadb ... LOAD DATA LOCAL
//! INFILE`) and through Weir's `Load`, whose client parses the same file
//! into typed rows as it streams them.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use weir_client::weir_proto::v1 as pb;
use weir_client::weir_proto::v1::value::Kind;
use weir_client::WeirClient;

use crate::Args;

/// Rows per message sent to Weir.
const BATCH_ROWS: usize = 5000;

/// Writes the accounts table as COPY text (tab-separated) and returns its path.
pub async fn export(args: &Args, dir: &Path) -> anyhow::Result<PathBuf> {
    let client = crate::figures::pg(args).await?;
    let path = dir.join("accounts.tsv");
    let mut file = std::io::BufWriter::new(std::fs::File::create(&path)?);
    let stream = client
        .copy_out("COPY (SELECT aid, bid, abalance, filler FROM pgbench_accounts ORDER BY aid) TO STDOUT")
        .await?;
    futures::pin_mut!(stream);
    while let Some(chunk) = stream.next().await {
        file.write_all(&chunk?)?;
    }
    file.flush()?;
    Ok(path)
}

/// The file's lines as typed row batches, parsed on a blocking thread.
fn batches(path: PathBuf) -> tokio_stream::wrappers::ReceiverStream<Vec<pb::Row>> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let int = |s: &str| -> anyhow::Result<pb::Value> {
            Ok(pb::Value {
                kind: Some(Kind::Int64Value(s.parse()?)),
            })
        };
        let mut batch = Vec::with_capacity(BATCH_ROWS);
        for line in std::io::BufReader::new(std::fs::File::open(path)?).lines() {
            let line = line?;
            let mut fields = line.split('\t');
            let mut next = || fields.next().context("short line");
            let values = vec![
                int(next()?)?,
                int(next()?)?,
                int(next()?)?,
                pb::Value {
                    kind: Some(Kind::StringValue(next()?.to_string())),
                },
            ];
            batch.push(pb::Row { values });
            if batch.len() == BATCH_ROWS && tx.blocking_send(std::mem::take(&mut batch)).is_err() {
                return Ok(());
            }
        }
        if !batch.is_empty() {
            let _ = tx.blocking_send(batch);
        }
        Ok(())
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Rows per second loading the file into `table` of `source` through Weir,
/// after emptying it as the direct commands do (`TRUNCATE`, untimed: the
/// direct side's clock is its client's own timing of the load statement).
/// Not a `REPLACE` load: that empties the table inside the load's
/// transaction, which on MariaDB means a `DELETE` of every row (`TRUNCATE`
/// would commit), work the direct command does not do.
pub async fn weir_load(client: &WeirClient, source: &str, table: &str, path: &Path, rows: i64) -> anyhow::Result<f64> {
    let header = pb::LoadHeader {
        source: source.into(),
        table: table.into(),
        columns: ["aid", "bid", "abalance", "filler"].map(String::from).to_vec(),
        mode: pb::BulkLoadMode::Append as i32,
        ..Default::default()
    };
    client.execute(source, &format!("TRUNCATE {table}"), vec![]).await?;
    let started = Instant::now();
    let r = client.load(header, batches(path.to_path_buf())).await?;
    let took = started.elapsed();
    crate::figures::all_rows("Weir's load", r.rows_inserted, u64::try_from(rows)?)?;
    Ok(rows as f64 / took.as_secs_f64())
}

/// How long the load statement took, as the client `cmd` timed it itself:
/// the process's start and its login are not the load's (the Weir side's
/// client is connected before its clock starts). `report` reads the
/// client's output: the time and the rows it says it loaded, which must
/// be `rows` (a rate over fewer would not be the figure's).
fn timed(
    mut cmd: std::process::Command,
    what: &str,
    rows: i64,
    report: fn(&str) -> Option<(Duration, u64)>,
) -> anyhow::Result<Duration> {
    // Their timing lines are translated in other locales (`Zeit: 1,5 ms`).
    cmd.env("LC_ALL", "C");
    let out = cmd.output().with_context(|| format!("run {what}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (took, loaded) = report(&stdout).with_context(|| format!("{what} printed no timing: {stdout}"))?;
    crate::figures::all_rows(what, loaded, u64::try_from(rows)?)?;
    Ok(took)
}

/// psql's `COPY 1000000` and its `\timing` line: `Time: 1234.567 ms (00:01.235)`.
fn psql_report(out: &str) -> Option<(Duration, u64)> {
    let rows = out
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("COPY "))?
        .trim()
        .parse()
        .ok()?;
    let line = out.lines().rev().find_map(|l| l.strip_prefix("Time: "))?;
    let ms: f64 = line.split_whitespace().next()?.parse().ok()?;
    Some((Duration::from_secs_f64(ms / 1000.0), rows))
}

/// The mariadb client's (`-vvv`) report of its last statement:
/// `Query OK, 1000000 rows affected (3.456 sec)`, or `(1 min 2.345 sec)`.
fn mariadb_report(out: &str) -> Option<(Duration, u64)> {
    let line = out.lines().rev().find(|l| l.ends_with(" sec)"))?;
    let rows = line
        .strip_prefix("Query OK, ")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let inside = &line[line.rfind('(')? + 1..line.len() - 1];
    let mut seconds = 0.0;
    let mut words = inside.split_whitespace();
    while let (Some(n), Some(unit)) = (words.next(), words.next()) {
        let n: f64 = n.parse().ok()?;
        seconds += n * match unit {
            "day" | "days" => 86_400.0,
            "hour" | "hours" => 3_600.0,
            "min" => 60.0,
            "sec" => 1.0,
            _ => return None,
        };
    }
    Some((Duration::from_secs_f64(seconds), rows))
}

/// Rows per second of `psql \copy bench_load FROM file` (after emptying the table).
pub async fn direct_pg_copy(args: &Args, path: &Path, rows: i64) -> anyhow::Result<f64> {
    crate::figures::pg(args)
        .await?
        .batch_execute("TRUNCATE bench_load")
        .await?;
    let mut cmd = std::process::Command::new("psql");
    crate::figures::pg_env(args, &mut cmd);
    // -X: no ~/.psqlrc to change what it prints.
    cmd.args(["-X", "-v", "ON_ERROR_STOP=1", "-c", "\\timing on", "-c"])
        .arg(format!("\\copy bench_load FROM '{}'", path.display()));
    Ok(rows as f64 / timed(cmd, "psql \\copy", rows, psql_report)?.as_secs_f64())
}

/// Rows per second of the mariadb client's `LOAD DATA LOCAL INFILE` (after emptying the table).
pub fn direct_mysql_load(args: &Args, path: &Path, rows: i64) -> anyhow::Result<f64> {
    let client = if Path::new("/usr/bin/mariadb").exists() {
        "mariadb"
    } else {
        "mysql"
    };
    let mut cmd = std::process::Command::new(client);
    cmd.env("MYSQL_PWD", &args.mysql_password)
        .args(["--local-infile=1", "--protocol=TCP", "-vvv", "-h", &args.mysql_host])
        .arg(format!("-P{}", args.mysql_port))
        .args(["-u", &args.mysql_user, &args.mysql_database, "-e"])
        .arg(format!(
            "TRUNCATE bench_load; LOAD DATA LOCAL INFILE '{}' INTO TABLE bench_load",
            path.display()
        ));
    Ok(rows as f64 / timed(cmd, "LOAD DATA LOCAL INFILE", rows, mariadb_report)?.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clients_own_timings_are_read() {
        let psql = "Timing is on.\nCOPY 1000000\nTime: 1234.500 ms (00:01.234)\n";
        assert_eq!(psql_report(psql), Some((Duration::from_micros(1_234_500), 1_000_000)));
        let mariadb = "--------------\nLOAD DATA LOCAL INFILE '/x' INTO TABLE t\n--------------\n\n\
                       Query OK, 1000000 rows affected (1 min 2.500 sec)\nRecords: 1000000\n\nBye\n";
        assert_eq!(
            mariadb_report(mariadb),
            Some((Duration::from_millis(62_500), 1_000_000))
        );
        assert_eq!(
            mariadb_report("Query OK, 2 rows affected (0.001 sec)"),
            Some((Duration::from_millis(1), 2))
        );
        assert_eq!(psql_report("COPY 1\n"), None, "no timing");
        assert_eq!(psql_report("Time: 1.000 ms\n"), None, "no row count");
        assert_eq!(mariadb_report("Query OK (2 fortnights sec)"), None);
    }
}
