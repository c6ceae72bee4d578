//! Sources: `generator` (deterministic synthetic data) and `file_source` (lines / JSON lines).
//!
//! The generator is a pure function of (seed, global index): record `i` of subtask `s` of `p`
//! has global index `g = i * p + s`, and its key, payload and event time depend only on the
//! seed and `g`. So any range can be regenerated exactly (a restored source rewinds by
//! setting `i`), and the ground truth of a test can be computed without running the engine.

use std::io::{BufRead, BufReader};
use std::sync::Arc;
use std::time::Duration;

use super::{
    decode_state, encode_state, Instance, OpError, OperatorFactory, Params, Source, SourcePoll,
    SubtaskContext,
};
use crate::record::Record;
use crate::spec::{OperatorSpec, SpecError};
use crate::telemetry::now_us;
use crate::value::{mix64, Value};

/// A source's watermark once it has read event time `max_ts` and records may arrive up to
/// `out_of_orderness_ms` out of order: every later record is newer than it (a record at the
/// watermark would be late). Saturates at the start of time; the bound on durations
/// ([`MAX_DURATION_MS`](super::MAX_DURATION_MS)) keeps the lag within i64.
pub(crate) fn watermark_after(max_ts: i64, out_of_orderness_ms: u64) -> i64 {
    max_ts.saturating_sub(out_of_orderness_ms as i64 + 1)
}

/// What the generator's records carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    /// `value` is an int in `0..keys`.
    Numbers,
    /// `value` is a word string (one of `keys` words).
    Words,
    /// `value` is `{"line": "w1 w2 ..."}` with 1..=`words_per_line` words.
    Lines,
    /// `value` is `{"id", "user", "kind", "amount"}`, `user` one of `keys` users.
    Events,
}

/// Validated generator parameters; also the ground-truth function for tests.
#[derive(Debug, Clone)]
pub struct GeneratorConfig {
    /// Seed of every pseudo-random choice.
    pub seed: u64,
    /// Total records over all subtasks; `None` = unbounded.
    pub count: Option<u64>,
    /// Total records per second over all subtasks; `None` = as fast as possible.
    pub rate: Option<u64>,
    /// Key cardinality (distinct numbers, words or users).
    pub keys: u64,
    /// Payload kind.
    pub payload: Payload,
    /// Event time of global record 0.
    pub start_ts: i64,
    /// Event-time density: records per second of event time (over all subtasks).
    pub events_per_second: u64,
    /// Records' event times are up to this many ms earlier than in-order.
    pub disorder_ms: u64,
    /// Watermark lag behind the highest event time seen.
    pub out_of_orderness_ms: u64,
    /// Maximum words per line (`lines` payload).
    pub words_per_line: u64,
}

const VOCABULARY: [&str; 64] = [
    "the",
    "stream",
    "flows",
    "over",
    "weir",
    "and",
    "water",
    "river",
    "data",
    "record",
    "window",
    "key",
    "event",
    "time",
    "late",
    "early",
    "barrier",
    "snapshot",
    "cache",
    "actor",
    "task",
    "job",
    "manager",
    "count",
    "sum",
    "min",
    "max",
    "join",
    "left",
    "right",
    "source",
    "sink",
    "map",
    "filter",
    "state",
    "log",
    "replay",
    "offset",
    "kafka",
    "topic",
    "partition",
    "batch",
    "credit",
    "channel",
    "seq",
    "watermark",
    "slot",
    "heartbeat",
    "failure",
    "recovery",
    "exactly",
    "once",
    "fast",
    "slow",
    "bounded",
    "memory",
    "disk",
    "network",
    "frame",
    "graph",
    "chain",
    "edge",
    "node",
    "tree",
];
const EVENT_KINDS: [&str; 3] = ["view", "click", "purchase"];

