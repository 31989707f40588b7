//! Every fuzz target's saved corpus (`fuzz/corpus/TARGET/`) and each past crash input
//! (`fuzz/artifacts/TARGET/`) replayed through the target's own body
//! (`pbx_remote::fuzzing`) by a normal `cargo test` on stable: a crash found once stays fixed,
//! and every target has inputs. `fuzz/run.sh` grows the corpora on nightly.
//!
//! The seed inputs come from `write_seeds` (ignored; run it after a format change):
//! `cargo test --test it -- --ignored fuzz_corpus::write_seeds`.

use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files under `dir`, sorted (none if it does not exist).
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.retain(|p| p.is_file());
    files.sort();
    files
}

#[test]
fn every_corpus_input_and_past_crash_replays_clean() {
    let targets = pbx_remote::fuzzing::TARGETS;
    // A target added under fuzz/fuzz_targets/ without a replay entry would escape this test.
    let mut files: Vec<String> = inputs(&fuzz_dir().join("fuzz_targets"))
        .iter()
        .filter_map(|p| p.file_stem()?.to_str().map(str::to_string))
        .collect();
    files.sort();
    let mut names: Vec<String> = targets.iter().map(|(n, _)| n.to_string()).collect();
    names.sort();
    assert_eq!(
        files, names,
        "fuzz/fuzz_targets/ and pbx_remote::fuzzing::TARGETS"
    );

    let mut replayed = 0;
    let mut failures = vec![];
    for (name, body) in targets {
        let corpus = inputs(&fuzz_dir().join("corpus").join(name));
        assert!(
            corpus.len() >= 3,
            "fuzz/corpus/{name}/ has {} inputs",
            corpus.len()
        );
        let crashes = inputs(&fuzz_dir().join("artifacts").join(name));
        for path in corpus.iter().chain(&crashes) {
            let data = std::fs::read(path).unwrap();
            if std::panic::catch_unwind(|| body(&data)).is_err() {
                failures.push(path.display().to_string());
            }
            replayed += 1;
        }
    }
    eprintln!("{replayed} fuzz inputs replayed");
    assert!(failures.is_empty(), "inputs that fail: {failures:#?}");
}

