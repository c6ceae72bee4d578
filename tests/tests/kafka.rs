//! Kafka connectors against a real Kafka-protocol broker (tansu, started by `scripts/test`
//! on 127.0.0.1 and named by `WEIR_KAFKA_BOOTSTRAP`). Without it each test prints that it
//! was skipped and why.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::graph::JobGraph;
use engine::operator::{CollectTarget, Instance, Metric, Source, SourcePoll, SubtaskContext};
use engine::spec::{JobSpec, OperatorSpec};
use engine::{Record, Value};
use serde_json::json;
use weir_tests::cluster::{binary, Cluster, ClusterOptions};
use weir_tests::kafka::{self, Rec};
use weir_tests::run_graph;

/// Records per partition of the small test topics.
const PER_PARTITION: i64 = 100;
/// Kafka timestamp of record `i` of a partition: `TS0 + 10 * i`.
const TS0: i64 = 1_700_000_000_000;

/// A 2-partition topic where record `i` of partition `p` is `{"p": p, "i": i}` with key
/// `k<i>` and Kafka timestamp `TS0 + 10 i`.
fn small_topic(bootstrap: &str, prefix: &str) -> String {
    let topic = kafka::unique_topic(prefix);
    kafka::create_topic(bootstrap, &topic, 2);
    produce_range(bootstrap, &topic, 0..PER_PARTITION);
    topic
}

fn produce_range(bootstrap: &str, topic: &str, range: std::ops::Range<i64>) {
    let payloads: Vec<(i32, i64, String, String)> = (0..2)
        .flat_map(|p| {
            range
                .clone()
                .map(move |i| (p, i, format!("k{i}"), json!({"p": p, "i": i}).to_string()))
        })
        .collect();
    let recs: Vec<Rec<'_>> = payloads
        .iter()
        .map(|(p, i, k, v)| Rec {
            partition: *p,
            key: Some(k.as_bytes()),
            payload: v.as_bytes(),
            ts: Some(TS0 + 10 * i),
        })
        .collect();
    kafka::produce(bootstrap, topic, &recs);
}

fn source_job(bootstrap: &str, topic: &str, extra: serde_json::Value) -> String {
    let mut params = json!({"bootstrap_servers": bootstrap, "topic": topic, "end": "latest"});
    for (k, v) in extra.as_object().expect("object") {
        match v {
            serde_json::Value::Null => {
                params.as_object_mut().expect("object").remove(k);
            }
            v => params[k] = v.clone(),
        }
    }
    json!({
        "name": "kafka-read",
        "operators": [
            {"id": "in", "kind": "kafka_source", "parallelism": 2, "params": params},
            {"id": "out", "kind": "collect", "input": "in", "parallelism": 1}
        ]
    })
    .to_string()
}

/// Runs a resolved graph in process; returns the (partition, index) pairs it read, sorted.
fn read_pairs(graph: &JobGraph) -> Vec<(i64, i64)> {
    let outcome = run_graph(graph, 2, Duration::from_secs(60));
    outcome.result.expect("job succeeds");
    let mut pairs: Vec<(i64, i64)> = outcome.collected["out"]
        .iter()
        .map(|r| {
            (
                r.value.get("p").and_then(Value::as_int).expect("p"),
                r.value.get("i").and_then(Value::as_int).expect("i"),
            )
        })
        .collect();
    pairs.sort();
    pairs
}

fn pairs(p0: std::ops::Range<i64>, p1: std::ops::Range<i64>) -> Vec<(i64, i64)> {
    p0.map(|i| (0, i)).chain(p1.map(|i| (1, i))).collect()
}

