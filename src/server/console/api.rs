//! `/api/v1/`: the console's JSON API. The pages use it (My Devices refreshes itself from
//! `GET /devices`); scripts call it with `Authorization: Bearer pbxcm_…`. Same scope rules as
//! the pages: a device outside the caller's groups is 404, a viewer's change is 403.

use super::add::{add_device, AddForm};
use super::device::remove_device;
use super::devices::{self, ListQuery};
use super::{AppState, Caller};
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http::StatusCode;
use serde::Deserialize;
use serde_json::json;

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/me", get(me))
        .route("/devices", get(list).post(add))
        .route("/devices/{id}", get(show).delete(remove))
        .route("/devices/{id}/visits", post(visit))
        .route("/devices/{id}/code", post(code))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint") })
}

/// A JSON error body: `{"error": "..."}`.
pub(crate) fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

fn internal(e: anyhow::Error) -> Response {
    tracing::error!(error = %format!("{e:#}"), "console API request failed");
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal error; see the server's log",
    )
}

async fn me(c: Caller) -> Response {
    Json(&c.user).into_response()
}

async fn list(State(app): State<AppState>, c: Caller, Query(q): Query<ListQuery>) -> Response {
    match devices::listing(&app, &c.user, &q) {
        Ok(l) => Json(l).into_response(),
        Err(e) => internal(e),
    }
}

async fn show(State(app): State<AppState>, c: Caller, Path(id): Path<String>) -> Response {
    match devices::device_for(&app, &c.user, &id) {
        Ok(Some(d)) => Json(d).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, "no such device"),
        Err(e) => internal(e),
    }
}

/// `POST /devices` body.
#[derive(Deserialize)]
struct AddJson {
    name: String,
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    comment: Option<String>,
    #[serde(default)]
    allow_passwordless: bool,
    #[serde(default)]
    allow_provisioning: bool,
    #[serde(default)]
    template: Option<String>,
    #[serde(default)]
    serial: Option<String>,
    #[serde(default)]
    mac: Option<String>,
}

async fn add(State(app): State<AppState>, c: Caller, Json(j): Json<AddJson>) -> Response {
    if let Err(r) = c.may_change(true) {
        return r;
    }
    let on = |b: bool| b.then(|| "on".to_string());
    let verify = j.serial.is_some() || j.mac.is_some();
    let form = AddForm {
        name: j.name,
        group: j.group.unwrap_or_default(),
        comment: j.comment.unwrap_or_default(),
        allow_passwordless: on(j.allow_passwordless),
        allow_provisioning: on(j.allow_provisioning),
        verify: on(verify),
        serial: j.serial.unwrap_or_default(),
        mac: j.mac.unwrap_or_default(),
        template: String::new(),
        template_text: j.template,
    };
    match add_device(&app, &c, &form) {
        Ok(added) => (
            StatusCode::CREATED,
            Json(json!({ "device_id": added.id, "auth_code": added.code })),
        )
            .into_response(),
        Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, &format!("{e:#}")),
    }
}

async fn remove(State(app): State<AppState>, c: Caller, Path(id): Path<String>) -> Response {
    if let Err(r) = c.may_change(true) {
        return r;
    }
    match remove_device(&app, &c, &id) {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => error(StatusCode::NOT_FOUND, "no such device"),
        Err(e) => internal(e),
    }
}

/// `POST /devices/{id}/visits` body.
#[derive(Deserialize, Default)]
struct VisitJson {
    #[serde(default)]
    passwordless: bool,
}

async fn visit(
    State(app): State<AppState>,
    c: Caller,
    Path(id): Path<String>,
    body: Option<Json<VisitJson>>,
) -> Response {
    if let Err(r) = c.may_change(true) {
        return r;
    }
    let passwordless = body.map(|Json(b)| b.passwordless).unwrap_or_default();
    match devices::visit_url(&app, &c, &id, passwordless) {
        Ok(Some(url)) => (StatusCode::CREATED, Json(json!({ "url": url }))).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, "no such device"),
        Err(e) => error(StatusCode::CONFLICT, &format!("{e:#}")),
    }
}

async fn code(State(app): State<AppState>, c: Caller, Path(id): Path<String>) -> Response {
    if let Err(r) = c.may_change(true) {
        return r;
    }
    let d = match devices::device_for(&app, &c.user, &id) {
        Ok(Some(d)) => d,
        Ok(None) => return error(StatusCode::NOT_FOUND, "no such device"),
        Err(e) => return internal(e),
    };
    match app.server.db.new_code(&d.id, crate::server::db::CODE_TTL) {
        Ok(code) => {
            app.log(&c, "device.code", Some(&d.id), "ok");
            (
                StatusCode::CREATED,
                Json(json!({ "device_id": d.id, "auth_code": code })),
            )
                .into_response()
        }
        Err(e) => internal(e),
    }
}
