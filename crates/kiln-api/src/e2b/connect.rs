//! The Connect protocol as E2B's SDKs speak it to envd: JSON only, no
//! compression. Unary calls are a bare JSON body each way; streams are
//! envelopes (`flags: u8, length: u32 BE, JSON`), a server stream ending
//! with an end-stream envelope (flags `0x02`). Both official SDKs send
//! JSON only, so binary protobuf is not served.

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use futures::StreamExt;
use kiln_vm::agent::{AgentError, ErrorKind};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

/// The largest unary request, and the largest single envelope of a stream
/// (stdin travels base64-encoded in them).
pub const MESSAGE_MAX: usize = 4 << 20;
const END_STREAM: u8 = 0x02;
const COMPRESSED: u8 = 0x01;
/// Envelopes a server stream holds before its producer waits for the client.
const STREAM_QUEUE: usize = 64;

/// A Connect error: its code names the HTTP status of a unary answer and
/// the SDK's exception (`not_found` → `False` from `exists` and `kill`,
/// `already_exists` → `False` from `make_dir`).
#[derive(Debug)]
pub struct ConnectError {
    pub code: &'static str,
    pub message: String,
}

impl ConnectError {
    pub fn new(code: &'static str, message: impl Into<String>) -> ConnectError {
        ConnectError {
            code,
            message: kiln_core::names::sanitise_message(&message.into(), 1024),
        }
    }

    pub fn invalid(message: impl Into<String>) -> ConnectError {
        ConnectError::new("invalid_argument", message)
    }

    pub fn not_found(message: impl Into<String>) -> ConnectError {
        ConnectError::new("not_found", message)
    }

    pub fn status(&self) -> StatusCode {
        match self.code {
            "invalid_argument" | "failed_precondition" | "out_of_range" => StatusCode::BAD_REQUEST,
            "unauthenticated" => StatusCode::UNAUTHORIZED,
            "permission_denied" => StatusCode::FORBIDDEN,
            "not_found" => StatusCode::NOT_FOUND,
            "already_exists" | "aborted" => StatusCode::CONFLICT,
            "resource_exhausted" => StatusCode::TOO_MANY_REQUESTS,
            "canceled" => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            "unimplemented" => StatusCode::NOT_IMPLEMENTED,
            "unavailable" => StatusCode::SERVICE_UNAVAILABLE,
            "deadline_exceeded" => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn body(&self) -> serde_json::Value {
        serde_json::json!({"code": self.code, "message": self.message})
    }
}

impl From<AgentError> for ConnectError {
    /// The guest's own refusals keep their meaning; a guest that broke or
    /// went away is unavailable.
    fn from(error: AgentError) -> ConnectError {
        let message = error.to_string();
        match &error {
            AgentError::Guest { kind, .. } => match kind {
                ErrorKind::NotFound => ConnectError::not_found(message),
                ErrorKind::Exists => ConnectError::new("already_exists", message),
                ErrorKind::Denied => ConnectError::new("permission_denied", message),
                ErrorKind::TooLarge => ConnectError::new("resource_exhausted", message),
                ErrorKind::Invalid => ConnectError::invalid(message),
                _ => ConnectError::new("internal", message),
            },
            AgentError::TooLarge(_) => ConnectError::new("resource_exhausted", message),
            AgentError::Timeout => ConnectError::new("deadline_exceeded", message),
            _ => ConnectError::new("unavailable", message),
        }
    }
}

impl IntoResponse for ConnectError {
    fn into_response(self) -> Response {
        (self.status(), axum::Json(self.body())).into_response()
    }
}

/// A unary request's message.
pub struct Unary<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Unary<T> {
    type Rejection = ConnectError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let body = read_body(request, state).await?;
        parse(&body).map(Unary)
    }
}

/// A server-streaming request's one message, from its envelope.
pub struct Enveloped<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Enveloped<T> {
    type Rejection = ConnectError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let body = read_body(request, state).await?;
        let mut reader = Envelopes::default();
        reader.push(&body);
        match reader.next()? {
            Some((_, message)) => parse(&message).map(Enveloped),
            None => Err(ConnectError::invalid("the request holds no whole envelope")),
        }
    }
}

