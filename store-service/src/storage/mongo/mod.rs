//! MongoDB backend (official `mongodb` driver): the production store, shared by many replicas.
//!
//! Collection `idempotency_records`, one document per (service, scope, key), with a unique index
//! on that identity and a TTL index on `expires_at` (the seed's `InitializeIndexes`), both
//! created at start-up. Every state change is one atomic server-side write:
//! - acquire: `insertOne` (new key) with duplicate-key (11000) handling, then a conditional
//!   `findOneAndUpdate` that takes over an expired lock (`$inc` of the fencing token), or replaces a
//!   record whose retention ran out. The read between them only classifies (completed, in progress,
//!   mismatch); no lock is ever granted from what a read saw.
//! - complete / release / checkpoint: `updateOne` filtered on the fencing token and
//!   `state: in_progress`; a miss is classified as stale token or not found.
//!
//! Consistency: writes use `w: majority, j: true` and reads `readConcern: majority` on the primary,
//! so an acknowledged lock or response survives a primary failover and nothing is replayed that a
//! failover could roll back. The cost is one replication round trip per write (about a
//! millisecond inside one zone).

use std::time::Duration;

use async_trait::async_trait;
use idempotency_wire::{
    AbandonRequest, AcquireRequest, AcquireResponse, CheckpointRequest, CompleteRequest,
    OutcomeUnknownRequest, RecordId, ReleaseRequest,
};
use mongodb::bson::{self, doc, Document};
use mongodb::options::{
    Acknowledgment, ClientOptions, CollectionOptions, IndexOptions, ReadConcern, ReturnDocument, WriteConcern,
};
use mongodb::{Client, Collection, Database, IndexModel};

use super::{BackendName, Storage, StorageError};
use crate::record::{
    check_deadline, completed_expiry, decide_acquire, previous_attempt, HolderWrite, Record,
};

/// Collection of HTTP idempotency records.
pub const RECORDS_COLLECTION: &str = "idempotency_records";

/// How long the driver looks for a usable server before an operation fails (→ 503 upstream).
const SERVER_SELECTION_TIMEOUT: Duration = Duration::from_secs(2);

mod documents;

#[allow(clippy::wildcard_imports)] // the document types and helpers
use documents::*;

/// The MongoDB store.
#[derive(Debug, Clone)]
pub struct MongoStorage {
    database: Database,
    records: Collection<RecordDoc>,
}

impl MongoStorage {
    /// Connect, check the server answers, and create the indexes.
    pub async fn connect(uri: &str, database: &str) -> Result<MongoStorage, StorageError> {
        let mut options = ClientOptions::parse(uri)
            .await
            .map_err(|e| unavailable(format!("invalid MongoDB URI: {e}")))?;
        options
            .app_name
            .get_or_insert_with(|| "idempotency-store".to_owned());
        options
            .server_selection_timeout
            .get_or_insert(SERVER_SELECTION_TIMEOUT);
        options.connect_timeout.get_or_insert(SERVER_SELECTION_TIMEOUT);
        let client = Client::with_options(options).map_err(unavailable)?;
        let database = client.database(database);
        let collection_options = CollectionOptions::builder()
            .write_concern(
                WriteConcern::builder()
                    .w(Acknowledgment::Majority)
                    .journal(true)
                    .build(),
            )
            .read_concern(ReadConcern::majority())
            .build();
        let records = database.collection_with_options::<RecordDoc>(RECORDS_COLLECTION, collection_options);
        let storage = MongoStorage { database, records };
        storage
            .database
            .run_command(doc! {"ping": 1})
            .await
            .map_err(|e| unavailable(format!("MongoDB is unreachable: {e}")))?;
        storage.initialize_indexes().await?;
        Ok(storage)
    }

    /// The seed's `InitializeIndexes`: unique identity and TTL on `expires_at`.
    pub async fn initialize_indexes(&self) -> Result<(), StorageError> {
        let unique = IndexModel::builder()
            .keys(doc! {"service": 1, "scope": 1, "key": 1})
            .options(
                IndexOptions::builder()
                    .unique(true)
                    .name("record_identity".to_owned())
                    .build(),
            )
            .build();
        let ttl = IndexModel::builder()
            .keys(doc! {"expires_at": 1})
            .options(
                IndexOptions::builder()
                    .expire_after(Duration::ZERO)
                    .name("record_ttl".to_owned())
                    .build(),
            )
            .build();
        self.records
            .create_indexes([unique, ttl])
            .await
            .map_err(|e| unavailable(format!("cannot create indexes: {e}")))?;
        Ok(())
    }

