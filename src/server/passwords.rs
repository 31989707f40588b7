//! Password checks and hashes on the server, bounded. Each one is argon2id: 19 MiB and tens of
//! milliseconds of a core. The console's sign-in and the activation API run one for anyone who
//! asks, so without a bound a flood of sign-ins with made-up emails (which the per-account
//! lockout does not slow) would run as many at once as the two listeners take connections
//! (512), on as many blocking threads: gigabytes of memory and every core. Here at most
//! [`RUNNING`] run at once and [`WAITING`] more wait their turn; past that a request is told
//! the server is busy at once, and nothing is counted against the account. One source (an
//! address, or an IPv6 /64) holds at most [`PER_SOURCE`] of those places, so a flood from one
//! machine leaves the line to everybody else.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use tokio::sync::Semaphore;

/// Checks or hashes running at once.
pub const RUNNING: usize = 4;
/// Requests waiting for one of the [`RUNNING`] places; more are answered [`Busy`].
pub const WAITING: usize = 28;
/// Places (running or waiting) one source may hold.
pub const PER_SOURCE: usize = 4;

/// Every place is taken, or the asker's source holds its share: the caller answers "busy,
/// try again".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy;

impl std::fmt::Display for Busy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the server is busy checking other passwords; try again in a moment")
    }
}

impl std::error::Error for Busy {}

type Held = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// The server's bound on password work (one per server, in [`super::ServerState`]).
pub struct Passwords {
    /// Places for requests that run or wait.
    admitted: Arc<Semaphore>,
    /// Places for requests that run.
    running: Arc<Semaphore>,
    /// Places each source holds now (sources holding none are not kept).
    sources: Held,
    per_source: usize,
}

impl Default for Passwords {
    fn default() -> Passwords {
        Passwords::new(RUNNING, WAITING, PER_SOURCE)
    }
}

/// One source's place; given back when dropped.
struct SourcePlace {
    sources: Held,
    source: IpAddr,
}

fn lock(m: &Held) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
    // Invariant: nothing panics while the map is locked (counter updates only).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Drop for SourcePlace {
    fn drop(&mut self) {
        let mut held = lock(&self.sources);
        if let Some(n) = held.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.source);
            }
        }
    }
}

impl Passwords {
    /// At most `running` jobs at once, `waiting` more in line, and `per_source` of those
    /// places held by one source.
    pub fn new(running: usize, waiting: usize, per_source: usize) -> Passwords {
        Passwords {
            admitted: Arc::new(Semaphore::new(running + waiting)),
            running: Arc::new(Semaphore::new(running)),
            sources: Held::default(),
            per_source,
        }
    }

    /// Whether `password` matches the PHC string `phc` (a job that fails or panics: no);
    /// `client` is who asks.
    pub async fn verify(
        &self,
        client: IpAddr,
        password: String,
        phc: String,
    ) -> Result<bool, Busy> {
        Ok(self
            .run(client, move || crate::password::verify(&password, &phc))
            .await?
            .unwrap_or(false))
    }

    /// A PHC string for `password`; `client` is who asks.
    pub async fn hash(
        &self,
        client: IpAddr,
        password: String,
    ) -> Result<anyhow::Result<String>, Busy> {
        Ok(self
            .run(client, move || crate::password::hash(&password))
            .await?
            .unwrap_or_else(|_| Err(anyhow::anyhow!("password hashing failed"))))
    }

    /// Takes a place for `client`'s source, if it holds fewer than its share.
    fn source_place(&self, client: IpAddr) -> Result<SourcePlace, Busy> {
        let source = super::source_of(client);
        let mut held = lock(&self.sources);
        let n = held.entry(source).or_insert(0);
        if *n >= self.per_source {
            return Err(Busy);
        }
        *n += 1;
        Ok(SourcePlace {
            sources: self.sources.clone(),
            source,
        })
    }

