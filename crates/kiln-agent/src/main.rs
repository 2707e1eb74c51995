//! kiln-agent: runs inside the guest, started by the image's `/init`. It
//! serves the kiln protocol on a byte stream: the virtio-serial port named
//! `agent` (found under /sys/class/virtio-ports), or stdin/stdout with
//! `--stdio` (used by the host-side tests).
//!
//! Threads, not async: one reader loop, and per exec one thread per output
//! stream plus one waiter, so the binary stays small and starts at once.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_proto::{read_frame, write_frame, Exec, ProtoError, Request, Response, CHUNK};

type Writer = Arc<Mutex<Box<dyn Write + Send>>>;
type Stdins = Arc<Mutex<HashMap<u64, std::process::ChildStdin>>>;
type Pids = Arc<Mutex<HashMap<u64, u32>>>;

fn send(writer: &Writer, response: &Response, body: &[u8]) {
    let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
    // A broken channel means the host is gone; there is nobody to tell.
    let _ = write_frame(&mut *w, response, body);
}

fn send_error(writer: &Writer, id: Option<u64>, message: String) {
    send(writer, &Response::Error { id, message }, b"");
}

fn find_port() -> Option<String> {
    let entries = std::fs::read_dir("/sys/class/virtio-ports").ok()?;
    for entry in entries.flatten() {
        let name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if name.trim() == "agent" {
            return Some(format!("/dev/{}", entry.file_name().to_string_lossy()));
        }
    }
    None
}

