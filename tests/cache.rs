//! The response cache over HTTP: what is stored and served, what never is, variants,
//! validation, invalidation, purges, and one upstream fetch for a burst of misses. The
//! origin here answers what each request's query asks for (`cc`: cache-control, `vary`,
//! `cookie`, `etag`, `date`, `ms`: a delay) and counts the requests it receives per URL
//! (`x-origin-request` on each answer, 304s included).

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use common::{addr, client, free_ports, Edge};

/// Requests the origin received, by path and query.
type Counts = Arc<Mutex<HashMap<String, usize>>>;

/// An origin that answers `GET /…?cc=&vary=&cookie=&ms=` as asked: its body names the URL,
/// how many requests for it came so far, and the request's `accept-language`.
async fn origin() -> (SocketAddr, Counts) {
    use axum::extract::{Query, Request};
    let counts: Counts = Default::default();
    let seen = counts.clone();
    let app = axum::Router::new().fallback(
        move |Query(q): Query<HashMap<String, String>>, request: Request| {
            let seen = seen.clone();
            async move {
                let url = request.uri().to_string();
                let n = {
                    let mut seen = seen.lock().unwrap();
                    let n = seen.entry(url.clone()).or_default();
                    *n += 1;
                    *n
                };
                if let Some(ms) = q.get("ms").and_then(|ms| ms.parse().ok()) {
                    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                }
                let language = request
                    .headers()
                    .get("accept-language")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-")
                    .to_string();
                let mut response =
                    axum::response::Response::builder().header("x-origin-request", n);
                if let Some(date) = q.get("date") {
                    response = response.header("date", date);
                }
                if let Some(etag) = q.get("etag") {
                    response = response.header("etag", etag);
                    let matches = request
                        .headers()
                        .get("if-none-match")
                        .is_some_and(|v| v.as_bytes() == etag.as_bytes());
                    if matches {
                        let cc = q.get("cc").cloned().unwrap_or_default();
                        return response
                            .status(304)
                            .header("cache-control", cc)
                            .body(axum::body::Body::empty())
                            .unwrap();
                    }
                }
                if let Some(cc) = q.get("cc") {
                    response = response.header("cache-control", cc);
                }
                if let Some(vary) = q.get("vary") {
                    response = response.header("vary", vary);
                }
                if q.contains_key("cookie") {
                    response = response.header("set-cookie", "session=s1");
                }
                response
                    .body(axum::body::Body::from(format!("{url} #{n} {language}")))
                    .unwrap()
            }
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (address, counts)
}

/// Serves `app` on a loopback ephemeral port: its address and its task.
async fn serve(app: axum::Router) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (address, task)
}

/// A proxy caching everything under `/c` of the origin but DELETEs (route `writes`),
/// nothing elsewhere; 127.0.0.1 is a trusted proxy.
async fn caching_edge(origin: SocketAddr) -> Edge {
    edge_with(&format!(
        "server: {{ trusted_proxies: [127.0.0.1] }}\ncache: {{ memory: 16MiB, max_object: 1MiB }}\npools: {{ origin: {{ backends: [{{ address: {origin} }}] }} }}\nroutes:\n  - {{ name: writes, match: {{ path_prefix: /c, methods: [DELETE] }}, pool: origin }}\n  - {{ name: cached, match: {{ path_prefix: /c }}, pool: origin, cache: {{}} }}\n  - {{ name: plain, pool: origin }}\n"
    ))
    .await
}

/// A proxy with a public and an admin listener on free ports, and `rest` of its config.
async fn edge_with(rest: &str) -> Edge {
    let p = free_ports(2);
    let yaml = format!(
        "listeners: [{{ name: public, address: 127.0.0.1:{} }}]\nadmin: {{ address: 127.0.0.1:{} }}\n{rest}",
        p[0], p[1]
    );
    Edge::start_ready(&yaml, addr(p[0]), addr(p[1])).await
}

/// `/c/<name>?<query>`, the query's values escaped.
fn path(name: &str, query: &[(&str, &str)]) -> String {
    let escape = |v: &str| {
        v.bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    let query: Vec<String> = query
        .iter()
        .map(|(k, v)| format!("{k}={}", escape(v)))
        .collect();
    format!("/c/{name}?{}", query.join("&"))
}

fn received(counts: &Counts, path: &str) -> usize {
    counts.lock().unwrap().get(path).copied().unwrap_or(0)
}

fn header(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
}

#[tokio::test]
async fn a_fresh_response_is_served_from_the_cache_with_its_status() {
    let (origin, counts) = origin().await;
    let edge = caching_edge(origin).await;
    let http = client();
    let fresh = path("fresh", &[("cc", "max-age=60")]);
    let first = http.get(edge.url(&fresh)).send().await.unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(
        header(&first, "cache-status").as_deref(),
        Some("kingdom-edge; fwd=miss; stored")
    );
    let body = first.text().await.unwrap();
    assert!(body.contains(" #1 "), "{body}");
    let second = http.get(edge.url(&fresh)).send().await.unwrap();
    let status = header(&second, "cache-status").unwrap();
    assert!(status.starts_with("kingdom-edge; hit; ttl="), "{status}");
    let ttl: u64 = status.rsplit('=').next().unwrap().parse().unwrap();
    assert!((58..=60).contains(&ttl), "{status}");
    assert!(header(&second, "age").is_some(), "a hit says its age");
    assert!(
        header(&second, "x-request-id").is_some(),
        "hits are decorated too"
    );
    assert_eq!(second.text().await.unwrap(), body, "the stored answer");
    // A HEAD is answered from the GET's entry.
    let head = http.head(edge.url(&fresh)).send().await.unwrap();
    assert!(header(&head, "cache-status").unwrap().contains("; hit;"));
    assert_eq!(received(&counts, &fresh), 1);
    // Another order of the same parameters is the same entry.
    let reordered = format!("{fresh}&");
    let again = http.get(edge.url(&reordered)).send().await.unwrap();
    assert!(header(&again, "cache-status").unwrap().contains("; hit;"));
    // A route without `cache` says nothing of it.
    let plain = http
        .get(edge.url("/other?cc=max-age%3D60"))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&plain, "cache-status"), None);

    let metrics = edge.metrics().await;
    let lookups = |result: &str| {
        common::metric(
            &metrics,
            &format!(r#"kingdom_edge_cache_lookups_total{{result="{result}",route="cached"}}"#),
        )
    };
    assert_eq!((lookups("miss"), lookups("hit")), (1.0, 3.0));
}

#[tokio::test]
async fn what_the_origin_or_the_request_forbids_is_never_stored() {
    let (origin, counts) = origin().await;
    let edge = caching_edge(origin).await;
    let http = client();
    let cases = [
        path("no-store", &[("cc", "no-store, max-age=60")]),
        path("private", &[("cc", "private, max-age=60")]),
        path("cookie", &[("cc", "max-age=60"), ("cookie", "1")]),
        path("vary-star", &[("cc", "max-age=60"), ("vary", "*")]),
        path("silent", &[]),
    ];
    for case in &cases {
        for _ in 0..2 {
            let response = http.get(edge.url(case)).send().await.unwrap();
            assert_eq!(
                header(&response, "cache-status").as_deref(),
                Some("kingdom-edge; fwd=miss"),
                "{case}"
            );
        }
        assert_eq!(received(&counts, case), 2, "{case}");
    }
    // With Authorization, only what the origin declares shared is stored.
    let authorized = |p: &str| http.get(edge.url(p)).bearer_auth("t").send();
    let own = path("auth", &[("cc", "max-age=60")]);
    let shared = path("auth-public", &[("cc", "public, max-age=60")]);
    for _ in 0..2 {
        authorized(&own).await.unwrap();
        authorized(&shared).await.unwrap();
    }
    assert_eq!(received(&counts, &own), 2);
    assert_eq!(received(&counts, &shared), 1);
    // A POST is not looked up.
    let posted = http
        .post(edge.url(&path("fresh", &[("cc", "max-age=60")])))
        .send()
        .await;
    assert_eq!(
        header(&posted.unwrap(), "cache-status").as_deref(),
        Some("kingdom-edge; fwd=method")
    );
}

#[tokio::test]
async fn vary_keeps_one_answer_per_value_of_the_named_headers() {
    let (origin, counts) = origin().await;
    let edge = caching_edge(origin).await;
    let http = client();
    let varied = path(
        "varied",
        &[("cc", "max-age=60"), ("vary", "Accept-Language")],
    );
    let get = |language: &'static str| {
        http.get(edge.url(&varied))
            .header("accept-language", language)
            .send()
    };
    let en = get("en").await.unwrap().text().await.unwrap();
    let fr = get("fr").await.unwrap().text().await.unwrap();
    assert!(en.ends_with(" en") && fr.ends_with(" fr"), "{en} / {fr}");
    let en_again = get("en").await.unwrap();
    assert!(header(&en_again, "cache-status")
        .unwrap()
        .contains("; hit;"));
    assert_eq!(en_again.text().await.unwrap(), en);
    let fr_again = get("fr").await.unwrap();
    assert_eq!(fr_again.text().await.unwrap(), fr);
    assert_eq!(received(&counts, &varied), 2);
}

