//! Kafka connectors on rdkafka (librdkafka): the `kafka_source` and `kafka_sink` operators
//! and the transactional producer that exactly-once sinks build on.
//!
//! Both operators are resolved once per submission ([`crate::operator::ResolveFn`]): the job
//! manager asks the broker for the topics' partitions (and, for sources, the start and end
//! offsets) and writes the answer into the operator's params under `resolved`. Every task
//! manager then builds the same assignment from the same spec, with no consumer-group
//! rebalancing inside a job (as Flink's split enumerator does it). A broker that cannot be
//! reached or a missing topic is therefore a rejected submission naming the setting.
//!
//! What each broker feature was verified against is in `docs/kafka.md`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::ToBytes;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;

use crate::operator::Params;
use crate::spec::SpecError;
use crate::value::Value;

pub mod sink;
pub mod source;
pub mod txn;

/// How long submission waits for the broker unless `params.timeout_ms` says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Producer settings of the Kafka sink (and of anything that writes like it: `weir produce`,
/// the benchmark's baseline): idempotent, batched, compressed.
pub const PRODUCER_TUNING: &[(&str, &str)] = &[
    ("enable.idempotence", "true"),
    ("partitioner", "murmur2_random"),
    ("linger.ms", "5"),
    ("batch.num.messages", "10000"),
    ("queue.buffering.max.messages", "500000"),
    ("compression.type", "lz4"),
];

/// Fetch settings of the Kafka source. Without them librdkafka idles for a second whenever
/// its queue fills, and waits up to 500 ms for a fetch to fill.
pub const CONSUMER_TUNING: &[(&str, &str)] = &[
    ("enable.auto.commit", "false"),
    ("enable.auto.offset.store", "false"),
    ("enable.partition.eof", "false"),
    ("fetch.queue.backoff.ms", "1"),
    ("fetch.wait.max.ms", "10"),
    ("queued.min.messages", "200000"),
];