fn main() {
    let stdio = std::env::args().any(|a| a == "--stdio");
    let (reader, writer): (Box<dyn Read + Send>, Box<dyn Write + Send>) = if stdio {
        (Box::new(std::io::stdin()), Box::new(std::io::stdout()))
    } else {
        let mut waited = 0;
        let path = loop {
            if let Some(path) = find_port() {
                break path;
            }
            waited += 1;
            if waited > 5_000 {
                eprintln!("kiln-agent: no virtio port named agent");
                std::process::exit(1);
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let port = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| {
                eprintln!("kiln-agent: open {path}: {e}");
                std::process::exit(1);
            });
        let write_half = port.try_clone().expect("dup port");
        (Box::new(port), Box::new(write_half))
    };
    serve(reader, Arc::new(Mutex::new(writer)));
}

fn serve(mut reader: Box<dyn Read + Send>, writer: Writer) {
    let stdins: Stdins = Arc::default();
    let pids: Pids = Arc::default();
    loop {
        match read_frame::<Request>(&mut reader) {
            Ok((request, body)) => handle(request, body, &writer, &stdins, &pids),
            Err(error) if error.recoverable() => send_error(&writer, None, error.to_string()),
            Err(ProtoError::Io(_)) => {
                // The host closed the port (or it was never open): wait for
                // the next connection on the same port.
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(error) => {
                // The stream is out of step; say so, then keep reading.
                send_error(&writer, None, error.to_string());
            }
        }
    }
}

fn handle(request: Request, body: Vec<u8>, writer: &Writer, stdins: &Stdins, pids: &Pids) {
    match request {
        Request::Ping => send(
            writer,
            &Response::Pong {
                version: kiln_proto::VERSION,
                agent: env!("CARGO_PKG_VERSION").to_string(),
            },
            b"",
        ),
        Request::Exec(exec) => start_exec(exec, body, writer.clone(), stdins.clone(), pids.clone()),
        Request::Stdin { id, eof } => {
            let mut map = stdins.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(stdin) = map.get_mut(&id) {
                let _ = stdin.write_all(&body);
            }
            if eof {
                map.remove(&id);
            }
        }
        Request::Kill { id, signal } => {
            if let Some(pid) = pids.lock().unwrap_or_else(|e| e.into_inner()).get(&id) {
                // SAFETY: kill(2) on the process group of an exec this agent
                // started and still tracks.
                unsafe { libc::kill(-(*pid as i32), signal) };
            }
        }
        Request::WriteFile { path, mode } => {
            let written = write_file(&path, mode, &body);
            match written {
                Ok(()) => send(writer, &Response::Done, b""),
                Err(e) => send_error(writer, None, format!("{path}: {e}")),
            }
        }
        Request::ReadFile { path } => match std::fs::read(&path) {
            Ok(data) if data.len() <= kiln_proto::BODY_MAX => {
                send(writer, &Response::FileData { path }, &data)
            }
            Ok(_) => send_error(writer, None, format!("{path}: larger than 16 MiB")),
            Err(e) => send_error(writer, None, format!("{path}: {e}")),
        },
        Request::Shutdown => {
            send(writer, &Response::Done, b"");
            // SAFETY: plain syscalls with no pointers.
            unsafe {
                libc::sync();
                if libc::getpid() == 1 {
                    libc::reboot(libc::RB_POWER_OFF);
                }
            }
            std::process::exit(0);
        }
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// Threads kept for execs: starting a thread is slow in an emulated guest,
/// so finished exec threads wait for the next exec instead of exiting.
struct Pool {
    jobs: Mutex<std::sync::mpsc::Sender<Job>>,
    queue: Arc<Mutex<std::sync::mpsc::Receiver<Job>>>,
    idle: Arc<std::sync::atomic::AtomicUsize>,
}

fn pool() -> &'static Pool {
    static POOL: std::sync::OnceLock<Pool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        let (jobs, queue) = std::sync::mpsc::channel();
        Pool {
            jobs: Mutex::new(jobs),
            queue: Arc::new(Mutex::new(queue)),
            idle: Arc::default(),
        }
    })
}

/// Runs `job` on an idle pooled thread, or on a new one when none is idle,
/// so a long exec never holds up another.
fn run_on_pool(job: impl FnOnce() + Send + 'static) {
    use std::sync::atomic::Ordering;
    let pool = pool();
    let claimed = pool
        .idle
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if claimed {
        let _ = pool
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(Box::new(job));
        return;
    }
    let queue = pool.queue.clone();
    let idle = pool.idle.clone();
    std::thread::spawn(move || {
        let mut job: Job = Box::new(job);
        loop {
            job();
            idle.fetch_add(1, Ordering::SeqCst);
            let next = queue.lock().unwrap_or_else(|e| e.into_inner()).recv();
            match next {
                Ok(next) => job = next,
                Err(_) => return,
            }
        }
    });
}

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

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

fn kill_group(pid: u32) {
    // SAFETY: kill(2) on the process group of a child this agent started
    // and has not reaped yet.
    unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
}

fn write_file(path: &str, mode: Option<u32>, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = std::path::Path::new(path).parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(path, data)?;
    if let Some(mode) = mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

fn start_exec(exec: Exec, stdin: Vec<u8>, writer: Writer, stdins: Stdins, pids: Pids) {
    let id = exec.id;
    // Resolve the program here: with PATH set for the child, std would fall
    // back from posix_spawn (vfork-like) to fork, which costs milliseconds
    // in an emulated guest.
    let path_var = exec
        .env
        .get("PATH")
        .map(String::as_str)
        .unwrap_or(DEFAULT_PATH);
    let program = resolve(&exec.command, path_var);
    let mut command = Command::new(&program);
    // Its own process group, so a kill reaches everything it started and
    // no grandchild keeps the output pipes open.
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    command
        .args(&exec.args)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("HOME", "/root")
        .envs(&exec.env)
        // No stdin to give: /dev/null, one pipe fewer to make and close.
        .stdin(if stdin.is_empty() && !exec.stdin_open {
            Stdio::null()
        } else {
            Stdio::piped()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(cwd) = &exec.cwd {
        command.current_dir(cwd);
    }
    let started = Instant::now();
    let mut child: Child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            send_error(&writer, Some(id), format!("{}: {e}", exec.command));
            return;
        }
    };
    let pid = child.id();
    pids.lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id, pid);
    if let Some(mut child_stdin) = child.stdin.take() {
        if !stdin.is_empty() {
            let _ = child_stdin.write_all(&stdin);
        }
        if exec.stdin_open {
            stdins
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id, child_stdin);
        }
    }
    let stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");
    let (stdout_fd, stderr_fd) = {
        use std::os::unix::io::AsRawFd;
        (stdout.as_raw_fd(), stderr.as_raw_fd())
    };
    let deadline = exec
        .timeout_ms
        .map(|ms| started + Duration::from_millis(ms));
    // One thread per exec: it multiplexes both pipes with poll(2), enforces
    // the timeout, and reaps the child. Threads are costly to start in an
    // emulated guest; this keeps an exec to one.
    run_on_pool(move || {
        use std::os::unix::process::ExitStatusExt;
        let mut sources: [Option<Box<dyn Read + Send>>; 2] =
            [Some(Box::new(stdout)), Some(Box::new(stderr))];
        let mut raw = [
            libc::pollfd {
                fd: stdout_fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stderr_fd,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let mut timed_out = false;
        let mut buffer = vec![0u8; CHUNK];
        while raw.iter().any(|p| p.fd >= 0) {
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
                kill_group(pid);
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
                        send(&writer, &header, &buffer[..n]);
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
                kill_group(pid);
            }
            if deadline.is_none() || timed_out {
                break child.wait();
            }
            std::thread::sleep(Duration::from_micros(200));
        };
        pids.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        stdins.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        let (code, signal) = match status {
            Ok(status) => (status.code(), status.signal()),
            Err(_) => (None, None),
        };
        send(
            &writer,
            &Response::Exited {
                id,
                code,
                signal,
                timed_out,
                duration_us: started.elapsed().as_micros() as u64,
            },
            b"",
        );
    });
}
