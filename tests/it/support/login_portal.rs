//! A portal with its own login, as an unchanged PBX web GUI has (DESIGN §12): a form login
//! carrying a CSRF hidden field tied to a pre-session cookie, or HTTP Basic that answers with a
//! session cookie. A session cookie lasts `requests_per_session` authenticated requests; after
//! that (or logout) pages redirect to `/login` (form; `/home` shows the login page in place,
//! with 200) or answer 401 (Basic). Pages: `/home`
//! ("Welcome, USER"), `/whoami` (JSON: user, cookie, authorization), `POST /echo`, `/ws` (sends
//! "hello USER"), `/logout`.

use super::{full, Body};
use bytes::Bytes;
use futures_util::SinkExt;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The accounts this portal knows: (user, password).
pub const ACCOUNTS: [(&str, &str); 2] =
    [("admin", "Adm1n-portal-pw"), ("remote", "R3mote-portal-pw")];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum LoginKind {
    Form,
    Basic,
}

#[derive(Default)]
pub struct LoginLog {
    /// Successful logins.
    pub logins: AtomicUsize,
    /// Refused logins.
    pub refused: AtomicUsize,
    /// Logouts that ended a live session.
    pub logouts: AtomicUsize,
    /// Live sessions: id → (user, authenticated requests left).
    pub sessions: Mutex<HashMap<String, (String, usize)>>,
    /// Pre-session id → CSRF token (form).
    pre: Mutex<HashMap<String, String>>,
    /// Bodies `/echo` accepted.
    pub echoed: Mutex<Vec<String>>,
    /// Every request: path, and the `Authorization` it carried.
    pub seen: Mutex<Vec<(String, Option<String>)>>,
}

pub struct LoginPortal {
    pub addr: SocketAddr,
    pub kind: LoginKind,
    pub log: Arc<LoginLog>,
    stop: CancellationToken,
}

impl Drop for LoginPortal {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl LoginPortal {
    pub async fn start(kind: LoginKind, requests_per_session: usize) -> LoginPortal {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(LoginLog::default());
        let stop = CancellationToken::new();
        let (l, s) = (log.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    _ = s.cancelled() => return,
                    r = listener.accept() => r.unwrap(),
                };
                let (l, s) = (l.clone(), s.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let l = l.clone();
                        async move {
                            Ok::<_, Infallible>(route(kind, requests_per_session, &l, req).await)
                        }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .with_upgrades();
                    tokio::select! {
                        _ = s.cancelled() => {}
                        _ = conn => {}
                    }
                });
            }
        });
        LoginPortal {
            addr,
            kind,
            log,
            stop,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The `[portal_login]` section for this portal, with password files under `dir`
    /// (0600) holding `passwords` for (super_admin, administrator).
    pub fn config(&self, dir: &std::path::Path, passwords: (&str, &str)) -> String {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir).unwrap();
        let mut files = Vec::new();
        for (name, pw) in [("super-admin", passwords.0), ("administrator", passwords.1)] {
            let f = dir.join(format!("portal-{name}.secret"));
            std::fs::write(&f, format!("{pw}\n")).unwrap();
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
            files.push(f);
        }
        let method = match self.kind {
            LoginKind::Form => "method = \"form\"\nlogin_path = \"/login\"\nusername_field = \"user\"\npassword_field = \"pass\"",
            LoginKind::Basic => "method = \"basic\"\nlogin_path = \"/auth\"",
        };
        format!(
            "\n[portal_login]\n{method}\nlogout_path = \"/logout\"\n\n\
             [portal_login.super_admin]\nusername = \"admin\"\npassword_file = \"{}\"\n\n\
             [portal_login.administrator]\nusername = \"remote\"\npassword_file = \"{}\"\n",
            files[0].display(),
            files[1].display()
        )
    }

    pub fn logins(&self) -> usize {
        self.log.logins.load(Ordering::SeqCst)
    }
    pub fn refused(&self) -> usize {
        self.log.refused.load(Ordering::SeqCst)
    }
    pub fn logouts(&self) -> usize {
        self.log.logouts.load(Ordering::SeqCst)
    }
    pub fn live_sessions(&self) -> usize {
        self.log.sessions.lock().unwrap().len()
    }
}

