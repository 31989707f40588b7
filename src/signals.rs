//! The one place that knows about signals: SIGTERM and SIGINT cancel the root token (a second
//! one exits at once); SIGHUP is reported on a channel for reloads.

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Exit status when a second stop signal arrives during the drain.
pub const FORCED_EXIT: i32 = 130;

/// Cancels `root` on the first SIGTERM/SIGINT and exits the process on the second. Returns a
/// receiver that yields once per SIGHUP.
pub fn install(root: CancellationToken) -> std::io::Result<mpsc::UnboundedReceiver<()>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stopping = false;
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
                _ = hup.recv() => {
                    let _ = tx.send(());
                    continue;
                }
            }
            if stopping {
                tracing::warn!("second stop signal; exiting now");
                std::process::exit(FORCED_EXIT);
            }
            stopping = true;
            tracing::info!("stop signal; draining");
            root.cancel();
        }
    });
    Ok(rx)
}