/// Ensures every start position reads exactly the records it names.
#[test]
fn start_positions_read_from_the_named_offsets() {
    let Some(b) = kafka::bootstrap("start_positions_read_from_the_named_offsets") else {
        return;
    };
    let topic = small_topic(&b, "starts");
    let run = |extra| read_pairs(&weir_tests::graph(&source_job(&b, &topic, extra)));

    assert_eq!(run(json!({})), pairs(0..100, 0..100), "earliest (default)");
    assert_eq!(
        run(json!({"start": "earliest"})),
        pairs(0..100, 0..100),
        "earliest"
    );
    assert_eq!(
        run(json!({"start": {"offsets": {(topic.clone()): {"0": 10, "1": 95}}}})),
        pairs(10..100, 95..100),
        "explicit offsets"
    );
    assert_eq!(
        run(json!({"start": {"offsets": {(topic.clone()): {"1": 50}}}})),
        pairs(0..100, 50..100),
        "explicit offsets; an unnamed partition starts at the earliest"
    );
    assert_eq!(
        run(json!({"start": {"timestamp": TS0 + 10 * 40}})),
        pairs(40..100, 40..100),
        "timestamp"
    );
    assert_eq!(
        run(json!({"start": {"timestamp": TS0 + 10 * 40 - 5}})),
        pairs(40..100, 40..100),
        "timestamp between records: the first record at or after it"
    );

    let group = kafka::unique_topic("group");
    kafka::commit(&b, &group, &topic, &[(0, 30)]);
    assert_eq!(
        run(json!({"start": "committed", "group_id": group})),
        pairs(30..100, 0..100),
        "committed; a partition without a committed offset starts at the earliest"
    );

    // latest: resolved at submission, so records produced afterwards are read, and only those.
    let mut spec = JobSpec::from_json(&source_job(
        &b,
        &topic,
        json!({"start": "latest", "end": {"offsets": {(topic.clone()): {"0": 130, "1": 130}}}}),
    ))
    .expect("spec");
    let registry = jobs::registry();
    registry.resolve(&mut spec).expect("resolve");
    produce_range(&b, &topic, 100..130);
    let graph = JobGraph::build(&spec, &registry).expect("graph");
    assert_eq!(read_pairs(&graph), pairs(100..130, 100..130), "latest");

    // An explicit offset beyond the partition is refused at submission, naming the field.
    let mut spec = JobSpec::from_json(&source_job(
        &b,
        &topic,
        json!({"start": {"offsets": {(topic.clone()): {"0": 10_000}}}}),
    ))
    .expect("spec");
    let e = registry
        .resolve(&mut spec)
        .expect_err("offset out of range");
    assert_eq!(e.field.as_deref(), Some("params.start"), "{e}");
    assert!(e.message.contains("10000"), "{e}");
}

struct Nowhere;
impl CollectTarget for Nowhere {
    fn deliver(&self, _: &str, _: usize, _: Option<u64>, _: Vec<Record>) {}
}

/// Subtask `s` of 2 of the (resolved) `kafka_source` "in" of `job`.
fn source_instance(job: &str, s: usize) -> Box<dyn Source> {
    let mut spec = JobSpec::from_json(job).expect("spec");
    let registry = jobs::registry();
    registry.resolve(&mut spec).expect("resolve");
    let op: &OperatorSpec = spec.operator("in").expect("in");
    let factory = (registry.get("kafka_source").expect("kind").build)(op).expect("build");
    let ctx = SubtaskContext {
        operator: "in".into(),
        subtask: s,
        parallelism: 2,
        collect: Arc::new(Nowhere),
        transactional: false,
        attempt: 1,
        job: "test-job".into(),
    };
    match factory.instantiate(&ctx).expect("instantiate") {
        Instance::Source(src) => src,
        Instance::Operator(_) => panic!("not a source"),
    }
}

/// Polls until `n` records were read (or the source finished).
fn poll_n(src: &mut dyn Source, n: usize) -> Vec<Record> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while out.len() < n {
        assert!(Instant::now() < deadline, "read {} of {n}", out.len());
        let max = n - out.len();
        match src.poll(max.min(7), &mut out).expect("poll") {
            SourcePoll::Finished => break,
            SourcePoll::Wait(d) => std::thread::sleep(d),
            SourcePoll::Ready => {}
        }
    }
    out
}

fn metric(src: &dyn Source, name: &str, part: &str) -> Option<i64> {
    src.metrics()
        .into_iter()
        .find(|m: &Metric| m.name == name && m.part == part)
        .map(|m| m.value)
}

