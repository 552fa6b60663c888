//! In-memory tests of the content service: `app().oneshot()`, no sockets.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;

use super::*;
use crate::sidecar::{finish, Faults};

fn app(service: Arc<ContentService>) -> Router {
    finish(routes(service), "127.0.0.1:9101", Faults::default())
        .layer(axum::extract::DefaultBodyLimit::max(1024))
}

fn fast() -> Router {
    app(ContentService::new(Duration::ZERO))
}

async fn send(app: Router, request: Request<Body>) -> (StatusCode, HeaderMap, Value) {
    let response = app.oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, headers, body)
}

fn get(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).unwrap()
}

fn post_json(uri: &str, body: &str) -> Request<Body> {
    Request::post(uri)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

#[tokio::test]
async fn lists_six_templates_cacheably() {
    let (status, headers, body) = send(fast(), get("/v1/content/templates")).await;
    assert_eq!(status, StatusCode::OK);
    let kinds: Vec<&str> = body["templates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "blog_post",
            "social_post",
            "email",
            "product_description",
            "ad_copy",
            "video_script"
        ]
    );
    assert_eq!(headers["cache-control"], "public, max-age=300");
    assert_eq!(headers["x-instance"], "127.0.0.1:9101");
    assert!(headers.contains_key("etag"));
}

#[tokio::test]
async fn renders_deterministically_with_strong_etags_and_304() {
    let uri = "/v1/content/blog_post?topic=rust&tone=friendly&audience=developers&length=short";
    let (status, headers, body) = send(fast(), get(uri)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["type"], "blog_post");
    assert_eq!(body["title"], "Rust: what developers should know");
    assert!(body["body"].as_str().unwrap().contains("friendly piece"));
    let etag = headers["etag"].to_str().unwrap().to_string();
    assert!(etag.starts_with('"') && !etag.starts_with("W/"), "{etag}");

    let (_, again, body_again) = send(fast(), get(uri)).await;
    assert_eq!(again["etag"], etag.as_str());
    assert_eq!(body, body_again);

    for if_none_match in [
        etag.clone(),
        format!("\"other\", {etag}"),
        format!("W/{etag}"),
        "*".into(),
    ] {
        let request = Request::get(uri)
            .header("if-none-match", if_none_match.as_str())
            .body(Body::empty())
            .unwrap();
        let (status, headers, _) = send(fast(), request).await;
        assert_eq!(status, StatusCode::NOT_MODIFIED, "{if_none_match}");
        assert_eq!(headers["etag"], etag.as_str());
    }
    let request = Request::get(uri)
        .header("if-none-match", "\"stale\"")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(fast(), request).await.0, StatusCode::OK);

    let (_, other, _) = send(fast(), get("/v1/content/blog_post?topic=go")).await;
    assert_ne!(other["etag"], etag.as_str());
}

#[tokio::test]
async fn rejects_bad_reads() {
    let cases = [
        (
            "/v1/content/poem?topic=x",
            StatusCode::NOT_FOUND,
            "unknown_type",
        ),
        (
            "/v1/content/email",
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_fields",
        ),
        (
            "/v1/content/email?topic=x&tone=angry",
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_fields",
        ),
        (
            "/v1/content/email?topic=x&colour=red",
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_fields",
        ),
        ("/nothing", StatusCode::NOT_FOUND, "not_found"),
    ];
    for (uri, want, code) in cases {
        let (status, headers, body) = send(fast(), get(uri)).await;
        assert_eq!(status, want, "{uri}");
        assert_eq!(body["error"], code, "{uri}");
        assert!(headers.contains_key("x-instance"), "{uri}");
    }
}

