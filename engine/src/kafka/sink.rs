//! `kafka_sink`: writes records to a topic with an idempotent producer.
//!
//! The key is `params.key` evaluated on the record (or the record's key), the payload
//! `params.value` (or the record's value), encoded by `params.format`. `partitioner` is
//! `kafka` (librdkafka's murmur2 of the key bytes, as the Java client's default partitioner,
//! random when there is no key) or `hash` (Weir's stable hash of the key value, modulo the
//! partition count resolved at submission).
//!
//! Delivery is asynchronous; the first delivery error (with the broker's message) fails the
//! subtask at the next batch, flush or checkpoint: a record is never dropped silently. The
//! sink flushes (waits for every acknowledgement) on checkpoint and at end of stream.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

use super::{send_waiting, Connection, Deliveries, DeliveryContext, Format, PRODUCER_TUNING};
use crate::expr::Expr;
use crate::operator::{
    eval, Instance, Metric, OpError, Operator, OperatorFactory, Params, SubtaskContext,
};
use crate::record::Record;
use crate::spec::{OperatorSpec, SpecError};

const PARAMS: &[&str] = &[
    "bootstrap_servers",
    "properties",
    "timeout_ms",
    "topic",
    "key",
    "value",
    "format",
    "partitioner",
    "resolved",
];

/// How records are spread over the topic's partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Partitioner {
    /// librdkafka's murmur2 (the Java client's default).
    Kafka,
    /// `stable_hash(key) % partitions`.
    Hash,
}

/// What submission looked up: the topic's partition count.
#[derive(serde::Serialize, serde::Deserialize)]
struct Resolved {
    partitions: i32,
}

/// Validated `kafka_sink` parameters.
struct Config {
    conn: Connection,
    topic: String,
    key: Option<Expr>,
    value: Option<Expr>,
    format: Format,
    partitioner: Partitioner,
    /// Partition count, resolved at submission.
    partitions: Option<i32>,
}

impl Config {
    fn parse(spec: &OperatorSpec) -> Result<Config, SpecError> {
        let p = Params::new(spec, PARAMS)?;
        let conn = Connection::param(&p)?;
        let topic = p.required_str("topic")?.to_string();
        let format = match Format::param(&p, "format", Format::Json)? {
            Format::Bytes => {
                return Err(p.error("format", "must be json or string for a sink"));
            }
            f => f,
        };
        let partitioner = p.choice(
            "partitioner",
            Partitioner::Kafka,
            &[("kafka", Partitioner::Kafka), ("hash", Partitioner::Hash)],
        )?;
        let partitions = match p.resolved::<Resolved>()? {
            Some(r) if r.partitions > 0 => Some(r.partitions),
            Some(_) => return Err(p.error("resolved", "partitions must be positive")),
            None => None,
        };
        Ok(Config {
            conn,
            topic,
            key: p.expr("key")?,
            value: p.expr("value")?,
            format,
            partitioner,
            partitions,
        })
    }
}

/// Builds a `kafka_sink` from its spec.
pub fn build(spec: &OperatorSpec) -> Result<Arc<dyn OperatorFactory>, SpecError> {
    Ok(Arc::new(Factory(Arc::new(Config::parse(spec)?))))
}

/// Checks the broker and topic and records the topic's partition count.
pub fn resolve(spec: &OperatorSpec) -> Result<serde_json::Value, SpecError> {
    let cfg = Config::parse(spec)?;
    let consumer = cfg.conn.admin_consumer(&spec.id, None)?;
    let counts = cfg.conn.partitions(
        &spec.id,
        &consumer,
        std::slice::from_ref(&cfg.topic),
        "topic",
    )?;
    let mut params = spec.params.clone();
    params["resolved"] = serde_json::json!(Resolved {
        partitions: counts[0]
    });
    Ok(params)
}

struct Factory(Arc<Config>);

