//! Example jobs and Rust-defined operators.
//!
//! `registry()` is the operator library every binary uses: the engine's built-ins plus the
//! operators defined here in Rust, referenced from a spec by their `kind` name.
//! `EXAMPLES` are the specs under `jobs/examples/`, embedded so binaries and the dashboard
//! can offer them without the source tree.

pub mod clicks;

use std::sync::Arc;

use engine::operator::{
    Instance, KindInfo, OpError, Operator, OperatorFactory, OperatorRegistry, Params, Shape,
    SubtaskContext,
};
use engine::spec::{OperatorSpec, SpecError};
use engine::{Record, Value};

/// The example specs: (file name, JSON text).
pub const EXAMPLES: &[(&str, &str)] = &[
    ("wordcount.json", include_str!("../examples/wordcount.json")),
    (
        "windowed-events.json",
        include_str!("../examples/windowed-events.json"),
    ),
    ("join.json", include_str!("../examples/join.json")),
    (
        "clickstream.json",
        include_str!("../examples/clickstream.json"),
    ),
    (
        "kafka-clicks.json",
        include_str!("../examples/kafka-clicks.json"),
    ),
];

/// The built-in operators plus the Rust-defined ones of this crate.
pub fn registry() -> OperatorRegistry {
    let mut r = OperatorRegistry::builtin();
    r.register(
        "tokenize",
        KindInfo::new(Shape::OneInput, false, build_tokenize),
    );
    r
}

/// `tokenize`: a Rust-defined operator. Splits the string field `params.field` (default
/// `line`) of each record's value into lowercase words of letters and digits, one record per
/// word — what `flat_map` with `words(lower(value.line))` does, but without punctuation.
fn build_tokenize(spec: &OperatorSpec) -> Result<Arc<dyn OperatorFactory>, SpecError> {
    let p = Params::new(spec, &["field"])?;
    Ok(Arc::new(Tokenize {
        field: p.str("field")?.unwrap_or("line").into(),
    }))
}

#[derive(Clone)]
struct Tokenize {
    field: Arc<str>,
}

impl OperatorFactory for Tokenize {
    fn instantiate(&self, _ctx: &SubtaskContext) -> Result<Instance, OpError> {
        Ok(Instance::Operator(Box::new(self.clone())))
    }
}

impl Operator for Tokenize {
    fn process(
        &mut self,
        _input: usize,
        batch: &mut Vec<Record>,
        out: &mut Vec<Record>,
    ) -> Result<(), OpError> {
        for r in batch.drain(..) {
            let Some(text) = r.value.get(&self.field).and_then(Value::as_str) else {
                return Err(OpError::Data(format!(
                    "field '{}' is missing or not a string",
                    self.field
                )));
            };
            for word in text
                .split(|c: char| !c.is_alphanumeric())
                .filter(|w| !w.is_empty())
            {
                out.push(Record {
                    key: r.key.clone(),
                    ts: r.ts,
                    value: Value::from(word.to_lowercase()),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::graph::JobGraph;
    use engine::spec::JobSpec;

    #[test]
    fn examples_are_valid() {
        for (name, text) in EXAMPLES {
            let spec = JobSpec::from_json(text).unwrap_or_else(|e| panic!("{name}: {e}"));
            JobGraph::build(&spec, &registry()).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn tokenize_splits_words() {
        let spec: OperatorSpec = serde_json::from_str(r#"{"id":"t","kind":"tokenize"}"#).unwrap();
        let f = build_tokenize(&spec).unwrap();
        let Instance::Operator(mut op) = f.instantiate(&test_ctx()).unwrap() else {
            panic!()
        };
        let mut batch = vec![Record::new(
            1,
            Value::map([("line", Value::str("Hello, World! hello"))]),
        )];
        let mut out = Vec::new();
        op.process(0, &mut batch, &mut out).unwrap();
        let words: Vec<_> = out.iter().map(|r| r.value.to_string()).collect();
        assert_eq!(words, vec!["\"hello\"", "\"world\"", "\"hello\""]);
        let err = op
            .process(0, &mut vec![Record::new(1, Value::Int(3))], &mut out)
            .unwrap_err();
        assert!(err.to_string().contains("'line'"));
    }

    fn test_ctx() -> SubtaskContext {
        struct Nowhere;
        impl engine::operator::CollectTarget for Nowhere {
            fn deliver(&self, _: &str, _: usize, _: Option<u64>, _: Vec<Record>) {}
        }
        SubtaskContext {
            operator: "t".into(),
            subtask: 0,
            parallelism: 1,
            collect: Arc::new(Nowhere),
            transactional: false,
            attempt: 1,
            job: "test-job".into(),
        }
    }
}
