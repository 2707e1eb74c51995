//! Notifications out. A subscription names an event filter and a
//! destination; the matcher (`match_loop`, one cursor per deployment) turns
//! each matching event into a job of the built-in `notify` kind, so
//! retries, backoff, dead letters and the attempt history are the queue's;
//! `NotifyHandler` delivers it.
//!
//! Destinations:
//! - `webhook`: `POST url` with the event as JSON, signed
//!   `X-Kiln-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`;
//! - `slack`: a Slack incoming webhook (its URL is the secret), a readable line;
//! - `github_status`: a commit status on `<api>/repos/<repo>/statuses/<sha>`,
//!   repo and sha from the event's labels, with a token.
//!
//! Addresses on loopback, private, link-local and other non-public ranges
//! are refused unless allow-listed (`AllowList`), both when a subscription
//! is made (literal addresses) and at each delivery, where the name is
//! resolved once, every address checked, and the request pinned to a
//! checked address (no redirects), so a DNS answer cannot swap in another.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use kiln_core::{AttemptEnd, JobResult, LeasedJob, NewJob};
use kiln_db::events::{Event, EventQuery, PAGE_MAX};
use kiln_db::subscriptions::Subscription;
use kiln_db::Db;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

use crate::EventFilter;

/// The job kind deliveries run as.
pub const KIND: &str = "notify";
/// The matcher's cursor in `event_cursors`.
pub const CURSOR: &str = "notify";
/// Attempts per delivery (with the queue's exponential backoff).
pub const ATTEMPTS: i32 = 8;
const TIMEOUT: Duration = Duration::from_secs(10);
/// What of a destination's answer is kept in the delivery's result.
const ANSWER_MAX: usize = 2048;
const SECRET_MAX: usize = 4096;
const URL_MAX: usize = 2048;

/// Networks a deployment lets deliveries reach although they are not
/// public (`--notify-allow 10.0.0.0/8,127.0.0.1/32`).
#[derive(Clone, Debug, Default)]
pub struct AllowList(pub Vec<ipnet::IpNet>);

impl AllowList {
    pub fn parse(list: &str) -> Result<AllowList, String> {
        list.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<ipnet::IpNet>()
                    .or_else(|_| s.parse::<IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| format!("{s:?} is not an address or a CIDR network"))
            })
            .collect::<Result<_, _>>()
            .map(AllowList)
    }

    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        public(ip) || self.0.iter().any(|net| net.contains(&ip))
    }
}

/// Addresses anyone on the internet could also reach.
fn public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
                || (a == 198 && (b == 18 || b == 19)) // benchmarking
                || (a == 192 && b == 0 && v4.octets()[2] == 0) // IETF protocol assignments
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            let seg = v6.segments();
            let embedded = |hi: u16, lo: u16| {
                IpAddr::V4(std::net::Ipv4Addr::new(
                    (hi >> 8) as u8,
                    hi as u8,
                    (lo >> 8) as u8,
                    lo as u8,
                ))
            };
            // Forms that carry an IPv4 address reach it: judge that one.
            if seg[..6] == [0; 6] && !v6.is_loopback() && !v6.is_unspecified() {
                return public(embedded(seg[6], seg[7])); // IPv4-compatible ::a.b.c.d
            }
            if seg[0] == 0x64 && seg[1] == 0xff9b {
                return public(embedded(seg[6], seg[7])); // NAT64 64:ff9b::/96 and /48
            }
            if seg[0] == 0x2002 {
                return public(embedded(seg[1], seg[2])); // 6to4
            }
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (seg[0] & 0xfe00) == 0xfc00 // unique local
                || (seg[0] & 0xffc0) == 0xfe80 // link-local
                || (seg[0] & 0xffc0) == 0xfec0 // site-local
                || (seg[0] == 0x2001 && seg[1] == 0x0db8)) // documentation
        }
    }
}

/// A destination as the API takes it.
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Destination {
    Webhook {
        url: String,
        secret: String,
    },
    Slack {
        url: String,
    },
    GithubStatus {
        /// The API's base (GitHub Enterprise, a test server); default
        /// `https://api.github.com`.
        #[serde(default)]
        url: Option<String>,
        token: String,
        /// The labels holding `owner/repo` and the commit (`repo`, `sha`).
        #[serde(default)]
        repo_label: Option<String>,
        #[serde(default)]
        sha_label: Option<String>,
        /// The status's context (default `kiln/<event family>`).
        #[serde(default)]
        context: Option<String>,
    },
}

