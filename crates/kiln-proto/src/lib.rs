//! The protocol between kiln and its guest agent, over any byte stream
//! (a virtio-serial port today; vsock or a Unix socket tomorrow).
//!
//! A frame is `version: u8, header_len: u32 LE, body_len: u32 LE`, then a
//! JSON header (a [`Request`] or a [`Response`]) and a raw body (file
//! contents, stdin or output bytes), so bulk data is never re-encoded.
//!
//! Every request carries an id and every answer names the id it answers, so
//! a late answer or an unsolicited frame is never taken for the answer to
//! another request. Lengths are checked before anything is allocated: the
//! prefix against [`HEADER_MAX`] and [`BODY_MAX`], then the body against
//! what its message may carry ([`Message::body_max`]). A frame whose header
//! is not understood, or whose body is longer than its message allows, is
//! skipped whole and reported as a recoverable error; a bad prefix leaves
//! the stream out of step, and nothing after it can be trusted.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub const VERSION: u8 = 4;
pub const HEADER_MAX: usize = 64 << 10;
pub const BODY_MAX: usize = 16 << 20;
/// Output is streamed in chunks of at most this many bytes.
pub const CHUNK: usize = 64 << 10;
/// The most host entropy one [`Request::AddEntropy`] carries.
pub const ENTROPY_MAX: usize = 4096;
/// Length of the fixed prefix of every frame.
pub const PREFIX: usize = 9;
/// The most entries one [`Request::ListDir`] answers with.
pub const LIST_MAX: usize = 100_000;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Ping {
        id: u64,
    },
    /// Starts a process; its stdin is the body (closed after it unless
    /// `stdin_open`, then more comes as `Stdin` frames).
    Exec(Exec),
    /// More stdin for a running exec; `eof` closes it after this body.
    Stdin {
        id: u64,
        eof: bool,
    },
    /// Signals a running exec's process group.
    Kill {
        id: u64,
        signal: i32,
    },
    /// Writes the body to `path`, creating parent directories; with a
    /// `mode`, the file has it before any byte is written. With a `user`,
    /// a relative path is under their home and what is created is theirs.
    WriteFile {
        id: u64,
        path: String,
        mode: Option<u32>,
        #[serde(default)]
        user: Option<String>,
    },
    ReadFile {
        id: u64,
        path: String,
    },
    /// Removes the file at `path`; done also when there is none.
    RemoveFile {
        id: u64,
        path: String,
    },
    /// The [`Entry`] of `path` itself (a symlink is not followed).
    /// Answered by `Entries` with one entry. In this and the requests
    /// below, a relative path is under the home of `user`, or `/`.
    Stat {
        id: u64,
        path: String,
        #[serde(default)]
        user: Option<String>,
    },
    /// What is under the directory `path`, `depth` levels down (0 is 1),
    /// without `path` itself and without following symlinks; at most
    /// [`LIST_MAX`] entries.
    ListDir {
        id: u64,
        path: String,
        depth: u32,
        #[serde(default)]
        user: Option<String>,
    },
    /// Creates a directory and its parents (the user's, with a `user`);
    /// `Exists` when it is there already. Answered by its entry.
    MakeDir {
        id: u64,
        path: String,
        #[serde(default)]
        user: Option<String>,
    },
    /// Renames `source` to `destination`, creating the destination's
    /// parents. Answered by the destination's entry.
    Move {
        id: u64,
        source: String,
        destination: String,
        #[serde(default)]
        user: Option<String>,
    },
    /// Removes `path`, a directory with all it holds (symlinks are removed,
    /// not followed); `NotFound` when there is nothing.
    Remove {
        id: u64,
        path: String,
        #[serde(default)]
        user: Option<String>,
    },
    /// Resizes the PTY of running exec `exec`. Its own `id`, since an
    /// answer under the exec's id would go to the exec's stream.
    Resize {
        id: u64,
        exec: u64,
        cols: u16,
        rows: u16,
    },
    /// Credits the body (host random bytes) to the guest's entropy pool and
    /// reseeds its CRNG at once, so clones of one snapshot part ways.
    AddEntropy {
        id: u64,
    },
    /// Sets the guest's wall clock (a restored VM wakes at its save time).
    SetClock {
        id: u64,
        unix_ns: u64,
    },
    /// Syncs filesystems and powers the guest off.
    Shutdown {
        id: u64,
    },
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
    /// Runs as this user of the guest's /etc/passwd (with their groups,
    /// HOME, USER and LOGNAME, and their home as the default cwd); root
    /// when none.
    #[serde(default)]
    pub user: Option<String>,
    /// Runs on a new PTY of this size, in a session of its own: its output
    /// comes as `Stdout` only, and stdin goes to the terminal.
    #[serde(default)]
    pub pty: Option<PtySize>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PtySize {
    pub cols: u16,
    pub rows: u16,
}

