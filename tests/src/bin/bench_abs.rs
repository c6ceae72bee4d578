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
//! The flags are in `USAGE` (`--help` prints it).

use std::time::Instant;

use engine::telemetry::now_ms;
use serde_json::{json, Value};
use weir_tests::bench::{caught_up, keyed_count, phase, run_rate, wait_checkpoints_since_restore};
use weir_tests::cluster::{Cluster, ClusterOptions};

/// The command line (`--help` prints it).
const USAGE: &str = "target/release/bench_abs [--records N --rounds K --interval-ms I --rate R --kills K --overhead 0|1 --recovery 0|1]  (cargo build --release --bins first)";

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
        let (p, _) = run_rate(&c, &keyed_count(n, Value::Null), n);
        let checkpointing = json!({"mode": "abs", "interval_ms": interval});
        let (a, cps) = run_rate(&c, &keyed_count(n, checkpointing), n);
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
    let mut settled = 0;
    for k in 0..kills {
        wait_checkpoints_since_restore(&c, &id, 3);
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
        let event = caught_up(&c, &id, settled, killed);
        settled = now_ms();
        let at = |a: &str, b: &str| phase(&event, b, 0) - phase(&event, a, 0);
        let t = [
            phase(&event, "detected_ms", killed),
            at("detected_ms", "canceled_ms"),
            at("canceled_ms", "deployed_ms"),
            at("deployed_ms", "restored_ms"),
            at("restored_ms", "first_record_ms"),
            at("first_record_ms", "caught_up_ms"),
            phase(&event, "caught_up_ms", killed),
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
    let args = weir_tests::bench_args(USAGE);
    if weir_tests::arg(&args, "--overhead", 1) == 1 {
        overhead(&args);
    }
    if weir_tests::arg(&args, "--recovery", 1) == 1 {
        recovery(&args);
    }
}
