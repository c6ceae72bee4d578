//! DCAS (per-subtask snapshots and input logs in the distributed cache) against real job
//! manager and task manager processes: a task manager's SIGKILL restarts only the subtasks
//! it ran, from their cached snapshots and logs, while the rest of the job keeps running,
//! and the output is still exactly the ground truth.
//!
//! Ground truth is computed from the generator's definition (no engine) and compared with
//! the collect sink's output record for record: a lost record changes a count, a duplicate
//! shows as a second result for one key and window, or as a higher count.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use weir_tests::cluster::{Cluster, ClusterOptions};

/// The wordcount example, made to run about `count / rate` seconds, with DCAS.
fn dcas_wordcount(count: u64, rate: u64) -> String {
    let checkpointing =
        json!({"mode": "dcas", "snapshot_every_records": 2000, "snapshot_interval_ms": 100});
    weir_tests::wordcount_spec("wordcount-dcas", checkpointing, count, rate).to_string()
}

/// (vertex name, subtask index) -> `field` of every subtask of the job.
fn per_subtask(job: &Value, field: &str) -> BTreeMap<(String, u64), Value> {
    let mut out = BTreeMap::new();
    for v in job["vertices"].as_array().expect("vertices") {
        for s in v["subtasks"].as_array().expect("subtasks") {
            let name = v["name"].as_str().unwrap_or_default().to_string();
            out.insert((name, s["subtask"].as_u64().unwrap_or(0)), s[field].clone());
        }
    }
    out
}

/// (vertex name, subtask index) -> task manager id.
fn placement(job: &Value) -> BTreeMap<(String, u64), String> {
    per_subtask(job, "taskmanager")
        .into_iter()
        .map(|(k, v)| (k, v.as_str().expect("tm").to_string()))
        .collect()
}

/// (vertex name, subtask index) -> records read so far.
fn records_in(job: &Value) -> BTreeMap<(String, u64), u64> {
    per_subtask(job, "records_in")
        .into_iter()
        .map(|(k, v)| (k, v.as_u64().unwrap_or(0)))
        .collect()
}

fn expected(spec: &str) -> BTreeMap<(String, i64), i64> {
    weir_tests::expected_wordcount(&weir_tests::generator(spec, "lines"), 5000)
}

/// Names of the job's entries in the cache.
fn job_entries(c: &Cluster, id: &str) -> Vec<Value> {
    let (status, body) = c.get(&format!("/cache/entries?prefix=dcas/{id}/&limit=10000"));
    assert_eq!(status, 200, "{body}");
    body["entries"].as_array().cloned().unwrap_or_default()
}

/// The job's failover records.
fn failovers(c: &Cluster, id: &str) -> Vec<Value> {
    let (status, body) = c.get(&format!("/jobs/{id}/failovers"));
    assert_eq!(status, 200, "{body}");
    body["failovers"].as_array().cloned().unwrap_or_default()
}

/// Waits until the job's `n`-th failover restored every restarted subtask (or the job
/// finished).
fn wait_recovered(c: &Cluster, id: &str, n: usize) {
    c.wait_until(Duration::from_secs(30), "restarted subtasks running", |c| {
        let restored = failovers(c, id)
            .get(n.wrapping_sub(1))
            .is_some_and(|e| e["restored_ms"].as_u64().is_some());
        let job = c.job(id);
        restored && job["state"] == "RUNNING" || job["state"] == "FINISHED"
    });
}

/// Waits for the job to finish and checks it never redeployed and its counts are exact.
fn assert_finished_exactly(c: &Cluster, id: &str, spec: &str) {
    let job = c.wait_for_end(id, Duration::from_secs(120));
    assert_eq!(job["state"], "FINISHED", "{job}");
    assert_eq!(job["generation"], 1, "DCAS never redeploys the job: {job}");
    let got = weir_tests::collected_counts(c, id, "out");
    let want = expected(spec);
    assert_eq!(got.len(), want.len(), "number of (word, window) results");
    assert_eq!(got, want);
}

/// Starts a cluster of `taskmanagers` (with the job manager's `args`), waits for the cache
/// to settle, submits `spec` and lets it run three seconds.
fn started(taskmanagers: usize, slots: u32, args: &[&str], spec: &str) -> (Cluster, String) {
    let c = Cluster::start(ClusterOptions {
        taskmanagers,
        slots,
        jobmanager_args: args.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    });
    c.wait_cache_settled(taskmanagers);
    let id = c.submit(spec);
    c.wait_until(Duration::from_secs(30), "job running", |c| {
        c.job(&id)["state"] == "RUNNING"
    });
    std::thread::sleep(Duration::from_secs(3));
    (c, id)
}

/// SIGKILLs the `k`-th task manager (in id order) running part of the job, starts a fresh
/// one and checks the recovery: exactly the dead task manager's subtasks restarted (the
/// failover record names them, with their log replayed), every other subtask kept its
/// place and kept reading, and the job was never redeployed. Returns once the cache has
/// every partition backed up on `members` members again, so the next kill loses nothing.
fn kill_and_check(c: &mut Cluster, id: &str, k: usize, members: usize) {
    let killed = kill_running(c, id, k, "");
    check_recovery(c, id, k, members, killed);
}

/// What [`kill_running`] killed: the placement and read counters just before, the dead
/// task manager and its subtasks.
struct Killed {
    before: BTreeMap<(String, u64), String>,
    read_before: BTreeMap<(String, u64), u64>,
    victim: String,
    lost: BTreeSet<(String, u64)>,
}

