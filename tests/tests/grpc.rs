//! gRPC through Envoy with h2c on both sides, a stock tonic server and a stock tonic client:
//! successes recorded and replayed (message, status, metadata), retryable statuses released in
//! either framing, deterministic ones replayed, refusals as gRPC statuses, request trailers,
//! server streams, keyless calls untouched, and `record_mode: async`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::Duration;

use e2e::grpc::pb::{CreateRequest, EventsRequest};
use e2e::grpc::{keyed, GrpcStack};
use e2e::metric_sum;
use serde_json::{json, Value};
use tonic::Code;

/// Every message of a server stream, and how it ended.
async fn read(mut stream: tonic::Streaming<e2e::grpc::pb::Event>) -> (Vec<e2e::grpc::pb::Event>, Code) {
    let mut seen = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(event)) => seen.push(event),
            Ok(None) => return (seen, Code::Ok),
            Err(status) => return (seen, status.code()),
        }
    }
}

fn create(sku: &str) -> CreateRequest {
    CreateRequest {
        sku: sku.into(),
        ..CreateRequest::default()
    }
}

#[tokio::test]
async fn a_success_is_recorded_and_a_retry_gets_the_same_message_without_executing() {
    let stack = GrpcStack::start(json!({})).await;
    let mut client = stack.client().await;
    let first = client.create(keyed("g-ok", create("A"))).await.unwrap();
    assert_eq!(first.metadata().get("x-order-meta").unwrap(), "m1");
    let first = first.into_inner();
    let again = client.create(keyed("g-ok", create("A"))).await.unwrap();
    assert_eq!(again.metadata().get("idempotent-replayed").unwrap(), "true");
    assert_eq!(
        again.metadata().get("x-order-meta").unwrap(),
        "m1",
        "metadata replayed"
    );
    assert_eq!(again.into_inner(), first, "the same message");
    assert_eq!(stack.executions_of("g-ok"), 1);

    let stats = stack.envoy_metrics().await;
    assert_eq!(
        metric_sum(&stats, "idempotency_responses_recorded_total"),
        1.0,
        "recorded, not released"
    );
    assert_eq!(metric_sum(&stats, "idempotency_locks_released_total"), 0.0);
    assert_eq!(metric_sum(&stats, "idempotency_grpc_status_ok_total"), 1.0);
    assert!(
        !stack.envoy_log().contains("outcome unknown"),
        "no warning per call"
    );
}

#[tokio::test]
async fn with_record_mode_async_the_answer_leaves_first_and_a_retry_replays_it_once_written() {
    let stack = GrpcStack::start(json!({"record_mode": "async"})).await;
    let mut client = stack.client().await;
    let first = client
        .create(keyed("g-async", create("A")))
        .await
        .unwrap()
        .into_inner();
    // A retry may overtake the write: ABORTED (the gRPC form of 409) meanwhile, never a rerun.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let again = loop {
        match client.create(keyed("g-async", create("A"))).await {
            Ok(again) => break again,
            Err(status) if status.code() == Code::Aborted => {
                assert!(std::time::Instant::now() < deadline, "still in progress");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => panic!("unexpected {status:?}"),
        }
    };
    assert_eq!(again.metadata().get("idempotent-replayed").unwrap(), "true");
    assert_eq!(again.into_inner(), first, "the same message");
    assert_eq!(stack.executions_of("g-async"), 1);
    let stats = stack.envoy_metrics().await;
    assert_eq!(metric_sum(&stats, "idempotency_records_written_async_total"), 1.0);
}