/// Ensures a subtask reports its position and lag per partition, and that a snapshot taken
/// mid-read restores into a new instance that continues exactly where it stopped.
#[test]
fn offsets_and_lag_are_reported_and_restored() {
    let Some(b) = kafka::bootstrap("offsets_and_lag_are_reported_and_restored") else {
        return;
    };
    let topic = small_topic(&b, "offsets");
    // Unbounded: the subtask keeps running; partition 0 goes to subtask 0, 1 to subtask 1.
    let job = source_job(&b, &topic, json!({"end": null}));
    let mut src = source_instance(&job, 0);
    let first = poll_n(src.as_mut(), 40);
    assert_eq!(first.len(), 40);
    let part = format!("{topic}/0");
    assert_eq!(metric(src.as_ref(), "offset", &part), Some(40));
    assert_eq!(metric(src.as_ref(), "offset", &format!("{topic}/1")), None);
    // Lag comes from the client's statistics (once a second, served while polling): read
    // slowly until offset + lag covers the partition while records are still left.
    let mut first = first;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let offset = metric(src.as_ref(), "offset", &part).expect("offset");
        let lag = metric(src.as_ref(), "lag", &part);
        if lag.is_some_and(|l| l > 0 && offset + l == PER_PARTITION) {
            break;
        }
        assert!(
            Instant::now() < deadline && offset < PER_PARTITION - 1,
            "lag never reported: {:?}",
            src.metrics()
        );
        std::thread::sleep(Duration::from_millis(50));
        first.extend(poll_n(src.as_mut(), 1));
    }
    let state = src.snapshot().expect("snapshot");
    let mut restored = source_instance(&job, 0);
    restored.restore(&state).expect("restore");
    let rest = poll_n(restored.as_mut(), PER_PARTITION as usize - first.len());
    let seen: Vec<i64> = first
        .iter()
        .chain(&rest)
        .map(|r| r.value.get("i").and_then(Value::as_int).expect("i"))
        .collect();
    assert_eq!(
        seen,
        (0..100).collect::<Vec<_>>(),
        "no record lost or repeated"
    );
    assert_eq!(metric(restored.as_ref(), "offset", &part), Some(100));
    // Kafka timestamps are the event times; the watermark follows the highest one read.
    assert_eq!(rest.last().map(|r| r.ts), Some(TS0 + 990));
    assert_eq!(restored.watermark(), Some(TS0 + 990 - 1));
}

/// Ensures an undecodable record fails the job naming the partition and offset by default,
/// and is skipped and counted with `on_decode_error: skip`.
#[test]
fn undecodable_records_fail_the_job_or_are_skipped() {
    let Some(b) = kafka::bootstrap("undecodable_records_fail_the_job_or_are_skipped") else {
        return;
    };
    let topic = kafka::unique_topic("garbage");
    kafka::create_topic(&b, &topic, 1);
    let payloads: Vec<String> = (0..20)
        .map(|i| {
            if i == 7 {
                "{not json".to_string()
            } else {
                json!({"p": 0, "i": i}).to_string()
            }
        })
        .collect();
    let recs: Vec<Rec<'_>> = payloads
        .iter()
        .map(|p| Rec {
            partition: 0,
            key: None,
            payload: p.as_bytes(),
            ts: None,
        })
        .collect();
    kafka::produce(&b, &topic, &recs);

    let graph = weir_tests::graph(&source_job(&b, &topic, json!({})));
    let outcome = run_graph(&graph, 2, Duration::from_secs(60));
    let err = outcome
        .result
        .expect_err("the default policy fails the job");
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("{topic} partition 0 offset 7")),
        "{msg}"
    );
    assert!(msg.contains("invalid JSON"), "{msg}");
    assert!(msg.contains("on_decode_error"), "{msg}");

    let job = source_job(&b, &topic, json!({"on_decode_error": "skip"}));
    let got = read_pairs(&weir_tests::graph(&job));
    let expected: Vec<(i64, i64)> = (0..20).filter(|i| *i != 7).map(|i| (0, i)).collect();
    assert_eq!(got, expected);
    let mut src = source_instance(&job, 0);
    assert_eq!(poll_n(src.as_mut(), 100).len(), 19);
    assert_eq!(metric(src.as_ref(), "skipped_records", ""), Some(1));
}

