//! The dashboard in a real headless Chromium against a real cluster: the overview lists the
//! task managers, an invalid spec shows the API's error inline, a submitted job shows its
//! graph and rising counters, and "kill task manager" (confirmed) marks it dead while the job
//! page shows the failure and the recovery. With an API token: read-only until the token is
//! given once, the task manager page (subtasks, slots, cache, heartbeats), and "kill subtask"
//! followed by the job's recovery. No console error may appear. Screenshots go to
//! `target/dashboard/`.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;
use weir_tests::browser::Browser;
use weir_tests::cluster::{bin_dir, Cluster, ClusterOptions};

fn shots() -> PathBuf {
    bin_dir()
        .parent()
        .map(|p| p.join("dashboard"))
        .unwrap_or_else(|| PathBuf::from("target/dashboard"))
}

/// A wordcount that runs about a minute, with ABS checkpoints every second.
fn long_wordcount() -> String {
    let text = jobs::EXAMPLES
        .iter()
        .find(|(n, _)| *n == "wordcount.json")
        .expect("example")
        .1;
    let mut spec: serde_json::Value = serde_json::from_str(text).expect("json");
    spec["checkpointing"] = json!({"mode": "abs", "interval_ms": 1000});
    spec["operators"][0]["params"]["count"] = json!(600_000);
    spec["operators"][0]["params"]["rate"] = json!(10_000);
    spec.to_string()
}

fn records_in(b: &Browser) -> u64 {
    b.eval(
        "return [...document.querySelectorAll('#subtasks tbody tr')].reduce((s, r) => s + Number(r.children[3].innerText.replace(/,/g, '')), 0);",
        vec![],
    )
    .as_u64()
    .unwrap_or(0)
}

#[test]
fn dashboard_in_a_real_browser() {
    let Some(b) = Browser::start("dashboard_in_a_real_browser") else {
        return;
    };
    let c = Cluster::start(ClusterOptions {
        taskmanagers: 3,
        slots: 2,
        ..Default::default()
    });
    let dir = shots();

    // Overview: every task manager, live updates connected.
    b.goto(&c.url);
    b.wait_text("#live", Duration::from_secs(10), "the event stream", |t| {
        t == "live"
    });
    b.wait_text(
        "#tms",
        Duration::from_secs(10),
        "three alive task managers",
        |t| t.matches("ALIVE").count() == 3,
    );
    for tm in c.alive_taskmanagers() {
        let id = tm["id"].as_str().unwrap();
        assert!(b.text("#tms").contains(&id[..8]), "{id} listed");
    }

    // An invalid spec: the API's error, with operator and field, shown inline.
    b.goto(&format!("{}/#/jobs", c.url));
    b.wait_text("#joblist", Duration::from_secs(10), "the job list", |t| {
        !t.is_empty()
    });
    let bad = r#"{"name":"bad","operators":[{"id":"g","kind":"generator"},
        {"id":"count","kind":"window_aggregate","input":"g","params":{"window":{"tumbling_ms":-5},"agg":"count"}}]}"#;
    b.eval(
        "document.getElementById('spec').value = arguments[0];",
        vec![json!(bad)],
    );
    b.click("#submit");
    let err = b.wait_text("#submit-error", Duration::from_secs(10), "the error", |t| {
        !t.is_empty()
    });
    assert!(err.contains("operator 'count'"), "{err}");
    assert!(err.contains("params.window.tumbling_ms"), "{err}");
    b.screenshot(&dir.join("submit-error.png"));

    // A valid spec: the job page with its graph and rising counters.
    b.eval(
        "document.getElementById('spec').value = arguments[0];",
        vec![json!(long_wordcount())],
    );
    b.click("#submit");
    b.wait_text(
        "#job-head",
        Duration::from_secs(20),
        "the job running",
        |t| t.contains("RUNNING"),
    );
    let dag = b.eval(
        "return document.querySelectorAll('#dag svg .node').length;",
        vec![],
    );
    assert_eq!(dag.as_u64(), Some(2), "two tasks drawn");
    let first = records_in(&b);
    std::thread::sleep(Duration::from_millis(2500));
    let second = records_in(&b);
    assert!(second > first, "counters rise: {first} -> {second}");
    let checkpoints = b.wait_text(
        "#checkpoints",
        Duration::from_secs(20),
        "a checkpoint",
        |t| t.contains("COMPLETED"),
    );
    assert!(
        checkpoints.contains("ABS"),
        "each row names its mode: {checkpoints}"
    );
    b.screenshot(&dir.join("job.png"));
    let job_url: String = b
        .eval("return location.href;", vec![])
        .as_str()
        .unwrap()
        .to_string();
    let jid = job_url.rsplit('/').next().unwrap().to_string();

    // Kill a task manager running the job from the overview, confirming the dialog.
    let job = c.job(&jid);
    let victim = job["vertices"][0]["subtasks"][0]["taskmanager"]
        .as_str()
        .unwrap()
        .to_string();
    b.goto(&c.url);
    b.wait_text("#tms", Duration::from_secs(10), "task managers", |t| {
        t.contains("ALIVE")
    });
    b.screenshot(&dir.join("overview.png"));
    b.click(&format!(
        "button[data-action='kill-tm'][data-id='{victim}']"
    ));
    let question = b.accept_dialog();
    assert!(
        question.contains(&victim),
        "the dialog names it: {question}"
    );
    b.wait_text(
        "#tms",
        Duration::from_secs(10),
        "the task manager dead",
        |t| t.contains("DEAD"),
    );

    // The job page shows the failure and the recovery.
    b.goto(&job_url);
    let failovers = b.wait_text("#failovers", Duration::from_secs(30), "a recovery", |t| {
        t.contains(" ms") && !t.contains("in progress")
    });
    assert!(
        failovers.contains(&victim[..8]),
        "the cause names it: {failovers}"
    );
    b.wait_text("#job-head", Duration::from_secs(20), "running again", |t| {
        t.contains("RUNNING")
    });
    // A few seconds of history for the throughput chart in the screenshot.
    std::thread::sleep(Duration::from_secs(6));
    b.screenshot(&dir.join("job-recovered.png"));
    // The one expected failure is the deliberate 400 of the invalid submission (Chromium
    // logs failed requests as errors); anything else is a bug.
    let errors: Vec<String> = b
        .console_errors()
        .into_iter()
        .filter(|e| !e.ends_with("/jobs - Failed to load resource: the server responded with a status of 400 (Bad Request)"))
        .collect();
    assert!(errors.is_empty(), "console errors: {errors:?}");
    let _ = c.request("DELETE", &format!("/jobs/{jid}"), None, None);
}

