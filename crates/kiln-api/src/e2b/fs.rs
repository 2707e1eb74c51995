//! envd's `filesystem.Filesystem` service, `/files` and `/health`, on
//! kiln's agent. Relative paths land in the user's home; files and
//! directories made for a user belong to it. Watchers poll the watched
//! directory through the agent and report the differences, so they need
//! nothing in the guest but the agent.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Query, Request};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use kiln_proto::{Entry, EntryKind};
use serde::Deserialize;
use serde_json::{json, Value};

use super::connect::{self, ConnectError, Enveloped, Unary};
use super::{E2b, Envd};

/// A file moved through `/files` at once: the agent's largest frame.
const FILE_MAX: usize = kiln_proto::BODY_MAX;
/// A whole upload (several files in one multipart body).
const UPLOAD_MAX: usize = 4 * FILE_MAX;
const PATH_MAX: usize = 4096;
/// Watchers one sandbox keeps.
const WATCHERS_MAX: usize = 64;
/// Events a watcher holds for its reader; older ones are dropped first.
const EVENTS_MAX: usize = 10_000;
/// How often a watcher looks at its directory.
const POLL: Duration = Duration::from_millis(200);
/// How deep a recursive watcher looks.
const RECURSIVE_DEPTH: u32 = 16;

pub(crate) fn writes() -> Router<Arc<E2b>> {
    Router::new()
        .route("/filesystem.Filesystem/MakeDir", post(make_dir))
        .route("/filesystem.Filesystem/Remove", post(remove))
        .route("/filesystem.Filesystem/Move", post(move_entry))
        .route(
            "/files",
            post(upload).layer(DefaultBodyLimit::max(UPLOAD_MAX)),
        )
}

pub(crate) fn reads() -> Router<Arc<E2b>> {
    Router::new()
        .route("/filesystem.Filesystem/Stat", post(stat))
        .route("/filesystem.Filesystem/ListDir", post(list_dir))
        .route("/filesystem.Filesystem/CreateWatcher", post(create_watcher))
        .route(
            "/filesystem.Filesystem/GetWatcherEvents",
            post(watcher_events),
        )
        .route("/filesystem.Filesystem/RemoveWatcher", post(remove_watcher))
        .route("/filesystem.Filesystem/WatchDir", post(watch_dir))
        .route("/files", get(download))
        .route("/health", get(health))
}

/// A request path in the guest: absolute, or relative to the user's home.
pub(crate) fn resolve(envd: &Envd, path: &str) -> Result<String, ConnectError> {
    resolve_in(&envd.home(), path)
}

fn resolve_in(home: &str, path: &str) -> Result<String, ConnectError> {
    if path.is_empty() {
        return Err(ConnectError::invalid("path is required"));
    }
    if path.len() > PATH_MAX || path.chars().any(|c| c == '\0') {
        return Err(ConnectError::invalid(format!(
            "a path is at most {PATH_MAX} bytes, without NUL"
        )));
    }
    Ok(if path.starts_with('/') {
        path.to_string()
    } else if path == "~" {
        home.to_string()
    } else {
        let rest = path.strip_prefix("~/").unwrap_or(path);
        format!("{}/{rest}", home.trim_end_matches('/'))
    })
}

fn entry_info(entry: &Entry) -> Value {
    let kind = match entry.kind {
        EntryKind::File => "FILE_TYPE_FILE",
        EntryKind::Dir => "FILE_TYPE_DIRECTORY",
        EntryKind::Symlink => "FILE_TYPE_SYMLINK",
        _ => "FILE_TYPE_UNSPECIFIED",
    };
    let modified = chrono::DateTime::from_timestamp(
        entry.modified_ns.div_euclid(1_000_000_000),
        entry.modified_ns.rem_euclid(1_000_000_000) as u32,
    )
    .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true))
    .unwrap_or_default();
    let mut info = json!({
        "name": entry.name,
        "type": kind,
        "path": entry.path,
        "size": entry.size.to_string(),
        "mode": entry.mode,
        "permissions": permissions(&entry.kind, entry.mode),
        "owner": entry.owner,
        "group": entry.group,
        "modifiedTime": modified,
    });
    if let Some(target) = &entry.symlink_target {
        info["symlinkTarget"] = json!(target);
        info["isSymlink"] = json!(true);
    }
    info
}

