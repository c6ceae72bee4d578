//! `kafka_source`: reads topics with `assign` from explicit offsets.
//!
//! At submission [`resolve`] lists the topics' partitions, sorts them by (topic, partition)
//! and turns the start position (`earliest`, `latest`, `committed`, a timestamp or explicit
//! offsets) and the optional end (`latest` or explicit offsets: a bounded read) into
//! concrete offsets. Partition `i` of that list belongs to subtask `i % parallelism`, so the
//! assignment is stable across restarts and partitions beyond the parallelism are spread
//! round-robin. A subtask with no partition finishes at once (it would otherwise hold back
//! the watermark of everything downstream forever).
//!
//! A subtask's position is the next offset of each of its partitions: that is its snapshot,
//! and it is reported as the `offset` metric next to the consumer `lag` (broker high
//! watermark minus position, from librdkafka's statistics).
//!
//! Watermarks are per partition (highest event time minus `out_of_orderness_ms`); the
//! subtask's watermark is the minimum over partitions that are not idle. A partition with no
//! record for `idle_timeout_ms` stops holding the watermark back; when every partition is
//! idle the subtask's watermark is the highest of them.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientContext;
use tracing::warn;

use super::{is_fatal, Connection, Format, CONSUMER_TUNING};
use crate::operator::source::watermark_after;
use crate::operator::{
    decode_state, encode_state, Instance, Metric, OpError, OperatorFactory, Params, Source,
    SourcePoll, SubtaskContext,
};
use crate::record::Record;
use crate::spec::{OperatorSpec, SpecError};
use crate::value::Value;

const PARAMS: &[&str] = &[
    "bootstrap_servers",
    "properties",
    "timeout_ms",
    "topic",
    "start",
    "end",
    "group_id",
    "key_format",
    "value_format",
    "ts_field",
    "out_of_orderness_ms",
    "idle_timeout_ms",
    "on_decode_error",
    "resolved",
];

/// Where reading starts, before resolution.
#[derive(Debug, Clone, PartialEq)]
enum Start {
    Earliest,
    Latest,
    Committed,
    Timestamp(i64),
    Offsets(serde_json::Map<String, serde_json::Value>),
}

/// Where a bounded read ends (exclusive), before resolution.
#[derive(Debug, Clone, PartialEq)]
enum End {
    Unbounded,
    Latest,
    Offsets(serde_json::Map<String, serde_json::Value>),
}

/// What to do with a record that cannot be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnDecodeError {
    Fail,
    Skip,
}

/// One partition with its resolved offsets.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Resolved {
    topic: String,
    partition: i32,
    /// First offset to read.
    start: i64,
    /// Offset to stop before, for a bounded read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    end: Option<i64>,
}

/// What submission looked up: every partition of the topics, sorted, with its offsets.
#[derive(serde::Serialize, serde::Deserialize)]
struct Assignment {
    partitions: Vec<Resolved>,
}

/// Validated `kafka_source` parameters.
#[derive(Debug, Clone)]
struct Config {
    conn: Connection,
    topics: Vec<String>,
    start: Start,
    end: End,
    group_id: Option<String>,
    key_format: Option<Format>,
    value_format: Format,
    ts_field: Option<String>,
    out_of_orderness_ms: u64,
    idle_timeout: Option<Duration>,
    on_decode_error: OnDecodeError,
    /// Filled in at submission.
    resolved: Option<Vec<Resolved>>,
}

fn offsets_param(p: &Params, name: &str, raw: &serde_json::Value) -> Result<(), SpecError> {
    let obj = raw.get("offsets").and_then(|o| o.as_object());
    let ok = obj.is_some_and(|topics| {
        topics.values().all(|parts| {
            parts.as_object().is_some_and(|m| {
                m.iter()
                    .all(|(k, v)| k.parse::<i32>().is_ok() && v.as_i64().is_some_and(|o| o >= 0))
            })
        })
    });
    if ok {
        Ok(())
    } else {
        Err(p.error(
            name,
            "offsets must look like {\"offsets\": {\"<topic>\": {\"<partition>\": <offset>}}}",
        ))
    }
}