#[tokio::test]
async fn a_burst_of_identical_misses_reaches_the_upstream_once() {
    let (origin, counts) = origin().await;
    let edge = caching_edge(origin).await;
    let http = client();
    let slow = path("burst", &[("cc", "max-age=60"), ("ms", "300")]);
    let requests: Vec<_> = (0..100)
        .map(|_| tokio::spawn(http.get(edge.url(&slow)).send()))
        .collect();
    let mut bodies = Vec::new();
    let mut collapsed = 0;
    for request in requests {
        let response = request.await.unwrap().unwrap();
        assert_eq!(response.status(), 200);
        if header(&response, "cache-status")
            .unwrap()
            .contains("collapsed")
        {
            collapsed += 1;
        }
        bodies.push(response.text().await.unwrap());
    }
    assert_eq!(received(&counts, &slow), 1, "one fetch for 100 requests");
    assert!(bodies.iter().all(|b| b == &bodies[0]));
    assert!(collapsed > 0, "the waiting requests say so");
    let metrics = edge.metrics().await;
    assert!(common::metric(&metrics, "kingdom_edge_cache_objects") <= 1.0);
}

#[tokio::test]
async fn changes_and_the_admin_api_purge_what_is_stored() {
    let (origin, counts) = origin().await;
    let edge = caching_edge(origin).await;
    let http = client();
    let site = format!("http://{}", edge.proxy);
    let fetch = |p: String| {
        let http = http.clone();
        let url = edge.url(&p);
        async move {
            let response = http.get(url).send().await.unwrap();
            header(&response, "cache-status").unwrap()
        }
    };
    let item = path("item", &[("cc", "max-age=60")]);
    fetch(item.clone()).await;
    assert!(fetch(item.clone()).await.contains("; hit;"));
    // A successful change to the URL drops what is stored for it.
    let changed = http.post(edge.url("/c/item")).send().await.unwrap();
    assert_eq!(changed.status(), 200);
    assert!(fetch(item.clone()).await.contains("fwd=miss"));
    assert_eq!(received(&counts, &item), 2);
    // So does one taken by a route that does not cache.
    assert!(fetch(item.clone()).await.contains("; hit;"));
    let deleted = http.delete(edge.url("/c/item")).send().await.unwrap();
    assert_eq!(header(&deleted, "cache-status"), None, "route `writes`");
    assert!(fetch(item.clone()).await.contains("fwd=miss"));

    let purge = |body: serde_json::Value| {
        http.post(format!("http://{}/cache/purge", edge.admin))
            .json(&body)
            .send()
    };
    let a = path("a", &[("cc", "max-age=60")]);
    let b = path("b", &[("cc", "max-age=60")]);
    fetch(a.clone()).await;
    fetch(b.clone()).await;
    let purged: serde_json::Value = purge(serde_json::json!({ "url": format!("{site}/c/a") }))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(purged["purged"], 1);
    assert!(fetch(a.clone()).await.contains("fwd=miss"));
    assert!(fetch(b.clone()).await.contains("; hit;"));
    let purged: serde_json::Value = purge(serde_json::json!({ "prefix": format!("{site}/c/") }))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(purged["purged"], 3, "a, b and item");
    assert!(fetch(b.clone()).await.contains("fwd=miss"));
    let bad = purge(serde_json::json!({ "url": "x", "prefix": "y" }))
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    // A prefix that is not a URL could only match nothing: refused, not "purged 0".
    let bare = purge(serde_json::json!({ "prefix": "/c/" })).await.unwrap();
    assert_eq!(bare.status(), 400);

    // Purging is not a client's to do.
    let refused = http
        .request(reqwest::Method::from_bytes(b"PURGE").unwrap(), edge.url(&b))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 405);
    assert!(fetch(b.clone()).await.contains("; hit;"));
}

