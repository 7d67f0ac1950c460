//! `vramplan eval --checkpoints RUN/*`: the validation loss of several checkpoints in one
//! command, as a table (the best marked) or `--json`. Paths that are not checkpoints (a
//! shell's `RUN/*` also names `metrics.jsonl`) are skipped; a run folder stands for each
//! of its checkpoints.

use crate::exit::bad;
use crate::load::{self, Env};
use anyhow::Result;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use vramplan::engine::{checkpoint, eval};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Checkpoint folders (ckpt-*) or run folders (all their checkpoints).
    #[arg(long, num_args = 1.., required = true, value_name = "DIR")]
    pub checkpoints: Vec<PathBuf>,
    /// Data whose validation split to measure (default: the data each run trained on).
    #[arg(long, value_name = "PATH")]
    pub data: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

/// The checkpoint folders among `paths`, each once, in order; and how many paths were
/// not checkpoints.
fn checkpoint_dirs(paths: &[PathBuf]) -> Result<(Vec<PathBuf>, usize)> {
    let (mut dirs, mut skipped) = (Vec::new(), 0);
    for p in paths {
        if !p.exists() {
            return Err(bad(
                &p.display().to_string(),
                "no such checkpoint or run folder",
            ));
        }
        let found = if p.join(checkpoint::META).is_file() {
            vec![p.clone()]
        } else {
            checkpoint::list(p)
        };
        skipped += usize::from(found.is_empty());
        for d in found {
            if !dirs.contains(&d) {
                dirs.push(d);
            }
        }
    }
    Ok((dirs, skipped))
}

pub fn run(env: &Env, a: Args) -> Result<ExitCode> {
    let (dirs, skipped) = checkpoint_dirs(&a.checkpoints)?;
    if dirs.is_empty() {
        return Err(bad(
            "--checkpoints",
            format!(
                "none of the {} paths is a checkpoint (ckpt-*) or a folder holding one",
                a.checkpoints.len()
            ),
        ));
    }
    let mut rows = Vec::new();
    for d in &dirs {
        let l = checkpoint::read(d)?;
        let name = format!("{} (plan)", d.display());
        let spec = load::resolve_text(env, &name, &l.meta.plan, Path::new("."))?.spec;
        rows.push(eval::evaluate(&spec, &l, a.data.as_deref())?);
    }
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({ "checkpoints": rows, "best": best(&rows).map(|r| &r.checkpoint) })
            )?
        );
    } else {
        print!("{}", render(&rows, skipped));
    }
    Ok(ExitCode::SUCCESS)
}

fn best(rows: &[eval::Evaluation]) -> Option<&eval::Evaluation> {
    rows.iter()
        .filter(|r| r.val_loss.is_finite())
        .min_by(|a, b| a.val_loss.total_cmp(&b.val_loss))
}

/// One line per checkpoint: its step, validation loss and bits per byte; the best marked.
fn render(rows: &[eval::Evaluation], skipped: usize) -> String {
    let width = rows
        .iter()
        .map(|r| r.checkpoint.len())
        .max()
        .unwrap_or(0)
        .max(10);
    let best = best(rows).map(|r| r.checkpoint.as_str());
    let mut text = format!(
        "{:<width$}  {:>8}  {:>9}  {:>9}\n",
        "checkpoint", "step", "val loss", "bits/byte"
    );
    for r in rows {
        text += &format!(
            "{:<width$}  {:>8}  {:>9.4}  {:>9.3}{}\n",
            r.checkpoint,
            r.step,
            r.val_loss,
            r.val_bits_per_byte,
            if Some(r.checkpoint.as_str()) == best {
                "  best"
            } else {
                ""
            }
        );
    }
    if let Some(first) = rows.first() {
        text += &format!("validation split of {}\n", first.data);
    }
    if skipped > 0 {
        text += &format!("skipped {skipped} paths that are not checkpoints\n");
    }
    text
}
