//! kiln-agent: runs inside the guest, started by the image's `/init`. It
//! serves the kiln protocol on a byte stream: the virtio-serial port named
//! `agent` (found under /sys/class/virtio-ports), or stdin/stdout with
//! `--stdio` (used by the host-side tests).
//!
//! Threads, not async, so the binary stays small and starts at once. One
//! thread reads requests and never blocks on a child: per exec, one pooled
//! thread multiplexes both output pipes with `poll(2)`, enforces the
//! timeout and reaps the child, and (when the exec has stdin) another
//! pooled thread feeds its stdin. File requests run on pooled threads too,
//! so a slow file never holds up a kill or a ping.

mod exec;
mod fs;
mod pool;
mod users;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_proto::{read_frame, write_frame, ErrorKind, ProtoError, Request, Response};

type Writer = Arc<Mutex<Box<dyn Write + Send>>>;

/// What the reader shares with the exec threads.
struct Agent {
    writer: Writer,
    execs: Mutex<HashMap<u64, exec::Running>>,
}

impl Agent {
    fn send(&self, response: &Response, body: &[u8]) {
        send(&self.writer, response, body);
    }

    fn send_error(&self, id: Option<u64>, kind: ErrorKind, message: String) {
        self.send(&Response::Error { id, kind, message }, b"");
    }
}

fn send(writer: &Writer, response: &Response, body: &[u8]) {
    let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
    // A broken channel means the host is gone; there is nobody to tell.
    let _ = write_frame(&mut *w, response, body);
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
        mount_secrets();
        (Box::new(port), Box::new(write_half))
    };
    let agent = Arc::new(Agent {
        writer: Arc::new(Mutex::new(writer)),
        execs: Mutex::default(),
    });
    serve(reader, &agent, stdio);
    // The stream is out of step (or, with --stdio, closed): nothing more
    // can be read from it, so the agent has no more use.
    power_off(if stdio { 0 } else { 2 });
}

