//! Exit codes (DESIGN.md): 0 success, 2 bad input, 3 a plan that does not fit (`--check`), 1 anything else.

use std::fmt;
use std::process::ExitCode;

/// Bad input: one line naming the file, the key and what is accepted. Exit code 2.
#[derive(Debug)]
pub struct BadInput(pub String);

impl fmt::Display for BadInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadInput {}

/// A bad-input error for `file`.
pub fn bad(file: &str, what: impl fmt::Display) -> anyhow::Error {
    anyhow::Error::new(BadInput(format!("{file}: {what}")))
}

pub const DOES_NOT_FIT: u8 = 3;

pub fn code_for(e: &anyhow::Error) -> ExitCode {
    if e.chain().any(|c| c.is::<BadInput>()) {
        ExitCode::from(2)
    } else {
        ExitCode::from(1)
    }
}
