//! Test harness and helpers shared by the end-to-end tests and evaluation binaries.
//!
//! `run_spec` runs a spec in process to completion (or a deadline) and returns the outcome;
//! `expected_*` functions compute ground truth straight from the generator's definition,
//! without the engine.

pub mod bench;
pub mod browser;
pub mod cluster;
pub mod kafka;
pub mod proxy;

use std::collections::BTreeMap;
use std::time::Duration;

use engine::graph::JobGraph;
use engine::operator::source::GeneratorConfig;
use engine::operator::OperatorRegistry;
use engine::runtime::{JobOutcome, LocalConfig, LocalExecutor};
use engine::spec::JobSpec;
use engine::Value;

/// Parses and validates `json` with the `jobs` registry.
pub fn graph(json: &str) -> JobGraph {
    graph_with(json, &jobs::registry())
}

/// Parses, resolves (connectors ask their brokers) and validates `json` with `registry`.
pub fn graph_with(json: &str, registry: &OperatorRegistry) -> JobGraph {
    let mut spec = JobSpec::from_json(json).unwrap_or_else(|e| panic!("bad spec: {e}"));
    registry
        .resolve(&mut spec)
        .unwrap_or_else(|e| panic!("cannot resolve: {e}"));
    JobGraph::build(&spec, registry).unwrap_or_else(|e| panic!("invalid spec: {e}"))
}

/// Runs `graph` in process on `slots` arbiters until it ends, canceling it after `timeout`.
pub fn run_graph(graph: &JobGraph, slots: usize, timeout: Duration) -> JobOutcome {
    actix::System::new().block_on(async {
        let job = LocalExecutor::start(
            graph,
            &LocalConfig {
                slots,
                ..LocalConfig::default()
            },
        )
        .expect("deploy");
        let handle = job.handle();
        let wait = job.wait();
        tokio::pin!(wait);
        tokio::select! {
            outcome = &mut wait => outcome,
            _ = tokio::time::sleep(timeout) => {
                handle.cancel();
                wait.await
            }
        }
    })
}

/// The generator config of operator `id` in `json`.
pub fn generator(json: &str, id: &str) -> GeneratorConfig {
    let spec = JobSpec::from_json(json).expect("spec");
    GeneratorConfig::from_spec(spec.operator(id).expect("operator")).expect("generator params")
}

/// Word counts per tumbling window, computed directly from the generator's lines:
/// `(word, window_start) -> count`.
pub fn expected_wordcount(gen: &GeneratorConfig, window_ms: i64) -> BTreeMap<(String, i64), i64> {
    let mut counts = BTreeMap::new();
    let n = gen.count.expect("bounded generator");
    for g in 0..n {
        let rec = gen.record(g);
        let line = rec
            .value
            .get("line")
            .and_then(Value::as_str)
            .expect("lines payload")
            .to_string();
        let start = rec.ts - rec.ts.rem_euclid(window_ms);
        for word in line.split(' ') {
            *counts.entry((word.to_string(), start)).or_insert(0) += 1;
        }
    }
    counts
}

/// `(key, window_start) -> field` from window_aggregate output records.
pub fn window_results(records: &[engine::Record], field: &str) -> BTreeMap<(String, i64), i64> {
    let mut out = BTreeMap::new();
    for r in records {
        let key = match r.value.get("key") {
            Some(Value::Str(s)) => s.to_string(),
            Some(other) => other.to_string(),
            None => panic!("no key in {}", r.value),
        };
        let start = r
            .value
            .get("window_start")
            .and_then(Value::as_int)
            .expect("window_start");
        let v = r.value.get(field).and_then(Value::as_int).expect("field");
        assert!(
            out.insert((key, start), v).is_none(),
            "duplicate result for a key and window: {}",
            r.value
        );
    }
    out
}

/// A benchmark's command line, checked against its `usage` line (`bench_x [--records N
/// --rounds K]`): every `--flag` in its brackets is known and takes a value. `--help`
/// prints the usage and exits; an unknown flag, a flag without a value or a stray word
/// exits with status 2 naming it, so a typo never runs a long benchmark on its defaults.
pub fn bench_args(usage: &str) -> Vec<String> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().skip(1).any(|a| a == "--help" || a == "-h") {
        println!("usage: {usage}");
        std::process::exit(0);
    }
    if let Err(e) = check_args(args.get(1..).unwrap_or_default(), usage) {
        usage_error(&format!("{e}\nusage: {usage}"));
    }
    args
}

