//! Tracing to stderr: `info` unless `RUST_LOG` says otherwise, no colour off a terminal
//! (journald), one JSON object per line on request.
//!
//! `RUST_LOG` takes `level` and `target=level` directives separated by commas (e.g.
//! `info,pbx_remote=debug,quinn=warn`). The filter is tracing-subscriber's `Targets` rather than
//! `EnvFilter`: the same directives minus span/field matching, and no regex engine in the agent.

use std::io::IsTerminal;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::prelude::*;

/// Installs the global subscriber (once; later calls do nothing).
pub fn init(json: bool) {
    let (targets, bad) = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => match spec.parse::<Targets>() {
            Ok(t) => (t, None),
            Err(e) => (default_targets(), Some((spec, e))),
        },
        _ => (default_targets(), None),
    };
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let installed = if json {
        tracing_subscriber::registry()
            .with(layer.json().with_filter(targets))
            .try_init()
    } else {
        tracing_subscriber::registry()
            .with(layer.with_filter(targets))
            .try_init()
    };
    if let (Ok(()), Some((spec, e))) = (installed, bad) {
        tracing::warn!(rust_log = %spec, error = %e, "RUST_LOG not understood; logging at info");
    }
}

fn default_targets() -> Targets {
    Targets::new().with_default(LevelFilter::INFO)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    #[test]
    fn rust_log_directives_parse_as_users_write_them() {
        let t: Targets = "info,pbx_remote=debug,quinn=warn".parse().unwrap();
        assert!(t.would_enable("pbx_remote::agent", &Level::DEBUG));
        assert!(!t.would_enable("quinn::connection", &Level::INFO));
        assert!(t.would_enable("hyper", &Level::INFO));
        let t: Targets = "trace".parse().unwrap();
        assert!(t.would_enable("anything", &Level::TRACE));
        assert!(!default_targets().would_enable("x", &Level::DEBUG));
    }
}
