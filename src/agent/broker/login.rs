//! The portal's side of the broker: the form and Basic logins, the logout, the cookie jar's
//! rules and the "logged out" test.

use super::{form, LoginError, MAX_PAGE};
use crate::agent::portal::{Portal, UpBody};
use crate::config::{LoginMethod, PortalAccount, PortalLogin};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;

/// Most cookies one session's jar holds.
const MAX_COOKIES: usize = 64;
/// Largest cookie (name and value) kept.
const MAX_COOKIE: usize = 4096;

/// A portal answer, read whole (bounded).
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

/// Logs in as `account`; the portal's cookies on success.
pub(super) async fn log_in(
    config: &PortalLogin,
    account: &PortalAccount,
    portal: &Portal,
) -> Result<Vec<(String, String)>, LoginError> {
    let mut jar = Vec::new();
    let login = &config.login_path;
    let answer = match &config.method {
        LoginMethod::Basic => {
            use base64::Engine;
            let pair = format!("{}:{}", account.username, account.password.expose());
            let credentials = base64::engine::general_purpose::STANDARD.encode(pair);
            let mut auth = HeaderValue::from_str(&format!("Basic {credentials}"))
                .map_err(|_| LoginError::Refused("the username cannot be sent".into()))?;
            auth.set_sensitive(true);
            request(
                portal,
                Method::GET,
                login,
                &jar,
                vec![(header::AUTHORIZATION, auth)],
                None,
            )
            .await?
        }
        LoginMethod::Form {
            username_field,
            password_field,
        } => {
            let page = request(portal, Method::GET, login, &jar, vec![], None).await?;
            store_cookies(&mut jar, &page.headers);
            if !page.status.is_success() {
                return Err(LoginError::Failed(format!(
                    "GET {login} answered {}",
                    page.status
                )));
            }
            let html = String::from_utf8_lossy(&page.body);
            let found = form::login_form(&html, password_field).ok_or_else(|| {
                LoginError::Failed(format!(
                    "{login} has no form with a field named {password_field:?}"
                ))
            })?;
            if let Some(m) = found.method.as_deref().filter(|m| *m != "post") {
                return Err(LoginError::Failed(format!(
                    "the login form's method is {m:?}; the agent only posts a password"
                )));
            }
            let target = form_target(found.action.as_deref(), login).ok_or_else(|| {
                LoginError::Failed(format!(
                    "the login form posts to {:?}, outside the portal",
                    found.action.unwrap_or_default()
                ))
            })?;
            let form_body = {
                let mut fields = url::form_urlencoded::Serializer::new(String::new());
                for (name, value) in found.hidden.iter().filter(|(n, _)| {
                    n != username_field && !config.extra_fields.iter().any(|(e, _)| e == n)
                }) {
                    fields.append_pair(name, value);
                }
                for (name, value) in &config.extra_fields {
                    fields.append_pair(name, value);
                }
                fields.append_pair(username_field, &account.username);
                fields.append_pair(password_field, account.password.expose());
                fields.finish()
            };
            let headers = vec![
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/x-www-form-urlencoded"),
                ),
                (header::ORIGIN, value(portal.origin())),
                (
                    header::REFERER,
                    value(&format!("{}{login}", portal.origin())),
                ),
            ];
            let body = Bytes::from(form_body);
            let answer = request(portal, Method::POST, &target, &jar, headers, Some(body)).await?;
            if answer.status == StatusCode::OK {
                let html = String::from_utf8_lossy(&answer.body);
                if form::login_form(&html, password_field).is_some() {
                    return Err(LoginError::Refused("it showed its login form again".into()));
                }
            }
            answer
        }
    };
    if answer.status == StatusCode::UNAUTHORIZED || answer.status == StatusCode::FORBIDDEN {
        return Err(LoginError::Refused(format!(
            "it answered {}",
            answer.status
        )));
    }
    if looks_logged_out(login, answer.status, &answer.headers) {
        return Err(LoginError::Refused("it sent the login page again".into()));
    }
    if !(answer.status.is_success() || answer.status.is_redirection()) {
        return Err(LoginError::Failed(format!("it answered {}", answer.status)));
    }
    let before = jar.clone();
    store_cookies(&mut jar, &answer.headers);
    let ok = match &config.success_cookie {
        Some(name) => jar.iter().any(|(n, _)| n == name),
        None => jar != before,
    };
    if !ok {
        return Err(LoginError::Refused(match &config.success_cookie {
            Some(name) => format!("it set no cookie named {name:?}"),
            None => "it set no session cookie".into(),
        }));
    }
    Ok(jar)
}

