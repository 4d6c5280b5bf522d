//! Request fingerprint: SHA-256 over method, path with query, selected headers and the body;
//! JSON bodies canonicalised (RFC 8785-style: sorted keys, no insignificant whitespace) with
//! listed fields (JSON pointers) removed first.

use std::borrow::Cow;

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

/// A parsed JSON value for fingerprinting. Numbers keep the exact text the client sent (no
/// float rounding: `0.1` and `0.1000000000000000055511` stay different), and objects keep every
/// member, duplicates included (a body with a repeated name never equals one without).
///
/// Text is borrowed from the body wherever it already is canonical (numbers, literals, and
/// strings without escapes — most of a typical body), so canonicalising allocates little.
#[derive(Debug, Clone, PartialEq)]
enum Node<'a> {
    /// Members as (decoded name, value).
    Object(Vec<(Cow<'a, str>, Node<'a>)>),
    Array(Vec<Node<'a>>),
    /// A string (canonical text, quotes included), number (as written) or literal.
    Scalar(Cow<'a, str>),
}

/// Deepest nesting canonicalised; deeper bodies are hashed as raw bytes.
const MAX_DEPTH: usize = 128;

/// A strict JSON (RFC 8259) reader into [`Node`]s; `None` for anything that is not JSON.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn skip_whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        self.skip_whitespace();
        (self.peek()? == byte).then(|| self.pos += 1)
    }

    fn value(&mut self, depth: usize) -> Option<Node<'a>> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.skip_whitespace();
        match self.peek()? {
            b'{' => {
                self.pos += 1;
                let mut members = Vec::new();
                if self.eat(b'}').is_some() {
                    return Some(Node::Object(members));
                }
                loop {
                    self.skip_whitespace();
                    let name = self.string()?;
                    self.eat(b':')?;
                    members.push((name, self.value(depth + 1)?));
                    self.skip_whitespace();
                    match self.peek()? {
                        b',' => self.pos += 1,
                        b'}' => {
                            self.pos += 1;
                            return Some(Node::Object(members));
                        }
                        _ => return None,
                    }
                }
            }
            b'[' => {
                self.pos += 1;
                let mut items = Vec::new();
                if self.eat(b']').is_some() {
                    return Some(Node::Array(items));
                }
                loop {
                    items.push(self.value(depth + 1)?);
                    self.skip_whitespace();
                    match self.peek()? {
                        b',' => self.pos += 1,
                        b']' => {
                            self.pos += 1;
                            return Some(Node::Array(items));
                        }
                        _ => return None,
                    }
                }
            }
            b'"' => {
                let start = self.pos;
                match self.string()? {
                    // No escapes: the text as sent, quotes included, is already canonical.
                    Cow::Borrowed(_) => {
                        let raw = self.bytes.get(start..self.pos)?;
                        std::str::from_utf8(raw)
                            .ok()
                            .map(|raw| Node::Scalar(Cow::Borrowed(raw)))
                    }
                    Cow::Owned(text) => serde_json::to_string(&text)
                        .ok()
                        .map(|text| Node::Scalar(Cow::Owned(text))),
                }
            }
            b't' => self.literal("true"),
            b'f' => self.literal("false"),
            b'n' => self.literal("null"),
            _ => self.number(),
        }
    }

    fn literal(&mut self, word: &'static str) -> Option<Node<'a>> {
        let end = self.pos + word.len();
        (self.bytes.get(self.pos..end)? == word.as_bytes()).then(|| {
            self.pos = end;
            Node::Scalar(Cow::Borrowed(word))
        })
    }

    /// A string token, unescaped: borrowed when it has no escapes (checked here: no control
    /// characters, valid UTF-8), else unescaped by serde_json (which checks the rest).
    fn string(&mut self) -> Option<Cow<'a, str>> {
        let start = self.pos;
        if self.peek()? != b'"' {
            return None;
        }
        self.pos += 1;
        let mut escaped = false;
        loop {
            match self.peek()? {
                b'"' => break,
                b'\\' => {
                    escaped = true;
                    self.pos += 2;
                }
                // Raw control characters are not JSON (serde_json refuses them too).
                0x00..=0x1f => return None,
                _ => self.pos += 1,
            }
        }
        self.pos += 1;
        let token = self.bytes.get(start..self.pos)?;
        if escaped {
            serde_json::from_slice::<String>(token).ok().map(Cow::Owned)
        } else {
            std::str::from_utf8(token.get(1..token.len() - 1)?)
                .ok()
                .map(Cow::Borrowed)
        }
    }

    /// A number token, validated against the JSON grammar and kept as written.
    fn number(&mut self) -> Option<Node<'a>> {
        let start = self.pos;
        let digits = |r: &mut Self| {
            let from = r.pos;
            while matches!(r.peek(), Some(b'0'..=b'9')) {
                r.pos += 1;
            }
            r.pos > from
        };
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        if self.peek() == Some(b'0') {
            self.pos += 1;
        } else if !digits(self) {
            return None;
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if !digits(self) {
                return None;
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.pos += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            if !digits(self) {
                return None;
            }
        }
        let text = std::str::from_utf8(self.bytes.get(start..self.pos)?).ok()?;
        Some(Node::Scalar(Cow::Borrowed(text)))
    }
}

