//! Provisioning: the agent only drops a template the CM sent (0600) into `[provisioning]
//! drop_dir` and reports what the separate root unit (`packaging/provision-apply`) left beside
//! it: a plain `STEM.status` (`ok`/`failed`, written last) and `STEM.log`. The agent builds the
//! report itself, so whatever bytes the apply tools print, the task ends. Without
//! `[provisioning]` it answers `unsupported` and nothing from the CM touches the PBX.

use crate::config::AgentConfig;
use crate::fsutil;
use crate::protocol::{Control, TaskState};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Most output reported back to the CM, in characters.
pub const OUTPUT_TAIL: usize = 2048;

/// Most of the apply log read, from its end (bytes); enough for [`OUTPUT_TAIL`] characters.
const LOG_READ: u64 = 4 * OUTPUT_TAIL as u64;

/// Where tasks stand, kept in the state dir so a task is never dropped twice.
const LEDGER: &str = "provisioning.json";

/// The ledger: task name → where it stands (`{"task": {"state": "executing"}}`).
type Ledger = BTreeMap<String, Entry>;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    state: TaskState,
}

/// Handles provisioning for one agent.
pub struct Provisioner {
    drop_dir: Option<PathBuf>,
    ledger: PathBuf,
}

fn file_stem(task: &str) -> String {
    task.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn result(task: &str, state: TaskState, output: impl Into<String>) -> Control {
    Control::ProvisionResult {
        task: task.to_string(),
        state,
        output: output.into(),
    }
}

impl Provisioner {
    /// From the config (state dir and optional drop dir).
    pub fn new(config: &AgentConfig) -> Provisioner {
        Provisioner {
            drop_dir: config.provisioning.as_ref().map(|p| p.drop_dir.clone()),
            ledger: config.paths.state_dir.join(LEDGER),
        }
    }

    fn ledger(&self) -> Ledger {
        fsutil::read_private(&self.ledger)
            .ok()
            .flatten()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn save(&self, ledger: &Ledger) {
        let bytes = serde_json::to_vec(ledger).unwrap_or_default();
        if let Err(e) = fsutil::write_private(&self.ledger, &bytes) {
            tracing::warn!(error = %format!("{e:#}"), "cannot record provisioning state");
        }
    }

    /// A template arrived: drop it (once) and say so.
    pub fn receive(&self, task: &str, template: &str) -> Control {
        let Some(dir) = &self.drop_dir else {
            tracing::warn!(%task, "provisioning template refused: [provisioning] is not configured");
            return result(
                task,
                TaskState::Unsupported,
                "provisioning is not enabled on this PBX ([provisioning] drop_dir is not set)",
            );
        };
        let mut ledger = self.ledger();
        if ledger.contains_key(task) {
            tracing::info!(%task, "provisioning template already received; not dropped again");
            return result(task, TaskState::Executing, "already delivered");
        }
        let path = dir.join(format!("{}.template", file_stem(task)));
        let written = std::fs::create_dir_all(dir)
            .map_err(anyhow::Error::from)
            .and_then(|()| fsutil::write_private(&path, template.as_bytes()));
        if let Err(e) = written {
            return result(
                task,
                TaskState::Failed,
                format!("cannot write {}: {e:#}", path.display()),
            );
        }
        tracing::info!(%task, file = %path.display(), "provisioning template dropped for the apply unit");
        ledger.insert(
            task.to_string(),
            Entry {
                state: TaskState::Executing,
            },
        );
        self.save(&ledger);
        result(
            task,
            TaskState::Executing,
            format!("written to {}", path.display()),
        )
    }

    /// Results the apply unit wrote since the last look, each reported once.
    pub fn poll(&self) -> Vec<Control> {
        let Some(dir) = &self.drop_dir else {
            return vec![];
        };
        let mut ledger = self.ledger();
        let mut out = vec![];
        for (task, entry) in ledger.iter_mut() {
            if entry.state != TaskState::Executing {
                continue;
            }
            let Some((state, output)) = read_result(&dir.join(file_stem(task))) else {
                continue;
            };
            entry.state = state;
            out.push(result(task, state, output));
        }
        if !out.is_empty() {
            self.save(&ledger);
        }
        out
    }
}

/// What the apply unit left for the template `stem`: `None` while it has not finished.
/// `STEM.status` says `ok` (finished) or anything else (failed); the output is the end of
/// `STEM.log`, decoded leniently. A `STEM.result` from earlier packages (JSON) still counts.
fn read_result(stem: &Path) -> Option<(TaskState, String)> {
    // Appended, not `with_extension`: a task name may hold a dot.
    let file = |ext: &str| {
        let mut name = stem.as_os_str().to_os_string();
        name.push(format!(".{ext}"));
        PathBuf::from(name)
    };
    if let Ok(status) = std::fs::read(file("status")) {
        let state = if String::from_utf8_lossy(&status).trim() == "ok" {
            TaskState::Finished
        } else {
            TaskState::Failed
        };
        let output = match read_tail(&file("log")) {
            Ok(text) => text,
            Err(e) => format!("(no apply log: {e})"),
        };
        return Some((state, tail_chars(&output)));
    }
    let legacy = std::fs::read(file("result")).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&legacy).unwrap_or_default();
    let state = if v["status"] == "ok" {
        TaskState::Finished
    } else {
        TaskState::Failed
    };
    let output = match v["output"].as_str() {
        Some(o) => o.to_string(),
        None => String::from_utf8_lossy(&legacy).into_owned(),
    };
    Some((state, tail_chars(&output)))
}

/// The last [`LOG_READ`] bytes of a file as text (invalid UTF-8 becomes U+FFFD).
fn read_tail(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(LOG_READ)))?;
    let mut bytes = Vec::new();
    f.take(LOG_READ).read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The last [`OUTPUT_TAIL`] characters, without a trailing newline.