/// Calls the portal's logout with the session's cookies; the status it answered.
pub(super) async fn log_out(
    path: &str,
    cookies: &[(String, String)],
    portal: &Portal,
) -> Result<StatusCode, String> {
    match request(portal, Method::GET, path, cookies, vec![], None).await {
        Ok(a) => Ok(a.status),
        Err(LoginError::Failed(e) | LoginError::Refused(e)) => Err(e),
    }
}

fn value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// One request of the broker's own, read whole (up to [`MAX_PAGE`]).
async fn request(
    portal: &Portal,
    method: Method,
    path: &str,
    cookies: &[(String, String)],
    headers: Vec<(header::HeaderName, HeaderValue)>,
    body: Option<Bytes>,
) -> Result<Answer, LoginError> {
    let failed = |e: String| LoginError::Failed(e);
    let mut req = Request::builder()
        .method(method.clone())
        .uri(path)
        .body(UpBody::Full(body))
        .map_err(|e| failed(format!("{path}: {e}")))?;
    let h = req.headers_mut();
    h.insert(header::HOST, portal.host_header().clone());
    h.insert(header::ACCEPT, HeaderValue::from_static("text/html,*/*"));
    h.insert(
        header::USER_AGENT,
        HeaderValue::from_static(concat!("pbx-remote-agent/", env!("CARGO_PKG_VERSION"))),
    );
    if !cookies.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&cookie_line(cookies)) {
            h.insert(header::COOKIE, v);
        }
    }
    for (name, v) in headers {
        h.insert(name, v);
    }
    let resp = portal.send(req).await.map_err(|e| failed(e.to_string()))?;
    let (parts, body) = resp.into_parts();
    let body = http_body_util::Limited::new(body, MAX_PAGE)
        .collect()
        .await
        .map_err(|e| failed(format!("{method} {path}: reading the answer: {e}")))?
        .to_bytes();
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// Where a form with `action` on the page `page` posts: an origin path on the portal, or
/// `None` for another site.
fn form_target(action: Option<&str>, page: &str) -> Option<String> {
    let action = action.map(str::trim).filter(|a| !a.is_empty());
    let Some(action) = action else {
        return Some(page.to_string());
    };
    // A browser reads `\` as `/`, so `/\host` names a host.
    if action.starts_with("//") || action.contains("://") || action.contains('\\') {
        return None;
    }
    if action.starts_with('/') {
        return Some(action.to_string());
    }
    if action.starts_with('?') {
        let path = page.split('?').next().unwrap_or(page);
        return Some(format!("{path}{action}"));
    }
    let dir = &page[..page.rfind('/').map_or(0, |i| i + 1)];
    Some(format!("{dir}{action}"))
}

/// A jar as a `Cookie` header value: `name=value; name=value`.
pub(super) fn cookie_line(jar: &[(String, String)]) -> String {
    let pairs: Vec<String> = jar.iter().map(|(n, v)| format!("{n}={v}")).collect();
    pairs.join("; ")
}

/// Applies a portal answer's `Set-Cookie`s to `jar`: a cookie replaces its namesake, one that
/// expires (`Max-Age` ≤ 0, an `Expires` in the past) is removed. Attributes other than those
/// are not kept: the jar belongs to one session on one portal.
pub(super) fn store_cookies(jar: &mut Vec<(String, String)>, h: &HeaderMap) {
    for line in h
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
    {
        let mut parts = line.split(';');
        let Some((name, value)) = parts.next().and_then(|p| p.split_once('=')) else {
            continue;
        };
        let (name, value) = (name.trim(), value.trim());
        if name.is_empty() || crate::agent::proxy::RESERVED_COOKIES.contains(&name) {
            continue;
        }
        let expired = parts.any(|attr| {
            let (k, v) = attr.split_once('=').unwrap_or((attr, ""));
            let (k, v) = (k.trim(), v.trim());
            (k.eq_ignore_ascii_case("max-age") && v.parse::<i64>().is_ok_and(|s| s <= 0))
                || (k.eq_ignore_ascii_case("expires")
                    && httpdate::parse_http_date(v)
                        .is_ok_and(|t| t <= std::time::SystemTime::now()))
        });
        jar.retain(|(n, _)| n != name);
        // Bounded like a browser's jar for one site: a portal that sets more loses the extra.
        if !expired && jar.len() < MAX_COOKIES && name.len() + value.len() <= MAX_COOKIE {
            jar.push((name.to_string(), value.to_string()));
        }
    }
}