#[tokio::test]
async fn unavailable_releases_the_lock_in_either_framing_and_the_retry_recovers() {
    let stack = GrpcStack::start(json!({})).await;
    let mut client = stack.client().await;
    // Trailers-only (the usual way a server fails).
    let failing = CreateRequest {
        sku: "A".into(),
        fail_code: Code::Unavailable as i32,
        fail_once: true,
        ..CreateRequest::default()
    };
    let first = client
        .create(keyed("g-unavail", failing.clone()))
        .await
        .unwrap_err();
    assert_eq!(first.code(), Code::Unavailable);
    let retry = client.create(keyed("g-unavail", failing)).await.unwrap();
    assert_eq!(
        retry.into_inner().execution,
        2,
        "the retry ran: UNAVAILABLE was not stored"
    );
    // In the trailers, after a message (a server stream that fails).
    let stream_failing = EventsRequest {
        count: 1,
        padding_bytes: 0,
        fail_code: Code::Unavailable as i32,
    };
    let mut events = client
        .events(keyed("g-unavail-stream", stream_failing))
        .await
        .unwrap()
        .into_inner();
    assert!(events.message().await.unwrap().is_some());
    assert_eq!(events.message().await.unwrap_err().code(), Code::Unavailable);
    let mut again = client
        .events(keyed("g-unavail-stream", stream_failing))
        .await
        .unwrap()
        .into_inner();
    assert!(again.message().await.unwrap().is_some());
    assert_eq!(
        stack.executions_of("g-unavail-stream"),
        2,
        "released, so it ran again"
    );
}

#[tokio::test]
async fn a_deadline_or_cancellation_after_the_work_keeps_the_lock_in_either_framing() {
    // The handler did the work, then its deadline fired (or the call was cancelled): the status
    // says nothing about the order, so a retry must not run it again.
    let stack = GrpcStack::start(json!({})).await;
    let mut client = stack.client().await;
    for code in [Code::DeadlineExceeded, Code::Cancelled] {
        let key = format!("g-deadline-{}", code as i32);
        let request = CreateRequest {
            sku: "A".into(),
            fail_code: code as i32,
            fail_once: true,
            ..CreateRequest::default()
        };
        let first = client.create(keyed(&key, request.clone())).await.unwrap_err();
        assert_eq!(first.code(), code);
        let retry = client.create(keyed(&key, request)).await.unwrap_err();
        assert_eq!(retry.code(), Code::Aborted, "kept: {}", retry.message());
        assert_eq!(stack.executions_of(&key), 1, "{code:?}: not run again");

        // Ending a server stream, after its messages.
        let key = format!("g-deadline-stream-{}", code as i32);
        let events = EventsRequest {
            count: 1,
            padding_bytes: 0,
            fail_code: code as i32,
        };
        let (_, status) = read(client.events(keyed(&key, events)).await.unwrap().into_inner()).await;
        assert_eq!(status, code);
        let retry = client.events(keyed(&key, events)).await;
        let refused = match retry {
            Err(status) => status.code(),
            Ok(stream) => read(stream.into_inner()).await.1,
        };
        assert_eq!(refused, Code::Aborted, "{code:?}");
        assert_eq!(stack.executions_of(&key), 1, "{code:?}: stream not run again");
    }
}