impl OperatorFactory for Factory {
    fn instantiate(&self, ctx: &SubtaskContext) -> Result<Instance, OpError> {
        let cfg = self.0.clone();
        let deliveries = Arc::new(Deliveries::default());
        let producer: BaseProducer<DeliveryContext> = cfg
            .conn
            .config(PRODUCER_TUNING)
            .create_with_context(DeliveryContext(deliveries.clone()))
            .map_err(|e| {
                OpError::Io(format!(
                    "kafka_sink '{}' ({}): {e}",
                    ctx.operator, cfg.conn.bootstrap
                ))
            })?;
        Ok(Instance::Operator(Box::new(KafkaSink {
            cfg,
            operator: ctx.operator.clone(),
            producer,
            deliveries,
            key_buf: Vec::new(),
            value_buf: Vec::new(),
            sent: 0,
        })))
    }
}

/// One subtask of a `kafka_sink`.
struct KafkaSink {
    cfg: Arc<Config>,
    operator: String,
    producer: BaseProducer<DeliveryContext>,
    deliveries: Arc<Deliveries>,
    key_buf: Vec<u8>,
    value_buf: Vec<u8>,
    /// Records handed to the producer.
    sent: u64,
}

impl KafkaSink {
    fn io(&self, what: impl std::fmt::Display) -> OpError {
        OpError::Io(format!(
            "kafka_sink '{}' (topic '{}' at {}): {what}",
            self.operator, self.cfg.topic, self.cfg.conn.bootstrap
        ))
    }

    /// Fails with the first delivery error, if any.
    fn check(&self) -> Result<(), OpError> {
        match self.deliveries.first_error() {
            Some(e) => Err(self.io(e)),
            None => Ok(()),
        }
    }

    /// How long the sink waits for acknowledgements before it gives up.
    fn patience(&self) -> Duration {
        self.cfg.conn.timeout.max(Duration::from_secs(30))
    }

    /// Waits until every record sent is acknowledged (or failed), then checks.
    fn flush(&mut self) -> Result<(), OpError> {
        let timeout = self.patience();
        if let Err(e) = self.producer.flush(timeout) {
            self.check()?;
            let acked = self.deliveries.delivered.load(Ordering::Relaxed);
            return Err(self.io(format!(
                "flush: {e} ({} of {} records acknowledged within {} ms)",
                acked,
                self.sent,
                timeout.as_millis()
            )));
        }
        self.check()
    }

    fn send(&mut self, r: &Record) -> Result<(), OpError> {
        let key = match &self.cfg.key {
            Some(e) => Some(eval(e, r)?),
            None => r.key.clone(),
        };
        let value = match &self.cfg.value {
            Some(e) => eval(e, r)?,
            None => r.value.clone(),
        };
        self.key_buf.clear();
        if let Some(k) = key.as_ref().filter(|k| !k.is_null()) {
            Format::String
                .encode(k, &mut self.key_buf)
                .map_err(|e| OpError::Data(format!("kafka_sink key: {e}")))?;
        }
        self.value_buf.clear();
        self.cfg
            .format
            .encode(&value, &mut self.value_buf)
            .map_err(|e| OpError::Data(format!("kafka_sink value: {e}")))?;
        let partition = match (self.cfg.partitioner, self.cfg.partitions, &key) {
            (Partitioner::Hash, Some(n), Some(k)) => Some((k.stable_hash() % n as u64) as i32),
            _ => None,
        };
        let mut rec: BaseRecord<'_, [u8], [u8]> =
            BaseRecord::to(&self.cfg.topic).payload(&self.value_buf[..]);
        if key.as_ref().is_some_and(|k| !k.is_null()) {
            rec = rec.key(&self.key_buf[..]);
        }
        if let Some(p) = partition {
            rec = rec.partition(p);
        }
        if r.ts >= 0 {
            rec = rec.timestamp(r.ts);
        }
        // A full client queue means waiting for acknowledgements (backpressure).
        match send_waiting(&self.producer, rec, self.patience()) {
            Ok(()) => {
                self.sent += 1;
                Ok(())
            }
            Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)) => {
                self.check()?;
                Err(self.io("the producer queue stayed full; is the broker up?"))
            }
            Err(e) => Err(self.io(e)),
        }
    }
}

impl Operator for KafkaSink {
    fn process(
        &mut self,
        _input: usize,
        batch: &mut Vec<Record>,
        _out: &mut Vec<Record>,
    ) -> Result<(), OpError> {
        self.check()?;
        for r in batch.iter() {
            self.send(r)?;
        }
        batch.clear();
        // Serve delivery callbacks.
        self.producer.poll(Duration::ZERO);
        self.check()
    }