/// Parse a whole body as one JSON value.
fn parse(body: &[u8]) -> Option<Node<'_>> {
    let mut reader = Reader { bytes: body, pos: 0 };
    let value = reader.value(0)?;
    reader.skip_whitespace();
    (reader.pos == body.len()).then_some(value)
}

/// Remove the value(s) at an RFC 6901 `pointer`, if present (every member of that name).
fn remove_pointer(value: &mut Node<'_>, pointer: &str) {
    let Some(rest) = pointer.strip_prefix('/') else {
        return;
    };
    let mut tokens: Vec<String> = rest
        .split('/')
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect();
    let Some(last) = tokens.pop() else { return };
    let mut targets: Vec<&mut Node<'_>> = vec![value];
    for token in &tokens {
        targets = targets
            .into_iter()
            .flat_map(|node| -> Vec<&mut Node<'_>> {
                match node {
                    Node::Object(members) => members
                        .iter_mut()
                        .filter(|(name, _)| name.as_ref() == token.as_str())
                        .map(|(_, v)| v)
                        .collect(),
                    Node::Array(items) => token
                        .parse::<usize>()
                        .ok()
                        .and_then(|i| items.get_mut(i))
                        .into_iter()
                        .collect(),
                    Node::Scalar(_) => Vec::new(),
                }
            })
            .collect();
    }
    for node in targets {
        match node {
            Node::Object(members) => members.retain(|(name, _)| name.as_ref() != last.as_str()),
            Node::Array(items) => {
                if let Some(index) = last.parse::<usize>().ok().filter(|i| *i < items.len()) {
                    items.remove(index);
                }
            }
            Node::Scalar(_) => {}
        }
    }
}

/// Write `value` canonically: object members sorted by name in UTF-16 code units (RFC 8785
/// §3.2.3; equal names keep their order), no whitespace, strings re-encoded, numbers as written.
fn write_canonical(value: &Node<'_>, out: &mut Vec<u8>) {
    match value {
        Node::Object(members) => {
            let mut sorted: Vec<&(Cow<'_, str>, Node<'_>)> = members.iter().collect();
            sorted.sort_by(|(a, _), (b, _)| utf16_order(a, b));
            out.push(b'{');
            for (i, (name, item)) in sorted.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                match name {
                    // Borrowed names had no escapes: as sent, they are canonical.
                    Cow::Borrowed(name) => {
                        out.push(b'"');
                        out.extend_from_slice(name.as_bytes());
                        out.push(b'"');
                    }
                    Cow::Owned(name) => {
                        out.extend(serde_json::to_string(name).unwrap_or_default().as_bytes())
                    }
                }
                out.push(b':');
                write_canonical(item, out);
            }
            out.push(b'}');
        }
        Node::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        Node::Scalar(text) => out.extend(text.as_bytes()),
    }
}

