//! End-to-end tests against real job manager and task manager processes.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::time::{Duration, Instant};

use serde_json::Value;
use weir_tests::cluster::{Cluster, ClusterOptions};

fn wordcount() -> &'static str {
    jobs::EXAMPLES
        .iter()
        .find(|(n, _)| *n == "wordcount.json")
        .unwrap()
        .1
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// An unbounded, rate-limited keyed job with parallelism `p` (every subtask keeps running).
fn unbounded(p: usize) -> String {
    format!(
        r#"{{"name":"endless","operators":[
        {{"id":"src","kind":"generator","parallelism":{p},"params":{{"rate":20000,"keys":100}}}},
        {{"id":"key","kind":"key_by","input":"src","parallelism":{p},"params":{{"expr":"value"}}}},
        {{"id":"count","kind":"window_aggregate","input":"key","parallelism":{p},"params":{{"window":{{"tumbling_ms":100}},"agg":"count"}}}},
        {{"id":"sink","kind":"discard","input":"count","parallelism":{p}}}]}}"#
    )
}

/// Every subtask of a job's view, with the name of its vertex.
fn subtasks(job: &Value) -> Vec<(&str, &Value)> {
    job["vertices"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|v| {
            let name = v["name"].as_str().unwrap();
            v["subtasks"]
                .as_array()
                .unwrap()
                .iter()
                .map(move |s| (name, s))
        })
        .collect()
}

fn placements(job: &Value) -> BTreeSet<String> {
    subtasks(job)
        .into_iter()
        .map(|(_, s)| s["taskmanager"].as_str().unwrap().to_string())
        .collect()
}

fn wait_running(c: &Cluster, id: &str) {
    c.wait_until(Duration::from_secs(20), "job running", |c| {
        c.job(id)["state"] == "RUNNING"
    });
}

/// Ensures that wordcount with parallelism 2 runs across two task manager processes (records
/// cross the data plane) and its collected output equals the independently computed counts —
/// after garbage was sent at every task manager's data-plane port, which must not disturb them.
#[test]
fn distributed_wordcount_matches_expected() {
    let c = Cluster::start(ClusterOptions::default());
    for tm in c.alive_taskmanagers() {
        let addr = tm["data_addr"].as_str().unwrap();
        for garbage in [
            &[0xffu8, 0xff, 0xff, 0x7f][..],
            &[12, 0, 0, 0, 1, 2, 3][..],
            b"\x05\x00\x00\x00hello",
        ] {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.write_all(garbage).unwrap();
        }
    }
    let id = c.submit(wordcount());
    let job = c.wait_for_end(&id, Duration::from_secs(60));
    assert_eq!(job["state"], "FINISHED", "{job}");
    let tms = placements(&job);
    assert!(
        tms.len() >= 2,
        "subtasks spread over at least 2 task managers: {tms:?}"
    );
    assert_eq!(
        c.alive_taskmanagers().len(),
        3,
        "garbage frames did not kill a task manager"
    );

    let mut got = BTreeMap::new();
    for v in c.output(&id, "out") {
        let key = (
            v["key"].as_str().unwrap().to_string(),
            v["window_start"].as_i64().unwrap(),
        );
        assert!(
            got.insert(key, v["count"].as_i64().unwrap()).is_none(),
            "duplicate result {v}"
        );
    }
    let expected =
        weir_tests::expected_wordcount(&weir_tests::generator(wordcount(), "lines"), 5000);
    assert_eq!(got.len(), expected.len());
    assert_eq!(got, expected);
}