/// `ls -l`'s mode column, as Go's `FileMode.String()` writes it.
fn permissions(kind: &EntryKind, mode: u32) -> String {
    let mut text = String::with_capacity(10);
    text.push(match kind {
        EntryKind::Dir => 'd',
        EntryKind::Symlink => 'L',
        _ => '-',
    });
    for (bit, c) in [
        (0o400, 'r'),
        (0o200, 'w'),
        (0o100, 'x'),
        (0o040, 'r'),
        (0o020, 'w'),
        (0o010, 'x'),
        (0o004, 'r'),
        (0o002, 'w'),
        (0o001, 'x'),
    ] {
        text.push(if mode & bit != 0 { c } else { '-' });
    }
    text
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PathRequest {
    path: String,
    depth: u32,
}

async fn stat(
    Extension(envd): Extension<Envd>,
    request: Result<Unary<PathRequest>, ConnectError>,
) -> Result<Response, ConnectError> {
    let Unary(request) = request?;
    let path = resolve(&envd, &request.path)?;
    let entry = envd.agent().await?.stat(&path, Some(&envd.user)).await?;
    Ok(connect::reply(json!({"entry": entry_info(&entry)})))
}

async fn list_dir(
    Extension(envd): Extension<Envd>,
    request: Result<Unary<PathRequest>, ConnectError>,
) -> Result<Response, ConnectError> {
    let Unary(request) = request?;
    let path = resolve(&envd, &request.path)?;
    let depth = request.depth.clamp(1, RECURSIVE_DEPTH);
    let entries = envd
        .agent()
        .await?
        .list_dir(&path, depth, Some(&envd.user))
        .await?;
    let entries: Vec<Value> = entries.iter().map(entry_info).collect();
    Ok(connect::reply(json!({ "entries": entries })))
}

async fn make_dir(
    Extension(envd): Extension<Envd>,
    request: Result<Unary<PathRequest>, ConnectError>,
) -> Result<Response, ConnectError> {
    let Unary(request) = request?;
    let path = resolve(&envd, &request.path)?;
    let entry = envd
        .agent()
        .await?
        .make_dir(&path, Some(&envd.user))
        .await?;
    Ok(connect::reply(json!({"entry": entry_info(&entry)})))
}

async fn remove(
    Extension(envd): Extension<Envd>,
    request: Result<Unary<PathRequest>, ConnectError>,
) -> Result<Response, ConnectError> {
    let Unary(request) = request?;
    let path = resolve(&envd, &request.path)?;
    if path.trim_end_matches('/').is_empty() {
        return Err(ConnectError::invalid(
            "the root directory cannot be removed",
        ));
    }
    envd.agent()
        .await?
        .remove_all(&path, Some(&envd.user))
        .await?;
    Ok(connect::reply(json!({})))
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct MoveRequest {
    source: String,
    destination: String,
}

async fn move_entry(
    Extension(envd): Extension<Envd>,
    request: Result<Unary<MoveRequest>, ConnectError>,
) -> Result<Response, ConnectError> {
    let Unary(request) = request?;
    let source = resolve(&envd, &request.source)?;
    let destination = resolve(&envd, &request.destination)?;
    let entry = envd
        .agent()
        .await?
        .rename(&source, &destination, Some(&envd.user))
        .await?;
    Ok(connect::reply(json!({"entry": entry_info(&entry)})))
}

/// `/files` errors in envd's plain shape, `{"code": <status>, "message"}`.
fn file_error(error: ConnectError) -> Response {
    let status = error.status();
    (
        status,
        axum::Json(json!({"code": status.as_u16(), "message": error.message})),
    )
        .into_response()
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct FileQuery {
    path: Option<String>,
    username: Option<String>,
}

/// The user of a `/files` request: its `username`, else the request's.
fn file_user(envd: &Envd, query: &FileQuery) -> Result<String, ConnectError> {
    match query.username.as_deref().filter(|u| !u.is_empty()) {
        Some(user) => {
            super::check_user(user)?;
            Ok(user.to_string())
        }
        None => Ok(envd.user.clone()),
    }
}

/// `GET /files?path=`: the file's bytes.
async fn download(
    Extension(envd): Extension<Envd>,
    query: Result<Query<FileQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let result = async {
        let Query(query) = query.map_err(|r| ConnectError::invalid(r.body_text()))?;
        let user = file_user(&envd, &query)?;
        let path = resolve_in(
            &super::home_of(&user),
            query.path.as_deref().unwrap_or_default(),
        )?;
        Ok::<_, ConnectError>(envd.agent().await?.read_file(&path).await?)
    }
    .await;
    match result {
        Ok(bytes) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/octet-stream")],
            bytes,
        )
            .into_response(),
        Err(error) => file_error(error),
    }
}

/// `POST /files`: multipart (one part per file, its file name the target
/// path unless `path` is given) or a raw octet-stream body to `path`.
/// Parent directories are made. Answers the files written.
async fn upload(
    Extension(envd): Extension<Envd>,
    query: Result<Query<FileQuery>, axum::extract::rejection::QueryRejection>,
    request: Request,
) -> Response {
    match upload_inner(&envd, query, request).await {
        Ok(written) => (StatusCode::OK, axum::Json(written)).into_response(),
        Err(error) => file_error(error),
    }
}

async fn upload_inner(
    envd: &Envd,
    query: Result<Query<FileQuery>, axum::extract::rejection::QueryRejection>,
    request: Request,
) -> Result<Vec<Value>, ConnectError> {
    let Query(query) = query.map_err(|r| ConnectError::invalid(r.body_text()))?;
    let user = file_user(envd, &query)?;
    let home = super::home_of(&user);
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let agent = envd.agent().await?;
    let mut written = Vec::new();
    let write = |path: String, data: Bytes| {
        let agent = agent.clone();
        let user = user.clone();
        async move {
            if data.len() > FILE_MAX {
                return Err(ConnectError::new(
                    "resource_exhausted",
                    format!("a file is at most {FILE_MAX} bytes"),
                ));
            }
            agent.write_file_as(&path, &data, None, Some(&user)).await?;
            let name = path.rsplit('/').next().unwrap_or_default().to_string();
            Ok::<_, ConnectError>(json!({"name": name, "type": "file", "path": path}))
        }
    };
    if content_type.starts_with("multipart/form-data") {
        let mut multipart = Multipart::from_request(request, &())
            .await
            .map_err(|r| ConnectError::invalid(r.body_text()))?;
        while let Some(field) = multipart
            .next_field()
            .await
            .map_err(|e| multipart_error(e.status(), e.body_text()))?
        {
            let target = match (&query.path, field.file_name()) {
                (Some(path), _) if !path.is_empty() => path.clone(),
                (_, Some(name)) if !name.is_empty() => name.to_string(),
                _ => {
                    return Err(ConnectError::invalid(
                        "a part names no file and no path was given",
                    ))
                }
            };
            let path = resolve_in(&home, &target)?;
            let data = field
                .bytes()
                .await
                .map_err(|e| multipart_error(e.status(), e.body_text()))?;
            written.push(write(path, data).await?);
        }
    } else {
        if request
            .headers()
            .get(header::CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|e| !e.eq_ignore_ascii_case("identity"))
        {
            return Err(ConnectError::invalid(
                "compressed uploads are not accepted; send the file as it is",
            ));
        }
        let path = resolve_in(&home, query.path.as_deref().unwrap_or_default())?;
        let data = Bytes::from_request(request, &())
            .await
            .map_err(|r| multipart_error(r.status(), r.body_text()))?;
        written.push(write(path, data).await?);
    }
    if written.is_empty() {
        return Err(ConnectError::invalid("no file in the request"));
    }
    Ok(written)
}

fn multipart_error(status: StatusCode, text: String) -> ConnectError {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ConnectError::new(
            "resource_exhausted",
            format!("an upload is at most {UPLOAD_MAX} bytes"),
        )
    } else {
        ConnectError::invalid(text)
    }
}

/// `GET /health`: 204 while the sandbox runs (the guard answers 502 for
/// one that does not).
async fn health(Extension(envd): Extension<Envd>) -> Response {
    match envd.agent().await {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(error) => file_error(error),
    }
}

/// A sandbox's watchers, by id.
#[derive(Default)]
pub(crate) struct Watchers {
    next: std::sync::atomic::AtomicU64,
    by_id: Mutex<HashMap<String, Arc<Watcher>>>,
}

impl Watchers {
    fn by_id(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Watcher>>> {
        self.by_id.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops every watcher (the sandbox has gone).
    pub fn clear(&self) {
        self.by_id().clear();
    }
}

/// A watcher's queue, filled by its polling task, which ends with it.
struct Watcher {
    events: Arc<Mutex<VecDeque<Value>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct WatchRequest {
    path: String,
    recursive: bool,
    watcher_id: String,
}

/// What one look at a directory found: path → (kind, size, mtime).
type Seen = BTreeMap<String, (bool, u64, i64)>;

async fn look(envd: &Envd, path: &str, depth: u32) -> Result<Seen, ConnectError> {
    let entries = envd
        .agent()
        .await?
        .list_dir(path, depth, Some(&envd.user))
        .await?;
    Ok(entries
        .into_iter()
        .map(|e| {
            let dir = matches!(e.kind, EntryKind::Dir);
            (e.path, (dir, e.size, e.modified_ns))
        })
        .collect())
}

/// The events between two looks, as envd names them: paths relative to
/// the watched directory.
fn differences(root: &str, before: &Seen, after: &Seen) -> Vec<Value> {
    let name = |path: &str| {
        path.strip_prefix(root)
            .unwrap_or(path)
            .trim_start_matches('/')
            .to_string()
    };
    let mut events = Vec::new();
    for (path, now) in after {
        match before.get(path) {
            None => events.push(json!({"name": name(path), "type": "EVENT_TYPE_CREATE"})),
            Some(then) if then != now && !now.0 => {
                events.push(json!({"name": name(path), "type": "EVENT_TYPE_WRITE"}))
            }
            _ => {}
        }
    }
    for path in before.keys() {
        if !after.contains_key(path) {
            events.push(json!({"name": name(path), "type": "EVENT_TYPE_REMOVE"}));
        }
    }
    events
}

async fn watched(envd: &Envd, request: &WatchRequest) -> Result<(String, u32, Seen), ConnectError> {
    let path = resolve(envd, &request.path)?;
    let depth = if request.recursive {
        RECURSIVE_DEPTH
    } else {
        1
    };
    let first = look(envd, &path, depth).await?;
    Ok((path, depth, first))
}

async fn create_watcher(
    Extension(envd): Extension<Envd>,
    request: Result<Unary<WatchRequest>, ConnectError>,
) -> Result<Response, ConnectError> {
    let Unary(request) = request?;
    let watchers = &envd.sandbox.watchers;
    if watchers.by_id().len() >= WATCHERS_MAX {
        return Err(ConnectError::new(
            "resource_exhausted",
            format!("at most {WATCHERS_MAX} watchers per sandbox"),
        ));
    }
    let (path, depth, mut seen) = watched(&envd, &request).await?;
    let events: Arc<Mutex<VecDeque<Value>>> = Arc::default();
    let id = format!(
        "w{}",
        watchers
            .next
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let task = {
        let envd = envd.clone();
        let events = events.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(POLL).await;
                let Ok(now) = look(&envd, &path, depth).await else {
                    return;
                };
                let found = differences(&path, &seen, &now);
                seen = now;
                let mut queue = events.lock().unwrap_or_else(|e| e.into_inner());
                for event in found {
                    if queue.len() == EVENTS_MAX {
                        queue.pop_front();
                    }
                    queue.push_back(event);
                }
            }
        })
    };
    watchers
        .by_id()
        .insert(id.clone(), Arc::new(Watcher { events, task }));
    Ok(connect::reply(json!({"watcherId": id})))
}

async fn watcher_events(
    Extension(envd): Extension<Envd>,
    request: Result<Unary<WatchRequest>, ConnectError>,
) -> Result<Response, ConnectError> {
    let Unary(request) = request?;
    let watcher = envd
        .sandbox
        .watchers
        .by_id()
        .get(&request.watcher_id)
        .cloned()
        .ok_or_else(|| ConnectError::not_found("no such watcher"))?;
    let events: Vec<Value> = watcher
        .events
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .drain(..)
        .collect();
    Ok(connect::reply(json!({ "events": events })))
}

async fn remove_watcher(
    Extension(envd): Extension<Envd>,
    request: Result<Unary<WatchRequest>, ConnectError>,
) -> Result<Response, ConnectError> {
    let Unary(request) = request?;
    envd.sandbox
        .watchers
        .by_id()
        .remove(&request.watcher_id)
        .ok_or_else(|| ConnectError::not_found("no such watcher"))?;
    Ok(connect::reply(json!({})))
}

/// `WatchDir`: a server stream of the directory's changes.
async fn watch_dir(
    Extension(envd): Extension<Envd>,
    headers: HeaderMap,
    request: Result<Enveloped<WatchRequest>, ConnectError>,
) -> Response {
    let first = match request {
        Ok(Enveloped(request)) => watched(&envd, &request).await,
        Err(error) => Err(error),
    };
    let (path, depth, mut seen) = match first {
        Ok(first) => first,
        Err(error) => return connect::stream_error(error),
    };
    let keepalive = connect::keepalive(&headers).unwrap_or(Duration::from_secs(50));
    let (sink, response) = connect::stream();
    tokio::spawn(async move {
        if !sink.send(&json!({"start": {}})).await {
            return;
        }
        let mut quiet = Duration::ZERO;
        loop {
            tokio::time::sleep(POLL).await;
            let now = match look(&envd, &path, depth).await {
                Ok(now) => now,
                Err(error) => return sink.end(Some(error)).await,
            };
            let found = differences(&path, &seen, &now);
            seen = now;
            quiet += POLL;
            for event in &found {
                if !sink.send(&json!({"filesystem": event})).await {
                    return;
                }
                quiet = Duration::ZERO;
            }
            if quiet >= keepalive {
                if !sink.send(&json!({"keepalive": {}})).await {
                    return;
                }
                quiet = Duration::ZERO;
            }
        }
    });
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_in_the_home_and_refuse_nul() {
        assert_eq!(resolve_in("/home/user", "a/b").unwrap(), "/home/user/a/b");
        assert_eq!(resolve_in("/home/user", "~/x").unwrap(), "/home/user/x");
        assert_eq!(resolve_in("/root", "/etc/hosts").unwrap(), "/etc/hosts");
        assert!(resolve_in("/root", "").is_err());
        assert!(resolve_in("/root", "a\0b").is_err());
        assert!(resolve_in("/root", &"a".repeat(PATH_MAX + 1)).is_err());
    }

    #[test]
    fn permissions_read_as_go_writes_them() {
        assert_eq!(permissions(&EntryKind::File, 0o644), "-rw-r--r--");
        assert_eq!(permissions(&EntryKind::Dir, 0o755), "drwxr-xr-x");
    }

    #[test]
    fn differences_name_creates_writes_and_removes() {
        let mut before = Seen::new();
        before.insert("/w/a".into(), (false, 1, 1));
        before.insert("/w/gone".into(), (false, 1, 1));
        before.insert("/w/d".into(), (true, 0, 1));
        let mut after = before.clone();
        after.remove("/w/gone");
        after.insert("/w/a".into(), (false, 2, 2));
        after.insert("/w/new".into(), (false, 0, 3));
        // A directory's own time changes with its entries: no event.
        after.insert("/w/d".into(), (true, 0, 9));
        let events = differences("/w", &before, &after);
        let names: Vec<(String, String)> = events
            .iter()
            .map(|e| {
                (
                    e["name"].as_str().unwrap().into(),
                    e["type"].as_str().unwrap().into(),
                )
            })
            .collect();
        assert_eq!(
            names,
            vec![
                ("a".to_string(), "EVENT_TYPE_WRITE".to_string()),
                ("new".to_string(), "EVENT_TYPE_CREATE".to_string()),
                ("gone".to_string(), "EVENT_TYPE_REMOVE".to_string()),
            ]
        );
    }
}
