//! Envoy route metadata: per-route `mode`/`percentage` overrides under one `filter_metadata`
//! namespace, read through the host property `xds.route_metadata.filter_metadata.<namespace>`.
//!
//! Envoy 1.40 hands a `Struct` property over in proxy-wasm's serialized-map encoding
//! (`[count][key_len, value_len]*count` then each key and value NUL-terminated), strings as
//! their bytes and numbers as 8-byte little-endian doubles. Anything malformed is ignored, never
//! trusted.

use crate::config::{valid_percentage, Mode};

/// Overrides found in route metadata.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteOverrides {
    /// `mode: off|shadow|optional|required`.
    pub mode: Option<Mode>,
    /// `percentage: 0..100` (number or string).
    pub percentage: Option<f64>,
}

/// Why route metadata was ignored (logged at warn).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetadataError {
    /// The bytes are not a serialized map.
    #[error("route metadata is not a serialized map")]
    Malformed,
    /// A known field has an unusable value.
    #[error("route metadata field `{0}` has an invalid value")]
    InvalidValue(&'static str),
}

fn read_u32(bytes: &[u8], at: usize) -> Option<usize> {
    let chunk: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
    usize::try_from(u32::from_le_bytes(chunk)).ok()
}

/// Decode proxy-wasm's serialized map. `None` when malformed (lengths out of range, missing NULs).
pub fn decode_serialized_map(bytes: &[u8]) -> Option<Vec<(&[u8], &[u8])>> {
    let count = read_u32(bytes, 0)?;
    // Each pair needs at least 8 length bytes and 2 NULs.
    if count > bytes.len() / 10 + 1 {
        return None;
    }
    let mut sizes = Vec::with_capacity(count);
    for i in 0..count {
        let at = 4 + i * 8;
        sizes.push((read_u32(bytes, at)?, read_u32(bytes, at + 4)?));
    }
    let mut cursor = 4 + count * 8;
    let mut pairs = Vec::with_capacity(count);
    for (key_len, value_len) in sizes {
        let key = bytes.get(cursor..cursor.checked_add(key_len)?)?;
        cursor = cursor.checked_add(key_len)?;
        if bytes.get(cursor) != Some(&0) {
            return None;
        }
        cursor += 1;
        let value = bytes.get(cursor..cursor.checked_add(value_len)?)?;
        cursor = cursor.checked_add(value_len)?;
        if bytes.get(cursor) != Some(&0) {
            return None;
        }
        cursor += 1;
        pairs.push((key, value));
    }
    Some(pairs)
}

fn parse_number(value: &[u8]) -> Option<f64> {
    if let Some(n) = std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
    {
        return Some(n);
    }
    let raw: [u8; 8] = value.try_into().ok()?;
    Some(f64::from_le_bytes(raw))
}

/// A mode value. YAML reads an unquoted `off` as the boolean `false`, which Envoy hands over as
/// a single 0 byte (or its text): that means `off`. The other modes are strings.
fn parse_mode(value: &[u8]) -> Option<Mode> {
    match value {
        b"off" | [0] | b"false" => Some(Mode::Off),
        b"shadow" => Some(Mode::Shadow),
        b"optional" => Some(Mode::Optional),
        b"required" => Some(Mode::Required),
        _ => None,
    }
}

/// Parse the overrides of one route. Unknown keys are ignored (other tools may share the
/// namespace); known keys with bad values are an error, so a typo never silently enforces.
pub fn parse_route_overrides(bytes: &[u8]) -> Result<RouteOverrides, MetadataError> {
    let pairs = decode_serialized_map(bytes).ok_or(MetadataError::Malformed)?;
    let mut overrides = RouteOverrides::default();
    for (key, value) in pairs {
        match key {
            b"mode" => overrides.mode = Some(parse_mode(value).ok_or(MetadataError::InvalidValue("mode"))?),
            b"percentage" => {
                let n = parse_number(value)
                    .filter(|n| valid_percentage(*n))
                    .ok_or(MetadataError::InvalidValue("percentage"))?;
                overrides.percentage = Some(n);
            }
            _ => {}
        }
    }
    Ok(overrides)
}

/// Encode a map the way Envoy serializes a `Struct` property (test helper).
#[cfg(test)]
pub(crate) fn encode_serialized_map(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut out = (pairs.len() as u32).to_le_bytes().to_vec();
    for (k, v) in pairs {
        out.extend((k.len() as u32).to_le_bytes());
        out.extend((v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend(*k);
        out.push(0);
        out.extend(*v);
        out.push(0);
    }
    out
}

#[cfg(test)]
#[path = "tests/metadata.rs"]
mod tests;
