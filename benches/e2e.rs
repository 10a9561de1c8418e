//! End-to-end throughput of `dbsync pull` against the raw COPY pipe, measured in the same run.
//!
//! `cargo bench --bench e2e -- [--rows N] [--transports ws,quic] [--zstd-level L]
//! [--batch-rows N] [--pipeline-depth N] [--no-memory] [--no-sqlite] [--no-postgres]
//! [--json FILE] [--repeat N] [--link RATE] [--parallel N,M]`
//!
//! `--link 100mbit` (any `tc` rate) measures instead over a shaped link: the receiving side in a
//! network namespace of its own behind a veth pair shaped with `tc ... tbf` (root only), see
//! [`link_steps`].
//!
//! Two `dbsync serve` processes (sender on database A, receiver on database B) on loopback; the
//! receiver pulls with the `dbsync pull` binary. Peak RSS is the kernel's high-water mark
//! (`VmHWM`) of the pull process and of the sender's serve process during the pull (reset before
//! it). PostgreSQL comes from DBSYNC_TEST_PG_URL (default the local server); the bench
//! creates and drops its own databases.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};
use sqlx::postgres::PgPoolCopyExt;

const DBSYNC: &str = env!("CARGO_BIN_EXE_dbsync");

/// The `dbsync` binary the bench runs: `DBSYNC_BENCH_BIN` when set (another build, to compare
/// two builds with one bench), else the one `cargo bench` built.
fn dbsync_bin() -> String {
    std::env::var("DBSYNC_BENCH_BIN").unwrap_or_else(|_| DBSYNC.to_string())
}

#[derive(Debug, Clone)]
struct Knobs {
    rows: i64,
    transports: Vec<String>,
    zstd_level: i32,
    batch_rows: i64,
    pipeline_depth: u32,
    postgres: bool,
    memory: bool,
    sqlite: bool,
    json: String,
    repeat: usize,
    /// `--link RATE`: only the steps over a link shaped to this rate (`tc` syntax: `100mbit`).
    link: Option<String>,
    /// `--parallel N,M`: besides the full pulls in one piece, full pulls over N (then M)
    /// streams (`dbsync pull --parallel`), over the first transport; 1 alone: none.
    parallel: Vec<usize>,
}

fn knobs() -> Knobs {
    let mut knobs = Knobs {
        rows: 1_000_000,
        transports: vec!["ws".into(), "quic".into()],
        // The product's default: chosen batch by batch.
        zstd_level: 0,
        batch_rows: 20_000,
        pipeline_depth: 8,
        memory: true,
        postgres: true,
        sqlite: true,
        json: "target/bench-e2e.json".into(),
        repeat: 3,
        link: None,
        parallel: vec![2, 4],
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().expect("a value after the flag");
        match arg.as_str() {
            "--rows" => knobs.rows = value().parse().expect("--rows N"),
            "--transports" => knobs.transports = value().split(',').map(str::to_owned).collect(),
            "--zstd-level" => {
                let level = value();
                knobs.zstd_level = if level == "auto" {
                    0
                } else {
                    level.parse().expect("--zstd-level L (1-19, or auto)")
                }
            }
            "--batch-rows" => knobs.batch_rows = value().parse().expect("--batch-rows N"),
            "--pipeline-depth" => {
                knobs.pipeline_depth = value().parse().expect("--pipeline-depth N")
            }
            "--no-memory" => knobs.memory = false,
            "--no-sqlite" => knobs.sqlite = false,
            "--no-postgres" => knobs.postgres = false,
            "--json" => knobs.json = value(),
            "--repeat" => {
                knobs.repeat = value()
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .expect("--repeat N (1 or more)")
            }
            "--link" => knobs.link = Some(value()),
            "--parallel" => {
                knobs.parallel = value()
                    .split(',')
                    .map(|n| n.parse().expect("--parallel N,M (1-16 each)"))
                    .filter(|n| *n > 1)
                    .collect()
            }
            "--bench" => {}
            other => eprintln!("ignoring {other}"),
        }
    }
    knobs
}

/// A `dbsync serve` process.
struct Agent {
    child: Child,
    url: String,
    env: Vec<(String, String)>,
    /// The network namespace it runs in (its commands too), if not this one.
    netns: Option<String>,
}

/// `dbsync`, run in network namespace `netns` when given.
fn dbsync_command(netns: Option<&str>) -> Command {
    match netns {
        Some(ns) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", ns]).arg(dbsync_bin());
            command
        }
        None => Command::new(dbsync_bin()),
    }
}

impl Agent {
    fn start(database_url: &str, dir: &std::path::Path, name: &str, knobs: &Knobs) -> Self {
        Self::start_on(database_url, dir, name, knobs, "127.0.0.1", None)
    }

