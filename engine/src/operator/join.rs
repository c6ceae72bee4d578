//! `join`: a windowed inner join of two keyed inputs (input 0 = left, input 1 = right).
//!
//! Records of both sides are buffered per tumbling event-time window and key. When the
//! watermark passes the window's end, every (left, right) pair with equal keys is emitted as
//! `{key, window_start, window_end, left, right}` with `ts = end - 1`, keys in order and pairs
//! in arrival order. Records for a window that already fired are dropped and counted.
//!
//! The buffers only grow until their window fires, so an incremental snapshot carries the
//! records appended since the previous snapshot, per window, side and key: its size follows
//! the input since then, not the records buffered.

use std::sync::Arc;

use rustc_hash::FxHashMap;

use super::{
    decode_state, encode_state, Instance, Metric, OpError, Operator, OperatorFactory, Params,
    SubtaskContext,
};
use crate::codec::MAX_VALUE_DEPTH;
use crate::record::Record;
use crate::spec::{OperatorSpec, SpecError};
use crate::value::Value;

use super::window::{window_end, window_start, WindowKind};

/// A validated `join`.
struct JoinFactory {
    size: i64,
}

/// Builds a `join`. Only tumbling windows are supported.
pub fn build(spec: &OperatorSpec) -> Result<Arc<dyn OperatorFactory>, SpecError> {
    let p = Params::new(spec, &["window"])?;
    match WindowKind::parse(&p)? {
        WindowKind::Tumbling { size } => Ok(Arc::new(JoinFactory { size })),
        _ => Err(p.error("window", "join supports tumbling_ms windows only")),
    }
}

impl OperatorFactory for JoinFactory {
    fn instantiate(&self, _ctx: &SubtaskContext) -> Result<Instance, OpError> {
        Ok(Instance::Operator(Box::new(Join {
            size: self.size,
            wm: i64::MIN,
            windows: Vec::new(),
            late_dropped: 0,
        })))
    }
}

/// Buffered records of one window: per side, per key, in arrival order.
#[derive(Default)]
struct JoinWindow {
    start: i64,
    sides: [FxHashMap<Value, Buffer>; 2],
    /// Per side, the keys with records appended since the last snapshot.
    appended: [Vec<Value>; 2],
}

/// One key's records on one side of a window.
#[derive(Default)]
struct Buffer {
    records: Vec<Record>,
    /// How many of them the last snapshot holds.
    snapshotted: usize,
}

/// Per key (sorted), records of one side.
type SideState = Vec<(Value, Vec<Record>)>;

/// What an incremental snapshot holds: the records appended since the previous snapshot,
/// and which windows are still open (the others fired meanwhile).
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct JoinChanges {
    wm: i64,
    late_dropped: u64,
    /// Starts of every open window, sorted.
    open: Vec<i64>,
    /// Per window with new records: its start and the records appended to each side.
    windows: Vec<(i64, SideState, SideState)>,
}

/// Snapshot form: windows with sides sorted by key.
#[derive(Debug, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct JoinState {
    wm: i64,
    late_dropped: u64,
    windows: Vec<(i64, SideState, SideState)>,
}

/// One subtask of a `join`.
struct Join {
    size: i64,
    wm: i64,
    /// Open windows sorted by start.
    windows: Vec<JoinWindow>,
    late_dropped: u64,
}

impl JoinWindow {
    /// The window as a snapshot holds it; it is unchanged from here on.
    fn take_all(&mut self) -> (i64, SideState, SideState) {
        let [left, right] = self.sides.each_mut().map(|side| {
            let mut v: SideState = side
                .iter_mut()
                .map(|(k, b)| {
                    b.snapshotted = b.records.len();
                    (k.clone(), b.records.clone())
                })
                .collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        });
        self.appended = Default::default();
        (self.start, left, right)
    }

    /// The records appended since the last snapshot, per side and key (sorted); they are
    /// in a snapshot from here on.
    fn take_appended(&mut self) -> (i64, SideState, SideState) {
        let sides = &mut self.sides;
        let [left, right] = [0, 1].map(|side| {
            let mut keys = std::mem::take(&mut self.appended[side]);
            keys.sort_unstable();
            keys.into_iter()
                .filter_map(|k| {
                    let b = sides[side].get_mut(&k)?;
                    let new = b.records[b.snapshotted..].to_vec();
                    b.snapshotted = b.records.len();
                    Some((k, new))
                })
                .collect()
        });
        (self.start, left, right)
    }

    /// Appends restored records, as in a snapshot from here on.
    fn append(&mut self, left: SideState, right: SideState) {
        for (side, records) in [left, right].into_iter().enumerate() {
            for (key, records) in records {
                let b = self.sides[side].entry(key).or_default();
                b.records.extend(records);
                b.snapshotted = b.records.len();
            }
        }
    }
}

