//! What both sidecar services share: command-line flags, the `x-instance` header, fault
//! injection, JSON errors and bodies, and graceful shutdown.

pub mod api;
pub mod content;
pub mod launch;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use crate::config::units::parse_duration;

/// Flags every sidecar takes.
#[derive(Debug, Clone, clap::Args)]
pub struct SidecarArgs {
    /// Address to listen on.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Fraction of requests (0.0 to 1.0) answered with 503, for tests and demos. `/healthz` is
    /// never failed.
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub fail_rate: f64,
    /// Extra delay before every response except `/healthz`, e.g. `50ms`.
    #[arg(long, default_value = "0ms", value_parser = parse_duration)]
    pub latency: Duration,
    /// Exit when standard input closes: the supervising proxy holds it open.
    #[arg(long)]
    pub exit_on_stdin_eof: bool,
}

fn parse_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if (0.0..=1.0).contains(&rate) => Ok(rate),
        _ => Err(format!("`{text}` is not a number between 0.0 and 1.0")),
    }
}

/// Injected faults; all off by default.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    /// Fraction of requests answered with 503.
    pub fail_rate: f64,
    /// Delay added before every response.
    pub latency: Duration,
}

impl From<&SidecarArgs> for Faults {
    fn from(args: &SidecarArgs) -> Self {
        Self {
            fail_rate: args.fail_rate,
            latency: args.latency,
        }
    }
}

#[derive(Clone)]
struct Instance {
    name: HeaderValue,
    faults: Faults,
}

/// Wraps a service's routes with `/healthz`, JSON 404/405, `x-instance` on every response, and
/// fault injection.
pub fn finish(routes: Router, instance: &str, faults: Faults) -> Router {
    let instance = Arc::new(Instance {
        name: HeaderValue::from_str(instance).unwrap_or(HeaderValue::from_static("unknown")),
        faults,
    });
    routes
        .route("/healthz", axum::routing::get(healthz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(instance, around))
}

async fn around(State(instance): State<Arc<Instance>>, request: Request, next: Next) -> Response {
    let faults = instance.faults;
    let exempt = request.uri().path() == "/healthz";
    let mut response = if exempt {
        next.run(request).await
    } else {
        if !faults.latency.is_zero() {
            tokio::time::sleep(faults.latency).await;
        }
        if faults.fail_rate > 0.0 && fastrand::f64() < faults.fail_rate {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "injected_fault",
                "fault injected by --fail-rate",
            )
            .into_response()
        } else {
            next.run(request).await
        }
    };
    response
        .headers_mut()
        .insert("x-instance", instance.name.clone());
    response
}

async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such resource")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this method is not allowed on this resource",
    )
}

/// A JSON error response: `{"error": code, "message": …, "details": …}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    details: Option<Value>,
}

impl ApiError {
    /// An error with a status, a stable code and a human message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            details: None,
        }
    }

    /// 422 with per-field problems.
    pub fn invalid(details: Value) -> Self {
        Self {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: "invalid_fields",
            message: "some fields are invalid".to_string(),
            details: Some(details),
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.code, "message": self.message });
        if let Some(details) = self.details {
            body["details"] = details;
        }
        (self.status, Json(body)).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let (status, code) = match &rejection {
            JsonRejection::JsonSyntaxError(_) => (StatusCode::BAD_REQUEST, "malformed_json"),
            JsonRejection::JsonDataError(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_fields"),
            JsonRejection::MissingJsonContentType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            _ if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large")
            }
            _ => (StatusCode::BAD_REQUEST, "bad_request"),
        };
        ApiError::new(status, code, rejection.body_text())
    }
}

/// `Json<T>` whose rejections are JSON errors: 400 malformed, 413 too large, 415 not JSON,
/// 422 wrong shape.
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let Json(value) = Json::<T>::from_request(req, state).await?;
        Ok(JsonBody(value))
    }
}

/// The whole life of a sidecar binary: `routes` wrapped by [`finish`] with a body limit,
/// served until stopped. Returns the process exit code.
pub async fn run(name: &str, args: &SidecarArgs, routes: Router, max_body: u64) -> ExitCode {
    let app = finish(routes, &args.listen.to_string(), Faults::from(args)).layer(
        axum::extract::DefaultBodyLimit::max(usize::try_from(max_body).unwrap_or(usize::MAX)),
    );
    match serve(args, app).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Serves `app` until SIGTERM or SIGINT (or stdin closing, if asked), letting in-flight
/// requests finish.
pub async fn serve(args: &SidecarArgs, app: Router) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    tracing::info!(listen = %args.listen, "listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(stop_requested(args.exit_on_stdin_eof))
        .await?;
    tracing::info!("stopped");
    Ok(())
}

async fn stop_requested(watch_stdin: bool) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return std::future::pending().await;
    };
    // A plain thread reads stdin: tokio's stdin reader would keep the runtime from shutting
    // down while the read blocks.
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
    if watch_stdin {
        std::thread::spawn(move || {
            let mut sink = std::io::sink();
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut sink);
            let _ = closed_tx.send(());
        });
    }
    let stdin_closed = async {
        if !watch_stdin || closed_rx.await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: finishing in-flight requests"),
        _ = int.recv() => tracing::info!("SIGINT: finishing in-flight requests"),
        _ = stdin_closed => tracing::info!("supervisor gone: stopping"),
    }
}

/// Sets up logging to stderr for a sidecar binary. Under a supervisor, which stamps each
/// relayed line itself, lines carry no time of their own.
pub fn init_tracing(supervised: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false);
    if supervised {
        builder.without_time().init();
    } else {
        builder.init();
    }
}
