//! `bench_abs`: what ABS checkpoints cost while running and how long a recovery takes.
//!
//! (a) **Overhead**: the keyed-count pipeline of `bench_network` (generator → key_by →
//! 1 s tumbling count → discard, parallelism 2) on two task manager processes, alternating
//! rounds without checkpoints and with ABS every `--interval-ms` (default 1000), as a ratio
//! of records per second within one run.
//!
//! (b) **Recovery**: a 4-stage pipeline (generator → map → keyed window count → sink), each
//! stage in its own slot sharing group on its own task manager (one slot each, plus a spare),
//! rate-limited to `--rate` records/s. The task manager running the sink is SIGKILLed
//! `--kills` times (a fresh one joins after each); every recovery's phases come from the
//! job's failover record (`GET /jobs/{id}/failovers`), measured from the kill.
//!
//! `cargo build --release --bins && target/release/bench_abs [--records N --rounds K
//! --interval-ms I --rate R --kills K --overhead 0|1 --recovery 0|1]`

use std::time::{Duration, Instant};

use serde_json::Value;
use weir_tests::cluster::{Cluster, ClusterOptions};

fn keyed_count(n: u64, interval_ms: Option<u64>) -> String {
    let checkpointing = interval_ms
        .map(|i| format!(r#""checkpointing":{{"mode":"abs","interval_ms":{i}}},"#))
        .unwrap_or_default();
    format!(
        r#"{{"name":"keyed-count",{checkpointing}"operators":[
        {{"id":"g","kind":"generator","parallelism":2,"params":{{"count":{n},"keys":10000,"seed":1,"events_per_second":1000000}}}},
        {{"id":"k","kind":"key_by","input":"g","parallelism":2,"params":{{"expr":"value"}}}},
        {{"id":"w","kind":"window_aggregate","input":"k","parallelism":2,"params":{{"window":{{"tumbling_ms":1000}},"agg":"count"}}}},
        {{"id":"d","kind":"discard","input":"w","parallelism":2}}]}}"#
    )
}

fn four_stages(rate: u64) -> String {
    format!(
        r#"{{"name":"four-stages","checkpointing":{{"mode":"abs","interval_ms":1000}},"operators":[
        {{"id":"source","kind":"generator","slot_sharing_group":"source","params":{{"rate":{rate},"keys":10000,"seed":3,"events_per_second":100000}}}},
        {{"id":"map","kind":"map","input":"source","slot_sharing_group":"map","params":{{"expr":"value * 2"}}}},
        {{"id":"key","kind":"key_by","input":"map","slot_sharing_group":"aggregate","params":{{"expr":"value"}}}},
        {{"id":"count","kind":"window_aggregate","input":"key","slot_sharing_group":"aggregate","params":{{"window":{{"tumbling_ms":1000}},"agg":"count"}}}},
        {{"id":"sink","kind":"discard","input":"count","slot_sharing_group":"sink"}}]}}"#
    )
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

/// Records per second of a finished job (submission to end, as the job manager records it).
fn run_rate(c: &Cluster, spec: &str, n: u64) -> (f64, u64) {
    let id = c.submit(spec);
    let job = c.wait_for_end(&id, Duration::from_secs(900));
    assert_eq!(job["state"], "FINISHED", "{job}");
    let ms = job["duration"].as_u64().expect("duration").max(1);
    let completed = c.get(&format!("/jobs/{id}/checkpoints")).1["counts"]["completed"]
        .as_u64()
        .unwrap_or(0);
    (n as f64 / (ms as f64 / 1000.0), completed)
}

fn overhead(args: &[String]) {
    let arg = |name: &str, default: u64| weir_tests::arg(args, name, default);
    let n = arg("--records", 100_000_000);
    let rounds = arg("--rounds", 3).max(1) as usize;
    let interval = arg("--interval-ms", 1000);
    let c = Cluster::start(ClusterOptions {
        taskmanagers: 2,
        slots: 1,
        ..Default::default()
    });
    let (mut plain, mut abs, mut ratios, mut checkpoints) = (vec![], vec![], vec![], vec![]);
    for round in 0..rounds {
        let (p, _) = run_rate(&c, &keyed_count(n, None), n);
        let (a, cps) = run_rate(&c, &keyed_count(n, Some(interval)), n);
        eprintln!(
            "round {round}: none {:.2} M/s, ABS {:.2} M/s ({cps} checkpoints)",
            p / 1e6,
            a / 1e6
        );
        plain.push(p);
        abs.push(a);
        ratios.push(a / p);
        checkpoints.push(cps as f64);
    }
    let ratio = weir_tests::median(ratios);
    println!("(a) keyed count, parallelism 2 on 2 task managers, {n} records, {rounds} rounds");
    println!();
    println!("| checkpointing | records/s (median) | vs none |");
    println!("|---|---|---|");
    println!("| none | {:.2} M | 100% |", weir_tests::median(plain) / 1e6);
    println!(
        "| ABS every {interval} ms ({:.0} checkpoints per run) | {:.2} M | {:.1}% (overhead {:.1}%) |",
        weir_tests::median(checkpoints),
        weir_tests::median(abs) / 1e6,
        100.0 * ratio,
        100.0 * (1.0 - ratio)
    );
    println!();
}

