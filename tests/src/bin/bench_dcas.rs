//! `bench_dcas`: the evaluation of Zheng et al. (DCAS, Internetware 2017) on one machine,
//! ABS against DCAS, with real job manager and task manager processes.
//!
//! The recovery pipeline is the paper's: generator (`--rate` records/s, 10,000 keys) → map
//! → filter → keyed 1 s window count → discard sink, each stage in its own slot sharing
//! group on its own task manager (one slot each; 5 busy task managers plus 3 spares). A
//! kill is a SIGKILL of the task managers running the chosen stages (fresh ones join once
//! the job caught up); every phase comes from the job's failover record, measured from the
//! kill, beside when the killed processes exited (were reaped): no peer can see a failure
//! before its sockets close, which on these 2 busy cores takes a few ms.
//!
//! - (a) recovery time when the failed task manager hosts stage 1..5 (median of `--kills`);
//! - (b) recovery time for 1, 2, 3 simultaneous failures (the last stages; the cache keeps
//!   three backups there so DCAS loses nothing);
//! - (c) DCAS recovery time (aggregate stage killed) and saturated throughput for
//!   micro-windows of 100 .. 1600 records and the default;
//! - (d) saturated throughput of no checkpointing, ABS and DCAS on the keyed-count pipeline
//!   (parallelism 2 on two task managers), as ratios within one run;
//! - (e) the same on the paper's Kafka-fed pipeline: a Kafka topic of click events (filled
//!   once, before the rounds) → key_by user → 2 s window count → discard, each job reading
//!   the whole topic from the broker named by `WEIR_KAFKA_BOOTSTRAP` (skipped without it);
//! - (f) incremental snapshots against whole ones: a running count, a session count and a
//!   windowed join over 1,000,000 keys at a steady rate, so each snapshot sees a few
//!   percent of the state change.
//!
//! (a) is also drawn as an SVG bar chart under `target/bench/`.
//!
//! The flags are in `USAGE` (`--help` prints it).

use std::time::Duration;

use engine::spec::DEFAULT_SNAPSHOT_EVERY_RECORDS;
use engine::telemetry::now_ms;
use serde_json::{json, Value};
use weir_tests::bench::{caught_up, keyed_count, phase, run_rate, wait_checkpoints_since_restore};
use weir_tests::cluster::{bin_dir, Cluster, ClusterOptions};
use weir_tests::median;

/// The command line (`--help` prints it). `--stages`: (a) for those stages only, numbered
/// from 1, without the chart; `--d-backups`: the cache's backup count in (d), default 1;
/// `--fallback MS`: a DCAS row with fallback checkpoints to disk that often in (d) and (e).
const USAGE: &str = "target/release/bench_dcas [--rate R --kills K --stages S,... \
    --records N --rounds K --kafka-records N --windows A,B,... --d-backups N --fallback MS \
    --f-keys N --f-rate R --f-records N --f-reduce 0|1 --f-session 0|1 --f-join 0|1 \
    --a 0|1 --b 0|1 --c 0|1 --d 0|1 --e 0|1 --f 0|1]  (cargo build --release --bins first)";

const STAGES: [&str; 5] = ["source", "map", "filter", "aggregate", "sink"];
/// The vertex of each stage (key_by and the window count share the aggregate's slot).
const STAGE_VERTEX: [usize; 5] = [0, 1, 2, 4, 5];
/// Task managers running a stage, plus spares for the restarted subtasks.
const TASKMANAGERS: usize = 8;

/// Checkpointing of one mode: ABS every second, or DCAS with a micro-window of `window`
/// records.
fn mode(name: &str, window: u64) -> Value {
    match name {
        "abs" => json!({"mode": "abs", "interval_ms": 1000}),
        _ => json!({"mode": "dcas", "snapshot_every_records": window}),
    }
}

