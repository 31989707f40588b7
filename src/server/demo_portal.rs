//! A tiny stand-in for the PBX web portal used by `demo`: one page that shows the identity
//! headers it received, so a visitor can see who the agent says they are.

use crate::httpserve::{self, Limits};
use crate::web::{self, Body};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Serves the demo portal until `shutdown`.
pub async fn serve(listener: TcpListener, shutdown: CancellationToken) {
    let limits = Limits::new("demo portal", 64);
    httpserve::serve(listener, httpserve::Plain, limits, shutdown, |_peer| {
        hyper::service::service_fn(
            |req| async move { Ok::<_, std::convert::Infallible>(page(req)) },
        )
    })
    .await
}

fn page(req: Request<Incoming>) -> Response<Body> {
    let mut rows = String::new();
    for (k, v) in req.headers() {
        let name = k.as_str();
        if name.starts_with("x-pbx-remote-") || name.starts_with("x-forwarded-") || name == "host" {
            let value = v.to_str().unwrap_or("(binary)");
            let shown = if name == "x-pbx-remote-assertion" && value.len() > 40 {
                format!("{}…", &value[..40])
            } else {
                value.to_string()
            };
            rows.push_str(&format!(
                "<tr><th>{}</th><td><code>{}</code></td></tr>",
                web::escape(name),
                web::escape(&shown)
            ));
        }
    }
    let body = format!(
        "<p>This is the demo PBX web portal. You reached <code>{} {}</code> through the tunnel.</p>\
         <table>{rows}</table><form method=\"post\" action=\"/__remote/logout\"><p><a href=\"/__remote/session\">session</a> · <button type=\"submit\">log out</button></p></form>",
        web::escape(req.method().as_str()),
        web::escape(&req.uri().to_string())
    );
    web::html(StatusCode::OK, "Demo PBX portal", &body)
}
