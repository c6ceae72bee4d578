//! `window_aggregate`: keyed event-time windows (tumbling, sliding, session) with
//! watermarks and allowed lateness.
//!
//! A window fires when the watermark reaches its last millisecond (`end - 1`), emitting one
//! record per key, `{key, window_start, window_end, <aggs>}` with `ts = end - 1`, in key
//! order (so output order is a function of the input, which replay-based recovery relies on).
//! A fired window is kept for `allowed_lateness_ms`; a late record within it updates the
//! window and re-emits that key's result; a record later than that is dropped and counted
//! (`late_dropped`).

use std::sync::Arc;

use rustc_hash::FxHashMap;

use super::agg::{
    add_all, begin_state, new_accs, open_state, pack_accs, pack_keyed, parse_aggs, unpack_keyed,
    Acc, Accs, AggSpec, ResultFields,
};
use super::{
    Instance, Metric, OpError, Operator, OperatorFactory, Params, SubtaskContext, MAX_DURATION_MS,
};
use crate::codec::packed::{put_bool, put_i64, put_u64, put_value, Unpacker, MAX_RESERVE};
use crate::codec::CodecError;
use crate::record::Record;
use crate::spec::{OperatorSpec, SpecError};
use crate::value::Value;

/// Window assignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowKind {
    /// Fixed, non-overlapping windows of `size` ms.
    Tumbling {
        /// Length in ms.
        size: i64,
    },
    /// Windows of `size` ms starting every `slide` ms.
    Sliding {
        /// Length in ms.
        size: i64,
        /// Distance between window starts in ms.
        slide: i64,
    },
    /// Per key, records closer than `gap` ms belong to one session.
    Session {
        /// Inactivity gap in ms.
        gap: i64,
    },
}

impl WindowKind {
    /// Parses `params.window`.
    pub fn parse(p: &Params<'_>) -> Result<WindowKind, SpecError> {
        let w = p
            .raw("window")
            .ok_or_else(|| p.error("window", "is required"))?;
        let obj = w
            .as_object()
            .ok_or_else(|| p.error("window", "must be an object"))?;
        let num = |k: &str| -> Result<Option<i64>, SpecError> {
            match obj.get(k) {
                None => Ok(None),
                Some(v) => match v.as_i64() {
                    Some(n) if n > 0 && n <= MAX_DURATION_MS => Ok(Some(n)),
                    _ => Err(p.error(
                        &format!("window.{k}"),
                        format!("must be a positive integer of at most {MAX_DURATION_MS} ms"),
                    )),
                },
            }
        };
        for k in obj.keys() {
            if !["tumbling_ms", "sliding_ms", "slide_ms", "session_gap_ms"].contains(&k.as_str()) {
                return Err(p.error(&format!("window.{k}"), "unknown window field (expected tumbling_ms, sliding_ms + slide_ms, or session_gap_ms)"));
            }
        }
        match (
            num("tumbling_ms")?,
            num("sliding_ms")?,
            num("slide_ms")?,
            num("session_gap_ms")?,
        ) {
            (Some(size), None, None, None) => Ok(WindowKind::Tumbling { size }),
            (None, Some(size), Some(slide), None) => {
                if slide > size || size / slide > 1000 {
                    Err(p.error(
                        "window.slide_ms",
                        "must be at most sliding_ms, and sliding_ms / slide_ms at most 1000",
                    ))
                } else {
                    Ok(WindowKind::Sliding { size, slide })
                }
            }
            (None, Some(_), None, None) => {
                Err(p.error("window.slide_ms", "is required with sliding_ms"))
            }
            (None, None, None, Some(gap)) => Ok(WindowKind::Session { gap }),
            _ => Err(p.error(
                "window",
                "give exactly one of tumbling_ms, sliding_ms + slide_ms, session_gap_ms",
            )),
        }
    }
}

/// A validated `window_aggregate`.
struct WindowFactory {
    kind: WindowKind,
    lateness: i64,
    aggs: Arc<[AggSpec]>,
    fields: Arc<ResultFields>,
}

/// Builds a `window_aggregate`.
pub fn build(spec: &OperatorSpec) -> Result<Arc<dyn OperatorFactory>, SpecError> {
    Ok(Arc::new(factory(spec)?))
}

fn factory(spec: &OperatorSpec) -> Result<WindowFactory, SpecError> {
    let p = Params::new(
        spec,
        &["window", "allowed_lateness_ms", "agg", "aggs", "field"],
    )?;
    let aggs = parse_aggs(&p)?;
    Ok(WindowFactory {
        kind: WindowKind::parse(&p)?,
        lateness: p.millis("allowed_lateness_ms")?.unwrap_or(0) as i64,
        fields: Arc::new(ResultFields::new(&["window_start", "window_end"], &aggs)),
        aggs: aggs.into(),
    })
}

impl WindowFactory {
    fn operator(&self) -> WindowOperator {
        WindowOperator {
            kind: self.kind,
            lateness: self.lateness,
            aggs: self.aggs.clone(),
            fields: self.fields.clone(),
            wm: i64::MIN,
            windows: Vec::new(),
            sessions: FxHashMap::default(),
            changed_keys: Vec::new(),
            tracking: false,
            late_dropped: 0,
        }
    }
}

