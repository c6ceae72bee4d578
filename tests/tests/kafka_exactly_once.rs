//! The full Kafka transactions check, against a real Apache Kafka named by
//! `WEIR_KAFKA_EOS_BOOTSTRAP`. The CI broker (tansu 0.6.0) answers `EndTxn` with
//! UNSUPPORTED_FEATURE and rdkafka's MockCluster does not hide aborted records, so neither
//! can show read_committed isolation; without a real Kafka this test prints why it is
//! skipped. The call sequencing itself is tested against MockCluster in
//! `engine/src/kafka/txn.rs`.

use std::sync::Arc;
use std::time::Duration;

use engine::operator::{CollectTarget, Instance, Operator, SubtaskContext};
use engine::spec::OperatorSpec;
use engine::{Record, Value};

use engine::kafka::txn::{TransactionalProducer, TxnError};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::BaseRecord;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::Message;
use weir_tests::kafka;

const T: Duration = Duration::from_secs(30);

/// Ensures committed transactions are visible to read_committed readers, aborted ones and a
/// fenced zombie's are not, and the zombie learns it was fenced.
#[test]
fn read_committed_sees_exactly_the_committed_transactions() {
    let Some(b) = kafka::broker_from(
        "WEIR_KAFKA_EOS_BOOTSTRAP",
        "read_committed_sees_exactly_the_committed_transactions",
        "name a real Apache Kafka with transactions, e.g. WEIR_KAFKA_EOS_BOOTSTRAP=host:9092",
    ) else {
        return;
    };
    let topic = kafka::unique_topic("eos");
    kafka::create_topic(&b, &topic, 1);
    let id = format!("{topic}-sink-0");

    let mut a = TransactionalProducer::open(&b, &id, T, &[]).expect("open");
    a.begin().expect("begin");
    for i in 0..100 {
        a.send(BaseRecord::to(&topic).payload(format!("committed-{i}").as_bytes()))
            .expect("send");
    }
    a.pre_commit().expect("pre-commit");
    a.commit().expect("commit");

    a.begin().expect("begin");
    for i in 0..50 {
        a.send(BaseRecord::to(&topic).payload(format!("aborted-{i}").as_bytes()))
            .expect("send");
    }
    a.pre_commit().expect("pre-commit");
    a.abort().expect("abort");

    // A zombie: `a` opens a transaction, then a new incarnation with the same id takes over.
    a.begin().expect("begin");
    a.send(BaseRecord::to(&topic).payload(&b"zombie"[..]))
        .expect("send");
    let mut b2 = TransactionalProducer::open(&b, &id, T, &[]).expect("open new incarnation");
    b2.begin().expect("begin");
    for i in 0..10 {
        b2.send(BaseRecord::to(&topic).payload(format!("new-{i}").as_bytes()))
            .expect("send");
    }
    b2.pre_commit().expect("pre-commit");
    b2.commit().expect("commit");
    match a.pre_commit().and_then(|()| a.commit()) {
        Err(TxnError::Fenced { .. }) => {}
        other => panic!("the zombie must be fenced, got {other:?}"),
    }

    let seen = read_committed(&b, &topic, 110);
    let expected: Vec<String> = (0..100)
        .map(|i| format!("committed-{i}"))
        .chain((0..10).map(|i| format!("new-{i}")))
        .collect();
    assert_eq!(seen, expected);
}

/// Every payload of partition 0 of `topic` a read_committed reader sees (waiting for at least
/// `expect` of them, at most 20 s).
fn read_committed(b: &str, topic: &str, expect: usize) -> Vec<String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", b)
        .set("group.id", format!("{topic}-reader"))
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .expect("tpl");
    consumer.assign(&tpl).expect("assign");
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                seen.push(String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned())
            }
            Some(Err(e)) => panic!("{e}"),
            None if seen.len() >= expect => break,
            None => {}
        }
    }
    seen
}

/// An exactly-once `kafka_sink` subtask (as in an ABS job) writing to `topic`.
fn exactly_once_sink(b: &str, topic: &str, attempt: u64) -> Box<dyn Operator> {
    let spec: OperatorSpec = serde_json::from_value(serde_json::json!({
        "id": "out", "kind": "kafka_sink",
        "params": {"bootstrap_servers": b, "topic": topic, "format": "string", "value": "string(value)"}
    }))
    .expect("spec");
    let factory = (jobs::registry().get("kafka_sink").expect("kind").build)(&spec).expect("build");
    struct Nowhere;
    impl CollectTarget for Nowhere {
        fn deliver(&self, _: &str, _: usize, _: Option<u64>, _: Vec<Record>) {}
    }
    let ctx = SubtaskContext {
        operator: "out".into(),
        subtask: 0,
        parallelism: 1,
        collect: Arc::new(Nowhere),
        transactional: true,
        attempt,
        job: topic.to_string(),
    };
    match factory.instantiate(&ctx).expect("instantiate") {
        Instance::Operator(op) => op,
        Instance::Source(_) => panic!("not a sink"),
    }
}

/// Ensures the exactly-once sink neither loses nor duplicates an epoch whose commit outcome
/// the failed incarnation never reported: restored from checkpoint 2 after epoch 1 was
/// committed (and epoch 2 not), it writes epoch 2 only; restored again from checkpoint 1 it
/// writes nothing, because the epoch committed with each transaction says what is there.
#[test]
fn exactly_once_sink_restores_without_loss_or_duplicates() {
    let Some(b) = kafka::broker_from(
        "WEIR_KAFKA_EOS_BOOTSTRAP",
        "exactly_once_sink_restores_without_loss_or_duplicates",
        "name a real Apache Kafka with transactions, e.g. WEIR_KAFKA_EOS_BOOTSTRAP=host:9092",
    ) else {
        return;
    };
    let topic = kafka::unique_topic("eos-sink");
    kafka::create_topic(&b, &topic, 1);
    let recs = |from: i64, n: i64| -> Vec<Record> {
        (from..from + n)
            .map(|i| Record::new(i, Value::Int(i)))
            .collect()
    };
    let mut out = Vec::new();
    let mut first = exactly_once_sink(&b, &topic, 1);
    first
        .process(0, &mut recs(0, 10), &mut out)
        .expect("process");
    first.pre_commit(1).expect("pre-commit 1");
    let snap1 = first.snapshot().expect("snapshot 1");
    first
        .process(0, &mut recs(10, 5), &mut out)
        .expect("process");
    first.pre_commit(2).expect("pre-commit 2");
    let snap2 = first.snapshot().expect("snapshot 2");
    first.commit(1).expect("commit 1");
    drop(first);
    let mut second = exactly_once_sink(&b, &topic, 2);
    second.restore(&snap2).expect("restore 2");
    second.commit(u64::MAX).expect("commit after restore 2");
    drop(second);
    let mut third = exactly_once_sink(&b, &topic, 3);
    third.restore(&snap1).expect("restore 1");
    third.commit(u64::MAX).expect("commit after restore 1");
    drop(third);
    let expected: Vec<String> = (0..15).map(|i| i.to_string()).collect();
    assert_eq!(read_committed(&b, &topic, 15), expected);
}