#[test]
fn token_taskmanager_page_and_kill_subtask() {
    let Some(b) = Browser::start("token_taskmanager_page_and_kill_subtask") else {
        return;
    };
    let c = Cluster::start(ClusterOptions {
        taskmanagers: 3,
        slots: 2,
        token: Some("s3cret".into()),
        ..Default::default()
    });
    let dir = shots();
    let jid = c.submit(&long_wordcount());
    c.wait_until(Duration::from_secs(20), "the job running", |c| {
        c.job(&jid)["state"] == "RUNNING"
    });

    // Read-only until the token is given; then the buttons work for the whole session.
    b.goto(&c.url);
    b.wait_text("#tms", Duration::from_secs(10), "task managers", |t| {
        t.matches("ALIVE").count() == 3
    });
    let kill_buttons_enabled = "return [...document.querySelectorAll(\"button[data-action='kill-tm']\")].every((b) => !b.disabled);";
    assert_eq!(
        b.eval(kill_buttons_enabled, vec![]),
        json!(false),
        "disabled without the token"
    );
    assert!(b.text("#tms").contains("Read-only"), "{}", b.text("#tms"));
    b.click("a[data-action='token']");
    let prompt = b.answer_prompt("s3cret");
    assert!(prompt.contains("API token"), "{prompt}");
    b.wait_true(
        kill_buttons_enabled,
        Duration::from_secs(5),
        "enabled kill buttons",
    );
    let cards = b.wait_text("#cards", Duration::from_secs(10), "slots in use", |t| {
        !t.contains("0 used of 6")
    });
    assert!(cards.contains("used of 6"), "{cards}");
    // Card labels are upper-cased by the style sheet; innerText shows them so.
    assert!(cards.to_lowercase().contains("cache memory"), "{cards}");

    // The page of a task manager running the job's source.
    let victim = c.job(&jid)["vertices"][0]["subtasks"][0]["taskmanager"]
        .as_str()
        .unwrap()
        .to_string();
    b.click(&format!("#tms a[href='#/taskmanagers/{victim}']"));
    let subtasks = b.wait_text(
        "#tm-subtasks",
        Duration::from_secs(10),
        "its subtasks",
        |t| t.contains("RUNNING"),
    );
    assert!(subtasks.contains("wordcount"), "{subtasks}");
    let cards = b.text("#tm-cards").to_lowercase();
    assert!(
        cards.contains("used of 2") && cards.contains("cache partitions"),
        "{cards}"
    );
    b.wait_text(
        "#tm-heartbeats",
        Duration::from_secs(10),
        "a heartbeat chart",
        |t| t.contains("median"),
    );
    b.screenshot(&dir.join("taskmanager.png"));

    // Kill subtask: the REST call refuses a wrong token and an unknown subtask...
    let (status, _) = c.request(
        "POST",
        &format!("/jobs/{jid}/tasks/0/0/kill"),
        None,
        Some("wrong"),
    );
    assert_eq!(status, 401);
    let (status, body) = c.request("POST", &format!("/jobs/{jid}/tasks/7/0/kill"), None, None);
    assert_eq!(status, 404, "{body}");
    // ...and the button (confirmed) fails it; the job recovers from its last checkpoint.
    b.wait_true(
        "return !!document.querySelector(\"#tm-subtasks button[data-action='kill-subtask']:not(:disabled)\");",
        Duration::from_secs(5),
        "an enabled kill-subtask button",
    );
    b.click("#tm-subtasks button[data-action='kill-subtask']");
    let question = b.accept_dialog();
    assert!(
        question.contains(&victim[..8]),
        "the dialog names where: {question}"
    );
    b.goto(&format!("{}/#/jobs/{jid}", c.url));
    let failovers = b.wait_text("#failovers", Duration::from_secs(30), "the recovery", |t| {
        t.contains(" ms") && !t.contains("in progress")
    });
    assert!(failovers.contains("killed on request"), "{failovers}");
    b.wait_text("#job-head", Duration::from_secs(20), "running again", |t| {
        t.contains("RUNNING")
    });
    let errors = b.console_errors();
    assert!(errors.is_empty(), "console errors: {errors:?}");
    let _ = c.request("DELETE", &format!("/jobs/{jid}"), None, None);
}

