// Copyright 2026 Cloudflare, Inc.
//
// Licensed under the Apache License, Version 2.0 (the "License");
// you may not use this file except in compliance with the License.
// You may obtain a copy of the License at
//
// http://www.apache.org/licenses/LICENSE-2.0
//
// Unless required by applicable law or agreed to in writing, software
// distributed under the License is distributed on an "AS IS" BASIS,
// WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
// See the License for the specific language governing permissions and
// limitations under the License.

//! The abstraction and implementation interface for service application logic

pub mod http_app;

use crate::server::ShutdownWatch;
use async_trait::async_trait;
use bytes::BytesMut;
use log::{debug, error};
use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use crate::protocols::http::v2::server;
use crate::protocols::http::{ReusableHttpStream, ServerSession};
use crate::protocols::Digest;
use crate::protocols::Stream;
use crate::protocols::ALPN;

// https://datatracker.ietf.org/doc/html/rfc9113#section-3.4
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[async_trait]
/// This trait defines the interface of a transport layer (TCP or TLS) application.
pub trait ServerApp {
    /// Whenever a new connection is established, this function will be called with the established
    /// [`Stream`] object provided.
    ///
    /// The application can do whatever it wants with the `session`.
    ///
    /// After processing the `session`, if the `session`'s connection is reusable, This function
    /// can return it to the service by returning `Some(session)`. The returned `session` will be
    /// fed to another [`Self::process_new()`] for another round of processing.
    /// If not reusable, `None` should be returned.
    ///
    /// The `shutdown` argument will change from `false` to `true` when the server receives a
    /// signal to shutdown. This argument allows the application to react accordingly.
    async fn process_new(
        self: &Arc<Self>,
        mut session: Stream,
        // TODO: make this ShutdownWatch so that all task can await on this event
        shutdown: &ShutdownWatch,
    ) -> Option<Stream>;

    /// This callback will be called once after the service stops listening to its endpoints.
    async fn cleanup(&self) {}

    /// kingdom-edge patch: how long a TLS handshake may take (Pingora's 60s by default).
    fn tls_handshake_timeout(&self) -> Duration {
        Duration::from_secs(60)
    }

    /// kingdom-edge patch: a client ran out of time in `phase` (`"tls_handshake"`,
    /// `"keepalive"`, `"header"`, `"h2_idle"`), and its connection is being closed.
    fn client_timed_out(&self, _phase: &'static str) {}

    /// kingdom-edge patch: called for each accepted connection before anything is read from
    /// it. `false` closes it at once (a connection cap); `true` must be paired with one
    /// [`Self::connection_closed`] when the connection ends.
    fn admit_connection(&self) -> bool {
        true
    }

    /// kingdom-edge patch: an admitted connection ended.
    fn connection_closed(&self) {}

    /// kingdom-edge patch: serves an admitted connection; `open` reports its end when it is
    /// dropped. By default the connection is served with [`Self::process_new`] and `open`
    /// dropped when that is done, as the accept loop did; an app that parks idle
    /// connections elsewhere takes `open` with them.
    async fn serve_admitted(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
        open: OpenConnection,
    ) where
        Self: Send + Sync + 'static,
    {
        let mut reuse = self.process_new(stream, shutdown).await;
        while let Some(stream) = reuse {
            reuse = self.process_new(stream, shutdown).await;
        }
        drop(open);
    }
}

/// kingdom-edge patch: one admitted connection; tells its app when it is dropped
/// ([`ServerApp::connection_closed`]).
pub struct OpenConnection(Arc<dyn ClosesConnections>);

impl OpenConnection {
    pub fn new<A: ServerApp + Send + Sync + 'static>(app: Arc<A>) -> Self {
        OpenConnection(app)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connection_closed();
    }
}

impl std::fmt::Debug for OpenConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OpenConnection")
    }
}

/// [`ServerApp::connection_closed`], callable without knowing the app's type.
trait ClosesConnections: Send + Sync {
    fn connection_closed(&self);
}

impl<A: ServerApp + Send + Sync> ClosesConnections for A {
    fn connection_closed(&self) {
        ServerApp::connection_closed(self)
    }
}

#[non_exhaustive]
#[derive(Clone, Debug, Default)]
/// HTTP Server options that control how the server handles some transport types.
pub struct HttpServerOptions {
    /// Allow HTTP/2 for plaintext.
    pub h2c: bool,

