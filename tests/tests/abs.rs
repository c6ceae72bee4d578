//! ABS (aligned barrier snapshots) against real job manager and task manager processes:
//! exactly-once output through repeated SIGKILLs, generation fencing of a paused task
//! manager, a stalled job manager, checkpoints under backpressure, and the checkpoint and failover REST views.
//!
//! Ground truth is computed from the generator's definition (no engine), and compared with
//! the collect sink's output record for record: a lost record changes a count, a duplicate
//! shows as a second result for one key and window, or as a higher count.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::{json, Value};
use weir_tests::cluster::{Cluster, ClusterOptions};

/// The wordcount example, made to run about `count / rate` seconds, with ABS checkpoints;
/// with `file`, the counts also go to a `file_sink` at that path.
fn abs_wordcount(
    count: u64,
    rate: u64,
    interval_ms: u64,
    file: Option<&std::path::Path>,
) -> String {
    let mut spec = weir_tests::wordcount_spec(
        "wordcount-abs",
        json!({"mode": "abs", "interval_ms": interval_ms}),
        count,
        rate,
    );
    if let Some(path) = file {
        spec["operators"]
            .as_array_mut()
            .expect("operators")
            .push(json!({
                "id": "file", "kind": "file_sink", "input": "count", "parallelism": 2,
                "params": {"path": path.join("counts-{subtask}.jsonl")}
            }));
    }
    spec.to_string()
}

fn counts(c: &Cluster, id: &str) -> BTreeMap<(String, i64), i64> {
    weir_tests::collected_counts(c, id, "out")
}

/// (word, window start) -> count from the file sink's files; panics on a duplicate.
fn file_counts(dir: &std::path::Path) -> BTreeMap<(String, i64), i64> {
    let mut got = BTreeMap::new();
    for s in 0..2 {
        let text = std::fs::read_to_string(dir.join(format!("counts-{s}.jsonl"))).expect("file");
        for line in text.lines() {
            let v: Value = serde_json::from_str(line).expect("json line");
            let key = (
                v["value"]["key"].as_str().expect("key").to_string(),
                v["value"]["window_start"].as_i64().expect("window_start"),
            );
            let count = v["value"]["count"].as_i64().expect("count");
            assert!(got.insert(key, count).is_none(), "duplicate line {line}");
        }
    }
    got
}

fn expected(spec: &str) -> BTreeMap<(String, i64), i64> {
    weir_tests::expected_wordcount(&weir_tests::generator(spec, "lines"), 5000)
}

/// Task managers running a subtask of the job.
fn job_taskmanagers(job: &Value) -> BTreeSet<String> {
    job["vertices"]
        .as_array()
        .expect("vertices")
        .iter()
        .flat_map(|v| v["subtasks"].as_array().expect("subtasks").iter())
        .map(|s| s["taskmanager"].as_str().expect("tm").to_string())
        .collect()
}

fn completed_checkpoints(c: &Cluster, id: &str) -> u64 {
    c.get(&format!("/jobs/{id}/checkpoints")).1["counts"]["completed"]
        .as_u64()
        .unwrap_or(0)
}

/// Waits until the job runs generation `generation` or later with every subtask running,
/// and completed a checkpoint after that.
fn wait_recovered(c: &Cluster, id: &str, generation: u64) {
    c.wait_until(Duration::from_secs(30), "job redeployed and running", |c| {
        let job = c.job(id);
        job["generation"].as_u64().unwrap_or(0) >= generation && job["state"] == "RUNNING"
            || job["state"] == "FINISHED"
    });
    let before = completed_checkpoints(c, id);
    c.wait_until(
        Duration::from_secs(30),
        "a checkpoint after the restore",
        |c| completed_checkpoints(c, id) > before || c.job(id)["state"] == "FINISHED",
    );
}

