//! Edge protection over HTTP: bearer tokens verified at the edge, rate limits and their
//! headers, slow-down, overload shedding, route validation, security headers and CORS.

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use common::{addr, client, free_ports, Edge};
use kingdom_edge::token::{Claims, TokenKey};
use serde_json::{json, Value};

const SECRET: &str = "integration-test-secret";

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A proxy in front of one kingdom-api sidecar, with `routes` (YAML list entries, each
/// `- { ... }` on its own line, pool `api`) and the extra top-level `sections`.
async fn api_edge(routes: &str, sections: &str) -> Edge {
    let p = free_ports(3);
    let yaml = format!(
        "listeners: [{{ name: public, address: 127.0.0.1:{} }}]\nadmin: {{ address: 127.0.0.1:{} }}\nsidecars:\n  - {{ name: api, command: kingdom-api, addresses: [127.0.0.1:{api}], env: {{ KINGDOM_API_SECRET: {SECRET} }} }}\npools:\n  api: {{ backends: [{{ address: 127.0.0.1:{api} }}] }}\ntokens: {{ secret: {SECRET} }}\n{sections}routes:\n{routes}",
        p[0],
        p[1],
        api = p[2],
    );
    Edge::start_ready(&yaml, addr(p[0]), addr(p[1])).await
}

/// A token kingdom-api would issue for `user`, valid from `iat` to `exp`.
fn token(user: &str, iat: u64, exp: u64) -> String {
    TokenKey::new(SECRET.as_bytes()).unwrap().sign(&Claims {
        sub: user.into(),
        iat,
        exp,
    })
}

#[tokio::test]
async fn tokens_are_verified_at_the_edge_and_only_their_subject_reaches_the_upstream() {
    let edge = api_edge(
        "  - { name: login, match: { path_prefix: /v1/auth }, pool: api }\n  - { name: open, match: { host: open.test, path_prefix: /v1/echo }, pool: api }\n  - { name: private, match: { path_prefix: /v1/echo }, pool: api, auth: required }\n  - { name: maybe, match: { path_prefix: /v1/analytics }, pool: api, auth: optional }\n",
        "",
    )
    .await;
    let http = client();
    // A token issued by kingdom-api through the edge.
    let issued: Value = http
        .post(edge.url("/v1/auth/token"))
        .json(&json!({ "user_id": "ada" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let good = issued["token"].as_str().unwrap().to_string();
    let echo = |token: Option<&str>| {
        let mut request = http
            .get(edge.url("/v1/echo"))
            .header("x-user-id", "mallory");
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };

    let response = echo(Some(&good)).await.unwrap();
    assert_eq!(response.status(), 200);
    let seen: Value = response.json().await.unwrap();
    assert_eq!(seen["headers"]["x-user-id"], json!(["ada"]), "{seen}");

    let missing = echo(None).await.unwrap();
    assert_eq!(missing.status(), 401);
    assert_eq!(
        missing.headers()["www-authenticate"],
        "Bearer realm=\"kingdom-edge\""
    );
    let body: Value = missing.json().await.unwrap();
    assert_eq!(body["error"], "unauthorized");
    let now = unix_now();
    let bad = [
        format!("{good}x"),
        token("ada", now - 7200, now - 3600),
        TokenKey::new(b"another-secret-of-16-bytes")
            .unwrap()
            .sign(&Claims {
                sub: "ada".into(),
                iat: now,
                exp: now + 60,
            }),
        "not-a-token".to_string(),
    ];
    for token in &bad {
        let refused = echo(Some(token)).await.unwrap();
        assert_eq!(refused.status(), 401, "{token}");
        assert!(refused.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("invalid_token"));
    }
    // Within the clock skew (30 s by default), a token just expired still passes.
    let just_expired = token("ada", now - 60, now - 5);
    assert_eq!(echo(Some(&just_expired)).await.unwrap().status(), 200);

    // Optional: no token is fine, a bad one is not.
    let summary = edge.url("/v1/analytics/summary?days=1");
    assert_eq!(http.get(&summary).send().await.unwrap().status(), 200);
    let refused = http
        .get(&summary)
        .bearer_auth(&bad[0])
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);

    // A route without `auth` never forwards a client's `x-user-id` either.
    let open: Value = http
        .get(edge.url("/v1/echo"))
        .header("host", "open.test")
        .header("x-user-id", "mallory")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(open["headers"].get("x-user-id").is_none(), "{open}");

    let metrics = edge.metrics().await;
    assert_eq!(
        common::metric(
            &metrics,
            r#"kingdom_edge_rejected_total{reason="unauthorized",route="private"}"#
        ),
        5.0
    );
}
