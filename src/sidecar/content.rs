//! kingdom-content: the content-generation upstream. Six content types rendered from
//! templates; reads are deterministic and cacheable, generation is slow (simulated model
//! latency) and identical concurrent generations are computed once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::future::{BoxFuture, FutureExt, Shared};
use ring::digest;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{ApiError, JsonBody};

/// Largest batch accepted by `POST /v1/content/batch`.
pub const MAX_BATCH: usize = 10;
/// `Cache-Control: max-age` of the deterministic GET resources, in seconds.
pub const MAX_AGE: u32 = 300;
/// Longest accepted topic or audience.
pub const MAX_TEXT: usize = 120;

/// One content type and its template.
pub struct Template {
    /// The `{type}` path segment.
    pub kind: &'static str,
    /// What it is for.
    pub description: &'static str,
    title: &'static str,
    opening: &'static str,
    points: [&'static str; 6],
    closing: &'static str,
}

/// The six templates. `{topic}`, `{audience}` and `{voice}` are filled in at render time.
pub const TEMPLATES: [Template; 6] = [
    Template {
        kind: "blog_post",
        description: "A long-form article with an introduction, key points and a conclusion.",
        title: "{Topic}: what {audience} should know",
        opening: "In this {voice} piece we look at {topic} and why it matters to {audience}.",
        points: [
            "First, {topic} is easier to start with than most people expect.",
            "Second, small, steady steps with {topic} beat one big push.",
            "Third, {audience} get the most from {topic} when they measure results.",
            "Fourth, the common mistakes with {topic} are avoidable with a checklist.",
            "Fifth, the tools around {topic} have matured a great deal.",
            "Finally, the community around {topic} is a resource worth using.",
        ],
        closing: "That is {topic} in brief; the best time for {audience} to begin is now.",
    },
    Template {
        kind: "social_post",
        description: "A short post for social networks, with a hook and a call to action.",
        title: "{Topic} in one post",
        opening: "Quick {voice} thought for {audience} on {topic}:",
        points: [
            "{Topic} rewards curiosity.",
            "Start small and share what you learn.",
            "Ask your network how they approach {topic}.",
            "Save this for later.",
            "Tag someone who cares about {topic}.",
            "More soon.",
        ],
        closing: "#{tag}",
    },
    Template {
        kind: "email",
        description: "A newsletter or outreach email with subject, body and sign-off.",
        title: "Subject: {Topic}, for {audience}",
        opening: "Hello, we are writing to {audience} in a {voice} note about {topic}.",
        points: [
            "Here is the short version: {topic} can save you time this quarter.",
            "We have put together a guide to {topic} with practical examples.",
            "Teams like yours have used it to get started within a week.",
            "If you reply to this email, we will send the guide straight over.",
            "There is no cost and no commitment.",
            "We would love to hear what you think about {topic}.",
        ],
        closing: "Best regards, the Kingdom Studios team",
    },
    Template {
        kind: "product_description",
        description: "A product page description with benefits and features.",
        title: "{Topic}",
        opening: "Meet {topic}, made for {audience} and described here in a {voice} way.",
        points: [
            "It is built to last and simple to set up.",
            "It fits the way {audience} already work.",
            "Every detail of {topic} was tested with real customers.",
            "It comes with support from people who know {topic} well.",
            "It is priced to be an easy decision.",
            "It gets better with every update.",
        ],
        closing: "Order {topic} today.",
    },
    Template {
        kind: "ad_copy",
        description: "A headline and short ad text with a call to action.",
        title: "{Topic}: made for {audience}",
        opening: "Looking for {topic}? Here it is, in a {voice} voice.",
        points: [
            "Faster than you think.",
            "Trusted by {audience}.",
            "No setup headaches.",
            "Try {topic} free.",
            "Cancel any time.",
            "Join thousands already using {topic}.",
        ],
        closing: "Get started now.",
    },
    Template {
        kind: "video_script",
        description: "A short video script with scenes and narration.",
        title: "Video: {Topic} explained",
        opening: "[Scene 1] Narrator, {voice}: Today we explain {topic} for {audience}.",
        points: [
            "[Scene 2] Show the problem {topic} solves.",
            "[Scene 3] Walk through the first step with {topic}.",
            "[Scene 4] Show a customer story from {audience}.",
            "[Scene 5] Recap the three key ideas behind {topic}.",
            "[Scene 6] Answer the most common question about {topic}.",
            "[Scene 7] Show where to learn more.",
        ],
        closing: "[End card] Subscribe for more on {topic}.",
    },
];

/// Accepted tones and the voice each gives the text.
pub const TONES: [(&str, &str); 5] = [
    ("professional", "professional"),
    ("friendly", "friendly"),
    ("playful", "light-hearted"),
    ("persuasive", "persuasive"),
    ("informative", "plain, informative"),
];

/// Accepted lengths and how many points each includes.
pub const LENGTHS: [(&str, usize); 3] = [("short", 2), ("medium", 4), ("long", 6)];

/// A validated request for one piece of content.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Spec {
    #[serde(rename = "type")]
    pub kind: String,
    pub topic: String,
    pub tone: String,
    pub audience: String,
    pub length: String,
}