/// SIGKILLs the `k`-th task manager (in id order) among those running a subtask of a
/// vertex whose name ends with `vertex` (any vertex for ""), and starts a fresh one.
fn kill_running(c: &mut Cluster, id: &str, k: usize, vertex: &str) -> Killed {
    let job = c.job(id);
    assert_eq!(job["state"], "RUNNING", "{job}");
    let before = placement(&job);
    let busy: BTreeSet<&String> = before
        .iter()
        .filter(|((name, _), _)| name.ends_with(vertex))
        .map(|(_, tm)| tm)
        .collect();
    let victim = (*busy
        .iter()
        .nth(k % busy.len())
        .expect("a busy task manager"))
    .clone();
    let lost: BTreeSet<_> = before
        .iter()
        .filter(|(_, tm)| **tm == victim)
        .map(|(k, _)| k.clone())
        .collect();
    eprintln!("kill {k}: task manager {victim} running {lost:?}");
    let read_before = records_in(&job);
    let index = c.taskmanager_index(&victim);
    c.kill_taskmanager(index);
    c.add_taskmanager();
    Killed {
        before,
        read_before,
        victim,
        lost,
    }
}

/// The checks of [`kill_and_check`] for the `k`-th kill of the job.
fn check_recovery(c: &mut Cluster, id: &str, k: usize, members: usize, killed: Killed) {
    let Killed {
        before,
        read_before,
        victim,
        lost,
    } = killed;
    wait_recovered(c, id, k + 1);
    let job = c.job(id);
    assert_eq!(job["generation"], 1, "DCAS never redeploys the job: {job}");
    let after = placement(&job);
    for (sub, tm) in &before {
        if lost.contains(sub) {
            assert_ne!(
                after[sub], victim,
                "{sub:?} moved off the dead task manager"
            );
        } else {
            assert_eq!(&after[sub], tm, "{sub:?} kept running where it was: {job}");
        }
    }
    let event = failovers(c, id)[k].clone();
    let names: Vec<String> = job["vertices"]
        .as_array()
        .expect("vertices")
        .iter()
        .map(|v| v["name"].as_str().unwrap_or_default().to_string())
        .collect();
    let restarted: BTreeSet<(String, u64)> = event["restarted"]
        .as_array()
        .expect("restarted")
        .iter()
        .map(|p| {
            (
                names[p[0].as_u64().unwrap() as usize].clone(),
                p[1].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        restarted, lost,
        "the failover names the restarted subtasks: {event}"
    );
    // The survivors' counters keep rising (they were never stopped).
    c.wait_until(Duration::from_secs(10), "survivors still reading", |c| {
        let job = c.job(id);
        let now = records_in(&job);
        job["state"] == "FINISHED"
            || read_before
                .iter()
                .filter(|(sub, _)| !lost.contains(*sub))
                .all(|(sub, n)| now[sub] > *n)
    });
    // The recovery is over (restore and replay timed, caught up) before the next kill, so
    // that one is a recovery of its own.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let e = failovers(c, id)[k].clone();
        let job = c.job(id);
        if let (Some(replayed), Some(caught_up)) =
            (e["replayed_ms"].as_u64(), e["caught_up_ms"].as_u64())
        {
            // Timed where it happened: after the detection, and caught up once replayed
            // and the backlog the survivors kept for the restarted subtasks is logged.
            let detected = e["detected_ms"].as_u64().expect("detected");
            assert!(
                detected <= replayed && replayed <= caught_up,
                "recovery {k} phases out of order: {e}"
            );
            break;
        }
        if job["state"] == "FINISHED" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "recovery {k} not caught up within 30 s: {e}\njob: {job}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    c.wait_cache_settled(members);
}

/// Ensures that killing each task manager running part of a DCAS wordcount in turn (a
/// fresh one joins after each kill), then one subtask through the REST kill, restarts
/// only the lost subtasks — the others keep their place and keep reading, and the
/// generation never changes — and that the counts are exactly the ground truth.
#[test]
fn dcas_restarts_only_the_lost_subtasks_and_stays_exact() {
    let spec = dcas_wordcount(200_000, 8_000);
    let (mut c, id) = started(3, 2, &[], &spec);
    assert!(
        !job_entries(&c, &id).is_empty(),
        "the job logs to the cache"
    );
    let kills = 2;
    for k in 0..kills {
        kill_and_check(&mut c, &id, k, 3);
        std::thread::sleep(Duration::from_secs(1));
    }
    // The dashboard's kill button: only that subtask restarts.
    let (status, body) = c.request("POST", &format!("/jobs/{id}/tasks/1/1/kill"), None, None);
    assert_eq!(status, 200, "{body}");
    wait_recovered(&c, &id, kills + 1);
    assert_finished_exactly(&c, &id, &spec);
    // An ended job's logs, snapshots and progress leave the cache.
    c.wait_until(
        Duration::from_secs(20),
        "the job's cache entries dropped",
        |c| job_entries(c, &id).is_empty(),
    );
    let events = failovers(&c, &id);
    assert_eq!(events.len(), kills + 1, "{events:?}");
    for e in &events {
        assert_eq!(e["mode"], "dcas", "{e}");
        assert!(e["restored_ms"].as_u64().is_some(), "{e}");
        assert!(e["subtasks_restarted"].as_u64().unwrap() < 4, "{e}");
    }
    let killed = &events[kills];
    assert_eq!(killed["subtasks_restarted"], 1, "{killed}");
    assert_eq!(killed["restarted"], json!([[1, 1]]), "{killed}");
    assert!(
        killed["cause"]
            .as_str()
            .unwrap_or_default()
            .contains("killed"),
        "{killed}"
    );
}

/// Two event streams of 100,000 user events each (20,000 users, 25 s at 4,000 a second,
/// event time at that pace too): per user, session counts (10 s gap) of the first, and the
/// pairs of both joined in 3 s windows, into collect sinks `sessions` and `pairs`. Their
/// state grows through the run while each 100 ms sees a little of it change (per key for
/// sessions, appended records for the join), so DCAS snapshots them incrementally.
fn sessions_and_join(checkpointing: Option<Value>) -> String {
    let events = |id: &str, seed: u64| {
        let mut params = json!({"count": 100_000, "payload": "events", "keys": 20_000,
                                "seed": seed, "events_per_second": 4000});
        if checkpointing.is_some() {
            params["rate"] = json!(4000);
        }
        json!({"id": id, "kind": "generator", "parallelism": 2, "params": params})
    };
    let by_user = |id: &str, input: &str| {
        json!({"id": id, "kind": "key_by", "input": input, "parallelism": 2,
               "params": {"expr": "value.user"}})
    };
    let mut spec = json!({"name": "sessions-and-join", "operators": [
        events("a", 1), by_user("ka", "a"), events("b", 2), by_user("kb", "b"),
        {"id": "s", "kind": "window_aggregate", "input": "ka", "parallelism": 2,
         "params": {"window": {"session_gap_ms": 10_000},
                    "aggs": [{"agg": "count"}, {"agg": "sum", "field": "value.amount"}]}},
        {"id": "sessions", "kind": "collect", "input": "s", "parallelism": 2},
        {"id": "j", "kind": "join", "input": ["ka", "kb"], "parallelism": 2,
         "params": {"window": {"tumbling_ms": 3000}}},
        {"id": "pairs", "kind": "collect", "input": "j", "parallelism": 2}]});
    if let Some(c) = checkpointing {
        spec["checkpointing"] = c;
    }
    spec.to_string()
}

/// Ensures that session windows and a join, whose DCAS snapshots carry only the keys and
/// records that changed, restore exactly through two task manager kills: restarted
/// subtasks apply incremental snapshots (counted over both recoveries), and each sink's
/// output equals, as a multiset, the output of the same job run in process without a
/// failure.
#[test]
fn dcas_sessions_and_join_stay_exact_through_kills() {
    let reference = run_without_failures(&sessions_and_join(None), 2);
    let checkpointing =
        json!({"mode": "dcas", "snapshot_every_records": 2000, "snapshot_interval_ms": 100});
    let spec = sessions_and_join(Some(checkpointing));
    let (mut c, id) = started(3, 2, &[], &spec);
    for k in 0..2 {
        kill_and_check(&mut c, &id, k, 3);
        std::thread::sleep(Duration::from_secs(1));
    }
    let job = c.wait_for_end(&id, Duration::from_secs(120));
    assert_eq!(job["state"], "FINISHED", "{job}");
    assert_eq!(job["generation"], 1, "DCAS never redeploys the job: {job}");
    let events = failovers(&c, &id);
    let links: u64 = events
        .iter()
        .map(|e| e["snapshot_links"].as_u64().unwrap())
        .sum();
    assert!(links > 0, "restored from incremental snapshots: {events:?}");
    for sink in ["sessions", "pairs"] {
        let want = &reference[sink];
        let got = output_multiset(&c, &id, sink);
        assert!(want.len() > 10_000, "{sink}: {} results", want.len());
        assert_eq!(got.len(), want.len(), "number of {sink} results");
        assert!(
            got == *want,
            "{sink}: the results differ from the run without failures"
        );
    }
}

/// Generated events straight into a collect sink, three subtasks each (one per task
/// manager of a three-member cluster), so every snapshot interval delivers output.
fn events_to_collect(checkpointing: Option<Value>) -> String {
    let mut params = json!({"count": 36_000, "payload": "events", "keys": 1000, "seed": 5,
                            "events_per_second": 3000});
    let mut spec = json!({"name": "collect-receipts", "operators": []});
    if let Some(c) = checkpointing {
        params["rate"] = json!(3000);
        spec["checkpointing"] = c;
    }
    spec["operators"] = json!([
        {"id": "events", "kind": "generator", "parallelism": 3, "params": params},
        {"id": "out", "kind": "collect", "input": "events", "parallelism": 3}]);
    spec.to_string()
}

/// The job's collect output `op`, as sorted JSON texts (a multiset).
fn output_multiset(c: &Cluster, id: &str, op: &str) -> Vec<String> {
    let mut v: Vec<String> = c.output(id, op).iter().map(Value::to_string).collect();
    v.sort_unstable();
    v
}

/// Runs `spec` in process on `slots` arbiters to its end: what each collect sink received,
/// as [`output_multiset`] gives it.
fn run_without_failures(spec: &str, slots: usize) -> BTreeMap<String, Vec<String>> {
    let run = weir_tests::run_graph(&weir_tests::graph(spec), slots, Duration::from_secs(120));
    run.result.expect("the reference run finishes");
    run.collected
        .into_iter()
        .map(|(sink, records)| {
            let mut v: Vec<String> = records
                .iter()
                .map(|r| serde_json::to_value(&r.value).expect("json").to_string())
                .collect();
            v.sort_unstable();
            (sink, v)
        })
        .collect()
}

/// Ensures collect output a task manager had sent but the job manager never received is
/// not lost: the task manager's control connection is stalled for a second (its output and
/// heartbeats held in a proxy, while its snapshots still reach the cache), then it is
/// SIGKILLed and the held bytes dropped. The restarted sink's snapshot still holds every
/// epoch the job manager had not confirmed and delivers it again, so the output equals,
/// as a multiset, that of the job run in process without a failure.
#[test]
fn dcas_collect_output_in_flight_survives_a_crash() {
    let want = run_without_failures(&events_to_collect(None), 3)
        .remove("out")
        .expect("out");
    // A heartbeat timeout well above the stall, so the job manager does not act on the
    // silence: the kill is what it sees.
    let mut c = Cluster::start(ClusterOptions {
        taskmanagers: 2,
        heartbeat_timeout_ms: 4000,
        ..Default::default()
    });
    let link = weir_tests::proxy::Link::start(&c.control);
    c.add_taskmanager_via(&link.addr);
    c.wait_until(Duration::from_secs(30), "three task managers", |c| {
        c.alive_taskmanagers().len() == 3
    });
    c.wait_cache_settled(3);
    let checkpointing =
        json!({"mode": "dcas", "snapshot_every_records": 2000, "snapshot_interval_ms": 100});
    let spec = events_to_collect(Some(checkpointing));
    let id = c.submit(&spec);
    c.wait_until(Duration::from_secs(30), "job running", |c| {
        c.job(&id)["state"] == "RUNNING"
    });
    std::thread::sleep(Duration::from_secs(3));
    let victim = c.taskmanager_id(2);
    let ran: Vec<_> = placement(&c.job(&id))
        .into_iter()
        .filter(|(_, tm)| *tm == victim)
        .map(|(sub, _)| sub)
        .collect();
    assert!(
        ran.iter().any(|(name, _)| name.contains("out")),
        "the proxied task manager runs a collect subtask: {ran:?}"
    );
    // The job manager confirms each epoch it took, so a sink's snapshot keeps about one
    // interval's output (~100 records, 18 KB), not all it ever delivered (~3,000 records,
    // over 500 KB by now). The bound leaves room for a second of stalled snapshots.
    let snapshots: Vec<(String, u64)> = job_entries(&c, &id)
        .iter()
        .map(|e| {
            (
                e[0].as_str().unwrap_or_default().to_string(),
                e[1].as_u64().unwrap_or(0),
            )
        })
        .filter(|(name, _)| name.contains("/snap/"))
        .collect();
    eprintln!("snapshots: {snapshots:?}");
    assert!(!snapshots.is_empty(), "snapshots in the cache");
    assert!(
        snapshots.iter().all(|(_, bytes)| *bytes < 256 * 1024),
        "collect snapshots keep only output not yet confirmed: {snapshots:?}"
    );
    let before = c.output(&id, "out").len();
    assert!(before < want.len(), "the stall comes before the end");
    link.hold();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        c.job(&id)["state"],
        "RUNNING",
        "the stall comes before the end"
    );
    c.kill_taskmanager(2);
    link.cut();
    eprintln!("killed {victim} running {ran:?} after a 1 s stall; {before} results before");
    wait_recovered(&c, &id, 1);
    let job = c.wait_for_end(&id, Duration::from_secs(60));
    assert_eq!(job["state"], "FINISHED", "{job}");
    assert_eq!(job["generation"], 1, "DCAS never redeploys the job: {job}");
    let got = output_multiset(&c, &id, "out");
    assert_eq!(got.len(), want.len(), "number of results");
    assert!(
        got == want,
        "the results differ from the run without failures"
    );
}

/// Generated events through a map of parallelism 1 that rebalances them over a map of
/// parallelism 2, into a collect sink: the single map logs what it reads (its input comes
/// over channels) and deals its output round-robin. Every record is a distinct number, so
/// a duplicate shows. A 3 s micro-window leaves thousands of records in the map's log at a
/// kill (packed numbers take a few bytes, so its log does not reach the 64 KiB at which a
/// stateless subtask snapshots early).
fn rebalanced_events(checkpointing: Option<Value>) -> String {
    let mut params = json!({"count": 60_000, "keys": 1000, "seed": 7, "events_per_second": 4000});
    let mut spec = json!({"name": "rebalance-replay", "operators": []});
    if let Some(c) = checkpointing {
        params["rate"] = json!(4000);
        spec["checkpointing"] = c;
    }
    spec["operators"] = json!([
        {"id": "events", "kind": "generator", "parallelism": 2, "params": params},
        {"id": "one", "kind": "map", "input": "events", "parallelism": 1,
         "params": {"expr": "value"}},
        {"id": "two", "kind": "map", "input": "one", "parallelism": 2,
         "partition": "rebalance", "params": {"expr": "value"}},
        {"id": "out", "kind": "collect", "input": "two", "parallelism": 2}]);
    spec.to_string()
}

/// Ensures a restarted subtask that rebalances its output replays each record to the
/// channel, and at the seq, it first went to. Live, the linger timer cuts its batches
/// (4,000 records a second are 20 a cut); its replay has no timer. When the route dealt
/// batches in turn, the live run sent everything to one receiver and the replay half of
/// it to the other, which took those records a second time.
#[test]
fn dcas_rebalanced_output_is_replayed_to_the_same_receivers() {
    let want = run_without_failures(&rebalanced_events(None), 2)
        .remove("out")
        .expect("out");
    let checkpointing = json!({"mode": "dcas", "snapshot_every_records": 1_000_000,
                               "snapshot_interval_ms": 3000});
    let spec = rebalanced_events(Some(checkpointing));
    let (mut c, id) = started(3, 2, &[], &spec);
    std::thread::sleep(Duration::from_millis(1500));
    let killed = kill_running(&mut c, &id, 0, "one");
    check_recovery(&mut c, &id, 0, 3, killed);
    let event = failovers(&c, &id)[0].clone();
    eprintln!("failover: {event}");
    assert!(event["log_replayed"].as_u64() > Some(0), "{event}");
    let job = c.wait_for_end(&id, Duration::from_secs(60));
    assert_eq!(job["state"], "FINISHED", "{job}");
    let got = output_multiset(&c, &id, "out");
    assert_eq!(got.len(), want.len(), "number of results");
    assert!(
        got == want,
        "the results differ from the run without failures"
    );
}

/// Ensures a canceled DCAS job's logs and snapshots leave the cache, as a finished one's do.
#[test]
fn dcas_canceled_job_leaves_the_cache() {
    let spec = dcas_wordcount(10_000_000, 8_000);
    let (c, id) = started(3, 2, &[], &spec);
    assert!(
        !job_entries(&c, &id).is_empty(),
        "the job logs to the cache"
    );
    let (status, body) = c.request("DELETE", &format!("/jobs/{id}"), None, None);
    assert_eq!(status, 202, "{body}");
    c.wait_until(Duration::from_secs(30), "job canceled", |c| {
        c.job(&id)["state"] == "CANCELED"
    });
    c.wait_until(
        Duration::from_secs(20),
        "the job's cache entries dropped",
        |c| job_entries(c, &id).is_empty(),
    );
}

/// Ensures that ten kills over two minutes, rotating over the task managers running the
/// job (a fresh one joins after each), each restart only the dead task manager's
/// subtasks, and that the counts are still exactly the ground truth at the end.
#[test]
fn dcas_soak_ten_kills() {
    let spec = dcas_wordcount(1_400_000, 8_000);
    let (mut c, id) = started(4, 2, &[], &spec);
    let kills = 10;
    for k in 0..kills {
        kill_and_check(&mut c, &id, k, 4);
        // Spread the kills over the job's run, at varying points of the micro-window.
        std::thread::sleep(Duration::from_millis(8_000 + 370 * k as u64));
    }
    assert_finished_exactly(&c, &id, &spec);
    assert_eq!(failovers(&c, &id).len(), kills);
}

/// Ensures that two task managers killed at the same moment, and then the task manager
/// hosting the restarted subtasks killed while they recover, still give exact counts when
/// the cache keeps three backups (so three losses before re-replication lose no entry).
#[test]
fn dcas_survives_two_simultaneous_kills_and_a_kill_during_recovery() {
    let spec = dcas_wordcount(160_000, 8_000);
    let (mut c, id) = started(5, 1, &["--cache-backup-count", "3"], &spec);
    let busy: BTreeSet<String> = placement(&c.job(&id)).into_values().collect();
    assert_eq!(
        busy.len(),
        2,
        "{busy:?}; failovers before the kills: {:?}",
        failovers(&c, &id)
    );
    eprintln!("killing {busy:?} at once");
    let indexes: Vec<usize> = busy.iter().map(|tm| c.taskmanager_index(tm)).collect();
    c.kill_taskmanagers(&indexes);
    // As soon as a restarted subtask is placed somewhere, kill that task manager too.
    let mut second = None;
    c.wait_until(Duration::from_secs(30), "a restarted subtask placed", |c| {
        let now: BTreeSet<String> = placement(&c.job(&id)).into_values().collect();
        second = now.difference(&busy).next().cloned();
        second.is_some()
    });
    let second = second.expect("placed");
    eprintln!("killing {second} during the recovery");
    let index = c.taskmanager_index(&second);
    c.kill_taskmanager(index);
    c.add_taskmanager();
    c.add_taskmanager();
    // The joined recovery ends: every restarted subtask replayed, and the backlogs the
    // survivors kept for them (rewired twice for some) logged.
    c.wait_until(
        Duration::from_secs(30),
        "the joined recovery caught up",
        |c| {
            let last = failovers(c, &id).last().cloned().unwrap_or_default();
            last["caught_up_ms"].as_u64().is_some() || c.job(&id)["state"] == "FINISHED"
        },
    );
    let last = failovers(&c, &id).last().cloned().unwrap_or_default();
    if let Some(caught_up) = last["caught_up_ms"].as_u64() {
        let replayed = last["replayed_ms"]
            .as_u64()
            .expect("replayed before caught up");
        assert!(replayed <= caught_up, "{last}");
    }
    assert_finished_exactly(&c, &id, &spec);
    // Losses during a recovery join it: its record names every subtask restarted.
    let events = failovers(&c, &id);
    let restarted: u64 = events
        .iter()
        .map(|e| e["subtasks_restarted"].as_u64().unwrap_or(0))
        .sum();
    assert!(restarted >= 3, "{events:?}");
    assert!(
        events.iter().any(|e| e["cause"]
            .as_str()
            .unwrap_or_default()
            .matches("was lost")
            .count()
            >= 2),
        "simultaneous losses are one recovery: {events:?}"
    );
}

/// Ensures that losing more task managers at once than the cache's backups cover never
/// gives wrong output: the job either fails with a reason naming a lost partition (when
/// the lost partitions held its entries) or finishes with exact counts (when they did not).
#[test]
fn dcas_loss_beyond_backups_fails_cleanly() {
    let spec = dcas_wordcount(120_000, 8_000);
    let (mut c, id) = started(4, 1, &[], &spec);
    let busy: BTreeSet<String> = placement(&c.job(&id)).into_values().collect();
    let indexes: Vec<usize> = busy.iter().map(|tm| c.taskmanager_index(tm)).collect();
    c.kill_taskmanagers(&indexes);
    c.add_taskmanager();
    c.add_taskmanager();
    let job = c.wait_for_end(&id, Duration::from_secs(120));
    match job["state"].as_str() {
        Some("FAILED") => {
            let failure = job["failure"].as_str().unwrap_or_default();
            assert!(
                failure.contains("cache partition") && failure.contains("lost every copy"),
                "the failure names the lost partition: {job}"
            );
        }
        Some("FINISHED") => {
            assert_eq!(
                weir_tests::collected_counts(&c, &id, "out"),
                expected(&spec)
            )
        }
        other => panic!("unexpected end {other:?}: {job}"),
    }
}

/// Ensures a DCAS job whose state does not fit in the cache fails with a reason naming the
/// memory limit, within the restarts it is allowed, instead of stalling: every write to a
/// full member waits for room for a bounded time, then fails its subtask.
#[test]
fn dcas_state_beyond_the_cache_fails_naming_the_limit() {
    // 200,000 users counted in a one-minute window: about 5 MB of state per subtask, in
    // task managers with 2 MiB of cache each.
    let spec = json!({
        "name": "too-big-for-the-cache",
        "checkpointing": {"mode": "dcas", "max_restarts": 1},
        "operators": [
            {"id": "events", "kind": "generator", "parallelism": 2,
             "params": {"payload": "events", "rate": 300_000, "keys": 200_000, "seed": 7,
                        "events_per_second": 20_000}},
            {"id": "by_user", "kind": "key_by", "input": "events", "parallelism": 2,
             "params": {"expr": "value.user"}},
            {"id": "per_minute", "kind": "window_aggregate", "input": "by_user",
             "parallelism": 2,
             "params": {"window": {"tumbling_ms": 60_000},
                        "aggs": [{"name": "events", "agg": "count"}]}},
            {"id": "out", "kind": "collect", "input": "per_minute", "parallelism": 2}
        ]
    });
    let c = Cluster::start(ClusterOptions {
        taskmanagers: 3,
        taskmanager_args: vec!["--cache-memory-mb".into(), "2".into()],
        ..Default::default()
    });
    c.wait_cache_settled(3);
    let id = c.submit(&spec.to_string());
    let started = Instant::now();
    let job = c.wait_for_end(&id, Duration::from_secs(120));
    assert_eq!(job["state"], "FAILED", "{job}");
    let failure = job["failure"].as_str().unwrap_or_default();
    assert!(
        failure.contains("restart limit (1) reached")
            && failure.contains("cache full on")
            && failure.contains("--cache-memory-mb"),
        "the failure names the full cache and the flag: {failure}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(90),
        "two attempts, each given up within the cache's wait: {:?}",
        started.elapsed()
    );
}

/// The DCAS wordcount of `count` lines at 8,000 a second, with a fallback checkpoint every
/// `fallback_ms`.
fn dcas_fallback_wordcount(fallback_ms: u64, count: u64) -> String {
    let checkpointing = json!({
        "mode": "dcas",
        "snapshot_every_records": 2000,
        "snapshot_interval_ms": 100,
        "fallback_abs_interval_ms": fallback_ms,
    });
    weir_tests::wordcount_spec("wordcount-dcas-fallback", checkpointing, count, 8_000).to_string()
}

/// Checkpoints the job completed (fallback checkpoints, for DCAS).
fn completed_checkpoints(c: &Cluster, id: &str) -> u64 {
    c.get(&format!("/jobs/{id}/checkpoints")).1["counts"]["completed"]
        .as_u64()
        .unwrap_or(0)
}

/// Ensures fallback checkpoints (barriers through a DCAS job) leave DCAS recovery as it is:
/// killing task managers twice restarts only their subtasks (barriers of checkpoints in
/// flight are aborted, so no survivor waits for a restarted subtask's barrier), fallback
/// checkpoints complete again after each recovery, and the counts are exact although
/// sinks commit only on completed fallback checkpoints.
#[test]
fn dcas_fallback_checkpoints_through_kills() {
    let spec = dcas_fallback_wordcount(200, 160_000);
    let (mut c, id) = started(3, 2, &[], &spec);
    for k in 0..2 {
        let before = completed_checkpoints(&c, &id);
        kill_and_check(&mut c, &id, k, 3);
        c.wait_until(Duration::from_secs(20), "fallback checkpoints again", |c| {
            c.job(&id)["state"] == "FINISHED" || completed_checkpoints(c, &id) > before + 1
        });
    }
    assert_finished_exactly(&c, &id, &spec);
    assert!(failovers(&c, &id).iter().all(|f| f["mode"] == "dcas"));
}

/// Ensures a DCAS job with fallback checkpoints survives losing every task manager at once,
/// and with them every copy of its cache entries: it restarts whole from its last fallback
/// checkpoint (a failover of mode "fallback", a new deployment) and its counts are exact —
/// sinks commit only what a completed fallback checkpoint covers, so nothing the restore
/// replays was visible before. The job runs on every member (two), so the loss is certain;
/// with spare members, whether any of its entries lost both copies would be chance.
#[test]
fn dcas_fallback_checkpoint_covers_a_loss_beyond_backups() {
    restored_once_from_the_fallback(1, false);
}

/// Ensures that a cache member lost while a DCAS job waits for slots to restart whole (its
/// partitions lose every copy again) does not fail the restored deployment: it dates from
/// after that loss, so the job restores from its fallback checkpoint once.
#[test]
fn dcas_loss_while_waiting_to_restart_restores_once() {
    restored_once_from_the_fallback(1, true);
}

/// Ensures that two DCAS jobs that lose cache partitions together each restore from their
/// fallback checkpoint once: the losses are scoped to the deployments from before them, so
/// neither restored deployment is refused the lost partitions while the other job runs (when
/// a whole restart cleared the losses, it could not while another DCAS job ran, and each job
/// failed again at every lost partition).
#[test]
fn dcas_two_jobs_losing_partitions_restore_once_each() {
    restored_once_from_the_fallback(2, false);
}

/// Runs `jobs` DCAS jobs with fallback checkpoints on two task managers, kills both (with
/// `lost_while_waiting`, then one that joins while the jobs wait for slots, the cache's only
/// member then), adds two, and checks that each job restored once from its fallback
/// checkpoint and that its counts are exact.
fn restored_once_from_the_fallback(jobs: usize, lost_while_waiting: bool) {
    let spec = dcas_fallback_wordcount(300, 120_000);
    let slots = jobs as u32;
    let (mut c, first) = started(2, slots, &[], &spec);
    let mut ids = vec![first];
    for _ in 1..jobs {
        let id = c.submit(&spec);
        c.wait_until(Duration::from_secs(30), "job running", |c| {
            c.job(&id)["state"] == "RUNNING"
        });
        ids.push(id);
    }
    c.wait_until(Duration::from_secs(30), "fallback checkpoints", |c| {
        ids.iter().all(|id| completed_checkpoints(c, id) >= 2)
    });
    // Every member: the loss is certain (with a member left, whether any entry lost both
    // copies would be chance), and each job ran on some of them.
    let indexes = [0, 1];
    c.kill_taskmanagers(&indexes);
    if lost_while_waiting {
        c.wait_until(Duration::from_secs(30), "waiting to restart", |c| {
            ids.iter().all(|id| c.job(id)["state"] == "RESTARTING")
        });
        // The newest loss epoch in `GET /cache` (losses are kept, each with its epoch).
        let newest_loss = |c: &Cluster| {
            c.get("/cache").1["lost_partitions"]
                .as_array()
                .and_then(|l| l.iter().filter_map(|p| p["epoch"].as_u64()).max())
                .unwrap_or(0)
        };
        let before = newest_loss(&c);
        c.add_taskmanager();
        c.wait_cache_settled(1);
        let joined = c.taskmanagers_started() - 1;
        c.kill_taskmanager(joined);
        c.wait_until(Duration::from_secs(30), "partitions lost again", |c| {
            newest_loss(c) > before
        });
        for id in &ids {
            assert_eq!(c.job(id)["state"], "RESTARTING", "still waiting for slots");
        }
    }
    for _ in &indexes {
        c.add_taskmanager();
    }
    for id in &ids {
        // A DCAS restart in the restored deployment starts from the fallback checkpoint when
        // the subtask had not stored a snapshot of its own yet, from its snapshot otherwise.
        c.wait_until(Duration::from_secs(60), "restored from the fallback", |c| {
            let job = c.job(id);
            job["generation"].as_u64() >= Some(2) && job["state"] == "RUNNING"
                || job["state"] == "FINISHED"
        });
        if c.job(id)["state"] == "RUNNING" {
            let (status, body) =
                c.request("POST", &format!("/jobs/{id}/tasks/1/1/kill"), None, None);
            assert_eq!(status, 200, "{body}; failovers: {:?}", failovers(&c, id));
        }
    }
    for id in &ids {
        let job = c.wait_for_end(id, Duration::from_secs(120));
        assert_eq!(job["state"], "FINISHED", "{job}");
        let events = failovers(&c, id);
        let modes: Vec<&str> = events
            .iter()
            .map(|f| f["mode"].as_str().unwrap_or_default())
            .collect();
        // Once: the restored deployment dates from after the loss, so the partitions whose
        // every copy was lost serve it, and nothing fails it again.
        assert_eq!(
            modes.iter().filter(|m| **m == "fallback").count(),
            1,
            "job {id} restored from the fallback checkpoint once: {modes:?}"
        );
        // The DCAS recoveries the whole-job restart replaced are over, not left in progress.
        for e in &events[..events.len() - 1] {
            assert!(
                e["caught_up_ms"].as_u64().is_some() || e["superseded_ms"].as_u64().is_some(),
                "{e}"
            );
        }
        assert!(job["generation"].as_u64() >= Some(2), "{job}");
        assert!(
            events
                .iter()
                .any(|f| f["mode"] == "fallback" && f["checkpoint"].as_u64().is_some()),
            "a fallback restore names its checkpoint"
        );
        assert_eq!(weir_tests::collected_counts(&c, id, "out"), expected(&spec));
    }
}

/// Ensures that a task manager paused (SIGSTOP) for three heartbeat timeouts is replaced:
/// only its subtasks restart elsewhere, and when it resumes (SIGCONT) nothing it emits
/// reaches the output (the data plane and the job manager fence it), so the counts stay
/// exact.
#[test]
fn dcas_paused_taskmanager_is_fenced() {
    let spec = dcas_wordcount(160_000, 8_000);
    let (c, id) = started(3, 2, &[], &spec);
    let victim = placement(&c.job(&id))
        .into_values()
        .next()
        .expect("a subtask");
    let index = c.taskmanager_index(&victim);
    c.signal_taskmanager(index, "STOP");
    wait_recovered(&c, &id, 1);
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !placement(&c.job(&id)).values().any(|tm| *tm == victim),
        "the job runs without the paused task manager"
    );
    c.signal_taskmanager(index, "CONT");
    assert_finished_exactly(&c, &id, &spec);
}

