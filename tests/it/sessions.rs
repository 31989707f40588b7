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

/// D2: passwordless tokens the server signs, injected on tunnel streams as the front would send
/// them: a valid one logs in once; any flipped bit, another device, another visit, an expired
/// one, too long a lifetime and a replay are each refused with their own audited reason.
#[tokio::test(flavor = "multi_thread")]
async fn d2_tampered_foreign_expired_and_replayed_tokens_are_refused() {
    use pbx_remote::protocol::StreamHeader;
    use pbx_remote::token::{sign, Claims, MAX_TOKEN_LIFETIME_MS};
    let w = World::start(true, "").await;
    let v = w.granted("alice", true).await;
    let keys = &w.server.state.keys.signing;
    let base = crate::gate::header_for(&v, "alice");
    let now = pbx_remote::protocol::now_ms();
    let claims = |f: &dyn Fn(&mut Claims)| {
        let mut c = Claims {
            dev: w.device.clone(),
            grant: base.grant_id.clone(),
            cm_user: base.cm_user.clone(),
            iat_ms: now,
            exp_ms: now + MAX_TOKEN_LIFETIME_MS,
            nonce: pbx_remote::crypto::random_token::<16>(),
        };
        f(&mut c);
        c
    };
    let exchange = |token: String| {
        let mut h: StreamHeader = base.clone();
        h.passwordless_token = Some(pbx_remote::secret::Secret::new(token));
        let (server, device) = (&w.server, &w.device);
        async move {
            let raw: &[u8] = b"GET /__remote/passwordless HTTP/1.1
Host: x
Connection: close

";
            server.inject(device, &h, raw).await
        }
    };
    let reasons = || -> Vec<String> {
        crate::gate::audit_lines(&w)
            .iter()
            .filter(|l| l["event"] == "passwordless_rejected")
            .map(|l| l["reason"].as_str().unwrap_or("").to_string())
            .collect()
    };

    // Every bit of a valid token, flipped, breaks it.
    let good = sign(keys, &claims(&|_| {})).unwrap();
    let mut flipped = 0;
    for i in 0..good.len() {
        for bit in [0x01u8, 0x20] {
            let mut bytes = good.clone().into_bytes();
            bytes[i] ^= bit;
            let Ok(t) = String::from_utf8(bytes) else {
                continue;
            };
            if t == good {
                continue;
            }
            let answer = exchange(t).await;
            assert!(answer.starts_with("HTTP/1.1 403"), "byte {i}: {answer}");
            flipped += 1;
        }
    }
    assert!(flipped > good.len(), "{flipped} tampered tokens tried");
    // Signed, but for another device, another visit, expired, or living too long.
    for (what, token) in [
        (
            "wrong_device",
            sign(keys, &claims(&|c| c.dev = "another-pbx".into())).unwrap(),
        ),
        (
            "wrong_device",
            sign(keys, &claims(&|c| c.grant = "another-visit".into())).unwrap(),
        ),
        (
            "expired",
            sign(
                keys,
                &claims(&|c| {
                    c.iat_ms = now - 120_000;
                    c.exp_ms = now - 60_000;
                }),
            )
            .unwrap(),
        ),
        (
            "invalid_lifetime",
            sign(keys, &claims(&|c| c.exp_ms = now + 10 * 60_000)).unwrap(),
        ),
    ] {
        let answer = exchange(token).await;
        assert!(answer.starts_with("HTTP/1.1 403"), "{what}: {answer}");
        assert_eq!(reasons().last().map(String::as_str), Some(what));
    }
    assert!(
        reasons()
            .iter()
            .filter(|r| *r == "invalid_signature")
            .count()
            >= flipped
    );
    // The valid one logs in once; the same token again is a replay.
    let answer = exchange(good.clone()).await;
    assert!(answer.starts_with("HTTP/1.1 303"), "{answer}");
    let answer = exchange(good).await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert_eq!(reasons().last().map(String::as_str), Some("used"));
}
