//! `rlhf.remote`: a reward computed by an HTTP endpoint (a judge model behind an
//! inference server, a sandbox that runs code, a team's scoring service).
//!
//! # Protocol
//!
//! The pairs of a batch are sent in chunks of `batch_size`, each as one
//! `POST <url>` with `Content-Type: application/json`:
//!
//! ```json
//! {"pairs": [{"prompt": "What is 2+2?", "response": "4", "reference": "4"},
//!            {"prompt": "Say hi.", "response": "Hello!", "reference": null}]}
//! ```
//!
//! `reference` is the reference answer the prompt carries, `null` when it has none. The
//! endpoint answers `200` with one finite number per pair, in the same order (other
//! fields are ignored):
//!
//! ```json
//! {"scores": [1.0, 0.25]}
//! ```
//!
//! # Failures
//!
//! Up to `max_concurrency` chunks are in flight at once. A chunk whose request fails
//! (no connection, no answer within `timeout_s`, HTTP 5xx, 408 or 429, a body that is
//! not `{"scores": [numbers]}`, or the wrong number of scores) is sent again, up to
//! `retries` more times, after waiting `backoff_s`, then twice that, four times... Other
//! 4xx answers (a wrong URL, a refused token) are not retried. When a chunk still fails,
//! the batch fails with what the last attempt saw, e.g.
//! `POST http://judge:8000/score: HTTP 500 Internal Server Error after 3 attempts: <body>`,
//! and the stage that asked stops as on any error (its last checkpoint is intact).
//!
//! The reward runs its own tokio runtime, made with it and kept in it: the plugin
//! boundary shares no runtime with the host or with other plugins.
//!
//! ```yaml
//! rewards:
//!   - name: judge
//!     uses: rlhf.remote
//!     config:
//!       url: http://127.0.0.1:8000/score
//!       timeout_s: 30
//!       retries: 2
//!       backoff_s: 1.0
//!       max_concurrency: 4
//!       batch_size: 16
//!       headers: {Authorization: Bearer abc}
//! ```
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use plumb_core::plugin::{RewardContext, ValidateContext};
use plumb_core::reward::{RewardModel, ScorePair};
use plumb_core::{Error, Result};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use reqwest::{StatusCode, Url};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RemoteConfig {
    /// `http://` or `https://` endpoint that takes the POST.
    pub url: String,
    /// Seconds one attempt may take, from connecting to the last byte of the answer.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: f64,
    /// How many times a failed chunk is sent again (0: one attempt only).
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Seconds before the first retry; each further retry waits twice as long.
    #[serde(default = "default_backoff_s")]
    pub backoff_s: f64,
    /// Chunks in flight at once.
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: usize,
    /// Pairs per request.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Extra request headers, e.g. `Authorization`.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

fn default_timeout_s() -> f64 {
    30.0
}
fn default_retries() -> u32 {
    2
}
fn default_backoff_s() -> f64 {
    1.0
}
fn default_max_concurrency() -> usize {
    4
}
fn default_batch_size() -> usize {
    32
}

/// One pair as it goes over the wire: `reference` always present, `null` when none.
#[derive(Serialize)]
struct WirePair<'a> {
    prompt: &'a str,
    response: &'a str,
    reference: Option<&'a str>,
}

#[derive(Serialize)]
struct WireRequest<'a> {
    pairs: Vec<WirePair<'a>>,
}

/// The answer; fields besides `scores` are ignored.
#[derive(Deserialize)]
struct WireResponse {
    scores: Vec<f64>,
}

/// What every request of the reward shares; chunk tasks hold it through an `Arc`.
struct Endpoint {
    client: reqwest::Client,
    url: Url,
    timeout: Duration,
    /// As written, for messages ("timed out after 2 s").
    timeout_s: f64,
    retries: u32,
    backoff: Duration,
}

