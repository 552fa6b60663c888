//! Request hygiene, byte for byte: each rule is tried with the raw request an attacker or a
//! sloppy client would send, checking the status, whether the connection stays open, and
//! what the upstream received.

mod common;

use std::net::SocketAddr;

use common::{addr, free_ports, Edge};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An upstream that answers every request with the request head it received (and its
/// body) as the body, plus hop-by-hop headers no client may see.
async fn capturing_upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(echo_requests(stream));
        }
    });
    address
}

async fn echo_requests(mut stream: TcpStream) {
    let mut buf = Vec::new();
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if !read_more(&mut stream, &mut buf).await {
                return;
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let chunked = head.contains("transfer-encoding: chunked");
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .map_or(0, |v| v.trim().parse().unwrap());
        let end = loop {
            let body = &buf[head_end..];
            let done = match chunked {
                true => body
                    .windows(5)
                    .position(|w| w == b"0\r\n\r\n")
                    .map(|i| head_end + i + 5),
                false => (body.len() >= length).then_some(head_end + length),
            };
            if let Some(end) = done {
                break end;
            }
            if !read_more(&mut stream, &mut buf).await {
                return;
            }
        };
        let echoed: Vec<u8> = buf.drain(..end).collect();
        let mut answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nkeep-alive: timeout=5\r\nconnection: keep-alive, x-secret\r\nx-secret: 1\r\nproxy-connection: keep-alive\r\ntrailer: x-t\r\nupgrade: h2c\r\n\r\n",
            echoed.len()
        )
        .into_bytes();
        answer.extend_from_slice(&echoed);
        if stream.write_all(&answer).await.is_err() {
            return;
        }
    }
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 8192];
    match stream.read(&mut chunk).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
    }
}

/// A proxy with a protected route `/limited` (1 KiB bodies), routes for escaped slashes,
/// and a catch-all, all to `upstream`.
async fn edge(upstream: SocketAddr) -> Edge {
    let p = free_ports(2);
    let yaml = format!(
        r#"
listeners:
  - {{ name: public, address: 127.0.0.1:{proxy}, default_host: edge.internal }}
admin: {{ address: 127.0.0.1:{admin} }}
server:
  request_limits: {{ request_line: 1KiB, header: 1KiB, headers: 4KiB, header_count: 20 }}
pools:
  app:
    backends: [{{ address: {upstream} }}]
routes:
  - {{ name: admin, match: {{ host: admin.example, path_prefix: / }}, pool: app, max_body: 1KiB }}
  - {{ name: limited, match: {{ path_prefix: /limited }}, pool: app, max_body: 1KiB }}
  - {{ name: kept, match: {{ path_prefix: /kept }}, pool: app, escaped_slashes: keep }}
  - {{ name: decoded, match: {{ path_prefix: /decoded }}, pool: app, escaped_slashes: decode }}
  - name: big-headers
    match: {{ path_prefix: /big }}
    pool: app
    request_limits: {{ header: 4KiB }}
  - {{ name: app, match: {{ path_prefix: / }}, pool: app }}
"#,
        proxy = p[0],
        admin = p[1],
    );
    Edge::start_ready(&yaml, addr(p[0]), addr(p[1])).await
}

/// Everything the proxy answers to `request` until it closes the connection (which it
/// must, within the deadline: the request asks for it, or is refused).
async fn exchange(proxy: SocketAddr, request: &[u8]) -> String {
    common::raw_exchange(proxy, request).await
}

fn status(answer: &str) -> u16 {
    answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"))
}

/// The request line the upstream received, from the echoed body.
fn forwarded_line(answer: &str) -> &str {
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    body.lines().next().unwrap_or("")
}

/// A header the upstream received, from the echoed body.
fn forwarded_header<'a>(answer: &'a str, name: &str) -> Option<&'a str> {
    let body = answer.split_once("\r\n\r\n")?.1;
    let head = body.split("\r\n\r\n").next()?;
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn get(target: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\nHost: edge.test\r\nConnection: close\r\n\r\n").into_bytes()
}

