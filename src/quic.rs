//! QUIC and UDP socket tuning both ends apply to the tunnel: quinn's transport settings and
//! the kernel buffers of a tunnel socket. The wire contract itself is in [`crate::protocol`].

use crate::protocol::{CONN_WINDOW, IDLE_TIMEOUT, KEEPALIVE, STREAM_WINDOW};

/// Transport settings both ends share: keep-alive under NAT timeouts, a short idle timeout,
/// stream and window limits sized for the memory target, and `max_bidi` streams the peer may
/// open.
///
/// Acknowledgements: each end asks the other to acknowledge every 8th packet (or after its
/// max_ack_delay) instead of every 2nd, so a bulk download costs fewer ACK packets to send,
/// receive and process. Reordering still triggers an immediate ACK, so loss recovery keeps its
/// pace (the fault tests run with it).
///
/// Loss detection tolerates reordering: a packet counts as lost once 16 later ones are
/// acknowledged (RFC 9002: 3) or 2 RTTs after it was sent (RFC 9002: 9/8). With the RFC's
/// values a packet overtaken on the path is declared lost and the congestion window halved, and
/// quinn never takes that back; Linux TCP's RACK adapts instead. The price: a packet lost with
/// fewer than 16 after it is retransmitted about 0.9 RTT later than with the RFC's values (tail
/// losses are PTO's, unchanged). Measured figures for both choices: `bench/README.md`.
pub fn transport_config(max_bidi: u32) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(KEEPALIVE));
    // Invariant: IDLE_TIMEOUT is a small constant well inside QUIC's varint range.
    t.max_idle_timeout(IDLE_TIMEOUT.try_into().ok());
    t.max_concurrent_bidi_streams(max_bidi.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.stream_receive_window(STREAM_WINDOW.into());
    t.receive_window(CONN_WINDOW.into());
    t.send_window(u64::from(CONN_WINDOW));
    let mut acks = quinn::AckFrequencyConfig::default();
    acks.ack_eliciting_threshold(ACK_ELICITING_THRESHOLD.into());
    t.ack_frequency_config(Some(acks));
    t.packet_threshold(LOSS_PACKET_THRESHOLD);
    t.time_threshold(LOSS_TIME_THRESHOLD);
    t
}

/// Later packets acknowledged before an unacknowledged one counts as lost (see
/// [`transport_config`]).
pub const LOSS_PACKET_THRESHOLD: u32 = 16;

/// RTTs after which an unacknowledged packet counts as lost (see [`transport_config`]).
pub const LOSS_TIME_THRESHOLD: f32 = 2.0;

/// Kernel buffer asked for on a tunnel UDP socket, each way. Linux's default (208 KiB) overflows
/// under a bulk download (the bench counted hundreds of `RcvbufErrors` per run), and QUIC takes
/// every dropped datagram as congestion. The kernel caps it at `net.core.rmem_max`/`wmem_max`.
pub const UDP_BUFFER: usize = 4 << 20;

/// Enlarges a tunnel socket's kernel buffers, best effort. The kernel grants what its limits
/// allow; less than asked is logged at info once per process, naming the sysctls to raise (the
/// agent's packages ship them in `/usr/lib/sysctl.d/30-pbx-remote-agent.conf`).
pub fn tune_udp(sock: &std::net::UdpSocket) {
    use rustix::net::sockopt;
    if let Err(e) = sockopt::set_socket_recv_buffer_size(sock, UDP_BUFFER) {
        tracing::debug!(error = %e, "SO_RCVBUF not set");
    }
    if let Err(e) = sockopt::set_socket_send_buffer_size(sock, UDP_BUFFER) {
        tracing::debug!(error = %e, "SO_SNDBUF not set");
    }
    // Linux reports twice what it grants (the other half is its bookkeeping).
    let recv = sockopt::socket_recv_buffer_size(sock).unwrap_or(0) / 2;
    let send = sockopt::socket_send_buffer_size(sock).unwrap_or(0) / 2;
    static CAPPED: std::sync::Once = std::sync::Once::new();
    if recv < UDP_BUFFER || send < UDP_BUFFER {
        CAPPED.call_once(|| {
            tracing::info!(
                recv,
                send,
                asked = UDP_BUFFER,
                "tunnel UDP buffers capped by the kernel; raise net.core.rmem_max and \
                 net.core.wmem_max to {UDP_BUFFER} so bulk transfers are not read as congestion"
            )
        });
    }
}

/// Ack-eliciting packets a receiver may hold before it must acknowledge (see
/// [`transport_config`]).
pub const ACK_ELICITING_THRESHOLD: u32 = 7;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnel_sockets_get_the_buffers_the_kernel_allows() {
        use rustix::net::sockopt;
        let limit = |name: &str| -> usize {
            std::fs::read_to_string(format!("/proc/sys/net/core/{name}"))
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let before = sockopt::socket_recv_buffer_size(&sock).unwrap();
        tune_udp(&sock);
        let recv = sockopt::socket_recv_buffer_size(&sock).unwrap() / 2;
        let send = sockopt::socket_send_buffer_size(&sock).unwrap() / 2;
        assert_eq!(recv, UDP_BUFFER.min(limit("rmem_max")), "before: {before}");
        assert_eq!(send, UDP_BUFFER.min(limit("wmem_max")));
    }

    /// Issue 23: a tunnel socket, prepared as the agent and the server prepare theirs and
    /// wrapped by the runtime quinn drives it with, hands the kernel several datagrams per
    /// send (GSO, Linux 4.18+) and takes several per receive (GRO, Linux 5.0+). The bench's
    /// `BENCH_PERF=strace` shows it at work: about one `sendmsg` per four to five requests.
    #[tokio::test]
    async fn tunnel_sockets_batch_datagrams_where_the_kernel_offers_it() {
        use quinn::Runtime;
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let major: u32 = release
            .split('.')
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        if major < 5 {
            eprintln!("kernel {release} offers no UDP segmentation offload; nothing to check");
            return;
        }
        for addr in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(sock) = std::net::UdpSocket::bind(addr) else {
                continue; // no IPv6 here
            };
            tune_udp(&sock);
            sock.set_nonblocking(true).unwrap();
            let sock = quinn::TokioRuntime.wrap_udp_socket(sock).unwrap();
            assert!(
                sock.max_transmit_segments() > 1,
                "{addr}: one datagram per send"
            );
            assert!(
                sock.max_receive_segments() > 1,
                "{addr}: one datagram per receive"
            );
        }
    }
}