/// The settings checked, with errors at their keys.
fn endpoint(c: &RemoteConfig) -> Result<Endpoint> {
    let url = Url::parse(&c.url).map_err(|e| Error::config("url", format!("not a URL (`{}`): {e}", c.url)))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(Error::config("url", format!("expected an http:// or https:// URL, found `{}`", c.url)));
    }
    let seconds = |key: &str, value: f64, zero_ok: bool| {
        if value.is_finite() && (value > 0.0 || (zero_ok && value == 0.0)) && value <= 86_400.0 {
            Ok(Duration::from_secs_f64(value))
        } else {
            let least = if zero_ok { "0 or more" } else { "more than 0" };
            Err(Error::config(key, format!("expected seconds, {least} and at most a day (86400); found {value}")))
        }
    };
    let timeout = seconds("timeout_s", c.timeout_s, false)?;
    let backoff = seconds("backoff_s", c.backoff_s, true)?;
    if c.retries > 20 {
        return Err(Error::config("retries", format!("expected at most 20, found {}", c.retries)));
    }
    if c.max_concurrency == 0 {
        return Err(Error::config("max_concurrency", "expected at least 1 request in flight"));
    }
    if c.batch_size == 0 {
        return Err(Error::config("batch_size", "expected at least 1 pair per request"));
    }
    let mut headers = HeaderMap::new();
    for (name, value) in &c.headers {
        let key = format!("headers.{name}");
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| Error::config(&key, format!("`{name}` is not a valid HTTP header name")))?;
        let value = HeaderValue::from_str(value)
            .map_err(|_| Error::config(&key, "not a valid HTTP header value (visible ASCII, no line breaks)"))?;
        headers.insert(header, value);
    }
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let client = reqwest::Client::builder()
        .default_headers(headers)
        .user_agent(concat!("plumb-rlhf/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| Error::Other(format!("cannot make an HTTP client: {}", chain(&e))))?;
    Ok(Endpoint { client, url, timeout, timeout_s: c.timeout_s, retries: c.retries, backoff })
}

/// What one attempt at a chunk saw when it failed.
enum Failure {
    Http { status: StatusCode, body: String },
    Timeout,
    Connect(String),
    Malformed { error: String, body: String },
    Count { got: usize, want: usize },
    Other(String),
}

impl Failure {
    /// A 4xx other than 408 (timeout) or 429 (too many requests) will not get better by
    /// asking again; everything else might.
    fn retryable(&self) -> bool {
        match self {
            Failure::Http { status, .. } => {
                !status.is_client_error()
                    || *status == StatusCode::REQUEST_TIMEOUT
                    || *status == StatusCode::TOO_MANY_REQUESTS
            }
            _ => true,
        }
    }

    /// The message after `attempts` attempts, for a request to an endpoint whose timeout is
    /// `timeout_s`.
    fn describe(&self, attempts: u32, timeout_s: f64) -> String {
        let n = if attempts == 1 { "1 attempt".to_owned() } else { format!("{attempts} attempts") };
        match self {
            Failure::Http { status, body } => format!("HTTP {status} after {n}: {body}"),
            Failure::Timeout => format!("timed out after {timeout_s} s ({n})"),
            Failure::Connect(e) => format!("cannot connect ({n}): {e}"),
            Failure::Malformed { error, body } => {
                format!(
                    "malformed JSON after {n}: expected {{\"scores\": [numbers]}} ({error}); the answer began: {body}"
                )
            }
            Failure::Count { got, want } => format!("{got} scores for {want} pairs ({n})"),
            Failure::Other(e) => format!("{e} ({n})"),
        }
    }
}

/// The first 200 bytes of a body, as text.
fn excerpt(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(200)];
    let text = String::from_utf8_lossy(cut).into_owned();
    if bytes.len() > 200 {
        text + "…"
    } else if text.is_empty() {
        "(empty)".into()
    } else {
        text
    }
}

/// An error with its causes: reqwest's own message alone says only "error sending request".
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn sent(error: reqwest::Error) -> Failure {
    if error.is_timeout() {
        Failure::Timeout
    } else if error.is_connect() {
        Failure::Connect(chain(&error))
    } else {
        Failure::Other(chain(&error))
    }
}

impl Endpoint {
    /// One POST of one chunk, read to its scores.
    async fn post(&self, body: &[u8], count: usize) -> Result<Vec<f64>, Failure> {
        let request = self.client.post(self.url.clone()).timeout(self.timeout).body(body.to_vec());
        let response = request.send().await.map_err(sent)?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(sent)?;
        if !status.is_success() {
            return Err(Failure::Http { status, body: excerpt(&bytes) });
        }
        let answer = serde_json::from_slice::<WireResponse>(&bytes)
            .map_err(|e| Failure::Malformed { error: e.to_string(), body: excerpt(&bytes) })?;
        if answer.scores.len() != count {
            return Err(Failure::Count { got: answer.scores.len(), want: count });
        }
        Ok(answer.scores)
    }