#[tokio::test]
async fn validators_answer_304s_and_revalidate_stale_entries() {
    let (origin, counts) = origin().await;
    let edge = caching_edge(origin).await;
    let http = client();
    // Fresh: a conditional request that matches is answered 304 by the edge. The origin's
    // `Date` (half a minute ago) is kept, on the miss and on the hit.
    let half_a_minute_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(30);
    let date = httpdate::fmt_http_date(half_a_minute_ago);
    let fresh = path(
        "tagged",
        &[("cc", "max-age=60"), ("etag", "\"v1\""), ("date", &date)],
    );
    let miss = http.get(edge.url(&fresh)).send().await.unwrap();
    assert_eq!(header(&miss, "date").unwrap(), date);
    let body = miss.text().await.unwrap();
    let conditional = http
        .get(edge.url(&fresh))
        .header("if-none-match", "\"v1\"")
        .send()
        .await
        .unwrap();
    assert_eq!(conditional.status(), 304);
    let other = http
        .get(edge.url(&fresh))
        .header("if-none-match", "\"v0\"")
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 200);
    assert!(header(&other, "cache-status")
        .unwrap()
        .starts_with("kingdom-edge; hit;"));
    assert_eq!(header(&other, "date").unwrap(), date);
    assert_eq!(other.text().await.unwrap(), body);
    assert_eq!(received(&counts, &fresh), 1);
    // Stored stale (max-age=0): the next request asks the upstream, which confirms it.
    let stale = path("stale", &[("cc", "max-age=0"), ("etag", "\"v1\"")]);
    let first = http.get(edge.url(&stale)).send().await.unwrap();
    assert_eq!(
        header(&first, "cache-status").as_deref(),
        Some("kingdom-edge; fwd=miss; stored")
    );
    let body = first.text().await.unwrap();
    let second = http.get(edge.url(&stale)).send().await.unwrap();
    assert_eq!(second.status(), 200);
    let status = header(&second, "cache-status").unwrap();
    assert!(status.contains("fwd=stale; fwd-status=304"), "{status}");
    // The 304's fields replace the stored ones; the stored validator stays.
    assert_eq!(header(&second, "x-origin-request").unwrap(), "2");
    assert_eq!(header(&second, "etag").unwrap(), "\"v1\"");
    assert_eq!(
        second.text().await.unwrap(),
        body,
        "the stored body, confirmed"
    );
    assert_eq!(received(&counts, &stale), 2);
}

