//! `bench_cache`: the distributed cache on 3 real task manager processes, on loopback.
//!
//! For `backup_count` 1 (every write confirmed by a backup on another process) and, in the
//! same run, `backup_count` 0 (no replication: the floor set by one client round trip):
//!
//! - **append latency**: one append of a 1,000-record batch (100-byte records) in flight at
//!   a time; p50/p99 per append.
//! - **append throughput**: `--appenders` concurrent appenders over 64 lists; records/s
//!   appended across the cluster, and p50/p99 per append under that load.
//! - **put latency**: one 100-byte map put in flight at a time; p50/p99.
//! - **DCAS input logs** (`backup_count` 1 only): `--appenders` subtasks each logging
//!   1,000-record input batches through `runtime::dcas::InputLog`, releasing output (waiting
//!   for the log) after every input batch — one round trip per input — versus after every 8
//!   (group commit: appends overlap with processing); records/s logged.
//!
//! The flags are in `USAGE` (`--help` prints it).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::cache::CacheClient;
use engine::record::{Batch, Record, StreamEvent};
use engine::runtime::dcas::{InputLog, Tail};
use engine::value::Value;
use weir_tests::cluster::{Cluster, ClusterOptions};

/// The command line (`--help` prints it).
const USAGE: &str = "cargo run --release -p weir-tests --bin bench_cache [-- --seconds S --appenders N]  (cargo build --release --bins first)";

const BATCH: usize = 1000;
const RECORD: usize = 100;

/// Input batches between two releases of output in the group-commit phase.
const RELEASE_EVERY: u64 = 8;

