//! VM networking with real VMs, `ip` and `nft`: a VM without network has
//! only `lo`; egress reaches what its allow list names and nothing else
//! (dropped and counted); VMs reach each other only in one named network;
//! an exposed port answers through the proxy path (HTTP and a WebSocket
//! upgrade) for its tenant only; delete leaves no rule or address.
//!
//! Each test has its own VM directory, so its own namespace; tests talk
//! only to 127.0.0.1 and to addresses they add inside kiln's namespace.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use kiln_api::AppState;
use kiln_blob::BlobStore;
use kiln_core::{Scope, Scopes};
use kiln_db::Db;
use kiln_vm::manager::probe_accelerator;
use kiln_vm::{testing, VmManager};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

struct Harness {
    db: Db,
    state: Arc<AppState>,
    app: Router,
    vms: Arc<VmManager>,
    key: String,
    other: String,
    work: PathBuf,
}

/// Fails loudly when a tool the feature needs is missing (`.ci/run`
/// installs both from Debian).
fn require_tools() {
    for tool in ["ip", "nft"] {
        let found = std::process::Command::new(tool)
            .arg("-V")
            .output()
            .is_ok_and(|out| out.status.success());
        assert!(
            found,
            "`{tool}` is needed (apt-get install iproute2 nftables)"
        );
    }
}

async fn harness(name: &str) -> Harness {
    require_tools();
    let image = testing::test_image().await;
    let work = std::env::temp_dir().join(kiln_db::testing::unique_name(name));
    // A private copy of the image: this test's snapshots are its own.
    let images = work.join("images");
    std::fs::create_dir_all(images.join("default")).unwrap();
    for file in ["vmlinux", "initramfs.cpio", "image.json"] {
        std::fs::copy(image.dir.join(file), images.join("default").join(file)).unwrap();
    }
    let accelerator =
        probe_accelerator(image, &work, &testing::images_dir().join("accelerator")).await;
    let vms = VmManager::new(&images, &work.join("vms"), accelerator).unwrap();
    let db = kiln_db::testing::sqlite_temp().await;
    let config = kiln_vm::net::NetConfig {
        subnet: "10.78.0.0/24".parse().unwrap(),
        ..Default::default()
    };
    vms.attach_network(config, db.clone()).await.unwrap();
    let blobs = BlobStore::local(&work.join("blobs")).unwrap();
    let issue = |tenant: &'static str| {
        let db = db.clone();
        async move {
            kiln_api::issue_key(&db, tenant, "t", Scopes(vec![Scope::Write]))
                .await
                .unwrap()
                .1
        }
    };
    let key = issue("acme").await;
    let other = issue("globex").await;
    let state = AppState::with_vms(db.clone(), blobs, None, Some(vms.clone()));
    Harness {
        app: kiln_api::app(state.clone()),
        db,
        state,
        vms,
        key,
        other,
        work,
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        // What a graceful stop does (`VmManager::shutdown`), without a
        // runtime: the namespace goes with everything in it.
        let _ = std::process::Command::new("ip")
            .args(["netns", "delete", &self.namespace()])
            .output();
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

async fn send(
    app: &Router,
    method: &str,
    path: &str,
    key: &str,
    body: Body,
) -> (StatusCode, Vec<u8>) {
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(body)
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, bytes.to_vec())
}

