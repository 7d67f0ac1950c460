//! The binary fuzzed as a hostile user would: OOM logs written from the real message
//! grammar with hostile numbers (negative, huge, zero, garbage units, very long lines),
//! and `fit`/`estimate` with hostile numeric values. Each run must finish in under 5 s,
//! exit 0, 2 or 3, never panic, and say what was wrong in one line of at most 200 characters.

use proptest::prelude::*;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(5);

fn check(args: &[&str], stdin: &[u8]) {
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_vramplan"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("binary runs");
    let mut input = child.stdin.take().expect("stdin");
    // A refusal may come before the input is read: a closed pipe here is fine.
    let _ = input.write_all(stdin);
    drop(input);
    let o = child.wait_with_output().expect("wait");
    let took = start.elapsed();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(took < LIMIT, "{args:?} took {took:?}");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    let code = o.status.code();
    assert!(matches!(code, Some(0 | 2 | 3)), "{args:?}: {code:?} {err}");
    if code == Some(2) {
        let lines: Vec<&str> = err.trim_end().lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: {err}");
        assert!(lines[0].chars().count() <= 200, "{args:?}: {err}");
    }
}

fn hostile_number() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("0".to_string()),
        Just("-1".to_string()),
        Just("-15.00".to_string()),
        Just("18446744073709551615".to_string()),
        Just("99999999999999999999999999".to_string()),
        Just("1e308".to_string()),
        Just("nan".to_string()),
        (0u64..100_000).prop_map(|c| format!("{}.{:02}", c / 100, c % 100)),
        "[0-9]{1,40}(\\.[0-9]{0,30})?",
    ]
}

fn unit() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("GiB".to_string()),
        Just("MiB".to_string()),
        Just("GB".to_string()),
        Just("bytes".to_string()),
        "[A-Za-z]{0,6}",
    ]
}

fn amount() -> impl Strategy<Value = String> {
    (hostile_number(), unit()).prop_map(|(n, u)| format!("{n} {u}"))
}

/// One report after PyTorch 1.x's or 2.x's message, or cudarc's, with hostile amounts.
fn report() -> impl Strategy<Value = String> {
    let v1 = (amount(), amount(), amount(), amount(), amount()).prop_map(|(q, c, a, f, r)| {
        format!("RuntimeError: CUDA out of memory. Tried to allocate {q} (GPU 0; {c} total capacity; {a} already allocated; {f} free; {r} reserved in total by PyTorch)")
    });
    let v2 = (amount(), amount(), amount(), amount(), amount(), amount()).prop_map(
        |(q, c, f, p, a, u)| {
            format!("[rank0]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate {q}. GPU 0 has a total capacity of {c} of which {f} is free. Process 7 has {p} memory in use. Of the allocated memory {a} is allocated by PyTorch, and {u} is reserved by PyTorch but unallocated.")
        },
    );
    let long = (1usize..4000).prop_map(|n| {
        format!(
            "RuntimeError: CUDA out of memory. Tried to allocate {} GiB",
            "9".repeat(n)
        )
    });
    prop_oneof![
        v1,
        v2,
        long,
        Just("Error: DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".to_string()),
    ]
}

fn log() -> impl Strategy<Value = String> {
    prop::collection::vec(report(), 1..6).prop_map(|rs| {
        rs.iter()
            .map(|r| format!("  File \"gpt.py\", line 1, in f\n    logits = logits.float()\n{r}\n"))
            .collect()
    })
}

/// Values every count flag must refuse (0, past the planner's bounds) or read as text.
fn hostile_count() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("0".to_string()),
        Just("18446744073709551615".to_string()),
        (1u64 << 40..u64::MAX).prop_map(|n| n.to_string()),
        Just("-1".to_string()),
        Just("abc".to_string()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn diagnose_survives_hostile_logs(log in log(), config in any::<bool>()) {
        let mut args = vec!["diagnose", "-", "--json"];
        if config {
            args.extend(["--config", "presets/examples/nanochat-d16-failed.toml"]);
        }
        check(&args, log.as_bytes());
    }

    #[test]
    fn fit_refuses_hostile_counts(
        flag in prop::sample::select(vec!["--global-batch", "--global-batch-tokens", "--seq-len", "--gpus"]),
        v in hostile_count(),
    ) {
        let arg = format!("{flag}={v}");
        check(&["fit", "--gpu", "rtx4060-laptop-8gb", "--model", "smollm2-135m", &arg], b"");
    }

    #[test]
    fn estimate_survives_hostile_configs(
        key in prop::sample::select(vec!["micro_batch", "seq_len", "grad_accum"]),
        v in prop_oneof![Just("0".to_string()), Just("-1".to_string()), Just("18446744073709551615".to_string()),
                         Just("1e30".to_string()), (1u64..1 << 30).prop_map(|n| n.to_string())],
    ) {
        let dir = std::env::temp_dir().join(format!("vramplan-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join(format!("{key}-{}.toml", v.len()));
        let text = format!("[model]\npreset = \"smollm2-135m\"\n[train]\n{key} = {v}\n[hardware]\ngpu = \"rtx4060-laptop-8gb\"\n");
        std::fs::write(&path, text).expect("write config");
        let p = path.display().to_string();
        check(&["estimate", &p, "--json", "--check"], b"");
    }
}
