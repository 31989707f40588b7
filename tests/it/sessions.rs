//! Remote sessions against fixation, reuse after logout and theft (catalogue D5): a new id at
//! every login, an old id dead the moment it is logged out, and a copied pair of cookies refused
//! from another network, audited, and the session ended.

use crate::support::*;
use std::net::IpAddr;

#[tokio::test(flavor = "multi_thread")]
async fn d5_fixation_reuse_after_logout_and_theft_are_refused() {
    let w = World::start(false, "").await;

    // Fixation: a session id planted before login is never adopted.
    let mut v = w.granted("alice", false).await;
    v.cookies
        .push(("__pbxra_sid".into(), "planted-by-an-attacker".into()));
    assert_eq!(v.login(USER, PASSWORD).await.status(), 303);
    let sid = v.cookie("__pbxra_sid").unwrap().to_string();
    assert_ne!(sid, "planted-by-an-attacker");
    let mut planted = w.granted("alice", false).await;
    planted
        .cookies
        .push(("__pbxra_sid".into(), "planted-by-an-attacker".into()));
    let r = planted.get("/").await;
    assert_ne!(r.status(), 200, "the planted id opens nothing");

    // A new login gets a new id again.
    assert_eq!(v.login(USER, PASSWORD).await.status(), 303);
    let second = v.cookie("__pbxra_sid").unwrap().to_string();
    assert_ne!(second, sid);

    // Logout in one tab; the other tab's copy of the cookie is dead at once.
    let mut other_tab = Visitor::new(w.server.public, &w.device);
    other_tab.cookies = v.cookies.clone();
    assert_eq!(other_tab.get("/").await.status(), 200);
    v.logout().await;
    let hits = w.portal.hits();
    let r = other_tab.get("/").await;
    assert_ne!(r.status(), 200);
    assert_eq!(
        w.portal.hits(),
        hits,
        "nothing reached the portal after logout"
    );

    // Theft: both cookies copied to a browser on another network.
    let mut owner = w.visitor("alice", false).await;
    assert_eq!(owner.get("/").await.status(), 200);
    let elsewhere: IpAddr = "127.1.0.1".parse().unwrap();
    let mut thief = Visitor::from_address(w.server.public, &w.device, Some(elsewhere));
    thief.cookies = owner.cookies.clone();
    let hits = w.portal.hits();
    let r = thief.get("/").await;
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("another network"));
    assert_eq!(w.portal.hits(), hits, "the thief reached nothing");
    // The session is over for its owner too (its cookie is known to be out), and audited.
    let r = owner.get("/").await;
    assert_ne!(r.status(), 200);
    assert_eq!(w.portal.hits(), hits);
    let lines = crate::gate::audit_lines(&w);
    let mismatch = lines
        .iter()
        .find(|l| l["event"] == "session_address_mismatch")
        .expect("the theft is audited");
    assert_eq!(mismatch["client_addr"], "127.1.0.1");
    assert!(mismatch["reason"]
        .as_str()
        .unwrap()
        .contains("opened from 127.0.0.1"));
    // The owner logs in again and carries on.
    let mut again = w.visitor("alice", false).await;
    assert_eq!(again.get("/").await.status(), 200);
}
