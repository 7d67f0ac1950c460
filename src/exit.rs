//! Exit codes (DESIGN.md): 0 success, 2 bad input, 3 a plan that does not fit (`--check`), 1 anything else.

use std::fmt;
use std::process::ExitCode;
use vramplan::Error;

/// A bad-input error for `file`: one line naming the file, the key and what is accepted.
pub fn bad(file: &str, what: impl fmt::Display) -> anyhow::Error {
    anyhow::Error::new(Error::bad(file, what))
}

pub const DOES_NOT_FIT: u8 = 3;

/// The exit code of the first typed error in the chain.
pub fn code_for(e: &anyhow::Error) -> ExitCode {
    let code = e.chain().find_map(|c| match c.downcast_ref::<Error>() {
        Some(Error::BadInput { .. }) => Some(2),
        Some(Error::DoesNotFit { .. }) => Some(DOES_NOT_FIT),
        Some(Error::Diverged { .. } | Error::Io { .. } | Error::Checkpoint { .. }) => Some(1),
        #[cfg(feature = "engine")]
        Some(Error::Candle(_)) => Some(1),
        None => None,
    });
    ExitCode::from(code.unwrap_or(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_of_error_has_its_code() {
        let fits = Error::DoesNotFit {
            name: "run.toml".into(),
            needs: vramplan_planner::Bytes(2),
            device: "cpu".into(),
            capacity: vramplan_planner::Bytes(1),
        };
        let diverged = Error::Diverged {
            loss: f64::NAN,
            step: 3,
            saved: "out/ckpt-00000002".into(),
        };
        let full = Error::Io {
            path: "out/summary.json".into(),
            error: std::io::Error::from(std::io::ErrorKind::StorageFull),
        };
        let torn = Error::Checkpoint {
            dir: "out/ckpt-00000004".into(),
            what: "checksum mismatch".into(),
        };
        let cases: [(anyhow::Error, u8); 7] = [
            (bad("run.toml", "train.steps: 0"), 2),
            (bad("--device", "x").context("opening the device"), 2),
            (anyhow::Error::new(fits), DOES_NOT_FIT),
            (anyhow::Error::new(diverged), 1),
            (anyhow::Error::new(full).context("saving"), 1),
            (anyhow::Error::new(torn), 1),
            (anyhow::anyhow!("anything else"), 1),
        ];
        for (e, code) in cases {
            assert_eq!(code_for(&e), ExitCode::from(code), "{e:#}");
        }
    }
}
