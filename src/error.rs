//! The library's errors, typed so the binary can map each kind to its exit code
//! (DESIGN.md: 2 bad input, 3 a plan that does not fit, 1 anything else) without
//! matching on message text.

use std::fmt;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The user's input is wrong: one line naming the file (or flag, or key) and what is
    /// accepted.
    #[error("{file}: {what}")]
    BadInput { file: String, what: String },
    /// The planner says the plan needs more memory than the device has.
    #[error("{name}: the plan needs {needs} but {device} has {capacity}; it does not fit")]
    DoesNotFit {
        name: String,
        needs: vramplan_planner::Bytes,
        device: String,
        capacity: vramplan_planner::Bytes,
    },
    /// The loss stopped being a number; the weights before the step are saved.
    #[error("the loss became {loss} at step {step}: stopped; the weights before this step are saved in {saved} (lower the learning rate and --resume)")]
    Diverged { loss: f64, step: u64, saved: String },
    /// Reading or writing `path` failed for a reason that is not the input's fault (a full
    /// disk, an I/O error): the file is named, and nothing half-written is left behind.
    // The cause is shown in the message and not chained as a source, so `{:#}` says it once.
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
    /// A checkpoint folder that does not read back whole: a missing or torn file, a
    /// checksum that does not match, a tensor the model lacks.
    #[error("{dir}: {what}")]
    Checkpoint { dir: String, what: String },
    /// A tensor operation failed inside the engine.
    #[cfg(feature = "engine")]
    #[error("tensor operation: {0}")]
    Candle(#[from] candle_core::Error),
}

impl Error {
    /// A bad-input error for `file` (a path, a flag such as `--device`, or a config key).
    pub fn bad(file: &str, what: impl fmt::Display) -> Error {
        Error::BadInput {
            file: file.to_string(),
            what: what.to_string(),
        }
    }

    /// A failure writing (or creating) `path`. Failures that mean the input names the wrong place (a
    /// missing folder, no permission, a read-only file system, a file where a folder is
    /// wanted) are bad input; the rest (a full disk, a device error) are not.
    pub fn io(path: &std::path::Path, source: std::io::Error) -> Error {
        use std::io::ErrorKind as K;
        let name = path.display().to_string();
        match source.kind() {
            K::NotFound
            | K::PermissionDenied
            | K::ReadOnlyFilesystem
            | K::NotADirectory
            | K::IsADirectory
            | K::AlreadyExists => Error::bad(&name, format!("cannot write: {source}")),
            _ => Error::Io {
                path: name,
                error: source,
            },
        }
    }

    /// A checkpoint under `dir` that does not read back.
    pub fn checkpoint(dir: &std::path::Path, what: impl fmt::Display) -> Error {
        Error::Checkpoint {
            dir: dir.display().to_string(),
            what: what.to_string(),
        }
    }
}
