//! The agent on the host, speaking over its stdin/stdout: the same code
//! that serves the virtio port inside a guest.

use std::io::Write;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use std::path::{Path, PathBuf};

use kiln_proto::{
    encode, read_frame, write_frame, Entry, EntryKind, ErrorKind, Exec, PtySize, Request, Response,
};

struct Agent {
    child: Child,
    input: ChildStdin,
    output: ChildStdout,
}

/// What one exec gave back.
#[derive(Debug, Default)]
struct Outcome {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    code: Option<i32>,
    signal: Option<i32>,
    timed_out: bool,
}

impl Agent {
    /// The agent with a watchdog: a deadlocked agent is killed after a
    /// minute, so a test that would hang fails on end of stream instead.
    fn start() -> Agent {
        Agent::start_with(None)
    }

    /// The agent with its passwd and group files in `etc`, when given.
    fn start_with(etc: Option<&Path>) -> Agent {
        let mut command = Command::new(env!("CARGO_BIN_EXE_kiln-agent"));
        if let Some(etc) = etc {
            command.env("KILN_AGENT_ETC", etc);
        }
        let mut child = command
            .arg("--stdio")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let input = child.stdin.take().unwrap();
        let output = child.stdout.take().unwrap();
        let pid = child.id() as i32;
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(60));
            // SAFETY: kill(2) on the agent this test started; if it is gone
            // already the pid is a zombie of this process until `Drop` reaps.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        });
        Agent {
            child,
            input,
            output,
        }
    }

    fn send(&mut self, request: &Request, body: &[u8]) {
        write_frame(&mut self.input, request, body).unwrap();
    }

    fn recv(&mut self) -> (Response, Vec<u8>) {
        read_frame(&mut self.output).unwrap()
    }

    /// Collects exec `id`'s output until it ends.
    fn wait(&mut self, id: u64) -> Outcome {
        let mut out = Outcome::default();
        loop {
            match self.recv() {
                (Response::Stdout { id: i }, body) if i == id => out.stdout.extend(body),
                (Response::Stderr { id: i }, body) if i == id => out.stderr.extend(body),
                (
                    Response::Exited {
                        id: i,
                        code,
                        signal,
                        timed_out,
                        ..
                    },
                    _,
                ) if i == id => {
                    out.code = code;
                    out.signal = signal;
                    out.timed_out = timed_out;
                    return out;
                }
                (other, _) => panic!("unexpected {other:?}"),
            }
        }
    }

    /// The answer to a file request: its entries, or its error's kind.
    fn entries(&mut self, request: Request) -> Result<Vec<Entry>, ErrorKind> {
        self.send(&request, b"");
        match self.recv() {
            (Response::Entries { .. }, body) => Ok(serde_json::from_slice(&body).unwrap()),
            (Response::Error { kind, .. }, _) => Err(kind),
            (other, _) => panic!("unexpected {other:?}"),
        }
    }

    /// The answer to a request answered by `Done`.
    fn done(&mut self, request: Request, body: &[u8]) -> Result<(), ErrorKind> {
        self.send(&request, body);
        match self.recv().0 {
            Response::Done { .. } => Ok(()),
            Response::Error { kind, .. } => Err(kind),
            other => panic!("unexpected {other:?}"),
        }
    }

    fn exec(&mut self, exec: Exec, stdin: &[u8]) -> Outcome {
        let id = exec.id;
        self.send(&Request::Exec(exec), stdin);
        self.wait(id)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sh(id: u64, script: &str) -> Exec {
    Exec {
        id,
        command: "sh".into(),
        args: vec!["-c".into(), script.into()],
        ..Exec::default()
    }
}

#[test]
fn ping_answers_with_its_id_and_the_version() {
    let mut agent = Agent::start();
    agent.send(&Request::Ping { id: 41 }, b"");
    assert!(matches!(
        agent.recv().0,
        Response::Pong {
            id: 41,
            version: kiln_proto::VERSION,
            ..
        }
    ));
}

#[test]
fn exec_streams_output_and_reports_exit() {
    let mut agent = Agent::start();
    let out = agent.exec(sh(1, "echo out; echo err >&2; exit 7"), b"");
    assert_eq!(
        (out.stdout.as_slice(), out.stderr.as_slice(), out.code),
        (&b"out\n"[..], &b"err\n"[..], Some(7))
    );
    let mut exec = sh(2, "cat; echo \"$GREETING\"; pwd");
    exec.env.insert("GREETING".into(), "hi".into());
    exec.cwd = Some("/tmp".into());
    let out = agent.exec(exec, b"from stdin\n");
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "from stdin\nhi\n/tmp\n"
    );
    assert_eq!(out.code, Some(0));
    let out = agent.exec(sh(3, "head -c 3000000 /dev/zero"), b"");
    assert_eq!(out.stdout.len(), 3_000_000);
}

