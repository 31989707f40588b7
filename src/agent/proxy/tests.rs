//! Header rewriting and stream serving rules in-process.

use super::*;

fn map(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

#[test]
fn inbound_strips_hop_by_hop_connection_listed_and_forged_identity() {
    let mut h = map(&[
        ("connection", "Keep-Alive, x-secret"),
        ("connection", " X-Other ,, not a name"),
        ("x-secret", "1"),
        ("x-other", "1"),
        ("keep-alive", "5"),
        ("te", "trailers"),
        ("x-pbx-remote-user", "root"),
        ("X-PBX-Remote-Role", "super_admin"),
        ("forwarded", "for=1.2.3.4"),
        ("x-forwarded-for", "1.2.3.4"),
        ("x-real-ip", "1.2.3.4"),
        ("cookie", "a=1; __pbxra_sid=s; __cm_visit=v; b=2"),
        ("accept", "text/html"),
    ]);
    strip_inbound(&mut h, false);
    let mut names: Vec<_> = h.keys().map(|k| k.as_str().to_string()).collect();
    names.sort();
    assert_eq!(names, ["accept", "cookie"]);
    assert_eq!(h["cookie"], "a=1; b=2");
}

#[test]
fn websocket_keeps_upgrade_headers() {
    let mut h = map(&[
        ("connection", "Upgrade"),
        ("upgrade", "websocket"),
        ("sec-websocket-key", "k"),
    ]);
    strip_inbound(&mut h, true);
    assert_eq!(h["upgrade"], "websocket");
    assert_eq!(h["connection"], "upgrade");
    assert_eq!(h["sec-websocket-key"], "k");
}

#[test]
fn portal_sees_its_own_origin() {
    let mut h = map(&[
        ("origin", "http://dev1.localhost:9000"),
        ("referer", "http://dev1.localhost:9000/a?b"),
    ]);
    rewrite_inbound_origin(
        &mut h,
        "http://dev1.localhost:9000",
        "https://127.0.0.1:8088",
    );
    assert_eq!(h["origin"], "https://127.0.0.1:8088");
    assert_eq!(h["referer"], "https://127.0.0.1:8088/a?b");
    let mut h = map(&[("referer", "http://dev1.localhost:90001/x")]);
    rewrite_inbound_origin(
        &mut h,
        "http://dev1.localhost:9000",
        "https://127.0.0.1:8088",
    );
    assert!(
        h.get("referer").is_none(),
        "a look-alike prefix is not the visitor's origin"
    );
}

#[test]
fn outbound_rewrites_location_and_cookies() {
    let mut h = map(&[
        ("location", "https://127.0.0.1:8088/login?x=1"),
        ("set-cookie", "sid=1; Domain=127.0.0.1; Path=/; HttpOnly"),
        ("set-cookie", "__pbxra_sid=evil; Path=/"),
        ("set-cookie", "__Host-__cm_visit=evil; Path=/"),
        ("connection", "close"),
    ]);
    rewrite_outbound(
        &mut h,
        "https://127.0.0.1:8088",
        "https://dev1.cm.example",
        false,
    );
    assert_eq!(h["location"], "https://dev1.cm.example/login?x=1");
    let cookies: Vec<_> = h.get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["sid=1; Path=/; HttpOnly; Secure"]);
    assert!(h.get("connection").is_none());
}

#[test]
fn redirects_stay_on_the_visitors_origin_and_never_leave_the_pbx() {
    let rewrite = |loc: &str| {
        let mut h = map(&[("location", loc)]);
        let verdict = rewrite_outbound(
            &mut h,
            "https://127.0.0.1:8088",
            "https://dev1.cm.example",
            false,
        );
        (
            verdict,
            h.get("location").map(|v| v.to_str().unwrap().to_string()),
        )
    };
    let kept = |l: &str| (Redirect::Kept, Some(l.to_string()));
    // The portal's own host on another port or scheme, loopback names, the visitor's origin:
    // the visitor's origin, same path.
    for loc in [
        "http://127.0.0.1:8080/admin?x=1",
        "https://127.0.0.1/admin?x=1",
        "//127.0.0.1:9/admin?x=1",
        "http://localhost:8080/admin?x=1",
        "http://[::1]:8080/admin?x=1",
        "http://user@127.0.0.2/admin?x=1",
        "https://dev1.cm.example/admin?x=1",
    ] {
        assert_eq!(
            rewrite(loc),
            kept("https://dev1.cm.example/admin?x=1"),
            "{loc}"
        );
    }
    assert_eq!(
        rewrite("http://127.0.0.1:8080"),
        kept("https://dev1.cm.example/")
    );
    assert_eq!(
        rewrite("http:127.0.0.1:9/x"),
        kept("https://dev1.cm.example/x")
    );
    // Relative references stay as they are.
    for loc in ["/login", "login?next=/", "?page=2", "#top"] {
        assert_eq!(rewrite(loc), kept(loc), "{loc}");
    }
    // Anywhere else: refused, and the header goes.
    for (loc, host) in [
        ("https://other.example/", "other.example"),
        ("//evil.example/x", "evil.example"),
        ("http://127.0.0.1.evil.example/", "127.0.0.1.evil.example"),
        ("http://192.168.1.10:8088/", "192.168.1.10"),
        ("https://dev1.cm.example.evil/", "dev1.cm.example.evil"),
        // What browsers read as another host although it looks like a path.
        ("/\\evil.example/x", "evil.example"),
        ("\\\\evil.example", "evil.example"),
        ("/\t/evil.example", "evil.example"),
        (" //evil.example", "evil.example"),
        ("https:evil.example", "evil.example"),
        ("HTTPS://Evil.Example/", "Evil.Example"),
    ] {
        assert_eq!(
            rewrite(loc),
            (Redirect::ThirdParty(host.into()), None),
            "{loc}"
        );
    }
}

#[test]
fn portal_cookies_get_secure_on_https_only() {
    let cookies = |visitor: &str| {
        let mut h = map(&[
            ("set-cookie", "sid=1; Path=/; HttpOnly"),
            ("set-cookie", "pref=2; secure"),
        ]);
        rewrite_outbound(&mut h, "http://127.0.0.1:8088", visitor, false);
        h.get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        cookies("https://dev1.cm.example"),
        ["sid=1; Path=/; HttpOnly; Secure", "pref=2; secure"]
    );
    assert_eq!(
        cookies("http://dev1.localhost:8080"),
        ["sid=1; Path=/; HttpOnly", "pref=2; secure"]
    );
}
