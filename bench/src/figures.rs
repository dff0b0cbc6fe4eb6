//! The figures of ../shared/benchmarks.md that exist so far: point lookups,
//! full-table streaming and the server's memory while streaming.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::{pin_mut, StreamExt, TryStreamExt};
use rand::Rng;
use tokio_postgres::NoTls;
use weir_client::{ValueRef, WeirClient};

use crate::cpu::{Cpu, Snapshot};
use crate::server::Weir;
use crate::{median, Args, Figure};

const LOOKUP: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = $1";
const STREAM: &str = "SELECT aid, bid, abalance, filler FROM pgbench_accounts";
/// A unary result of 1,000 rows, fetched over and over.
const UNARY: &str = "SELECT aid, bid, abalance, filler FROM pgbench_accounts WHERE aid <= 1000";
const UNARY_ROWS: u64 = 1000;
/// Connections of the direct pool and of the gateway's pool.
pub const POOL_SIZE: usize = 32;
/// Callers share one HTTP/2 connection per this many, as a client pool would.
const CALLERS_PER_CHANNEL: usize = 8;

fn pg_config(args: &Args) -> tokio_postgres::Config {
    let mut c = tokio_postgres::Config::new();
    c.host(&args.pg_host)
        .port(args.pg_port)
        .user(&args.pg_user)
        .dbname(&args.pg_database)
        .password(&args.pg_password);
    c
}

pub async fn pg(args: &Args) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = pg_config(args).connect(NoTls).await.context("connect to PostgreSQL")?;
    tokio::spawn(connection);
    Ok(client)
}

pub fn pg_env(args: &Args, cmd: &mut std::process::Command) {
    cmd.env("PGHOST", &args.pg_host)
        .env("PGPORT", args.pg_port.to_string())
        .env("PGUSER", &args.pg_user)
        .env("PGPASSWORD", &args.pg_password)
        .env("PGDATABASE", &args.pg_database);
}

/// Rows of the accounts table at the run's scale.
pub fn rows(args: &Args) -> i64 {
    i64::from(args.scale()) * 100_000
}

/// `pgbench -i` at the run's scale, unless the table already has those rows.
async fn prepare(args: &Args) -> anyhow::Result<i64> {
    let rows = rows(args);
    let client = pg(args).await?;
    let existing = client
        .query_one("SELECT count(*) FROM pgbench_accounts", &[])
        .await
        .map(|r| r.get::<_, i64>(0));
    if existing.ok() != Some(rows) {
        println!(
            "preparing pgbench_accounts with {rows} rows (pgbench -i -s {})...",
            args.scale()
        );
        let mut cmd = std::process::Command::new("pgbench");
        cmd.args(["-i", "-q", "-s", &args.scale().to_string()]);
        pg_env(args, &mut cmd);
        let status = cmd
            .status()
            .context("run pgbench (apt-get install postgresql-contrib or postgresql)")?;
        anyhow::ensure!(status.success(), "pgbench -i failed");
    }
    Ok(rows)
}

struct Lookups {
    per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// CPU of the client, gateway and PostgreSQL per lookup.
    cpu_per_call: Cpu,
}

/// The CPU of `cpu` divided over `calls`.
fn per_call(cpu: Cpu, calls: usize) -> Cpu {
    let n = u32::try_from(calls.max(1)).unwrap_or(u32::MAX);
    Cpu {
        client: cpu.client / n,
        gateway: cpu.gateway / n,
        database: cpu.database / n,
    }
}

