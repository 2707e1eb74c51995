//! `kiln bench vm-net`: VM networking. Create → first exec with a NIC
//! and without (both restored from their shape's snapshot), TCP
//! throughput between the host (a socket in kiln's namespace) and a guest
//! through its TAP, both ways, with busybox `nc` in the guest, and the
//! latency of the port proxy (`GET /api/v1/vms/{id}/ports/8000/`, busybox
//! `httpd` in the guest) against the same request made straight from the
//! namespace.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use kiln_core::{Scope, Scopes};
use kiln_vm::net::NetworkSpec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::print_p50_max;

#[derive(Args)]
pub struct NetArgs {
    /// Where the `default` image is (`kiln image build` puts it in <data-dir>/images).
    #[arg(long, env = "KILN_BENCH_IMAGES")]
    images: Option<std::path::PathBuf>,
    /// Creates timed per variant.
    #[arg(long, default_value_t = 5)]
    boots: usize,
    /// MiB sent each way for the throughput.
    #[arg(long, default_value_t = 64)]
    mib: usize,
    /// Requests through the proxy (and straight) for the latency.
    #[arg(long, default_value_t = 200)]
    requests: usize,
    #[command(flatten)]
    host: crate::config::VmHostArgs,
}

fn request(network: Option<serde_json::Value>) -> anyhow::Result<kiln_vm::VmRequest> {
    let network: Option<NetworkSpec> = network.map(serde_json::from_value).transpose()?;
    Ok(kiln_vm::VmRequest {
        tenant: "bench".into(),
        image: "default".into(),
        vcpus: 1,
        memory_mib: 128,
        ttl: None,
        idle_timeout: None,
        labels: Default::default(),
        network,
    })
}