#[tokio::test]
async fn an_answer_cut_mid_body_is_never_stored() {
    use common::Misbehaviour;
    use std::sync::atomic::Ordering;
    // A cacheable 200 promising 100 bytes; 21 come, then the connection closes.
    let (origin, hits) = common::misbehaving_upstream(Misbehaviour::DieCacheable(b'x')).await;
    let edge = caching_edge(origin).await;
    let http = client();
    for attempt in 1..=2 {
        let outcome = match http.get(edge.url("/c/cut")).send().await {
            Ok(response) => response.bytes().await.map(|b| b.len()),
            Err(e) => Err(e),
        };
        assert!(outcome.is_err(), "the client sees the failure: {outcome:?}");
        assert_eq!(
            hits.load(Ordering::SeqCst),
            attempt,
            "not served from the cache"
        );
    }
}

#[tokio::test]
async fn what_shapes_the_answer_is_in_the_key() {
    let (origin, counts) = origin().await;
    let edge = caching_edge(origin).await;
    let http = client();
    // Behind a trusted proxy, the host and scheme it reports reach the upstream: they are
    // part of the key, so one client's cannot be served to another.
    let page = path("page", &[("cc", "max-age=60")]);
    let forwarded = http
        .get(edge.url(&page))
        .header("x-forwarded-host", "evil.example")
        .send()
        .await
        .unwrap();
    assert!(header(&forwarded, "cache-status")
        .unwrap()
        .contains("fwd=miss; stored"));
    let plain = http.get(edge.url(&page)).send().await.unwrap();
    assert!(header(&plain, "cache-status")
        .unwrap()
        .contains("fwd=miss; stored"));
    let https = http
        .get(edge.url(&page))
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .unwrap();
    assert!(header(&https, "cache-status").unwrap().contains("fwd=miss"));
    assert_eq!(received(&counts, &page), 3);
    // A GET with a body is not looked up (the body is not in the key).
    let searched = path("search", &[("cc", "max-age=60")]);
    for _ in 0..2 {
        let response = http
            .get(edge.url(&searched))
            .body("{\"user\":\"alice\"}")
            .send()
            .await
            .unwrap();
        assert!(header(&response, "cache-status")
            .unwrap()
            .starts_with("kingdom-edge; fwd="));
    }
    assert_eq!(received(&counts, &searched), 2);
    // A HEAD first does not store a bodiless answer for the GETs after it.
    let headed = path("headed", &[("cc", "max-age=60")]);
    let head = http.head(edge.url(&headed)).send().await.unwrap();
    assert_eq!(
        header(&head, "cache-status").as_deref(),
        Some("kingdom-edge; fwd=miss")
    );
    let get = http.get(edge.url(&headed)).send().await.unwrap();
    assert!(header(&get, "cache-status").unwrap().contains("stored"));
    assert!(get.text().await.unwrap().contains("/c/headed"));
    let again = http.get(edge.url(&headed)).send().await.unwrap();
    assert!(header(&again, "cache-status").unwrap().contains("; hit;"));
    // Purging is refused in any spelling.
    let refused = http
        .request(
            reqwest::Method::from_bytes(b"purge").unwrap(),
            edge.url(&headed),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 405);
}

