//! The exec path against hostile guests: a guest speaking nonsense, lying
//! or flooding (a peer on a socket pair, speaking the protocol the way a
//! compromised agent could), and real VMs under load.

use std::collections::BTreeMap;
use std::time::Duration;

use kiln_proto::{encode, read_frame_async, Request, Response, CHUNK};
use kiln_vm::agent::AgentError;
use kiln_vm::manager::probe_accelerator;
use kiln_vm::{testing, AgentConn, Exec, VmManager, VmRequest};
use proptest::prelude::*;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

fn sh(script: &str) -> Exec {
    Exec {
        command: "sh".into(),
        args: vec!["-c".into(), script.into()],
        ..Exec::default()
    }
}

/// (VmRSS, VmHWM) of this process, in KiB.
fn memory_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// A connection whose guest end the test holds.
fn pair() -> (AgentConn, UnixStream) {
    let (host, guest) = UnixStream::pair().unwrap();
    (AgentConn::new(host), guest)
}

async fn next_request(guest: &mut UnixStream) -> Request {
    read_frame_async::<Request>(guest).await.unwrap().0
}

async fn answer(guest: &mut UnixStream, response: &Response, body: &[u8]) {
    guest
        .write_all(&encode(response, body).unwrap())
        .await
        .unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Whatever bytes a guest sends, the host neither panics nor takes
    /// them for an answer.
    #[test]
    fn arbitrary_bytes_from_a_guest_answer_nothing(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let (conn, mut guest) = pair();
            let ping = conn.ping(Duration::from_millis(300));
            let flood = async {
                let _ = guest.write_all(&bytes).await;
                guest
            };
            let (answer, _guest) = tokio::join!(ping, flood);
            prop_assert!(answer.is_err());
            Ok(())
        })?;
    }
}

#[tokio::test]
async fn a_stale_answer_is_not_taken_for_the_next() {
    let (conn, mut guest) = pair();
    let Request::Ping { id } = next_request_after(&conn, &mut guest).await else {
        panic!()
    };
    // An answer to a request the host never made, and a late one: neither
    // is taken.
    let pong = |id| Response::Pong {
        id,
        version: kiln_proto::VERSION,
        agent: "liar".into(),
    };
    answer(&mut guest, &pong(id + 1000), b"").await;
    let ping = tokio::spawn({
        let conn = conn.clone();
        async move { conn.ping(Duration::from_secs(5)).await }
    });
    let Request::Ping { id: second } = next_request(&mut guest).await else {
        panic!()
    };
    answer(&mut guest, &pong(id), b"").await;
    answer(&mut guest, &pong(second), b"").await;
    ping.await.unwrap().unwrap();
}

/// Sends a ping that times out, and returns the request the guest saw.
async fn next_request_after(conn: &AgentConn, guest: &mut UnixStream) -> Request {
    let (ping, request) = tokio::join!(conn.ping(Duration::from_millis(200)), next_request(guest));
    assert!(matches!(ping, Err(AgentError::Timeout)), "{ping:?}");
    request
}

