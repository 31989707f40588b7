//! The Operation Log: every console, API and CLI change, every visit, and the agents' own
//! remote-session events, with time, actor, action, target, client address and result.

use super::users::{Scope, User};
use super::{now, Db};
use crate::protocol::AuditEvent;
use anyhow::Result;
use rusqlite::params;
use serde::Serialize;

/// Where an operation came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// A console page.
    Console,
    /// The `/api/v1/` API with a bearer token.
    Api,
    /// An admin command on the server's shell.
    Cli,
    /// The public front (a visit being opened).
    Front,
    /// A device's agent (its remote-session audit).
    Agent,
    /// The tunnel hub (a device's credential connecting from two machines).
    Hub,
}

impl Source {
    /// Spelling in the store and the CSV.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Console => "console",
            Source::Api => "api",
            Source::Cli => "cli",
            Source::Front => "front",
            Source::Agent => "agent",
            Source::Hub => "hub",
        }
    }
    /// Reads [`Source::as_str`]'s spelling.
    pub fn parse(s: &str) -> Option<Source> {
        [
            Source::Console,
            Source::Api,
            Source::Cli,
            Source::Front,
            Source::Agent,
            Source::Hub,
        ]
        .into_iter()
        .find(|x| x.as_str() == s)
    }
}

/// One operation to record.
#[derive(Debug, Clone)]
pub struct Op<'a> {
    /// Who: a CM user's email, `cli:LABEL`, or the session's user for agent events.
    pub actor: &'a str,
    /// Where it came from.
    pub source: Source,
    /// What, as `noun.verb` (`device.add`, `visit.create`, `user.login`…).
    pub action: &'a str,
    /// What it was done to (a device id, a user's email, a group).
    pub target: Option<&'a str>,
    /// The device concerned, so the device's page lists it.
    pub device: Option<&'a str>,
    /// Client address as the server saw it.
    pub client: Option<&'a str>,
    /// `ok`, or what went wrong in a few words.
    pub result: &'a str,
    /// More, without secrets.
    pub detail: Option<&'a str>,
}

/// One recorded operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OpEntry {
    /// Order of recording.
    pub id: i64,
    /// When (Unix seconds; for agent events the time on the PBX).
    pub at: i64,
    /// Who.
    pub actor: String,
    /// Where it came from (see [`Source`]).
    pub source: String,
    /// What.
    pub action: String,
    /// To what.
    pub target: Option<String>,
    /// The device concerned.
    pub device_id: Option<String>,
    /// Client address.
    pub client: Option<String>,
    /// Result.
    pub result: String,
    /// More.
    pub detail: Option<String>,
}

/// What the Operation Log page and its CSV export filter by.
#[derive(Debug, Clone, Default)]
pub struct OpFilter {
    /// Actor contains this (case-insensitive).
    pub actor: Option<String>,
    /// Action starts with this (`device.` for every device action).
    pub action: Option<String>,
    /// Only this device.
    pub device: Option<String>,
    /// Only this source.
    pub source: Option<Source>,
    /// From this time on (Unix seconds).
    pub since: Option<i64>,
    /// Before this time.
    pub until: Option<i64>,
    /// Entries older than this id (paging backwards).
    pub before_id: Option<i64>,
    /// At most this many (capped at 10 000).
    pub limit: usize,
}

