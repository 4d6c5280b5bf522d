//! Why a configuration was refused: every message names the field.

use thiserror::Error;

/// Why a configuration was refused. Every message names the offending field.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The configuration is not valid JSON or has a wrongly typed or unknown field.
    #[error("invalid idempotency filter configuration: {0}")]
    Syntax(String),
    /// A field has a value outside what the filter accepts.
    #[error("invalid idempotency filter configuration: field `{field}`: {reason}")]
    Field {
        /// The field's name.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

pub(crate) fn field_error(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        field,
        reason: reason.into(),
    }
}
