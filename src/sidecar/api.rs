//! kingdom-api: the stateless API upstream. Tokens are HMAC-SHA256 signed claims, so any
//! instance sharing the secret verifies any other's tokens.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{ApiError, JsonBody};
use crate::token::TokenKey;
pub use crate::token::{Claims, MIN_SECRET};
/// Default and bounds of a token's lifetime, in seconds.
pub const DEFAULT_TTL: u64 = 3600;
const TTL_RANGE: std::ops::RangeInclusive<u64> = 60..=86_400;
/// Most events in one `POST /v1/events`.
pub const MAX_EVENTS: usize = 100;
/// Most days in one analytics summary.
pub const MAX_DAYS: u32 = 365;

/// Signs and verifies tokens (the format is `crate::token`'s, shared with the edge).
pub struct ApiService {
    key: TokenKey,
}

impl ApiService {
    /// A service signing with `secret` (at least [`MIN_SECRET`] bytes).
    pub fn new(secret: &[u8]) -> Result<Arc<Self>, String> {
        Ok(Arc::new(Self {
            key: TokenKey::new(secret)?,
        }))
    }

    /// The token for `claims`.
    pub fn sign(&self, claims: &Claims) -> String {
        self.key.sign(claims)
    }

    /// The claims of a well-signed token that has not expired at `now`.
    pub fn verify(&self, token: &str, now: u64) -> Option<Claims> {
        self.key.verify(token, now, 0).ok()
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Command-line flags of the API service.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub common: super::SidecarArgs,
    /// Environment variable holding the token-signing secret (at least 16 bytes).
    #[arg(long, default_value = "KINGDOM_API_SECRET")]
    pub secret_env: String,
    /// Largest accepted request body.
    #[arg(long, default_value = "256KiB", value_parser = crate::config::units::parse_size)]
    pub max_body: u64,
}

/// Runs the API service until it is stopped. Refuses to start without a usable secret.
pub async fn main(args: Args) -> std::process::ExitCode {
    super::init_tracing(args.common.exit_on_stdin_eof);
    let secret = std::env::var(&args.secret_env).unwrap_or_default();
    let service = match ApiService::new(secret.as_bytes()) {
        Ok(service) => service,
        Err(e) => {
            eprintln!("kingdom-api: ${}: {e}", args.secret_env);
            return std::process::ExitCode::FAILURE;
        }
    };
    super::run("kingdom-api", &args.common, routes(service), args.max_body).await
}

/// The API routes (without `/healthz` and the shared layers; see [`super::finish`]).
pub fn routes(service: Arc<ApiService>) -> Router {
    Router::new()
        .route("/v1/auth/token", post(issue_token))
        .route("/v1/me", get(me))
        .route("/v1/analytics/summary", get(analytics))
        .route("/v1/events", post(events))
        .route("/v1/echo", get(echo).post(echo))
        .with_state(service)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    user_id: String,
    ttl_seconds: Option<u64>,
}

async fn issue_token(
    State(service): State<Arc<ApiService>>,
    JsonBody(request): JsonBody<TokenRequest>,
) -> Result<Response, ApiError> {
    let mut problems = serde_json::Map::new();
    let user = request.user_id.trim();
    if user.is_empty()
        || user.len() > 64
        || !user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@'))
    {
        problems.insert(
            "user_id".into(),
            json!("1 to 64 characters of A-Z a-z 0-9 . _ - @"),
        );
    }
    let ttl = request.ttl_seconds.unwrap_or(DEFAULT_TTL);
    if !TTL_RANGE.contains(&ttl) {
        problems.insert(
            "ttl_seconds".into(),
            json!(format!(
                "must be between {} and {}",
                TTL_RANGE.start(),
                TTL_RANGE.end()
            )),
        );
    }
    if !problems.is_empty() {
        return Err(ApiError::invalid(Value::Object(problems)));
    }
    let iat = now();
    let claims = Claims {
        sub: user.to_string(),
        iat,
        exp: iat + ttl,
    };
    let body = json!({
        "token": service.sign(&claims),
        "token_type": "Bearer",
        "expires_in": ttl,
        "expires_at": claims.exp,
    });
    Ok((
        StatusCode::OK,
        [(header::CACHE_CONTROL, "no-store")],
        Json(body),
    )
        .into_response())
}

async fn me(State(service): State<Arc<ApiService>>, headers: HeaderMap) -> Response {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match token.and_then(|t| service.verify(t.trim(), now())) {
        Some(claims) => Json(claims).into_response(),
        None => {
            let mut response = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a valid bearer token is required",
            )
            .into_response();
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer error=\"invalid_token\""),
            );
            response
        }
    }
}