async fn read_body<S: Send + Sync>(request: Request, state: &S) -> Result<Bytes, ConnectError> {
    let request = request.map(|body| Body::new(http_body_util::Limited::new(body, MESSAGE_MAX)));
    Bytes::from_request(request, state)
        .await
        .map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ConnectError::new(
                    "resource_exhausted",
                    format!("messages are at most {MESSAGE_MAX} bytes"),
                )
            } else {
                ConnectError::invalid(format!("reading the request: {}", rejection.body_text()))
            }
        })
}

pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ConnectError> {
    let bytes = if bytes.is_empty() { b"{}" } else { bytes };
    serde_json::from_slice(bytes).map_err(|e| ConnectError::invalid(format!("bad message: {e}")))
}

/// A unary answer.
pub fn reply(message: serde_json::Value) -> Response {
    (StatusCode::OK, axum::Json(message)).into_response()
}

/// Splits a byte stream into envelopes, holding at most one envelope's
/// worth of bytes.
#[derive(Default)]
pub struct Envelopes {
    buffer: Vec<u8>,
}

impl Envelopes {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// The next whole envelope's flags and message, if one is buffered.
    pub fn next(&mut self) -> Result<Option<(u8, Vec<u8>)>, ConnectError> {
        if self.buffer.len() < 5 {
            return Ok(None);
        }
        let flags = self.buffer[0];
        let len = u32::from_be_bytes([
            self.buffer[1],
            self.buffer[2],
            self.buffer[3],
            self.buffer[4],
        ]) as usize;
        if len > MESSAGE_MAX {
            return Err(ConnectError::new(
                "resource_exhausted",
                format!("an envelope of {len} bytes; at most {MESSAGE_MAX}"),
            ));
        }
        if flags & COMPRESSED != 0 {
            return Err(ConnectError::new(
                "unimplemented",
                "compressed envelopes are not accepted",
            ));
        }
        if self.buffer.len() < 5 + len {
            return Ok(None);
        }
        let message = self.buffer[5..5 + len].to_vec();
        self.buffer.drain(..5 + len);
        Ok(Some((flags, message)))
    }

    /// Whether bytes of an unfinished envelope are held (and so lost if
    /// the body ends now).
    pub fn partial(&self) -> bool {
        !self.buffer.is_empty()
    }

    /// The room an unfinished envelope may still take.
    pub fn over(&self) -> bool {
        self.buffer.len() > MESSAGE_MAX + 5
    }
}

/// Reads a client stream's envelopes as they arrive.
pub async fn each_envelope(
    request: Request,
    mut on: impl FnMut(Vec<u8>) -> futures::future::BoxFuture<'static, Result<(), ConnectError>>,
) -> Result<(), ConnectError> {
    let mut body = request.into_body().into_data_stream();
    let mut reader = Envelopes::default();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| ConnectError::invalid(format!("reading the stream: {e}")))?;
        reader.push(&chunk);
        while let Some((flags, message)) = reader.next()? {
            if flags & END_STREAM != 0 {
                return Ok(());
            }
            on(message).await?;
        }
        if reader.over() {
            return Err(ConnectError::new(
                "resource_exhausted",
                "an envelope past the limit",
            ));
        }
    }
    if reader.partial() {
        return Err(ConnectError::invalid("the stream ended inside an envelope"));
    }
    Ok(())
}

fn envelope(flags: u8, message: &serde_json::Value) -> Bytes {
    let json = serde_json::to_vec(message).unwrap_or_else(|_| b"{}".to_vec());
    let mut out = Vec::with_capacity(5 + json.len());
    out.push(flags);
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(&json);
    Bytes::from(out)
}