    /// [`Agent::start`] listening on `ip`, in network namespace `netns` when given.
    fn start_on(
        database_url: &str,
        dir: &std::path::Path,
        name: &str,
        knobs: &Knobs,
        ip: &str,
        netns: Option<&str>,
    ) -> Self {
        let env = vec![
            ("DBSYNC_DATABASE_URL".to_owned(), database_url.to_owned()),
            (
                "DBSYNC_KEY_FILE".to_owned(),
                dir.join(format!("{name}.key")).display().to_string(),
            ),
            ("DBSYNC_ALLOW_PRIVATE_PEERS".to_owned(), "true".to_owned()),
            ("DBSYNC_ZSTD_LEVEL".to_owned(), knobs.zstd_level.to_string()),
            ("DBSYNC_BATCH_ROWS".to_owned(), knobs.batch_rows.to_string()),
            ("DBSYNC_LOG".to_owned(), "warn".to_owned()),
        ];
        // A free port, so the site URL can be given (CLI commands beside it announce it).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let listen = format!("{ip}:{port}");
        let site_url = format!("http://{listen}");
        let mut child = dbsync_command(netns)
            .args(["serve", "--listen", &listen, "--site-url", &site_url])
            .envs(env.iter().cloned())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("dbsync serve starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .expect("the listening line")
            .to_owned();
        Self {
            child,
            url,
            env,
            netns: netns.map(str::to_owned),
        }
    }

    fn run(&self, args: &[&str]) -> Value {
        let out = dbsync_command(self.netns.as_deref())
            .arg("--json")
            .args(args)
            .envs(self.env.iter().cloned())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "dbsync {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    /// Runs `dbsync pull`; returns its summary, wall time, and the peak RSS (KiB) of the pull
    /// process and of `sender` during it. Both peaks are the kernel's own high-water marks
    /// (`VmHWM`), not samples of the current RSS: the sender's is reset before the pull through
    /// `/proc/<pid>/clear_refs`; the pull's is read every 10 ms until it exits (a high-water
    /// mark only rises, and a pull's memory falls as it ends). Not `wait4`'s `ru_maxrss`: for a
    /// child started by `vfork`, as `Command` can do, Linux folds this process's peak into it.
    fn pull(&self, args: &[&str], sender: &Agent) -> (Value, Duration, u64, u64) {
        self.timed("pull", args, sender)
    }

    /// [`Agent::pull`] for any command (`verify`).
    fn timed(&self, command: &str, args: &[&str], sender: &Agent) -> (Value, Duration, u64, u64) {
        let sender_pid = sender.child.id();
        std::fs::write(format!("/proc/{sender_pid}/clear_refs"), "5")
            .expect("reset the sender's peak RSS (/proc/<pid>/clear_refs)");
        let cpu_before = cpu_jiffies();
        let started = Instant::now();
        let mut child = dbsync_command(self.netns.as_deref())
            .arg("--json")
            .arg(command)
            .args(args)
            .envs(self.env.iter().cloned())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut BufReader::new(stdout), &mut text).unwrap();
            text
        });
        let stderr = child.stderr.take().unwrap();
        let errors = std::thread::spawn(move || {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut text).unwrap();
            text
        });
        let mut receiver_peak = 0;
        let status = loop {
            receiver_peak = receiver_peak.max(peak_kib(child.id()));
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let elapsed = started.elapsed();
        // How busy the machine's cores were (every process: agents, servers, this bench): a
        // step near 100 % is bound by CPU, however its work is split.
        let (busy, total) = cpu_jiffies();
        if total > cpu_before.1 {
            eprintln!(
                "  {command}: cores busy {:.0} % of the run",
                100.0 * (busy - cpu_before.0) as f64 / (total - cpu_before.1) as f64
            );
        }
        let sender_peak = peak_kib(sender_pid);
        let text = reader.join().unwrap();
        let errors = errors.join().unwrap();
        // `verify` exits 1 when it found differences, and still reports them.
        let reported = command == "verify" && status.code() == Some(1) && !text.trim().is_empty();
        assert!(
            status.success() || reported,
            "dbsync {command} {args:?} failed: {text} {errors}"
        );
        (
            serde_json::from_str(&text).unwrap(),
            elapsed,
            receiver_peak,
            sender_peak,
        )
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The machine's CPU time so far, in jiffies: (busy, total) over every core (`/proc/stat`).
fn cpu_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = fields.iter().sum();
    // idle and iowait
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// A process's peak RSS so far (`VmHWM` of `/proc/<pid>/status`), in KiB; 0 once it is gone.
fn peak_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

fn users_ddl(table: &str) -> String {
    format!(
        "CREATE TABLE {table} (id BIGINT PRIMARY KEY, uuid UUID NOT NULL, email TEXT NOT NULL, \
         name TEXT NOT NULL, active BOOLEAN NOT NULL, score INTEGER, balance NUMERIC(12,2), \
         profile JSONB, created_at TIMESTAMPTZ NOT NULL, updated_at TIMESTAMPTZ NOT NULL)"
    )
}

fn users_fill(table: &str, rows: i64) -> String {
    format!(
        "INSERT INTO {table} SELECT g, md5(g::text)::uuid, 'user' || g || '@example.com', \
         'User Number ' || g, g % 3 = 0, g % 1000, (g * 3.07)::numeric(12,2), \
         jsonb_build_object('plan', 'p' || (g % 5), 'tags', jsonb_build_array('a', 'b')), \
         TIMESTAMPTZ '2024-01-01 00:00:00+00' + g * INTERVAL '1 second', \
         TIMESTAMPTZ '2024-01-01 00:00:00+00' + g * INTERVAL '1 second' FROM generate_series(1, {rows}) g"
    )
}

struct Pg {
    admin: sqlx::PgPool,
    base: String,
    names: Vec<String>,
}

impl Pg {
    async fn connect() -> Self {
        let url = std::env::var("DBSYNC_TEST_PG_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let admin = sqlx::PgPool::connect(&url)
            .await
            .expect("PostgreSQL (set DBSYNC_TEST_PG_URL)");
        let base = url
            .rsplit_once('/')
            .map_or(url.clone(), |(b, _)| b.to_owned());
        Self {
            admin,
            base,
            names: Vec::new(),
        }
    }

    async fn database(&mut self, name: &str) -> (String, sqlx::PgPool) {
        let name = format!("dbsync_bench_{name}_{}", std::process::id());
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&self.admin)
            .await
            .unwrap();
        self.names.push(name.clone());
        let url = format!("{}/{name}", self.base);
        let pool = sqlx::PgPool::connect(&url).await.unwrap();
        (url, pool)
    }

    async fn drop_all(&self) {
        for name in &self.names {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .execute(&self.admin)
            .await;
        }
    }
}

async fn exec(pool: &sqlx::PgPool, sql: &str) {
    sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(pool)
        .await
        .unwrap();
}

/// Bytes per write into the baseline's `COPY FROM STDIN`.
const COPY_WRITE: usize = 64 * 1024;

/// The baseline: binary COPY out of A streamed straight into COPY in on B (`psql | psql`).
async fn copy_pipe(from: &sqlx::PgPool, to: &sqlx::PgPool, table: &str) -> Duration {
    copy_rows(
        from,
        &format!("COPY {table} TO STDOUT (FORMAT binary)"),
        to,
        &format!("COPY {table} FROM STDIN (FORMAT binary)"),
    )
    .await
}

/// Binary COPY out of `from` by `out` (`COPY ... TO STDOUT`) into `to` by `into`.
async fn copy_rows(from: &sqlx::PgPool, out: &str, to: &sqlx::PgPool, into: &str) -> Duration {
    let started = Instant::now();
    let mut out = from.copy_out_raw(out).await.unwrap();
    let mut sink = to.copy_in_raw(into).await.unwrap();
    // COPY OUT yields one message per row; handing each to `send` would write (and flush) each
    // on its own. Gathered into 64 KiB writes, as libpq's buffering does for `psql | psql`.
    let mut buffer = Vec::with_capacity(COPY_WRITE + 4096);
    while let Some(chunk) = out.next().await {
        buffer.extend_from_slice(&chunk.unwrap());
        if buffer.len() >= COPY_WRITE {
            sink.send(buffer.as_slice()).await.unwrap();
            buffer.clear();
        }
    }
    sink.send(buffer.as_slice()).await.unwrap();
    sink.finish().await.unwrap();
    started.elapsed()
}

/// Small tables pulled in one pull: how many, and rows in each (too few for the sender to cut,
/// so `--parallel` pulls them side by side).
const SMALL_TABLES: usize = 24;
const SMALL_TABLE_ROWS: i64 = 10_000;

/// Many small tables in one pull, one at a time (`--parallel 1`) and side by side (each
/// `--parallel` count), against their COPY pipes one after another in the same run.
async fn small_tables_steps(
    pg: &Pg,
    a: &sqlx::PgPool,
    b: &sqlx::PgPool,
    setup: &Setup,
    knobs: &Knobs,
    table: &mut Vec<Row>,
) {
    let names: Vec<String> = (1..=SMALL_TABLES)
        .map(|i| format!("small_{i:02}"))
        .collect();
    for name in &names {
        exec(a, &users_ddl(name)).await;
        exec(a, &users_fill(name, SMALL_TABLE_ROWS)).await;
        exec(a, &format!("VACUUM ANALYZE {name}")).await;
    }
    let rows = SMALL_TABLE_ROWS * SMALL_TABLES as i64;
    let mut times = Vec::new();
    for _ in 0..knobs.repeat {
        for name in &names {
            exec(b, &users_ddl(name)).await;
        }
        settle(Some(pg)).await;
        let mut took = Duration::ZERO;
        for name in &names {
            took += copy_pipe(a, b, name).await;
        }
        times.push(took);
        for name in &names {
            exec(b, &format!("DROP TABLE {name}")).await;
        }
    }
    let (baseline, samples) = median(&times);
    eprintln!("{SMALL_TABLES} small tables, COPY pipes: {baseline:.2} s");
    table.push(Row {
        measure: format!("{SMALL_TABLES} small tables: COPY binary | COPY, one after another"),
        seconds: baseline,
        samples,
        rows,
        ratio: Some(1.0),
        wire_ratio: None,
        rss_receiver_mib: None,
        rss_sender_mib: None,
    });
    let list = names.join(",");
    let depth = knobs.pipeline_depth.to_string();
    let transport = knobs.transports[0].as_str();
    let mut counts = vec![1];
    counts.extend(knobs.parallel.iter().copied().filter(|n| *n > 1));
    for parallel in counts {
        let streams = parallel.to_string();
        let args = [
            setup.connection.as_str(),
            "--tables",
            &list,
            "--transport",
            transport,
            "--pipeline-depth",
            &depth,
            "--strategy",
            "overwrite",
            "--parallel",
            &streams,
        ];
        let mut times = Vec::new();
        let mut first = None;
        for _ in 0..knobs.repeat {
            for name in &names {
                exec(b, &format!("DROP TABLE IF EXISTS {name}")).await;
            }
            exec(b, "DELETE FROM dbsync_checkpoints").await;
            settle(Some(pg)).await;
            let (summary, elapsed, rss_b, rss_a) = setup.receiver.pull(&args, &setup.sender);
            let moved: i64 = summary["tables"]
                .as_array()
                .map_or(0, |t| t.iter().filter_map(|t| t["rows"].as_i64()).sum());
            assert_eq!(moved, rows, "{summary}");
            times.push(elapsed);
            first.get_or_insert((rss_b, rss_a));
        }
        let (seconds, samples) = median(&times);
        let (rss_b, rss_a) = first.expect("at least one run");
        eprintln!("{SMALL_TABLES} small tables, --parallel {parallel}: {seconds:.2} s");
        table.push(Row {
            measure: format!("{SMALL_TABLES} small tables over {transport}, --parallel {parallel}"),
            seconds,
            samples,
            rows,
            ratio: Some(seconds / baseline),
            wire_ratio: None,
            rss_receiver_mib: Some(mib(rss_b)),
            rss_sender_mib: Some(mib(rss_a)),
        });
    }
    for name in &names {
        exec(a, &format!("DROP TABLE {name}")).await;
        exec(b, &format!("DROP TABLE IF EXISTS {name}")).await;
    }
}

/// Bytes of the table as COPY text (what `psql | psql` would put on a wire).
async fn copy_text_bytes(from: &sqlx::PgPool, table: &str) -> u64 {
    copy_out_bytes(from, &format!("COPY {table} TO STDOUT")).await
}

/// Bytes a `COPY ... TO STDOUT` statement puts out.
async fn copy_out_bytes(from: &sqlx::PgPool, statement: &str) -> u64 {
    let mut out = from.copy_out_raw(statement).await.unwrap();
    let mut bytes = 0;
    while let Some(chunk) = out.next().await {
        bytes += chunk.unwrap().len() as u64;
    }
    bytes
}

#[derive(Debug, Clone)]
struct Row {
    measure: String,
    /// The median of `samples`.
    seconds: f64,
    /// Every run's time, in order.
    samples: Vec<f64>,
    rows: i64,
    ratio: Option<f64>,
    wire_ratio: Option<f64>,
    rss_receiver_mib: Option<f64>,
    rss_sender_mib: Option<f64>,
}

impl Row {
    /// A step run once, with no ratio, and the peaks (KiB) of the receiver and the sender.
    fn once(measure: String, elapsed: Duration, rows: i64, (receiver, sender): (u64, u64)) -> Self {
        Self {
            measure,
            seconds: elapsed.as_secs_f64(),
            samples: vec![elapsed.as_secs_f64()],
            rows,
            ratio: None,
            wire_ratio: None,
            rss_receiver_mib: Some(mib(receiver)),
            rss_sender_mib: Some(mib(sender)),
        }
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The times of a step's runs in seconds, and their median (the middle one, or the mean of the
/// two middle ones).
fn median(times: &[Duration]) -> (f64, Vec<f64>) {
    let samples: Vec<f64> = times.iter().map(Duration::as_secs_f64).collect();
    let mut sorted = samples.clone();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let middle = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    (middle, samples)
}

struct Setup {
    sender: Agent,
    receiver: Agent,
    connection: String,
}

fn register(a_url: &str, b_url: &str, dir: &std::path::Path, knobs: &Knobs, tag: &str) -> Setup {
    let receiver = Agent::start(b_url, dir, &format!("b-{tag}"), knobs);
    let sender = Agent::start(a_url, dir, &format!("a-{tag}"), knobs);
    connect(sender, receiver)
}

/// Makes a sender connection from `sender` to `receiver` (which accepts it at once).
fn connect(sender: Agent, receiver: Agent) -> Setup {
    receiver.run(&["settings", "incoming", "auto_accept"]);
    sender.run(&[
        "connections",
        "create",
        "to-b",
        "--site-url",
        &receiver.url,
        "--rate-limit-per-minute",
        "100000",
        "--max-records-per-request",
        "100000000",
    ]);
    let list = receiver.run(&["connections", "list"]);
    let connection = list[0]["name"].as_str().unwrap().to_owned();
    Setup {
        sender,
        receiver,
        connection,
    }
}

/// The full pulls a run measures: each transport in one piece, then the first over each
/// `--parallel` count.
fn full_pull_steps(knobs: &Knobs) -> Vec<(&str, usize)> {
    let mut steps: Vec<(&str, usize)> = knobs.transports.iter().map(|t| (t.as_str(), 1)).collect();
    steps.extend(
        knobs
            .parallel
            .iter()
            .map(|n| (knobs.transports[0].as_str(), *n)),
    );
    steps
}

fn full_pull_measure(transport: &str, parallel: usize, link: &str) -> String {
    match parallel {
        1 => format!("full pull over {transport}{link}"),
        n => format!("full pull over {transport}{link}, --parallel {n}"),
    }
}

/// What the runs of one full-pull step measured.
struct FullPull {
    seconds: f64,
    samples: Vec<f64>,
    rows: i64,
    wire: i64,
    rss_receiver_kib: u64,
    rss_sender_kib: u64,
}

impl FullPull {
    fn row(self, measure: String, baseline: f64, text_bytes: u64) -> Row {
        eprintln!("{measure}: {:.2} s", self.seconds);
        Row {
            measure,
            seconds: self.seconds,
            samples: self.samples,
            rows: self.rows,
            ratio: Some(self.seconds / baseline),
            wire_ratio: Some(self.wire as f64 / text_bytes as f64),
            rss_receiver_mib: Some(mib(self.rss_receiver_kib)),
            rss_sender_mib: Some(mib(self.rss_sender_kib)),
        }
    }
}

/// `knobs.repeat` full pulls of `users` into an empty target on `b` over `parallel` streams;
/// the wire bytes and peaks are the first run's (a sender's first pull).
async fn full_pulls(
    pg: &Pg,
    b: &sqlx::PgPool,
    setup: &Setup,
    knobs: &Knobs,
    transport: &str,
    parallel: usize,
) -> FullPull {
    let depth = knobs.pipeline_depth.to_string();
    let streams = parallel.to_string();
    let mut times = Vec::new();
    let mut first = None;
    for _ in 0..knobs.repeat {
        exec(b, "DROP TABLE IF EXISTS users").await;
        exec(b, "DELETE FROM dbsync_checkpoints").await;
        settle(Some(pg)).await;
        let (summary, elapsed, rss_b, rss_a) = setup.receiver.pull(
            &pull_args(
                setup,
                transport,
                &depth,
                &["--strategy", "overwrite", "--parallel", &streams],
            ),
            &setup.sender,
        );
        let pulled = &summary["tables"][0];
        assert_eq!(pulled["rows"].as_i64(), Some(knobs.rows));
        if parallel > 1 {
            assert!(pulled["parts"].as_u64() > Some(1), "not cut: {summary}");
        }
        times.push(elapsed);
        first.get_or_insert((pulled["bytes_wire"].as_i64().unwrap_or(0), rss_b, rss_a));
    }
    let (seconds, samples) = median(&times);
    let (wire, rss_receiver_kib, rss_sender_kib) = first.expect("at least one run");
    FullPull {
        seconds,
        samples,
        rows: knobs.rows,
        wire,
        rss_receiver_kib,
        rss_sender_kib,
    }
}

/// `dbsync verify` of the bench table over `transport`.
fn verify_args<'a>(setup: &'a Setup, transport: &'a str) -> [&'a str; 5] {
    [
        setup.connection.as_str(),
        "--tables",
        "users",
        "--transport",
        transport,
    ]
}

fn pull_args<'a>(
    setup: &'a Setup,
    transport: &'a str,
    depth: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        setup.connection.as_str(),
        "--tables",
        "users",
        "--transport",
        transport,
        "--pipeline-depth",
        depth,
    ];
    args.extend_from_slice(extra);
    args
}

