//! Execs: `spawn` starts the process in its own group (or, on a PTY, its
//! own session), `feed` writes its stdin on a thread of its own, `pump`
//! streams its output, enforces its timeout and reaps it. The reader
//! thread only hands work over, so it never waits on a child.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_proto::{ErrorKind, Exec, PtySize, Response, CHUNK};

use crate::users::{self, User};
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
    /// The PTY's master, for resizes.
    terminal: Option<Arc<File>>,
}

/// The way to a command's stdin thread.
struct Feed {
    chunks: Sender<Vec<u8>>,
    pending: Arc<AtomicUsize>,
}

impl Feed {
    /// Starts the thread that owns the command's stdin (a pipe, or a dup
    /// of the PTY's master: closing it leaves the terminal open).
    fn start(mut stdin: impl Write + Send + 'static) -> Feed {
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

/// What `spawn` started: the child, its output, the way to its stdin.
struct Spawned {
    child: Child,
    outputs: Vec<Output>,
    stdin: Option<Box<dyn Write + Send>>,
    terminal: Option<Arc<File>>,
}

/// One stream of output: a pipe, or the PTY's master.
struct Output {
    fd: RawFd,
    source: Box<dyn Read + Send>,
    stderr: bool,
}

/// Starts `exec` with `stdin` as the first of its input.
pub fn start(agent: &Arc<Agent>, exec: Exec, stdin: Vec<u8>) {
    let id = exec.id;
    let user = match exec.user.as_deref().map(users::require).transpose() {
        Ok(user) => user,
        Err(e) => return agent.send_error(Some(id), ErrorKind::of(&e), e.to_string()),
    };
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
    let spawned = match spawn(&exec, wants_stdin, user.as_ref()) {
        Ok(spawned) => spawned,
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
    let Spawned {
        child,
        outputs,
        stdin: input,
        terminal,
    } = spawned;
    let feed = input.map(Feed::start);
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
            terminal,
        },
    );
    drop(execs);
    let deadline = exec
        .timeout_ms
        .map(|ms| started + Duration::from_millis(ms));
    let agent = agent.clone();
    pool::run(move || pump(&agent, id, child, outputs, deadline, started));
}

/// The command in its own process group, so a kill reaches everything it
/// started and no grandchild keeps the output pipes open. On a PTY, in a
/// session of its own instead (whose group is the same), with the
/// terminal as its controlling one.
fn spawn(exec: &Exec, wants_stdin: bool, user: Option<&User>) -> std::io::Result<Spawned> {
    use std::os::unix::process::CommandExt;
    // Resolve the program here: with PATH set for the child, std would fall
    // back from posix_spawn (vfork-like) to fork, which costs milliseconds
    // in an emulated guest.
    let path_var = exec
        .env
        .get("PATH")
        .map(String::as_str)
        .unwrap_or(DEFAULT_PATH);
    let mut command = Command::new(resolve(&exec.command, path_var));
    command
        .args(&exec.args)
        .env_clear()
        .env("PATH", DEFAULT_PATH);
    match user {
        Some(user) => command
            .env("HOME", &user.home)
            .env("USER", &user.name)
            .env("LOGNAME", &user.name),
        None => command.env("HOME", "/root"),
    };
    if exec.pty.is_some() {
        // Full-screen programs need one; the caller's wins.
        command.env("TERM", "xterm-256color");
    }
    command.envs(&exec.env);
    match (&exec.cwd, user) {
        (Some(cwd), _) => {
            command.current_dir(cwd);
        }
        (None, Some(user)) => {
            let home = std::path::Path::new(&user.home);
            command.current_dir(if home.is_dir() { home } else { "/".as_ref() });
        }
        (None, None) => {}
    }
    let ids = user.map(|user| (users::groups(user), user.uid, user.gid));
    let spawned = match exec.pty {
        Some(size) => {
            let (master, slave) = open_pty(size)?;
            if let Some(user) = user {
                // The terminal is theirs, as login(1) makes it.
                std::os::unix::fs::fchown(&slave, Some(user.uid), None)?;
            }
            command
                .stdin(Stdio::from(slave.try_clone()?))
                .stdout(Stdio::from(slave.try_clone()?))
                .stderr(Stdio::from(slave));
            // The feed gets a dup, so its end never closes the terminal.
            let stdin: Option<Box<dyn Write + Send>> = if wants_stdin {
                Some(Box::new(master.try_clone()?))
            } else {
                None
            };
            let master = Arc::new(master);
            Spawned {
                child: spawn_as(&mut command, ids, true)?,
                outputs: vec![Output {
                    fd: master.as_raw_fd(),
                    source: Box::new(master.clone()),
                    stderr: false,
                }],
                stdin,
                terminal: Some(master),
            }
        }
        None => {
            command.process_group(0);
            // No stdin to give: /dev/null, one pipe fewer to make and close.
            command
                .stdin(if wants_stdin {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let mut child = spawn_as(&mut command, ids, false)?;
            let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
            let mut outputs = Vec::with_capacity(2);
            if let Some(out) = stdout {
                outputs.push(Output {
                    fd: out.as_raw_fd(),
                    source: Box::new(out),
                    stderr: false,
                });
            }
            if let Some(err) = stderr {
                outputs.push(Output {
                    fd: err.as_raw_fd(),
                    source: Box::new(err),
                    stderr: true,
                });
            }
            let stdin = child
                .stdin
                .take()
                .map(|s| Box::new(s) as Box<dyn Write + Send>);
            Spawned {
                child,
                outputs,
                stdin,
                terminal: None,
            }
        }
    };
    Ok(spawned)
}

/// Spawns `command`, first (in the child) making a new session with the
/// terminal on stdin as its controlling one, when `terminal`, then taking
/// on `ids` (groups, uid, gid), when given.
fn spawn_as(
    command: &mut Command,
    ids: Option<(Vec<libc::gid_t>, u32, u32)>,
    terminal: bool,
) -> std::io::Result<Child> {
    use std::os::unix::process::CommandExt;
    if ids.is_none() && !terminal {
        // No hook, so std may still use posix_spawn.
        return command.spawn();
    }
    let check = |result: libc::c_int| {
        if result < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // SAFETY: between fork and exec the hook makes only async-signal-
    // safe syscalls, on memory allocated before the fork.
    unsafe {
        command.pre_exec(move || {
            if terminal {
                check(libc::setsid())?;
                check(libc::ioctl(0, libc::TIOCSCTTY, 0))?;
            }
            if let Some((groups, uid, gid)) = &ids {
                check(libc::setgroups(groups.len(), groups.as_ptr()))?;
                check(libc::setgid(*gid))?;
                check(libc::setuid(*uid))?;
            }
            Ok(())
        });
    }
    command.spawn()
}

/// A new PTY of `size`: its master and slave.
fn open_pty(size: PtySize) -> std::io::Result<(File, File)> {
    let (mut master, mut slave) = (-1, -1);
    let size = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty(3) writes two fds; no name is asked for and no
    // termios given, and `size` outlives the call.
    let opened = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    if opened != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds are new and owned by nothing else.
    let (master, slave) = unsafe { (File::from_raw_fd(master), File::from_raw_fd(slave)) };
    // openpty does not set close-on-exec. Execs are only spawned on the
    // reader thread, which is here, so no child can inherit them before
    // this.
    for fd in [&master, &slave] {
        // SAFETY: fcntl(2) on an fd this function owns.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok((master, slave))
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

/// Sets the PTY size of exec `exec`; the kernel tells its foreground
/// group with SIGWINCH.
pub fn resize(agent: &Agent, id: u64, exec: u64, cols: u16, rows: u16) {
    let terminal = agent
        .execs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&exec)
        .and_then(|running| running.terminal.clone());
    let Some(terminal) = terminal else {
        return agent.send_error(
            Some(id),
            ErrorKind::NotFound,
            format!("no exec {exec} on a terminal"),
        );
    };
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize, which outlives the call.
    if unsafe { libc::ioctl(terminal.as_raw_fd(), libc::TIOCSWINSZ, &size) } < 0 {
        let e = std::io::Error::last_os_error();
        return agent.send_error(Some(id), ErrorKind::of(&e), format!("resize: {e}"));
    }
    agent.send(&Response::Done { id }, b"");
}

/// One thread per exec: it multiplexes its output (two pipes, or a PTY)
/// with poll(2), enforces the timeout, and reaps the child. Threads are
/// costly to start in an emulated guest; this keeps an exec to one (two
/// with stdin).
fn pump(
    agent: &Agent,
    id: u64,
    mut child: Child,
    outputs: Vec<Output>,
    deadline: Option<Instant>,
    started: Instant,
) {
    use std::os::unix::process::ExitStatusExt;
    let pid = child.id();
    let mut raw: Vec<libc::pollfd> = outputs
        .iter()
        .map(|output| libc::pollfd {
            fd: output.fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let stderr: Vec<bool> = outputs.iter().map(|output| output.stderr).collect();
    let mut sources: Vec<Option<Box<dyn Read + Send>>> = outputs
        .into_iter()
        .map(|output| Some(output.source))
        .collect();
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
        // SAFETY: `raw` is a valid array of `raw.len()` pollfd for the call.
        let ready = unsafe { libc::poll(raw.as_mut_ptr(), raw.len() as libc::nfds_t, wait_ms) };
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
            // A PTY's master reads EIO once the last holder of its slave
            // is gone: its end, as end of file is a pipe's.
            match source.read(&mut buffer) {
                Ok(0) | Err(_) => {
                    entry.fd = -1;
                    sources[i] = None;
                }
                Ok(n) => {
                    let header = if stderr[i] {
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