/// The five-stage pipeline at `rate` records/s.
fn pipeline(rate: u64, checkpointing: Value) -> String {
    json!({"name": "five-stages", "checkpointing": checkpointing, "operators": [
        {"id": "source", "kind": "generator", "slot_sharing_group": "source",
         "params": {"rate": rate, "keys": 10000, "seed": 3, "events_per_second": 100_000}},
        {"id": "map", "kind": "map", "input": "source", "slot_sharing_group": "map",
         "params": {"expr": "value * 2"}},
        {"id": "filter", "kind": "filter", "input": "map", "slot_sharing_group": "filter",
         "params": {"expr": "value % 10 != 0"}},
        {"id": "key", "kind": "key_by", "input": "filter", "slot_sharing_group": "aggregate",
         "params": {"expr": "value"}},
        {"id": "count", "kind": "window_aggregate", "input": "key", "slot_sharing_group": "aggregate",
         "params": {"window": {"tumbling_ms": 1000}, "agg": "count"}},
        {"id": "sink", "kind": "discard", "input": "count", "slot_sharing_group": "sink"}]})
    .to_string()
}

/// One recovery: kill → every restarted subtask running with its state (DCAS: and its log
/// replayed), kill → the inputs caught up, kill → caught up (the sinks' latency back to
/// normal), log entries replayed.
#[derive(Clone, Copy, Default)]
struct Recovery {
    /// The SIGKILLed processes exited (were reaped): the failure's own part, before any
    /// peer can see it.
    exited: f64,
    running: f64,
    inputs: f64,
    caught_up: f64,
    replayed: f64,
}

/// A job of the five-stage pipeline on a cluster, killed again and again.
struct Victim {
    id: String,
    dcas: bool,
    kills: usize,
    /// When the last kill's recovery caught up (ms since the epoch; 0 before).
    settled_ms: u64,
}

impl Victim {
    fn start(c: &Cluster, rate: u64, checkpointing: Value) -> Victim {
        let dcas = checkpointing["mode"] == "dcas";
        let id = c.submit(&pipeline(rate, checkpointing));
        c.wait_until(Duration::from_secs(30), "job running", |c| {
            c.job(&id)["state"] == "RUNNING"
        });
        Victim {
            id,
            dcas,
            kills: 0,
            settled_ms: 0,
        }
    }

    /// SIGKILLs the task managers running `stages` at once, waits for the job to catch up,
    /// and starts as many fresh task managers.
    fn kill(&mut self, c: &mut Cluster, stages: &[usize]) -> Recovery {
        // Steady state first: three checkpoints since the last restore (ABS), or the
        // cache re-replicated and a few micro-windows snapshotted (DCAS).
        c.wait_cache_settled(TASKMANAGERS);
        if self.dcas {
            std::thread::sleep(Duration::from_secs(2));
        } else {
            wait_checkpoints_since_restore(c, &self.id, 3);
        }
        // A failure strikes anywhere in a checkpoint interval: the k-th kill waits a
        // fraction of the 1 s interval spread evenly over (0, 1), the same in both modes.
        let fraction = (0.3 + self.kills as f64 * 0.618_034) % 1.0;
        std::thread::sleep(Duration::from_secs_f64(fraction));
        let job = c.job(&self.id);
        assert_eq!(job["state"], "RUNNING", "{job}");
        let vertices = job["vertices"].as_array().expect("vertices");
        let tm = |s: usize| {
            vertices[STAGE_VERTEX[s]]["subtasks"][0]["taskmanager"]
                .as_str()
                .expect("placement")
        };
        let mut victims: Vec<usize> = stages.iter().map(|&s| c.taskmanager_index(tm(s))).collect();
        victims.sort();
        victims.dedup();
        assert_eq!(
            victims.len(),
            stages.len(),
            "each stage on its own task manager"
        );
        let killed = now_ms();
        let exited = c.kill_taskmanagers(&victims);
        let event = caught_up(c, &self.id, self.settled_ms, killed);
        self.settled_ms = now_ms();
        // Replacements join once the job caught up: started during the recovery, their
        // start-up would take these 2 cores from it (the paper's machines are separate),
        // and the spares already hold the restarted subtasks.
        for _ in &victims {
            c.add_taskmanager();
        }
        self.kills += 1;
        let running = if self.dcas {
            "replayed_ms"
        } else {
            "restored_ms"
        };
        let r = Recovery {
            exited: exited.as_secs_f64() * 1000.0,
            running: phase(&event, running, killed),
            inputs: phase(&event, "inputs_caught_up_ms", killed),
            caught_up: phase(&event, "caught_up_ms", killed),
            replayed: event["log_replayed"].as_f64().unwrap_or(0.0),
        };
        eprintln!(
            "{} kill {:?}: exited after {:.1} ms, running after {:.0} ms, inputs caught up after {:.0} ms, caught up after {:.0} ms, {} log entries replayed: {event}",
            if self.dcas { "DCAS" } else { "ABS" },
            stages.iter().map(|&s| STAGES[s]).collect::<Vec<_>>(),
            r.exited,
            r.running,
            r.inputs,
            r.caught_up,
            r.replayed
        );
        r
    }