impl GeneratorConfig {
    /// Validates a `generator` spec's params.
    pub fn from_spec(spec: &OperatorSpec) -> Result<GeneratorConfig, SpecError> {
        let p = Params::new(
            spec,
            &[
                "seed",
                "count",
                "rate",
                "keys",
                "payload",
                "start_ts",
                "events_per_second",
                "disorder_ms",
                "out_of_orderness_ms",
                "words_per_line",
            ],
        )?;
        let payload = match p.str("payload")?.unwrap_or("numbers") {
            "numbers" => Payload::Numbers,
            "words" => Payload::Words,
            "lines" => Payload::Lines,
            "events" => Payload::Events,
            other => {
                return Err(p.error(
                    "payload",
                    format!("unknown payload '{other}' (expected numbers, words, lines or events)"),
                ))
            }
        };
        let disorder_ms = p.millis("disorder_ms")?.unwrap_or(0);
        Ok(GeneratorConfig {
            seed: p.u64("seed")?.unwrap_or(0),
            count: p.u64("count")?,
            rate: p.positive("rate")?,
            keys: p.positive("keys")?.unwrap_or(1000),
            payload,
            start_ts: p.i64("start_ts")?.unwrap_or(0),
            events_per_second: p.positive("events_per_second")?.unwrap_or(1000),
            disorder_ms,
            out_of_orderness_ms: p.millis("out_of_orderness_ms")?.unwrap_or(disorder_ms),
            words_per_line: p.positive("words_per_line")?.unwrap_or(8),
        })
    }

    #[inline]
    fn rand(&self, g: u64, salt: u64) -> u64 {
        mix64(self.seed ^ g.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ salt)
    }

    /// Event time of global record `g`.
    #[inline]
    pub fn ts(&self, g: u64) -> i64 {
        self.in_order_ts(g).wrapping_sub(self.jitter(g))
    }

    /// How much earlier than in order record `g` is (`0..=disorder_ms`).
    #[inline]
    fn jitter(&self, g: u64) -> i64 {
        if self.disorder_ms == 0 {
            0
        } else {
            below(self.rand(g, 0xd150), self.disorder_ms + 1) as i64
        }
    }

    /// Event time of record `g` without disorder: `start_ts + floor(g * 1000 / eps)`.
    #[inline]
    fn in_order_ts(&self, g: u64) -> i64 {
        // u64 arithmetic unless g * 1000 overflows (it does not below 1.8e16 records).
        let offset = match g.checked_mul(1000) {
            Some(ms) => ms / self.events_per_second,
            None => (g as u128 * 1000 / self.events_per_second as u128) as u64,
        };
        self.start_ts.wrapping_add(offset as i64)
    }

    fn word(&self, idx: u64) -> Value {
        let n = VOCABULARY.len() as u64;
        if idx < n {
            Value::str(VOCABULARY[idx as usize])
        } else {
            Value::from(format!("{}{}", VOCABULARY[(idx % n) as usize], idx / n))
        }
    }

    /// Payload of global record `g`.
    #[inline]
    pub fn value(&self, g: u64) -> Value {
        let r = self.rand(g, 0x7a1e);
        match self.payload {
            Payload::Numbers => Value::Int(below(r, self.keys) as i64),
            Payload::Words => self.word(below(r, self.keys)),
            Payload::Lines => {
                let words = 1 + below(r, self.words_per_line);
                let mut line = String::new();
                for w in 0..words {
                    if w > 0 {
                        line.push(' ');
                    }
                    if let Value::Str(s) = self.word(below(self.rand(g, w + 1), self.keys)) {
                        line.push_str(&s);
                    }
                }
                Value::map([("line", Value::from(line))])
            }
            Payload::Events => Value::map([
                ("id", Value::Int(g as i64)),
                ("user", Value::from(format!("user-{}", below(r, self.keys)))),
                (
                    "kind",
                    Value::str(EVENT_KINDS[below(self.rand(g, 1), 3) as usize]),
                ),
                ("amount", Value::Int(1 + below(self.rand(g, 2), 100) as i64)),
            ]),
        }
    }

    /// Global record `g` exactly as the generator emits it.
    pub fn record(&self, g: u64) -> Record {
        Record::new(self.ts(g), self.value(g))
    }

    /// The records of subtask `s` of `p` from local index `from` on, computing event times
    /// incrementally (no division per record). Yields exactly `record(i * p + s)`.
    pub fn iter(&self, s: u64, p: u64, from: u64) -> GeneratorIter<'_> {
        let g = from * p + s;
        let eps = self.events_per_second as u128;
        let scaled = g as u128 * 1000;
        let step = p as u128 * 1000;
        GeneratorIter {
            cfg: self,
            g,
            p,
            offset: (scaled / eps) as u64,
            rem: (scaled % eps) as u64,
            step_offset: (step / eps) as u64,
            step_rem: (step % eps) as u64,
        }
    }

    /// Number of records subtask `s` of `p` emits when `count` is set.
    pub fn subtask_count(&self, s: u64, p: u64) -> Option<u64> {
        self.count
            .map(|c| if c > s { (c - s).div_ceil(p) } else { 0 })
    }
}

