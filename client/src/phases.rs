//! Phase checkpoints: the seed's `PhaseManager`, fed by the headers the filter sets.
//!
//! ```no_run
//! # async fn handler(headers: http::HeaderMap, store: idempotency_client::StoreClient) -> Result<(), idempotency_client::ClientError> {
//! use idempotency_client::PhaseManager;
//! const PHASES: [&str; 4] = ["validated", "inventory_reserved", "order_created", "notification_sent"];
//! if let Some(pm) = PhaseManager::from_headers(&headers, store, &PHASES)? {
//!     if !pm.is_done("validated") { /* validate */ pm.checkpoint("validated").await?; }
//!     if !pm.is_done("inventory_reserved") { /* reserve */ pm.checkpoint("inventory_reserved").await?; }
//!     // ...
//! }
//! # Ok(()) }
//! ```

use http::HeaderMap;
use idempotency_wire::{headers, CheckpointRequest, PreviousAttempt, RecordId};

use crate::{ClientError, StoreClient};

/// Tracks the phases of one request that holds an idempotency lock.
#[derive(Debug, Clone)]
pub struct PhaseManager {
    store: StoreClient,
    id: RecordId,
    record_id: String,
    fencing_token: u64,
    attempt_id: String,
    previous_attempt: Option<PreviousAttempt>,
    phases: Vec<String>,
    /// Index in `phases` of the last finished phase, if any.
    done_through: Option<usize>,
}

fn header<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<Option<&'a str>, ClientError> {
    headers
        .get(name)
        .map(|v| v.to_str().map_err(|_| ClientError::InvalidHeader { name }))
        .transpose()
}

