//! The front's routing, grant-cookie and stream-reuse rules in-process.

use super::*;
use hyper_util::rt::TokioIo;

const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));

fn grant(id: &str) -> Grant {
    Grant {
        id: id.into(),
        device_id: "dev".into(),
        cm_user: "alice".into(),
        passwordless: false,
        redeemed: false,
        expires_at: 0,
    }
}

fn header(grant: &str) -> StreamHeader {
    StreamHeader {
        cm_user: "alice".into(),
        grant_id: grant.into(),
        client_addr: "10.0.0.1".into(),
        scheme: crate::protocol::Scheme::Https,
        origin: "https://dev.cm.example".into(),
        grant_expires_ms: 0,
        passwordless_token: None,
    }
}

/// A kept stream over an in-memory pipe, on a link with `free` stream permits.
async fn kept(free: usize, grant: &str) -> (KeptStream, tokio::io::DuplexStream) {
    let (ours, theirs) = tokio::io::duplex(1024);
    let (sender, conn) = hyper::client::conn::http1::handshake::<_, Incoming>(TokioIo::new(ours))
        .await
        .unwrap();
    tokio::spawn(conn);
    let k = KeptStream {
        generation: 7,
        streams: Arc::new(tokio::sync::Semaphore::new(free)),
        header: header(grant),
        client: CLIENT,
        sender,
        idle_since: std::time::Instant::now(),
    };
    (k, theirs)
}

#[test]
fn a_connection_rechecks_its_grant_every_second() {
    let keeper = Keeper::default();
    let grant = Grant {
        id: "g1".into(),
        device_id: "d".into(),
        cm_user: "alice".into(),
        passwordless: false,
        redeemed: false,
        expires_at: 1,
    };
    let lookups = std::cell::Cell::new(0);
    let db = |c: &str| {
        lookups.set(lookups.get() + 1);
        Ok((c == "good").then(|| Arc::new(grant.clone())))
    };
    assert!(keeper.grant("good", db).unwrap().is_some());
    assert!(keeper.grant("good", db).unwrap().is_some());
    assert_eq!(lookups.get(), 1, "remembered");
    assert!(keeper.grant("other", db).unwrap().is_none());
    assert!(keeper.grant("other", db).unwrap().is_none());
    assert_eq!(
        lookups.get(),
        3,
        "another cookie, and no grant, are asked every time"
    );
    assert!(keeper.grant("good", db).unwrap().is_some());
    if let Some((_, _, at)) = keeper.lock().grant.as_mut() {
        *at -= GRANT_RECHECK;
    }
    assert!(keeper.grant("good", db).unwrap().is_some());
    assert_eq!(lookups.get(), 5, "asked again after GRANT_RECHECK");
}

#[tokio::test]
async fn a_stream_is_kept_only_for_the_same_visit_and_while_the_tunnel_has_room() {
    let keeper = Keeper::default();
    let (k, _pipe) = kept(KEEP_HEADROOM, "g1").await;
    keeper.put(k);
    assert!(
        keeper.take(7, &grant("g2"), CLIENT).is_none(),
        "another visit"
    );
    for (other, what) in [
        (
            Grant {
                cm_user: "bob".into(),
                ..grant("g1")
            },
            "another CM user",
        ),
        (
            Grant {
                expires_at: 5,
                ..grant("g1")
            },
            "another expiry",
        ),
    ] {
        let (k, _pipe) = kept(KEEP_HEADROOM, "g1").await;
        keeper.put(k);
        assert!(keeper.take(7, &other, CLIENT).is_none(), "{what}");
    }
    let (k, _pipe) = kept(KEEP_HEADROOM, "g1").await;
    keeper.put(k);
    let elsewhere = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));
    assert!(
        keeper.take(7, &grant("g1"), elsewhere).is_none(),
        "another visitor address"
    );
    let (k, _pipe) = kept(KEEP_HEADROOM, "g1").await;
    keeper.put(k);
    assert!(
        keeper.take(8, &grant("g1"), CLIENT).is_none(),
        "another tunnel connection"
    );
    let (mut k, _pipe) = kept(KEEP_HEADROOM, "g1").await;
    k.header.passwordless_token = Some(Secret::new("t"));
    keeper.put(k);
    assert!(
        keeper.take(7, &grant("g1"), CLIENT).is_none(),
        "a stream that carried a passwordless token"
    );
    let (k, _pipe) = kept(KEEP_HEADROOM, "g1").await;
    keeper.put(k);
    assert!(
        keeper.take(7, &grant("g1"), CLIENT).is_some(),
        "the same visit"
    );
    assert!(keeper.take(7, &grant("g1"), CLIENT).is_none(), "taken once");
    // A nearly full tunnel: the stream is closed instead of kept.
    let (k, _pipe) = kept(KEEP_HEADROOM - 1, "g1").await;
    keeper.put(k);
    assert!(
        keeper.take(7, &grant("g1"), CLIENT).is_none(),
        "no headroom"
    );
}

#[test]
fn device_labels_from_host() {
    let p = PublicUrl {
        scheme: crate::protocol::Scheme::Http,
        host: "localhost".into(),
        port_suffix: ":8080".into(),
    };
    assert_eq!(
        p.device_of("Acme-1.localhost:8080").as_deref(),
        Some("acme-1")
    );
    assert_eq!(p.device_of("acme-1.localhost").as_deref(), Some("acme-1"));
    assert_eq!(p.device_of("localhost:8080"), None);
    assert_eq!(p.device_of("a.b.localhost"), None);
    assert_eq!(p.device_of("acme.localhost.evil.com"), None);
    assert_eq!(
        p.device_of("ACME-1.LocalHost:8080").as_deref(),
        Some("acme-1")
    );
    assert_eq!(p.device_of(".localhost"), None);
    assert_eq!(p.device_of("acmelocalhost"), None);
    assert_eq!(p.device_of("acmé.localhost"), None);
    assert_eq!(p.device_of("é.localhost"), None);
    assert_eq!(p.device_of(&format!("{}.localhost", "a".repeat(64))), None);
    assert_eq!(p.device_origin("acme-1"), "http://acme-1.localhost:8080");
}

#[test]
fn grant_cookie_never_reaches_the_agent() {
    let mut h = http::HeaderMap::new();
    h.append("cookie", "a=1; __cm_visit=x.y".parse().unwrap());
    h.append("cookie", "__Host-__cm_visit=z".parse().unwrap());
    strip_grant_cookie(&mut h);
    assert_eq!(h["cookie"], "a=1");
    let mut h = http::HeaderMap::new();
    h.append("set-cookie", "__cm_visit=evil; Path=/".parse().unwrap());
    h.append("set-cookie", "ok=1".parse().unwrap());
    drop_grant_set_cookie(&mut h);
    assert_eq!(h.get_all("set-cookie").iter().count(), 1);
}