impl Destination {
    /// Checks it and splits it into what may be shown and the secret.
    pub fn split(self, allow: &AllowList) -> Result<(Value, String), String> {
        let check_secret = |what: &str, secret: &str| {
            if secret.is_empty() || secret.len() > SECRET_MAX {
                Err(format!("{what} must be 1 to {SECRET_MAX} bytes"))
            } else {
                Ok(())
            }
        };
        match self {
            Destination::Webhook { url, secret } => {
                check_url(&url, allow)?;
                check_secret("secret", &secret)?;
                Ok((json!({"kind": "webhook", "url": url}), secret))
            }
            Destination::Slack { url } => {
                let parsed = check_url(&url, allow)?;
                // An incoming webhook's URL is its credential: only the host shows.
                let shown = format!(
                    "{}://{}/…",
                    parsed.scheme(),
                    parsed.host_str().unwrap_or("")
                );
                Ok((json!({"kind": "slack", "url": shown}), url))
            }
            Destination::GithubStatus {
                url,
                token,
                repo_label,
                sha_label,
                context,
            } => {
                let base = url.unwrap_or_else(|| "https://api.github.com".to_string());
                let parsed = check_url(&base, allow)?;
                // Paths are appended to the base: no query or fragment that
                // would turn them into something else.
                if parsed.query().is_some() || parsed.fragment().is_some() {
                    return Err("the API base takes no query or fragment".into());
                }
                check_secret("token", &token)?;
                if let Some(context) = &context {
                    if context.is_empty() || context.len() > 255 {
                        return Err("context must be 1 to 255 bytes".into());
                    }
                }
                for label in [&repo_label, &sha_label].into_iter().flatten() {
                    kiln_core::names::check_name("label", label).map_err(|e| e.to_string())?;
                }
                Ok((
                    json!({"kind": "github_status", "url": base,
                           "repo_label": repo_label.unwrap_or_else(|| "repo".into()),
                           "sha_label": sha_label.unwrap_or_else(|| "sha".into()),
                           "context": context}),
                    token,
                ))
            }
        }
    }
}

/// An http(s) URL whose host, when written as an address, is allowed.
pub fn check_url(url: &str, allow: &AllowList) -> Result<reqwest::Url, String> {
    if url.len() > URL_MAX {
        return Err(format!("a URL is at most {URL_MAX} bytes"));
    }
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err("only http and https destinations".into());
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("credentials do not go in the URL".into());
    }
    match parsed.host() {
        None => return Err("the URL has no host".into()),
        Some(url::Host::Ipv4(ip)) if !allow.allows(IpAddr::V4(ip)) => {
            return Err(format!(
                "{ip} is not a public address and is not allow-listed"
            ))
        }
        Some(url::Host::Ipv6(ip)) if !allow.allows(IpAddr::V6(ip)) => {
            return Err(format!(
                "{ip} is not a public address and is not allow-listed"
            ))
        }
        Some(_) => {}
    }
    Ok(parsed)
}

/// A subscription's filter as stored: `{types: [..], resource, labels: {..}}`.
pub fn filter_of(stored: &Value) -> Result<EventFilter, String> {
    let types: Vec<String> = match stored.get("types") {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| format!("types: {e}"))?,
    };
    if types.iter().any(|t| t.contains(',')) {
        return Err("a type holds no comma".into());
    }
    let resource = match stored.get("resource") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(_) => return Err("resource must be kind:id".into()),
    };
    let mut filter =
        EventFilter::parse(Some(&types.join(",")), resource, None).map_err(|e| e.to_string())?;
    let labels: BTreeMap<String, String> = match stored.get("labels") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| format!("labels: {e}"))?,
    };
    if labels.len() > 32 {
        return Err("at most 32 labels".into());
    }
    filter.labels = labels;
    Ok(filter)
}

/// Turns matching events into `notify` jobs, from the deployment's cursor,
/// until `stop`. A job's idempotency key names the subscription and the
/// event, so two matchers (or a crash before the cursor moved) make one
/// delivery.
pub async fn match_loop(db: Db, stop: CancellationToken) {
    let mut failures = 0u32;
    while !stop.is_cancelled() {
        match match_from_cursor(&db, &stop).await {
            Ok(()) => return,
            Err(error) => {
                failures += 1;
                tracing::warn!(%error, "the notification matcher stopped; starting again");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200 << failures.min(5))) => {}
                    _ = stop.cancelled() => return,
                }
            }
        }
    }
}