/// The request fields as sent; everything but `type` and `topic` is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecFields {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub topic: Option<String>,
    pub tone: Option<String>,
    pub audience: Option<String>,
    pub length: Option<String>,
}

impl SpecFields {
    /// Validates and fills defaults (tone professional, audience "everyone", length medium).
    /// An unknown type is `Err(None)` (404 on GET paths); bad fields are listed.
    fn validate(self) -> Result<Spec, Option<Value>> {
        let mut problems = serde_json::Map::new();
        let kind = self.kind.unwrap_or_default();
        if template(&kind).is_none() {
            if kind.is_empty() {
                problems.insert("type".into(), json!("is required"));
            } else {
                problems.insert(
                    "type".into(),
                    json!(format!("unknown content type `{kind}`")),
                );
            }
        }
        let topic = self.topic.unwrap_or_default().trim().to_string();
        if topic.is_empty() || topic.chars().count() > MAX_TEXT {
            problems.insert(
                "topic".into(),
                json!(format!("must be 1 to {MAX_TEXT} characters")),
            );
        }
        let tone = self.tone.unwrap_or_else(|| "professional".into());
        if !TONES.iter().any(|(t, _)| *t == tone) {
            let names: Vec<&str> = TONES.iter().map(|(t, _)| *t).collect();
            problems.insert(
                "tone".into(),
                json!(format!("must be one of {}", names.join(", "))),
            );
        }
        let audience = self
            .audience
            .unwrap_or_else(|| "everyone".into())
            .trim()
            .to_string();
        if audience.is_empty() || audience.chars().count() > MAX_TEXT {
            problems.insert(
                "audience".into(),
                json!(format!("must be 1 to {MAX_TEXT} characters")),
            );
        }
        let length = self.length.unwrap_or_else(|| "medium".into());
        if !LENGTHS.iter().any(|(l, _)| *l == length) {
            problems.insert("length".into(), json!("must be one of short, medium, long"));
        }
        if problems.is_empty() {
            Ok(Spec {
                kind,
                topic,
                tone,
                audience,
                length,
            })
        } else {
            Err(Some(Value::Object(problems)))
        }
    }
}

fn template(kind: &str) -> Option<&'static Template> {
    TEMPLATES.iter().find(|t| t.kind == kind)
}

/// Renders a validated spec. Deterministic: the same spec gives the same bytes.
pub fn render(spec: &Spec) -> Value {
    let Some(template) = template(&spec.kind) else {
        return Value::Null;
    };
    let voice = TONES
        .iter()
        .find(|(t, _)| *t == spec.tone)
        .map_or("professional", |(_, v)| v);
    let points = LENGTHS
        .iter()
        .find(|(l, _)| *l == spec.length)
        .map_or(4, |(_, n)| *n);
    let fill = |text: &str| {
        text.replace("{Topic}", &capitalize(&spec.topic))
            .replace("{topic}", &spec.topic)
            .replace("{audience}", &spec.audience)
            .replace("{voice}", voice)
            .replace("{tag}", &spec.topic.replace(char::is_whitespace, ""))
    };
    let mut paragraphs = vec![fill(template.opening)];
    paragraphs.extend(template.points.iter().take(points).map(|p| fill(p)));
    paragraphs.push(fill(template.closing));
    let body = paragraphs.join("\n\n");
    let words = body.split_whitespace().count();
    json!({
        "type": spec.kind,
        "topic": spec.topic,
        "tone": spec.tone,
        "audience": spec.audience,
        "length": spec.length,
        "title": fill(template.title),
        "body": body,
        "word_count": words,
    })
}

