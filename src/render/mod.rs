//! Output formats: pure functions from planner data to text, one file per format behind
//! the [`Render`] trait (hyperfine's exporters); SVG plots are a separate writer.
//!
//! The rule for prose: the planner returns data (causes, fixes as config edits, bytes);
//! the sentences are written here, once, in [`prose`], and both formats use them: the
//! table prints them, the JSON carries them beside the numbers.
//!
//! Commands print through [`emit`]: a reader that closes standard output early
//! (`| head`) ends the output quietly, never with a panic.

pub mod json;
pub mod prose;
pub mod svg;
pub mod table;

use crate::nvml::Detected;
use anyhow::{Context, Result};
use std::io::{ErrorKind, Write};
use std::path::Path;
use vramplan_planner::{
    Comparison, DiagnosedLog, FitResult, GpuSpec, Ladder, ModelSpec, Report, RunSpec,
};

/// The output format, chosen on the command line (`--json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
}

impl Format {
    pub fn from_json_flag(json: bool) -> Format {
        if json {
            Format::Json
        } else {
            Format::Table
        }
    }

    pub fn renderer(self) -> &'static dyn Render {
        match self {
            Format::Table => &table::Text,
            Format::Json => &json::Json,
        }
    }
}

/// One method per command; each returns the whole output, ending in a newline.
pub trait Render {
    fn estimate(&self, s: &RunSpec, r: &Report) -> Result<String>;
    fn compare(&self, na: &str, a: &Report, nb: &str, b: &Report, c: &Comparison)
        -> Result<String>;
    /// `plan` is the plan's TOML; `written` the file it was written to, if any.
    fn fit(&self, f: &FitResult, plan: &str, top: usize, written: Option<&Path>) -> Result<String>;
    /// `fit` when nothing fits the run as asked (`base`): why, and each lever tried.
    fn ladder(&self, base: &RunSpec, l: &Ladder) -> Result<String>;
    /// `written`: the file the best fix was written to, if any.
    fn diagnose(&self, log: &DiagnosedLog, written: Option<&Path>) -> Result<String>;
    fn models(&self, ms: &[ModelSpec]) -> Result<String>;
    fn gpus(&self, gs: &[GpuSpec], detected: &Result<Vec<Detected>>) -> Result<String>;
}

/// Writes `text` to standard output; a closed pipe is the reader's choice, not an error.
pub fn emit(text: &str) -> Result<()> {
    write_quietly(&mut std::io::stdout().lock(), text)
}

fn write_quietly(out: &mut dyn Write, text: &str) -> Result<()> {
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == ErrorKind::BrokenPipe => Ok(()),
        r => r.context("cannot write to standard output"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Closed;
    impl Write for Closed {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    struct Full;
    impl Write for Full {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("disk full"))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_closed_pipe_is_quiet_and_other_errors_are_not() {
        assert!(write_quietly(&mut Closed, "x").is_ok());
        assert!(write_quietly(&mut Full, "x").is_err());
    }
}

#[cfg(test)]
mod fixtures;
