//! Sinks: `collect` (to whoever runs the job, readable over REST later), `file_sink` (JSON
//! lines), `log` (tracing, for small debugging streams) and `discard`.
//!
//! A `file_sink` snapshot is the length of the file it has written and flushed; restoring
//! truncates the file back to it, so output written after the snapshot is not duplicated when
//! the records are produced again.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::sync::Arc;

use super::{
    decode_state, encode_state, CollectTarget, Instance, OpError, Operator, OperatorFactory,
    Params, SubtaskContext,
};
use crate::record::Record;
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
            }),
            SinkKind::File { path } => {
                let path = if path.contains("{subtask}") {
                    path.replace("{subtask}", &ctx.subtask.to_string())
                } else if ctx.parallelism > 1 {
                    format!("{path}-{}", ctx.subtask)
                } else {
                    path.clone()
                };
                Box::new(FileSink::create(path)?)
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
}

impl Operator for Collect {
    fn process(
        &mut self,
        _input: usize,
        batch: &mut Vec<Record>,
        _out: &mut Vec<Record>,
    ) -> Result<(), OpError> {
        self.target
            .deliver(&self.operator, self.subtask, std::mem::take(batch));
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

impl Operator for FileSink {
    fn process(
        &mut self,
        _input: usize,
        batch: &mut Vec<Record>,
        _out: &mut Vec<Record>,
    ) -> Result<(), OpError> {
        for r in batch.drain(..) {
            self.line.clear();
            serde_json::to_writer(
                &mut self.line,
                &Line {
                    key: &r.key,
                    ts: r.ts,
                    value: &r.value,
                },
            )
            .map_err(|e| OpError::Io(e.to_string()))?;
            self.line.push(b'\n');
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
            ("out".to_string(), 1, Record::new(2, Value::Int(2)))
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

    /// Ensures the file sink writes JSON lines and that restore truncates to the snapshot.
    #[test]
    fn file_sink_writes_and_restores() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out-{subtask}.jsonl");
        let spec = format!(
            r#"{{"id":"f","kind":"file_sink","params":{{"path":"{}"}}}}"#,
            path.display()
        );
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