fn capitalize(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

type Generation = Shared<BoxFuture<'static, Arc<Value>>>;

/// A generation in progress and how many requests wait for it.
struct InProgress {
    generation: Generation,
    waiters: usize,
}

/// Service state: generation settings and the table of generations in progress.
pub struct ContentService {
    generate_latency: Duration,
    in_progress: Mutex<HashMap<Spec, InProgress>>,
    computations: AtomicU64,
}

/// One request's place among a generation's waiters. Dropped when the request ends, finished
/// or abandoned (its client went away); the last waiter out removes the entry, so abandoned
/// generations are cancelled instead of staying in the table.
struct Waiter<'a> {
    service: &'a ContentService,
    spec: Spec,
    generation: Generation,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        let mut table = self.service.table();
        if let Some(entry) = table.get_mut(&self.spec) {
            if entry.generation.ptr_eq(&self.generation) {
                entry.waiters -= 1;
                if entry.waiters == 0 {
                    table.remove(&self.spec);
                }
            }
        }
    }
}

impl ContentService {
    /// A service whose generations take `generate_latency` (the simulated model time).
    pub fn new(generate_latency: Duration) -> Arc<Self> {
        Arc::new(Self {
            generate_latency,
            in_progress: Mutex::new(HashMap::new()),
            computations: AtomicU64::new(0),
        })
    }

    /// How many generations were actually computed (coalesced ones count once).
    pub fn computations(&self) -> u64 {
        self.computations.load(Ordering::Relaxed)
    }

    /// Generations in progress (for tests and leak checks).
    pub fn in_progress(&self) -> usize {
        self.table().len()
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<Spec, InProgress>> {
        self.in_progress.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Generates `spec`, joining an identical generation already in progress if there is one.
    pub async fn generate(self: &Arc<Self>, spec: Spec) -> Arc<Value> {
        let waiter = {
            let mut table = self.table();
            let entry = table.entry(spec.clone()).or_insert_with(|| InProgress {
                waiters: 0,
                generation: {
                    let service = self.clone();
                    let spec = spec.clone();
                    async move {
                        service.computations.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(service.generate_latency).await;
                        let mut out = render(&spec);
                        out["model"] = json!("kingdom-sim-1");
                        Arc::new(out)
                    }
                    .boxed()
                    .shared()
                },
            });
            entry.waiters += 1;
            Waiter {
                service: self,
                generation: entry.generation.clone(),
                spec,
            }
        };
        waiter.generation.clone().await
    }
}

/// Command-line flags of the content service.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub common: super::SidecarArgs,
    /// Simulated model time of one generation.
    #[arg(long, default_value = "20ms", value_parser = crate::config::units::parse_duration)]
    pub generate_latency: Duration,
    /// Largest accepted request body.
    #[arg(long, default_value = "64KiB", value_parser = crate::config::units::parse_size)]
    pub max_body: u64,
}

/// Runs the content service until it is stopped.
pub async fn main(args: Args) -> std::process::ExitCode {
    super::init_tracing(args.common.exit_on_stdin_eof);
    let routes = routes(ContentService::new(args.generate_latency));
    super::run("kingdom-content", &args.common, routes, args.max_body).await
}

/// The content API (without `/healthz` and the shared layers; see [`super::finish`]).
pub fn routes(service: Arc<ContentService>) -> Router {
    Router::new()
        .route("/v1/content/templates", get(templates))
        .route("/v1/content/generate", post(generate))
        .route("/v1/content/batch", post(batch))
        .route("/v1/content/{kind}", get(read))
        .with_state(service)
}

async fn templates(headers: HeaderMap) -> Response {
    let list: Vec<Value> = TEMPLATES
        .iter()
        .map(|t| {
            json!({
                "type": t.kind,
                "description": t.description,
                "parameters": {
                    "topic": { "required": true, "max_length": MAX_TEXT },
                    "tone": { "default": "professional", "values": TONES.iter().map(|(t, _)| *t).collect::<Vec<_>>() },
                    "audience": { "default": "everyone", "max_length": MAX_TEXT },
                    "length": { "default": "medium", "values": LENGTHS.iter().map(|(l, _)| *l).collect::<Vec<_>>() },
                },
            })
        })
        .collect();
    cacheable(&headers, json!({ "templates": list }))
}

async fn read(
    Path(kind): Path<String>,
    Query(mut query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if template(&kind).is_none() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_type",
            format!("unknown content type `{kind}`"),
        ));
    }
    let known = ["topic", "tone", "audience", "length"];
    if let Some(extra) = query.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(ApiError::invalid(json!({ extra: "unknown parameter" })));
    }
    let fields = SpecFields {
        kind: Some(kind),
        topic: query.remove("topic"),
        tone: query.remove("tone"),
        audience: query.remove("audience"),
        length: query.remove("length"),
    };
    let spec = fields
        .validate()
        .map_err(|d| ApiError::invalid(d.unwrap_or_default()))?;
    Ok(cacheable(&headers, render(&spec)))
}

