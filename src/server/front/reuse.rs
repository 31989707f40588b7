//! Stream reuse: a finished request's tunnel stream is kept for the next request of the same
//! visit (grant and visitor address), from any of the visitor's connections, while the grant
//! is still live.

use super::*;
use std::collections::HashMap;

/// How long a kept stream may sit idle before it is dropped rather than reused: well inside the
/// agent's head-read timeout, so the agent never closes a stream the front is about to use.
pub(super) const KEEP_IDLE: Duration = Duration::from_secs(5);

/// How long a kept stream must have been idle before a request of another visit that finds
/// the tunnel full may close it: longer than a busy visit's streams sit between requests (they
/// are taken again within microseconds), so only streams nobody is using are taken back.
pub(super) const IDLE_TO_CLOSE: Duration = Duration::from_millis(100);

/// Streams put back between two sweeps of a link's pool (stale kept streams, requests that
/// stopped waiting, visits with neither), and the visits it may list before one.
pub(super) const SWEEP_EVERY: u32 = 1024;
const VISITS_SWEEP_AT: usize = 256;

/// A link's request streams: their permits, and the streams kept for reuse with the requests
/// waiting for one, both by visit.
///
/// A finished stream goes to the pool of its visit (a page's next resource, on any of the
/// browser's connections, reuses it), or straight to a request of that visit that is waiting
/// for a stream. If only requests of other visits wait, it closes and its permit goes to them.
/// A request that finds the tunnel full also closes a stream another visit has left idle. So
/// kept streams never make a request wait long, and in a burst of more visitor connections
/// than streams, a visit's streams pass from one of its requests to the next instead of each
/// finished request closing its stream and the next one opening another.
pub(crate) struct StreamRoom {
    /// One per request stream (try_acquire fails → wait, then 503).
    pub(crate) permits: Arc<tokio::sync::Semaphore>,
    pool: std::sync::Mutex<Pool>,
}

#[derive(Default)]
struct Pool {
    visits: HashMap<u64, Visit>,
    /// Requests waiting for a stream, all visits.
    waiting: usize,
    /// Streams closed for waiting requests whose permits have not been taken yet.
    closing: usize,
    /// Streams put back since the last sweep.
    puts: u32,
}

impl Pool {
    /// Drops what can no longer serve: kept streams idle too long or closed by the agent,
    /// handover slots of requests that stopped waiting, then visits with nothing left. The
    /// dropped streams are returned, to be closed outside the lock.
    fn sweep(&mut self) -> Vec<KeptStream> {
        let mut stale = Vec::new();
        for v in self.visits.values_mut() {
            v.waiters.retain(|w| !w.is_closed());
            let (keep, gone): (Vec<_>, Vec<_>) = std::mem::take(&mut v.idle)
                .into_iter()
                .partition(KeptStream::usable);
            v.idle = keep;
            stale.extend(gone);
        }
        self.visits
            .retain(|_, v| !v.idle.is_empty() || !v.waiters.is_empty());
        self.puts = 0;
        stale
    }
}

#[derive(Default)]
struct Visit {
    /// Kept streams, most recently used last.
    idle: Vec<KeptStream>,
    /// Requests of this visit waiting for a stream, first come first served: a finished
    /// stream is handed to the first, so the visit's busy connections cannot take it first.
    waiters: std::collections::VecDeque<tokio::sync::oneshot::Sender<KeptStream>>,
}

/// The pool key of a visit: grant id and visitor address, hashed (a stream's own fields are
/// compared before it is reused, so a collision costs a stream, never a wrong one).
fn visit_key(grant_id: &str, client: IpAddr) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
    let mut h =
        BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().build_hasher();
    h.write(grant_id.as_bytes());
    match client {
        IpAddr::V4(a) => h.write(&a.octets()),
        IpAddr::V6(a) => h.write(&a.octets()),
    }
    h.finish()
}