#[tokio::test]
async fn a_stale_entry_is_served_while_one_background_fetch_refreshes_it() {
    let (origin, counts) = origin().await;
    let edge = caching_edge(origin).await;
    let http = client();
    // Stale as soon as stored, and may be served stale for a minute while it is refreshed;
    // each fetch takes the origin a second.
    let page = path(
        "swr",
        &[
            ("cc", "max-age=0, stale-while-revalidate=60"),
            ("ms", "1000"),
        ],
    );
    let first = http.get(edge.url(&page)).send().await.unwrap();
    let body = first.text().await.unwrap();
    assert_eq!(received(&counts, &page), 1);
    for _ in 0..5 {
        let stale = http.get(edge.url(&page)).send().await.unwrap();
        let status = header(&stale, "cache-status").unwrap();
        assert_eq!(status, "kingdom-edge; hit; fwd=stale");
        assert_eq!(
            stale.text().await.unwrap(),
            body,
            "the stored answer, at once"
        );
    }
    common::wait_for("the background refresh to reach the origin", || {
        let n = received(&counts, &page);
        async move { (n >= 2).then_some(()) }
    })
    .await;
    assert_eq!(
        received(&counts, &page),
        2,
        "one refresh for the five stale answers"
    );
}

#[tokio::test]
async fn a_stale_entry_answers_an_upstream_5xx_after_the_retries() {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    use axum::routing::get;
    use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
    // An origin whose answer may be served stale for a minute on error, until it fails with
    // the status it is given.
    let failing = Arc::new(AtomicU16::new(0));
    let asked = Arc::new(AtomicUsize::new(0));
    let (fail, count) = (failing.clone(), asked.clone());
    let app = axum::Router::new().route(
        "/c/{name}",
        get(move || {
            let status = fail.load(Ordering::SeqCst);
            count.fetch_add(1, Ordering::SeqCst);
            async move {
                let cc = [("cache-control", "max-age=0, stale-if-error=60")];
                match status {
                    0 => (StatusCode::OK, cc, "good").into_response(),
                    s => (StatusCode::from_u16(s).unwrap(), "broken").into_response(),
                }
            }
        }),
    );
    let (origin, _) = serve(app).await;
    let edge = caching_edge(origin).await;
    let http = client();
    for (name, status) in [("b", 500), ("a", 503)] {
        failing.store(0, Ordering::SeqCst);
        let first = http
            .get(edge.url(&format!("/c/{name}")))
            .send()
            .await
            .unwrap();
        assert_eq!(
            header(&first, "cache-status").unwrap(),
            "kingdom-edge; fwd=miss; stored"
        );
        failing.store(status, Ordering::SeqCst);
        let before = asked.load(Ordering::SeqCst);
        let stale = http
            .get(edge.url(&format!("/c/{name}")))
            .send()
            .await
            .unwrap();
        assert_eq!(stale.status(), 200, "{name}");
        assert_eq!(
            header(&stale, "cache-status").as_deref(),
            Some("kingdom-edge; hit; fwd=stale"),
            "{name}"
        );
        assert_eq!(stale.text().await.unwrap(), "good");
        // The origin was asked first: a 500 once, a 503 again as the retry policy allows
        // (2 retries, within the budget's minimum).
        let tries = asked.load(Ordering::SeqCst) - before;
        assert_eq!(tries, if status == 500 { 1 } else { 3 }, "{name}");
    }
    // Nothing stored to fall back on: the 5xx is the answer.
    failing.store(503, Ordering::SeqCst);
    let plain = http.get(edge.url("/c/never-stored")).send().await.unwrap();
    assert_eq!(plain.status(), 503);
}