impl Config {
    fn parse(spec: &OperatorSpec) -> Result<Config, SpecError> {
        let p = Params::new(spec, PARAMS)?;
        let conn = Connection::param(&p)?;
        let topics: Vec<String> = match p.raw("topic") {
            None => return Err(p.error("topic", "is required")),
            Some(serde_json::Value::String(t)) => vec![t.clone()],
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .map(|t| t.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| p.error("topic", "must be a string or a list of strings"))?,
            Some(_) => return Err(p.error("topic", "must be a string or a list of strings")),
        };
        if topics.is_empty() || topics.iter().any(|t| t.is_empty()) {
            return Err(p.error("topic", "must name at least one topic"));
        }
        let group_id = p.str("group_id")?.map(str::to_string);
        let start = match p.raw("start") {
            None => Start::Earliest,
            Some(serde_json::Value::String(s)) => match s.as_str() {
                "earliest" => Start::Earliest,
                "latest" => Start::Latest,
                "committed" => Start::Committed,
                other => {
                    return Err(p.error(
                        "start",
                        format!(
                            "unknown start '{other}' (expected earliest, latest, committed, \
                             {{\"timestamp\": <ms>}} or {{\"offsets\": ...}})"
                        ),
                    ))
                }
            },
            Some(serde_json::Value::Object(o)) if o.contains_key("timestamp") => {
                match o.get("timestamp").and_then(|t| t.as_i64()) {
                    Some(ts) if o.len() == 1 && ts >= 0 => Start::Timestamp(ts),
                    _ => {
                        return Err(p.error(
                            "start",
                            "timestamp must be {\"timestamp\": <milliseconds since the epoch>}",
                        ));
                    }
                }
            }
            Some(raw @ serde_json::Value::Object(o)) if o.contains_key("offsets") => {
                offsets_param(&p, "start", raw)?;
                Start::Offsets(o["offsets"].as_object().cloned().unwrap_or_default())
            }
            Some(_) => return Err(p.error(
                "start",
                "must be earliest, latest, committed, {\"timestamp\": <ms>} or {\"offsets\": ...}",
            )),
        };
        if start == Start::Committed && group_id.is_none() {
            return Err(p.error(
                "group_id",
                "is required when start is 'committed' (the group whose offsets to start from)",
            ));
        }
        let end = match p.raw("end") {
            None => End::Unbounded,
            Some(serde_json::Value::String(s)) if s == "latest" => End::Latest,
            Some(raw @ serde_json::Value::Object(o)) if o.contains_key("offsets") => {
                offsets_param(&p, "end", raw)?;
                End::Offsets(o["offsets"].as_object().cloned().unwrap_or_default())
            }
            Some(_) => {
                return Err(p.error(
                    "end",
                    "must be 'latest' (stop at the offsets current at submission) or {\"offsets\": ...}",
                ))
            }
        };
        let value_format = Format::param(&p, "value_format", Format::Json)?;
        let key_format = match p.raw("key_format") {
            None => None,
            Some(_) => Some(Format::param(&p, "key_format", Format::String)?),
        };
        let ts_field = p.str("ts_field")?.map(str::to_string);
        if ts_field.is_some() && value_format != Format::Json {
            return Err(p.error("ts_field", "only applies to value_format 'json'"));
        }
        let on_decode_error = p.choice(
            "on_decode_error",
            OnDecodeError::Fail,
            &[("fail", OnDecodeError::Fail), ("skip", OnDecodeError::Skip)],
        )?;
        let resolved = p.resolved::<Assignment>()?.map(|a| a.partitions);
        Ok(Config {
            conn,
            topics,
            start,
            end,
            group_id,
            key_format,
            value_format,
            ts_field,
            out_of_orderness_ms: p.millis("out_of_orderness_ms")?.unwrap_or(0),
            idle_timeout: match p.u64("idle_timeout_ms")?.unwrap_or(10_000) {
                0 => None,
                ms => Some(Duration::from_millis(ms)),
            },
            on_decode_error,
            resolved,
        })
    }
}

/// Builds a `kafka_source` from its (resolved or not yet resolved) spec.
pub fn build(spec: &OperatorSpec) -> Result<Arc<dyn OperatorFactory>, SpecError> {
    Ok(Arc::new(Factory(Arc::new(Config::parse(spec)?))))
}