fn tail_chars(s: &str) -> String {
    let s = s.trim_end_matches('\n');
    let skip = s.chars().count().saturating_sub(OUTPUT_TAIL);
    s.chars().skip(skip).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_cut_inside_a_character_still_ends_the_task() {
        let dir = tempfile::tempdir().unwrap();
        let stem = dir.path().join("Provision-A.B-SN1");
        // `tail -c` cut "é" (c3 a9) in half: the log starts with a lone continuation byte.
        let mut log = vec![0xa9];
        log.extend_from_slice("é\x00\"quoted\" \\ applied 1 extension\n".as_bytes());
        std::fs::write(dir.path().join("Provision-A.B-SN1.log"), &log).unwrap();
        assert!(read_result(&stem).is_none(), "no status yet: still running");
        std::fs::write(dir.path().join("Provision-A.B-SN1.status"), "ok\n").unwrap();
        let (state, output) = read_result(&stem).unwrap();
        assert_eq!(state, TaskState::Finished);
        assert_eq!(output, "\u{fffd}é\u{0}\"quoted\" \\ applied 1 extension");
    }

    #[test]
    fn anything_but_ok_is_failed_and_a_missing_log_is_said() {
        let dir = tempfile::tempdir().unwrap();
        let stem = dir.path().join("t");
        std::fs::write(dir.path().join("t.status"), "\u{ff}garbage").unwrap();
        let (state, output) = read_result(&stem).unwrap();
        assert_eq!(state, TaskState::Failed);
        assert!(output.starts_with("(no apply log:"), "{output}");
    }

    #[test]
    fn only_the_end_of_a_long_log_is_read_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let stem = dir.path().join("t");
        let long = format!("{}the end", "ü".repeat(50_000));
        std::fs::write(dir.path().join("t.log"), long).unwrap();
        std::fs::write(dir.path().join("t.status"), "failed").unwrap();
        let (state, output) = read_result(&stem).unwrap();
        assert_eq!(state, TaskState::Failed);
        assert_eq!(output.chars().count(), OUTPUT_TAIL);
        assert!(output.ends_with("üthe end"));
    }

    #[test]
    fn results_of_earlier_packages_are_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let stem = dir.path().join("t");
        std::fs::write(
            dir.path().join("t.result"),
            r#"{"status": "ok", "output": "backup ok\napplied"}"#,
        )
        .unwrap();
        assert_eq!(
            read_result(&stem),
            Some((TaskState::Finished, "backup ok\napplied".to_string()))
        );
    }
}