fn main() {
    let knobs = knobs();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(run(knobs));
}

async fn run(knobs: Knobs) {
    let dir = tempfile::tempdir().unwrap();
    let mut table: Vec<Row> = Vec::new();
    let mut pg = None;
    let mut text_bytes = None;
    if let Some(rate) = &knobs.link {
        let mut server = Pg::connect().await;
        text_bytes = link_steps(&mut server, rate, &knobs, dir.path(), &mut table).await;
        server.drop_all().await;
        report(&knobs, text_bytes, &table);
        return;
    }
    if knobs.postgres {
        let mut server = Pg::connect().await;
        text_bytes = Some(postgres_steps(&mut server, &knobs, dir.path(), &mut table).await);
        pg = Some(server);
    }
    if knobs.sqlite {
        sqlite_steps(pg.as_ref(), &knobs, dir.path(), &mut table).await;
    }
    if let Some(pg) = &pg {
        pg.drop_all().await;
    }
    report(&knobs, text_bytes, &table);
}

/// Before each measured step (the baselines too): PostgreSQL writes out the pages earlier steps
/// left dirty (`CHECKPOINT`) and the kernel flushes its page cache (`sync`), so the background
/// writes of one step do not land in the time of the next.
async fn settle(pg: Option<&Pg>) {
    if let Some(pg) = pg
        && let Err(err) = sqlx::query("CHECKPOINT").execute(&pg.admin).await
    {
        eprintln!("settle: CHECKPOINT failed ({err}); measuring anyway");
    }
    let _ = Command::new("sync").status();
}