#[tokio::test]
async fn every_spelling_of_a_protected_path_gets_its_routes_policy() {
    let edge = edge(capturing_upstream().await).await;
    let body = "x".repeat(2048);
    for spelling in [
        "/limited/x",
        "/%6cimited/x",
        "/%6C%69mited/x",
        "//limited/x",
        "/limited//x",
        "/limited;p=1/x",
        "/limited;/x",
        "/;/limited/x",
        "/;x=1/;/limited",
    ] {
        let post = format!(
            "POST {spelling} HTTP/1.1\r\nHost: edge.test\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let answer = exchange(edge.proxy, post.as_bytes()).await;
        assert_eq!(status(&answer), 413, "{spelling}: {answer}");
    }
    // The upstream receives the path that was routed.
    for (spelling, forwarded) in [
        ("/%6cimited/x?q=%41", "GET /limited/x?q=%41 HTTP/1.1"),
        ("//limited///x", "GET /limited/x HTTP/1.1"),
        ("/a%3ab%7e", "GET /a%3Ab~ HTTP/1.1"),
    ] {
        let answer = exchange(edge.proxy, &get(spelling)).await;
        assert_eq!(status(&answer), 200, "{spelling}: {answer}");
        assert_eq!(forwarded_line(&answer), forwarded, "{spelling}");
    }
}

#[tokio::test]
async fn unsafe_targets_get_400_and_the_connection_is_closed() {
    let edge = edge(capturing_upstream().await).await;
    for target in [
        "a",
        "?q=1",
        "*",
        "ftp://edge.test/x",
        "/a/../limited",
        "/a/%2e%2e/limited",
        "/public/..;/limited",
        "/a%00b",
        "/a?q=%00",
        "/a%zz",
        "/limited%2Fx",
        "/limited%5cx",
        "/decoded%2F..%2Flimited",
        "/decoded%2F%2E%2E%2Flimited",
        "/decoded/x%2F..%2F..%2Flimited",
        "/kept/a%2F..%2F..%2Flimited",
    ] {
        let answer = exchange(edge.proxy, &get(target)).await;
        assert_eq!(status(&answer), 400, "{target}: {answer}");
        assert!(
            answer.contains("\"error\":\"bad_request\""),
            "{target}: {answer}"
        );
        assert!(answer.contains("connection: close") || answer.contains("Connection: close"));
    }
}

#[tokio::test]
async fn escaped_slashes_follow_the_routes_rule() {
    let edge = edge(capturing_upstream().await).await;
    let kept = exchange(edge.proxy, &get("/kept/a%2fb")).await;
    assert_eq!(status(&kept), 200, "{kept}");
    assert_eq!(forwarded_line(&kept), "GET /kept/a%2Fb HTTP/1.1");
    let decoded = exchange(edge.proxy, &get("/decoded/a%2Fb%5Cc")).await;
    assert_eq!(status(&decoded), 200, "{decoded}");
    assert_eq!(forwarded_line(&decoded), "GET /decoded/a/b/c HTTP/1.1");
    // Decoded into another route's path: refused rather than moved.
    let moved = exchange(edge.proxy, &get("/decoded%2F..%2Flimited")).await;
    assert_eq!(status(&moved), 400, "{moved}");
}

#[tokio::test]
async fn request_target_forms_follow_rfc_9112() {
    let edge = edge(capturing_upstream().await).await;
    // Absolute-form: forwarded in origin-form, its authority the Host.
    let absolute = exchange(
        edge.proxy,
        b"GET http://Shop.Example:8080/x?y=1 HTTP/1.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&absolute), 200, "{absolute}");
    assert_eq!(forwarded_line(&absolute), "GET /x?y=1 HTTP/1.1");
    assert_eq!(
        forwarded_header(&absolute, "host"),
        Some("Shop.Example:8080")
    );
    // Asterisk-form is for OPTIONS only, and answered by the edge.
    let options = exchange(
        edge.proxy,
        b"OPTIONS * HTTP/1.1\r\nHost: edge.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&options), 200, "{options}");
    assert!(
        options.to_ascii_lowercase().contains("allow: get, head"),
        "{options}"
    );
    assert_eq!(forwarded_line(&options), "", "not sent upstream");
}

#[tokio::test]
async fn hosts_are_validated_required_and_defaulted_for_http_1_0() {
    let edge = edge(capturing_upstream().await).await;
    for host in [
        "a b/c",
        "evil.example/x",
        "a<script>",
        "h:99999",
        "h:0",
        "[::1",
    ] {
        let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let answer = exchange(edge.proxy, request.as_bytes()).await;
        assert_eq!(status(&answer), 400, "{host}: {answer}");
    }
    let missing = exchange(edge.proxy, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status(&missing), 400, "{missing}");
    let old = exchange(edge.proxy, b"GET /x HTTP/1.0\r\n\r\n").await;
    assert_eq!(status(&old), 200, "{old}");
    assert_eq!(forwarded_header(&old, "host"), Some("edge.internal"));
    let twice = exchange(
        edge.proxy,
        b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&twice), 400, "{twice}");
}

#[tokio::test]
async fn only_one_chunked_transfer_coding_is_accepted() {
    let edge = edge(capturing_upstream().await).await;
    let gzip = exchange(
        edge.proxy,
        b"POST / HTTP/1.1\r\nHost: edge.test\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status(&gzip), 501, "{gzip}");
    let identity = exchange(
        edge.proxy,
        b"POST / HTTP/1.1\r\nHost: edge.test\r\nTransfer-Encoding: identity\r\n\r\n",
    )
    .await;
    assert_eq!(status(&identity), 501, "{identity}");
    let twice = exchange(
        edge.proxy,
        b"POST / HTTP/1.1\r\nHost: edge.test\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status(&twice), 400, "{twice}");
    let chunked = exchange(
        edge.proxy,
        b"POST / HTTP/1.1\r\nHost: edge.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status(&chunked), 200, "{chunked}");
    assert!(chunked.ends_with("3\r\nabc\r\n0\r\n\r\n"), "{chunked}");
    // A chunk-size line must end in CRLF.
    let bare_lf = exchange(
        edge.proxy,
        b"POST / HTTP/1.1\r\nHost: edge.test\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status(&bare_lf), 400, "{bare_lf}");
}

#[tokio::test]
async fn oversized_heads_get_414_and_431_with_per_route_overrides() {
    let edge = edge(capturing_upstream().await).await;
    let long_target = format!("/{}", "a".repeat(1100));
    let answer = exchange(edge.proxy, &get(&long_target)).await;
    assert_eq!(status(&answer), 414, "{answer}");
    let field = "v".repeat(2000);
    let big = |path: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: edge.test\r\nX-Big: {field}\r\nConnection: close\r\n\r\n"
        )
    };
    let answer = exchange(edge.proxy, big("/").as_bytes()).await;
    assert_eq!(status(&answer), 431, "{answer}");
    assert!(
        answer.contains("\"error\":\"headers_too_large\""),
        "{answer}"
    );
    // The route that allows 4 KiB fields takes it.
    let answer = exchange(edge.proxy, big("/big").as_bytes()).await;
    assert_eq!(status(&answer), 200, "{answer}");
    let many: String = (0..25).map(|i| format!("X-H{i}: 1\r\n")).collect();
    let request = format!("GET / HTTP/1.1\r\nHost: edge.test\r\n{many}Connection: close\r\n\r\n");
    let answer = exchange(edge.proxy, request.as_bytes()).await;
    assert_eq!(status(&answer), 431, "{answer}");
}

#[tokio::test]
async fn hop_by_hop_headers_of_the_upstream_never_reach_the_client() {
    let edge = edge(capturing_upstream().await).await;
    let answer = exchange(edge.proxy, &get("/x")).await;
    assert_eq!(status(&answer), 200, "{answer}");
    let head = answer
        .split("\r\n\r\n")
        .next()
        .unwrap()
        .to_ascii_lowercase();
    for name in [
        "keep-alive:",
        "x-secret:",
        "proxy-connection:",
        "trailer:",
        "upgrade:",
    ] {
        assert!(!head.contains(name), "{name} reached the client: {head}");
    }
}

#[tokio::test]
async fn expect_100_continue_is_answered_by_the_edge() {
    let edge = edge(capturing_upstream().await).await;
    let mut stream = TcpStream::connect(edge.proxy).await.unwrap();
    stream
        .write_all(b"POST /x HTTP/1.1\r\nHost: edge.test\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
        .await
        .unwrap();
    let mut interim = [0u8; 25];
    tokio::time::timeout(common::DEADLINE, stream.read_exact(&mut interim))
        .await
        .expect("an interim answer")
        .unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    stream.write_all(b"abc").await.unwrap();
    let answer = read_answer(&mut stream).await;
    assert_eq!(status(&answer), 200, "{answer}");
    assert_eq!(
        forwarded_header(&answer, "expect"),
        None,
        "the upstream is not asked"
    );
    assert!(answer.ends_with("abc"), "{answer}");
    // The connection stays usable.
    stream.write_all(&get("/again")).await.unwrap();
    let again = read_answer(&mut stream).await;
    assert_eq!(forwarded_line(&again), "GET /again HTTP/1.1");

    // Over the route's limit: 413 at once, no 100.
    let answer = exchange(
        edge.proxy,
        b"POST /limited HTTP/1.1\r\nHost: edge.test\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n",
    )
    .await;
    assert_eq!(status(&answer), 413, "{answer}");
    let answer = exchange(
        edge.proxy,
        b"GET / HTTP/1.1\r\nHost: edge.test\r\nExpect: teapot\r\n\r\n",
    )
    .await;
    assert_eq!(status(&answer), 417, "{answer}");
}

/// Reads one answer with a `content-length` from `stream`.
async fn read_answer(stream: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let read = async {
        loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .map_or(0, |v| v.trim().parse().unwrap());
                if buf.len() >= i + 4 + length {
                    return String::from_utf8_lossy(&buf[..i + 4 + length]).into_owned();
                }
            }
            assert!(read_more(stream, &mut buf).await, "closed mid-answer");
        }
    };
    tokio::time::timeout(common::DEADLINE, read)
        .await
        .expect("an answer in time")
}

#[tokio::test]
async fn pipelined_requests_are_all_answered_in_order() {
    let edge = edge(capturing_upstream().await).await;
    let answer = exchange(
        edge.proxy,
        b"GET /1 HTTP/1.1\r\nHost: edge.test\r\n\r\nPOST /2 HTTP/1.1\r\nHost: edge.test\r\nContent-Length: 2\r\n\r\nhiGET /3 HTTP/1.1\r\nHost: edge.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    let lines: Vec<&str> = answer
        .split("\r\n")
        .filter(|l| l.starts_with("GET /") || l.starts_with("POST /"))
        .collect();
    assert_eq!(answer.matches("HTTP/1.1 200 OK").count(), 3, "{answer}");
    assert_eq!(
        lines,
        ["GET /1 HTTP/1.1", "POST /2 HTTP/1.1", "GET /3 HTTP/1.1"]
    );
}

#[tokio::test]
async fn a_host_with_a_trailing_dot_is_the_same_host() {
    let edge = edge(capturing_upstream().await).await;
    let body = "x".repeat(2048);
    for host in ["admin.example", "ADMIN.example.", "admin.example.:80"] {
        let post = format!(
            "POST /x HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let answer = exchange(edge.proxy, post.as_bytes()).await;
        assert_eq!(status(&answer), 413, "{host}: {answer}");
    }
}

#[tokio::test]
async fn what_clients_really_send_is_accepted_and_forwarded_cleanly() {
    let edge = edge(capturing_upstream().await).await;
    // Browsers leave a lone `%` in queries alone.
    let answer = exchange(edge.proxy, &get("/q?discount=100%")).await;
    assert_eq!(status(&answer), 200, "{answer}");
    assert_eq!(forwarded_line(&answer), "GET /q?discount=100% HTTP/1.1");
    // The target limit holds the client to what it sent, not to its escaped form.
    let quotes = format!("/x/{}", "\"".repeat(900));
    let answer = exchange(edge.proxy, &get(&quotes)).await;
    assert_eq!(status(&answer), 200, "{answer}");
    // Identical lengths are forwarded as one.
    let answer = exchange(
        edge.proxy,
        b"POST /x HTTP/1.1\r\nHost: edge.test\r\nContent-Length: 3, 3\r\nConnection: close\r\n\r\nabc",
    )
    .await;
    assert_eq!(status(&answer), 200, "{answer}");
    assert_eq!(forwarded_header(&answer, "content-length"), Some("3"));
    // An empty port is the default one.
    let answer = exchange(
        edge.proxy,
        b"GET / HTTP/1.1\r\nHost: edge.test:\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&answer), 200, "{answer}");
}

/// A proxy with a plain and a TLS listener and these `server:` settings; returns the TLS
/// address and the certificate's PEM.
async fn edge_with_tls(
    upstream: SocketAddr,
    server: &str,
) -> (Edge, SocketAddr, String, tempfile::TempDir) {
    let certs = tempfile::tempdir().unwrap();
    let pem = common::self_signed(certs.path(), "edge", &["edge.test"]);
    let p = free_ports(3);
    let yaml = format!(
        r#"
listeners:
  - {{ name: public, address: 127.0.0.1:{proxy} }}
  - name: tls
    address: 127.0.0.1:{tls}
    tls: {{ certificates: [{{ cert: {d}/edge.crt, key: {d}/edge.key }}] }}
admin: {{ address: 127.0.0.1:{admin} }}
server: {{ {server} }}
pools:
  app:
    backends: [{{ address: {upstream} }}]
routes:
  - {{ name: app, match: {{ path_prefix: / }}, pool: app }}
"#,
        proxy = p[0],
        tls = p[1],
        admin = p[2],
        d = certs.path().display(),
    );
    let edge = Edge::start_ready(&yaml, addr(p[0]), addr(p[2])).await;
    (edge, addr(p[1]), pem, certs)
}

/// A proxy whose client timeouts are all 1 s, with a TLS listener beside the plain one.
async fn impatient_edge(upstream: SocketAddr) -> (Edge, SocketAddr, tempfile::TempDir) {
    let timeouts = "client_header_timeout: 1s, client_body_timeout: 1s, keepalive_timeout: 1s, tls_handshake_timeout: 1s";
    let (edge, tls, _, certs) = edge_with_tls(upstream, timeouts).await;
    (edge, tls, certs)
}

/// Reads until the proxy closes `stream` (bounded by the deadline); returns what came.
async fn until_closed(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let read = tokio::time::timeout(common::DEADLINE, stream.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "the proxy kept the connection open");
    String::from_utf8_lossy(&out).into_owned()
}

async fn client_timeouts(edge: &Edge, phase: &str) -> f64 {
    let series = format!("kingdom_edge_client_timeouts_total{{phase=\"{phase}\"}}");
    common::metric(&edge.metrics().await, &series)
}

#[tokio::test]
async fn a_client_dripping_its_header_is_cut_off_with_408() {
    let (edge, _, _certs) = impatient_edge(capturing_upstream().await).await;
    let mut stream = TcpStream::connect(edge.proxy).await.unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    // One byte every 200 ms: each read is quick, the header never ends.
    let drip = async {
        for byte in b"X-Slow: ".iter().cycle() {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            if stream.write_all(&[*byte]).await.is_err() {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(common::DEADLINE, drip).await;
    let answer = until_closed(&mut stream).await;
    assert_eq!(status(&answer), 408, "{answer}");
    assert!(answer.contains("\"error\":\"request_timeout\""), "{answer}");
    assert_eq!(client_timeouts(&edge, "header").await, 1.0);
}

#[tokio::test]
async fn idle_connections_are_closed_after_keepalive_timeout() {
    let (edge, _, _certs) = impatient_edge(capturing_upstream().await).await;
    // Kept alive after a request, then idle.
    let mut used = TcpStream::connect(edge.proxy).await.unwrap();
    used.write_all(b"GET /x HTTP/1.1\r\nHost: edge.test\r\n\r\n")
        .await
        .unwrap();
    let answer = read_answer(&mut used).await;
    assert!(answer.contains("Connection: keep-alive"), "{answer}");
    assert_eq!(until_closed(&mut used).await, "");
    // Opened and never used.
    let mut silent = TcpStream::connect(edge.proxy).await.unwrap();
    assert_eq!(until_closed(&mut silent).await, "");
    assert_eq!(client_timeouts(&edge, "keepalive").await, 2.0);
}

#[tokio::test]
async fn a_stalled_request_body_gets_408() {
    let (edge, _, _certs) = impatient_edge(capturing_upstream().await).await;
    let mut stream = TcpStream::connect(edge.proxy).await.unwrap();
    stream
        .write_all(b"POST /x HTTP/1.1\r\nHost: edge.test\r\nContent-Length: 10\r\n\r\nabc")
        .await
        .unwrap();
    let answer = until_closed(&mut stream).await;
    assert_eq!(status(&answer), 408, "{answer}");
    assert_eq!(client_timeouts(&edge, "body").await, 1.0);
}

#[tokio::test]
async fn a_stalled_tls_handshake_is_closed() {
    let (edge, tls, _certs) = impatient_edge(capturing_upstream().await).await;
    let mut stream = TcpStream::connect(tls).await.unwrap();
    // A ClientHello's first bytes, then nothing.
    stream.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    assert_eq!(until_closed(&mut stream).await, "");
    common::wait_for("the handshake timeout to be counted", || {
        let edge = &edge;
        async move { (client_timeouts(edge, "tls_handshake").await == 1.0).then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn the_connection_cap_refuses_new_connections_and_spares_open_ones() {
    let upstream = capturing_upstream().await;
    let p = free_ports(2);
    let yaml = format!(
        "server: {{ max_connections: 3 }}\nlisteners: [{{ name: public, address: 127.0.0.1:{} }}]\nadmin: {{ address: 127.0.0.1:{} }}\npools:\n  app:\n    backends: [{{ address: {upstream} }}]\nroutes: [{{ name: app, match: {{ path_prefix: / }}, pool: app }}]\n",
        p[0], p[1]
    );
    let edge = Edge::start_ready(&yaml, addr(p[0]), addr(p[1])).await;
    let request = b"GET /x HTTP/1.1\r\nHost: edge.test\r\n\r\n";
    let metric = |name: &'static str| {
        let edge = &edge;
        async move { common::metric(&edge.metrics().await, name) }
    };
    common::wait_for("earlier probes' connections to close", || async {
        (metric("kingdom_edge_client_connections").await == 0.0).then_some(())
    })
    .await;
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut stream = TcpStream::connect(edge.proxy).await.unwrap();
        stream.write_all(request).await.unwrap();
        assert_eq!(status(&read_answer(&mut stream).await), 200);
        open.push(stream);
    }
    // The fourth is accepted by the kernel, then closed at once.
    let mut refused = TcpStream::connect(edge.proxy).await.unwrap();
    let _ = refused.write_all(request).await;
    assert_eq!(until_closed(&mut refused).await, "");
    assert_eq!(metric("kingdom_edge_connections_refused_total").await, 1.0);
    // The open ones are unaffected.
    for stream in &mut open {
        stream.write_all(request).await.unwrap();
        assert_eq!(status(&read_answer(stream).await), 200);
    }
    // A slot freed is a slot for a new client.
    drop(open.pop());
    common::wait_for("the closed connection to be counted", || async {
        (metric("kingdom_edge_client_connections").await == 2.0).then_some(())
    })
    .await;
    let mut next = TcpStream::connect(edge.proxy).await.unwrap();
    next.write_all(request).await.unwrap();
    assert_eq!(status(&read_answer(&mut next).await), 200);
}

/// A proxy with a plain listener that also speaks HTTP/2 with prior knowledge (`h2c`), and
/// short client timeouts.
async fn h2c_edge(upstream: SocketAddr) -> Edge {
    let p = free_ports(2);
    let yaml = format!(
        r#"
listeners: [{{ name: internal, address: 127.0.0.1:{proxy}, h2c: true }}]
admin: {{ address: 127.0.0.1:{admin} }}
server: {{ keepalive_timeout: 1s, client_header_timeout: 1s }}
pools:
  app:
    backends: [{{ address: {upstream} }}]
routes:
  - {{ name: app, match: {{ path_prefix: / }}, pool: app }}
"#,
        proxy = p[0],
        admin = p[1],
    );
    Edge::start_ready(&yaml, addr(p[0]), addr(p[1])).await
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame: length 0, type 4, no flags, stream 0.
const H2_SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];

/// The frame types in `bytes`, a sequence of HTTP/2 frames.
fn h2_frame_types(mut bytes: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    while bytes.len() >= 9 {
        let length = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
        types.push(bytes[3]);
        bytes = &bytes[(9 + length).min(bytes.len())..];
    }
    types
}

#[tokio::test]
async fn an_h2c_listener_serves_http2_with_prior_knowledge_and_http1_alike() {
    let edge = h2c_edge(capturing_upstream().await).await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let response = h2.get(edge.url("/over-h2")).send().await.unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    assert!(response
        .text()
        .await
        .unwrap()
        .starts_with("GET /over-h2 HTTP/1.1"));
    // HTTP/1.1 on the same listener, and a request shorter than the HTTP/2 preface.
    let answer = exchange(
        edge.proxy,
        b"GET /over-h1 HTTP/1.1\r\nHost: edge.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&answer), 200, "{answer}");
    let answer = exchange(edge.proxy, b"GET / HTTP/1.0\r\n\r\n").await;
    assert_eq!(status(&answer), 200, "{answer}");
    // A client that stops inside the preface is cut off at the header deadline.
    let mut stream = TcpStream::connect(edge.proxy).await.unwrap();
    stream.write_all(b"PRI * HT").await.unwrap();
    assert_eq!(until_closed(&mut stream).await, "");
    assert_eq!(client_timeouts(&edge, "header").await, 1.0);
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_with_goaway() {
    let edge = h2c_edge(capturing_upstream().await).await;
    let mut stream = TcpStream::connect(edge.proxy).await.unwrap();
    stream.write_all(H2_PREFACE).await.unwrap();
    stream.write_all(H2_SETTINGS).await.unwrap();
    let mut out = Vec::new();
    let read = tokio::time::timeout(common::DEADLINE, stream.read_to_end(&mut out)).await;
    assert!(
        read.is_ok(),
        "the proxy kept an idle HTTP/2 connection open"
    );
    let types = h2_frame_types(&out);
    assert_eq!(types.first(), Some(&4), "SETTINGS first: {types:?}");
    assert_eq!(types.last(), Some(&7), "GOAWAY last: {types:?}");
    assert_eq!(client_timeouts(&edge, "h2_idle").await, 1.0);
}

/// Resident bytes of process `pid`.
fn resident_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

/// How many established connections to local `port` the kernel holds, and how many of
/// them have bytes the process has not read yet.
fn server_side_sockets(port: u16) -> (usize, usize) {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let local = format!(":{port:04X}");
    let (mut open, mut unread) = (0, 0);
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() > 4 && fields[1].ends_with(&local) && fields[3] == "01" {
            open += 1;
            let rx_queue = fields[4].split(':').nth(1).unwrap_or("0");
            if u64::from_str_radix(rx_queue, 16).unwrap_or(0) > 0 {
                unread += 1;
            }
        }
    }
    (open, unread)
}

#[tokio::test]
async fn connections_stuck_mid_header_hold_no_more_than_what_they_sent() {
    // 200 clients each send 12 KiB of a header that never ends (under the 32 KiB limit).
    // Once the proxy has read every byte, what it holds per connection is about what the
    // client sent: no buffer of Pingora's own beyond the header buffer.
    const CLIENTS: usize = 200;
    const SENT: usize = 12 * 1024;
    let edge = common::edge_for_pool(&[capturing_upstream().await], &[]).await;
    for _ in 0..20 {
        let answer = exchange(
            edge.proxy,
            b"GET /warm HTTP/1.1\r\nHost: edge.test\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(status(&answer), 200, "{answer}");
    }
    let before = resident_bytes(edge.pid());
    let mut head = b"GET / HTTP/1.1\r\nHost: edge.test\r\nX-Pad: ".to_vec();
    head.resize(SENT, b'a');
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let mut stream = TcpStream::connect(edge.proxy).await.unwrap();
        stream.write_all(&head).await.unwrap();
        clients.push(stream);
    }
    common::wait_for("the proxy to read every stuck header", || async {
        let (open, unread) = server_side_sockets(edge.proxy.port());
        (open == CLIENTS && unread == 0).then_some(())
    })
    .await;
    let per_connection = resident_bytes(edge.pid()).saturating_sub(before) / CLIENTS as u64;
    // The header buffer grows by doubling: at most twice what was sent, plus the
    // connection's own state.
    let bound = (2 * SENT + 8 * 1024) as u64;
    assert!(
        per_connection <= bound,
        "{per_connection} bytes held per stuck connection (bound {bound})"
    );
    drop(clients);
}

/// Waits until the proxy reports `idle` parked connections and `open` open ones.
async fn wait_for_connections(edge: &Edge, idle: f64, open: f64) {
    common::wait_for("the connection counts", || async {
        let metrics = edge.metrics().await;
        let now = (
            common::metric(&metrics, "kingdom_edge_client_connections_idle"),
            common::metric(&metrics, "kingdom_edge_client_connections"),
        );
        (now == (idle, open)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn idle_connections_are_parked_and_served_again() {
    let (edge, tls, pem, _certs) = edge_with_tls(capturing_upstream().await, "").await;
    wait_for_connections(&edge, 0.0, 0.0).await;
    // Plain HTTP/1.1: idle after its request, the connection is parked (and still counted
    // as open); its next request is answered on the same connection.
    let mut stream = TcpStream::connect(edge.proxy).await.unwrap();
    for path in ["/first", "/second", "/third"] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: edge.test\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let answer = read_answer(&mut stream).await;
        assert_eq!(status(&answer), 200, "{answer}");
        assert!(answer.contains(&format!("GET {path} HTTP/1.1")), "{answer}");
        wait_for_connections(&edge, 1.0, 1.0).await;
    }
    // A parked connection the client closes is closed and counted out.
    drop(stream);
    wait_for_connections(&edge, 0.0, 0.0).await;

    // TLS: the same, on one reused connection.
    let client = reqwest::Client::builder()
        .no_proxy()
        .use_rustls_tls()
        .http1_only()
        .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap())
        .resolve("edge.test", tls)
        .build()
        .unwrap();
    let url = format!("https://edge.test:{}/tls", tls.port());
    for _ in 0..3 {
        let response = client.get(&url).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert!(response
            .text()
            .await
            .unwrap()
            .starts_with("GET /tls HTTP/1.1"));
        wait_for_connections(&edge, 1.0, 1.0).await;
    }
    drop(client);
    wait_for_connections(&edge, 0.0, 0.0).await;
}