/// Records/s logged by `logs` subtasks that wait for their log every `every` input batches.
async fn input_logs(client: &CacheClient, seconds: u64, logs: usize, every: u64) -> f64 {
    let text: Arc<str> = "x".repeat(RECORD - 8).into();
    let records: Vec<Record> = (0..BATCH)
        .map(|i| Record::new(i as i64, Value::Str(text.clone())))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let tasks: Vec<_> = (0..logs)
        .map(|l| {
            let (client, stop, records) = (client.clone(), stop.clone(), records.clone());
            tokio::spawn(async move {
                let name = format!("dcas-bench-{every}-{l}");
                let p = client.list_partition(&name);
                let mut log = InputLog::start(client.clone(), p, name.clone(), 0);
                let mut n = 0u64;
                let mut event = StreamEvent::Data(Batch {
                    first_seq: 0,
                    records,
                });
                while !stop.load(Ordering::Relaxed) {
                    // As the subtask does: the entry is encoded from the borrowed event.
                    if let StreamEvent::Data(b) = &mut event {
                        b.first_seq = n * BATCH as u64;
                    }
                    log.push_parts(0, &event, Tail::None).expect("push");
                    n += 1;
                    if n.is_multiple_of(every) {
                        log.synced().await.expect("log");
                    }
                    if n.is_multiple_of(64) {
                        // As a snapshot would: drop what is logged.
                        log.synced().await.expect("log");
                        client.trim_prefix(p, &name, n).await.expect("trim");
                    }
                }
                log.synced().await.expect("log");
                n
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut batches = 0;
    for t in tasks {
        batches += t.await.expect("logger");
    }
    (batches * BATCH as u64) as f64 / started.elapsed().as_secs_f64()
}

struct Figures {
    append_p50: Duration,
    append_p99: Duration,
    loaded_rate: f64,
    loaded_p50: Duration,
    loaded_p99: Duration,
    put_p50: Duration,
    put_p99: Duration,
    /// DCAS input logs, records/s: waiting after every batch, and every `RELEASE_EVERY`.
    log_rates: Option<(f64, f64)>,
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn p50_p99(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (percentile(&v, 0.50), percentile(&v, 0.99))
}

/// Keeps memory bounded (the benchmark measures appends, not storage): every 50 batches a
/// list drops what it holds, as DCAS trims a log after a snapshot.
async fn trim(client: &CacheClient, p: u32, list: &str, first: u64) {
    if (first / BATCH as u64) % 50 == 49 {
        client.trim_prefix(p, list, first).await.expect("trim");
    }
}

async fn measure(client: &CacheClient, seconds: u64, appenders: usize, logs: bool) -> Figures {
    let batch: Vec<Vec<u8>> = (0..BATCH).map(|i| vec![(i % 251) as u8; RECORD]).collect();
    // Warm-up: connections, allocator.
    for i in 0..50 {
        let name = format!("warm-{}", i % 8);
        let p = client.list_partition(&name);
        client
            .append(p, &name, batch.clone())
            .await
            .expect("append");
    }
    let phase = Duration::from_secs(seconds);

    let mut one = Vec::new();
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < phase {
        let name = format!("seq-{}", n % 64);
        let p = client.list_partition(&name);
        let items = batch.clone();
        let t = Instant::now();
        let first = client.append(p, &name, items).await.expect("append");
        one.push(t.elapsed());
        n += 1;
        trim(client, p, &name, first).await;
    }
    let (append_p50, append_p99) = p50_p99(one);

    let stop = Arc::new(AtomicBool::new(false));
    let loaded_started = Instant::now();
    let tasks: Vec<_> = (0..appenders)
        .map(|a| {
            let (client, stop, batch) = (client.clone(), stop.clone(), batch.clone());
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut k = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let name = format!("load-{}", (a + k * appenders) % 64);
                    let p = client.list_partition(&name);
                    let items = batch.clone();
                    let t = Instant::now();
                    let first = client.append(p, &name, items).await.expect("append");
                    lat.push(t.elapsed());
                    k += 1;
                    trim(&client, p, &name, first).await;
                }
                lat
            })
        })
        .collect();
    tokio::time::sleep(phase).await;
    stop.store(true, Ordering::Relaxed);
    let mut loaded = Vec::new();
    for t in tasks {
        loaded.extend(t.await.expect("appender"));
    }
    let elapsed = loaded_started.elapsed().as_secs_f64();
    let loaded_rate = (loaded.len() * BATCH) as f64 / elapsed;
    let (loaded_p50, loaded_p99) = p50_p99(loaded);

    let mut puts = Vec::new();
    let started = Instant::now();
    let mut i = 0u64;
    while started.elapsed() < phase {
        let t = Instant::now();
        client
            .put("bench", &i.to_le_bytes(), vec![7; RECORD], None)
            .await
            .expect("put");
        puts.push(t.elapsed());
        i += 1;
    }
    let (put_p50, put_p99) = p50_p99(puts);
    let log_rates = if logs {
        Some((
            input_logs(client, seconds, appenders, 1).await,
            input_logs(client, seconds, appenders, RELEASE_EVERY).await,
        ))
    } else {
        None
    };
    Figures {
        append_p50,
        append_p99,
        loaded_rate,
        loaded_p50,
        loaded_p99,
        put_p50,
        put_p99,
        log_rates,
    }
}

fn run(backups: u32, seconds: u64, appenders: usize) -> Figures {
    let cluster = Cluster::start(ClusterOptions {
        taskmanagers: 3,
        jobmanager_args: vec!["--cache-backup-count".into(), backups.to_string()],
        ..ClusterOptions::default()
    });
    cluster.wait_until(Duration::from_secs(60), "cache settled", |c| {
        let (_, v) = c.get("/cache");
        v["members"].as_array().map(Vec::len) == Some(3)
            && v["progress"]["misplaced"] == 0
            && v["progress"]["syncing"] == 0
    });
    let (_, v) = cluster.get("/cache");
    let addrs: Vec<String> = v["members"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["addr"].as_str().map(str::to_string))
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let client = CacheClient::connect(&addrs, Duration::from_secs(20))
            .await
            .expect("client");
        measure(&client, seconds, appenders, backups > 0).await
    })
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn main() {
    let args = weir_tests::bench_args(USAGE);
    let seconds = weir_tests::arg(&args, "--seconds", 5);
    let appenders = weir_tests::arg(&args, "--appenders", 8) as usize;
    println!(
        "3 task managers on loopback; batches of {BATCH} records of {RECORD} bytes; {seconds} s per phase; {appenders} concurrent appenders"
    );
    let replicated = run(1, seconds, appenders);
    let single = run(0, seconds, appenders);
    for (name, f) in [("backup_count 1", &replicated), ("backup_count 0", &single)] {
        println!(
            "{name}: append p50 {} p99 {} | {appenders} appenders: {:.2} M records/s, append p50 {} p99 {} | put p50 {} p99 {}",
            ms(f.append_p50),
            ms(f.append_p99),
            f.loaded_rate / 1e6,
            ms(f.loaded_p50),
            ms(f.loaded_p99),
            ms(f.put_p50),
            ms(f.put_p99),
        );
    }
    println!(
        "replication cost: append p50 x{:.2}, throughput x{:.2}, put p50 x{:.2}",
        replicated.append_p50.as_secs_f64() / single.append_p50.as_secs_f64().max(1e-9),
        replicated.loaded_rate / single.loaded_rate.max(1.0),
        replicated.put_p50.as_secs_f64() / single.put_p50.as_secs_f64().max(1e-9),
    );
    if let Some((each, group)) = replicated.log_rates {
        println!(
            "DCAS input logs ({appenders} subtasks, backup_count 1): waiting for the log after every input batch {:.2} M records/s | after every {RELEASE_EVERY} (group commit) {:.2} M records/s | x{:.2}",
            each / 1e6,
            group / 1e6,
            group / each.max(1.0),
        );
    }
}