    /// Allow proxying CONNECT requests when handling HTTP traffic.
    ///
    /// When disabled, CONNECT requests are rejected with 405 by proxy services.
    pub allow_connect_method_proxying: bool,

    #[doc(hidden)]
    pub force_custom: bool,

    /// kingdom-edge patch: how long an idle HTTP/1 connection waits for its next request
    /// (whole seconds; Pingora's 60s by default).
    pub keepalive_timeout: Option<Duration>,

    /// kingdom-edge patch: how long a request header may take from its first byte to its
    /// end, however the client spaces its bytes. Default: only per-read timeouts.
    pub request_header_timeout: Option<Duration>,

    /// kingdom-edge patch: the most bytes a request header may hold while it is read
    /// (Pingora's 1 MiB by default).
    pub max_request_header_size: Option<usize>,

    /// kingdom-edge patch: how long a TLS handshake may take. Default: 60s.
    pub tls_handshake_timeout: Option<Duration>,

    /// Maximum number of requests that this connection will handle. This is
    /// equivalent to [Nginx's keepalive requests](https://nginx.org/en/docs/http/ngx_http_upstream_module.html#keepalive_requests)
    /// which says:
    ///
    /// > Closing connections periodically is necessary to free per-connection
    /// > memory allocations. Therefore, using too high maximum number of
    /// > requests could result in excessive memory usage and not recommended.
    ///
    /// Unlike nginx, the default behavior here is _no limit_.
    pub keepalive_request_limit: Option<u32>,

    /// If set, close a downstream HTTP/2 connection that has been idle
    /// for this duration.
    ///
    /// Default: `None`
    pub h2_idle_timeout: Option<Duration>,
}

/// Settings persisted across HTTP/1.x keepalive requests on the same downstream connection.
///
/// In addition to framework-managed keepalive parameters, this struct can carry an optional
/// user-defined context via [`set_user_context`](Self::set_user_context). The proxy layer
/// populates this through `ProxyHttp::persist_connection_context`
/// and delivers it to the next request through `ProxyHttp::on_connection_reuse`.
///
/// Also carries pipelined-prefix bytes when the caller has opted into HTTP/1.1
/// pipelining on the previous session. See
/// [`Self::set_pipelined_prefix`] and the
/// [`HttpSession::set_pipelining_enabled`](crate::protocols::http::v1::server::HttpSession::set_pipelining_enabled)
/// docs for the RFC 9112 §9.3.2 semantics.
#[derive(Debug)]
pub struct HttpPersistentSettings {
    keepalive_timeout: Option<u64>,
    keepalive_reuses_remaining: Option<u32>,
    /// User-defined context to carry to the next request on this connection.
    user_context: Option<Box<dyn Any + Send + Sync>>,
    /// Bytes read past the end of the previous request's body, to be parsed
    /// as the next pipelined request on the reused connection.
    pipelined_prefix: Option<BytesMut>,
    /// Whether HTTP/1.1 pipelining was enabled on the previous session;
    /// propagates to the next session so the proxy-level opt-in sticks
    /// across keepalive reuses without the adopter having to re-enable
    /// it on every request.
    pipelining_enabled: bool,
}

impl HttpPersistentSettings {
    pub fn for_session(session: &ServerSession) -> Self {
        HttpPersistentSettings {
            keepalive_timeout: session.get_keepalive(),
            keepalive_reuses_remaining: session.get_keepalive_reuses_remaining(),
            user_context: None,
            pipelined_prefix: None,
            pipelining_enabled: session.pipelining_enabled(),
        }
    }

    /// Set a user-defined context to be carried to the next request on this connection.
    pub fn set_user_context(&mut self, ctx: Box<dyn Any + Send + Sync>) {
        self.user_context = Some(ctx);
    }

    /// Take the user-defined context, if any.
    pub fn take_user_context(&mut self) -> Option<Box<dyn Any + Send + Sync>> {
        self.user_context.take()
    }

    /// Set pipelined-prefix bytes to be fed to the next session on this
    /// connection. Called by the proxy layer when HTTP/1.1 pipelining is
    /// enabled on the current session and overread bytes were present at
    /// reuse time.
    pub fn set_pipelined_prefix(&mut self, prefix: BytesMut) {
        self.pipelined_prefix = Some(prefix);
    }

