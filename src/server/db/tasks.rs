//! Provisioning tasks: pending until delivered, then executing, then finished or failed (or
//! unsupported); a finished or failed task never goes back.

use super::{now, Db};
use crate::protocol::TaskState;
use anyhow::Result;
use rusqlite::{params, OptionalExtension};
use serde::Serialize;

/// A provisioning task: pending → executing → finished / failed (or unsupported).
#[derive(Debug, Clone, Serialize)]
pub struct Task {
    /// `Provision-{name}-{serial}`.
    pub name: String,
    /// Where it stands.
    pub state: TaskState,
    /// Tail of the apply output.
    pub output: Option<String>,
    /// Last change (Unix seconds).
    pub updated_at: i64,
}

/// A task still to be delivered, with the template to deliver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingTask {
    /// Task name.
    pub name: String,
    /// Template text.
    pub template: String,
}

impl Db {
    /// The device's provisioning task and template while it is still to be delivered.
    pub fn pending_task(&self, device: &str) -> Result<Option<PendingTask>> {
        self.with(|c| {
            Ok(c.query_row(
                "SELECT t.name, d.template FROM provision_tasks t JOIN devices d ON d.id = t.device_id
                 WHERE t.device_id = ?1 AND t.state = 'pending' AND d.allow_provisioning = 1 AND d.template IS NOT NULL",
                [device],
                |r| {
                    Ok(PendingTask {
                        name: r.get(0)?,
                        template: r.get(1)?,
                    })
                },
            )
            .optional()?)
        })
    }
    /// Records a task's progress; a finished or failed task never goes back.
    pub fn set_task_state(
        &self,
        device: &str,
        task: &str,
        state: TaskState,
        output: &str,
    ) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE provision_tasks SET state = ?3, output = ?4, updated_at = ?5
                 WHERE device_id = ?1 AND name = ?2 AND state NOT IN ('finished', 'failed')",
                params![device, task, state, output, now()],
            )?;
            Ok(())
        })
    }
}
