//! A run's output folder belongs to one run: [`Lock`] keeps a second trainer out while
//! one runs, [`claim`] refuses a fresh run in a folder that holds another run's
//! checkpoints (or moves that run aside with `--force`, never deleting it), and
//! [`check_resume`] makes `--resume` continue only the run that wrote the checkpoint.

use crate::engine::checkpoint::{self, Meta};
use crate::Error;
use std::io::Write;
use std::path::{Path, PathBuf};

type Result<T> = std::result::Result<T, Error>;

/// The lock file in a run's folder; it holds the trainer's process id.
pub const LOCK: &str = ".lock";
pub const SUMMARY: &str = "summary.json";
pub const METRICS: &str = "metrics.jsonl";

/// An exclusive lock on a run folder, taken by creating `OUT/.lock` (`O_EXCL`), released
/// when dropped. A lock whose process no longer runs (a trainer that was killed) is taken
/// over with a note.
#[derive(Debug)]
pub struct Lock {
    path: PathBuf,
}

impl Lock {
    pub fn take(out: &Path) -> Result<Lock> {
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        let path = out.join(LOCK);
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    writeln!(f, "{}", std::process::id())
                        .and_then(|()| f.sync_all())
                        .map_err(|e| Error::io(&path, e))?;
                    return Ok(Lock { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let holder = std::fs::read_to_string(&path).unwrap_or_default();
                    let pid = holder.trim().parse::<u32>().ok();
                    if let Some(pid) = pid.filter(|&p| running(p)) {
                        return Err(Error::bad(
                            &out.display().to_string(),
                            format!("another trainer (pid {pid}) is using this folder; wait for it, or remove {} if it no longer runs", path.display()),
                        ));
                    }
                    eprintln!(
                        "note: {}: taking over the lock of {}, which no longer runs",
                        path.display(),
                        pid.map_or("an unknown process".to_string(), |p| format!("pid {p}"))
                    );
                    std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
                }
                Err(e) => return Err(Error::io(&path, e)),
            }
        }
        Err(Error::bad(
            &path.display().to_string(),
            "another trainer took the lock at the same time",
        ))
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let mine = std::fs::read_to_string(&self.path)
            .is_ok_and(|t| t.trim() == std::process::id().to_string());
        if mine {
            std::fs::remove_file(&self.path).ok();
        }
    }
}

/// Whether process `pid` runs. Where the system has no `/proc` every holder is taken to
/// run (the lock is then removed by hand).
fn running(pid: u32) -> bool {
    let proc = Path::new("/proc");
    !proc.join("self").exists() || proc.join(pid.to_string()).exists()
}

/// What a run folder holds of an earlier run: its checkpoints and summary.
fn previous_run(out: &Path) -> Vec<String> {
    let mut found: Vec<String> = checkpoint::list(out)
        .iter()
        .filter_map(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
        .collect();
    if out.join(SUMMARY).exists() {
        found.push(SUMMARY.into());
    }
    found
}

/// Makes `out` this run's before a fresh (not resumed) run: refuses a folder holding
/// another run's checkpoints or summary, unless `force`, which moves that run's files to
/// a new `OUT.old-N` beside it. Returns where the old run went.
pub fn claim(out: &Path, force: bool) -> Result<Option<PathBuf>> {
    let found = previous_run(out);
    if found.is_empty() {
        if out.join(METRICS).exists() {
            eprintln!(
                "note: {}: from a run stopped before its first checkpoint; starting over",
                out.join(METRICS).display()
            );
        }
        return Ok(None);
    }
    let name = out.display().to_string();
    if !force {
        let shown = match found.len() {
            1..=3 => found.join(", "),
            n => format!("{}, … ({n} in all)", found[..2].join(", ")),
        };
        return Err(Error::bad(
            &name,
            format!("holds another run ({shown}): --resume continues it, --force moves it aside and starts over, or choose another --out"),
        ));
    }
    let aside = (1..)
        .map(|n| PathBuf::from(format!("{name}.old-{n}")))
        .find(|p| !p.exists())
        .expect("some N is free");
    std::fs::create_dir_all(&aside).map_err(|e| Error::io(&aside, e))?;
    for entry in std::fs::read_dir(out).map_err(|e| Error::io(out, e))? {
        let from = entry.map_err(|e| Error::io(out, e))?.path();
        if from.file_name().is_some_and(|f| f == LOCK) {
            continue;
        }
        let to = aside.join(from.file_name().unwrap_or_default());
        std::fs::rename(&from, &to).map_err(|e| Error::io(&from, e))?;
    }
    eprintln!(
        "note: moved the previous run in {name} to {}",
        aside.display()
    );
    Ok(Some(aside))
}

/// What a resumed run asks for, to compare with what its checkpoint recorded.
pub struct Asked<'a> {
    pub plan: &'a str,
    pub seed: u64,
    pub lr: f64,
    pub steps: u64,
    pub train_on: &'a str,
}