    /// kingdom-edge patch: whether bytes of the next pipelined request were already read.
    pub fn has_pipelined_bytes(&self) -> bool {
        self.pipelined_prefix
            .as_ref()
            .is_some_and(|p| !p.is_empty())
    }

    pub fn apply_to_session(self, session: &mut ServerSession) {
        let Self {
            keepalive_timeout,
            mut keepalive_reuses_remaining,
            user_context,
            pipelined_prefix,
            pipelining_enabled,
        } = self;

        // Reduce the number of times the connection for this session can be
        // reused by one. A session with reuse count of zero won't be reused
        if let Some(reuses) = keepalive_reuses_remaining.as_mut() {
            *reuses = reuses.saturating_sub(1);
        }

        session.set_keepalive(keepalive_timeout);
        session.set_keepalive_reuses_remaining(keepalive_reuses_remaining);

        // Carry user context into the session for the proxy layer to consume
        session.set_connection_user_context(user_context);

        // Replay pipelining opt-in so it stays on across keepalive reuses.
        session.set_pipelining_enabled(pipelining_enabled);

        // Feed any pipelined prefix bytes to the new session's request parser
        // so they are treated as the start of the next request.
        if let Some(prefix) = pipelined_prefix {
            session.set_pipelined_prefix(prefix);
        }
    }
}

#[derive(Debug)]
pub struct ReusedHttpStream {
    stream: Stream,
    persistent_settings: Option<HttpPersistentSettings>,
}

impl ReusedHttpStream {
    pub fn new(stream: Stream, persistent_settings: Option<HttpPersistentSettings>) -> Self {
        ReusedHttpStream {
            stream,
            persistent_settings,
        }
    }

    /// Build a reusable HTTP stream from a finished session, preserving any
    /// pipelined prefix bytes in the persistent settings for the next request.
    pub fn from_reusable_stream(
        reusable: ReusableHttpStream,
        mut persistent_settings: HttpPersistentSettings,
    ) -> Self {
        let (stream, pipelined_prefix) = reusable.into_parts();
        if let Some(prefix) = pipelined_prefix {
            persistent_settings.set_pipelined_prefix(prefix);
        }
        Self::new(stream, Some(persistent_settings))
    }

    pub fn consume(self) -> (Stream, Option<HttpPersistentSettings>) {
        (self.stream, self.persistent_settings)
    }
}

/// This trait defines the interface of an HTTP application.
#[async_trait]
pub trait HttpServerApp {
    /// Similar to the [`ServerApp`], this function is called whenever a new HTTP session is established.
    ///
    /// After successful processing, [`ServerSession::finish()`] can be
    /// called to return an optionally reusable connection back to the service.
    /// The caller needs to make sure that the connection is in a reusable state
    /// i.e., no error or incomplete read or write headers or bodies. Otherwise
    /// a `None` should be returned.
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        // TODO: make this ShutdownWatch so that all task can await on this event
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream>;

    /// Provide options on how HTTP/2 connection should be established. This function will be called
    /// every time a new HTTP/2 **connection** needs to be established.
    ///
    /// A `None` means to use the built-in default options. See [`server::H2Options`] for more details.
    fn h2_options(&self) -> Option<server::H2Options> {
        None
    }

    /// Provide HTTP server options used to override default behavior. This function will be called
    /// every time a new connection is processed.
    ///
    /// A `None` means no server options will be applied.
    fn server_options(&self) -> Option<&HttpServerOptions> {
        None
    }

    async fn http_cleanup(&self) {}

    /// kingdom-edge patch: see [`ServerApp::client_timed_out`].
    fn client_timed_out(&self, _phase: &'static str) {}

    /// kingdom-edge patch: see [`ServerApp::admit_connection`].
    fn admit_connection(&self) -> bool {
        true
    }

    /// kingdom-edge patch: see [`ServerApp::connection_closed`].
    fn connection_closed(&self) {}

    /// kingdom-edge patch: where this app parks idle HTTP/1 connections (see
    /// [`IdleConnections`]); `None` keeps each one in its own task until its next request.
    fn idle_connections(&self) -> Option<&IdleConnections> {
        None
    }

    /// kingdom-edge patch: this many more (or, negative, fewer) connections are parked in
    /// [`Self::idle_connections`].
    fn idle_connections_changed(&self, _delta: isize) {}

    #[doc(hidden)]
    async fn process_custom_session(
        self: Arc<Self>,
        _stream: Stream,
        _shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        None
    }
}

#[async_trait]
impl<T> ServerApp for T
where
    T: HttpServerApp + Send + Sync + 'static,
{
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        dispatch(self, stream, shutdown, &mut None).await
    }

