//! Error responses: the seed's `{"code","message","details"}` body, served as RFC 9457
//! `application/problem+json` with `type`, `title` and `status` as well.

use serde_json::{json, Map, Value};

/// Every error the filter answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// 400: mutating request without a key on a `required` route.
    KeyRequired,
    /// 400: the key is malformed.
    KeyInvalid,
    /// 409: another attempt with this key holds the lock.
    ConcurrentRequest,
    /// 422: the key was used before with different parameters.
    ParameterMismatch,
    /// 503: the store could not be reached or answered nonsense.
    StorageUnavailable,
    /// 413: the body is larger than the filter will fingerprint.
    RequestTooLarge,
    /// 410 (gRPC `ALREADY_EXISTS`): the call completed, but its response outgrew
    /// `max_response_size` and a gRPC client cannot use a replay without its messages. HTTP
    /// replays such a record as a body-omitted replay instead.
    ResponseNotReplayable,
}

impl ErrorCode {
    /// The seed's code string.
    pub fn code(self) -> &'static str {
        match self {
            ErrorCode::KeyRequired => "IDEMPOTENCY_KEY_REQUIRED",
            ErrorCode::KeyInvalid => "IDEMPOTENCY_KEY_INVALID",
            ErrorCode::ConcurrentRequest => "IDEMPOTENCY_CONCURRENT_REQUEST",
            ErrorCode::ParameterMismatch => "IDEMPOTENCY_PARAMETER_MISMATCH",
            ErrorCode::StorageUnavailable => "IDEMPOTENCY_STORAGE_UNAVAILABLE",
            ErrorCode::RequestTooLarge => "IDEMPOTENCY_REQUEST_TOO_LARGE",
            ErrorCode::ResponseNotReplayable => "IDEMPOTENCY_RESPONSE_NOT_REPLAYABLE",
        }
    }

    /// HTTP status.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::KeyRequired | ErrorCode::KeyInvalid => 400,
            ErrorCode::ConcurrentRequest => 409,
            ErrorCode::ParameterMismatch => 422,
            ErrorCode::StorageUnavailable => 503,
            ErrorCode::RequestTooLarge => 413,
            ErrorCode::ResponseNotReplayable => 410,
        }
    }

    /// Short human title (the problem `title`).
    pub fn title(self) -> &'static str {
        match self {
            ErrorCode::KeyRequired => "Idempotency key required",
            ErrorCode::KeyInvalid => "Invalid idempotency key",
            ErrorCode::ConcurrentRequest => "Request with this idempotency key is in progress",
            ErrorCode::ParameterMismatch => "Idempotency key reused with different parameters",
            ErrorCode::StorageUnavailable => "Idempotency storage unavailable",
            ErrorCode::RequestTooLarge => "Request body too large for idempotency",
            ErrorCode::ResponseNotReplayable => "Completed; its response is too large to replay",
        }
    }

    fn type_uri(self) -> String {
        format!("urn:idempotency:error:{}", self.code().to_ascii_lowercase())
    }
}

/// `Retry-After` for 409: most requests finish well within this, whatever the lock timeout.
pub const CONFLICT_RETRY_AFTER_SECS: u64 = 2;

/// A ready-to-send error response.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// Which error.
    pub code: ErrorCode,
    /// Human explanation for this occurrence.
    pub message: String,
    /// Extra machine-readable facts (`retryAfter`, `reason`, limits).
    pub details: Map<String, Value>,
    /// Seconds for the `Retry-After` header and `details.retryAfter`.
    pub retry_after: Option<u64>,
}

