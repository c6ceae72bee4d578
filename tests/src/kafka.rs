//! Helpers for tests against a real Kafka-protocol broker (and librdkafka's mock cluster).
//!
//! The broker's address comes from `WEIR_KAFKA_BOOTSTRAP` (`scripts/test` starts one and
//! sets it). When it is unset, [`bootstrap`] prints that the test was skipped and why, so a
//! skip is never silent.

use std::io::Write;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::Message;

/// Kafka tests of one test binary take turns: the CI broker (tansu on SQLite, one writer)
/// answers metadata requests slowly while another test produces a million records.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A broker's address, held by one test at a time.
pub struct Broker {
    addr: String,
    _turn: MutexGuard<'static, ()>,
}

impl std::ops::Deref for Broker {
    type Target = str;
    fn deref(&self) -> &str {
        &self.addr
    }
}

impl std::fmt::Display for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.addr)
    }
}

/// The broker address, or `None` after printing why the test `name` is skipped.
pub fn bootstrap(name: &str) -> Option<Broker> {
    broker_from(
        "WEIR_KAFKA_BOOTSTRAP",
        name,
        "scripts/test starts a broker and sets it; or run scripts/kafka-broker start",
    )
}

/// The address in environment variable `var`, or `None` after printing (past the test
/// harness's output capture, so a skip is always seen) that test `name` is skipped and why.
pub fn broker_from(var: &str, name: &str, how: &str) -> Option<Broker> {
    match std::env::var(var) {
        Ok(b) if !b.trim().is_empty() => Some(Broker {
            addr: b,
            _turn: ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner()),
        }),
        _ => {
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {name}: {var} is not set ({how})"
            );
            None
        }
    }
}

/// librdkafka's mock cluster, served on loopback from this process while the value lives:
/// it speaks the transaction protocol (init, begin, commit, abort, fencing) but shows
/// aborted records to `read_committed` readers too, and does not answer the admin
/// CreateTopics call, so topics are made up front.
pub struct MockBroker(
    rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
);

impl MockBroker {
    /// A one-broker mock cluster with `topic` in `partitions` partitions.
    pub fn with_topic(topic: &str, partitions: i32) -> MockBroker {
        let cluster = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
        cluster
            .create_topic(topic, partitions, 1)
            .expect("mock topic");
        MockBroker(cluster)
    }

    /// The address clients connect to.
    pub fn bootstrap(&self) -> String {
        self.0.bootstrap_servers()
    }

    /// Delays every response of the broker by `rtt` from now on (zero: none).
    pub fn round_trip(&self, rtt: Duration) {
        self.0
            .broker_round_trip_time(1, rtt)
            .expect("mock broker round trip");
    }
}

/// A topic name no other test run uses.
pub fn unique_topic(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let h = engine::value::mix64(nanos as u64 ^ ((std::process::id() as u64) << 32));
    format!("{prefix}-{h:016x}")
}

/// Creates a topic with `partitions` partitions; panics with the broker's message on failure.
pub fn create_topic(bootstrap: &str, topic: &str, partitions: i32) {
    engine::kafka::create_topic(bootstrap, topic, partitions, false, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"));
}

/// One record to produce.
pub struct Rec<'a> {
    /// Partition.
    pub partition: i32,
    /// Key.
    pub key: Option<&'a [u8]>,
    /// Payload.
    pub payload: &'a [u8],
    /// Kafka timestamp (ms).
    pub ts: Option<i64>,
}

/// Produces `records` in order and waits for every acknowledgement.
pub fn produce(bootstrap: &str, topic: &str, records: &[Rec<'_>]) {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    for r in records {
        let mut rec = BaseRecord::to(topic)
            .partition(r.partition)
            .payload(r.payload);
        if let Some(k) = r.key {
            rec = rec.key(k);
        }
        if let Some(ts) = r.ts {
            rec = rec.timestamp(ts);
        }
        engine::kafka::send_waiting(&producer, rec, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("producing to {topic}: {e}"));
    }
    producer
        .flush(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("flush to {topic}: {e}"));
}

/// A record read back.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ReadBack {
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Key.
    pub key: Option<Vec<u8>>,
    /// Payload.
    pub payload: Vec<u8>,
}

/// The high watermark of every partition of `topic`.
pub fn high_watermarks(bootstrap: &str, topic: &str) -> Vec<i64> {
    let consumer = consumer(bootstrap, "weir-test-reader");
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let n = md.topics()[0].partitions().len() as i32;
    (0..n)
        .map(|p| {
            consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .expect("watermarks")
                .1
        })
        .collect()
}

/// A plain consumer without auto-commit.
pub fn consumer(bootstrap: &str, group: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("fetch.queue.backoff.ms", "1")
        .set("fetch.wait.max.ms", "10")
        .create()
        .expect("consumer")
}

