//! `kiln image build NAME --from REGISTRY/REPO:TAG` end to end: an OCI
//! image written here (a static busybox, two layers, the second whiting
//! out a file of the first) is pushed by skopeo to Debian's
//! docker-registry on 127.0.0.1, built into a kiln image by the real
//! binary, and booted; its config's Env, WorkingDir and User are what its
//! commands start with. A layer changed in the registry's storage is
//! refused. A registry that asks for a password (htpasswd) is refused an
//! anonymous pull and a wrong password, and gives the image to the user
//! named by `--registry-user` (password on stdin) or by the Docker config;
//! the extended attributes of its layers reach the packed root filesystem.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, Proc, TempDir, KILN};
use kiln_vm::{Exec, VmManager, VmRequest};
use sha2::Digest;

const REGISTRY: &str = "/usr/bin/docker-registry";

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn digest(bytes: &[u8]) -> String {
    format!("sha256:{:x}", sha2::Sha256::digest(bytes))
}

/// Debian's docker-registry on a free port of 127.0.0.1, its storage in
/// `dir`; killed when dropped.
struct Registry {
    _proc: Proc,
    addr: String,
    storage: PathBuf,
}

fn start_registry(dir: &Path) -> Registry {
    start_registry_with(dir, "")
}

/// A registry whose configuration ends with `extra` (YAML at top level).
fn start_registry_with(dir: &Path, extra: &str) -> Registry {
    assert!(
        Path::new(REGISTRY).exists(),
        "{REGISTRY} missing: apt-get install docker-registry skopeo (.ci/run does)"
    );
    let addr = format!("127.0.0.1:{}", free_port());
    let storage = dir.join("registry");
    std::fs::create_dir_all(&storage).unwrap();
    let config = dir.join("registry.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n{extra}",
            storage.display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("registry.log")).unwrap();
    let child = Command::new(REGISTRY)
        .arg("serve")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let proc = Proc(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "the registry did not listen: {}",
            std::fs::read_to_string(dir.join("registry.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Registry {
        _proc: proc,
        addr,
        storage,
    }
}

fn header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_size(size);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(1_700_000_000);
    header
}

fn add_file(tar: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32, data: &[u8]) {
    let mut h = header(tar::EntryType::Regular, data.len() as u64, mode);
    tar.append_data(&mut h, path, data).unwrap();
}

fn add_dir(tar: &mut tar::Builder<Vec<u8>>, path: &str) {
    let mut h = header(tar::EntryType::Directory, 0, 0o755);
    tar.append_data(&mut h, path, std::io::empty()).unwrap();
}

fn add_symlink(tar: &mut tar::Builder<Vec<u8>>, path: &str, target: &str) {
    let mut h = header(tar::EntryType::Symlink, 0, 0o777);
    tar.append_link(&mut h, path, target).unwrap();
}

/// The two layers: busybox with its applets, a script, a file to white
/// out; then the whiteout and a file of the second layer's own.
fn layers() -> Vec<Vec<u8>> {
    let busybox = std::fs::read("/bin/busybox")
        .expect("/bin/busybox (apt-get install busybox-static; .ci/run does)");
    let mut one = tar::Builder::new(Vec::new());
    for dir in ["bin", "etc", "usr", "usr/local", "usr/local/bin"] {
        add_dir(&mut one, dir);
    }
    add_file(&mut one, "bin/busybox", 0o755, &busybox);
    for applet in ["sh", "echo", "id", "pwd", "cat", "test", "true", "ls"] {
        add_symlink(&mut one, &format!("bin/{applet}"), "busybox");
    }
    add_file(
        &mut one,
        "usr/local/bin/greet",
        0o755,
        b"#!/bin/sh\necho \"greeting: $GREETING\"\n",
    );
    add_file(
        &mut one,
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\n",
    );
    add_file(&mut one, "etc/group", 0o644, b"root:x:0:\n");
    add_file(
        &mut one,
        "etc/removed.txt",
        0o644,
        b"from the first layer\n",
    );
    let mut two = tar::Builder::new(Vec::new());
    add_file(&mut two, "etc/.wh.removed.txt", 0o644, b"");
    add_file(&mut two, "etc/motd", 0o644, b"from the second layer\n");
    vec![one.into_inner().unwrap(), two.into_inner().unwrap()]
}

/// Writes an OCI image layout of `layers` (gzip-compressed) under `dir`,
/// tagged `tag`; returns the manifest's digest.
fn write_layout(dir: &Path, tag: &str, layers: &[Vec<u8>]) -> String {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| {
        let d = digest(bytes);
        std::fs::write(blobs.join(&d[7..]), bytes).unwrap();
        (d, bytes.len())
    };
    let mut descriptors = Vec::new();
    let mut diff_ids = Vec::new();
    for tar in layers {
        diff_ids.push(digest(tar));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(tar).unwrap();
        let (d, size) = put(&gz.finish().unwrap());
        descriptors.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": d, "size": size,
        }));
    }
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["GREETING=from-oci"],
            "WorkingDir": "/srv/work",
            "User": "1000",
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let (config_digest, config_size) = put(&serde_json::to_vec(&config).unwrap());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest, "size": config_size,
        },
        "layers": descriptors,
    });
    let (manifest_digest, manifest_size) = put(&serde_json::to_vec(&manifest).unwrap());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": manifest_size,
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    manifest_digest
}

