//! The data path's own runtime: the tunnel (the QUIC endpoint and each connection's driver, the
//! TCP transport's connections and the API's port they share) and the public front run on a
//! runtime of their own, apart from the console, the registry watcher, each device's link and
//! each activation, which stay on the caller's.
//!
//! Why one thread by default: a visitor's small request crosses four tasks in the server (the
//! visitor's connection, the stream's HTTP client, the tunnel connection's driver, the
//! endpoint's driver). On a multi-thread runtime each hand-over may wake the other worker: a
//! futex wake, a context switch in, and the tunnel connection's lock taken from two threads at
//! once. On one thread the same hand-overs are pushes onto a local queue. bench/README ("The
//! server's data path on its own thread") has the figures; one core carries far more visitor traffic
//! than a CM's providers make. `--data-threads N` gives the data path N workers instead.
//!
//! It also keeps the two kinds of work apart: a console page that computes for a while (a list
//! of thousands of devices) no longer holds a worker that visits were queued on. What may wait
//! on the registry stays off this thread: each link (the registry's checks and writes when a
//! PBX connects, its control stream and telemetry) runs on the caller's runtime
//! ([`crate::server::hub::serve`]), and so does each activation ([`crate::server::api::serve`]);
//! the front's few writes (a visit opened, a passwordless grant spent) run on blocking threads,
//! and the visit path's reads use a connection of their own ([`crate::server::db::Db`]). So a
//! write lock held by another process costs whoever writes their wait, not every visit
//! (`tunnel::visits_go_on_while_*` in the integration tests).

use anyhow::{Context, Result};
use std::time::Duration;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// How long the data runtime's blocking work (the front's registry writes) may delay the end.
const BLOCKING_GRACE: Duration = Duration::from_secs(1);

/// The data path's runtime, driven by threads of its own until [`DataRuntime::end`] or drop.
pub struct DataRuntime {
    handle: Handle,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DataRuntime {
    /// Starts the runtime: one thread runs it as a current-thread runtime when `threads` ≤ 1,
    /// else it is a multi-thread runtime with `threads` workers.
    pub fn start(threads: usize) -> Result<DataRuntime> {
        let mut builder = if threads <= 1 {
            tokio::runtime::Builder::new_current_thread()
        } else {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(threads);
            b
        };
        let runtime = builder
            .enable_all()
            .thread_name("pbxrs-data")
            .build()
            .context("cannot start the data path's runtime")?;
        let handle = runtime.handle().clone();
        let stop = CancellationToken::new();
        let until = stop.clone();
        let thread = std::thread::Builder::new()
            .name("pbxrs-data".into())
            .spawn(move || {
                // A current-thread runtime makes progress only inside block_on; a multi-thread
                // one runs on its workers and this thread just waits.
                runtime.block_on(until.cancelled());
                // Outside any runtime here, so it may be shut down: tasks still running (a
                // connection's driver, once the server has stopped) are dropped, closing their
                // sockets.
                runtime.shutdown_timeout(BLOCKING_GRACE);
            })
            .context("cannot start the data path's thread")?;
        Ok(DataRuntime {
            handle,
            stop,
            thread: Some(thread),
        })
    }

    /// Where the data path's tasks are spawned, and whose reactor its sockets register with
    /// (enter it while converting them).
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Stops the runtime and waits until its tasks are dropped and its sockets closed, so a
    /// restarted server can bind the same ports.
    pub async fn end(mut self) {
        self.stop.cancel();
        if let Some(thread) = self.thread.take() {
            // The join waits on a thread, so it waits off this runtime's workers.
            let joined = tokio::task::spawn_blocking(move || thread.join()).await;
            if !matches!(joined, Ok(Ok(()))) {
                tracing::error!("the data path's thread ended with a panic");
            }
        }
    }
}

impl Drop for DataRuntime {
    fn drop(&mut self) {
        // Without end() (an early error): the thread stops on its own, not waited for.
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_thread_by_default_or_as_many_workers_as_asked() {
        let one = DataRuntime::start(1).unwrap();
        assert_eq!(
            one.handle().runtime_flavor(),
            tokio::runtime::RuntimeFlavor::CurrentThread
        );
        let four = DataRuntime::start(4).unwrap();
        assert_eq!(
            four.handle().runtime_flavor(),
            tokio::runtime::RuntimeFlavor::MultiThread
        );
        assert_eq!(four.handle().metrics().num_workers(), 4);
    }

    #[tokio::test]
    async fn its_tasks_run_on_its_own_thread_and_end_closes_their_sockets() {
        let data = DataRuntime::start(1).unwrap();
        let here = std::thread::current().id();
        let socket = {
            let _in = data.handle().enter();
            tokio::net::UdpSocket::from_std({
                let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                s.set_nonblocking(true).unwrap();
                s
            })
            .unwrap()
        };
        let addr = socket.local_addr().unwrap();
        let (ran_on, ran) = tokio::sync::oneshot::channel();
        data.handle().spawn(async move {
            let _ = ran_on.send(std::thread::current().id());
            // Holds the socket until the runtime drops the task.
            let mut buf = [0u8; 8];
            let _ = socket.recv(&mut buf).await;
        });
        assert_ne!(ran.await.unwrap(), here);
        assert!(std::net::UdpSocket::bind(addr).is_err(), "still held");
        // Blocking work in flight (a password check) delays the drop of the tasks behind it.
        data.handle()
            .spawn_blocking(|| std::thread::sleep(Duration::from_millis(300)));
        let handle = data.handle().clone();
        data.end().await;
        std::net::UdpSocket::bind(addr).expect("the port is free once end() returns");
        assert!(
            handle.spawn(async {}).await.is_err(),
            "an ended runtime runs nothing"
        );
    }
}
