//! The protocol between kiln and its guest agent, over any byte stream
//! (a virtio-serial port today; vsock or a Unix socket tomorrow).
//!
//! A frame is `version: u8, header_len: u32 LE, body_len: u32 LE`, then a
//! JSON header (a [`Request`] or a [`Response`]) and a raw body (file
//! contents, stdin or output bytes), so bulk data is never re-encoded. A
//! peer that gets a malformed frame answers with an error; oversized lengths
//! are refused before anything is allocated.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub const VERSION: u8 = 1;
pub const HEADER_MAX: usize = 64 << 10;
pub const BODY_MAX: usize = 16 << 20;
/// Output is streamed in chunks of at most this many bytes.
pub const CHUNK: usize = 64 << 10;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Ping,
    /// Starts a process; its stdin is the body (closed after it unless
    /// `stdin_open`, then more comes as `Stdin` frames).
    Exec(Exec),
    /// More stdin for a running exec; an empty body with `eof` closes it.
    Stdin {
        id: u64,
        eof: bool,
    },
    /// Signals a running exec.
    Kill {
        id: u64,
        signal: i32,
    },
    /// Writes the body to `path`, creating parent directories.
    WriteFile {
        path: String,
        mode: Option<u32>,
    },
    ReadFile {
        path: String,
    },
    /// Syncs filesystems and powers the guest off.
    Shutdown,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Exec {
    pub id: u64,
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    pub timeout_ms: Option<u64>,
    #[serde(default)]
    pub stdin_open: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    Pong {
        version: u8,
        agent: String,
    },
    /// Output of exec `id`; the body holds the bytes.
    Stdout {
        id: u64,
    },
    Stderr {
        id: u64,
    },
    /// Exec `id` ended: by exit code, or by signal (`timed_out` when the
    /// agent killed it for its timeout).
    Exited {
        id: u64,
        code: Option<i32>,
        signal: Option<i32>,
        timed_out: bool,
        duration_us: u64,
    },
    /// The body holds the file.
    FileData {
        path: String,
    },
    Done,
    Error {
        id: Option<u64>,
        message: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The stream failed or closed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The peer speaks another version.
    #[error("protocol version {0}, expected {VERSION}")]
    Version(u8),
    /// A length past the limits.
    #[error("frame too large: header {header} bytes, body {body} bytes")]
    TooLarge { header: usize, body: usize },
    /// The header is not a message this side knows.
    #[error("bad header: {0}")]
    Header(#[from] serde_json::Error),
}

impl ProtoError {
    /// Whether the stream can still be used: the frame was read whole.
    pub fn recoverable(&self) -> bool {
        matches!(self, ProtoError::Header(_))
    }
}

/// Encodes one frame into a buffer.
pub fn encode<T: Serialize>(header: &T, body: &[u8]) -> Vec<u8> {
    let json = serde_json::to_vec(header).expect("protocol messages serialize");
    let mut out = Vec::with_capacity(9 + json.len() + body.len());
    out.push(VERSION);
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(body);
    out
}

fn parse_prefix(prefix: &[u8; 9]) -> Result<(usize, usize), ProtoError> {
    if prefix[0] != VERSION {
        return Err(ProtoError::Version(prefix[0]));
    }
    let header = u32::from_le_bytes(prefix[1..5].try_into().expect("4 bytes")) as usize;
    let body = u32::from_le_bytes(prefix[5..9].try_into().expect("4 bytes")) as usize;
    if header > HEADER_MAX || body > BODY_MAX {
        return Err(ProtoError::TooLarge { header, body });
    }
    Ok((header, body))
}

pub fn write_frame<T: Serialize>(
    writer: &mut impl Write,
    header: &T,
    body: &[u8],
) -> Result<(), ProtoError> {
    writer.write_all(&encode(header, body))?;
    writer.flush()?;
    Ok(())
}

pub fn read_frame<T: DeserializeOwned>(reader: &mut impl Read) -> Result<(T, Vec<u8>), ProtoError> {
    let mut prefix = [0u8; 9];
    reader.read_exact(&mut prefix)?;
    let (header_len, body_len) = parse_prefix(&prefix)?;
    let mut header = vec![0u8; header_len];
    reader.read_exact(&mut header)?;
    let mut body = vec![0u8; body_len];
    reader.read_exact(&mut body)?;
    Ok((serde_json::from_slice(&header)?, body))
}

#[cfg(feature = "tokio")]
pub async fn read_frame_async<T: DeserializeOwned>(
    reader: &mut (impl tokio::io::AsyncRead + Unpin),
) -> Result<(T, Vec<u8>), ProtoError> {
    use tokio::io::AsyncReadExt;
    let mut prefix = [0u8; 9];
    reader.read_exact(&mut prefix).await?;
    let (header_len, body_len) = parse_prefix(&prefix)?;
    let mut header = vec![0u8; header_len];
    reader.read_exact(&mut header).await?;
    let mut body = vec![0u8; body_len];
    reader.read_exact(&mut body).await?;
    Ok((serde_json::from_slice(&header)?, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(request: Request, body: &[u8]) {
        let bytes = encode(&request, body);
        let (back, got): (Request, Vec<u8>) = read_frame(&mut bytes.as_slice()).unwrap();
        assert_eq!(back, request);
        assert_eq!(got, body);
    }

    #[test]
    fn frames_round_trip() {
        round_trip(Request::Ping, b"");
        round_trip(
            Request::Exec(Exec {
                id: 7,
                command: "sh".into(),
                args: vec!["-c".into(), "echo hi".into()],
                ..Exec::default()
            }),
            b"stdin bytes \0\xff",
        );
        round_trip(
            Request::WriteFile {
                path: "/tmp/x".into(),
                mode: Some(0o600),
            },
            &vec![42u8; 1 << 20],
        );
    }

    #[test]
    fn bad_frames_are_errors_not_panics() {
        let check = |bytes: &[u8]| read_frame::<Request>(&mut &bytes[..]).unwrap_err();
        assert!(matches!(
            check(&[2, 0, 0, 0, 0, 0, 0, 0, 0]),
            ProtoError::Version(2)
        ));
        assert!(matches!(
            check(&[1, 255, 255, 255, 255, 0, 0, 0, 0]),
            ProtoError::TooLarge { .. }
        ));
        assert!(matches!(check(&[1, 0]), ProtoError::Io(_)));
        let garbage = [&[1u8, 3, 0, 0, 0, 0, 0, 0, 0][..], b"{x}"].concat();
        let error = check(&garbage);
        assert!(error.recoverable(), "{error}");
        let unknown = encode(&serde_json::json!({"type": "format_disk"}), b"");
        assert!(check(&unknown).recoverable());
    }
}