impl OperatorFactory for WindowFactory {
    fn instantiate(&self, _ctx: &SubtaskContext) -> Result<Instance, OpError> {
        Ok(Instance::Operator(Box::new(self.operator())))
    }
}

/// One fixed window (tumbling or sliding) and its per-key accumulators.
#[derive(Debug, Clone)]
struct Window {
    start: i64,
    end: i64,
    /// Fired once already (so later records are late updates).
    fired: bool,
    keys: FxHashMap<Value, Accs>,
    /// Changed since the last snapshot (incremental snapshots carry whole changed windows:
    /// a flag per window costs nothing per record, a set of changed keys would cost a
    /// lookup).
    changed: bool,
}

/// One session of one key.
#[derive(Debug, Clone, PartialEq)]
struct Session {
    start: i64,
    /// Last record's ts + gap.
    end: i64,
    fired: bool,
    accs: Vec<Acc>,
}

impl Session {
    fn new(start: i64, end: i64, accs: Accs) -> Session {
        Session {
            start,
            end,
            fired: false,
            accs: accs.to_vec(),
        }
    }
}

/// The open sessions of one key.
#[derive(Debug, Clone, Default)]
struct KeySessions {
    /// Sorted by start, non-overlapping.
    list: Vec<Session>,
    /// Changed since the last snapshot (the key is then in `changed_keys`).
    changed: bool,
}

impl KeySessions {
    /// Restored sessions, unchanged since.
    fn new(list: Vec<Session>) -> KeySessions {
        KeySessions {
            list,
            changed: false,
        }
    }
}

/// Format byte of a whole snapshot: the watermark, the late count, every open window
/// (start, end, fired, its keys' accumulators sorted by key: [`pack_keyed`]) and every key's
/// sessions (sorted by key; per session start, end, fired, accumulators).
const WINDOW_STATE: u8 = 2;
/// Format byte of an incremental snapshot: the watermark, the late count, the starts of
/// every open window (the others closed since), the changed windows whole, and the sessions
/// of every key whose sessions changed (none for a key whose sessions all closed).
const WINDOW_CHANGES: u8 = 3;

/// One subtask of a `window_aggregate`.
struct WindowOperator {
    kind: WindowKind,
    lateness: i64,
    aggs: Arc<[AggSpec]>,
    /// The layout of the results.
    fields: Arc<ResultFields>,
    /// Current combined input watermark.
    wm: i64,
    /// Open fixed windows, sorted by start.
    windows: Vec<Window>,
    /// Open sessions per key.
    sessions: FxHashMap<Value, KeySessions>,
    /// Keys whose sessions changed since the last snapshot (maybe repeated, when a key's
    /// sessions closed and it opened new ones); kept only while `tracking`.
    changed_keys: Vec<Value>,
    /// A snapshot was taken or restored, so changes are relative to something (without
    /// one, `changed_keys` would grow with every key ever seen).
    tracking: bool,
    late_dropped: u64,
}

impl Window {
    /// Appends the window, its keys sorted; it is unchanged from here on.
    fn pack(&mut self, out: &mut Vec<u8>) {
        self.changed = false;
        put_i64(out, self.start);
        put_i64(out, self.end);
        put_bool(out, self.fired);
        let mut keys: Vec<(&Value, &Accs)> = self.keys.iter().collect();
        keys.sort_unstable_by(|a, b| a.0.cmp(b.0));
        pack_keyed(out, &keys);
    }

    /// Reads a window [`Window::pack`] wrote.
    fn unpack(r: &mut Unpacker<'_>, aggs: usize) -> Result<Window, CodecError> {
        let (start, end, fired) = (r.i64()?, r.i64()?, r.bool()?);
        let mut keys = FxHashMap::default();
        unpack_keyed(r, aggs, &mut keys, |a| a)?;
        Ok(Window {
            start,
            end,
            fired,
            keys,
            changed: false,
        })
    }
}

/// Appends one key's sessions.
fn pack_sessions(out: &mut Vec<u8>, key: &Value, list: &[Session]) {
    put_value(out, key);
    put_u64(out, list.len() as u64);
    for s in list {
        put_i64(out, s.start);
        put_i64(out, s.end);
        put_bool(out, s.fired);
        pack_accs(out, &s.accs);
    }
}

/// Reads one key's sessions [`pack_sessions`] wrote.
fn unpack_sessions(r: &mut Unpacker<'_>, aggs: usize) -> Result<(Value, Vec<Session>), CodecError> {
    let key = r.value()?;
    // A session takes at least its bounds, its flag and an accumulator.
    let n = r.count(4)?;
    let mut list = Vec::with_capacity(n.min(MAX_RESERVE));
    for _ in 0..n {
        let (start, end, fired) = (r.i64()?, r.i64()?, r.bool()?);
        let accs = (0..aggs)
            .map(|_| Acc::unpack(r))
            .collect::<Result<_, _>>()?;
        list.push(Session {
            start,
            end,
            fired,
            accs,
        });
    }
    Ok((key, list))
}

