//! A run's folder is the run's: a used folder is refused (or moved aside), a resume
//! continues only its own run, a finished run's summary is kept, each step is logged
//! once, a second trainer is locked out, a flipped bit and a full disk are caught; and
//! the seeds' habits: `--set`, `--keep-best`, `vramplan eval` over several checkpoints,
//! a plan written for the torch engine.

#![cfg(feature = "engine")]

use crate::train::{checkpoints, losses, run, small_plan, summary, text, tmp};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn train(plan: &Path, out: &Path, extra: &[&str]) -> Output {
    let base = [
        "train",
        plan.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--eval-every",
        "0",
    ];
    run(&[&base[..], extra].concat())
}

/// stderr is one line, with `what` in it, and the exit code is `code`.
fn one_line(o: &Output, code: i32, what: &str) {
    assert_eq!(o.status.code(), Some(code), "{}", text(o));
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    assert!(e.contains(what), "{e}");
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn a_used_folder_is_refused_or_moved_aside() {
    let dir = tmp("used");
    let plan = small_plan(&dir);
    let out = dir.join("out");
    let o = train(&plan, &out, &["--steps", "4", "--save-every", "2"]);
    assert!(o.status.success(), "{}", text(&o));
    let first = losses(&out);
    let o = train(&plan, &out, &["--steps", "2", "--seed", "1"]);
    one_line(
        &o,
        2,
        "holds another run (ckpt-00000002, ckpt-00000004, summary.json)",
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));
    assert_eq!(losses(&out), first, "the refused run changed nothing");
    let o = train(&plan, &out, &["--steps", "2", "--seed", "1", "--force"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("moved the previous run"), "{}", text(&o));
    let aside = PathBuf::from(format!("{}.old-1", out.display()));
    assert_eq!(
        names(&aside),
        vec![
            "ckpt-00000002",
            "ckpt-00000004",
            "metrics.jsonl",
            "summary.json"
        ]
    );
    assert_eq!(losses(&aside), first, "the old run is kept whole");
    assert_eq!(losses(&out).len(), 2);
    assert_eq!(
        names(&out),
        vec!["ckpt-00000002", "metrics.jsonl", "summary.json"]
    );
    let o = run(&[
        "train",
        "--resume",
        "--force",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    std::fs::remove_dir_all(&aside).ok();
}

#[test]
fn resume_continues_only_its_own_run() {
    let dir = tmp("own");
    let plan = small_plan(&dir);
    let out = dir.join("out");
    let o = train(
        &plan,
        &out,
        &["--steps", "4", "--stop-at", "2", "--seed", "3"],
    );
    assert!(o.status.success(), "{}", text(&o));
    let other = dir.join("other.toml");
    let toml = std::fs::read_to_string(&plan).unwrap();
    std::fs::write(&other, toml.replace("hidden_size = 32", "hidden_size = 64")).unwrap();
    let o = train(&other, &out, &["--resume"]);
    one_line(&o, 2, "written by another run (model.hidden_size 32 → 64)");
    let o = train(&plan, &out, &["--resume", "--seed", "4"]);
    one_line(&o, 2, "written by the run with --seed 3");
    // The seed, learning rate and steps come from the checkpoint; a change is said.
    let o = train(&plan, &out, &["--resume", "--lr", "0.002", "--steps", "5"]);
    assert!(o.status.success(), "{}", text(&o));
    let t = String::from_utf8_lossy(&o.stderr);
    assert!(t.contains("--lr 0.002 (was 0.001)"), "{t}");
    assert!(t.contains("--steps 5 (was 4)"), "{t}");
    assert_eq!(losses(&out).len(), 5);
    // Without a plan, --resume continues with the checkpoint's.
    let o = run(&[
        "train",
        "--out",
        out.to_str().unwrap(),
        "--resume",
        "--steps",
        "6",
        "--eval-every",
        "0",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("(step 5)"), "{}", text(&o));
    assert_eq!(summary(&out)["steps"], 6);
}

#[test]
fn resuming_a_finished_run_keeps_its_summary() {
    let dir = tmp("finished");
    let plan = small_plan(&dir);
    let out = dir.join("out");
    let o = train(&plan, &out, &["--steps", "3"]);
    assert!(o.status.success(), "{}", text(&o));
    let before = std::fs::read(out.join("summary.json")).unwrap();
    let o = train(&plan, &out, &["--resume"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("already at step 3 of 3"), "{}", text(&o));
    assert_eq!(std::fs::read(out.join("summary.json")).unwrap(), before);
    assert!(summary(&out)["final_loss"].as_f64().unwrap().is_finite());
    assert_eq!(losses(&out).len(), 3);
}

/// A trainer that runs until killed, started once its folder is locked and it logs.
fn long_trainer(plan: &Path, out: &Path) -> std::process::Child {
    let child = Command::new(env!("CARGO_BIN_EXE_vramplan"))
        .args([
            "train",
            plan.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .args([
            "--steps",
            "1000000",
            "--save-every",
            "0",
            "--eval-every",
            "0",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let began = Instant::now();
    while std::fs::read_to_string(out.join("metrics.jsonl")).map_or(true, |m| m.lines().count() < 3)
    {
        assert!(
            began.elapsed() < Duration::from_secs(120),
            "the trainer never logged"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

#[test]
fn a_second_trainer_is_refused_and_a_killed_one_restarts_cleanly() {
    let dir = tmp("lock");
    let plan = small_plan(&dir);
    let out = dir.join("out");
    let mut first = long_trainer(&plan, &out);
    let pid = first.id();
    let o = train(&plan, &out, &["--steps", "2"]);
    one_line(
        &o,
        2,
        &format!("another trainer (pid {pid}) is using this folder"),
    );
    let o = train(&plan, &out, &["--steps", "2", "--resume"]);
    one_line(&o, 2, "another trainer");
    // Killed before its first checkpoint: the lock and a log of a few steps are left.
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(out.join(".lock").exists() && checkpoints(&out).is_empty());
    let o = train(&plan, &out, &["--steps", "4"]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains(&format!("taking over the lock of pid {pid}")),
        "{t}"
    );
    assert!(t.contains("stopped before its first checkpoint"), "{t}");
    let steps: Vec<u64> = losses(&out).iter().map(|l| l.0).collect();
    assert_eq!(steps, vec![1, 2, 3, 4], "each step once");
    assert!(!out.join(".lock").exists(), "the lock is released");
}

#[test]
fn a_flipped_bit_falls_back_to_the_previous_checkpoint() {
    let dir = tmp("flip");
    let plan = small_plan(&dir);
    let out = dir.join("out");
    let o = train(&plan, &out, &["--steps", "4", "--save-every", "2"]);
    assert!(o.status.success(), "{}", text(&o));
    let state = out.join("ckpt-00000004/state.safetensors");
    let mut bytes = std::fs::read(&state).unwrap();
    let n = bytes.len();
    bytes[n - 5] ^= 0x01;
    std::fs::write(&state, &bytes).unwrap();
    let o = train(&plan, &out, &["--resume", "--steps", "5"]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("skipping damaged checkpoint") && t.contains("checksum"),
        "{t}"
    );
    assert!(t.contains("ckpt-00000002 (step 2)"), "{t}");
}

/// The checkpoint at step 2 does not fit in a 128 KiB file system: the run stops with
/// exit 1, naming the file, and leaves no temporary behind.
#[test]
fn a_full_disk_names_the_file_and_leaves_no_temporary() {
    let dir = tmp("disk");
    let plan = small_plan(&dir);
    let out = dir.join("small-disk");
    std::fs::create_dir_all(&out).unwrap();
    let mounted = Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=128k",
            "tmpfs",
            out.to_str().unwrap(),
        ])
        .output();
    match mounted {
        Ok(m) if m.status.success() => {}
        Ok(m) => {
            println!(
                "skipped: cannot mount a small tmpfs here ({}); the injected full disk of the checkpoint tests still runs",
                String::from_utf8_lossy(&m.stderr).trim()
            );
            return;
        }
        Err(e) => {
            println!("skipped: no mount command ({e})");
            return;
        }
    }
    let o = train(&plan, &out, &["--steps", "4", "--save-every", "2"]);
    let listing = names(&out);
    Command::new("umount").arg(&out).status().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("ckpt-00000002/state.safetensors") && e.contains("No space left on device"),
        "{e}"
    );
    assert_eq!(e.matches("No space left").count(), 1, "said once: {e}");
    assert!(!listing.iter().any(|n| n.ends_with(".tmp")), "{listing:?}");
    assert!(
        !listing.iter().any(|n| n.starts_with("ckpt-")),
        "{listing:?}"
    );
}

#[test]
fn set_overrides_plan_values_also_on_resume() {
    let dir = tmp("set");
    let plan = small_plan(&dir);
    let out = dir.join("out");
    let o = train(
        &plan,
        &out,
        &[
            "--steps",
            "3",
            "--stop-at",
            "2",
            "--set",
            "train.micro_batch=2",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("2 × 32 tokens"), "{}", text(&o));
    let o = train(&plan, &out, &["--resume", "--set", "train.micro_batch=3"]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("the plan changed: train.micro_batch 2 → 3"),
        "{t}"
    );
    assert!(t.contains("3 × 32 tokens"), "{t}");
    for (set, what) in [
        ("train.micro_bat=4", "unknown field"),
        ("train.micro_batch=four", "invalid type"),
        ("batch", "expected KEY=VALUE"),
    ] {
        let o = train(&plan, &dir.join("bad"), &["--steps", "1", "--set", set]);
        one_line(&o, 2, &format!("--set {set}: "));
        assert!(text(&o).contains(what), "{}", text(&o));
    }
}

#[test]
fn keep_best_and_eval_over_several_checkpoints() {
    let dir = tmp("best");
    let plan = small_plan(&dir);
    let out = dir.join("out");
    let o = train(
        &plan,
        &out,
        &[
            "--steps",
            "8",
            "--save-every",
            "1",
            "--keep",
            "1",
            "--keep-best",
            "2",
            "--lr",
            "0.05",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    // Every checkpoint measured its validation loss; the newest and the two best remain.
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let mut vals: Vec<(f64, u64)> = metrics
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["val_loss"].as_f64().unwrap(), v["step"].as_u64().unwrap())
        })
        .collect();
    vals.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut want: Vec<u64> = vec![8, vals[0].1, vals[1].1];
    want.sort();
    want.dedup();
    let kept: Vec<u64> = checkpoints(&out)
        .iter()
        .map(|p| {
            p.file_name().unwrap().to_str().unwrap()[5..]
                .parse()
                .unwrap()
        })
        .collect::<std::collections::BTreeSet<u64>>()
        .into_iter()
        .collect();
    assert_eq!(kept, want, "{vals:?}");
    // `eval --checkpoints out/*`: what a shell passes, metrics and summary included.
    let mut args = vec!["eval".to_string(), "--json".into(), "--checkpoints".into()];
    args.extend(
        std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().path().display().to_string()),
    );
    let o = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let rows = v["checkpoints"].as_array().unwrap();
    assert_eq!(rows.len(), kept.len());
    for r in rows {
        let step = r["step"].as_u64().unwrap();
        let logged = vals.iter().find(|x| x.1 == step).unwrap().0;
        let got = r["val_loss"].as_f64().unwrap();
        assert!((got - logged).abs() < 1e-6 * logged, "{r} vs {logged}");
    }
    let best_step = vals[0].1;
    assert!(
        v["best"]
            .as_str()
            .unwrap()
            .ends_with(&format!("ckpt-{best_step:08}")),
        "{v}"
    );
    let o = run(&["eval", "--checkpoints", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let table = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        table.lines().filter(|l| l.contains("ckpt-")).count(),
        kept.len(),
        "{table}"
    );
    assert_eq!(
        table.lines().filter(|l| l.ends_with("  best")).count(),
        1,
        "{table}"
    );
    let o = run(&[
        "eval",
        "--checkpoints",
        out.join("metrics.jsonl").to_str().unwrap(),
    ]);
    one_line(&o, 2, "none of the 1 paths is a checkpoint");
}

/// A plan written for the torch engine (a small llama, no checkpointing, the fp32 logits
/// whole): the candle engine needs more than torch's prediction as written (11.1 MiB
/// against 13.8 MiB), so under 0.012 GiB (12.3 MiB) it is translated to the planner's
/// fitting candle configuration with the same global batch; under 0.005 GiB, less than
/// torch's own prediction, it is refused with the breakdown. One step is run, so nothing
/// is measured (the first step, which creates the optimizer state, is not counted) and
/// the summary says so rather than give an error of zero.
#[test]
fn a_torch_plan_is_translated_and_one_that_does_not_fit_is_refused() {
    let dir = tmp("torch");
    let plan = dir.join("torch.toml");
    std::fs::write(
        &plan,
        "[model]\nname = \"test\"\narch = \"llama\"\nhidden_size = 32\nnum_layers = 2\nnum_heads = 2\n\
         num_kv_heads = 1\nhead_dim = 16\nintermediate_size = 64\nvocab_size = 512\ntie_embeddings = true\n\
         [train]\nmicro_batch = 16\nseq_len = 64\nprecision = \"fp32\"\ncheckpointing = \"none\"\n\
         loss = \"float-cast\"\nengine = \"torch\"\n[hardware]\ngpu = \"cpu\"\n",
    )
    .unwrap();
    let out = dir.join("out");
    let o = train(&plan, &out, &["--memory-limit", "0.012", "--steps", "1"]);
    assert!(o.status.success(), "{}", text(&o));
    let note = String::from_utf8_lossy(&o.stderr);
    for part in [
        "written for the torch engine, which needs ",
        " as written, which does not fit; training on candle with ",
        "train.engine \"torch\" → \"candle\"",
    ] {
        assert!(note.contains(part), "{part:?} in {note}");
    }
    // And what else it changed to fit: checkpointing or the micro-batch.
    assert!(
        note.contains("train.checkpointing \"none\" → ")
            || note.contains("train.micro_batch 16 → "),
        "{note}"
    );
    // The global batch is kept: micro-batch × accumulation = 16.
    let t = text(&o);
    let line = t.lines().find(|l| l.contains(" tokens × ")).unwrap();
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "tokens").unwrap();
    let (micro, accum): (u64, u64) = (
        words[at - 3].parse().unwrap(),
        words[at + 2].parse().unwrap(),
    );
    assert_eq!(micro * accum, 16, "{line}");
    let s = summary(&out);
    assert!(s["predicted_peak_bytes"].as_u64().unwrap() < (0.012 * (1u64 << 30) as f64) as u64);
    assert!(s["peak_error"].is_null(), "{s}");
    assert!(t.contains("not measured (the first step"), "{t}");
    let o = train(
        &plan,
        &dir.join("out2"),
        &["--memory-limit", "0.005", "--steps", "1"],
    );
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(text(&o).contains("does not fit"), "{}", text(&o));
    assert!(
        !text(&o).contains("training on candle with"),
        "{}",
        text(&o)
    );
}

/// A careless user: the run is killed at pseudo-random moments (mid-step, mid-checkpoint,
/// mid-log) and restarted with the same command each time; the log then reads as one
/// straight run, bit for bit, and every checkpoint left reads back.
#[test]
fn kills_at_random_moments_resume_exactly() {
    let dir = tmp("kills");
    let plan = small_plan(&dir);
    let args = |out: &Path| -> Vec<String> {
        [
            "train",
            plan.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]
        .iter()
        .chain(&[
            "--steps",
            "30",
            "--save-every",
            "3",
            "--keep",
            "2",
            "--eval-every",
            "0",
        ])
        .map(|s| s.to_string())
        .collect()
    };
    let (a, b) = (dir.join("straight"), dir.join("killed"));
    let started = std::time::Instant::now();
    let o = run(&args(&a).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", text(&o));
    // Kill times are fractions of the straight run's own duration, so that the runs are
    // killed mid-way on a fast machine and on a loaded one alike.
    let full = started.elapsed();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut kills = 0;
    loop {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vramplan"));
        cmd.args(args(&b))
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if b.exists() && !checkpoints(&b).is_empty() {
            cmd.arg("--resume");
        }
        let mut child = cmd.spawn().unwrap();
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1);
        let wait = full.mul_f64(0.05 + ((state >> 33) % 1000) as f64 / 1000.0 * 0.45);
        std::thread::sleep(wait);
        if kills < 8 && child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            child.wait().unwrap();
            kills += 1;
            continue;
        }
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "after {kills} kills: {}", text(&o));
        break;
    }
    println!("{kills} kills");
    assert!(
        kills >= 3,
        "only {kills} kills: the runs ended before their kill times"
    );
    assert_eq!(losses(&b), losses(&a), "after {kills} kills");
    assert!(
        !names(&b)
            .iter()
            .any(|n| n.ends_with(".tmp") || n == ".lock"),
        "{:?}",
        names(&b)
    );
    let o = run(&["eval", "--checkpoints", b.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
}