fn summarize(mut latencies: Vec<Duration>, elapsed: Duration, cpu: Cpu) -> Lookups {
    latencies.sort();
    let at = |q: f64| {
        let i = ((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1));
        latencies.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    Lookups {
        per_second: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        cpu_per_call: per_call(cpu, latencies.len()),
    }
}

async fn direct_lookups(args: &Args, callers: usize, rows: i64) -> anyhow::Result<Lookups> {
    // A pool of at most POOL_SIZE connections, like the gateway's own: a
    // caller holds its connection for the whole call (as bb8 and deadpool
    // lend them), so 64 callers wait for 32 connections, not pipeline two
    // statements on each.
    let mut idle = Vec::new();
    for _ in 0..callers.min(POOL_SIZE) {
        let client = pg(args).await?;
        let statement = client.prepare(LOOKUP).await?;
        idle.push((client, statement));
    }
    let pool = Arc::new(Pool {
        free: tokio::sync::Semaphore::new(idle.len()),
        idle: std::sync::Mutex::new(idle),
    });
    let cpu = Snapshot::now(None, "postgres");
    let deadline = Instant::now() + args.lookup_duration();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..callers {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let aid = rand::rng().random_range(1..=rows) as i32;
                let t = Instant::now();
                let (client, statement) = pool.get().await?;
                let row = client.query_one(&statement, &[&aid]).await;
                pool.put((client, statement));
                let _: i32 = row?.get(0);
                latencies.push(t.elapsed());
            }
            Ok::<_, anyhow::Error>(latencies)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let elapsed = started.elapsed();
    Ok(summarize(all, elapsed, cpu.elapsed()))
}

/// The direct side's connection pool: idle connections behind a semaphore
/// that counts them.
struct Pool {
    free: tokio::sync::Semaphore,
    idle: std::sync::Mutex<Vec<(tokio_postgres::Client, tokio_postgres::Statement)>>,
}

impl Pool {
    async fn get(&self) -> anyhow::Result<(tokio_postgres::Client, tokio_postgres::Statement)> {
        self.free.acquire().await?.forget();
        let mut idle = self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        idle.pop().context("a permit without an idle connection")
    }

    fn put(&self, connection: (tokio_postgres::Client, tokio_postgres::Statement)) {
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(connection);
        self.free.add_permits(1);
    }
}

async fn weir_lookups(
    args: &Args,
    weir: &Weir,
    source: &'static str,
    callers: usize,
    rows: i64,
) -> anyhow::Result<Lookups> {
    let mut clients = Vec::new();
    for _ in 0..callers.div_ceil(CALLERS_PER_CHANNEL) {
        clients.push(weir.client().await?);
    }
    // Untimed, as the direct pool connects and prepares before its clock
    // starts: the gateway's pool opens its connections as calls need them,
    // and each session prepares the statement at its first use.
    futures::future::try_join_all((0..callers).map(|i| {
        let client = clients[i / CALLERS_PER_CHANNEL].clone();
        async move { client.execute(source, LOOKUP, vec![1i64.into()]).await }
    }))
    .await?;
    let cpu = Snapshot::now(weir.pid(), "postgres");
    let deadline = Instant::now() + args.lookup_duration();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..callers {
        let client = clients[i / CALLERS_PER_CHANNEL].clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let aid = rand::rng().random_range(1..=rows);
                let t = Instant::now();
                let r = client.execute(source, LOOKUP, vec![aid.into()]).await?;
                anyhow::ensure!(r.rows.len() == 1, "lookup of aid {aid} returned {} rows", r.rows.len());
                latencies.push(t.elapsed());
            }
            Ok::<_, anyhow::Error>(latencies)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let elapsed = started.elapsed();
    Ok(summarize(all, elapsed, cpu.elapsed()))
}

/// `pgbench -S -M prepared` over TCP with 8 clients: transactions per second.
fn pgbench_select(args: &Args) -> anyhow::Result<f64> {
    let mut cmd = std::process::Command::new("pgbench");
    cmd.args([
        "-S",
        "-M",
        "prepared",
        "-n",
        "-c",
        "8",
        "-j",
        "2",
        "-T",
        &args.seconds.to_string(),
    ]);
    pg_env(args, &mut cmd);
    let output = cmd.output().context("run pgbench")?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.split_whitespace().nth(2)?.parse().ok())
        .context("pgbench printed no tps")
}

/// Rows per second reading the whole table with tokio-postgres, decoding
/// every value; `spent` gains the run's CPU ([`settle`]).
async fn direct_stream(args: &Args, expected: u64, spent: &std::sync::Mutex<Cpu>) -> anyhow::Result<f64> {
    let client = pg(args).await?;
    let cpu = Snapshot::now(None, "postgres");
    let started = Instant::now();
    let rows = client.query_raw(STREAM, std::iter::empty::<i32>()).await?;
    pin_mut!(rows);
    let (mut n, mut checksum) = (0u64, 0i64);
    while let Some(row) = rows.try_next().await? {
        checksum += account(&row);
        n += 1;
    }
    all_rows("query_raw", n, expected)?;
    Ok(settle(n, checksum, started, &cpu, spent))
}

