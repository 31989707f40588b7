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
    let key = KeyIdentity::generate(&[state::device_cert_name()]).map_err(|e| {
        ActivationError::Retry {
            reason: Reason::TlsError,
            message: format!("cannot generate the device key: {e:#}"),
        }
    })?;
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
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .https_only(true)
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(20))
        .build()
        .map_err(|e| ActivationError::Retry {
            reason: Reason::TlsError,
            message: format!("http client: {e}"),
        })?;
    let url = format!("https://{server}{ACTIVATE_PATH}");
    let resp = client
        .post(&url)
        .json(&request)
        .send()
        .await
        .map_err(|e| transport_error(&server, e))?;
    let http_status = resp.status();
    let body = read_limited(resp)
        .await
        .map_err(|e| transport_error(&server, e))?;
    if http_status.is_success() {
        let ok: ActivateResponse =
            serde_json::from_slice(&body).map_err(|_| ActivationError::Retry {
                reason: Reason::ProtocolMismatch,
                message: format!(
                    "{server} answered activation with something this agent does not understand"
                ),
            })?;
        let cred = Credential {
            device_id: ok.device_id,
            signing_key: ok.signing_key,
            fingerprint: state::activation_fingerprint(config),
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

async fn read_limited(mut resp: reqwest::Response) -> Result<Vec<u8>, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_ACTIVATION_BODY {
            break;
        }
    }
    Ok(body)
}

fn transport_error(server: &str, e: reqwest::Error) -> ActivationError {
    let chain = format!("{:#}", anyhow::Error::from_boxed(Box::new(e)));
    // reqwest/hyper-util wrap the rustls error in ways a downcast walk does not always reach;
    // rustls' own wording identifies it reliably.
    let is_tls = [
        "invalid peer certificate",
        "peer is incompatible",
        "received fatal alert",
        "peer misbehaved",
    ]
    .iter()
    .any(|m| chain.contains(m));
    if is_tls {
        ActivationError::Retry {
            reason: Reason::TlsError,
            message: format!("TLS with {server} failed: {chain}"),
        }
    } else {
        ActivationError::Retry {
            reason: Reason::ServerUnreachable,
            message: format!("cannot reach {server}: {chain}"),
        }
    }
}
