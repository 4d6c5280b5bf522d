//! `Idempotency-Key` validation: the IETF structured-field string form and the bare form.

use thiserror::Error;

/// Why a key was refused; the message is returned to the client in the 400 body.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum KeyError {
    /// Empty after unquoting.
    #[error("Idempotency-Key must not be empty")]
    Empty,
    /// Longer than `max_key_length`.
    #[error("Idempotency-Key is {length} characters long; the maximum is {max}")]
    TooLong {
        /// Characters in the key.
        length: usize,
        /// Configured maximum.
        max: usize,
    },
    /// A character outside `[A-Za-z0-9_-]`.
    #[error("Idempotency-Key contains {found:?} at position {position}; only letters, digits, '-' and '_' are allowed")]
    InvalidCharacter {
        /// The offending character.
        found: char,
        /// Its 1-based position in the unquoted key.
        position: usize,
    },
    /// Starts with a quote but is not a well-formed quoted string.
    #[error("Idempotency-Key starts with a double quote but is not a complete quoted string")]
    UnterminatedQuote,
    /// The header was sent more than once.
    #[error("Idempotency-Key was sent more than once; send exactly one")]
    Repeated,
}

impl KeyError {
    /// Short machine-readable reason for `details.reason`.
    pub fn reason(&self) -> &'static str {
        match self {
            KeyError::Empty => "empty",
            KeyError::TooLong { .. } => "too_long",
            KeyError::InvalidCharacter { .. } => "invalid_character",
            KeyError::UnterminatedQuote => "malformed_quoted_string",
            KeyError::Repeated => "repeated_header",
        }
    }
}

/// Validate a raw header value and return the key to use.
///
/// Accepts `"abc-123"` (RFC 8941 sf-string, as the IETF Idempotency-Key draft specifies) and the
/// bare `abc-123` most clients send. Both name the same record.
pub fn parse_key(raw: &str, max_length: usize) -> Result<&str, KeyError> {
    let trimmed = raw.trim_matches(|c| c == ' ' || c == '\t');
    let key = match trimmed.strip_prefix('"') {
        Some(rest) => rest.strip_suffix('"').ok_or(KeyError::UnterminatedQuote)?,
        None => trimmed,
    };
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    // Validate characters first: a too-long key of garbage is better explained by the garbage.
    if let Some((index, found)) = key
        .chars()
        .enumerate()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(KeyError::InvalidCharacter {
            found,
            position: index + 1,
        });
    }
    // Only ASCII is left, so bytes == characters.
    if key.len() > max_length {
        return Err(KeyError::TooLong {
            length: key.len(),
            max: max_length,
        });
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_bare_and_quoted_uuid_keys_as_the_same_key() {
        let uuid = "8e03978e-40d5-43e8-bc93-6894a57f9324";
        assert_eq!(parse_key(uuid, 255), Ok(uuid));
        assert_eq!(parse_key(&format!("\"{uuid}\""), 255), Ok(uuid));
        assert_eq!(parse_key(" under_score-1 ", 255), Ok("under_score-1"));
    }

    #[test]
    fn refuses_empty_keys() {
        assert_eq!(parse_key("", 255), Err(KeyError::Empty));
        assert_eq!(parse_key("\"\"", 255), Err(KeyError::Empty));
    }

    #[test]
    fn refuses_keys_over_the_limit_and_says_the_limit() {
        let err = parse_key(&"a".repeat(256), 255).err();
        assert_eq!(
            err,
            Some(KeyError::TooLong {
                length: 256,
                max: 255
            })
        );
        assert!(err.is_some_and(|e| e.to_string().contains("255")));
        assert!(parse_key(&"a".repeat(255), 255).is_ok());
    }

    #[test]
    fn refuses_characters_outside_the_alphabet_and_says_which() {
        assert_eq!(
            parse_key("abc def", 255).err(),
            Some(KeyError::InvalidCharacter {
                found: ' ',
                position: 4
            })
        );
        assert!(matches!(
            parse_key("ключ", 255),
            Err(KeyError::InvalidCharacter { position: 1, .. })
        ));
        assert!(matches!(
            parse_key("a:b", 255),
            Err(KeyError::InvalidCharacter { found: ':', .. })
        ));
        assert!(matches!(
            parse_key("\"a\\\"b\"", 255),
            Err(KeyError::InvalidCharacter { .. })
        ));
    }

    #[test]
    fn refuses_half_quoted_keys() {
        assert_eq!(parse_key("\"abc", 255), Err(KeyError::UnterminatedQuote));
        assert_eq!(parse_key("\"", 255), Err(KeyError::UnterminatedQuote));
    }
}
