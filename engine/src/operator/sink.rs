//! Sinks: `collect` (to whoever runs the job, readable over REST later), `file_sink` (JSON
//! lines), `log` (tracing, for small debugging streams) and `discard`.
//!
//! Without checkpoints the sinks write at once. In an exactly-once job (ABS) `collect` and
//! `file_sink` are two-phase: what arrives between two barriers is staged as the output of
//! the next checkpoint (`pre_commit`), kept in the snapshot, and made visible only when that
//! checkpoint completes (`commit`). A restore takes back what the checkpoint had staged and
//! the runtime commits it again — the restore point is a completed checkpoint whose commit
//! may not have happened — so commits are idempotent: the collect target keeps an epoch once,
//! and the file sink knows from the length of its file which staged epochs it already
//! appended. A collect target in another process may not hold an epoch yet when `deliver`
//! returns, so `collect` keeps every delivered epoch in its snapshots until the target says
//! it took it ([`CollectTarget::taken`]).
//!
//! File layout of an exactly-once `file_sink` (per subtask): `path` holds committed lines
//! only; `path.g<attempt>.open` the lines since the last barrier; `path.g<attempt>.<n>` the
//! lines staged for checkpoint `n`. File names carry the deployment attempt, so a fenced-off
//! older attempt (a paused task manager coming back) never writes into a newer one's files.
//! A restored sink must see the files of the attempt it restores from (one machine or a
//! shared filesystem, as Flink's file sink).
//!
//! Without checkpoints a `file_sink` snapshot is the length of the file written and flushed;
//! restoring truncates the file back to it.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::Arc;

use super::{
    decode_state, encode_state, CollectTarget, Instance, OpError, Operator, OperatorFactory,
    Params, SubtaskContext,
};
use crate::record::{CheckpointId, Record};
use crate::spec::{OperatorSpec, SpecError};

/// Which sink, with its validated params.
#[derive(Clone)]
enum SinkKind {
    Collect,
    File { path: String },
    Log,
    Discard,
}

struct SinkFactory(SinkKind);

fn build(
    spec: &OperatorSpec,
    kind: SinkKind,
    known: &[&str],
) -> Result<Arc<dyn OperatorFactory>, SpecError> {
    Params::new(spec, known)?;
    Ok(Arc::new(SinkFactory(kind)))
}

/// Builds a `collect` sink.
pub fn build_collect(spec: &OperatorSpec) -> Result<Arc<dyn OperatorFactory>, SpecError> {
    build(spec, SinkKind::Collect, &[])
}

/// Builds a `file_sink`: `params.path`, with `{subtask}` replaced by the subtask index (or
/// `-<subtask>` appended when the parallelism is above 1 and there is no placeholder).
pub fn build_file_sink(spec: &OperatorSpec) -> Result<Arc<dyn OperatorFactory>, SpecError> {
    let p = Params::new(spec, &["path"])?;
    let path = p.required_str("path")?.to_string();
    build(spec, SinkKind::File { path }, &["path"])
}

/// Builds a `log` sink.
pub fn build_log(spec: &OperatorSpec) -> Result<Arc<dyn OperatorFactory>, SpecError> {
    build(spec, SinkKind::Log, &[])
}

/// Builds a `discard` sink.
pub fn build_discard(spec: &OperatorSpec) -> Result<Arc<dyn OperatorFactory>, SpecError> {
    build(spec, SinkKind::Discard, &[])
}

impl OperatorFactory for SinkFactory {
    fn instantiate(&self, ctx: &SubtaskContext) -> Result<Instance, OpError> {
        let sink: Box<dyn Operator> = match &self.0 {
            SinkKind::Collect => Box::new(Collect {
                target: ctx.collect.clone(),
                operator: ctx.operator.clone(),
                subtask: ctx.subtask,
                staged: ctx.transactional.then(Staged::default),
            }),
            SinkKind::File { path } => {
                let path = if path.contains("{subtask}") {
                    path.replace("{subtask}", &ctx.subtask.to_string())
                } else if ctx.parallelism > 1 {
                    format!("{path}-{}", ctx.subtask)
                } else {
                    path.clone()
                };
                if ctx.transactional {
                    Box::new(TxnFileSink::create(path, ctx.attempt)?)
                } else {
                    Box::new(FileSink::create(path)?)
                }
            }
            SinkKind::Log => Box::new(Log {
                operator: ctx.operator.clone(),
                subtask: ctx.subtask,
            }),
            SinkKind::Discard => Box::new(Discard),
        };
        Ok(Instance::Operator(sink))
    }
}

