//! End-to-end behaviour of the in-process runtime: exchanges, watermarks across inputs,
//! backpressure, failures and cancellation.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::operator::{
    Instance, KindInfo, OpError, Operator, OperatorFactory, Params, Shape, SubtaskContext,
};
use engine::spec::{OperatorSpec, SpecError};
use engine::{Record, Value};
use weir_tests::{graph, graph_with, run_graph};

fn job(ops: &str) -> String {
    format!(r#"{{"name":"t","runtime":{{"batch_size":100,"credits":2}},"operators":[{ops}]}}"#)
}

/// Ensures every record reaches every subtask under broadcast, and exactly one under
/// rebalance.
#[test]
fn broadcast_and_rebalance() {
    let spec = job(r#"{"id":"g","kind":"generator","params":{"count":1000}},
           {"id":"b","kind":"map","input":"g","parallelism":3,"partition":"broadcast","params":{"expr":"value"}},
           {"id":"bo","kind":"collect","input":"b","parallelism":3},
           {"id":"r","kind":"collect","input":"g","parallelism":3,"partition":"rebalance"}"#);
    let outcome = run_graph(&graph(&spec), 2, Duration::from_secs(30));
    outcome.result.as_ref().unwrap();
    assert_eq!(outcome.collected["bo"].len(), 3000);
    assert_eq!(outcome.collected["r"].len(), 1000);
    let mut ts: Vec<i64> = outcome.collected["r"].iter().map(|r| r.ts).collect();
    ts.sort();
    assert_eq!(ts, (0..1000).collect::<Vec<_>>());
}

/// Ensures the two-input join sees the minimum watermark of both inputs: the sparse right
/// side must not make the dense left side late (or the reverse), so the output equals the
/// pairs computed directly from the generators.
#[test]
fn join_matches_independent_pairs() {
    let json = jobs::EXAMPLES
        .iter()
        .find(|(n, _)| *n == "join.json")
        .unwrap()
        .1;
    let outcome = run_graph(&graph(json), 2, Duration::from_secs(60));
    outcome.result.as_ref().unwrap();
    let mut got: Vec<(String, i64, i64)> = outcome.collected["out"]
        .iter()
        .map(|r| {
            let v = &r.value;
            (
                v.get("user").unwrap().as_str().unwrap().to_string(),
                v.get("view").unwrap().as_int().unwrap(),
                v.get("purchase").unwrap().as_int().unwrap(),
            )
        })
        .collect();
    got.sort();

    let views = weir_tests::generator(json, "views");
    let purchases = weir_tests::generator(json, "purchases");
    let bucket = |gen: &engine::operator::source::GeneratorConfig| {
        let mut m: BTreeMap<(String, i64), Vec<i64>> = BTreeMap::new();
        for g in 0..gen.count.unwrap() {
            let r = gen.record(g);
            let user = r.value.get("user").unwrap().as_str().unwrap().to_string();
            m.entry((user, r.ts - r.ts.rem_euclid(1000)))
                .or_default()
                .push(r.value.get("id").unwrap().as_int().unwrap());
        }
        m
    };
    let (l, r) = (bucket(&views), bucket(&purchases));
    let mut expected = Vec::new();
    for ((user, w), vs) in &l {
        if let Some(ps) = r.get(&(user.clone(), *w)) {
            for v in vs {
                for p in ps {
                    expected.push((user.clone(), *v, *p));
                }
            }
        }
    }
    expected.sort();
    assert!(expected.len() > 1000, "{}", expected.len());
    assert_eq!(got, expected);
}

/// A sink that takes `delay_ms` per batch, blocking its thread: a slow consumer.
struct Slow(u64);

impl OperatorFactory for Slow {
    fn instantiate(&self, _ctx: &SubtaskContext) -> Result<Instance, OpError> {
        Ok(Instance::Operator(Box::new(Slow(self.0))))
    }
}

impl Operator for Slow {
    fn process(
        &mut self,
        _input: usize,
        batch: &mut Vec<Record>,
        _out: &mut Vec<Record>,
    ) -> Result<(), OpError> {
        std::thread::sleep(Duration::from_millis(self.0));
        batch.clear();
        Ok(())
    }
}

fn build_slow(spec: &OperatorSpec) -> Result<Arc<dyn OperatorFactory>, SpecError> {
    let p = Params::new(spec, &["delay_ms"])?;
    Ok(Arc::new(Slow(p.u64("delay_ms")?.unwrap_or(1))))
}

/// Ensures that a slow sink bounds memory: an unbounded source can run ahead of the sink by
/// at most the credits and output buffers of the channels between them, however long it runs.
#[test]
fn slow_sink_bounds_the_queue() {
    let mut registry = jobs::registry();
    registry.register("slow", KindInfo::new(Shape::Sink, false, build_slow));
    let spec = job(r#"{"id":"g","kind":"generator","params":{}},
           {"id":"m","kind":"map","input":"g","params":{"expr":"value + 1"}},
           {"id":"s","kind":"slow","input":"m","partition":"rebalance","params":{"delay_ms":2}}"#);
    let graph = graph_with(&spec, &registry);
    assert_eq!(
        graph.tasks.len(),
        2,
        "source chain and the slow sink are separate tasks"
    );
    let outcome = run_graph(&graph, 2, Duration::from_millis(800));
    assert!(
        matches!(outcome.result, Err(engine::EngineError::Canceled)),
        "{:?}",
        outcome.result
    );
    let src = &outcome.metrics[0];
    let sink = &outcome.metrics[1];
    assert!(
        sink.records_sunk > 1000,
        "the sink made progress: {}",
        sink.records_sunk
    );
    let ahead = src.records_out - sink.records_sunk;
    // 2 credits of 100 records in the channel + the batch the sink is working on.
    assert!(ahead <= 300, "source ran {ahead} records ahead of the sink");
    assert!(
        src.records_in - src.records_out <= 100,
        "at most one partial batch buffered at the source"
    );
    assert!(
        src.backpressure_ms > 100,
        "source waited for credits: {} ms",
        src.backpressure_ms
    );
}

/// Ensures latency markers reach a sink through a stage that drops every record, and that
/// they wait behind the records queued ahead of them: a sink taking 20 ms per batch, with
/// the batches the credits let through queued before each marker, sees markers at least a
/// batch's time old.
#[test]
fn latency_markers_pass_idle_stages_and_wait_behind_records() {
    let mut registry = jobs::registry();
    registry.register("slow", KindInfo::new(Shape::Sink, false, build_slow));
    let spec = job(r#"{"id":"g","kind":"generator","params":{"rate":20000}},
           {"id":"none","kind":"filter","input":"g","partition":"rebalance","params":{"expr":"value < 0"}},
           {"id":"idle","kind":"discard","input":"none","partition":"rebalance"},
           {"id":"m","kind":"map","input":"g","partition":"rebalance","params":{"expr":"value"}},
           {"id":"s","kind":"slow","input":"m","partition":"rebalance","params":{"delay_ms":20}}"#);
    let graph = graph_with(&spec, &registry);
    let outcome = run_graph(&graph, 2, Duration::from_millis(1500));
    let latency = |task: &str| {
        let m = outcome.metrics.iter().find(|m| m.name.starts_with(task));
        m.unwrap_or_else(|| panic!("task {task} in {:?}", outcome.metrics))
            .latency_ms
    };
    let idle = latency("idle").expect("markers reach a sink that gets no record");
    assert!((0..500).contains(&idle), "idle sink latency {idle} ms");
    let slow = latency("s").expect("markers reach the slow sink");
    assert!(
        slow >= 20,
        "the slow sink's markers waited behind a batch: {slow} ms"
    );
}

/// Ensures a runtime error in one subtask fails the job with a message naming the operator
/// and cancels the other subtasks.
#[test]
fn operator_error_fails_the_job() {
    let spec = job(
        r#"{"id":"g","kind":"generator","parallelism":2,"params":{"keys":10}},
           {"id":"m","kind":"map","input":"g","parallelism":2,"params":{"expr":"100 / (value - 5)"}},
           {"id":"o","kind":"discard","input":"m","parallelism":3}"#,
    );
    let started = Instant::now();
    let outcome = run_graph(&graph(&spec), 2, Duration::from_secs(30));
    assert!(started.elapsed() < Duration::from_secs(10));
    let err = outcome.result.unwrap_err().to_string();
    assert!(err.contains("operator 'm'"), "{err}");
    assert!(err.contains("division by zero"), "{err}");
}

/// Ensures canceling an unbounded job stops every subtask promptly.
#[test]
fn cancel_stops_an_unbounded_job() {
    let spec = job(
        r#"{"id":"g","kind":"generator","parallelism":2,"params":{"payload":"words"}},
           {"id":"k","kind":"key_by","input":"g","parallelism":2,"params":{"expr":"value"}},
           {"id":"w","kind":"window_aggregate","input":"k","parallelism":2,"params":{"window":{"tumbling_ms":100},"agg":"count"}},
           {"id":"o","kind":"collect","input":"w","parallelism":1,"partition":"rebalance"}"#,
    );
    let started = Instant::now();
    let outcome = run_graph(&graph(&spec), 2, Duration::from_millis(300));
    assert!(matches!(outcome.result, Err(engine::EngineError::Canceled)));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(outcome.metrics[0].records_in > 0);
    // Windows fired while it ran: watermarks flowed through the hash exchange.
    assert!(!outcome
        .collected
        .get("o")
        .map(Vec::is_empty)
        .unwrap_or(true));
    let _ = Value::Null;
}
