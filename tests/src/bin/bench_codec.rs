//! `bench_codec`: the data plane's event encoding, packed (`engine::codec::packed`) against
//! rkyv's archive (the control plane's and snapshots' format, and the data plane's before
//! packing), per record: nanoseconds to encode, to decode, and bytes.
//!
//! Four shapes of 2,048-record batches: keyed integer counts (the benchmarks' pipelines),
//! unkeyed short strings, keyed maps, and a window's results (what a keyed count emits).
//! Each figure is the median of `--rounds` passes of `--iters` batches in this process, so
//! ratios within a run hold on a noisy machine. The flags are in
//! `USAGE` (`--help` prints it).

use std::hint::black_box;
use std::time::Instant;

use engine::codec::{self, packed};
use engine::record::{Batch, Record, StreamEvent};
use engine::value::Value;

/// The command line (`--help` prints it).
const USAGE: &str = "cargo run --release -p weir-tests --bin bench_codec [-- --iters N --rounds K]";

const BATCH: i64 = 2048;

fn shapes() -> Vec<(&'static str, StreamEvent)> {
    let batch = |f: &dyn Fn(i64) -> Record| {
        StreamEvent::Data(Batch {
            first_seq: 1 << 20,
            records: (0..BATCH).map(f).collect(),
        })
    };
    let ts = |i: i64| 1_700_000_000_000 + i / 3;
    vec![
        (
            "keyed integer count",
            batch(&|i| Record::keyed(Value::Int(i * 7919 % 10_000), ts(i), Value::Int(1))),
        ),
        (
            "unkeyed short string",
            batch(&|i| Record::new(ts(i), Value::from(format!("user-{}", i % 977)))),
        ),
        (
            "keyed map of 3 fields",
            batch(&|i| {
                let value = Value::map([
                    ("user", Value::Int(i % 977)),
                    ("page", Value::str("/cart")),
                    ("ms", Value::Float(i as f64 * 0.5)),
                ]);
                Record::keyed(Value::Int(i % 977), ts(i), value)
            }),
        ),
        (
            "window results (map of 4 integers)",
            batch(&|i| {
                let value = Value::map([
                    ("count", Value::Int(60 + i % 7)),
                    ("key", Value::Int(i * 7919 % 10_000)),
                    ("window_end", Value::Int(1_700_000_001_000)),
                    ("window_start", Value::Int(1_700_000_000_000)),
                ]);
                Record::new(1_700_000_000_999, value)
            }),
        ),
    ]
}

/// Median nanoseconds per record of `f` run over `iters` batches, `rounds` times.
fn per_record(iters: u64, rounds: usize, mut f: impl FnMut()) -> f64 {
    let mut runs: Vec<f64> = (0..rounds)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..iters {
                f();
            }
            started.elapsed().as_nanos() as f64 / (iters * BATCH as u64) as f64
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    runs[runs.len() / 2]
}

fn main() {
    let args = weir_tests::bench_args(USAGE);
    let iters = weir_tests::arg(&args, "--iters", 2_000);
    let rounds = weir_tests::arg(&args, "--rounds", 5).max(1) as usize;
    println!("| batch of 2,048 | format | encode ns/record | decode ns/record | bytes/record |");
    println!("|---|---|---|---|---|");
    for (name, event) in shapes() {
        let mut bytes = Vec::new();
        packed::encode_event(&event, &mut bytes);
        assert_eq!(packed::decode_event(&bytes).as_ref(), Ok(&event));
        let encode = per_record(iters, rounds, || {
            let mut out = Vec::with_capacity(packed::size_hint(&event));
            packed::encode_event(black_box(&event), &mut out);
            black_box(out);
        });
        let decode = per_record(iters, rounds, || {
            black_box(packed::decode_event(black_box(&bytes)).ok());
        });
        let size = bytes.len() as f64 / BATCH as f64;
        println!("| {name} | packed | {encode:.1} | {decode:.1} | {size:.1} |");

        let archived = codec::encode(&event).expect("encode");
        let decoded: StreamEvent = codec::decode(&archived).expect("decode");
        assert_eq!(decoded, event);
        let encode = per_record(iters, rounds, || {
            black_box(codec::encode_sized(black_box(&event), archived.len()).ok());
        });
        let decode = per_record(iters, rounds, || {
            black_box(codec::decode::<StreamEvent>(black_box(&archived)).ok());
        });
        let size = archived.len() as f64 / BATCH as f64;
        println!("| {name} | rkyv | {encode:.1} | {decode:.1} | {size:.1} |");
    }
}