    async fn serve_admitted(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
        open: OpenConnection,
    ) {
        // `open` lives here unless the HTTP/1 loop takes it with a parked connection, so a
        // custom session's reused stream is still counted.
        let mut open = Some(open);
        let mut reuse = dispatch(self, stream, shutdown, &mut open).await;
        while let Some(stream) = reuse {
            reuse = dispatch(self, stream, shutdown, &mut open).await;
        }
    }

    async fn cleanup(&self) {
        self.http_cleanup().await;
    }

    fn tls_handshake_timeout(&self) -> Duration {
        self.server_options()
            .and_then(|o| o.tls_handshake_timeout)
            .unwrap_or(Duration::from_secs(60))
    }

    fn client_timed_out(&self, phase: &'static str) {
        HttpServerApp::client_timed_out(self, phase)
    }

    fn admit_connection(&self) -> bool {
        HttpServerApp::admit_connection(self)
    }

    fn connection_closed(&self) {
        HttpServerApp::connection_closed(self)
    }
}

/// The connection-level protocol choice of [`ServerApp::process_new`] for an
/// [`HttpServerApp`]. kingdom-edge patch: `open`, when given, goes with the connection if
/// its HTTP/1 loop parks it (see [`IdleConnections`]).
async fn dispatch<T>(
    app: &Arc<T>,
    mut stream: Stream,
    shutdown: &ShutdownWatch,
    open: &mut Option<OpenConnection>,
) -> Option<Stream>
where
    T: HttpServerApp + Send + Sync + 'static,
{
    let mut h2c = app.server_options().as_ref().map_or(false, |o| o.h2c);
    let custom = app
        .server_options()
        .as_ref()
        .map_or(false, |o| o.force_custom);

    // h2c is for cleartext connections; on TLS, ALPN handles protocol negotiation.
    // Otherwise, h2c stays true on TLS streams, forcing HTTP/1.1 clients into HTTP/2
    if stream.get_ssl_digest().is_some() {
        h2c = false;
    }
    // try to read h2 preface
    else if h2c && !custom {
        // kingdom-edge patch: boxed, see `detect_h2c`.
        h2c = Box::pin(detect_h2c(app, &mut stream, shutdown)).await?;
    }
    if h2c || matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
        // kingdom-edge patch: boxed, so that the future of every HTTP/1 connection does
        // not carry the HTTP/2 handshake and accept-loop states.
        Box::pin(serve_http2(app, stream, shutdown)).await;
    } else if custom || matches!(stream.selected_alpn_proto(), Some(ALPN::Custom(_))) {
        return app.clone().process_custom_session(stream, shutdown).await;
    } else {
        // No ALPN or ALPN::H1 and h2c was not configured, fallback to HTTP/1.1
        serve_http1(app, stream, shutdown, open.take(), None, false).await;
    }
    None
}

/// kingdom-edge patch: whether a cleartext connection starts with the HTTP/2 preface;
/// `None` when it closed or ran out of time first. The wait for the first bytes is bounded
/// like an idle connection's and the rest like a request header. Only the first three bytes
/// are read before deciding, so an HTTP/1 request shorter than the preface (`GET /
/// HTTP/1.0` and an empty header) does not wait for bytes that never come.
async fn detect_h2c<T>(app: &Arc<T>, stream: &mut Stream, shutdown: &ShutdownWatch) -> Option<bool>
where
    T: HttpServerApp + Send + Sync + 'static,
{
    let options = app.server_options();
    let keepalive = keepalive_timeout(options);
    match wait_for_request(stream, keepalive, shutdown).await {
        Wait::Readable => {}
        Wait::TimedOut => {
            app.client_timed_out("keepalive");
            return None;
        }
        Wait::Closed => return None,
    }
    let header_timeout = options
        .and_then(|o| o.request_header_timeout)
        .unwrap_or(keepalive);
    let peek = async {
        let mut buf = [0u8; H2_PREFACE.len()];
        if !stream.try_peek(&mut buf[..3]).await? || buf[..3] != H2_PREFACE[..3] {
            return Ok::<_, std::io::Error>(false);
        }
        Ok(stream.try_peek(&mut buf).await? && buf == H2_PREFACE)
    };
    match tokio::time::timeout(header_timeout, peek).await {
        Ok(Ok(preface)) => Some(preface),
        Ok(Err(e)) => {
            // this error is normal when h1 reuse and close the connection
            debug!("Read error while peeking h2c preface {e}");
            None
        }
        Err(_) => {
            app.client_timed_out("header");
            None
        }
    }
}