#[tokio::test]
async fn a_stale_entry_answers_when_the_pool_is_down() {
    use axum::routing::get;
    // An origin that can be taken down: its answer may be served stale for a minute on error.
    let app = axum::Router::new().route(
        "/c/sie",
        get(|| async { ([("cache-control", "max-age=0, stale-if-error=60")], "good") }),
    );
    let (origin, server) = serve(app).await;
    let edge = caching_edge(origin).await;
    let http = client();
    let first = http.get(edge.url("/c/sie")).send().await.unwrap();
    assert_eq!(
        header(&first, "cache-status").as_deref(),
        Some("kingdom-edge; fwd=miss; stored")
    );
    // The origin goes away: connections are refused.
    server.abort();
    let _ = server.await;
    common::wait_for("the origin to refuse connections", || async move {
        tokio::net::TcpStream::connect(origin)
            .await
            .err()
            .map(|_| ())
    })
    .await;
    let stale = http.get(edge.url("/c/sie")).send().await.unwrap();
    assert_eq!(stale.status(), 200);
    assert_eq!(
        header(&stale, "cache-status").as_deref(),
        Some("kingdom-edge; hit; fwd=stale")
    );
    assert_eq!(stale.text().await.unwrap(), "good");
    // The stale answer said keep-alive, and meant it: the next request, on the same
    // connection, is answered there; without a stale entry to fall back on, the failure
    // shows.
    let mut stream = tokio::net::TcpStream::connect(edge.proxy).await.unwrap();
    let host = edge.proxy;
    let request = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let stale_again = common::ask_on(&mut stream, &request("/c/sie")).await;
    assert!(stale_again.starts_with("HTTP/1.1 200"), "{stale_again}");
    assert!(stale_again.contains("fwd=stale"), "{stale_again}");
    let missing = common::ask_on(&mut stream, &request("/c/other")).await;
    assert!(missing.starts_with("HTTP/1.1 502"), "{missing}");
}

