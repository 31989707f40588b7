//! Passwordless Login: the server-signed token from the stream header, checked for device,
//! grant, expiry and single use, and the CM's and the PBX's switches.

use super::*;

impl Gate {
    pub(super) fn passwordless(&self, h: &StreamHeader) -> Response<Body> {
        let refuse = |reason: &str, title: &str, detail: &str| {
            self.audit.record(Event {
                event: "passwordless_rejected",
                cm_user: &h.cm_user,
                client_addr: &h.client_addr,
                user: None,
                role: Some(Role::SuperAdmin.as_str()),
                session: None,
                reason: Some(reason),
            });
            let mut r = web::page(StatusCode::FORBIDDEN, title, detail);
            r.headers_mut()
                .insert("referrer-policy", HeaderValue::from_static("no-referrer"));
            r
        };
        let Some(token) = &h.passwordless_token else {
            return refuse(
                "used",
                "This passwordless link was already used",
                "A passwordless visit logs in once. Ask the provider for a new visit link.",
            );
        };
        let rules = self.rules();
        if !rules.passwordless {
            return refuse(
                "disabled_locally",
                "Passwordless login is disabled on this PBX",
                "The PBX owner has turned Passwordless Login off in Remote Management.",
            );
        }
        if !self.cm_passwordless.load(Ordering::SeqCst) {
            return refuse("not_allowed", "Passwordless login is not allowed for this device", "The provider has not allowed passwordless login for this device on the management platform.");
        }
        let claims = match crate::token::verify(&self.server_key, token.expose()) {
            Ok(c) => c,
            Err(_) => {
                return refuse(
                    "invalid_signature",
                    "Invalid passwordless link",
                    "The link was not signed by this PBX's management server.",
                )
            }
        };
        if claims.dev != self.device_id || claims.grant != h.grant_id || claims.cm_user != h.cm_user
        {
            return refuse(
                "wrong_device",
                "Invalid passwordless link",
                "The link was made for another device or visit.",
            );
        }
        if claims.exp_ms <= claims.iat_ms
            || claims.exp_ms - claims.iat_ms > crate::token::MAX_TOKEN_LIFETIME_MS
        {
            return refuse(
                "invalid_lifetime",
                "Invalid passwordless link",
                "The link's lifetime is not allowed.",
            );
        }
        let server_now = match self.clock.server_now_ms() {
            Ok(t) => t,
            Err(why) => return refuse("clock", "Cannot check the link's time", &why),
        };
        if server_now >= claims.exp_ms {
            return refuse("expired", "This passwordless link has expired", "Passwordless links must be used within a minute. Ask the provider for a new visit link.");
        }
        {
            let mut nonces = lock(&self.nonces);
            if nonces.contains_key(&claims.nonce) {
                drop(nonces);
                return refuse(
                    "used",
                    "This passwordless link was already used",
                    "A passwordless visit logs in once. Ask the provider for a new visit link.",
                );
            }
            nonces.insert(claims.nonce.clone(), claims.exp_ms);
        }
        self.open_session(
            h,
            &rules.super_admin,
            Role::SuperAdmin,
            "passwordless_ok",
            "/",
        )
    }
}
