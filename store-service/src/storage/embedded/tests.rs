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

/// Completed records with big responses (kept in blob files beside the fjall tree) read back
/// whole, before and after the memtables reached the disk and the store was reopened, and go
/// when they expire.
async fn big_responses_survive_flushes_and_reopening(kind: EngineKind) {
    use crate::storage::contract::{acquire_request, complete_request, record_id};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let body = |i: usize| -> Vec<u8> { (0..64 * 1024 + i).map(|b| (b % 251) as u8).collect() };
    // Enough big records to fill several 8 MiB memtables (flushed into tables and blob files).
    let keys = 300;
    {
        let storage = EmbeddedStorage::open_engine(kind, &path, DEFAULT_CACHE_BYTES).unwrap();
        for i in 0..keys {
            let key = format!("big-{i}");
            let AcquireResponse::Acquired(lock) = storage
                .acquire(&acquire_request(&key, 60_000), 1_000)
                .await
                .unwrap()
            else {
                panic!("{key} was not acquired");
            };
            let mut complete = complete_request(&key, &lock);
            complete.response.body = body(i);
            storage.complete(&complete, 1_000).await.unwrap();
        }
        for i in [0, keys / 2, keys - 1] {
            let record = storage
                .get(&record_id(&format!("big-{i}")), 2_000)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                record.response.map(|r| r.body),
                Some(body(i)),
                "big-{i} before reopening"
            );
        }
    }
    let storage = reopen(kind, &path).await;
    for i in 0..keys {
        let record = storage
            .get(&record_id(&format!("big-{i}")), 2_000)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            record.response.map(|r| r.body),
            Some(body(i)),
            "big-{i} after reopening"
        );
    }
    // Past their retention they are new again, and the sweep removes them.
    let later = 1_000 + 60_000 + 1;
    assert!(storage.get(&record_id("big-0"), later).await.unwrap().is_none());
    let mut swept = 0;
    while let Ok(n @ 1..) = storage.sweep_expired(later, 1_000).await {
        swept += n;
    }
    assert_eq!(swept, keys as u64);
    assert_eq!(storage.record_count().await.unwrap(), 0);
}

mod fjall {
    use super::*;

    #[tokio::test]
    async fn big_responses_survive_flushes_and_reopening_the_directory() {
        big_responses_survive_flushes_and_reopening(EngineKind::Fjall).await;
    }

    crate::storage_contract_tests!(open_kind(EngineKind::Fjall).await);

    #[tokio::test]
    async fn acknowledged_writes_survive_reopening_the_directory() {
        acknowledged_writes_survive_reopening(EngineKind::Fjall).await;
    }
}

mod redb {
    use super::*;

    #[tokio::test]
    async fn big_responses_survive_reopening_the_file() {
        big_responses_survive_flushes_and_reopening(EngineKind::Redb).await;
    }

    crate::storage_contract_tests!(open_kind(EngineKind::Redb).await);

    #[tokio::test]
    async fn acknowledged_writes_survive_reopening_the_file() {
        acknowledged_writes_survive_reopening(EngineKind::Redb).await;
    }
}