/// `r` reduced to `0..n` by multiply-shift (Lemire): uniform for a 64-bit random `r`, and
/// no division on the per-record path.
#[inline]
fn below(r: u64, n: u64) -> u64 {
    ((r as u128 * n as u128) >> 64) as u64
}

/// Records of one subtask in order; see [`GeneratorConfig::iter`].
pub struct GeneratorIter<'a> {
    cfg: &'a GeneratorConfig,
    /// Global index of the next record.
    g: u64,
    p: u64,
    /// `floor(g * 1000 / eps)` and its remainder, advanced by `p * 1000` per record.
    offset: u64,
    rem: u64,
    step_offset: u64,
    step_rem: u64,
}

impl Iterator for GeneratorIter<'_> {
    type Item = Record;

    #[inline]
    fn next(&mut self) -> Option<Record> {
        let cfg = self.cfg;
        let g = self.g;
        let ts = cfg
            .start_ts
            .wrapping_add(self.offset as i64)
            .wrapping_sub(cfg.jitter(g));
        self.g += self.p;
        self.offset += self.step_offset;
        self.rem += self.step_rem;
        if self.rem >= cfg.events_per_second {
            self.rem -= cfg.events_per_second;
            self.offset += 1;
        }
        Some(Record::new(ts, cfg.value(g)))
    }
}

/// Builds a `generator` from its spec.
pub fn build_generator(spec: &OperatorSpec) -> Result<Arc<dyn OperatorFactory>, SpecError> {
    Ok(Arc::new(GeneratorConfig::from_spec(spec)?))
}

impl OperatorFactory for GeneratorConfig {
    fn instantiate(&self, ctx: &SubtaskContext) -> Result<Instance, OpError> {
        let (s, p) = (ctx.subtask as u64, ctx.parallelism as u64);
        Ok(Instance::Source(Box::new(Generator {
            limit: self.subtask_count(s, p),
            per_second: self.rate.map(|r| (r as f64 / p as f64).max(1e-3)),
            cfg: self.clone(),
            s,
            p,
            next: 0,
            max_ts: i64::MIN,
            feed_start_us: None,
        })))
    }
}

/// One subtask of a generator.
struct Generator {
    cfg: GeneratorConfig,
    /// This subtask's index and the parallelism: local record `i` is global `i * p + s`.
    s: u64,
    p: u64,
    /// Next local index to emit; the whole position.
    next: u64,
    limit: Option<u64>,
    /// Records per second for this subtask.
    per_second: Option<f64>,
    max_ts: i64,
    /// With a rate: when (µs since the Unix epoch) local record 0 was published by the
    /// feed the generator stands for; record `i` is published `i / per_second` later. Part
    /// of the state, so a restored generator finds the records published while it was down
    /// waiting, as a Kafka consumer would, and reads them as fast as the job takes them.
    feed_start_us: Option<u64>,
}

impl Generator {
    /// Appends the `n` records from the position and moves past them.
    fn emit(&mut self, n: u64, out: &mut Vec<Record>) {
        out.reserve(n as usize);
        let mut max_ts = self.max_ts;
        for rec in self.cfg.iter(self.s, self.p, self.next).take(n as usize) {
            max_ts = max_ts.max(rec.ts);
            out.push(rec);
        }
        self.max_ts = max_ts;
        self.next += n;
    }
}

/// Records a feed publishing `rate` per second since `start_us` has published by `now_us`
/// (the first at `start_us`).
fn published(start_us: u64, now_us: u64, rate: f64) -> u64 {
    (now_us.saturating_sub(start_us) as f64 / 1e6 * rate) as u64 + 1
}

impl Source for Generator {
    fn poll(&mut self, max: usize, out: &mut Vec<Record>) -> Result<SourcePoll, OpError> {
        let mut n = max as u64;
        if let Some(limit) = self.limit {
            if self.next >= limit {
                return Ok(SourcePoll::Finished);
            }
            n = n.min(limit - self.next);
        }
        if let Some(rate) = self.per_second {
            let now = now_us();
            let next = self.next;
            // A fresh generator's feed starts now (with its next record).
            let start = *self
                .feed_start_us
                .get_or_insert_with(|| now.saturating_sub((next as f64 / rate * 1e6) as u64));
            let budget = published(start, now, rate).saturating_sub(self.next);
            if budget == 0 {
                // The next record is published within 1 / rate.
                let due = (1.0 / rate).clamp(0.0005, 0.1);
                return Ok(SourcePoll::Wait(Duration::from_secs_f64(due)));
            }
            n = n.min(budget);
        }
        self.emit(n, out);
        Ok(SourcePoll::Ready)
    }

