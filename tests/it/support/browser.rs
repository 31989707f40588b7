//! Headless Chromium driven over the DevTools protocol, for tests of what only a real browser
//! decides: which `Origin` and `Sec-Fetch-Site` a form post carries under a referrer policy,
//! which cookies a cross-site request brings.
//!
//! Without `chromium` on the PATH, [`Browser::start`] returns `None` and the test returns early
//! (saying so on stderr), unless `PBXRA_REQUIRE_BROWSER` is set, as `.ci/run` sets it: then a
//! missing browser fails the test.

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// How long one DevTools answer or page load may take.
const STEP: Duration = Duration::from_secs(20);

pub struct Browser {
    _child: super::ChildGuard,
    _profile: tempfile::TempDir,
    ws: WebSocketStream<TcpStream>,
    next_id: u64,
    /// Events that arrived while waiting for an answer.
    events: VecDeque<Value>,
}

impl Browser {
    /// Starts headless Chromium with an empty profile and attaches to its page.
    pub async fn start() -> Option<Browser> {
        let required = std::env::var_os("PBXRA_REQUIRE_BROWSER").is_some();
        let found = std::process::Command::new("chromium")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            assert!(
                !required,
                "PBXRA_REQUIRE_BROWSER is set but chromium is not installed"
            );
            eprintln!("SKIPPED: chromium is not installed (apt-get install chromium)");
            return None;
        }
        pbx_remote::tls::install_default_provider();
        let profile = tempfile::tempdir().unwrap();
        let child = super::ChildGuard(
            std::process::Command::new("chromium")
                .args([
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--remote-debugging-port=0",
                    // HTTPS fronts in tests use a self-signed certificate.
                    "--ignore-certificate-errors",
                ])
                .arg(format!("--user-data-dir={}", profile.path().display()))
                .arg("about:blank")
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
        // Chromium writes the port it chose once DevTools listens.
        let port_file = profile.path().join("DevToolsActivePort");
        let port: u16 = super::eventually(Duration::from_secs(30), "DevTools port", || {
            std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|s| s.lines().next()?.trim().parse().ok())
        })
        .await;
        let targets: Vec<Value> = reqwest::get(format!("http://127.0.0.1:{port}/json/list"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let page = targets
            .iter()
            .find(|t| t["type"] == "page")
            .expect("a page target");
        let url = page["webSocketDebuggerUrl"].as_str().unwrap().to_string();
        let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let (ws, _) = tokio_tungstenite::client_async(url, tcp).await.unwrap();
        let mut b = Browser {
            _child: child,
            _profile: profile,
            ws,
            next_id: 0,
            events: VecDeque::new(),
        };
        b.call("Page.enable", json!({})).await;
        b.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 1400, "height": 900, "deviceScaleFactor": 1, "mobile": false}),
        )
        .await;
        Some(b)
    }

    async fn recv(&mut self) -> Value {
        loop {
            let msg = tokio::time::timeout(STEP, self.ws.next())
                .await
                .expect("DevTools went silent")
                .expect("DevTools closed")
                .unwrap();
            if let Message::Text(t) = msg {
                return serde_json::from_str(&t).unwrap();
            }
        }
    }

    /// Sends one DevTools command and returns its result.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let cmd = json!({"id": id, "method": method, "params": params});
        self.ws.send(Message::text(cmd.to_string())).await.unwrap();
        loop {
            let m = self.recv().await;
            if m["id"] == id {
                assert!(m.get("error").is_none(), "{method}: {m}");
                return m["result"].clone();
            }
            self.events.push_back(m);
        }
    }

    async fn wait_load(&mut self) {
        loop {
            while let Some(e) = self.events.pop_front() {
                if e["method"] == "Page.loadEventFired" {
                    return;
                }
            }
            let m = self.recv().await;
            self.events.push_back(m);
        }
    }

    /// Opens `url` and waits for the page to load.
    pub async fn go(&mut self, url: &str) {
        self.events.clear();
        self.call("Page.navigate", json!({"url": url})).await;
        self.wait_load().await;
    }

    /// Evaluates `expr` in the page (awaiting a promise) and returns its value.
    pub async fn js(&mut self, expr: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        assert!(r.get("exceptionDetails").is_none(), "{expr}: {r}");
        r["result"]["value"].clone()
    }

    /// Evaluates `expr` (a click, a submit) and waits for the page it leads to.
    pub async fn act(&mut self, expr: &str) {
        self.events.clear();
        self.js(expr).await;
        self.wait_load().await;
    }

    /// Clicks the submit button of the form posting to `action`, and waits for the result.
    pub async fn submit(&mut self, action: &str) {
        self.act(&format!(
            "document.querySelector('form[action=\"{action}\"] button').click()"
        ))
        .await;
    }

    /// The browser's cookies for `url` (name → the cookie as DevTools reports it).
    pub async fn cookies(&mut self, url: &str) -> std::collections::HashMap<String, Value> {
        let r = self
            .call("Network.getCookies", json!({"urls": [url]}))
            .await;
        r["cookies"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["name"].as_str().unwrap().to_string(), c.clone()))
            .collect()
    }

    pub async fn title(&mut self) -> String {
        self.js("document.title")
            .await
            .as_str()
            .unwrap()
            .to_string()
    }

    pub async fn path(&mut self) -> String {
        self.js("location.pathname")
            .await
            .as_str()
            .unwrap()
            .to_string()
    }

    pub async fn text(&mut self) -> String {
        self.js("document.body.innerText")
            .await
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Waits (bounded) until `condition`, a JS expression, is true: checked now and at each
    /// change of the page's DOM, not on a timer.
    pub async fn wait_for(&mut self, condition: &str, limit: Duration) {
        let ms = limit.as_millis();
        let expr = format!(
            "new Promise((resolve) => {{\
               const check = () => {{ if ({condition}) {{ obs.disconnect(); resolve(true); }} }};\
               const obs = new MutationObserver(check);\
               obs.observe(document, {{subtree: true, childList: true, characterData: true, attributes: true}});\
               setTimeout(() => {{ obs.disconnect(); resolve(!!({condition})); }}, {ms});\
               check();\
             }})"
        );
        let met = self.js(&expr).await;
        assert_eq!(met, Value::Bool(true), "not within {limit:?}: {condition}");
    }

    /// Saves a PNG of the page as `target/console-screenshots/NAME.png`, for a reviewer.
    pub async fn screenshot(&mut self, name: &str) {
        use base64::Engine;
        let r = self
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap())
            .unwrap();
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/console-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }

    /// Presses a key (DevTools key name and Windows key code) in the focused element.
    pub async fn key(&mut self, key: &str, code: u32) {
        for kind in ["keyDown", "keyUp"] {
            let mut ev =
                json!({"type": kind, "key": key, "code": key, "windowsVirtualKeyCode": code});
            if key == "Enter" && kind == "keyDown" {
                ev["text"] = json!("\r");
            }
            self.call("Input.dispatchKeyEvent", ev).await;
        }
    }

    /// Presses a key that leads to a new page (Enter in a form) and waits for it.
    pub async fn key_and_wait(&mut self, key: &str, code: u32) {
        self.events.clear();
        self.key(key, code).await;
        self.wait_load().await;
    }
}
