//! Client commands: talk to a kiln API over HTTP.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Args;
use serde_json::{json, Value};

#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// The API's base URL.
    #[arg(
        long,
        env = "KILN_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub url: String,
    /// API key (default: the admin key in the data dir).
    #[arg(long, env = "KILN_API_KEY", hide_env_values = true, global = true)]
    pub key: Option<String>,
    /// Data dir holding admin.key.
    #[arg(long, env = "KILN_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
}

pub struct Client {
    http: reqwest::Client,
    base: String,
    key: String,
}

impl Client {
    pub fn new(args: &ClientArgs) -> anyhow::Result<Client> {
        let key = match &args.key {
            Some(key) => key.clone(),
            None => {
                let path = args
                    .data_dir
                    .clone()
                    .unwrap_or_else(crate::config::default_data_dir)
                    .join("admin.key");
                std::fs::read_to_string(&path)
                    .with_context(|| {
                        format!(
                            "no API key: pass --key or KILN_API_KEY, or run `kiln serve` to create {}",
                            path.display()
                        )
                    })?
                    .trim()
                    .to_string()
            }
        };
        Ok(Client {
            http: reqwest::Client::new(),
            base: args.url.trim_end_matches('/').to_string(),
            key,
        })
    }

    /// Sends with the key; a non-2xx answer becomes an error naming its
    /// status and the API's error code and message.
    async fn respond(&self, request: reqwest::RequestBuilder) -> anyhow::Result<Bytes> {
        let response = request
            .bearer_auth(&self.key)
            .send()
            .await
            .with_context(|| format!("cannot reach kiln at {}", self.base))?;
        let status = response.status();
        let body = response.bytes().await?;
        if !status.is_success() {
            let error: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let message = error["error"]["message"]
                .as_str()
                .unwrap_or("request failed");
            let code = error["error"]["code"].as_str().unwrap_or("error");
            bail!("{status} {code}: {message}");
        }
        Ok(body)
    }

    /// A JSON answer (`null` for an empty body).
    async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let body = self.respond(request).await?;
        if body.is_empty() {
            return Ok(Value::Null);
        }
        Ok(serde_json::from_slice(&body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned())))
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A streamed answer (Server-Sent Events), resuming after `last_id`.
    pub async fn stream(
        &self,
        path: &str,
        last_id: Option<i64>,
    ) -> anyhow::Result<reqwest::Response> {
        let mut request = self
            .http
            .get(self.url(path))
            .bearer_auth(&self.key)
            .header("accept", "text/event-stream");
        if let Some(id) = last_id {
            request = request.header("last-event-id", id.to_string());
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach kiln at {}", self.base))?;
        let status = response.status();
        if !status.is_success() {
            let error: Value = response.json().await.unwrap_or(Value::Null);
            let message = error["error"]["message"]
                .as_str()
                .unwrap_or("request failed");
            let code = error["error"]["code"].as_str().unwrap_or("error");
            bail!("{status} {code}: {message}");
        }
        Ok(response)
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.send(self.http.get(self.url(path))).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.send(self.http.post(self.url(path)).json(body)).await
    }

    pub async fn put(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.send(self.http.put(self.url(path)).json(body)).await
    }

    pub async fn delete(&self, path: &str) -> anyhow::Result<Value> {
        self.send(self.http.delete(self.url(path))).await
    }

    pub async fn post_bytes(
        &self,
        path: &str,
        content_type: &str,
        bytes: Vec<u8>,
    ) -> anyhow::Result<Value> {
        let request = self.http.post(self.url(path));
        self.send(request.header("content-type", content_type).body(bytes))
            .await
    }

    pub async fn put_bytes(&self, path: &str, bytes: Vec<u8>) -> anyhow::Result<Value> {
        let request = self.http.put(self.url(path));
        self.send(
            request
                .header("content-type", "application/octet-stream")
                .body(bytes),
        )
        .await
    }

    /// A raw body (file downloads).
    pub async fn get_bytes(&self, path: &str) -> anyhow::Result<Vec<u8>> {
        Ok(self.respond(self.http.get(self.url(path))).await?.to_vec())
    }
}

pub fn print(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

pub fn parse_labels(labels: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    labels
        .iter()
        .map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("label {l:?} is not key=value"))
        })
        .collect()
}

