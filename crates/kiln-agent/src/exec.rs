//! Execs: `spawn` starts the process in its own group, `feed` writes its
//! stdin on a thread of its own, `pump` streams its output, enforces its
//! timeout and reaps it. The reader thread only hands work over, so it
//! never waits on a child.

use std::io::{Read, Write};
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_proto::{ErrorKind, Exec, Response, CHUNK};

use crate::{pool, Agent};

/// Stdin the host may send ahead of what the command has read. Past it the
/// command is killed: the guest's memory is small, and a command that does
/// not read its stdin would otherwise hold it all.
const STDIN_BACKLOG_MAX: usize = 2 * kiln_proto::BODY_MAX;

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A running exec as the reader sees it.
pub struct Running {
    pid: u32,
    stdin: Option<Feed>,
}

/// The way to a command's stdin thread.
struct Feed {
    chunks: Sender<Vec<u8>>,
    pending: Arc<AtomicUsize>,
}

impl Feed {
    /// Starts the thread that owns the command's stdin.
    fn start(mut stdin: ChildStdin) -> Feed {
        let (chunks, queue) = std::sync::mpsc::channel::<Vec<u8>>();
        let pending = Arc::new(AtomicUsize::new(0));
        let written = pending.clone();
        pool::run(move || {
            let mut broken = false;
            for chunk in queue {
                // A command that closed its stdin gets no more of it; the
                // rest is counted off and dropped.
                broken = broken || stdin.write_all(&chunk).is_err();
                written.fetch_sub(chunk.len(), Ordering::SeqCst);
            }
            // The sender is gone (end of stdin, or the exec ended): dropping
            // `stdin` closes the pipe.
        });
        Feed { chunks, pending }
    }

    /// Queues bytes; false when that would pass the backlog bound.
    fn push(&self, data: Vec<u8>) -> bool {
        let len = data.len();
        if self.pending.fetch_add(len, Ordering::SeqCst) + len > STDIN_BACKLOG_MAX {
            return false;
        }
        let _ = self.chunks.send(data);
        true
    }
}

/// The program's path: as given when it names a path, else the first
/// executable of that name on `path_var`.
fn resolve(command: &str, path_var: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    if command.contains('/') {
        return command.into();
    }
    path_var
        .split(':')
        .map(|dir| std::path::Path::new(dir).join(command))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .unwrap_or_else(|| command.into())
}

fn kill_group(pid: u32, signal: i32) {
    // SAFETY: kill(2) on the process group of a child this agent started
    // and has not reaped yet.
    unsafe { libc::kill(-(pid as i32), signal) };
}

/// Starts `exec` with `stdin` as the first of its input.
pub fn start(agent: &Arc<Agent>, exec: Exec, stdin: Vec<u8>) {
    let id = exec.id;
    let mut execs = agent.execs.lock().unwrap_or_else(|e| e.into_inner());
    if execs.contains_key(&id) {
        drop(execs);
        agent.send_error(
            Some(id),
            ErrorKind::Invalid,
            format!("exec {id} is running"),
        );
        return;
    }
    let wants_stdin = !stdin.is_empty() || exec.stdin_open;
    let started = Instant::now();
    let mut child = match spawn(&exec, wants_stdin) {
        Ok(child) => child,
        Err(e) => {
            drop(execs);
            agent.send_error(
                Some(id),
                ErrorKind::of(&e),
                format!("{}: {e}", exec.command),
            );
            return;
        }
    };
    let feed = child.stdin.take().map(Feed::start);
    if let Some(feed) = &feed {
        if !stdin.is_empty() {
            feed.push(stdin);
        }
    }
    let pid = child.id();
    execs.insert(
        id,
        Running {
            pid,
            // Without `stdin_open` the first body is all: dropping the feed
            // closes stdin once it is written.
            stdin: feed.filter(|_| exec.stdin_open),
        },
    );
    drop(execs);
    let stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");
    let deadline = exec
        .timeout_ms
        .map(|ms| started + Duration::from_millis(ms));
    let agent = agent.clone();
    pool::run(move || pump(&agent, id, child, (stdout, stderr), deadline, started));
}