impl StreamRoom {
    /// A room of `permits` streams.
    pub(crate) fn new(permits: usize) -> StreamRoom {
        StreamRoom {
            permits: Arc::new(tokio::sync::Semaphore::new(permits)),
            pool: Default::default(),
        }
    }

    /// Visits listed and kept streams held now.
    #[cfg(test)]
    pub(super) fn listed(&self) -> (usize, usize) {
        let pool = self.lock();
        let streams = pool.visits.values().map(|v| v.idle.len()).sum();
        (pool.visits.len(), streams)
    }

    /// Requests waiting for a stream now.
    #[cfg(test)]
    pub(super) fn waiting(&self) -> usize {
        self.lock().waiting
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pool> {
        // Invariant: nothing panics while the lock is held; the pool stays valid regardless.
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A kept stream that serves this visit, if any; stale ones met on the way are dropped.
    pub(super) fn take(
        &self,
        generation: u64,
        grant: &Grant,
        client: IpAddr,
    ) -> Option<KeptStream> {
        let mut stale = Vec::new();
        let found = {
            let mut pool = self.lock();
            let visit = pool.visits.get_mut(&visit_key(&grant.id, client))?;
            loop {
                let Some(kept) = visit.idle.pop() else {
                    break None;
                };
                if kept.serves(generation, grant, client) && kept.usable() {
                    break Some(kept);
                }
                stale.push(kept);
            }
        };
        drop(stale); // closed outside the lock
        found
    }

    /// Hands a finished stream to the first waiting request of its visit, or keeps it for the
    /// visit's next request, unless only requests of other visits wait for a stream and none is
    /// closing for them yet: then it closes.
    pub(super) fn put(&self, mut kept: KeptStream) {
        if kept.header.passwordless_token.is_some() {
            return; // never reused
        }
        kept.idle_since = std::time::Instant::now();
        let key = visit_key(&kept.header.grant_id, kept.client);
        let mut pool = self.lock();
        if let Some(visit) = pool.visits.get_mut(&key) {
            while let Some(waiter) = visit.waiters.pop_front() {
                match waiter.send(kept) {
                    Ok(()) => return,
                    Err(back) => kept = back, // that request stopped waiting
                }
            }
        }
        if pool.waiting > pool.closing {
            pool.closing += 1;
            drop(pool);
            drop(kept); // its permit goes to a waiting request of another visit
            return;
        }
        pool.puts += 1;
        let stale = (pool.puts >= SWEEP_EVERY || pool.visits.len() >= VISITS_SWEEP_AT)
            .then(|| pool.sweep());
        pool.visits.entry(key).or_default().idle.push(kept);
        drop(pool);
        drop(stale); // closed outside the lock
    }

    /// Waits for a stream of this visit handed over by a finished request, a permit, or
    /// `until`; while it waits, a stream another visit has left idle is closed for it.
    pub(super) async fn wait(
        &self,
        generation: u64,
        grant: &Grant,
        client: IpAddr,
        until: tokio::time::Instant,
    ) -> Option<Next> {
        let key = visit_key(&grant.id, client);
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let idle = {
            let mut pool = self.lock();
            pool.waiting += 1;
            pool.visits.entry(key).or_default().waiters.push_back(tx);
            Self::close_for(&mut pool, key)
        };
        drop(idle); // its permit frees up once its client has ended
        let _waiting = Waiting(self);
        // One place in the semaphore's queue for the whole wait.
        let mut permit = std::pin::pin!(self.permits.clone().acquire_owned());
        let mut deadline = std::pin::pin!(tokio::time::sleep_until(until));
        let mut check = tokio::time::interval(IDLE_TO_CLOSE);
        check.tick().await;
        loop {
            tokio::select! {
                kept = &mut rx => match kept {
                    Ok(k) if k.serves(generation, grant, client) => return Some(Next::Kept(k)),
                    // A stale stream (the grant changed), or none: a permit, then.
                    _ => {
                        let p = tokio::time::timeout_at(until, permit).await;
                        return p.ok().and_then(Result::ok).map(Next::Permit);
                    }
                },
                p = &mut permit => return p.ok().map(Next::Permit),
                () = &mut deadline => return None,
                _ = check.tick() => {
                    // Streams idle long enough may have turned up since the wait began.
                    let idle = Self::close_for(&mut self.lock(), key);
                    drop(idle);
                }
            }
        }
    }

    /// Takes the stream idle longest among other visits' streams idle at least
    /// [`IDLE_TO_CLOSE`], counted as closing for a waiting request.
    fn close_for(pool: &mut Pool, key: u64) -> Option<KeptStream> {
        let (k, i) = pool
            .visits
            .iter()
            .filter(|(k, _)| **k != key)
            .flat_map(|(k, v)| v.idle.iter().enumerate().map(move |(i, s)| (*k, i, s)))
            .filter(|(_, _, s)| s.idle_since.elapsed() >= IDLE_TO_CLOSE)
            .min_by_key(|(_, _, s)| s.idle_since)
            .map(|(k, i, _)| (k, i))?;
        let idle = pool.visits.get_mut(&k).map(|v| v.idle.remove(i));
        if idle.is_some() {
            pool.closing += 1;
        }
        idle
    }
}

/// What a waiting request got: a kept stream of its visit, or a permit to open one.
pub(super) enum Next {
    Kept(KeptStream),
    Permit(tokio::sync::OwnedSemaphorePermit),
}

/// A request waiting for a stream (see [`StreamRoom::wait`]); its handover slot in its visit's
/// queue is dropped with its receiver and skipped by the next finished stream.
struct Waiting<'a>(&'a StreamRoom);

impl Drop for Waiting<'_> {
    /// Served (or given up): one waiter and, if any, one stream closing for waiters fewer.
    fn drop(&mut self) {
        let mut pool = self.0.lock();
        pool.waiting -= 1;
        pool.closing = pool.closing.saturating_sub(1);
    }
}