async fn match_from_cursor(db: &Db, stop: &CancellationToken) -> Result<(), kiln_db::DbError> {
    let ready = db.events_ready();
    let mut cursor = db.event_cursor(CURSOR).await?;
    if cursor == 0 {
        // A new deployment's matcher starts at the present, not the past.
        cursor = db.event_last().await?;
        db.event_cursor_put(CURSOR, cursor, crate::now_millis())
            .await?;
    }
    loop {
        let notified = ready.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let subscriptions = db.subscription_list(None).await?;
        let events = if subscriptions.is_empty() {
            // Nothing to match: step over the log without reading it.
            let last = db.event_last().await?;
            if last > cursor {
                cursor = last;
                db.event_cursor_put(CURSOR, cursor, crate::now_millis())
                    .await?;
            }
            Vec::new()
        } else {
            db.event_read(&EventQuery {
                after: cursor,
                limit: PAGE_MAX,
                ..Default::default()
            })
            .await?
        };
        if let Some(last) = events.last().map(|e| e.id) {
            let filters: Vec<(&Subscription, Option<EventFilter>)> = subscriptions
                .iter()
                .map(|s| (s, filter_of(&s.filter).ok()))
                .collect();
            for event in &events {
                if is_delivery(event) {
                    continue;
                }
                for (subscription, filter) in &filters {
                    let Some(filter) = filter else { continue };
                    if event.time < subscription.created_at
                        || !filter.matches(&subscription.tenant, event)
                    {
                        continue;
                    }
                    db.job_insert(&delivery_job(subscription, event), crate::now_millis())
                        .await?;
                }
            }
            cursor = last;
            db.event_cursor_put(CURSOR, cursor, crate::now_millis())
                .await?;
            if events.len() as i64 == PAGE_MAX {
                continue;
            }
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.cancelled() => return Ok(()),
        }
    }
}

/// A delivery's own job events never trigger deliveries.
fn is_delivery(event: &Event) -> bool {
    event.resource.kind == "job" && event.data.get("kind").and_then(Value::as_str) == Some(KIND)
}

/// The `notify` job that delivers `event` to `subscription` (rules that
/// notify make one too, with a key of their own).
pub fn delivery_job(subscription: &Subscription, event: &Event) -> NewJob {
    let spec = json!({"subscription": subscription.id, "event": event});
    let mut job = NewJob::new(&subscription.tenant, KIND, spec);
    job.queue = KIND.to_string();
    job.max_attempts = ATTEMPTS;
    // `kiln:` keys are refused at the API, so no tenant can take this one
    // first and swallow the delivery.
    job.idempotency_key = Some(format!("kiln:notify:{}:{}", subscription.id, event.id));
    job.labels = BTreeMap::from([
        ("subscription".to_string(), subscription.id.clone()),
        ("event_type".to_string(), event.kind.clone()),
    ]);
    job
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NotifySpec {
    subscription: String,
    event: Value,
}

/// Delivers `notify` jobs.
pub struct NotifyHandler {
    pub db: Db,
    pub allow: AllowList,
}

enum Outcome {
    Delivered(u16, String),
    /// Worth another attempt (a timeout, 5xx, 408, 429).
    Retry(String),
    /// Never will be (4xx, a forbidden address, a missing label).
    Refused(String),
}

#[async_trait::async_trait]
impl kiln_worker::JobHandler for NotifyHandler {
    async fn run(&self, job: &LeasedJob, kill: CancellationToken) -> AttemptEnd {
        let started = Instant::now();
        let outcome = tokio::select! {
            outcome = self.deliver(job) => outcome,
            _ = kill.cancelled() => Outcome::Retry("killed".into()),
        };
        let result = |exit_code: i32, stdout: String| JobResult {
            exit_code,
            stdout,
            stderr: String::new(),
            duration_ms: i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX),
            truncated: false,
            files: Vec::new(),
        };
        match outcome {
            Outcome::Delivered(status, answer) => {
                AttemptEnd::Succeeded(result(0, format!("HTTP {status}\n{answer}")))
            }
            Outcome::Retry(error) => AttemptEnd::Failed {
                result: None,
                error,
                permanent: false,
            },
            Outcome::Refused(error) => AttemptEnd::Failed {
                result: None,
                error,
                permanent: true,
            },
        }
    }
}

