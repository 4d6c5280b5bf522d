//! gRPC at the proxy: recognising gRPC requests, reading a response's `grpc-status` (from the
//! trailers, or from the headers of a trailers-only response), and answering refusals as gRPC
//! statuses instead of HTTP error bodies.

use crate::reply::problem::{ErrorCode, Problem};

/// gRPC status codes (`grpc-status`), as in `google.rpc.Code`.
pub mod code {
    /// Success.
    pub const OK: u32 = 0;
    /// The operation was cancelled (typically by the caller).
    pub const CANCELLED: u32 = 1;
    /// Unknown error.
    pub const UNKNOWN: u32 = 2;
    /// The client specified an invalid argument.
    pub const INVALID_ARGUMENT: u32 = 3;
    /// The deadline expired before the operation could complete.
    pub const DEADLINE_EXCEEDED: u32 = 4;
    /// A requested entity was not found.
    pub const NOT_FOUND: u32 = 5;
    /// The entity a client tried to create already exists.
    pub const ALREADY_EXISTS: u32 = 6;
    /// The caller may not execute the operation.
    pub const PERMISSION_DENIED: u32 = 7;
    /// A resource (quota, size) has been exhausted.
    pub const RESOURCE_EXHAUSTED: u32 = 8;
    /// The system is not in a state required for the operation.
    pub const FAILED_PRECONDITION: u32 = 9;
    /// The operation was aborted (typically a concurrency conflict).
    pub const ABORTED: u32 = 10;
    /// Operation attempted past the valid range.
    pub const OUT_OF_RANGE: u32 = 11;
    /// Not implemented or supported.
    pub const UNIMPLEMENTED: u32 = 12;
    /// Internal error.
    pub const INTERNAL: u32 = 13;
    /// The service is currently unavailable (transient).
    pub const UNAVAILABLE: u32 = 14;
    /// Unrecoverable data loss.
    pub const DATA_LOSS: u32 = 15;
    /// No valid authentication credentials.
    pub const UNAUTHENTICATED: u32 = 16;
}

/// Names of the codes, index = code.
pub const CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The default `release_grpc_statuses`: the server says it did not do the work, or failed
/// (`UNAVAILABLE`: not served; `RESOURCE_EXHAUSTED`: refused for load or quota; `ABORTED`: its
/// transaction was aborted; `UNKNOWN`, `INTERNAL`: the handler failed).
pub const DEFAULT_RELEASE_STATUSES: [u32; 5] = [
    code::UNKNOWN,
    code::RESOURCE_EXHAUSTED,
    code::ABORTED,
    code::INTERNAL,
    code::UNAVAILABLE,
];

/// The default `unknown_grpc_statuses`: the call stopped waiting, which says nothing about the
/// work (`DEADLINE_EXCEEDED`: the deadline fired, perhaps midway through a handler that then
/// finished; `CANCELLED`: the call was cancelled while the handler may have been running).
pub const DEFAULT_UNKNOWN_STATUSES: [u32; 2] = [code::DEADLINE_EXCEEDED, code::CANCELLED];

/// A code from its name (`UNAVAILABLE`, case-insensitive) or number (`14`).
pub fn parse_code(text: &str) -> Option<u32> {
    let text = text.trim();
    if let Ok(n) = text.parse::<u32>() {
        return (n < 17).then_some(n);
    }
    CODE_NAMES
        .iter()
        .position(|name| name.eq_ignore_ascii_case(text))
        .and_then(|i| u32::try_from(i).ok())
}

/// True for gRPC requests (`application/grpc`, `application/grpc+proto`, …; not gRPC-Web).
pub fn is_grpc(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|ct| {
        let essence = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        essence == "application/grpc" || essence.starts_with("application/grpc+")
    })
}

/// The `grpc-status` among `headers` (trailers, or a trailers-only response's headers).
pub fn status_of(headers: &[(String, String)]) -> Option<u32> {
    headers
        .iter()
        .find(|(n, _)| n == "grpc-status")
        .and_then(|(_, v)| v.trim().parse::<u32>().ok())
}

