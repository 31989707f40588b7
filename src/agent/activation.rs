//! Activation over HTTPS: generate the device key here, send only its public half with the code
//! or the provider's account, and sort the answer into "stop and report" or "retry later".

use crate::agent::state::{self, Credential, StateDir};
use crate::config::{Activation, AgentConfig, MacSource};
use crate::protocol::{
    ActivateRequest, ActivateResponse, ActivationProof, DeviceFacts, ErrorBody, HaState, Reason,
    ACTIVATE_PATH, MAX_ACTIVATION_BODY, PROTOCOL_VERSION,
};
use crate::tls::{self, KeyIdentity, ServerTrust};
use base64::Engine;
use std::time::{Duration, SystemTime};

/// Why activation did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    /// The server said no; retrying with the same settings would not help.
    #[error("{message}")]
    Rejected {
        /// Status reason.
        reason: Reason,
        /// What to fix.
        message: String,
    },
    /// Network, TLS or server trouble; try again after a backoff.
    #[error("{message}")]
    Retry {
        /// Status reason.
        reason: Reason,
        /// What happened.
        message: String,
    },
}

/// How the agent trusts the server, from `[server]`.
pub fn server_trust(config: &AgentConfig) -> ServerTrust {
    if let Some(pin) = config.server.pin_sha256 {
        ServerTrust::Pin(pin)
    } else if let Some(ca) = &config.server.ca_file {
        ServerTrust::CaFile(ca.clone())
    } else {
        ServerTrust::System
    }
}

/// Facts about this PBX, with the MAC read now.
pub fn device_facts(config: &AgentConfig) -> anyhow::Result<DeviceFacts> {
    let mac = match &config.pbx.mac {
        MacSource::Fixed(m) => m.clone(),
        MacSource::Interface(ifname) => {
            let path = format!("/sys/class/net/{ifname}/address");
            let raw = std::fs::read_to_string(&path).map_err(|e| {
                anyhow::anyhow!(
                    "{}: pbx.mac_interface: cannot read {path}: {e}",
                    config.source.display()
                )
            })?;
            crate::protocol::normalize_mac(&raw).ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: pbx.mac_interface: {ifname} has no usable MAC ({:?}); set pbx.mac or another interface",
                    config.source.display(),
                    raw.trim()
                )
            })?
        }
    };
    Ok(DeviceFacts {
        edition: config.pbx.edition.as_str().to_string(),
        firmware: config.pbx.firmware.clone(),
        model: config.pbx.model.clone(),
        serial: config.pbx.serial.clone(),
        mac,
        ha_role: config.ha.as_ref().map(|h| h.role),
    })
}

/// This node's Hot Standby state from `[ha] state_file` (unknown when it cannot be read).
pub fn ha_state(config: &AgentConfig) -> Option<HaState> {
    let ha = config.ha.as_ref()?;
    let text = std::fs::read_to_string(&ha.state_file).unwrap_or_default();
    Some(HaState::parse(&text))
}

/// Activates and stores the credential. Nothing is written unless the server accepted.
pub async fn activate(
    config: &AgentConfig,
    state_dir: &StateDir,
) -> Result<(Credential, KeyIdentity), ActivationError> {
    let proof = match &config.activation {
        Activation::AuthCode(code) => ActivationProof::AuthCode { code: code.clone() },
        Activation::Email { email, password } => match password {
            Some(p) => ActivationProof::Email {
                email: email.clone(),
                password: p.clone(),
            },
            None => {
                return Err(ActivationError::Rejected {
                    reason: Reason::BadCredentials,
                    message: format!(
                        "{}: activation.password is needed once to activate with the provider's account",
                        config.source.display()
                    ),
                })
            }
        },
    };
    let facts = device_facts(config).map_err(|e| ActivationError::Rejected {
        reason: Reason::DeviceMismatch,
        message: format!("{e:#}"),
    })?;
    // The key goes to disk before its public half leaves: a retry after a crash or a lost
    // answer sends the same key, which the server takes as the same activation.
    let fingerprint = state::activation_fingerprint(config);
    let cannot_keep = |e: anyhow::Error| ActivationError::Retry {
        reason: Reason::ServerUnreachable,
        message: format!("cannot keep the device key in the state directory: {e:#}"),
    };
    let key = match state_dir.pending_key(&fingerprint).map_err(cannot_keep)? {
        Some(key) => {
            tracing::info!("sending the unfinished activation again, with its key");
            key
        }
        None => {
            let key = KeyIdentity::generate(&[state::device_cert_name()]).map_err(|e| {
                ActivationError::Retry {
                    reason: Reason::TlsError,
                    message: format!("cannot generate the device key: {e:#}"),
                }
            })?;
            state_dir
                .save_pending(&fingerprint, &key)
                .map_err(cannot_keep)?;
            key
        }
    };
    crate::agent::crash_point("activation_key_saved");
    let request = ActivateRequest {
        protocol_version: PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        proof,
        device_public_key: base64::engine::general_purpose::STANDARD.encode(key.spki_der()),
        facts,
    };
    let server = config.server.address.authority();
    let tls = tls::client_config(&server_trust(config), &[b"http/1.1"], None).map_err(|e| {
        ActivationError::Rejected {
            reason: Reason::TlsError,
            message: format!("{}: server trust: {e:#}", config.source.display()),
        }
    })?;
    let body = serde_json::to_vec(&request).map_err(|e| ActivationError::Retry {
        reason: Reason::ProtocolMismatch,
        message: format!("cannot encode the activation request: {e}"),
    })?;
    let (http_status, body) = tokio::time::timeout(
        ACTIVATION_TIMEOUT,
        post_json(
            &config.server.address,
            config.tunnel.proxy.as_ref(),
            tls,
            ACTIVATE_PATH,
            body,
        ),
    )
    .await
    .map_err(|_| ActivationError::Retry {
        reason: Reason::ServerUnreachable,
        message: format!("{server} did not answer activation within {ACTIVATION_TIMEOUT:?}"),
    })??;
    if http_status.is_success() {
        let ok: ActivateResponse =
            serde_json::from_slice(&body).map_err(|_| ActivationError::Retry {
                reason: Reason::ProtocolMismatch,
                message: format!(
                    "{server} answered activation with something this agent does not understand"
                ),
            })?;
        crate::agent::crash_point("activation_accepted");
        let cred = Credential {
            device_id: ok.device_id,
            signing_key: ok.signing_key,
            fingerprint,
            activated_at: crate::status::rfc3339(SystemTime::now()),
        };
        state_dir
            .store(&cred, &key)
            .map_err(|e| ActivationError::Retry {
                reason: Reason::ServerUnreachable,
                message: format!("activated, but cannot store the credential: {e:#}"),
            })?;
        return Ok((cred, key));
    }
    match serde_json::from_slice::<ErrorBody>(&body) {
        // A locked-out account must not be retried with the same password behind the
        // owner's back: wait for a config change like any other refusal.
        Ok(err)
            if err.code == Reason::RateLimited
                && matches!(config.activation, Activation::Email { .. }) =>
        {
            Err(ActivationError::Rejected {
                reason: err.code,
                message: err.message,
            })
        }
        Ok(err) => Err(classify(err.code, err.message)),
        Err(_) => Err(ActivationError::Retry {
            reason: Reason::ServerUnreachable,
            message: format!("{server} answered activation with HTTP {http_status}"),
        }),
    }
}

