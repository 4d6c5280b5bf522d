//! `response_step`: what a forwarded request's response headers mean for its lock, without a host.

use crate::flow::response::{response_step, ResponseFacts, ResponseStep};
use crate::reply::outcome::UnknownReason;

use super::support::config;

fn facts(status: u16) -> ResponseFacts<'static> {
    ResponseFacts {
        status,
        details: Some("via_upstream"),
        grpc_status: None,
        content_length: None,
        end_of_stream: false,
        grpc: false,
    }
}

#[test]
fn an_upstream_answer_is_recorded_released_or_kept_by_what_its_status_proves() {
    let config = config("");
    assert_eq!(
        response_step(&facts(201), &config),
        (ResponseStep::AwaitBody, None)
    );
    let headers_only = ResponseFacts {
        end_of_stream: true,
        ..facts(204)
    };
    assert_eq!(
        response_step(&headers_only, &config),
        (ResponseStep::Record, None)
    );
    assert_eq!(response_step(&facts(503), &config).0, ResponseStep::Release);
    assert_eq!(
        response_step(&facts(504), &config).0,
        ResponseStep::KeepUnknown(UnknownReason::UpstreamStatus)
    );
}

#[test]
fn envoy_answering_after_forwarding_keeps_the_lock_and_a_refused_connection_releases_it() {
    let config = config("");
    let timeout = ResponseFacts {
        details: Some("upstream_response_timeout"),
        ..facts(504)
    };
    assert_eq!(
        response_step(&timeout, &config).0,
        ResponseStep::KeepUnknown(UnknownReason::UpstreamTimeout)
    );
    let never_connected = ResponseFacts {
        details: Some("upstream_reset_before_response_started{connection_failure}"),
        ..facts(503)
    };
    assert_eq!(response_step(&never_connected, &config).0, ResponseStep::Release);
}

#[test]
fn a_declared_body_over_max_response_size_streams_through() {
    let config = config(r#","max_response_size": 1024"#);
    let big = ResponseFacts {
        content_length: Some(1025),
        ..facts(200)
    };
    assert_eq!(response_step(&big, &config), (ResponseStep::StreamThrough, None));
    let fits = ResponseFacts {
        content_length: Some(1024),
        ..facts(200)
    };
    assert_eq!(response_step(&fits, &config), (ResponseStep::AwaitBody, None));
}

#[test]
fn a_trailers_only_grpc_answer_is_judged_by_its_grpc_status() {
    let config = config("");
    let grpc = |code| ResponseFacts {
        grpc: true,
        grpc_status: Some(code),
        end_of_stream: true,
        ..facts(200)
    };
    assert_eq!(response_step(&grpc(5), &config), (ResponseStep::Record, Some(5)));
    assert_eq!(
        response_step(&grpc(14), &config),
        (ResponseStep::Release, Some(14))
    );
    assert_eq!(
        response_step(&grpc(4), &config),
        (
            ResponseStep::KeepUnknown(UnknownReason::UpstreamGrpcStatus),
            Some(4)
        )
    );
    // Messages follow: even a declared length never streams a gRPC call through from here.
    let streaming = ResponseFacts {
        grpc: true,
        content_length: Some(1 << 30),
        ..facts(200)
    };
    assert_eq!(
        response_step(&streaming, &config),
        (ResponseStep::AwaitBody, None)
    );
}