#[tokio::test]
async fn deterministic_errors_are_replayed_in_either_framing() {
    let stack = GrpcStack::start(json!({})).await;
    let mut client = stack.client().await;
    let invalid = CreateRequest {
        sku: "A".into(),
        fail_code: Code::InvalidArgument as i32,
        ..CreateRequest::default()
    };
    let first = client
        .create(keyed("g-invalid", invalid.clone()))
        .await
        .unwrap_err();
    let again = client.create(keyed("g-invalid", invalid)).await.unwrap_err();
    assert_eq!(
        (first.code(), again.code()),
        (Code::InvalidArgument, Code::InvalidArgument)
    );
    assert_eq!(again.message(), first.message());
    assert_eq!(stack.executions_of("g-invalid"), 1, "replayed, not executed");

    let events = EventsRequest {
        count: 2,
        padding_bytes: 0,
        fail_code: Code::InvalidArgument as i32,
    };
    let first = read(
        client
            .events(keyed("g-invalid-stream", events))
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    let again = read(
        client
            .events(keyed("g-invalid-stream", events))
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    assert_eq!(first.1, Code::InvalidArgument);
    assert_eq!(again, first, "the same messages and status");
    assert_eq!(stack.executions_of("g-invalid-stream"), 1);
}

#[tokio::test]
async fn a_concurrent_call_with_the_same_key_is_aborted_with_pushback_and_runs_once() {
    let stack = GrpcStack::start(json!({"in_progress_wait": "0s"})).await;
    let request = CreateRequest {
        sku: "A".into(),
        delay_ms: 1_000,
        ..CreateRequest::default()
    };
    let mut slow = stack.client().await;
    let first = tokio::spawn({
        let request = request.clone();
        async move { slow.create(keyed("g-busy", request)).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut client = stack.client().await;
    let busy = client.create(keyed("g-busy", request)).await.unwrap_err();
    assert_eq!(busy.code(), Code::Aborted);
    assert!(
        busy.message().contains("IDEMPOTENCY_CONCURRENT_REQUEST"),
        "{}",
        busy.message()
    );
    assert!(
        busy.metadata().get("grpc-retry-pushback-ms").is_some(),
        "{:?}",
        busy.metadata()
    );
    assert!(first.await.unwrap().is_ok());
    assert_eq!(stack.executions_of("g-busy"), 1);
}

#[tokio::test]
async fn refusals_map_to_grpc_statuses() {
    let mut stack = GrpcStack::start(json!({"max_request_body": 64})).await;
    let mut client = stack.client().await;
    // 422 → FAILED_PRECONDITION
    client.create(keyed("g-map", create("A"))).await.unwrap();
    let mismatch = client.create(keyed("g-map", create("B"))).await.unwrap_err();
    assert_eq!(mismatch.code(), Code::FailedPrecondition);
    assert!(mismatch.message().contains("IDEMPOTENCY_PARAMETER_MISMATCH"));
    // 400 → INVALID_ARGUMENT
    let invalid = client.create(keyed("bad.key", create("A"))).await.unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument);
    assert!(invalid.message().contains("IDEMPOTENCY_KEY_INVALID"));
    // 413 → RESOURCE_EXHAUSTED
    let large = client
        .create(keyed("g-large", create(&"x".repeat(200))))
        .await
        .unwrap_err();
    assert_eq!(large.code(), Code::ResourceExhausted);
    assert_eq!(stack.executions_of("g-large"), 0);
    // 503 → UNAVAILABLE
    stack.kill_store();
    let down = client.create(keyed("g-down", create("A"))).await.unwrap_err();
    assert_eq!(down.code(), Code::Unavailable);
    assert!(down.message().contains("IDEMPOTENCY_STORAGE_UNAVAILABLE"));
    assert_eq!(stack.executions_of("g-down"), 0);
}

#[tokio::test]
async fn a_server_stream_is_recorded_whole_and_replayed() {
    let stack = GrpcStack::start(json!({})).await;
    let mut client = stack.client().await;
    let request = EventsRequest {
        count: 3,
        padding_bytes: 10,
        fail_code: 0,
    };
    let (first, _) = read(
        client
            .events(keyed("g-stream", request))
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    let again = client.events(keyed("g-stream", request)).await.unwrap();
    assert_eq!(again.metadata().get("idempotent-replayed").unwrap(), "true");
    let (again, status) = read(again.into_inner()).await;
    assert_eq!(status, Code::Ok);
    assert_eq!(first.len(), 3);
    assert_eq!(again, first);
    assert_eq!(stack.executions_of("g-stream"), 1);
}

#[tokio::test]
async fn a_finished_stream_over_the_limit_is_never_run_again_and_retries_are_told_why() {
    // 20 × 10 kB over a 64 KiB limit: it streams through whole; the record is completed without
    // its messages, and every retry — at once, and after lock_timeout — gets ALREADY_EXISTS.
    let stack = GrpcStack::start(json!({"max_response_size": 65536, "lock_timeout": "1s"})).await;
    let mut client = stack.client().await;
    let request = EventsRequest {
        count: 20,
        padding_bytes: 10_000,
        fail_code: 0,
    };
    let mut stream = client.events(keyed("g-big", request)).await.unwrap().into_inner();
    let mut count = 0;
    while let Some(event) = stream.message().await.unwrap() {
        assert_eq!(event.padding.len(), 10_000);
        count += 1;
    }
    assert_eq!(count, 20, "whole, with its OK status");
    for pause in [Duration::from_millis(200), Duration::from_millis(1500)] {
        tokio::time::sleep(pause).await;
        let retry = match client.events(keyed("g-big", request)).await {
            Err(status) => status,
            Ok(stream) => stream.into_inner().message().await.unwrap_err(),
        };
        assert_eq!(retry.code(), Code::AlreadyExists, "{}", retry.message());
        assert!(
            retry.message().contains("IDEMPOTENCY_RESPONSE_NOT_REPLAYABLE") && retry.message().contains("OK"),
            "{}",
            retry.message()
        );
    }
    assert_eq!(stack.executions_of("g-big"), 1);
}

#[tokio::test]
async fn keyless_calls_pass_untouched() {
    let stack = GrpcStack::start(json!({})).await;
    let mut client = stack.client().await;
    for _ in 0..2 {
        client.create(tonic::Request::new(create("A"))).await.unwrap();
    }
    assert_eq!(stack.executions_of(""), 2);
    let stats = stack.envoy_metrics().await;
    assert_eq!(metric_sum(&stats, "idempotency_misses_total"), 0.0);
}

/// One gRPC call over raw HTTP/2 whose request ends with trailers; returns (headers, trailers).
async fn call_with_request_trailers(url: &str, key: &str) -> (http::HeaderMap, http::HeaderMap) {
    use bytes::Bytes;
    use http_body_util::BodyExt;
    use hyper::body::Frame;
    use prost::Message;

    let message = create("A").encode_to_vec();
    let mut framed = vec![0u8];
    framed.extend((message.len() as u32).to_be_bytes());
    framed.extend(message);
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-client-trailer", "t".parse().unwrap());
    let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
        Ok(Frame::data(Bytes::from(framed))),
        Ok(Frame::trailers(trailers)),
    ];
    let body = http_body_util::StreamBody::new(futures::stream::iter(frames));
    let request = http::Request::post(format!("{url}/demo.Orders/Create"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("idempotency-key", key)
        .body(body)
        .unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let response = client.request(request).await.unwrap();
    let headers = response.headers().clone();
    let collected = response.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().unwrap_or_default();
    (headers, trailers)
}

#[tokio::test]
async fn an_http2_request_with_trailers_is_enforced() {
    let stack = GrpcStack::start(json!({})).await;
    let (headers, trailers) = call_with_request_trailers(&stack.url, "g-req-trailers").await;
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.to_str().unwrap()),
        Some("0"),
        "{headers:?}"
    );
    assert_eq!(stack.executions_of("g-req-trailers"), 1);
    let (replayed, trailers) = call_with_request_trailers(&stack.url, "g-req-trailers").await;
    assert_eq!(
        replayed.get("idempotent-replayed").unwrap(),
        "true",
        "acquired, recorded, replayed"
    );
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.to_str().unwrap()),
        Some("0")
    );
    assert_eq!(stack.executions_of("g-req-trailers"), 1);
}

#[tokio::test]
async fn a_keyed_bidi_stream_listed_in_streaming_methods_flows_untracked() {
    let stack = GrpcStack::start(json!({"streaming_methods": ["/demo.Orders/Chat"]})).await;
    let mut client = stack.client().await;
    for _ in 0..2 {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let outgoing = tokio_stream::wrappers::ReceiverStream::new(rx);
        tx.send(e2e::grpc::pb::ChatMessage { text: "hello".into() })
            .await
            .unwrap();
        let mut answers =
            tokio::time::timeout(Duration::from_secs(5), client.chat(keyed("g-chat", outgoing)))
                .await
                .expect("not held back waiting for the request to end")
                .unwrap()
                .into_inner();
        // The answer arrives while the client's side is still open: nothing buffers the call.
        let echo = tokio::time::timeout(Duration::from_secs(5), answers.message())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(echo.unwrap().text, "hello");
        drop(tx);
        while answers.message().await.unwrap().is_some() {}
    }
    assert_eq!(stack.executions_of("g-chat"), 2, "untracked: each call runs");
    let stats = stack.envoy_metrics().await;
    assert_eq!(
        metric_sum(&stats, "idempotency_grpc_streaming_untracked_total"),
        2.0
    );
    assert_eq!(metric_sum(&stats, "idempotency_misses_total"), 0.0);
}

/// One call with grpcio (C-core), the strict client most languages use, through Envoy. Run off
/// the test's runtime thread, which also serves the test's gRPC server.
async fn grpcio_call(
    stack: &GrpcStack,
    method: &str,
    kind: &str,
    request: &impl prost::Message,
    key: &str,
) -> Value {
    let hex: String = request
        .encode_to_vec()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let python = e2e::repo_root().join(".venv/bin/python");
    let script = e2e::repo_root().join("tests/grpc-clients/grpcio_call.py");
    let args = [
        script.to_str().unwrap().to_owned(),
        stack.url.trim_start_matches("http://").to_owned(),
        method.to_owned(),
        kind.to_owned(),
        hex,
        key.to_owned(),
    ];
    let output = tokio::task::spawn_blocking(move || std::process::Command::new(python).args(args).output())
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "grpcio failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[tokio::test]
async fn a_strict_c_core_client_reads_every_replay_framing() {
    let stack = GrpcStack::start(json!({})).await;
    // A trailers-only error (the usual framing for errors), then its replay.
    let invalid = CreateRequest {
        sku: "A".into(),
        fail_code: Code::InvalidArgument as i32,
        ..CreateRequest::default()
    };
    let first = grpcio_call(&stack, "/demo.Orders/Create", "unary", &invalid, "gio-invalid").await;
    let replay = grpcio_call(&stack, "/demo.Orders/Create", "unary", &invalid, "gio-invalid").await;
    assert_eq!(first["code"], "INVALID_ARGUMENT", "{first}");
    assert_eq!(
        replay, first,
        "the same status and message, not UNKNOWN: Stream removed"
    );
    assert_eq!(stack.executions_of("gio-invalid"), 1);

    // A success: the same message.
    let ok = create("B");
    let first = grpcio_call(&stack, "/demo.Orders/Create", "unary", &ok, "gio-ok").await;
    let replay = grpcio_call(&stack, "/demo.Orders/Create", "unary", &ok, "gio-ok").await;
    assert_eq!(first["code"], "OK", "{first}");
    assert_eq!(replay, first);
    assert_eq!(stack.executions_of("gio-ok"), 1);

    // A server stream ending with an error after its messages.
    let events = EventsRequest {
        count: 3,
        padding_bytes: 10,
        fail_code: Code::NotFound as i32,
    };
    let first = grpcio_call(&stack, "/demo.Orders/Events", "stream", &events, "gio-stream").await;
    let replay = grpcio_call(&stack, "/demo.Orders/Events", "stream", &events, "gio-stream").await;
    assert_eq!(first["code"], "NOT_FOUND", "{first}");
    assert_eq!(first["messages"].as_array().map(Vec::len), Some(3));
    assert_eq!(replay, first);
    assert_eq!(stack.executions_of("gio-stream"), 1);
}

#[tokio::test]
async fn a_strict_client_retrying_a_finished_stream_over_the_limit_never_runs_it_again() {
    // 6 × 300 kB, OK, over the default 1 MiB max_response_size; retried at once and after
    // lock_timeout, with grpcio.
    let stack = GrpcStack::start(json!({"lock_timeout": "1s"})).await;
    let events = EventsRequest {
        count: 6,
        padding_bytes: 300_000,
        fail_code: 0,
    };
    let first = grpcio_call(&stack, "/demo.Orders/Events", "stream", &events, "gio-big").await;
    assert_eq!(first["code"], "OK", "{}", first["details"]);
    assert_eq!(first["messages"].as_array().map(Vec::len), Some(6));
    for pause in [Duration::ZERO, Duration::from_millis(1500)] {
        tokio::time::sleep(pause).await;
        let retry = grpcio_call(&stack, "/demo.Orders/Events", "stream", &events, "gio-big").await;
        assert_eq!(retry["code"], "ALREADY_EXISTS", "{retry}");
    }
    assert_eq!(stack.executions_of("gio-big"), 1);
}
