//! Unit tests of `metadata.rs`.
#![cfg(test)]

use super::*;
use crate::mock::succeeded;

fn encode(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
    encode_serialized_map(pairs)
}

#[test]
fn decodes_what_envoy_1_40_sends_for_route_metadata() {
    // Captured from Envoy 1.40 for `idempotency: {mode: required, percentage: 50, label: "x"}`.
    let captured = succeeded(hex::decode(
        "0300000005000000010000000a0000000800000004000000080000006c6162656c00780070657263656e74616765000000000000004940006d6f646500726571756972656400",
    ));
    let overrides = succeeded(parse_route_overrides(&captured));
    assert_eq!(overrides.mode, Some(Mode::Required));
    assert_eq!(overrides.percentage, Some(50.0));
}

#[test]
fn unquoted_yaml_off_arrives_as_false_and_means_off() {
    for value in [&[0u8][..], b"false", b"off"] {
        let overrides = succeeded(parse_route_overrides(&encode(&[(b"mode", value)])));
        assert_eq!(overrides.mode, Some(Mode::Off), "{value:?}");
    }
    assert_eq!(
        parse_route_overrides(&encode(&[(b"mode", &[1u8][..])])),
        Err(MetadataError::InvalidValue("mode"))
    );
}

#[test]
fn string_percentages_work_too() {
    let bytes = encode(&[(b"percentage", b"12.5")]);
    assert_eq!(succeeded(parse_route_overrides(&bytes)).percentage, Some(12.5));
}

#[test]
fn bad_values_are_errors_not_enforcement() {
    assert_eq!(
        parse_route_overrides(&encode(&[(b"mode", b"sometimes")])),
        Err(MetadataError::InvalidValue("mode"))
    );
    assert_eq!(
        parse_route_overrides(&encode(&[(b"percentage", &250.0f64.to_le_bytes())])),
        Err(MetadataError::InvalidValue("percentage"))
    );
}

#[test]
fn malformed_bytes_are_rejected_without_panicking() {
    for bad in [
        &b""[..],
        &[1, 0, 0, 0][..],
        &[255, 255, 255, 255, 1, 2][..],
        &[1, 0, 0, 0, 200, 0, 0, 0, 1, 0, 0, 0, b'a', 0, b'b', 0][..],
        &[1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, b'a', 1, b'b', 0][..],
    ] {
        assert_eq!(
            parse_route_overrides(bad),
            Err(MetadataError::Malformed),
            "{bad:?}"
        );
    }
}
