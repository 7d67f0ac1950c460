//! Errors with fields that name the culprit: the key, the value, what is accepted.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PlanError {
    /// A value outside the accepted set or range.
    #[error("{key} = {value}: {accepted}")]
    Invalid {
        key: String,
        value: String,
        accepted: String,
    },
    /// A required key is missing.
    #[error("{key} is missing: {accepted}")]
    Missing { key: String, accepted: String },
    /// The text could not be parsed at all (TOML or JSON syntax, unknown keys).
    #[error("{line}{message}")]
    Syntax { line: String, message: String },
    /// An unknown preset name.
    #[error("{key} = \"{value}\": no such preset; known: {known}")]
    UnknownPreset {
        key: String,
        value: String,
        known: String,
    },
    /// A search found nothing that satisfies the constraints.
    #[error("{0}")]
    NoSolution(String),
}

impl PlanError {
    pub fn invalid(key: &str, value: impl ToString, accepted: impl Into<String>) -> Self {
        PlanError::Invalid {
            key: key.to_string(),
            value: value.to_string(),
            accepted: accepted.into(),
        }
    }

    /// Turns a `toml` error into one line with its line number (the snippet toml prints is dropped).
    pub fn from_toml(src: &str, err: &toml::de::Error) -> Self {
        let line = err
            .span()
            .map(|s| {
                format!(
                    "line {}: ",
                    src[..s.start.min(src.len())].lines().count().max(1)
                )
            })
            .unwrap_or_default();
        PlanError::Syntax {
            line,
            message: err.message().trim().replace('\n', " "),
        }
    }
}

pub type Result<T> = std::result::Result<T, PlanError>;
