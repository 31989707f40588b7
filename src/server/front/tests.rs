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

/// A kept stream over an in-memory pipe, on a link whose streams are `room`.
async fn kept(room: &Arc<StreamRoom>, grant: &str) -> (KeptStream, tokio::io::DuplexStream) {
    let (ours, theirs) = tokio::io::duplex(1024);
    let (sender, conn) = hyper::client::conn::http1::handshake::<_, Incoming>(TokioIo::new(ours))
        .await
        .unwrap();
    tokio::spawn(conn);
    let k = KeptStream {
        generation: 7,
        room: Arc::downgrade(room),
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
async fn a_stream_is_reused_only_for_the_same_visit() {
    let room = Arc::new(StreamRoom::new(8));
    let (k, _pipe) = kept(&room, "g1").await;
    room.put(k);
    assert!(
        room.take(7, &grant("g2"), CLIENT).is_none(),
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
        let (k, _pipe) = kept(&room, "g1").await;
        room.put(k);
        assert!(room.take(7, &other, CLIENT).is_none(), "{what}");
    }
    let (k, _pipe) = kept(&room, "g1").await;
    room.put(k);
    let elsewhere = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));
    assert!(
        room.take(7, &grant("g1"), elsewhere).is_none(),
        "another visitor address"
    );
    assert!(
        room.take(7, &grant("g1"), CLIENT).is_some(),
        "still there for its own visitor"
    );
    let (k, _pipe) = kept(&room, "g1").await;
    room.put(k);
    assert!(
        room.take(8, &grant("g1"), CLIENT).is_none(),
        "another tunnel connection"
    );
    let (mut k, _pipe) = kept(&room, "g1").await;
    k.header.passwordless_token = Some(Secret::new("t"));
    room.put(k);
    assert!(
        room.take(7, &grant("g1"), CLIENT).is_none(),
        "a stream that carried a passwordless token"
    );
    let (k, _pipe) = kept(&room, "g1").await;
    room.put(k);
    assert!(
        room.take(7, &grant("g1"), CLIENT).is_some(),
        "the same visit"
    );
    assert!(room.take(7, &grant("g1"), CLIENT).is_none(), "taken once");
}

/// Waits (bounded) until `n` requests wait for a stream of `room`.
async fn until_waiting(room: &StreamRoom, n: usize) {
    for _ in 0..1000 {
        if room.waiting() == n {
            return;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("{} requests wait, not {n}", room.waiting());
}

/// A request of `grant` waiting for a stream of `room` in a task of its own.
fn waiter(
    room: &Arc<StreamRoom>,
    grant_id: &'static str,
    within: Duration,
) -> tokio::task::JoinHandle<Option<&'static str>> {
    let room = room.clone();
    tokio::spawn(async move {
        let until = tokio::time::Instant::now() + within;
        match room.wait(7, &grant(grant_id), CLIENT, until).await {
            Some(Next::Kept(_)) => Some("kept"),
            Some(Next::Permit(_)) => Some("permit"),
            None => None,
        }
    })
}

#[tokio::test]
async fn a_finished_stream_goes_to_its_visits_waiting_request_or_frees_its_place() {
    // No free permits: a waiting request gets a stream handed over, or nothing.
    let room = Arc::new(StreamRoom::new(0));
    let w = waiter(&room, "g1", Duration::from_secs(5));
    until_waiting(&room, 1).await;
    let (k, _pipe) = kept(&room, "g1").await;
    room.put(k);
    assert!(
        room.take(7, &grant("g1"), CLIENT).is_none(),
        "handed to the waiting request, not left in the pool for whoever asks first"
    );
    assert_eq!(w.await.unwrap(), Some("kept"));
    // Only a request of g2 waits: g1's finished stream closes (its place goes to g2), and
    // the next one is kept, as one is already closing for the one waiter.
    let w = waiter(&room, "g2", Duration::from_millis(300));
    until_waiting(&room, 1).await;
    let (k, _pipe) = kept(&room, "g1").await;
    room.put(k);
    assert!(
        room.take(7, &grant("g1"), CLIENT).is_none(),
        "closed for g2"
    );
    let (k, _pipe) = kept(&room, "g1").await;
    room.put(k);
    assert!(room.take(7, &grant("g1"), CLIENT).is_some(), "kept");
    assert_eq!(
        w.await.unwrap(),
        None,
        "no permit came (there are none here)"
    );
    assert_eq!(room.waiting(), 0);
    // Nobody waits: kept.
    let (k, _pipe) = kept(&room, "g1").await;
    room.put(k);
    assert!(room.take(7, &grant("g1"), CLIENT).is_some());
    // A free permit serves a waiting request too.
    let room = Arc::new(StreamRoom::new(1));
    assert_eq!(
        waiter(&room, "g1", Duration::from_secs(5)).await.unwrap(),
        Some("permit")
    );
}

#[tokio::test]
async fn a_request_finding_the_tunnel_full_closes_a_stream_another_visit_left_idle() {
    let room = Arc::new(StreamRoom::new(0));
    let (busy, _pipe) = kept(&room, "g1").await;
    room.put(busy);
    let w = waiter(&room, "g2", Duration::from_secs(5));
    until_waiting(&room, 1).await;
    assert!(
        room.take(7, &grant("g1"), CLIENT).is_some(),
        "a stream idle for less than IDLE_TO_CLOSE is left to its visit"
    );
    w.abort();
    let _ = w.await;
    until_waiting(&room, 0).await;
    let (idle, _pipe) = kept(&room, "g1").await;
    room.put(idle);
    let (own, _pipe) = kept(&room, "g2").await;
    room.put(own);
    tokio::time::sleep(IDLE_TO_CLOSE).await; // both now count as idle
    let w = waiter(&room, "g2", Duration::from_secs(5));
    until_waiting(&room, 1).await;
    assert!(
        room.take(7, &grant("g1"), CLIENT).is_none(),
        "g1's idle stream was closed for g2's request"
    );
    assert!(
        room.take(7, &grant("g2"), CLIENT).is_some(),
        "a visit's own idle stream is not closed for it"
    );
    w.abort();
}

#[tokio::test]
async fn the_pool_forgets_streams_the_agent_closed_and_visits_that_ended() {
    // A room's kept streams do not keep it alive: they point back at it weakly.
    let gone = Arc::new(StreamRoom::new(8));
    let (k, _pipe) = kept(&gone, "g1").await;
    gone.put(k);
    let weak = Arc::downgrade(&gone);
    drop(gone);
    assert!(weak.upgrade().is_none(), "the room outlived its link");

    let room = Arc::new(StreamRoom::new(8));
    let (k, pipe) = kept(&room, "g1").await;
    room.put(k);
    drop(pipe); // the agent's end of the stream closed
    for _ in 0..10 {
        tokio::task::yield_now().await; // the stream's client sees the end
    }
    assert_eq!(room.listed(), (1, 1), "(visits, kept streams)");
    for _ in 0..SWEEP_EVERY {
        let (k, _pipe) = kept(&room, "g2").await;
        room.put(k);
        assert!(room.take(7, &grant("g2"), CLIENT).is_some());
    }
    // The last put swept: g1's dead stream, and with it g1, are gone.
    assert_eq!(room.listed(), (1, 0), "(visits, kept streams)");
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
