//! envd's `process.Process` service on kiln's agent. A process started
//! here belongs to the sandbox, not to the stream that started it: a pump
//! task reads its output for as long as it runs and hands each event to
//! the streams attached to it (`Start`, then any `Connect`), so a client
//! that goes away leaves it running. `Connect-Timeout-Ms` on `Start` is
//! its lifetime, enforced by the agent.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::Request;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::post;
use axum::{Extension, Router};
use futures::FutureExt;
use kiln_vm::agent::{ExecControl, ExecStream};
use kiln_vm::{ExecEvent, ExecOutput};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::connect::{self, ConnectError, Enveloped, Sink, Unary};
use super::{E2b, Envd};

/// Processes one sandbox runs at once through envd.
const PROCS_MAX: usize = 256;
/// Events queued for one attached stream before the pump waits for it.
const ATTACHED_QUEUE: usize = 64;
/// How long the pump waits for a stalled stream before dropping it (the
/// process runs on).
const STALL: Duration = Duration::from_secs(30);
/// The largest stdin one call may carry.
const INPUT_MAX: usize = 1 << 20;

pub(crate) fn writes() -> Router<Arc<E2b>> {
    Router::new()
        .route("/process.Process/Start", post(start))
        .route("/process.Process/SendSignal", post(send_signal))
        .route("/process.Process/SendInput", post(send_input))
        .route("/process.Process/CloseStdin", post(close_stdin))
        .route("/process.Process/StreamInput", post(stream_input))
        .route("/process.Process/Update", post(update))
}

pub(crate) fn reads() -> Router<Arc<E2b>> {
    Router::new()
        .route("/process.Process/List", post(list))
        .route("/process.Process/Connect", post(connect_to))
}

/// A sandbox's processes.
#[derive(Default)]
pub(crate) struct Table {
    next_pid: AtomicU32,
    procs: Mutex<HashMap<u32, Arc<Proc>>>,
}

