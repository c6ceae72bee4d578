//! `bench_network`: the keyed-count pipeline of `bench_engine` (b) at parallelism 2, in
//! process versus across two task manager processes (the hash exchange then sends about half
//! of the records over the data plane), as a ratio within one run.
//!
//! The flags are in `USAGE` (`--help` prints it).

use std::time::Duration;

use weir_tests::cluster::{Cluster, ClusterOptions};

/// The command line (`--help` prints it).
const USAGE: &str = "cargo run --release -p weir-tests --bin bench_network [-- --records N --rounds K --credits C --batch B]  (cargo build --release --bins first)";

fn spec(n: u64, credits: u64, batch: u64) -> String {
    format!(
        r#"{{"name":"keyed-count","runtime":{{"credits":{credits},"batch_size":{batch}}},"operators":[
        {{"id":"g","kind":"generator","parallelism":2,"params":{{"count":{n},"keys":10000,"seed":1,"events_per_second":1000000}}}},
        {{"id":"k","kind":"key_by","input":"g","parallelism":2,"params":{{"expr":"value"}}}},
        {{"id":"w","kind":"window_aggregate","input":"k","parallelism":2,"params":{{"window":{{"tumbling_ms":1000}},"agg":"count"}}}},
        {{"id":"d","kind":"discard","input":"w","parallelism":2}}]}}"#
    )
}

fn main() {
    let args = weir_tests::bench_args(USAGE);
    let arg = |name: &str, default: u64| weir_tests::arg(&args, name, default);
    let n = arg("--records", 20_000_000);
    let rounds = arg("--rounds", 3).max(1) as usize;
    let credits = arg("--credits", 4);
    let batch = arg(
        "--batch",
        engine::spec::RuntimeSpec::default().batch_size as u64,
    );
    let json = spec(n, credits, batch);
    let cluster = Cluster::start(ClusterOptions {
        taskmanagers: 2,
        slots: 1,
        ..Default::default()
    });
    let mut local = Vec::new();
    let mut remote = Vec::new();
    for round in 0..rounds {
        let graph = weir_tests::graph(&json);
        let outcome = weir_tests::run_graph(&graph, 2, Duration::from_secs(600));
        outcome.result.expect("in-process run");
        let l = n as f64 / outcome.elapsed.as_secs_f64();

        let id = cluster.submit(&json);
        let job = cluster.wait_for_end(&id, Duration::from_secs(600));
        assert_eq!(job["state"], "FINISHED", "{job}");
        let ms = job["duration"].as_u64().expect("duration").max(1);
        let r = n as f64 / (ms as f64 / 1000.0);
        let tms: std::collections::BTreeSet<&str> = job["vertices"][1]["subtasks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["taskmanager"].as_str().unwrap())
            .collect();
        assert_eq!(tms.len(), 2, "the window subtasks run on two task managers");
        eprintln!(
            "round {round}: in-process {:.1}M/s, 2 task managers {:.1}M/s",
            l / 1e6,
            r / 1e6
        );
        local.push(l);
        remote.push(r);
    }
    let ratio = weir_tests::median(local.iter().zip(&remote).map(|(l, r)| r / l).collect());
    println!("records per run: {n}, rounds: {rounds}");
    println!();
    println!("| keyed count, parallelism 2 | records/s (median) | vs in process |");
    println!("|---|---|---|");
    println!(
        "| in process (2 slots) | {:.2} M | 100% |",
        weir_tests::median(local) / 1e6
    );
    println!(
        "| 2 task manager processes (hash exchange over TCP) | {:.2} M | {:.0}% |",
        weir_tests::median(remote) / 1e6,
        100.0 * ratio
    );
}