/// The HTTP/2 side of [`ServerApp::process_new`] for an [`HttpServerApp`].
async fn serve_http2<T>(app: &Arc<T>, stream: Stream, shutdown: &ShutdownWatch)
where
    T: HttpServerApp + Send + Sync + 'static,
{
    // create a shared connection digest
    let digest = Arc::new(Digest {
        ssl_digest: stream.get_ssl_digest(),
        // TODO: log h2 handshake time
        timing_digest: stream.get_timing_digest(),
        proxy_digest: stream.get_proxy_digest(),
        socket_digest: stream.get_socket_digest(),
    });

    let h2_options = app.h2_options();
    let h2_conn = match server::handshake(stream, h2_options).await {
        Err(e) => {
            error!("H2 handshake error {e}");
            return;
        }
        Ok(c) => c,
    };

    // The accept-loop body — including the graceful-shutdown state
    // machine — lives in `server::accept_downstream_sessions` so that
    // the same code path is exercised by tests in `protocols::http::v2`.
    let app_for_sessions = app.clone();
    let shutdown_for_session = shutdown.clone();
    let h2_idle_timeout = app.server_options().and_then(|o| o.h2_idle_timeout);
    let idle = server::accept_downstream_sessions(
        h2_conn,
        digest,
        shutdown.clone(),
        h2_idle_timeout,
        |h2_stream, guard| {
            let app = app_for_sessions.clone();
            let shutdown = shutdown_for_session.clone();
            pingora_runtime::current_handle().spawn(async move {
                // hold `guard` for the session's lifetime so the accept
                // loop's idle timeout sees this connection as busy.
                let _guard = guard;
                // Note, `PersistentSettings` not currently relevant for h2
                app.process_new_http(ServerSession::new_http2(h2_stream), &shutdown)
                    .await;
            });
        },
    )
    .await;
    if idle {
        app.client_timed_out("h2_idle");
    }
}

/// kingdom-edge patch: the HTTP/1 connection loop. Between requests a connection holds only
/// its stream: it waits for the next request's first bytes before anything per request is
/// built, and that is all freed once the response is done (before, every idle connection
/// held a session, its header buffer and the whole per-request future). A connection that
/// stays idle past [`IDLE_GRACE`] leaves its task for the app's [`IdleConnections`], if
/// it has them and `open` is ours to hand on; otherwise it waits here for the whole
/// keep-alive timeout. `ready`: the first request's bytes are known to be readable.
async fn serve_http1<T>(
    app: &Arc<T>,
    mut stream: Stream,
    shutdown: &ShutdownWatch,
    open: Option<OpenConnection>,
    mut persistent: Option<HttpPersistentSettings>,
    mut ready: bool,
) where
    T: HttpServerApp + Send + Sync + 'static,
{
    let configured = keepalive_timeout(app.server_options());
    let idle = app.idle_connections().filter(|_| open.is_some());
    let mut first = persistent.is_none();
    loop {
        let buffered = ready
            || persistent
                .as_ref()
                .is_some_and(HttpPersistentSettings::has_pipelined_bytes);
        ready = false;
        if !buffered {
            // The session's keep-alive (`None`: no limit), else the server's.
            let keepalive = match persistent.as_ref().and_then(|p| p.keepalive_timeout) {
                Some(0) => None,
                Some(secs) => Some(Duration::from_secs(secs)),
                None => Some(configured),
            };
            let parks = idle.is_some() && keepalive.is_none_or(|k| k > IDLE_GRACE);
            let wait = match keepalive {
                _ if parks => IDLE_GRACE,
                Some(keepalive) => keepalive,
                None => Duration::MAX,
            };
            match wait_for_request(&mut stream, wait, shutdown).await {
                Wait::Readable => {}
                Wait::Closed => return,
                Wait::TimedOut => {
                    if let (true, Some(idle), Some(open)) = (parks, idle, open) {
                        let expires =
                            keepalive.map(|k| tokio::time::Instant::now() + (k - IDLE_GRACE));
                        let parked = Parked {
                            stream,
                            persistent,
                            open,
                            expires,
                        };
                        idle.park(app, parked, configured.saturating_sub(IDLE_GRACE), shutdown);
                    } else {
                        app.client_timed_out("keepalive");
                    }
                    return;
                }
            }
        }

        let next = begin_request(app, stream, persistent.take(), first, shutdown);
        first = false;
        match next.await {
            Some(reused) => (stream, persistent) = reused.consume(),
            None => return,
        }
    }
}

