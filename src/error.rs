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
}

impl Error {
    /// A bad-input error for `file` (a path, a flag such as `--device`, or a config key).
    pub fn bad(file: &str, what: impl fmt::Display) -> Error {
        Error::BadInput {
            file: file.to_string(),
            what: what.to_string(),
        }
    }
}