/// Ensures a SIGKILLed task manager is declared dead within heartbeat.timeout_ms + 200 ms and
/// that a job running on it fails with a reason naming it (no fault tolerance configured).
#[test]
fn killed_taskmanager_fails_the_job() {
    let mut c = Cluster::start(ClusterOptions {
        taskmanagers: 3,
        slots: 1,
        ..Default::default()
    });
    let id = c.submit(&unbounded(3));
    wait_running(&c, &id);
    assert_eq!(placements(&c.job(&id)).len(), 3);
    let victim = c.taskmanager_id(1);
    let killed_at = now_ms();
    c.kill_taskmanager(1);
    c.wait_until(Duration::from_secs(5), "task manager dead", |c| {
        c.get(&format!("/taskmanagers/{victim}")).1["state"] == "DEAD"
    });
    let tm = c.get(&format!("/taskmanagers/{victim}")).1;
    let detected = tm["died"].as_u64().unwrap().saturating_sub(killed_at);
    assert!(
        detected <= c.options.heartbeat_timeout_ms + 200,
        "detected after {detected} ms: {tm}"
    );
    let job = c.wait_for_end(&id, Duration::from_secs(10));
    assert_eq!(job["state"], "FAILED");
    let reason = job["failure"].as_str().unwrap();
    assert!(
        reason.contains(&victim),
        "reason names the task manager: {reason}"
    );
}

/// Ensures a task manager that stops heartbeating (SIGSTOP: its connection stays open) is
/// declared dead by the heartbeat timeout, within timeout + 200 ms.
#[test]
fn silent_taskmanager_times_out() {
    let c = Cluster::start(ClusterOptions {
        taskmanagers: 2,
        ..Default::default()
    });
    let victim = c.taskmanager_id(0);
    let stopped_at = now_ms();
    c.signal_taskmanager(0, "STOP");
    c.wait_until(Duration::from_secs(5), "task manager dead", |c| {
        c.get(&format!("/taskmanagers/{victim}")).1["state"] == "DEAD"
    });
    let tm = c.get(&format!("/taskmanagers/{victim}")).1;
    let detected = tm["died"].as_u64().unwrap().saturating_sub(stopped_at);
    c.signal_taskmanager(0, "CONT");
    assert!(
        detected >= c.options.heartbeat_timeout_ms - 150,
        "not before the timeout: {detected} ms"
    );
    assert!(
        detected <= c.options.heartbeat_timeout_ms + 200,
        "detected after {detected} ms: {tm}"
    );
    assert!(
        tm["death_reason"]
            .as_str()
            .unwrap()
            .contains("no heartbeat"),
        "{tm}"
    );
}

/// Sends a `Register` speaking wire version `wire` to the control port at `control`; answers
/// the job manager's reply.
fn register_speaking(
    control: &str,
    tm: &str,
    wire: u32,
) -> engine::protocol::control::ToTaskManager {
    use engine::protocol::control::{ToJobManager, ToTaskManager};
    let register = ToJobManager::Register {
        wire,
        tm: tm.parse().unwrap(),
        slots: 1,
        data_addr: "127.0.0.1:9".into(),
        pid: std::process::id(),
        cache_addr: "127.0.0.1:9".into(),
    };
    let mut s = std::net::TcpStream::connect(control).unwrap();
    send_frame(&mut s, &engine::codec::encode(&register).unwrap());
    engine::codec::decode::<ToTaskManager>(&receive_frame(&mut s)).unwrap()
}

/// Writes one control frame (`u32` little-endian length, then the payload).
fn send_frame(s: &mut std::net::TcpStream, payload: &[u8]) {
    s.write_all(&(payload.len() as u32).to_le_bytes()).unwrap();
    s.write_all(payload).unwrap();
}

/// Reads one control frame's payload, waiting up to 5 s.
fn receive_frame(s: &mut std::net::TcpStream) -> Vec<u8> {
    use std::io::Read;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut len = [0u8; 4];
    s.read_exact(&mut len).expect("a frame within 5 s");
    let mut payload = vec![0; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut payload).unwrap();
    payload
}