/// Checks a finished job's failover records: one per kill, each with every phase in order.
fn assert_failovers(c: &Cluster, id: &str, kills: usize) {
    let (status, body) = c.get(&format!("/jobs/{id}/failovers"));
    assert_eq!(status, 200, "{body}");
    let events = body["failovers"].as_array().expect("failovers");
    assert_eq!(events.len(), kills, "one failover per kill: {body}");
    for e in events {
        let phase = |name: &str| {
            e[name]
                .as_u64()
                .unwrap_or_else(|| panic!("{name} missing: {e}"))
        };
        let (detected, canceled, deployed, restored) = (
            phase("detected_ms"),
            phase("canceled_ms"),
            phase("deployed_ms"),
            phase("restored_ms"),
        );
        assert!(
            detected <= canceled && canceled <= deployed && deployed <= restored,
            "phases in order: {e}"
        );
        assert!(e["subtasks_restarted"].as_u64().unwrap() > 0, "{e}");
    }
}

/// Ensures the wordcount job with ABS checkpoints every 500 ms produces exactly the expected
/// counts although the task manager running part of it is SIGKILLed five times, a few
/// seconds apart (a fresh task manager joins after each kill): each failure restarts the job
/// from its last completed checkpoint, the generator rewinds, and the two-phase collect and
/// file sinks expose each epoch once.
#[test]
fn exactly_once_through_repeated_taskmanager_kills() {
    let mut c = Cluster::start(ClusterOptions {
        taskmanagers: 3,
        slots: 2,
        ..Default::default()
    });
    let files = tempfile::tempdir().expect("tempdir");
    let spec = abs_wordcount(240_000, 8_000, 500, Some(files.path()));
    let id = c.submit(&spec);
    c.wait_until(Duration::from_secs(30), "first checkpoint", |c| {
        completed_checkpoints(c, &id) > 0
    });
    let kills = 5;
    for k in 0..kills {
        let job = c.job(&id);
        assert_eq!(job["state"], "RUNNING", "{job}");
        let generation = job["generation"].as_u64().unwrap();
        let victim = job_taskmanagers(&job)
            .into_iter()
            .next()
            .expect("a task manager runs the job");
        let index = c.taskmanager_index(&victim);
        eprintln!("kill {k}: task manager {victim} (generation {generation})");
        c.kill_taskmanager(index);
        c.add_taskmanager();
        wait_recovered(&c, &id, generation + 1);
        std::thread::sleep(Duration::from_millis(1500));
    }
    let job = c.wait_for_end(&id, Duration::from_secs(240));
    assert_eq!(job["state"], "FINISHED", "{job}");
    assert_eq!(job["restarts"].as_u64(), Some(kills as u64), "{job}");
    let got = counts(&c, &id);
    let want = expected(&spec);
    assert_eq!(got.len(), want.len(), "number of (word, window) results");
    assert_eq!(got, want);
    assert_eq!(
        file_counts(files.path()),
        want,
        "the file sink's committed lines"
    );
    let stray: Vec<String> = std::fs::read_dir(files.path())
        .expect("dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.contains(".g") && !n.ends_with(".open"))
        .collect();
    assert!(stray.is_empty(), "staged files left behind: {stray:?}");
    assert_failovers(&c, &id, kills);
    let cps = c.get(&format!("/jobs/{id}/checkpoints")).1;
    let latest = &cps["latest_completed"];
    assert!(latest["id"].as_u64().unwrap() > 0, "{cps}");
    assert_eq!(
        latest["trigger"], "final",
        "the job ends with its final checkpoint: {cps}"
    );
    assert_eq!(
        latest["acknowledged"], latest["total"],
        "every subtask acknowledged: {cps}"
    );
}

/// Three task managers with two slots each running a wordcount (120,000 lines at 8,000/s)
/// with ABS checkpoints every 500 ms, once its first checkpoint completed: the cluster, the
/// spec and the job id.
fn checkpointed_wordcount() -> (Cluster, String, String) {
    let c = Cluster::start(ClusterOptions {
        taskmanagers: 3,
        slots: 2,
        ..Default::default()
    });
    let spec = abs_wordcount(120_000, 8_000, 500, None);
    let id = c.submit(&spec);
    c.wait_until(Duration::from_secs(30), "first checkpoint", |c| {
        completed_checkpoints(c, &id) > 0
    });
    (c, spec, id)
}

/// Ensures a task manager paused (SIGSTOP) for three heartbeat timeouts is replaced: the job
/// recovers on the others, and when the paused one resumes (SIGCONT) its stale subtasks emit
/// nothing that reaches the output (their generation is fenced, they stop themselves), so the
/// final output is still exact.
#[test]
fn paused_taskmanager_is_fenced() {
    let (c, spec, id) = checkpointed_wordcount();
    let job = c.job(&id);
    let generation = job["generation"].as_u64().unwrap();
    let victim = job_taskmanagers(&job).into_iter().next().unwrap();
    let index = c.taskmanager_index(&victim);
    c.signal_taskmanager(index, "STOP");
    std::thread::sleep(Duration::from_millis(3 * c.options.heartbeat_timeout_ms));
    wait_recovered(&c, &id, generation + 1);
    assert!(
        !job_taskmanagers(&c.job(&id)).contains(&victim),
        "the job runs without the paused task manager"
    );
    c.signal_taskmanager(index, "CONT");
    let job = c.wait_for_end(&id, Duration::from_secs(120));
    assert_eq!(job["state"], "FINISHED", "{job}");
    assert_eq!(counts(&c, &id), expected(&spec));
    assert_failovers(&c, &id, 1);
}

/// Ensures an ABS job survives its job manager stalling (SIGSTOP) for longer than the
/// heartbeat timeout: the job manager declares no task manager dead for its own silence;
/// the task managers, whose leases ran out meanwhile, stopped the job's subtasks (the
/// failover says so), and the job restarts from its last completed checkpoint on the same three task managers and
/// still produces exactly the expected counts.
#[test]
fn job_manager_stall_is_survived() {
    let (c, spec, id) = checkpointed_wordcount();
    c.signal_jobmanager("STOP");
    std::thread::sleep(Duration::from_millis(
        c.options.heartbeat_timeout_ms * 8 / 5,
    ));
    c.signal_jobmanager("CONT");
    let job = c.wait_for_end(&id, Duration::from_secs(120));
    assert_eq!(job["state"], "FINISHED", "{job}");
    assert_eq!(counts(&c, &id), expected(&spec));
    assert_eq!(
        c.alive_taskmanagers().len(),
        3,
        "a stalled job manager declares no task manager dead"
    );
    let (_, body) = c.get(&format!("/jobs/{id}/failovers"));
    let cause = body["failovers"][0]["cause"].as_str().unwrap_or_default();
    assert!(
        cause.contains("fenced: no heartbeat acknowledgement"),
        "the failover says the task managers fenced themselves: {body}"
    );
}

/// Ensures checkpoints complete while a bottleneck backpressures the sources (two source
/// subtasks feed one keyed subtask, whose input queues stay full), and that they record the
/// time the keyed subtask spent aligning barriers; and that POST /jobs/{id}/checkpoints
/// triggers one.
#[test]
fn checkpoints_complete_under_backpressure() {
    let c = Cluster::start(ClusterOptions {
        taskmanagers: 2,
        slots: 2,
        ..Default::default()
    });
    let spec = r#"{"name":"bottleneck","checkpointing":{"mode":"abs","interval_ms":300},
      "operators":[
        {"id":"src","kind":"generator","parallelism":2,"params":{"payload":"lines","keys":5000}},
        {"id":"split","kind":"flat_map","input":"src","parallelism":2,"params":{"expr":"split(value.line, ' ')"}},
        {"id":"key","kind":"key_by","input":"split","parallelism":1,"params":{"expr":"value"}},
        {"id":"count","kind":"window_aggregate","input":"key","parallelism":1,"params":{"window":{"tumbling_ms":1000},"agg":"count"}},
        {"id":"sink","kind":"discard","input":"count","parallelism":1}]}"#;
    let id = c.submit(spec);
    c.wait_until(Duration::from_secs(30), "five checkpoints", |c| {
        completed_checkpoints(c, &id) >= 5
    });
    let job = c.job(&id);
    let backpressure: f64 = job["vertices"][0]["subtasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["backpressure"].as_f64().unwrap())
        .sum();
    assert!(backpressure > 0.2, "the sources are backpressured: {job}");
    let (status, body) = c.request("POST", &format!("/jobs/{id}/checkpoints"), None, None);
    assert_eq!(status, 202, "{body}");
    let manual = body["id"].as_u64().unwrap();
    c.wait_until(Duration::from_secs(30), "the manual checkpoint", |c| {
        c.get(&format!("/jobs/{id}/checkpoints")).1["history"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["id"] == manual && h["status"] != "IN_PROGRESS")
    });
    let cps = c.get(&format!("/jobs/{id}/checkpoints")).1;
    let history = cps["history"].as_array().unwrap();
    let completed: Vec<&Value> = history
        .iter()
        .filter(|h| h["status"] == "COMPLETED")
        .collect();
    assert!(completed.len() >= 5, "{cps}");
    assert!(
        completed
            .iter()
            .any(|h| h["id"] == manual && h["trigger"] == "manual"),
        "{cps}"
    );
    // Task 1 (key_by, fed by both source subtasks) aligns; in µs, as it often takes less
    // than a millisecond.
    let keyed_alignment = completed
        .iter()
        .filter_map(|h| {
            h["tasks"]
                .as_array()
                .unwrap()
                .iter()
                .find(|t| t["task"] == 1)
                .and_then(|t| t["alignment_us"].as_u64())
        })
        .max()
        .expect("the keyed task reports alignment");
    assert!(
        keyed_alignment > 0,
        "aligning behind full input queues takes time: {cps}"
    );
    for h in &completed {
        assert!(h["state_bytes"].as_u64().unwrap() > 0, "{h}");
        assert_eq!(h["acknowledged"], h["total"], "{h}");
    }
    let (status, _) = c.request("DELETE", &format!("/jobs/{id}"), None, None);
    assert_eq!(status, 202);
}

/// Ensures a Kafka → keyed window count → collect job with ABS produces exactly the counts
/// computed from the events although task managers running it are SIGKILLed five times while
/// the topic is still being written: the Kafka source rewinds to the offsets in the restored
/// checkpoint and reads the records again from the broker.
#[test]
fn kafka_source_rewinds_through_kills() {
    let Some(b) = weir_tests::kafka::bootstrap("kafka_source_rewinds_through_kills") else {
        return;
    };
    let feed = weir_tests::kafka::click_feed(&b, "abs-clicks", 120_000, 4);
    let mut c = Cluster::start(ClusterOptions {
        taskmanagers: 3,
        slots: 2,
        ..Default::default()
    });
    let spec = feed.count_job(
        &b,
        "kafka-count-abs",
        json!({"mode": "abs", "interval_ms": 300}),
    );
    let id = c.submit(&spec);
    let mut kills = 0;
    for _ in 0..5 {
        c.wait_until(Duration::from_secs(30), "a checkpoint", |c| {
            completed_checkpoints(c, &id) > 0
        });
        std::thread::sleep(Duration::from_millis(1000));
        let job = c.job(&id);
        if job["state"] != "RUNNING" {
            break;
        }
        let generation = job["generation"].as_u64().unwrap();
        let victim = job_taskmanagers(&job).into_iter().next().unwrap();
        let index = c.taskmanager_index(&victim);
        c.kill_taskmanager(index);
        c.add_taskmanager();
        kills += 1;
        wait_recovered(&c, &id, generation + 1);
    }
    feed.assert_counted(&c, &id);
    assert_eq!(kills, 5, "every kill happened while the job ran");
    assert_failovers(&c, &id, kills);
}
