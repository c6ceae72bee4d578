//! `JobGraph`: a validated spec turned into tasks (operator chains) and exchanges.
//!
//! [`JobGraph::build`] is the one place a spec is validated against the operator library:
//! kinds, inputs, cycles, parallelism, partitioning and every operator's params. Operators
//! are fused into one task when connected by a `forward` exchange with equal parallelism and
//! the upstream has no other consumer (Flink's operator chaining); a task subtask is one actor.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use crate::expr::Expr;
use crate::operator::{OperatorFactory, OperatorRegistry, Shape};
use crate::spec::{CheckpointingSpec, JobSpec, RuntimeSpec, SpecError};
use crate::value::Value;

/// Number of key groups: the unit of keyed state and the upper bound of parallelism of
/// keyed operators (as Flink's max parallelism), so state can be rescaled later.
pub const KEY_GROUPS: u32 = 128;

/// Highest parallelism an operator may have.
pub const MAX_PARALLELISM: u32 = KEY_GROUPS;

/// How records of an edge are distributed over the downstream subtasks.
#[derive(Clone, Debug)]
pub enum Exchange {
    /// Subtask `i` sends to subtask `i` (equal parallelism).
    Forward,
    /// Round-robin, record by record.
    Rebalance,
    /// Every record to every subtask.
    Broadcast,
    /// By the hash of the record key (`None`) or of an expression, through key groups.
    Hash(Option<Expr>),
}

impl Exchange {
    /// Parses a `partition` field.
    pub fn parse(s: &str) -> Result<Exchange, String> {
        let t = s.trim();
        match t {
            "forward" => Ok(Exchange::Forward),
            "rebalance" => Ok(Exchange::Rebalance),
            "broadcast" => Ok(Exchange::Broadcast),
            "hash" | "hash(key)" => Ok(Exchange::Hash(None)),
            _ if t.starts_with("hash(") && t.ends_with(')') => {
                let inner = &t[5..t.len() - 1];
                Expr::compile(inner).map(|e| Exchange::Hash(Some(e))).map_err(|e| format!("invalid expression '{inner}': {e}"))
            }
            _ => Err(format!("unknown partitioning '{t}' (expected forward, rebalance, broadcast, hash or hash(<expr>))")),
        }
    }

    /// Short name for plans and the dashboard.
    pub fn name(&self) -> String {
        match self {
            Exchange::Forward => "forward".into(),
            Exchange::Rebalance => "rebalance".into(),
            Exchange::Broadcast => "broadcast".into(),
            Exchange::Hash(None) => "hash".into(),
            Exchange::Hash(Some(e)) => format!("hash({})", e.source()),
        }
    }
}

/// Downstream subtask of a key hash under `parallelism`, through key groups.
#[inline]
pub fn subtask_for_hash(hash: u64, parallelism: usize) -> usize {
    let group = (hash % KEY_GROUPS as u64) as usize;
    group * parallelism / KEY_GROUPS as usize
}

/// Downstream subtask of a key.
#[inline]
pub fn subtask_for_key(key: &Value, parallelism: usize) -> usize {
    subtask_for_hash(key.stable_hash(), parallelism)
}

/// One operator of the job.
pub struct Vertex {
    /// Operator id.
    pub id: String,
    /// Operator kind.
    pub kind: String,
    /// Parallelism.
    pub parallelism: usize,
    /// Inputs and outputs.
    pub shape: Shape,
    /// Creates subtask instances.
    pub factory: Arc<dyn OperatorFactory>,
    /// Upstream vertex index and exchange, per input.
    pub inputs: Vec<(usize, Exchange)>,
    /// Slot sharing group.
    pub slot_group: String,
}

/// A chain of operators run by one actor per subtask.
#[derive(Clone, Debug)]
pub struct Task {
    /// Vertex indices, head first.
    pub vertices: Vec<usize>,
    /// Parallelism of every vertex of the chain.
    pub parallelism: usize,
    /// Operator ids joined by " -> ".
    pub name: String,
    /// Slot sharing group of its operators.
    pub slot_group: String,
}