/// Order of names by UTF-16 code units (RFC 8785); for ASCII names that is byte order.
fn utf16_order(a: &str, b: &str) -> std::cmp::Ordering {
    if a.is_ascii() && b.is_ascii() {
        a.as_bytes().cmp(b.as_bytes())
    } else {
        a.encode_utf16().cmp(b.encode_utf16())
    }
}

/// The body bytes to fingerprint: canonical JSON without the excluded fields when the body is
/// JSON, the raw bytes otherwise (including JSON content types whose body does not parse).
pub fn fingerprint_body<'a>(body: &'a [u8], json: bool, exclude: &[&str]) -> Cow<'a, [u8]> {
    if !json {
        return Cow::Borrowed(body);
    }
    let Some(mut value) = parse(body) else {
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
pub fn fingerprint(method: &str, path: &str, headers: &[(String, Vec<u8>)], body: &[u8]) -> String {
    let mut hasher = Sha256::new();
    let mut part = |bytes: &[u8]| {
        hasher.update((bytes.len() as u64).to_be_bytes());
        hasher.update(bytes);
    };
    part(method.as_bytes());
    part(path.as_bytes());
    let mut sorted: Vec<&(String, Vec<u8>)> = headers.iter().collect();
    sorted.sort();
    for (name, value) in sorted {
        part(name.as_bytes());
        part(value);
    }
    part(body);
    hex::encode(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        pairs
            .iter()
            .map(|(n, v)| ((*n).to_owned(), v.as_bytes().to_vec()))
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
        crate::mock::succeeded(String::from_utf8(
            fingerprint_body(body.as_bytes(), true, exclude).into_owned(),
        ))
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
    fn numbers_keep_the_digits_the_client_sent() {
        assert_ne!(
            canonical(r#"{"amount":0.1}"#, &[]),
            canonical(r#"{"amount":0.1000000000000000055511}"#, &[])
        );
        assert_eq!(
            canonical(r#"{"n": 12345678901234567890123}"#, &[]),
            r#"{"n":12345678901234567890123}"#
        );
        assert_eq!(canonical(r#"[-0.5e+10, 1E2, 0]"#, &[]), "[-0.5e+10,1E2,0]");
    }

    #[test]
    fn duplicate_member_names_are_never_merged() {
        assert_ne!(canonical(r#"{"a":1,"a":1}"#, &[]), canonical(r#"{"a":1}"#, &[]));
        assert_ne!(canonical(r#"{"a":1,"a":2}"#, &[]), canonical(r#"{"a":2}"#, &[]));
        assert_eq!(canonical(r#"{"b":0,"a":2,"a":1}"#, &[]), r#"{"a":2,"a":1,"b":0}"#);
    }

    #[test]
    fn strings_are_compared_by_value_not_by_escape() {
        assert_eq!(
            canonical(r#"{"k":"\u0041\n"}"#, &[]),
            canonical(r#"{"k":"A\n"}"#, &[])
        );
        assert_eq!(canonical(r#"{"\u0061":1}"#, &[]), canonical(r#"{"a":1}"#, &[]));
    }

    #[test]
    fn invalid_json_is_hashed_raw() {
        for body in [
            "{\"a\":01}",
            "{\"a\":1,}",
            "[1 2]",
            "{\"a\" 1}",
            "\"x",
            "1.",
            "-",
            "tru",
            "{} {}",
        ] {
            assert_eq!(
                &*fingerprint_body(body.as_bytes(), true, &[]),
                body.as_bytes(),
                "{body}"
            );
        }
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
