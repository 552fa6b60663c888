//! Identical concurrent GETs collapsed into one upstream request even when its answer is
//! not stored (a route's `cache.coalesce_uncacheable`), for hot endpoints whose answers say
//! `no-store` or `max-age=0`.
//!
//! The cache lock coalesces misses only while an answer may be stored: once a key is known
//! not to be (hit-for-pass), its requests go upstream in parallel. Here the first request
//! for a key leads: the others wait (at most `cache.lock_timeout`) and get a copy of its
//! answer once the whole body is in, or fetch for themselves when it cannot be shared: a
//! failed or cut exchange, a body over `cache.max_object`, `Set-Cookie`, `private`,
//! `Vary: *`, or a `Vary` whose headers differ between the two requests.
//!
//! Requests whose answers may be personal or partial do not take part: those with
//! `Authorization`, `Cookie`, `Range` or a condition (`If-None-Match`, `If-Modified-Since`,
//! ...), and any with a body.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{header, HeaderName, HeaderValue, Method};
use pingora::cache::cache_control::CacheControl;
use pingora::cache::key::HashBinary;
use pingora::http::{RequestHeader, ResponseHeader};
use tokio::sync::watch;

/// Shards of the in-flight map.
const SHARDS: usize = 16;

/// A leader's answer as its followers get it: `None` while it is in flight; then a copy,
/// or `Some(None)` when it cannot be shared (each follower fetches for itself).
type Outcome = Option<Option<Arc<Answer>>>;

/// The requests in flight that others may collapse into, by key.
pub struct Collapser {
    shards: [Mutex<HashMap<HashBinary, watch::Receiver<Outcome>>>; SHARDS],
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
    /// Another: it waits for the leader's answer.
    Follower(watch::Receiver<Outcome>),
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
        const PERSONAL: [HeaderName; 8] = [
            header::AUTHORIZATION,
            header::COOKIE,
            header::RANGE,
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

    /// Joins the flight for `key`, leading it when there is none.
    pub fn join(&'static self, key: HashBinary, req: &RequestHeader, limit: usize) -> Role {
        let mut shard = self.shard(&key).lock().unwrap();
        if let Some(receiver) = shard.get(&key) {
            return Role::Follower(receiver.clone());
        }
        let (sender, receiver) = watch::channel(None);
        shard.insert(key, receiver);
        Role::Leader(Box::new(Leader {
            collapser: self,
            key,
            sender,
            request: req.clone(),
            header: None,
            body: BytesMut::new(),
            limit,
        }))
    }

    /// Requests leading a flight now.
    pub fn flights(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap().len()).sum()
    }

    fn shard(&self, key: &HashBinary) -> &Mutex<HashMap<HashBinary, watch::Receiver<Outcome>>> {
        &self.shards[key[0] as usize % SHARDS]
    }
}

/// Waits up to `timeout` for the leader's answer; `None` when the follower must fetch for
/// itself (nothing to share, a leader gone, the wait over, or a variant not its own).
pub async fn follow(
    mut receiver: watch::Receiver<Outcome>,
    req: &RequestHeader,
    timeout: Duration,
) -> Option<Arc<Answer>> {
    let waited = tokio::time::timeout(timeout, receiver.wait_for(Option::is_some)).await;
    let answer = match waited {
        Ok(Ok(outcome)) => outcome.clone().flatten()?,
        _ => return None,
    };
    answer.serves(req).then_some(answer)
}

impl Answer {
    /// Whether this answer is the variant `req` asks for.
    fn serves(&self, req: &RequestHeader) -> bool {
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
    sender: watch::Sender<Outcome>,
    request: RequestHeader,
    header: Option<ResponseHeader>,
    body: BytesMut,
    limit: usize,
}

impl Leader {
    /// The upstream's answer header (a later attempt's replaces an earlier one's). One
    /// that cannot be shared ends the flight at once.
    pub fn header(&mut self, resp: &ResponseHeader) {
        self.body.clear();
        self.header = shareable(resp).then(|| resp.clone());
        if self.header.is_none() {
            self.finish(None);
        }
    }

    /// A piece of the upstream's body; the last one completes the answer.
    pub fn body(&mut self, chunk: Option<&Bytes>, end_of_stream: bool) {
        if self.header.is_none() {
            return;
        }
        if let Some(chunk) = chunk {
            if self.body.len() + chunk.len() > self.limit {
                self.header = None;
                self.finish(None);
                return;
            }
            self.body.extend_from_slice(chunk);
        }
        if end_of_stream {
            let header = self.header.take().expect("checked above");
            let varied = vary_names(&header)
                .map(|name| {
                    let values = values_of(&self.request, &name);
                    (name, values)
                })
                .collect();
            let answer = Answer {
                header,
                body: std::mem::take(&mut self.body).freeze(),
                varied,
            };
            self.finish(Some(Arc::new(answer)));
        }
    }

