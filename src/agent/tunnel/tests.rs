//! The agent's QUIC settings against a server that opens request streams as the front does.

use super::client_configs;
use crate::protocol::{ALPN, MAX_REQUEST_STREAMS};
use crate::tls::{KeyIdentity, ServerTrust};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::timeout;

/// Long enough for any step on loopback; a stream that waits for credit waits for ever.
const STEP: Duration = Duration::from_secs(3);

/// The server opens up to `MAX_REQUEST_STREAMS` request streams at once and must never wait for
/// QUIC stream credit below that. quinn announces credit for closed streams only once an eighth
/// of the advertised limit has come back, so an agent that advertised exactly what the server
/// uses would leave up to an eighth unannounced: with most streams long-lived (downloads, event
/// streams) and a few churning, `open_bi` would wait until enough long ones ended (the front
/// gives up after 5 s with 502) although the server's own count had room.
#[tokio::test]
async fn the_server_opens_streams_up_to_its_limit_while_long_ones_stay_open() {
    crate::tls::install_default_provider();
    // The server's side as the CM sets it up: TLS 1.3 with the device key as client certificate.
    let server_id = KeyIdentity::generate(&["localhost".into()]).unwrap();
    let mut crypto = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(Arc::new(crate::tls::DeviceKeyVerifier::new()))
        .with_single_cert(vec![server_id.cert.clone()], server_id.private_key())
        .unwrap();
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(crypto).unwrap();
    let server_config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let server = quinn::Endpoint::server(server_config, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = server.local_addr().unwrap();
    let device = KeyIdentity::generate(&["device".into()]).unwrap();
    let trust = ServerTrust::Pin(server_id.spki_sha256());
    let (client_config, _) = client_configs(&trust, &device).unwrap();
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    client.set_default_client_config(client_config);

    let agent_side = async {
        let connecting = client.connect(addr, "localhost").unwrap();
        timeout(STEP, connecting).await.unwrap().unwrap()
    };
    let server_side = async {
        let incoming = timeout(STEP, server.accept()).await.unwrap().unwrap();
        timeout(STEP, incoming).await.unwrap().unwrap()
    };
    let (agent, conn) = tokio::join!(agent_side, server_side);

    // The server opens a stream and sends its request; the agent takes it and reads it whole.
    let open = |n: usize| {
        let (conn, agent) = (conn.clone(), agent.clone());
        async move {
            let opened = timeout(STEP, conn.open_bi()).await.unwrap_or_else(|_| {
                panic!("stream {n}: open_bi waited {STEP:?} for stream credit")
            });
            let (mut send, recv) = opened.unwrap();
            send.write_all(b"GET").await.unwrap();
            send.finish().unwrap();
            let (agent_send, mut agent_recv) =
                timeout(STEP, agent.accept_bi()).await.unwrap().unwrap();
            let request = timeout(STEP, agent_recv.read_to_end(16)).await.unwrap();
            assert_eq!(request.unwrap(), b"GET");
            (recv, agent_send)
        }
    };
    // Closes a stream: the agent answers and finishes, the server reads the answer to its end.
    let close = |(mut recv, mut agent_send): (quinn::RecvStream, quinn::SendStream)| async move {
        agent_send.write_all(b"200").await.unwrap();
        agent_send.finish().unwrap();
        let answer = timeout(STEP, recv.read_to_end(16)).await.unwrap();
        assert_eq!(answer.unwrap(), b"200");
    };

    let in_flight = MAX_REQUEST_STREAMS as usize - 1;
    let mut open_streams = std::collections::VecDeque::new();
    for n in 0..in_flight {
        open_streams.push_back(open(n).await);
    }
    // One request stream at a time ends and another starts; the rest stay open throughout.
    for n in in_flight..in_flight + 100 {
        let oldest = open_streams.pop_front().unwrap();
        close(oldest).await;
        open_streams.push_back(open(n).await);
    }
    assert_eq!(open_streams.len(), in_flight);
    conn.close(0u32.into(), b"done");
    agent.close(0u32.into(), b"done");
}