fn cookie<'a>(req: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    req.headers()
        .get_all("cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v)
}

fn token() -> String {
    use rand_like::next;
    format!("{:016x}{:016x}", next(), next())
}

/// Enough randomness for test session ids without another dependency.
mod rand_like {
    use std::sync::atomic::{AtomicU64, Ordering};
    static STATE: AtomicU64 = AtomicU64::new(0x9e37_79b9_7f4a_7c15);
    pub fn next() -> u64 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        let mut x = STATE.fetch_add(nanos | 1, Ordering::SeqCst) ^ nanos;
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^ (x >> 33)
    }
}

fn login_form(error: &str, csrf: &str) -> String {
    format!(
        "<!doctype html><html><head><title>PBX login</title></head><body>\
         <h1>Sign in to the PBX</h1><p class=error>{error}</p>\
         <form method=\"post\" action=\"/login\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
         <input type=\"hidden\" name=\"lang\" value=\"en&amp;gb\">\
         <label>User <input name=\"user\"></label>\
         <label>Password <input type=\"password\" name=\"pass\"></label>\
         <button>Sign in</button></form></body></html>"
    )
}

fn html(status: u16, body: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "text/html")
        .body(full(body))
        .unwrap()
}

async fn route(
    kind: LoginKind,
    per_session: usize,
    log: &LoginLog,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    log.seen.lock().unwrap().push((path.clone(), auth.clone()));
    let session_cookie = match kind {
        LoginKind::Form => "PORTALSID",
        LoginKind::Basic => "BSID",
    };
    let new_session = |user: &str| {
        let sid = token();
        log.sessions
            .lock()
            .unwrap()
            .insert(sid.clone(), (user.to_string(), per_session));
        log.logins.fetch_add(1, Ordering::SeqCst);
        format!("{session_cookie}={sid}; Path=/; HttpOnly")
    };
    let accepted = |user: &str, pw: &str| ACCOUNTS.iter().any(|(u, p)| *u == user && *p == pw);
    match (kind, req.method().as_str(), path.as_str()) {
        (LoginKind::Form, "GET", "/login") => {
            let (pre, csrf) = (token(), token());
            log.pre.lock().unwrap().insert(pre.clone(), csrf.clone());
            let mut r = html(200, login_form("", &csrf));
            r.headers_mut()
                .insert("set-cookie", format!("pre={pre}; Path=/").parse().unwrap());
            return r;
        }
        (LoginKind::Form, "POST", "/login") => {
            let expected = cookie(&req, "pre").and_then(|p| log.pre.lock().unwrap().remove(p));
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let form: HashMap<String, String> =
                url::form_urlencoded::parse(&body).into_owned().collect();
            let field = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
            let csrf_ok = expected.is_some_and(|e| e == field("csrf"));
            if csrf_ok && field("lang") == "en&gb" && accepted(field("user"), field("pass")) {
                return Response::builder()
                    .status(302)
                    .header("location", "/home")
                    .header("set-cookie", new_session(field("user")))
                    .header("set-cookie", "pre=; Max-Age=0; Path=/")
                    .body(full(""))
                    .unwrap();
            }
            log.refused.fetch_add(1, Ordering::SeqCst);
            let why = if csrf_ok {
                "Wrong user or password"
            } else {
                "Form expired"
            };
            return html(200, login_form(why, "none"));
        }
        (LoginKind::Basic, "GET", "/auth") => {
            use base64::Engine;
            let pair = auth
                .as_deref()
                .and_then(|a| a.strip_prefix("Basic "))
                .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                .and_then(|b| String::from_utf8(b).ok())
                .unwrap_or_default();
            let (user, pw) = pair.split_once(':').unwrap_or(("", ""));
            if accepted(user, pw) {
                return Response::builder()
                    .header("set-cookie", new_session(user))
                    .body(full("authenticated"))
                    .unwrap();
            }
            log.refused.fetch_add(1, Ordering::SeqCst);
            return Response::builder()
                .status(401)
                .header("www-authenticate", "Basic realm=\"PBX\"")
                .body(full("unauthorized"))
                .unwrap();
        }
        (_, _, "/logout") => {
            if let Some(sid) = cookie(&req, session_cookie) {
                if log.sessions.lock().unwrap().remove(sid).is_some() {
                    log.logouts.fetch_add(1, Ordering::SeqCst);
                }
            }
            return html(200, "<p>Signed out of the PBX.</p>".into());
        }
        _ => {}
    }
    // Every other page needs a live session, and uses one of its requests.
    let user = cookie(&req, session_cookie).and_then(|sid| {
        let mut sessions = log.sessions.lock().unwrap();
        let (user, left) = sessions.get_mut(sid)?;
        if *left == 0 {
            return None;
        }
        *left -= 1;
        Some(user.clone())
    });
    let Some(user) = user else {
        if kind == LoginKind::Form && path == "/home" {
            // Some portals show the login page in place, with 200, instead of redirecting.
            let (pre, csrf) = (token(), token());
            log.pre.lock().unwrap().insert(pre.clone(), csrf.clone());
            let mut r = html(200, login_form("Your session has expired", &csrf));
            r.headers_mut()
                .insert("set-cookie", format!("pre={pre}; Path=/").parse().unwrap());
            return r;
        }
        return match kind {
            LoginKind::Form => Response::builder()
                .status(302)
                .header("location", format!("/login?next={path}"))
                .header(
                    "set-cookie",
                    format!("{session_cookie}=; Max-Age=0; Path=/"),
                )
                .body(full(""))
                .unwrap(),
            LoginKind::Basic => Response::builder()
                .status(401)
                .header("www-authenticate", "Basic realm=\"PBX\"")
                .body(full("unauthorized"))
                .unwrap(),
        };
    };
    match path.as_str() {
        "/" => Response::builder()
            .status(302)
            .header("location", "/home")
            .body(full(""))
            .unwrap(),
        "/home" => {
            // Like many portals, each page refreshes the session cookie.
            let sid = cookie(&req, session_cookie).unwrap_or_default();
            let mut r = html(200, format!("<h1 id=welcome>Welcome, {user}</h1>"));
            r.headers_mut().insert(
                "set-cookie",
                format!("{session_cookie}={sid}; Path=/; HttpOnly")
                    .parse()
                    .unwrap(),
            );
            r
        }
        "/whoami" => {
            let v = serde_json::json!({
                "user": user,
                "cookie": req.headers().get("cookie").and_then(|v| v.to_str().ok()),
                "authorization": auth,
            });
            Response::builder()
                .header("content-type", "application/json")
                .body(full(v.to_string()))
                .unwrap()
        }
        "/echo" => {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let text = String::from_utf8_lossy(&body).into_owned();
            log.echoed.lock().unwrap().push(text.clone());
            html(200, format!("{user}: {text}"))
        }
        "/ws" => {
            let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
                return html(400, "not a websocket".into());
            };
            let on_upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let Ok(upgraded) = on_upgrade.await else {
                    return;
                };
                let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    tokio_tungstenite::tungstenite::protocol::Role::Server,
                    None,
                )
                .await;
                let hello = tokio_tungstenite::tungstenite::Message::text(format!("hello {user}"));
                let _ = ws.send(hello).await;
                let _ = ws.close(None).await;
            });
            let accept =
                tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
            Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-accept", accept)
                .body(full(Bytes::new()))
                .unwrap()
        }
        _ => html(404, "no such page".into()),
    }
}
