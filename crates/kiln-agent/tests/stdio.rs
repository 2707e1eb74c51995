//! The agent on the host, speaking over its stdin/stdout: the same code
//! that serves the virtio port inside a guest.

use std::io::Write;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use kiln_proto::{encode, read_frame, write_frame, Exec, Request, Response};

struct Agent {
    child: Child,
    input: ChildStdin,
    output: ChildStdout,
}

impl Agent {
    fn start() -> Agent {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiln-agent"))
            .arg("--stdio")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let input = child.stdin.take().unwrap();
        let output = child.stdout.take().unwrap();
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

    /// Runs one exec; returns (stdout, stderr, exit code, signal, timed out).
    fn exec(
        &mut self,
        exec: Exec,
        stdin: &[u8],
    ) -> (Vec<u8>, Vec<u8>, Option<i32>, Option<i32>, bool) {
        self.send(&Request::Exec(exec), stdin);
        let (mut out, mut err) = (Vec::new(), Vec::new());
        loop {
            match self.recv() {
                (Response::Stdout { .. }, body) => out.extend(body),
                (Response::Stderr { .. }, body) => err.extend(body),
                (
                    Response::Exited {
                        code,
                        signal,
                        timed_out,
                        ..
                    },
                    _,
                ) => return (out, err, code, signal, timed_out),
                (other, _) => panic!("unexpected {other:?}"),
            }
        }
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
fn ping_answers_with_the_version() {
    let mut agent = Agent::start();
    agent.send(&Request::Ping, b"");
    assert!(matches!(agent.recv().0, Response::Pong { version: 1, .. }));
}

#[test]
fn exec_streams_output_and_reports_exit() {
    let mut agent = Agent::start();
    let (out, err, code, _, _) = agent.exec(sh(1, "echo out; echo err >&2; exit 7"), b"");
    assert_eq!(
        (out.as_slice(), err.as_slice(), code),
        (&b"out\n"[..], &b"err\n"[..], Some(7))
    );
    let mut exec = sh(2, "cat; echo \"$GREETING\"; pwd");
    exec.env.insert("GREETING".into(), "hi".into());
    exec.cwd = Some("/tmp".into());
    let (out, _, code, _, _) = agent.exec(exec, b"from stdin\n");
    assert_eq!(String::from_utf8(out).unwrap(), "from stdin\nhi\n/tmp\n");
    assert_eq!(code, Some(0));
    let (out, _, _, _, _) = agent.exec(sh(3, "head -c 3000000 /dev/zero"), b"");
    assert_eq!(out.len(), 3_000_000);
}

#[test]
fn timeouts_kill_and_say_so() {
    let mut agent = Agent::start();
    let mut exec = sh(1, "sleep 30");
    exec.timeout_ms = Some(200);
    let (_, _, code, signal, timed_out) = agent.exec(exec, b"");
    assert_eq!((code, signal, timed_out), (None, Some(9), true));
    let (out, _, _, _, _) = agent.exec(sh(2, "echo still here"), b"");
    assert_eq!(out, b"still here\n");
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
        Response::Error { id: Some(9), .. }
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
            path: path.clone(),
            mode: Some(0o600),
        },
        &data,
    );
    assert_eq!(agent.recv().0, Response::Done);
    agent.send(&Request::ReadFile { path: path.clone() }, b"");
    let (response, body) = agent.recv();
    assert!(matches!(response, Response::FileData { .. }));
    assert_eq!(body, data);
    agent.send(
        &Request::ReadFile {
            path: "/no/such/file".into(),
        },
        b"",
    );
    assert!(matches!(agent.recv().0, Response::Error { .. }));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn malformed_frames_get_an_error_and_the_agent_lives_on() {
    let mut agent = Agent::start();
    let garbage = [&[1u8, 5, 0, 0, 0, 0, 0, 0, 0][..], b"{nope"].concat();
    agent.input.write_all(&garbage).unwrap();
    assert!(matches!(agent.recv().0, Response::Error { id: None, .. }));
    agent
        .input
        .write_all(&encode(&serde_json::json!({"type": "reboot_host"}), b""))
        .unwrap();
    assert!(matches!(agent.recv().0, Response::Error { id: None, .. }));
    agent.send(&Request::Ping, b"");
    assert!(matches!(agent.recv().0, Response::Pong { .. }));
}
