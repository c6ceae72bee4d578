//! `Cluster`: a real job manager and N real task manager processes on loopback, for tests
//! and evaluation binaries.
//!
//! Starts `jobmanager serve` (REST and control on free ports, a fresh data directory) and
//! `taskmanager` processes, waits until they registered, and offers REST helpers,
//! `wait_until`, and process-level faults (SIGKILL, SIGSTOP/SIGCONT). Everything it started
//! is killed when it is dropped, also when the test panics. Clusters are serialized within a
//! test binary (a lock held while one lives), so parallel tests do not starve each other's
//! heartbeats on a small machine.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Options of a test cluster.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Task manager processes.
    pub taskmanagers: usize,
    /// Slots per task manager.
    pub slots: u32,
    /// Job manager heartbeat timeout.
    pub heartbeat_timeout_ms: u64,
    /// API token, if any.
    pub token: Option<String>,
    /// Reuse this data directory (to test restarts); a fresh one otherwise.
    pub data_dir: Option<PathBuf>,
    /// Extra `jobmanager serve` flags.
    pub jobmanager_args: Vec<String>,
    /// Extra `taskmanager` flags.
    pub taskmanager_args: Vec<String>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            taskmanagers: 3,
            slots: 2,
            heartbeat_timeout_ms: 1000,
            token: None,
            data_dir: None,
            jobmanager_args: Vec::new(),
            taskmanager_args: Vec::new(),
        }
    }
}

/// A running cluster.
pub struct Cluster {
    /// REST base URL, e.g. `http://127.0.0.1:40123`.
    pub url: String,
    /// Control address task managers connect to.
    pub control: String,
    /// The options it was started with.
    pub options: ClusterOptions,
    jm: Child,
    tms: Vec<Child>,
    /// Indices into `tms` this cluster SIGKILLed on purpose.
    killed: Vec<usize>,
    agent: ureq::Agent,
    _dir: Option<tempfile::TempDir>,
    _lock: MutexGuard<'static, ()>,
}

/// Directory of the workspace's built binaries (next to the test executable's `deps/`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Path of a workspace binary; panics with the command to build it when missing.
pub fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (cargo build --release --bins; scripts/test does)",
        path.display()
    );
    path
}