/// Steps 1-5 (PostgreSQL); returns the table's size as COPY text.
async fn postgres_steps(
    pg: &mut Pg,
    knobs: &Knobs,
    dir: &std::path::Path,
    table: &mut Vec<Row>,
) -> u64 {
    let depth = knobs.pipeline_depth.to_string();
    eprintln!("building {} rows on A ...", knobs.rows);
    let (a_url, a) = pg.database("a").await;
    let (b_url, b) = pg.database("b").await;
    exec(&a, &users_ddl("users")).await;
    exec(&a, &users_fill("users", knobs.rows)).await;
    exec(&a, "VACUUM ANALYZE users").await;
    let text_bytes = copy_text_bytes(&a, "users").await;

    // Baseline: into an empty copy of the table on B.
    let mut times = Vec::new();
    for _ in 0..knobs.repeat {
        exec(&b, &users_ddl("users")).await;
        settle(Some(pg)).await;
        times.push(copy_pipe(&a, &b, "users").await);
        exec(&b, "DROP TABLE users").await;
    }
    let (baseline, samples) = median(&times);
    table.push(Row {
        measure: "baseline: COPY binary | COPY".into(),
        seconds: baseline,
        samples,
        rows: knobs.rows,
        ratio: Some(1.0),
        wire_ratio: Some(1.0),
        rss_receiver_mib: None,
        rss_sender_mib: None,
    });
    eprintln!("baseline: {baseline:.2} s (median of {})", knobs.repeat);

    let setup = register(&a_url, &b_url, dir, knobs, "pg");
    let mut full_ws = None;
    for (transport, parallel) in full_pull_steps(knobs) {
        let row = full_pulls(pg, &b, &setup, knobs, transport, parallel)
            .await
            .row(
                full_pull_measure(transport, parallel, ""),
                baseline,
                text_bytes,
            );
        if transport == "ws" && parallel == 1 {
            full_ws = Some(row.seconds);
        }
        table.push(row);
    }
    let transport = knobs.transports[0].as_str();
    small_tables_steps(pg, &a, &b, &setup, knobs, table).await;
    // Re-pull with overwrite onto the full target (the same rows each run).
    let mut times = Vec::new();
    let mut first = None;
    for _ in 0..knobs.repeat {
        settle(Some(pg)).await;
        let (_, elapsed, rss_b, rss_a) = setup.receiver.pull(
            &pull_args(&setup, transport, &depth, &["--strategy", "overwrite"]),
            &setup.sender,
        );
        times.push(elapsed);
        first.get_or_insert((rss_b, rss_a));
    }
    let (elapsed, samples) = median(&times);
    let (rss_b, rss_a) = first.expect("at least one run");
    eprintln!("re-pull with overwrite: {elapsed:.2} s");
    table.push(Row {
        measure: format!("re-pull with overwrite ({transport})"),
        seconds: elapsed,
        samples,
        rows: knobs.rows,
        ratio: Some(elapsed / baseline),
        wire_ratio: None,
        rss_receiver_mib: Some(mib(rss_b)),
        rss_sender_mib: Some(mib(rss_a)),
    });
    // Verify of the identical copy: row hashes page by page, no row moved.
    let verifying = verify_args(&setup, transport);
    let mut times = Vec::new();
    let mut first = None;
    for _ in 0..knobs.repeat {
        settle(Some(pg)).await;
        let (report, elapsed, rss_b, rss_a) =
            setup.receiver.timed("verify", &verifying, &setup.sender);
        assert_eq!(report["identical"], true, "{report}");
        times.push(elapsed);
        first.get_or_insert((rss_b, rss_a));
    }
    let (elapsed, samples) = median(&times);
    let (rss_b, rss_a) = first.expect("at least one run");
    eprintln!("verify (identical): {elapsed:.2} s");
    table.push(Row {
        measure: format!("verify, identical ({transport})"),
        seconds: elapsed,
        samples,
        rows: knobs.rows,
        ratio: Some(elapsed / baseline),
        wire_ratio: None,
        rss_receiver_mib: Some(mib(rss_b)),
        rss_sender_mib: Some(mib(rss_a)),
    });
    // Diff pull of the unchanged table, after a verification found it alike (a scheduled diff
    // run of a table that rarely changes): the whole table hashed on each side, nothing moved.
    let mut times = Vec::new();
    for _ in 0..knobs.repeat {
        settle(Some(pg)).await;
        let (report, elapsed, _, _) = setup.receiver.pull(
            &pull_args(&setup, transport, &depth, &["--diff"]),
            &setup.sender,
        );
        assert_eq!(report["identical"], true, "{report}");
        assert_eq!(report["tables"][0]["repaired_rows"], 0, "{report}");
        times.push(elapsed);
    }
    let (elapsed, samples) = median(&times);
    eprintln!("diff pull (unchanged): {elapsed:.2} s");
    table.push(Row {
        measure: format!("pull --diff, nothing changed ({transport})"),
        seconds: elapsed,
        samples,
        rows: 0,
        ratio: Some(elapsed / baseline),
        wire_ratio: None,
        rss_receiver_mib: None,
        rss_sender_mib: None,
    });
    // Diff pull after 1 % of the rows changed at the source (another 1 % each run).
    let mut times = Vec::new();
    let mut moved = 0;
    let mut first = None;
    for run in 0..knobs.repeat {
        let changed = format!("id % 100 = {}", 50 + run % 50);
        let expected: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT COUNT(*) FROM users WHERE {changed}"
        )))
        .fetch_one(&a)
        .await
        .unwrap();
        exec(
            &a,
            &format!("UPDATE users SET name = name || '~' WHERE {changed}"),
        )
        .await;
        settle(Some(pg)).await;
        // The first time, how long finding the changed rows takes without moving them.
        if run == 0 {
            let (report, elapsed, _, _) = setup.receiver.timed("verify", &verifying, &setup.sender);
            assert_eq!(report["identical"], false, "{report}");
            eprintln!("verify (1% different): {:.2} s", elapsed.as_secs_f64());
            table.push(Row {
                measure: format!("verify, 1% different ({transport})"),
                seconds: elapsed.as_secs_f64(),
                samples: vec![elapsed.as_secs_f64()],
                rows: knobs.rows,
                ratio: Some(elapsed.as_secs_f64() / baseline),
                wire_ratio: None,
                rss_receiver_mib: None,
                rss_sender_mib: None,
            });
            settle(Some(pg)).await;
        }
        let (report, elapsed, rss_b, rss_a) = setup.receiver.pull(
            &pull_args(&setup, transport, &depth, &["--diff"]),
            &setup.sender,
        );
        assert_eq!(report["identical"], true, "{report}");
        moved = report["tables"][0]["repaired_rows"].as_i64().unwrap_or(-1);
        assert_eq!(moved, expected, "a diff pull moves the changed rows");
        times.push(elapsed);
        first.get_or_insert((rss_b, rss_a));
    }
    let (elapsed, samples) = median(&times);
    let (rss_b, rss_a) = first.expect("at least one run");
    eprintln!("diff pull (1%): {elapsed:.2} s");
    table.push(Row {
        measure: format!("pull --diff, 1% changed ({transport})"),
        seconds: elapsed,
        samples,
        rows: moved,
        ratio: Some(elapsed / baseline),
        wire_ratio: None,
        rss_receiver_mib: Some(mib(rss_b)),
        rss_sender_mib: Some(mib(rss_a)),
    });
    // Incremental: a first pass sets the cursor, then 1% of the rows change. The source has the
    // index an operator adds for incremental pulls (docs/operations.md): on the cursor column
    // and the key, the order the sender pages in. Only the source gets it, after the baseline.
    exec(
        &a,
        "CREATE INDEX users_updated_at_id ON users (updated_at, id)",
    )
    .await;
    setup.receiver.pull(
        &pull_args(&setup, transport, &depth, &["--incremental"]),
        &setup.sender,
    );
    // Each run changes another 1 % (every hundredth key, from another offset), so every run
    // changes rows spread over the whole table that no run before it touched.
    let mut times = Vec::new();
    let mut upserts = Vec::new();
    let mut moved = 0;
    for run in 0..knobs.repeat {
        let changed = format!("id % 100 = {}", run % 100);
        let expected: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT COUNT(*) FROM users WHERE {changed}"
        )))
        .fetch_one(&a)
        .await
        .unwrap();
        exec(
            &a,
            &format!("UPDATE users SET name = name || '!', updated_at = now() WHERE {changed}"),
        )
        .await;
        settle(Some(pg)).await;
        let (summary, elapsed, _, _) = setup.receiver.pull(
            &pull_args(&setup, transport, &depth, &["--incremental"]),
            &setup.sender,
        );
        moved = summary["tables"][0]["rows"].as_i64().unwrap_or(-1);
        assert_eq!(
            moved, expected,
            "an incremental pull moves the changed rows"
        );
        times.push(elapsed);
        // What the receiving server itself needs to write those rows: the same rows, already
        // on B in a table of their own, upserted into its copy in one statement.
        exec(&b, "DROP TABLE IF EXISTS changed_rows").await;
        exec(&b, &users_ddl("changed_rows")).await;
        copy_rows(
            &a,
            &format!("COPY (SELECT * FROM users WHERE {changed}) TO STDOUT (FORMAT binary)"),
            &b,
            "COPY changed_rows FROM STDIN (FORMAT binary)",
        )
        .await;
        settle(Some(pg)).await;
        let started = Instant::now();
        exec(
            &b,
            "INSERT INTO users SELECT * FROM changed_rows ON CONFLICT (id) DO UPDATE SET \
             uuid = EXCLUDED.uuid, email = EXCLUDED.email, name = EXCLUDED.name, \
             active = EXCLUDED.active, score = EXCLUDED.score, balance = EXCLUDED.balance, \
             profile = EXCLUDED.profile, created_at = EXCLUDED.created_at, \
             updated_at = EXCLUDED.updated_at",
        )
        .await;
        upserts.push(started.elapsed());
        exec(&b, "DROP TABLE changed_rows").await;
    }
    let (upsert, upsert_samples) = median(&upserts);
    table.push(Row {
        measure: "the receiving server's own upsert of those rows".into(),
        seconds: upsert,
        samples: upsert_samples,
        rows: moved,
        ratio: None,
        wire_ratio: None,
        rss_receiver_mib: None,
        rss_sender_mib: None,
    });
    let (elapsed, samples) = median(&times);
    eprintln!("incremental (1%): {elapsed:.2} s; the server's own upsert: {upsert:.2} s");
    table.push(Row {
        measure: "incremental pull, 1% changed (ratio: to that upsert)".into(),
        seconds: elapsed,
        samples: samples.clone(),
        rows: moved,
        ratio: Some(elapsed / upsert),
        wire_ratio: None,
        rss_receiver_mib: None,
        rss_sender_mib: None,
    });
    table.push(Row {
        measure: "incremental pull, 1% changed (ratio: to the full pull)".into(),
        seconds: elapsed,
        samples,
        rows: moved,
        ratio: full_ws.map(|full| elapsed / full),
        wire_ratio: None,
        rss_receiver_mib: None,
        rss_sender_mib: None,
    });
    drop(setup);

    if knobs.memory {
        let rows = knobs.rows * 4;
        eprintln!("memory: {rows} rows ...");
        let (a4_url, a4) = pg.database("a4").await;
        let (b4_url, _b4) = pg.database("b4").await;
        exec(&a4, &users_ddl("users")).await;
        exec(&a4, &users_fill("users", rows)).await;
        exec(&a4, "VACUUM ANALYZE users").await;
        let setup = register(&a4_url, &b4_url, dir, knobs, "pg4");
        settle(Some(pg)).await;
        let (_, elapsed, rss_b, rss_a) = setup.receiver.pull(
            &pull_args(&setup, transport, &depth, &["--strategy", "overwrite"]),
            &setup.sender,
        );
        table.push(Row::once(
            format!("full pull at 4x rows ({transport})"),
            elapsed,
            rows,
            (rss_b, rss_a),
        ));
        // Verification holds a page at most, whatever the table's size: the same two steps at
        // 4x, once each, for their memory.
        let verifying = verify_args(&setup, transport);
        settle(Some(pg)).await;
        let (report, elapsed, rss_b, rss_a) =
            setup.receiver.timed("verify", &verifying, &setup.sender);
        assert_eq!(report["identical"], true, "{report}");
        table.push(Row::once(
            format!("verify, identical, at 4x rows ({transport})"),
            elapsed,
            rows,
            (rss_b, rss_a),
        ));
        exec(
            &a4,
            "UPDATE users SET name = name || '~' WHERE id % 100 = 7",
        )
        .await;
        settle(Some(pg)).await;
        let (report, elapsed, rss_b, rss_a) = setup.receiver.pull(
            &pull_args(&setup, transport, &depth, &["--diff"]),
            &setup.sender,
        );
        assert_eq!(report["identical"], true, "{report}");
        table.push(Row::once(
            format!("pull --diff, 1% changed, at 4x rows ({transport})"),
            elapsed,
            report["tables"][0]["repaired_rows"].as_i64().unwrap_or(-1),
            (rss_b, rss_a),
        ));
    }

    text_bytes
}