#[test]
#[ignore = "writes the seed corpus: cargo test --test it -- --ignored fuzz_corpus::write_seeds"]
fn write_seeds() {
    use pbx_remote::protocol::*;
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let frame = |v: &dyn erased::Frame| rt.block_on(v.encode());
    let facts = DeviceFacts {
        edition: "software".into(),
        firmware: "83.19.0.110".into(),
        model: "P-Series".into(),
        serial: "3631A1234567".into(),
        mac: "00:11:22:33:44:55".into(),
        ha_role: None,
    };
    let mut seeds: Vec<(&str, &str, Vec<u8>)> = vec![];
    let req = |proof| ActivateRequest {
        protocol_version: PROTOCOL_VERSION,
        agent_version: "0.1.0".into(),
        proof,
        device_public_key: "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE".into(),
        facts: facts.clone(),
    };
    let code = ActivationProof::AuthCode {
        code: pbx_remote::secret::Secret::new("ABCD-EFGH-JKMN-PQRS"),
    };
    let email = ActivationProof::Email {
        email: "it@example.com".into(),
        password: pbx_remote::secret::Secret::new("pw"),
    };
    seeds.push((
        "activation",
        "code",
        serde_json::to_vec(&req(code)).unwrap(),
    ));
    seeds.push((
        "activation",
        "email",
        serde_json::to_vec(&req(email)).unwrap(),
    ));
    seeds.push((
        "activation",
        "response",
        serde_json::to_vec(&ActivateResponse {
            device_id: "pbx-1".into(),
            signing_key: "AAAA".into(),
            server_time_ms: 1,
        })
        .unwrap(),
    ));
    seeds.push((
        "activation",
        "error",
        serde_json::to_vec(&ErrorBody {
            code: Reason::CodeUsed,
            message: "used".into(),
        })
        .unwrap(),
    ));

    let example =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/agent.toml")).unwrap();
    seeds.push(("config", "example", example.clone()));
    seeds.push((
        "config",
        "unknown-key",
        [&example[..], b"\n[tunnel]\nheartbeat = 3\n"].concat(),
    ));
    seeds.push(("config", "not-toml", b"[server\naddress = ".to_vec()));

    let hello = Control::Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: "0.1.0".into(),
        facts: facts.clone(),
        ha_state: None,
        switches: Some(LocalSwitches::default()),
        handover: true,
    };
    let beat = Control::Heartbeat {
        ha_state: None,
        telemetry: None,
        switches: None,
    };
    let audit = Control::AuditEvents {
        events: vec![AuditEvent {
            seq: 1,
            at: 1,
            kind: "login_ok".into(),
            user: "cli:alice".into(),
            client: Some("127.0.0.1".into()),
            detail: None,
        }],
    };
    let goodbye = Goodbye {
        reason: Some(Reason::DeviceRemoved),
        message: "removed".into(),
    };
    seeds.push(("control_frame", "hello", frame(&hello)));
    seeds.push((
        "control_frame",
        "beat-and-audit",
        [frame(&beat), frame(&audit)].concat(),
    ));
    seeds.push(("control_frame", "goodbye", frame(&goodbye)));
    seeds.push(("control_frame", "truncated", frame(&hello)[..9].to_vec()));

    seeds.push((
        "passwordless_token",
        "shape",
        b"eyJkZXYiOiJwYngtMSJ9.c2ln".to_vec(),
    ));
    seeds.push((
        "passwordless_token",
        "no-dot",
        b"eyJkZXYiOiJwYngtMSJ9".to_vec(),
    ));
    seeds.push(("passwordless_token", "empty-parts", b".".to_vec()));

    seeds.push((
        "proxy_answer",
        "ok",
        b"HTTP/1.1 200 Connection established\r\n\r\n\x16\x03\x01".to_vec(),
    ));
    seeds.push((
        "proxy_answer",
        "407",
        b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"x\"\r\nContent-Length: 0\r\n\r\n".to_vec(),
    ));
    seeds.push(("proxy_answer", "bare-lf", b"HTTP/1.0 200 OK\n\n".to_vec()));

    seeds.push((
        "sanitize",
        "request",
        b"x-forwarded-for: 127.0.0.1\nforwarded: for=1\nx-pbx-remote-user: admin\nconnection: x-real-ip\nx-real-ip: 1\norigin: https://dev.cm.example\nreferer: https://dev.cm.example/a\ncookie: __pbxra_sid=1; a=2\n".to_vec(),
    ));
    seeds.push((
        "sanitize",
        "response",
        b"location: http://127.0.0.1:8080/x\nset-cookie: sid=1; Domain=127.0.0.1; Path=/\nset-cookie: __cm_visit=evil\n".to_vec(),
    ));
    seeds.push((
        "sanitize",
        "redirects",
        b"location: /\\evil.example\nlocation: https:evil.example\n".to_vec(),
    ));

    let header = StreamHeader {
        cm_user: "cli:alice".into(),
        grant_id: "g1".into(),
        client_addr: "127.0.0.1".into(),
        scheme: Scheme::Http,
        origin: "http://pbx-1.localhost:8080".into(),
        grant_expires_ms: 1,
        passwordless_token: None,
    };
    seeds.push(("stream_header", "header", frame(&header)));
    seeds.push((
        "stream_header",
        "header-and-request",
        [frame(&header), b"GET / HTTP/1.1\r\n\r\n".to_vec()].concat(),
    ));
    seeds.push((
        "stream_header",
        "huge-length",
        vec![0xff, 0xff, 0xff, 0xff, b'{'],
    ));

    let ws = |opcode: u8, payload: &[u8]| {
        let mut f = vec![0x80 | opcode, 0x80 | payload.len() as u8, 1, 2, 3, 4];
        f.extend_from_slice(payload);
        f
    };
    seeds.push((
        "wsframe",
        "text-ping",
        [vec![3], ws(1, b"hello"), ws(9, b"ping")].concat(),
    ));
    seeds.push((
        "wsframe",
        "one-byte-steps",
        [vec![1], ws(2, &[0; 100])].concat(),
    ));
    seeds.push((
        "wsframe",
        "long-length",
        vec![7, 0x82, 0xff, 0, 0, 0, 0, 0, 1, 0, 0, 1, 2, 3, 4],
    ));

    seeds.push((
        "login_form",
        "csrf-form",
        br#"<form method=post action="/login"><input type=hidden name=csrf value="a&amp;b"><input name=user><input type=password name=password></form>"#.to_vec(),
    ));
    seeds.push((
        "login_form",
        "comments-and-scripts",
        br#"<!-- <form><input name=password> --><script>"<form>"</script><FORM><INPUT NAME='pass' TYPE=password><input type=hidden name=x value='&#x41;&#65;'></FORM>"#.to_vec(),
    ));
    seeds.push((
        "login_form",
        "truncated",
        br#"<form action="/x"><input type="hidden" name="n" value="&#"#.to_vec(),
    ));

    for (target, name, data) in seeds {
        let dir = fuzz_dir().join("corpus").join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("seed-{name}")), data).unwrap();
    }
}

/// Frames of any type, for the seed writer.
mod erased {
    pub trait Frame {
        fn encode(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<u8>> + '_>>;
    }

    impl<T: serde::Serialize> Frame for T {
        fn encode(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<u8>> + '_>> {
            Box::pin(async move {
                let mut buf = Vec::new();
                pbx_remote::protocol::write_frame(&mut buf, self)
                    .await
                    .unwrap();
                buf
            })
        }
    }
}