    async fn find(&self, id: &RecordId) -> Result<Option<Record>, StorageError> {
        self.records
            .find_one(identity(id))
            .await
            .map_err(unavailable)?
            .map(Record::try_from)
            .transpose()
    }

    /// A holder write: matches only the current record id and token of an in-progress live record.
    async fn holder_update(
        &self,
        request: &impl HolderWrite,
        now_ms: u64,
        update: Document,
    ) -> Result<(), StorageError> {
        let (id, record_id, presented, attempt_id) = request.holder();
        let mut filter = identity(id);
        filter.insert("record_id", record_id);
        filter.insert("attempt_id", attempt_id);
        filter.insert("fencing_token", token(presented));
        filter.insert("state", "in_progress");
        filter.insert("expires_at", doc! {"$gt": datetime(now_ms)});
        let result = self
            .records
            .update_one(filter, update)
            .await
            .map_err(unavailable)?;
        if result.matched_count == 1 {
            return Ok(());
        }
        match self.find(id).await? {
            Some(record) if !record.is_expired(now_ms) => Err(StorageError::StaleToken {
                presented,
                current: record.fencing_token,
            }),
            _ => Err(StorageError::NotFound(id.clone())),
        }
    }
}

#[async_trait]
impl Storage for MongoStorage {
    fn name(&self) -> BackendName {
        "mongodb"
    }

    async fn acquire(&self, request: &AcquireRequest, now_ms: u64) -> Result<AcquireResponse, StorageError> {
        check_deadline(request, now_ms)?;
        let new_id = || uuid::Uuid::new_v4().to_string();
        // A few rounds at most: each round ends in a decision unless another replica changed the
        // record between our write attempt and our read.
        for _ in 0..4 {
            let decision = decide_acquire(None, request, now_ms, new_id);
            if let Some(fresh) = &decision.write {
                match self.records.insert_one(RecordDoc::from(fresh)).await {
                    Ok(_) => return Ok(decision.response),
                    Err(e) if is_duplicate_key(&e) => {}
                    Err(e) => return Err(unavailable(e)),
                }
            }
            let Some(existing) = self.find(&request.id).await? else {
                continue; // deleted in between: insert again
            };
            if existing.is_expired(now_ms) {
                // Retention ran out: start over, keeping the token increasing.
                let fencing_token = existing.fencing_token;
                let Some(fresh) = decide_acquire(Some(existing), request, now_ms, new_id).write else {
                    continue;
                };
                let mut filter = identity(&request.id);
                filter.insert("fencing_token", token(fencing_token));
                filter.insert("expires_at", doc! {"$lte": datetime(now_ms)});
                let replacement = RecordDoc::from(&fresh);
                let replaced = self
                    .records
                    .find_one_and_replace(filter, replacement)
                    .await
                    .map_err(unavailable)?;
                if replaced.is_some() {
                    return Ok(acquired(&fresh, None));
                }
                continue;
            }
            let decision = decide_acquire(Some(existing.clone()), request, now_ms, new_id);
            if decision.write.is_none() {
                return Ok(decision.response); // completed, in progress, or mismatch
            }
            // Stale or released lock: take it over only if nobody else did first. Matching the
            // exact lock time also pins what we tell the new holder of the previous attempt.
            let previous = previous_attempt(&existing);
            let mut filter = identity(&request.id);
            filter.insert("record_id", &existing.record_id);
            filter.insert("fencing_token", token(existing.fencing_token));
            filter.insert("state", "in_progress");
            filter.insert("locked_until", datetime(existing.locked_until_ms));
            let update = doc! {
                "$inc": {"fencing_token": 1_i64},
                "$set": {
                    "locked_until": datetime(now_ms.saturating_add(request.lock_timeout_ms)),
                    "attempt_id": &request.attempt_id,
                },
                "$unset": {"outcome_unknown": ""},
                "$max": {"expires_at": datetime(now_ms.saturating_add(request.retention_ms.max(request.lock_timeout_ms)))},
            };
            let taken = self
                .records
                .find_one_and_update(filter, update)
                .return_document(ReturnDocument::After)
                .await
                .map_err(unavailable)?;
            if let Some(doc) = taken {
                return Ok(acquired(&Record::try_from(doc)?, Some(previous)));
            }
        }
        Err(unavailable(
            "acquire did not settle under concurrent changes; retry",
        ))
    }