/// Fails a run that did not read every row it should have: a rate over
/// fewer rows would not be the figure's.
pub fn all_rows(what: &str, n: u64, expected: u64) -> anyhow::Result<()> {
    anyhow::ensure!(n == expected, "{what} read {n} rows, expected {expected}");
    Ok(())
}

/// Every value of an accounts row decoded, summed into a checksum.
pub fn account(row: &tokio_postgres::Row) -> i64 {
    let (aid, bid, abalance, filler): (i32, i32, i32, &str) = (row.get(0), row.get(1), row.get(2), row.get(3));
    i64::from(aid + bid + abalance) + filler.len() as i64
}

/// The rate of a direct run of `n` rows; `spent` gains the run's CPU, read
/// while its connection (and so its database backend) is still open: a
/// backend that has ended has no CPU left to read.
pub fn settle(n: u64, checksum: i64, started: Instant, cpu: &Snapshot, spent: &std::sync::Mutex<Cpu>) -> f64 {
    std::hint::black_box(checksum);
    let rate = n as f64 / started.elapsed().as_secs_f64();
    if let Ok(mut spent) = spent.lock() {
        *spent += cpu.elapsed();
    }
    rate
}

/// Unary calls of `UNARY` per run: enough rows for a steady rate.
fn unary_calls(args: &Args) -> usize {
    if args.quick {
        20
    } else {
        500
    }
}

/// Rows per second of `UNARY` called `calls` times over one connection,
/// every value decoded, as an application reading whole results does;
/// `spent` gains the run's CPU ([`settle`]).
async fn direct_unary(args: &Args, calls: usize, spent: &std::sync::Mutex<Cpu>) -> anyhow::Result<f64> {
    let client = pg(args).await?;
    let statement = client.prepare(UNARY).await?;
    let cpu = Snapshot::now(None, "postgres");
    let started = Instant::now();
    let (mut n, mut checksum) = (0u64, 0i64);
    for _ in 0..calls {
        for row in client.query(&statement, &[]).await? {
            checksum += account(&row);
            n += 1;
        }
    }
    all_rows("query", n, UNARY_ROWS * calls as u64)?;
    Ok(settle(n, checksum, started, &cpu, spent))
}

/// The same through Weir's unary `Execute`.
async fn weir_unary(client: &WeirClient, calls: usize) -> anyhow::Result<f64> {
    use weir_client::weir_proto::v1::value::Kind;
    let started = Instant::now();
    let (mut n, mut checksum) = (0u64, 0i64);
    for _ in 0..calls {
        let result = client.execute("pg", UNARY, vec![]).await?;
        for row in &result.rows {
            for value in &row.values {
                checksum += match &value.kind {
                    Some(Kind::Int64Value(i)) => *i,
                    Some(Kind::StringValue(s)) => s.len() as i64,
                    _ => 0,
                };
            }
            n += 1;
        }
    }
    all_rows("unary Execute", n, UNARY_ROWS * calls as u64)?;
    std::hint::black_box(checksum);
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// Rows per second of `COPY ... TO STDOUT` (text), counting lines.
async fn direct_copy(args: &Args, expected: u64) -> anyhow::Result<f64> {
    let client = pg(args).await?;
    let started = Instant::now();
    let stream = client.copy_out("COPY pgbench_accounts TO STDOUT").await?;
    pin_mut!(stream);
    let mut lines = 0u64;
    while let Some(chunk) = stream.next().await {
        lines += chunk?.iter().filter(|b| **b == b'\n').count() as u64;
    }
    all_rows("COPY TO STDOUT", lines, expected)?;
    Ok(lines as f64 / started.elapsed().as_secs_f64())
}

/// Rows per second through ExecuteStream, decoding every value; text is
/// borrowed from the batch, as `query_raw`'s rows lend it.
async fn weir_stream(client: &WeirClient, source: &str, sql: &str, expected: u64) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut stream = client.execute_stream_raw(source, sql, vec![]).await?;
    let mut n = 0u64;
    let mut checksum = 0i64;
    while let Some(batch) = stream.next_batch().await? {
        for row in batch.iter() {
            for v in row?.values() {
                checksum += match v? {
                    ValueRef::Int64(i) => i,
                    ValueRef::String(s) => s.len() as i64,
                    _ => 0,
                };
            }
            n += 1;
        }
    }
    all_rows("ExecuteStream", n, expected)?;
    std::hint::black_box(checksum);
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// The same accounts in an SQLite file, for the embedded engine's figure.
pub async fn prepare_sqlite(path: &std::path::Path, rows: i64) -> anyhow::Result<()> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut conn = rusqlite::Connection::open(&path)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS bench_accounts (aid INTEGER PRIMARY KEY, bid INTEGER, abalance INTEGER, filler CHAR(84))",
        )?;
        let tx = conn.transaction()?;
        {
            let mut insert = tx.prepare("INSERT INTO bench_accounts VALUES (?1, ?2, 0, ?3)")?;
            let filler = " ".repeat(84);
            for aid in 1..=rows {
                insert.execute(rusqlite::params![aid, (aid - 1) / 100_000 + 1, filler])?;
            }
        }
        tx.commit()?;
        Ok::<_, anyhow::Error>(())
    })
    .await?
}

