//! Refusals: what the server tells an agent when it will not activate or connect it, kept apart
//! from the server's own failures so the two are never confused.

use crate::protocol::Reason;
use std::fmt;

/// A refusal the agent reports: the status reason and a sentence naming what to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The agent's status reason.
    pub reason: Reason,
    /// What happened and what to do, for the agent's status and log.
    pub message: String,
}

impl Refusal {
    /// A refusal for `reason`.
    pub fn new(reason: Reason, message: impl Into<String>) -> Refusal {
        Refusal {
            reason,
            message: message.into(),
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason, self.message)
    }
}

/// An enrolment or activation that did not happen.
#[derive(Debug)]
pub enum EnrolError {
    /// Refused: the agent is told why.
    Refused(Refusal),
    /// The server failed (its store, say): logged, and the agent hears "try again later".
    Failed(anyhow::Error),
}

impl EnrolError {
    /// The refusal, when it is one.
    pub fn refusal(&self) -> Option<&Refusal> {
        match self {
            EnrolError::Refused(r) => Some(r),
            EnrolError::Failed(_) => None,
        }
    }
}

impl fmt::Display for EnrolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EnrolError::Refused(r) => write!(f, "refused: {r}"),
            EnrolError::Failed(e) => write!(f, "{e:#}"),
        }
    }
}

impl From<Refusal> for EnrolError {
    fn from(r: Refusal) -> EnrolError {
        EnrolError::Refused(r)
    }
}

impl From<anyhow::Error> for EnrolError {
    fn from(e: anyhow::Error) -> EnrolError {
        EnrolError::Failed(e)
    }
}

impl From<rusqlite::Error> for EnrolError {
    fn from(e: rusqlite::Error) -> EnrolError {
        EnrolError::Failed(e.into())
    }
}