impl NotifyHandler {
    async fn deliver(&self, job: &LeasedJob) -> Outcome {
        let spec: NotifySpec = match serde_json::from_value(job.spec.clone()) {
            Ok(spec) => spec,
            Err(error) => return Outcome::Refused(format!("invalid notify spec: {error}")),
        };
        let subscription = match self
            .db
            .subscription_get(&job.tenant, &spec.subscription)
            .await
        {
            Ok(Some(s)) => s,
            Ok(None) => return Outcome::Refused("the subscription was deleted".into()),
            Err(error) => return Outcome::Retry(format!("database: {error}")),
        };
        let secret = subscription.secret.clone().unwrap_or_default();
        let destination = &subscription.destination;
        let kind = destination["kind"].as_str().unwrap_or_default();
        let event = &spec.event;
        let (url, body, headers) = match kind {
            "webhook" => {
                let body = event.to_string();
                let t = crate::now_millis() / 1000;
                let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
                    .expect("HMAC takes keys of any length");
                mac.update(format!("{t}.{body}").as_bytes());
                let signature = hex::encode(mac.finalize().into_bytes());
                let headers = vec![
                    ("x-kiln-signature", format!("t={t},v1={signature}")),
                    (
                        "x-kiln-event",
                        event["type"].as_str().unwrap_or("").to_string(),
                    ),
                    ("x-kiln-delivery", job.id.to_string()),
                ];
                let url = destination["url"].as_str().unwrap_or_default().to_string();
                (url, body, headers)
            }
            "slack" => {
                let body = json!({"text": slack_text(event)}).to_string();
                (secret.clone(), body, Vec::new())
            }
            "github_status" => match github_status(destination, event, &secret) {
                Ok(request) => request,
                Err(error) => return Outcome::Refused(error),
            },
            other => return Outcome::Refused(format!("unknown destination kind {other:?}")),
        };
        post(&url, body, headers, &self.allow).await
    }
}

fn slack_text(event: &Value) -> String {
    let kind = event["type"].as_str().unwrap_or("event");
    let resource = format!(
        "{} {}",
        event["resource"]["kind"].as_str().unwrap_or(""),
        event["resource"]["id"].as_str().unwrap_or("")
    );
    let mut text = format!("kiln: *{kind}* — {resource}");
    for field in ["pipeline", "step", "kind", "queue", "error", "reason"] {
        if let Some(value) = event["data"][field].as_str() {
            text.push_str(&format!("\n{field}: {value}"));
        }
    }
    text
}

/// A POST to make: `(url, body, headers)`.
type Request = (String, String, Vec<(&'static str, String)>);

/// The commit status request for an event.
fn github_status(destination: &Value, event: &Value, token: &str) -> Result<Request, String> {
    let label = |name: &str| -> Result<String, String> {
        let key = destination[name]
            .as_str()
            .unwrap_or(name.trim_end_matches("_label"));
        event["labels"][key]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("the event has no label {key:?} for the commit status"))
    };
    let repo = label("repo_label")?;
    let sha = label("sha_label")?;
    let plain = |s: &str| {
        !s.is_empty()
            && s.len() <= 100
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && s != "."
            && s != ".."
    };
    match repo.split_once('/') {
        Some((owner, name)) if plain(owner) && plain(name) => {}
        _ => return Err(format!("{repo:?} is not owner/repo")),
    }
    if !(7..=64).contains(&sha.len()) || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("{sha:?} is not a commit id"));
    }
    let kind = event["type"].as_str().unwrap_or("");
    let (family, action) = kind.split_once('.').unwrap_or((kind, ""));
    let state = match action {
        "succeeded" => "success",
        "failed" | "dead" => "failure",
        "cancelled" | "skipped" => "error",
        _ => "pending",
    };
    let context = destination["context"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| format!("kiln/{family}"));
    let description = format!(
        "{kind} {} {}",
        event["resource"]["kind"].as_str().unwrap_or(""),
        event["resource"]["id"].as_str().unwrap_or("")
    );
    let base = destination["url"]
        .as_str()
        .unwrap_or("https://api.github.com")
        .trim_end_matches('/');
    let body = json!({"state": state, "context": context, "description": description}).to_string();
    Ok((
        format!("{base}/repos/{repo}/statuses/{sha}"),
        body,
        vec![
            ("authorization", format!("Bearer {token}")),
            ("accept", "application/vnd.github+json".into()),
            ("user-agent", "kiln".into()),
        ],
    ))
}