impl Table {
    fn procs(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<Proc>>> {
        self.procs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn find(&self, selector: &Selector) -> Result<Arc<Proc>, ConnectError> {
        let procs = self.procs();
        let found = match selector {
            Selector::Pid(pid) => procs.get(pid).cloned(),
            Selector::Tag(tag) => procs
                .values()
                .find(|p| p.tag.as_deref() == Some(tag.as_str()))
                .cloned(),
        };
        found.ok_or_else(|| ConnectError::not_found(format!("process {selector:?} not found")))
    }
}

struct Proc {
    pid: u32,
    tag: Option<String>,
    config: Value,
    /// Replaced when the sandbox resumes (a new connection to its agent).
    control: Mutex<ExecControl>,
    pty: bool,
    attached: Mutex<Attached>,
}

#[derive(Default)]
struct Attached {
    streams: Vec<mpsc::Sender<Event>>,
    ended: bool,
}

impl Proc {
    fn control(&self) -> ExecControl {
        self.control
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn attached(&self) -> std::sync::MutexGuard<'_, Attached> {
        self.attached.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new stream of the process's events from now on; none once it has
    /// ended.
    fn attach(&self) -> Option<mpsc::Receiver<Event>> {
        let mut attached = self.attached();
        if attached.ended {
            return None;
        }
        let (tx, rx) = mpsc::channel(ATTACHED_QUEUE);
        attached.streams.push(tx);
        Some(rx)
    }
}

#[derive(Clone, Debug)]
enum Event {
    Data(&'static str, Vec<u8>),
    End(Value),
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
enum Selector {
    Pid(u32),
    Tag(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct ProcessConfig {
    cmd: String,
    args: Vec<String>,
    envs: BTreeMap<String, String>,
    cwd: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PtySize {
    cols: u32,
    rows: u32,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Pty {
    size: Option<PtySize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct StartRequest {
    process: ProcessConfig,
    pty: Option<Pty>,
    tag: Option<String>,
    stdin: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct ProcessRequest {
    process: Selector,
}

fn pty_size(size: &PtySize) -> Result<kiln_proto::PtySize, ConnectError> {
    let fit = |n: u32| u16::try_from(n).ok().filter(|n| *n > 0);
    match (fit(size.cols), fit(size.rows)) {
        (Some(cols), Some(rows)) => Ok(kiln_proto::PtySize { cols, rows }),
        _ => Err(ConnectError::invalid("a PTY's size is 1 to 65535 each way")),
    }
}

/// `Start`: the `start` event with the pid first, then output and the end.
async fn start(
    Extension(envd): Extension<Envd>,
    headers: HeaderMap,
    request: Result<Enveloped<StartRequest>, ConnectError>,
) -> Response {
    let started = match request {
        Ok(Enveloped(request)) => spawn(&envd, request, connect::timeout_ms(&headers)).await,
        Err(error) => Err(error),
    };
    match started {
        Ok((proc, events)) => {
            let (sink, response) = connect::stream();
            tokio::spawn(forward(
                sink,
                proc.pid,
                events,
                connect::keepalive(&headers),
            ));
            response
        }
        Err(error) => connect::stream_error(error),
    }
}

async fn spawn(
    envd: &Envd,
    request: StartRequest,
    timeout_ms: Option<u64>,
) -> Result<(Arc<Proc>, mpsc::Receiver<Event>), ConnectError> {
    let config = request.process;
    if config.cmd.is_empty() || config.cmd.contains('\0') {
        return Err(ConnectError::invalid("process.cmd is required"));
    }
    if config.args.iter().any(|a| a.contains('\0')) {
        return Err(ConnectError::invalid("an argument holds NUL"));
    }
    let mut env = envd.sandbox.env.clone();
    for (name, value) in &config.envs {
        super::control::process_env_name(name)?;
        if value.contains('\0') {
            return Err(ConnectError::invalid("an environment value holds NUL"));
        }
        env.insert(name.clone(), value.clone());
    }
    let cwd = match &config.cwd {
        Some(cwd) if !cwd.is_empty() => Some(super::fs::resolve(envd, cwd)?),
        _ => None,
    };
    let pty = match request.pty.as_ref() {
        Some(pty) => Some(pty_size(
            pty.size.as_ref().unwrap_or(&PtySize { cols: 80, rows: 24 }),
        )?),
        None => None,
    };
    if let Some(tag) = &request.tag {
        if tag.len() > 256 || tag.contains('\0') {
            return Err(ConnectError::invalid("a tag is at most 256 bytes"));
        }
    }
    let table = &envd.sandbox.procs;
    if table.procs().len() >= PROCS_MAX {
        return Err(ConnectError::new(
            "resource_exhausted",
            format!("at most {PROCS_MAX} processes run at once in a sandbox"),
        ));
    }
    let exec = kiln_vm::Exec {
        command: config.cmd.clone(),
        args: config.args.clone(),
        env,
        cwd,
        timeout_ms,
        // Absent means on (older SDKs); a PTY always takes input.
        stdin_open: request.stdin.unwrap_or(true) || pty.is_some(),
        user: Some(envd.user.clone()),
        pty,
        ..kiln_vm::Exec::default()
    };
    let agent = envd.agent().await?;
    let stream = agent.exec_stream(exec, b"").await?;
    let pid = table.next_pid.fetch_add(1, Ordering::Relaxed) + 1;
    let proc = Arc::new(Proc {
        pid,
        tag: request.tag,
        config: json!({
            "cmd": config.cmd,
            "args": config.args,
            "envs": config.envs,
            "cwd": config.cwd,
        }),
        control: Mutex::new(stream.control()),
        pty: pty.is_some(),
        attached: Mutex::new(Attached::default()),
    });
    let events = proc
        .attach()
        .ok_or_else(|| ConnectError::new("internal", "ended at once"))?;
    table.procs().insert(pid, proc.clone());
    tokio::spawn(pump(envd.sandbox.clone(), proc.clone(), stream));
    Ok((proc, events))
}

/// Reads the process's output for its whole life and hands it to the
/// attached streams; a stream that stalls past [`STALL`] is dropped, so
/// one slow client never holds the process (or the other clients) back
/// for long, while a merely slow one slows the guest instead of growing a
/// buffer.
async fn pump(sandbox: Arc<super::Sandbox>, proc: Arc<Proc>, mut stream: ExecStream) {
    loop {
        let event = match stream.next().await {
            Ok(ExecEvent::Stdout(data)) => {
                Event::Data(if proc.pty { "pty" } else { "stdout" }, data)
            }
            Ok(ExecEvent::Stderr(data)) => Event::Data("stderr", data),
            Ok(ExecEvent::Exited(out)) => Event::End(end_event(&out)),
            // The sandbox is being paused: the process is saved with it and
            // adopted again at resume; the streams attached now end.
            Err(_) if sandbox.pausing.load(Ordering::SeqCst) => {
                proc.attached().streams.clear();
                return;
            }
            Err(error) => Event::End(json!({
                "exitCode": -1,
                "exited": false,
                "status": "error",
                "error": format!("the sandbox's agent: {error}"),
            })),
        };
        let last = matches!(event, Event::End(_));
        let streams = {
            let mut attached = proc.attached();
            if last {
                attached.ended = true;
                std::mem::take(&mut attached.streams)
            } else {
                attached.streams.clone()
            }
        };
        let mut gone = Vec::new();
        for tx in &streams {
            let sent = tokio::time::timeout(STALL, tx.send(event.clone())).await;
            if !matches!(sent, Ok(Ok(()))) {
                gone.push(tx.clone());
            }
        }
        if !gone.is_empty() && !last {
            proc.attached()
                .streams
                .retain(|tx| !gone.iter().any(|g| g.same_channel(tx)));
        }
        if last {
            break;
        }
    }
    sandbox.procs.procs().remove(&proc.pid);
}

/// After a resume: every process the sandbox had is read again through
/// the new connection to its agent, under the same pid.
pub(crate) fn adopt_all(sandbox: &Arc<super::Sandbox>, agent: &kiln_vm::AgentConn) {
    let procs: Vec<Arc<Proc>> = sandbox.procs.procs().values().cloned().collect();
    for proc in procs {
        let stream = agent.adopt(proc.control().id());
        *proc.control.lock().unwrap_or_else(|e| e.into_inner()) = stream.control();
        tokio::spawn(pump(sandbox.clone(), proc, stream));
    }
}

/// envd's end event: `exitCode` −1 and `exited` false for a signal, and
/// Go's `ProcessState.String()` as the status.
fn end_event(out: &ExecOutput) -> Value {
    let (code, status) = match (out.exit_code, out.signal) {
        (Some(code), _) => (code, format!("exit status {code}")),
        (None, Some(signal)) => (-1, format!("signal: {}", signal_name(signal))),
        (None, None) => (-1, "unknown".to_string()),
    };
    let mut end = json!({"exitCode": code, "exited": out.exit_code.is_some(), "status": status});
    if code != 0 {
        end["error"] = json!(status);
    }
    end
}

fn signal_name(signal: i32) -> String {
    match signal {
        1 => "hangup".into(),
        2 => "interrupt".into(),
        6 => "aborted".into(),
        9 => "killed".into(),
        13 => "broken pipe".into(),
        15 => "terminated".into(),
        other => format!("signal {other}"),
    }
}

/// Writes a stream's events: `start` first, keepalives while it is quiet,
/// the end event and the end of the stream last. A client that goes away
/// only detaches.
async fn forward(
    sink: Sink,
    pid: u32,
    mut events: mpsc::Receiver<Event>,
    keepalive: Option<Duration>,
) {
    if !sink.send(&json!({"event": {"start": {"pid": pid}}})).await {
        return;
    }
    let quiet = keepalive.unwrap_or(Duration::from_secs(3600));
    loop {
        let event = match tokio::time::timeout(quiet, events.recv()).await {
            Ok(Some(event)) => event,
            Ok(None) => {
                sink.end(Some(ConnectError::new(
                    "unavailable",
                    "the stream fell too far behind the process and was detached",
                )))
                .await;
                return;
            }
            Err(_) => {
                if !sink.send(&json!({"event": {"keepalive": {}}})).await {
                    return;
                }
                continue;
            }
        };
        match event {
            Event::Data(name, data) => {
                let message = json!({"event": {"data": {name: connect::encode_bytes(&data)}}});
                if !sink.send(&message).await {
                    return;
                }
            }
            Event::End(end) => {
                if sink.send(&json!({"event": {"end": end}})).await {
                    sink.end(None).await;
                }
                return;
            }
        }
    }
}

/// `Connect`: the same events as `Start`, from now on.
async fn connect_to(
    Extension(envd): Extension<Envd>,
    headers: HeaderMap,
    request: Result<Enveloped<ProcessRequest>, ConnectError>,
) -> Response {
    let attached = request.and_then(|Enveloped(request)| {
        let proc = envd.sandbox.procs.find(&request.process)?;
        let events = proc
            .attach()
            .ok_or_else(|| ConnectError::not_found(format!("process {} has ended", proc.pid)))?;
        Ok((proc.pid, events))
    });
    match attached {
        Ok((pid, events)) => {
            let (sink, response) = connect::stream();
            tokio::spawn(forward(sink, pid, events, connect::keepalive(&headers)));
            response
        }
        Err(error) => connect::stream_error(error),
    }
}

async fn list(Extension(envd): Extension<Envd>, _: Unary<Value>) -> Response {
    let mut procs: Vec<Arc<Proc>> = envd.sandbox.procs.procs().values().cloned().collect();
    procs.sort_by_key(|p| p.pid);
    let processes: Vec<Value> = procs
        .iter()
        .map(|p| {
            let mut info = json!({"pid": p.pid, "config": p.config});
            if let Some(tag) = &p.tag {
                info["tag"] = json!(tag);
            }
            info
        })
        .collect();
    connect::reply(json!({ "processes": processes }))
}

#[derive(Debug, Deserialize)]
struct SignalRequest {
    process: Selector,
    signal: Value,
}

fn signal_number(signal: &Value) -> Result<i32, ConnectError> {
    match signal {
        Value::String(name) if name == "SIGNAL_SIGKILL" => Ok(libc_sig::KILL),
        Value::String(name) if name == "SIGNAL_SIGTERM" => Ok(libc_sig::TERM),
        Value::Number(n) if n.as_i64() == Some(9) => Ok(libc_sig::KILL),
        Value::Number(n) if n.as_i64() == Some(15) => Ok(libc_sig::TERM),
        _ => Err(ConnectError::invalid(
            "signal is SIGNAL_SIGKILL or SIGNAL_SIGTERM",
        )),
    }
}

mod libc_sig {
    pub const KILL: i32 = 9;
    pub const TERM: i32 = 15;
}

async fn send_signal(
    Extension(envd): Extension<Envd>,
    request: Result<Unary<SignalRequest>, ConnectError>,
) -> Result<Response, ConnectError> {
    let Unary(request) = request?;
    let signal = signal_number(&request.signal)?;
    let proc = envd.sandbox.procs.find(&request.process)?;
    proc.control().kill(signal).await?;
    Ok(connect::reply(json!({})))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
enum Input {
    Stdin(String),
    Pty(String),
}

#[derive(Debug, Deserialize)]
struct InputRequest {
    process: Selector,
    input: Input,
}

async fn give_input(envd: &Envd, selector: &Selector, input: &Input) -> Result<(), ConnectError> {
    let (Input::Stdin(text) | Input::Pty(text)) = input;
    let data = connect::decode_bytes(text)?;
    if data.len() > INPUT_MAX {
        return Err(ConnectError::new(
            "resource_exhausted",
            format!("at most {INPUT_MAX} bytes of input at a time"),
        ));
    }
    let proc = envd.sandbox.procs.find(selector)?;
    proc.control().send_stdin(&data, false).await?;
    Ok(())
}

async fn send_input(
    Extension(envd): Extension<Envd>,
    request: Result<Unary<InputRequest>, ConnectError>,
) -> Result<Response, ConnectError> {
    let Unary(request) = request?;
    give_input(&envd, &request.process, &request.input).await?;
    Ok(connect::reply(json!({})))
}

async fn close_stdin(
    Extension(envd): Extension<Envd>,
    request: Result<Unary<ProcessRequest>, ConnectError>,
) -> Result<Response, ConnectError> {
    let Unary(request) = request?;
    let proc = envd.sandbox.procs.find(&request.process)?;
    proc.control().send_stdin(b"", true).await?;
    Ok(connect::reply(json!({})))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
enum StreamInputEvent {
    Start { process: Selector },
    Data { input: Input },
    Keepalive {},
}

#[derive(Debug, Deserialize)]
struct StreamInputMessage {
    event: StreamInputEvent,
}

/// `StreamInput`: a client stream whose first message names the process
/// and whose later ones carry its input.
async fn stream_input(Extension(envd): Extension<Envd>, request: Request) -> Response {
    let target: Arc<Mutex<Option<Selector>>> = Arc::default();
    let result = connect::each_envelope(request, |message| {
        let envd = envd.clone();
        let target = target.clone();
        async move {
            let message: StreamInputMessage = connect::parse(&message)?;
            match message.event {
                StreamInputEvent::Start { process } => {
                    envd.sandbox.procs.find(&process)?;
                    *target.lock().unwrap_or_else(|e| e.into_inner()) = Some(process);
                }
                StreamInputEvent::Data { input } => {
                    let selector = target
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .as_ref()
                        .map(|s| match s {
                            Selector::Pid(pid) => Selector::Pid(*pid),
                            Selector::Tag(tag) => Selector::Tag(tag.clone()),
                        })
                        .ok_or_else(|| ConnectError::invalid("input before the start message"))?;
                    give_input(&envd, &selector, &input).await?;
                }
                StreamInputEvent::Keepalive {} => {}
            }
            Ok(())
        }
        .boxed()
    })
    .await;
    let (sink, response) = connect::stream();
    tokio::spawn(async move {
        match result {
            Ok(()) => {
                if sink.send(&json!({})).await {
                    sink.end(None).await;
                }
            }
            Err(error) => sink.end(Some(error)).await,
        }
    });
    response
}

#[derive(Debug, Deserialize)]
struct UpdateRequest {
    process: Selector,
    pty: Option<Pty>,
}

async fn update(
    Extension(envd): Extension<Envd>,
    request: Result<Unary<UpdateRequest>, ConnectError>,
) -> Result<Response, ConnectError> {
    let Unary(request) = request?;
    let proc = envd.sandbox.procs.find(&request.process)?;
    if let Some(size) = request.pty.as_ref().and_then(|p| p.size.as_ref()) {
        if !proc.pty {
            return Err(ConnectError::invalid(format!(
                "process {} has no PTY",
                proc.pid
            )));
        }
        let size = pty_size(size)?;
        proc.control().resize(size.cols, size.rows).await?;
    }
    Ok(connect::reply(json!({})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_events_read_as_envd_writes_them() {
        let exited = end_event(&ExecOutput {
            exit_code: Some(3),
            ..ExecOutput::default()
        });
        assert_eq!(exited["exitCode"], 3);
        assert_eq!(exited["exited"], true);
        assert_eq!(exited["error"], "exit status 3");
        let ok = end_event(&ExecOutput {
            exit_code: Some(0),
            ..ExecOutput::default()
        });
        assert!(ok.get("error").is_none());
        let killed = end_event(&ExecOutput {
            signal: Some(9),
            ..ExecOutput::default()
        });
        assert_eq!(killed["exitCode"], -1);
        assert_eq!(killed["exited"], false);
        assert_eq!(killed["status"], "signal: killed");
    }

    #[test]
    fn selectors_and_inputs_parse_from_proto_json() {
        let r: ProcessRequest = serde_json::from_str(r#"{"process":{"pid":7}}"#).unwrap();
        assert!(matches!(r.process, Selector::Pid(7)));
        let r: InputRequest =
            serde_json::from_str(r#"{"process":{"tag":"t"},"input":{"stdin":"aGk="}}"#).unwrap();
        assert!(matches!(r.input, Input::Stdin(_)));
        let s: StartRequest = serde_json::from_str(
            r#"{"process":{"cmd":"/bin/bash","args":["-l","-c","echo hi"]},"stdin":false,"unknown":1}"#,
        )
        .unwrap();
        assert_eq!(s.stdin, Some(false));
        assert!(signal_number(&json!("SIGNAL_SIGKILL")).is_ok());
        assert!(signal_number(&json!("SIGNAL_SIGSTOP")).is_err());
    }
}