impl Operator for Join {
    fn process(
        &mut self,
        input: usize,
        batch: &mut Vec<Record>,
        _out: &mut Vec<Record>,
    ) -> Result<(), OpError> {
        let side = input.min(1);
        for r in batch.drain(..) {
            let start = window_start(r.ts, self.size)?;
            // Every window kept ends within the range of timestamps.
            let end = window_end(start, self.size, r.ts)?;
            if end - 1 <= self.wm {
                self.late_dropped += 1;
                continue;
            }
            if !r.value.fits_one_level_down() {
                // A result carries it one level down, as `left` or `right`.
                return Err(OpError::Data(format!(
                    "a joined value nested deeper than {} levels",
                    MAX_VALUE_DEPTH - 1
                )));
            }
            let i = match self.windows.binary_search_by_key(&start, |w| w.start) {
                Ok(i) => i,
                Err(i) => {
                    self.windows.insert(
                        i,
                        JoinWindow {
                            start,
                            ..Default::default()
                        },
                    );
                    i
                }
            };
            let w = &mut self.windows[i];
            let key = r.key.clone().unwrap_or_default();
            let buffers = &mut w.sides[side];
            let buffer = match buffers.get_mut(&key) {
                Some(b) => b,
                None => buffers.entry(key.clone()).or_default(),
            };
            if buffer.records.len() == buffer.snapshotted {
                w.appended[side].push(key);
            }
            buffer.records.push(r);
        }
        Ok(())
    }