    fn stop(self, c: &Cluster) {
        let _ = c.request("DELETE", &format!("/jobs/{}", self.id), None, None);
        c.wait_for_end(&self.id, Duration::from_secs(30));
    }
}

/// Median of each field over `runs`.
fn medians(runs: &[Recovery]) -> Recovery {
    let m = |f: fn(&Recovery) -> f64| median(runs.iter().map(f).collect());
    Recovery {
        exited: m(|r| r.exited),
        running: m(|r| r.running),
        inputs: m(|r| r.inputs),
        caught_up: m(|r| r.caught_up),
        replayed: m(|r| r.replayed),
    }
}

fn cluster(backups: u64) -> Cluster {
    let c = Cluster::start(ClusterOptions {
        taskmanagers: TASKMANAGERS,
        slots: 1,
        jobmanager_args: vec!["--cache-backup-count".into(), backups.to_string()],
        ..Default::default()
    });
    c.wait_cache_settled(TASKMANAGERS);
    c
}

/// Kills `stages` `kills` times in a fresh job of each mode; (ABS, DCAS) medians.
fn abs_vs_dcas(c: &mut Cluster, rate: u64, kills: usize, stages: &[usize]) -> [Recovery; 2] {
    ["abs", "dcas"].map(|m| {
        let mut job = Victim::start(c, rate, mode(m, DEFAULT_SNAPSHOT_EVERY_RECORDS));
        let runs: Vec<Recovery> = (0..kills).map(|_| job.kill(c, stages)).collect();
        job.stop(c);
        medians(&runs)
    })
}