async fn sh(vms: &kiln_vm::VmManager, id: &str, script: &str) -> anyhow::Result<String> {
    let agent = vms.agent("bench", id).await.context("vm vanished")?;
    let exec = kiln_vm::Exec {
        command: "sh".into(),
        args: vec!["-c".into(), script.into()],
        timeout_ms: Some(600_000),
        ..kiln_vm::Exec::default()
    };
    let out = agent.exec(exec, b"").await?;
    anyhow::ensure!(
        out.status() == 0,
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub async fn net(args: NetArgs) -> anyhow::Result<()> {
    let images = args
        .images
        .unwrap_or_else(|| crate::config::default_data_dir().join("images"));
    kiln_vm::image::Image::open(&images, "default")?;
    let work = std::env::temp_dir().join(format!("kiln-bench-net-{}", kiln_worker::now_millis()));
    std::fs::create_dir_all(&work)?;
    let config = crate::config::vm_config(&args.host, None, &kiln_core::TenantQuotas::default())?;
    let network = config.network.clone();
    let vms = kiln_vm::VmManager::start(&images, &work.join("vms"), config).await?;
    let db = kiln_db::Db::connect(&format!("sqlite://{}", work.join("kiln.db").display())).await?;
    let net = vms.attach_network(network, db.clone()).await?;
    println!(
        "| kiln VM networking ({}) | value |\n|---|---|",
        vms.accelerator().as_str()
    );
    let result = run(&vms, &net, &db, args.boots, args.mib, args.requests).await;
    vms.shutdown().await;
    db.close().await;
    let _ = std::fs::remove_dir_all(&work);
    result
}

async fn run(
    vms: &Arc<kiln_vm::VmManager>,
    net: &Arc<kiln_vm::net::host::HostNetwork>,
    db: &kiln_db::Db,
    boots: usize,
    mib: usize,
    requests: usize,
) -> anyhow::Result<()> {
    let gateway = net.config().gateway();
    let networked = serde_json::json!({
        "egress": "allow", "allow": [format!("{gateway}:5002")], "expose": [8000]
    });
    let time_create = |network: Option<serde_json::Value>| {
        let vms = vms.clone();
        async move {
            let t = Instant::now();
            let vm = vms.create(request(network)?).await?;
            let agent = vms.agent("bench", &vm.id).await.context("vm vanished")?;
            agent
                .exec(
                    kiln_vm::Exec {
                        command: "true".into(),
                        ..kiln_vm::Exec::default()
                    },
                    b"",
                )
                .await?;
            let took = t.elapsed();
            vms.delete("bench", &vm.id).await;
            anyhow::Ok(took)
        }
    };
    // The first of each shape boots and saves the snapshot the rest restore.
    time_create(None).await?;
    time_create(Some(networked.clone())).await?;
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for _ in 0..boots {
        off.push(time_create(None).await?);
        on.push(time_create(Some(networked.clone())).await?);
    }
    print_p50_max(
        "create → first exec, snapshot restore, no network",
        &mut off,
    );
    print_p50_max(
        "create → first exec, snapshot restore, with a NIC (TAP, address, rules, guest set up)",
        &mut on,
    );

    let vm = vms.create(request(Some(networked))?).await?;
    let address = vm.network.as_ref().context("a networked VM")?.address;
    let bytes = mib << 20;

    // Host → guest: the guest's nc reads into /dev/null; done when it exits.
    sh(
        vms,
        &vm.id,
        "setsid nc -l -p 5001 >/dev/null </dev/null 2>&1 & sleep 0.5",
    )
    .await?;
    let mut stream = net.connect(address, 5001, Duration::from_secs(5)).await?;
    let chunk = vec![0u8; 64 << 10];
    let t = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        stream.write_all(&chunk).await?;
        sent += chunk.len();
    }
    stream.shutdown().await?;
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest).await;
    let took = t.elapsed();
    println!(
        "| TCP host → guest through the TAP ({mib} MiB, guest busybox nc) | {:.0} MiB/s |",
        mib as f64 / took.as_secs_f64()
    );

    // Guest → host: a listener in kiln's namespace at the gateway address.
    let socket = net.tcp_socket().await?;
    socket.set_reuseaddr(true)?;
    socket.bind(std::net::SocketAddr::from((gateway, 5002)))?;
    let listener = socket.listen(4)?;
    let count = bytes / (64 << 10);
    let id = vm.id.clone();
    let vms2 = vms.clone();
    let sender = tokio::spawn(async move {
        sh(
            &vms2,
            &id,
            &format!("dd if=/dev/zero bs=65536 count={count} 2>/dev/null | nc {gateway} 5002"),
        )
        .await
    });
    let (mut inbound, _) = listener.accept().await?;
    let t = Instant::now();
    let mut buf = vec![0u8; 256 << 10];
    let mut got = 0usize;
    while got < bytes {
        let n = inbound.read(&mut buf).await?;
        anyhow::ensure!(n > 0, "the guest stopped after {got} bytes");
        got += n;
    }
    let took = t.elapsed();
    // busybox nc waits for the other end to close before it exits.
    drop(inbound);
    sender.await??;
    anyhow::ensure!(got == bytes, "received {got} of {bytes} bytes");
    println!(
        "| TCP guest → host through the TAP ({mib} MiB, guest busybox dd | nc) | {:.0} MiB/s |",
        mib as f64 / took.as_secs_f64()
    );

    // The proxy path against the same request made from the namespace.
    sh(
        vms,
        &vm.id,
        "mkdir -p /www && echo hello > /www/index.html && httpd -p 8000 -h /www",
    )
    .await?;
    let mut straight = Vec::new();
    for _ in 0..requests {
        let t = Instant::now();
        let mut stream = net.connect(address, 8000, Duration::from_secs(5)).await?;
        stream
            .write_all(b"GET /index.html HTTP/1.0\r\nhost: guest\r\n\r\n")
            .await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        anyhow::ensure!(answer.ends_with(b"hello\n"), "straight: {answer:?}");
        straight.push(t.elapsed());
    }
    print_p50_max(
        "GET of a 6-byte page from guest httpd, straight from kiln's namespace (new connection each)",
        &mut straight,
    );
    let key = kiln_api::issue_key(db, "bench", "bench", Scopes(vec![Scope::Write]))
        .await?
        .1;
    let blobs = kiln_blob::BlobStore::local(&std::env::temp_dir().join(format!(
        "kiln-bench-net-blobs-{}",
        kiln_worker::now_millis()
    )))?;
    let state = kiln_api::AppState::with_vms(db.clone(), blobs, None, Some(vms.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let stop = tokio_util::sync::CancellationToken::new();
    let done = stop.clone();
    tokio::spawn(kiln_api::serve(listener, state, async move {
        done.cancelled().await
    }));
    let http = reqwest::Client::new();
    let url = format!("http://{addr}/api/v1/vms/{}/ports/8000/index.html", vm.id);
    let mut proxied = Vec::new();
    for i in 0..requests + 20 {
        let t = Instant::now();
        let answer = http.get(&url).bearer_auth(&key).send().await?;
        anyhow::ensure!(answer.status() == 200, "proxy: {}", answer.status());
        let body = answer.bytes().await?;
        anyhow::ensure!(&body[..] == b"hello\n", "proxy: {body:?}");
        if i >= 20 {
            proxied.push(t.elapsed());
        }
    }
    print_p50_max(
        "GET through `/api/v1/vms/{id}/ports/8000/` (HTTP on 127.0.0.1, keep-alive to kiln)",
        &mut proxied,
    );
    stop.cancel();
    vms.delete("bench", &vm.id).await;
    Ok(())
}
