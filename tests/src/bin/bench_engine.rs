//! `bench_engine`: throughput of the in-process engine against a hand-written loop.
//!
//! (a) generator -> map -> filter -> discard, (b) generator -> key_by -> tumbling count ->
//! discard over 10k keys, each at parallelism 1 and 2, and (b) computed by a plain Rust loop
//! with a HashMap over the same generated data; (c) generator -> key_by -> rolling count
//! (`reduce`, which emits an updated result per record) -> discard at parallelism 1, where
//! building results dominates. Every figure of one run comes from the same
//! process, so the ratios hold even on a noisy machine. The flags are in
//! `USAGE` (`--help` prints it).

use std::hint::black_box;
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;

/// The command line (`--help` prints it).
const USAGE: &str =
    "cargo run --release -p weir-tests --bin bench_engine [-- --records N --repeat K]";

fn spec_a(p: usize, n: u64) -> String {
    format!(
        r#"{{"name":"a","operators":[
        {{"id":"g","kind":"generator","parallelism":{p},"params":{{"count":{n},"keys":1000000,"seed":1}}}},
        {{"id":"m","kind":"map","input":"g","parallelism":{p},"params":{{"expr":"value * 3 + 1"}}}},
        {{"id":"f","kind":"filter","input":"m","parallelism":{p},"params":{{"expr":"value % 2 == 0"}}}},
        {{"id":"d","kind":"discard","input":"f","parallelism":{p}}}]}}"#
    )
}

fn spec_b(p: usize, n: u64) -> String {
    format!(
        r#"{{"name":"b","operators":[
        {{"id":"g","kind":"generator","parallelism":{p},"params":{{"count":{n},"keys":10000,"seed":1,"events_per_second":1000000}}}},
        {{"id":"k","kind":"key_by","input":"g","parallelism":{p},"params":{{"expr":"value"}}}},
        {{"id":"w","kind":"window_aggregate","input":"k","parallelism":{p},"params":{{"window":{{"tumbling_ms":1000}},"agg":"count"}}}},
        {{"id":"d","kind":"discard","input":"w","parallelism":{p}}}]}}"#
    )
}

fn spec_c(n: u64) -> String {
    format!(
        r#"{{"name":"c","operators":[
        {{"id":"g","kind":"generator","params":{{"count":{n},"keys":10000,"seed":1}}}},
        {{"id":"k","kind":"key_by","input":"g","params":{{"expr":"value"}}}},
        {{"id":"r","kind":"reduce","input":"k","params":{{"agg":"count"}}}},
        {{"id":"d","kind":"discard","input":"r"}}]}}"#
    )
}

/// Records per second of one engine run.
fn engine_rate(json: &str, slots: usize, n: u64) -> f64 {
    let graph = weir_tests::graph(json);
    let outcome = weir_tests::run_graph(&graph, slots, Duration::from_secs(600));
    if let Err(e) = outcome.result {
        panic!("benchmark job failed: {e}");
    }
    n as f64 / outcome.elapsed.as_secs_f64()
}

/// (b) as a hand-written loop: same records (the generator's own functions), a HashMap of
/// counts per key for the current window, results handed to `black_box` when it closes.
fn loop_rate(n: u64) -> f64 {
    let gen = weir_tests::generator(&spec_b(1, n), "g");
    let started = Instant::now();
    let mut counts: FxHashMap<i64, u64> = FxHashMap::default();
    let mut window = i64::MIN;
    let mut emitted = 0u64;
    for g in 0..n {
        let ts = gen.ts(g);
        let start = ts - ts.rem_euclid(1000);
        if start != window {
            for (k, c) in counts.drain() {
                black_box((k, c, window));
                emitted += 1;
            }
            window = start;
        }
        let key = gen.value(g).as_int().unwrap_or(0);
        *counts.entry(key).or_insert(0) += 1;
    }
    for (k, c) in counts.drain() {
        black_box((k, c));
        emitted += 1;
    }
    black_box(emitted);
    n as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let args = weir_tests::bench_args(USAGE);
    let arg = |name: &str, default: u64| weir_tests::arg(&args, name, default);
    let n = arg("--records", 20_000_000);
    let repeat = arg("--repeat", 5).max(1) as usize;
    println!("records per run: {n}, rounds: {repeat}");
    // Each round runs every configuration once, back to back, so a ratio compares runs that
    // saw the same machine load; figures are medians over rounds.
    let mut rounds: Vec<[f64; 6]> = Vec::new();
    for round in 0..repeat {
        let r = [
            engine_rate(&spec_a(1, n), 1, n),
            engine_rate(&spec_a(2, n), 2, n),
            engine_rate(&spec_b(1, n), 2, n),
            engine_rate(&spec_b(2, n), 2, n),
            loop_rate(n),
            engine_rate(&spec_c(n), 2, n),
        ];
        let millions: Vec<String> = r.iter().map(|x| format!("{:.1}M", x / 1e6)).collect();
        eprintln!(
            "round {round}: a1 a2 b1 b2 loop c1 = {}",
            millions.join(" ")
        );
        rounds.push(r);
    }
    let col = |i: usize| weir_tests::median(rounds.iter().map(|r| r[i]).collect()) / 1e6;
    let ratio = |i: usize| 100.0 * weir_tests::median(rounds.iter().map(|r| r[i] / r[4]).collect());
    println!();
    println!("| pipeline | parallelism | records/s (median) | vs hand-written loop (median of per-round ratios) |");
    println!("|---|---|---|---|");
    let a = "(a) generator -> map -> filter -> discard";
    let b = "(b) generator -> key_by -> tumbling count -> discard";
    println!("| {a} | 1 | {:.2} M | |", col(0));
    println!("| {a} | 2 | {:.2} M | |", col(1));
    println!("| {b} | 1 | {:.2} M | {:.0}% |", col(2), ratio(2));
    println!("| {b} | 2 | {:.2} M | {:.0}% |", col(3), ratio(3));
    println!(
        "| (b) hand-written loop with a HashMap | 1 thread | {:.2} M | 100% |",
        col(4)
    );
    let c = "(c) generator -> key_by -> reduce (count, a result per record) -> discard";
    println!("| {c} | 1 | {:.2} M | |", col(5));
}