/// Assigns `consumer` every one of the `partitions` partitions of `topic`, from the start.
fn assign_from_start(consumer: &BaseConsumer, topic: &str, partitions: usize) {
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("tpl");
    }
    consumer.assign(&tpl).expect("assign");
}

/// A record read back, copied out of the consumer's buffer.
fn read_back(m: &rdkafka::message::BorrowedMessage<'_>) -> ReadBack {
    ReadBack {
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(<[u8]>::to_vec),
        payload: m.payload().unwrap_or_default().to_vec(),
    }
}

/// Every record of `topic` a `read_committed` reader sees, from the start to the end of
/// each partition at the time of the call: the reader stops at each partition's end of
/// file (its last stable offset) or once its position passes the high watermark, which
/// counts the transaction markers it skips. Call it when no transaction is open any more:
/// an open one holds the end back until `timeout`.
pub fn read_committed_all(bootstrap: &str, topic: &str, timeout: Duration) -> Vec<ReadBack> {
    let highs = high_watermarks(bootstrap, topic);
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "weir-test-committed-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        .create()
        .expect("consumer");
    assign_from_start(&consumer, topic, highs.len());
    let mut at_end: Vec<bool> = highs.iter().map(|h| *h == 0).collect();
    let passed = |c: &BaseConsumer, at_end: &[bool]| {
        let at = c.position().expect("position");
        highs.iter().enumerate().all(|(p, high)| {
            at_end[p]
                || matches!(at.find_partition(topic, p as i32).map(|e| e.offset()),
                            Some(Offset::Offset(o)) if o >= *high)
        })
    };
    let mut out = Vec::new();
    let deadline = Instant::now() + timeout;
    while !passed(&consumer, &at_end) {
        assert!(
            Instant::now() < deadline,
            "read_committed: not at the end of {topic} (high watermarks {highs:?}) within {timeout:?} ({} records read)",
            out.len()
        );
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) if m.offset() < highs[m.partition() as usize] => out.push(read_back(&m)),
            Some(Ok(_)) => {}
            Some(Err(KafkaError::PartitionEOF(p))) => at_end[p as usize] = true,
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            None => {}
        }
    }
    out.sort();
    out
}

/// Every record of `topic`, from the start to the high watermarks at the time of the call.
pub fn read_all(bootstrap: &str, topic: &str, timeout: Duration) -> Vec<ReadBack> {
    let highs = high_watermarks(bootstrap, topic);
    let total: i64 = highs.iter().sum();
    let consumer = consumer(bootstrap, "weir-test-reader");
    assign_from_start(&consumer, topic, highs.len());
    let mut out = Vec::with_capacity(total as usize);
    let deadline = Instant::now() + timeout;
    while (out.len() as i64) < total {
        assert!(
            Instant::now() < deadline,
            "read {} of {total} records of {topic} within {timeout:?}",
            out.len()
        );
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) if m.offset() < highs[m.partition() as usize] => out.push(read_back(&m)),
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            None => {}
        }
    }
    out.sort();
    out
}

/// Commits `offsets` (partition, next offset) of `topic` for consumer group `group`.
pub fn commit(bootstrap: &str, group: &str, topic: &str, offsets: &[(i32, i64)]) {
    let consumer = consumer(bootstrap, group);
    let mut tpl = TopicPartitionList::new();
    for (p, o) in offsets {
        tpl.add_partition_offset(topic, *p, Offset::Offset(*o))
            .expect("tpl");
    }
    consumer
        .commit(&tpl, rdkafka::consumer::CommitMode::Sync)
        .unwrap_or_else(|e| panic!("commit for {group}: {e}"));
}

/// A topic of click events being written while a job reads it, with the counts per
/// (user, 2 s window) a correct job computes from them.
pub struct ClickFeed {
    /// The topic.
    pub topic: String,
    /// Per partition, the offset the job reads up to (the topic's final size).
    pub ends: serde_json::Map<String, serde_json::Value>,
    /// (user, window start) -> clicks.
    pub expected: std::collections::BTreeMap<(String, i64), i64>,
    /// The writer; join it before reading the job's result.
    pub writer: std::thread::JoinHandle<()>,
}

/// The click events of the feeds: 200 users, one event every 0.5 ms of event time.
fn clicks() -> jobs::clicks::Clicks {
    jobs::clicks::Clicks {
        users: 200,
        spacing_us: 500,
        ..Default::default()
    }
}

/// Writes click events `range` to `topic`, event i to partition i % partitions, in chunks
/// of `chunk`, sleeping `pause` after each.
fn write_clicks(
    bootstrap: &str,
    topic: &str,
    range: std::ops::Range<u64>,
    partitions: u64,
    chunk: u64,
    pause: Duration,
) {
    let clicks = clicks();
    let mut at = range.start;
    while at < range.end {
        let rows: Vec<(i32, String, String, i64)> = (at..(at + chunk).min(range.end))
            .map(|i| {
                (
                    (i % partitions) as i32,
                    clicks.user(i),
                    serde_json::to_string(&clicks.event(i)).expect("json"),
                    clicks.ts(i),
                )
            })
            .collect();
        let recs: Vec<Rec<'_>> = rows
            .iter()
            .map(|(p, k, v, ts)| Rec {
                partition: *p,
                key: Some(k.as_bytes()),
                payload: v.as_bytes(),
                ts: Some(*ts),
            })
            .collect();
        produce(bootstrap, topic, &recs);
        at += chunk;
        std::thread::sleep(pause);
    }
}