/// The sending side of a server stream. Dropped without [`Sink::end`], the
/// stream ends with an `internal` error, so a client never waits on a
/// stream nobody writes.
pub struct Sink {
    tx: Option<mpsc::Sender<Bytes>>,
}

impl Sink {
    /// Sends one message; false when the client has gone.
    pub async fn send(&self, message: &serde_json::Value) -> bool {
        match &self.tx {
            Some(tx) => tx.send(envelope(0, message)).await.is_ok(),
            None => false,
        }
    }

    /// Ends the stream, with an error or without.
    pub async fn end(mut self, error: Option<ConnectError>) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(end_frame(error)).await;
        }
    }
}

fn end_frame(error: Option<ConnectError>) -> Bytes {
    let message = match error {
        Some(error) => serde_json::json!({"error": error.body()}),
        None => serde_json::json!({}),
    };
    envelope(END_STREAM, &message)
}

impl Drop for Sink {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.try_send(end_frame(Some(ConnectError::new(
                "internal",
                "the stream stopped",
            ))));
        }
    }
}

/// A server stream's response and its sink. The content type is exactly
/// `application/connect+json`: the Python client compares it literally.
pub fn stream() -> (Sink, Response) {
    let (tx, rx) = mpsc::channel::<Bytes>(STREAM_QUEUE);
    let body = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|bytes| (Ok::<_, Infallible>(bytes), rx))
    });
    let response = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/connect+json")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
    (Sink { tx: Some(tx) }, response)
}

/// A stream that fails before its first message.
pub fn stream_error(error: ConnectError) -> Response {
    let (sink, response) = stream();
    tokio::spawn(sink.end(Some(error)));
    response
}

/// `Connect-Timeout-Ms`: for `Start`, the process's lifetime; 0 or absent
/// is none.
pub fn timeout_ms(headers: &HeaderMap) -> Option<u64> {
    headers
        .get("connect-timeout-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|ms| *ms > 0)
}

/// `Keepalive-Ping-Interval` (seconds): how long a stream may stay silent.
pub fn keepalive(headers: &HeaderMap) -> Option<std::time::Duration> {
    headers
        .get("keepalive-ping-interval")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|s| std::time::Duration::from_secs(s.clamp(1, 3600)))
}

/// Protobuf JSON `bytes`: standard or URL-safe base64, padded or not.
pub fn decode_bytes(text: &str) -> Result<Vec<u8>, ConnectError> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|engine| engine.decode(text).ok())
        .ok_or_else(|| ConnectError::invalid("bytes that are not base64"))
}

pub fn encode_bytes(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_split_across_chunks() {
        let a = envelope(0, &serde_json::json!({"a": 1}));
        let b = envelope(END_STREAM, &serde_json::json!({}));
        let all = [a.as_ref(), b.as_ref()].concat();
        let mut reader = Envelopes::default();
        let mut got = Vec::new();
        for byte in all {
            reader.push(&[byte]);
            while let Some(e) = reader.next().unwrap() {
                got.push(e);
            }
        }
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], (0, br#"{"a":1}"#.to_vec()));
        assert_eq!(got[1].0, END_STREAM);
        assert!(!reader.partial());
    }

    #[test]
    fn hostile_envelopes_are_refused() {
        let mut reader = Envelopes::default();
        reader.push(&[0, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(reader.next().unwrap_err().code, "resource_exhausted");
        let mut reader = Envelopes::default();
        reader.push(&[COMPRESSED, 0, 0, 0, 2, b'{', b'}']);
        assert_eq!(reader.next().unwrap_err().code, "unimplemented");
    }

    #[test]
    fn bytes_decode_in_every_base64_dialect() {
        for text in ["aGk+Pw==", "aGk+Pw", "aGk-Pw==", "aGk-Pw"] {
            assert_eq!(decode_bytes(text).unwrap(), b"hi>?");
        }
        assert!(decode_bytes("!!").is_err());
    }
}
