//! Identical concurrent GETs collapsed into one upstream request even when its answer is
//! not stored (a route's `cache.coalesce_uncacheable`), for hot endpoints whose answers say
//! `no-store` or `max-age=0`.
//!
//! The cache lock coalesces misses only while an answer may be stored: once a key is known
//! not to be (hit-for-pass), its requests go upstream in parallel. Here the first request
//! for a key leads. The others that arrive before its answer's header wait and get a copy
//! of its answer once the whole body is in, or fetch for themselves when it cannot be
//! shared: a failed or cut exchange, a 5xx, a body over `cache.max_object`, `Set-Cookie`,
//! `private` (with or without field names), `no-cache="…"`, `Vary: *`, a `Vary` naming a
//! header the edge sets upstream, or a `Vary` whose headers differ between the two
//! requests. A flight lasts at most `cache.lock_timeout` from its start: waiting followers
//! then fetch for themselves, and the next request starts a new flight. An answer whose
//! header comes with nobody waiting ends the flight at once (nothing is copied).
//!
//! Requests whose answers may be personal, partial or not HTTP do not take part: those with
//! `Authorization`, `Cookie`, `Range`, a condition (`If-None-Match`, `If-Modified-Since`,
//! ...), `Upgrade` or `Expect`, and any with a body.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{header, HeaderName, HeaderValue, Method};
use pingora::cache::cache_control::CacheControl;
use pingora::cache::key::HashBinary;
use pingora::http::{RequestHeader, ResponseHeader};
use tokio::sync::watch;

/// Shards of the in-flight map.
const SHARDS: usize = 16;

/// A leader's answer as its followers get it.
#[derive(Clone)]
pub enum Outcome {
    /// Still in flight.
    Pending,
    /// Nothing to share: each follower fetches for itself.
    Fetch,
    /// A copy for each follower.
    Shared(Arc<Answer>),
}

/// A flight as others find it: when it ends, and where its answer comes.
type Flight = (Instant, watch::Receiver<Outcome>);

/// The requests in flight that others may collapse into, by key.
pub struct Collapser {
    shards: [Mutex<HashMap<HashBinary, Flight>>; SHARDS],
}

/// A complete upstream answer, shared.
pub struct Answer {
    /// As the upstream sent it, before the edge's own headers.
    pub header: ResponseHeader,
    pub body: Bytes,
    /// The leader's values of the headers the answer's `Vary` names.
    varied: Vec<(HeaderName, Vec<HeaderValue>)>,
}

/// What a request is in its key's flight.
pub enum Role {
    /// The first: it fetches, and its answer is copied to the others.
    Leader(Box<Leader>),
    /// Another: it waits for the leader's answer, until the flight's deadline.
    Follower(watch::Receiver<Outcome>, Instant),
}

impl Default for Collapser {
    fn default() -> Self {
        Self {
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
        }
    }
}

impl Collapser {
    /// Whether `req` may take part (see the module's doc).
    pub fn eligible(req: &RequestHeader, body_empty: bool) -> bool {
        const PERSONAL: [HeaderName; 10] = [
            header::AUTHORIZATION,
            header::COOKIE,
            header::RANGE,
            header::UPGRADE,
            // Checked (417 for an unknown expectation) only on the way upstream.
            header::EXPECT,
            header::IF_NONE_MATCH,
            header::IF_MODIFIED_SINCE,
            header::IF_MATCH,
            header::IF_UNMODIFIED_SINCE,
            header::IF_RANGE,
        ];
        req.method == Method::GET
            && body_empty
            && !PERSONAL.iter().any(|name| req.headers.contains_key(name))
    }

    /// Joins the flight for `key`, leading it when there is none younger than `timeout`.
    /// A leader keeps at most `limit` bytes of body.
    pub fn join(&'static self, key: HashBinary, limit: usize, timeout: Duration) -> Role {
        let now = Instant::now();
        let mut shard = lock(self.shard(&key));
        if let Some((deadline, receiver)) = shard.get(&key) {
            if now < *deadline {
                return Role::Follower(receiver.clone(), *deadline);
            }
        }
        let (sender, receiver) = watch::channel(Outcome::Pending);
        shard.insert(key, (now + timeout, receiver));
        Role::Leader(Box::new(Leader {
            collapser: self,
            key,
            sender: Some(sender),
            deadline: now + timeout,
            header: None,
            varied: Vec::new(),
            body: BytesMut::new(),
            limit,
        }))
    }

