//! TLS termination with SNI across several certificates, HTTP/2 to clients, and WebSocket
//! upgrades passing through.

mod common;

use common::{addr, free_ports, Edge};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn terminates_tls_by_sni_and_speaks_http2() {
    let certs = tempfile::tempdir().unwrap();
    let edge_cert = common::self_signed(certs.path(), "edge", &["edge.test"]);
    let api_cert = common::self_signed(certs.path(), "api", &["*.api.test"]);
    let p = free_ports(4);
    let d = certs.path().display();
    let yaml = format!(
        r#"
listeners:
  - {{ name: plain, address: 127.0.0.1:{plain} }}
  - name: tls
    address: 127.0.0.1:{tls}
    tls:
      certificates:
        - {{ cert: {d}/edge.crt, key: {d}/edge.key }}
        - {{ cert: {d}/api.crt, key: {d}/api.key }}
      http2: true
admin: {{ address: 127.0.0.1:{admin} }}
sidecars:
  - {{ name: api, command: kingdom-api, addresses: [127.0.0.1:{api}], env: {{ KINGDOM_API_SECRET: integration-test-secret }} }}
pools: {{ api: {{ backends: [{{ address: 127.0.0.1:{api} }}] }} }}
routes: [{{ name: api, match: {{ path_prefix: /v1 }}, pool: api }}]
"#,
        plain = p[0],
        tls = p[1],
        admin = p[2],
        api = p[3],
    );
    let edge = Edge::start_ready(&yaml, addr(p[0]), addr(p[2])).await;
    let tls = addr(p[1]);

    let client = |http1_only: bool| {
        let mut builder = reqwest::Client::builder()
            .no_proxy()
            .use_rustls_tls()
            .add_root_certificate(reqwest::Certificate::from_pem(edge_cert.as_bytes()).unwrap())
            .add_root_certificate(reqwest::Certificate::from_pem(api_cert.as_bytes()).unwrap())
            .resolve("edge.test", tls)
            .resolve("shop.api.test", tls);
        if http1_only {
            builder = builder.http1_only();
        }
        builder = builder.timeout(std::time::Duration::from_secs(20));
        builder.build().unwrap()
    };

    // Each name gets the certificate that covers it, or verification would fail.
    for host in ["edge.test", "shop.api.test"] {
        let response = client(false)
            .get(format!("https://{host}:{}/v1/echo", p[1]))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{host}: {e:?}"));
        assert_eq!(response.version(), reqwest::Version::HTTP_2, "{host}");
        assert_eq!(response.status(), 200);
        let echo: Value = response.json().await.unwrap();
        assert_eq!(echo["headers"]["x-forwarded-proto"][0], "https");
        assert_eq!(
            echo["headers"]["host"][0],
            format!("{host}:{}", p[1]).as_str(),
            "HTTP/2 :authority becomes Host upstream"
        );
    }

    let response = client(true)
        .get(format!("https://edge.test:{}/v1/echo", p[1]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_11);
    assert_eq!(response.status(), 200);
    // Strict-Transport-Security on TLS listeners only, with the other security headers on
    // both.
    assert_eq!(
        response.headers()["strict-transport-security"],
        "max-age=31536000"
    );
    assert_eq!(response.headers()["x-content-type-options"], "nosniff");
    let plain = common::client()
        .get(edge.url("/v1/echo"))
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status(), 200);
    assert!(plain.headers().get("strict-transport-security").is_none());
    assert_eq!(plain.headers()["x-content-type-options"], "nosniff");

    let status = edge.status().await;
    assert_eq!(status["listeners"][1]["tls"], true);
    assert_eq!(status["listeners"][1]["http2"], true);
}

#[tokio::test]
async fn websocket_upgrades_pass_through() {
    let upstream = common::websocket_echo_upstream().await;
    let p = free_ports(2);
    let yaml = format!(
        r#"
listeners: [{{ name: public, address: 127.0.0.1:{} }}]
admin: {{ address: 127.0.0.1:{} }}
pools: {{ ws: {{ backends: [{{ address: {upstream} }}] }} }}
routes: [{{ name: ws, match: {{ path_prefix: /ws }}, pool: ws }}]
"#,
        p[0], p[1]
    );
    let edge = Edge::start(&yaml, addr(p[0]), addr(p[1])).await;

    let mut stream = common::open_websocket(edge.proxy, "/ws/chat").await;

    // Bytes flow both ways over the upgraded connection.
    stream
        .write_all(b"frames are opaque to the proxy")
        .await
        .unwrap();
    let mut echoed = vec![0u8; 30];
    tokio::time::timeout(common::DEADLINE, stream.read_exact(&mut echoed))
        .await
        .expect("the echo")
        .unwrap();
    assert_eq!(&echoed, b"frames are opaque to the proxy");
}

#[tokio::test]
async fn sticky_cookies_are_secure_on_tls_and_expire_after_their_ttl() {
    let certs = tempfile::tempdir().unwrap();
    let pem = common::self_signed(certs.path(), "edge", &["edge.test"]);
    let upstream = common::fake_upstream("up").await;
    let p = free_ports(2);
    let d = certs.path().display();
    let yaml = format!(
        r#"
listeners:
  - name: tls
    address: 127.0.0.1:{tls}
    tls: {{ certificates: [{{ cert: {d}/edge.crt, key: {d}/edge.key }}] }}
admin: {{ address: 127.0.0.1:{admin} }}
pools:
  app:
    backends: [{{ address: {upstream} }}]
    sticky: {{ cookie: kd, ttl: 1s, secret: integration-sticky-secret }}
routes: [{{ name: app, match: {{ path_prefix: / }}, pool: app }}]
"#,
        tls = p[0],
        admin = p[1],
    );
    let edge = Edge::start(&yaml, addr(p[0]), addr(p[1])).await;
    let client = reqwest::Client::builder()
        .no_proxy()
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap())
        .resolve("edge.test", addr(p[0]))
        .timeout(std::time::Duration::from_secs(20))
        .build()
        .unwrap();
    let url = format!("https://edge.test:{}/ok", p[0]);
    let first = common::wait_for("the TLS listener to answer", || {
        let request = client.get(&url).send();
        async move { request.await.ok() }
    })
    .await;
    let set = first.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(set.ends_with("; Secure"), "{set}");
    let cookie = set.split(';').next().unwrap().to_string();

    // Once its second has passed, the cookie is refused as expired and replaced.
    common::wait_for("the cookie to expire", || {
        let request = client.get(&url).header("cookie", &cookie).send();
        let metrics = edge.metrics();
        async move {
            request.await.ok()?;
            let expired = common::metric(
                &metrics.await,
                r#"kingdom_edge_sticky_invalid_total{pool="app",reason="expired"}"#,
            );
            (expired >= 1.0).then_some(())
        }
    })
    .await;
    let after = client
        .get(&url)
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    let new = after
        .headers()
        .get("set-cookie")
        .map(|v| v.to_str().unwrap().to_string());
    assert!(
        new.is_some_and(|c| !c.starts_with(&format!("{cookie};"))),
        "an expired pin gets a new cookie"
    );
}