    fn on_watermark(&mut self, wm: i64, out: &mut Vec<Record>) -> Result<(), OpError> {
        if wm <= self.wm {
            return Ok(());
        }
        self.wm = wm;
        let ready = self
            .windows
            .partition_point(|w| w.start + self.size - 1 <= wm);
        for w in self.windows.drain(..ready) {
            let end = w.start + self.size;
            let [left, right] = w.sides;
            let mut keys: Vec<(Value, Buffer)> = left.into_iter().collect();
            keys.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            for (key, ls) in keys {
                let Some(rs) = right.get(&key) else { continue };
                for l in &ls.records {
                    for r in &rs.records {
                        let value = Value::map([
                            ("key", key.clone()),
                            ("window_start", Value::Int(w.start)),
                            ("window_end", Value::Int(end)),
                            ("left", l.value.clone()),
                            ("right", r.value.clone()),
                        ]);
                        out.push(Record {
                            key: Some(key.clone()),
                            ts: end - 1,
                            value,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    fn finish(&mut self, out: &mut Vec<Record>) -> Result<(), OpError> {
        self.on_watermark(i64::MAX, out)
    }

    fn snapshot(&mut self) -> Result<Vec<u8>, OpError> {
        encode_state(&JoinState {
            wm: self.wm,
            late_dropped: self.late_dropped,
            windows: self.windows.iter_mut().map(JoinWindow::take_all).collect(),
        })
    }

    fn snapshot_changes(&mut self) -> Result<Option<Vec<u8>>, OpError> {
        let windows = self
            .windows
            .iter_mut()
            .filter(|w| w.appended.iter().any(|a| !a.is_empty()))
            .map(JoinWindow::take_appended)
            .collect();
        encode_state(&JoinChanges {
            wm: self.wm,
            late_dropped: self.late_dropped,
            open: self.windows.iter().map(|w| w.start).collect(),
            windows,
        })
        .map(Some)
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), OpError> {
        let s: JoinState = decode_state(state)?;
        self.wm = s.wm;
        self.late_dropped = s.late_dropped;
        self.windows = s
            .windows
            .into_iter()
            .map(|(start, left, right)| {
                let mut w = JoinWindow {
                    start,
                    ..Default::default()
                };
                w.append(left, right);
                w
            })
            .collect();
        Ok(())
    }

    fn restore_changes(&mut self, changes: &[u8]) -> Result<(), OpError> {
        let c: JoinChanges = decode_state(changes)?;
        self.wm = c.wm;
        self.late_dropped = c.late_dropped;
        self.windows
            .retain(|w| c.open.binary_search(&w.start).is_ok());
        for (start, left, right) in c.windows {
            let i = match self.windows.binary_search_by_key(&start, |w| w.start) {
                Ok(i) => i,
                Err(i) => {
                    let w = JoinWindow {
                        start,
                        ..Default::default()
                    };
                    self.windows.insert(i, w);
                    i
                }
            };
            self.windows[i].append(left, right);
        }
        Ok(())
    }

    fn metrics(&self) -> Vec<Metric> {
        vec![Metric::total("late_dropped", self.late_dropped as i64)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::testing::{
        assert_changes_equivalence, assert_small_changes, assert_snapshot_equivalence, build_error,
        operator, run, Step,
    };

    fn k(key: i64, ts: i64, v: &str) -> Record {
        Record::keyed(Value::Int(key), ts, Value::str(v))
    }

    #[test]
    fn joins_matching_keys_per_window() {
        let mut j = operator(r#"{"id":"j","kind":"join","params":{"window":{"tumbling_ms":10}}}"#);
        let out = run(
            j.as_mut(),
            &[
                Step::Data(0, vec![k(1, 1, "l1"), k(2, 2, "l2"), k(1, 12, "l3")]),
                Step::Data(
                    1,
                    vec![k(1, 5, "r1"), k(1, 6, "r2"), k(3, 7, "r3"), k(1, 15, "r4")],
                ),
                Step::Wm(9),
                Step::Data(1, vec![k(2, 8, "late")]),
            ],
        );
        let got: Vec<String> = out.iter().map(|r| r.value.to_string()).collect();
        assert_eq!(
            got,
            vec![
                r#"{"key":1,"left":"l1","right":"r1","window_end":10,"window_start":0}"#,
                r#"{"key":1,"left":"l1","right":"r2","window_end":10,"window_start":0}"#,
                r#"{"key":1,"left":"l3","right":"r4","window_end":20,"window_start":10}"#
            ]
        );
        assert_eq!(j.metrics(), vec![Metric::total("late_dropped", 1)]);
    }

    /// Ensures a value too deep to go one level down into a result fails its record naming
    /// why, and one at the limit joins into a result the data plane carries.
    #[test]
    fn refuses_values_too_deep_for_a_result() {
        use crate::codec::packed;
        let deep = |depth: usize| {
            let mut v = Value::Int(1);
            for _ in 0..depth {
                v = Value::list(vec![v]);
            }
            Record::keyed(Value::Int(1), 1, v)
        };
        let spec = r#"{"id":"j","kind":"join","params":{"window":{"tumbling_ms":10}}}"#;
        let mut j = operator(spec);
        let out = run(
            j.as_mut(),
            &[
                Step::Data(0, vec![deep(MAX_VALUE_DEPTH - 1)]),
                Step::Data(1, vec![deep(1)]),
                Step::Wm(20),
            ],
        );
        assert_eq!(out.len(), 1);
        let mut bytes = Vec::new();
        packed::encode_records(0, &out, &mut bytes);
        assert_eq!(packed::decode_batch(&bytes).unwrap().records, out);

        let mut j = operator(spec);
        let err = j
            .process(1, &mut vec![deep(MAX_VALUE_DEPTH)], &mut Vec::new())
            .unwrap_err();
        assert!(matches!(err, OpError::Data(_)), "{err}");
        assert!(err.to_string().contains("deeper than 127 levels"), "{err}");
    }

    /// Ensures a restored join emits the same pairs as an uninterrupted one.
    #[test]
    fn snapshot_equivalence() {
        let steps: Vec<Step> = (0..10)
            .flat_map(|i| {
                [
                    Step::Data(0, (0..4).map(|j| k(j % 2, i * 4 + j, "l")).collect()),
                    Step::Data(1, (0..3).map(|j| k(j % 3, i * 4 + j, "r")).collect()),
                    Step::Wm(i * 4 - 6),
                ]
            })
            .collect();
        let spec = r#"{"id":"j","kind":"join","params":{"window":{"tumbling_ms":8}}}"#;
        assert_snapshot_equivalence(spec, &steps);
        assert_changes_equivalence(spec, &steps, canonical);
    }

    /// Ensures an incremental snapshot carries the records appended since the previous one,
    /// not the records buffered.
    #[test]
    fn changes_carry_only_the_appended_records() {
        let spec = r#"{"id":"j","kind":"join","params":{"window":{"tumbling_ms":1000}}}"#;
        let mut j = operator(spec);
        let mut out = Vec::new();
        for side in 0..2 {
            let mut recs: Vec<Record> = (0..5000).map(|i| k(i % 500, i % 1000, "v")).collect();
            j.process(side, &mut recs, &mut out).unwrap();
        }
        let whole = j.snapshot().unwrap();
        j.process(
            0,
            &mut vec![k(3, 10, "new"), k(3, 1500, "next window")],
            &mut out,
        )
        .unwrap();
        j.process(1, &mut vec![k(3, 20, "new")], &mut out).unwrap();
        let changes = j.snapshot_changes().unwrap().unwrap();
        let mut copy = assert_small_changes(spec, j.as_mut(), &whole, &changes, 100, canonical);

        // The first window fires: the next changes drop it from the copy.
        j.on_watermark(999, &mut out).unwrap();
        copy.restore_changes(&j.snapshot_changes().unwrap().unwrap())
            .unwrap();
        let state = j.snapshot().unwrap();
        assert_eq!(canonical(&copy.snapshot().unwrap()), canonical(&state));
        assert_eq!(decode_state::<JoinState>(&state).unwrap().windows.len(), 1);
    }

    /// A snapshot's content, comparable (rkyv shares repeated `Arc`s of a key, so equal
    /// states may encode to different bytes).
    fn canonical(state: &[u8]) -> String {
        format!("{:?}", decode_state::<JoinState>(state).unwrap())
    }

    #[test]
    fn rejects_non_tumbling() {
        let e = build_error(r#"{"id":"j","kind":"join","params":{"window":{"session_gap_ms":8}}}"#);
        assert_eq!(e.field.as_deref(), Some("params.window"));
    }
}