/// Step 6: SQLite → SQLite against its own baseline.
async fn sqlite_steps(pg: Option<&Pg>, knobs: &Knobs, dir: &std::path::Path, table: &mut Vec<Row>) {
    let depth = knobs.pipeline_depth.to_string();
    let transport = knobs.transports[0].as_str();
    {
        eprintln!("SQLite: {} rows ...", knobs.rows);
        let a_file = dir.join("a.db");
        let b_file = dir.join("b.db");
        let base_file = dir.join("baseline.db");
        let a_url = format!("sqlite://{}?mode=rwc", a_file.display());
        let source = sqlx::SqlitePool::connect(&a_url).await.unwrap();
        for sql in [
            "CREATE TABLE users (id INTEGER PRIMARY KEY, uuid BLOB NOT NULL, email TEXT NOT NULL, name TEXT NOT NULL, \
             active INTEGER NOT NULL, score INTEGER, balance REAL, profile TEXT, created_at TEXT NOT NULL, updated_at TEXT NOT NULL)".to_owned(),
            format!(
                "WITH RECURSIVE n(g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM n WHERE g < {}) \
                 INSERT INTO users SELECT g, randomblob(16), 'user' || g || '@example.com', 'User Number ' || g, g % 3 = 0, \
                 g % 1000, g * 3.07, json_object('plan', 'p' || (g % 5)), datetime(1704067200 + g, 'unixepoch'), \
                 datetime(1704067200 + g, 'unixepoch') FROM n",
                knobs.rows
            ),
        ] {
            sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&source).await.unwrap();
        }
        // Each run into a database file of its own.
        let mut times = Vec::new();
        for run in 0..knobs.repeat {
            settle(pg).await;
            let started = Instant::now();
            let mut conn = source.acquire().await.unwrap();
            for sql in [
                format!("ATTACH DATABASE '{}{run}' AS baseline", base_file.display()),
                "CREATE TABLE baseline.users (id INTEGER PRIMARY KEY, uuid BLOB NOT NULL, email TEXT NOT NULL, name TEXT NOT NULL, \
                 active INTEGER NOT NULL, score INTEGER, balance REAL, profile TEXT, created_at TEXT NOT NULL, updated_at TEXT NOT NULL)".to_owned(),
                "INSERT INTO baseline.users SELECT * FROM main.users".to_owned(),
            ] {
                sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut *conn).await.unwrap();
            }
            times.push(started.elapsed());
            sqlx::query("DETACH DATABASE baseline")
                .execute(&mut *conn)
                .await
                .unwrap();
        }
        source.close().await;
        let (sqlite_baseline, samples) = median(&times);
        table.push(Row {
            measure: "SQLite baseline: INSERT INTO attached SELECT".into(),
            seconds: sqlite_baseline,
            samples,
            rows: knobs.rows,
            ratio: Some(1.0),
            wire_ratio: None,
            rss_receiver_mib: None,
            rss_sender_mib: None,
        });
        let setup = register(
            &format!("sqlite://{}", a_file.display()),
            &format!("sqlite://{}", b_file.display()),
            dir,
            knobs,
            "sqlite",
        );
        // Each run into an empty target; the peaks are the first run's.
        let target = sqlx::SqlitePool::connect(&format!("sqlite://{}", b_file.display()))
            .await
            .unwrap();
        let mut times = Vec::new();
        let mut first = None;
        for _ in 0..knobs.repeat {
            for sql in [
                "DROP TABLE IF EXISTS users",
                "DELETE FROM dbsync_checkpoints",
            ] {
                sqlx::query(sql).execute(&target).await.unwrap();
            }
            settle(pg).await;
            let (summary, elapsed, rss_b, rss_a) = setup.receiver.pull(
                &pull_args(&setup, transport, &depth, &["--strategy", "overwrite"]),
                &setup.sender,
            );
            assert_eq!(summary["tables"][0]["rows"].as_i64(), Some(knobs.rows));
            times.push(elapsed);
            first.get_or_insert((rss_b, rss_a));
        }
        target.close().await;
        let (elapsed, samples) = median(&times);
        let (rss_b, rss_a) = first.expect("at least one run");
        table.push(Row {
            measure: format!("SQLite full pull ({transport})"),
            seconds: elapsed,
            samples,
            rows: knobs.rows,
            ratio: Some(elapsed / sqlite_baseline),
            wire_ratio: None,
            rss_receiver_mib: Some(mib(rss_b)),
            rss_sender_mib: Some(mib(rss_a)),
        });
    }
}

