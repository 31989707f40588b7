//! Finds a portal's login form in its HTML: the `<form>` holding the password field, its
//! `action` and `method`, and the values of its hidden inputs (a CSRF token, a nonce). A small,
//! tolerant tag scanner rather than an HTML parser: the agent needs four attributes of a few
//! tags, and a full parser would cost more of the binary than the rest of the broker.

/// A login form as found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Form {
    /// Its `action`, as written (entities decoded).
    pub action: Option<String>,
    /// Its `method`, lowercase.
    pub method: Option<String>,
    /// Hidden inputs, in order: name and value.
    pub hidden: Vec<(String, String)>,
    /// The names of all its inputs.
    pub inputs: Vec<String>,
}

/// The first form that holds an input named `password_field`.
pub fn login_form(html: &str, password_field: &str) -> Option<Form> {
    let mut current: Option<(Form, bool)> = None;
    let mut rest = html;
    while let Some(lt) = rest.find('<') {
        rest = &rest[lt + 1..];
        if let Some(after) = rest.strip_prefix("!--") {
            rest = after.find("-->").map_or("", |end| &after[end + 3..]);
            continue;
        }
        let closing = rest.starts_with('/');
        let name_start = usize::from(closing);
        let name_len = rest[name_start..]
            .find(|c: char| !c.is_ascii_alphanumeric())
            .unwrap_or(rest.len() - name_start);
        let name = rest[name_start..name_start + name_len].to_ascii_lowercase();
        let (attrs, after) = attributes(&rest[name_start + name_len..]);
        rest = after;
        match (closing, name.as_str()) {
            (false, "script" | "style" | "textarea") => {
                // Raw text: nothing in it is a tag.
                let end = format!("</{name}");
                rest = find_ascii_ci(rest, &end).map_or("", |i| &rest[i..]);
            }
            (false, "form") => {
                current = Some((
                    Form {
                        action: attr(&attrs, "action"),
                        method: attr(&attrs, "method").map(|m| m.to_ascii_lowercase()),
                        hidden: Vec::new(),
                        inputs: Vec::new(),
                    },
                    false,
                ));
            }
            (true, "form") => match current.take() {
                Some((form, true)) => return Some(form),
                _ => continue,
            },
            (false, "input") => {
                let Some((form, has_password)) = current.as_mut() else {
                    continue;
                };
                let Some(name) = attr(&attrs, "name") else {
                    continue;
                };
                let kind = attr(&attrs, "type")
                    .unwrap_or_default()
                    .to_ascii_lowercase();
                form.inputs.push(name.clone());
                if name == password_field {
                    *has_password = true;
                } else if kind == "hidden" {
                    form.hidden
                        .push((name, attr(&attrs, "value").unwrap_or_default()));
                }
            }
            _ => {}
        }
    }
    // A form left open at the end of the page counts too.
    current.and_then(|(form, found)| found.then_some(form))
}

/// Attributes up to the tag's `>`, and what follows it.
fn attributes(s: &str) -> (Vec<(String, String)>, &str) {
    let mut attrs = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    loop {
        while i < b.len() && (b[i].is_ascii_whitespace() || b[i] == b'/') {
            i += 1;
        }
        if i >= b.len() {
            return (attrs, "");
        }
        if b[i] == b'>' {
            return (attrs, &s[i + 1..]);
        }
        let start = i;
        while i < b.len() && !b[i].is_ascii_whitespace() && !matches!(b[i], b'=' | b'>' | b'/') {
            i += 1;
        }
        let name = s[start..i].to_ascii_lowercase();
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        let mut value = String::new();
        if i < b.len() && b[i] == b'=' {
            i += 1;
            while i < b.len() && b[i].is_ascii_whitespace() {
                i += 1;
            }
            if i < b.len() && (b[i] == b'"' || b[i] == b'\'') {
                let quote = b[i];
                let v_start = i + 1;
                let end = b[v_start..]
                    .iter()
                    .position(|&c| c == quote)
                    .map_or(b.len(), |p| v_start + p);
                value = decode_entities(&s[v_start..end]);
                i = (end + 1).min(b.len());
            } else {
                let v_start = i;
                while i < b.len() && !b[i].is_ascii_whitespace() && b[i] != b'>' {
                    i += 1;
                }
                value = decode_entities(&s[v_start..i]);
            }
        }
        if !name.is_empty() {
            attrs.push((name, value));
        }
    }
}

fn attr(attrs: &[(String, String)], name: &str) -> Option<String> {
    attrs
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.clone())
}

fn find_ascii_ci(haystack: &str, needle: &str) -> Option<usize> {
    haystack
        .as_bytes()
        .windows(needle.len())
        .position(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

/// Character references in an attribute value: the five named ones and numeric ones.
fn decode_entities(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp..];
        let end = rest[1..].find(';').map(|e| e + 1).filter(|&e| e <= 10);
        let decoded = end.and_then(|e| {
            let name = &rest[1..e];
            let c = match name {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                _ => {
                    let n = name.strip_prefix('#')?;
                    let code = match n.strip_prefix(['x', 'X']) {
                        Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                        None => n.parse().ok()?,
                    };
                    char::from_u32(code)
                }
            }?;
            Some((c, e))
        });
        match decoded {
            Some((c, e)) => {
                out.push(c);
                rest = &rest[e + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_form_with_the_password_and_its_hidden_fields() {
        let html = r#"<html><body>
            <form action="/search" method="get"><input name="q"><input type=hidden name=x value=1></form>
            <!-- <form action="/fake"><input name="password"></form> -->
            <script>var s = "<form action='/evil'><input name='password'>";</script>
            <FORM Action="/do-login?next=%2F&amp;x=1" METHOD='POST'>
              <input type="hidden" name="csrf" value="a&quot;b&#39;c&#x26;d">
              <input type="text" name="username" value="">
              <input name=password type=password>
              <input type="HIDDEN" name='nonce' value='n1' />
              <input type="checkbox" name="remember" value="1">
            </form></body></html>"#;
        let f = login_form(html, "password").unwrap();
        assert_eq!(f.action.as_deref(), Some("/do-login?next=%2F&x=1"));
        assert_eq!(f.method.as_deref(), Some("post"));
        assert_eq!(
            f.inputs,
            ["csrf", "username", "password", "nonce", "remember"]
        );
        assert_eq!(
            f.hidden,
            vec![
                ("csrf".to_string(), "a\"b'c&d".to_string()),
                ("nonce".to_string(), "n1".to_string())
            ]
        );
    }

    #[test]
    fn no_form_without_the_password_field() {
        assert_eq!(
            login_form("<form><input name=user></form>", "password"),
            None
        );
        assert_eq!(login_form("<input name=password>", "password"), None);
        assert_eq!(login_form("", "password"), None);
        // Truncated pages end without a panic.
        for html in [
            "<form action=\"/x",
            "<form><input name='password",
            "<",
            "<!--",
            "&#",
        ] {
            let _ = login_form(html, "password");
        }
        assert_eq!(
            decode_entities("a&b&#999999999;&#x41;&zz;"),
            "a&b&#999999999;A&zz;"
        );
    }
}