/// Per partition, the offset after `n` events spread over `partitions` partitions (a
/// `kafka_source`'s `end.offsets` for the topic).
fn click_ends(n: u64, partitions: u64) -> serde_json::Map<String, serde_json::Value> {
    assert_eq!(
        n % partitions,
        0,
        "the clicks spread evenly over the partitions"
    );
    (0..partitions)
        .map(|p| (p.to_string(), serde_json::json!(n / partitions)))
        .collect()
}

/// A new topic of `partitions` partitions already holding `n` click events (a benchmark's
/// input, read by jobs that end at the returned offsets).
pub fn filled_clicks(
    bootstrap: &str,
    prefix: &str,
    n: u64,
    partitions: u64,
) -> (String, serde_json::Map<String, serde_json::Value>) {
    let topic = unique_topic(prefix);
    create_topic(bootstrap, &topic, partitions as i32);
    write_clicks(bootstrap, &topic, 0..n, partitions, 50_000, Duration::ZERO);
    (topic, click_ends(n, partitions))
}

/// Starts writing `n` click events to a new topic of `partitions` partitions, 2,000 every
/// 300 ms. Event i goes to partition i % partitions, so each partition is in event-time
/// order and its final offset is known: a job can read exactly up to it while the writer
/// still runs.
pub fn click_feed(bootstrap: &str, prefix: &str, n: u64, partitions: u64) -> ClickFeed {
    let topic = unique_topic(prefix);
    create_topic(bootstrap, &topic, partitions as i32);
    let ends = click_ends(n, partitions);
    let clicks = clicks();
    let mut expected = std::collections::BTreeMap::new();
    for i in 0..n {
        let ts = clicks.ts(i);
        *expected
            .entry((clicks.user(i), ts - ts.rem_euclid(2_000)))
            .or_default() += 1;
    }
    let writer = {
        let (b, topic) = (bootstrap.to_string(), topic.clone());
        std::thread::spawn(move || {
            write_clicks(
                &b,
                &topic,
                0..n,
                partitions,
                2_000,
                Duration::from_millis(300),
            );
        })
    };
    ClickFeed {
        topic,
        ends,
        expected,
        writer,
    }
}

/// Kafka `topic` up to `ends` → clicks per user and 2 s window → sink `out` of `sink`
/// kind, parallelism 2.
pub fn click_count_job(
    bootstrap: &str,
    name: &str,
    (topic, ends): (&str, &serde_json::Map<String, serde_json::Value>),
    checkpointing: serde_json::Value,
    sink: &str,
) -> String {
    serde_json::json!({
        "name": name,
        "checkpointing": checkpointing,
        "operators": [
            {"id": "clicks", "kind": "kafka_source", "parallelism": 2,
             "params": {"bootstrap_servers": bootstrap, "topic": topic, "ts_field": "ts",
                        "end": {"offsets": {topic: ends}}}},
            {"id": "by_user", "kind": "key_by", "input": "clicks", "parallelism": 2,
             "params": {"expr": "value.user"}},
            {"id": "per_2s", "kind": "window_aggregate", "input": "by_user", "parallelism": 2,
             "params": {"window": {"tumbling_ms": 2000}, "aggs": [{"name": "clicks", "agg": "count"}]}},
            {"id": "out", "kind": sink, "input": "per_2s", "parallelism": 2}
        ]
    })
    .to_string()
}

impl ClickFeed {
    /// Kafka → clicks per user and 2 s window → collect sink `out`, parallelism 2.
    pub fn count_job(
        &self,
        bootstrap: &str,
        name: &str,
        checkpointing: serde_json::Value,
    ) -> String {
        let input = (self.topic.as_str(), &self.ends);
        click_count_job(bootstrap, name, input, checkpointing, "collect")
    }

    /// Waits for the writer and for job `id` to finish, and checks that its collect sink
    /// `out` holds exactly the expected counts (no duplicate, none missing). Returns the job.
    pub fn assert_counted(self, c: &crate::cluster::Cluster, id: &str) -> serde_json::Value {
        self.writer.join().expect("writer");
        let job = c.wait_for_end(id, Duration::from_secs(120));
        assert_eq!(job["state"], "FINISHED", "{job}");
        let got = crate::collected_windows(c, id, "out", "clicks");
        assert_eq!(
            got.len(),
            self.expected.len(),
            "number of (user, window) counts"
        );
        assert_eq!(got, self.expected);
        job
    }
}
