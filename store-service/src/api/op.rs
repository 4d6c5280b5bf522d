//! The skeleton every record operation runs through: the record identity is well formed, the
//! caller may act on it ([`Op::authorize`]), then the storage call is timed and observed, and
//! acquires waiting on the key are woken when it changed ([`Authorized::run`]).

use std::future::Future;
use std::time::Instant;

use idempotency_wire::RecordId;

use super::{AppState, MAX_IDENTITY_PART};
use crate::auth::{Permission, Principal};
use crate::error::ApiError;
use crate::messages;
use crate::storage::StorageError;

/// Who may run an operation on a record, besides the role the router already checked.
#[derive(Debug, Clone, Copy)]
pub(super) enum Access {
    /// The filter: a credential bound to the record's service, never on a consumer's record.
    Proxy,
    /// A service acting for itself with this permission (checkpoints, consumers).
    Service(Permission),
    /// An administrator (the router checked the admin role; any service).
    Admin,
}

/// One operation on one record, before its caller is checked.
#[derive(Debug, Clone, Copy)]
pub(super) struct Op<'a> {
    operation: &'static str,
    id: &'a RecordId,
    access: Access,
}

/// An operation whose caller may run it: the only way to reach [`Authorized::run`].
#[derive(Debug, Clone, Copy)]
pub(super) struct Authorized<'a>(Op<'a>);

impl<'a> Op<'a> {
    /// A proxy (filter) operation on `id`, named `operation` in metrics and logs.
    pub(super) fn proxy(operation: &'static str, id: &'a RecordId) -> Op<'a> {
        Op {
            operation,
            id,
            access: Access::Proxy,
        }
    }

    /// A service's own operation on `id` under `permission`.
    pub(super) fn service(operation: &'static str, id: &'a RecordId, permission: Permission) -> Op<'a> {
        Op {
            operation,
            id,
            access: Access::Service(permission),
        }
    }

    /// An administrator's operation on `id`.
    pub(super) fn admin(operation: &'static str, id: &'a RecordId) -> Op<'a> {
        Op {
            operation,
            id,
            access: Access::Admin,
        }
    }

    /// Check the identity is well formed (400) and that `principal` may act on it (403).
    pub(super) fn authorize(self, principal: &Principal) -> Result<Authorized<'a>, ApiError> {
        check_identity(self.id)?;
        match self.access {
            Access::Proxy => check_proxy_call(principal, self.id)?,
            Access::Service(permission) => check_service(principal, &self.id.service, permission)?,
            Access::Admin => {}
        }
        Ok(Authorized(self))
    }
}

impl Authorized<'_> {
    /// Run the storage `call`, timed and observed under the operation's name; when it succeeded
    /// and `changed_the_key` says so, wake the acquires waiting on this key.
    pub(super) async fn run<T>(
        self,
        state: &AppState,
        call: impl Future<Output = Result<T, StorageError>>,
        changed_the_key: impl FnOnce(&T) -> bool,
    ) -> Result<T, ApiError> {
        let Op { operation, id, .. } = self.0;
        let value = timed(state, operation, &id.service, call).await?;
        if changed_the_key(&value) {
            state.waiters.wake(id);
        }
        Ok(value)
    }
}

/// For [`Authorized::run`]: the operation changes what a waiting acquire sees (complete,
/// release).
pub(super) fn always<T>(_: &T) -> bool {
    true
}

/// For [`Authorized::run`]: the operation changes nothing a waiting acquire waits for.
pub(super) fn never<T>(_: &T) -> bool {
    false
}

/// A `service` credential may act only for its own services.
pub(super) fn check_service(
    principal: &Principal,
    service: &str,
    permission: Permission,
) -> Result<(), ApiError> {
    if principal.may_act_for(permission, service) {
        Ok(())
    } else {
        Err(ApiError::Forbidden {
            credential: principal.name.clone(),
            permission: permission.name(),
            service: Some(service.to_owned()),
        })
    }
}

/// A proxy call names a record of a service its credential is bound to, and never a
/// consumer's `message:` record: only the messages API claims those, for its own service (else a
/// proxy credential could complete another service's message and make its consumer skip it).
pub(super) fn check_proxy_call(principal: &Principal, id: &RecordId) -> Result<(), ApiError> {
    check_service(principal, &id.service, Permission::ProxyCalls)?;
    if id.scope.starts_with(messages::SCOPE_PREFIX) {
        return Err(ApiError::MessageScope {
            credential: principal.name.clone(),
            service: id.service.clone(),
        });
    }
    Ok(())
}

pub(super) fn check_identity(id: &RecordId) -> Result<(), ApiError> {
    if id.service.is_empty() || id.key.is_empty() {
        return Err(ApiError::BadRequest("service and key must not be empty".into()));
    }
    if [&id.service, &id.scope, &id.key]
        .iter()
        .any(|p| p.len() > MAX_IDENTITY_PART)
    {
        return Err(ApiError::BadRequest(format!(
            "service, scope and key must be at most {MAX_IDENTITY_PART} bytes"
        )));
    }
    Ok(())
}

/// Run one storage operation and observe it under `operation` (duration, outcome, failures in
/// metrics and logs): the skeleton of every handler's storage call.
pub(super) async fn timed<T>(
    state: &AppState,
    operation: &str,
    service: &str,
    call: impl std::future::Future<Output = Result<T, StorageError>>,
) -> Result<T, StorageError> {
    let started = Instant::now();
    let result = call.await;
    observe(state, operation, service, started, &result);
    result
}

fn observe<T>(
    state: &AppState,
    operation: &str,
    service: &str,
    started: Instant,
    result: &Result<T, StorageError>,
) {
    let outcome = match result {
        Ok(_) => "ok",
        Err(StorageError::NotFound(_)) => "not_found",
        Err(StorageError::StaleToken { .. }) => "stale_token",
        Err(StorageError::DeadlinePassed { .. }) => "deadline_passed",
        Err(StorageError::Unavailable(_)) | Err(StorageError::Corrupt(_)) => "error",
    };
    let m = &state.metrics;
    m.requests.with_label_values(&[operation, outcome]).inc();
    m.operation_seconds
        .with_label_values(&[operation, state.storage.name()])
        .observe(started.elapsed().as_secs_f64());
    match result {
        Err(StorageError::Unavailable(e)) | Err(StorageError::Corrupt(e)) => {
            m.storage_errors.with_label_values(&[service, operation]).inc();
            tracing::warn!(operation, service, error = %e, "storage operation failed");
        }
        Err(StorageError::StaleToken { presented, current }) => {
            m.stale_tokens.with_label_values(&[operation]).inc();
            tracing::info!(
                operation,
                service,
                presented,
                current,
                "refused write with stale fencing token"
            );
        }
        _ => {}
    }
}
