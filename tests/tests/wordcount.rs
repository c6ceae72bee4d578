/// Ensures that the wordcount example, run in process with parallelism 2 over 2 slots,
/// produces exactly the counts computed directly from the generator's definition.
#[test]
fn wordcount_matches_independent_count() {
    let json = jobs::EXAMPLES
        .iter()
        .find(|(n, _)| *n == "wordcount.json")
        .unwrap()
        .1;
    let graph = weir_tests::graph(json);
    let outcome = weir_tests::run_graph(&graph, 2, std::time::Duration::from_secs(60));
    outcome.result.as_ref().expect("job finishes");
    let got = weir_tests::window_results(&outcome.collected["out"], "count");
    let expected = weir_tests::expected_wordcount(&weir_tests::generator(json, "lines"), 5000);
    assert!(
        expected.len() >= 800,
        "a meaningful test: {} (word, window) pairs",
        expected.len()
    );
    assert_eq!(got.len(), expected.len());
    assert_eq!(got, expected);
    let total: i64 = expected.values().sum();
    let split = outcome
        .metrics
        .iter()
        .find(|m| m.name.contains("split"))
        .unwrap();
    assert_eq!(
        split.records_out as i64, total,
        "every word crossed the hash exchange exactly once"
    );
}

/// Ensures the same job gives the same answer with one slot, parallelism 1 everywhere,
/// and tiny batches with a single credit (many more channel round trips).
#[test]
fn wordcount_is_independent_of_parallelism_and_batching() {
    let json = jobs::EXAMPLES
        .iter()
        .find(|(n, _)| *n == "wordcount.json")
        .unwrap()
        .1;
    let mut spec: serde_json::Value = serde_json::from_str(json).unwrap();
    for op in spec["operators"].as_array_mut().unwrap() {
        op["parallelism"] = 1.into();
    }
    spec["operators"][0]["params"]["count"] = 20000.into();
    spec["runtime"] = serde_json::json!({"batch_size": 7, "credits": 1, "linger_ms": 1});
    let json = spec.to_string();
    let outcome = weir_tests::run_graph(
        &weir_tests::graph(&json),
        1,
        std::time::Duration::from_secs(60),
    );
    outcome.result.as_ref().expect("job finishes");
    let got = weir_tests::window_results(&outcome.collected["out"], "count");
    assert_eq!(
        got,
        weir_tests::expected_wordcount(&weir_tests::generator(&json, "lines"), 5000)
    );
}