    fn replayable(&self) -> bool {
        true
    }

    fn regenerate(&mut self, n: usize, out: &mut Vec<Record>) -> Result<(), OpError> {
        let n = n as u64;
        if let Some(limit) = self.limit.filter(|l| self.next.saturating_add(n) > *l) {
            return Err(OpError::State(format!(
                "regenerating {n} records from local index {} passes the count {limit}",
                self.next
            )));
        }
        self.emit(n, out);
        Ok(())
    }

    fn watermark(&self) -> Option<i64> {
        (self.max_ts != i64::MIN)
            .then(|| watermark_after(self.max_ts, self.cfg.out_of_orderness_ms))
    }

    fn snapshot(&mut self) -> Result<Vec<u8>, OpError> {
        encode_state(&(self.next, self.max_ts, self.feed_start_us))
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), OpError> {
        (self.next, self.max_ts, self.feed_start_us) = decode_state(state)?;
        Ok(())
    }

    fn lag(&self) -> Option<u64> {
        let rate = self.per_second?;
        let start = self.feed_start_us?;
        let published = published(start, now_us(), rate);
        Some(
            self.limit
                .map_or(published, |l| published.min(l))
                .saturating_sub(self.next),
        )
    }
}

/// Line format of a file source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileFormat {
    /// Each line becomes `{"line": text}`.
    Lines,
    /// Each line is parsed as JSON into the record value.
    Json,
}

/// Validated `file_source` parameters.
#[derive(Debug, Clone)]
struct FileSourceConfig {
    path: String,
    format: FileFormat,
    ts_field: Option<String>,
    out_of_orderness_ms: u64,
}

/// Builds a `file_source` from its spec.
pub fn build_file_source(spec: &OperatorSpec) -> Result<Arc<dyn OperatorFactory>, SpecError> {
    let p = Params::new(spec, &["path", "format", "ts_field", "out_of_orderness_ms"])?;
    let format = p.choice(
        "format",
        FileFormat::Lines,
        &[("lines", FileFormat::Lines), ("json", FileFormat::Json)],
    )?;
    let ts_field = p.str("ts_field")?.map(str::to_string);
    if ts_field.is_some() && format != FileFormat::Json {
        return Err(p.error("ts_field", "only applies to format 'json'"));
    }
    Ok(Arc::new(FileSourceConfig {
        path: p.required_str("path")?.to_string(),
        format,
        ts_field,
        out_of_orderness_ms: p.millis("out_of_orderness_ms")?.unwrap_or(0),
    }))
}

impl OperatorFactory for FileSourceConfig {
    fn instantiate(&self, ctx: &SubtaskContext) -> Result<Instance, OpError> {
        let file = std::fs::File::open(&self.path).map_err(|e| {
            OpError::Io(format!("cannot open file_source path '{}': {e}", self.path))
        })?;
        Ok(Instance::Source(Box::new(FileSource {
            cfg: self.clone(),
            reader: BufReader::new(file),
            s: ctx.subtask as u64,
            p: ctx.parallelism as u64,
            line_no: 0,
            max_ts: i64::MIN,
            buf: String::new(),
        })))
    }
}

/// One subtask of a file source: reads lines `s, s + p, s + 2p, ...`.
///
/// Reads are blocking but from a local file into a buffered reader, one batch per poll.
struct FileSource {
    cfg: FileSourceConfig,
    reader: BufReader<std::fs::File>,
    s: u64,
    p: u64,
    /// Lines read so far (all subtasks' lines); the position.
    line_no: u64,
    max_ts: i64,
    buf: String,
}

