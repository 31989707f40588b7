//! Stream reuse: a visitor connection keeps its tunnel stream for its next request to the same
//! visit, while the tunnel has room and the grant is still live.

use super::*;

/// How long a kept stream may sit idle before it is dropped rather than reused: well inside the
/// agent's head-read timeout, so the agent never closes a stream the front is about to use.
pub(super) const KEEP_IDLE: Duration = Duration::from_secs(5);

/// Free streams a link must have left for a finished stream to be kept.
pub(super) const KEEP_HEADROOM: usize = crate::protocol::MAX_REQUEST_STREAMS as usize / 8;

/// A tunnel stream kept for the next request of the same visitor connection, so a page with
/// many resources costs one stream (and one HTTP handshake at each end) per browser
/// connection instead of one per request. The agent still judges every request on its own.
pub(crate) struct KeptStream {
    pub(super) generation: u64,
    /// The link's stream permits: a stream is kept only while others remain free.
    pub(super) streams: Arc<tokio::sync::Semaphore>,
    pub(super) header: StreamHeader,
    /// The visitor address `header` names, for comparing without formatting.
    pub(super) client: IpAddr,
    pub(super) sender: hyper::client::conn::http1::SendRequest<Incoming>,
    pub(super) idle_since: std::time::Instant,
}

impl KeptStream {
    pub(super) fn new(
        link: &crate::server::hub::Link,
        header: StreamHeader,
        client: IpAddr,
        sender: hyper::client::conn::http1::SendRequest<Incoming>,
    ) -> KeptStream {
        KeptStream {
            generation: link.generation,
            streams: link.streams.clone(),
            header,
            client,
            sender,
            idle_since: std::time::Instant::now(),
        }
    }

    /// Whether this stream speaks for exactly this visit: same link, grant (and with it the
    /// device, hence scheme and origin), user, expiry and address, and no passwordless token.
    /// Compared field by field, so a request on a kept stream builds no header.
    pub(super) fn serves(&self, generation: u64, grant: &Grant, client: IpAddr) -> bool {
        let k = &self.header;
        self.generation == generation
            && k.grant_id == grant.id
            && k.cm_user == grant.cm_user
            && k.grant_expires_ms == expires_ms(grant)
            && self.client == client
            && k.passwordless_token.is_none()
    }
}

/// How long a visitor connection trusts the grant it looked up for a cookie before asking the
/// database again: the registry stays off the per-request path, and an ended or expired visit
/// still stops within a second.
pub(super) const GRANT_RECHECK: Duration = Duration::from_secs(1);

/// What one visitor connection remembers between its requests (HTTP/1 requests on a
/// connection come one at a time): its kept stream and its last grant lookup.
#[derive(Clone, Default)]
pub(crate) struct Keeper(pub(super) Arc<std::sync::Mutex<Kept>>);

#[derive(Default)]
pub(crate) struct Kept {
    pub(super) stream: Option<KeptStream>,
    /// (cookie hash, grant, when looked up).
    pub(super) grant: Option<([u8; 32], Arc<Grant>, std::time::Instant)>,
}

impl Keeper {
    /// Takes the kept stream if it still serves this visit; anything else is dropped (closed).
    pub(super) fn take(
        &self,
        generation: u64,
        grant: &Grant,
        client: IpAddr,
    ) -> Option<KeptStream> {
        let kept = self.lock().stream.take()?;
        (kept.serves(generation, grant, client)
            && kept.idle_since.elapsed() < KEEP_IDLE
            && !kept.sender.is_closed())
        .then_some(kept)
    }

    /// Keeps the stream for the next request, unless the tunnel is nearly full: then it is
    /// closed, so busy connections do not hold streams between requests while new ones get 503.
    pub(super) fn put(&self, mut kept: KeptStream) {
        if kept.streams.available_permits() < KEEP_HEADROOM {
            return;
        }
        kept.idle_since = std::time::Instant::now();
        self.lock().stream = Some(kept);
    }

    /// The grant for `cookie`: the one looked up on this connection less than
    /// [`GRANT_RECHECK`] ago, else `lookup`'s answer (remembered when there is one).
    pub(super) fn grant(
        &self,
        cookie: &str,
        lookup: impl FnOnce(&str) -> Result<Option<Arc<Grant>>>,
    ) -> Result<Option<Arc<Grant>>> {
        let hash = crate::crypto::sha256(cookie.as_bytes());
        if let Some((h, g, at)) = &self.lock().grant {
            if *h == hash && at.elapsed() < GRANT_RECHECK {
                return Ok(Some(g.clone()));
            }
        }
        let found = lookup(cookie)?;
        self.lock().grant = found.clone().map(|g| (hash, g, std::time::Instant::now()));
        Ok(found)
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A response body that hands its stream back to the keeper when read to the end. A body
/// dropped early (visitor gone) drops the stream with it.
pub(super) struct KeepOnEnd {
    pub(super) body: Incoming,
    pub(super) back: Option<(Keeper, KeptStream)>,
}

impl KeepOnEnd {
    pub(super) fn new(body: Incoming, back: (Keeper, KeptStream)) -> KeepOnEnd {
        let mut b = KeepOnEnd {
            body,
            back: Some(back),
        };
        if hyper::body::Body::is_end_stream(&b.body) {
            b.give_back();
        }
        b
    }

    pub(super) fn give_back(&mut self) {
        if let Some((keeper, kept)) = self.back.take() {
            keeper.put(kept);
        }
    }
}

impl hyper::body::Body for KeepOnEnd {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(None) => this.give_back(),
            std::task::Poll::Ready(Some(Ok(_))) if this.body.is_end_stream() => this.give_back(),
            // An error mid-body: the stream is not fit for another request.
            std::task::Poll::Ready(Some(Err(_))) => this.back = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}
