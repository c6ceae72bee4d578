//! `join`: a windowed inner join of two keyed inputs (input 0 = left, input 1 = right).
//!
//! Records of both sides are buffered per tumbling event-time window and key. When the
//! watermark passes the window's end, every (left, right) pair with equal keys is emitted as
//! `{key, window_start, window_end, left, right}` with `ts = end - 1`, keys in order and pairs
//! in arrival order. Records for a window that already fired are dropped and counted.

use std::sync::Arc;

use rustc_hash::FxHashMap;

use super::{
    decode_state, encode_state, Instance, Metric, OpError, Operator, OperatorFactory, Params,
    SubtaskContext,
};
use crate::record::Record;
use crate::spec::{OperatorSpec, SpecError};
use crate::value::Value;

use super::window::WindowKind;

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
    sides: [FxHashMap<Value, Vec<Record>>; 2],
}

type SideState = Vec<(Value, Vec<Record>)>;

/// Snapshot form: windows with sides sorted by key.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
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

impl Operator for Join {
    fn process(
        &mut self,
        input: usize,
        batch: &mut Vec<Record>,
        _out: &mut Vec<Record>,
    ) -> Result<(), OpError> {
        let side = input.min(1);
        for r in batch.drain(..) {
            let start = r.ts - r.ts.rem_euclid(self.size);
            if start + self.size - 1 <= self.wm {
                self.late_dropped += 1;
                continue;
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
            let key = r.key.clone().unwrap_or_default();
            self.windows[i].sides[side].entry(key).or_default().push(r);
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
            let mut keys: Vec<(Value, Vec<Record>)> = left.into_iter().collect();
            keys.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            for (key, ls) in keys {
                let Some(rs) = right.get(&key) else { continue };
                for l in &ls {
                    for r in rs {
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
        let sorted = |m: &FxHashMap<Value, Vec<Record>>| {
            let mut v: SideState = m.iter().map(|(k, r)| (k.clone(), r.clone())).collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        };
        encode_state(&JoinState {
            wm: self.wm,
            late_dropped: self.late_dropped,
            windows: self
                .windows
                .iter()
                .map(|w| (w.start, sorted(&w.sides[0]), sorted(&w.sides[1])))
                .collect(),
        })
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), OpError> {
        let s: JoinState = decode_state(state)?;
        self.wm = s.wm;
        self.late_dropped = s.late_dropped;
        self.windows = s
            .windows
            .into_iter()
            .map(|(start, l, r)| JoinWindow {
                start,
                sides: [l.into_iter().collect(), r.into_iter().collect()],
            })
            .collect();
        Ok(())
    }

    fn metrics(&self) -> Vec<Metric> {
        vec![Metric::total("late_dropped", self.late_dropped as i64)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::testing::{assert_snapshot_equivalence, build_error, operator, run, Step};

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
        assert_snapshot_equivalence(
            r#"{"id":"j","kind":"join","params":{"window":{"tumbling_ms":8}}}"#,
            &steps,
        );
    }

    #[test]
    fn rejects_non_tumbling() {
        let e = build_error(r#"{"id":"j","kind":"join","params":{"window":{"session_gap_ms":8}}}"#);
        assert_eq!(e.field.as_deref(), Some("params.window"));
    }
}
