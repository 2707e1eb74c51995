//! One suite for every backend that needs no outside service: a local
//! directory, SQLite and PostgreSQL.

use bytes::Bytes;
use futures::TryStreamExt;
use kiln_blob::{content_id, BlobError, BlobStore};
use kiln_db::{testing, Db, BLOB_CHUNK_BYTES};

/// Content over two chunks and a bit, so chunk boundaries are crossed.
fn big() -> Bytes {
    (0..BLOB_CHUNK_BYTES * 2 + 12_345)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<u8>>()
        .into()
}

async fn round_trip(store: BlobStore) {
    assert!(matches!(
        store.get("modules/none").await,
        Err(BlobError::NotFound(_))
    ));
    assert!(matches!(
        store.stream("modules/none").await.err(),
        Some(BlobError::NotFound(_))
    ));
    assert!(!store.exists("modules/none").await.unwrap());

    store
        .put("modules/small", Bytes::from_static(b"\0asm"))
        .await
        .unwrap();
    assert!(store.exists("modules/small").await.unwrap());
    assert_eq!(
        store.get("modules/small").await.unwrap(),
        Bytes::from_static(b"\0asm")
    );

    let big = big();
    store.put("modules/big", big.clone()).await.unwrap();
    assert_eq!(store.get("modules/big").await.unwrap(), big);
    let pieces: Vec<Bytes> = store
        .stream("modules/big")
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert!(pieces.len() > 1, "read in pieces");
    assert_eq!(pieces.concat(), big.to_vec());

    // Writing a key again replaces its content, shorter or longer.
    store
        .put("modules/big", Bytes::from_static(b"x"))
        .await
        .unwrap();
    assert_eq!(
        store.get("modules/big").await.unwrap(),
        Bytes::from_static(b"x")
    );
    store.put("modules/empty", Bytes::new()).await.unwrap();
    assert_eq!(store.get("modules/empty").await.unwrap(), Bytes::new());

    store.delete("modules/small").await.unwrap();
    store.delete("modules/small").await.unwrap();
    assert!(matches!(
        store.get("modules/small").await,
        Err(BlobError::NotFound(_))
    ));
}

#[tokio::test]
async fn local_directory() {
    let dir = std::env::temp_dir().join(testing::unique_name("kiln-blob"));
    round_trip(BlobStore::local(&dir).unwrap()).await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn sqlite_database() {
    let dir = std::env::temp_dir().join(testing::unique_name("kiln-blob-sqlite"));
    let db = Db::connect(&format!("sqlite://{}", dir.join("kiln.db").display()))
        .await
        .unwrap();
    round_trip(BlobStore::database(db.clone())).await;
    db.close().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn postgres_database() {
    let url = testing::postgres_url();
    let schema = testing::unique_name("kiln_blob");
    let db = Db::connect_postgres_schema(&url, &schema).await.unwrap();
    round_trip(BlobStore::database(db.clone())).await;
    // Two nodes sharing the database: what one stored, the other reads.
    let other = BlobStore::database(Db::connect_postgres_schema(&url, &schema).await.unwrap());
    let module = Bytes::from_static(b"\0asm\x01\0\0\0");
    let key = format!("modules/{}", content_id(&module));
    BlobStore::database(db.clone())
        .put(&key, module.clone())
        .await
        .unwrap();
    assert_eq!(other.get(&key).await.unwrap(), module);
    db.close().await;
    testing::drop_postgres_schema(&url, &schema).await.unwrap();
}

#[test]
fn content_ids_are_sha256() {
    assert_eq!(
        content_id(b""),
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
}