struct Collect {
    target: Arc<dyn CollectTarget>,
    operator: String,
    subtask: usize,
    /// Exactly-once: records waiting for their checkpoint to complete.
    staged: Option<Staged>,
}

/// A two-phase collect sink's uncommitted records, and the delivered ones its target may
/// not hold yet.
#[derive(Default)]
struct Staged {
    /// Since the last barrier.
    open: Vec<Record>,
    /// Staged per checkpoint, oldest first (only non-empty epochs).
    epochs: Vec<(CheckpointId, Vec<Record>)>,
    /// Delivered, oldest first, kept until the target has taken them
    /// ([`CollectTarget::taken`]): a snapshot taken before that keeps them, so a restore
    /// from it delivers them again (the target keeps the first copy).
    delivered: Vec<(CheckpointId, Vec<Record>)>,
}

impl Collect {
    fn deliver_epochs(&mut self, upto: CheckpointId) {
        let Some(st) = &mut self.staged else {
            return;
        };
        let keep = st.epochs.partition_point(|(n, _)| *n <= upto);
        let unsure = self.target.taken(&self.operator, self.subtask) != Some(CheckpointId::MAX);
        for (n, records) in st.epochs.drain(..keep) {
            if unsure {
                st.delivered.push((n, records.clone()));
            }
            self.target
                .deliver(&self.operator, self.subtask, Some(n), records);
        }
    }

    /// Forgets the delivered epochs the target has taken.
    fn forget_taken(&mut self) {
        let Some(st) = &mut self.staged else {
            return;
        };
        let Some(taken) = self.target.taken(&self.operator, self.subtask) else {
            return;
        };
        let done = st.delivered.partition_point(|(n, _)| *n <= taken);
        st.delivered.drain(..done);
    }
}

impl Operator for Collect {
    fn process(
        &mut self,
        _input: usize,
        batch: &mut Vec<Record>,
        _out: &mut Vec<Record>,
    ) -> Result<(), OpError> {
        match &mut self.staged {
            Some(st) => st.open.append(batch),
            None => self
                .target
                .deliver(&self.operator, self.subtask, None, std::mem::take(batch)),
        }
        Ok(())
    }

    fn pre_commit(&mut self, n: CheckpointId) -> Result<(), OpError> {
        if let Some(st) = &mut self.staged {
            if !st.open.is_empty() {
                st.epochs.push((n, std::mem::take(&mut st.open)));
            }
        }
        Ok(())
    }

    fn commit(&mut self, n: CheckpointId) -> Result<(), OpError> {
        self.forget_taken();
        self.deliver_epochs(n);
        Ok(())
    }

    fn snapshot(&mut self) -> Result<Vec<u8>, OpError> {
        self.forget_taken();
        let Some(st) = &mut self.staged else {
            return Ok(Vec::new());
        };
        // Delivered epochs precede staged ones in one list: a restore stages them all
        // again, and its first commit delivers them in order.
        if st.delivered.is_empty() {
            return encode_state(&st.epochs);
        }
        let delivered = st.delivered.len();
        st.delivered.append(&mut st.epochs);
        let state = encode_state(&st.delivered);
        st.epochs = st.delivered.split_off(delivered);
        state
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), OpError> {
        let Some(st) = &mut self.staged else {
            return Ok(());
        };
        st.open.clear();
        st.delivered.clear();
        st.epochs = decode_state(state)?;
        Ok(())
    }
}

struct FileSink {
    path: String,
    out: BufWriter<File>,
    line: Vec<u8>,
}

impl FileSink {
    fn create(path: String) -> Result<FileSink, OpError> {
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| OpError::Io(format!("cannot create file_sink path '{path}': {e}")))?;
        Ok(FileSink {
            path,
            out: BufWriter::new(file),
            line: Vec::new(),
        })
    }

    fn io(&self, e: std::io::Error) -> OpError {
        OpError::Io(format!("writing '{}': {e}", self.path))
    }
}

