//! Shared by the recovery and overhead benchmarks: the pipelines they run, a finished
//! job's rate, and the phases of a recovery as the job manager recorded them.

use std::time::Duration;

use serde_json::{json, Value};

use crate::cluster::Cluster;

/// The keyed-count pipeline of `bench_network` (generator → key_by → 1 s tumbling count →
/// discard, parallelism 2, 10,000 keys) over `n` records, with `checkpointing` (a JSON
/// object, or null for none).
pub fn keyed_count(n: u64, checkpointing: Value) -> String {
    let mut spec = json!({"name": "keyed-count", "operators": [
        {"id": "g", "kind": "generator", "parallelism": 2,
         "params": {"count": n, "keys": 10000, "seed": 1, "events_per_second": 1_000_000}},
        {"id": "k", "kind": "key_by", "input": "g", "parallelism": 2, "params": {"expr": "value"}},
        {"id": "w", "kind": "window_aggregate", "input": "k", "parallelism": 2,
         "params": {"window": {"tumbling_ms": 1000}, "agg": "count"}},
        {"id": "d", "kind": "discard", "input": "w", "parallelism": 2}]});
    if !checkpointing.is_null() {
        spec["checkpointing"] = checkpointing;
    }
    spec.to_string()
}

/// Records per second of a finished job of `n` records (submission to end, as the job
/// manager records it), and how many checkpoints it completed.
pub fn run_rate(c: &Cluster, spec: &str, n: u64) -> (f64, u64) {
    let id = c.submit(spec);
    let job = c.wait_for_end(&id, Duration::from_secs(900));
    assert_eq!(job["state"], "FINISHED", "{job}");
    let ms = job["duration"].as_u64().expect("duration").max(1);
    let completed = c.get(&format!("/jobs/{id}/checkpoints")).1["counts"]["completed"]
        .as_u64()
        .unwrap_or(0);
    (n as f64 / (ms as f64 / 1000.0), completed)
}

/// Waits for the failover of a kill at `killed_ms` (the first detected then or later) to
/// catch up and returns its record. Any other failover since `since_ms` was not caused by
/// a kill: it is printed as unexpected (a benchmark measures a healthy job; one that fails
/// on its own has a bug to find, and its figures are not the kill's).
pub fn caught_up(c: &Cluster, id: &str, since_ms: u64, killed_ms: u64) -> Value {
    let mut event = Value::Null;
    let mut failovers = Vec::new();
    c.wait_until(Duration::from_secs(90), "caught up", |c| {
        let f = c.get(&format!("/jobs/{id}/failovers")).1;
        failovers = f["failovers"].as_array().cloned().unwrap_or_default();
        let detected = |e: &Value| e["detected_ms"].as_u64().unwrap_or(0);
        event = failovers
            .iter()
            .find(|e| detected(e) >= killed_ms)
            .cloned()
            .unwrap_or(Value::Null);
        event["caught_up_ms"].as_u64().is_some()
    });
    for e in &failovers {
        let at = e["detected_ms"].as_u64().unwrap_or(0);
        if at >= since_ms && e["attempt"] != event["attempt"] {
            eprintln!(
                "UNEXPECTED failover {} ms after the last kill's recovery caught up, not caused by a kill: {}",
                at.saturating_sub(since_ms),
                e["cause"]
            );
        }
    }
    event
}

/// Milliseconds from `since` to the failover record's `phase`.
pub fn phase(event: &Value, phase: &str, since: u64) -> f64 {
    event[phase].as_u64().expect(phase) as f64 - since as f64
}

/// Waits until the job runs and has completed `n` ABS checkpoints since its last restore.
pub fn wait_checkpoints_since_restore(c: &Cluster, id: &str, n: usize) {
    c.wait_until(
        Duration::from_secs(60),
        &format!("running with {n} checkpoints"),
        |c| {
            let cps = c.get(&format!("/jobs/{id}/checkpoints")).1;
            let restored = cps["restored"]["at_ms"].as_u64();
            let since = cps["history"].as_array().map_or(0, |h| {
                h.iter()
                    .filter(|c| c["status"] == "COMPLETED" && c["trigger_ms"].as_u64() > restored)
                    .count()
            });
            c.job(id)["state"] == "RUNNING" && since >= n
        },
    );
}
