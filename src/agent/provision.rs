//! Provisioning: the agent only drops a template the CM sent (0600) into `[provisioning]
//! drop_dir` and reports the result file that the separate root unit writes after applying it.
//! Without `[provisioning]` it answers `unsupported` and nothing from the CM touches the PBX.

use crate::config::AgentConfig;
use crate::fsutil;
use crate::protocol::Control;
use std::path::{Path, PathBuf};

/// Most output reported back to the CM.
pub const OUTPUT_TAIL: usize = 2048;

/// Where tasks stand, kept in the state dir so a task is never dropped twice.
const LEDGER: &str = "provisioning.json";

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

fn result(task: &str, state: &str, output: impl Into<String>) -> Control {
    Control::ProvisionResult {
        task: task.to_string(),
        state: state.to_string(),
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

    fn ledger(&self) -> serde_json::Map<String, serde_json::Value> {
        fsutil::read_private(&self.ledger)
            .ok()
            .flatten()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn save(&self, ledger: &serde_json::Map<String, serde_json::Value>) {
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
                "unsupported",
                "provisioning is not enabled on this PBX ([provisioning] drop_dir is not set)",
            );
        };
        let mut ledger = self.ledger();
        if ledger.contains_key(task) {
            tracing::info!(%task, "provisioning template already received; not dropped again");
            return result(task, "executing", "already delivered");
        }
        let path = dir.join(format!("{}.template", file_stem(task)));
        let written = std::fs::create_dir_all(dir)
            .map_err(anyhow::Error::from)
            .and_then(|()| fsutil::write_private(&path, template.as_bytes()));
        if let Err(e) = written {
            return result(
                task,
                "failed",
                format!("cannot write {}: {e:#}", path.display()),
            );
        }
        tracing::info!(%task, file = %path.display(), "provisioning template dropped for the apply unit");
        ledger.insert(task.to_string(), serde_json::json!({"state": "executing"}));
        self.save(&ledger);
        result(task, "executing", format!("written to {}", path.display()))
    }

    /// Results the apply unit wrote since the last look, each reported once.
    pub fn poll(&self) -> Vec<Control> {
        let Some(dir) = &self.drop_dir else {
            return vec![];
        };
        let mut ledger = self.ledger();
        let mut out = vec![];
        for (task, entry) in ledger.iter_mut() {
            if entry["state"] != "executing" {
                continue;
            }
            let Some((state, output)) =
                read_result(&dir.join(format!("{}.result", file_stem(task))))
            else {
                continue;
            };
            *entry = serde_json::json!({"state": state});
            out.push(result(task, &state, output));
        }
        if !out.is_empty() {
            self.save(&ledger);
        }
        out
    }
}

/// `{"status": "ok"|"failed", "output": "..."}` written by the apply unit.
fn read_result(path: &Path) -> Option<(String, String)> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    let state = if v["status"] == "ok" {
        "finished"
    } else {
        "failed"
    };
    let output = v["output"].as_str().unwrap_or("");
    let tail: String = output
        .chars()
        .rev()
        .take(OUTPUT_TAIL)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    Some((state.to_string(), tail))
}
