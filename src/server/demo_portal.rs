//! A tiny stand-in for the PBX web portal used by `demo`: one page that shows the identity
//! headers it received, so a visitor can see who the agent says they are.

use crate::web::{self, Body};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Serves the demo portal until `shutdown`.
pub async fn serve(listener: TcpListener, shutdown: CancellationToken) {
    loop {
        let tcp = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r { Ok((t, _)) => t, Err(_) => continue },
        };
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(|req| async move {
                Ok::<_, std::convert::Infallible>(page(req))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
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
