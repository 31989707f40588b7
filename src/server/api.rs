//! The activation API: HTTPS on the tunnel's port. Checks the code (single use, expiry, wrong
//! attempts per source), the firmware, and enrols the device's public key as a node.

use crate::httpserve;
use crate::protocol::{firmware_supported, parse_version, Edition};
use crate::protocol::{
    ActivateRequest, ActivateResponse, ActivationProof, ErrorBody, Reason, ACTIVATE_PATH,
    MAX_ACTIVATION_BODY, PROTOCOL_VERSION,
};
use crate::server::db::{Op, Role, Source};
use crate::server::refusal::{EnrolError, Refusal};
use crate::server::{source_of, ServerState};
use anyhow::{Context, Result};
use base64::Engine;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Wrong codes one source may try per window before `rate_limited`.
pub const MAX_WRONG_CODES: u32 = 10;
/// Window for [`MAX_WRONG_CODES`].
pub const WRONG_CODE_WINDOW: Duration = Duration::from_secs(600);
/// Failed account logins per (email, source) before a lock.
pub const MAX_ACCOUNT_FAILURES: u32 = 5;
/// Failed account logins from one source, whatever the emails, before that source is locked
/// for the rest of [`ACCOUNT_LOCK`] (one password tried on many accounts meets each pair once).
pub const MAX_SOURCE_ACCOUNT_FAILURES: u32 = 30;
/// How long such a lock lasts.
pub const ACCOUNT_LOCK: Duration = Duration::from_secs(15 * 60);
/// Longest global slowdown applied to account activations while failures pile up.
pub const MAX_GLOBAL_DELAY: Duration = Duration::from_secs(2);
/// Concurrent API connections.
const MAX_CONNECTIONS: usize = 256;
/// Sources, or (email, source) pairs, a limiter keeps before it drops those whose window ended.
const MAX_TRACKED: usize = 100_000;

/// rustls acceptor for the API (ALPN http/1.1).
pub fn tls_acceptor(keys: &crate::server::keys::ServerKeys) -> Result<tokio_rustls::TlsAcceptor> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(keys.certs.clone(), keys.key.clone_key())
        .context("server TLS certificate")?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

/// Failures per key: how many, and when the first of the current window was.
type Counts<K> = Mutex<HashMap<K, (u32, Instant)>>;

/// How long `key` stays locked, once it has `max` failures in a `window` still running.
fn locked_for<K: Eq + Hash>(
    counts: &Counts<K>,
    key: &K,
    window: Duration,
    max: u32,
) -> Option<Duration> {
    let map = counts.lock().unwrap_or_else(|p| p.into_inner());
    let (n, first) = map.get(key)?;
    let left = window.checked_sub(first.elapsed())?;
    (*n >= max).then_some(left)
}

/// Counts one failure for `key` at `now` in a `window` from its first; past [`MAX_TRACKED`]
/// keys, those whose window has ended are dropped first (every made-up email or address adds
/// one).
fn count_failure<K: Eq + Hash>(counts: &Counts<K>, key: K, now: Instant, window: Duration) {
    let mut map = counts.lock().unwrap_or_else(|p| p.into_inner());
    if map.len() >= MAX_TRACKED {
        map.retain(|_, (_, first)| now.saturating_duration_since(*first) < window);
    }
    let e = map.entry(key).or_insert((0, now));
    if now.saturating_duration_since(e.1) >= window {
        *e = (0, now);
    }
    e.0 += 1;
}

/// Wrong-attempt counters per source ([`source_of`]).
#[derive(Default)]
struct Limiter {
    failures: Counts<IpAddr>,
}

impl Limiter {
    fn blocked_for(&self, ip: IpAddr) -> Option<Duration> {
        locked_for(
            &self.failures,
            &source_of(ip),
            WRONG_CODE_WINDOW,
            MAX_WRONG_CODES,
        )
    }

    fn fail(&self, ip: IpAddr) {
        count_failure(
            &self.failures,
            source_of(ip),
            Instant::now(),
            WRONG_CODE_WINDOW,
        );
    }
}

/// Account-login failures: a lock per (email, source address) and a global slowdown, so nobody
/// can lock a provider out of every PBX just by knowing the email.
#[derive(Default)]
struct AccountLimiter {
    per_key: Counts<(String, IpAddr)>,
    per_source: Counts<IpAddr>,
    recent: Mutex<std::collections::VecDeque<Instant>>,
}