impl WindowOperator {
    /// Appends every key's sessions, sorted by key; they are unchanged from here on.
    fn pack_all_sessions(&mut self, out: &mut Vec<u8>) {
        self.changed_keys.clear();
        for s in self.sessions.values_mut() {
            s.changed = false;
        }
        let mut keys: Vec<(&Value, &KeySessions)> = self.sessions.iter().collect();
        keys.sort_unstable_by(|a, b| a.0.cmp(b.0));
        put_u64(out, keys.len() as u64);
        for (k, s) in keys {
            pack_sessions(out, k, &s.list);
        }
    }

    /// Appends the sessions of every key changed since the last snapshot, sorted by key
    /// (none for a key with none open); they are unchanged from here on.
    fn pack_changed_sessions(&mut self, out: &mut Vec<u8>) {
        let mut keys = std::mem::take(&mut self.changed_keys);
        keys.sort_unstable();
        keys.dedup();
        put_u64(out, keys.len() as u64);
        for k in keys {
            let list = match self.sessions.get_mut(&k) {
                Some(s) => {
                    s.changed = false;
                    &s.list[..]
                }
                None => &[],
            };
            pack_sessions(out, &k, list);
        }
    }

    /// Starts a snapshot of `format`, of about `entries` keys and sessions: the header, the
    /// watermark and the late count.
    fn begin(&self, format: u8, entries: usize) -> Vec<u8> {
        let mut out = begin_state(format, &self.aggs, 64 + 8 * entries);
        put_i64(&mut out, self.wm);
        put_u64(&mut out, self.late_dropped);
        out
    }

    /// Reads a snapshot's header, the watermark and the late count.
    fn open<'a>(&mut self, bytes: &'a [u8], format: u8) -> Result<Unpacker<'a>, OpError> {
        let what = match format {
            WINDOW_STATE => "window_aggregate snapshot",
            _ => "window_aggregate incremental snapshot",
        };
        let mut r = open_state(bytes, format, what, &self.aggs)?;
        self.wm = r.i64()?;
        self.late_dropped = r.u64()?;
        Ok(r)
    }

    /// Whether a window ending at `end` can no longer take records.
    #[inline]
    fn expired(&self, end: i64) -> bool {
        expired(end, self.lateness, self.wm)
    }

    /// Index of the window starting at `start`, creating it.
    #[inline]
    fn window_at(&mut self, start: i64, end: i64) -> usize {
        // Records mostly hit the newest window: search from the back.
        let mut i = self.windows.len();
        while i > 0 {
            let w = &self.windows[i - 1];
            if w.start == start {
                return i - 1;
            }
            if w.start < start {
                break;
            }
            i -= 1;
        }
        self.windows.insert(
            i,
            Window {
                start,
                end,
                fired: false,
                keys: FxHashMap::default(),
                changed: true,
            },
        );
        i
    }

    /// Index of the open window `[start, start + size)` for a record at `ts`, or `None`
    /// (counted as late) when it expired; an error when the window would end past the
    /// last representable time.
    #[inline]
    fn open_window(&mut self, start: i64, size: i64, ts: i64) -> Result<Option<usize>, OpError> {
        let end = window_end(start, size, ts)?;
        if self.expired(end) {
            self.late_dropped += 1;
            return Ok(None);
        }
        Ok(Some(self.window_at(start, end)))
    }

    /// Folds `rec` into window `i`; re-emits the key's result if the window already fired.
    #[inline]
    fn add_to(&mut self, i: usize, rec: &Record, out: &mut Vec<Record>) -> Result<(), OpError> {
        let (aggs, fields) = (&self.aggs, &self.fields);
        let w = &mut self.windows[i];
        w.changed = true;
        let key = rec.key.as_ref().unwrap_or(&Value::Null);
        let accs = match w.keys.get_mut(key) {
            Some(a) => a,
            None => w.keys.entry(key.clone()).or_insert_with(|| new_accs(aggs)),
        };
        add_all(accs, aggs, rec)?;
        if w.fired {
            out.push(emit(key, w.start, w.end, accs, fields));
        }
        Ok(())
    }

    fn add_session(
        &mut self,
        gap: i64,
        rec: &Record,
        out: &mut Vec<Record>,
    ) -> Result<(), OpError> {
        let end = window_end(rec.ts, gap, rec.ts)?;
        let start = rec.ts;
        if self.expired(end) {
            self.late_dropped += 1;
            return Ok(());
        }
        let key = rec.key.clone().unwrap_or_default();
        let entry = self.sessions.entry(key.clone()).or_default();
        if self.tracking && !entry.changed {
            entry.changed = true;
            self.changed_keys.push(key.clone());
        }
        let list = &mut entry.list;
        // Merge every session overlapping [start, end) into a new one.
        let mut merged = Session::new(start, end, new_accs(&self.aggs));
        add_all(&mut merged.accs, &self.aggs, rec)?;
        let mut i = 0;
        while i < list.len() {
            let s = &list[i];
            if s.start < merged.end && merged.start < s.end {
                let s = list.remove(i);
                merged.start = merged.start.min(s.start);
                merged.end = merged.end.max(s.end);
                merged.fired |= s.fired;
                for (a, b) in merged.accs.iter_mut().zip(s.accs) {
                    a.merge(b);
                }
            } else {
                i += 1;
            }
        }
        let pos = list.partition_point(|s| s.start < merged.start);
        if merged.fired {
            out.push(emit(
                &key,
                merged.start,
                merged.end,
                &merged.accs,
                &self.fields,
            ));
        }
        list.insert(pos, merged);
        Ok(())
    }

    /// Fires every unfired window whose end - 1 <= wm, then drops expired ones.
    fn fire(&mut self, wm: i64, out: &mut Vec<Record>) {
        for w in self.windows.iter_mut() {
            if w.end - 1 > wm {
                break;
            }
            if !w.fired {
                w.fired = true;
                w.changed = true;
                let mut keys: Vec<(&Value, &Accs)> = w.keys.iter().collect();
                keys.sort_unstable_by(|a, b| a.0.cmp(b.0));
                out.extend(
                    keys.into_iter()
                        .map(|(k, a)| emit(k, w.start, w.end, a, &self.fields)),
                );
            }
        }
        let lateness = self.lateness;
        self.windows.retain(|w| !expired(w.end, lateness, wm));

        if !self.sessions.is_empty() {
            let mut fired: Vec<Record> = Vec::new();
            for (key, ks) in self.sessions.iter_mut() {
                let before = (fired.len(), ks.list.len());
                for s in ks.list.iter_mut().filter(|s| !s.fired && s.end - 1 <= wm) {
                    s.fired = true;
                    fired.push(emit(key, s.start, s.end, &s.accs, &self.fields));
                }
                ks.list.retain(|s| !expired(s.end, lateness, wm));
                if self.tracking && !ks.changed && before != (fired.len(), ks.list.len()) {
                    ks.changed = true;
                    self.changed_keys.push(key.clone());
                }
            }
            self.sessions.retain(|_, s| !s.list.is_empty());
            fired.sort_unstable_by(|a, b| (a.ts, &a.key).cmp(&(b.ts, &b.key)));
            out.extend(fired);
        }
    }
}