/// One file, directory or link, as `Stat`, `ListDir`, `MakeDir` and
/// `Move` describe it (a JSON array of these is the body of `Entries`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub name: String,
    pub path: String,
    pub kind: EntryKind,
    pub size: u64,
    /// Permission bits only (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Names from the guest's /etc/passwd and /etc/group; the number when
    /// there is none.
    pub owner: String,
    pub group: String,
    /// Last modification, in nanoseconds since the Unix epoch.
    pub modified_ns: i64,
    /// Where a symlink points (it is not followed).
    pub symlink_target: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    Other,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    Pong {
        id: u64,
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
        id: u64,
    },
    Done {
        id: u64,
    },
    /// The body holds a JSON array of [`Entry`].
    Entries {
        id: u64,
    },
    /// Request `id` failed; no id when the frame could not be read.
    Error {
        id: Option<u64>,
        #[serde(default)]
        kind: ErrorKind,
        message: String,
    },
}

/// What kind of failure an [`Response::Error`] reports, for callers that
/// answer differently (a missing file is not a broken agent).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    NotFound,
    /// The path to create is there already.
    Exists,
    Denied,
    TooLarge,
    Invalid,
    #[default]
    Other,
}

impl ErrorKind {
    /// The kind of a failed file or process operation.
    pub fn of(error: &std::io::Error) -> ErrorKind {
        match error.kind() {
            std::io::ErrorKind::NotFound => ErrorKind::NotFound,
            std::io::ErrorKind::AlreadyExists => ErrorKind::Exists,
            std::io::ErrorKind::PermissionDenied => ErrorKind::Denied,
            std::io::ErrorKind::InvalidInput => ErrorKind::Invalid,
            _ => ErrorKind::Other,
        }
    }
}

impl Response {
    /// The request this answers; none for a frame the agent could not read.
    pub fn id(&self) -> Option<u64> {
        match self {
            Response::Pong { id, .. }
            | Response::Stdout { id }
            | Response::Stderr { id }
            | Response::Exited { id, .. }
            | Response::FileData { id }
            | Response::Done { id }
            | Response::Entries { id } => Some(*id),
            Response::Error { id, .. } => *id,
        }
    }
}

/// A frame header: says how long a body it may carry.
pub trait Message: Serialize + DeserializeOwned {
    fn body_max(&self) -> usize;
}

impl Message for Request {
    fn body_max(&self) -> usize {
        match self {
            Request::Exec(_) | Request::Stdin { .. } | Request::WriteFile { .. } => BODY_MAX,
            Request::AddEntropy { .. } => ENTROPY_MAX,
            _ => 0,
        }
    }
}