    /// Requests leading a flight now.
    #[cfg(test)]
    fn flights(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    fn shard(&self, key: &HashBinary) -> &Mutex<HashMap<HashBinary, Flight>> {
        &self.shards[key[0] as usize % SHARDS]
    }
}

/// Waits until `deadline` for the leader's answer; `None` when the follower must fetch for
/// itself (nothing to share, a leader gone, or the wait over). Whether the answer is the
/// variant the follower asks for is [`Answer::serves`].
pub async fn follow(
    mut receiver: watch::Receiver<Outcome>,
    deadline: Instant,
) -> Option<Arc<Answer>> {
    let deadline = tokio::time::Instant::from_std(deadline);
    let done = |outcome: &Outcome| !matches!(outcome, Outcome::Pending);
    match tokio::time::timeout_at(deadline, receiver.wait_for(done)).await {
        Ok(Ok(outcome)) => match &*outcome {
            Outcome::Shared(answer) => Some(answer.clone()),
            _ => None,
        },
        _ => None,
    }
}

impl Answer {
    /// Whether this answer is the variant `req` asks for.
    pub fn serves(&self, req: &RequestHeader) -> bool {
        self.varied
            .iter()
            .all(|(name, values)| values_of(req, name) == *values)
    }
}

/// A flight's leader: collects its upstream answer, and hands it to the followers when it
/// is complete. Dropped before that (an error, a retry that failed, a cut body), it tells
/// them to fetch for themselves.
pub struct Leader {
    collapser: &'static Collapser,
    key: HashBinary,
    /// Until the followers are told.
    sender: Option<watch::Sender<Outcome>>,
    /// When the flight ends, answered or not.
    deadline: Instant,
    header: Option<ResponseHeader>,
    /// The leader's values of the headers the answer's `Vary` names.
    varied: Vec<(HeaderName, Vec<HeaderValue>)>,
    body: BytesMut,
    limit: usize,
}

impl Leader {
    /// The upstream's answer header to the leader's request `req` (a later attempt's
    /// replaces an earlier one's). One that cannot be shared, or that nobody waits for, ends
    /// the flight at once.
    pub fn header(&mut self, resp: &ResponseHeader, req: &RequestHeader) {
        self.body = BytesMut::new();
        let length = content_length(resp);
        // Besides the map's own receiver.
        let waited_for = self.sender.as_ref().is_some_and(|s| s.receiver_count() > 1);
        let fits = length.is_none_or(|n| n <= self.limit);
        if !(waited_for && fits && shareable(resp)) {
            self.header = None;
            self.finish(Outcome::Fetch);
            return;
        }
        self.varied = vary_names(resp)
            .map(|name| {
                let values = values_of(req, &name);
                (name, values)
            })
            .collect();
        self.header = Some(resp.clone());
        if length == Some(0) || resp.status.as_u16() == 204 {
            // No body follows.
            self.body(None, true);
        } else if let Some(length) = length {
            self.body.reserve(length);
        }
    }

    /// A piece of the upstream's body; the last one completes the answer.
    pub fn body(&mut self, chunk: Option<&Bytes>, end_of_stream: bool) {
        if self.header.is_none() {
            return;
        }
        let chunk = chunk.map_or(&[][..], |c| &c[..]);
        if self.body.len() + chunk.len() > self.limit || Instant::now() >= self.deadline {
            // Too large to copy, or too late for the followers, who fetch for themselves.
            self.header = None;
            self.body = BytesMut::new();
            self.finish(Outcome::Fetch);
            return;
        }
        self.body.extend_from_slice(chunk);
        if end_of_stream {
            let header = self.header.take().expect("checked above");
            let answer = Answer {
                header,
                body: std::mem::take(&mut self.body).freeze(),
                varied: std::mem::take(&mut self.varied),
            };
            self.finish(Outcome::Shared(Arc::new(answer)));
        }
    }

