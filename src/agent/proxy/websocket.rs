//! WebSockets: the upgrade test, the bridge between visitor and portal that counts data frames
//! as activity, and the body wrapper that ends with the session.

use super::*;

pin_project_lite::pin_project! {
    /// A response body that stops when its session ends (logout, expiry, revocation), so a
    /// revoked visitor's download is cut rather than left running. The wait for the end is held
    /// in place (pinned inside the body, which is boxed once anyway) rather than boxed apart: one
    /// heap allocation less per request.
    pub(super) struct EndsWithSession {
        // What the agent already read of the answer (the portal login broker's page check).
        pub(super) head: Option<Bytes>,
        pub(super) inner: Incoming,
        #[pin]
        pub(super) ended: tokio_util::sync::WaitForCancellationFutureOwned,
    }
}

pin_project_lite::pin_project! {
    /// What the agent answers a tunnel request with: the portal's answer, or a page of its own.
    /// An enum rather than a box: one heap allocation less per forwarded request.
    #[project = ReplyProj]
    pub(crate) enum Reply {
        /// The portal's answer.
        Portal { #[pin] body: EndsWithSession },
        /// The agent's page (or an empty 101 answer).
        Page { body: Body },
    }
}

impl hyper::body::Body for Reply {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        match self.project() {
            ReplyProj::Portal { body } => body.poll_frame(cx),
            ReplyProj::Page { body } => std::pin::Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Reply::Portal { body } => body.is_end_stream(),
            Reply::Page { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            Reply::Portal { body } => body.size_hint(),
            Reply::Page { body } => body.size_hint(),
        }
    }
}

impl hyper::body::Body for EndsWithSession {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let this = self.project();
        if this.ended.poll(cx).is_ready() {
            // Ending early breaks the message framing, which aborts the visitor's connection.
            return std::task::Poll::Ready(None);
        }
        if let Some(head) = this.head.take() {
            return std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(head))));
        }
        std::pin::Pin::new(this.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        let inner = self.inner.size_hint();
        let head = self.head.as_ref().map_or(0, |h| h.len() as u64);
        let mut hint = hyper::body::SizeHint::new();
        hint.set_lower(inner.lower() + head);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + head);
        }
        hint
    }
}

/// Copies a WebSocket both ways until either side closes or the session ends. Client data
/// frames (not pings) count as session activity.
pub(super) async fn bridge_websocket<C, P>(client: C, portal: P, session: &Session, gate: &Gate)
where
    C: AsyncRead + AsyncWrite + Unpin,
    P: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_rx, mut client_tx) = tokio::io::split(client);
    let (mut portal_rx, mut portal_tx) = tokio::io::split(portal);
    let upstream = async {
        let mut watch = FrameWatch::default();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = client_rx.read(&mut buf).await?;
            if n == 0 {
                return portal_tx.shutdown().await;
            }
            if watch.feed(&buf[..n]) > 0 {
                gate.touch(session);
            }
            portal_tx.write_all(&buf[..n]).await?;
        }
    };
    let downstream = async {
        tokio::io::copy(&mut portal_rx, &mut client_tx).await?;
        client_tx.shutdown().await
    };
    tokio::select! {
        _ = session.ended.cancelled() => tracing::debug!("session ended; websocket closed"),
        r = async { tokio::try_join!(upstream, downstream) } => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "websocket ended");
            }
        }
    }
}

/// A GET with `Upgrade: websocket` and `Connection: upgrade`.
pub fn is_websocket<B>(req: &Request<B>) -> bool {
    req.method() == Method::GET
        && header_has_token(req.headers(), &header::UPGRADE, "websocket")
        && header_has_token(req.headers(), &header::CONNECTION, "upgrade")
}

pub(super) fn header_has_token(h: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    h.get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}