/// Pushes the layout's `tag` to the registry as `test/img:TAG`.
fn push(layout: &Path, tag: &str, registry: &Registry) {
    push_as(layout, tag, registry, None)
}

/// [`push`] with `user:password` for a registry that asks for them.
fn push_as(layout: &Path, tag: &str, registry: &Registry, creds: Option<&str>) {
    let mut command = Command::new("skopeo");
    command.args([
        "--insecure-policy",
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
    ]);
    if let Some(creds) = creds {
        command.arg(format!("--dest-creds={creds}"));
    }
    let out = command
        .arg(format!("oci:{}:{tag}", layout.display()))
        .arg(format!("docker://{}/test/img:{tag}", registry.addr))
        .output()
        .expect("skopeo (apt-get install skopeo; .ci/run does)");
    assert!(out.status.success(), "skopeo copy: {}", text(&out));
}

/// A data dir whose images directory shares the test images' compiled
/// kernel and downloaded packages, so a build compiles nothing.
async fn data_dir() -> TempDir {
    kiln_vm::testing::test_image().await;
    let data = TempDir::new("oci-images");
    let images = data.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let shared = kiln_vm::testing::images_dir();
    for dir in [".kernels", ".debs"] {
        std::os::unix::fs::symlink(shared.join(dir), images.join(dir)).unwrap();
    }
    data
}

fn kiln(data: &TempDir, args: &[&str]) -> Output {
    kiln_with(data, args, &[], None)
}