/// A 401, or a redirect whose target is the login page: the portal session is gone.
pub(super) fn looks_logged_out(login_path: &str, status: StatusCode, h: &HeaderMap) -> bool {
    if status == StatusCode::UNAUTHORIZED {
        return true;
    }
    if !status.is_redirection() {
        return false;
    }
    let Some(loc) = h.get(header::LOCATION).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let path = match loc.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("/", |i| &rest[i..]),
        None if loc.starts_with("//") => loc[2..].find('/').map_or("/", |i| &loc[2 + i..]),
        None => loc,
    };
    let path = path.split(['?', '#']).next().unwrap_or(path);
    let login = login_path.split('?').next().unwrap_or(login_path);
    path == login
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_replace_their_namesakes_and_expire() {
        let mut h = HeaderMap::new();
        for c in [
            "sid=1; Path=/; HttpOnly",
            "lang=en",
            "sid=2; Secure",
            "old=x; Max-Age=0",
            "gone=y; Expires=Thu, 01 Jan 1970 00:00:00 GMT",
            "__pbxra_sid=stolen",
            "broken",
        ] {
            h.append(header::SET_COOKIE, HeaderValue::from_static(c));
        }
        let mut jar = vec![
            ("old".to_string(), "1".to_string()),
            ("gone".into(), "2".into()),
        ];
        store_cookies(&mut jar, &h);
        assert_eq!(
            jar,
            vec![
                ("lang".to_string(), "en".to_string()),
                ("sid".into(), "2".into())
            ]
        );
    }

    #[test]
    fn a_jar_is_bounded() {
        let mut h = HeaderMap::new();
        for i in 0..100 {
            h.append(
                header::SET_COOKIE,
                HeaderValue::from_str(&format!("c{i}=v")).unwrap(),
            );
        }
        let big = format!("big={}", "x".repeat(5000));
        h.append(header::SET_COOKIE, HeaderValue::from_str(&big).unwrap());
        let mut jar = Vec::new();
        store_cookies(&mut jar, &h);
        assert_eq!(jar.len(), MAX_COOKIES);
        assert!(jar.iter().all(|(n, _)| n != "big"));
    }

    #[test]
    fn logged_out_is_a_401_or_a_redirect_to_the_login_page() {
        let loc = |l: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::LOCATION, HeaderValue::from_static(l));
            h
        };
        let none = HeaderMap::new();
        assert!(looks_logged_out("/login", StatusCode::UNAUTHORIZED, &none));
        assert!(!looks_logged_out("/login", StatusCode::OK, &none));
        assert!(looks_logged_out(
            "/login",
            StatusCode::FOUND,
            &loc("/login?next=/x")
        ));
        assert!(looks_logged_out(
            "/login",
            StatusCode::SEE_OTHER,
            &loc("http://127.0.0.1:8080/login")
        ));
        assert!(looks_logged_out(
            "/login",
            StatusCode::FOUND,
            &loc("//pbx/login#top")
        ));
        assert!(!looks_logged_out(
            "/login",
            StatusCode::FOUND,
            &loc("/login2")
        ));
        assert!(!looks_logged_out(
            "/login",
            StatusCode::FOUND,
            &loc("/dashboard")
        ));
    }

    #[test]
    fn form_targets_stay_on_the_portal() {
        assert_eq!(form_target(None, "/a/login"), Some("/a/login".into()));
        assert_eq!(form_target(Some(""), "/a/login"), Some("/a/login".into()));
        assert_eq!(form_target(Some("/auth"), "/a/login"), Some("/auth".into()));
        assert_eq!(form_target(Some("do"), "/a/login"), Some("/a/do".into()));
        assert_eq!(
            form_target(Some("?x=1"), "/a/login?y"),
            Some("/a/login?x=1".into())
        );
        assert_eq!(form_target(Some("https://evil.example/x"), "/login"), None);
        assert_eq!(form_target(Some("//evil.example/x"), "/login"), None);
        assert_eq!(form_target(Some("/\\evil.example"), "/login"), None);
    }
}
