//! The S3 backend against a real S3 server (`kiln_blob::testing::start_s3`),
//! reached over HTTP with signed requests exactly as in a deployment.

use bytes::Bytes;
use futures::TryStreamExt;
use kiln_blob::testing::{start_s3, S3Server};
use kiln_blob::{BlobConfig, BlobError, BlobStore};
use kiln_db::{testing, Db};

/// `BlobStore::open` wants a database for `BlobConfig::Database`; an S3
/// store never touches it.
struct Unused {
    db: Db,
    dir: std::path::PathBuf,
}

impl Unused {
    async fn new() -> Unused {
        let dir = std::env::temp_dir().join(testing::unique_name("kiln-blob-s3"));
        let db = Db::connect(&format!("sqlite://{}", dir.join("kiln.db").display()))
            .await
            .unwrap();
        Unused { db, dir }
    }

    fn open(&self, config: &BlobConfig) -> BlobStore {
        BlobStore::open(config, &self.db).unwrap()
    }

    async fn close(self) {
        self.db.close().await;
        std::fs::remove_dir_all(&self.dir).unwrap();
    }
}

/// Content that differs at every offset modulo a prime, so a misplaced
/// chunk shows.
fn content(len: usize, seed: u8) -> Bytes {
    (0..len)
        .map(|i| ((i % 251) as u8).wrapping_add(seed))
        .collect::<Vec<u8>>()
        .into()
}

fn on_disk(server: &S3Server, key: &str) -> Vec<u8> {
    std::fs::read(server.object_path(key)).unwrap()
}

#[tokio::test]
async fn round_trip_small_and_large() {
    let server = start_s3().await;
    let unused = Unused::new().await;
    let store = unused.open(&server.config);

    assert!(matches!(
        store.get("modules/none").await,
        Err(BlobError::NotFound(_))
    ));
    assert!(matches!(
        store.stream("modules/none").await.err(),
        Some(BlobError::NotFound(_))
    ));
    assert!(!store.exists("modules/none").await.unwrap());

    let small = Bytes::from_static(b"\0asm\x01\0\0\0");
    store.put("modules/small", small.clone()).await.unwrap();
    assert!(store.exists("modules/small").await.unwrap());
    assert_eq!(store.get("modules/small").await.unwrap(), small);
    assert_eq!(on_disk(&server, "modules/small"), small.to_vec());

    let large = content(20 << 20, 7);
    store.put("modules/large", large.clone()).await.unwrap();
    assert!(store.exists("modules/large").await.unwrap());
    assert_eq!(store.get("modules/large").await.unwrap(), large);
    let pieces: Vec<Bytes> = store
        .stream("modules/large")
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert!(pieces.len() > 1, "read in pieces, got {}", pieces.len());
    assert_eq!(pieces.concat(), large.to_vec());
    // The server holds the bytes itself, not a copy kept by the client.
    assert_eq!(on_disk(&server, "modules/large"), large.to_vec());

    // Writing a key again replaces its content.
    store
        .put("modules/large", Bytes::from_static(b"x"))
        .await
        .unwrap();
    assert_eq!(
        store.get("modules/large").await.unwrap(),
        Bytes::from_static(b"x")
    );
    assert_eq!(on_disk(&server, "modules/large"), b"x");
    store.put("modules/empty", Bytes::new()).await.unwrap();
    assert_eq!(store.get("modules/empty").await.unwrap(), Bytes::new());

    store.delete("modules/small").await.unwrap();
    // Deleting what is gone is not an error.
    store.delete("modules/small").await.unwrap();
    assert!(!store.exists("modules/small").await.unwrap());
    assert!(matches!(
        store.get("modules/small").await,
        Err(BlobError::NotFound(_))
    ));
    assert!(!server.object_path("modules/small").exists());
    assert!(store.exists("modules/large").await.unwrap());

    unused.close().await;
}