#[tokio::test]
async fn an_impossible_signal_fails_the_exec_not_the_host() {
    let (conn, mut guest) = pair();
    let exec = tokio::spawn({
        let conn = conn.clone();
        async move { conn.exec(sh("true"), b"").await }
    });
    let Request::Exec(request) = next_request(&mut guest).await else {
        panic!()
    };
    answer(
        &mut guest,
        &Response::Exited {
            id: request.id,
            code: None,
            signal: Some(i32::MAX),
            timed_out: false,
            duration_us: u64::MAX,
        },
        b"",
    )
    .await;
    let result = exec.await.unwrap();
    assert!(matches!(result, Err(AgentError::Protocol(_))), "{result:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_floods_and_never_ends_costs_a_bounded_amount() {
    // 256 MiB of output in chunks, no end: the host keeps 1 MiB of it and
    // gives up at the exec's deadline (its timeout plus a grace).
    let (conn, mut guest) = pair();
    let before = memory_kib();
    let exec = tokio::spawn({
        let conn = conn.clone();
        let mut exec = sh("yes");
        exec.timeout_ms = Some(1);
        async move { conn.exec(exec, b"").await }
    });
    let Request::Exec(request) = next_request(&mut guest).await else {
        panic!()
    };
    let chunk = vec![b'y'; CHUNK];
    let flood = tokio::spawn(async move {
        for _ in 0..4096 {
            if guest
                .write_all(&encode(&Response::Stdout { id: request.id }, &chunk).unwrap())
                .await
                .is_err()
            {
                break;
            }
        }
        guest
    });
    let result = exec.await.unwrap();
    assert!(matches!(result, Err(AgentError::Timeout)), "{result:?}");
    let after = memory_kib();
    eprintln!("host memory around a 256 MiB flood from a fake guest: VmRSS {} -> {} KiB, VmHWM {} -> {} KiB", before.0, after.0, before.1, after.1);
    assert!(
        after.1 - before.1 < 64 << 10,
        "peak grew by {} KiB",
        after.1 - before.1
    );
    flood.abort();
}

fn request(memory_mib: u32) -> VmRequest {
    VmRequest {
        tenant: "acme".into(),
        image: "default".into(),
        vcpus: 1,
        memory_mib,
        ttl: None,
        idle_timeout: None,
        labels: BTreeMap::new(),
        network: None,
    }
}

async fn manager(name: &str) -> std::sync::Arc<VmManager> {
    let image = testing::test_image().await;
    let work = std::env::temp_dir().join(format!("kiln-vm-exec-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let accelerator =
        probe_accelerator(image, &work, &testing::images_dir().join("accelerator")).await;
    VmManager::new(&testing::images_dir(), &work.join("vms"), accelerator).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_takes_a_mebibyte_of_stdin_and_answers_during_a_flood() {
    let vms = manager("stdin").await;
    let vm = vms.create(request(128)).await.unwrap();
    let agent = vms.agent("acme", &vm.id).await.unwrap();
    let data: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    let out = agent
        .exec(
            Exec {
                command: "cat".into(),
                ..Exec::default()
            },
            &data,
        )
        .await
        .unwrap();
    assert_eq!(out.exit_code, Some(0));
    assert!(out.stdout == data, "{} bytes came back", out.stdout.len());

    // A command printing without end: the host keeps 1 MiB, reports the
    // rest dropped, and its memory stays bounded; meanwhile the agent
    // answers pings and runs other commands.
    // How fast this guest floods (for the record): 3 s of it, counted.
    let mut sample = sh("cat /dev/zero");
    sample.timeout_ms = Some(3_000);
    let mut stream = agent.exec_stream(sample, b"").await.unwrap();
    let mut flowed = 0usize;
    while let Ok(event) = stream.next().await {
        match event {
            kiln_vm::ExecEvent::Stdout(data) => flowed += data.len(),
            kiln_vm::ExecEvent::Stderr(_) => {}
            kiln_vm::ExecEvent::Exited(_) => break,
        }
    }
    drop(stream);
    eprintln!("the guest printed {} KiB in 3 s", flowed >> 10);

    let before = memory_kib();
    let mut flood = sh("cat /dev/zero");
    // Long enough that a loaded 2-core machine still answers inside it:
    // what is asserted is that the answers come while the flood runs.
    flood.timeout_ms = Some(40_000);
    let flooding = tokio::spawn({
        let agent = agent.clone();
        async move { agent.exec(flood, b"").await }
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    agent.ping(Duration::from_secs(30)).await.unwrap();
    let beside = agent.exec(sh("echo beside"), b"").await.unwrap();
    assert_eq!(beside.stdout, b"beside\n");
    assert!(
        !flooding.is_finished(),
        "the ping and the second exec were answered only after the flood"
    );
    let out = flooding.await.unwrap().unwrap();
    let after = memory_kib();
    eprintln!(
        "host memory around 40 s of cat /dev/zero in a VM: VmRSS {} -> {} KiB, VmHWM {} -> {} KiB",
        before.0, after.0, before.1, after.1
    );
    assert!(
        out.truncated && out.timed_out,
        "{:?}",
        (out.truncated, out.timed_out)
    );
    assert_eq!(out.stdout.len(), 1 << 20);
    assert!(
        after.1 - before.1 < 64 << 10,
        "peak grew by {} KiB",
        after.1 - before.1
    );
    assert!(vms.delete("acme", &vm.id).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_of_one_snapshot_draw_different_random_bytes_at_once() {
    let vms = manager("random").await;
    // The first VM of this shape saves the snapshot (if none is saved yet);
    // the next two restore it.
    let first = vms.create(request(152)).await.unwrap();
    let mut draws = Vec::new();
    let mut clones = Vec::new();
    for _ in 0..2 {
        let vm = vms.create(request(152)).await.unwrap();
        // Read at once: no time for the kernel's own scheduled reseed.
        let agent = vms.agent("acme", &vm.id).await.unwrap();
        let out = agent
            .exec(sh("head -c 32 /dev/urandom | od -An -tx1"), b"")
            .await
            .unwrap();
        draws.push(String::from_utf8(out.stdout).unwrap());
        clones.push(vm);
    }
    assert_ne!(
        draws[0], draws[1],
        "clones of one snapshot draw the same bytes"
    );
    for vm in clones.into_iter().chain([first]) {
        assert!(vms.delete("acme", &vm.id).await);
    }
}

#[tokio::test]
async fn a_dropped_exec_is_killed_and_forgotten() {
    let (conn, mut guest) = pair();
    let exec = tokio::spawn({
        let conn = conn.clone();
        async move { conn.exec(sh("sleep 600"), b"").await }
    });
    let Request::Exec(request) = next_request(&mut guest).await else {
        panic!()
    };
    assert!(conn.busy(), "a running exec makes the VM busy");
    // The caller goes away (a client that disconnects, a killed job).
    exec.abort();
    let _ = exec.await;
    assert_eq!(
        next_request(&mut guest).await,
        Request::Kill {
            id: request.id,
            signal: 9
        }
    );
    assert_eq!(conn.active_execs(), 0, "its entry is gone");
    // Output that comes late for it is dropped, and the connection serves on.
    answer(&mut guest, &Response::Stdout { id: request.id }, b"late").await;
    let ping = tokio::spawn({
        let conn = conn.clone();
        async move { conn.ping(Duration::from_secs(5)).await }
    });
    let Request::Ping { id } = next_request(&mut guest).await else {
        panic!()
    };
    answer(
        &mut guest,
        &Response::Pong {
            id,
            version: kiln_proto::VERSION,
            agent: "test".into(),
        },
        b"",
    )
    .await;
    ping.await.unwrap().unwrap();
}