/// kingdom-edge patch: how long an idle HTTP/1 connection waits in its own task before it
/// is parked with its app's [`IdleConnections`]. A busy client's next request comes well
/// within it, so only connections that are really idle pay for being parked and resumed.
pub const IDLE_GRACE: Duration = Duration::from_millis(100);

/// kingdom-edge patch: the idle HTTP/1 connections of one app, parked together as nginx
/// keeps them: each holds only its stream, its keep-alive state and its [`OpenConnection`]
/// (no task, no timer of its own), until its next request's bytes arrive (then it gets a
/// task again) or its keep-alive timeout ends (then it is closed and counted as a
/// `"keepalive"` [`HttpServerApp::client_timed_out`]). One task watches them all; it
/// starts with the first connection parked and ends when the server shuts down, closing
/// what is still parked.
#[derive(Default)]
pub struct IdleConnections {
    pool: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<Parked>>,
}

/// An idle HTTP/1 connection, parked.
struct Parked {
    stream: Stream,
    persistent: Option<HttpPersistentSettings>,
    open: OpenConnection,
    /// When its keep-alive timeout ends; `None`: never.
    expires: Option<tokio::time::Instant>,
}

impl IdleConnections {
    /// Parks `parked` until its request comes or it expires. `rest`, the server's keep-alive
    /// timeout left after the grace period, sets how finely expiries are grouped.
    fn park<T>(&self, app: &Arc<T>, parked: Parked, rest: Duration, shutdown: &ShutdownWatch)
    where
        T: HttpServerApp + Send + Sync + 'static,
    {
        let pool = self.pool.get_or_init(|| {
            let (sender, parked) = tokio::sync::mpsc::unbounded_channel();
            pingora_runtime::current_handle().spawn(watch_idle_connections(
                app.clone(),
                parked,
                shutdown.clone(),
                rest,
            ));
            sender
        });
        // Once the pool has stopped (shutting down), the connection is dropped: closed.
        let _ = pool.send(parked);
    }
}

/// Parked connections grouped by when they expire: every connection of a group is closed
/// together, at the end of its time slot, at most a slot later than its own timeout. One
/// timer for all of them instead of one each.
type ParkedGroup = futures::stream::FuturesUnordered<UntilReadable>;

/// Resolves with its connection once that is readable; `None` if it failed.
struct UntilReadable(Option<Parked>);

impl std::future::Future for UntilReadable {
    type Output = Option<Parked>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        use std::task::Poll;
        use tokio::io::ReadBuf;
        let parked = self.0.as_mut().expect("polled after it resolved");
        let mut nothing = ReadBuf::new(&mut []);
        match std::pin::Pin::new(&mut *parked.stream).poll_read(cx, &mut nothing) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) => Poll::Ready(self.0.take()),
            Poll::Ready(Err(e)) => {
                debug!("Parked downstream connection failed: {e}");
                self.0 = None;
                Poll::Ready(None)
            }
        }
    }
}

/// How many connections an [`IdleConnections`] holds, as told to its app.
struct ParkedCount<'a, T: HttpServerApp>(&'a T, isize);

impl<T: HttpServerApp> ParkedCount<'_, T> {
    fn add(&mut self, delta: isize) {
        self.1 += delta;
        self.0.idle_connections_changed(delta);
    }
}