    /// One chunk with its retries and back-off. The error names the URL and says what the
    /// last attempt saw.
    async fn chunk(&self, body: Vec<u8>, count: usize) -> Result<Vec<f64>> {
        let mut wait = self.backoff;
        let mut attempt = 1;
        loop {
            let failure = match self.post(&body, count).await {
                Ok(scores) => return Ok(scores),
                Err(failure) => failure,
            };
            if attempt > self.retries || !failure.retryable() {
                let message = failure.describe(attempt, self.timeout_s);
                let not_retried = if failure.retryable() { "" } else { " (a client error: not retried)" };
                return Err(Error::Other(format!("POST {}: {message}{not_retried}", self.url)));
            }
            tracing::warn!(
                "POST {}: {}; retrying in {:.1} s",
                self.url,
                failure.describe(attempt, self.timeout_s),
                wait.as_secs_f64()
            );
            tokio::time::sleep(wait).await;
            wait *= 2;
            attempt += 1;
        }
    }
}

pub struct Remote {
    endpoint: Arc<Endpoint>,
    batch_size: usize,
    max_concurrency: usize,
    /// The reward's own runtime: the host's, if any, is not reachable across the plugin
    /// boundary. One thread drives every request of a batch: they wait on the network,
    /// not on a CPU.
    runtime: tokio::runtime::Runtime,
}

impl RewardModel for Remote {
    fn score(&mut self, pairs: &[ScorePair]) -> Result<Vec<f64>> {
        let chunks = pairs.chunks(self.batch_size);
        let mut bodies = Vec::with_capacity(chunks.len());
        for chunk in chunks {
            let pairs = chunk
                .iter()
                .map(|p| WirePair { prompt: &p.prompt, response: &p.response, reference: p.reference.as_deref() })
                .collect();
            let body = serde_json::to_vec(&WireRequest { pairs })
                .map_err(|e| Error::Other(format!("cannot encode the request: {e}")))?;
            bodies.push((body, chunk.len()));
        }
        let count = bodies.len();
        self.runtime.block_on(async {
            let slots = Arc::new(Semaphore::new(self.max_concurrency));
            let mut tasks = JoinSet::new();
            for (index, (body, len)) in bodies.into_iter().enumerate() {
                let (endpoint, slots) = (Arc::clone(&self.endpoint), Arc::clone(&slots));
                tasks.spawn(async move {
                    // The semaphore is fair: chunks go out in order as slots free up.
                    let _slot = slots.acquire_owned().await.map_err(|e| Error::Other(e.to_string()))?;
                    endpoint.chunk(body, len).await.map(|scores| (index, scores))
                });
            }
            let mut scores: Vec<Option<Vec<f64>>> = vec![None; count];
            while let Some(joined) = tasks.join_next().await {
                // An error returns at once; dropping `tasks` cancels the chunks still out.
                let (index, chunk) = joined.map_err(|e| Error::Other(format!("a request task failed: {e}")))??;
                scores[index] = Some(chunk);
            }
            Ok(scores.into_iter().flatten().flatten().collect())
        })
    }
}

impl plumb_core::Reward for Remote {
    const NAME: &'static str = "remote";
    const DESCRIPTION: &'static str =
        "Scores from an HTTP endpoint (JSON in and out), with timeout, retries and concurrency";
    type Config = RemoteConfig;

    fn validate(c: &RemoteConfig, _: &ValidateContext) -> Result<()> {
        endpoint(c).map(|_| ())
    }

    fn new(c: RemoteConfig, _: &RewardContext) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Other(format!("cannot start the reward's tokio runtime: {e}")))?;
        Ok(Self {
            endpoint: Arc::new(endpoint(&c)?),
            batch_size: c.batch_size,
            max_concurrency: c.max_concurrency,
            runtime,
        })
    }
}

#[cfg(test)]
mod tests {
    //! Against a small HTTP/1.1 server on 127.0.0.1, one thread per connection, that
    //! counts the requests it sees.
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    use std::time::Instant;

    use plumb_core::recipe::parse_section;
    use plumb_core::Reward;

    use super::*;

    /// What the server answers to one request: status, body.
    type Behaviour = fn(&Seen, &serde_json::Value) -> (u16, String);

    #[derive(Default)]
    struct Seen {
        requests: AtomicUsize,
        in_flight: AtomicUsize,
        most_in_flight: AtomicUsize,
        bodies: Mutex<Vec<String>>,
        headers: Mutex<Vec<String>>,
    }

    struct Server {
        url: String,
        seen: Arc<Seen>,
    }