impl Cluster {
    /// Starts a job manager and task managers and waits until all registered.
    pub fn start(options: ClusterOptions) -> Cluster {
        let lock = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        let (dir, data_dir) = match &options.data_dir {
            Some(d) => (None, d.clone()),
            None => {
                let d = tempfile::tempdir().expect("tempdir");
                let p = d.path().join("jm");
                (Some(d), p)
            }
        };
        let mut cmd = Command::new(binary("jobmanager"));
        cmd.args([
            "serve",
            "--rest-addr",
            "127.0.0.1:0",
            "--control-addr",
            "127.0.0.1:0",
        ])
        .args([
            "--heartbeat-timeout-ms",
            &options.heartbeat_timeout_ms.to_string(),
        ])
        .arg("--data-dir")
        .arg(&data_dir)
        .args(&options.jobmanager_args)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::piped())
        .stdin(Stdio::null());
        match &options.token {
            Some(t) => cmd.env("WEIR_API_TOKEN", t),
            None => cmd.env_remove("WEIR_API_TOKEN"),
        };
        let mut jm = cmd.spawn().expect("start jobmanager");
        let stdout = jm.stdout.take().expect("jobmanager stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("Weir job manager:") {
                    let _ = tx.send(line);
                }
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("jobmanager printed its addresses");
        // "Weir job manager: REST http://ADDR  control ADDR"
        let url = line
            .split_whitespace()
            .nth(4)
            .expect("rest url")
            .to_string();
        let control = line
            .split_whitespace()
            .nth(6)
            .expect("control addr")
            .to_string();
        // A pooled connection idle for longer than the job manager's keep-alive (actix-web's
        // 5 s) may be closed by it just as a request goes out on it: after a test stops the
        // job manager, its timers fire at once when it resumes. Connections idle for 2 s are
        // not reused.
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(30)))
            .max_idle_age(Duration::from_secs(2))
            .http_status_as_error(false)
            .build()
            .into();
        let mut cluster = Cluster {
            url,
            control,
            options: options.clone(),
            jm,
            tms: Vec::new(),
            killed: Vec::new(),
            agent,
            _dir: dir,
            _lock: lock,
        };
        for _ in 0..options.taskmanagers {
            cluster.add_taskmanager();
        }
        let n = options.taskmanagers;
        cluster.wait_until(Duration::from_secs(30), "task managers registered", |c| {
            c.alive_taskmanagers().len() >= n
        });
        cluster
    }

    /// Starts one more task manager process (not waiting for its registration).
    pub fn add_taskmanager(&mut self) {
        self.add_taskmanager_via(&self.control.clone());
    }

    /// Starts one more task manager process that reaches the job manager's control port at
    /// `control` (a [`crate::proxy::Link`] to it, say), not waiting for its registration.
    pub fn add_taskmanager_via(&mut self, control: &str) {
        let child = Command::new(binary("taskmanager"))
            .args([
                "--jobmanager",
                control,
                "--slots",
                &self.options.slots.to_string(),
            ])
            .args(["--exit-after-disconnect-ms", "2000"])
            .args(&self.options.taskmanager_args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .spawn()
            .expect("start taskmanager");
        self.tms.push(child);
    }

    /// Task manager processes started so far, killed ones included: the index the next one
    /// [`Cluster::add_taskmanager`] starts gets.
    pub fn taskmanagers_started(&self) -> usize {
        self.tms.len()
    }

    /// GET `path`: (status, JSON body or Null).
    pub fn get(&self, path: &str) -> (u16, Value) {
        self.request("GET", path, None, None)
    }

    /// A request with an optional body and bearer token.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        token: Option<&str>,
    ) -> (u16, Value) {
        let (status, text) = self.request_text(method, path, body, token);
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// A request returning the raw body text.
    pub fn request_text(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        token: Option<&str>,
    ) -> (u16, String) {
        let url = format!("{}{path}", self.url);
        let token = token
            .map(str::to_string)
            .or_else(|| self.options.token.clone());
        let auth = token.map(|t| format!("Bearer {t}"));
        let resp = match method {
            "GET" => self.agent.get(&url).call(),
            "DELETE" => {
                let mut r = self.agent.delete(&url);
                if let Some(a) = &auth {
                    r = r.header("authorization", a);
                }
                r.call()
            }
            _ => {
                let mut r = self
                    .agent
                    .post(&url)
                    .header("content-type", "application/json");
                if let Some(a) = &auth {
                    r = r.header("authorization", a);
                }
                match body {
                    Some(b) => r.send(b.as_bytes()),
                    None => r.send_empty(),
                }
            }
        };
        let mut resp = resp.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .with_config()
            .limit(1 << 30)
            .read_to_string()
            .unwrap_or_default();
        (status, text)
    }

    /// Submits a spec; panics unless accepted. Returns the job id.
    pub fn submit(&self, spec: &str) -> String {
        let (status, body) = self.request("POST", "/jobs", Some(spec), None);
        assert_eq!(status, 200, "submit failed: {body}");
        body["jobid"].as_str().expect("jobid").to_string()
    }

    /// The job's JSON.
    pub fn job(&self, id: &str) -> Value {
        let (status, body) = self.get(&format!("/jobs/{id}"));
        assert_eq!(status, 200, "GET /jobs/{id}: {body}");
        body
    }

    /// Waits until the job reaches a terminal state; returns its JSON.
    /// On a timeout it panics with the job and its failovers, to tell a stuck job's cause.
    pub fn wait_for_end(&self, id: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let job = self.job(id);
            if matches!(
                job["state"].as_str(),
                Some("FINISHED" | "FAILED" | "CANCELED")
            ) {
                return job;
            }
            if Instant::now() >= deadline {
                let failovers = self.get(&format!("/jobs/{id}/failovers")).1;
                panic!("timed out after {timeout:?} waiting for job {id} to end: {job}\nfailovers: {failovers}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every collected record of collect operator `op` of a job, as `value` JSON.
    pub fn output(&self, id: &str, op: &str) -> Vec<Value> {
        let mut out = Vec::new();
        loop {
            let (status, body) = self.get(&format!(
                "/jobs/{id}/output?operator={op}&offset={}&limit=100000",
                out.len()
            ));
            assert_eq!(status, 200, "{body}");
            let page = &body["outputs"][0];
            let recs = page["records"].as_array().cloned().unwrap_or_default();
            if recs.is_empty() {
                return out;
            }
            out.extend(recs.into_iter().map(|r| r["value"].clone()));
        }
    }

    /// Alive task managers' JSON.
    pub fn alive_taskmanagers(&self) -> Vec<Value> {
        let (_, body) = self.get("/taskmanagers");
        body["taskmanagers"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|t| t["state"] == "ALIVE")
            .collect()
    }

    /// The task manager id of the `i`-th started process.
    pub fn taskmanager_id(&self, i: usize) -> String {
        let pid = self.tms[i].id();
        let (_, body) = self.get("/taskmanagers");
        body["taskmanagers"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|t| t["pid"].as_u64() == Some(pid as u64))
            .and_then(|t| t["id"].as_str())
            .unwrap_or_else(|| panic!("no task manager with pid {pid}"))
            .to_string()
    }

    /// Index of the process running task manager `id`.
    pub fn taskmanager_index(&self, id: &str) -> usize {
        (0..self.tms.len())
            .find(|&i| self.taskmanager_id(i) == id)
            .expect("task manager process")
    }

    /// SIGKILLs the `i`-th task manager process.
    pub fn kill_taskmanager(&mut self, i: usize) {
        self.kill_taskmanagers(&[i]);
    }

    /// SIGKILLs the task manager processes `indices` at once: every signal is sent before
    /// the first process is reaped, so they die together, not one teardown after another.
    /// Answers how long they took to exit (every thread of a process must be scheduled to
    /// exit before its sockets close, so on a busy machine a SIGKILL takes milliseconds).
    pub fn kill_taskmanagers(&mut self, indices: &[usize]) -> Duration {
        let signalled = Instant::now();
        for &i in indices {
            let _ = self.tms[i].kill();
            self.killed.push(i);
        }
        for &i in indices {
            let _ = self.tms[i].wait();
        }
        signalled.elapsed()
    }

    /// Sends a signal (`STOP`, `CONT`, ...) to the `i`-th task manager process.
    pub fn signal_taskmanager(&self, i: usize, signal: &str) {
        signal_process(self.tms[i].id(), signal);
    }

    /// Sends a signal (`STOP`, `CONT`, ...) to the job manager process.
    pub fn signal_jobmanager(&self, signal: &str) {
        signal_process(self.jm.id(), signal);
    }

    /// CPU time (user + system) the live task manager processes have used so far, in ms.
    /// Linux only (`/proc`); 0 elsewhere.
    pub fn taskmanagers_cpu_ms(&self) -> u64 {
        let ticks_per_s = Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(100)
            .max(1);
        let ticks: u64 = self
            .tms
            .iter()
            .filter_map(|tm| std::fs::read_to_string(format!("/proc/{}/stat", tm.id())).ok())
            .filter_map(|stat| {
                // Fields after the parenthesised command name; utime and stime are the
                // 14th and 15th fields of the line.
                let rest = &stat[stat.rfind(')')? + 2..];
                let f: Vec<&str> = rest.split_whitespace().collect();
                Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
            })
            .sum();
        ticks * 1000 / ticks_per_s
    }

    /// SIGKILLs the job manager.
    pub fn kill_jobmanager(&mut self) {
        let _ = self.jm.kill();
        let _ = self.jm.wait();
    }

    /// Waits until the cache has `members` members and every partition has its backups
    /// where the ring wants them.
    pub fn wait_cache_settled(&self, members: usize) {
        self.wait_until(
            Duration::from_secs(60),
            &format!("cache settled on {members} members"),
            |c| {
                let (_, v) = c.get("/cache");
                v["members"].as_array().map(Vec::len) == Some(members)
                    && v["progress"]["under_replicated"] == 0
                    && v["progress"]["misplaced"] == 0
                    && v["progress"]["syncing"] == 0
            },
        );
    }

    /// Polls `pred` every 20 ms until it holds; panics with `what` after `timeout`.
    pub fn wait_until(
        &self,
        timeout: Duration,
        what: &str,
        mut pred: impl FnMut(&Cluster) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        while !pred(self) {
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for: {what}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The data directory of the job manager.
    pub fn data_dir(&self) -> Option<&Path> {
        self._dir.as_ref().map(|d| d.path())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // A task manager that ended without this harness killing it (a kill through the
        // REST API, which aborts one it did not start; a crash in native code, which leaves
        // no message of its own; an exit) explains many a failed test: name it and how.
        let mut alive = Vec::new();
        for (i, c) in self.tms.iter_mut().enumerate() {
            if self.killed.contains(&i) {
                continue; // killed and reaped: its pid may be another process's by now
            }
            match c.try_wait() {
                Ok(Some(status)) => {
                    let _ = writeln!(
                        std::io::stderr(),
                        "task manager process {} (started #{i}) ended, not killed by the harness: {status}",
                        c.id()
                    );
                }
                _ => alive.push(i),
            }
        }
        // The job manager first: killing task managers under it would log every cache
        // member lost as lost data.
        let _ = self.jm.kill();
        let _ = self.jm.wait();
        for i in alive {
            let c = &mut self.tms[i];
            // A stopped process must be continued to die promptly on some kernels.
            let _ = Command::new("kill")
                .arg("-CONT")
                .arg(c.id().to_string())
                .stderr(Stdio::null())
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Sends `signal` (`STOP`, `CONT`, ...) to process `pid`; panics if `kill` fails.
fn signal_process(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status();
    assert!(
        status.map(|s| s.success()).unwrap_or(false),
        "kill -{signal} {pid} failed"
    );
}