/// [`kiln`] with more variables and `stdin` (else none). No registry
/// credentials come from this process's environment.
fn kiln_with(data: &TempDir, args: &[&str], env: &[(&str, &Path)], stdin: Option<&[u8]>) -> Output {
    let agent = kiln_vm::image::find_agent().expect("the static agent (KILN_AGENT_BIN)");
    let mut command = Command::new(KILN);
    command
        .args(args)
        .arg("--data-dir")
        .arg(data.path())
        .env("KILN_LOG", "warn")
        .env("KILN_AGENT_BIN", agent)
        .env_remove("KILN_DATA_DIR")
        .env_remove("KILN_URL")
        .env_remove("KILN_API_KEY")
        .env_remove("KILN_REGISTRY_USER")
        .env_remove("KILN_REGISTRY_PASSWORD")
        .envs(env.iter().copied())
        .stdin(match stdin {
            Some(_) => Stdio::piped(),
            None => Stdio::null(),
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().unwrap();
    if let Some(bytes) = stdin {
        child.stdin.take().unwrap().write_all(bytes).unwrap();
    }
    child.wait_with_output().unwrap()
}

fn sh(script: &str) -> Exec {
    Exec {
        command: "sh".into(),
        args: vec!["-c".into(), script.into()],
        timeout_ms: Some(60_000),
        ..Exec::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_from_a_registry_boots_with_its_config_defaults() {
    let work = TempDir::new("oci-e2e");
    let registry = start_registry(work.path());
    let layout = work.join("layout");
    let manifest_digest = write_layout(&layout, "v1", &layers());
    push(&layout, "v1", &registry);

    let data = data_dir().await;
    let reference = format!("{}/test/img:v1", registry.addr);
    let out = kiln(&data, &["image", "build", "fromoci", "--from", &reference]);
    assert!(out.status.success(), "kiln image build: {}", text(&out));

    // image.json records where it came from and its commands' defaults.
    let image = kiln_vm::image::Image::open(&data.join("images"), "fromoci").unwrap();
    let from = image.manifest.from.as_ref().expect("from");
    assert_eq!(from.reference, reference);
    assert_eq!(
        from.digest, manifest_digest,
        "skopeo pushed the manifest as written"
    );
    let exec = image.manifest.exec.as_ref().expect("exec defaults");
    assert_eq!(exec.env["GREETING"], "from-oci");
    assert_eq!(exec.cwd.as_deref(), Some("/srv/work"));
    assert_eq!(exec.user.as_deref(), Some("1000"));
    let rootfs = image.manifest.rootfs.as_ref().expect("a root filesystem");
    assert_eq!(rootfs.format, "erofs");
    let ls = kiln(&data, &["image", "ls"]);
    assert!(
        text(&ls).contains(&format!("oci {reference}@{manifest_digest}")),
        "{}",
        text(&ls)
    );

    let vms = VmManager::new(
        &data.join("images"),
        &data.join("vms"),
        kiln_vm::Accelerator::Tcg,
    )
    .unwrap();
    let vm = vms
        .create(VmRequest {
            tenant: "acme".into(),
            image: "fromoci".into(),
            vcpus: 1,
            memory_mib: 192,
            ttl: None,
            idle_timeout: None,
            labels: BTreeMap::new(),
            network: None,
        })
        .await
        .unwrap();
    let agent = vms.agent("acme", &vm.id).await.unwrap();
    let run = |exec: Exec| {
        let agent = agent.clone();
        async move {
            let out = agent.exec(exec, b"").await.unwrap();
            (
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
                out.exit_code,
            )
        }
    };
    for (script, expect) in [
        ("echo $GREETING", "from-oci\n"),
        ("pwd", "/srv/work\n"),
        ("id -u", "1000\n"),
        (
            "test -e /etc/removed.txt && echo present || echo absent",
            "absent\n",
        ),
        ("cat /etc/motd", "from the second layer\n"),
        ("greet", "greeting: from-oci\n"),
    ] {
        let (stdout, stderr, code) = run(sh(script)).await;
        assert_eq!(
            (stdout.as_str(), code),
            (expect, Some(0)),
            "{script}: {stderr}"
        );
    }

    // What a request says wins over the image's defaults.
    let own = Exec {
        env: BTreeMap::from([("GREETING".to_string(), "own".to_string())]),
        cwd: Some("/".into()),
        user: Some("root".into()),
        ..sh("echo $GREETING $(pwd) $(id -u)")
    };
    let (stdout, stderr, _) = run(own).await;
    assert_eq!(stdout, "own / 0\n", "{stderr}");
    assert!(vms.delete("acme", &vm.id).await);
    vms.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_changed_in_the_registry_is_refused() {
    let work = TempDir::new("oci-tamper");
    let registry = start_registry(work.path());
    let layout = work.join("layout");
    let layers = layers();
    write_layout(&layout, "v1", &layers);
    push(&layout, "v1", &registry);

    // The second layer's blob, as the registry stores it: one byte
    // flipped, its size the same.
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let blob = |d: &str| layout.join("blobs/sha256").join(&d[7..]);
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap(),
    )
    .unwrap();
    let layer = manifest["layers"][1]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let stored = registry
        .storage
        .join("docker/registry/v2/blobs/sha256")
        .join(&layer[7..9])
        .join(&layer[7..])
        .join("data");
    let mut bytes = std::fs::read(&stored).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&stored, &bytes).unwrap();

    let data = data_dir().await;
    let reference = format!("{}/test/img:v1", registry.addr);
    let out = kiln(&data, &["image", "build", "tampered", "--from", &reference]);
    assert!(!out.status.success(), "a tampered layer was accepted");
    let message = text(&out);
    assert!(
        message.contains(&layer) && message.contains("digest mismatch"),
        "{message}"
    );
    assert!(
        !data.join("images/tampered").exists(),
        "a refused build leaves no image"
    );

    // The same image from its (untampered) layout directory builds.
    let from = format!("oci-layout:{}:v1", layout.display());
    let out = kiln(&data, &["image", "build", "tampered", "--from", &from]);
    assert!(out.status.success(), "{}", text(&out));
}

const USER: &str = "kiln-puller";
const PASSWORD: &str = "correct horse battery staple";
/// base64 of `USER:PASSWORD`, as `docker login` writes it.
const DOCKER_AUTH: &str = "a2lsbi1wdWxsZXI6Y29ycmVjdCBob3JzZSBiYXR0ZXJ5IHN0YXBsZQ==";
/// The value of an extended attribute one file of the image carries.
const XATTR_VALUE: &[u8] = b"kiln xattr survives packing";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_asks_for_credentials_gets_them_from_the_flag_or_the_docker_config() {
    let work = TempDir::new("oci-auth");
    // The htpasswd file: bcrypt at its lowest cost, which is all a test needs.
    let hash = bcrypt::hash(PASSWORD, 4).unwrap();
    std::fs::write(work.join("htpasswd"), format!("{USER}:{hash}\n")).unwrap();
    let registry = start_registry_with(
        work.path(),
        &format!(
            "auth:\n  htpasswd:\n    realm: kiln-test\n    path: {}\n",
            work.join("htpasswd").display()
        ),
    );
    // The test image and a layer of a file with extended attributes.
    let mut layers = layers();
    let mut three = tar::Builder::new(Vec::new());
    three
        .append_pax_extensions([
            ("SCHILY.xattr.user.kiln", XATTR_VALUE),
            ("SCHILY.xattr.system.kiln", &b"never applied"[..]),
        ])
        .unwrap();
    add_file(&mut three, "etc/marked", 0o644, b"marked\n");
    layers.push(three.into_inner().unwrap());
    let layout = work.join("layout");
    let manifest_digest = write_layout(&layout, "v1", &layers);
    push_as(
        &layout,
        "v1",
        &registry,
        Some(&format!("{USER}:{PASSWORD}")),
    );

    let data = data_dir().await;
    let reference = format!("{}/test/img:v1", registry.addr);
    // No Docker config of this machine's user is read.
    let no_docker = work.join("no-docker");
    std::fs::create_dir_all(&no_docker).unwrap();
    let anonymous: &[(&str, &Path)] = &[("DOCKER_CONFIG", &no_docker)];

    let out = kiln_with(
        &data,
        &["image", "build", "locked", "--from", &reference],
        anonymous,
        None,
    );
    assert!(!out.status.success(), "an anonymous pull was let through");
    let message = text(&out);
    assert!(
        message.contains(&format!(
            "registry {} refused an anonymous pull",
            registry.addr
        )) && message.contains("--registry-user")
            && !message.contains("panicked"),
        "{message}"
    );
    assert!(!data.join("images/locked").exists());

    let flags = [
        "image",
        "build",
        "locked",
        "--from",
        &reference,
        "--registry-user",
        USER,
        "--registry-password-stdin",
    ];
    let out = kiln_with(&data, &flags, anonymous, Some(b"not the password\n"));
    assert!(!out.status.success(), "a wrong password was let through");
    let message = text(&out);
    assert!(
        message.contains(&format!(
            "registry {} refused the credentials of user \"{USER}\" (from --registry-user)",
            registry.addr
        )) && !message.contains("not the password")
            && !message.contains("panicked"),
        "{message}"
    );

    let out = kiln_with(
        &data,
        &flags,
        anonymous,
        Some(format!("{PASSWORD}\n").as_bytes()),
    );
    assert!(out.status.success(), "kiln image build: {}", text(&out));
    assert!(!text(&out).contains(PASSWORD), "{}", text(&out));
    let image = kiln_vm::image::Image::open(&data.join("images"), "locked").unwrap();
    let from = image.manifest.from.as_ref().expect("from");
    assert_eq!(
        (from.reference.as_str(), from.digest.as_str()),
        (reference.as_str(), manifest_digest.as_str())
    );
    let json = std::fs::read_to_string(data.join("images/locked/image.json")).unwrap();
    assert!(!json.contains(PASSWORD) && !json.contains(USER), "{json}");
    // The layer's user. attribute is in the erofs image; the system. one
    // is not.
    let erofs = std::fs::read(data.join("images/locked/rootfs.erofs")).unwrap();
    let holds = |needle: &[u8]| erofs.windows(needle.len()).any(|w| w == needle);
    assert!(holds(XATTR_VALUE), "the extended attribute was lost");
    assert!(!holds(b"never applied"));

    // The same registry through a Docker config's auths entry.
    let docker = work.join("docker");
    std::fs::create_dir_all(&docker).unwrap();
    std::fs::write(
        docker.join("config.json"),
        serde_json::to_vec(&serde_json::json!({
            "auths": {registry.addr.as_str(): {"auth": DOCKER_AUTH}},
        }))
        .unwrap(),
    )
    .unwrap();
    let out = kiln_with(
        &data,
        &["image", "build", "viadocker", "--from", &reference],
        &[("DOCKER_CONFIG", &docker)],
        None,
    );
    assert!(out.status.success(), "kiln image build: {}", text(&out));
    let image = kiln_vm::image::Image::open(&data.join("images"), "viadocker").unwrap();
    assert_eq!(image.manifest.from.expect("from").digest, manifest_digest);
}
