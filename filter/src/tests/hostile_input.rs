//! Property tests: every parser in the filter against hostile input. None may panic (a panic
//! kills the Wasm VM); malformed store replies must end in 503, never in forwarding.
//!
//! `PROPTEST_CASES` sets the cases per property (256 by default; `make fuzz` runs 200,000 each).
#![cfg(test)] // test code only

use std::rc::Rc;

use proptest::prelude::*;
use serde_json::Value;

use crate::config::Config;
use crate::flow::{RequestFlow, Verdict};
use crate::host::CalloutReply;
use crate::mock::{Call, MockHost};
use crate::request::fingerprint::fingerprint_body;
use crate::request::key::parse_key;
use crate::request::metadata::{decode_serialized_map, parse_route_overrides};
use crate::store::background::Background;

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Plugin configurations built from the real field names with arbitrary values.
fn config_like() -> impl Strategy<Value = Value> {
    let fields = prop::sample::select(vec![
        "service_name",
        "mode",
        "require_key",
        "only_mutating",
        "mutating_methods",
        "max_key_length",
        "lock_timeout",
        "retention_period",
        "max_response_size",
        "max_request_body",
        "failure_mode",
        "store_cluster",
        "store_authority",
        "store_token",
        "store_timeout",
        "fingerprint_headers",
        "release_statuses",
        "replay_header_denylist",
        "routes",
        "scope_from",
        "json_canonical",
        "exclude_fields",
        "route_metadata_namespace",
        "stats_service_tag",
        "jwt_payload_metadata_key",
    ]);
    prop::collection::btree_map(fields, json_value(), 0..10)
        .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()))
}

fn keyed_flow() -> (RequestFlow, MockHost, u32) {
    let config = Rc::new(crate::config::tests::orders(""));
    let mut flow = RequestFlow::new(
        config,
        Rc::new(Background::default()),
        Rc::new(std::cell::RefCell::new(crate::reply::cache::ReplayCache::new(
            0, 0,
        ))),
    );
    let host = MockHost::with_request("POST", "/api/v1/orders", &[("idempotency-key", "k1")], b"{}");
    assert_eq!(flow.on_request_headers(&host, true), Verdict::Pause);
    let token = host.last_token();
    (flow, host, token)
}

proptest! {
    #[test]
    fn keys_never_panic_and_accepted_keys_are_clean(raw in ".{0,300}", max in 1usize..300) {
        if let Ok(key) = parse_key(&raw, max) {
            prop_assert!(!key.is_empty() && key.len() <= max);
            prop_assert!(key.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_config_parser(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = Config::parse(&bytes);
    }

    #[test]
    fn config_shaped_json_is_accepted_or_refused_by_name(value in config_like()) {
        if let Err(error) = Config::parse(value.to_string().as_bytes()) {
            prop_assert!(error.to_string().starts_with("invalid idempotency filter configuration"));
        }
    }

    #[test]
    fn malformed_store_replies_end_in_503_never_in_forwarding(
        status in prop::option::of(0u16..1000),
        body in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..256),
            json_value().prop_map(|v| v.to_string().into_bytes()),
            json_value().prop_map(|v| serde_json::json!({"outcome": "acquired", "record_id": v}).to_string().into_bytes()),
        ],
    ) {
        let (mut flow, host, token) = keyed_flow();
        flow.on_callout_reply(&host, token, CalloutReply { status, body: body.clone() });
        let forwarded = host.calls().contains(&Call::ResumeRequest);
        let answered = host.sent_response().map(|(s, _, _)| s);
        let valid = status == Some(200)
            && serde_json::from_slice::<idempotency_wire::AcquireResponse>(&body).is_ok();
        if !valid {
            prop_assert!(!forwarded, "forwarded on a malformed reply");
            prop_assert_eq!(answered, Some(503));
        } else {
            prop_assert!(forwarded || answered.is_some());
        }
    }

    #[test]
    fn route_metadata_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..128)) {
        let _ = decode_serialized_map(&bytes);
        let _ = parse_route_overrides(&bytes);
    }

    #[test]
    fn canonical_json_is_stable_and_order_insensitive(value in json_value(), pointer in "(/[a-z~01]{0,4}){0,3}") {
        let text = value.to_string();
        let pretty = serde_json::to_string_pretty(&value).unwrap_or_default();
        let exclude = [pointer.as_str()];
        let a = fingerprint_body(text.as_bytes(), true, &exclude).into_owned();
        let b = fingerprint_body(pretty.as_bytes(), true, &exclude).into_owned();
        prop_assert_eq!(&a, &b);
        let again = fingerprint_body(&a, true, &[]).into_owned();
        prop_assert_eq!(&again, &a);
    }

    #[test]
    fn arbitrary_bodies_never_panic_the_fingerprint(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = fingerprint_body(&bytes, true, &["/a", "/b/0"]);
    }

    #[test]
    fn the_fast_canonicaliser_writes_exactly_what_the_reference_writes(
        value in json_value(),
        pointer in "(/[a-z~01]{0,4}){0,3}",
        noise in prop::collection::vec(any::<u8>(), 0..24),
        cut in any::<prop::sample::Index>(),
    ) {
        let exclude = [pointer.as_str()];
        let text = value.to_string();
        let pretty = serde_json::to_string_pretty(&value).unwrap_or_default();
        // Also bodies that are almost JSON: raw bytes spliced in (control characters, broken
        // UTF-8, stray quotes) must be refused, or accepted, by both alike.
        let mut spliced = text.clone().into_bytes();
        let at = cut.index(spliced.len() + 1);
        spliced.splice(at..at, noise);
        for body in [text.as_bytes(), pretty.as_bytes(), &spliced] {
            prop_assert_eq!(
                fingerprint_body(body, true, &exclude),
                crate::fingerprint_reference::reference_fingerprint_body(body, true, &exclude)
            );
        }
    }
}