/// Looks up the partitions and concrete start/end offsets on the broker.
pub fn resolve(spec: &OperatorSpec) -> Result<serde_json::Value, SpecError> {
    let cfg = Config::parse(spec)?;
    let op = spec.id.as_str();
    let consumer = cfg.conn.admin_consumer(op, cfg.group_id.as_deref())?;
    let counts = cfg.conn.partitions(op, &consumer, &cfg.topics, "topic")?;
    let mut parts: Vec<(String, i32)> = cfg
        .topics
        .iter()
        .zip(&counts)
        .flat_map(|(t, &n)| (0..n).map(move |p| (t.clone(), p)))
        .collect();
    parts.sort();
    parts.dedup();
    let t = cfg.conn.timeout;
    let mut resolved = Vec::with_capacity(parts.len());
    // Per-partition lookups that need a round trip each.
    let list = |offset: Offset| -> Result<TopicPartitionList, SpecError> {
        let mut tpl = TopicPartitionList::new();
        for (topic, p) in &parts {
            tpl.add_partition_offset(topic, *p, offset)
                .map_err(|e| cfg.conn.unreachable(op, e))?;
        }
        Ok(tpl)
    };
    let looked_up = |tpl: TopicPartitionList, topic: &str, p: i32| -> Option<i64> {
        match tpl.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => Some(o),
            _ => None,
        }
    };
    let committed = match cfg.start {
        Start::Committed => Some(
            consumer
                .committed_offsets(list(Offset::Invalid)?, t)
                .map_err(|e| cfg.conn.unreachable(op, e))?,
        ),
        _ => None,
    };
    let by_time = match cfg.start {
        Start::Timestamp(ts) => Some(
            consumer
                .offsets_for_times(list(Offset::Offset(ts))?, t)
                .map_err(|e| cfg.conn.unreachable(op, e))?,
        ),
        _ => None,
    };
    for (topic, p) in &parts {
        let (low, high) = consumer
            .fetch_watermarks(topic, *p, t)
            .map_err(|e| cfg.conn.unreachable(op, e))?;
        let explicit = |map: &serde_json::Map<String, serde_json::Value>| {
            map.get(topic)
                .and_then(|m| m.get(p.to_string()))
                .and_then(|o| o.as_i64())
        };
        let start = match &cfg.start {
            Start::Earliest => low,
            Start::Latest => high,
            // No committed offset for the group: start at the earliest (as auto.offset.reset
            // = earliest would).
            Start::Committed => committed
                .clone()
                .and_then(|c| looked_up(c, topic, *p))
                .unwrap_or(low),
            // No record at or after the timestamp: start at the end.
            Start::Timestamp(_) => by_time
                .clone()
                .and_then(|c| looked_up(c, topic, *p))
                .unwrap_or(high),
            Start::Offsets(map) => explicit(map).unwrap_or(low),
        };
        if start < low || start > high {
            return Err(SpecError::field(
                op,
                "params.start",
                format!(
                    "offset {start} of {topic}/{p} is outside the partition's range {low}..{high}"
                ),
            ));
        }
        let end = match &cfg.end {
            End::Unbounded => None,
            End::Latest => Some(high),
            End::Offsets(map) => Some(explicit(map).unwrap_or(high)),
        };
        resolved.push(Resolved {
            topic: topic.clone(),
            partition: *p,
            start,
            end: end.map(|e| e.max(start)),
        });
    }
    let mut params = spec.params.clone();
    params["resolved"] = serde_json::json!(Assignment {
        partitions: resolved
    });
    Ok(params)
}

struct Factory(Arc<Config>);

impl OperatorFactory for Factory {
    fn instantiate(&self, ctx: &SubtaskContext) -> Result<Instance, OpError> {
        let cfg = &self.0;
        let resolved = cfg.resolved.as_ref().ok_or_else(|| {
            OpError::State(format!(
                "kafka_source '{}' has no partition assignment: jobs are resolved by the job \
                 manager at submission",
                ctx.operator
            ))
        })?;
        let now = Instant::now();
        let parts: Vec<Partition> = resolved
            .iter()
            .enumerate()
            .filter(|(i, _)| i % ctx.parallelism == ctx.subtask)
            .map(|(_, r)| Partition {
                label: format!("{}/{}", r.topic, r.partition),
                topic: r.topic.clone(),
                partition: r.partition,
                next: r.start,
                end: r.end,
                max_ts: i64::MIN,
                last_record: now,
            })
            .collect();
        let stats = Arc::new(Stats::default());
        let mut settings = CONSUMER_TUNING.to_vec();
        settings.extend([
            ("group.id", cfg.group_id.as_deref().unwrap_or("weir")),
            ("auto.offset.reset", "error"),
            // Records of aborted or still open transactions are never read.
            ("isolation.level", "read_committed"),
            ("statistics.interval.ms", "1000"),
        ]);
        let consumer: BaseConsumer<StatsContext> = cfg
            .conn
            .config(&settings)
            .create_with_context(StatsContext(stats.clone()))
            .map_err(|e| OpError::Io(format!("kafka_source '{}': {e}", ctx.operator)))?;
        Ok(Instance::Source(Box::new(KafkaSource {
            cfg: cfg.clone(),
            consumer,
            stats,
            pos: Positions {
                operator: ctx.operator.clone(),
                unfinished: parts.iter().filter(|p| !p.finished()).count(),
                parts,
                skipped: 0,
            },
            assigned: false,
        })))
    }
}