/// One POST to a checked, pinned address.
async fn post(
    url: &str,
    body: String,
    headers: Vec<(&'static str, String)>,
    allow: &AllowList,
) -> Outcome {
    let parsed = match check_url(url, allow) {
        Ok(parsed) => parsed,
        Err(error) => return Outcome::Refused(error),
    };
    let Some(host) = parsed.host_str().map(str::to_string) else {
        return Outcome::Refused("the URL has no host".into());
    };
    let port = parsed.port_or_known_default().unwrap_or(443);
    let lookup_host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let addresses: Vec<SocketAddr> =
        match tokio::net::lookup_host((lookup_host.as_str(), port)).await {
            Ok(found) => found.collect(),
            Err(error) => return Outcome::Retry(format!("cannot resolve {host}: {error}")),
        };
    let Some(first) = addresses.first().copied() else {
        return Outcome::Retry(format!("{host} has no address"));
    };
    if let Some(bad) = addresses.iter().find(|a| !allow.allows(a.ip())) {
        return Outcome::Refused(format!(
            "{host} resolves to {}, which is not public and not allow-listed",
            bad.ip()
        ));
    }
    let client = match reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        // A proxy would resolve the name again, undoing the pinning.
        .no_proxy()
        .timeout(TIMEOUT)
        .resolve(&lookup_host, first)
        .build()
    {
        Ok(client) => client,
        Err(error) => return Outcome::Retry(format!("HTTP client: {}", error.without_url())),
    };
    let mut request = client
        .post(parsed)
        .header("content-type", "application/json")
        .body(body);
    for (name, value) in headers {
        request = request.header(name, value);
    }
    let response = match request.send().await {
        Ok(response) => response,
        // Without the URL: a Slack webhook's URL is its secret.
        Err(error) => return Outcome::Retry(format!("POST {host}: {}", error.without_url())),
    };
    let status = response.status();
    let mut answer = Vec::new();
    let mut response = response;
    while answer.len() < ANSWER_MAX {
        match response.chunk().await {
            Ok(Some(chunk)) => answer.extend_from_slice(&chunk),
            _ => break,
        }
    }
    answer.truncate(ANSWER_MAX);
    let answer = String::from_utf8_lossy(&answer).into_owned();
    if status.is_success() {
        Outcome::Delivered(status.as_u16(), answer)
    } else if status.is_server_error()
        || status == reqwest::StatusCode::REQUEST_TIMEOUT
        || status == reqwest::StatusCode::TOO_MANY_REQUESTS
    {
        Outcome::Retry(format!("{host} answered {status}"))
    } else {
        Outcome::Refused(format!("{host} answered {status}: {}", answer.trim()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_or_listed_addresses_pass() {
        let none = AllowList::default();
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.0.1",
            "172.16.0.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "64:ff9b::a00:1",
            "::10.0.0.1",
            "2002:a00:1::1",
            "fec0::1",
            "192.0.0.1",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "255.255.255.255",
        ] {
            assert!(!none.allows(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["1.1.1.1", "140.82.112.3", "2606:4700::1111"] {
            assert!(none.allows(ip.parse().unwrap()), "{ip}");
        }
        let listed = AllowList::parse("127.0.0.1, 10.0.0.0/8").unwrap();
        assert!(listed.allows("127.0.0.1".parse().unwrap()));
        assert!(listed.allows("::ffff:127.0.0.1".parse().unwrap()));
        assert!(listed.allows("10.9.9.9".parse().unwrap()));
        assert!(!listed.allows("127.0.0.2".parse().unwrap()));
        assert!(AllowList::parse("nope").is_err());
    }

    #[test]
    fn urls_are_checked_before_anything_is_stored() {
        let none = AllowList::default();
        assert!(check_url("https://hooks.example.com/x", &none).is_ok());
        assert!(check_url("http://127.0.0.1:9/x", &none).is_err());
        assert!(check_url("http://[::1]/x", &none).is_err());
        assert!(check_url("file:///etc/passwd", &none).is_err());
        assert!(check_url("https://user:pw@example.com/", &none).is_err());
        assert!(check_url("not a url", &none).is_err());
    }

    #[test]
    fn commit_statuses_refuse_labels_that_would_leave_the_path() {
        let destination = json!({"kind": "github_status", "url": "http://127.0.0.1:1",
            "repo_label": "repo", "sha_label": "sha", "context": null});
        let event = |repo: &str, sha: &str| {
            json!({"type": "run.succeeded", "resource": {"kind": "run", "id": "7"},
                   "labels": {"repo": repo, "sha": sha}})
        };
        let (url, body, _) =
            github_status(&destination, &event("acme/app", "0123abcd"), "t").unwrap();
        assert_eq!(url, "http://127.0.0.1:1/repos/acme/app/statuses/0123abcd");
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["state"], "success");
        assert_eq!(body["context"], "kiln/run");
        assert!(github_status(&destination, &event("../x", "0123abcd"), "t").is_err());
        assert!(github_status(&destination, &event("a/..", "0123abcd"), "t").is_err());
        assert!(github_status(&destination, &event("acme/app", "../../x"), "t").is_err());
    }
}
