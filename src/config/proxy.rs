//! `[tunnel] proxy` and the environment's `HTTPS_PROXY` / `ALL_PROXY` / `NO_PROXY`, read as curl
//! reads them: which HTTP CONNECT proxy, if any, the agent's TCP connections to a host go
//! through. Credentials stay in a [`Secret`].

use crate::secret::Secret;
use std::fmt;

/// An HTTP CONNECT proxy.
#[derive(Clone, PartialEq)]
pub struct ProxyUrl {
    /// `https://`: TLS to the proxy itself.
    pub tls: bool,
    /// Host (no brackets).
    pub host: String,
    /// Port (curl's defaults: 1080 for http://, 443 for https://).
    pub port: u16,
    /// `user:password` for Basic authentication, percent-decoded.
    pub credentials: Option<Secret>,
}

impl fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

/// `scheme://host:port`, never the credentials: what messages name.
impl fmt::Display for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}", self.authority())
    }
}

impl ProxyUrl {
    /// Reads `http://[user:pass@]host[:port][/]` or `https://…`; a bare `host:port` is http, as
    /// curl takes it.
    pub fn parse(s: &str) -> Result<ProxyUrl, String> {
        let s = s.trim();
        let with_scheme = if s.contains("://") {
            s.to_string()
        } else {
            format!("http://{s}")
        };
        let url = url::Url::parse(&with_scheme).map_err(|e| {
            format!("expected a proxy URL such as \"http://proxy.example:3128\" ({e})")
        })?;
        let tls = match url.scheme() {
            "http" => false,
            "https" => true,
            other => {
                return Err(format!(
                    "expected an http:// or https:// proxy, got {other}://"
                ))
            }
        };
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or("the proxy URL has no host")?
            .trim_matches(['[', ']'])
            .to_string();
        if !(url.path() == "/" || url.path().is_empty()) || url.query().is_some() {
            return Err("a proxy URL takes no path or query".into());
        }
        let decode = |p: &str| {
            url::form_urlencoded::parse(format!("x={}", p.replace('+', "%2B")).as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        };
        let credentials = (!url.username().is_empty()).then(|| {
            Secret::new(format!(
                "{}:{}",
                decode(url.username()),
                decode(url.password().unwrap_or(""))
            ))
        });
        Ok(ProxyUrl {
            tls,
            port: url.port().unwrap_or(if tls { 443 } else { 1080 }),
            host,
            credentials,
        })
    }

    /// `host:port`, brackets around IPv6.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Where a proxy setting came from, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxySource {
    /// `[tunnel] proxy`.
    Config,
    /// An environment variable.
    Env(&'static str),
}

/// The proxy for TCP connections to `host`: `[tunnel] proxy`, else `https_proxy` /
/// `HTTPS_PROXY`, else `all_proxy` / `ALL_PROXY`; none when `no_proxy` / `NO_PROXY` names the
/// host (`*`, a host, a domain and its subdomains, an address, or an address block), as curl
/// decides. `env` reads the environment (tests pass their own).
pub fn proxy_for(
    host: &str,
    configured: Option<&ProxyUrl>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<(ProxyUrl, ProxySource)>, String> {
    let get = |names: [&'static str; 2]| {
        names
            .into_iter()
            .find_map(|n| env(n).filter(|v| !v.trim().is_empty()).map(|v| (n, v)))
    };
    if let Some((_, list)) = get(["no_proxy", "NO_PROXY"]) {
        if no_proxy_matches(&list, host) {
            return Ok(None);
        }
    }
    if let Some(p) = configured {
        return Ok(Some((p.clone(), ProxySource::Config)));
    }
    match get(["https_proxy", "HTTPS_PROXY"]).or_else(|| get(["all_proxy", "ALL_PROXY"])) {
        Some((name, value)) => ProxyUrl::parse(&value)
            .map(|p| Some((p, ProxySource::Env(name))))
            .map_err(|e| format!("environment variable {name}: {e}")),
        None => Ok(None),
    }
}

fn no_proxy_matches(list: &str, host: &str) -> bool {
    let host = host.trim_matches(['[', ']']).to_ascii_lowercase();
    let ip = host.parse::<std::net::IpAddr>().ok();
    list.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .any(|entry| {
            let entry = entry.to_ascii_lowercase();
            if entry == "*" {
                return true;
            }
            if let Some(ip) = ip {
                let bare = entry.trim_matches(['[', ']']);
                if let Ok(net) = bare.parse::<ipnet::IpNet>() {
                    return net.contains(&ip);
                }
                return bare.parse::<std::net::IpAddr>() == Ok(ip);
            }
            let domain = entry.trim_start_matches('.');
            host == domain || host.ends_with(&format!(".{domain}"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_urls_read_as_curl_reads_them_and_never_print_credentials() {
        let p = ProxyUrl::parse("http://us%40er:p%3Ass@proxy.example:3128").unwrap();
        assert_eq!(
            (p.tls, p.host.as_str(), p.port),
            (false, "proxy.example", 3128)
        );
        assert_eq!(p.credentials.as_ref().unwrap().expose(), "us@er:p:ss");
        assert_eq!(
            format!("{p} {p:?}"),
            "http://proxy.example:3128 http://proxy.example:3128"
        );
        assert_eq!(ProxyUrl::parse("proxy.example").unwrap().port, 1080);
        assert_eq!(
            ProxyUrl::parse("https://[2001:db8::1]")
                .unwrap()
                .authority(),
            "[2001:db8::1]:443"
        );
        for bad in ["socks5://p:1080", "http://p:3128/path", "http://"] {
            assert!(ProxyUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_environment_and_no_proxy_decide_as_curl_does() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let none: &[(&str, &str)] = &[];
        assert_eq!(proxy_for("cm.example.com", None, &env(none)).unwrap(), None);
        let vars: &[(&str, &str)] = &[
            ("HTTPS_PROXY", "http://p:3128"),
            ("ALL_PROXY", "http://q:1"),
        ];
        let (p, src) = proxy_for("cm.example.com", None, &env(vars))
            .unwrap()
            .unwrap();
        assert_eq!(
            (p.host.as_str(), src),
            ("p", ProxySource::Env("HTTPS_PROXY"))
        );
        let vars: &[(&str, &str)] = &[("all_proxy", "http://q:1")];
        assert_eq!(
            proxy_for("x", None, &env(vars)).unwrap().unwrap().0.host,
            "q"
        );
        let configured = ProxyUrl::parse("http://c:8080").unwrap();
        let vars: &[(&str, &str)] = &[("HTTPS_PROXY", "http://p:3128")];
        let got = proxy_for("x", Some(&configured), &env(vars))
            .unwrap()
            .unwrap();
        assert_eq!(
            (got.0.host.as_str(), got.1),
            ("c", ProxySource::Config),
            "the config wins"
        );
        let vars: &[(&str, &str)] = &[
            ("HTTPS_PROXY", "http://p:3128"),
            (
                "NO_PROXY",
                "localhost, .internal.example,10.0.0.0/8, 192.0.2.7",
            ),
        ];
        for direct in [
            "cm.internal.example",
            "internal.example",
            "10.1.2.3",
            "192.0.2.7",
            "localhost",
        ] {
            assert_eq!(
                proxy_for(direct, Some(&configured), &env(vars)).unwrap(),
                None,
                "{direct}"
            );
        }
        for proxied in [
            "cm.example.com",
            "notinternal.example",
            "11.0.0.1",
            "192.0.2.8",
        ] {
            assert!(
                proxy_for(proxied, None, &env(vars)).unwrap().is_some(),
                "{proxied}"
            );
        }
        let vars: &[(&str, &str)] = &[("HTTPS_PROXY", "http://p:3128"), ("no_proxy", "*")];
        assert_eq!(proxy_for("anything", None, &env(vars)).unwrap(), None);
        let vars: &[(&str, &str)] = &[("HTTPS_PROXY", "ftp://p")];
        let err = proxy_for("x", None, &env(vars)).unwrap_err();
        assert!(err.contains("HTTPS_PROXY"), "{err}");
    }
}
