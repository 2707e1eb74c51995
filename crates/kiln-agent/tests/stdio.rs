//! The agent on the host, speaking over its stdin/stdout: the same code
//! that serves the virtio port inside a guest.

use std::io::Write;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use kiln_proto::{encode, read_frame, write_frame, ErrorKind, Exec, Request, Response};

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
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiln-agent"))
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
