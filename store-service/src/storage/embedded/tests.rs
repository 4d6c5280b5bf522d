//! The storage contract and durability on both embedded engines.

use super::*;

async fn open_kind(kind: EngineKind) -> (tempfile::TempDir, EmbeddedStorage) {
    let dir = tempfile::tempdir().unwrap();
    let storage = EmbeddedStorage::open_engine(kind, &dir.path().join("store"), DEFAULT_CACHE_BYTES).unwrap();
    (dir, storage)
}

/// Reopen `path` once the previous writer thread has let go of it.
async fn reopen(kind: EngineKind, path: &Path) -> EmbeddedStorage {
    for _ in 0..100 {
        if let Ok(storage) = EmbeddedStorage::open_engine(kind, path, DEFAULT_CACHE_BYTES) {
            return storage;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("{} could not be reopened", path.display());
}

async fn acknowledged_writes_survive_reopening(kind: EngineKind) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let request = crate::storage::contract::acquire_request("durable", 60_000);
    {
        let storage = EmbeddedStorage::open_engine(kind, &path, DEFAULT_CACHE_BYTES).unwrap();
        storage.acquire(&request, 1_000).await.unwrap();
    }
    let storage = reopen(kind, &path).await;
    let again = storage.acquire(&request, 2_000).await.unwrap();
    assert!(matches!(again, AcquireResponse::InProgress { .. }), "{again:?}");
    assert_eq!(storage.record_count().await.unwrap(), 1);
}

mod fjall {
    use super::*;

    crate::storage_contract_tests!(open_kind(EngineKind::Fjall).await);

    #[tokio::test]
    async fn acknowledged_writes_survive_reopening_the_directory() {
        acknowledged_writes_survive_reopening(EngineKind::Fjall).await;
    }
}

mod redb {
    use super::*;

    crate::storage_contract_tests!(open_kind(EngineKind::Redb).await);

    #[tokio::test]
    async fn acknowledged_writes_survive_reopening_the_file() {
        acknowledged_writes_survive_reopening(EngineKind::Redb).await;
    }
}
