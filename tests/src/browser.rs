//! `Browser`: headless Chromium driven over the W3C WebDriver protocol (Debian's `chromium`
//! and `chromium-driver`), for the dashboard tests.
//!
//! WebDriver is JSON over HTTP, so the client is a few calls over `ureq` (already the test
//! harness's HTTP client) instead of another async stack. `Browser::start` returns `None`
//! after printing why when Chromium or chromedriver is missing, so a test says that it was
//! skipped instead of passing silently. Everything started is killed on drop.

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A chromedriver process with one headless Chromium session.
pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    agent: ureq::Agent,
}

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

impl Browser {
    /// Starts chromedriver and a 1280×800 headless session; `None` (after printing why the
    /// test `name` is skipped) when Chromium or chromedriver is not installed.
    pub fn start(name: &str) -> Option<Browser> {
        for path in [CHROMIUM, CHROMEDRIVER] {
            if !std::path::Path::new(path).exists() {
                let _ = writeln!(
                    std::io::stderr(),
                    "SKIPPED {name}: {path} is missing (apt-get install chromium chromium-driver; scripts/test does)"
                );
                return None;
            }
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(60)))
            .http_status_as_error(false)
            .build()
            .into();
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while agent.get(&format!("{base}/status")).call().is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1280,800", "--force-device-scale-factor=1"]
            },
            "goog:loggingPrefs": {"browser": "ALL"}
        }}});
        let mut b = Browser {
            driver,
            base,
            session: String::new(),
            agent,
        };
        let v = b.call("POST", "/session", Some(caps));
        b.session = v["value"]["sessionId"]
            .as_str()
            .expect("session id")
            .to_string();
        Some(b)
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.try_call(method, path, body)
            .unwrap_or_else(|e| panic!("webdriver {method} {path}: {e}"))
    }

    /// A WebDriver call; `Err` carries the driver's error code and message.
    fn try_call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let url = format!("{}{}", self.base, path);
        let res = match (method, body) {
            ("GET", _) => self.agent.get(&url).call(),
            ("DELETE", _) => self.agent.delete(&url).call(),
            (_, Some(b)) => self.agent.post(&url).send_json(b),
            (_, None) => self.agent.post(&url).send_json(json!({})),
        };
        let mut res = res.map_err(|e| e.to_string())?;
        let v: Value = res.body_mut().read_json().unwrap_or(Value::Null);
        match v["value"]["error"].as_str() {
            Some(err) => Err(format!("{err}: {}", v["value"]["message"])),
            None => Ok(v),
        }
    }

    fn session_call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.call(method, &format!("/session/{}{path}", self.session), body)["value"].clone()
    }

    /// Opens `url`.
    pub fn goto(&self, url: &str) {
        self.session_call("POST", "/url", Some(json!({ "url": url })));
    }

    /// Runs `script` (a function body; `arguments` holds `args`) and returns its result.
    pub fn eval(&self, script: &str, args: Vec<Value>) -> Value {
        self.session_call(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": args})),
        )
    }

    /// The visible text of the first element matching `css` (empty when none).
    pub fn text(&self, css: &str) -> String {
        self.eval(
            "const e = document.querySelector(arguments[0]); return e ? e.innerText : '';",
            vec![json!(css)],
        )
        .as_str()
        .unwrap_or_default()
        .to_string()
    }

    /// Polls every 100 ms until `pred` holds on the text of `css`; panics after `timeout`
    /// with the last text.
    pub fn wait_text(
        &self,
        css: &str,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let t = self.text(css);
            if pred(&t) {
                return t;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}; '{css}' shows: {t}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Polls `script` (returning a boolean) every 100 ms until it returns true; panics
    /// naming `what` after `timeout`.
    pub fn wait_true(&self, script: &str, timeout: Duration, what: &str) {
        let deadline = Instant::now() + timeout;
        while self.eval(script, vec![]) != json!(true) {
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Clicks the first element matching `css`, finding it again if the page replaced it
    /// between the lookup and the click (live pages re-render).
    pub fn click(&self, css: &str) {
        let mut attempts = 0;
        loop {
            let el = self.session_call(
                "POST",
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            );
            let id = el
                .as_object()
                .and_then(|o| o.values().next())
                .and_then(Value::as_str)
                .unwrap_or_else(|| panic!("no element '{css}'"))
                .to_string();
            let path = format!("/session/{}/element/{id}/click", self.session);
            match self.try_call("POST", &path, None) {
                Ok(_) => return,
                Err(e) if e.starts_with("stale element") && attempts < 20 => attempts += 1,
                Err(e) => panic!("click '{css}': {e}"),
            }
        }
    }

    /// Accepts the open confirmation dialog, returning its text.
    pub fn accept_dialog(&self) -> String {
        let text = self.wait_dialog();
        self.session_call("POST", "/alert/accept", None);
        text
    }

    /// Types `answer` into the open prompt and accepts it, returning the prompt's text.
    pub fn answer_prompt(&self, answer: &str) -> String {
        let text = self.wait_dialog();
        self.session_call("POST", "/alert/text", Some(json!({ "text": answer })));
        self.session_call("POST", "/alert/accept", None);
        text
    }

    /// Waits up to 5 s for a dialog to open; returns its text.
    fn wait_dialog(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let open = self.try_call(
                "GET",
                &format!("/session/{}/alert/text", self.session),
                None,
            );
            if let Some(t) = open
                .ok()
                .and_then(|v| v["value"].as_str().map(str::to_string))
            {
                return t;
            }
            assert!(Instant::now() < deadline, "no dialog opened");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Saves a PNG screenshot of the page to `path`.
    pub fn screenshot(&self, path: &std::path::Path) {
        use base64::Engine;
        let data = self.session_call("GET", "/screenshot", None);
        let png = base64::engine::general_purpose::STANDARD
            .decode(data.as_str().expect("base64"))
            .expect("png");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("screenshot dir");
        }
        std::fs::write(path, png).expect("write screenshot");
    }

    /// Browser console messages at level SEVERE (errors) since the last call.
    pub fn console_errors(&self) -> Vec<String> {
        let v = self.call(
            "POST",
            &format!("/session/{}/se/log", self.session),
            Some(json!({"type": "browser"})),
        );
        v["value"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["level"] == "SEVERE")
            .map(|e| e["message"].as_str().unwrap_or_default().to_string())
            .collect()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self
                .agent
                .delete(&format!("{}/session/{}", self.base, self.session))
                .call();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