/// High watermarks per partition from librdkafka's statistics.
#[derive(Default)]
struct Stats(Mutex<Vec<(String, i32, i64)>>);

struct StatsContext(Arc<Stats>);

impl ClientContext for StatsContext {
    fn stats(&self, statistics: Statistics) {
        let highs: Vec<(String, i32, i64)> = statistics
            .topics
            .values()
            .flat_map(|t| {
                t.partitions
                    .values()
                    .filter(|p| p.partition >= 0 && p.hi_offset >= 0)
                    .map(|p| (t.topic.clone(), p.partition, p.hi_offset))
            })
            .collect();
        if let Ok(mut g) = self.0 .0.lock() {
            *g = highs;
        }
    }
}

impl ConsumerContext for StatsContext {}

/// The broker's high watermark of `p` from the latest statistics.
fn high_watermark(highs: &[(String, i32, i64)], p: &Partition) -> Option<i64> {
    highs
        .iter()
        .find(|(t, n, _)| *n == p.partition && *t == p.topic)
        .map(|h| h.2)
}

/// Records of `p` not read yet (up to its end, if bounded), from the latest statistics.
fn partition_lag(highs: &[(String, i32, i64)], p: &Partition) -> Option<i64> {
    let high = high_watermark(highs, p)?;
    Some((high.min(p.end.unwrap_or(i64::MAX)) - p.next).max(0))
}

/// One assigned partition's position.
struct Partition {
    /// `topic/partition`, for metrics and errors.
    label: String,
    topic: String,
    partition: i32,
    /// Next offset to read.
    next: i64,
    /// Offset to stop before (bounded reads).
    end: Option<i64>,
    /// Highest event time read.
    max_ts: i64,
    /// When it last produced a record (or was assigned).
    last_record: Instant,
}

impl Partition {
    fn finished(&self) -> bool {
        self.end.is_some_and(|e| self.next >= e)
    }
}

/// One subtask of a `kafka_source`.
struct KafkaSource {
    cfg: Arc<Config>,
    consumer: BaseConsumer<StatsContext>,
    stats: Arc<Stats>,
    pos: Positions,
    /// Whether the consumer is assigned at the current positions.
    assigned: bool,
}

/// What a subtask has read: kept apart from the consumer, which messages borrow.
struct Positions {
    operator: String,
    parts: Vec<Partition>,
    /// Partitions not yet at their end offset.
    unfinished: usize,
    /// Undecodable records skipped (policy `skip`).
    skipped: u64,
}

/// Snapshot of one partition: (topic, partition, next offset, highest event time).
type PartitionState = (String, i32, i64, i64);

impl KafkaSource {
    fn assign(&mut self) -> Result<(), OpError> {
        let mut tpl = TopicPartitionList::new();
        for p in self.pos.parts.iter().filter(|p| !p.finished()) {
            tpl.add_partition_offset(&p.topic, p.partition, Offset::Offset(p.next))
                .map_err(|e| self.io(e))?;
        }
        self.consumer.assign(&tpl).map_err(|e| self.io(e))?;
        self.assigned = true;
        Ok(())
    }

    fn io(&self, e: KafkaError) -> OpError {
        OpError::Io(format!(
            "kafka_source '{}' ({}): {e}",
            self.pos.operator, self.cfg.conn.bootstrap
        ))
    }
}