    /// Tells the followers, and leaves the map: later requests start a new flight.
    fn finish(&mut self, outcome: Outcome) {
        // Once told, the followers hold the answer; the leader keeps nothing of it.
        let Some(sender) = self.sender.take() else {
            return;
        };
        sender.send_replace(outcome);
        let mut shard = lock(self.collapser.shard(&self.key));
        // A flight that outlived its deadline may have been replaced by a newer one.
        let ours = shard
            .get(&self.key)
            .is_some_and(|(_, receiver)| receiver.same_channel(&sender.subscribe()));
        if ours {
            shard.remove(&self.key);
        }
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        self.finish(Outcome::Fetch);
    }
}

/// Headers the edge sets on the upstream request: an answer that varies on one of them
/// may differ between two requests that look the same from the client side.
const SET_UPSTREAM: [&str; 6] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-request-id",
    "x-user-id",
    "surrogate-capability",
];

/// Whether an answer may be given to requests other than the one that asked for it.
fn shareable(resp: &ResponseHeader) -> bool {
    let control = CacheControl::from_resp_headers(resp);
    let personal = resp.headers.contains_key(header::SET_COOKIE)
        || control
            .as_ref()
            .is_some_and(|cc| cc.has_key("private") || cc.no_cache_field_names().is_some())
        || vary_names(resp)
            .any(|name| name.as_str() == "*" || SET_UPSTREAM.contains(&name.as_str()));
    // A 206 answers a range and a 304 a condition (the cache's own, revalidating): requests
    // with either do not take part. A 1xx is not final, and a 5xx is one backend's failure
    // that each request may be spared by another.
    let status = resp.status.as_u16();
    !personal && (200..500).contains(&status) && status != 206 && status != 304
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn content_length(resp: &ResponseHeader) -> Option<usize> {
    resp.headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The header names a response's `Vary` lists (`*`, or a name that is none, as `*`).
fn vary_names(resp: &ResponseHeader) -> impl Iterator<Item = HeaderName> + '_ {
    super::policy::vary_names(resp)
        .map(|name| HeaderName::from_bytes(name.as_bytes()).unwrap_or(HeaderName::from_static("*")))
}

fn values_of(req: &RequestHeader, name: &HeaderName) -> Vec<HeaderValue> {
    req.headers.get_all(name).iter().cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &str)]) -> RequestHeader {
        let mut req = RequestHeader::build("GET", b"/hot", None).unwrap();
        for (name, value) in headers {
            req.append_header(name.to_string(), *value).unwrap();
        }
        req
    }

    fn response(headers: &[(&str, &str)]) -> ResponseHeader {
        let mut resp = ResponseHeader::build(200, None).unwrap();
        for (name, value) in headers {
            resp.append_header(name.to_string(), *value).unwrap();
        }
        resp
    }

    fn collapser() -> &'static Collapser {
        Box::leak(Box::default())
    }

    const WAIT: Duration = Duration::from_secs(5);

    /// A flight's leader, and a follower's wait for it.
    fn pair(
        c: &'static Collapser,
        key: HashBinary,
        limit: usize,
    ) -> (Box<Leader>, watch::Receiver<Outcome>, Instant) {
        let Role::Leader(leader) = c.join(key, limit, WAIT) else {
            panic!("the first leads");
        };
        let Role::Follower(rx, deadline) = c.join(key, limit, WAIT) else {
            panic!("the second follows");
        };
        (leader, rx, deadline)
    }

    #[tokio::test]
    async fn followers_get_the_leaders_complete_answer_and_the_flight_ends() {
        let c = collapser();
        let req = request(&[]);
        let (mut leader, rx, deadline) = pair(c, [1; 16], 1024);
        let waiting = tokio::spawn(async move {
            follow(rx, deadline)
                .await
                .filter(|a| a.serves(&request(&[])))
        });
        leader.header(&response(&[("cache-control", "no-store")]), &req);
        leader.body(Some(&Bytes::from_static(b"hot ")), false);
        leader.body(Some(&Bytes::from_static(b"stuff")), true);
        let answer = waiting.await.unwrap().expect("shared");
        assert_eq!(&answer.body[..], b"hot stuff");
        assert_eq!(c.flights(), 0);
        // The next request leads a new flight.
        assert!(matches!(c.join([1; 16], 1024, WAIT), Role::Leader(_)));
    }

    #[tokio::test]
    async fn what_cannot_be_shared_sends_followers_upstream() {
        type Case = (&'static [(&'static str, &'static str)], &'static [u8]);
        let cases: [Case; 8] = [
            (&[("set-cookie", "s=1")], b"x"),
            (&[("cache-control", "private")], b"x"),
            (
                &[("cache-control", "no-store, private=\"x-account\"")],
                b"x",
            ),
            (&[("cache-control", "no-cache=\"x-account\"")], b"x"),
            (&[("vary", "*")], b"x"),
            (&[("vary", "X-Forwarded-For")], b"x"),
            // Over the limit of 8 bytes.
            (&[], b"123456789"),
            // A different variant.
            (&[("vary", "accept-language")], b"x"),
        ];
        for (headers, body) in cases {
            let c = collapser();
            let leader_req = request(&[("accept-language", "en")]);
            let (mut leader, rx, deadline) = pair(c, [2; 16], 8);
            let follower = request(&[("accept-language", "fr")]);
            let waiting =
                tokio::spawn(
                    async move { follow(rx, deadline).await.filter(|a| a.serves(&follower)) },
                );
            leader.header(&response(headers), &leader_req);
            leader.body(Some(&Bytes::copy_from_slice(body)), true);
            assert!(waiting.await.unwrap().is_none(), "{headers:?}");
            assert_eq!(c.flights(), 0);
        }
        // A 5xx is one backend's failure: each request may be spared it by another.
        for status in [500, 503] {
            let c = collapser();
            let req = request(&[]);
            let (mut leader, rx, deadline) = pair(c, [2; 16], 8);
            leader.header(&ResponseHeader::build(status, None).unwrap(), &req);
            assert!(
                follow(rx, deadline)
                    .await
                    .filter(|a| a.serves(&req))
                    .is_none(),
                "{status}"
            );
            assert_eq!(c.flights(), 0);
        }
    }

    #[tokio::test]
    async fn a_leader_that_fails_releases_its_followers() {
        let c = collapser();
        let req = request(&[]);
        let (mut leader, rx, deadline) = pair(c, [3; 16], 1024);
        leader.header(&response(&[]), &req);
        leader.body(Some(&Bytes::from_static(b"half")), false);
        drop(leader); // the upstream died mid-body
        assert!(follow(rx, deadline)
            .await
            .filter(|a| a.serves(&req))
            .is_none());
        assert_eq!(c.flights(), 0);
    }

    #[tokio::test]
    async fn an_empty_answer_is_shared_with_its_header() {
        let c = collapser();
        let req = request(&[]);
        let (mut leader, rx, deadline) = pair(c, [4; 16], 1024);
        // No body task follows a `Content-Length: 0` header.
        leader.header(&response(&[("content-length", "0")]), &req);
        let answer = follow(rx, deadline)
            .await
            .filter(|a| a.serves(&req))
            .expect("shared");
        assert!(answer.body.is_empty());
        assert_eq!(c.flights(), 0);
    }

    #[tokio::test]
    async fn a_flight_ends_when_its_header_finds_nobody_waiting_or_its_time_is_up() {
        let c = collapser();
        let req = request(&[]);
        let Role::Leader(mut alone) = c.join([5; 16], 1024, WAIT) else {
            panic!("leads");
        };
        alone.header(&response(&[]), &req);
        assert_eq!(c.flights(), 0, "nothing is copied for nobody");
        // A flight past its time is not joined: the next request leads a new one, which
        // the old leader's end leaves in place.
        let Role::Leader(mut old) = c.join([6; 16], 1024, Duration::ZERO) else {
            panic!("leads");
        };
        let Role::Leader(_new) = c.join([6; 16], 1024, WAIT) else {
            panic!("a new flight");
        };
        old.header(&response(&[]), &req);
        drop(old);
        assert_eq!(c.flights(), 1);
        assert!(matches!(c.join([6; 16], 1024, WAIT), Role::Follower(..)));
    }

    #[test]
    fn personal_requests_do_not_take_part() {
        assert!(Collapser::eligible(&request(&[]), true));
        assert!(!Collapser::eligible(&request(&[]), false));
        for personal in [
            "authorization",
            "cookie",
            "range",
            "upgrade",
            "expect",
            "if-none-match",
            "if-modified-since",
        ] {
            assert!(!Collapser::eligible(&request(&[(personal, "x")]), true));
        }
        let mut head = request(&[]);
        head.set_method(Method::HEAD);
        assert!(!Collapser::eligible(&head, true));
    }
}