    fn finish(&mut self, _out: &mut Vec<Record>) -> Result<(), OpError> {
        self.flush()
    }

    /// A checkpoint waits for every record sent so far to be acknowledged.
    fn snapshot(&mut self) -> Result<Vec<u8>, OpError> {
        self.flush()?;
        Ok(Vec::new())
    }

    fn metrics(&self) -> Vec<Metric> {
        vec![
            Metric::total("sent", self.sent as i64),
            Metric::total(
                "acknowledged",
                self.deliveries.delivered.load(Ordering::Relaxed) as i64,
            ),
            Metric::total(
                "failed",
                self.deliveries.failed.load(Ordering::Relaxed) as i64,
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::testing::{build_error, ctx};
    use crate::value::Value;
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::RDKafkaRespErr;

    #[test]
    fn params_are_validated_with_the_field_named() {
        let err = |params: &str| {
            build_error(&format!(
                r#"{{"id": "out", "kind": "kafka_sink", "params": {params}}}"#
            ))
        };
        assert_eq!(
            err(r#"{"bootstrap_servers": "h:1"}"#).field.as_deref(),
            Some("params.topic")
        );
        assert_eq!(
            err(r#"{"bootstrap_servers": "h:1", "topic": "t", "format": "bytes"}"#)
                .field
                .as_deref(),
            Some("params.format")
        );
        assert_eq!(
            err(r#"{"bootstrap_servers": "h:1", "topic": "t", "partitioner": "rr"}"#)
                .field
                .as_deref(),
            Some("params.partitioner")
        );
        assert_eq!(
            err(r#"{"bootstrap_servers": "h:1", "topic": "t", "key": "value."}"#)
                .field
                .as_deref(),
            Some("params.key")
        );
    }

    fn sink(bootstrap: &str, extra: &str) -> Box<dyn Operator> {
        let spec: OperatorSpec = serde_json::from_str(&format!(
            r#"{{"id": "out", "kind": "kafka_sink", "params": {{"bootstrap_servers": "{bootstrap}",
                "topic": "out", "timeout_ms": 2000 {extra}}}}}"#
        ))
        .unwrap();
        match build(&spec).unwrap().instantiate(&ctx(0, 1)).unwrap() {
            Instance::Operator(o) => o,
            Instance::Source(_) => unreachable!(),
        }
    }

    fn records(n: i64) -> Vec<Record> {
        (0..n)
            .map(|i| Record::keyed(Value::Int(i % 7), i, Value::map([("n", Value::Int(i))])))
            .collect()
    }

    /// Ensures a record the broker refuses fails the subtask with the broker's message.
    #[test]
    fn delivery_errors_fail_the_subtask_with_the_brokers_message() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("out", 2, 1).unwrap();
        // Non-retriable: every produce request is refused.
        cluster.request_errors(
            rdkafka::types::RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 50],
        );
        let mut s = sink(&cluster.bootstrap_servers(), "");
        let mut batch = records(100);
        let mut out = Vec::new();
        let first = s.process(0, &mut batch, &mut out);
        let result = first.and_then(|_| s.finish(&mut out));
        let e = result.expect_err("a refused produce must fail the sink");
        let msg = e.to_string();
        assert!(msg.contains("kafka_sink 'op'"), "{msg}");
        assert!(msg.to_lowercase().contains("authoriz"), "{msg}");
    }

    /// Ensures records reach the broker, flushed at end of stream.
    #[test]
    fn records_are_delivered_and_flushed_at_end_of_stream() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("out", 3, 1).unwrap();
        let mut s = sink(
            &cluster.bootstrap_servers(),
            r#", "partitioner": "hash", "resolved": {"partitions": 3}"#,
        );
        let mut out = Vec::new();
        for _ in 0..5 {
            s.process(0, &mut records(1000), &mut out).unwrap();
        }
        s.finish(&mut out).unwrap();
        let m = s.metrics();
        assert!(m.contains(&Metric::total("sent", 5000)), "{m:?}");
        assert!(m.contains(&Metric::total("acknowledged", 5000)), "{m:?}");
        assert!(m.contains(&Metric::total("failed", 0)), "{m:?}");
    }
}