/// The command in its own process group, so a kill reaches everything it
/// started and no grandchild keeps the output pipes open.
fn spawn(exec: &Exec, wants_stdin: bool) -> std::io::Result<Child> {
    // Resolve the program here: with PATH set for the child, std would fall
    // back from posix_spawn (vfork-like) to fork, which costs milliseconds
    // in an emulated guest.
    let path_var = exec
        .env
        .get("PATH")
        .map(String::as_str)
        .unwrap_or(DEFAULT_PATH);
    let mut command = Command::new(resolve(&exec.command, path_var));
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    command
        .args(&exec.args)
        .env_clear()
        .env("PATH", DEFAULT_PATH)
        .env("HOME", "/root")
        .envs(&exec.env)
        // No stdin to give: /dev/null, one pipe fewer to make and close.
        .stdin(if wants_stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(cwd) = &exec.cwd {
        command.current_dir(cwd);
    }
    command.spawn()
}

/// More stdin for a running exec.
pub fn stdin(agent: &Agent, id: u64, data: Vec<u8>, eof: bool) {
    let mut execs = agent.execs.lock().unwrap_or_else(|e| e.into_inner());
    let Some(running) = execs.get_mut(&id) else {
        return;
    };
    let Some(feed) = &running.stdin else { return };
    if !data.is_empty() && !feed.push(data) {
        kill_group(running.pid, libc::SIGKILL);
        running.stdin = None;
        drop(execs);
        agent.send_error(
            Some(id),
            ErrorKind::TooLarge,
            format!("more than {STDIN_BACKLOG_MAX} bytes of stdin not yet read: killed"),
        );
        return;
    }
    if eof {
        running.stdin = None;
    }
}

/// Signals a running exec's process group.
pub fn kill(agent: &Agent, id: u64, signal: i32) {
    if let Some(running) = agent
        .execs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&id)
    {
        kill_group(running.pid, signal);
    }
}

/// One thread per exec: it multiplexes both pipes with poll(2), enforces
/// the timeout, and reaps the child. Threads are costly to start in an
/// emulated guest; this keeps an exec to one (two with stdin).
fn pump(
    agent: &Agent,
    id: u64,
    mut child: Child,
    pipes: (ChildStdout, ChildStderr),
    deadline: Option<Instant>,
    started: Instant,
) {
    use std::os::unix::io::AsRawFd;
    use std::os::unix::process::ExitStatusExt;
    let pid = child.id();
    let mut raw = [
        libc::pollfd {
            fd: pipes.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: pipes.1.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let mut sources: [Option<Box<dyn Read>>; 2] =
        [Some(Box::new(pipes.0)), Some(Box::new(pipes.1))];
    let mut timed_out = false;
    let mut buffer = vec![0u8; CHUNK];
    while raw.iter().any(|p| p.fd >= 0) {
        // Checked on every turn: a command whose output never pauses keeps
        // `poll` from ever timing out.
        if !timed_out && deadline.is_some_and(|d| Instant::now() >= d) {
            timed_out = true;
            kill_group(pid, libc::SIGKILL);
        }
        let wait_ms = match deadline {
            Some(deadline) if !timed_out => deadline
                .saturating_duration_since(Instant::now())
                .as_millis()
                .min(i32::MAX as u128) as i32,
            _ => -1,
        };
        // SAFETY: `raw` is a valid array of two pollfd for the call.
        let ready = unsafe { libc::poll(raw.as_mut_ptr(), 2, wait_ms) };
        if ready == 0 {
            timed_out = true;
            kill_group(pid, libc::SIGKILL);
            continue;
        }
        for (i, entry) in raw.iter_mut().enumerate() {
            if entry.fd < 0 || entry.revents == 0 {
                continue;
            }
            entry.revents = 0;
            let Some(source) = sources[i].as_mut() else {
                continue;
            };
            match source.read(&mut buffer) {
                Ok(0) | Err(_) => {
                    entry.fd = -1;
                    sources[i] = None;
                }
                Ok(n) => {
                    let header = if i == 1 {
                        Response::Stderr { id }
                    } else {
                        Response::Stdout { id }
                    };
                    agent.send(&header, &buffer[..n]);
                }
            }
        }
    }
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) => {}
            Err(e) => break Err(e),
        }
        if deadline.is_some_and(|d| Instant::now() >= d) && !timed_out {
            timed_out = true;
            kill_group(pid, libc::SIGKILL);
        }
        if deadline.is_none() || timed_out {
            break child.wait();
        }
        std::thread::sleep(Duration::from_micros(200));
    };
    agent
        .execs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&id);
    let (code, signal) = match status {
        Ok(status) => (status.code(), status.signal()),
        Err(_) => (None, None),
    };
    agent.send(
        &Response::Exited {
            id,
            code,
            signal,
            timed_out,
            duration_us: started.elapsed().as_micros().min(u64::MAX as u128) as u64,
        },
        b"",
    );
}
