//! The dashboard: the static files of `web-ui/` (plain HTML, CSS and JavaScript modules, no
//! build step, no network access needed), embedded into the binary at compile time and
//! served at `/` and `/ui/{file}`; and `/events`, the server-sent events stream that feeds it
//! one snapshot of the cluster per second.

use std::time::Duration;

use actix_web::http::header;
use actix_web::{web, HttpResponse};
use futures::StreamExt;
use serde::Serialize;

use crate::rest::{ApiState, Overview};

/// (name, content type, contents) of every dashboard file.
const FILES: &[(&str, &str, &str)] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_str!("../../web-ui/index.html"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("../../web-ui/style.css"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("../../web-ui/app.js"),
    ),
    (
        "dag.js",
        "text/javascript; charset=utf-8",
        include_str!("../../web-ui/dag.js"),
    ),
    (
        "util.js",
        "text/javascript; charset=utf-8",
        include_str!("../../web-ui/util.js"),
    ),
];

fn serve(name: &str) -> HttpResponse {
    match FILES.iter().find(|(n, _, _)| *n == name) {
        Some((_, kind, body)) => HttpResponse::Ok()
            .insert_header((header::CONTENT_TYPE, *kind))
            .insert_header((header::CACHE_CONTROL, "no-cache"))
            .body(*body),
        None => HttpResponse::NotFound().body(format!("no dashboard file '{name}'")),
    }
}

/// The dashboard's page.
pub async fn index() -> HttpResponse {
    serve("index.html")
}

/// One dashboard file.
pub async fn file(name: web::Path<String>) -> HttpResponse {
    serve(&name)
}

/// The example specs of `jobs/examples`, for the submit form.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Examples {
    /// (file name, spec text).
    pub examples: Vec<Example>,
}

/// One example spec.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Example {
    /// File name, e.g. `wordcount.json`.
    pub name: String,
    /// The spec.
    pub spec: String,
}

/// The example job specs.
#[utoipa::path(get, path = "/examples", responses((status = 200, body = Examples)))]
pub async fn examples() -> HttpResponse {
    HttpResponse::Ok().json(Examples {
        examples: jobs::EXAMPLES
            .iter()
            .map(|(name, spec)| Example {
                name: name.to_string(),
                spec: spec.to_string(),
            })
            .collect(),
    })
}

/// What `/events` sends every second (event `tick`).
#[derive(Serialize)]
struct Tick {
    overview: Overview,
    jobs: Vec<crate::dispatcher::JobSummary>,
    taskmanagers: Vec<crate::rest::TaskManagerInfo>,
    auth_required: bool,
}

/// How often `/events` sends a snapshot.
const TICK: Duration = Duration::from_secs(1);

/// Server-sent events: a `tick` with the overview, the job list and the task managers every
/// second, until the client goes away (the stream is dropped then).
pub async fn events(state: web::Data<ApiState>) -> HttpResponse {
    let state = state.into_inner();
    let ticks = tokio_stream_interval(TICK).then(move |_| {
        let state = state.clone();
        async move {
            let frame = match snapshot(&state).await {
                Some(t) => format!(
                    "event: tick\ndata: {}\n\n",
                    serde_json::to_string(&t).unwrap_or_default()
                ),
                // A comment keeps the connection alive while an actor is busy.
                None => ": busy\n\n".to_string(),
            };
            Ok::<_, actix_web::Error>(web::Bytes::from(frame))
        }
    });
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "text/event-stream"))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .streaming(ticks)
}

async fn snapshot(state: &ApiState) -> Option<Tick> {
    let taskmanagers = crate::rest::taskmanagers_of(state).await.ok()?;
    let jobs = state
        .dispatcher
        .send(crate::dispatcher::ListJobs)
        .await
        .ok()?;
    let events = state
        .rm
        .send(crate::resource_manager::GetEvents)
        .await
        .ok()?;
    Some(Tick {
        overview: crate::rest::summarize(&taskmanagers, &jobs, events),
        jobs,
        taskmanagers,
        auth_required: state.token.is_some(),
    })
}

/// A stream that yields at once and then every `every`.
fn tokio_stream_interval(every: Duration) -> impl futures::Stream<Item = ()> {
    futures::stream::unfold(None::<tokio::time::Interval>, move |interval| async move {
        let mut interval = interval.unwrap_or_else(|| tokio::time::interval(every));
        interval.tick().await;
        Some(((), Some(interval)))
    })
}