#[tokio::test]
async fn wrong_credentials_are_refused() {
    let server = start_s3().await;
    let unused = Unused::new().await;
    let good = unused.open(&server.config);
    good.put("modules/kept", Bytes::from_static(b"kept"))
        .await
        .unwrap();

    let wrong_secret = server.config_with(&server.access_key, "not-the-secret");
    let unknown_key = server.config_with("not-a-key", &server.secret_key);
    for config in [wrong_secret, unknown_key] {
        let bad = unused.open(&config);
        assert!(matches!(
            bad.put("modules/intruder", Bytes::from_static(b"no")).await,
            Err(BlobError::Store(_))
        ));
        assert!(matches!(
            bad.get("modules/kept").await,
            Err(BlobError::Store(_))
        ));
        assert!(bad.exists("modules/kept").await.is_err());
        assert!(bad.delete("modules/kept").await.is_err());
    }
    assert!(!server.object_path("modules/intruder").exists());
    assert_eq!(
        good.get("modules/kept").await.unwrap(),
        Bytes::from_static(b"kept")
    );

    unused.close().await;
}

#[tokio::test]
async fn nested_keys() {
    let server = start_s3().await;
    let unused = Unused::new().await;
    let store = unused.open(&server.config);

    let report = Bytes::from_static(br#"{"passed":12,"failed":0}"#);
    let key = "runs/42/step/out/report.json";
    store.put(key, report.clone()).await.unwrap();
    store
        .put("runs/42/step/out/log.txt", Bytes::from_static(b"ok\n"))
        .await
        .unwrap();
    store
        .put("runs/43/step/out/report.json", Bytes::from_static(b"{}"))
        .await
        .unwrap();

    assert!(store.exists(key).await.unwrap());
    assert!(!store.exists("runs/42/step/out/report").await.unwrap());
    assert_eq!(store.get(key).await.unwrap(), report);
    assert_eq!(
        store.get("runs/43/step/out/report.json").await.unwrap(),
        Bytes::from_static(b"{}")
    );
    let path = server.object_path(key);
    assert!(path.ends_with("runs/42/step/out/report.json"));
    assert_eq!(std::fs::read(&path).unwrap(), report.to_vec());

    store.delete(key).await.unwrap();
    assert!(!store.exists(key).await.unwrap());
    assert_eq!(
        store.get("runs/42/step/out/log.txt").await.unwrap(),
        Bytes::from_static(b"ok\n")
    );

    unused.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_puts() {
    const OBJECTS: usize = 100;
    let server = start_s3().await;
    let unused = Unused::new().await;
    let store = unused.open(&server.config);

    let mut puts = tokio::task::JoinSet::new();
    for n in 0..OBJECTS {
        let store = store.clone();
        puts.spawn(async move {
            let key = format!("artefacts/{n:03}");
            store.put(&key, content(1000 + n * 97, n as u8)).await
        });
    }
    while let Some(done) = puts.join_next().await {
        done.unwrap().unwrap();
    }

    let stored = std::fs::read_dir(server.object_path("artefacts"))
        .unwrap()
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.path().is_file())
        .count();
    assert_eq!(stored, OBJECTS);
    for n in 0..OBJECTS {
        let key = format!("artefacts/{n:03}");
        let expected = content(1000 + n * 97, n as u8);
        assert_eq!(store.get(&key).await.unwrap(), expected, "{key}");
        assert_eq!(on_disk(&server, &key), expected.to_vec(), "{key}");
    }

    unused.close().await;
}

#[tokio::test]
async fn servers_are_separate_and_cleaned_up() {
    let one = start_s3().await;
    let two = start_s3().await;
    assert_ne!(one.endpoint, two.endpoint);
    assert!(one.endpoint.starts_with("http://127.0.0.1:"));
    let unused = Unused::new().await;
    let first = unused.open(&one.config);
    let second = unused.open(&two.config);

    first
        .put("modules/only-here", Bytes::from_static(b"1"))
        .await
        .unwrap();
    assert!(one.object_path("modules/only-here").is_file());
    assert!(!second.exists("modules/only-here").await.unwrap());
    assert!(!two.object_path("modules/only-here").exists());

    let root = one.root().to_path_buf();
    assert!(root.is_dir());
    drop(one);
    assert!(!root.exists(), "the server's directory is removed on drop");

    unused.close().await;
}