/// A connection between two tasks.
#[derive(Clone, Debug)]
pub struct Edge {
    /// Upstream task index.
    pub from: usize,
    /// Downstream task index.
    pub to: usize,
    /// Which input of the downstream head operator this feeds (0, or 1 for a join's right).
    pub input: usize,
    /// Distribution.
    pub exchange: Exchange,
}

/// A validated, runnable job.
pub struct JobGraph {
    /// Job name.
    pub name: String,
    /// Operators, in topological order.
    pub vertices: Vec<Vertex>,
    /// Operator chains, in topological order.
    pub tasks: Vec<Task>,
    /// Task-to-task connections.
    pub edges: Vec<Edge>,
    /// Batching and credits.
    pub runtime: RuntimeSpec,
    /// Fault tolerance settings.
    pub checkpointing: Option<CheckpointingSpec>,
}

impl JobGraph {
    /// Validates `spec` against `registry` and builds the graph.
    pub fn build(spec: &JobSpec, registry: &OperatorRegistry) -> Result<JobGraph, SpecError> {
        if spec.operators.is_empty() {
            return Err(SpecError::job(
                "operators",
                "a job needs at least one operator",
            ));
        }
        if let Some(c) = &spec.checkpointing {
            c.validate()?;
        }
        if spec.runtime.batch_size == 0 || spec.runtime.batch_size > 1 << 20 {
            return Err(SpecError::job(
                "runtime.batch_size",
                "must be between 1 and 1048576",
            ));
        }
        if spec.runtime.credits == 0 || spec.runtime.credits > 1024 {
            return Err(SpecError::job(
                "runtime.credits",
                "must be between 1 and 1024",
            ));
        }
        let mut index: HashMap<&str, usize> = HashMap::new();
        for (i, op) in spec.operators.iter().enumerate() {
            if op.id.trim().is_empty() {
                return Err(SpecError::job(
                    format!("operators[{i}].id"),
                    "must not be empty",
                ));
            }
            if index.insert(op.id.as_str(), i).is_some() {
                return Err(SpecError::field(&op.id, "id", "duplicate operator id"));
            }
        }
        let mut shapes = Vec::with_capacity(spec.operators.len());
        for op in &spec.operators {
            let info = registry.get(&op.kind).ok_or_else(|| {
                SpecError::field(
                    &op.id,
                    "kind",
                    format!(
                        "unknown operator kind '{}' (known: {})",
                        op.kind,
                        registry.names().join(", ")
                    ),
                )
            })?;
            match op.parallelism() {
                0 => {
                    return Err(SpecError::field(
                        &op.id,
                        "parallelism",
                        "must be at least 1",
                    ))
                }
                p if p > MAX_PARALLELISM => {
                    return Err(SpecError::field(
                        &op.id,
                        "parallelism",
                        format!("must be at most {MAX_PARALLELISM}"),
                    ))
                }
                _ => {}
            }
            let inputs = op.inputs();
            let want = info.shape.inputs();
            if inputs.len() != want {
                let msg = match (want, inputs.len()) {
                    (0, _) => format!("a {} is a source and takes no input", op.kind),
                    (_, 0) => "is required".to_string(),
                    _ => format!("{} takes {want} input(s), got {}", op.kind, inputs.len()),
                };
                return Err(SpecError::field(&op.id, "input", msg));
            }
            for up in &inputs {
                let Some(&u) = index.get(up) else {
                    return Err(SpecError::field(
                        &op.id,
                        "input",
                        format!("unknown operator '{up}'"),
                    ));
                };
                if registry.get(&spec.operators[u].kind).map(|k| k.shape) == Some(Shape::Sink) {
                    return Err(SpecError::field(
                        &op.id,
                        "input",
                        format!("'{up}' is a sink and has no output"),
                    ));
                }
            }
            if op.partition.is_some() && want == 0 {
                return Err(SpecError::field(
                    &op.id,
                    "partition",
                    "a source has no input to partition",
                ));
            }
            shapes.push(*info);
        }
        let order = topological_order(spec, &index)?;

        // Vertices in topological order, with inputs and exchanges resolved.
        let mut position = vec![0usize; spec.operators.len()];
        for (pos, &i) in order.iter().enumerate() {
            position[i] = pos;
        }
        let mut vertices = Vec::with_capacity(order.len());
        for &i in &order {
            let op = &spec.operators[i];
            let info = shapes[i];
            let p = op.parallelism() as usize;
            let group = op.slot_group();
            if group.is_empty()
                || group.len() > 64
                || !group
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(SpecError::field(
                    &op.id,
                    "slot_sharing_group",
                    "must be 1 to 64 letters, digits, '-' or '_'",
                ));
            }
            let mut inputs = Vec::new();
            for up in op.inputs() {
                let u = index[up];
                let up_p = spec.operators[u].parallelism() as usize;
                let exchange = match &op.partition {
                    Some(s) => {
                        Exchange::parse(s).map_err(|m| SpecError::field(&op.id, "partition", m))?
                    }
                    None if info.keyed => Exchange::Hash(None),
                    None if up_p == p => Exchange::Forward,
                    None => Exchange::Rebalance,
                };
                if matches!(exchange, Exchange::Forward) && up_p != p {
                    return Err(SpecError::field(
                        &op.id,
                        "partition",
                        format!("forward needs equal parallelism, but '{up}' has {up_p} and '{}' has {p}", op.id),
                    ));
                }
                inputs.push((position[u], exchange));
            }
            let factory = (info.build)(op)?;
            vertices.push(Vertex {
                id: op.id.clone(),
                kind: op.kind.clone(),
                parallelism: p,
                shape: info.shape,
                factory,
                inputs,
                slot_group: group.to_string(),
            });
        }

