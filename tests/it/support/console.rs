//! A console client for tests: keeps the session cookie and the page's CSRF token by hand, sends
//! the `Origin` a browser on the console would, and does not follow redirects (tests look at
//! where they lead).

use super::TestServer;
use pbx_remote::server::db::{NewUser, Role, Scope};
use std::net::IpAddr;

/// The password every test user gets.
pub const CM_PASSWORD: &str = "Console-Passw0rd!";

/// Adds a CM user to `server`'s store.
pub fn add_user(server: &TestServer, email: &str, role: Role, groups: &[&str]) {
    let scope = if groups.is_empty() {
        Scope::All
    } else {
        Scope::Groups(groups.iter().map(|g| g.to_string()).collect())
    };
    server
        .db()
        .add_user(&NewUser {
            email: email.into(),
            password_hash: pbx_remote::password::hash(CM_PASSWORD).unwrap(),
            role,
            scope,
        })
        .unwrap();
}

pub struct Cm {
    pub base: String,
    client: reqwest::Client,
    pub session: Option<String>,
    pub csrf: Option<String>,
}

impl Cm {
    pub fn new(server: &TestServer) -> Cm {
        Self::from(server, IpAddr::from([127, 0, 0, 1]))
    }

    /// A client whose connections come from `local` (another loopback address is another
    /// source for the lockout).
    pub fn from(server: &TestServer, local: IpAddr) -> Cm {
        Self::built(server, reqwest::Client::builder().local_address(local))
    }

    /// A browser behind a reverse proxy at 127.0.0.1 that says it forwards for `browser`.
    pub fn forwarded_for(server: &TestServer, browser: IpAddr) -> Cm {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("x-forwarded-for", browser.to_string().parse().unwrap());
        Self::built(
            server,
            reqwest::Client::builder()
                .local_address(IpAddr::from([127, 0, 0, 1]))
                .default_headers(headers),
        )
    }

    fn built(server: &TestServer, client: reqwest::ClientBuilder) -> Cm {
        pbx_remote::tls::install_default_provider();
        Cm {
            base: format!("http://{}", server.console),
            client: client
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            session: None,
            csrf: None,
        }
    }

    fn keep(&mut self, r: &reqwest::Response) {
        for v in r.headers().get_all("set-cookie") {
            let v = v.to_str().unwrap();
            if let Some(rest) = v.strip_prefix("cm_session=") {
                let value = rest.split(';').next().unwrap();
                self.session = (!value.is_empty()).then(|| value.to_string());
            }
        }
    }

    fn with_cookie(&self, b: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.session {
            Some(s) => b.header("cookie", format!("cm_session={s}")),
            None => b,
        }
    }

    /// GETs `path`; learns the page's CSRF token if it has forms.
    pub async fn get(
        &mut self,
        path: &str,
    ) -> (reqwest::StatusCode, reqwest::header::HeaderMap, String) {
        let r = self
            .with_cookie(self.client.get(format!("{}{path}", self.base)))
            .send()
            .await
            .unwrap();
        self.keep(&r);
        let (status, headers) = (r.status(), r.headers().clone());
        let body = r.text().await.unwrap();
        if let Some(t) = csrf_in(&body) {
            self.csrf = Some(t);
        }
        (status, headers, body)
    }

    /// POSTs a form from the console's own origin, with the session's CSRF token.
    pub async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> reqwest::Response {
        let mut fields: Vec<(&str, &str)> = form.to_vec();
        let csrf = self.csrf.clone().unwrap_or_default();
        if !fields.iter().any(|(k, _)| *k == "csrf") {
            fields.push(("csrf", &csrf));
        }
        let r = self
            .with_cookie(self.client.post(format!("{}{path}", self.base)))
            .header("origin", &self.base)
            .header("sec-fetch-site", "same-origin")
            .form(&fields)
            .send()
            .await
            .unwrap();
        self.keep(&r);
        r
    }

    /// A request as a script with no session would make it.
    pub fn raw(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client.request(method, format!("{}{path}", self.base))
    }

    /// Signs in with email and password; returns where the console sends the browser.
    pub async fn sign_in(&mut self, email: &str, password: &str) -> String {
        let r = self
            .post("/login", &[("email", email), ("password", password)])
            .await;
        assert_eq!(
            r.status(),
            303,
            "sign-in of {email}: {}",
            r.text().await.unwrap()
        );
        let to = location(&r);
        self.get(&to).await;
        to
    }
}

/// A redirect's target.
pub fn location(r: &reqwest::Response) -> String {
    r.headers()["location"].to_str().unwrap().to_string()
}

/// The first CSRF token in a page's forms.
pub fn csrf_in(html: &str) -> Option<String> {
    let at = html.find("name=\"csrf\" value=\"")? + "name=\"csrf\" value=\"".len();
    Some(html[at..].split('"').next()?.to_string())
}

/// The text of the element with `id` in a page (its first text run).
pub fn text_of(html: &str, id: &str) -> Option<String> {
    let at = html.find(&format!("id=\"{id}\""))?;
    let rest = &html[at..];
    let start = rest.find('>')? + 1;
    Some(rest[start..].split('<').next()?.to_string())
}

/// The TOTP code for a base32 secret at time step `step`.
pub fn totp_code(base32: &str, step: u64) -> String {
    let secret = totp_rs::Secret::Encoded(base32.to_string())
        .to_bytes()
        .unwrap();
    totp_rs::TOTP::new_unchecked(
        totp_rs::Algorithm::SHA1,
        6,
        1,
        30,
        secret,
        None,
        String::new(),
    )
    .generate(step * 30)
}

/// The current TOTP time step.
pub fn totp_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 30
}