/// The start of the `size` ms window (aligned to multiples of `size`) holding `ts`.
pub(super) fn window_start(ts: i64, size: i64) -> Result<i64, OpError> {
    ts.checked_sub(ts.rem_euclid(size))
        .ok_or_else(|| beyond_time(ts, size))
}

/// Whether a window ending at `end` can no longer take records once the watermark is `wm`:
/// its last instant, plus the allowed lateness (saturating), is at or below it.
#[inline]
fn expired(end: i64, lateness: i64, wm: i64) -> bool {
    (end - 1).saturating_add(lateness) <= wm
}

/// The end of the window of `size` ms from `start` that holds the record at `ts`; an error
/// naming the record when it would lie beyond the range of timestamps.
pub(super) fn window_end(start: i64, size: i64, ts: i64) -> Result<i64, OpError> {
    start.checked_add(size).ok_or_else(|| beyond_time(ts, size))
}

/// A record whose window would begin or end beyond the range of i64 ms timestamps.
fn beyond_time(ts: i64, size: i64) -> OpError {
    OpError::Data(format!(
        "timestamp {ts}: its {size} ms window would reach beyond the range of timestamps (i64 ms)"
    ))
}

fn emit(key: &Value, start: i64, end: i64, accs: &[Acc], fields: &ResultFields) -> Record {
    let value = fields.value(key, &[Value::Int(start), Value::Int(end)], accs);
    Record {
        key: Some(key.clone()),
        ts: end - 1,
        value,
    }
}

impl Operator for WindowOperator {
    fn process(
        &mut self,
        _input: usize,
        batch: &mut Vec<Record>,
        out: &mut Vec<Record>,
    ) -> Result<(), OpError> {
        match self.kind {
            WindowKind::Tumbling { size } => {
                // Consecutive records mostly share a window: find it (a division and a
                // search) once per run of records, not per record.
                let mut current: Option<(i64, i64, usize)> = None;
                for r in batch.iter() {
                    let i = match current {
                        Some((start, end, i)) if r.ts >= start && r.ts < end => i,
                        _ => match self.open_window(window_start(r.ts, size)?, size, r.ts)? {
                            Some(i) => {
                                current = Some((self.windows[i].start, self.windows[i].end, i));
                                i
                            }
                            None => continue,
                        },
                    };
                    self.add_to(i, r, out)?;
                }
            }
            WindowKind::Sliding { size, slide } => {
                for r in batch.iter() {
                    // The windows holding the record start at most `size - slide` before
                    // the last one, aligned to `slide`.
                    let last = window_start(r.ts, slide)?;
                    let first = last.checked_sub(size - slide);
                    let mut start = first.ok_or_else(|| beyond_time(r.ts, size))?;
                    while start <= last {
                        if r.ts - start < size {
                            if let Some(i) = self.open_window(start, size, r.ts)? {
                                self.add_to(i, r, out)?;
                            }
                        }
                        match start.checked_add(slide) {
                            Some(next) => start = next,
                            None => break,
                        }
                    }
                }
            }
            WindowKind::Session { gap } => {
                for r in batch.iter() {
                    self.add_session(gap, r, out)?;
                }
            }
        }
        batch.clear();
        Ok(())
    }

