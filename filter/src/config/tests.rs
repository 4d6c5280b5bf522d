use super::*;

/// The configuration other modules' tests start from: service `orders` plus `extra` fields
/// (e.g. `,"mode":"required"`).
pub(crate) fn orders(extra: &str) -> Config {
    parsed(&format!(r#"{{"service_name":"orders"{extra}}}"#))
}

/// `json` parsed, asserting it is valid.
fn parsed(json: &str) -> Config {
    crate::mock::succeeded(Config::parse(json.as_bytes()))
}

/// Why `json` is refused, asserting it is.
fn refused(json: &str) -> String {
    crate::mock::error_text(Config::parse(json.as_bytes()))
}

#[test]
fn store_batching_is_on_by_default_and_bounded() {
    let config = parsed(r#"{"service_name":"orders"}"#);
    assert_eq!(
        (config.store.batch_max_calls, config.store.max_calls_in_flight),
        (64, 1)
    );
    let off = parsed(r#"{"service_name":"orders","store_batch_max_calls":1}"#);
    assert_eq!(off.store.batch_max_calls, 1);
    for (field, value) in [
        ("store_batch_max_calls", 0),
        ("store_batch_max_calls", 257),
        ("store_max_calls_in_flight", 0),
    ] {
        let error = refused(&format!(r#"{{"service_name":"orders","{field}":{value}}}"#));
        assert!(error.to_string().contains(field), "{error}");
    }
}

#[test]
fn minimal_config_takes_the_seed_defaults() {
    let config = parsed(r#"{"service_name":"orders"}"#);
    assert_eq!(config.policy.mode, Mode::Optional);
    assert!(config.policy.only_mutating);
    assert_eq!(config.limits.max_key_length, 255);
    assert_eq!(config.records.lock_timeout, Duration::from_secs(300));
    assert_eq!(config.records.retention_period, Duration::from_secs(86_400));
    assert_eq!(config.limits.max_response_size, 1_048_576);
    assert_eq!(config.policy.failure_mode, FailureMode::Closed);
    assert!(config.policy.acts_on_method("POST") && !config.policy.acts_on_method("GET"));
    for released in [408, 425, 429, 500, 503] {
        assert_eq!(
            config.statuses.judge(released),
            StatusVerdict::Release,
            "{released}"
        );
    }
    for unknown in [502, 504] {
        assert_eq!(
            config.statuses.judge(unknown),
            StatusVerdict::Unknown,
            "{unknown}"
        );
    }
    for stored in [200, 201, 404, 409, 422, 501] {
        assert_eq!(config.statuses.judge(stored), StatusVerdict::Store, "{stored}");
    }
}

#[test]
fn record_mode_is_write_ahead_unless_async_is_chosen_and_names_its_field_when_wrong() {
    assert_eq!(
        parsed(r#"{"service_name":"o"}"#).records.record_mode,
        RecordMode::WriteAhead
    );
    let config = parsed(
        r#"{"service_name":"o","record_mode":"async","routes":[{"path_prefix":"/pay","mode":"required","record_mode":"write_ahead"}]}"#,
    );
    assert_eq!(config.records.record_mode, RecordMode::Async);
    assert_eq!(config.policy.routes[0].record_mode, Some(RecordMode::WriteAhead));
    let err = refused(r#"{"service_name":"o","record_mode":"later"}"#);
    assert!(err.to_string().contains("`record_mode`"), "{err}");
    assert!(
        err.to_string().contains("write_ahead"),
        "lists the choices: {err}"
    );
    let err = refused(r#"{"service_name":"o","routes":[{"mode":"optional","record_mode":"sync"}]}"#);
    assert!(err.to_string().contains("record_mode"), "{err}");
}

#[test]
fn require_key_true_means_required_mode() {
    assert_eq!(
        parsed(r#"{"service_name":"o","require_key":true}"#).policy.mode,
        Mode::Required
    );
}

#[test]
fn conflicting_mode_and_require_key_names_the_field() {
    let err = refused(r#"{"service_name":"o","require_key":true,"mode":"shadow"}"#);
    assert!(err.to_string().contains("`require_key`"), "{err}");
}

#[test]
fn unknown_field_is_refused_by_name() {
    let err = refused(r#"{"service_name":"o","requir_key":true}"#);
    assert!(err.to_string().contains("requir_key"), "{err}");
}

#[test]
fn a_max_response_size_the_store_would_refuse_to_record_is_refused_at_load() {
    let err = refused(r#"{"service_name":"o","max_response_size":67108864}"#);
    assert!(
        err.contains("`max_response_size`") && err.contains("8388608"),
        "{err}"
    );
    let config = parsed(r#"{"service_name":"o","max_response_size":8388608}"#);
    assert_eq!(
        config.limits.max_response_size,
        idempotency_wire::MAX_RECORDED_BODY
    );
}

#[test]
fn missing_service_name_is_refused_by_name() {
    let err = refused(r#"{}"#);
    assert!(err.to_string().contains("`service_name`"), "{err}");
}

#[test]
fn bad_duration_names_the_field() {
    let err = refused(r#"{"service_name":"o","lock_timeout":"five minutes"}"#);
    assert!(err.to_string().contains("`lock_timeout`"), "{err}");
    let err = refused(r#"{"service_name":"o","lock_timeout":"0s"}"#);
    assert!(err.to_string().contains("`lock_timeout`"), "{err}");
}

#[test]
fn wrong_type_is_refused_with_the_field_name() {
    let err = refused(r#"{"service_name":"o","max_key_length":"long"}"#);
    assert!(
        err.to_string().contains("max_key_length") || err.to_string().contains("invalid type"),
        "{err}"
    );
    let err = refused(r#"{"service_name":"o","failure_mode":"sideways"}"#);
    assert!(err.to_string().contains("sideways"), "{err}");
}

#[test]
fn out_of_range_values_name_the_field() {
    for (json, field) in [
        (r#"{"service_name":"o","max_key_length":0}"#, "max_key_length"),
        (
            r#"{"service_name":"o","release_statuses":["6xx"]}"#,
            "release_statuses",
        ),
        (
            r#"{"service_name":"o","fingerprint_headers":["bad header"]}"#,
            "fingerprint_headers",
        ),
        (
            r#"{"service_name":"o","lock_timeout":"2h","retention_period":"1h"}"#,
            "retention_period",
        ),
        (
            r#"{"service_name":"o","mutating_methods":[]}"#,
            "mutating_methods",
        ),
        (r#"{"service_name":"o","store_token":""}"#, "store_token"),
    ] {
        let err = refused(json);
        assert!(err.to_string().contains(&format!("`{field}`")), "{json}: {err}");
    }
}

#[test]
fn route_rules_parse_and_bad_ones_name_the_field() {
    let config = parsed(
        r#"{"service_name":"o","routes":[
                {"name":"orders","path_prefix":"/api/v1/orders","methods":["post"],"mode":"required","percentage":25,
                 "exclude_fields":["/clientTimestamp","/meta/a~1b"]},
                {"path_regex":"^/api/v1/orders/[^/]+$","mode":"shadow"},
                {"path_exact":"/legacy","mode":"off"}]}"#,
    );
    assert_eq!(config.policy.routes.len(), 3);
    assert_eq!(config.policy.routes[0].percentage, 25.0);
    assert!(config.policy.routes[1].path.matches("/api/v1/orders/ORD-1"));
    assert!(!config.policy.routes[1].path.matches("/api/v1/orders/ORD-1/items"));
    for bad in [
        r#"{"service_name":"o","routes":[{"path_prefix":"/a","path_exact":"/a","mode":"off"}]}"#,
        r#"{"service_name":"o","routes":[{"path_regex":"(","mode":"off"}]}"#,
        r#"{"service_name":"o","routes":[{"mode":"required","percentage":101}]}"#,
        r#"{"service_name":"o","routes":[{"mode":"required","exclude_fields":["nope"]}]}"#,
        r#"{"service_name":"o","routes":[{"mode":"sometimes"}]}"#,
    ] {
        let err = refused(bad);
        assert!(err.to_string().contains("routes"), "{bad}: {err}");
    }
}

#[test]
fn scope_sources_parse_and_bad_ones_name_the_field() {
    let config = parsed(
        r#"{"service_name":"o","scope_from":["header:X-Tenant-Id","jwt_claim:sub","peer_principal","authorization"],
                "scope_secret":"a-secret-of-16-chars"}"#,
    );
    assert_eq!(
        config.scope.sources,
        vec![
            ScopeSource::Header("x-tenant-id".into()),
            ScopeSource::JwtClaim("sub".into()),
            ScopeSource::PeerPrincipal,
            ScopeSource::AuthorizationHash
        ]
    );
    let err = refused(r#"{"service_name":"o","scope_from":["cookie"]}"#);
    assert!(err.to_string().contains("`scope_from`"), "{err}");
    let err = refused(r#"{"service_name":"o","scope_from":["authorization"]}"#);
    assert!(err.to_string().contains("`scope_secret`"), "{err}");
    let err = refused(r#"{"service_name":"o","scope_from":["authorization"],"scope_secret":"short"}"#);
    assert!(err.to_string().contains("`scope_secret`"), "{err}");
}

#[test]
fn stat_names_carry_a_sanitised_service_tag_only_when_asked() {
    let plain = parsed(r#"{"service_name":"orders.v2"}"#);
    assert_eq!(
        plain.stat_name("idempotency_hits_total"),
        "idempotency_hits_total"
    );
    let tagged = parsed(r#"{"service_name":"orders.v2","stats_service_tag":true}"#);
    assert_eq!(
        tagged.stat_name("idempotency_hits_total"),
        "idempotency_hits_total.service.orders_v2"
    );
}

#[test]
fn grpc_statuses_default_to_what_each_proves_and_bad_names_are_refused() {
    let config = parsed(r#"{"service_name":"o"}"#);
    for released in [2, 8, 10, 13, 14] {
        assert_eq!(
            config.statuses.judge_grpc(released),
            StatusVerdict::Release,
            "{released}"
        );
    }
    for unknown in [1, 4] {
        assert_eq!(
            config.statuses.judge_grpc(unknown),
            StatusVerdict::Unknown,
            "{unknown}"
        );
    }
    for stored in [0, 3, 5, 6, 9, 12] {
        assert_eq!(
            config.statuses.judge_grpc(stored),
            StatusVerdict::Store,
            "{stored}"
        );
    }
    let custom = parsed(r#"{"service_name":"o","release_grpc_statuses":["UNAVAILABLE","10"]}"#);
    assert_eq!(custom.statuses.release_grpc, vec![14, 10]);
    let err = refused(r#"{"service_name":"o","release_grpc_statuses":["SOMETIMES"]}"#);
    assert!(err.to_string().contains("`release_grpc_statuses`"), "{err}");
    let err = refused(
        r#"{"service_name":"o","release_grpc_statuses":["DEADLINE_EXCEEDED"],"unknown_grpc_statuses":["DEADLINE_EXCEEDED"]}"#,
    );
    assert!(err.to_string().contains("`unknown_grpc_statuses`"), "{err}");
    let err = refused(r#"{"service_name":"o","unknown_grpc_statuses":["NOPE"]}"#);
    assert!(err.to_string().contains("`unknown_grpc_statuses`"), "{err}");
}

#[test]
fn release_statuses_accept_codes_and_classes() {
    let config = parsed(r#"{"service_name":"o","release_statuses":["503","4xx"]}"#);
    assert_eq!(config.statuses.judge(503), StatusVerdict::Release);
    assert_eq!(config.statuses.judge(404), StatusVerdict::Release);
    assert_eq!(config.statuses.judge(500), StatusVerdict::Store);
    assert_eq!(config.statuses.judge(201), StatusVerdict::Store);
}

#[test]
fn an_explicit_release_list_wins_over_the_default_unknown_one_but_not_over_an_explicit_one() {
    // A configuration written before `unknown_statuses` ("5xx" released) keeps working.
    let config = parsed(r#"{"service_name":"o","release_statuses":["5xx"]}"#);
    assert_eq!(config.statuses.judge(504), StatusVerdict::Release);
    let config =
        parsed(r#"{"service_name":"o","release_grpc_statuses":["DEADLINE_EXCEEDED","UNAVAILABLE"]}"#);
    assert_eq!(config.statuses.judge_grpc(4), StatusVerdict::Release);
    assert_eq!(
        config.statuses.judge_grpc(1),
        StatusVerdict::Unknown,
        "CANCELLED stays unknown"
    );
    // Both written: a status in both is refused, named.
    let err = refused(r#"{"service_name":"o","release_statuses":["5xx"],"unknown_statuses":["504"]}"#);
    let text = err.to_string();
    assert!(
        text.contains("`unknown_statuses`") && text.contains("504"),
        "{text}"
    );
    let config = parsed(r#"{"service_name":"o","release_statuses":["5xx"],"unknown_statuses":[]}"#);
    assert_eq!(config.statuses.judge(504), StatusVerdict::Release);
    let err = refused(r#"{"service_name":"o","unknown_statuses":["5x"]}"#);
    assert!(err.to_string().contains("`unknown_statuses`"), "{err}");
}