/// Reads requests until the stream can no longer be trusted.
fn serve(mut reader: Box<dyn Read + Send>, agent: &Arc<Agent>, stdio: bool) {
    loop {
        match read_frame::<Request>(&mut reader) {
            Ok((request, body)) => handle(agent, request, body),
            Err(error) if error.recoverable() => {
                agent.send_error(None, ErrorKind::Invalid, error.to_string())
            }
            Err(ProtoError::Io(_)) if stdio => return,
            Err(ProtoError::Io(_)) => {
                // The host closed the port (or it was never open): wait for
                // the next connection on the same port.
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(error) => {
                // A bad prefix: the rest of the stream (a file's contents,
                // say) would be read as requests. Say why, and stop.
                agent.send_error(None, ErrorKind::Invalid, error.to_string());
                return;
            }
        }
    }
}

fn power_off(code: i32) -> ! {
    // SAFETY: plain syscalls with no pointers.
    unsafe {
        libc::sync();
        if libc::getpid() == 1 {
            libc::reboot(libc::RB_POWER_OFF);
        }
    }
    std::process::exit(code);
}

fn handle(agent: &Arc<Agent>, request: Request, body: Vec<u8>) {
    match request {
        Request::Ping { id } => agent.send(
            &Response::Pong {
                id,
                version: kiln_proto::VERSION,
                agent: env!("CARGO_PKG_VERSION").to_string(),
            },
            b"",
        ),
        Request::Exec(request) => exec::start(agent, request, body),
        Request::Stdin { id, eof } => exec::stdin(agent, id, body, eof),
        Request::Kill { id, signal } => exec::kill(agent, id, signal),
        Request::WriteFile {
            id,
            path,
            mode,
            user,
        } => on_pool(agent, id, move || {
            fs::write_file(&path, mode, user.as_deref(), &body)
        }),
        Request::RemoveFile { id, path } => {
            let agent = agent.clone();
            pool::run(move || match remove_file(&path) {
                Ok(()) => agent.send(&Response::Done { id }, b""),
                Err(e) => agent.send_error(Some(id), ErrorKind::of(&e), format!("{path}: {e}")),
            });
        }
        Request::Stat { id, path, user } => {
            entries_on_pool(agent, id, move || fs::stat(&path, user.as_deref()))
        }
        Request::ListDir {
            id,
            path,
            depth,
            user,
        } => entries_on_pool(agent, id, move || {
            fs::list_dir(&path, depth, user.as_deref())
        }),
        Request::MakeDir { id, path, user } => {
            entries_on_pool(agent, id, move || fs::make_dir(&path, user.as_deref()))
        }
        Request::Move {
            id,
            source,
            destination,
            user,
        } => entries_on_pool(agent, id, move || {
            fs::rename(&source, &destination, user.as_deref())
        }),
        Request::Remove { id, path, user } => {
            on_pool(agent, id, move || fs::remove(&path, user.as_deref()))
        }
        Request::Resize {
            id,
            exec,
            cols,
            rows,
        } => exec::resize(agent, id, exec, cols, rows),
        Request::ReadFile { id, path } => {
            let agent = agent.clone();
            pool::run(move || match read_file(&path) {
                Ok(data) => agent.send(&Response::FileData { id }, &data),
                Err((kind, message)) => agent.send_error(Some(id), kind, message),
            });
        }
        Request::AddEntropy { id } => match add_entropy(&body) {
            Ok(()) => agent.send(&Response::Done { id }, b""),
            Err(e) => agent.send_error(Some(id), ErrorKind::of(&e), format!("entropy: {e}")),
        },
        Request::SetClock { id, unix_ns } => match set_clock(unix_ns) {
            Ok(()) => agent.send(&Response::Done { id }, b""),
            Err(e) => agent.send_error(Some(id), ErrorKind::of(&e), format!("clock: {e}")),
        },
        Request::Shutdown { id } => {
            agent.send(&Response::Done { id }, b"");
            power_off(0);
        }
    }
}

/// Runs a file request on a pooled thread, answered by `Done`.
fn on_pool(
    agent: &Arc<Agent>,
    id: u64,
    job: impl FnOnce() -> Result<(), fs::Failure> + Send + 'static,
) {
    let agent = agent.clone();
    pool::run(move || match job() {
        Ok(()) => agent.send(&Response::Done { id }, b""),
        Err((kind, message)) => agent.send_error(Some(id), kind, message),
    });
}

/// Runs a file request on a pooled thread, answered by `Entries`.
fn entries_on_pool(
    agent: &Arc<Agent>,
    id: u64,
    job: impl FnOnce() -> Result<Vec<kiln_proto::Entry>, fs::Failure> + Send + 'static,
) {
    let agent = agent.clone();
    pool::run(
        move || match job().and_then(|entries| fs::encode_entries(&entries)) {
            Ok(body) => agent.send(&Response::Entries { id }, &body),
            Err((kind, message)) => agent.send_error(Some(id), kind, message),
        },
    );
}

fn remove_file(path: &str) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Where the host writes a command's secrets, one file each: a tmpfs of
/// its own, so values stay in memory, private to root.
const SECRETS_DIR: &str = "/run/secrets";

fn mount_secrets() {
    use std::ffi::CString;
    if let Err(e) = std::fs::create_dir_all(SECRETS_DIR) {
        eprintln!("kiln-agent: {SECRETS_DIR}: {e}");
        return;
    }
    let (source, target, fstype, data) = (
        CString::new("tmpfs").expect("no NUL"),
        CString::new(SECRETS_DIR).expect("no NUL"),
        CString::new("tmpfs").expect("no NUL"),
        CString::new("mode=0700,size=4m").expect("no NUL"),
    );
    // SAFETY: mount(2) with NUL-terminated strings that outlive the call.
    let mounted = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            data.as_ptr().cast(),
        )
    };
    if mounted != 0 {
        eprintln!(
            "kiln-agent: mount tmpfs on {SECRETS_DIR}: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// A file of at most one frame's body; never reads more than that (a path
/// such as /dev/zero has no end).
fn read_file(path: &str) -> Result<Vec<u8>, (ErrorKind, String)> {
    let file =
        std::fs::File::open(path).map_err(|e| (ErrorKind::of(&e), format!("{path}: {e}")))?;
    let mut data = Vec::new();
    file.take(kiln_proto::BODY_MAX as u64 + 1)
        .read_to_end(&mut data)
        .map_err(|e| (ErrorKind::of(&e), format!("{path}: {e}")))?;
    if data.len() > kiln_proto::BODY_MAX {
        return Err((
            ErrorKind::TooLarge,
            format!("{path}: larger than {} bytes", kiln_proto::BODY_MAX),
        ));
    }
    Ok(data)
}

/// `_IOW('R', 0x03, int[2])`: adds bytes to the input pool and credits them.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `_IO('R', 0x07)`: reseeds the CRNG from the input pool now. Writing to
/// /dev/urandom only mixes the input pool (Linux 5.17 and later), so a
/// restored clone would draw from its snapshot's CRNG state until the next
/// scheduled reseed.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

fn add_entropy(seed: &[u8]) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    if seed.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "no entropy given",
        ));
    }
    let random = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let words = 2 + seed.len().div_ceil(4);
    let mut info = vec![0u32; words];
    info[0] = (seed.len() * 8) as u32;
    info[1] = seed.len() as u32;
    for (i, chunk) in seed.chunks(4).enumerate() {
        let mut word = [0u8; 4];
        word[..chunk.len()].copy_from_slice(chunk);
        info[2 + i] = u32::from_ne_bytes(word);
    }
    // SAFETY: `info` is a rand_pool_info whose buffer holds `buf_size` bytes;
    // the kernel only reads it.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: an ioctl without an argument.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG as _) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn set_clock(unix_ns: u64) -> std::io::Result<()> {
    let time = libc::timespec {
        tv_sec: (unix_ns / 1_000_000_000) as _,
        tv_nsec: (unix_ns % 1_000_000_000) as _,
    };
    // SAFETY: clock_settime(2) reads one timespec.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &time) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