    fn serve(behaviour: Behaviour) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/score", listener.local_addr().unwrap());
        let seen = Arc::new(Seen::default());
        let shared = Arc::clone(&seen);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let seen = Arc::clone(&shared);
                std::thread::spawn(move || answer(stream, &seen, behaviour));
            }
        });
        Server { url, seen }
    }

    fn answer(stream: TcpStream, seen: &Seen, behaviour: Behaviour) {
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut length = 0;
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let header = line.trim_end().to_owned();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap();
                }
            }
            seen.headers.lock().unwrap().push(header.to_lowercase());
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        let body = String::from_utf8(body).unwrap();
        seen.requests.fetch_add(1, Ordering::SeqCst);
        let now = seen.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        seen.most_in_flight.fetch_max(now, Ordering::SeqCst);
        let (status, reply) = behaviour(seen, &serde_json::from_str(&body).unwrap());
        seen.bodies.lock().unwrap().push(body);
        seen.in_flight.fetch_sub(1, Ordering::SeqCst);
        let reason = match status {
            200 => "OK",
            404 => "Not Found",
            500 => "Internal Server Error",
            _ => "Other",
        };
        let head = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            reply.len()
        );
        let mut stream = stream;
        let _ = stream.write_all(head.as_bytes()).and_then(|_| stream.write_all(reply.as_bytes()));
    }

    /// Each response is a number; the score is that number.
    fn numbers(request: &serde_json::Value) -> Vec<f64> {
        request["pairs"].as_array().unwrap().iter().map(|p| p["response"].as_str().unwrap().parse().unwrap()).collect()
    }

    fn remote(yaml: &str) -> Result<Remote> {
        let config: RemoteConfig = parse_section(yaml).map_err(Error::Config)?;
        Remote::validate(&config, &ValidateContext::new(Vec::new()))?;
        Remote::new(config, &RewardContext::new("judge", plumb_core::tch::Device::Cpu, 0, "/tmp"))
    }

    fn pairs(n: usize) -> Vec<ScorePair> {
        (0..n).map(|i| ScorePair::new(format!("prompt {i}"), i.to_string())).collect()
    }

    #[test]
    fn scores_arrive_in_order_across_concurrent_chunks() {
        // Each request waits (up to 5 s) until three are in flight, then the earlier
        // chunks answer last: order must come from the chunk index, not from arrival.
        let server = serve(|seen, request| {
            let deadline = Instant::now() + Duration::from_secs(5);
            while seen.most_in_flight.load(Ordering::SeqCst) < 3 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            let scores = numbers(request);
            std::thread::sleep(Duration::from_millis(60 - 5 * scores[0] as u64));
            (200, serde_json::json!({ "scores": scores, "model": "judge-1" }).to_string())
        });
        let yaml =
            format!("{{url: '{}', batch_size: 3, max_concurrency: 3, headers: {{X-Token: s3cret}}}}", server.url);
        let mut reward = remote(&yaml).unwrap();
        let mut batch = pairs(10);
        batch[4].reference = Some("4".into());
        let scores = reward.score(&batch).unwrap();
        assert_eq!(scores, (0..10).map(|i| i as f64).collect::<Vec<_>>());
        assert_eq!(server.seen.requests.load(Ordering::SeqCst), 4, "10 pairs in chunks of 3");
        assert_eq!(server.seen.most_in_flight.load(Ordering::SeqCst), 3, "max_concurrency chunks at once, no more");
        let bodies = server.seen.bodies.lock().unwrap();
        let second: serde_json::Value =
            serde_json::from_str(bodies.iter().find(|b| b.contains("prompt 4")).unwrap()).unwrap();
        assert_eq!(second["pairs"][0], serde_json::json!({"prompt": "prompt 3", "response": "3", "reference": null}));
        assert_eq!(second["pairs"][1]["reference"], "4");
        let headers = server.seen.headers.lock().unwrap();
        assert!(headers.iter().any(|h| h == "x-token: s3cret"), "{headers:?}");
        assert!(headers.iter().any(|h| h == "content-type: application/json"), "{headers:?}");
        drop((bodies, headers));
        // An empty batch sends nothing.
        assert_eq!(reward.score(&[]).unwrap(), Vec::<f64>::new());
        assert_eq!(server.seen.requests.load(Ordering::SeqCst), 4);
    }

    /// The error of one failing batch of 4 pairs with `retries: 2`, and the requests seen.
    fn failing(behaviour: Behaviour, extra: &str) -> (String, usize, String) {
        let server = serve(behaviour);
        let yaml = format!("{{url: '{}', retries: 2, backoff_s: 0.01{extra}}}", server.url);
        let error = remote(&yaml).unwrap().score(&pairs(4)).unwrap_err().to_string();
        (error, server.seen.requests.load(Ordering::SeqCst), server.url)
    }

    #[test]
    fn http_500_is_retried_then_named_with_its_body() {
        let (error, requests, url) = failing(|_, _| (500, "boom: the judge is down".into()), "");
        assert_eq!(requests, 3);
        assert_eq!(
            error,
            format!("POST {url}: HTTP 500 Internal Server Error after 3 attempts: boom: the judge is down")
        );
    }

    #[test]
    fn a_timeout_is_retried_then_named() {
        let (error, requests, url) = failing(
            |_, request| {
                std::thread::sleep(Duration::from_millis(1500));
                (200, serde_json::json!({ "scores": numbers(request) }).to_string())
            },
            ", timeout_s: 0.2",
        );
        assert_eq!(requests, 3);
        assert_eq!(error, format!("POST {url}: timed out after 0.2 s (3 attempts)"));
    }

    #[test]
    fn malformed_json_is_retried_then_named_with_what_came_back() {
        let (error, requests, url) = failing(|_, _| (200, r#"{"score": [1, 2, 3, 4]}"#.into()), "");
        assert_eq!(requests, 3);
        assert!(
            error.starts_with(&format!(
                "POST {url}: malformed JSON after 3 attempts: expected {{\"scores\": [numbers]}} (missing field `scores`"
            )) && error.ends_with(r#"the answer began: {"score": [1, 2, 3, 4]}"#),
            "{error}"
        );
        let (error, _, _) = failing(|_, _| (200, r#"{"scores": [1, null, 3, 4]}"#.into()), "");
        assert!(error.contains("malformed JSON after 3 attempts") && error.contains("invalid type: null"), "{error}");
    }

    #[test]
    fn a_wrong_number_of_scores_is_retried_then_named() {
        let (error, requests, url) = failing(|_, _| (200, r#"{"scores": [1, 2, 3]}"#.into()), "");
        assert_eq!(requests, 3);
        assert_eq!(error, format!("POST {url}: 3 scores for 4 pairs (3 attempts)"));
    }

    #[test]
    fn a_client_error_is_not_retried() {
        let (error, requests, url) = failing(|_, _| (404, "no such route".into()), "");
        assert_eq!(requests, 1);
        assert_eq!(
            error,
            format!("POST {url}: HTTP 404 Not Found after 1 attempt: no such route (a client error: not retried)")
        );
    }

    #[test]
    fn a_closed_port_is_named() {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let url = format!("http://127.0.0.1:{port}/score");
        let error =
            remote(&format!("{{url: '{url}', retries: 1, backoff_s: 0}}")).unwrap().score(&pairs(1)).unwrap_err();
        let error = error.to_string();
        assert!(error.starts_with(&format!("POST {url}: cannot connect (2 attempts): ")), "{error}");
        assert!(error.to_lowercase().contains("refused"), "{error}");
    }

    #[test]
    fn bad_settings_are_errors_at_their_key() {
        let error = |yaml: &str| remote(yaml).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(error("{url: 'not a url'}").starts_with("url: not a URL (`not a url`): "));
        assert_eq!(error("{url: 'ftp://x/y'}"), "url: expected an http:// or https:// URL, found `ftp://x/y`");
        assert_eq!(
            error("{url: 'http://x', timeout_s: 0}"),
            "timeout_s: expected seconds, more than 0 and at most a day (86400); found 0"
        );
        assert_eq!(
            error("{url: 'http://x', backoff_s: -1}"),
            "backoff_s: expected seconds, 0 or more and at most a day (86400); found -1"
        );
        assert_eq!(error("{url: 'http://x', batch_size: 0}"), "batch_size: expected at least 1 pair per request");
        assert_eq!(
            error("{url: 'http://x', max_concurrency: 0}"),
            "max_concurrency: expected at least 1 request in flight"
        );
        assert_eq!(error("{url: 'http://x', retries: 50}"), "retries: expected at most 20, found 50");
        assert_eq!(
            error("{url: 'http://x', headers: {'Bad Name': v}}"),
            "headers.Bad Name: `Bad Name` is not a valid HTTP header name"
        );
        assert!(error("{url: 'http://x', timeout: 3}").starts_with("timeout"), "unknown keys are refused");
    }
}