impl<T: HttpServerApp> Drop for ParkedCount<'_, T> {
    fn drop(&mut self) {
        self.0.idle_connections_changed(-self.1);
    }
}

/// The task of an app's [`IdleConnections`].
async fn watch_idle_connections<T>(
    app: Arc<T>,
    mut arriving: tokio::sync::mpsc::UnboundedReceiver<Parked>,
    shutdown: ShutdownWatch,
    rest: Duration,
) where
    T: HttpServerApp + Send + Sync + 'static,
{
    use futures::StreamExt;
    use std::collections::BTreeMap;
    use std::task::Poll;
    use tokio::time::Instant;

    let slot = (rest / 8).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let start = Instant::now();
    // Slot `n` ends at `start + n * slot`; connections without a timeout never expire.
    let slot_end = |n: u32| start + slot * n;
    let slot_of = |expires: Instant| {
        let after = expires.saturating_duration_since(start);
        (after.as_nanos().div_ceil(slot.as_nanos())).min(u32::MAX as u128) as u32
    };
    let mut expiring: BTreeMap<u32, ParkedGroup> = BTreeMap::new();
    let mut lasting = ParkedGroup::new();
    // However the loop ends, what is still parked is closed: report it gone.
    let mut parked_count = ParkedCount(app.as_ref(), 0);
    let mut watch = shutdown.clone();
    let mut watching = true;
    let expiry = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(expiry);
    let mut armed_for = None;
    loop {
        if *watch.borrow_and_update() {
            return;
        }
        if let Some(&first) = expiring.keys().next() {
            if armed_for != Some(first) {
                expiry.as_mut().reset(slot_end(first));
                armed_for = Some(first);
            }
        }
        let readable = std::future::poll_fn(|cx| {
            for group in expiring.values_mut().chain(std::iter::once(&mut lasting)) {
                if let Poll::Ready(Some(ready)) = group.poll_next_unpin(cx) {
                    return Poll::Ready(ready);
                }
            }
            Poll::Pending
        });
        tokio::select! {
            biased;
            changed = watch.changed(), if watching => {
                // No sender: no shutdown will ever be signalled.
                watching = changed.is_ok();
            }
            // Connections with a request waiting go first, then the ones to close, then
            // the newly parked.
            ready = readable => {
                parked_count.add(-1);
                if let Some(Parked { stream, persistent, open, .. }) = ready {
                    let app = app.clone();
                    let shutdown = shutdown.clone();
                    pingora_runtime::current_handle().spawn(async move {
                        serve_http1(&app, stream, &shutdown, Some(open), persistent, true).await;
                    });
                }
            }
            _ = &mut expiry, if armed_for.is_some() => {
                if let Some(expired) = armed_for.take().and_then(|n| expiring.remove(&n)) {
                    parked_count.add(-(expired.len() as isize));
                    for _ in 0..expired.len() {
                        app.client_timed_out("keepalive");
                    }
                }
            }
            parked = arriving.recv() => {
                let Some(parked) = parked else { return };
                parked_count.add(1);
                match parked.expires {
                    Some(expires) => expiring
                        .entry(slot_of(expires))
                        .or_default()
                        .push(UntilReadable(Some(parked))),
                    None => lasting.push(UntilReadable(Some(parked))),
                }
            }
        }
        expiring.retain(|_, group| !group.is_empty());
    }
}

/// kingdom-edge patch: builds the session for the next request on `stream` and starts it.
/// Not async, so that the session never sits in the connection loop's future.
fn begin_request<'a, T>(
    app: &'a Arc<T>,
    stream: Stream,
    persistent: Option<HttpPersistentSettings>,
    first: bool,
    shutdown: &'a ShutdownWatch,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<ReusedHttpStream>> + Send + 'a>>
where
    T: HttpServerApp + Send + Sync + 'static,
{
    let options = app.server_options();
    let mut session = ServerSession::new_http1(stream);
    if first {
        if *shutdown.borrow() {
            // stop downstream from reusing if this service is shutting down soon
            session.set_keepalive(None);
        } else {
            session.set_keepalive(Some(keepalive_timeout(options).as_secs()));
        }
        session
            .set_keepalive_reuses_remaining(options.and_then(|opts| opts.keepalive_request_limit));
    } else if let Some(settings) = persistent {
        settings.apply_to_session(&mut session);
    }
    apply_header_limits(&mut session, options);
    app.process_new_http(session, shutdown)
}