#[tokio::test]
async fn identical_gets_share_one_fetch_when_the_route_coalesces_what_is_not_stored() {
    use axum::routing::get;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::sync::Semaphore;
    // A hot endpoint whose answers are never stored; it answers only as the gate lets it.
    let gate = Arc::new(Semaphore::new(0));
    let asked = Arc::new(AtomicUsize::new(0));
    let handler = {
        let (gate, asked) = (gate.clone(), asked.clone());
        move || {
            let (gate, asked) = (gate.clone(), asked.clone());
            async move {
                let n = asked.fetch_add(1, Ordering::SeqCst) + 1;
                gate.acquire().await.unwrap().forget();
                ([("cache-control", "no-store")], format!("answer {n}"))
            }
        }
    };
    let app = axum::Router::new()
        .route("/hot", get(handler.clone()))
        .route("/plain", get(handler));
    let (origin, _) = serve(app).await;
    // (A flight lasts `lock_timeout`: long enough here for a busy machine to line up the
    // burst behind its gated leader.)
    let edge = edge_with(&format!(
        "cache: {{ lock_timeout: 60s }}\npools: {{ origin: {{ backends: [{{ address: {origin} }}] }} }}\nroutes:\n  - {{ name: hot, match: {{ path_prefix: /hot }}, pool: origin, cache: {{ coalesce_uncacheable: true }} }}\n  - {{ name: plain, match: {{ path_prefix: /plain }}, pool: origin, cache: {{}} }}\n"
    ))
    .await;
    let http = client();
    // Once each: the cache learns that neither answer is stored (hit-for-pass).
    for path in ["/hot", "/plain"] {
        gate.add_permits(1);
        let first = http.get(edge.url(path)).send().await.unwrap();
        assert_eq!(
            header(&first, "cache-status").unwrap(),
            "kingdom-edge; fwd=miss"
        );
    }
    let burst = |path: &'static str, n: usize, cookie: bool| {
        (0..n)
            .map(|_| {
                let mut request = http.get(edge.url(path));
                if cookie {
                    request = request.header("cookie", "session=mine");
                }
                tokio::spawn(request.send())
            })
            .collect::<Vec<_>>()
    };
    // Without the option, each request of a burst goes upstream.
    let before = asked.load(Ordering::SeqCst);
    let plain = burst("/plain", 5, false);
    common::wait_for("5 requests at the origin", || async {
        (asked.load(Ordering::SeqCst) - before == 5).then_some(())
    })
    .await;
    gate.add_permits(5);
    for response in plain {
        assert_eq!(response.await.unwrap().unwrap().status(), 200);
    }
    // With it, 20 identical requests wait for one fetch; one with a cookie (its answer may
    // be personal) fetches for itself.
    let before = asked.load(Ordering::SeqCst);
    // (The plain burst's requests end just after their answers are sent.)
    let in_flight = |n: f64| {
        let edge = &edge;
        async move {
            let now = common::metric(&edge.metrics().await, "kingdom_edge_in_flight");
            (now == n).then_some(())
        }
    };
    common::wait_for("no request in flight", || in_flight(0.0)).await;
    let mut hot = burst("/hot", 20, false);
    hot.extend(burst("/hot", 1, true));
    // (Those first: a leader whose client leaves ends its flight, and its followers
    // fetch for themselves.)
    common::wait_for("21 requests in flight", || in_flight(21.0)).await;
    // And one whose client leaves while it waits: it is let go, not sent upstream.
    let mut leaving = tokio::net::TcpStream::connect(edge.proxy).await.unwrap();
    let request = format!("GET /hot HTTP/1.1\r\nHost: {}\r\n\r\n", edge.proxy);
    tokio::io::AsyncWriteExt::write_all(&mut leaving, request.as_bytes())
        .await
        .unwrap();
    common::wait_for("22 requests in flight", || in_flight(22.0)).await;
    drop(leaving);
    common::wait_for("the leaving client's request to end", || in_flight(21.0)).await;
    common::wait_for("the leader and the cookie at the origin", || async {
        (asked.load(Ordering::SeqCst) - before == 2).then_some(())
    })
    .await;
    gate.add_permits(2);
    let mut bodies = HashMap::new();
    let mut statuses = HashMap::new();
    for response in hot {
        let response = response.await.unwrap().unwrap();
        assert_eq!(response.status(), 200);
        *statuses
            .entry(header(&response, "cache-status").unwrap())
            .or_insert(0) += 1;
        assert!(header(&response, "x-request-id").is_some());
        *bodies.entry(response.text().await.unwrap()).or_insert(0) += 1;
    }
    assert_eq!(asked.load(Ordering::SeqCst) - before, 2, "{bodies:?}");
    assert_eq!(
        statuses["kingdom-edge; fwd=miss; collapsed"], 19,
        "{statuses:?}"
    );
    assert_eq!(statuses["kingdom-edge; fwd=miss"], 2, "{statuses:?}");
    let mut shares: Vec<_> = bodies.values().copied().collect();
    shares.sort();
    assert_eq!(shares, [1, 20], "{bodies:?}");
    edge.wait_metric(
        "kingdom_edge_cache_lookups_total{result=\"collapsed\",route=\"hot\"}",
        19.0,
    )
    .await;
    let metrics = edge.metrics().await;
    assert_eq!(common::metric(&metrics, "kingdom_edge_cache_objects"), 0.0);
    // The access log: a collapsed request went to no backend.
    let collapsed = common::wait_for("the access log lines of the burst", || async {
        let lines: Vec<serde_json::Value> = edge
            .stdout()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .filter(|l: &serde_json::Value| {
                l["route"] == "hot" && l["backend"].is_null() && l["status"] == 200
            })
            .collect();
        (lines.len() == 19).then_some(lines)
    })
    .await;
    for line in collapsed {
        assert_eq!(line["status"], 200);
        assert_eq!(line["pool"], "origin");
        assert_eq!(line["attempts"], 0);
    }
    let left = edge
        .stdout()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["route"] == "hot" && l["status"] == 499)
        .count();
    assert_eq!(left, 1, "the client that left is logged 499");
}