impl FileSource {
    fn parse(&self, line: &str, n: u64) -> Result<Record, OpError> {
        match self.cfg.format {
            FileFormat::Lines => Ok(Record::new(
                n as i64,
                Value::map([("line", Value::str(line))]),
            )),
            FileFormat::Json => {
                let j: serde_json::Value = serde_json::from_str(line).map_err(|e| {
                    OpError::Data(format!("{}:{}: invalid JSON: {e}", self.cfg.path, n + 1))
                })?;
                let value = Value::from(&j);
                let ts = match &self.cfg.ts_field {
                    None => n as i64,
                    Some(f) => value.get(f).and_then(Value::as_int).ok_or_else(|| {
                        OpError::Data(format!(
                            "{}:{}: field '{f}' is missing or not an integer",
                            self.cfg.path,
                            n + 1
                        ))
                    })?,
                };
                Ok(Record::new(ts, value))
            }
        }
    }

    /// Reads the next line into `buf`; false at end of file.
    fn read_line(&mut self) -> Result<bool, OpError> {
        self.buf.clear();
        let n = self
            .reader
            .read_line(&mut self.buf)
            .map_err(|e| OpError::Io(format!("reading '{}': {e}", self.cfg.path)))?;
        Ok(n > 0)
    }
}

impl Source for FileSource {
    fn poll(&mut self, max: usize, out: &mut Vec<Record>) -> Result<SourcePoll, OpError> {
        let mut produced = 0;
        while produced < max {
            if !self.read_line()? {
                return Ok(if produced == 0 {
                    SourcePoll::Finished
                } else {
                    SourcePoll::Ready
                });
            }
            let n = self.line_no;
            self.line_no += 1;
            if n % self.p != self.s {
                continue;
            }
            let line = self.buf.trim_end_matches(['\n', '\r']);
            if line.is_empty() && self.cfg.format == FileFormat::Json {
                continue;
            }
            let rec = self.parse(line, n)?;
            self.max_ts = self.max_ts.max(rec.ts);
            out.push(rec);
            produced += 1;
        }
        Ok(SourcePoll::Ready)
    }

    fn watermark(&self) -> Option<i64> {
        (self.max_ts != i64::MIN)
            .then(|| watermark_after(self.max_ts, self.cfg.out_of_orderness_ms))
    }