fn print_header(first: &str) {
    println!("| {first} | ABS exited | ABS running | ABS inputs caught up | ABS caught up | DCAS exited | DCAS running | DCAS inputs caught up | DCAS caught up | log entries replayed | ABS / DCAS (caught up) |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
}

fn print_row(name: &str, [abs, dcas]: &[Recovery; 2]) {
    println!(
        "| {name} | {:.1} | {:.0} | {:.0} | {:.0} | {:.1} | {:.0} | {:.0} | **{:.0}** | {:.0} | {:.1}× |",
        abs.exited,
        abs.running,
        abs.inputs,
        abs.caught_up,
        dcas.exited,
        dcas.running,
        dcas.inputs,
        dcas.caught_up,
        dcas.replayed,
        abs.caught_up / dcas.caught_up.max(1.0)
    );
}

fn by_stage(args: &[String], rate: u64, kills: usize) {
    // `--stages 1,5`: only those stages (numbered from 1); the chart needs all five.
    let only = weir_tests::arg_list(args, "--stages");
    let stages: Vec<usize> = match &only {
        Some(list) => list
            .iter()
            .map(|&s| match s {
                1..=5 => s as usize - 1,
                _ => panic!("--stages takes stages 1 to 5, not {s}"),
            })
            .collect(),
        None => (0..STAGES.len()).collect(),
    };
    let mut c = cluster(1);
    let rows: Vec<[Recovery; 2]> = stages
        .iter()
        .map(|&s| abs_vs_dcas(&mut c, rate, kills, &[s]))
        .collect();
    println!("(a) recovery (ms after the SIGKILL) by the stage whose task manager failed, {rate} records/s, median of {kills}");
    println!();
    print_header("failed stage");
    for (&s, row) in stages.iter().zip(&rows) {
        print_row(&format!("{} {}", s + 1, STAGES[s]), row);
    }
    println!();
    if only.is_some() {
        return;
    }
    let path = bin_dir()
        .parent()
        .map(|p| p.join("bench"))
        .unwrap_or_else(|| "target/bench".into());
    let _ = std::fs::create_dir_all(&path);
    let path = path.join("dcas-recovery.svg");
    match std::fs::write(&path, chart(&rows)) {
        Ok(()) => println!("Chart: {}", path.display()),
        Err(e) => eprintln!("could not write {}: {e}", path.display()),
    }
    println!();
}

fn simultaneous(rate: u64, kills: usize) {
    let mut c = cluster(3);
    let rows: Vec<[Recovery; 2]> = (1..=3)
        .map(|n| {
            let stages: Vec<usize> = (STAGES.len() - n..STAGES.len()).collect();
            abs_vs_dcas(&mut c, rate, kills, &stages)
        })
        .collect();
    println!("(b) recovery (ms after the SIGKILL) for simultaneous failures of the last stages' task managers, cache backup count 3, {rate} records/s, median of {kills}");
    println!();
    print_header("task managers killed");
    for (n, row) in rows.iter().enumerate() {
        print_row(&(n + 1).to_string(), row);
    }
    println!();
}

fn micro_windows(args: &[String], rate: u64, kills: usize) {
    let arg = |name: &str, default: u64| weir_tests::arg(args, name, default);
    let n = arg("--records", 20_000_000);
    let windows = [100, 200, 400, 800, 1600, DEFAULT_SNAPSHOT_EVERY_RECORDS];
    let mut recovery = Vec::new();
    {
        let mut c = cluster(1);
        for &w in &windows {
            let mut job = Victim::start(&c, rate, mode("dcas", w));
            let runs: Vec<Recovery> = (0..kills).map(|_| job.kill(&mut c, &[3])).collect();
            job.stop(&c);
            recovery.push(medians(&runs));
        }
    }
    let c = Cluster::start(ClusterOptions {
        taskmanagers: 2,
        slots: 1,
        ..Default::default()
    });
    let (plain, _) = run_rate(&c, &keyed_count(n, Value::Null), n);
    println!("(c) DCAS by micro-window: recovery with the aggregate stage's task manager killed ({rate} records/s, median of {kills}); saturated keyed count ({n} records, parallelism 2 on 2 task managers; none: {:.2} M records/s)", plain / 1e6);
    println!();
    println!("| snapshot every (records) | running (ms) | caught up (ms) | log entries replayed | records/s | vs none |");
    println!("|---|---|---|---|---|---|");
    for (w, r) in windows.iter().zip(&recovery) {
        let (rate, _) = run_rate(&c, &keyed_count(n, mode("dcas", *w)), n);
        println!(
            "| {w}{} | {:.0} | {:.0} | {:.0} | {:.2} M | {:.1}% |",
            if *w == DEFAULT_SNAPSHOT_EVERY_RECORDS {
                " (default)"
            } else {
                ""
            },
            r.running,
            r.caught_up,
            r.replayed,
            rate / 1e6,
            100.0 * rate / plain
        );
    }
    println!();
}

/// The checkpointing modes whose throughput (d) and (e) compare: none, ABS, DCAS at the
/// default micro-window and at each of `windows` (`--windows a,b,...`).
fn overhead_modes(args: &[String]) -> Vec<(String, Value)> {
    let mut modes = vec![
        ("none".to_string(), Value::Null),
        ("ABS every 1000 ms".to_string(), mode("abs", 0)),
        (
            "DCAS (default micro-window)".to_string(),
            mode("dcas", DEFAULT_SNAPSHOT_EVERY_RECORDS),
        ),
    ];
    for w in weir_tests::arg_list(args, "--windows").unwrap_or_default() {
        modes.push((format!("DCAS, snapshot every {w} records"), mode("dcas", w)));
    }
    // `--fallback <ms>`: DCAS with fallback checkpoints to disk that often as well.
    let fallback = weir_tests::arg(args, "--fallback", 0);
    if fallback > 0 {
        let mut m = mode("dcas", DEFAULT_SNAPSHOT_EVERY_RECORDS);
        m["fallback_abs_interval_ms"] = json!(fallback);
        modes.push((
            format!("DCAS + fallback checkpoints every {fallback} ms"),
            m,
        ));
    }
    modes
}

/// Runs `job(mode)` for every mode, `rounds` times; prints records/s and the ratio to no
/// checkpointing within each round, under `title`.
fn compare_rates(
    c: &Cluster,
    modes: &[(String, Value)],
    title: &str,
    n: u64,
    rounds: usize,
    job: impl Fn(&Value) -> String,
) {
    // Per mode: records/s and task manager CPU µs per record, and their ratios to none.
    let mut rates = vec![Vec::new(); modes.len()];
    let mut ratios = vec![Vec::new(); modes.len()];
    let mut cpus = vec![Vec::new(); modes.len()];
    let mut cpu_ratios = vec![Vec::new(); modes.len()];
    for round in 0..rounds {
        // Every other round runs the modes in reverse, so a machine whose load drifts
        // during a round favours no mode over the rounds.
        let mut order: Vec<usize> = (0..modes.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        let mut got = vec![(0.0, 0.0); modes.len()];
        for i in order {
            let cpu_before = c.taskmanagers_cpu_ms();
            let rate = run_rate(c, &job(&modes[i].1), n).0;
            let cpu_us = (c.taskmanagers_cpu_ms() - cpu_before) as f64 * 1000.0 / n as f64;
            got[i] = (rate, cpu_us);
        }
        eprintln!("round {round}: (records/s, task manager CPU µs/record) {got:?}");
        for (i, (r, cpu)) in got.iter().enumerate() {
            rates[i].push(*r);
            ratios[i].push(r / got[0].0);
            cpus[i].push(*cpu);
            cpu_ratios[i].push(cpu / got[0].1.max(f64::MIN_POSITIVE));
        }
    }
    println!("{title}, {rounds} rounds (ratios within each round)");
    println!();
    println!("| checkpointing | records/s (median) | vs none (median ratio) | task manager CPU per record (median) | vs none |");
    println!("|---|---|---|---|---|");
    for (i, (name, _)) in modes.iter().enumerate() {
        let rate = median(rates[i].clone());
        let rate = if rate >= 1e6 {
            format!("{:.2} M", rate / 1e6)
        } else {
            format!("{:.1} k", rate / 1e3)
        };
        println!(
            "| {name} | {rate} | {:.1}% | {:.2} µs | ×{:.2} |",
            100.0 * median(ratios[i].clone()),
            median(cpus[i].clone()),
            median(cpu_ratios[i].clone())
        );
    }
    println!();
}

/// Two task managers with one slot each (the pipelines have parallelism 2), the cache
/// keeping `backups` backups of every partition.
fn two_taskmanagers(backups: u64) -> Cluster {
    Cluster::start(ClusterOptions {
        taskmanagers: 2,
        slots: 1,
        jobmanager_args: vec!["--cache-backup-count".into(), backups.to_string()],
        ..Default::default()
    })
}

fn overhead(args: &[String]) {
    let arg = |name: &str, default: u64| weir_tests::arg(args, name, default);
    let n = arg("--records", 20_000_000);
    let rounds = arg("--rounds", 3).max(1) as usize;
    let title = format!("(d) saturated keyed count, {n} records, parallelism 2 on 2 task managers");
    compare_rates(
        &two_taskmanagers(arg("--d-backups", 1)),
        &overhead_modes(args),
        &title,
        n,
        rounds,
        |m| keyed_count(n, m.clone()),
    );
}

fn kafka_overhead(args: &[String]) {
    let Some(b) = weir_tests::kafka::bootstrap("bench_dcas (e)") else {
        return;
    };
    let arg = |name: &str, default: u64| weir_tests::arg(args, name, default);
    let n = arg("--kafka-records", 2_000_000);
    let rounds = arg("--rounds", 3).max(1) as usize;
    eprintln!("(e) writing {n} click events to the broker");
    let (topic, ends) = weir_tests::kafka::filled_clicks(&b, "bench-dcas", n, 4);
    let title = format!(
        "(e) Kafka-fed click count ({n} events in 4 partitions → key_by user → 2 s window count → discard), parallelism 2 on 2 task managers"
    );
    compare_rates(
        &two_taskmanagers(1),
        &overhead_modes(args),
        &title,
        n,
        rounds,
        |m| {
            weir_tests::kafka::click_count_job(
                &b,
                "kafka-clicks",
                (&topic, &ends),
                m.clone(),
                "discard",
            )
        },
    );
}

/// A grouped bar chart of kill → caught up by failed stage, ABS against DCAS.
fn chart(rows: &[[Recovery; 2]]) -> String {
    let (w, h, left, bottom, top) = (640.0, 320.0, 56.0, 40.0, 36.0);
    let max = rows
        .iter()
        .flat_map(|r| r.iter().map(|x| x.caught_up))
        .fold(1.0, f64::max)
        * 1.1;
    let plot_h = h - bottom - top;
    let group = (w - left - 16.0) / rows.len() as f64;
    let y = |v: f64| top + plot_h * (1.0 - v / max);
    let mut svg = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{left}" y="20" font-size="14">Recovery (kill → caught up, ms) by failed stage</text>
<rect x="{}" y="10" width="10" height="10" fill="#e15759"/><text x="{}" y="20">ABS</text>
<rect x="{}" y="10" width="10" height="10" fill="#4e79a7"/><text x="{}" y="20">DCAS</text>
<line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="#888"/>
"##,
        w - 140.0,
        w - 126.0,
        w - 80.0,
        w - 66.0,
        h - bottom,
        w - 16.0,
        h - bottom
    );
    for i in 0..=4 {
        let v = max / 4.0 * i as f64;
        svg += &format!(
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{v:.0}</text><line x1=\"{left}\" y1=\"{:.1}\" x2=\"{}\" y2=\"{:.1}\" stroke=\"#eee\"/>\n",
            left - 6.0,
            y(v) + 4.0,
            y(v),
            w - 16.0,
            y(v)
        );
    }
    for (s, row) in rows.iter().enumerate() {
        let x0 = left + group * s as f64 + group * 0.15;
        let bar = group * 0.35;
        for (k, (r, colour)) in row.iter().zip(["#e15759", "#4e79a7"]).enumerate() {
            let x = x0 + bar * k as f64;
            svg += &format!(
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{colour}\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"10\">{:.0}</text>\n",
                y(r.caught_up),
                bar - 2.0,
                h - bottom - y(r.caught_up),
                x + bar / 2.0,
                y(r.caught_up) - 3.0,
                r.caught_up
            );
        }
        svg += &format!(
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{} {}</text>\n",
            x0 + bar,
            h - bottom + 16.0,
            s + 1,
            STAGES[s]
        );
    }
    svg + "</svg>\n"
}

/// (f) Incremental snapshots against whole ones, on three operators whose state is large
/// beside what each 200 ms snapshot sees change (`--f-keys` keys, `--f-records` records at
/// `--f-rate` records/s, event time at the rate of input):
/// - `--f-reduce`: a running count (`reduce`); whole snapshots copy every key, incremental
///   ones the keys updated since the previous snapshot;
/// - `--f-session`: a session count with a 60 s gap (no session closes during the run);
///   incremental snapshots copy the sessions of the keys updated;
/// - `--f-join`: two generators, each keyed, joined in 10 s tumbling windows; incremental
///   snapshots copy the records appended, whole ones every record buffered.
fn incremental(args: &[String]) {
    let arg = |name: &str, default: u64| weir_tests::arg(args, name, default);
    let keys = arg("--f-keys", 1_000_000);
    let rate = arg("--f-rate", 200_000);
    let n = arg("--f-records", 3_000_000);
    let rounds = arg("--rounds", 3).max(1) as usize;
    let modes = [
        ("none".to_string(), Value::Null),
        (
            "DCAS, whole snapshots".to_string(),
            json!({"mode": "dcas", "incremental": false}),
        ),
        (
            "DCAS, incremental snapshots (default)".to_string(),
            json!({"mode": "dcas"}),
        ),
    ];
    let generator = |id: &str, records: u64, rate: u64, seed: u64| {
        json!({"id": id, "kind": "generator", "parallelism": 2,
               "params": {"count": records, "rate": rate, "keys": keys, "seed": seed,
                          "events_per_second": rate}})
    };
    let keyed = |id: &str, input: &str| {
        json!({"id": id, "kind": "key_by", "input": input, "parallelism": 2,
               "params": {"expr": "value"}})
    };
    let discard =
        |input: &str| json!({"id": "d", "kind": "discard", "input": input, "parallelism": 2});
    let jobs = [
        (
            "--f-reduce",
            "running count",
            json!([generator("g", n, rate, 5), keyed("k", "g"),
                {"id": "r", "kind": "reduce", "input": "k", "parallelism": 2, "params": {"agg": "count"}},
                discard("r")]),
        ),
        (
            "--f-session",
            "session count (60 s gap)",
            json!([generator("g", n, rate, 5), keyed("k", "g"),
                {"id": "s", "kind": "window_aggregate", "input": "k", "parallelism": 2,
                 "params": {"window": {"session_gap_ms": 60_000}, "agg": "count"}},
                discard("s")]),
        ),
        (
            "--f-join",
            "join of two keyed streams (10 s tumbling windows)",
            json!([generator("l", n / 2, rate / 2, 5), keyed("kl", "l"),
                generator("r", n / 2, rate / 2, 6), keyed("kr", "r"),
                {"id": "j", "kind": "join", "input": ["kl", "kr"], "parallelism": 2,
                 "params": {"window": {"tumbling_ms": 10_000}}},
                discard("j")]),
        ),
    ];
    for (flag, what, operators) in jobs {
        if arg(flag, 1) == 0 {
            continue;
        }
        let title = format!(
            "(f) {what} over {keys} keys, {n} records at {rate} records/s, parallelism 2 on 2 task managers"
        );
        compare_rates(&two_taskmanagers(1), &modes, &title, n, rounds, |m| {
            let mut spec = json!({"name": "incremental", "operators": operators});
            if !m.is_null() {
                spec["checkpointing"] = m.clone();
            }
            spec.to_string()
        });
    }
}

fn main() {
    let args = weir_tests::bench_args(USAGE);
    let arg = |name: &str, default: u64| weir_tests::arg(&args, name, default);
    let rate = arg("--rate", 100_000);
    let kills = arg("--kills", 3).max(1) as usize;
    if arg("--a", 1) == 1 {
        by_stage(&args, rate, kills);
    }
    if arg("--b", 1) == 1 {
        simultaneous(rate, kills);
    }
    if arg("--c", 1) == 1 {
        micro_windows(&args, rate, kills);
    }
    if arg("--d", 1) == 1 {
        overhead(&args);
    }
    if arg("--e", 1) == 1 {
        kafka_overhead(&args);
    }
    if arg("--f", 1) == 1 {
        incremental(&args);
    }
}
