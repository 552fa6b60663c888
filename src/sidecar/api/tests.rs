//! In-memory tests of the API service: `app().oneshot()`, no sockets.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

use super::*;
use crate::sidecar::{finish, Faults};

const SECRET: &[u8] = b"a-test-secret-of-enough-length";

fn app() -> Router {
    finish(
        routes(ApiService::new(SECRET).unwrap()),
        "127.0.0.1:9201",
        Faults::default(),
    )
}

async fn send(request: Request<Body>) -> (StatusCode, HeaderMap, Value) {
    let response = app().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        headers,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn post_json(uri: &str, body: &str) -> Request<Body> {
    Request::post(uri)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

fn me_with(auth: &str) -> Request<Body> {
    Request::get("/v1/me")
        .header("authorization", auth)
        .body(Body::empty())
        .unwrap()
}

#[tokio::test]
async fn issued_tokens_verify_and_return_claims() {
    let (status, _, body) = send(post_json("/v1/auth/token", r#"{"user_id":"ada@kingdom"}"#)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], DEFAULT_TTL);
    let token = body["token"].as_str().unwrap();

    let (status, _, claims) = send(me_with(&format!("Bearer {token}"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(claims["sub"], "ada@kingdom");
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        DEFAULT_TTL
    );

    // Another instance with the same secret accepts it.
    let other = ApiService::new(SECRET).unwrap();
    assert!(other.verify(token, now()).is_some());
}

#[tokio::test]
async fn bad_tokens_get_401() {
    let service = ApiService::new(SECRET).unwrap();
    let expired = service.sign(&Claims {
        sub: "ada".into(),
        iat: 1,
        exp: 2,
    });
    let valid = service.sign(&Claims {
        sub: "ada".into(),
        iat: now(),
        exp: now() + 60,
    });
    let (payload, tag) = valid.split_once('.').unwrap();
    let forged_claims = URL_SAFE_NO_PAD.encode(br#"{"sub":"root","iat":1,"exp":99999999999}"#);
    let foreign = ApiService::new(b"some-other-secret-entirely")
        .unwrap()
        .sign(&Claims {
            sub: "ada".into(),
            iat: now(),
            exp: now() + 60,
        });
    let cases = [
        "".to_string(),
        "Basic YWRhOnB3".to_string(),
        "Bearer not-a-token".to_string(),
        format!("Bearer {expired}"),
        format!("Bearer {forged_claims}.{tag}"),
        format!("Bearer {payload}.AAAA"),
        format!("Bearer {foreign}"),
    ];
    for auth in cases {
        let (status, headers, body) = send(me_with(&auth)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{auth}");
        assert_eq!(body["error"], "unauthorized");
        assert!(headers.contains_key("www-authenticate"));
    }
    assert_eq!(
        send(me_with(&format!("Bearer {valid}"))).await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn token_requests_are_validated() {
    let cases = [
        (r#"{"user_id":""}"#, StatusCode::UNPROCESSABLE_ENTITY),
        (
            r#"{"user_id":"has space"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            r#"{"user_id":"ada","ttl_seconds":5}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            r#"{"user_id":"ada","admin":true}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (r#"{"user_id":"#, StatusCode::BAD_REQUEST),
        (r#"{"user_id":"ada","ttl_seconds":120}"#, StatusCode::OK),
    ];
    for (body, want) in cases {
        assert_eq!(
            send(post_json("/v1/auth/token", body)).await.0,
            want,
            "{body}"
        );
    }
    assert!(ApiService::new(b"short").is_err());
}

#[tokio::test]
async fn analytics_summary_is_deterministic_and_bounded() {
    let get = |q: &str| {
        Request::get(format!("/v1/analytics/summary{q}"))
            .body(Body::empty())
            .unwrap()
    };
    let (status, _, first) = send(get("?days=30")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(first["days"], 30);
    assert_eq!(first["daily"].as_array().unwrap().len(), 30);
    let visits: u64 = first["daily"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["visits"].as_u64().unwrap())
        .sum();
    assert_eq!(first["totals"]["visits"].as_u64().unwrap(), visits);
    assert_eq!(send(get("?days=30")).await.2, first);
    assert_ne!(send(get("?days=31")).await.2["totals"], first["totals"]);
    assert_eq!(send(get("")).await.2["days"], 7);
    for bad in ["?days=0", "?days=366", "?days=abc", "?days=-1"] {
        assert_eq!(
            send(get(bad)).await.0,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{bad}"
        );
    }
}

#[tokio::test]
async fn events_are_validated_and_accepted() {
    let event = r#"{"name":"page.view","timestamp":1700000000,"properties":{"path":"/"}}"#;
    let batch = |n: usize| format!(r#"{{"events":[{}]}}"#, vec![event; n].join(","));
    let (status, _, body) = send(post_json("/v1/events", &batch(3))).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(body["accepted"], 3);

    assert_eq!(
        send(post_json("/v1/events", &batch(0))).await.0,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    assert_eq!(
        send(post_json("/v1/events", &batch(101))).await.0,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    let bad = r#"{"events":[{"name":"Bad Name","timestamp":0}]}"#;
    let (status, _, body) = send(post_json("/v1/events", bad)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(body["details"]["events[0].name"].is_string());
    assert!(body["details"]["events[0].timestamp"].is_string());
}

#[tokio::test]
async fn echo_returns_what_arrived() {
    let request = Request::get("/v1/echo?a=1&b=2")
        .header("x-custom", "one")
        .header("x-custom", "two")
        .body(Body::empty())
        .unwrap();
    let (status, headers, body) = send(request).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-instance"], "127.0.0.1:9201");
    assert_eq!(body["method"], "GET");
    assert_eq!(body["path"], "/v1/echo");
    assert_eq!(body["query"], "a=1&b=2");
    assert_eq!(
        body["headers"]["x-custom"],
        serde_json::json!(["one", "two"])
    );
}

#[tokio::test]
async fn healthz_and_unknown_paths() {
    let (status, headers, body) = send(Request::get("/healthz").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "ok");
    assert_eq!(headers["x-instance"], "127.0.0.1:9201");
    let (status, _, body) = send(Request::get("/v2/x").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"], "not_found");
}