/// The JSON-lines form of a record: `{"key":…,"ts":…,"value":…}`.
#[derive(serde::Serialize)]
struct Line<'a> {
    key: &'a Option<crate::Value>,
    ts: i64,
    value: &'a crate::Value,
}

/// Writes `r` as one JSON line (with its newline) into `line`.
fn json_line(r: &Record, line: &mut Vec<u8>) -> Result<(), OpError> {
    line.clear();
    serde_json::to_writer(
        &mut *line,
        &Line {
            key: &r.key,
            ts: r.ts,
            value: &r.value,
        },
    )
    .map_err(|e| OpError::Io(e.to_string()))?;
    line.push(b'\n');
    Ok(())
}

impl Operator for FileSink {
    fn process(
        &mut self,
        _input: usize,
        batch: &mut Vec<Record>,
        _out: &mut Vec<Record>,
    ) -> Result<(), OpError> {
        for r in batch.drain(..) {
            json_line(&r, &mut self.line)?;
            self.out.write_all(&self.line).map_err(|e| self.io(e))?;
        }
        Ok(())
    }

    fn finish(&mut self, _out: &mut Vec<Record>) -> Result<(), OpError> {
        self.out.flush().map_err(|e| self.io(e))
    }

    fn snapshot(&mut self) -> Result<Vec<u8>, OpError> {
        self.out.flush().map_err(|e| self.io(e))?;
        let len = self
            .out
            .get_mut()
            .stream_position()
            .map_err(|e| self.io(e))?;
        encode_state(&len)
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), OpError> {
        let len: u64 = decode_state(state)?;
        let file = OpenOptions::new()
            .write(true)
            .open(&self.path)
            .map_err(|e| self.io(e))?;
        // Drop what was buffered after the snapshot without writing it (a plain drop flushes).
        let stale = std::mem::replace(&mut self.out, BufWriter::new(file));
        drop(stale.into_parts());
        let file = self.out.get_mut();
        file.set_len(len)
            .map_err(|e| OpError::Io(format!("truncating '{}': {e}", self.path)))?;
        file.seek(SeekFrom::Start(len))
            .map_err(|e| OpError::Io(format!("seeking '{}': {e}", self.path)))?;
        Ok(())
    }
}

/// Exactly-once `file_sink`: see the module documentation for the file layout.
struct TxnFileSink {
    /// The committed file.
    path: String,
    attempt: u64,
    /// Lines since the last barrier (`path.g<attempt>.open`).
    open: BufWriter<File>,
    /// Bytes written to `open`.
    open_len: u64,
    /// Staged epochs: (checkpoint, file, bytes), oldest first.
    staged: Vec<(CheckpointId, String, u64)>,
    /// Length of `path` with every epoch committed so far.
    committed_len: u64,
    /// Until a restore or the first commit: `path` still holds an earlier run's output.
    fresh: bool,
    line: Vec<u8>,
}

/// What a `TxnFileSink` snapshot holds.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct TxnFileState {
    committed_len: u64,
    staged: Vec<(CheckpointId, String, u64)>,
}

impl TxnFileSink {
    fn create(path: String, attempt: u64) -> Result<TxnFileSink, OpError> {
        let open_path = format!("{path}.g{attempt}.open");
        let open = File::create(&open_path)
            .map_err(|e| OpError::Io(format!("cannot create file_sink path '{open_path}': {e}")))?;
        Ok(TxnFileSink {
            path,
            attempt,
            open: BufWriter::new(open),
            open_len: 0,
            staged: Vec::new(),
            committed_len: 0,
            fresh: true,
            line: Vec::new(),
        })
    }

    fn io(&self, what: &str, e: std::io::Error) -> OpError {
        OpError::Io(format!("file_sink '{}': {what}: {e}", self.path))
    }