/// Ensures a job manager that stops answering for longer than the heartbeat timeout (a
/// stall: SIGSTOP, as a long pause on a loaded machine would) loses nothing: every task
/// manager fences itself meanwhile (it cannot tell a silent job manager from having been
/// declared dead), and when the job manager resumes it restarts what they stopped, from
/// their cached snapshots and logs, and the counts stay exact.
#[test]
fn dcas_job_manager_stall_is_survived() {
    let spec = dcas_wordcount(160_000, 8_000);
    let (c, id) = started(3, 2, &[], &spec);
    c.signal_jobmanager("STOP");
    std::thread::sleep(Duration::from_millis(1600));
    c.signal_jobmanager("CONT");
    assert_finished_exactly(&c, &id, &spec);
    let alive = c.alive_taskmanagers().len();
    assert_eq!(
        alive, 3,
        "a stalled job manager declares no task manager dead"
    );
}

/// Ensures a DCAS wordcount writing its counts through the exactly-once Kafka sink (one
/// transaction per snapshot, transactional id per sink subtask) shows a `read_committed`
/// reader exactly the ground truth after two task manager kills: a restarted sink's
/// producer fences its dead incarnation and aborts the transaction it left open, writes
/// again only the snapshot epochs the topic does not have, and replay regenerates the rest.
/// Needs a real Kafka (`WEIR_KAFKA_EOS_BOOTSTRAP`): the CI broker has no transactions.
#[test]
fn dcas_kafka_sink_is_exactly_once_through_kills() {
    let Some(b) = weir_tests::kafka::broker_from(
        "WEIR_KAFKA_EOS_BOOTSTRAP",
        "dcas_kafka_sink_is_exactly_once_through_kills",
        "name a real Apache Kafka with transactions, e.g. WEIR_KAFKA_EOS_BOOTSTRAP=host:9092",
    ) else {
        return;
    };
    let topic = weir_tests::kafka::unique_topic("dcas-eos");
    weir_tests::kafka::create_topic(&b, &topic, 2);
    kafka_sink_through_kills(&b, &topic, Duplicates::Refused, &|_| {});
}