        let (tasks, edges) = chain(&vertices);
        Ok(JobGraph {
            name: spec.name.clone(),
            vertices,
            tasks,
            edges,
            runtime: spec.runtime.clone(),
            checkpointing: spec.checkpointing.clone(),
        })
    }

    /// The job's slots: (slot sharing group, index) pairs, groups in order of first
    /// appearance, each as many as its highest parallelism. Subtask `s` of task `t` runs in
    /// slot `(tasks[t].slot_group, s)`.
    pub fn slots(&self) -> Vec<(String, usize)> {
        let mut groups: Vec<(String, usize)> = Vec::new();
        for t in &self.tasks {
            match groups.iter_mut().find(|(g, _)| *g == t.slot_group) {
                Some((_, n)) => *n = (*n).max(t.parallelism),
                None => groups.push((t.slot_group.clone(), t.parallelism)),
            }
        }
        groups
            .into_iter()
            .flat_map(|(g, n)| (0..n).map(move |i| (g.clone(), i)))
            .collect()
    }

    /// Index of the task containing vertex `v`.
    pub fn task_of(&self, v: usize) -> usize {
        self.tasks
            .iter()
            .position(|t| t.vertices.contains(&v))
            .unwrap_or(usize::MAX)
    }

    /// A one-line-per-task description of the plan.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        for (i, t) in self.tasks.iter().enumerate() {
            let inputs: Vec<String> = self
                .edges
                .iter()
                .filter(|e| e.to == i)
                .map(|e| format!("{} <- task {} ({})", e.input, e.from, e.exchange.name()))
                .collect();
            s.push_str(&format!(
                "task {i}: [{}] x{}  inputs: {}\n",
                t.name,
                t.parallelism,
                inputs.join(", ")
            ));
        }
        s
    }
}