    fn snapshot(&mut self) -> Result<Vec<u8>, OpError> {
        encode_state(&(self.line_no, self.max_ts))
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), OpError> {
        let (line_no, max_ts): (u64, i64) = decode_state(state)?;
        let file = std::fs::File::open(&self.cfg.path)
            .map_err(|e| OpError::Io(format!("cannot reopen '{}': {e}", self.cfg.path)))?;
        self.reader = BufReader::new(file);
        self.line_no = 0;
        while self.line_no < line_no {
            if !self.read_line()? {
                return Err(OpError::State(format!(
                    "'{}' is shorter than the restored position",
                    self.cfg.path
                )));
            }
            self.line_no += 1;
        }
        self.max_ts = max_ts;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::testing::{build_error, source};
    use std::time::Instant;

    fn drain(src: &mut dyn Source, batch: usize) -> Vec<Record> {
        let mut out = Vec::new();
        while src.poll(batch, &mut out).unwrap() != SourcePoll::Finished {}
        out
    }

    /// Ensures that record i of subtask s depends only on seed, s and i: two instances,
    /// different batch sizes, same records; and subtasks partition the global sequence.
    #[test]
    fn generator_is_deterministic_and_partitioned() {
        let spec = r#"{"id":"g","kind":"generator","params":{"seed":7,"count":1001,"payload":"events","keys":10}}"#;
        let a = drain(source(spec, 1, 3).as_mut(), 7);
        let b = drain(source(spec, 1, 3).as_mut(), 100);
        assert_eq!(a, b);
        assert_eq!(a.len(), 334);
        let all: usize = (0..3)
            .map(|s| drain(source(spec, s, 3).as_mut(), 64).len())
            .sum();
        assert_eq!(all, 1001);
        // Global index 3*i+1: the same record a single subtask would emit at that index.
        let single = drain(source(spec, 0, 1).as_mut(), 1000);
        assert_eq!(a[5], single[3 * 5 + 1]);
        assert_eq!(a[5].value.get("id"), Some(&Value::Int(16)));
    }

    /// Ensures the incremental iterator yields exactly `record(g)`, for odd densities and
    /// parallelisms where the event-time remainder carries.
    #[test]
    fn iterator_matches_record() {
        for (eps, p, disorder) in [
            (1000u64, 1u64, 0u64),
            (7, 3, 0),
            (1_000_000, 2, 5),
            (333, 5, 40),
        ] {
            let spec = format!(
                r#"{{"id":"g","kind":"generator","params":{{"events_per_second":{eps},"disorder_ms":{disorder},"start_ts":-50}}}}"#
            );
            let s: OperatorSpec = serde_json::from_str(&spec).unwrap();
            let cfg = GeneratorConfig::from_spec(&s).unwrap();
            for sub in 0..p {
                let got: Vec<Record> = cfg.iter(sub, p, 17).take(500).collect();
                let want: Vec<Record> = (17..517).map(|i| cfg.record(i * p + sub)).collect();
                assert_eq!(got, want, "eps {eps} p {p}");
            }
        }
    }

    #[test]
    fn generator_payloads() {
        let mk = |payload: &str| {
            let spec = format!(
                r#"{{"id":"g","kind":"generator","params":{{"count":50,"payload":"{payload}","keys":5}}}}"#
            );
            drain(source(&spec, 0, 1).as_mut(), 16)
        };
        assert!(mk("numbers")
            .iter()
            .all(|r| matches!(r.value, Value::Int(0..=4))));
        let words = mk("words");
        let distinct: std::collections::BTreeSet<_> =
            words.iter().map(|r| r.value.clone()).collect();
        assert!(distinct.len() <= 5 && distinct.len() >= 2);
        assert!(mk("lines")
            .iter()
            .all(|r| r.value.get("line").and_then(Value::as_str).is_some()));
        let ev = mk("events");
        assert!(ev
            .iter()
            .all(|r| r.value.get("user").is_some() && r.value.get("amount").is_some()));
        // Event time: 1000 events per second by default -> ts == global index.
        assert_eq!(ev[10].ts, 10);
    }

    #[test]
    fn generator_disorder_and_watermark() {
        let spec = r#"{"id":"g","kind":"generator","params":{"count":5000,"disorder_ms":20,"out_of_orderness_ms":20}}"#;
        let mut g = source(spec, 0, 1);
        let mut out = Vec::new();
        let mut late = 0;
        while g.poll(100, &mut out).unwrap() != SourcePoll::Finished {
            let wm = g.watermark().unwrap();
            let mut next = Vec::new();
            if g.poll(100, &mut next).unwrap() == SourcePoll::Finished {
                break;
            }
            late += next.iter().filter(|r| r.ts <= wm).count();
            out.extend(next);
        }
        assert_eq!(
            late, 0,
            "bounded disorder within out_of_orderness must never be late"
        );
        assert!(
            out.windows(2).any(|w| w[1].ts < w[0].ts),
            "records are out of order"
        );
    }

    #[test]
    fn generator_rate_limits() {
        let spec = r#"{"id":"g","kind":"generator","params":{"rate":1000}}"#;
        let mut g = source(spec, 0, 1);
        let mut out = Vec::new();
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(100) {
            match g.poll(1000, &mut out).unwrap() {
                SourcePoll::Wait(d) => std::thread::sleep(d),
                SourcePoll::Ready => {}
                SourcePoll::Finished => unreachable!("unbounded"),
            }
        }
        // 1000/s for ~0.1 s: far below an unthrottled poll of 1000 per call.
        assert!(out.len() < 400, "{} records", out.len());
        assert!(out.len() >= 50, "{} records", out.len());
        assert!(g.lag().unwrap() < 50, "keeps up: lag {:?}", g.lag());
    }

    #[test]
    fn restored_generator_reads_the_records_published_while_it_was_down() {
        let spec = r#"{"id":"g","kind":"generator","params":{"rate":10000}}"#;
        let mut g = source(spec, 0, 1);
        let mut out = Vec::new();
        g.poll(10, &mut out).unwrap();
        let state = g.snapshot().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let mut h = source(spec, 0, 1);
        h.restore(&state).unwrap();
        // About 2,000 records were published during the 200 ms: a backlog, read at once.
        let lag = h.lag().unwrap();
        assert!((1500..4000).contains(&lag), "lag {lag}");
        out.clear();
        assert_eq!(h.poll(1000, &mut out).unwrap(), SourcePoll::Ready);
        assert_eq!(out.len(), 1000, "a full batch without waiting");
        assert!(h.lag().unwrap() < lag);
    }

    #[test]
    fn generator_regenerates_its_polls_from_a_restored_position() {
        let spec = r#"{"id":"g","kind":"generator","params":{"rate":5000,"count":900}}"#;
        let mut g = source(spec, 1, 2);
        assert!(g.replayable());
        let state = g.snapshot().unwrap();
        let (mut polled, mut counts) = (Vec::new(), Vec::new());
        let start = Instant::now();
        while polled.len() < 300 && start.elapsed() < Duration::from_secs(5) {
            let before = polled.len();
            if let SourcePoll::Wait(d) = g.poll(64, &mut polled).unwrap() {
                std::thread::sleep(d);
            }
            counts.push(polled.len() - before);
        }
        // Regenerated at once, whatever the pace the polls had: the same records.
        let mut h = source(spec, 1, 2);
        h.restore(&state).unwrap();
        let mut again = Vec::new();
        for n in counts {
            h.regenerate(n, &mut again).unwrap();
        }
        assert_eq!(again, polled);
        assert_eq!(h.watermark(), g.watermark());
        // Past the count: a named error, nothing emitted.
        let err = h.regenerate(451, &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("passes the count 450"), "{err}");
    }

    #[test]
    fn generator_snapshot_rewinds() {
        let spec = r#"{"id":"g","kind":"generator","params":{"count":300,"payload":"words"}}"#;
        let mut g = source(spec, 0, 2);
        let mut first = Vec::new();
        g.poll(40, &mut first).unwrap();
        let state = g.snapshot().unwrap();
        let rest = drain(g.as_mut(), 33);
        let mut h = source(spec, 0, 2);
        h.restore(&state).unwrap();
        assert_eq!(drain(h.as_mut(), 50), rest);
        assert_eq!(first.len() + rest.len(), 150);
    }

    #[test]
    fn generator_rejects_bad_params() {
        let e = build_error(r#"{"id":"g","kind":"generator","params":{"payload":"pictures"}}"#);
        assert_eq!(
            (e.operator.as_deref(), e.field.as_deref()),
            (Some("g"), Some("params.payload"))
        );
        let e = build_error(r#"{"id":"g","kind":"generator","params":{"keys":0}}"#);
        assert_eq!(e.field.as_deref(), Some("params.keys"));
        let e = build_error(r#"{"id":"g","kind":"generator","params":{"rate":"fast"}}"#);
        assert_eq!(e.field.as_deref(), Some("params.rate"));
        let e = build_error(r#"{"id":"g","kind":"generator","params":{"colour":1}}"#);
        assert_eq!(e.field.as_deref(), Some("params.colour"));
    }

    #[test]
    fn file_source_lines_json_and_restore() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.jsonl");
        let lines: Vec<String> = (0..25)
            .map(|i| format!(r#"{{"n":{i},"t":{}}}"#, 100 + i))
            .collect();
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        let spec = format!(
            r#"{{"id":"f","kind":"file_source","params":{{"path":"{}","format":"json","ts_field":"t"}}}}"#,
            path.display()
        );
        let all0 = drain(source(&spec, 0, 2).as_mut(), 4);
        let all1 = drain(source(&spec, 1, 2).as_mut(), 4);
        assert_eq!(all0.len() + all1.len(), 25);
        assert_eq!(all0[1].value.get("n"), Some(&Value::Int(2)));
        assert_eq!(all1[0].ts, 101);

        let mut a = source(&spec, 0, 2);
        let mut out = Vec::new();
        a.poll(3, &mut out).unwrap();
        let snap = a.snapshot().unwrap();
        let mut b = source(&spec, 0, 2);
        b.restore(&snap).unwrap();
        out.extend(drain(b.as_mut(), 5));
        assert_eq!(out, all0);

        let txt = dir.path().join("in.txt");
        std::fs::write(&txt, "hello world\nsecond line\n").unwrap();
        let spec = format!(
            r#"{{"id":"f","kind":"file_source","params":{{"path":"{}"}}}}"#,
            txt.display()
        );
        let recs = drain(source(&spec, 0, 1).as_mut(), 10);
        assert_eq!(recs[1].value.get("line"), Some(&Value::str("second line")));
    }

    #[test]
    fn file_source_bad_json_names_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.jsonl");
        std::fs::write(&path, "{\"a\":1}\n{oops\n").unwrap();
        let spec = format!(
            r#"{{"id":"f","kind":"file_source","params":{{"path":"{}","format":"json"}}}}"#,
            path.display()
        );
        let mut s = source(&spec, 0, 1);
        let err = s.poll(10, &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("bad.jsonl:2"), "{err}");
    }
}