    fn final_file(&self) -> Result<File, OpError> {
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.path)
            .map_err(|e| self.io("opening", e))
    }

    /// Appends staged epochs up to `upto` to the committed file, in order; each one's file
    /// is deleted only after the append is on disk.
    fn commit_upto(&mut self, upto: CheckpointId) -> Result<(), OpError> {
        let mut file = self.final_file()?;
        if self.fresh {
            file.set_len(0).map_err(|e| self.io("truncating", e))?;
            self.fresh = false;
        }
        while let Some((n, staged, len)) = self.staged.first().cloned() {
            if n > upto {
                break;
            }
            append_file(&mut file, self.committed_len, &staged, len)
                .map_err(|e| self.io(&format!("committing checkpoint {n}"), e))?;
            self.committed_len += len;
            self.staged.remove(0);
            std::fs::remove_file(&staged).map_err(|e| self.io("removing staged output", e))?;
        }
        Ok(())
    }

    /// Removes staged and open files of this sink not named in `keep` (output of attempts
    /// or checkpoints that will never commit).
    fn remove_stale(&self, keep: &[String]) {
        let path = PathBuf::from(&self.path);
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            return;
        };
        let prefix = format!("{}.g", name.to_string_lossy());
        let own_open = format!("{}.g{}.open", self.path, self.attempt);
        let dir = if dir.as_os_str().is_empty() {
            std::path::Path::new(".")
        } else {
            dir
        };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().to_string();
            let full = dir.join(&file).to_string_lossy().to_string();
            let full = if path.parent().is_some_and(|p| p.as_os_str().is_empty()) {
                file.clone()
            } else {
                full
            };
            if file.starts_with(&prefix) && full != own_open && !keep.contains(&full) {
                let _ = std::fs::remove_file(dir.join(&file));
            }
        }
    }
}

/// Writes the first `len` bytes of file `from` at offset `at` of `to` and syncs `to`.
fn append_file(to: &mut File, at: u64, from: &str, len: u64) -> std::io::Result<()> {
    to.set_len(at)?;
    to.seek(SeekFrom::Start(at))?;
    let mut src = File::open(from)?.take(len);
    let copied = std::io::copy(&mut src, to)?;
    if copied != len {
        return Err(std::io::Error::other(format!(
            "staged file {from} holds {copied} bytes, expected {len}"
        )));
    }
    to.sync_data()
}

impl Operator for TxnFileSink {
    fn process(
        &mut self,
        _input: usize,
        batch: &mut Vec<Record>,
        _out: &mut Vec<Record>,
    ) -> Result<(), OpError> {
        for r in batch.drain(..) {
            json_line(&r, &mut self.line)?;
            self.open
                .write_all(&self.line)
                .map_err(|e| OpError::Io(format!("writing '{}': {e}", self.path)))?;
            self.open_len += self.line.len() as u64;
        }
        Ok(())
    }

    fn pre_commit(&mut self, n: CheckpointId) -> Result<(), OpError> {
        if self.open_len == 0 {
            return Ok(());
        }
        self.open.flush().map_err(|e| self.io("flushing", e))?;
        self.open
            .get_ref()
            .sync_data()
            .map_err(|e| self.io("syncing", e))?;
        let open_path = format!("{}.g{}.open", self.path, self.attempt);
        let staged = format!("{}.g{}.{n}", self.path, self.attempt);
        std::fs::rename(&open_path, &staged).map_err(|e| self.io("staging", e))?;
        let fresh = File::create(&open_path).map_err(|e| self.io("creating", e))?;
        self.open = BufWriter::new(fresh);
        self.staged.push((n, staged, self.open_len));
        self.open_len = 0;
        Ok(())
    }

    fn commit(&mut self, n: CheckpointId) -> Result<(), OpError> {
        self.commit_upto(n)
    }

    fn snapshot(&mut self) -> Result<Vec<u8>, OpError> {
        encode_state(&TxnFileState {
            committed_len: self.committed_len,
            staged: self.staged.clone(),
        })
    }

    /// Takes back the snapshot's staged epochs. Those whose staged file is gone were
    /// appended before the failure (a staged file goes only after its append is on disk, and
    /// epochs commit in order); the file is cut back to the end of them, and the rest stay
    /// staged for `commit`.
    fn restore(&mut self, state: &[u8]) -> Result<(), OpError> {
        let st: TxnFileState = decode_state(state)?;
        self.fresh = false;
        let file = self.final_file()?;
        let on_disk = file.metadata().map_err(|e| self.io("reading", e))?.len();
        let mut at = st.committed_len;
        let mut staged = Vec::new();
        for (n, path, len) in st.staged {
            let exists = std::path::Path::new(&path).exists();
            if exists {
                staged.push((n, path, len));
            } else if !staged.is_empty() || on_disk < at + len {
                return Err(OpError::Io(format!(
                    "file_sink '{}': the output of checkpoint {n} is neither staged nor committed ({on_disk} bytes on disk, expected at least {})",
                    self.path,
                    at + len
                )));
            } else {
                at += len;
            }
        }
        file.set_len(at).map_err(|e| self.io("truncating", e))?;
        file.sync_data().map_err(|e| self.io("syncing", e))?;
        self.committed_len = at;
        let keep: Vec<String> = staged.iter().map(|(_, p, _)| p.clone()).collect();
        self.staged = staged;
        self.remove_stale(&keep);
        Ok(())
    }
}