impl Problem {
    /// A problem with no details.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Problem {
        Problem {
            code,
            message: message.into(),
            details: Map::new(),
            retry_after: None,
        }
    }

    /// Add a `details` entry.
    pub fn detail(mut self, name: &str, value: impl Into<Value>) -> Problem {
        self.details.insert(name.to_owned(), value.into());
        self
    }

    /// Set `Retry-After` (seconds, at least 1) and `details.retryAfter`.
    pub fn retry_after(mut self, seconds: u64) -> Problem {
        let seconds = seconds.max(1);
        self.retry_after = Some(seconds);
        self.details.insert("retryAfter".to_owned(), seconds.into());
        self
    }

    /// 409: the key is held by another attempt (`outcome_unknown`: one whose result is unknown,
    /// which holds its lock to the end).
    pub fn in_progress(lock_remaining_ms: u64, outcome_unknown: bool) -> Problem {
        let remaining_secs = lock_remaining_ms.div_ceil(1000).max(1);
        // An attempt of unknown outcome holds its lock to the end: nothing can change before then.
        // A running one usually finishes soon: ask for a quick retry.
        let retry_after = if outcome_unknown {
            remaining_secs
        } else {
            CONFLICT_RETRY_AFTER_SECS.min(remaining_secs)
        };
        let message = if outcome_unknown {
            "An earlier request with this Idempotency-Key may still be running or may have run; its result is unknown until its lock expires. Retry with the same key after Retry-After"
        } else {
            "A request with this Idempotency-Key is being processed; retry with the same key later"
        };
        Problem::new(ErrorCode::ConcurrentRequest, message)
            .retry_after(retry_after)
            .detail("lockRemainingMs", lock_remaining_ms)
            .detail("outcomeUnknown", outcome_unknown)
    }

    /// 422: the key was used with other parameters.
    pub fn parameter_mismatch() -> Problem {
        Problem::new(
            ErrorCode::ParameterMismatch,
            "This Idempotency-Key was used with different request parameters; use a new key for a different request",
        )
    }

    /// HTTP status.
    pub fn status(&self) -> u16 {
        self.code.status()
    }

    /// Response headers (besides `:status`).
    pub fn headers(&self) -> Vec<(String, String)> {
        let mut headers = vec![
            ("content-type".to_owned(), "application/problem+json".to_owned()),
            ("cache-control".to_owned(), "no-store".to_owned()),
        ];
        if let Some(seconds) = self.retry_after {
            headers.push(("retry-after".to_owned(), seconds.to_string()));
        }
        headers
    }

    /// JSON body: the seed's fields plus RFC 9457's.
    pub fn body(&self) -> Vec<u8> {
        let body = json!({
            "type": self.code.type_uri(),
            "title": self.code.title(),
            "status": self.code.status(),
            "code": self.code.code(),
            "message": self.message,
            "details": Value::Object(self.details.clone()),
        });
        body.to_string().into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_request_body_has_the_seed_shape_and_retry_after() {
        let problem = Problem::new(ErrorCode::ConcurrentRequest, "busy").retry_after(2);
        let body: Value = crate::mock::succeeded(serde_json::from_slice(&problem.body()));
        assert_eq!(body["code"], "IDEMPOTENCY_CONCURRENT_REQUEST");
        assert_eq!(body["message"], "busy");
        assert_eq!(body["details"]["retryAfter"], 2);
        assert_eq!(body["status"], 409);
        assert!(body["type"].as_str().is_some_and(|t| t.starts_with("urn:")));
        assert!(problem
            .headers()
            .contains(&("retry-after".to_owned(), "2".to_owned())));
        assert!(problem
            .headers()
            .contains(&("content-type".to_owned(), "application/problem+json".to_owned())));
    }

    #[test]
    fn statuses_match_the_seed_table() {
        assert_eq!(ErrorCode::KeyRequired.status(), 400);
        assert_eq!(ErrorCode::KeyInvalid.status(), 400);
        assert_eq!(ErrorCode::ConcurrentRequest.status(), 409);
        assert_eq!(ErrorCode::ParameterMismatch.status(), 422);
        assert_eq!(ErrorCode::StorageUnavailable.status(), 503);
    }
}