/// kingdom-edge patch: the configured keep-alive timeout (Pingora's 60s by default).
fn keepalive_timeout(options: Option<&HttpServerOptions>) -> Duration {
    options
        .and_then(|o| o.keepalive_timeout)
        .unwrap_or(Duration::from_secs(60))
        .max(Duration::from_secs(1))
}

/// What ended an idle connection's wait for its next request.
enum Wait {
    /// Bytes, or the end of the stream, are ready to be read.
    Readable,
    TimedOut,
    /// The server is shutting down, or the stream failed.
    Closed,
}

/// kingdom-edge patch: waits until `stream` is readable without reading from it or holding
/// a buffer: a read into an empty buffer completes once the socket (for TLS, a decrypted
/// record) is readable, and consumes nothing.
async fn wait_for_request(
    stream: &mut Stream,
    keepalive: Duration,
    shutdown: &ShutdownWatch,
) -> Wait {
    use tokio::io::{AsyncRead, ReadBuf};

    let mut shutdown = shutdown.clone();
    if *shutdown.borrow_and_update() {
        return Wait::Closed;
    }
    let readable = std::future::poll_fn(|cx| {
        let mut nothing = ReadBuf::new(&mut []);
        std::pin::Pin::new(&mut *stream).poll_read(cx, &mut nothing)
    });
    let shutting_down = async {
        while shutdown.changed().await.is_ok() {
            if *shutdown.borrow() {
                return;
            }
        }
        // No sender: no shutdown will ever be signalled.
        std::future::pending::<()>().await
    };
    tokio::select! {
        biased;
        ready = tokio::time::timeout(keepalive, readable) => match ready {
            Ok(Ok(())) => Wait::Readable,
            Ok(Err(e)) => {
                debug!("Idle downstream connection failed: {e}");
                Wait::Closed
            }
            Err(_) => Wait::TimedOut,
        },
        _ = shutting_down => Wait::Closed,
    }
}

/// kingdom-edge patch: applies the header deadline and size of `options` to `session`.
fn apply_header_limits(session: &mut ServerSession, options: Option<&HttpServerOptions>) {
    if let Some(options) = options {
        session.set_request_header_limits(
            options.request_header_timeout,
            options
                .max_request_header_size
                .unwrap_or(crate::protocols::http::v1::common::MAX_HEADER_SIZE),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_test::io::Builder;

    #[test]
    fn test_persistent_settings_user_context_roundtrip() {
        // Create a mock H1 session
        let mock_io = Builder::new().build();
        let mut session = ServerSession::new_http1(Box::new(mock_io));
        session.set_keepalive(Some(60));

        // Snapshot settings (no user context yet)
        let mut settings = HttpPersistentSettings::for_session(&session);
        assert!(settings.take_user_context().is_none());

        // Set user context
        settings.set_user_context(Box::new(123u64));

        // Apply to a fresh session -- user context should transfer
        let mock_io2 = Builder::new().build();
        let mut session2 = ServerSession::new_http1(Box::new(mock_io2));
        settings.apply_to_session(&mut session2);

        // The user context should now be on the session
        let ctx = session2.take_connection_user_context();
        assert!(ctx.is_some());
        let val = ctx.unwrap().downcast::<u64>().unwrap();
        assert_eq!(*val, 123u64);

        // Keepalive should also have been applied
        assert_eq!(session2.get_keepalive(), Some(60));
    }

    #[test]
    fn test_persistent_settings_no_user_context_by_default() {
        let mock_io = Builder::new().build();
        let mut session = ServerSession::new_http1(Box::new(mock_io));
        session.set_keepalive(Some(30));

        let settings = HttpPersistentSettings::for_session(&session);

        let mock_io2 = Builder::new().build();
        let mut session2 = ServerSession::new_http1(Box::new(mock_io2));
        settings.apply_to_session(&mut session2);

        // No user context should be present
        assert!(session2.take_connection_user_context().is_none());
        // Keepalive should still work
        assert_eq!(session2.get_keepalive(), Some(30));
    }
}
