//! Request fingerprint: SHA-256 over method, path with query, selected headers and the body;
//! JSON bodies canonicalised (RFC 8785-style: sorted keys, no insignificant whitespace) with
//! listed fields (JSON pointers) removed first.

use std::borrow::Cow;

use serde_json::Value;
use sha2::{Digest, Sha256};

/// True for `application/json` and `application/*+json` content types.
pub fn is_json_content_type(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Remove the value at an RFC 6901 `pointer`, if present.
fn remove_pointer(value: &mut Value, pointer: &str) {
    let Some((parent, last)) = pointer.rsplit_once('/') else {
        return;
    };
    let last = last.replace("~1", "/").replace("~0", "~");
    match value.pointer_mut(parent) {
        Some(Value::Object(map)) => {
            map.remove(&last);
        }
        Some(Value::Array(items)) => {
            if let Ok(index) = last.parse::<usize>() {
                if index < items.len() {
                    items.remove(index);
                }
            }
        }
        _ => {}
    }
}

/// Write `value` canonically: object keys sorted by UTF-16 code units (RFC 8785 §3.2.3), no
/// whitespace, strings and numbers as serde_json writes them.
fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|(a, _), (b, _)| a.encode_utf16().cmp(b.encode_utf16()));
            out.push(b'{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend(Value::String(key.clone()).to_string().as_bytes());
                out.push(b':');
                write_canonical(item, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        scalar => out.extend(scalar.to_string().as_bytes()),
    }
}

/// The body bytes to fingerprint: canonical JSON without the excluded fields when the body is
/// JSON, the raw bytes otherwise (including JSON content types whose body does not parse).
pub fn fingerprint_body<'a>(body: &'a [u8], json: bool, exclude: &[&str]) -> Cow<'a, [u8]> {
    if !json {
        return Cow::Borrowed(body);
    }
    let Ok(mut value) = serde_json::from_slice::<Value>(body) else {
        return Cow::Borrowed(body);
    };
    for pointer in exclude {
        remove_pointer(&mut value, pointer);
    }
    let mut out = Vec::with_capacity(body.len());
    write_canonical(&value, &mut out);
    Cow::Owned(out)
}

/// Hex SHA-256 of the request's parameters.
///
/// Each part is length-prefixed, so no choice of values can make two different requests hash
/// alike by shifting bytes between parts. `headers` must already be the configured subset, with
/// lower-case names; their order does not matter.
pub fn fingerprint(method: &str, path: &str, headers: &[(String, String)], body: &[u8]) -> String {
    let mut hasher = Sha256::new();
    let mut part = |bytes: &[u8]| {
        hasher.update((bytes.len() as u64).to_be_bytes());
        hasher.update(bytes);
    };
    part(method.as_bytes());
    part(path.as_bytes());
    let mut sorted: Vec<&(String, String)> = headers.iter().collect();
    sorted.sort();
    for (name, value) in sorted {
        part(name.as_bytes());
        part(value.as_bytes());
    }
    part(body);
    hex::encode(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn same_request_same_fingerprint() {
        let a = fingerprint("POST", "/orders", &h(&[("x-a", "1"), ("x-b", "2")]), b"{}");
        let b = fingerprint("POST", "/orders", &h(&[("x-b", "2"), ("x-a", "1")]), b"{}");
        assert_eq!(a, b);
        assert_eq!(a.len(), 64);
    }

    #[test]
    fn any_changed_part_changes_the_fingerprint() {
        let base = fingerprint("POST", "/orders", &[], b"{\"a\":1}");
        assert_ne!(base, fingerprint("PUT", "/orders", &[], b"{\"a\":1}"));
        assert_ne!(base, fingerprint("POST", "/orders?x=1", &[], b"{\"a\":1}"));
        assert_ne!(base, fingerprint("POST", "/orders", &[], b"{\"a\":2}"));
        assert_ne!(
            base,
            fingerprint("POST", "/orders", &h(&[("x-a", "1")]), b"{\"a\":1}")
        );
    }

    fn canonical(body: &str, exclude: &[&str]) -> String {
        String::from_utf8(fingerprint_body(body.as_bytes(), true, exclude).into_owned()).unwrap()
    }

    #[test]
    fn json_key_order_and_whitespace_do_not_matter() {
        assert_eq!(
            canonical(r#"{ "b": 1, "a": [1, {"y":2,"x":1}] }"#, &[]),
            r#"{"a":[1,{"x":1,"y":2}],"b":1}"#
        );
        assert_eq!(
            canonical(r#"{"a":1,"b":2}"#, &[]),
            canonical("{\n  \"b\": 2,\n  \"a\": 1\n}", &[])
        );
    }

    #[test]
    fn json_values_still_matter() {
        assert_ne!(canonical(r#"{"a":1}"#, &[]), canonical(r#"{"a":2}"#, &[]));
        assert_ne!(canonical(r#"{"a":"1"}"#, &[]), canonical(r#"{"a":1}"#, &[]));
    }

    #[test]
    fn excluded_fields_are_removed_before_hashing() {
        let a = canonical(
            r#"{"amount":1,"clientTimestamp":"10:00","meta":{"nonce":"x","a/b":1}}"#,
            &["/clientTimestamp", "/meta/nonce", "/meta/a~1b"],
        );
        let b = canonical(
            r#"{"amount":1,"clientTimestamp":"10:05","meta":{"nonce":"y","a/b":2}}"#,
            &["/clientTimestamp", "/meta/nonce", "/meta/a~1b"],
        );
        assert_eq!(a, b);
        assert_eq!(a, r#"{"amount":1,"meta":{}}"#);
    }

    #[test]
    fn non_json_and_unparseable_bodies_hash_as_bytes() {
        assert_eq!(&*fingerprint_body(b"{ not json", true, &[]), b"{ not json");
        assert_eq!(&*fingerprint_body(b"{ \"a\": 1 }", false, &[]), b"{ \"a\": 1 }");
    }

    #[test]
    fn json_content_types_are_recognised() {
        assert!(is_json_content_type("application/json; charset=utf-8"));
        assert!(is_json_content_type("application/merge-patch+json"));
        assert!(!is_json_content_type("text/plain"));
        assert!(!is_json_content_type("application/jsonx"));
    }

    #[test]
    fn bytes_cannot_shift_between_parts() {
        assert_ne!(
            fingerprint("POST", "/ab", &[], b"c"),
            fingerprint("POST", "/a", &[], b"bc")
        );
    }
}