/// Ensures that a DCAS job's recovery is visible: killing a task manager running part of
/// it from the overview shows, on the job page, a DCAS failover with the subtasks that
/// restarted, the log entries they replayed and the time to catch up, while the job keeps
/// its generation (nothing else restarted).
#[test]
fn dcas_recovery_in_the_dashboard() {
    let Some(b) = Browser::start("dcas_recovery_in_the_dashboard") else {
        return;
    };
    let c = Cluster::start(ClusterOptions {
        taskmanagers: 3,
        slots: 2,
        ..Default::default()
    });
    c.wait_cache_settled(3);
    let checkpointing = json!({"mode": "dcas", "snapshot_every_records": 2000});
    let spec = weir_tests::wordcount_spec("wordcount-dcas", checkpointing, 600_000, 10_000);
    let jid = c.submit(&spec.to_string());
    c.wait_until(Duration::from_secs(20), "the job running", |c| {
        c.job(&jid)["state"] == "RUNNING"
    });
    std::thread::sleep(Duration::from_secs(3));
    let victim = c.job(&jid)["vertices"][0]["subtasks"][0]["taskmanager"]
        .as_str()
        .unwrap()
        .to_string();
    b.goto(&c.url);
    b.wait_text("#tms", Duration::from_secs(10), "task managers", |t| {
        t.matches("ALIVE").count() == 3
    });
    b.click(&format!(
        "button[data-action='kill-tm'][data-id='{victim}']"
    ));
    b.accept_dialog();
    b.goto(&format!("{}/#/jobs/{jid}", c.url));
    let failovers = b.wait_text("#failovers", Duration::from_secs(30), "the recovery", |t| {
        t.contains(" replayed") && !t.contains("in progress")
    });
    assert!(failovers.contains("DCAS"), "{failovers}");
    assert!(failovers.contains("restarted"), "{failovers}");
    assert!(
        failovers.contains(&victim[..8]),
        "the cause names it: {failovers}"
    );
    let legend = b.text("#failovers");
    assert!(legend.contains("restore + replay log"), "{legend}");
    assert!(legend.contains("latency back to normal"), "{legend}");
    // The sinks' latency markers: a figure in ms, not the dash shown before the first.
    b.wait_text(
        "#job-cards",
        Duration::from_secs(10),
        "the end-to-end latency",
        |t| {
            let t = t.to_lowercase();
            t.split("end-to-end latency")
                .nth(1)
                .is_some_and(|rest| rest.trim_start().starts_with(|c: char| c.is_ascii_digit()))
        },
    );
    b.wait_text("#job-head", Duration::from_secs(20), "running", |t| {
        t.contains("RUNNING")
    });
    assert_eq!(
        c.job(&jid)["generation"],
        1,
        "only the lost subtasks restarted"
    );
    std::thread::sleep(Duration::from_secs(4));
    b.screenshot(&shots().join("job-dcas-recovered.png"));
    let errors = b.console_errors();
    assert!(errors.is_empty(), "console errors: {errors:?}");
    let _ = c.request("DELETE", &format!("/jobs/{jid}"), None, None);
}