impl Message for Response {
    fn body_max(&self) -> usize {
        match self {
            Response::Stdout { .. } | Response::Stderr { .. } => CHUNK,
            Response::FileData { .. } | Response::Entries { .. } => BODY_MAX,
            _ => 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The stream failed or closed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The peer speaks another version.
    #[error("protocol version {0}, expected {VERSION}")]
    Version(u8),
    /// A length past the limits of any frame.
    #[error("frame too large: header {header} bytes, body {body} bytes")]
    TooLarge { header: usize, body: usize },
    /// The header is not a message this side knows (the frame was skipped).
    #[error("bad header: {0}")]
    Header(#[from] serde_json::Error),
    /// The body is longer than its message may carry (the frame was skipped).
    #[error("a body of {len} bytes where at most {max} may come")]
    Body { len: usize, max: usize },
}

impl ProtoError {
    /// Whether the stream can still be used: the frame was consumed whole.
    pub fn recoverable(&self) -> bool {
        matches!(self, ProtoError::Header(_) | ProtoError::Body { .. })
    }
}

/// Encodes one frame into a buffer; refuses lengths the peer would refuse,
/// since a frame it cannot read puts the stream out of step.
pub fn encode<T: Serialize>(header: &T, body: &[u8]) -> Result<Vec<u8>, ProtoError> {
    let json = serde_json::to_vec(header)?;
    if json.len() > HEADER_MAX || body.len() > BODY_MAX {
        return Err(ProtoError::TooLarge {
            header: json.len(),
            body: body.len(),
        });
    }
    let mut out = Vec::with_capacity(PREFIX + json.len() + body.len());
    out.push(VERSION);
    // Both lengths are under the limits above, so they fit in a u32.
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(body);
    Ok(out)
}

/// The header and body lengths a prefix announces, within the limits.
pub fn parse_prefix(prefix: &[u8; PREFIX]) -> Result<(usize, usize), ProtoError> {
    if prefix[0] != VERSION {
        return Err(ProtoError::Version(prefix[0]));
    }
    let header = u32::from_le_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    let body = u32::from_le_bytes([prefix[5], prefix[6], prefix[7], prefix[8]]) as usize;
    if header > HEADER_MAX || body > BODY_MAX {
        return Err(ProtoError::TooLarge { header, body });
    }
    Ok((header, body))
}

/// Parses a header and checks the announced body length against it.
fn parse_header<T: Message>(header: &[u8], body_len: usize) -> Result<T, ProtoError> {
    let message: T = serde_json::from_slice(header)?;
    let max = message.body_max();
    if body_len > max {
        return Err(ProtoError::Body { len: body_len, max });
    }
    Ok(message)
}

pub fn write_frame<T: Serialize>(
    writer: &mut impl Write,
    header: &T,
    body: &[u8],
) -> Result<(), ProtoError> {
    writer.write_all(&encode(header, body)?)?;
    writer.flush()?;
    Ok(())
}

pub fn read_frame<T: Message>(reader: &mut impl Read) -> Result<(T, Vec<u8>), ProtoError> {
    let mut prefix = [0u8; PREFIX];
    reader.read_exact(&mut prefix)?;
    let (header_len, body_len) = parse_prefix(&prefix)?;
    let mut header = vec![0u8; header_len];
    reader.read_exact(&mut header)?;
    match parse_header(&header, body_len) {
        Ok(message) => {
            let mut body = vec![0u8; body_len];
            reader.read_exact(&mut body)?;
            Ok((message, body))
        }
        Err(error) => {
            // Skip the body without holding it, to stay in step.
            let skipped = std::io::copy(&mut reader.take(body_len as u64), &mut std::io::sink())?;
            if skipped < body_len as u64 {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
            }
            Err(error)
        }
    }
}

#[cfg(feature = "tokio")]
pub async fn read_frame_async<T: Message>(
    reader: &mut (impl tokio::io::AsyncRead + Unpin),
) -> Result<(T, Vec<u8>), ProtoError> {
    use tokio::io::AsyncReadExt;
    let mut prefix = [0u8; PREFIX];
    reader.read_exact(&mut prefix).await?;
    let (header_len, body_len) = parse_prefix(&prefix)?;
    let mut header = vec![0u8; header_len];
    reader.read_exact(&mut header).await?;
    match parse_header(&header, body_len) {
        Ok(message) => {
            let mut body = vec![0u8; body_len];
            reader.read_exact(&mut body).await?;
            Ok((message, body))
        }
        Err(error) => {
            let skipped =
                tokio::io::copy(&mut reader.take(body_len as u64), &mut tokio::io::sink()).await?;
            if skipped < body_len as u64 {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
            }
            Err(error)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(request: Request, body: &[u8]) {
        let bytes = encode(&request, body).unwrap();
        let (back, got): (Request, Vec<u8>) = read_frame(&mut bytes.as_slice()).unwrap();
        assert_eq!(back, request);
        assert_eq!(got, body);
    }

    #[test]
    fn frames_round_trip() {
        round_trip(Request::Ping { id: 1 }, b"");
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
                id: 2,
                path: "/tmp/x".into(),
                mode: Some(0o600),
                user: None,
            },
            &vec![42u8; 1 << 20],
        );
    }

    #[test]
    fn file_and_terminal_requests_round_trip() {
        let user = || Some("user".to_string());
        round_trip(
            Request::Exec(Exec {
                id: 3,
                command: "bash".into(),
                stdin_open: true,
                user: user(),
                pty: Some(PtySize { cols: 80, rows: 24 }),
                ..Exec::default()
            }),
            b"",
        );
        for request in [
            Request::Stat {
                id: 1,
                path: "a/b".into(),
                user: user(),
            },
            Request::ListDir {
                id: 2,
                path: "/".into(),
                depth: 3,
                user: None,
            },
            Request::MakeDir {
                id: 3,
                path: "new".into(),
                user: user(),
            },
            Request::Move {
                id: 4,
                source: "x".into(),
                destination: "/y/z".into(),
                user: None,
            },
            Request::Remove {
                id: 5,
                path: "/tmp/gone".into(),
                user: user(),
            },
            Request::Resize {
                id: 6,
                exec: 3,
                cols: 120,
                rows: 40,
            },
        ] {
            round_trip(request, b"");
        }
        round_trip(
            Request::WriteFile {
                id: 7,
                path: "notes.txt".into(),
                mode: None,
                user: user(),
            },
            b"hello",
        );
        // Fields added in this version may be left out.
        let old = br#"{"type":"write_file","id":8,"path":"/x","mode":null}"#;
        let request: Request = serde_json::from_slice(old).unwrap();
        assert!(matches!(request, Request::WriteFile { user: None, .. }));
        let old = br#"{"type":"exec","id":9,"command":"true","cwd":null,"timeout_ms":null}"#;
        let request: Request = serde_json::from_slice(old).unwrap();
        assert!(matches!(
            request,
            Request::Exec(Exec {
                user: None,
                pty: None,
                ..
            })
        ));
    }

    #[test]
    fn entries_come_in_the_body() {
        let entries = vec![
            Entry {
                name: "link".into(),
                path: "/home/user/link".into(),
                kind: EntryKind::Symlink,
                size: 7,
                mode: 0o777,
                uid: 1000,
                gid: 1000,
                owner: "user".into(),
                group: "1000".into(),
                modified_ns: -5,
                symlink_target: Some("target".into()),
            },
            Entry {
                name: "dir".into(),
                path: "/home/user/dir".into(),
                kind: EntryKind::Dir,
                size: 4096,
                mode: 0o1755,
                uid: 0,
                gid: 0,
                owner: "root".into(),
                group: "root".into(),
                modified_ns: 1_700_000_000_000_000_000,
                symlink_target: None,
            },
        ];
        let body = serde_json::to_vec(&entries).unwrap();
        assert!(String::from_utf8_lossy(&body).contains(r#""kind":"symlink""#));
        let bytes = encode(&Response::Entries { id: 4 }, &body).unwrap();
        let (response, got): (Response, Vec<u8>) = read_frame(&mut bytes.as_slice()).unwrap();
        assert_eq!(response, Response::Entries { id: 4 });
        assert_eq!(response.id(), Some(4));
        let back: Vec<Entry> = serde_json::from_slice(&got).unwrap();
        assert_eq!(back, entries);
        let exists = Response::Error {
            id: Some(5),
            kind: ErrorKind::of(&std::io::Error::from(std::io::ErrorKind::AlreadyExists)),
            message: "there".into(),
        };
        let bytes = encode(&exists, b"").unwrap();
        let (back, _): (Response, Vec<u8>) = read_frame(&mut bytes.as_slice()).unwrap();
        assert_eq!(back, exists);
        assert!(serde_json::to_string(&exists)
            .unwrap()
            .contains(r#""kind":"exists""#));
    }

    #[test]
    fn bad_frames_are_errors_not_panics() {
        let check = |bytes: &[u8]| read_frame::<Request>(&mut &bytes[..]).unwrap_err();
        assert!(matches!(
            check(&[9, 0, 0, 0, 0, 0, 0, 0, 0]),
            ProtoError::Version(9)
        ));
        assert!(matches!(
            check(&[VERSION, 255, 255, 255, 255, 0, 0, 0, 0]),
            ProtoError::TooLarge { .. }
        ));
        assert!(matches!(check(&[VERSION, 0]), ProtoError::Io(_)));
        let garbage = [&[VERSION, 3, 0, 0, 0, 0, 0, 0, 0][..], b"{x}"].concat();
        let error = check(&garbage);
        assert!(error.recoverable(), "{error}");
        let unknown = encode(&serde_json::json!({"type": "format_disk"}), b"").unwrap();
        assert!(check(&unknown).recoverable());
    }

    #[test]
    fn a_body_longer_than_its_message_allows_is_skipped_whole() {
        // A ping with a body, then a real ping: the first is refused, and
        // the reader is in step for the second.
        let mut bytes = encode(&Request::Ping { id: 1 }, &[7u8; 1000]).unwrap();
        bytes.extend(encode(&Request::Ping { id: 2 }, b"").unwrap());
        let mut reader = bytes.as_slice();
        let error = read_frame::<Request>(&mut reader).unwrap_err();
        assert!(
            matches!(error, ProtoError::Body { len: 1000, max: 0 }),
            "{error}"
        );
        let (next, _) = read_frame::<Request>(&mut reader).unwrap();
        assert_eq!(next, Request::Ping { id: 2 });
        // Output chunks are bounded tighter than files.
        let big = encode(&Response::Stdout { id: 1 }, &vec![0u8; CHUNK + 1]).unwrap();
        assert!(matches!(
            read_frame::<Response>(&mut big.as_slice()),
            Err(ProtoError::Body { .. })
        ));
    }

    #[test]
    fn encode_refuses_what_the_peer_would_refuse() {
        let body = vec![0u8; BODY_MAX + 1];
        assert!(matches!(
            encode(&Request::Stdin { id: 1, eof: false }, &body),
            Err(ProtoError::TooLarge { .. })
        ));
    }
}
