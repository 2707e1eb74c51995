//! The examples in `examples/`, run as the README runs them: their own
//! scripts, the real binary on PATH, against a `kiln serve` of the test's
//! own (SQLite, the test guest image for VM steps).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{Proc, TempDir, KILN};

struct Server {
    dir: TempDir,
    data: PathBuf,
    base: String,
    _serve: Proc,
}

impl Server {
    async fn start(prefix: &str) -> Server {
        let (dir, data, base, serve) = common::serve(prefix, true).await;
        Server {
            dir,
            data,
            base,
            _serve: serve,
        }
    }

    /// Runs an example's script with `kiln` on PATH pointed at this server.
    fn script(&self, script: &str, args: &[&str]) -> Output {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let bin = Path::new(KILN).parent().unwrap();
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        // The example's own module build keeps its target beside the test's.
        let target = std::env::var("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| self.dir.join("target"))
            .join("examples");
        Command::new(root.join(script))
            .args(args)
            .env("PATH", path)
            .env("KILN_URL", &self.base)
            .env("KILN_DATA_DIR", &self.data)
            .env("CARGO_TARGET_DIR", target)
            .env("TMPDIR", self.dir.path())
            .env_remove("KILN_API_KEY")
            .output()
            .unwrap()
    }
}

fn text(output: &Output) -> String {
    format!(
        "{}\n--- stderr\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The digest pipeline over the shipped tarball: wasm steps fanned out over
/// its files, a VM step, a gate on the safety step's findings and the
/// artefacts collected by the last step. With no warning allowed the gate
/// stops the run, which the script's exit code reports.
#[tokio::test]
async fn the_digest_example_runs_and_its_gate_stops_it() {
    let server = Server::start("kiln-example-digest").await;
    let out = server.script("examples/digest/run.sh", &[]);
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    for line in [
        "step classify succeeded",
        "step fingerprint succeeded",
        "step policy succeeded",
        "step register succeeded",
        "intake/corpus.tar\t20480\t",
        "classify/8/summary.json\t",
        "register/digest.json\t",
    ] {
        assert!(shown.contains(line), "{line:?} missing from\n{shown}");
    }
    let digest = shown
        .lines()
        .find(|l| l.starts_with("{\"run\":"))
        .unwrap_or_else(|| panic!("no digest in\n{shown}"));
    let digest: serde_json::Value = serde_json::from_str(digest).unwrap();
    assert_eq!(digest["safety"]["warnings"], 1, "{digest}");
    assert_eq!(
        digest["files"].as_array().map(Vec::len),
        Some(9),
        "{digest}"
    );
    // The fingerprint the VM computed is the tarball's.
    let tarball = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/digest/corpus.tar"),
    )
    .unwrap();
    assert_eq!(
        format!("sha256:{}", digest["fingerprint"].as_str().unwrap_or("")),
        kiln_blob::content_id(&tarball),
        "{digest}"
    );
    assert!(
        digest["graph"]["edges"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!(["src/main.rs", "src/parser.rs"])),
        "{digest}"
    );

    let out = server.script("examples/digest/run.sh", &["--param", "max_warnings=0"]);
    let shown = text(&out);
    assert!(!out.status.success(), "{shown}");
    assert!(shown.contains("step policy failed"), "{shown}");
    assert!(shown.contains("step register skipped"), "{shown}");
    assert!(!shown.contains("register/digest.json"), "{shown}");
}

/// The schedule example makes a schedule that runs a wasm job every minute.
#[tokio::test]
async fn the_schedule_example_creates_its_schedule() {
    let server = Server::start("kiln-example-schedule").await;
    let out = server.script("examples/schedules/every-minute.sh", &[]);
    assert!(out.status.success(), "{}", text(&out));
    let got = Command::new(KILN)
        .args([
            "schedule",
            "get",
            "hello-every-minute",
            "--url",
            &server.base,
        ])
        .env("KILN_DATA_DIR", &server.data)
        .output()
        .unwrap();
    let shown = text(&got);
    assert!(got.status.success(), "{shown}");
    assert!(shown.contains("* * * * *"), "{shown}");
}