/// Ensures a task manager the job manager refuses exits at once with the reason, instead of
/// retrying until its give-up time (a minute here) and blaming an unreachable job manager.
/// The job manager is played by the test: it reads the registration and refuses it.
#[test]
fn refused_taskmanager_exits_with_the_reason() {
    use engine::protocol::control::{ToJobManager, ToTaskManager};
    let jm = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut tm = std::process::Command::new(weir_tests::cluster::binary("taskmanager"))
        .args(["--jobmanager", &jm.local_addr().unwrap().to_string()])
        .args(["--exit-after-disconnect-ms", "60000"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    jm.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut conn = loop {
        match jm.accept() {
            Ok((conn, _)) => break conn,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("the task manager did not connect within 10 s: {e}"),
        }
    };
    conn.set_nonblocking(false).unwrap();
    let register = engine::codec::decode::<ToJobManager>(&receive_frame(&mut conn)).unwrap();
    assert!(
        matches!(register, ToJobManager::Register { wire, .. } if wire == engine::protocol::WIRE_VERSION),
        "{register:?}"
    );
    let refused = ToTaskManager::Refused {
        reason: "speaks wire version 0 in this test".into(),
    };
    send_frame(&mut conn, &engine::codec::encode(&refused).unwrap());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = tm.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            tm.kill().unwrap();
            panic!("the refused task manager still runs after 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut tm.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{status}");
    assert!(
        stderr.contains("the job manager refused this task manager: speaks wire version 0"),
        "{stderr}"
    );
}

/// Ensures the job manager refuses a task manager of another build (its wire version
/// differs: its messages may mean other things) before it joins the cluster or the cache,
/// telling it why, and accepts the same registration speaking its own version.
#[test]
fn taskmanager_of_another_wire_version_is_refused() {
    use engine::protocol::control::ToTaskManager;
    let c = Cluster::start(ClusterOptions {
        taskmanagers: 1,
        ..Default::default()
    });
    let (old, same) = (
        engine::ids::TaskManagerId::random().to_string(),
        engine::ids::TaskManagerId::random().to_string(),
    );
    let wire = engine::protocol::WIRE_VERSION;
    match register_speaking(&c.control, &old, wire - 1) {
        ToTaskManager::Refused { reason } => assert!(
            reason.contains(&format!("speaks wire version {}", wire - 1)),
            "{reason}"
        ),
        other => panic!("not refused: {other:?}"),
    }
    assert_eq!(c.get(&format!("/taskmanagers/{old}")).0, 404);
    assert_eq!(c.alive_taskmanagers().len(), 1);
    let reply = register_speaking(&c.control, &same, wire);
    assert!(
        matches!(reply, ToTaskManager::Registered { .. }),
        "{reply:?}"
    );
    c.wait_until(Duration::from_secs(5), "the same build registered", |c| {
        c.get(&format!("/taskmanagers/{same}")).0 == 200
    });
}

/// Ensures every REST endpoint answers as documented, including 400, 404 and 413 bodies, and
/// that the OpenAPI document lists them all.
#[test]
fn rest_api_endpoints() {
    let c = Cluster::start(ClusterOptions {
        taskmanagers: 2,
        ..Default::default()
    });
    let (s, overview) = c.get("/overview");
    assert_eq!(s, 200);
    assert_eq!(overview["taskmanagers"], 2);
    assert_eq!(overview["slots_total"], 4);

    // Bad specs: 400 naming operator and field; malformed JSON: line and column.
    let (s, body) = c.request(
        "POST",
        "/jobs",
        Some(r#"{"name":"x","operators":[{"id":"a","kind":"teleport"}]}"#),
        None,
    );
    assert_eq!(s, 400);
    assert_eq!(
        (body["operator"].as_str(), body["field"].as_str()),
        (Some("a"), Some("kind")),
        "{body}"
    );
    assert!(body["errors"][0]
        .as_str()
        .unwrap()
        .contains("unknown operator kind 'teleport'"));
    let (s, body) = c.request(
        "POST",
        "/jobs",
        Some("{\n\"name\": \"x\",\n\"operators\": [}"),
        None,
    );
    assert_eq!(s, 400);
    assert_eq!(
        (body["line"].as_u64(), body["column"].as_u64()),
        (Some(3), Some(15)),
        "{body}"
    );
    let big = format!(r#"{{"name":"{}","operators":[]}}"#, "x".repeat(2 << 20));
    let (s, body) = c.request("POST", "/jobs", Some(&big), None);
    assert_eq!(s, 413, "{body}");
    assert!(body["errors"][0].as_str().unwrap().contains("exceeds"));
    let (s, body) = c.request("POST", "/jobs", Some(&unbounded(100)), None);
    assert_eq!(s, 400);
    assert!(
        body["errors"][0].as_str().unwrap().contains("slots"),
        "{body}"
    );

    // A bounded job: listed, detailed, its output paged, its metrics.
    let spec = r#"{"name":"small","operators":[
        {"id":"g","kind":"generator","parallelism":2,"params":{"count":1000}},
        {"id":"out","kind":"collect","input":"g","parallelism":2}]}"#;
    let id = c.submit(spec);
    let (s, list) = c.get("/jobs");
    assert_eq!(s, 200);
    assert!(list["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .any(|j| j["jid"] == id.as_str()));
    let job = c.wait_for_end(&id, Duration::from_secs(20));
    assert_eq!(job["state"], "FINISHED");
    let sub = &job["vertices"][0]["subtasks"][0];
    assert!(
        sub["taskmanager"].as_str().unwrap().len() == 36 && sub["state"] == "FINISHED",
        "{sub}"
    );
    assert_eq!(job["vertices"][0]["parallelism"], 2);
    let (s, out) = c.get(&format!("/jobs/{id}/output?limit=5&offset=10"));
    assert_eq!(s, 200);
    assert_eq!(out["outputs"][0]["total"], 1000);
    assert_eq!(out["outputs"][0]["records"].as_array().unwrap().len(), 5);
    assert_eq!(out["outputs"][0]["offset"], 10);
    // A query string that does not parse: a 400 in the API's error format.
    for query in ["limit=-1", "limit=abc"] {
        let (s, body) = c.get(&format!("/jobs/{id}/output?{query}"));
        assert_eq!(s, 400, "{query}: {body}");
        let error = body["errors"][0].as_str().unwrap_or_default();
        assert!(error.starts_with("bad query string"), "{query}: {body}");
    }
    assert_eq!(c.output(&id, "out").len(), 1000);
    c.wait_until(Duration::from_secs(5), "final counters", |c| {
        let (_, m) = c.get(&format!("/jobs/{id}/metrics"));
        m["tasks"][0]["records_in"] == 1000
    });

    // Unknown ids: 404 with a JSON error body.
    let unknown = "00000000-0000-4000-8000-000000000000";
    for (method, path) in [
        ("GET", format!("/jobs/{unknown}")),
        ("GET", "/jobs/not-a-uuid".to_string()),
        ("DELETE", format!("/jobs/{unknown}")),
        ("GET", format!("/jobs/{unknown}/output")),
        ("GET", format!("/jobs/{unknown}/metrics")),
        ("GET", format!("/taskmanagers/{unknown}")),
        ("POST", format!("/taskmanagers/{unknown}/kill")),
        ("GET", "/no/such/endpoint".to_string()),
    ] {
        let (s, body) = c.request(method, &path, None, None);
        assert_eq!(s, 404, "{method} {path}: {body}");
        assert!(body["errors"][0].is_string(), "{method} {path}: {body}");
    }

    // Cancel: the job stops and its slots are free again.
    let id = c.submit(&unbounded(2));
    wait_running(&c, &id);
    let (s, body) = c.request("DELETE", &format!("/jobs/{id}"), None, None);
    assert_eq!(s, 202, "{body}");
    let job = c.wait_for_end(&id, Duration::from_secs(10));
    assert_eq!(job["state"], "CANCELED");
    assert!(job["vertices"]
        .as_array()
        .unwrap()
        .iter()
        .all(|v| v["subtasks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["state"] == "CANCELED")));
    let again = c.submit(&unbounded(4));
    wait_running(&c, &again);
    c.request("DELETE", &format!("/jobs/{again}"), None, None);

    // Task managers, Prometheus, OpenAPI.
    let (s, tms) = c.get("/taskmanagers");
    assert_eq!(s, 200);
    let tm = tms["taskmanagers"][0]["id"].as_str().unwrap().to_string();
    let (s, one) = c.get(&format!("/taskmanagers/{tm}"));
    assert_eq!((s, one["slots"].as_u64()), (200, Some(2)));
    let (s, text) = c.request_text("GET", "/metrics", None, None);
    assert_eq!(s, 200);
    assert!(
        text.contains("weir_taskmanagers{state=\"ALIVE\"} 2"),
        "{text}"
    );
    assert!(text.contains("weir_jobs{state=\"FINISHED\"} 1"), "{text}");
    let (s, doc) = c.get("/openapi.json");
    assert_eq!(s, 200);
    let paths: BTreeSet<&str> = doc["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    for p in [
        "/overview",
        "/jobs",
        "/jobs/{id}",
        "/jobs/{id}/output",
        "/jobs/{id}/metrics",
        "/taskmanagers",
        "/taskmanagers/{id}",
        "/taskmanagers/{id}/kill",
        "/metrics",
        "/openapi.json",
    ] {
        assert!(paths.contains(p), "OpenAPI lists {p}: {paths:?}");
    }
    assert!(
        doc["paths"]["/jobs"]["post"].is_object()
            && doc["paths"]["/jobs/{id}"]["delete"].is_object()
    );

    // Kill: a remote-style abort (this job manager did not start the process).
    let (s, body) = c.request("POST", &format!("/taskmanagers/{tm}/kill"), None, None);
    assert_eq!((s, body["method"].as_str()), (200, Some("ABORT")), "{body}");
    c.wait_until(Duration::from_secs(5), "killed task manager dead", |c| {
        c.get(&format!("/taskmanagers/{tm}")).1["state"] == "DEAD"
    });
    let (s, _) = c.request("POST", &format!("/taskmanagers/{tm}/kill"), None, None);
    assert_eq!(s, 409, "killing a dead task manager is a conflict");
}

/// Ensures that with an API token every mutating call needs it (401 otherwise) while reads
/// stay open.
#[test]
fn api_token_guards_mutations() {
    let c = Cluster::start(ClusterOptions {
        taskmanagers: 1,
        token: Some("s3cret".into()),
        ..Default::default()
    });
    let spec = r#"{"name":"t","operators":[{"id":"g","kind":"generator","params":{"count":10}},{"id":"o","kind":"discard","input":"g"}]}"#;
    let (s, body) = c.request_text("POST", "/jobs", Some(spec), Some("wrong"));
    assert_eq!(s, 401, "{body}");
    let url = format!("{}/jobs", c.url);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let resp = agent
        .post(&url)
        .header("content-type", "application/json")
        .send(spec.as_bytes())
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401, "no token");
    let resp = agent
        .delete(&format!("{url}/00000000-0000-4000-8000-000000000000"))
        .call()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    assert_eq!(c.get("/jobs").0, 200, "reads need no token");
    let id = c.submit(spec);
    assert_eq!(
        c.wait_for_end(&id, Duration::from_secs(20))["state"],
        "FINISHED"
    );
}

/// Ensures job specs and states survive a job manager restart (sled), and that a job that was
/// running when it died is listed as failed.
#[test]
fn jobs_survive_jobmanager_restart() {
    let dir = tempfile::tempdir().unwrap();
    let opts = ClusterOptions {
        taskmanagers: 1,
        data_dir: Some(dir.path().join("jm")),
        ..Default::default()
    };
    let (done, running) = {
        let c = Cluster::start(opts.clone());
        let done = c.submit(r#"{"name":"done","operators":[{"id":"g","kind":"generator","params":{"count":10}},{"id":"o","kind":"discard","input":"g"}]}"#);
        assert_eq!(
            c.wait_for_end(&done, Duration::from_secs(20))["state"],
            "FINISHED"
        );
        let running = c.submit(&unbounded(1));
        wait_running(&c, &running);
        (done, running)
    };
    let started = Instant::now();
    let c = Cluster::start(opts);
    let (_, list) = c.get("/jobs");
    let state = |id: &str| {
        list["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["jid"] == id)
            .map(|j| j["state"].clone())
            .unwrap_or(Value::Null)
    };
    assert_eq!(state(&done), "FINISHED", "{list}");
    assert_eq!(state(&running), "FAILED", "{list}");
    assert!(started.elapsed() < Duration::from_secs(30));
}

/// Ensures a job whose sources are blocked on credits from another task manager (a slow
/// downstream) still cancels promptly, on every task manager.
#[test]
fn cancel_under_backpressure_across_taskmanagers() {
    let c = Cluster::start(ClusterOptions {
        taskmanagers: 2,
        slots: 2,
        ..Default::default()
    });
    let spec = r#"{"name":"slow","runtime":{"batch_size":64,"credits":2},"operators":[
        {"id":"src","kind":"generator","parallelism":2,"params":{"keys":1000}},
        {"id":"slow","kind":"map","input":"src","parallelism":2,"partition":"rebalance",
         "params":{"expr":"len(range(20000 + value))"}},
        {"id":"sink","kind":"discard","input":"slow","parallelism":2}]}"#;
    let id = c.submit(spec);
    wait_running(&c, &id);
    c.wait_until(
        Duration::from_secs(10),
        "sources waiting for credits",
        |c| {
            let (_, m) = c.get(&format!("/jobs/{id}/metrics"));
            m["tasks"][0]["backpressure"].as_f64().unwrap_or(0.0) > 0.3
        },
    );
    let started = Instant::now();
    let (s, _) = c.request("DELETE", &format!("/jobs/{id}"), None, None);
    assert_eq!(s, 202);
    let job = c.wait_for_end(&id, Duration::from_secs(10));
    assert_eq!(job["state"], "CANCELED", "{job}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "canceled in {:?}",
        started.elapsed()
    );
    // The slots are free again: the same job fits.
    let again = c.submit(spec);
    wait_running(&c, &again);
}

/// Ensures expressions that would exhaust memory, or build values the data plane cannot
/// carry, fail their job naming the operator, on real processes: the job manager folds a
/// spec's constants within a budget (a spec asking for ~24 GB of ranges is accepted at
/// once), and a value nested too deep fails in the operator that built it instead of being
/// refused by the next task manager, which would close the connection all channels between
/// the two share.
#[test]
fn oversized_and_overdeep_values_fail_their_job_by_name() {
    let c = Cluster::start(ClusterOptions {
        taskmanagers: 2,
        slots: 2,
        ..Default::default()
    });
    let spec = |expr: &str| {
        format!(
            r#"{{"name":"x","operators":[
            {{"id":"g","kind":"generator","parallelism":2,"params":{{"keys":10}}}},
            {{"id":"m","kind":"map","input":"g","parallelism":2,"partition":"rebalance","params":{{"expr":"{expr}"}}}},
            {{"id":"o","kind":"discard","input":"m","parallelism":2,"partition":"rebalance"}}]}}"#
        )
    };
    let fails_with = |expr: &str, why: &str| {
        let started = Instant::now();
        let id = c.submit(&spec(expr));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "submission took {:?}",
            started.elapsed()
        );
        let job = c.wait_for_end(&id, Duration::from_secs(30));
        assert_eq!(job["state"], "FAILED", "{job}");
        let reason = job["failure"].as_str().unwrap();
        assert!(
            reason.contains("operator 'm'") && reason.contains(why),
            "{reason}"
        );
        // Only the map failed: the subtasks whose input or output it closed stopped as
        // canceled (reporting failures of their own, they could stand in for its cause).
        let states = |job: &Value| -> Vec<(String, String)> {
            subtasks(job)
                .into_iter()
                .map(|(name, s)| {
                    (
                        name.to_string(),
                        s["state"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        };
        let ended = ["FINISHED", "CANCELED", "FAILED"];
        c.wait_until(Duration::from_secs(10), "every subtask ended", |c| {
            states(&c.job(&id))
                .iter()
                .all(|(_, s)| ended.contains(&s.as_str()))
        });
        for (name, state) in states(&c.job(&id)) {
            let failed_or_not = name == "m" || state == "CANCELED";
            assert!(failed_or_not, "{name}: {state}");
        }
    };
    let ranges = vec!["range(1000000)"; 1000].join(", ");
    fails_with(&format!("[{ranges}]"), "more than 256 MiB");
    let deep = format!("{}value{}", "[".repeat(129), "]".repeat(129));
    fails_with(&deep, "deeper than 128 levels");
    // Both task managers are still there to run the next job.
    let (_, tms) = c.get("/taskmanagers");
    let alive = tms["taskmanagers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["state"] == "ALIVE")
        .count();
    assert_eq!(alive, 2, "{tms}");
}