/// Ensures submissions naming an unreachable broker or a missing topic are rejected with a
/// 400 naming the operator, the field and the address or topic.
#[test]
fn unreachable_broker_and_missing_topic_are_rejected_at_submission() {
    let cluster = Cluster::start(ClusterOptions {
        taskmanagers: 1,
        ..Default::default()
    });
    let spec = |bootstrap: &str, topic: &str| {
        json!({"name": "bad", "operators": [
            {"id": "in", "kind": "kafka_source",
             "params": {"bootstrap_servers": bootstrap, "topic": topic, "timeout_ms": 1000}},
            {"id": "out", "kind": "collect", "input": "in"}]})
        .to_string()
    };
    let (status, body) = cluster.request("POST", "/jobs", Some(&spec("127.0.0.1:1", "t")), None);
    assert_eq!(status, 400, "{body}");
    let text = body.to_string();
    assert!(text.contains("params.bootstrap_servers"), "{text}");
    assert!(text.contains("127.0.0.1:1"), "{text}");
    assert!(text.contains("'in'") || text.contains("\"in\""), "{text}");

    let Some(b) = kafka::bootstrap("missing topic half of unreachable_broker_and_missing_topic")
    else {
        return;
    };
    let (status, body) = cluster.request("POST", "/jobs", Some(&spec(&b, "no-such-topic")), None);
    assert_eq!(status, 400, "{body}");
    let text = body.to_string();
    assert!(text.contains("params.topic"), "{text}");
    assert!(text.contains("no-such-topic"), "{text}");
}