    /// Runs `job` on a blocking thread once a place is free; `Err(Busy)` at once when the line
    /// is full or `client`'s source holds its share of it. `Ok(Err(()))` if the job panicked.
    /// The places travel with the job, so a caller that goes away (a closed connection) frees
    /// them only when the job has ended.
    async fn run<T: Send + 'static>(
        &self,
        client: IpAddr,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<Result<T, ()>, Busy> {
        let mine = self.source_place(client)?;
        let admitted = self
            .admitted
            .clone()
            .try_acquire_owned()
            .map_err(|_| Busy)?;
        let running = self
            .running
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Busy)?;
        let done = tokio::task::spawn_blocking(move || {
            let out = job();
            // The line's places first: when the running place is free, so are these.
            drop((mine, admitted, running));
            out
        });
        Ok(done.await.map_err(|_| ()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Condvar, Mutex};
    use std::task::Poll;
    use std::time::Duration;

    /// Jobs that count how many of them run at once and wait for the gate to open.
    #[derive(Default)]
    struct Probe {
        now: AtomicUsize,
        most: AtomicUsize,
        gate: (Mutex<bool>, Condvar),
    }

    impl Probe {
        fn job(
            self: &Arc<Self>,
            started: tokio::sync::mpsc::UnboundedSender<()>,
        ) -> impl FnOnce() + Send {
            let p = self.clone();
            move || {
                let n = p.now.fetch_add(1, Ordering::SeqCst) + 1;
                p.most.fetch_max(n, Ordering::SeqCst);
                let _ = started.send(());
                let (open, cv) = &p.gate;
                let mut open = open.lock().unwrap_or_else(|e| e.into_inner());
                while !*open {
                    open = cv.wait(open).unwrap_or_else(|e| e.into_inner());
                }
                drop(open);
                p.now.fetch_sub(1, Ordering::SeqCst);
            }
        }

        fn open(&self) {
            *self.gate.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
            self.gate.1.notify_all();
        }
    }

    /// Opens the gate when the test ends, passed or failed: a job still waiting on it would
    /// keep the runtime from shutting down, and a failing test would hang instead of failing.
    struct OpenAtEnd(Arc<Probe>);

    impl Drop for OpenAtEnd {
        fn drop(&mut self) {
            self.0.open();
        }
    }

    const HOST: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    type Call = Pin<Box<dyn Future<Output = Result<Result<(), ()>, Busy>> + Send>>;

    /// Polls `call` once (it takes its place in line, or starts).
    async fn poll_once(call: &mut Call) -> Poll<Result<Result<(), ()>, Busy>> {
        std::future::poll_fn(|cx| Poll::Ready(call.as_mut().poll(cx))).await
    }

    #[tokio::test]
    async fn at_most_the_running_places_run_and_past_the_line_it_is_busy() {
        let (running, waiting) = (2, 3);
        let pw = Arc::new(Passwords::new(running, waiting, running + waiting));
        let probe = Arc::new(Probe::default());
        let _open = OpenAtEnd(probe.clone());
        let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
        let mut calls: Vec<Call> = (0..running + waiting)
            .map(|_| {
                let (pw, job) = (pw.clone(), probe.job(started_tx.clone()));
                Box::pin(async move { pw.run(HOST, job).await }) as Call
            })
            .collect();
        for call in &mut calls {
            assert!(poll_once(call).await.is_pending(), "in line or running");
        }
        assert_eq!(
            pw.run(HOST, || ()).await,
            Err(Busy),
            "past the line: busy at once"
        );
        for _ in 0..running {
            tokio::time::timeout(Duration::from_secs(5), started.recv())
                .await
                .expect("the first jobs start");
        }
        // No third job starts while the first two run (given well past a thread's start-up).
        let third = tokio::time::timeout(Duration::from_millis(300), started.recv()).await;
        assert!(third.is_err(), "a third job started while two ran");
        assert_eq!(probe.now.load(Ordering::SeqCst), running);
        probe.open();
        let calls: Vec<_> = calls.into_iter().map(tokio::spawn).collect();
        for call in calls {
            let done = tokio::time::timeout(Duration::from_secs(5), call)
                .await
                .expect("every job ends");
            assert_eq!(done.expect("joined"), Ok(Ok(())));
        }
        assert_eq!(
            probe.most.load(Ordering::SeqCst),
            running,
            "never more at once"
        );
        assert_eq!(
            pw.run(HOST, || 7).await,
            Ok(Ok(7)),
            "the places are free again"
        );
    }

    #[tokio::test]
    async fn a_caller_that_goes_away_keeps_its_place_until_the_job_ends() {
        let pw = Arc::new(Passwords::new(1, 0, 1));
        let probe = Arc::new(Probe::default());
        let _open = OpenAtEnd(probe.clone());
        let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
        let job = probe.job(started_tx);
        let p = pw.clone();
        let mut call: Call = Box::pin(async move { p.run(HOST, job).await });
        assert!(poll_once(&mut call).await.is_pending());
        tokio::time::timeout(Duration::from_secs(5), started.recv())
            .await
            .expect("the job starts");
        drop(call);
        assert_eq!(
            pw.run(HOST, || ()).await,
            Err(Busy),
            "the job still holds its place"
        );
        probe.open();
        let freed = tokio::time::timeout(Duration::from_secs(5), pw.running.acquire())
            .await
            .expect("the job ends and frees its place");
        drop(freed);
        assert_eq!(pw.run(HOST, || ()).await, Ok(Ok(())));
    }

    #[tokio::test]
    async fn verify_and_hash_go_through_the_bound() {
        let pw = Passwords::default();
        let phc = pw
            .hash(HOST, "Right-Passw0rd-1".into())
            .await
            .expect("a place")
            .expect("hashed");
        assert_eq!(
            pw.verify(HOST, "Right-Passw0rd-1".into(), phc.clone())
                .await,
            Ok(true)
        );
        assert_eq!(
            pw.verify(HOST, "Wrong-Passw0rd-1".into(), phc).await,
            Ok(false)
        );
    }

    #[tokio::test]
    async fn one_source_holds_at_most_its_share_of_the_line() {
        let pw = Arc::new(Passwords::new(1, 7, 2));
        let probe = Arc::new(Probe::default());
        let _open = OpenAtEnd(probe.clone());
        let (started_tx, _started) = tokio::sync::mpsc::unbounded_channel();
        let a: IpAddr = "2001:db8:1:2::10".parse().unwrap();
        let a_too: IpAddr = "2001:db8:1:2:ffff::1".parse().unwrap(); // the same /64
        let b: IpAddr = "2001:db8:1:3::10".parse().unwrap();
        let mut calls = Vec::new();
        for client in [a, a_too] {
            let (p, job) = (pw.clone(), probe.job(started_tx.clone()));
            let mut call: Call = Box::pin(async move { p.run(client, job).await });
            assert!(
                poll_once(&mut call).await.is_pending(),
                "{client} is in line"
            );
            calls.push(call);
        }
        assert_eq!(pw.run(a, || ()).await, Err(Busy), "a third from that /64");
        let (p, job) = (pw.clone(), probe.job(started_tx.clone()));
        let mut other: Call = Box::pin(async move { p.run(b, job).await });
        assert!(
            poll_once(&mut other).await.is_pending(),
            "another /64 still gets in line"
        );
        probe.open();
        for call in calls.into_iter().chain([other]) {
            let done = tokio::time::timeout(Duration::from_secs(5), tokio::spawn(call))
                .await
                .expect("every job ends");
            assert_eq!(done.expect("joined"), Ok(Ok(())));
        }
        assert_eq!(pw.run(a, || 1).await, Ok(Ok(1)), "the share is given back");
        assert!(
            lock(&pw.sources).is_empty(),
            "sources holding nothing are forgotten"
        );
    }
}