/// Checks that the checkpoint in `dir` (with `meta`) was written by this run: the same
/// model and the same seed, else one line of bad input. Returns a note for each setting
/// the resumed run changes (the plan's training keys, `--lr`, `--steps`, `--train-on`).
pub fn check_resume(dir: &Path, meta: &Meta, asked: &Asked) -> Result<Vec<String>> {
    let name = dir.display().to_string();
    let same_plan = if meta.plan_hash.is_empty() {
        meta.plan.trim() == asked.plan.trim()
    } else {
        meta.plan_hash == checkpoint::plan_hash(asked.plan)
    };
    let changed = if same_plan {
        Vec::new()
    } else {
        plan_changes(&meta.plan, asked.plan)
    };
    if let Some(c) = changed.iter().find(|c| c.starts_with("model.")) {
        return Err(Error::bad(
            &name,
            format!("written by another run ({c}): choose another --out, or --force to move that run aside and start over"),
        ));
    }
    if meta.seed != asked.seed {
        return Err(Error::bad(
            &name,
            format!("written by the run with --seed {}; --seed {} would be another run (leave --seed out to continue it)", meta.seed, asked.seed),
        ));
    }
    let mut notes = Vec::new();
    if !changed.is_empty() {
        notes.push(format!("the plan changed: {}", changed.join(", ")));
    }
    if meta.learning_rate != asked.lr {
        notes.push(format!("--lr {} (was {})", asked.lr, meta.learning_rate));
    }
    if meta.total_steps != asked.steps {
        notes.push(format!(
            "--steps {} (was {})",
            asked.steps, meta.total_steps
        ));
    }
    if let Some(was) = meta.train_on.as_deref().filter(|w| *w != asked.train_on) {
        notes.push(format!("--train-on {} (was {was})", asked.train_on));
    }
    Ok(notes)
}

/// The dotted keys whose values differ between two plans (`train.micro_batch 16 → 8`),
/// or the whole plan when one does not parse.
pub fn plan_changes(old: &str, new: &str) -> Vec<String> {
    let (Ok(a), Ok(b)) = (old.parse::<toml::Table>(), new.parse::<toml::Table>()) else {
        return vec!["model.* (a plan that does not parse)".into()];
    };
    let (mut fa, mut fb) = (Vec::new(), Vec::new());
    flatten("", &a, &mut fa);
    flatten("", &b, &mut fb);
    let get =
        |v: &[(String, String)], k: &str| v.iter().find(|(x, _)| x == k).map(|(_, v)| v.clone());
    let mut keys: Vec<&String> = fa.iter().chain(&fb).map(|(k, _)| k).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|k| {
            let (x, y) = (get(&fa, k), get(&fb, k));
            let show = |v: Option<String>| v.unwrap_or_else(|| "unset".into());
            (x != y).then(|| format!("{k} {} → {}", show(x), show(y)))
        })
        .collect()
}

fn flatten(prefix: &str, t: &toml::Table, out: &mut Vec<(String, String)>) {
    for (k, v) in t {
        let key = format!("{prefix}{k}");
        match v {
            toml::Value::Table(inner) => flatten(&format!("{key}."), inner, out),
            v => out.push((key, v.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_changes_name_each_key() {
        let old = "[model]\nhidden_size = 64\n[train]\nmicro_batch = 16\n";
        let new = "[model]\nhidden_size = 64\n[train]\nmicro_batch = 8\nsteps = 3\n";
        assert_eq!(
            plan_changes(old, new),
            vec!["train.micro_batch 16 → 8", "train.steps unset → 3"]
        );
    }

    #[test]
    fn a_live_lock_refuses_and_a_dead_one_is_taken_over() {
        let dir = std::env::temp_dir().join(format!("vramplan-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let lock = Lock::take(&dir).unwrap();
        let e = Lock::take(&dir).unwrap_err();
        assert!(e.to_string().contains("another trainer (pid"), "{e}");
        drop(lock);
        assert!(!dir.join(LOCK).exists());
        // No process has this id (above the kernel's pid_max).
        std::fs::write(dir.join(LOCK), "4294967\n").unwrap();
        let lock = Lock::take(&dir).unwrap();
        let held = std::fs::read_to_string(dir.join(LOCK)).unwrap();
        assert_eq!(held.trim(), std::process::id().to_string());
        drop(lock);
        std::fs::remove_dir_all(&dir).ok();
    }
}