/// A deterministic JSON body with `Cache-Control`, a strong `ETag`, and 304 on a matching
/// `If-None-Match`.
fn cacheable(headers: &HeaderMap, body: Value) -> Response {
    let bytes = body.to_string();
    let hash = digest::digest(&digest::SHA256, bytes.as_bytes());
    let etag: String = hash.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let etag = format!("\"{etag}\"");
    let cache_control = format!("public, max-age={MAX_AGE}");
    let matches = headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|tag| tag.trim().trim_start_matches("W/"))
        .any(|tag| tag == "*" || tag == etag);
    let mut response = if matches {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, "application/json")], bytes).into_response()
    };
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(&cache_control) {
        h.insert(header::CACHE_CONTROL, v);
    }
    response
}

fn no_store(body: Value, status: StatusCode) -> Response {
    (status, [(header::CACHE_CONTROL, "no-store")], Json(body)).into_response()
}

async fn generate(
    State(service): State<Arc<ContentService>>,
    JsonBody(fields): JsonBody<SpecFields>,
) -> Result<Response, ApiError> {
    let spec = fields
        .validate()
        .map_err(|d| ApiError::invalid(d.unwrap_or_default()))?;
    let out = service.generate(spec).await;
    Ok(no_store(out.as_ref().clone(), StatusCode::OK))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchRequest {
    items: Vec<SpecFields>,
}

async fn batch(
    State(service): State<Arc<ContentService>>,
    JsonBody(request): JsonBody<BatchRequest>,
) -> Result<Response, ApiError> {
    let count = request.items.len();
    if count == 0 || count > MAX_BATCH {
        return Err(ApiError::invalid(json!({
            "items": format!("must hold 1 to {MAX_BATCH} items (got {count})")
        })));
    }
    let mut specs = Vec::with_capacity(count);
    let mut problems = serde_json::Map::new();
    for (i, fields) in request.items.into_iter().enumerate() {
        match fields.validate() {
            Ok(spec) => specs.push(spec),
            Err(details) => {
                problems.insert(format!("items[{i}]"), details.unwrap_or_default());
            }
        }
    }
    if !problems.is_empty() {
        return Err(ApiError::invalid(Value::Object(problems)));
    }
    let results = futures::future::join_all(specs.into_iter().map(|s| service.generate(s))).await;
    let results: Vec<Value> = results.iter().map(|r| r.as_ref().clone()).collect();
    Ok(no_store(json!({ "results": results }), StatusCode::OK))
}

#[cfg(test)]
mod tests;