async fn mysql(args: &Args) -> anyhow::Result<mysql_async::Conn> {
    let opts = mysql_async::OptsBuilder::default()
        .ip_or_hostname(args.mysql_host.clone())
        .tcp_port(args.mysql_port)
        .user(Some(args.mysql_user.clone()))
        .pass(Some(args.mysql_password.clone()))
        .db_name(Some(args.mysql_database.clone()))
        .prefer_socket(false);
    mysql_async::Conn::new(opts).await.context("connect to MariaDB")
}

/// The accounts in MariaDB, generated with its sequence engine.
async fn prepare_mysql(args: &Args, rows: i64) -> anyhow::Result<()> {
    use mysql_async::prelude::Queryable;
    let mut conn = mysql(args).await?;
    conn.query_drop(
        "CREATE TABLE IF NOT EXISTS bench_accounts (aid INT PRIMARY KEY, bid INT, abalance INT, filler CHAR(84))",
    )
    .await?;
    let existing: Option<i64> = conn.query_first("SELECT COUNT(*) FROM bench_accounts").await?;
    if existing != Some(rows) {
        conn.query_drop("TRUNCATE bench_accounts").await?;
        conn.query_drop(format!(
            "INSERT INTO bench_accounts SELECT seq, (seq - 1) DIV 100000 + 1, 0, '' FROM seq_1_to_{rows}"
        ))
        .await?;
    }
    Ok(())
}

/// Rows per second streaming the accounts from MariaDB with mysql_async, decoding every value.
async fn direct_mysql_stream(args: &Args, expected: u64) -> anyhow::Result<f64> {
    use mysql_async::prelude::Queryable;
    let mut conn = mysql(args).await?;
    let started = Instant::now();
    let mut result = conn
        .exec_iter("SELECT aid, bid, abalance, filler FROM bench_accounts", ())
        .await?;
    let mut n = 0u64;
    let mut checksum = 0i64;
    while let Some(row) = result.next().await? {
        let (aid, bid, abalance, filler): (i64, i64, i64, String) = mysql_async::from_row(row);
        checksum += aid + bid + abalance + filler.len() as i64;
        n += 1;
    }
    all_rows("mysql_async", n, expected)?;
    std::hint::black_box(checksum);
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// Rows per second reading the accounts from SQLite with rusqlite, decoding every value.
async fn direct_sqlite_stream(path: std::path::PathBuf, expected: u64) -> anyhow::Result<f64> {
    tokio::task::spawn_blocking(move || {
        let conn = rusqlite::Connection::open(&path)?;
        let started = Instant::now();
        let mut stmt = conn.prepare("SELECT aid, bid, abalance, filler FROM bench_accounts")?;
        let mut rows = stmt.query([])?;
        let (mut n, mut checksum) = (0u64, 0i64);
        while let Some(row) = rows.next()? {
            let (aid, bid, abalance, filler): (i64, i64, i64, String) =
                (row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?);
            checksum += aid + bid + abalance + filler.len() as i64;
            n += 1;
        }
        all_rows("rusqlite", n, expected)?;
        std::hint::black_box(checksum);
        Ok::<_, anyhow::Error>(n as f64 / started.elapsed().as_secs_f64())
    })
    .await?
}

/// The run whose total CPU is the median.
fn median_cpu(mut runs: Vec<Cpu>) -> Cpu {
    runs.sort_by_key(Cpu::total);
    runs.get(runs.len() / 2).copied().unwrap_or_default()
}

/// One side of a figure measured in turns with the others (see `in_turns`).
pub struct Side<'a> {
    /// The gateway's pid, for its CPU (`None` on the direct side).
    gateway: Option<u32>,
    /// The database server's process name, for its CPU ("" for none).
    database: &'static str,
    run: Box<dyn FnMut() -> futures::future::BoxFuture<'a, anyhow::Result<f64>> + 'a>,
}