#[tokio::test]
async fn a_stale_entry_answers_when_the_upstream_outlasts_the_total_deadline() {
    use axum::routing::get;
    use std::sync::atomic::{AtomicBool, Ordering};
    // An origin that hangs once told to; its answer may be served stale for a minute on error.
    let hang = Arc::new(AtomicBool::new(false));
    let hanging = hang.clone();
    let app = axum::Router::new().route(
        "/c/slow",
        get(move || {
            let hang = hanging.load(Ordering::SeqCst);
            async move {
                if hang {
                    std::future::pending::<()>().await;
                }
                ([("cache-control", "max-age=0, stale-if-error=60")], "good")
            }
        }),
    );
    let (origin, _) = serve(app).await;
    let edge = edge_with(&format!(
        "pools: {{ origin: {{ backends: [{{ address: {origin} }}], timeouts: {{ total: 300ms }} }} }}\nroutes: [{{ name: cached, pool: origin, cache: {{}} }}]\n"
    ))
    .await;
    let http = client();
    let first = http.get(edge.url("/c/slow")).send().await.unwrap();
    assert_eq!(
        header(&first, "cache-status").unwrap(),
        "kingdom-edge; fwd=miss; stored"
    );
    hang.store(true, Ordering::SeqCst);
    let stale = http.get(edge.url("/c/slow")).send().await.unwrap();
    assert_eq!(stale.status(), 200);
    assert_eq!(
        header(&stale, "cache-status").as_deref(),
        Some("kingdom-edge; hit; fwd=stale")
    );
    assert_eq!(stale.text().await.unwrap(), "good");
}