/// splitmix64: a fixed, well-mixed function so summaries are reproducible.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The summary for `days` days: the same input always gives the same numbers.
pub fn summary(days: u32) -> Value {
    let mut totals = (0u64, 0u64, 0u64);
    let daily: Vec<Value> = (0..days)
        .map(|day| {
            let seed = mix(u64::from(days) << 32 | u64::from(day));
            let visits = 1_000 + seed % 500;
            let signups = visits / 20 + (seed >> 16) % 10;
            let conversions = signups / 4 + (seed >> 32) % 3;
            totals.0 += visits;
            totals.1 += signups;
            totals.2 += conversions;
            json!({ "day": day + 1, "visits": visits, "signups": signups, "conversions": conversions })
        })
        .collect();
    let rate = if totals.0 == 0 {
        0.0
    } else {
        (totals.2 as f64 / totals.0 as f64 * 10_000.0).round() / 10_000.0
    };
    json!({
        "days": days,
        "totals": { "visits": totals.0, "signups": totals.1, "conversions": totals.2 },
        "conversion_rate": rate,
        "daily": daily,
    })
}

async fn analytics(Query(query): Query<HashMap<String, String>>) -> Result<Json<Value>, ApiError> {
    let days = match query.get("days") {
        None => 7,
        Some(text) => match text.parse::<u32>() {
            Ok(days) if (1..=MAX_DAYS).contains(&days) => days,
            _ => {
                return Err(ApiError::invalid(json!({
                    "days": format!("must be a whole number from 1 to {MAX_DAYS} (got `{text}`)")
                })))
            }
        },
    };
    Ok(Json(summary(days)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventBatch {
    events: Vec<Event>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Event {
    name: String,
    /// Unix seconds.
    timestamp: u64,
    #[serde(default)]
    properties: serde_json::Map<String, Value>,
}

async fn events(JsonBody(batch): JsonBody<EventBatch>) -> Result<Response, ApiError> {
    let count = batch.events.len();
    if count == 0 || count > MAX_EVENTS {
        return Err(ApiError::invalid(json!({
            "events": format!("must hold 1 to {MAX_EVENTS} events (got {count})")
        })));
    }
    let mut problems = serde_json::Map::new();
    for (i, event) in batch.events.iter().enumerate() {
        let name_ok = (1..=64).contains(&event.name.len())
            && event
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.'));
        if !name_ok {
            problems.insert(
                format!("events[{i}].name"),
                json!("1 to 64 characters of a-z 0-9 _ ."),
            );
        }
        if event.timestamp == 0 {
            problems.insert(
                format!("events[{i}].timestamp"),
                json!("must be Unix seconds > 0"),
            );
        }
        if event.properties.len() > 32 {
            problems.insert(
                format!("events[{i}].properties"),
                json!("at most 32 properties"),
            );
        }
    }
    if !problems.is_empty() {
        return Err(ApiError::invalid(Value::Object(problems)));
    }
    Ok((StatusCode::ACCEPTED, Json(json!({ "accepted": count }))).into_response())
}

async fn echo(method: Method, uri: Uri, headers: HeaderMap) -> Json<Value> {
    let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in &headers {
        seen.entry(name.as_str().to_string())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    Json(json!({
        "method": method.as_str(),
        "path": uri.path(),
        "query": uri.query().unwrap_or(""),
        "headers": seen,
    }))
}

#[cfg(test)]
mod tests;
