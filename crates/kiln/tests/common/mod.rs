//! What the process-level suites share: kiln processes that die with the
//! test, temporary directories and PostgreSQL schemas that are removed when
//! the test ends, however it ends.

#![allow(dead_code)] // each suite uses its own part of this module

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const KILN: &str = env!("CARGO_BIN_EXE_kiln");

/// A child process killed when the test ends, however it ends.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A directory removed with everything in it when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        let dir = std::env::temp_dir().join(kiln_db::testing::unique_name(prefix));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A PostgreSQL schema of the test's own, dropped when the test ends.
pub struct PgSchema {
    pub name: String,
}

impl PgSchema {
    pub async fn new(prefix: &str) -> (PgSchema, kiln_db::Db) {
        let name = kiln_db::testing::unique_name(prefix);
        let db = kiln_db::Db::connect_postgres_schema(&kiln_db::testing::postgres_url(), &name)
            .await
            .unwrap();
        (PgSchema { name }, db)
    }

    /// A URL that puts a process's every connection in this schema.
    pub fn url(&self) -> String {
        format!(
            "{}?options=-c%20search_path%3D{}",
            kiln_db::testing::postgres_url(),
            self.name
        )
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        // Drop runs inside the test's runtime, which cannot block on itself:
        // the schema goes on a thread with a runtime of its own.
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(kiln_db::testing::drop_postgres_schema(
                &kiln_db::testing::postgres_url(),
                &name,
            ))
        })
        .join();
    }
}

/// Starts `kiln ARGS` on a data dir, its log in `<log_dir>/<log>` and its
/// scratch root beside it, so both go when the test's directories do.
pub fn kiln(args: &[&str], data_dir: &Path, log_dir: &Path, log: &str) -> Proc {
    let scratch = log_dir.join(format!("{log}.scratch"));
    let log = std::fs::File::create(log_dir.join(log)).unwrap();
    Proc(
        Command::new(KILN)
            .args(args)
            .env("KILN_DATA_DIR", data_dir)
            .env("KILN_SCRATCH_DIR", scratch)
            .env("KILN_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until the API at `base` answers its health check.
pub async fn until_up(base: &str, timeout: Duration) {
    let http = reqwest::Client::new();
    wait_until("kiln to answer", timeout, || async {
        http.get(format!("{base}/health"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;
}

pub fn read_key(data_dir: &Path) -> String {
    std::fs::read_to_string(data_dir.join("admin.key"))
        .unwrap()
        .trim()
        .to_string()
}

pub fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// The guest image the VM suites use, copied into a data dir as `default`.
pub async fn install_test_image(data_dir: &Path) {
    let image = kiln_vm::testing::test_image().await;
    let images = data_dir.join("images/default");
    std::fs::create_dir_all(&images).unwrap();
    for file in ["vmlinux", "initramfs.cpio", "image.json"] {
        std::fs::copy(image.dir.join(file), images.join(file)).unwrap();
    }
}

/// A `kiln serve` of the test's own: SQLite in a temporary data dir (with
/// the test guest image installed when `image`), on a free port, up.
/// Returns the directory, the data dir, the base URL and the process.
pub async fn serve(prefix: &str, image: bool) -> (TempDir, PathBuf, String, Proc) {
    let dir = TempDir::new(prefix);
    let data = dir.join("data");
    if image {
        install_test_image(&data).await;
    }
    // A port free when asked can be taken before `kiln serve` binds it (by
    // another test's server, say): this one then exits, and the other would
    // answer in its place. The first admin key is written only once the
    // listener is bound, so this fresh data dir holding one says the server
    // answering is this one; one that exited is started on another port.
    let key = data.join("admin.key");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            Instant::now() < deadline,
            "kiln serve kept exiting; see serve.log in {}",
            dir.path().display()
        );
        let listen = format!("127.0.0.1:{}", free_port());
        let base = format!("http://{listen}");
        let mut serve = kiln(
            &["serve", "--listen", &listen, "--vm-warm", "0"],
            &data,
            dir.path(),
            "serve.log",
        );
        while serve.0.try_wait().unwrap().is_none() {
            let up = key.exists()
                && http
                    .get(format!("{base}/health"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
            if up {
                return (dir, data, base, serve);
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for kiln to answer"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
