//! The agent's remote-session audit reaches the server's Operation Log: at once while
//! connected, and after an outage from the agent's 0600 outbox, each event once, with the time
//! it happened on the PBX.

use crate::support::*;
use pbx_remote::server::db::{Db, NewUser, OpEntry, OpFilter, Role, Scope, Source};
use std::time::Duration;

fn agent_entries(db: &Db, device: &str) -> Vec<OpEntry> {
    let admin = match db.user("audit-reader@example.com").unwrap() {
        Some(u) => u,
        None => db
            .add_user(&NewUser {
                email: "audit-reader@example.com".into(),
                password_hash: "unused".into(),
                role: Role::Admin,
                scope: Scope::All,
            })
            .unwrap(),
    };
    let f = OpFilter {
        source: Some(Source::Agent),
        device: Some(device.into()),
        limit: 100,
        ..Default::default()
    };
    db.oplog(&admin, &f).unwrap()
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test(flavor = "multi_thread")]
async fn session_events_reach_the_server_once_after_an_outage_with_their_own_times() {
    let World {
        server,
        portal: _portal,
        agent,
        device,
        tmp: _tmp,
    } = World::start(false, "").await;

    // Connected: a login is in the Operation Log within moments, under the visit's CM user.
    let url = server.visit(&device, "alice", false);
    let mut v = Visitor::new(server.public, &device);
    v.open_visit(&url).await;
    assert_eq!(v.login(USER, PASSWORD).await.status(), 303);
    let db = server.db();
    let entries = eventually(Duration::from_secs(5), "login delivered", || {
        let e = agent_entries(&db, &device);
        (!e.is_empty()).then_some(e)
    })
    .await;
    assert_eq!(entries[0].action, "session.login_ok");
    assert_eq!(entries[0].actor, "cli:alice");
    assert_eq!(entries[0].client.as_deref(), Some("127.0.0.1"));
    assert!(entries[0].detail.as_deref().unwrap().contains(USER));

    // Outage: the server goes; meanwhile the session idles out on the PBX.
    server.stop.cancel();
    agent
        .wait(Duration::from_secs(30), |s| {
            s.state != pbx_remote::status::State::Connected
        })
        .await;
    agent.clock.advance(Duration::from_secs(16 * 60));
    let outbox = agent.dir.join("state/audit-outbox");
    let happened = unix_now();
    eventually(Duration::from_secs(5), "idle expiry queued", || {
        std::fs::read_to_string(&outbox)
            .ok()
            .filter(|t| t.contains("idle_expiry"))
    })
    .await;
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&outbox).unwrap().permissions().mode() & 0o777,
        0o600
    );
    tokio::time::sleep(Duration::from_secs(2)).await; // the events' own time differs from delivery
    let server = server.restart().await;
    agent.move_past_backoff().await;
    agent.connected().await;

    let db = server.db();
    let entries = eventually(Duration::from_secs(10), "idle expiry delivered", || {
        let e = agent_entries(&db, &device);
        e.iter()
            .any(|o| o.action == "session.idle_expiry")
            .then_some(e)
    })
    .await;
    let expiry = entries
        .iter()
        .find(|o| o.action == "session.idle_expiry")
        .unwrap();
    assert!(
        (expiry.at - happened).abs() <= 1,
        "the PBX's time ({happened}), not the delivery's: {expiry:?}"
    );
    assert_eq!(
        entries
            .iter()
            .filter(|o| o.action == "session.login_ok")
            .count(),
        1,
        "each event once: {entries:?}"
    );
    eventually(Duration::from_secs(5), "outbox emptied", || {
        std::fs::read_to_string(&outbox)
            .map(|t| t.trim().is_empty())
            .unwrap_or(true)
            .then_some(())
    })
    .await;
}

/// D7: several events queued during one outage (two sessions idling out two seconds apart)
/// arrive once each, in the order they happened, with their own times.
#[tokio::test(flavor = "multi_thread")]
async fn events_queued_during_an_outage_arrive_once_in_order() {
    let World {
        server,
        portal: _portal,
        agent,
        device,
        tmp: _tmp,
    } = World::start(false, "").await;
    let _alice = logged_in(
        server.public,
        &server.visit(&device, "alice", false),
        &device,
    )
    .await;
    // Bob's session is active 10 minutes later than Alice's.
    agent.clock.advance(Duration::from_secs(10 * 60));
    let mut bob = logged_in(server.public, &server.visit(&device, "bob", false), &device).await;
    assert_eq!(bob.get("/").await.status(), 200);

    server.stop.cancel();
    agent
        .wait(Duration::from_secs(30), |s| {
            s.state != pbx_remote::status::State::Connected
        })
        .await;
    let outbox = agent.dir.join("state/audit-outbox");
    let queued = |n: usize| {
        let outbox = outbox.clone();
        move || {
            std::fs::read_to_string(&outbox)
                .ok()
                .filter(|t| t.matches("idle_expiry").count() >= n)
        }
    };
    // Alice idles out first (16 min without activity), Bob two seconds later.
    agent.clock.advance(Duration::from_secs(6 * 60 + 30));
    eventually(Duration::from_secs(5), "Alice's expiry queued", queued(1)).await;
    tokio::time::sleep(Duration::from_secs(2)).await; // so the two times differ
    agent.clock.advance(Duration::from_secs(10 * 60));
    eventually(Duration::from_secs(5), "Bob's expiry queued", queued(2)).await;

    let server = server.restart().await;
    agent.move_past_backoff().await;
    agent.connected().await;
    let db = server.db();
    let entries = eventually(Duration::from_secs(10), "both delivered", || {
        let e = agent_entries(&db, &device);
        (e.iter()
            .filter(|o| o.action == "session.idle_expiry")
            .count()
            >= 2)
            .then_some(e)
    })
    .await;
    let mut expiries: Vec<&OpEntry> = entries
        .iter()
        .filter(|o| o.action == "session.idle_expiry")
        .collect();
    assert_eq!(expiries.len(), 2, "each once: {entries:?}");
    // Recorded in the order they happened on the PBX, with the PBX's times.
    expiries.sort_by_key(|o| o.id);
    assert!(expiries[0].at < expiries[1].at, "{expiries:?}");
    let who = |o: &OpEntry| o.actor.clone();
    assert_eq!(
        (who(expiries[0]), who(expiries[1])),
        ("cli:alice".to_string(), "cli:bob".to_string())
    );
    assert_eq!(
        entries
            .iter()
            .filter(|o| o.action == "session.login_ok")
            .count(),
        2,
        "the logins once each: {entries:?}"
    );
}