impl PhaseManager {
    /// The manager for a request, or `None` when the request carries no idempotency lock (no key,
    /// or the filter is off for this route): then run every phase, as the seed does.
    ///
    /// `phases` lists the operation's phases in order; a recovery point names the last one a
    /// previous attempt finished, and every phase up to it counts as done.
    pub fn from_headers(
        headers: &HeaderMap,
        store: StoreClient,
        phases: &[&str],
    ) -> Result<Option<PhaseManager>, ClientError> {
        let Some(token) = header(headers, headers::FENCING_TOKEN)? else {
            return Ok(None);
        };
        let fencing_token = token.parse().map_err(|_| ClientError::InvalidHeader {
            name: headers::FENCING_TOKEN,
        })?;
        let required = |name: &'static str| -> Result<String, ClientError> {
            header(headers, name)?
                .map(str::to_owned)
                .ok_or(ClientError::InvalidHeader { name })
        };
        let id = RecordId {
            service: required(headers::SERVICE)?,
            scope: header(headers, headers::SCOPE)?.unwrap_or_default().to_owned(),
            key: required(headers::KEY)?,
        };
        let record_id = required(headers::RECORD_ID)?;
        let attempt_id = required(headers::ATTEMPT_ID)?;
        let previous_attempt = match header(headers, headers::PREVIOUS_ATTEMPT)? {
            None => None,
            Some("unknown") => Some(PreviousAttempt::Unknown),
            Some("released") => Some(PreviousAttempt::Released),
            Some(_) => {
                return Err(ClientError::InvalidHeader {
                    name: headers::PREVIOUS_ATTEMPT,
                })
            }
        };
        let phases: Vec<String> = phases.iter().map(|p| (*p).to_owned()).collect();
        let done_through = match header(headers, headers::RECOVERY_POINT)? {
            None => None,
            Some(point) => Some(
                phases
                    .iter()
                    .position(|p| p == point)
                    .ok_or_else(|| ClientError::UnknownPhase(point.to_owned()))?,
            ),
        };
        Ok(Some(PhaseManager {
            store,
            id,
            record_id,
            fencing_token,
            attempt_id,
            previous_attempt,
            phases,
            done_through,
        }))
    }

    /// The last phase a previous attempt finished.
    pub fn recovery_point(&self) -> Option<&str> {
        self.done_through
            .and_then(|i| self.phases.get(i))
            .map(String::as_str)
    }

    /// What the proxy knows of an earlier attempt this request takes over. `Unknown` means that
    /// attempt may have run (fully or in part) without recording its phases: reconcile (look up
    /// whether its effect exists) before repeating work that has no checkpoint.
    pub fn previous_attempt(&self) -> Option<PreviousAttempt> {
        self.previous_attempt
    }

    /// True when `phase` was finished by a previous attempt (or by this one).
    pub fn is_done(&self, phase: &str) -> bool {
        match (self.phases.iter().position(|p| p == phase), self.done_through) {
            (Some(index), Some(done)) => index <= done,
            _ => false,
        }
    }

    /// Record that `phase` is finished. Fails with [`ClientError::LostLock`] when another attempt
    /// took the record over: stop then, its result wins.
    pub async fn checkpoint(&self, phase: &str) -> Result<(), ClientError> {
        if !self.phases.iter().any(|p| p == phase) {
            return Err(ClientError::UnknownPhase(phase.to_owned()));
        }
        self.store
            .checkpoint(&CheckpointRequest {
                id: self.id.clone(),
                record_id: self.record_id.clone(),
                fencing_token: self.fencing_token,
                attempt_id: self.attempt_id.clone(),
                phase: phase.to_owned(),
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().unwrap());
        }
        map
    }

    const PHASES: [&str; 4] = [
        "validated",
        "inventory_reserved",
        "order_created",
        "notification_sent",
    ];

    fn store() -> StoreClient {
        StoreClient::new("http://127.0.0.1:1", None).unwrap()
    }

    #[test]
    fn no_lock_headers_means_no_manager() {
        assert!(PhaseManager::from_headers(&HeaderMap::new(), store(), &PHASES)
            .unwrap()
            .is_none());
    }

    #[test]
    fn recovery_point_marks_earlier_phases_done() {
        let map = headers(&[
            (headers::FENCING_TOKEN, "2"),
            (headers::RECORD_ID, "r1"),
            (headers::ATTEMPT_ID, "a1"),
            (headers::PREVIOUS_ATTEMPT, "unknown"),
            (headers::SERVICE, "orders"),
            (headers::KEY, "k1"),
            (headers::RECOVERY_POINT, "inventory_reserved"),
        ]);
        let pm = PhaseManager::from_headers(&map, store(), &PHASES)
            .unwrap()
            .unwrap();
        assert_eq!(pm.recovery_point(), Some("inventory_reserved"));
        assert_eq!(pm.previous_attempt(), Some(PreviousAttempt::Unknown));
        assert!(pm.is_done("validated") && pm.is_done("inventory_reserved"));
        assert!(!pm.is_done("order_created") && !pm.is_done("notification_sent"));
    }

    #[test]
    fn fresh_attempt_has_nothing_done() {
        let map = headers(&[
            (headers::FENCING_TOKEN, "1"),
            (headers::RECORD_ID, "r1"),
            (headers::ATTEMPT_ID, "a1"),
            (headers::SERVICE, "orders"),
            (headers::KEY, "k1"),
        ]);
        let pm = PhaseManager::from_headers(&map, store(), &PHASES)
            .unwrap()
            .unwrap();
        assert!(PHASES.iter().all(|p| !pm.is_done(p)));
    }

    #[test]
    fn malformed_headers_are_errors() {
        let map = headers(&[
            (headers::FENCING_TOKEN, "x"),
            (headers::SERVICE, "orders"),
            (headers::KEY, "k1"),
        ]);
        assert!(PhaseManager::from_headers(&map, store(), &PHASES).is_err());
        let map = headers(&[(headers::FENCING_TOKEN, "1"), (headers::KEY, "k1")]);
        assert!(PhaseManager::from_headers(&map, store(), &PHASES).is_err());
        let map = headers(&[
            (headers::FENCING_TOKEN, "1"),
            (headers::RECORD_ID, "r1"),
            (headers::ATTEMPT_ID, "a1"),
            (headers::SERVICE, "orders"),
            (headers::KEY, "k1"),
            (headers::RECOVERY_POINT, "teleported"),
        ]);
        assert!(matches!(
            PhaseManager::from_headers(&map, store(), &PHASES),
            Err(ClientError::UnknownPhase(_))
        ));
    }
}