impl<'a> Side<'a> {
    /// A side whose runs are `run` (each returns its figure), its CPU read
    /// for the gateway of pid `gateway` and the processes named `database`.
    pub fn new<F, Fut>(gateway: Option<u32>, database: &'static str, mut run: F) -> Self
    where
        F: FnMut() -> Fut + 'a,
        Fut: std::future::Future<Output = anyhow::Result<f64>> + Send + 'a,
    {
        Side {
            gateway,
            database,
            run: Box::new(move || Box::pin(run())),
        }
    }
}

/// Runs every side once per round, `runs` rounds, each round starting with
/// the next side: the machine's speed drifts over minutes, and sides run
/// one block after another would each get their own stretch of it. Returns
/// each side's median and the CPU its runs took.
pub async fn in_turns<const N: usize>(runs: usize, mut sides: [Side<'_>; N]) -> anyhow::Result<[(f64, Cpu); N]> {
    let mut values: [Vec<f64>; N] = std::array::from_fn(|_| Vec::with_capacity(runs));
    let mut cpu = [Cpu::default(); N];
    for round in 0..runs {
        for k in 0..N {
            let i = (round + k) % N;
            let side = &mut sides[i];
            let before = Snapshot::now(side.gateway, side.database);
            values[i].push((side.run)().await?);
            cpu[i] += before.elapsed();
        }
    }
    Ok(std::array::from_fn(|i| {
        (median(std::mem::take(&mut values[i])), cpu[i])
    }))
}

pub async fn repeat<F, Fut>(runs: usize, mut f: F) -> anyhow::Result<f64>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<f64>>,
{
    let mut values = Vec::with_capacity(runs);
    for _ in 0..runs {
        values.push(f().await?);
    }
    Ok(median(values))
}

pub async fn all(args: &Args, weir: &Weir, sqlite: &std::path::Path) -> anyhow::Result<Vec<Figure>> {
    let rows = prepare(args).await?;
    let args = Arc::new(args.clone());
    let mut figures = Vec::new();
    let client = weir.client().await?;
    if args.wants("lookups") {
        lookups(&args, weir, rows, &mut figures).await?;
    }
    if args.wants("stream") {
        stream(&args, &client, weir.pid(), sqlite, rows, &mut figures).await?;
    }
    if args.wants("formats") {
        crate::result_formats::figures(&args, &client, weir.pid(), rows, &mut figures).await?;
    }
    if args.wants("load") {
        load(&args, &client, weir.pid(), rows, &mut figures).await?;
    }
    if args.wants("kafka") {
        crate::kafka::figures(&args, &client, &mut figures).await?;
    }
    if args.wants("changes") {
        crate::changes::figures(&args, &client, &mut figures).await?;
    }
    if args.wants("neighbour") {
        crate::neighbour::figures(&args, weir, rows, &mut figures).await?;
    }
    if args.wants("memory") {
        memory(&args, weir, &client, &mut figures).await?;
    }
    Ok(figures)
}

/// The medians of several lookup runs of one kind.
#[derive(Default)]
struct Runs {
    per_second: Vec<f64>,
    p50_ms: Vec<f64>,
    p99_ms: Vec<f64>,
    cpu: Vec<Cpu>,
}

impl Runs {
    fn push(&mut self, l: Lookups) {
        self.per_second.push(l.per_second);
        self.p50_ms.push(l.p50_ms);
        self.p99_ms.push(l.p99_ms);
        self.cpu.push(l.cpu_per_call);
    }
}

/// The figures of one way through Weir against the direct runs.
fn lookup_figures(label: &str, direct: &Runs, weir: Runs, figures: &mut Vec<Figure>) {
    let fig = |name: String, unit, direct: &[f64], weir: Vec<f64>, higher_is_better| Figure {
        name,
        unit,
        direct: median(direct.to_vec()),
        weir: median(weir),
        higher_is_better,
    };
    figures.push(fig(
        format!("point lookups, {label}"),
        "/s",
        &direct.per_second,
        weir.per_second,
        true,
    ));
    let weir_p50 = weir.p50_ms.clone();
    figures.push(fig(
        format!("p50 latency, {label}"),
        "ms",
        &direct.p50_ms,
        weir.p50_ms,
        false,
    ));
    figures.push(fig(
        format!("p99 latency, {label}"),
        "ms",
        &direct.p99_ms,
        weir.p99_ms,
        false,
    ));
    let (d_cpu, w_cpu) = (median_cpu(direct.cpu.clone()), median_cpu(weir.cpu));
    figures.push(fig(
        format!("CPU per lookup (all processes), {label}"),
        "µs",
        &[d_cpu.total().as_secs_f64() * 1e6],
        vec![w_cpu.total().as_secs_f64() * 1e6],
        false,
    ));
    // The latency target is on the difference, not the ratio.
    let overhead = median(weir_p50) - median(direct.p50_ms.clone());
    crate::detail(format!(
        "point lookups, {label}: direct {}; Weir {}; p50 overhead {overhead:.2} ms",
        d_cpu.per(1.0, "PostgreSQL"),
        w_cpu.per(1.0, "PostgreSQL")
    ));
}

async fn lookups(args: &Arc<Args>, weir: &Weir, rows: i64, figures: &mut Vec<Figure>) -> anyhow::Result<()> {
    for callers in [1usize, 8, 64] {
        println!("point lookups with {callers} callers...");
        let (mut direct, mut pooled, mut shared) = (Runs::default(), Runs::default(), Runs::default());
        for _ in 0..args.runs {
            direct.push(direct_lookups(args, callers, rows).await?);
            pooled.push(weir_lookups(args, weir, "pg", callers, rows).await?);
            shared.push(weir_lookups(args, weir, "pg_multiplexed", callers, rows).await?);
        }
        lookup_figures(&format!("{callers} callers"), &direct, pooled, figures);
        let shared_connections = match crate::server::MULTIPLEXED {
            1 => "1 shared connection".to_string(),
            n => format!("{n} shared connections"),
        };
        let label = format!("{callers} callers, multiplexed ({shared_connections})");
        lookup_figures(&label, &direct, shared, figures);
    }
    println!("pgbench -S -M prepared, 8 clients...");
    let pgbench = repeat(args.runs, || async { pgbench_select(args) }).await?;
    let weir8 = figures
        .iter()
        .find(|f| f.name == "point lookups, 8 callers")
        .map_or(0.0, |f| f.weir);
    figures.push(Figure {
        name: "point lookups, 8 callers, vs pgbench -S -M prepared".into(),
        unit: "/s",
        direct: pgbench,
        weir: weir8,
        higher_is_better: true,
    });
    Ok(())
}

async fn stream(
    args: &Arc<Args>,
    client: &WeirClient,
    gateway: Option<u32>,
    sqlite: &std::path::Path,
    rows: i64,
    figures: &mut Vec<Figure>,
) -> anyhow::Result<()> {
    println!("streaming {rows} rows...");
    let expected = u64::try_from(rows)?;
    let spent = std::sync::Mutex::new(Cpu::default());
    let [(direct, _), (copy, _), (through, weir_cpu)] = in_turns(
        args.runs,
        [
            Side::new(None, "", || direct_stream(args, expected, &spent)),
            Side::new(None, "", || direct_copy(args, expected)),
            Side::new(gateway, "postgres", || weir_stream(client, "pg", STREAM, expected)),
        ],
    )
    .await?;
    let direct_cpu = spent.into_inner().unwrap_or_default();
    // Per 1,000 rows, over all runs.
    let thousands = (rows as f64 * args.runs as f64 / 1000.0).max(1.0);
    crate::detail(format!(
        "stream {rows} rows, per 1,000 rows: query_raw {}; Weir {}",
        direct_cpu.per(thousands, "PostgreSQL"),
        weir_cpu.per(thousands, "PostgreSQL")
    ));
    figures.push(Figure {
        name: format!("stream {rows} rows vs query_raw"),
        unit: "rows/s",
        direct,
        weir: through,
        higher_is_better: true,
    });
    figures.push(Figure {
        name: format!("stream {rows} rows vs COPY TO STDOUT"),
        unit: "rows/s",
        direct: copy,
        weir: through,
        higher_is_better: true,
    });

    println!("unary results of 1,000 rows...");
    let calls = unary_calls(args);
    let spent = std::sync::Mutex::new(Cpu::default());
    let [(direct, _), (through, weir_cpu)] = in_turns(
        args.runs,
        [
            Side::new(None, "", || direct_unary(args, calls, &spent)),
            Side::new(gateway, "postgres", || weir_unary(client, calls)),
        ],
    )
    .await?;
    let direct_cpu = spent.into_inner().unwrap_or_default();
    let results = (calls * args.runs) as f64;
    crate::detail(format!(
        "unary results of 1,000 rows, per call: query {}; Weir {}",
        direct_cpu.per(results, "PostgreSQL"),
        weir_cpu.per(results, "PostgreSQL")
    ));
    figures.push(Figure {
        name: "unary Execute of 1,000 rows vs query".into(),
        unit: "rows/s",
        direct,
        weir: through,
        higher_is_better: true,
    });

    println!("streaming {rows} rows from MariaDB and SQLite...");
    prepare_mysql(args, rows).await?;
    let accounts = "SELECT aid, bid, abalance, filler FROM bench_accounts";
    let [(direct, direct_cpu), (through, weir_cpu)] = in_turns(
        args.runs,
        [
            Side::new(None, "mariadbd", || direct_mysql_stream(args, expected)),
            Side::new(gateway, "mariadbd", || weir_stream(client, "maria", accounts, expected)),
        ],
    )
    .await?;
    crate::detail(format!(
        "MariaDB stream {rows} rows, per 1,000 rows: mysql_async {}; Weir {}",
        direct_cpu.per(thousands, "MariaDB"),
        weir_cpu.per(thousands, "MariaDB")
    ));
    figures.push(Figure {
        name: format!("MariaDB: stream {rows} rows vs mysql_async"),
        unit: "rows/s",
        direct,
        weir: through,
        higher_is_better: true,
    });
    // SQLite runs inside the reading process: rusqlite's in the client's
    // CPU, the gateway's in the gateway's.
    let [(direct, direct_cpu), (through, weir_cpu)] = in_turns(
        args.runs,
        [
            Side::new(None, "", || direct_sqlite_stream(sqlite.to_path_buf(), expected)),
            Side::new(gateway, "", || weir_stream(client, "lite", accounts, expected)),
        ],
    )
    .await?;
    crate::detail(format!(
        "SQLite stream {rows} rows, per 1,000 rows: rusqlite {}; Weir {}",
        direct_cpu.per(thousands, ""),
        weir_cpu.per(thousands, "")
    ));
    figures.push(Figure {
        name: format!("SQLite: stream {rows} rows vs rusqlite"),
        unit: "rows/s",
        direct,
        weir: through,
        higher_is_better: true,
    });

    Ok(())
}

async fn load(
    args: &Arc<Args>,
    client: &WeirClient,
    gateway: Option<u32>,
    rows: i64,
    figures: &mut Vec<Figure>,
) -> anyhow::Result<()> {
    println!("loading {rows} rows into PostgreSQL and MariaDB...");
    let dir = tempfile::tempdir()?;
    let file = crate::load::export(args, dir.path()).await?;
    // Per 1,000 rows, over all runs.
    let thousands = (rows as f64 * args.runs as f64 / 1000.0).max(1.0);
    pg(args)
        .await?
        .batch_execute("CREATE TABLE IF NOT EXISTS bench_load (LIKE pgbench_accounts)")
        .await?;
    // No CPU figures here: `psql`'s backend ends with its command, before
    // its CPU can be read (MariaDB is one process).
    let [(direct, _), (through, _)] = in_turns(
        args.runs,
        [
            Side::new(None, "", || crate::load::direct_pg_copy(args, &file, rows)),
            Side::new(gateway, "", || {
                crate::load::weir_load(client, "pg", "bench_load", &file, rows)
            }),
        ],
    )
    .await?;
    figures.push(Figure {
        name: format!("PostgreSQL: load {rows} rows vs psql \\copy"),
        unit: "rows/s",
        direct,
        weir: through,
        higher_is_better: true,
    });
    {
        use mysql_async::prelude::Queryable;
        mysql(args)
            .await?
            .query_drop("CREATE TABLE IF NOT EXISTS bench_load (aid INT, bid INT, abalance INT, filler CHAR(84))")
            .await?;
    }
    let [(direct, direct_cpu), (through, weir_cpu)] = in_turns(
        args.runs,
        [
            Side::new(None, "mariadbd", || async {
                crate::load::direct_mysql_load(args, &file, rows)
            }),
            Side::new(gateway, "mariadbd", || {
                crate::load::weir_load(client, "maria", "bench_load", &file, rows)
            }),
        ],
    )
    .await?;
    crate::detail(format!(
        "MariaDB load {rows} rows, per 1,000 rows: LOAD DATA LOCAL INFILE {}; Weir {}",
        direct_cpu.per(thousands, "MariaDB"),
        weir_cpu.per(thousands, "MariaDB")
    ));
    figures.push(Figure {
        name: format!("MariaDB: load {rows} rows vs LOAD DATA LOCAL INFILE"),
        unit: "rows/s",
        direct,
        weir: through,
        higher_is_better: true,
    });

    Ok(())
}

async fn memory(args: &Arc<Args>, weir: &Weir, client: &WeirClient, figures: &mut Vec<Figure>) -> anyhow::Result<()> {
    let big: u64 = if args.quick { 1_000_000 } else { 10_000_000 };
    println!("streaming {big} generated rows for the server's peak memory...");
    // Megabytes (10^6 bytes), as the 100 MB target is written; the runs up to
    // the thirty-seventh session printed mebibytes under this label.
    let mb = |bytes: Option<u64>| bytes.map_or(0.0, |b| b as f64 / 1e6);
    // The figures before this one (loads, Kafka) have peaks of their own, and
    // what the allocator kept of them stays resident. The stream's peak is
    // the server's VmHWM set back to its RSS before the stream, where Linux
    // lets it be reset (every allocation counted, between samples too);
    // else the highest RSS sampled every 10 ms.
    let before = mb(weir.peak_rss());
    let reset = weir.reset_peak_rss();
    let sql = format!("SELECT g, md5(g::text) AS h FROM generate_series(1, {big}) g");
    let stream = weir_stream(client, "pg", &sql, big);
    tokio::pin!(stream);
    let mut sample = tokio::time::interval(Duration::from_millis(10));
    let mut peak = weir.rss().unwrap_or(0);
    loop {
        tokio::select! {
            done = &mut stream => {
                done?;
                break;
            }
            _ = sample.tick() => peak = peak.max(weir.rss().unwrap_or(0)),
        }
    }
    let (peak_mb, how) = match reset {
        true => (
            mb(weir.peak_rss()).max(mb(Some(peak))),
            "its VmHWM, reset before the stream",
        ),
        false => (mb(Some(peak)), "sampled every 10 ms"),
    };
    crate::detail(format!(
        "server RSS: at most {peak_mb:.1} MB while it streamed {big} rows ({how}); \
         its peak over the whole run before that stream: {before:.1} MB"
    ));
    figures.push(Figure {
        name: format!("server peak RSS streaming {big} rows (direct column: the 100 MB target)"),
        unit: "MB",
        direct: 100.0,
        weir: peak_mb,
        higher_is_better: false,
    });
    Ok(())
}
