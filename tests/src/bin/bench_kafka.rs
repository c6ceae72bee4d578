//! `bench_kafka`: Kafka -> map -> Kafka through the engine against the same copy without it.
//!
//! The input topic (2 partitions) is filled once with `--records` click events (JSON, keyed
//! by user, written like `weir produce`). Each round then runs, back to back:
//!
//! - **copy**: no engine. Two threads, one per input partition, each with a consumer and a
//!   producer using the Kafka source's and sink's own client settings, forward every record's
//!   bytes unchanged to an output topic and flush. This is what the broker and client can
//!   do on this machine.
//! - **weir**: the job `kafka_source (parallelism 2, bounded at the current end) -> map ->
//!   kafka_sink (parallelism 2)` in process, decoding every record from JSON into `Value`,
//!   evaluating the map expression and encoding JSON again.
//!
//! Both read the same records and write the same number to a fresh topic, so their ratio is
//! the engine's cost on top of the broker round trip. Run it against a broker on its memory
//! engine (see BENCHMARKS.md):
//!
//! The flags are in `USAGE` (`--help` prints it).

use std::time::{Duration, Instant};

use engine::kafka::{client_config, send_waiting, CONSUMER_TUNING, PRODUCER_TUNING};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::Message;
use weir_tests::kafka;

/// The command line (`--help` prints it).
const USAGE: &str =
    "WEIR_KAFKA_BOOTSTRAP=127.0.0.1:19192 target/release/bench_kafka [--records N --repeat K]";

const PARTITIONS: i32 = 2;

/// Forwards partition `p` of `input` (`n` records) to `output`; returns when all are acked.
fn copy_partition(bootstrap: &str, input: &str, output: &str, p: i32, n: i64) {
    let consumer: BaseConsumer = client_config(bootstrap, CONSUMER_TUNING)
        .set("group.id", "weir-bench-copy")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(input, p, Offset::Offset(0))
        .expect("tpl");
    consumer.assign(&tpl).expect("assign");
    let producer: BaseProducer = client_config(bootstrap, PRODUCER_TUNING)
        .create()
        .expect("producer");
    let mut copied = 0;
    let deadline = Instant::now() + Duration::from_secs(600);
    while copied < n {
        assert!(Instant::now() < deadline, "copy of {input}/{p} timed out");
        let Some(m) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let m = m.unwrap_or_else(|e| panic!("reading {input}/{p}: {e}"));
        let mut rec = BaseRecord::to(output).payload(m.payload().unwrap_or_default());
        if let Some(k) = m.key() {
            rec = rec.key(k);
        }
        send_waiting(&producer, rec, Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("producing to {output}: {e}"));
        producer.poll(Duration::ZERO);
        copied += 1;
    }
    producer
        .flush(Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("flush to {output}: {e}"));
}

/// Records per second of the engine-free copy of `input` to a new topic.
fn copy_rate(bootstrap: &str, input: &str, highs: &[i64]) -> f64 {
    let output = kafka::unique_topic("bench-copy");
    kafka::create_topic(bootstrap, &output, PARTITIONS);
    let started = Instant::now();
    std::thread::scope(|s| {
        for (p, &n) in highs.iter().enumerate() {
            let output = &output;
            s.spawn(move || copy_partition(bootstrap, input, output, p as i32, n));
        }
    });
    let rate = highs.iter().sum::<i64>() as f64 / started.elapsed().as_secs_f64();
    check_count(bootstrap, &output, highs);
    rate
}

/// Records per second of the engine job copying `input` through a map to a new topic.
fn weir_rate(bootstrap: &str, input: &str, highs: &[i64]) -> f64 {
    let output = kafka::unique_topic("bench-weir");
    kafka::create_topic(bootstrap, &output, PARTITIONS);
    let spec = serde_json::json!({
        "name": "bench-kafka",
        "operators": [
            {"id": "in", "kind": "kafka_source", "parallelism": 2,
             "params": {"bootstrap_servers": bootstrap, "topic": input, "end": "latest",
                        "key_format": "string", "ts_field": "ts"}},
            {"id": "m", "kind": "map", "input": "in", "parallelism": 2,
             "params": {"expr": "{user: value.user, page: value.page, cents: value.amount * 100, ts: value.ts}"}},
            {"id": "out", "kind": "kafka_sink", "input": "m", "parallelism": 2,
             "params": {"bootstrap_servers": bootstrap, "topic": output}}
        ]
    });
    let graph = weir_tests::graph(&spec.to_string());
    let outcome = weir_tests::run_graph(&graph, 2, Duration::from_secs(600));
    if let Err(e) = outcome.result {
        panic!("benchmark job failed: {e}");
    }
    let rate = highs.iter().sum::<i64>() as f64 / outcome.elapsed.as_secs_f64();
    check_count(bootstrap, &output, highs);
    rate
}

/// Both variants must have written exactly as many records as they read.
fn check_count(bootstrap: &str, output: &str, highs: &[i64]) {
    let written: i64 = kafka::high_watermarks(bootstrap, output).iter().sum();
    let read: i64 = highs.iter().sum();
    assert_eq!(written, read, "records written to {output}");
}

fn main() {
    let args = weir_tests::bench_args(USAGE);
    let arg = |name: &str, default: u64| weir_tests::arg(&args, name, default);
    let n = arg("--records", 1_000_000);
    let repeat = arg("--repeat", 3).max(1) as usize;
    let Ok(bootstrap) = std::env::var("WEIR_KAFKA_BOOTSTRAP") else {
        eprintln!("bench_kafka needs a broker: set WEIR_KAFKA_BOOTSTRAP (see BENCHMARKS.md)");
        std::process::exit(2);
    };
    let input = kafka::unique_topic("bench-in");
    kafka::create_topic(&bootstrap, &input, PARTITIONS);
    let started = Instant::now();
    jobs::clicks::produce(&jobs::clicks::ProduceOptions {
        bootstrap: bootstrap.clone(),
        topic: input.clone(),
        rate: 0,
        first: 0,
        count: n,
        clicks: jobs::clicks::Clicks::default(),
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let produced = n as f64 / started.elapsed().as_secs_f64();
    let highs = kafka::high_watermarks(&bootstrap, &input);
    assert_eq!(highs.iter().sum::<i64>(), n as i64, "records in {input}");
    println!("broker {bootstrap}: {n} click events in {input} ({PARTITIONS} partitions)");
    println!(
        "produce (weir produce's client, no engine): {:.0} records/s",
        produced
    );
    let (mut copies, mut weirs, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=repeat {
        let copy = copy_rate(&bootstrap, &input, &highs);
        let weir = weir_rate(&bootstrap, &input, &highs);
        println!(
            "round {round}: copy {copy:.0} records/s, weir {weir:.0} records/s, weir/copy {:.0}%",
            100.0 * weir / copy
        );
        copies.push(copy);
        weirs.push(weir);
        ratios.push(weir / copy);
    }
    println!(
        "median: copy (no engine) {:.0} records/s, weir kafka -> map -> kafka {:.0} records/s, \
         weir/copy {:.0}%",
        weir_tests::median(copies),
        weir_tests::median(weirs),
        100.0 * weir_tests::median(ratios)
    );
}