    fn on_watermark(&mut self, wm: i64, out: &mut Vec<Record>) -> Result<(), OpError> {
        if wm > self.wm {
            self.wm = wm;
            self.fire(wm, out);
        }
        Ok(())
    }

    fn finish(&mut self, out: &mut Vec<Record>) -> Result<(), OpError> {
        self.on_watermark(i64::MAX, out)
    }

    fn snapshot(&mut self) -> Result<Vec<u8>, OpError> {
        self.tracking = true;
        let keys: usize = self.windows.iter().map(|w| w.keys.len()).sum();
        let mut out = self.begin(WINDOW_STATE, keys + self.sessions.len());
        put_u64(&mut out, self.windows.len() as u64);
        for w in self.windows.iter_mut() {
            w.pack(&mut out);
        }
        self.pack_all_sessions(&mut out);
        Ok(out)
    }

    fn snapshot_changes(&mut self) -> Result<Option<Vec<u8>>, OpError> {
        if !self.tracking {
            // Changes since when? The caller takes a whole snapshot instead.
            return Ok(None);
        }
        let keys: usize = (self.windows.iter())
            .filter(|w| w.changed)
            .map(|w| w.keys.len())
            .sum();
        let mut out = self.begin(WINDOW_CHANGES, keys + self.changed_keys.len());
        put_u64(&mut out, self.windows.len() as u64);
        for w in &self.windows {
            put_i64(&mut out, w.start);
        }
        let changed = self.windows.iter().filter(|w| w.changed).count();
        put_u64(&mut out, changed as u64);
        for w in self.windows.iter_mut().filter(|w| w.changed) {
            w.pack(&mut out);
        }
        self.pack_changed_sessions(&mut out);
        Ok(Some(out))
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), OpError> {
        let mut r = self.open(state, WINDOW_STATE)?;
        let aggs = self.aggs.len();
        // A window takes at least its bounds, its flag and its key count.
        let n = r.count(4)?;
        self.windows = Vec::with_capacity(n.min(MAX_RESERVE));
        for _ in 0..n {
            self.windows.push(Window::unpack(&mut r, aggs)?);
        }
        let n = r.count(2)?;
        self.sessions = FxHashMap::default();
        self.sessions.reserve(n.min(MAX_RESERVE));
        for _ in 0..n {
            let (key, list) = unpack_sessions(&mut r, aggs)?;
            self.sessions.insert(key, KeySessions::new(list));
        }
        r.finish()?;
        self.changed_keys.clear();
        // Changes from here on are relative to this state.
        self.tracking = true;
        Ok(())
    }