/// Why an account login is refused before its password is checked, and for how long.
#[derive(Debug, PartialEq)]
enum Locked {
    /// This email from this source failed [`MAX_ACCOUNT_FAILURES`] times.
    Pair(Duration),
    /// This source failed [`MAX_SOURCE_ACCOUNT_FAILURES`] times, whatever the emails.
    Source(Duration),
}

impl AccountLimiter {
    /// `Err` while locked; otherwise the global delay to apply first.
    fn admit(&self, email: &str, ip: IpAddr) -> Result<Duration, Locked> {
        let key = (email.to_string(), source_of(ip));
        if let Some(left) = locked_for(&self.per_key, &key, ACCOUNT_LOCK, MAX_ACCOUNT_FAILURES) {
            return Err(Locked::Pair(left));
        }
        let source_max = MAX_SOURCE_ACCOUNT_FAILURES;
        if let Some(left) = locked_for(&self.per_source, &key.1, ACCOUNT_LOCK, source_max) {
            return Err(Locked::Source(left));
        }
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        while recent
            .front()
            .is_some_and(|t| t.elapsed() > Duration::from_secs(60))
        {
            recent.pop_front();
        }
        Ok((Duration::from_millis(20) * recent.len() as u32).min(MAX_GLOBAL_DELAY))
    }

    fn fail(&self, email: &str, ip: IpAddr) {
        self.fail_at(email, ip, Instant::now());
    }

    /// [`Self::fail`] at `now` (the password line bounds how fast made-up emails come: a few
    /// hundred a second at most).
    fn fail_at(&self, email: &str, ip: IpAddr, now: Instant) {
        let source = source_of(ip);
        count_failure(
            &self.per_key,
            (email.to_string(), source),
            now,
            ACCOUNT_LOCK,
        );
        count_failure(&self.per_source, source, now, ACCOUNT_LOCK);
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.push_back(now);
        if recent.len() > 10_000 {
            recent.pop_front();
        }
    }

    fn succeed(&self, email: &str, ip: IpAddr) {
        let key = (email.to_string(), source_of(ip));
        self.per_key
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
    }
}

/// Both limiters.
#[derive(Default)]
struct Limits {
    codes: Limiter,
    accounts: AccountLimiter,
}

/// Serves the API until `shutdown`. Connections are accepted where this runs (the data path's
/// runtime, since the port also takes the TCP transport); each activation is handled on
/// `links`, because it writes to the registry and may wait out its busy timeout there.
pub async fn serve(
    state: Arc<ServerState>,
    listener: TcpListener,
    tls: impl httpserve::Handshake,
    links: tokio::runtime::Handle,
    shutdown: CancellationToken,
) {
    let limiter = Arc::new(Limits::default());
    let limits = httpserve::Limits::new("api", MAX_CONNECTIONS);
    httpserve::serve(listener, tls, limits, shutdown, move |peer| {
        let (state, limiter, links) = (state.clone(), limiter.clone(), links.clone());
        hyper::service::service_fn(move |req| {
            let (state, limiter) = (state.clone(), limiter.clone());
            // Aborted if the connection goes first, as the request would be if handled inline.
            let handled = tokio_util::task::AbortOnDropHandle::new(
                links.spawn(async move { handle(&state, &limiter, peer, req).await }),
            );
            async move {
                let resp = handled.await.unwrap_or_else(|e| {
                    tracing::error!(error = %e, "activation request task failed");
                    json(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        &serde_json::json!({"error": "internal error"}),
                    )
                });
                Ok::<_, std::convert::Infallible>(resp)
            }
        })
    })
    .await
}

fn json<T: serde::Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(bytes)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn refuse(code: Reason, message: impl Into<String>) -> Response<Full<Bytes>> {
    let status = match code {
        Reason::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        // Only a busy server sends this one (see `activate`).
        Reason::ServerUnreachable => StatusCode::SERVICE_UNAVAILABLE,
        Reason::ProtocolMismatch => StatusCode::BAD_REQUEST,
        _ => StatusCode::FORBIDDEN,
    };
    json(
        status,
        &ErrorBody {
            code,
            message: message.into(),
        },
    )
}