/// Sorts a server reason into stop or retry.
pub fn classify(reason: Reason, message: String) -> ActivationError {
    match reason {
        Reason::ServerUnreachable
        | Reason::TlsError
        | Reason::ClockUnsynced
        | Reason::RateLimited
        | Reason::Replaced => ActivationError::Retry { reason, message },
        _ => ActivationError::Rejected { reason, message },
    }
}

/// Time to reach the server over TCP.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time for the whole activation exchange.
const ACTIVATION_TIMEOUT: Duration = Duration::from_secs(20);

/// POSTs a JSON `body` to `path` on `server` over HTTPS (HTTP/1.1, no redirects followed),
/// through the proxy that applies to it, and returns the status and at most
/// [`MAX_ACTIVATION_BODY`] bytes of the answer. A failure to connect reads
/// `server_unreachable`, a proxy's refusal `proxy_error`, a failed TLS handshake `tls_error`.
async fn post_json(
    server: &crate::config::ServerAddr,
    configured_proxy: Option<&crate::config::proxy::ProxyUrl>,
    tls: rustls::ClientConfig,
    path: &str,
    body: Vec<u8>,
) -> Result<(http::StatusCode, Vec<u8>), ActivationError> {
    use http_body_util::BodyExt;
    let authority = server.authority();
    let unreachable = |what: String| ActivationError::Retry {
        reason: Reason::ServerUnreachable,
        message: format!("cannot reach {authority}: {what}"),
    };
    let dial_error = |e: crate::agent::dial::DialError| match e.reason {
        // A proxy refusing (or wanting other credentials) needs its settings fixed; a
        // wrong password retried on a timer could lock the account on the proxy.
        Reason::ProxyError => ActivationError::Rejected {
            reason: e.reason,
            message: e.message,
        },
        reason => ActivationError::Retry {
            reason,
            message: e.message,
        },
    };
    let proxy = crate::agent::dial::proxy_of(server, configured_proxy).map_err(dial_error)?;
    let tcp = crate::agent::dial::connect(server, proxy.as_ref().map(|(p, _)| p), CONNECT_TIMEOUT)
        .await
        .map_err(dial_error)?;
    let name = crate::agent::dial::server_name(&server.host).map_err(|message| {
        ActivationError::Rejected {
            reason: Reason::TlsError,
            message,
        }
    })?;
    let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect(name, tcp)
        .await
        .map_err(|e| match e.kind() {
            // rustls's own errors (a certificate, an alert) come as InvalidData.
            std::io::ErrorKind::InvalidData => ActivationError::Retry {
                reason: Reason::TlsError,
                message: format!("TLS with {authority} failed: {e}"),
            },
            _ => unreachable(format!("the TLS handshake broke off: {e}")),
        })?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
    let driver = tokio::spawn(conn);
    let req = http::Request::post(path)
        .header(http::header::HOST, &authority)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::ACCEPT, "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .map_err(|e| unreachable(e.to_string()))?;
    let result = async {
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let status = resp.status();
        let mut body = resp.into_body();
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| unreachable(e.to_string()))?;
            if let Ok(data) = frame.into_data() {
                out.extend_from_slice(&data);
                if out.len() > MAX_ACTIVATION_BODY {
                    break;
                }
            }
        }
        Ok((status, out))
    }
    .await;
    driver.abort();
    result
}