/// Sends `rec`. While librdkafka's queue is full, serves delivery reports (which frees room)
/// and tries again, for at most `patience` (measured from the first refusal, so the common
/// path reads no clock); then the `QueueFull` error is returned. Never drops the record.
pub fn send_waiting<'a, C, K, P>(
    producer: &BaseProducer<C>,
    mut rec: BaseRecord<'a, K, P, C::DeliveryOpaque>,
    patience: Duration,
) -> Result<(), KafkaError>
where
    C: ProducerContext,
    K: ToBytes + ?Sized,
    P: ToBytes + ?Sized,
{
    let mut deadline = None;
    loop {
        match producer.send(rec) {
            Ok(()) => return Ok(()),
            Err((e @ KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                if Instant::now() >= *deadline.get_or_insert_with(|| Instant::now() + patience) {
                    return Err(e);
                }
                producer.poll(Duration::from_millis(10));
                rec = back;
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// A client configuration for `bootstrap` with `tuning` applied.
pub fn client_config(bootstrap: &str, tuning: &[(&str, &str)]) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap);
    for (k, v) in tuning {
        c.set(*k, *v);
    }
    c
}

/// How a Kafka key or value is turned into a `Value` and back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The bytes as they are (`Value::Bytes`).
    Bytes,
    /// UTF-8 text (`Value::Str`); invalid UTF-8 is an undecodable record.
    String,
    /// A JSON document, parsed into a `Value`.
    Json,
}

impl Format {
    /// Reads the format parameter `name`, or `default` when absent.
    pub(crate) fn param(p: &Params, name: &str, default: Format) -> Result<Format, SpecError> {
        p.choice(
            name,
            default,
            &[
                ("bytes", Format::Bytes),
                ("string", Format::String),
                ("json", Format::Json),
            ],
        )
    }

    /// Decodes a key or payload.
    pub fn decode(self, bytes: &[u8]) -> Result<Value, String> {
        match self {
            Format::Bytes => Ok(Value::Bytes(bytes.into())),
            Format::String => std::str::from_utf8(bytes)
                .map(Value::str)
                .map_err(|e| format!("invalid UTF-8: {e}")),
            Format::Json => serde_json::from_slice(bytes).map_err(|e| format!("invalid JSON: {e}")),
        }
    }

    /// Appends the encoding of `v` to `out`. `String` and `Bytes` write strings and bytes as
    /// they are and any other value as JSON text.
    pub fn encode(self, v: &Value, out: &mut Vec<u8>) -> Result<(), String> {
        match (self, v) {
            (Format::String | Format::Bytes, Value::Str(s)) => out.extend_from_slice(s.as_bytes()),
            (Format::String | Format::Bytes, Value::Bytes(b)) => out.extend_from_slice(b),
            _ => serde_json::to_writer(out, v).map_err(|e| e.to_string())?,
        }
        Ok(())
    }
}

/// Connection settings every Kafka operator has: `bootstrap_servers`, `properties` (extra
/// librdkafka settings, passed through) and `timeout_ms`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Connection {
    pub bootstrap: String,
    pub properties: BTreeMap<String, String>,
    pub timeout: Duration,
}

impl Connection {
    pub fn param(p: &Params) -> Result<Connection, SpecError> {
        let bootstrap = p.required_str("bootstrap_servers")?.trim().to_string();
        if bootstrap.is_empty() {
            return Err(p.error("bootstrap_servers", "must name at least one host:port"));
        }
        let mut properties = BTreeMap::new();
        if let Some(raw) = p.raw("properties") {
            let obj = raw.as_object().ok_or_else(|| {
                p.error(
                    "properties",
                    "must be an object of librdkafka settings (strings)",
                )
            })?;
            for (k, v) in obj {
                let v = match v {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Number(n) => n.to_string(),
                    serde_json::Value::Bool(b) => b.to_string(),
                    _ => {
                        return Err(p.error(
                            &format!("properties.{k}"),
                            "must be a string, number or boolean",
                        ))
                    }
                };
                properties.insert(k.clone(), v);
            }
        }
        // librdkafka takes its timeouts as an i32 of ms (and -1 as "forever").
        let timeout = match p.positive("timeout_ms")? {
            Some(ms) if ms > i32::MAX as u64 => {
                return Err(p.error("timeout_ms", format!("must be at most {} ms", i32::MAX)))
            }
            ms => ms.map_or(DEFAULT_TIMEOUT, Duration::from_millis),
        };
        Ok(Connection {
            bootstrap,
            properties,
            timeout,
        })
    }

    /// A client configuration: the bootstrap servers, then `defaults`, then the user's
    /// properties (which win).
    pub fn config(&self, defaults: &[(&str, &str)]) -> ClientConfig {
        let mut c = client_config(&self.bootstrap, defaults);
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }

    /// A consumer for metadata and offset lookups at submission.
    pub fn admin_consumer(&self, op: &str, group: Option<&str>) -> Result<BaseConsumer, SpecError> {
        self.config(&[
            ("group.id", group.unwrap_or("weir-resolve")),
            ("enable.auto.commit", "false"),
            ("allow.auto.create.topics", "false"),
        ])
        .create()
        .map_err(|e| SpecError::field(op, "params.properties", format!("{e}")))
    }

    /// The partition count of each topic, in the order given. Errors name the broker address
    /// when it cannot be reached and the topic when it does not exist.
    pub fn partitions(
        &self,
        op: &str,
        consumer: &BaseConsumer,
        topics: &[String],
        topic_field: &str,
    ) -> Result<Vec<i32>, SpecError> {
        topics
            .iter()
            .map(|topic| {
                let md = consumer
                    .fetch_metadata(Some(topic), self.timeout)
                    .map_err(|e| self.unreachable(op, e))?;
                let t = md.topics().iter().find(|t| t.name() == topic);
                match t {
                    Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
                        Ok(t.partitions().len() as i32)
                    }
                    _ => Err(SpecError::field(
                        op,
                        format!("params.{topic_field}"),
                        format!(
                            "topic '{topic}' does not exist on the Kafka broker at {}",
                            self.bootstrap
                        ),
                    )),
                }
            })
            .collect()
    }

    /// The error for a broker call that failed at submission.
    pub fn unreachable(&self, op: &str, e: KafkaError) -> SpecError {
        SpecError::field(
            op,
            "params.bootstrap_servers",
            format!(
                "cannot reach the Kafka broker at {} within {} ms: {e}",
                self.bootstrap,
                self.timeout.as_millis()
            ),
        )
    }
}

