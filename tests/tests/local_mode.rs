//! `jobmanager local` and the `weir` CLI, as a user runs them.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use weir_tests::cluster::{binary, Cluster, ClusterOptions};

fn alive(pid: u64) -> bool {
    // Not a zombie and not gone.
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|s| {
            !s.lines()
                .any(|l| l.starts_with("State:") && l.contains('Z'))
        })
        .unwrap_or(false)
}

fn get(url: &str) -> serde_json::Value {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut resp = agent.get(url).call().unwrap();
    resp.body_mut().read_json().unwrap()
}

/// Ensures `jobmanager local` starts real task manager processes, runs the example job,
/// kills a task manager with SIGKILL on request, and that Ctrl-C leaves no process behind.
#[test]
fn local_mode_runs_a_job_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let wordcount = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../jobs/examples/wordcount.json"
    );
    let mut jm = Command::new(binary("jobmanager"))
        .args([
            "local",
            "--taskmanagers",
            "2",
            "--slots",
            "2",
            "--rest-port",
            "0",
            "--job",
            wordcount,
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(jm.stdout.take().unwrap()).lines();
    let mut url = None;
    let mut job = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(rest) = line.trim().strip_prefix("REST API:") {
            url = rest.split_whitespace().next().map(str::to_string);
        }
        if line.contains("submitted as") {
            job = line.split_whitespace().last().map(str::to_string);
        }
        if line.starts_with("Press Ctrl-C") {
            break;
        }
    }
    let (url, job) = (url.expect("address printed"), job.expect("job submitted"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(&format!("{url}/jobs/{job}"))["state"] != "FINISHED" {
        assert!(Instant::now() < deadline, "wordcount finished");
        std::thread::sleep(Duration::from_millis(50));
    }
    let tms = get(&format!("{url}/taskmanagers"))["taskmanagers"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(tms.len(), 2);
    assert!(tms.iter().all(|t| t["local_process"] == true));
    let pids: Vec<u64> = tms.iter().map(|t| t["pid"].as_u64().unwrap()).collect();
    assert!(pids.iter().all(|p| alive(*p)));

    // Kill one task manager through the API: a real SIGKILL.
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let victim = tms[0]["id"].as_str().unwrap();
    let mut resp = agent
        .post(&format!("{url}/taskmanagers/{victim}/kill"))
        .send_empty()
        .unwrap();
    let body: serde_json::Value = resp.body_mut().read_json().unwrap();
    assert_eq!(body["method"], "SIGKILL");
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(pids[0]) || get(&format!("{url}/taskmanagers/{victim}"))["state"] != "DEAD" {
        assert!(
            Instant::now() < deadline,
            "killed task manager gone and dead"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // Ctrl-C: everything stops.
    Command::new("kill")
        .arg("-INT")
        .arg(jm.id().to_string())
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = jm.try_wait().unwrap() {
            assert!(status.success(), "jobmanager exited cleanly: {status}");
            break;
        }
        assert!(Instant::now() < deadline, "jobmanager stopped on Ctrl-C");
        std::thread::sleep(Duration::from_millis(20));
    }
    for p in pids {
        assert!(!alive(p), "task manager {p} left behind");
    }
}

/// Ensures the `weir` CLI submits, lists, shows, cancels jobs and lists and kills task
/// managers through the REST API, and reports errors with a non-zero exit.
#[test]
fn weir_cli_drives_the_cluster() {
    let c = Cluster::start(ClusterOptions {
        taskmanagers: 2,
        ..Default::default()
    });
    let weir = |args: &[&str]| {
        let out = Command::new(binary("weir"))
            .arg("--url")
            .arg(&c.url)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("job.json");
    std::fs::write(
        &spec,
        r#"{"name":"cli-job","operators":[{"id":"g","kind":"generator","params":{"rate":1000}},{"id":"o","kind":"discard","input":"g"}]}"#,
    )
    .unwrap();
    let (ok, out, err) = weir(&["submit", spec.to_str().unwrap()]);
    assert!(ok, "{err}");
    let id = out.trim().to_string();
    assert_eq!(id.len(), 36, "{out}");
    let (ok, out, _) = weir(&["list"]);
    assert!(ok && out.contains(&id) && out.contains("cli-job"), "{out}");
    c.wait_until(Duration::from_secs(10), "running", |c| {
        c.job(&id)["state"] == "RUNNING"
    });
    let (ok, out, _) = weir(&["status", &id]);
    assert!(
        ok && out.contains("RUNNING") && out.contains("task 0 [g -> o]"),
        "{out}"
    );
    let (ok, out, _) = weir(&["cancel", &id]);
    assert!(ok && out.contains("CANCELLING"), "{out}");
    c.wait_until(Duration::from_secs(10), "canceled", |c| {
        c.job(&id)["state"] == "CANCELED"
    });
    let (ok, out, _) = weir(&["taskmanagers"]);
    assert!(ok && out.matches("ALIVE").count() == 2, "{out}");
    let tm = c.taskmanager_id(0);
    let (ok, out, _) = weir(&["kill-tm", &tm]);
    assert!(ok && out.contains("killed"), "{out}");
    c.wait_until(Duration::from_secs(5), "dead", |c| {
        c.alive_taskmanagers().len() == 1
    });
    let bad = dir.path().join("bad.json");
    std::fs::write(
        &bad,
        r#"{"name":"x","operators":[{"id":"a","kind":"map"}]}"#,
    )
    .unwrap();
    let (ok, _, err) = weir(&["submit", bad.to_str().unwrap()]);
    assert!(
        !ok && err.contains("400") && err.contains("operator 'a'"),
        "{err}"
    );
}