    async fn complete(&self, request: &CompleteRequest, now_ms: u64) -> Result<(), StorageError> {
        let response = bson::to_bson(&ResponseDoc::from(&request.response)).map_err(corrupt)?;
        let expires_ms = if request.retention_ms == 0 {
            // The retention the acquire asked for (immutable once inserted). The update below
            // is still fenced, so reading it first changes no guarantee.
            match self.find(&request.id).await? {
                Some(record) => completed_expiry(&record, 0, now_ms),
                None => return Err(StorageError::NotFound(request.id.clone())),
            }
        } else {
            now_ms.saturating_add(request.retention_ms)
        };
        let update = doc! {
            "$set": {
                "state": "completed",
                "response": response,
                "locked_until": datetime(0),
                "expires_at": datetime(expires_ms),
            },
            "$unset": {"outcome_unknown": ""},
        };
        self.holder_update(request, now_ms, update).await
    }

    async fn release(&self, request: &ReleaseRequest, now_ms: u64) -> Result<(), StorageError> {
        let update = doc! {"$set": {"locked_until": datetime(0)}};
        self.holder_update(request, now_ms, update).await
    }

    async fn outcome_unknown(
        &self,
        request: &OutcomeUnknownRequest,
        now_ms: u64,
    ) -> Result<(), StorageError> {
        let update = doc! {"$set": {"outcome_unknown": {
            "reason": &request.reason,
            "at": datetime(now_ms),
            "fencing_token": token(request.fencing_token),
        }}};
        self.holder_update(request, now_ms, update).await
    }

    async fn abandon(&self, request: &AbandonRequest, now_ms: u64) -> Result<bool, StorageError> {
        if request.attempt_id.is_empty() {
            return Ok(false);
        }
        let mut filter = identity(&request.id);
        filter.insert("attempt_id", &request.attempt_id);
        filter.insert("state", "in_progress");
        filter.insert("locked_until", doc! {"$gt": datetime(now_ms)});
        filter.insert("expires_at", doc! {"$gt": datetime(now_ms)});
        let result = self
            .records
            .update_one(filter, doc! {"$set": {"locked_until": datetime(0)}})
            .await
            .map_err(unavailable)?;
        Ok(result.matched_count == 1)
    }

    async fn checkpoint(&self, request: &CheckpointRequest, now_ms: u64) -> Result<(), StorageError> {
        let checkpoint = doc! {"phase": &request.phase, "at": datetime(now_ms), "fencing_token": token(request.fencing_token)};
        let update = doc! {"$push": {"checkpoints": checkpoint}};
        self.holder_update(request, now_ms, update).await
    }

    async fn get(&self, id: &RecordId, now_ms: u64) -> Result<Option<Record>, StorageError> {
        Ok(self.find(id).await?.filter(|r| !r.is_expired(now_ms)))
    }