/// A tunnel stream kept for the next request of the same visit, so a page with many
/// resources costs a few streams (and one HTTP handshake at each end per stream) instead of one
/// per request. The agent still judges every request on its own.
pub(crate) struct KeptStream {
    pub(super) generation: u64,
    /// The link's streams, which the stream returns to. Weak: the room holds its kept
    /// streams, and a link that is gone must not be kept alive by them (nor its connection,
    /// nor with it the endpoint's port).
    pub(super) room: std::sync::Weak<StreamRoom>,
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
            room: Arc::downgrade(&link.streams),
            header,
            client,
            sender,
            idle_since: std::time::Instant::now(),
        }
    }

    /// Whether the stream may still carry a request: idle for less than [`KEEP_IDLE`] and not
    /// closed by the agent.
    fn usable(&self) -> bool {
        self.idle_since.elapsed() < KEEP_IDLE && !self.sender.is_closed()
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

/// What one visitor connection remembers between its requests: its last grant lookup.
#[derive(Clone, Default)]
pub(crate) struct Keeper(pub(super) Arc<std::sync::Mutex<Kept>>);

#[derive(Default)]
pub(crate) struct Kept {
    /// (cookie hash, grant, when looked up).
    pub(super) grant: Option<([u8; 32], Arc<Grant>, std::time::Instant)>,
}

impl Keeper {
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

/// A response body that hands its stream back to the link's pool when read to the end. A body
/// dropped early (visitor gone) drops the stream with it.
pub(super) struct KeepOnEnd {
    pub(super) body: Incoming,
    pub(super) back: Option<KeptStream>,
}

impl KeepOnEnd {
    pub(super) fn new(body: Incoming, back: KeptStream) -> KeepOnEnd {
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
        if let Some(kept) = self.back.take() {
            if let Some(room) = kept.room.upgrade() {
                room.put(kept);
            }
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