/// Pushes a module file (binary, or WAT when it ends in .wat) and returns its id.
pub async fn push_module(client: &Client, file: &std::path::Path) -> anyhow::Result<String> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let content_type = if file.extension().is_some_and(|e| e == "wat") {
        "text/plain"
    } else {
        "application/wasm"
    };
    let module = client
        .post_bytes("/api/v1/modules", content_type, bytes)
        .await?;
    module["id"]
        .as_str()
        .map(str::to_string)
        .context("the server answered without an id")
}

/// Prints a finished job's output the way the program printed it and
/// returns the exit code to leave with.
pub fn finish_like_the_program(job: &Value) -> i32 {
    use std::io::Write;
    let result = &job["result"];
    if let Some(out) = result["stdout"].as_str() {
        let _ = std::io::stdout().write_all(out.as_bytes());
    }
    if let Some(err) = result["stderr"].as_str() {
        let _ = std::io::stderr().write_all(err.as_bytes());
    }
    let status = job["status"].as_str().unwrap_or("");
    if status == "succeeded" {
        return 0;
    }
    if let Some(error) = job["error"].as_str() {
        if !error.starts_with("exit code") {
            eprintln!(
                "kiln: job {} {status}: {error}",
                job["id"].as_str().unwrap_or("?")
            );
        }
    }
    match result["exit_code"].as_i64() {
        Some(code) if code > 0 && code < 256 => code as i32,
        _ => 1,
    }
}

pub fn run_body(kind: &str, spec: Value, timeout_ms: Option<i64>) -> Value {
    let mut body = json!({"kind": kind, "spec": spec});
    if let Some(timeout_ms) = timeout_ms {
        body["timeout_ms"] = json!(timeout_ms);
    }
    body
}

/// The most a frame may hold before the stream is dropped and resumed.
const SSE_FRAME_MAX: usize = 16 << 20;

impl Client {
    /// Follows a Server-Sent Events stream from after `last`, reconnecting
    /// (with `Last-Event-ID`, so nothing is missed or repeated) until
    /// `on_frame` returns an exit code; a 4xx is final.
    pub async fn follow(
        &self,
        path: &str,
        mut last: Option<i64>,
        mut on_frame: impl FnMut(SseFrame) -> Option<i32>,
    ) -> anyhow::Result<i32> {
        let mut failures = 0u32;
        loop {
            let mut response = match self.stream(path, last).await {
                Ok(response) => response,
                // Refused (a bad filter, a bad key, no such job): no retrying.
                Err(error) if error.to_string().starts_with('4') => return Err(error),
                Err(error) => {
                    failures += 1;
                    eprintln!("kiln: {error:#}; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(
                        500 * u64::from(failures.min(10)),
                    ))
                    .await;
                    continue;
                }
            };
            failures = 0;
            // Bytes, not text: a character split across chunks stays whole.
            let mut buffer: Vec<u8> = Vec::new();
            while let Ok(Some(chunk)) = response.chunk().await {
                buffer.extend_from_slice(&chunk);
                while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
                    let frame: Vec<u8> = buffer.drain(..end + 2).collect();
                    let frame = SseFrame::parse(&String::from_utf8_lossy(&frame));
                    if frame.id.is_some() {
                        last = frame.id;
                    }
                    if let Some(code) = on_frame(frame) {
                        return Ok(code);
                    }
                }
                if buffer.len() > SSE_FRAME_MAX {
                    break;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
}

/// One Server-Sent Events frame: its id, event name and JSON data (null
/// when the data is not JSON).
pub struct SseFrame {
    pub id: Option<i64>,
    pub kind: String,
    pub data: Value,
}

impl SseFrame {
    pub fn parse(frame: &str) -> SseFrame {
        let (mut id, mut kind, mut data) = (None, String::new(), String::new());
        for line in frame.lines() {
            if let Some(v) = line.strip_prefix("id:") {
                id = v.trim().parse::<i64>().ok();
            } else if let Some(v) = line.strip_prefix("event:") {
                kind = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push_str(v.strip_prefix(' ').unwrap_or(v));
            }
        }
        SseFrame {
            id,
            kind,
            data: serde_json::from_str(&data).unwrap_or(Value::Null),
        }
    }

    /// Why the server ended the stream, for an `error` frame.
    pub fn reason(&self) -> String {
        self.data["reason"]
            .as_str()
            .unwrap_or("the server ended the stream")
            .to_string()
    }
}