    async fn list_in_progress(
        &self,
        service: &str,
        created_before_ms: u64,
        limit: usize,
        cursor: Option<&str>,
        now_ms: u64,
    ) -> Result<(Vec<Record>, Option<String>), StorageError> {
        use futures::TryStreamExt as _;
        // Paged by record id: unique and the same whichever replica answers.
        let mut filter = doc! {
            "service": service,
            "state": "in_progress",
            "created_at": {"$lte": datetime(created_before_ms)},
            "expires_at": {"$gt": datetime(now_ms)},
        };
        if let Some(after) = cursor {
            filter.insert("record_id", doc! {"$gt": after});
        }
        let docs: Vec<RecordDoc> = self
            .records
            .find(filter)
            .sort(doc! {"record_id": 1})
            .limit(i64::try_from(limit.saturating_add(1)).unwrap_or(i64::MAX))
            .await
            .map_err(unavailable)?
            .try_collect()
            .await
            .map_err(unavailable)?;
        let mut page = docs
            .into_iter()
            .map(Record::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        let next = if page.len() > limit {
            page.truncate(limit);
            page.last().map(|r| r.record_id.clone())
        } else {
            None
        };
        Ok((page, next))
    }

    async fn purge(&self, id: &RecordId) -> Result<bool, StorageError> {
        let result = self.records.delete_one(identity(id)).await.map_err(unavailable)?;
        Ok(result.deleted_count > 0)
    }

    async fn sweep_expired(&self, now_ms: u64, limit: u64) -> Result<u64, StorageError> {
        // The TTL index does this too, but only once a minute; the sweep keeps counts honest.
        // One bounded batch: the ids of up to `limit` expired records, then one delete of those.
        let expired = doc! {"expires_at": {"$lte": datetime(now_ms)}};
        let ids: Vec<bson::Bson> = {
            use futures::TryStreamExt as _;
            let raw = self.database.collection::<Document>(RECORDS_COLLECTION);
            raw.find(expired.clone())
                .projection(doc! {"_id": 1})
                .limit(i64::try_from(limit).unwrap_or(i64::MAX))
                .await
                .map_err(unavailable)?
                .try_collect::<Vec<Document>>()
                .await
                .map_err(unavailable)?
                .into_iter()
                .filter_map(|d| d.get("_id").cloned())
                .collect()
        };
        if ids.is_empty() {
            return Ok(0);
        }
        let mut filter = expired;
        filter.insert("_id", doc! {"$in": ids});
        let result = self.records.delete_many(filter).await.map_err(unavailable)?;
        Ok(result.deleted_count)
    }

    async fn record_count(&self) -> Result<u64, StorageError> {
        self.records.estimated_document_count().await.map_err(unavailable)
    }

    async fn ready(&self) -> Result<(), StorageError> {
        self.database
            .run_command(doc! {"ping": 1})
            .await
            .map(|_| ())
            .map_err(unavailable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::test_mongo::MongoServer;

    async fn open() -> (MongoServer, MongoStorage) {
        let server = MongoServer::start().await;
        let storage = MongoStorage::connect(&server.uri(), &format!("t{}", uuid::Uuid::new_v4().simple()))
            .await
            .unwrap();
        (server, storage)
    }

    crate::storage_contract_tests!(open().await);

    #[tokio::test]
    async fn startup_creates_the_unique_and_ttl_indexes() {
        let (_server, storage) = open().await;
        let names = storage.records.list_index_names().await.unwrap();
        assert!(names.contains(&"record_identity".to_owned()), "{names:?}");
        assert!(names.contains(&"record_ttl".to_owned()), "{names:?}");
    }

    #[tokio::test]
    async fn responses_are_stored_as_bson_binary() {
        let (_server, storage) = open().await;
        let request = crate::storage::contract::acquire_request("bin", 60_000);
        let AcquireResponse::Acquired(lock) = storage.acquire(&request, 1_000).await.unwrap() else {
            panic!("expected the lock");
        };
        storage
            .complete(&crate::storage::contract::complete_request("bin", &lock), 1_100)
            .await
            .unwrap();
        let raw = storage
            .database
            .collection::<Document>(RECORDS_COLLECTION)
            .find_one(doc! {"key": "bin"})
            .await
            .unwrap()
            .unwrap();
        let body = raw.get_document("response").unwrap().get("body").unwrap();
        assert!(matches!(body, bson::Bson::Binary(_)), "{body:?}");
    }

    #[tokio::test]
    async fn unreachable_server_fails_start_up_with_a_clear_message() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let uri = format!("mongodb://127.0.0.1:{port}/?directConnection=true&serverSelectionTimeoutMS=500");
        let error = MongoStorage::connect(&uri, "x").await.unwrap_err();
        assert!(error.to_string().contains("MongoDB is unreachable"), "{error}");
    }

    #[tokio::test]
    async fn operations_fail_as_unavailable_when_the_server_goes_away() {
        let (mut server, storage) = open().await;
        server.stop();
        let result = storage
            .acquire(&crate::storage::contract::acquire_request("gone", 60_000), 1_000)
            .await;
        assert!(matches!(result, Err(StorageError::Unavailable(_))), "{result:?}");
    }
}