async fn handle(
    state: &ServerState,
    limiter: &Limits,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    if req.uri().path() != ACTIVATE_PATH {
        return json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": "not found"}),
        );
    }
    if req.method() != Method::POST {
        return json(
            StatusCode::METHOD_NOT_ALLOWED,
            &serde_json::json!({"error": "POST only"}),
        );
    }
    let body = match Limited::new(req.into_body(), MAX_ACTIVATION_BODY)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return refuse(
                Reason::ProtocolMismatch,
                "activation request too large or cut short",
            )
        }
    };
    let Ok(request) = serde_json::from_slice::<ActivateRequest>(&body) else {
        return refuse(
            Reason::ProtocolMismatch,
            "activation request not understood; upgrade the agent",
        );
    };
    match activate(state, limiter, peer.ip(), request).await {
        Ok(resp) => json(StatusCode::OK, &resp),
        Err(EnrolError::Refused(r)) => {
            tracing::info!(peer = %peer, code = %r.reason, "activation refused");
            refuse(r.reason, r.message)
        }
        Err(EnrolError::Failed(e)) => {
            tracing::error!(error = %format!("{e:#}"), "activation failed");
            json(
                StatusCode::INTERNAL_SERVER_ERROR,
                &ErrorBody {
                    code: Reason::ServerUnreachable,
                    message: "the server could not complete activation; try again later".into(),
                },
            )
        }
    }
}

async fn activate(
    state: &ServerState,
    limiter: &Limits,
    ip: IpAddr,
    req: ActivateRequest,
) -> Result<ActivateResponse, EnrolError> {
    if req.protocol_version != PROTOCOL_VERSION {
        return Err(Refusal::new(
            Reason::ProtocolMismatch,
            format!(
                "agent protocol {} but server protocol {PROTOCOL_VERSION}; upgrade the older side",
                req.protocol_version
            ),
        )
        .into());
    }
    let supported = Edition::parse(&req.facts.edition)
        .zip(parse_version(&req.facts.firmware))
        .map(|(e, v)| (e, firmware_supported(e, &v)));
    match supported {
        Some((_, true)) => {}
        Some((e, false)) => {
            return Err(Refusal::new(
                Reason::FirmwareUnsupported,
                format!(
                    "firmware {} is below the minimum {} for the {} edition; upgrade the PBX",
                    req.facts.firmware,
                    e.min_firmware(),
                    e.as_str()
                ),
            )
            .into())
        }
        None => {
            return Err(Refusal::new(
                Reason::FirmwareUnsupported,
                format!(
                    "unknown edition {:?} or firmware {:?}",
                    req.facts.edition, req.facts.firmware
                ),
            )
            .into())
        }
    }
    let spki = base64::engine::general_purpose::STANDARD
        .decode(&req.device_public_key)
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= 1024);
    let Some(spki) = spki else {
        return Err(Refusal::new(
            Reason::ProtocolMismatch,
            "device public key missing or malformed",
        )
        .into());
    };
    let key_hash = crate::crypto::sha256(&spki);
    let device = match &req.proof {
        ActivationProof::AuthCode { code } => {
            if let Some(left) = limiter.codes.blocked_for(ip) {
                return Err(Refusal::new(
                    Reason::RateLimited,
                    format!(
                        "too many wrong codes from this address; try again in {} s",
                        left.as_secs() + 1
                    ),
                )
                .into());
            }
            let redeemed = state.db.redeem_code(code.expose(), &key_hash, &req.facts);
            if let Some(r) = redeemed.as_ref().err().and_then(EnrolError::refusal) {
                if matches!(
                    r.reason,
                    Reason::InvalidCode | Reason::CodeUsed | Reason::CodeExpired
                ) {
                    limiter.codes.fail(ip);
                }
            }
            redeemed?
        }
        ActivationProof::Email { email, password } => {
            let email = email.trim().to_lowercase();
            let delay = match limiter.accounts.admit(&email, ip) {
                Ok(d) => d,
                Err(locked) => {
                    let (whose, left) = match locked {
                        Locked::Pair(left) => (format!(" for {email}"), left),
                        Locked::Source(left) => (String::new(), left),
                    };
                    return Err(Refusal::new(
                        Reason::RateLimited,
                        format!(
                            "too many failed logins{whose} from this address; try again in {} minutes",
                            left.as_secs().div_ceil(60)
                        ),
                    )
                    .into());
                }
            };
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            // Unknown emails, and viewers (who may not add devices), cost the same as wrong
            // passwords and read the same.
            let creds = state.db.user_credentials(&email)?;
            let may_activate = creds
                .as_ref()
                .is_some_and(|(_, role)| matches!(role, Role::Admin | Role::Operator));
            let phc = creds
                .map(|(h, _)| h)
                .unwrap_or_else(|| crate::password::dummy_hash().to_string());
            // Busy is no failure of the account: the agent retries as if the CM were away.
            let Ok(verified) = state
                .passwords
                .verify(ip, password.expose().to_string(), phc)
                .await
            else {
                return Err(Refusal::new(
                    Reason::ServerUnreachable,
                    format!("{}", crate::server::passwords::Busy),
                )
                .into());
            };
            let user = match state.db.user(&email)? {
                Some(u) if verified && may_activate => u,
                _ => {
                    limiter.accounts.fail(&email, ip);
                    log_activation(state, &email, ip, None, "refused: bad credentials");
                    return Err(Refusal::new(
                        Reason::BadCredentials,
                        "the provider's email or password is wrong; correct activation.email and activation.password",
                    )
                    .into());
                }
            };
            limiter.accounts.succeed(&email, ip);
            let device = state.db.enrol_by_account(&user, &key_hash, &req.facts)?;
            log_activation(state, &user.email, ip, Some(&device), "ok");
            device
        }
    };
    tracing::info!(device = %device, serial = %req.facts.serial, "device activated");
    Ok(ActivateResponse {
        device_id: device,
        signing_key: crate::token::public_key_b64(&state.keys.signing),
        server_time_ms: crate::protocol::now_ms(),
    })
}

