//! The `redb` engine: a copy-on-write B-tree file, one durable write transaction per batch.

use std::path::Path;

use redb::{Database, Durability, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::{unavailable, BatchTables, Commit, Engine, Visitor};
use crate::storage::StorageError;

/// Records by identity key.
const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");
/// Expiry index: (expires_ms, identity key) → ().
const EXPIRY: TableDefinition<(u64, &str), ()> = TableDefinition::new("expiry");

/// A redb database file.
pub(super) struct RedbEngine {
    db: Database,
}

impl RedbEngine {
    pub(super) fn open(path: &Path, cache_bytes: usize) -> Result<RedbEngine, StorageError> {
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .create(path)
            .map_err(|e| unavailable(format!("cannot open {}: {e}", path.display())))?;
        let txn = db.begin_write().map_err(unavailable)?;
        txn.open_table(RECORDS).map_err(unavailable)?;
        txn.open_table(EXPIRY).map_err(unavailable)?;
        txn.commit().map_err(unavailable)?;
        Ok(RedbEngine { db })
    }
}

/// The two tables of one write transaction.
struct Tables<'txn> {
    records: redb::Table<'txn, &'static str, &'static [u8]>,
    expiry: redb::Table<'txn, (u64, &'static str), ()>,
    wrote: bool,
}

impl BatchTables for Tables<'_> {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        let value = self.records.get(key).map_err(unavailable)?;
        Ok(value.map(|v| v.value().to_vec()))
    }

    fn put(
        &mut self,
        key: &str,
        bytes: &[u8],
        expires_ms: u64,
        previous_expiry: Option<u64>,
    ) -> Result<(), StorageError> {
        self.wrote = true;
        self.records.insert(key, bytes).map_err(unavailable)?;
        if let Some(old) = previous_expiry.filter(|old| *old != expires_ms) {
            self.expiry.remove((old, key)).map_err(unavailable)?;
        }
        self.expiry.insert((expires_ms, key), ()).map_err(unavailable)?;
        Ok(())
    }

    fn delete(&mut self, key: &str, expires_ms: u64) -> Result<(), StorageError> {
        self.wrote = true;
        self.records.remove(key).map_err(unavailable)?;
        self.expiry.remove((expires_ms, key)).map_err(unavailable)?;
        Ok(())
    }

    fn due(&self, now_ms: u64, limit: usize) -> Result<Vec<(u64, String)>, StorageError> {
        let range = self
            .expiry
            .range((0u64, "")..(now_ms.saturating_add(1), ""))
            .map_err(unavailable)?;
        let mut keys = Vec::new();
        for entry in range.take(limit) {
            let (k, _) = entry.map_err(unavailable)?;
            let (at, key) = k.value();
            keys.push((at, key.to_owned()));
        }
        Ok(keys)
    }

    fn forget_expiry(&mut self, at: u64, key: &str) -> Result<(), StorageError> {
        self.wrote = true;
        self.expiry.remove((at, key)).map_err(unavailable)?;
        Ok(())
    }
}

impl Engine for RedbEngine {
    fn write_batch(&self, apply: &mut dyn FnMut(&mut dyn BatchTables)) -> Result<Commit, String> {
        let mut txn = self.db.begin_write().map_err(|e| e.to_string())?;
        txn.set_durability(Durability::Immediate);
        let wrote = {
            let records = txn.open_table(RECORDS).map_err(|e| e.to_string())?;
            let expiry = txn.open_table(EXPIRY).map_err(|e| e.to_string())?;
            let mut tables = Tables {
                records,
                expiry,
                wrote: false,
            };
            apply(&mut tables);
            tables.wrote
        };
        if wrote {
            let started = std::time::Instant::now();
            txn.commit().map_err(|e| e.to_string())?;
            Ok(Commit::Synced {
                sync: started.elapsed(),
            })
        } else {
            // Nothing to make durable: no fsync for a batch of reads.
            txn.abort().map_err(|e| e.to_string())?;
            Ok(Commit::NothingWritten)
        }
    }

    fn read(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        let txn = self.db.begin_read().map_err(unavailable)?;
        let table = txn.open_table(RECORDS).map_err(unavailable)?;
        let value = table.get(key).map_err(unavailable)?;
        Ok(value.map(|v| v.value().to_vec()))
    }

    fn scan(&self, start: &str, visit: &mut Visitor<'_>) -> Result<(), StorageError> {
        let txn = self.db.begin_read().map_err(unavailable)?;
        let table = txn.open_table(RECORDS).map_err(unavailable)?;
        for entry in table.range(start..).map_err(unavailable)? {
            let (key, value) = entry.map_err(unavailable)?;
            if !visit(key.value(), value.value())? {
                break;
            }
        }
        Ok(())
    }

    fn count(&self) -> Result<u64, StorageError> {
        let txn = self.db.begin_read().map_err(unavailable)?;
        let table = txn.open_table(RECORDS).map_err(unavailable)?;
        table.len().map_err(unavailable)
    }

    fn ready(&self) -> Result<(), StorageError> {
        self.db.begin_read().map(|_| ()).map_err(unavailable)
    }
}