/// Kahn's algorithm; on a cycle, names an operator on it and the cycle's path.
fn topological_order(
    spec: &JobSpec,
    index: &HashMap<&str, usize>,
) -> Result<Vec<usize>, SpecError> {
    let n = spec.operators.len();
    let mut indegree = vec![0usize; n];
    let mut consumers: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, op) in spec.operators.iter().enumerate() {
        for up in op.inputs() {
            indegree[i] += 1;
            consumers[index[up]].push(i);
        }
    }
    let mut ready: Vec<usize> = (0..n).filter(|&i| indegree[i] == 0).rev().collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = ready.pop() {
        order.push(i);
        for &c in consumers[i].iter().rev() {
            indegree[c] -= 1;
            if indegree[c] == 0 {
                ready.push(c);
            }
        }
    }
    if order.len() == n {
        return Ok(order);
    }
    // Walk inputs from a vertex left on the cycle until one repeats.
    let left: HashSet<usize> = (0..n).filter(|i| indegree[*i] > 0).collect();
    let mut path = vec![*left.iter().min().unwrap_or(&0)];
    loop {
        let cur = path[path.len() - 1];
        let next = spec.operators[cur]
            .inputs()
            .iter()
            .map(|u| index[u])
            .find(|u| left.contains(u))
            .unwrap_or(cur);
        if let Some(start) = path.iter().position(|&p| p == next) {
            let mut cycle: Vec<&str> = path[start..]
                .iter()
                .rev()
                .map(|&i| spec.operators[i].id.as_str())
                .collect();
            cycle.push(cycle[0]);
            let op = &spec.operators[path[start]].id;
            return Err(SpecError::field(
                op,
                "input",
                format!("forms a cycle: {}", cycle.join(" -> ")),
            ));
        }
        path.push(next);
    }
}