/// Delivery outcomes of a producer, written by librdkafka's callbacks on the thread that
/// polls it. A producer whose failures are not looked at would lose records silently.
#[derive(Default)]
pub struct Deliveries {
    /// Records acknowledged.
    pub delivered: AtomicU64,
    /// Records that failed.
    pub failed: AtomicU64,
    /// The first failure, with the broker's message.
    first_error: Mutex<Option<String>>,
}

/// A producer context that records delivery outcomes in [`Deliveries`].
pub struct DeliveryContext(pub Arc<Deliveries>);

impl ClientContext for DeliveryContext {}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.0.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Err((e, m)) => {
                use rdkafka::message::Message;
                self.0.failed.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut g) = self.0.first_error.lock() {
                    g.get_or_insert_with(|| {
                        format!(
                            "delivery to {} partition {} failed: {e}",
                            m.topic(),
                            m.partition()
                        )
                    });
                }
            }
        }
    }
}

impl Deliveries {
    /// The first delivery failure, with the broker's message.
    pub fn first_error(&self) -> Option<String> {
        self.first_error.lock().ok().and_then(|g| g.clone())
    }
}

/// Creates `topic` with `partitions` partitions (replication 1) on the broker at
/// `bootstrap`; an existing topic is fine when `exist_ok`. Errors carry the broker's message.
pub fn create_topic(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    exist_ok: bool,
    timeout: Duration,
) -> Result<(), String> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .map_err(|e| format!("Kafka admin client for {bootstrap}: {e}"))?;
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let opts = AdminOptions::new()
        .operation_timeout(Some(timeout))
        .request_timeout(Some(timeout));
    // The admin client drives its own futures from a background thread.
    let results = futures::executor::block_on(admin.create_topics([&new], &opts))
        .map_err(|e| format!("creating topic '{topic}' at {bootstrap}: {e}"))?;
    for r in results {
        match r {
            Ok(_) => {}
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) if exist_ok => {}
            Err((t, e)) => return Err(format!("creating topic '{t}' at {bootstrap}: {e}")),
        }
    }
    Ok(())
}

/// Whether an error a consumer or producer reports will not go away by itself (librdkafka
/// retries transient errors such as a broker restart on its own).
pub(crate) fn is_fatal(e: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::UnknownTopicOrPartition
                | C::UnknownTopic
                | C::UnknownPartition
                | C::TopicAuthorizationFailed
                | C::GroupAuthorizationFailed
                | C::ClusterAuthorizationFailed
                | C::OffsetOutOfRange
                | C::AutoOffsetReset
                | C::InvalidMessage
                | C::MessageSizeTooLarge
                | C::InvalidRecord
                | C::Fatal,
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_round_trip() {
        let v = Value::map([("user", Value::str("u1")), ("n", Value::Int(3))]);
        let mut buf = Vec::new();
        Format::Json.encode(&v, &mut buf).unwrap();
        assert_eq!(Format::Json.decode(&buf).unwrap(), v);
        buf.clear();
        Format::String
            .encode(&Value::str("héllo"), &mut buf)
            .unwrap();
        assert_eq!(buf, "héllo".as_bytes());
        assert_eq!(Format::String.decode(&buf).unwrap(), Value::str("héllo"));
        assert_eq!(
            Format::Bytes.decode(&[0, 255]).unwrap(),
            Value::Bytes(vec![0u8, 255].into())
        );
        buf.clear();
        Format::String.encode(&Value::Int(42), &mut buf).unwrap();
        assert_eq!(buf, b"42");
        assert!(Format::String.decode(&[0xff, 0xfe]).is_err());
        assert!(Format::Json
            .decode(b"{not json")
            .unwrap_err()
            .contains("invalid JSON"));
    }
}
