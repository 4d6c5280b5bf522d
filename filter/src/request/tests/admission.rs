//! Unit tests of `request/admission.rs` (test code).
#![cfg(test)] // test code only

use super::*;

use crate::config::tests::orders as config;

fn head(method: &str, pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut headers = vec![
        (":method".to_owned(), method.to_owned()),
        (":path".to_owned(), "/api/v1/orders".to_owned()),
    ];
    headers.extend(pairs.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())));
    headers
}

fn decide(config: &Config, headers: &[(String, String)]) -> Admission {
    admit(config, headers, || None, |_| None, |_| None)
}

#[test]
fn reads_neither_metadata_nor_properties_for_requests_it_does_not_act_on() {
    let config = config("");
    let (metadata_read, property_read) = (std::cell::Cell::new(false), std::cell::Cell::new(false));
    let admission = admit(
        &config,
        &head("GET", &[("idempotency-key", "k")]),
        || {
            metadata_read.set(true);
            None
        },
        |_| {
            property_read.set(true);
            None
        },
        |_| {
            property_read.set(true);
            None
        },
    );
    assert!(!metadata_read.get(), "no metadata lookup");
    assert!(!property_read.get(), "no property lookup");
    assert_eq!(admission, Admission::pass(Vec::new()));
}

#[test]
fn a_valid_key_is_tracked_with_its_identity_and_wait() {
    let config = config(r#","in_progress_wait":"2s","scope_from":["header:x-tenant"]"#);
    let admission = decide(
        &config,
        &head(
            "POST",
            &[
                ("idempotency-key", "\"k-1\""),
                ("x-tenant", "acme"),
                ("content-type", "application/json"),
            ],
        ),
    );
    assert!(matches!(admission.decision, Decision::Track(_)), "{admission:?}");
    let Decision::Track(pending) = admission.decision else {
        return;
    };
    assert_eq!(pending.id.key, "k-1");
    assert_eq!(pending.id.scope, "header:acme");
    assert!(pending.json && !pending.shadow);
    assert_eq!(pending.in_progress_wait, Duration::from_secs(2));
}

/// A scope or fingerprint header sent on several field lines counts every line, joined as HTTP
/// joins them: a second line can neither be ignored (another request replayed) nor borrow the
/// first line's tenant.
#[test]
fn scope_and_fingerprint_headers_count_every_field_line() {
    let config = config(r#","scope_from":["header:x-tenant"],"fingerprint_headers":["x-currency"]"#);
    let track = |pairs: &[(&str, &str)]| {
        let mut all = vec![("idempotency-key", "k-1")];
        all.extend_from_slice(pairs);
        match decide(&config, &head("POST", &all)).decision {
            Decision::Track(pending) => Some(pending),
            _ => None,
        }
    };
    let tracked = [
        track(&[
            ("x-tenant", "acme"),
            ("x-currency", "EUR"),
            ("x-tenant", "globex"),
            ("x-currency", "USD"),
        ]),
        track(&[("x-tenant", "acme"), ("x-currency", "EUR")]),
        track(&[("x-tenant", "acme, globex"), ("x-currency", "EUR, USD")]),
    ];
    assert!(tracked.iter().all(Option::is_some), "{tracked:?}");
    let [Some(two_lines), Some(one_line), Some(joined)] = tracked else {
        return;
    };
    assert_eq!(two_lines.id.scope, "header:acme, globex");
    assert_eq!(
        two_lines.fingerprint_headers,
        vec![("x-currency".to_owned(), b"EUR, USD".to_vec())]
    );
    assert_eq!(one_line.id.scope, "header:acme");
    assert_eq!(
        one_line.fingerprint_headers,
        vec![("x-currency".to_owned(), b"EUR".to_vec())]
    );
    assert_eq!(joined.id, two_lines.id, "one line or two, the same field value");
    assert_eq!(joined.fingerprint_headers, two_lines.fingerprint_headers);
}

#[test]
fn missing_and_invalid_keys_by_mode() {
    let required = config(r#","mode":"required""#);
    let missing = decide(&required, &head("POST", &[]));
    assert_eq!(missing.counters, vec![Counter::KeyMissing]);
    assert!(matches!(missing.decision, Decision::Refuse(ref p) if p.code == ErrorCode::KeyRequired));

    let optional = config(r#","mode":"optional""#);
    assert_eq!(
        decide(&optional, &head("POST", &[])),
        Admission::pass(vec![Counter::KeyMissing])
    );
    let invalid = decide(&optional, &head("POST", &[("idempotency-key", "bad key!")]));
    assert!(matches!(invalid.decision, Decision::Refuse(ref p) if p.code == ErrorCode::KeyInvalid));

    let shadow = config(r#","mode":"shadow""#);
    assert_eq!(
        decide(&shadow, &head("POST", &[("idempotency-key", "bad key!")])),
        Admission::pass(vec![Counter::KeyInvalid, Counter::ShadowWouldReject])
    );
}

#[test]
fn streaming_grpc_methods_pass_untracked_unless_a_rule_opts_in() {
    let grpc_head = |path: &str| {
        vec![
            (":method".to_owned(), "POST".to_owned()),
            (":path".to_owned(), path.to_owned()),
            ("content-type".to_owned(), "application/grpc".to_owned()),
            ("idempotency-key".to_owned(), "k".to_owned()),
        ]
    };
    let listed = config(r#","streaming_methods":["/demo.Orders/Chat"]"#);
    assert_eq!(
        decide(&listed, &grpc_head("/demo.Orders/Chat")),
        Admission::pass(vec![Counter::GrpcStreamingUntracked])
    );
    assert!(matches!(
        decide(&listed, &grpc_head("/demo.Orders/Create")).decision,
        Decision::Track(_)
    ));
    let opted_in = config(
        r#","streaming_methods":["/demo.Orders/Upload"],"routes":[{"path_exact":"/demo.Orders/Upload","mode":"optional","track_streaming":true}]"#,
    );
    assert!(matches!(
        decide(&opted_in, &grpc_head("/demo.Orders/Upload")).decision,
        Decision::Track(_)
    ));
}

#[test]
fn a_declared_body_over_the_limit_is_refused_before_any_store_call() {
    let config = config(r#","max_request_body":10"#);
    let admission = decide(
        &config,
        &head("POST", &[("idempotency-key", "k"), ("content-length", "11")]),
    );
    assert!(matches!(admission.decision, Decision::Refuse(ref p) if p.code == ErrorCode::RequestTooLarge));
}