/// Checks `args` (without the program name) against the flags in `usage`'s brackets.
fn check_args(args: &[String], usage: &str) -> Result<(), String> {
    let flags = usage
        .split_once('[')
        .and_then(|(_, rest)| rest.split_once(']'))
        .map_or("", |(flags, _)| flags);
    let known: Vec<&str> = flags
        .split_whitespace()
        .map(|w| w.trim_matches(|c: char| !(c.is_ascii_alphanumeric() || c == '-')))
        .filter(|w| w.len() > 2 && w.starts_with("--"))
        .collect();
    let mut words = args.iter();
    while let Some(word) = words.next() {
        if !word.starts_with("--") {
            return Err(format!("unexpected argument {word:?}"));
        }
        if !known.contains(&word.as_str()) {
            return Err(format!("unknown flag {word}"));
        }
        match words.next() {
            Some(v) if !v.starts_with("--") => {}
            _ => return Err(format!("{word} needs a value")),
        }
    }
    Ok(())
}

/// Ends a benchmark on bad command-line input: the reason on stderr, status 2.
fn usage_error(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(2)
}

/// What follows flag `name` among `args`, if the flag is given.
fn flag_value<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let i = args.iter().position(|a| a == name)?;
    Some(args.get(i + 1).map_or("", String::as_str))
}

/// The value of `--name N` among `args`, or `default`; exits naming the flag when it is
/// not a number.
pub fn arg(args: &[String], name: &str, default: u64) -> u64 {
    match flag_value(args, name) {
        None => default,
        Some(v) => v
            .parse()
            .unwrap_or_else(|_| usage_error(&format!("{name} takes a number, not {v:?}"))),
    }
}

/// The comma-separated numbers after `name` (`--windows 100,200`), if the flag is given;
/// exits naming the flag on anything that is not a number.
pub fn arg_list(args: &[String], name: &str) -> Option<Vec<u64>> {
    let list = flag_value(args, name)?;
    Some(
        list.split(',')
            .map(|v| {
                v.trim().parse().unwrap_or_else(|_| {
                    usage_error(&format!("{name} takes numbers, comma-separated: {list:?}"))
                })
            })
            .collect(),
    )
}

/// Median of `v` (upper median for even lengths).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The wordcount example named `name`, made to run about `count / rate` seconds, with
/// `checkpointing` (a JSON object).
pub fn wordcount_spec(
    name: &str,
    checkpointing: serde_json::Value,
    count: u64,
    rate: u64,
) -> serde_json::Value {
    let text = jobs::EXAMPLES
        .iter()
        .find(|(n, _)| *n == "wordcount.json")
        .expect("wordcount example")
        .1;
    let mut spec: serde_json::Value = serde_json::from_str(text).expect("example json");
    spec["name"] = serde_json::json!(name);
    spec["checkpointing"] = checkpointing;
    let params = &mut spec["operators"][0]["params"];
    params["count"] = serde_json::json!(count);
    params["rate"] = serde_json::json!(rate);
    spec
}

/// (word, window start) -> count from a job's collect sink `op`; panics on a duplicate
/// result (an exactly-once violation).
pub fn collected_counts(c: &cluster::Cluster, id: &str, op: &str) -> BTreeMap<(String, i64), i64> {
    collected_windows(c, id, op, "count")
}

/// (key, window start) -> `field` of every window result in a job's collect sink `op`;
/// panics on a duplicate result (an exactly-once violation).
pub fn collected_windows(
    c: &cluster::Cluster,
    id: &str,
    op: &str,
    field: &str,
) -> BTreeMap<(String, i64), i64> {
    let mut got = BTreeMap::new();
    for v in c.output(id, op) {
        let key = (
            v["key"].as_str().expect("key").to_string(),
            v["window_start"].as_i64().expect("window_start"),
        );
        assert!(
            got.insert(key, v[field].as_i64().expect(field)).is_none(),
            "duplicate result {v}"
        );
    }
    got
}

#[cfg(test)]
mod tests {
    use super::check_args;

    const USAGE: &str =
        "bench_x [-- --records N --rounds K --stages S,... --a 0|1] (cargo --release)";

    fn check(args: &[&str]) -> Result<(), String> {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        check_args(&args, USAGE)
    }

    /// Ensures the flags a usage line names pass with values, wherever the line puts them.
    #[test]
    fn known_flags_with_values_pass() {
        assert_eq!(check(&[]), Ok(()));
        assert_eq!(
            check(&["--records", "5", "--stages", "1,5", "--a", "0"]),
            Ok(())
        );
    }

    /// Ensures a typo, a missing value and a stray word are each named, not ignored.
    #[test]
    fn bad_command_lines_are_named() {
        assert_eq!(
            check(&["--record", "5"]),
            Err("unknown flag --record".into())
        );
        assert_eq!(
            check(&["--rounds", "--records", "5"]),
            Err("--rounds needs a value".into())
        );
        assert_eq!(check(&["--rounds"]), Err("--rounds needs a value".into()));
        assert_eq!(
            check(&["--release", "1"]),
            Err("unknown flag --release".into())
        );
        assert_eq!(
            check(&["5", "--rounds", "1"]),
            Err("unexpected argument \"5\"".into())
        );
    }
}
