//! The OpenAI-compatible HTTP server: state, routes, middleware (auth, metrics, body limits),
//! graceful shutdown. Sees the model only through the `Engine` handle.
//! Depends on `engine`, `adapters`, `chat`, `metrics`.

pub mod auth;
pub mod error;
pub mod file_store;
pub mod job_queue;
pub mod job_request;
pub mod job_runner;
pub mod jobs;
mod meter;
pub mod openai;
mod pages;
pub mod policy;
pub mod rate_limit;
mod responses;
mod routes;
pub mod stage;
pub mod state;
pub mod usage;
pub mod validate;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;

pub use state::{AppState, Parts, ServerConfig};

use self::error::ApiError;

async fn auth(State(st): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    let caller = match &st.keys {
        None => Some(auth::Caller::open()),
        Some(keys) => req
            .headers()
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(auth::bearer)
            .and_then(|k| keys.caller(k)),
    };
    match caller {
        Some(c) => {
            req.extensions_mut().insert(c);
            next.run(req).await
        }
        None => ApiError::Unauthorized.into_response(),
    }
}

async fn count(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let resp = next.run(req).await;
    st.metrics
        .requests
        .with_label_values(&[&route, resp.status().as_str()])
        .inc();
    resp
}

/// All routes; `/health` is open without a key, `/metrics` asks the policy.
pub fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(routes::chat))
        .route("/v1/completions", post(routes::completions))
        .route("/v1/models", get(routes::models))
        .route("/v1/models/{*name}", delete(routes::delete_model))
        .route(
            "/v1/adapters",
            get(routes::list_adapters).post(routes::add_adapter),
        )
        .route("/v1/adapters/{*name}", delete(routes::remove_adapter))
        .route(
            "/v1/files",
            get(routes::list_files).post(routes::upload_file),
        )
        .route(
            "/v1/files/{id}",
            get(routes::get_file).delete(routes::delete_file),
        )
        .route(
            "/v1/fine_tuning/jobs",
            get(routes::list_jobs).post(routes::create_job),
        )
        .route("/v1/fine_tuning/jobs/{id}", get(routes::get_job))
        .route("/v1/fine_tuning/jobs/{id}/events", get(routes::job_events))
        .route(
            "/v1/fine_tuning/jobs/{id}/checkpoints",
            get(routes::job_checkpoints),
        )
        .route("/v1/fine_tuning/jobs/{id}/cancel", post(routes::cancel_job))
        .route("/v1/load_lora_adapter", post(routes::vllm_load))
        .route("/tokenize", post(routes::tokenize))
        .route("/detokenize", post(routes::detokenize))
        .route("/v1/unload_lora_adapter", post(routes::vllm_unload))
        .route("/v1/usage", get(routes::usage))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/health", get(routes::health))
        .route("/metrics", get(routes::metrics))
        .merge(api)
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            state.config.body_timeout,
        ))
        .with_state(state)
}

/// Serves until SIGTERM or Ctrl-C; then stops accepting (`/health` answers 503 from the
/// signal on), lets running sequences finish for at most `shutdown_timeout`, cancels what is
/// left (an error event, then `[DONE]` on streams), and returns within two more seconds even if
/// a client keeps its connection open.
pub async fn serve(state: Arc<AppState>, listener: tokio::net::TcpListener) -> std::io::Result<()> {
    let app = router(state.clone());
    let drained = state.clone();
    let signaled = Arc::new(tokio::sync::Notify::new());
    let notify = signaled.clone();
    let shutdown = async move {
        wait_for_signal().await;
        tracing::info!("shutting down: draining running requests");
        drained.engine.drain();
        notify.notify_one();
        let deadline = tokio::time::Instant::now() + drained.config.shutdown_timeout;
        while !drained.engine.is_idle() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !drained.engine.is_idle() {
            tracing::warn!("shutdown timeout: cancelling the requests still running");
            drained.engine.cancel_all();
        }
    };
    let server = axum::serve(listener, app).with_graceful_shutdown(shutdown);
    let limit = state.config.shutdown_timeout + Duration::from_secs(2);
    // The usage ledger is written every minute (a crash loses at most that) and at the end.
    let ledger = state.usage.clone();
    let flusher = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(usage::FLUSH_SECONDS));
        tick.tick().await;
        loop {
            tick.tick().await;
            let l = ledger.clone();
            let r = tokio::task::spawn_blocking(move || l.flush(state::unix_now())).await;
            if let Ok(Err(e)) = r {
                tracing::error!("{e}");
            }
        }
    });
    let served = serve_until(server, signaled, limit).await;
    flusher.abort();
    if let Err(e) = state.usage.flush(state::unix_now()) {
        tracing::error!("{e}");
    }
    served
}

async fn serve_until(
    server: impl std::future::IntoFuture<Output = std::io::Result<()>>,
    signaled: Arc<tokio::sync::Notify>,
    limit: Duration,
) -> std::io::Result<()> {
    tokio::select! {
        r = std::future::IntoFuture::into_future(server) => r,
        _ = async {
            signaled.notified().await;
            tokio::time::sleep(limit).await;
        } => {
            tracing::warn!("connections still open {} s after the signal; exiting", limit.as_secs());
            Ok(())
        }
    }
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
