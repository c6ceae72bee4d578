//! DCAS (per-subtask snapshots and input logs in the distributed cache) against real job
//! manager and task manager processes: a task manager's SIGKILL restarts only the subtasks
//! it ran, from their cached snapshots and logs, while the rest of the job keeps running,
//! and the output is still exactly the ground truth.
//!
//! Ground truth is computed from the generator's definition (no engine) and compared with
//! the collect sink's output record for record: a lost record changes a count, a duplicate
//! shows as a second result for one key and window, or as a higher count.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::{json, Value};
use weir_tests::cluster::{Cluster, ClusterOptions};

/// The wordcount example, made to run about `count / rate` seconds, with DCAS.
fn dcas_wordcount(count: u64, rate: u64) -> String {
    let checkpointing =
        json!({"mode": "dcas", "snapshot_every_records": 2000, "snapshot_interval_ms": 100});
    weir_tests::wordcount_spec("wordcount-dcas", checkpointing, count, rate).to_string()
}

/// (vertex id, subtask index) -> task manager id.
fn placement(job: &Value) -> BTreeMap<(String, u64), String> {
    let mut out = BTreeMap::new();
    for v in job["vertices"].as_array().expect("vertices") {
        for s in v["subtasks"].as_array().expect("subtasks") {
            out.insert(
                (
                    v["name"].as_str().unwrap_or_default().to_string(),
                    s["subtask"].as_u64().unwrap_or(0),
                ),
                s["taskmanager"].as_str().expect("tm").to_string(),
            );
        }
    }
    out
}

/// Ensures that killing each task manager running part of a DCAS wordcount in turn (a
/// fresh one joins after each kill) restarts only that task manager's subtasks — the
/// others keep their place and the generation never changes — and that the counts are
/// exactly the ground truth.
#[test]
fn dcas_restarts_only_the_lost_subtasks_and_stays_exact() {
    let mut c = Cluster::start(ClusterOptions {
        taskmanagers: 3,
        slots: 2,
        ..Default::default()
    });
    c.wait_cache_settled(3);
    let spec = dcas_wordcount(200_000, 8_000);
    let id = c.submit(&spec);
    c.wait_until(Duration::from_secs(30), "job running", |c| {
        c.job(&id)["state"] == "RUNNING"
    });
    std::thread::sleep(Duration::from_secs(3));
    let kills = 2;
    for k in 0..kills {
        let job = c.job(&id);
        assert_eq!(job["state"], "RUNNING", "{job}");
        let before = placement(&job);
        let victim = before.values().next().expect("a subtask").clone();
        let lost: BTreeSet<_> = before
            .iter()
            .filter(|(_, tm)| **tm == victim)
            .map(|(k, _)| k.clone())
            .collect();
        eprintln!("kill {k}: task manager {victim} running {lost:?}");
        let index = c.taskmanager_index(&victim);
        c.kill_taskmanager(index);
        c.add_taskmanager();
        // The next kill must find every cache partition backed up again.
        c.wait_cache_settled(3);
        c.wait_until(Duration::from_secs(30), "restarted subtasks running", |c| {
            let job = c.job(&id);
            let failovers = c.get(&format!("/jobs/{id}/failovers")).1;
            job["state"] == "RUNNING" && failovers["failovers"].as_array().map_or(0, Vec::len) > k
                || job["state"] == "FINISHED"
        });
        let job = c.job(&id);
        assert_eq!(job["generation"], 1, "DCAS never redeploys the job: {job}");
        let after = placement(&job);
        for (sub, tm) in &before {
            if lost.contains(sub) {
                assert_ne!(
                    after[sub], victim,
                    "{sub:?} moved off the dead task manager"
                );
            } else {
                assert_eq!(&after[sub], tm, "{sub:?} kept running where it was");
            }
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    let job = c.wait_for_end(&id, Duration::from_secs(120));
    assert_eq!(job["state"], "FINISHED", "{job}");
    let got = weir_tests::collected_counts(&c, &id, "out");
    let want = weir_tests::expected_wordcount(&weir_tests::generator(&spec, "lines"), 5000);
    assert_eq!(got.len(), want.len(), "number of (word, window) results");
    assert_eq!(got, want);
    let failovers = c.get(&format!("/jobs/{id}/failovers")).1;
    let events = failovers["failovers"].as_array().expect("failovers");
    assert_eq!(events.len(), kills, "{failovers}");
    for e in events {
        assert_eq!(e["mode"], "dcas", "{e}");
        assert!(e["restored_ms"].as_u64().is_some(), "{e}");
        assert!(e["subtasks_restarted"].as_u64().unwrap() < 4, "{e}");
    }
}