/// An activation by a CM user's email is that user's operation: it goes to the Operation Log.
fn log_activation(
    state: &ServerState,
    email: &str,
    ip: IpAddr,
    device: Option<&str>,
    result: &str,
) {
    let client = ip.to_string();
    let op = Op {
        actor: email,
        source: Source::Api,
        action: "device.activate",
        target: device,
        device,
        client: Some(&client),
        result,
        detail: Some("activation by email and password"),
    };
    if let Err(e) = state.db.log_op(&op) {
        tracing::warn!(error = %format!("{e:#}"), "operation log write failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_failures_for_made_up_emails_are_forgotten_once_their_window_ends() {
        let limiter = AccountLimiter::default();
        let ip = IpAddr::from([192, 0, 2, 7]);
        let start = Instant::now();
        for i in 0..MAX_TRACKED {
            limiter.fail_at(&format!("nobody{i}@example.com"), ip, start);
        }
        let later = start + ACCOUNT_LOCK + Duration::from_secs(1);
        limiter.fail_at("one-more@example.com", ip, later);
        let map = limiter.per_key.lock().unwrap();
        assert_eq!(map.len(), 1, "only the entry still in its window is kept");
        assert!(map.contains_key(&("one-more@example.com".to_string(), ip)));
    }

    #[test]
    fn one_source_failing_on_many_emails_is_locked_and_others_are_not() {
        let limiter = AccountLimiter::default();
        let sprayer = IpAddr::from([192, 0, 2, 7]);
        let now = Instant::now();
        for i in 0..MAX_SOURCE_ACCOUNT_FAILURES {
            assert!(limiter
                .admit(&format!("user{i}@example.com"), sprayer)
                .is_ok());
            limiter.fail_at(&format!("user{i}@example.com"), sprayer, now);
        }
        assert!(
            matches!(
                limiter.admit("ann@example.com", sprayer),
                Err(Locked::Source(_))
            ),
            "an email it never tried is refused from that source"
        );
        let elsewhere = IpAddr::from([198, 51, 100, 20]);
        assert!(limiter.admit("ann@example.com", elsewhere).is_ok());
    }

    #[test]
    fn failures_still_in_their_window_are_kept_and_still_lock() {
        let limiter = AccountLimiter::default();
        let ip = IpAddr::from([192, 0, 2, 7]);
        let start = Instant::now();
        for _ in 0..MAX_ACCOUNT_FAILURES {
            limiter.fail_at("ann@example.com", ip, start);
        }
        for i in 0..MAX_TRACKED {
            limiter.fail_at(&format!("nobody{i}@example.com"), ip, start);
        }
        assert!(
            matches!(limiter.admit("ann@example.com", ip), Err(Locked::Pair(_))),
            "still locked"
        );
    }
}