/// A refusal as a gRPC status: code, `grpc-message` and trailing metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcRefusal {
    /// `grpc-status`.
    pub status: u32,
    /// `grpc-message` (the problem's message and its seed code).
    pub message: String,
    /// Extra metadata, e.g. `grpc-retry-pushback-ms`.
    pub metadata: Vec<(String, String)>,
}

/// How a refusal reads to a gRPC client: in progress → ABORTED with `grpc-retry-pushback-ms`
/// (ABORTED, not UNAVAILABLE: gRPC client libraries retry UNAVAILABLE on their own, immediately;
/// this is a conflict the caller should retry after the pushback), mismatch →
/// FAILED_PRECONDITION, missing/invalid key → INVALID_ARGUMENT, too large → RESOURCE_EXHAUSTED,
/// store unavailable → UNAVAILABLE, completed but too large to replay → ALREADY_EXISTS (definite:
/// clients do not retry it, and the call must not run again).
pub fn refusal(problem: &Problem) -> GrpcRefusal {
    let status = match problem.code {
        ErrorCode::KeyRequired | ErrorCode::KeyInvalid => code::INVALID_ARGUMENT,
        ErrorCode::ConcurrentRequest => code::ABORTED,
        ErrorCode::ParameterMismatch => code::FAILED_PRECONDITION,
        ErrorCode::RequestTooLarge => code::RESOURCE_EXHAUSTED,
        ErrorCode::StorageUnavailable => code::UNAVAILABLE,
        ErrorCode::ResponseNotReplayable => code::ALREADY_EXISTS,
    };
    let mut metadata = vec![(
        "idempotency-error-code".to_owned(),
        problem.code.code().to_owned(),
    )];
    if let Some(seconds) = problem.retry_after {
        metadata.push(("grpc-retry-pushback-ms".to_owned(), (seconds * 1000).to_string()));
    }
    GrpcRefusal {
        status,
        message: format!("{}: {}", problem.code.code(), problem.message),
        metadata,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_parse_by_name_or_number() {
        assert_eq!(parse_code("UNAVAILABLE"), Some(14));
        assert_eq!(parse_code("deadline_exceeded"), Some(4));
        assert_eq!(parse_code("9"), Some(9));
        assert_eq!(parse_code("17"), None);
        assert_eq!(parse_code("SOMETIMES"), None);
    }

    #[test]
    fn grpc_requests_are_recognised_but_not_grpc_web() {
        assert!(is_grpc(Some("application/grpc")));
        assert!(is_grpc(Some("application/grpc+proto")));
        assert!(!is_grpc(Some("application/grpc-web")));
        assert!(!is_grpc(Some("application/json")));
        assert!(!is_grpc(None));
    }

    #[test]
    fn refusals_map_to_the_documented_statuses() {
        let cases = [
            (ErrorCode::ConcurrentRequest, code::ABORTED),
            (ErrorCode::ParameterMismatch, code::FAILED_PRECONDITION),
            (ErrorCode::KeyInvalid, code::INVALID_ARGUMENT),
            (ErrorCode::KeyRequired, code::INVALID_ARGUMENT),
            (ErrorCode::RequestTooLarge, code::RESOURCE_EXHAUSTED),
            (ErrorCode::StorageUnavailable, code::UNAVAILABLE),
        ];
        for (error, status) in cases {
            assert_eq!(refusal(&Problem::new(error, "m")).status, status, "{error:?}");
        }
        let busy = refusal(&Problem::new(ErrorCode::ConcurrentRequest, "busy").retry_after(3));
        assert!(busy.message.starts_with("IDEMPOTENCY_CONCURRENT_REQUEST: busy"));
        assert!(busy
            .metadata
            .contains(&("grpc-retry-pushback-ms".into(), "3000".into())));
    }
}
