//! The console's admin and record pages over HTTP: Users (roles, groups, the last admin, the
//! 2FA setting), Groups, Templates (picked in Add, delivered as the device's template), My
//! Subscription, and the Operation Log with its filters and CSV export.

use crate::support::console::*;
use crate::support::*;
use pbx_remote::server::db::{Role, Scope};
use pbx_remote::server::mail::SmtpOptions;

#[tokio::test(flavor = "multi_thread")]
async fn an_admin_manages_users_groups_capacity_and_the_2fa_setting() {
    let server = TestServer::start().await;
    add_user(&server, "ann@example.com", Role::Admin, &[]);
    add_user(&server, "op@example.com", Role::Operator, &[]);
    let mut admin = Cm::new(&server);
    admin.sign_in("ann@example.com", CM_PASSWORD).await;

    // Groups.
    for g in ["east", "west"] {
        assert_eq!(admin.post("/groups", &[("name", g)]).await.status(), 303);
    }
    let r = admin.post("/groups", &[("name", "east")]).await;
    assert_eq!(r.status(), 422, "no duplicates");
    assert!(r.text().await.unwrap().contains("already exists"));
    let (_, _, page) = admin.get("/groups").await;
    assert!(page.contains(">east<") && page.contains(">west<"));

    // Users: add one scoped to a group, change them, and the last admin stays one.
    let r = admin
        .post(
            "/users",
            &[
                ("email", "new@example.com"),
                ("password", "Another-Passw0rd"),
                ("role", "viewer"),
                ("group", "east"),
            ],
        )
        .await;
    assert_eq!(r.status(), 303, "{}", r.text().await.unwrap());
    let u = server.db().user("new@example.com").unwrap().unwrap();
    assert_eq!(
        (u.role, u.scope),
        (Role::Viewer, Scope::Groups(vec!["east".into()]))
    );
    let r = admin
        .post(
            "/users/new@example.com",
            &[("role", "operator"), ("group", "east"), ("group", "west")],
        )
        .await;
    assert_eq!(r.status(), 303);
    let u = server.db().user("new@example.com").unwrap().unwrap();
    assert_eq!(u.role, Role::Operator);
    assert_eq!(u.scope, Scope::Groups(vec!["east".into(), "west".into()]));
    let r = admin
        .post("/users/ann@example.com", &[("role", "viewer")])
        .await;
    assert_eq!(r.status(), 422);
    assert!(r.text().await.unwrap().contains("last admin"));
    let r = admin.post("/users/new@example.com/remove", &[]).await;
    assert_eq!(r.status(), 303);
    assert!(server.db().user("new@example.com").unwrap().is_none());

    // Capacity and the 2FA setting.
    assert_eq!(
        admin
            .post("/subscription", &[("capacity", "7")])
            .await
            .status(),
        303
    );
    let (_, _, page) = admin.get("/subscription").await;
    assert_eq!(text_of(&page, "slots-total").as_deref(), Some("7"));
    assert_eq!(
        admin
            .post("/subscription", &[("capacity", "lots")])
            .await
            .status(),
        422
    );
    assert_eq!(
        admin
            .post("/users/settings", &[("require_2fa", "on")])
            .await
            .status(),
        303
    );
    let mut op = Cm::new(&server);
    assert_eq!(
        op.sign_in("op@example.com", CM_PASSWORD).await,
        "/account/2fa"
    );

    // Only an admin sees Users or changes groups and capacity.
    admin.post("/users/settings", &[]).await;
    let mut op = Cm::new(&server);
    op.sign_in("op@example.com", CM_PASSWORD).await;
    let (_, _, page) = op.get("/devices").await;
    assert!(
        !page.contains("href=\"/users\""),
        "no Users entry for an operator"
    );
    assert_eq!(op.get("/users").await.0, 403);
    assert_eq!(op.post("/groups", &[("name", "north")]).await.status(), 403);
    assert_eq!(
        op.post("/subscription", &[("capacity", "1")])
            .await
            .status(),
        403
    );
    assert_eq!(op.post("/groups/west/remove", &[]).await.status(), 403);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_template_picked_in_add_is_delivered_as_the_devices_provisioning() {
    let server = TestServer::start().await;
    add_user(&server, "op@example.com", Role::Operator, &[]);
    let mut cm = Cm::new(&server);
    cm.sign_in("op@example.com", CM_PASSWORD).await;
    let r = cm
        .post(
            "/templates",
            &[
                ("name", "office"),
                ("body", "[extensions]\n100 = \"Reception\"\n"),
            ],
        )
        .await;
    assert_eq!(r.status(), 303);
    let (_, _, page) = cm.get("/devices/add").await;
    assert!(
        page.contains("<option value=\"office\">office</option>"),
        "{page}"
    );
    let r = cm
        .post(
            "/devices/add",
            &[
                ("name", "Provisioned"),
                ("allow_provisioning", "on"),
                ("serial", "SN0001"),
                ("mac", "02:00:00:00:00:01"),
                ("template", "office"),
            ],
        )
        .await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let d = &server.db().list_devices().unwrap()[0];
    assert_eq!(
        d.serial.as_deref(),
        Some("SN0001"),
        "provisioning verifies the machine"
    );
    let task = d.provisioning.as_ref().expect("a provisioning task");
    assert_eq!(task.state, pbx_remote::protocol::TaskState::Pending);
    assert_eq!(
        server.db().pending_task(&d.id).unwrap().unwrap().template,
        "[extensions]\n100 = \"Reception\""
    );

    // A later edit of the template does not change what the device was promised.
    cm.post("/templates", &[("name", "office"), ("body", "changed")])
        .await;
    assert!(server
        .db()
        .pending_task(&d.id)
        .unwrap()
        .unwrap()
        .template
        .contains("Reception"));
    let r = cm
        .post(
            "/devices/add",
            &[
                ("name", "No MAC"),
                ("allow_provisioning", "on"),
                ("template", "office"),
            ],
        )
        .await;
    assert_eq!(
        r.status(),
        422,
        "provisioning needs the serial number and MAC"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_operation_log_filters_and_exports_csv_within_the_users_scope() {
    let server = TestServer::start().await;
    add_user(&server, "ann@example.com", Role::Admin, &[]);
    let data = server.data_dir();
    pbx_remote::server::admin::group_add(&data, "east").unwrap();
    add_user(&server, "east@example.com", Role::Operator, &["east"]);
    let mut ann = Cm::new(&server);
    ann.sign_in("ann@example.com", CM_PASSWORD).await;
    ann.post("/devices/add", &[("name", "West, \"quoted\"")])
        .await;
    ann.post("/devices/add", &[("name", "East"), ("group", "east")])
        .await;
    let mut east = Cm::new(&server);
    east.sign_in("east@example.com", CM_PASSWORD).await;

    let (_, _, page) = ann.get("/log?action=device.").await;
    assert_eq!(page.matches(">device.add<").count(), 2, "{page}");
    assert!(!page.contains(">user.login<"), "filtered by action");
    let (_, _, page) = ann.get("/log?user=east%40").await;
    assert!(page.contains(">user.login<") && !page.contains(">device.add<"));

    let r = ann
        .raw(reqwest::Method::GET, "/log.csv?action=device.")
        .header(
            "cookie",
            format!("cm_session={}", ann.session.clone().unwrap()),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "text/csv; charset=utf-8");
    assert!(r.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .contains("attachment"));
    let csv = r.text().await.unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "time,user,source,action,target,device,client,result,detail"
    );
    assert_eq!(lines.len(), 3, "{csv}");
    assert!(lines
        .iter()
        .skip(1)
        .all(|l| l.contains(",ann@example.com,console,device.add,")));

    let (_, _, page) = ann.get("/log").await;
    assert!(
        page.contains(">ann@example.com</td><td>console</td><td>user.login"),
        "{page}"
    );

    // The east operator sees their own sign-in and the east device's entry, not the other.
    let (_, _, page) = east.get("/log").await;
    assert_eq!(page.matches(">device.add<").count(), 1, "{page}");
    assert!(page.contains("east@example.com"));
    assert!(
        !page.contains(">ann@example.com</td><td>console</td><td>user.login"),
        "not the admin's sign-in"
    );
}

/// A server that sends mail as `smtp` says, and an operator signed in to its console.
async fn operator_with_mail(smtp: SmtpOptions) -> (TestServer, Cm) {
    let server = TestServer::start_with(move |o| o.smtp = Some(smtp)).await;
    add_user(&server, "op@example.com", Role::Operator, &[]);
    let mut cm = Cm::new(&server);
    cm.sign_in("op@example.com", CM_PASSWORD).await;
    (server, cm)
}

#[tokio::test(flavor = "multi_thread")]
async fn send_to_email_mails_a_live_code_with_the_server_address_and_pin() {
    let sink = crate::support::smtp::SmtpSink::start().await;
    let (server, mut cm) = operator_with_mail(SmtpOptions {
        url: sink.url(),
        from: "Central Management <cm@example.com>".into(),
        ca_file: None,
    })
    .await;
    let r = cm.post("/devices/add", &[("name", "Mailed PBX")]).await;
    let page = r.text().await.unwrap();
    assert!(
        page.contains(">Send to Email</button>"),
        "offered with SMTP settings"
    );
    let code = text_of(&page, "auth-code").unwrap();
    let address = text_of(&page, "server-address").unwrap();
    assert_eq!(
        address,
        server.tunnel.to_string(),
        "what the agent's [server] address takes"
    );
    let id = server.db().list_devices().unwrap()[0].id.clone();

    let r = cm
        .post(
            &format!("/devices/{id}/mail"),
            &[("code", &code), ("to", "it@customer.example")],
        )
        .await;
    assert_eq!(r.status(), 200);
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("Sent to it@customer.example"));
    let mail = sink.wait_for(1).await;
    assert_eq!(mail.to, ["<it@customer.example>"]);
    assert_eq!(mail.from, "<cm@example.com>");
    assert!(
        mail.data
            .contains("Subject: Authentication code for Mailed PBX"),
        "{}",
        mail.data
    );
    for value in [&code, &address, &server.pin] {
        assert!(
            mail.data.contains(value.as_str()),
            "{value} in {}",
            mail.data
        );
    }

    // Only a live code of that device is mailed: not a replaced one, not made-up text.
    cm.post(&format!("/devices/{id}/code"), &[]).await;
    for text in [code.as_str(), "BUY-CHEAP-STUFF"] {
        let r = cm
            .post(
                &format!("/devices/{id}/mail"),
                &[("code", text), ("to", "x@customer.example")],
            )
            .await;
        assert_eq!(r.status(), 409);
    }
    assert_eq!(sink.mails.lock().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_smtp_settings_send_to_email_is_not_offered() {
    let server = TestServer::start().await;
    add_user(&server, "op@example.com", Role::Operator, &[]);
    let mut cm = Cm::new(&server);
    cm.sign_in("op@example.com", CM_PASSWORD).await;
    let page = cm
        .post("/devices/add", &[("name", "Quiet PBX")])
        .await
        .text()
        .await
        .unwrap();
    assert!(text_of(&page, "auth-code").is_some());
    assert!(!page.contains("Send to Email"));
    let code = text_of(&page, "auth-code").unwrap();
    let id = server.db().list_devices().unwrap()[0].id.clone();
    let r = cm
        .post(
            &format!("/devices/{id}/mail"),
            &[("code", &code), ("to", "it@customer.example")],
        )
        .await;
    assert_eq!(r.status(), 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn send_to_email_over_smtps_logs_in_and_trusts_the_given_ca() {
    let sink = crate::support::smtp::SmtpSink::start_tls().await;
    let mut url = sink.url();
    url.set_username("cm").unwrap();
    url.set_password(Some("s3cret/pw")).unwrap();
    let (server, mut cm) = operator_with_mail(SmtpOptions {
        url,
        from: "cm@example.com".into(),
        ca_file: sink.ca.as_ref().map(|(_, p)| p.clone()),
    })
    .await;
    let page = cm
        .post("/devices/add", &[("name", "TLS PBX")])
        .await
        .text()
        .await
        .unwrap();
    let code = text_of(&page, "auth-code").unwrap();
    let id = server.db().list_devices().unwrap()[0].id.clone();
    let r = cm
        .post(
            &format!("/devices/{id}/mail"),
            &[("code", &code), ("to", "it@customer.example")],
        )
        .await;
    assert!(
        r.text().await.unwrap().contains("Sent to"),
        "delivered over TLS"
    );
    let mail = sink.wait_for(1).await;
    assert_eq!(
        mail.auth.as_deref(),
        Some("\0cm\0s3cret/pw"),
        "logged in with the URL's credentials"
    );
    assert!(mail.data.contains(&code));
}
