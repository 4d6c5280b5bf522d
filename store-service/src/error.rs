//! The API's error type: every failure a handler can return, mapped to a status and a JSON body.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use idempotency_wire::StoreError;
use thiserror::Error;

use crate::storage::StorageError;

/// Errors returned by the store API.
#[derive(Debug, Error)]
pub enum ApiError {
    /// Missing or wrong bearer token, and no known mesh identity (401).
    #[error("missing or invalid bearer token, and no known mesh identity")]
    Unauthorized,
    /// The credential is valid but lacks the permission (403).
    #[error("credential {credential:?} lacks permission {permission:?}{}", service.as_ref().map(|s| format!(" for service {s:?}")).unwrap_or_default())]
    Forbidden {
        /// Credential name.
        credential: String,
        /// The missing permission.
        permission: &'static str,
        /// The service it asked to act for, for service-bound calls.
        service: Option<String>,
    },
    /// A proxy call named a consumer's message record (403).
    #[error("credential {credential:?} may not use the proxy API on message-deduplication records (scope `message:...`) of service {service:?}; consumers claim messages through /v1/messages with a `service` credential")]
    MessageScope {
        /// Credential name.
        credential: String,
        /// The service named.
        service: String,
    },
    /// The request is well-formed JSON but not acceptable (400).
    #[error("{0}")]
    BadRequest(String),
    /// A storage failure (404, 409, 503 or 500 by kind).
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::Forbidden { .. } | ApiError::MessageScope { .. } => {
                (StatusCode::FORBIDDEN, "forbidden")
            }
            ApiError::Storage(StorageError::NotFound(_)) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Storage(StorageError::StaleToken { .. }) => {
                (StatusCode::CONFLICT, "stale_fencing_token")
            }
            ApiError::Storage(StorageError::DeadlinePassed { .. }) => {
                (StatusCode::REQUEST_TIMEOUT, "deadline_passed")
            }
            ApiError::Storage(StorageError::Unavailable(_)) => {
                (StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable")
            }
            ApiError::Storage(StorageError::Corrupt(_)) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "corrupt_record")
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let mut response = (
            status,
            Json(StoreError {
                error: code.to_owned(),
                message: self.to_string(),
            }),
        )
            .into_response();
        if status == StatusCode::UNAUTHORIZED {
            if let Ok(value) = "Bearer".parse() {
                response
                    .headers_mut()
                    .insert(axum::http::header::WWW_AUTHENTICATE, value);
            }
        }
        response
    }
}