/// Prints the table and writes the JSON report.
fn report(knobs: &Knobs, text_bytes: Option<u64>, table: &[Row]) {
    println!(
        "\n{:<58} {:>9} {:>12} {:>10} {:>12} {:>7} {:>10} {:>10} {:>10}",
        "measure",
        "seconds",
        "runs",
        "rows",
        "rows/s",
        "ratio",
        "wire/text",
        "RSS recv",
        "RSS send"
    );
    let opt = |v: Option<f64>, unit: &str| v.map_or("-".to_owned(), |v| format!("{v:.2}{unit}"));
    for row in table {
        let (low, high) = row
            .samples
            .iter()
            .fold((f64::MAX, f64::MIN), |(l, h), s| (l.min(*s), h.max(*s)));
        let runs = if row.samples.len() > 1 {
            format!("{low:.2}-{high:.2}")
        } else {
            "-".to_owned()
        };
        println!(
            "{:<58} {:>9.2} {:>12} {:>10} {:>12.0} {:>7} {:>10} {:>10} {:>10}",
            row.measure,
            row.seconds,
            runs,
            row.rows,
            row.rows as f64 / row.seconds.max(1e-9),
            opt(row.ratio, ""),
            opt(row.wire_ratio, ""),
            opt(row.rss_receiver_mib, " MiB"),
            opt(row.rss_sender_mib, " MiB"),
        );
    }
    let report = json!({
        "knobs": {
            "rows": knobs.rows, "transports": knobs.transports, "zstd_level": knobs.zstd_level,
            "batch_rows": knobs.batch_rows, "pipeline_depth": knobs.pipeline_depth,
            "repeat": knobs.repeat,
        },
        "copy_text_bytes": text_bytes,
        "results": table.iter().map(|r| json!({
            "measure": r.measure, "seconds": r.seconds, "samples": r.samples, "rows": r.rows,
            "rows_per_second": r.rows as f64 / r.seconds.max(1e-9),
            "ratio": r.ratio, "wire_over_copy_text": r.wire_ratio,
            "peak_rss_receiver_mib": r.rss_receiver_mib, "peak_rss_sender_mib": r.rss_sender_mib,
        })).collect::<Vec<_>>(),
    });
    if let Some(parent) = std::path::Path::new(&knobs.json).parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    std::fs::write(&knobs.json, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    println!("\nwritten to {}", knobs.json);
}

// ---------------------------------------------------------------------------------------------
// Over a shaped link (`--link RATE`).

/// The receiving side's network namespace and the veth pair to it.
const NETNS: &str = "dbsync-bench";
const VETH: &str = "dbsb0";
const VETH_PEER: &str = "dbsb1";
const HOST_IP: &str = "10.231.0.1";
const NETNS_IP: &str = "10.231.0.2";

/// Runs a command; its error output when it fails.
fn sh(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Bits per second of a `tc` rate (`10mbit`, `1gbit`, `500kbit`).
fn rate_bits(rate: &str) -> Option<f64> {
    let rate = rate.to_ascii_lowercase();
    let digits = rate.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let number: f64 = digits.parse().ok()?;
    let scale = match &rate[digits.len()..] {
        "bit" => 1.0,
        "kbit" => 1e3,
        "mbit" => 1e6,
        "gbit" => 1e9,
        _ => return None,
    };
    Some(number * scale)
}

/// A network namespace behind a veth pair whose both ends send at most `rate` (token bucket,
/// `tc ... tbf`); removed when dropped.
struct ShapedLink;

impl ShapedLink {
    fn up(rate: &str) -> Result<Self, String> {
        let bits = rate_bits(rate).ok_or_else(|| format!("{rate:?} is not a rate like 100mbit"))?;
        // A bucket of 10 ms of the rate (at least 64 KiB), so a fast link is not held back by
        // the timer; queueing bounded at 50 ms.
        let burst = format!("{}b", ((bits / 8.0 / 100.0) as u64).max(64 * 1024));
        let _ = sh("ip", &["netns", "del", NETNS]);
        let _ = sh("ip", &["link", "del", VETH]);
        let link = ShapedLink;
        let host = format!("{HOST_IP}/24");
        let peer = format!("{NETNS_IP}/24");
        for (program, args) in [
            ("ip", vec!["netns", "add", NETNS]),
            (
                "ip",
                vec![
                    "link", "add", VETH, "type", "veth", "peer", "name", VETH_PEER,
                ],
            ),
            ("ip", vec!["link", "set", VETH_PEER, "netns", NETNS]),
            ("ip", vec!["addr", "add", &host, "dev", VETH]),
            ("ip", vec!["link", "set", VETH, "up"]),
            (
                "ip",
                vec!["-n", NETNS, "addr", "add", &peer, "dev", VETH_PEER],
            ),
            ("ip", vec!["-n", NETNS, "link", "set", VETH_PEER, "up"]),
            ("ip", vec!["-n", NETNS, "link", "set", "lo", "up"]),
            (
                "tc",
                vec![
                    "qdisc", "add", "dev", VETH, "root", "tbf", "rate", rate, "burst", &burst,
                    "latency", "50ms",
                ],
            ),
            (
                "ip",
                vec![
                    "netns", "exec", NETNS, "tc", "qdisc", "add", "dev", VETH_PEER, "root", "tbf",
                    "rate", rate, "burst", &burst, "latency", "50ms",
                ],
            ),
        ] {
            sh(program, &args)?;
        }
        Ok(link)
    }
}

impl Drop for ShapedLink {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the pair, and with it the pair.
        let _ = sh("ip", &["netns", "del", NETNS]);
    }
}

/// `url` (a database on the local server) as reached through the server's Unix socket: from
/// inside the namespace, without crossing the shaped link.
fn socket_url(url: &str, socket_dir: &str) -> String {
    let name = url.rsplit('/').next().unwrap_or_default();
    format!("postgres://postgres@localhost/{name}?host={socket_dir}")
}

/// The database name of `url`.
fn database_name(url: &str) -> &str {
    url.rsplit('/').next().unwrap_or_default()
}

/// Runs `script` with `sh -c`, inside the namespace when `netns`; waits for it.
fn shell(script: &str, netns: bool) -> std::process::ExitStatus {
    let mut command = if netns {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", NETNS, "sh", "-c", script]);
        c
    } else {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    };
    command.status().expect("sh")
}

/// Starts `script` with `sh -c` inside the namespace.
fn spawn_in_netns(script: &str) -> Child {
    Command::new("ip")
        .args(["netns", "exec", NETNS, "sh", "-c", script])
        .spawn()
        .expect("sh")
}

/// Over a link shaped to `rate`, the same run measures: the raw COPY pipe across it (`psql` COPY
/// TO STDOUT at A, through the link, into `psql` COPY FROM STDIN at B); `pg_dump -Fc` at A, the
/// file across the link, `pg_restore` at B; and full pulls over each transport, the receiver
/// (its `serve` and its `pull`) inside the namespace. B's database is reached through the
/// server's Unix socket from inside the namespace, so only the measured traffic crosses the
/// link. Needs root, `ip`, `tc`, `socat`, `psql`, `pg_dump` and `pg_restore`; without them the
/// step says why and is skipped. Returns the table's size as COPY text.
async fn link_steps(
    pg: &mut Pg,
    rate: &str,
    knobs: &Knobs,
    dir: &std::path::Path,
    table: &mut Vec<Row>,
) -> Option<u64> {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let socket_dir = "/var/run/postgresql";
    let missing: Vec<&str> = ["ip", "tc", "socat", "psql", "pg_dump", "pg_restore"]
        .into_iter()
        .filter(|tool| sh("sh", &["-c", &format!("command -v {tool}")]).is_err())
        .collect();
    if !root || !missing.is_empty() || !std::path::Path::new(socket_dir).exists() {
        eprintln!(
            "SKIPPED --link {rate}: needs root (network namespaces), {socket_dir} (the server's \
             socket) and ip, tc, socat, psql, pg_dump, pg_restore (missing: {missing:?})"
        );
        return None;
    }
    let link = match ShapedLink::up(rate) {
        Ok(link) => link,
        Err(err) => {
            eprintln!("SKIPPED --link {rate}: setting up the link failed: {err}");
            return None;
        }
    };
    eprintln!("building {} rows on A ...", knobs.rows);
    let (a_url, a) = pg.database("a").await;
    let (b_url, b) = pg.database("b").await;
    exec(&a, &users_ddl("users")).await;
    exec(&a, &users_fill("users", knobs.rows)).await;
    exec(&a, "VACUUM ANALYZE users").await;
    let text_bytes = copy_text_bytes(&a, "users").await;
    let binary_bytes = copy_out_bytes(&a, "COPY users TO STDOUT (FORMAT binary)").await;
    let (a_name, b_name) = (database_name(&a_url), database_name(&b_url));
    let port = 15_000 + std::process::id() % 20_000;

    // The raw COPY pipe across the link.
    let mut times = Vec::new();
    for _ in 0..knobs.repeat {
        exec(&b, "DROP TABLE IF EXISTS users").await;
        exec(&b, &users_ddl("users")).await;
        settle(Some(pg)).await;
        let started = Instant::now();
        let mut sink = spawn_in_netns(&format!(
            "socat -u TCP-LISTEN:{port},reuseaddr STDOUT | psql -X -q -v ON_ERROR_STOP=1 \
             -h {socket_dir} -U postgres -d {b_name} -c 'COPY users FROM STDIN (FORMAT binary)'"
        ));
        let source = shell(
            &format!(
                "psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -U postgres -d {a_name} \
                 -c 'COPY users TO STDOUT (FORMAT binary)' \
                 | socat -u STDIN TCP:{NETNS_IP}:{port},retry=100,interval=0.05"
            ),
            false,
        );
        let received = sink.wait().expect("the pipe's far end");
        assert!(
            source.success() && received.success(),
            "the COPY pipe failed"
        );
        times.push(started.elapsed());
    }
    let (baseline, samples) = median(&times);
    eprintln!("COPY pipe over {rate}: {baseline:.2} s");
    table.push(Row {
        measure: format!("COPY binary | link {rate} | COPY"),
        seconds: baseline,
        samples,
        rows: knobs.rows,
        ratio: Some(1.0),
        wire_ratio: Some(binary_bytes as f64 / text_bytes as f64),
        rss_receiver_mib: None,
        rss_sender_mib: None,
    });

    // pg_dump -Fc, the file across the link, pg_restore.
    let dump = dir.join("users.dump");
    let landed = dir.join("landed.dump");
    let mut times = Vec::new();
    let mut dump_bytes = 0;
    for _ in 0..knobs.repeat {
        exec(&b, "DROP TABLE IF EXISTS users").await;
        settle(Some(pg)).await;
        let started = Instant::now();
        let dumped = shell(
            &format!(
                "pg_dump -Fc -t users -h 127.0.0.1 -U postgres -d {a_name} -f {}",
                dump.display()
            ),
            false,
        );
        let mut sink = spawn_in_netns(&format!(
            "socat -u TCP-LISTEN:{port},reuseaddr OPEN:{},creat,trunc",
            landed.display()
        ));
        let sent = shell(
            &format!(
                "socat -u FILE:{} TCP:{NETNS_IP}:{port},retry=100,interval=0.05",
                dump.display()
            ),
            false,
        );
        let received = sink.wait().expect("the file's far end");
        let restored = shell(
            &format!(
                "pg_restore --no-owner -h {socket_dir} -U postgres -d {b_name} {}",
                landed.display()
            ),
            true,
        );
        assert!(
            dumped.success() && sent.success() && received.success() && restored.success(),
            "pg_dump, the copy across or pg_restore failed"
        );
        times.push(started.elapsed());
        dump_bytes = std::fs::metadata(&dump).map_or(0, |m| m.len());
    }
    let (elapsed, samples) = median(&times);
    eprintln!("pg_dump + file + pg_restore over {rate}: {elapsed:.2} s");
    table.push(Row {
        measure: format!("pg_dump -Fc, file over link {rate}, pg_restore"),
        seconds: elapsed,
        samples,
        rows: knobs.rows,
        ratio: Some(elapsed / baseline),
        wire_ratio: Some(dump_bytes as f64 / text_bytes as f64),
        rss_receiver_mib: None,
        rss_sender_mib: None,
    });

    // dbsync: the sender here, the receiver inside the namespace.
    let sender = Agent::start_on(&a_url, dir, "a-link", knobs, HOST_IP, None);
    let receiver = Agent::start_on(
        &socket_url(&b_url, socket_dir),
        dir,
        "b-link",
        knobs,
        NETNS_IP,
        Some(NETNS),
    );
    let setup = connect(sender, receiver);
    for (transport, parallel) in full_pull_steps(knobs) {
        let row = full_pulls(pg, &b, &setup, knobs, transport, parallel)
            .await
            .row(
                full_pull_measure(transport, parallel, &format!(", link {rate}")),
                baseline,
                text_bytes,
            );
        table.push(row);
    }
    drop(setup);
    drop(link);
    Some(text_bytes)
}