    fn restore_changes(&mut self, changes: &[u8]) -> Result<(), OpError> {
        let mut r = self.open(changes, WINDOW_CHANGES)?;
        let aggs = self.aggs.len();
        let n = r.count(1)?;
        let mut open = Vec::with_capacity(n.min(MAX_RESERVE));
        for _ in 0..n {
            open.push(r.i64()?);
        }
        self.windows
            .retain(|w| open.binary_search(&w.start).is_ok());
        for _ in 0..r.count(4)? {
            let w = Window::unpack(&mut r, aggs)?;
            match self.windows.binary_search_by_key(&w.start, |o| o.start) {
                Ok(i) => self.windows[i] = w,
                Err(i) => self.windows.insert(i, w),
            }
        }
        for _ in 0..r.count(2)? {
            let (key, list) = unpack_sessions(&mut r, aggs)?;
            match list.is_empty() {
                true => self.sessions.remove(&key),
                false => self.sessions.insert(key, KeySessions::new(list)),
            };
        }
        Ok(r.finish()?)
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

    fn k(key: &str, ts: i64, v: i64) -> Record {
        Record::keyed(Value::str(key), ts, Value::Int(v))
    }

    fn summary(out: &[Record]) -> Vec<String> {
        out.iter().map(|r| r.value.to_string()).collect()
    }

    #[test]
    fn tumbling_count_fires_on_watermark() {
        let mut w = operator(
            r#"{"id":"w","kind":"window_aggregate","params":{"window":{"tumbling_ms":10},"agg":"count"}}"#,
        );
        let mut out = Vec::new();
        w.process(
            0,
            &mut vec![k("a", 1, 0), k("b", 3, 0), k("a", 9, 0), k("a", 10, 0)],
            &mut out,
        )
        .unwrap();
        assert!(out.is_empty());
        w.on_watermark(8, &mut out).unwrap();
        assert!(
            out.is_empty(),
            "window [0,10) is not complete at watermark 8"
        );
        w.on_watermark(9, &mut out).unwrap();
        assert_eq!(
            summary(&out),
            vec![
                r#"{"count":2,"key":"a","window_end":10,"window_start":0}"#,
                r#"{"count":1,"key":"b","window_end":10,"window_start":0}"#
            ]
        );
        assert_eq!(out[0].ts, 9);
        out.clear();
        w.finish(&mut out).unwrap();
        assert_eq!(
            summary(&out),
            vec![r#"{"count":1,"key":"a","window_end":20,"window_start":10}"#]
        );
    }

    /// Ensures late data within allowed lateness re-fires the key, and later data is dropped.
    #[test]
    fn late_data_and_allowed_lateness() {
        let mut w = operator(
            r#"{"id":"w","kind":"window_aggregate","params":{"window":{"tumbling_ms":10},"allowed_lateness_ms":5,"agg":"sum","field":"value"}}"#,
        );
        let mut out = Vec::new();
        w.process(0, &mut vec![k("a", 2, 1)], &mut out).unwrap();
        w.on_watermark(9, &mut out).unwrap();
        assert_eq!(
            summary(&out),
            vec![r#"{"key":"a","sum":1,"window_end":10,"window_start":0}"#]
        );
        out.clear();
        // Late but within lateness (wm 12 < 9 + 5): updates and re-emits.
        w.on_watermark(12, &mut out).unwrap();
        w.process(0, &mut vec![k("a", 4, 10)], &mut out).unwrap();
        assert_eq!(
            summary(&out),
            vec![r#"{"key":"a","sum":11,"window_end":10,"window_start":0}"#]
        );
        out.clear();
        // Beyond lateness: dropped and counted.
        w.on_watermark(14, &mut out).unwrap();
        w.process(0, &mut vec![k("a", 5, 100)], &mut out).unwrap();
        assert!(out.is_empty());
        assert_eq!(w.metrics(), vec![Metric::total("late_dropped", 1)]);
        w.finish(&mut out).unwrap();
        assert!(out.is_empty());
    }

    #[test]
    fn late_data_without_lateness_is_dropped() {
        let mut w = operator(
            r#"{"id":"w","kind":"window_aggregate","params":{"window":{"tumbling_ms":10},"agg":"count"}}"#,
        );
        let mut out = Vec::new();
        w.on_watermark(15, &mut out).unwrap();
        w.process(0, &mut vec![k("a", 3, 0), k("a", 16, 0)], &mut out)
            .unwrap();
        w.finish(&mut out).unwrap();
        assert_eq!(
            summary(&out),
            vec![r#"{"count":1,"key":"a","window_end":20,"window_start":10}"#]
        );
        assert_eq!(w.metrics(), vec![Metric::total("late_dropped", 1)]);
    }

    #[test]
    fn sliding_windows_overlap() {
        let mut w = operator(
            r#"{"id":"w","kind":"window_aggregate","params":{"window":{"sliding_ms":10,"slide_ms":5},"agg":"count"}}"#,
        );
        let out = run(
            w.as_mut(),
            &[Step::Data(0, vec![k("a", 7, 0), k("a", 12, 0)])],
        );
        // ts 7 is in [0,10) and [5,15); ts 12 in [5,15) and [10,20).
        assert_eq!(
            summary(&out),
            vec![
                r#"{"count":1,"key":"a","window_end":10,"window_start":0}"#,
                r#"{"count":2,"key":"a","window_end":15,"window_start":5}"#,
                r#"{"count":1,"key":"a","window_end":20,"window_start":10}"#
            ]
        );
    }

    #[test]
    fn session_windows_merge() {
        let mut w = operator(
            r#"{"id":"w","kind":"window_aggregate","params":{"window":{"session_gap_ms":5},"aggs":[{"agg":"count"},{"agg":"min","field":"value"},{"agg":"count_distinct","name":"d","field":"value"}]}}"#,
        );
        let out = run(
            w.as_mut(),
            &[
                Step::Data(0, vec![k("a", 0, 3), k("a", 10, 4), k("b", 1, 9)]),
                // Bridges a's two sessions: [0,5) + [4,9) + [10,15) -> [0,15).
                Step::Data(0, vec![k("a", 4, 3), k("a", 8, 1)]),
                Step::Wm(20),
                Step::Data(0, vec![k("a", 30, 7)]),
            ],
        );
        assert_eq!(
            summary(&out),
            vec![
                r#"{"count":1,"d":1,"key":"b","min":9,"window_end":6,"window_start":1}"#,
                r#"{"count":4,"d":3,"key":"a","min":1,"window_end":15,"window_start":0}"#,
                r#"{"count":1,"d":1,"key":"a","min":7,"window_end":35,"window_start":30}"#
            ]
        );
    }

    #[test]
    fn avg_and_max_over_events() {
        let mut w = operator(
            r#"{"id":"w","kind":"window_aggregate","params":{"window":{"tumbling_ms":100},"aggs":[{"agg":"avg","field":"value"},{"agg":"max","field":"value"}]}}"#,
        );
        let out = run(
            w.as_mut(),
            &[Step::Data(
                0,
                vec![k("a", 1, 1), k("a", 2, 2), k("a", 3, 6)],
            )],
        );
        assert_eq!(
            summary(&out),
            vec![r#"{"avg":3.0,"key":"a","max":6,"window_end":100,"window_start":0}"#]
        );
    }

    /// Ensures that restoring mid-stream (open windows, fired windows within lateness,
    /// sessions) gives the same output as an uninterrupted run.
    #[test]
    fn snapshot_equivalence_all_kinds() {
        let steps: Vec<Step> = (0..8)
            .flat_map(|i| {
                let recs = (0..6)
                    .map(|j| k(["x", "y", "z"][j % 3], i * 7 + j as i64 * 3, j as i64))
                    .collect();
                [Step::Data(0, recs), Step::Wm(i * 7 - 4)]
            })
            .collect();
        for window in [
            r#"{"tumbling_ms":10}"#,
            r#"{"sliding_ms":10,"slide_ms":5}"#,
            r#"{"session_gap_ms":4}"#,
        ] {
            let spec = format!(
                r#"{{"id":"w","kind":"window_aggregate","params":{{"window":{window},"allowed_lateness_ms":6,"aggs":[{{"agg":"count"}},{{"agg":"sum","field":"value"}},{{"agg":"count_distinct","field":"value"}}]}}}}"#
            );
            assert_snapshot_equivalence(&spec, &steps);
            assert_changes_equivalence(&spec, &steps, canonical);
        }
    }

    /// Ensures an incremental snapshot carries the windows records reached since the
    /// previous one: with a long allowed lateness, late records into one old window leave
    /// the other open windows out.
    #[test]
    fn changes_carry_only_the_windows_that_changed() {
        let spec = r#"{"id":"w","kind":"window_aggregate","params":{"window":{"tumbling_ms":10},"allowed_lateness_ms":1000,"agg":"count"}}"#;
        let mut w = operator(spec);
        let mut out = Vec::new();
        let mut recs: Vec<Record> = (0..100)
            .flat_map(|win| (0..50).map(move |key| k(&format!("k{key}"), win * 10, 1)))
            .collect();
        w.process(0, &mut recs, &mut out).unwrap();
        w.on_watermark(995, &mut out).unwrap();
        let whole = w.snapshot().unwrap();
        w.process(0, &mut vec![k("k1", 42, 1)], &mut out).unwrap();
        let changes = w.snapshot_changes().unwrap().unwrap();
        assert_small_changes(spec, w.as_mut(), &whole, &changes, 20, canonical);
    }

    /// Ensures an incremental snapshot carries the sessions of the keys records reached
    /// since the previous one, and tells a copy which keys' sessions closed.
    #[test]
    fn changes_carry_only_the_keys_whose_sessions_changed() {
        let spec = r#"{"id":"w","kind":"window_aggregate","params":{"window":{"session_gap_ms":100},"agg":"count"}}"#;
        let mut w = operator(spec);
        let mut out = Vec::new();
        let mut recs: Vec<Record> = (0..2000).map(|key| k(&format!("k{key}"), 1, 1)).collect();
        w.process(0, &mut recs, &mut out).unwrap();
        let whole = w.snapshot().unwrap();
        w.process(0, &mut vec![k("k1", 50, 1), k("k7", 300, 1)], &mut out)
            .unwrap();
        let changes = w.snapshot_changes().unwrap().unwrap();
        let mut copy = assert_small_changes(spec, w.as_mut(), &whole, &changes, 100, canonical);

        // Every session but k7's second one fires and closes: the changes say so.
        w.on_watermark(250, &mut out).unwrap();
        let closed = w.snapshot_changes().unwrap().unwrap();
        copy.restore_changes(&closed).unwrap();
        let state = w.snapshot().unwrap();
        assert_eq!(copy.snapshot().unwrap(), state);
        let mut restored = window(spec);
        restored.restore(&state).unwrap();
        let open: Vec<_> = restored.sessions.iter().collect();
        assert_eq!(open.len(), 1, "{open:?}");
        assert_eq!(open[0].0, &Value::str("k7"));
    }

    /// Ensures a window's snapshot takes a few bytes per key (an int key and its count),
    /// and that one cut short, or of another operator, is an error and never a panic.
    #[test]
    fn snapshots_are_packed_and_checked() {
        let spec = r#"{"id":"w","kind":"window_aggregate","params":{"window":{"tumbling_ms":1000},"agg":"count"}}"#;
        let mut w = operator(spec);
        let mut out = Vec::new();
        let mut recs: Vec<Record> = (0..20_000)
            .map(|i| Record::keyed(Value::Int(i % 10_000), i / 20, Value::Int(1)))
            .collect();
        w.process(0, &mut recs, &mut out).unwrap();
        let whole = w.snapshot().unwrap();
        assert!(
            whole.len() < 6 * 10_000,
            "{} bytes for 10,000 keys",
            whole.len()
        );
        w.process(0, &mut vec![k("next", 1500, 1)], &mut out)
            .unwrap();
        let changes = w.snapshot_changes().unwrap().unwrap();
        for cut in (0..whole.len())
            .step_by(97)
            .chain(whole.len() - 8..whole.len())
        {
            assert!(
                operator(spec).restore(&whole[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        for cut in 0..changes.len() {
            let mut copy = operator(spec);
            copy.restore(&whole).unwrap();
            assert!(
                copy.restore_changes(&changes[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        let err = operator(spec).restore(&changes).unwrap_err();
        assert_eq!(
            err.to_string(),
            "state: window_aggregate snapshot: format byte 3, expected 2"
        );
        let reduce = operator(r#"{"id":"r","kind":"reduce","params":{"agg":"count"}}"#)
            .snapshot()
            .unwrap();
        assert!(operator(spec).restore(&reduce).is_err());
    }

    /// A snapshot's content, comparable: equal states pack to equal bytes (keys sorted).
    fn canonical(state: &[u8]) -> String {
        format!("{state:?}")
    }

    /// A `window_aggregate` of `spec`, its fields in reach.
    fn window(spec: &str) -> WindowOperator {
        let spec: OperatorSpec = serde_json::from_str(spec).unwrap();
        factory(&spec).unwrap().operator()
    }

    /// Ensures windows at the ends of time are exact or refused by name: a record whose
    /// window would end past the last i64 ms timestamp fails with an error naming its
    /// timestamp (a sliding window's loop stepped past it and ran for ever), and the
    /// largest lateness leaves windows open instead of wrapping around.
    #[test]
    fn windows_at_the_ends_of_time() {
        let spec = |window: &str, lateness: i64| {
            format!(
                r#"{{"id":"w","kind":"window_aggregate","params":{{"window":{window},"allowed_lateness_ms":{lateness},"agg":"count"}}}}"#
            )
        };
        let sliding = spec(r#"{"sliding_ms":10,"slide_ms":5}"#, 0);
        let tumbling = spec(r#"{"tumbling_ms":10}"#, MAX_DURATION_MS);
        let mut out = Vec::new();
        for (spec, ts) in [
            (&sliding, i64::MAX),
            (&sliding, i64::MIN),
            (&tumbling, i64::MAX),
            (&tumbling, i64::MIN),
            (&spec(r#"{"session_gap_ms":10}"#, 0), i64::MAX - 5),
        ] {
            let err = operator(spec)
                .process(0, &mut vec![k("a", ts, 0)], &mut out)
                .unwrap_err();
            assert!(matches!(err, OpError::Data(_)), "{ts}: {err}");
            assert!(
                err.to_string().contains(&format!("timestamp {ts}:")),
                "{err}"
            );
        }
        // The last whole window before the end: [MAX - 17, MAX - 7) for tumbling 10 ms.
        let last = i64::MAX - 8;
        let mut w = operator(&tumbling);
        w.process(0, &mut vec![k("a", last, 0)], &mut out).unwrap();
        w.on_watermark(i64::MAX - 8, &mut out).unwrap();
        assert_eq!(out.len(), 1, "{}", summary(&out).join(" "));
        assert_eq!(out[0].ts, i64::MAX - 8);
        out.clear();
        // A lateness of ~4,000 years keeps the window; a record for it still counts.
        w.process(0, &mut vec![k("a", last - 1, 0)], &mut out)
            .unwrap();
        assert_eq!(out.len(), 1, "the late record re-fires its window");
        let mut s = operator(&spec(r#"{"sliding_ms":10,"slide_ms":5}"#, 0));
        s.process(0, &mut vec![k("a", i64::MIN + 20, 0)], &mut out)
            .unwrap();
    }

    #[test]
    fn rejects_durations_beyond_the_bound() {
        let spec = |params: &str| {
            format!(r#"{{"id":"w","kind":"window_aggregate","params":{{{params},"agg":"count"}}}}"#)
        };
        let e = build_error(&spec(&format!(
            r#""window":{{"tumbling_ms":{}}}"#,
            MAX_DURATION_MS + 1
        )));
        assert_eq!(e.field.as_deref(), Some("params.window.tumbling_ms"));
        let e = build_error(&spec(
            r#""window":{"tumbling_ms":10},"allowed_lateness_ms":18446744073709551615"#,
        ));
        assert_eq!(e.field.as_deref(), Some("params.allowed_lateness_ms"));
        assert!(e.to_string().contains("at most"), "{e}");
        let generator = r#"{"id":"g","kind":"generator","params":{"out_of_orderness_ms":10000000000000000000}}"#;
        let e = build_error(generator);
        assert_eq!(e.field.as_deref(), Some("params.out_of_orderness_ms"));
    }

    #[test]
    fn rejects_bad_window_params() {
        let e = build_error(r#"{"id":"w","kind":"window_aggregate","params":{"agg":"count"}}"#);
        assert_eq!(e.field.as_deref(), Some("params.window"));
        let e = build_error(
            r#"{"id":"w","kind":"window_aggregate","params":{"window":{"tumbling_ms":0},"agg":"count"}}"#,
        );
        assert_eq!(e.field.as_deref(), Some("params.window.tumbling_ms"));
        let e = build_error(
            r#"{"id":"w","kind":"window_aggregate","params":{"window":{"sliding_ms":10},"agg":"count"}}"#,
        );
        assert_eq!(e.field.as_deref(), Some("params.window.slide_ms"));
        let e = build_error(
            r#"{"id":"w","kind":"window_aggregate","params":{"window":{"tumbling_ms":10,"session_gap_ms":3},"agg":"count"}}"#,
        );
        assert_eq!(e.field.as_deref(), Some("params.window"));
        let e = build_error(
            r#"{"id":"w","kind":"window_aggregate","params":{"window":{"tumbling_ms":10},"aggs":[{"agg":"count"},{"agg":"count"}]}}"#,
        );
        assert_eq!(e.field.as_deref(), Some("params.aggs[1]"));
        let e = build_error(
            r#"{"id":"w","kind":"window_aggregate","params":{"window":{"tumbling_ms":10},"agg":"sum","field":"value +"}}"#,
        );
        assert_eq!(e.field.as_deref(), Some("params.agg"));
    }
}