impl Positions {
    /// Turns one message into a record (or skips it); returns whether a record was added.
    fn on_message(
        &mut self,
        cfg: &Config,
        m: &BorrowedMessage<'_>,
        out: &mut Vec<Record>,
    ) -> Result<bool, OpError> {
        let (topic, partition, offset) = (m.topic(), m.partition(), m.offset());
        let Some(i) = self
            .parts
            .iter()
            .position(|p| p.partition == partition && p.topic == topic)
        else {
            return Ok(false);
        };
        let part = &mut self.parts[i];
        if part.finished() || offset < part.next {
            // Past a bounded read's end, or fetched again after a re-assignment.
            return Ok(false);
        }
        part.next = offset + 1;
        part.last_record = Instant::now();
        if part.finished() {
            self.unfinished -= 1;
        }
        match decode(cfg, m) {
            Ok(mut rec) => {
                if cfg.ts_field.is_none() && rec.ts == i64::MIN {
                    rec.ts = 0;
                }
                part.max_ts = part.max_ts.max(rec.ts);
                out.push(rec);
                Ok(true)
            }
            Err(why) => {
                let message = format!(
                    "kafka_source '{}': undecodable record at {topic} partition {partition} \
                     offset {offset}: {why}",
                    self.operator
                );
                match cfg.on_decode_error {
                    OnDecodeError::Fail => Err(OpError::Data(format!(
                        "{message} (set params.on_decode_error to \"skip\" to skip such records)"
                    ))),
                    OnDecodeError::Skip => {
                        self.skipped += 1;
                        if self.skipped <= 10 || self.skipped.is_power_of_two() {
                            warn!(skipped = self.skipped, "{message}; skipped");
                        }
                        Ok(false)
                    }
                }
            }
        }
    }
}

/// Decodes a message into a record: value by `value_format`, key by `key_format` (when set),
/// event time from `ts_field` or the Kafka timestamp.
fn decode(cfg: &Config, m: &BorrowedMessage<'_>) -> Result<Record, String> {
    let value = match m.payload() {
        None => Value::Null,
        Some(bytes) => cfg.value_format.decode(bytes)?,
    };
    let key = match (cfg.key_format, m.key()) {
        (Some(f), Some(k)) => Some(f.decode(k).map_err(|e| format!("key: {e}"))?),
        _ => None,
    };
    let ts = match &cfg.ts_field {
        Some(f) => value
            .get(f)
            .and_then(Value::as_int)
            .ok_or_else(|| format!("field '{f}' is missing or not an integer"))?,
        None => m.timestamp().to_millis().unwrap_or(i64::MIN),
    };
    Ok(Record { key, ts, value })
}

impl Source for KafkaSource {
    fn poll(&mut self, max: usize, out: &mut Vec<Record>) -> Result<SourcePoll, OpError> {
        if self.pos.unfinished == 0 {
            return Ok(SourcePoll::Finished);
        }
        if !self.assigned {
            self.assign()?;
        }
        let mut n = 0;
        while n < max && self.pos.unfinished > 0 {
            match self.consumer.poll(Duration::ZERO) {
                None => break,
                Some(Ok(m)) => {
                    if self.pos.on_message(&self.cfg, &m, out)? {
                        n += 1;
                    }
                }
                Some(Err(e)) if is_fatal(&e) => return Err(self.io(e)),
                Some(Err(e)) => {
                    // librdkafka retries transient errors (a broker restart) by itself.
                    warn!(error = %e, "kafka_source: transient error; retrying");
                    break;
                }
            }
        }
        if self.pos.unfinished == 0 {
            // The records read go downstream before the runner finishes.
            return Ok(if n > 0 {
                SourcePoll::Ready
            } else {
                SourcePoll::Finished
            });
        }
        Ok(if n > 0 {
            SourcePoll::Ready
        } else {
            SourcePoll::Wait(Duration::from_millis(2))
        })
    }

    fn watermark(&self) -> Option<i64> {
        let now = Instant::now();
        let highs = self.stats.0.lock().map(|g| g.clone()).unwrap_or_default();
        // Idle: nothing read for the timeout *and* nothing left to read (position at the
        // broker's high watermark). A partition the broker is slow to serve is not idle:
        // letting the watermark pass it would make its records late.
        let idle = |p: &Partition| {
            p.finished()
                || (self
                    .cfg
                    .idle_timeout
                    .is_some_and(|t| now.duration_since(p.last_record) >= t)
                    && high_watermark(&highs, p).is_some_and(|h| p.next >= h))
        };
        let mut active: Option<i64> = None;
        let mut highest: Option<i64> = None;
        for p in &self.pos.parts {
            if p.max_ts == i64::MIN {
                if idle(p) {
                    continue;
                }
                // An active partition that has read nothing yet holds the watermark back.
                return None;
            }
            highest = Some(highest.map_or(p.max_ts, |h| h.max(p.max_ts)));
            if !idle(p) {
                active = Some(active.map_or(p.max_ts, |a| a.min(p.max_ts)));
            }
        }
        active
            .or(highest)
            .map(|ts| watermark_after(ts, self.cfg.out_of_orderness_ms))
    }