/// Ensures the same job against librdkafka's mock cluster, in this process, loses no result
/// and writes no wrong count when the first kill lands inside the sink's transactions
/// (the broker's round trips are slowed meanwhile): a restored sink writes again the epochs
/// of its snapshot, through `init_transactions`, abort and commit against a broker that
/// speaks the transaction protocol. What the mock cannot show: it keeps no epoch marker, so
/// a restored sink writes every epoch of its snapshot again, committed or not; and it shows
/// aborted records to `read_committed` readers. So a result may be read twice here (both
/// copies must be equal), and an epoch whose records reached the broker before the kill
/// counts as present; the real-Kafka test above refuses any repeat.
#[test]
fn dcas_kafka_sink_transactions_lose_nothing_through_kills() {
    let mock = weir_tests::kafka::MockBroker::with_topic("dcas-eos", 2);
    let b = mock.bootstrap();
    kafka_sink_through_kills(&b, "dcas-eos", Duplicates::EqualOnly, &|rtt| {
        mock.round_trip(rtt)
    });
}

/// How [`kafka_sink_through_kills`] treats a (word, window) result read more than once.
#[derive(Clone, Copy, PartialEq)]
enum Duplicates {
    Refused,
    EqualOnly,
}

/// Runs the DCAS wordcount into the Kafka sink on `topic`, kills two task managers (the
/// first one running a sink subtask, while `slow` makes the broker's round trips long if it
/// can), and compares what a `read_committed` reader sees with the ground truth.
fn kafka_sink_through_kills(b: &str, topic: &str, duplicates: Duplicates, slow: &dyn Fn(Duration)) {
    let mut spec: Value = serde_json::from_str(&dcas_wordcount(160_000, 8_000)).expect("spec");
    let out = spec["operators"]
        .as_array_mut()
        .expect("operators")
        .iter_mut()
        .find(|op| op["id"] == "out")
        .expect("sink");
    out["kind"] = json!("kafka_sink");
    out["params"] = json!({"bootstrap_servers": b, "topic": topic});
    let spec = spec.to_string();
    let (mut c, id) = started(3, 2, &[], &spec);
    // Slow broker round trips keep the sinks inside their transactions (each takes a few
    // round trips) most of the time, so the kill finds epochs in a snapshot that are not
    // committed yet, and likely a transaction left open.
    slow(Duration::from_millis(1500));
    std::thread::sleep(Duration::from_secs(5));
    let killed = kill_running(&mut c, &id, 0, "out");
    slow(Duration::ZERO);
    check_recovery(&mut c, &id, 0, 3, killed);
    std::thread::sleep(Duration::from_secs(1));
    kill_and_check(&mut c, &id, 1, 3);
    let job = c.wait_for_end(&id, Duration::from_secs(120));
    assert_eq!(job["state"], "FINISHED", "{job}");
    let mut got: BTreeMap<(String, i64), i64> = BTreeMap::new();
    let mut repeated = 0;
    for r in weir_tests::kafka::read_committed_all(b, topic, Duration::from_secs(60)) {
        let v: Value = serde_json::from_slice(&r.payload).expect("json");
        let key = (
            v["key"].as_str().expect("key").to_string(),
            v["window_start"].as_i64().expect("window_start"),
        );
        let count = v["count"].as_i64().expect("count");
        if let Some(prev) = got.insert(key.clone(), count) {
            assert!(
                duplicates == Duplicates::EqualOnly && prev == count,
                "output {key:?} read twice: {prev} and {count}"
            );
            repeated += 1;
        }
    }
    if repeated > 0 {
        eprintln!("{repeated} results read twice (epochs written again, or aborted ones shown)");
    }
    let want = expected(&spec);
    assert_eq!(got.len(), want.len(), "number of (word, window) results");
    assert_eq!(got, want);
}