    /// Tells the followers, and leaves the map: later requests start a new flight.
    fn finish(&mut self, answer: Option<Arc<Answer>>) {
        if self.sender.borrow().is_none() {
            self.sender.send_replace(Some(answer));
            let mut shard = self.collapser.shard(&self.key).lock().unwrap();
            shard.remove(&self.key);
        }
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        self.finish(None);
    }
}

/// Whether an answer may be given to requests other than the one that asked for it.
fn shareable(resp: &ResponseHeader) -> bool {
    let personal = resp.headers.contains_key(header::SET_COOKIE)
        || CacheControl::from_resp_headers(resp).is_some_and(|cc| cc.private())
        || vary_names(resp).any(|name| name.as_str() == "*");
    // A 206 answers a range and a 304 a condition (the cache's own, revalidating): requests
    // with either do not take part. A 1xx is not final.
    let status = resp.status.as_u16();
    !personal && status >= 200 && status != 206 && status != 304
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

    #[tokio::test]
    async fn followers_get_the_leaders_complete_answer_and_the_flight_ends() {
        let c = collapser();
        let req = request(&[]);
        let Role::Leader(mut leader) = c.join([1; 16], &req, 1024) else {
            panic!("first leads");
        };
        let Role::Follower(rx) = c.join([1; 16], &req, 1024) else {
            panic!("second follows");
        };
        let waiting = tokio::spawn(async move { follow(rx, &request(&[]), WAIT).await });
        leader.header(&response(&[("cache-control", "no-store")]));
        leader.body(Some(&Bytes::from_static(b"hot ")), false);
        leader.body(Some(&Bytes::from_static(b"stuff")), true);
        let answer = waiting.await.unwrap().expect("shared");
        assert_eq!(&answer.body[..], b"hot stuff");
        assert_eq!(c.flights(), 0);
        // The next request leads a new flight.
        assert!(matches!(c.join([1; 16], &req, 1024), Role::Leader(_)));
    }

    #[tokio::test]
    async fn what_cannot_be_shared_sends_followers_upstream() {
        type Case = (&'static [(&'static str, &'static str)], &'static [u8]);
        let cases: [Case; 5] = [
            (&[("set-cookie", "s=1")], b"x"),
            (&[("cache-control", "private")], b"x"),
            (&[("vary", "*")], b"x"),
            // Over the limit of 8 bytes.
            (&[], b"123456789"),
            // A different variant.
            (&[("vary", "accept-language")], b"x"),
        ];
        for (headers, body) in cases {
            let c = collapser();
            let leader_req = request(&[("accept-language", "en")]);
            let Role::Leader(mut leader) = c.join([2; 16], &leader_req, 8) else {
                panic!("leads");
            };
            let Role::Follower(rx) = c.join([2; 16], &leader_req, 8) else {
                panic!("follows");
            };
            let follower = request(&[("accept-language", "fr")]);
            let waiting = tokio::spawn(async move { follow(rx, &follower, WAIT).await });
            leader.header(&response(headers));
            leader.body(Some(&Bytes::copy_from_slice(body)), true);
            assert!(waiting.await.unwrap().is_none(), "{headers:?}");
            assert_eq!(c.flights(), 0);
        }
    }

    #[tokio::test]
    async fn a_leader_that_fails_releases_its_followers() {
        let c = collapser();
        let req = request(&[]);
        let Role::Leader(mut leader) = c.join([3; 16], &req, 1024) else {
            panic!("leads");
        };
        let Role::Follower(rx) = c.join([3; 16], &req, 1024) else {
            panic!("follows");
        };
        leader.header(&response(&[]));
        leader.body(Some(&Bytes::from_static(b"half")), false);
        drop(leader); // the upstream died mid-body
        assert!(follow(rx, &req, WAIT).await.is_none());
        assert_eq!(c.flights(), 0);
    }

    #[test]
    fn personal_requests_do_not_take_part() {
        assert!(Collapser::eligible(&request(&[]), true));
        assert!(!Collapser::eligible(&request(&[]), false));
        for personal in [
            "authorization",
            "cookie",
            "range",
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