/// Fuses vertices into tasks and derives task edges.
fn chain(vertices: &[Vertex]) -> (Vec<Task>, Vec<Edge>) {
    let mut consumers: BTreeMap<usize, usize> = BTreeMap::new();
    for v in vertices {
        for (u, _) in &v.inputs {
            *consumers.entry(*u).or_default() += 1;
        }
    }
    let mut task_of = vec![usize::MAX; vertices.len()];
    let mut tasks: Vec<Task> = Vec::new();
    for (i, v) in vertices.iter().enumerate() {
        let chained_to = match v.inputs.as_slice() {
            [(u, Exchange::Forward)]
                if vertices[*u].parallelism == v.parallelism
                    && vertices[*u].slot_group == v.slot_group
                    && consumers.get(u) == Some(&1)
                    && vertices[*u].shape != Shape::Sink =>
            {
                Some(task_of[*u])
            }
            _ => None,
        };
        match chained_to {
            Some(t) => {
                tasks[t].vertices.push(i);
                tasks[t].name.push_str(&format!(" -> {}", v.id));
                task_of[i] = t;
            }
            None => {
                task_of[i] = tasks.len();
                tasks.push(Task {
                    vertices: vec![i],
                    parallelism: v.parallelism,
                    name: v.id.clone(),
                    slot_group: v.slot_group.clone(),
                });
            }
        }
    }
    let mut edges = Vec::new();
    for (i, v) in vertices.iter().enumerate() {
        if tasks[task_of[i]].vertices[0] != i {
            continue;
        }
        for (input, (u, ex)) in v.inputs.iter().enumerate() {
            edges.push(Edge {
                from: task_of[*u],
                to: task_of[i],
                input,
                exchange: ex.clone(),
            });
        }
    }
    (tasks, edges)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(json: &str) -> Result<JobGraph, SpecError> {
        JobGraph::build(&JobSpec::from_json(json)?, &OperatorRegistry::builtin())
    }

    fn err(json: &str) -> SpecError {
        match build(json) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e,
        }
    }

    fn job(ops: &str) -> String {
        format!(r#"{{"name":"t","operators":[{ops}]}}"#)
    }

    const SRC: &str = r#"{"id":"src","kind":"generator","parallelism":2,"params":{"count":10}}"#;

    /// Ensures operators of different slot sharing groups are not chained, and that the
    /// job's slots are each group's highest parallelism, groups in order.
    #[test]
    fn slot_sharing_groups_split_chains_and_slots() {
        let g = build(
            r#"{"name":"j","operators":[
            {"id":"src","kind":"generator","parallelism":2},
            {"id":"m","kind":"map","input":"src","parallelism":2,"params":{"expr":"value"},"slot_sharing_group":"maps"},
            {"id":"out","kind":"discard","input":"m","parallelism":3}]}"#,
        )
        .unwrap();
        assert_eq!(g.tasks.len(), 3, "{}", g.describe());
        let slots: Vec<(String, usize)> = g.slots();
        assert_eq!(
            slots,
            vec![
                ("default".to_string(), 0),
                ("default".to_string(), 1),
                ("default".to_string(), 2),
                ("maps".to_string(), 0),
                ("maps".to_string(), 1),
            ]
        );
        let e = err(
            r#"{"name":"j","operators":[{"id":"src","kind":"generator","slot_sharing_group":"a b"}]}"#,
        );
        assert_eq!(
            (e.operator.as_deref(), e.field.as_deref()),
            (Some("src"), Some("slot_sharing_group"))
        );
    }

    #[test]
    fn wordcount_chains_and_hashes() {
        let g = build(&job(&format!(
            r#"{SRC},
            {{"id":"split","kind":"flat_map","input":"src","parallelism":2,"params":{{"expr":"split(value.line,' ')"}}}},
            {{"id":"kb","kind":"key_by","input":"split","parallelism":2,"params":{{"expr":"value"}}}},
            {{"id":"count","kind":"window_aggregate","input":"kb","parallelism":2,"params":{{"window":{{"tumbling_ms":1000}},"agg":"count"}}}},
            {{"id":"out","kind":"collect","input":"count","parallelism":2}}"#
        )))
        .unwrap();
        assert_eq!(g.tasks.len(), 2);
        assert_eq!(g.tasks[0].name, "src -> split -> kb");
        assert_eq!(g.tasks[1].name, "count -> out");
        assert_eq!(g.edges.len(), 1);
        assert!(matches!(g.edges[0].exchange, Exchange::Hash(None)));
    }

    #[test]
    fn no_chaining_across_fan_out_or_parallelism_change() {
        let g = build(&job(&format!(
            r#"{SRC},
            {{"id":"a","kind":"discard","input":"src","parallelism":2}},
            {{"id":"b","kind":"map","input":"src","parallelism":2,"params":{{"expr":"value"}}}},
            {{"id":"c","kind":"discard","input":"b"}}"#
        )))
        .unwrap();
        // src has two consumers: nothing chains to it; b -> c changes parallelism.
        assert_eq!(g.tasks.len(), 4);
        let e = g.edges.iter().find(|e| g.tasks[e.to].name == "c").unwrap();
        assert!(matches!(e.exchange, Exchange::Rebalance));
    }

    #[test]
    fn join_has_two_inputs_in_order() {
        let g = build(&job(r#"{"id":"l","kind":"generator","params":{"count":1}},
               {"id":"r","kind":"generator","params":{"count":1}},
               {"id":"j","kind":"join","input":["r","l"],"params":{"window":{"tumbling_ms":10}}},
               {"id":"o","kind":"collect","input":"j"}"#))
        .unwrap();
        let j = g.tasks.iter().position(|t| t.name == "j -> o").unwrap();
        let mut ins: Vec<(usize, String)> = g
            .edges
            .iter()
            .filter(|e| e.to == j)
            .map(|e| (e.input, g.tasks[e.from].name.clone()))
            .collect();
        ins.sort();
        assert_eq!(ins, vec![(0, "r".to_string()), (1, "l".to_string())]);
    }

    /// Ensures each rejection names the operator and the field.
    #[test]
    fn rejections_name_operator_and_field() {
        let cases: Vec<(String, Option<&str>, &str, &str)> = vec![
            (
                job(r#"{"id":"a","kind":"teleport"}"#),
                Some("a"),
                "kind",
                "unknown operator kind 'teleport'",
            ),
            (
                job(&format!(
                    r#"{SRC},{{"id":"m","kind":"map","params":{{"expr":"value"}}}}"#
                )),
                Some("m"),
                "input",
                "is required",
            ),
            (
                job(&format!(
                    r#"{SRC},{{"id":"m","kind":"map","input":"nope","params":{{"expr":"value"}}}}"#
                )),
                Some("m"),
                "input",
                "unknown operator 'nope'",
            ),
            (
                job(&format!(r#"{SRC},{SRC}"#)),
                Some("src"),
                "id",
                "duplicate operator id",
            ),
            (
                job(r#"{"id":"g","kind":"generator","parallelism":0}"#),
                Some("g"),
                "parallelism",
                "at least 1",
            ),
            (
                job(r#"{"id":"g","kind":"generator","parallelism":1000}"#),
                Some("g"),
                "parallelism",
                "at most 128",
            ),
            (
                job(&format!(
                    r#"{SRC},{{"id":"m","kind":"map","input":"src","partition":"hash(value +)","params":{{"expr":"value"}}}}"#
                )),
                Some("m"),
                "partition",
                "invalid expression",
            ),
            (
                job(&format!(
                    r#"{SRC},{{"id":"m","kind":"map","input":"src","partition":"sideways","params":{{"expr":"value"}}}}"#
                )),
                Some("m"),
                "partition",
                "unknown partitioning",
            ),
            (
                job(&format!(
                    r#"{SRC},{{"id":"m","kind":"map","input":"src","partition":"forward","params":{{"expr":"value"}}}}"#
                )),
                Some("m"),
                "partition",
                "forward needs equal parallelism",
            ),
            (
                job(&format!(
                    r#"{SRC},{{"id":"m","kind":"map","input":"src","parallelism":2,"params":{{"expr":"nope(value)"}}}}"#
                )),
                Some("m"),
                "params.expr",
                "invalid expression",
            ),
            (
                job(r#"{"id":"g","kind":"generator","input":"g"}"#),
                Some("g"),
                "input",
                "source",
            ),
            (
                job(&format!(
                    r#"{SRC},{{"id":"j","kind":"join","input":"src","params":{{"window":{{"tumbling_ms":5}}}}}}"#
                )),
                Some("j"),
                "input",
                "takes 2 input(s), got 1",
            ),
            (
                job(&format!(
                    r#"{SRC},{{"id":"s","kind":"discard","input":"src"}},{{"id":"m","kind":"map","input":"s","params":{{"expr":"value"}}}}"#
                )),
                Some("m"),
                "input",
                "is a sink",
            ),
            (job(""), None, "operators", "at least one operator"),
        ];
        for (spec, op, field, needle) in cases {
            let e = err(&spec);
            assert_eq!(e.operator.as_deref(), op, "{e}");
            assert_eq!(e.field.as_deref(), Some(field), "{e}");
            assert!(
                e.to_string().contains(needle),
                "'{e}' should contain '{needle}'"
            );
        }
    }

    #[test]
    fn cycles_are_rejected_with_the_path() {
        let e = err(&job(&format!(
            r#"{SRC},
            {{"id":"a","kind":"join","input":["src","c"],"params":{{"window":{{"tumbling_ms":5}}}}}},
            {{"id":"b","kind":"map","input":"a","params":{{"expr":"value"}}}},
            {{"id":"c","kind":"map","input":"b","params":{{"expr":"value"}}}}"#
        )));
        assert_eq!(e.field.as_deref(), Some("input"));
        assert!(e.message.starts_with("forms a cycle: "), "{e}");
        for id in ["a", "b", "c"] {
            assert!(e.message.contains(id), "{e}");
        }
    }

    #[test]
    fn key_groups_spread_keys() {
        let mut counts = [0usize; 3];
        for k in 0..3000 {
            counts[subtask_for_key(&Value::Int(k), 3)] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
        assert_eq!(subtask_for_key(&Value::Int(5), 1), 0);
    }
}