impl Db {
    /// Records one operation. Failing to record never hides the operation's own result from
    /// its caller: callers log this error and carry on.
    pub fn log_op(&self, op: &Op<'_>) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO oplog (at, actor, source, action, target, device_id, client, result, detail)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![now(), op.actor, op.source.as_str(), op.action, op.target, op.device, op.client, op.result, op.detail],
            )?;
            Ok(())
        })
    }
    /// Records agent events once each: a redelivered `(device, node, seq)` is skipped.
    /// Returns how many were new.
    pub fn record_agent_events(
        &self,
        device: &str,
        node: &str,
        events: &[AuditEvent],
    ) -> Result<usize> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let mut added = 0;
            for e in events {
                added += tx.execute(
                    "INSERT INTO oplog (at, actor, source, action, target, device_id, client, result, detail, node, seq)
                     VALUES (?1, ?2, 'agent', ?3, ?4, ?4, ?5, ?6, ?7, ?8, ?9) ON CONFLICT DO NOTHING",
                    params![
                        e.at,
                        e.user,
                        format!("session.{}", e.kind),
                        device,
                        e.client,
                        if ["fail", "reject", "lockout", "mismatch", "overflow"].iter().any(|k| e.kind.contains(k)) { "refused" } else { "ok" },
                        e.detail,
                        node,
                        e.seq as i64
                    ],
                )?;
            }
            tx.commit()?;
            Ok(added)
        })
    }
    /// Entries newest first, as `viewer` may see them: an admin sees all; others see entries
    /// about devices in their scope and their own actions.
    pub fn oplog(&self, viewer: &User, f: &OpFilter) -> Result<Vec<OpEntry>> {
        let limit = f.limit.clamp(1, 10_000) as i64;
        let (all, me) = (
            viewer.is_admin() || viewer.scope == Scope::All,
            viewer.email.as_str(),
        );
        self.with(|c| {
            let mut s = c.prepare_cached(
                "SELECT o.id, o.at, o.actor, o.source, o.action, o.target, o.device_id, o.client, o.result, o.detail
                 FROM oplog o LEFT JOIN devices d ON d.id = o.device_id
                 WHERE (?1 OR o.actor = ?2 OR d.group_name IN (SELECT group_name FROM user_groups WHERE email = ?2))
                   AND (?3 IS NULL OR instr(lower(o.actor), lower(?3)) > 0)
                   AND (?4 IS NULL OR substr(o.action, 1, length(?4)) = ?4)
                   AND (?5 IS NULL OR o.device_id = ?5)
                   AND (?6 IS NULL OR o.source = ?6)
                   AND (?7 IS NULL OR o.at >= ?7)
                   AND (?8 IS NULL OR o.at < ?8)
                   AND (?9 IS NULL OR o.id < ?9)
                 ORDER BY o.id DESC LIMIT ?10",
            )?;
            let rows = s.query_map(
                params![
                    all,
                    me,
                    f.actor,
                    f.action,
                    f.device,
                    f.source.map(Source::as_str),
                    f.since,
                    f.until,
                    f.before_id,
                    limit
                ],
                |r| {
                    Ok(OpEntry {
                        id: r.get(0)?,
                        at: r.get(1)?,
                        actor: r.get(2)?,
                        source: r.get(3)?,
                        action: r.get(4)?,
                        target: r.get(5)?,
                        device_id: r.get(6)?,
                        client: r.get(7)?,
                        result: r.get(8)?,
                        detail: r.get(9)?,
                    })
                },
            )?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::db::{NewDevice, NewUser, Role};

    fn op<'a>(actor: &'a str, action: &'a str, device: Option<&'a str>) -> Op<'a> {
        Op {
            actor,
            source: Source::Console,
            action,
            target: device,
            device,
            client: Some("127.0.0.1"),
            result: "ok",
            detail: None,
        }
    }

    #[test]
    fn entries_are_filtered_and_scoped() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        db.add_group("east").unwrap();
        db.add_group("west").unwrap();
        let dev = |name: &str, g: &str| {
            db.add_device(&NewDevice {
                name: name.into(),
                group: Some(g.into()),
                ..Default::default()
            })
            .unwrap()
            .id
        };
        let (e, w) = (dev("E", "east"), dev("W", "west"));
        let user = |email: &str, role, scope| {
            db.add_user(&NewUser {
                email: email.into(),
                password_hash: "h".into(),
                role,
                scope,
            })
            .unwrap()
        };
        let admin = user("a@x.io", Role::Admin, Scope::All);
        let east = user("e@x.io", Role::Operator, Scope::Groups(vec!["east".into()]));
        db.log_op(&op("a@x.io", "device.add", Some(&e))).unwrap();
        db.log_op(&op("a@x.io", "device.add", Some(&w))).unwrap();
        db.log_op(&op("e@x.io", "user.login", None)).unwrap();
        db.log_op(&op("a@x.io", "visit.create", Some(&w))).unwrap();
        let all = |u: &User, f: OpFilter| db.oplog(u, &OpFilter { limit: 100, ..f }).unwrap();
        assert_eq!(all(&admin, OpFilter::default()).len(), 4);
        assert_eq!(
            all(&admin, OpFilter::default())[0].action,
            "visit.create",
            "newest first"
        );
        let seen: Vec<_> = all(&east, OpFilter::default())
            .into_iter()
            .map(|o| (o.action, o.device_id))
            .collect();
        assert_eq!(
            seen,
            [
                ("user.login".to_string(), None),
                ("device.add".into(), Some(e.clone()))
            ],
            "their own actions and their devices' entries, not the west device's"
        );
        let f = OpFilter {
            action: Some("device.".into()),
            ..Default::default()
        };
        assert_eq!(all(&admin, f).len(), 2);
        let f = OpFilter {
            device: Some(w.clone()),
            ..Default::default()
        };
        assert_eq!(all(&admin, f).len(), 2);
        let f = OpFilter {
            actor: Some("E@X".into()),
            ..Default::default()
        };
        assert_eq!(all(&admin, f).len(), 1);
        let newest = all(&admin, OpFilter::default())[0].id;
        let f = OpFilter {
            before_id: Some(newest),
            limit: 1,
            ..Default::default()
        };
        assert_eq!(db.oplog(&admin, &f).unwrap()[0].action, "user.login");
    }

    #[test]
    fn agent_events_are_recorded_once_with_their_own_times() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let admin = db
            .add_user(&NewUser {
                email: "a@x.io".into(),
                password_hash: "h".into(),
                role: Role::Admin,
                scope: Scope::All,
            })
            .unwrap();
        let ev = |seq, at, kind: &str| AuditEvent {
            seq,
            at,
            kind: kind.into(),
            user: "a@x.io".into(),
            client: Some("198.51.100.7".into()),
            detail: None,
        };
        let batch = [ev(1, 1000, "login"), ev(2, 1060, "logout")];
        assert_eq!(db.record_agent_events("dev", "single", &batch).unwrap(), 2);
        assert_eq!(db.record_agent_events("dev", "single", &batch).unwrap(), 0);
        assert_eq!(
            db.record_agent_events("dev", "primary", &batch[..1])
                .unwrap(),
            1
        );
        let log = db
            .oplog(
                &admin,
                &OpFilter {
                    source: Some(Source::Agent),
                    limit: 10,
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(log.len(), 3);
        assert_eq!(
            (log[1].at, log[1].action.as_str()),
            (1060, "session.logout")
        );
    }
}