struct Log {
    operator: String,
    subtask: usize,
}

impl Operator for Log {
    fn process(
        &mut self,
        _input: usize,
        batch: &mut Vec<Record>,
        _out: &mut Vec<Record>,
    ) -> Result<(), OpError> {
        for r in batch.drain(..) {
            tracing::info!(operator = %self.operator, subtask = self.subtask, key = ?r.key, ts = r.ts, value = %r.value, "Record.");
        }
        Ok(())
    }
}

struct Discard;

impl Operator for Discard {
    fn record_driven(&self) -> bool {
        true
    }

    fn process(
        &mut self,
        _input: usize,
        batch: &mut Vec<Record>,
        _out: &mut Vec<Record>,
    ) -> Result<(), OpError> {
        batch.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::testing::{ctx, factory, operator, Collected};
    use crate::Value;

    fn recs(n: i64) -> Vec<Record> {
        (0..n).map(|i| Record::new(i, Value::Int(i))).collect()
    }

    #[test]
    fn collect_delivers_to_target() {
        let target = Arc::new(Collected::default());
        let mut c = ctx(1, 2);
        c.collect = target.clone();
        c.operator = "out".into();
        let Instance::Operator(mut op) = factory(r#"{"id":"out","kind":"collect"}"#)
            .instantiate(&c)
            .unwrap()
        else {
            panic!()
        };
        op.process(0, &mut recs(3), &mut Vec::new()).unwrap();
        let got = target.0.lock().unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(
            got[2],
            ("out".to_string(), 1, None, Record::new(2, Value::Int(2)))
        );
    }

    #[test]
    fn discard_and_log_consume() {
        for kind in ["discard", "log"] {
            let mut op = operator(&format!(r#"{{"id":"d","kind":"{kind}"}}"#));
            let mut b = recs(5);
            let mut out = Vec::new();
            op.process(0, &mut b, &mut out).unwrap();
            assert!(b.is_empty() && out.is_empty());
        }
    }

    fn file_sink_spec(path: &std::path::Path) -> String {
        format!(
            r#"{{"id":"f","kind":"file_sink","params":{{"path":"{}"}}}}"#,
            path.display()
        )
    }

    /// Ensures the file sink writes JSON lines and that restore truncates to the snapshot.
    #[test]
    fn file_sink_writes_and_restores() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out-{subtask}.jsonl");
        let spec = file_sink_spec(&path);
        let mut op = operator(&spec);
        op.process(0, &mut recs(2), &mut Vec::new()).unwrap();
        let snap = op.snapshot().unwrap();
        op.process(0, &mut recs(3), &mut Vec::new()).unwrap();
        op.restore(&snap).unwrap();
        op.process(
            0,
            &mut vec![Record::keyed(Value::str("k"), 9, Value::Int(9))],
            &mut Vec::new(),
        )
        .unwrap();
        op.finish(&mut Vec::new()).unwrap();
        let text = std::fs::read_to_string(dir.path().join("out-0.jsonl")).unwrap();
        assert_eq!(
            text,
            "{\"key\":null,\"ts\":0,\"value\":0}\n{\"key\":null,\"ts\":1,\"value\":1}\n{\"key\":\"k\",\"ts\":9,\"value\":9}\n"
        );
    }

    fn txn_instance(json: &str, attempt: u64, target: Arc<dyn CollectTarget>) -> Box<dyn Operator> {
        let mut c = ctx(0, 1);
        c.collect = target;
        c.operator = "out".into();
        c.transactional = true;
        c.attempt = attempt;
        match factory(json).instantiate(&c).unwrap() {
            Instance::Operator(op) => op,
            Instance::Source(_) => panic!("not a sink"),
        }
    }

    fn delivered(target: &Collected) -> Vec<(Option<CheckpointId>, i64)> {
        let got = target.0.lock().unwrap();
        got.iter().map(|(_, _, epoch, r)| (*epoch, r.ts)).collect()
    }

    /// Ensures the exactly-once collect sink delivers an epoch only when its checkpoint
    /// completes, tagged with the checkpoint, and delivers it again on restore (the target
    /// keeps the first copy), never the records after the restored barrier.
    #[test]
    fn transactional_collect_commits_on_completion() {
        let spec = r#"{"id":"out","kind":"collect"}"#;
        let target = Arc::new(Collected::default());
        let mut op = txn_instance(spec, 1, target.clone());
        op.process(0, &mut recs(2), &mut Vec::new()).unwrap();
        op.pre_commit(1).unwrap();
        let snap = op.snapshot().unwrap();
        op.process(0, &mut vec![Record::new(7, Value::Int(7))], &mut Vec::new())
            .unwrap();
        assert!(
            delivered(&target).is_empty(),
            "nothing visible before completion"
        );
        op.commit(1).unwrap();
        assert_eq!(delivered(&target), vec![(Some(1), 0), (Some(1), 1)]);
        op.commit(1).unwrap();
        assert_eq!(delivered(&target).len(), 2, "a commit happens once");

        let again = Arc::new(Collected::default());
        let mut restored = txn_instance(spec, 2, again.clone());
        restored.restore(&snap).unwrap();
        assert!(
            delivered(&again).is_empty(),
            "a restore alone commits nothing"
        );
        restored.commit(CheckpointId::MAX).unwrap();
        assert_eq!(delivered(&again), vec![(Some(1), 0), (Some(1), 1)]);
    }

    /// A collect target in another process: it holds an epoch only once it says so.
    #[derive(Default)]
    struct Remote {
        got: Collected,
        taken: std::sync::Mutex<Option<CheckpointId>>,
    }

    impl CollectTarget for Remote {
        fn deliver(&self, op: &str, subtask: usize, epoch: Option<u64>, records: Vec<Record>) {
            self.got.deliver(op, subtask, epoch, records);
        }

        fn taken(&self, _operator: &str, _subtask: usize) -> Option<CheckpointId> {
            *self.taken.lock().unwrap()
        }
    }

    /// Ensures a delivered epoch stays in the collect sink's snapshots until its target has
    /// taken it: a restore from a snapshot taken in between delivers it again (its first
    /// delivery may have died with the process), and one taken after does not.
    #[test]
    fn collect_keeps_delivered_epochs_until_taken() {
        let spec = r#"{"id":"out","kind":"collect"}"#;
        let target = Arc::new(Remote::default());
        let mut op = txn_instance(spec, 1, target.clone());
        op.process(0, &mut recs(2), &mut Vec::new()).unwrap();
        op.pre_commit(1).unwrap();
        op.commit(1).unwrap();
        assert_eq!(delivered(&target.got), vec![(Some(1), 0), (Some(1), 1)]);
        op.process(0, &mut vec![Record::new(5, Value::Int(5))], &mut Vec::new())
            .unwrap();
        op.pre_commit(2).unwrap();
        let before = op.snapshot().unwrap();
        *target.taken.lock().unwrap() = Some(1);
        let after = op.snapshot().unwrap();

        let restore = |snap: &[u8]| {
            let again = Arc::new(Collected::default());
            let mut restored = txn_instance(spec, 2, again.clone());
            restored.restore(snap).unwrap();
            restored.commit(CheckpointId::MAX).unwrap();
            delivered(&again)
        };
        assert_eq!(
            restore(&before),
            vec![(Some(1), 0), (Some(1), 1), (Some(2), 5)],
            "an epoch not taken yet is delivered again, before the staged one"
        );
        assert_eq!(restore(&after), vec![(Some(2), 5)]);
        op.commit(2).unwrap();
        assert_eq!(
            delivered(&target.got).len(),
            3,
            "no epoch twice from one run"
        );
    }

    fn read(path: &std::path::Path) -> String {
        std::fs::read_to_string(path).unwrap_or_default()
    }

    /// Ensures the exactly-once file sink shows only committed lines, commits a staged epoch
    /// on restore exactly once whether or not the failed attempt had committed it, truncates
    /// an earlier run's file, and leaves no staged files behind.
    #[test]
    fn transactional_file_sink_commits_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        std::fs::write(&path, "output of an earlier run\n").unwrap();
        let spec = file_sink_spec(&path);
        let none = Arc::new(Collected::default());
        let line = |ts: i64| format!("{{\"key\":null,\"ts\":{ts},\"value\":{ts}}}\n");

        let mut op = txn_instance(&spec, 1, none.clone());
        op.process(0, &mut recs(2), &mut Vec::new()).unwrap();
        op.pre_commit(1).unwrap();
        let snap1 = op.snapshot().unwrap();
        op.process(0, &mut vec![Record::new(2, Value::Int(2))], &mut Vec::new())
            .unwrap();
        op.pre_commit(2).unwrap();
        let snap2 = op.snapshot().unwrap();
        op.process(0, &mut vec![Record::new(9, Value::Int(9))], &mut Vec::new())
            .unwrap();
        assert_eq!(
            read(&path),
            "output of an earlier run\n",
            "nothing committed yet"
        );
        op.commit(1).unwrap();
        assert_eq!(read(&path), line(0) + &line(1));

        // Attempt 2 restores checkpoint 2: epoch 1 was committed, epoch 2 only staged, and
        // the record after barrier 2 (ts 9) was never part of a checkpoint.
        let mut second = txn_instance(&spec, 2, none.clone());
        second.restore(&snap2).unwrap();
        assert_eq!(
            read(&path),
            line(0) + &line(1),
            "a restore alone commits nothing"
        );
        second.commit(CheckpointId::MAX).unwrap();
        assert_eq!(read(&path), line(0) + &line(1) + &line(2));
        second
            .process(0, &mut vec![Record::new(3, Value::Int(3))], &mut Vec::new())
            .unwrap();
        second.pre_commit(3).unwrap();
        second.commit(3).unwrap();
        let all = line(0) + &line(1) + &line(2) + &line(3);
        assert_eq!(read(&path), all);

        // Restoring an older checkpoint whose epoch was already appended does not append it
        // again (its staged file is gone), and cuts what came later.
        let mut third = txn_instance(&spec, 3, none);
        third.restore(&snap1).unwrap();
        third.commit(CheckpointId::MAX).unwrap();
        assert_eq!(read(&path), line(0) + &line(1));
        drop((op, second, third));
        let leftovers: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n != "out.jsonl" && !n.ends_with(".g3.open"))
            .collect();
        assert!(leftovers.is_empty(), "stale staged files: {leftovers:?}");
    }

    /// Ensures a restored file sink commits only up to the bound it is given (a DCAS job's
    /// last completed fallback checkpoint): later staged epochs stay staged, survive the
    /// restore, and commit in order when a later bound allows them.
    #[test]
    fn transactional_file_sink_commits_up_to_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let spec = file_sink_spec(&path);
        let none = Arc::new(Collected::default());
        let line = |ts: i64| format!("{{\"key\":null,\"ts\":{ts},\"value\":{ts}}}\n");
        let mut op = txn_instance(&spec, 1, none.clone());
        for n in 1..=3 {
            op.process(0, &mut vec![Record::new(n, Value::Int(n))], &mut Vec::new())
                .unwrap();
            op.pre_commit(n as CheckpointId).unwrap();
        }
        op.commit(1).unwrap();
        let snap = op.snapshot().unwrap();
        drop(op);

        // The same deployment attempt restarts (a DCAS restart keeps the generation).
        let mut again = txn_instance(&spec, 1, none);
        again.restore(&snap).unwrap();
        again.commit(2).unwrap();
        assert_eq!(read(&path), line(1) + &line(2), "epoch 3 is past the bound");
        again.commit(3).unwrap();
        assert_eq!(read(&path), line(1) + &line(2) + &line(3));
    }

    #[test]
    fn file_sink_unwritable_path_names_it() {
        let spec = r#"{"id":"f","kind":"file_sink","params":{"path":"/nonexistent-dir/x.jsonl"}}"#;
        let err = factory(spec).instantiate(&ctx(0, 1)).err().unwrap();
        assert!(
            err.to_string().contains("/nonexistent-dir/x.jsonl"),
            "{err}"
        );
    }
}