    fn snapshot(&mut self) -> Result<Vec<u8>, OpError> {
        let state: Vec<PartitionState> = self
            .pos
            .parts
            .iter()
            .map(|p| (p.topic.clone(), p.partition, p.next, p.max_ts))
            .collect();
        encode_state(&state)
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), OpError> {
        let state: Vec<PartitionState> = decode_state(state)?;
        for (topic, partition, next, max_ts) in state {
            if let Some(p) = self
                .pos
                .parts
                .iter_mut()
                .find(|p| p.partition == partition && p.topic == topic)
            {
                p.next = next;
                p.max_ts = max_ts;
            }
        }
        self.pos.unfinished = self.pos.parts.iter().filter(|p| !p.finished()).count();
        self.assigned = false;
        Ok(())
    }

    fn metrics(&self) -> Vec<Metric> {
        let highs = self.stats.0.lock().map(|g| g.clone()).unwrap_or_default();
        let mut out = Vec::with_capacity(2 * self.pos.parts.len() + 2);
        let mut total_lag = 0;
        for p in &self.pos.parts {
            out.push(Metric::part("offset", p.label.clone(), p.next));
            if let Some(lag) = partition_lag(&highs, p) {
                total_lag += lag;
                out.push(Metric::part("lag", p.label.clone(), lag));
            }
        }
        out.push(Metric::total("lag", total_lag));
        out.push(Metric::total("skipped_records", self.pos.skipped as i64));
        out
    }

    fn lag(&self) -> Option<u64> {
        // Known once the client's statistics gave every partition's high watermark.
        let highs = self.stats.0.lock().ok()?;
        self.pos
            .parts
            .iter()
            .map(|p| partition_lag(&highs, p).map(|l| l as u64))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::testing::build_error;

    fn err(params: &str) -> SpecError {
        build_error(&format!(
            r#"{{"id": "in", "kind": "kafka_source", "params": {params}}}"#
        ))
    }

    #[test]
    fn params_are_validated_with_the_field_named() {
        let e = err(r#"{"topic": "t"}"#);
        assert_eq!(e.field.as_deref(), Some("params.bootstrap_servers"));
        let e = err(r#"{"bootstrap_servers": "h:1"}"#);
        assert_eq!(e.field.as_deref(), Some("params.topic"));
        let e = err(r#"{"bootstrap_servers": "h:1", "topic": "t", "start": "newest"}"#);
        assert_eq!(e.field.as_deref(), Some("params.start"));
        assert!(e.message.contains("newest"), "{e}");
        let e = err(r#"{"bootstrap_servers": "h:1", "topic": "t", "start": "committed"}"#);
        assert_eq!(e.field.as_deref(), Some("params.group_id"));
        let e = err(
            r#"{"bootstrap_servers": "h:1", "topic": "t", "start": {"offsets": {"t": {"x": 1}}}}"#,
        );
        assert_eq!(e.field.as_deref(), Some("params.start"));
        let e = err(r#"{"bootstrap_servers": "h:1", "topic": "t", "value_format": "avro"}"#);
        assert_eq!(e.field.as_deref(), Some("params.value_format"));
        let e = err(r#"{"bootstrap_servers": "h:1", "topic": "t", "on_decode_error": "ignore"}"#);
        assert_eq!(e.field.as_deref(), Some("params.on_decode_error"));
        let e = err(
            r#"{"bootstrap_servers": "h:1", "topic": "t", "value_format": "string", "ts_field": "ts"}"#,
        );
        assert_eq!(e.field.as_deref(), Some("params.ts_field"));
        let e = err(r#"{"bootstrap_servers": "h:1", "topic": "t", "resolved": 3}"#);
        assert_eq!(e.field.as_deref(), Some("params.resolved"));
    }

    #[test]
    fn unreachable_broker_rejects_the_submission_naming_the_address() {
        let spec: OperatorSpec = serde_json::from_str(
            r#"{"id": "in", "kind": "kafka_source",
                "params": {"bootstrap_servers": "127.0.0.1:1", "topic": "t", "timeout_ms": 500}}"#,
        )
        .unwrap();
        let e = resolve(&spec).unwrap_err();
        assert_eq!(e.operator.as_deref(), Some("in"));
        assert_eq!(e.field.as_deref(), Some("params.bootstrap_servers"));
        assert!(e.message.contains("127.0.0.1:1"), "{e}");
    }
}