/// The task manager running the job's last task.
fn sink_taskmanager(job: &Value) -> String {
    let last = job["vertices"]
        .as_array()
        .expect("vertices")
        .last()
        .cloned();
    last.and_then(|v| v["subtasks"][0]["taskmanager"].as_str().map(str::to_string))
        .expect("sink placement")
}

fn recovery(args: &[String]) {
    let arg = |name: &str, default: u64| weir_tests::arg(args, name, default);
    let rate = arg("--rate", 200_000);
    let kills = arg("--kills", 5).max(1) as usize;
    let mut c = Cluster::start(ClusterOptions {
        taskmanagers: 5,
        slots: 1,
        ..Default::default()
    });
    let id = c.submit(&four_stages(rate));
    let mut phases: Vec<[f64; 7]> = Vec::new();
    for k in 0..kills {
        c.wait_until(Duration::from_secs(60), "running with 3 checkpoints", |c| {
            let job = c.job(&id);
            let cps = c.get(&format!("/jobs/{id}/checkpoints")).1;
            job["state"] == "RUNNING"
                && cps["history"]
                    .as_array()
                    .map(|h| {
                        h.iter()
                            .filter(|c| {
                                c["status"] == "COMPLETED"
                                    && c["trigger_ms"].as_u64() > cps["restored"]["at_ms"].as_u64()
                            })
                            .count()
                    })
                    .unwrap_or(0)
                    >= 3
        });
        let job = c.job(&id);
        let tms: std::collections::BTreeSet<&str> = job["vertices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["subtasks"][0]["taskmanager"].as_str().unwrap())
            .collect();
        assert_eq!(tms.len(), 4, "each stage on its own task manager: {job}");
        let victim = sink_taskmanager(&job);
        let index = c.taskmanager_index(&victim);
        let killed = now_ms();
        c.kill_taskmanager(index);
        c.add_taskmanager();
        let started = Instant::now();
        let mut event = Value::Null;
        c.wait_until(Duration::from_secs(60), "caught up", |c| {
            let f = c.get(&format!("/jobs/{id}/failovers")).1;
            event = f["failovers"]
                .as_array()
                .and_then(|a| a.get(k).cloned())
                .unwrap_or(Value::Null);
            event["caught_up_ms"].as_u64().is_some()
        });
        let at = |name: &str| event[name].as_u64().expect(name) as f64;
        let t = [
            at("detected_ms") - killed as f64,
            at("canceled_ms") - at("detected_ms"),
            at("deployed_ms") - at("canceled_ms"),
            at("restored_ms") - at("deployed_ms"),
            at("first_record_ms") - at("restored_ms"),
            at("caught_up_ms") - at("first_record_ms"),
            at("caught_up_ms") - killed as f64,
        ];
        eprintln!(
            "kill {k}: total {:.0} ms ({:?}), waited {:.1?}",
            t[6],
            t,
            started.elapsed()
        );
        phases.push(t);
    }
    let med = |i: usize| weir_tests::median(phases.iter().map(|p| p[i]).collect());
    println!(
        "(b) recovery after SIGKILL of the sink's task manager, 4 stages on 4 task managers, {rate} records/s, median of {kills}"
    );
    println!();
    println!("| phase | ms (median) |");
    println!("|---|---|");
    for (i, name) in [
        "kill → detected",
        "detected → all canceled",
        "canceled → redeployed",
        "redeployed → state restored, running",
        "running → first record",
        "first record → caught up (90% of the pre-failure rate)",
        "**kill → caught up**",
    ]
    .iter()
    .enumerate()
    {
        println!("| {name} | {:.0} |", med(i));
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if weir_tests::arg(&args, "--overhead", 1) == 1 {
        overhead(&args);
    }
    if weir_tests::arg(&args, "--recovery", 1) == 1 {
        recovery(&args);
    }
}