async fn call(
    app: &Router,
    method: &str,
    path: &str,
    key: &str,
    body: Value,
) -> (StatusCode, Value) {
    let (status, bytes) = send(app, method, path, key, Body::from(body.to_string())).await;
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

impl Harness {
    async fn create(&self, body: Value) -> Value {
        let (status, vm) = call(&self.app, "POST", "/api/v1/vms", &self.key, body).await;
        assert_eq!(status, StatusCode::CREATED, "{vm}");
        vm
    }

    async fn sh(&self, id: &str, script: &str) -> Value {
        let (status, out) = call(
            &self.app,
            "POST",
            &format!("/api/v1/vms/{id}/execute"),
            &self.key,
            json!({"command": "sh", "args": ["-c", script], "timeout_ms": 30000}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{out}");
        out
    }

    fn namespace(&self) -> String {
        self.vms.network().unwrap().namespace().to_string()
    }

    /// What `nft list ruleset` shows inside kiln's namespace.
    fn ruleset(&self) -> String {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &self.namespace(), "nft", "list", "ruleset"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn links(&self) -> String {
        let out = std::process::Command::new("ip")
            .args(["-n", &self.namespace(), "-o", "link", "show"])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    }

    async fn addresses_in_db(&self) -> i64 {
        kiln_db::testing::scalar_i64(&self.db, "SELECT COUNT(*) FROM vm_addresses")
            .await
            .unwrap()
    }
}

fn ip_in(namespace: &str, args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(["-n", namespace])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A tiny HTTP server on a socket of kiln's namespace: answers every
/// request with `hello from <the address it was reached at>`.
async fn serve_in_namespace(vms: &VmManager, port: u16) -> CancellationToken {
    let socket = vms.network().unwrap().tcp_socket().await.unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket
        .bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))
        .unwrap();
    let listener = socket.listen(16).unwrap();
    let stop = CancellationToken::new();
    let done = stop.clone();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = tokio::select! {
                accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => return },
                _ = done.cancelled() => return,
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                let _ = stream.read(&mut buf).await;
                let local = stream
                    .local_addr()
                    .map(|a| a.ip().to_string())
                    .unwrap_or_default();
                let body = format!("hello from {local}");
                let answer = format!(
                    "HTTP/1.0 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    });
    stop
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_without_network_has_only_lo() {
    let h = harness("kiln-net-none").await;
    let vm = h.create(json!({})).await;
    let id = vm["id"].as_str().unwrap();
    assert!(vm.get("network").is_none(), "{vm}");
    let out = h.sh(id, "ls /sys/class/net").await;
    assert_eq!(
        out["stdout"]
            .as_str()
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["lo"]
    );
    let (status, body) = call(
        &h.app,
        "GET",
        &format!("/api/v1/vms/{id}/ports"),
        &h.key,
        Value::Null,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    // No namespace was built for a host whose VMs never asked.
    assert!(!std::path::Path::new("/run/netns")
        .join(h.vms.network().unwrap().namespace())
        .exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_network_specs_are_refused_naming_the_field() {
    let h = harness("kiln-net-refuse").await;
    for (network, field) in [
        (
            json!({"egress": "allow", "allow": ["10.0.0.0/33:443"]}),
            "network.allow[0]",
        ),
        (
            json!({"egress": "allow", "allow": ["10.0.0.1:0"]}),
            "network.allow[0]",
        ),
        (json!({"allow": ["10.0.0.1:80"]}), "network.allow needs"),
        (json!({"expose": [70000]}), "network.expose[0]"),
        (json!({"egress": "everything"}), "egress"),
        (json!({"name": "Not/Ok"}), "network.name"),
    ] {
        let (status, body) = call(
            &h.app,
            "POST",
            "/api/v1/vms",
            &h.key,
            json!({"network": network}),
        )
        .await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{network}: {body}"
        );
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(field), "{network}: {message}");
        // The same check guards `vm` jobs at submit.
        let (status, body) = call(
            &h.app,
            "POST",
            "/api/v1/jobs",
            &h.key,
            json!({"kind": "vm", "spec": {"command": "true", "network": network}}),
        )
        .await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{network}: {body}"
        );
        assert!(
            body["error"]["message"].as_str().unwrap().contains(field),
            "{body}"
        );
    }
    assert_eq!(h.vms.live_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_reaches_the_allowed_address_only_and_vms_stay_apart() {
    let h = harness("kiln-net-egress").await;
    let allowed = h
        .create(json!({"network": {"egress": "allow", "allow": ["192.0.2.10:8080"]}}))
        .await;
    let a = allowed["id"].as_str().unwrap();
    let net = &allowed["network"];
    assert_eq!(net["egress"], "allow");
    let address = net["address"].as_str().unwrap().to_string();
    assert!(address.starts_with("10.78.0."), "{net}");

    // Two addresses inside kiln's namespace, one server answering on both.
    let ns = h.namespace();
    ip_in(&ns, &["addr", "add", "192.0.2.10/32", "dev", "lo"]);
    ip_in(&ns, &["addr", "add", "192.0.2.20/32", "dev", "lo"]);
    let _server = serve_in_namespace(&h.vms, 8080).await;

    // The guest has its address and its MAC.
    let shown = h
        .sh(
            a,
            "ip -o addr show dev eth0; cat /sys/class/net/eth0/address",
        )
        .await;
    let shown = shown["stdout"].as_str().unwrap();
    assert!(shown.contains(&format!("inet {address}/24")), "{shown}");
    assert!(shown.contains(net["mac"].as_str().unwrap()), "{shown}");

    // busybox nc (this busybox's static wget crashes resolving); `-w`
    // bounds the connect to a dropped destination.
    let fetch = |host: &str, port: u16| {
        format!(
            "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 4 {host} {port} | tail -n 1; echo \" exit=$?\""
        )
    };
    let out = h.sh(a, &fetch("192.0.2.10", 8080)).await;
    assert_eq!(out["stdout"], "hello from 192.0.2.10 exit=0\n", "{out}");
    let out = h.sh(a, &fetch("192.0.2.10", 8081)).await;
    assert!(
        !out["stdout"].as_str().unwrap().contains("hello"),
        "only the allowed port: {out}"
    );
    let dropped_before = h
        .vms
        .network()
        .unwrap()
        .dropped(&format!("kt{}", last_octet(&address)))
        .await
        .unwrap();
    let out = h.sh(a, &fetch("192.0.2.20", 8080)).await;
    let stdout = out["stdout"].as_str().unwrap();
    // Dropped, not refused: the connect times out.
    assert!(
        !stdout.contains("hello") && out["stderr"].as_str().unwrap().contains("timed out"),
        "{out}"
    );
    let dropped = h
        .vms
        .network()
        .unwrap()
        .dropped(&format!("kt{}", last_octet(&address)))
        .await
        .unwrap();
    assert!(
        dropped > dropped_before,
        "drops are counted: {dropped_before} → {dropped}"
    );

    // A second VM (restored from the networked snapshot the first one
    // saved) gets its own address and MAC, has no egress, and cannot
    // reach the first: they share no named network.
    let closed = h.create(json!({"network": {"expose": [8000]}})).await;
    let b = closed["id"].as_str().unwrap();
    assert_ne!(closed["network"]["address"], allowed["network"]["address"]);
    assert_ne!(closed["network"]["mac"], allowed["network"]["mac"]);
    let shown = h.sh(b, "cat /sys/class/net/eth0/address").await;
    assert_eq!(
        shown["stdout"].as_str().unwrap().trim(),
        closed["network"]["mac"]
    );
    let out = h.sh(b, &fetch("192.0.2.10", 8080)).await;
    assert!(
        !out["stdout"].as_str().unwrap().contains("hello"),
        "egress none: {out}"
    );
    h.sh(
        a,
        "mkdir -p /www && echo from-a > /www/index.html && httpd -p 8000 -h /www",
    )
    .await;
    let out = h.sh(b, &fetch(&address, 8000)).await;
    assert!(
        !out["stdout"].as_str().unwrap().contains("from-a"),
        "VM to VM: {out}"
    );

    // Two VMs of one tenant in one named network do reach each other.
    let c = h
        .create(json!({"network": {"name": "team", "expose": [8000]}}))
        .await;
    let d = h.create(json!({"network": {"name": "team"}})).await;
    let (c_id, d_id) = (c["id"].as_str().unwrap(), d["id"].as_str().unwrap());
    h.sh(
        c_id,
        "mkdir -p /www && echo from-c > /www/index.html && httpd -p 8000 -h /www",
    )
    .await;
    let c_address = c["network"]["address"].as_str().unwrap();
    let out = h.sh(d_id, &fetch(c_address, 8000)).await;
    assert!(
        out["stdout"].as_str().unwrap().contains("from-c"),
        "same named network: {out}"
    );

    // Delete takes its rules and address along.
    assert_eq!(h.addresses_in_db().await, 4);
    for id in [a, b, c_id, d_id] {
        let (status, _) = send(
            &h.app,
            "DELETE",
            &format!("/api/v1/vms/{id}"),
            &h.key,
            Body::empty(),
        )
        .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
    }
    assert_eq!(h.addresses_in_db().await, 0);
    let rules = h.ruleset();
    assert!(!rules.contains("vm-kt"), "{rules}");
    assert!(!rules.contains(&address), "{rules}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.links().contains(" kt") {
        assert!(Instant::now() < deadline, "TAPs left: {}", h.links());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn last_octet(address: &str) -> u32 {
    address.rsplit('.').next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exposed_port_answers_through_the_proxy_for_its_tenant_only() {
    let h = harness("kiln-net-expose").await;
    let vm = h.create(json!({"network": {"expose": [8000, 8001]}})).await;
    let id = vm["id"].as_str().unwrap();
    h.sh(
        id,
        "mkdir -p /www && echo hello-from-the-guest > /www/index.html && httpd -p 8000 -h /www",
    )
    .await;

    let (status, ports) = call(
        &h.app,
        "GET",
        &format!("/api/v1/vms/{id}/ports"),
        &h.key,
        Value::Null,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{ports}");
    assert_eq!(ports["ports"][0]["port"], 8000);
    assert_eq!(
        ports["ports"][0]["url"],
        format!("/api/v1/vms/{id}/ports/8000/")
    );

    let page = format!("/api/v1/vms/{id}/ports/8000/index.html");
    let (status, body) = send(&h.app, "GET", &page, &h.key, Body::empty()).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert_eq!(body, b"hello-from-the-guest\n");
    let (status, body) = send(
        &h.app,
        "GET",
        &format!("/api/v1/vms/{id}/ports/8000/"),
        &h.key,
        Body::empty(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, b"hello-from-the-guest\n");

    // Another tenant, a port not exposed, a VM without the port: 404.
    for (path, key) in [
        (page.clone(), &h.other),
        (format!("/api/v1/vms/{id}/ports"), &h.other),
        (format!("/api/v1/vms/{id}/ports/22/"), &h.key),
        (format!("/api/v1/vms/{id}/ports/0/"), &h.key),
        (format!("/api/v1/vms/{id}/ports/99999/"), &h.key),
        ("/api/v1/vms/vm-none/ports/8000/".to_string(), &h.key),
    ] {
        let (status, body) = send(&h.app, "GET", &path, key, Body::empty()).await;
        assert_eq!(
            status,
            StatusCode::NOT_FOUND,
            "{path}: {}",
            String::from_utf8_lossy(&body)
        );
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert!(body["error"]["code"].is_string(), "{body}");
    }
    // Exposed, but nothing listens: a bad gateway, not a hang.
    let (status, _) = send(
        &h.app,
        "GET",
        &format!("/api/v1/vms/{id}/ports/8001/"),
        &h.key,
        Body::empty(),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);

    // A WebSocket upgrade is joined end to end: a guest program answers
    // 101 and then echoes every byte.
    let script = "#!/bin/sh\nwhile read -r line; do [ \"$line\" = \"$(printf '\\r')\" ] && break; done\n\
                  printf 'HTTP/1.1 101 Switching Protocols\\r\\nUpgrade: websocket\\r\\nConnection: Upgrade\\r\\n\\r\\n'\n\
                  exec cat\n";
    let (status, _) = send(
        &h.app,
        "PUT",
        &format!("/api/v1/vms/{id}/files?path=/ws.sh"),
        &h.key,
        Body::from(script),
    )
    .await;
    assert_eq!(status.as_u16() / 100, 2, "upload");
    h.sh(
        id,
        "chmod +x /ws.sh && (setsid nc -l -p 8001 -e /ws.sh </dev/null >/dev/null 2>&1 &)",
    )
    .await;
    let (addr, stop) = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let done = stop.clone();
        tokio::spawn(kiln_api::serve(listener, h.state.clone(), async move {
            done.cancelled().await
        }));
        (addr, stop)
    };
    let request = format!(
        "GET /api/v1/vms/{id}/ports/8001/socket HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {}\r\n\
         connection: upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\n\
         sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        h.key
    );
    // The guest's `nc -l` starts in the background: until it listens the
    // proxy answers 502 (nothing listening), which is waited out, bounded.
    let mut attempts = 0;
    let (mut tcp, head) = loop {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(request.as_bytes()).await.unwrap();
        let head = read_until(&mut tcp, b"\r\n\r\n").await;
        attempts += 1;
        if !head.starts_with("HTTP/1.1 502") || attempts == 50 {
            break (tcp, head);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    tcp.write_all(b"ping through kiln").await.unwrap();
    let echoed = read_until(&mut tcp, b"kiln").await;
    assert!(echoed.ends_with("ping through kiln"), "{echoed}");
    stop.cancel();
}

async fn read_until(stream: &mut tokio::net::TcpStream, end: &[u8]) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + Duration::from_secs(30);
    while !got.windows(end.len()).any(|w| w == end) {
        let n = tokio::time::timeout_at(deadline.into(), stream.read(&mut buf))
            .await
            .expect("an answer in time")
            .unwrap();
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}