#[test]
fn a_mebibyte_of_stdin_through_cat_comes_back_whole() {
    // Larger than any pipe buffer: stdin must be written while output is
    // read, by a thread other than the one that reads requests.
    let mut agent = Agent::start();
    let data: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    let out = agent.exec(
        Exec {
            id: 1,
            command: "cat".into(),
            ..Exec::default()
        },
        &data,
    );
    assert_eq!(out.code, Some(0));
    assert!(out.stdout == data, "{} bytes back", out.stdout.len());
    // Streamed stdin too, in frames, with the end of stdin last.
    agent.send(
        &Request::Exec(Exec {
            id: 2,
            command: "cat".into(),
            stdin_open: true,
            ..Exec::default()
        }),
        b"",
    );
    for chunk in data.chunks(200_000) {
        agent.send(&Request::Stdin { id: 2, eof: false }, chunk);
    }
    agent.send(&Request::Stdin { id: 2, eof: true }, b"");
    let out = agent.wait(2);
    assert!(out.stdout == data, "{} bytes back", out.stdout.len());
}

#[test]
fn execs_run_at_once_and_kill_and_ping_answer_during_a_flood() {
    let mut agent = Agent::start();
    // Exec 1 floods; exec 2 waits for stdin that exec 3's end lets through.
    agent.send(
        &Request::Exec(Exec {
            id: 1,
            command: "cat".into(),
            args: vec!["/dev/zero".into()],
            ..Exec::default()
        }),
        b"",
    );
    agent.send(
        &Request::Exec(Exec {
            id: 2,
            command: "cat".into(),
            stdin_open: true,
            ..Exec::default()
        }),
        b"",
    );
    agent.send(&Request::Exec(sh(3, "echo three")), b"");
    agent.send(&Request::Ping { id: 100 }, b"");
    let (mut three, mut three_ended, mut pong, mut flooded) = (Vec::new(), false, false, 0usize);
    while !three_ended || !pong || flooded < 1 << 20 {
        match agent.recv() {
            (Response::Stdout { id: 1 }, body) => flooded += body.len(),
            (Response::Stdout { id: 3 }, body) => three.extend(body),
            (Response::Exited { id: 3, code, .. }, _) => {
                assert_eq!(code, Some(0));
                three_ended = true;
            }
            (Response::Pong { id: 100, .. }, _) => pong = true,
            (other, _) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(three, b"three\n");
    agent.send(&Request::Stdin { id: 2, eof: true }, b"two");
    agent.send(&Request::Kill { id: 1, signal: 9 }, b"");
    let (mut two, mut ended) = (Vec::new(), [false; 2]);
    while ended != [true; 2] {
        match agent.recv() {
            (Response::Stdout { id: 1 }, _) => {}
            (Response::Stdout { id: 2 }, body) => two.extend(body),
            (Response::Exited { id: 1, signal, .. }, _) => {
                assert_eq!(signal, Some(9));
                ended[0] = true;
            }
            (Response::Exited { id: 2, code, .. }, _) => {
                assert_eq!(code, Some(0));
                ended[1] = true;
            }
            (other, _) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(two, b"two");
}

#[test]
fn timeouts_kill_and_say_so() {
    let mut agent = Agent::start();
    let mut exec = sh(1, "sleep 30");
    exec.timeout_ms = Some(200);
    let out = agent.exec(exec, b"");
    assert_eq!((out.code, out.signal, out.timed_out), (None, Some(9), true));
    let out = agent.exec(sh(2, "echo still here"), b"");
    assert_eq!(out.stdout, b"still here\n");
}

#[test]
fn unknown_commands_are_errors() {
    let mut agent = Agent::start();
    agent.send(
        &Request::Exec(Exec {
            id: 9,
            command: "/no/such/binary".into(),
            ..Exec::default()
        }),
        b"",
    );
    assert!(matches!(
        agent.recv().0,
        Response::Error {
            id: Some(9),
            kind: ErrorKind::NotFound,
            ..
        }
    ));
}

#[test]
fn files_round_trip() {
    let mut agent = Agent::start();
    let dir = std::env::temp_dir().join(format!("kiln-agent-test-{}", std::process::id()));
    let path = dir.join("sub/blob.bin").display().to_string();
    let data: Vec<u8> = (0..2_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    agent.send(
        &Request::WriteFile {
            id: 1,
            path: path.clone(),
            mode: Some(0o600),
            user: None,
        },
        &data,
    );
    assert_eq!(agent.recv().0, Response::Done { id: 1 });
    agent.send(&Request::ReadFile { id: 2, path }, b"");
    let (response, body) = agent.recv();
    assert_eq!(response, Response::FileData { id: 2 });
    assert_eq!(body, data);
    agent.send(
        &Request::ReadFile {
            id: 3,
            path: "/no/such/file".into(),
        },
        b"",
    );
    assert!(matches!(
        agent.recv().0,
        Response::Error {
            id: Some(3),
            kind: ErrorKind::NotFound,
            ..
        }
    ));
    // A file without end is refused at the frame limit, not read for ever.
    agent.send(
        &Request::ReadFile {
            id: 4,
            path: "/dev/zero".into(),
        },
        b"",
    );
    assert!(matches!(
        agent.recv().0,
        Response::Error {
            id: Some(4),
            kind: ErrorKind::TooLarge,
            ..
        }
    ));
    let _ = std::fs::remove_dir_all(dir);
}

/// Secret files: written with their mode from the first byte (an existing
/// file's looser mode is tightened before the new contents go in), and
/// removed; removing what is not there is done too.
#[test]
fn files_are_written_with_their_mode_and_removed() {
    use std::os::unix::fs::PermissionsExt;
    let mut agent = Agent::start();
    let dir = std::env::temp_dir().join(format!("kiln-agent-modes-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("token");
    std::fs::write(&file, b"old").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let path = file.display().to_string();
    agent.send(
        &Request::WriteFile {
            id: 1,
            path: path.clone(),
            mode: Some(0o400),
            user: None,
        },
        b"value",
    );
    assert_eq!(agent.recv().0, Response::Done { id: 1 });
    let meta = std::fs::metadata(&file).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o400);
    assert_eq!(std::fs::read(&file).unwrap(), b"value");
    for id in [2, 3] {
        agent.send(
            &Request::RemoveFile {
                id,
                path: path.clone(),
            },
            b"",
        );
        assert_eq!(agent.recv().0, Response::Done { id });
        assert!(!file.exists());
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn malformed_frames_get_an_error_and_the_agent_lives_on() {
    let mut agent = Agent::start();
    let garbage = [&[kiln_proto::VERSION, 5, 0, 0, 0, 0, 0, 0, 0][..], b"{nope"].concat();
    agent.input.write_all(&garbage).unwrap();
    assert!(matches!(agent.recv().0, Response::Error { id: None, .. }));
    agent
        .input
        .write_all(&encode(&serde_json::json!({"type": "reboot_host"}), b"").unwrap())
        .unwrap();
    assert!(matches!(agent.recv().0, Response::Error { id: None, .. }));
    agent.send(&Request::Ping { id: 1 }, b"");
    assert!(matches!(agent.recv().0, Response::Pong { id: 1, .. }));
}

#[test]
fn a_stream_out_of_step_is_read_no_further() {
    // An oversized prefix, then what would be a valid request: after the
    // bad prefix nothing may run, since the bytes that follow are the body
    // of a frame that could not be read.
    let mut agent = Agent::start();
    let marker = std::env::temp_dir().join(format!("kiln-agent-step-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    let mut bytes = vec![kiln_proto::VERSION];
    bytes.extend(8u32.to_le_bytes());
    bytes.extend(u32::MAX.to_le_bytes());
    bytes.extend(
        encode(
            &Request::Exec(sh(1, &format!("touch {}", marker.display()))),
            b"",
        )
        .unwrap(),
    );
    bytes.extend(encode(&Request::Ping { id: 2 }, b"").unwrap());
    agent.input.write_all(&bytes).unwrap();
    assert!(matches!(
        agent.recv().0,
        Response::Error {
            id: None,
            kind: ErrorKind::Invalid,
            ..
        }
    ));
    assert!(
        read_frame::<Response>(&mut agent.output).is_err(),
        "the agent stops at a stream out of step"
    );
    assert!(agent.child.wait().is_ok());
    assert!(!marker.exists(), "nothing after the bad prefix ran");
}

/// A directory of this test's own under the temp dir, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("kiln-agent-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn path(&self, rest: &str) -> String {
        self.0.join(rest).display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn one(entries: Result<Vec<Entry>, ErrorKind>) -> Entry {
    let mut entries = entries.unwrap();
    assert_eq!(entries.len(), 1, "{entries:?}");
    entries.pop().unwrap()
}

#[test]
fn directories_are_made_listed_moved_and_removed() {
    let mut agent = Agent::start();
    let dir = Scratch::new("fs");
    let made = one(agent.entries(Request::MakeDir {
        id: 1,
        path: dir.path("a/b/c"),
        user: None,
    }));
    assert_eq!(
        (made.name.as_str(), made.path, made.kind),
        ("c", dir.path("a/b/c"), EntryKind::Dir)
    );
    let again = agent.entries(Request::MakeDir {
        id: 2,
        path: dir.path("a/b/c"),
        user: None,
    });
    assert_eq!(again, Err(ErrorKind::Exists));
    agent
        .done(
            Request::WriteFile {
                id: 3,
                path: dir.path("a/b/file.txt"),
                mode: Some(0o640),
                user: None,
            },
            b"twelve bytes",
        )
        .unwrap();
    std::os::unix::fs::symlink("file.txt", dir.0.join("a/b/link")).unwrap();
    std::os::unix::fs::symlink("/", dir.0.join("a/b/c/root")).unwrap();

    let file = one(agent.entries(Request::Stat {
        id: 4,
        path: dir.path("a/b/./file.txt"),
        user: None,
    }));
    assert_eq!(file.path, dir.path("a/b/file.txt"));
    assert_eq!(
        (file.kind, file.size, file.mode),
        (EntryKind::File, 12, 0o640)
    );
    assert_eq!((file.uid, file.owner.as_str()), (0, "root"));
    assert!(file.modified_ns > 1_600_000_000_000_000_000, "{file:?}");
    let link = one(agent.entries(Request::Stat {
        id: 5,
        path: dir.path("a/b/link"),
        user: None,
    }));
    assert_eq!(
        (link.kind, link.symlink_target.as_deref()),
        (EntryKind::Symlink, Some("file.txt"))
    );

    // One level, then all of them: the symlink to / is not followed.
    let names = |entries: Vec<Entry>| -> Vec<String> {
        let root = dir.path("");
        entries
            .into_iter()
            .map(|e| e.path.trim_start_matches(&root).to_string())
            .collect()
    };
    let top = agent.entries(Request::ListDir {
        id: 6,
        path: dir.path("a/b"),
        depth: 0,
        user: None,
    });
    assert_eq!(names(top.unwrap()), ["a/b/c", "a/b/file.txt", "a/b/link"]);
    let all = agent.entries(Request::ListDir {
        id: 7,
        path: dir.path("a"),
        depth: 10,
        user: None,
    });
    assert_eq!(
        names(all.unwrap()),
        ["a/b", "a/b/c", "a/b/c/root", "a/b/file.txt", "a/b/link"]
    );
    let listed = |agent: &mut Agent, path: String| {
        agent.entries(Request::ListDir {
            id: 8,
            path,
            depth: 1,
            user: None,
        })
    };
    assert_eq!(
        listed(&mut agent, dir.path("a/b/file.txt")),
        Err(ErrorKind::Invalid)
    );
    assert_eq!(
        listed(&mut agent, dir.path("nothing")),
        Err(ErrorKind::NotFound)
    );

    let moved = one(agent.entries(Request::Move {
        id: 9,
        source: dir.path("a/b/file.txt"),
        destination: dir.path("x/y/moved.txt"),
        user: None,
    }));
    assert_eq!((moved.name.as_str(), moved.size), ("moved.txt", 12));
    assert_eq!(
        std::fs::read(dir.0.join("x/y/moved.txt")).unwrap(),
        b"twelve bytes"
    );
    let gone = agent.entries(Request::Move {
        id: 10,
        source: dir.path("a/b/file.txt"),
        destination: dir.path("elsewhere"),
        user: None,
    });
    assert_eq!(gone, Err(ErrorKind::NotFound));

    let remove = |agent: &mut Agent, path: String| {
        agent.done(
            Request::Remove {
                id: 11,
                path,
                user: None,
            },
            b"",
        )
    };
    // The link to / goes, not what it points to.
    remove(&mut agent, dir.path("a")).unwrap();
    assert!(!dir.0.join("a").exists() && Path::new("/").exists());
    assert_eq!(remove(&mut agent, dir.path("a")), Err(ErrorKind::NotFound));
    let stat = agent.entries(Request::Stat {
        id: 12,
        path: dir.path("a"),
        user: None,
    });
    assert_eq!(stat, Err(ErrorKind::NotFound));
}

/// Runs `exec` and collects its output until it ends.
fn run(agent: &mut Agent, exec: Exec) -> Outcome {
    agent.exec(exec, b"")
}

#[test]
fn a_pty_exec_has_a_terminal_of_its_size() {
    let mut agent = Agent::start();
    let mut exec = sh(
        1,
        "tty; stty size; echo err >&2; test -t 0 && echo interactive",
    );
    exec.pty = Some(PtySize {
        cols: 100,
        rows: 30,
    });
    let out = run(&mut agent, exec);
    assert_eq!(out.code, Some(0));
    assert!(out.stderr.is_empty(), "a terminal has one stream");
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().map(|l| l.trim_end_matches('\r')).collect();
    assert!(lines[0].starts_with("/dev/pts/"), "{text:?}");
    assert_eq!(lines[1..], ["30 100", "err", "interactive"], "{text:?}");
}

#[test]
fn a_pty_takes_stdin_resizes_and_kills() {
    let mut agent = Agent::start();
    let mut exec = sh(1, "read line; stty size; echo \"got $line\"; sleep 30");
    exec.pty = Some(PtySize { cols: 80, rows: 24 });
    exec.stdin_open = true;
    agent.send(&Request::Exec(exec), b"");
    let resize = |agent: &mut Agent, id, exec| {
        agent.done(
            Request::Resize {
                id,
                exec,
                cols: 120,
                rows: 40,
            },
            b"",
        )
    };
    assert_eq!(resize(&mut agent, 2, 1), Ok(()));
    assert_eq!(resize(&mut agent, 3, 99), Err(ErrorKind::NotFound));
    agent.send(&Request::Stdin { id: 1, eof: true }, b"hello\n");
    let mut text = String::new();
    while !text.contains("got hello") {
        match agent.recv() {
            (Response::Stdout { id: 1 }, body) => text.push_str(&String::from_utf8_lossy(&body)),
            (other, _) => panic!("unexpected {other:?} after {text:?}"),
        }
    }
    assert!(text.contains("40 120"), "{text:?}");
    // The terminal stays after the end of stdin; a kill ends the session.
    agent.send(&Request::Kill { id: 1, signal: 9 }, b"");
    let out = agent.wait(1);
    assert_eq!(out.signal, Some(9));
    assert_eq!(resize(&mut agent, 4, 1), Err(ErrorKind::NotFound));
}

/// A passwd and group of the test's own, for the agent to read in place
/// of the host's.
fn users(dir: &Scratch) -> (PathBuf, String) {
    let etc = dir.0.join("etc");
    let home = dir.path("home/tester");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(
        etc.join("passwd"),
        format!("root:x:0:0:root:/root:/bin/sh\n# a comment\nbroken:line\ntester:x:4242:4242::{home}:/bin/sh\n"),
    )
    .unwrap();
    std::fs::write(
        etc.join("group"),
        "root:x:0:\ntester:x:4242:\nextra:x:4343:someone,tester\nother:x:4444:someone\n",
    )
    .unwrap();
    (etc, home)
}

fn is_root() -> bool {
    // SAFETY: geteuid(2) cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn execs_and_files_as_a_user() {
    if !is_root() {
        eprintln!("skipped: switching users needs root");
        return;
    }
    let dir = Scratch::new("users");
    let (etc, home) = users(&dir);
    let mut agent = Agent::start_with(Some(&etc));
    let user = || Some("tester".to_string());

    let mut exec = sh(
        1,
        "id -u; id -g; id -G; echo $HOME $USER $LOGNAME $GREETING; pwd",
    );
    exec.user = user();
    exec.env.insert("GREETING".into(), "hi".into());
    exec.env.insert("LOGNAME".into(), "mine".into());
    let out = run(&mut agent, exec);
    assert_eq!(
        out.code,
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("4242\n4242\n4242 4343\n{home} tester mine hi\n{home}\n")
    );
    let mut exec = sh(2, "true");
    exec.user = Some("nobody-here".into());
    agent.send(&Request::Exec(exec), b"");
    assert!(matches!(
        agent.recv().0,
        Response::Error {
            id: Some(2),
            kind: ErrorKind::Invalid,
            ..
        }
    ));
    // On a terminal too, which is theirs.
    let mut exec = sh(3, "id -u; stat -c %u $(tty)");
    exec.user = user();
    exec.pty = Some(PtySize { cols: 80, rows: 24 });
    let out = run(&mut agent, exec);
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "4242\r\n4242\r\n");

    // Relative paths are under their home, and what is made is theirs.
    agent
        .done(
            Request::WriteFile {
                id: 4,
                path: "notes/today.txt".into(),
                mode: None,
                user: user(),
            },
            b"note",
        )
        .unwrap();
    let written = Path::new(&home).join("notes/today.txt");
    assert_eq!(std::fs::read(&written).unwrap(), b"note");
    let file = one(agent.entries(Request::Stat {
        id: 5,
        path: "notes/today.txt".into(),
        user: user(),
    }));
    assert_eq!(file.path, written.display().to_string());
    assert_eq!(
        (file.uid, file.gid, file.owner.as_str(), file.group.as_str()),
        (4242, 4242, "tester", "tester")
    );
    let parent = one(agent.entries(Request::Stat {
        id: 6,
        path: format!("{home}/notes"),
        user: None,
    }));
    assert_eq!(parent.uid, 4242);
    let made = one(agent.entries(Request::MakeDir {
        id: 7,
        path: "deep/er".into(),
        user: user(),
    }));
    assert_eq!((made.path, made.uid), (format!("{home}/deep/er"), 4242));
    let deep = one(agent.entries(Request::Stat {
        id: 8,
        path: "deep".into(),
        user: user(),
    }));
    assert_eq!(deep.uid, 4242);
    // Files the user did not make keep their owner; ids without a name
    // are shown as numbers.
    std::os::unix::fs::chown(&written, Some(5555), Some(4343)).unwrap();
    let file = one(agent.entries(Request::Stat {
        id: 9,
        path: "notes/today.txt".into(),
        user: user(),
    }));
    assert_eq!(
        (file.owner.as_str(), file.group.as_str()),
        ("5555", "extra")
    );
    let unknown = agent.entries(Request::Stat {
        id: 10,
        path: "x".into(),
        user: Some("nobody-here".into()),
    });
    assert_eq!(unknown, Err(ErrorKind::Invalid));
}
