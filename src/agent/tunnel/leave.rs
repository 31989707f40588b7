//! `pbx-remote-agent deactivate`: the node tells the CM it is being uninstalled, so the CM
//! revokes its key. It goes over the tunnel's own transport with the device key as client
//! certificate (the key is the proof; nothing else is sent), and says `deactivate` where a
//! running agent says hello.

use super::{client_configs, race, Conn, ConnectFailure};
use crate::config::{AgentConfig, TransportMode};
use crate::protocol::{read_frame, write_frame, Control, Reason, CONNECT_TIMEOUT};
use crate::tls::KeyIdentity;

/// What the CM answered.
#[derive(Debug, PartialEq, Eq)]
pub enum Deactivation {
    /// The node's key is revoked there.
    Revoked {
        /// The device id the CM knows.
        device_id: String,
        /// Nodes of the device still registered (a Hot Standby peer).
        nodes_left: u32,
    },
    /// The CM does not know this key (removed there already, or another CM): nothing to revoke.
    Unknown(String),
}

/// Connects as the config says (`auto`: QUIC, then TCP if QUIC fails) and asks the CM to revoke
/// this node's key. `Err` when the CM could not be told: the reason and why.
pub async fn deactivate(
    config: &AgentConfig,
    key: &KeyIdentity,
) -> Result<Deactivation, (Reason, String)> {
    let failed = |e: ConnectFailure| (e.reason, e.message);
    let trust = crate::agent::activation::server_trust(config);
    let (client, tcp_tls) = client_configs(&trust, key).map_err(|e| {
        (
            Reason::TlsError,
            format!("device key or server trust: {e:#}"),
        )
    })?;
    let server = &config.server.address;
    let dial_quic = || async {
        let (result, _) = race::dial_quic_bounded(server, &client, false).await;
        result.map(|d| (Conn::Quic(d), None))
    };
    let dial_tcp = || async {
        let (link, control, _) = race::dial_tcp_proxied(config, tcp_tls.clone()).await?;
        Ok::<_, ConnectFailure>((Conn::Tcp(link), Some(control)))
    };
    let dialed = match config.tunnel.transport {
        TransportMode::Quic => dial_quic().await,
        TransportMode::Tcp => dial_tcp().await,
        TransportMode::Auto => match dial_quic().await {
            Ok(d) => Ok(d),
            Err(e) => {
                tracing::debug!(message = %e.message, "QUIC failed; trying TCP");
                dial_tcp().await
            }
        },
    };
    let (mut conn, control) = match dialed {
        Ok(d) => d,
        Err(e) if e.reason == Reason::DeviceRemoved => return Ok(Deactivation::Unknown(e.message)),
        Err(e) => return Err(failed(e)),
    };
    let exchange = async {
        let (mut send, mut recv) = conn.control(control).await?;
        let ask = Control::Deactivate {
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
        };
        write_frame(&mut send, &ask).await?;
        anyhow::Ok(read_frame::<_, Control>(&mut recv).await?)
    };
    let answer = tokio::time::timeout(CONNECT_TIMEOUT, exchange).await;
    let outcome = match answer {
        Ok(Ok(Some(Control::Deactivated {
            device_id,
            nodes_left,
        }))) => Ok(Deactivation::Revoked {
            device_id,
            nodes_left,
        }),
        Err(_) => Err((
            Reason::ServerUnreachable,
            format!("{server} did not answer within {CONNECT_TIMEOUT:?}"),
        )),
        Ok(_) => match conn.refusal(&server.to_string()).await {
            (Reason::DeviceRemoved, message) => Ok(Deactivation::Unknown(message)),
            other => Err(other),
        },
    };
    conn.close().await;
    outcome
}