#[tokio::test]
async fn generate_validates_input_with_json_errors() {
    let too_big = format!(r#"{{"type":"email","topic":"{}"}}"#, "x".repeat(2000));
    let cases: Vec<(Request<Body>, StatusCode, &str)> = vec![
        (
            post_json("/v1/content/generate", "{not json"),
            StatusCode::BAD_REQUEST,
            "malformed_json",
        ),
        (
            Request::post("/v1/content/generate")
                .header("content-type", "text/plain")
                .body(Body::from("{}"))
                .unwrap(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            post_json("/v1/content/generate", &too_big),
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
        ),
        (
            post_json(
                "/v1/content/generate",
                r#"{"type":"email","topic":"x","length":"epic"}"#,
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_fields",
        ),
        (
            post_json("/v1/content/generate", r#"{"type":"email","topic":5}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_fields",
        ),
        (
            post_json("/v1/content/generate", r#"{"type":"limerick","topic":"x"}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_fields",
        ),
        (
            Request::delete("/v1/content/generate")
                .body(Body::empty())
                .unwrap(),
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
    ];
    for (request, want, code) in cases {
        let label = format!("{} {}", request.method(), request.uri());
        let (status, _, body) = send(fast(), request).await;
        assert_eq!(status, want, "{label}");
        assert_eq!(body["error"], code, "{label}: {body}");
    }
}

#[tokio::test]
async fn identical_concurrent_generations_are_computed_once() {
    let service = ContentService::new(Duration::from_millis(200));
    let body = r#"{"type":"ad_copy","topic":"sneakers","tone":"playful"}"#;
    let requests = (0..8).map(|_| {
        send(
            app(service.clone()),
            post_json("/v1/content/generate", body),
        )
    });
    let results = futures::future::join_all(requests).await;
    assert_eq!(service.computations(), 1);
    for (status, headers, out) in &results {
        assert_eq!(*status, StatusCode::OK);
        assert_eq!(headers["cache-control"], "no-store");
        assert_eq!(out, &results[0].2);
    }
    assert_eq!(results[0].2["model"], "kingdom-sim-1");

    // Once finished, the same request is computed again (generation is not a cache).
    send(
        app(service.clone()),
        post_json("/v1/content/generate", body),
    )
    .await;
    assert_eq!(service.computations(), 2);
}

#[tokio::test]
async fn generations_whose_requesters_left_are_dropped() {
    let service = ContentService::new(Duration::from_secs(60));
    // Requests for distinct topics, each abandoned by its client mid-generation.
    for i in 0..200 {
        let body = format!(r#"{{"type":"ad_copy","topic":"topic {i}"}}"#);
        let request = tokio::spawn(send(
            app(service.clone()),
            post_json("/v1/content/generate", &body),
        ));
        while service.in_progress() == 0 {
            tokio::task::yield_now().await;
        }
        request.abort();
        assert!(request.await.unwrap_err().is_cancelled());
    }
    assert_eq!(service.in_progress(), 0, "nothing left behind");

    // One of two identical waiters leaving keeps the generation for the other.
    let service = ContentService::new(Duration::from_millis(200));
    let body = r#"{"type":"ad_copy","topic":"shared"}"#;
    let stays = tokio::spawn(send(
        app(service.clone()),
        post_json("/v1/content/generate", body),
    ));
    let leaves = send(
        app(service.clone()),
        post_json("/v1/content/generate", body),
    );
    assert!(tokio::time::timeout(Duration::from_millis(20), leaves)
        .await
        .is_err());
    let (status, _, _) = stays.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(service.computations(), 1);
    assert_eq!(service.in_progress(), 0);
}

#[tokio::test]
async fn batch_accepts_up_to_ten_items() {
    let item = r#"{"type":"social_post","topic":"launch"}"#;
    let batch = |n: usize| format!(r#"{{"items":[{}]}}"#, vec![item; n].join(","));
    let big = || {
        app(ContentService::new(Duration::ZERO))
            .layer(axum::extract::DefaultBodyLimit::max(64 * 1024))
    };

    let (status, _, body) = send(big(), post_json("/v1/content/batch", &batch(10))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["results"].as_array().unwrap().len(), 10);

    let (status, _, body) = send(big(), post_json("/v1/content/batch", &batch(11))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["details"]["items"], "must hold 1 to 10 items (got 11)");

    let mixed = r#"{"items":[{"type":"email","topic":"ok"},{"type":"email"}]}"#;
    let (status, _, body) = send(big(), post_json("/v1/content/batch", mixed)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(body["details"]["items[1]"]["topic"].is_string(), "{body}");
}

#[tokio::test]
async fn fault_injection_fails_requests_but_not_health() {
    let app = finish(
        routes(ContentService::new(Duration::ZERO)),
        "127.0.0.1:9101",
        Faults {
            fail_rate: 1.0,
            latency: Duration::ZERO,
        },
    );
    let (status, headers, body) = send(app.clone(), get("/v1/content/templates")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["error"], "injected_fault");
    assert_eq!(headers["x-instance"], "127.0.0.1:9101");
    assert_eq!(send(app, get("/healthz")).await.0, StatusCode::OK);
}