/// Ensures a Kafka → keyed window count → collect job under DCAS counts exactly the clicks
/// written although task managers running it are SIGKILLed three times while the topic is
/// still being written: each restarted source replays its cached polls (with the offsets
/// after them) and then reads on from the broker, and only the dead task manager's subtasks
/// restart.
#[test]
fn dcas_kafka_source_through_kills() {
    let Some(b) = weir_tests::kafka::bootstrap("dcas_kafka_source_through_kills") else {
        return;
    };
    let feed = weir_tests::kafka::click_feed(&b, "dcas-clicks", 200_000, 4);
    let checkpointing = json!({"mode": "dcas", "snapshot_every_records": 2000});
    let spec = feed.count_job(&b, "kafka-count-dcas", checkpointing);
    let (mut c, id) = started(3, 2, &[], &spec);
    // The first kill finds clicks in flight.
    c.wait_until(Duration::from_secs(30), "clicks read", |c| {
        let job = c.job(&id);
        records_in(&job)
            .iter()
            .filter(|((task, _), _)| task.starts_with("clicks"))
            .map(|(_, n)| n)
            .sum::<u64>()
            >= 10_000
    });
    let mut kills = 0;
    for k in 0..3 {
        if c.job(&id)["state"] != "RUNNING" {
            break;
        }
        let t = Instant::now();
        kill_and_check(&mut c, &id, k, 3);
        eprintln!(
            "kill {k} recovered in {:?}: {}",
            t.elapsed(),
            failovers(&c, &id)[k]
        );
        kills += 1;
        std::thread::sleep(Duration::from_millis(1500));
    }
    let job = feed.assert_counted(&c, &id);
    assert_eq!(job["generation"], 1, "DCAS never redeploys the job: {job}");
    assert_eq!(kills, 3, "every kill happened while the job ran");
}
