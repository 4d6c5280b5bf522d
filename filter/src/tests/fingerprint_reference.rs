//! The straightforward canonicaliser the fast one replaced (an owned tree, every string
//! re-encoded), kept as the oracle: the fast one must write exactly these bytes, or fingerprints
//! stored before an upgrade would stop matching their retries.
#![cfg(test)]
#![allow(dead_code)]

use std::borrow::Cow;

/// Deepest nesting canonicalised; deeper bodies are hashed as raw bytes.
/// A parsed JSON value for fingerprinting. Numbers keep the exact text the client sent (no
/// float rounding: `0.1` and `0.1000000000000000055511` stay different), and objects keep every
/// member, duplicates included (a body with a repeated name never equals one without).
#[derive(Debug, Clone, PartialEq)]
enum Node {
    Object(Vec<(String, Node)>),
    Array(Vec<Node>),
    /// A string (re-encoded canonically), number (as written) or literal.
    Scalar(String),
}

const MAX_DEPTH: usize = 128;

/// A strict JSON (RFC 8259) reader into [`Node`]s; `None` for anything that is not JSON.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
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

    fn value(&mut self, depth: usize) -> Option<Node> {
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
                let text = self.string()?;
                serde_json::to_string(&text).ok().map(Node::Scalar)
            }
            b't' => self.literal("true"),
            b'f' => self.literal("false"),
            b'n' => self.literal("null"),
            _ => self.number(),
        }
    }

    fn literal(&mut self, word: &str) -> Option<Node> {
        let end = self.pos + word.len();
        (self.bytes.get(self.pos..end)? == word.as_bytes()).then(|| {
            self.pos = end;
            Node::Scalar(word.to_owned())
        })
    }

    /// A string token, unescaped (serde_json does the unescaping and UTF-8 checks).
    fn string(&mut self) -> Option<String> {
        let start = self.pos;
        if self.peek()? != b'"' {
            return None;
        }
        self.pos += 1;
        loop {
            match self.peek()? {
                b'"' => break,
                b'\\' => self.pos += 2,
                _ => self.pos += 1,
            }
        }
        self.pos += 1;
        serde_json::from_slice::<String>(self.bytes.get(start..self.pos)?).ok()
    }

    /// A number token, validated against the JSON grammar and kept as written.
    fn number(&mut self) -> Option<Node> {
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
        Some(Node::Scalar(text.to_owned()))
    }
}

/// Parse a whole body as one JSON value.
fn parse(body: &[u8]) -> Option<Node> {
    let mut reader = Reader { bytes: body, pos: 0 };
    let value = reader.value(0)?;
    reader.skip_whitespace();
    (reader.pos == body.len()).then_some(value)
}

/// Remove the value(s) at an RFC 6901 `pointer`, if present (every member of that name).
fn remove_pointer(value: &mut Node, pointer: &str) {
    let Some(rest) = pointer.strip_prefix('/') else {
        return;
    };
    let mut tokens: Vec<String> = rest
        .split('/')
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect();
    let Some(last) = tokens.pop() else { return };
    let mut targets: Vec<&mut Node> = vec![value];
    for token in &tokens {
        targets = targets
            .into_iter()
            .flat_map(|node| -> Vec<&mut Node> {
                match node {
                    Node::Object(members) => members
                        .iter_mut()
                        .filter(|(name, _)| name == token)
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
            Node::Object(members) => members.retain(|(name, _)| *name != last),
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
fn write_canonical(value: &Node, out: &mut Vec<u8>) {
    match value {
        Node::Object(members) => {
            let mut sorted: Vec<&(String, Node)> = members.iter().collect();
            sorted.sort_by(|(a, _), (b, _)| a.encode_utf16().cmp(b.encode_utf16()));
            out.push(b'{');
            for (i, (name, item)) in sorted.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend(serde_json::to_string(name).unwrap_or_default().as_bytes());
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

/// The body bytes to fingerprint: canonical JSON without the excluded fields when the body is
/// JSON, the raw bytes otherwise (including JSON content types whose body does not parse).
pub fn reference_fingerprint_body<'a>(body: &'a [u8], json: bool, exclude: &[&str]) -> Cow<'a, [u8]> {
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