fn weir(args: &[&str]) {
    let out = std::process::Command::new(binary("weir"))
        .args(args)
        .output()
        .expect("weir");
    assert!(
        out.status.success(),
        "weir {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Ensures the README's Kafka example works as documented: `weir create-topic`, `weir
/// produce`, then `jobs/examples/kafka-clicks.json` (here bounded at the produced end, and
/// pointed at the test broker and fresh topics) writes the per-user 10 s counts.
#[test]
fn kafka_clicks_example_counts_clicks_per_user_and_window() {
    let Some(b) = kafka::bootstrap("kafka_clicks_example_counts_clicks_per_user_and_window") else {
        return;
    };
    let (input, output) = (
        kafka::unique_topic("clicks"),
        kafka::unique_topic("per-user"),
    );
    weir(&[
        "create-topic",
        "--bootstrap",
        &b,
        "--topic",
        &input,
        "--partitions",
        "4",
    ]);
    weir(&[
        "create-topic",
        "--bootstrap",
        &b,
        "--topic",
        &output,
        "--partitions",
        "2",
    ]);
    weir(&[
        "produce",
        "--bootstrap",
        &b,
        "--topic",
        &input,
        "--rate",
        "0",
        "--count",
        "20000",
    ]);

    let (_, text) = jobs::EXAMPLES
        .iter()
        .find(|(name, _)| *name == "kafka-clicks.json")
        .expect("example");
    let mut spec: serde_json::Value = serde_json::from_str(text).expect("json");
    for op in spec["operators"].as_array_mut().expect("operators") {
        let params = &mut op["params"];
        if params.get("bootstrap_servers").is_some() {
            params["bootstrap_servers"] = json!(&*b);
        }
        match op["kind"].as_str() {
            Some("kafka_source") => {
                op["params"]["topic"] = json!(input);
                op["params"]["end"] = json!("latest");
            }
            Some("kafka_sink") => op["params"]["topic"] = json!(output),
            _ => {}
        }
    }
    let outcome = run_graph(
        &weir_tests::graph(&spec.to_string()),
        2,
        Duration::from_secs(120),
    );
    outcome.result.expect("the example job finishes");

    // `weir produce` defaults: 100 users, event time advancing 1 ms per event at rate 0.
    let clicks = jobs::clicks::Clicks::default();
    let mut expected: BTreeMap<(String, i64), (i64, i64)> = BTreeMap::new();
    for i in 0..20_000 {
        let ts = clicks.ts(i);
        let e = expected
            .entry((clicks.user(i), ts - ts.rem_euclid(10_000)))
            .or_default();
        e.0 += 1;
        e.1 += clicks
            .event(i)
            .get("amount")
            .and_then(Value::as_int)
            .expect("amount");
    }
    let mut got = BTreeMap::new();
    for r in kafka::read_all(&b, &output, Duration::from_secs(60)) {
        let v: serde_json::Value = serde_json::from_slice(&r.payload).expect("json");
        got.insert(
            (
                v["key"].as_str().expect("key").to_string(),
                v["window_start"].as_i64().expect("window_start"),
            ),
            (
                v["clicks"].as_i64().expect("clicks"),
                v["spent"].as_i64().expect("spent"),
            ),
        );
    }
    assert_eq!(got, expected);
}

/// Ensures `weir produce` writes the documented deterministic events, keyed by user.
#[test]
fn weir_produce_writes_deterministic_click_events() {
    let Some(b) = kafka::bootstrap("weir_produce_writes_deterministic_click_events") else {
        return;
    };
    let topic = kafka::unique_topic("produced");
    kafka::create_topic(&b, &topic, 1);
    let out = std::process::Command::new(binary("weir"))
        .args(["produce", "--bootstrap", &b, "--topic", &topic])
        .args(["--rate", "0", "--count", "500", "--users", "7"])
        .output()
        .expect("weir produce");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read = kafka::read_all(&b, &topic, Duration::from_secs(30));
    assert_eq!(read.len(), 500);
    let clicks = jobs::clicks::Clicks {
        users: 7,
        spacing_us: 1000,
        ..Default::default()
    };
    for (i, r) in read.iter().enumerate() {
        let v: Value = serde_json::from_slice(&r.payload).expect("json");
        assert_eq!(v, clicks.event(i as u64));
        assert_eq!(r.key.as_deref(), Some(clicks.user(i as u64).as_bytes()));
    }
}

/// The end-to-end check of the issue: 1,000,000 keyed JSON records in a 4-partition topic,
/// a Kafka source of parallelism 2 on 2 task manager processes, a keyed count per 10 s
/// window, a Kafka sink; the output topic holds exactly the expected counts.
#[test]
fn kafka_to_keyed_count_to_kafka_on_two_taskmanagers_is_exact() {
    let Some(b) = kafka::bootstrap("kafka_to_keyed_count_to_kafka_on_two_taskmanagers_is_exact")
    else {
        return;
    };
    const N: u64 = 1_000_000;
    let input = kafka::unique_topic("clicks");
    let output = kafka::unique_topic("counts");
    kafka::create_topic(&b, &input, 4);
    kafka::create_topic(&b, &output, 2);
    let clicks = jobs::clicks::Clicks {
        users: 1000,
        spacing_us: 100, // 10,000 events per second of event time: 100 s, 10 windows
        ..Default::default()
    };
    let started = Instant::now();
    jobs::clicks::produce(&jobs::clicks::ProduceOptions {
        bootstrap: b.to_string(),
        topic: input.clone(),
        rate: 0,
        first: 0,
        count: N,
        clicks: clicks.clone(),
    })
    .expect("produce");
    eprintln!("produced {N} records in {:.1?}", started.elapsed());

    let mut expected: BTreeMap<(String, i64), i64> = BTreeMap::new();
    for i in 0..N {
        let ts = clicks.ts(i);
        *expected
            .entry((clicks.user(i), ts - ts.rem_euclid(10_000)))
            .or_default() += 1;
    }

    let cluster = Cluster::start(ClusterOptions {
        taskmanagers: 2,
        slots: 1,
        ..Default::default()
    });
    let spec = json!({
        "name": "kafka-count",
        "operators": [
            {"id": "clicks", "kind": "kafka_source", "parallelism": 2,
             "params": {"bootstrap_servers": &*b, "topic": input, "end": "latest", "ts_field": "ts"}},
            {"id": "by_user", "kind": "key_by", "input": "clicks", "parallelism": 2,
             "params": {"expr": "value.user"}},
            {"id": "per_10s", "kind": "window_aggregate", "input": "by_user", "parallelism": 2,
             "params": {"window": {"tumbling_ms": 10000}, "aggs": [{"name": "clicks", "agg": "count"}]}},
            {"id": "out", "kind": "kafka_sink", "input": "per_10s", "parallelism": 2,
             "params": {"bootstrap_servers": &*b, "topic": output}}
        ]
    })
    .to_string();
    let id = cluster.submit(&spec);
    // The sources run on two different task manager processes.
    cluster.wait_until(Duration::from_secs(20), "sources placed", |c| {
        let job = c.job(&id);
        let tms: std::collections::BTreeSet<String> = job["vertices"][0]["subtasks"]
            .as_array()
            .map(|s| {
                s.iter()
                    .filter_map(|s| s["taskmanager"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        tms.len() == 2
    });
    let job = cluster.wait_for_end(&id, Duration::from_secs(300));
    assert_eq!(job["state"], "FINISHED", "{job}");
    eprintln!("job done after {:.1?}", started.elapsed());

    let read = kafka::read_all(&b, &output, Duration::from_secs(120));
    let mut got: BTreeMap<(String, i64), i64> = BTreeMap::new();
    for r in &read {
        let v: serde_json::Value = serde_json::from_slice(&r.payload).expect("json");
        let key = (
            v["key"].as_str().expect("key").to_string(),
            v["window_start"].as_i64().expect("window_start"),
        );
        assert_eq!(
            r.key.as_deref(),
            Some(key.0.as_bytes()),
            "the Kafka key is the record key"
        );
        let prev = got.insert(key.clone(), v["clicks"].as_i64().expect("clicks"));
        assert!(prev.is_none(), "duplicate output for {key:?}");
    }
    assert_eq!(got.len(), expected.len(), "number of (user, window) counts");
    assert_eq!(got, expected);
}

/// Ensures a running job's source offsets and lag reach the REST API and Prometheus.
#[test]
fn running_source_reports_offsets_and_lag_over_rest_and_prometheus() {
    let Some(b) =
        kafka::bootstrap("running_source_reports_offsets_and_lag_over_rest_and_prometheus")
    else {
        return;
    };
    let topic = small_topic(&b, "live");
    let cluster = Cluster::start(ClusterOptions {
        taskmanagers: 1,
        ..Default::default()
    });
    let spec = json!({"name": "live", "operators": [
        {"id": "in", "kind": "kafka_source", "parallelism": 2,
         "params": {"bootstrap_servers": &*b, "topic": topic}},
        {"id": "out", "kind": "discard", "input": "in", "parallelism": 2}]})
    .to_string();
    let id = cluster.submit(&spec);
    cluster.wait_until(Duration::from_secs(20), "offsets reported", |c| {
        let job = c.job(&id);
        let mut offsets = BTreeMap::new();
        for s in job["vertices"][0]["subtasks"]
            .as_array()
            .into_iter()
            .flatten()
        {
            for m in s["metrics"].as_array().into_iter().flatten() {
                if m["name"] == "offset" {
                    offsets.insert(
                        m["part"].as_str().unwrap_or("").to_string(),
                        m["value"].as_i64(),
                    );
                }
            }
        }
        offsets.len() == 2 && offsets.values().all(|o| *o == Some(PER_PARTITION))
    });
    cluster.wait_until(Duration::from_secs(20), "lag in Prometheus", |c| {
        let (_, text) = c.request_text("GET", "/metrics", None, None);
        text.lines().any(|l| {
            l.starts_with("weir_operator_metric{")
                && l.contains(r#"name="lag""#)
                && l.contains(&format!(r#"part="{topic}/1""#))
                && l.ends_with(" 0")
        })
    });
    let (status, _) = cluster.request("DELETE", &format!("/jobs/{id}"), None, None);
    assert!(status == 200 || status == 202, "cancel: {status}");
}
