//! The real binary, end to end: the seed scenarios, the JSON contract, exit codes.

use std::process::{Command, Output};

/// The binary with its tables at the snapshots' width (`COLUMNS`, as a user's shell sets it).
pub fn vramplan(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vramplan"))
        .args(args)
        .env("COLUMNS", "100")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn json(args: &[&str]) -> serde_json::Value {
    let o = vramplan(args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("valid JSON")
}

#[test]
fn estimate_json_has_the_contract_fields() {
    let v = json(&["estimate", "--json"]);
    for key in [
        "peak_allocated_bytes",
        "peak_reserved_bytes",
        "device_bytes",
        "capacity_bytes",
        "fits",
        "peak_phase",
        "components",
    ] {
        assert!(v.get(key).is_some(), "missing {key}");
    }
    let sum: u64 = v["components"]
        .as_object()
        .unwrap()
        .values()
        .map(|x| x.as_u64().unwrap())
        .sum();
    assert_eq!(sum, v["device_bytes"].as_u64().unwrap());
}

#[test]
fn every_example_config_estimates() {
    for entry in
        std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/presets/examples")).unwrap()
    {
        let path = entry.unwrap().path();
        let v = json(&["estimate", "--json", path.to_str().unwrap()]);
        assert!(
            v["peak_allocated_bytes"].as_u64().unwrap() > 0,
            "{}",
            path.display()
        );
    }
}

/// Seed 000: 20 × 3072 fails on a 32 GB card, 10 × 1536 with checkpointing fits, and the
/// fp32 logits are 15.0 GiB vs 3.75 GiB.
#[test]
fn seed_000_compare_failed_and_stable() {
    let o = vramplan(&[
        "compare",
        "presets/examples/nanochat-d16-failed.toml",
        "presets/examples/nanochat-d16-stable.toml",
    ]);
    assert!(o.status.success());
    let out = stdout(&o);
    assert!(
        out.contains("A (presets/examples/nanochat-d16-failed.toml): does NOT fit"),
        "{out}"
    );
    assert!(
        out.contains("B (presets/examples/nanochat-d16-stable.toml): fits"),
        "{out}"
    );
    assert!(
        out.contains("20 × 3072 × 65,536 × 4 B = 15.00 GiB vs 10 × 1536 × 65,536 × 4 B = 3.75 GiB"),
        "{out}"
    );
    let v = json(&[
        "compare",
        "--json",
        "presets/examples/nanochat-d16-failed.toml",
        "presets/examples/nanochat-d16-stable.toml",
    ]);
    assert_eq!(v["a"]["fits"], false);
    assert_eq!(v["b"]["fits"], true);
}

/// Seed 002 reports a peak of 19.0 GiB per card for the stable run ("19.0 GiB / 32.6 GiB
/// (58 %)", a used-over-total reading). Planned as nanochat's own code on CUDA (bf16 `wte`,
/// no DDP buckets: `DistAdamW` and `DistMuon` split the optimizer state over the two
/// ranks), the device total is within 5 % of it; the allocated peak is 17 % under it, so
/// the figure is not `max_memory_allocated` of this plan (the seed's run is a fork, with
/// an activation checkpointing nanochat does not have; docs/accuracy.md).
#[test]
fn seed_002_stable_run_is_near_its_measured_peak() {
    let v = json(&[
        "estimate",
        "--json",
        "presets/examples/nanochat-d16-stable.toml",
    ]);
    let gib = |k: &str| v[k].as_u64().unwrap() as f64 / (1u64 << 30) as f64;
    let (device, allocated) = (gib("device_bytes"), gib("peak_allocated_bytes"));
    assert!((device / 19.0 - 1.0).abs() < 0.05, "device {device:.2} GiB");
    assert!(
        (0.80..1.0).contains(&(allocated / 19.0)),
        "allocated {allocated:.2} GiB"
    );
}

/// Seed 004: the fitted plan fits the 8 GB laptop card and beats batch 1 with checkpointing.
#[test]
fn seed_004_fit_beats_the_cautious_plan() {
    let dir = std::env::temp_dir().join(format!("vramplan-fit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let plan = dir.join("plan.toml");
    let v = json(&[
        "fit",
        "--gpu",
        "rtx4060-laptop-8gb",
        "--model",
        "smollm2-135m",
        "--seq-len",
        "1024",
        "--global-batch",
        "64",
        "--json",
        "--out",
        plan.to_str().unwrap(),
    ]);
    let best = &v["best"];
    assert_eq!(best["fits"], true);
    assert_eq!(
        best["micro_batch"].as_u64().unwrap() * best["grad_accum"].as_u64().unwrap(),
        64
    );
    assert!(v["speedup"].as_f64().unwrap() > 1.0);
    // The plan is a config `estimate` accepts, and it fits.
    let e = json(&["estimate", "--json", plan.to_str().unwrap()]);
    assert_eq!(e["fits"], true);
    let text = stdout(&vramplan(&[
        "fit",
        "--gpu",
        "rtx4060-laptop-8gb",
        "--model",
        "smollm2-135m",
        "--seq-len",
        "1024",
        "--global-batch",
        "64",
    ]));
    assert!(text.contains("× the estimated throughput"), "{text}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn check_exits_3_when_the_run_does_not_fit() {
    let o = vramplan(&[
        "estimate",
        "--check",
        "presets/examples/nanochat-d16-failed.toml",
    ]);
    assert_eq!(o.status.code(), Some(3));
    let o = vramplan(&[
        "estimate",
        "--check",
        "presets/examples/nanochat-d16-stable.toml",
    ]);
    assert_eq!(o.status.code(), Some(0));
}

#[test]
fn bad_input_is_one_line_naming_file_key_and_accepted_values_exit_2() {
    let dir = std::env::temp_dir().join(format!("vramplan-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        (
            "[model]\npreset = \"gpt2\"\n[train]\nprecision = \"fp8\"\n",
            "train.precision = \"fp8\": expected one of fp32 | bf16-autocast",
        ),
        (
            "[model]\npreset = \"gpt2\"\n[train]\nmicro_batch = 0\n",
            "train.micro_batch = 0: a whole number from 1 to",
        ),
        (
            "[model]\npreset = \"gpt2\"\n[hardware]\ngpu = \"rtx9090\"\n",
            "hardware.gpu = \"rtx9090\": no such preset; known:",
        ),
        (
            "[model]\npreset = \"gpt2\"\n[hardware]\ngpu = \"h100-80gb\"\ngpus = 2\nsharding = \"zero2\"\nreduce_bucket_size = 0\n",
            "hardware.reduce_bucket_size = 0: a whole number of elements from 1 to",
        ),
        ("[model\n", "line 1:"),
    ];
    for (i, (src, want)) in cases.iter().enumerate() {
        let f = dir.join(format!("bad{i}.toml"));
        std::fs::write(&f, src).unwrap();
        let o = vramplan(&["estimate", f.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains(&format!("bad{i}.toml: {want}")), "{err}");
    }
    let o = vramplan(&["estimate", "does-not-exist.toml"]);
    assert_eq!(o.status.code(), Some(2));
    let o = vramplan(&[
        "fit",
        "--gpu",
        "rtx4060-laptop-8gb",
        "--model",
        "smollm2-135m",
        "--margin",
        "120%",
    ]);
    assert_eq!(o.status.code(), Some(2));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn tables_snapshot() {
    // The host RAM is given: without it the check reads this machine's /proc/meminfo.
    let est = stdout(&vramplan(&[
        "estimate",
        "presets/examples/smollm2-135m-sft-4060.toml",
        "--host-ram",
        "16",
    ]));
    insta::assert_snapshot!("estimate_smollm2_4060", est);
    let cmp = stdout(&vramplan(&[
        "compare",
        "presets/examples/chatlm-sft-small.toml",
        "presets/examples/chatlm-sft-fast.toml",
    ]));
    insta::assert_snapshot!("compare_chatlm_sft", cmp);
    let fit = stdout(&vramplan(&[
        "fit",
        "--gpu",
        "rtx4060-laptop-8gb",
        "--model",
        "smollm2-135m",
        "--seq-len",
        "1024",
        "--global-batch",
        "64",
        "--top",
        "6",
    ]));
    insta::assert_snapshot!("fit_smollm2_4060", fit);
    insta::assert_snapshot!("models", stdout(&vramplan(&["models"])));
}

/// The plots are well-formed XML with their series in them.
#[test]
fn plots_are_valid_svg_with_their_series() {
    let dir = std::env::temp_dir().join(format!("vramplan-plot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (e, c, f) = (dir.join("e.svg"), dir.join("c.svg"), dir.join("f.svg"));
    for args in [
        vec![
            "estimate",
            "presets/examples/nanochat-d16-stable.toml",
            "--plot",
            e.to_str().unwrap(),
        ],
        vec![
            "compare",
            "presets/examples/nanochat-d16-failed.toml",
            "presets/examples/nanochat-d16-stable.toml",
            "--plot",
            c.to_str().unwrap(),
        ],
        vec![
            "fit",
            "--gpu",
            "rtx4060-laptop-8gb",
            "--model",
            "smollm2-135m",
            "--seq-len",
            "1024",
            "--global-batch",
            "64",
            "--plot",
            f.to_str().unwrap(),
        ],
    ] {
        assert!(vramplan(&args).status.success(), "{args:?}");
    }
    let series = |path: &std::path::Path| -> Vec<String> {
        let text = std::fs::read_to_string(path).unwrap();
        let doc = roxmltree::Document::parse(&text)
            .unwrap_or_else(|err| panic!("{}: {err}", path.display()));
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        assert!(doc
            .descendants()
            .any(|n| n.attribute("class") == Some("capacity")));
        doc.descendants()
            .filter_map(|n| n.attribute("data-series").map(str::to_string))
            .collect()
    };
    let es = series(&e);
    for s in [
        "runtime (CUDA context)",
        "weights",
        "gradients",
        "optimizer",
        "activations",
        "logits",
    ] {
        assert!(es.iter().any(|x| x == s), "{s} in {es:?}");
    }
    assert!(series(&c).len() >= 2 * 6);
    let fs = series(&f);
    assert!(
        fs.iter()
            .any(|x| x == "checkpointing full, loss float-cast"),
        "{fs:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// A Hugging Face config.json, from a run config and from `fit --model`, gives the same
/// model as the preset (Qwen2.5-0.5B: 494,032,768 parameters).
#[test]
fn hugging_face_config_json_is_read() {
    let v = json(&["estimate", "--json", "tests/data/hf/run.toml"]);
    assert_eq!(v["params"], 494_032_768u64);
    let f = json(&[
        "fit",
        "--gpu",
        "rtx4090-24gb",
        "--model",
        "tests/data/hf/qwen2.5-0.5b-config.json",
        "--seq-len",
        "1024",
        "--global-batch",
        "32",
        "--json",
    ]);
    assert_eq!(f["best"]["report"]["params"], 494_032_768u64);
    let o = vramplan(&[
        "fit",
        "--gpu",
        "rtx4090-24gb",
        "--model",
        "tests/data/hf/missing.json",
    ]);
    assert_eq!(o.status.code(), Some(2));
}

/// A candle plan below the calibrated rows (128 rows; calibrated from 256) says so in
/// `--json` and under the table; a torch plan has an empty `warnings` list.
#[test]
fn candle_outside_the_calibrated_domain_warns() {
    let path = std::env::temp_dir().join(format!("vramplan-warn-{}.toml", std::process::id()));
    std::fs::write(
        &path,
        "[model]\nname = \"t\"\narch = \"nanochat\"\nhidden_size = 64\nnum_layers = 2\n\
         num_heads = 2\nnum_kv_heads = 2\nhead_dim = 32\nintermediate_size = 256\nvocab_size = 256\n\
         [train]\nmicro_batch = 2\nseq_len = 64\nprecision = \"fp32\"\ncheckpointing = \"full\"\n\
         loss = \"chunked\"\nloss_chunk = 256\nengine = \"candle\"\n[hardware]\ngpu = \"cpu\"\n\
         cpu_kernels = \"avx2\"\n",
    )
    .unwrap();
    let p = path.to_str().unwrap();
    let want = "rows (micro_batch × seq_len) from 256 to 4096; this run has 128";
    let v = json(&["estimate", "--json", p]);
    let w = v["warnings"].as_array().expect("warnings list");
    assert!(
        w.iter().any(|w| w.as_str().unwrap().contains(want)),
        "{w:?}"
    );
    let table = stdout(&vramplan(&["estimate", p]));
    assert!(
        table.contains(
            "warning: candle working sets (f32 compute, avx2 kernels, nanochat) are calibrated"
        ),
        "{table}"
    );
    std::fs::remove_file(&path).unwrap();
    assert_eq!(
        json(&["estimate", "--json"])["warnings"],
        serde_json::json!([])
    );
}

/// The candle engine's CPU kernels are a plan value: at width 64 gemm's AVX2 kernels pack
/// the head-gradient product's block of the logits' gradient (128 rows × 4,096 entries ×
/// 4 B) and its AVX-512 ones do not, so the AVX2 plan's peak (the whole loss at 1,024
/// rows) is that much higher; the first line names the kernels the prediction is for.
#[test]
fn the_cpu_kernels_pick_the_candle_fits() {
    let dir = std::env::temp_dir().join(format!("vramplan-kernels-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let plan = |kernels: &str| {
        let path = dir.join(format!("{kernels}.toml"));
        std::fs::write(
            &path,
            format!(
                "[model]\nname = \"t\"\narch = \"llama\"\nhidden_size = 64\nnum_layers = 1\n\
                 num_heads = 2\nnum_kv_heads = 2\nhead_dim = 32\nintermediate_size = 128\n\
                 vocab_size = 4096\n[train]\nmicro_batch = 16\nseq_len = 64\nprecision = \"fp32\"\n\
                 checkpointing = \"full\"\nloss = \"float-cast\"\nengine = \"candle\"\n\
                 [hardware]\ngpu = \"cpu\"\ncpu_kernels = \"{kernels}\"\n"
            ),
        )
        .unwrap();
        path.to_str().unwrap().to_string()
    };
    let (avx2, avx512) = (plan("avx2"), plan("avx512"));
    let peak = |p: &str| {
        json(&["estimate", "--json", p])["peak_allocated_bytes"]
            .as_f64()
            .unwrap()
    };
    let (a, b) = (peak(&avx2), peak(&avx512));
    let block = (128 * 4096 * 4) as f64;
    assert!(
        a - b > 0.8 * block && a - b < 1.5 * block,
        "avx2 {a}, avx512 {b}"
    );
    for (p, name) in [(&avx2, "avx2"), (&avx512, "avx512")] {
        let first = stdout(&vramplan(&["estimate", p]))
            .lines()
            .next()
            .unwrap()
            .to_string();
        assert_eq!(first, format!("t on cpu ({name} kernels), candle engine"));
    }
    // `--gpu` in place of the file's "cpu" drops its CPU kernels.
    let o = vramplan(&["estimate", &avx2, "--gpu", "h100-80gb"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Regression: `estimate --json | head -c 100` panicked on the closed pipe (exit 101).
#[test]
fn a_closed_stdout_is_a_quiet_exit() {
    use std::process::Stdio;
    let fit = [
        "fit",
        "--gpu",
        "rtx4060-laptop-8gb",
        "--model",
        "smollm2-135m",
        "--json",
    ];
    for args in [
        &["estimate", "--json"][..],
        &["estimate"],
        &fit,
        &["models"],
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_vramplan"))
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("binary runs");
        drop(child.stdout.take());
        let o = child.wait_with_output().expect("wait");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

/// Regression: `--global-batch 0` exited 1; every count flag of `fit` at 0 or past its
/// bound is bad input, one line naming the flag.
#[test]
fn fit_count_flags_are_bad_input() {
    for (flag, v) in [
        ("--global-batch", "0"),
        ("--global-batch", "18446744073709551615"),
        ("--global-batch-tokens", "0"),
        ("--global-batch-tokens", "18446744073709551615"),
        ("--seq-len", "0"),
        ("--seq-len", "18446744073709551615"),
        ("--gpus", "0"),
        ("--gpus", "100000"),
    ] {
        let o = vramplan(&[
            "fit",
            "--gpu",
            "rtx4060-laptop-8gb",
            "--model",
            "smollm2-135m",
            flag,
            v,
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{flag} {v}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{flag} {v}: {err}");
        assert!(err.contains(flag) && err.contains("from 1 to"), "{err}");
    }
}

/// Seed 001 (three training processes on a 12 GB machine, 10 million samples, 3 epochs):
/// host RAM per process and per machine beside the GPU memory, and steps and time per
/// epoch ("约52,083步").
#[test]
fn seed_001_gives_host_ram_and_time_per_epoch() {
    let base = [
        "estimate",
        "presets/examples/chatlm-pretrain-3x3080.toml",
        "--reader",
        "row-group",
        "--samples",
        "10000000",
        "--epochs",
        "3",
    ];
    let o = vramplan(&base);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = stdout(&o);
    for want in [
        "per process, ",
        "per machine for 3 process(es)",
        "of 12.0 GiB (hardware.host_ram_gib)",
        "Parquet reader",
        "52,083 steps per epoch (10,000,000 samples, 36,864 tokens per step)",
        "for 3 epoch(s)",
        "an estimate at 30–50 % model FLOPs utilization",
        "not a measurement",
    ] {
        assert!(text.contains(want), "missing {want:?}:\n{text}");
    }
    let v = json(&[&base[..], &["--json"]].concat());
    let host = &v["host"];
    assert_eq!(host["processes"], 3);
    assert_eq!(host["capacity_bytes"], 12u64 << 30);
    let (process, machine) = (
        host["per_process_bytes"].as_u64().unwrap(),
        host["per_machine_bytes"].as_u64().unwrap(),
    );
    // Three processes, the shared pages once: more than one process, less than three.
    assert!(process < machine && machine < 3 * process, "{host}");
    assert_eq!(host["fits"], machine <= 12u64 << 30);
    let t = &v["time"];
    assert_eq!(t["steps_per_epoch"], 52_083);
    assert_eq!(t["total_steps"], 3 * 52_083);
    let secs = |k: &str| t[k].as_f64().unwrap();
    assert!(secs("epoch_seconds_fast") < secs("epoch_seconds"));
    assert!(secs("epoch_seconds") < secs("epoch_seconds_slow"));
    // The contract fields are still there beside the new ones.
    assert!(v["device_bytes"].as_u64().unwrap() > 0);
}

/// `--host-ram` replaces the config's figure; a machine too small says so.
#[test]
fn host_ram_flag_overrides_and_a_small_machine_does_not_fit() {
    let o = vramplan(&[
        "estimate",
        "presets/examples/chatlm-pretrain-3x3080.toml",
        "--host-ram",
        "2",
    ]);
    assert!(o.status.success());
    let text = stdout(&o);
    assert!(
        text.contains("of 2.0 GiB (--host-ram): does NOT fit"),
        "{text}"
    );
}

/// Bad host and time flags, and a bad host_ram_gib: one line naming it, exit 2.
#[test]
fn bad_host_and_time_input_is_one_line_and_exit_2() {
    let dir = std::env::temp_dir().join(format!("vramplan-host-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad_config = dir.join("bad.toml");
    std::fs::write(
        &bad_config,
        "[model]\npreset = \"smollm2-135m\"\n[hardware]\ngpu = \"rtx4090-24gb\"\nhost_ram_gib = -4\n",
    )
    .unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["estimate", "--host-ram", "0"], "--host-ram"),
        (
            vec!["estimate", "--samples", "10", "--utilization", "1.5"],
            "--utilization",
        ),
        (
            vec!["estimate", "--samples", "10", "--epochs", "0"],
            "--epochs",
        ),
        (vec!["estimate", "--reader", "csv"], "--reader"),
        (vec!["estimate", "--weights", "lazy"], "--weights"),
        (vec!["estimate", "--row-group-mib", "0"], "--row-group-mib"),
        (
            vec!["estimate", bad_config.to_str().unwrap()],
            "hardware.host_ram_gib",
        ),
    ];
    for (args, names) in cases {
        let o = vramplan(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(names), "{args:?}: {err}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// The 8 B case of the issue: full fine-tuning of Llama-3.1-8B fits no RTX 4090 at
/// 2048 × 32, so `fit` names the plans that do, each with what it gives up, and exits 3
/// (as `estimate --check` does), in the table and in `--json`.
#[test]
fn fit_that_fits_nothing_names_the_nearest_plans_and_exits_3() {
    let args = [
        "fit",
        "--gpu",
        "rtx4090-24gb",
        "--model",
        "llama-3.1-8b",
        "--seq-len",
        "2048",
        "--global-batch",
        "32",
    ];
    let o = vramplan(&args);
    let text = stdout(&o);
    assert_eq!(
        o.status.code(),
        Some(3),
        "{text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        text.contains("does not fit: seq 2048: the smallest candidate"),
        "{text}"
    );
    // The table wraps long flags; the short ones are whole.
    for lever in ["--precision bf16", "--lora 16", "--qlora 16"] {
        assert!(text.contains(lever), "{lever}: {text}");
    }
    assert!(
        text.contains("nothing fits as asked (exit 3); nearest plan: --lora 16 "),
        "{text}"
    );
    let o = vramplan(&[&args[..], &["--json"]].concat());
    assert_eq!(o.status.code(), Some(3));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("valid JSON");
    assert_eq!(v["fits"], false);
    let alts = v["alternatives"].as_array().unwrap();
    let flags: Vec<&str> = alts.iter().map(|a| a["flags"].as_str().unwrap()).collect();
    assert_eq!(
        flags,
        [
            "--optimizer adamw-8bit",
            "--precision bf16",
            "--optimizer adamw-8bit --precision bf16",
            "--lora 16",
            "--qlora 16",
            "--gpus 32 --sharding zero3",
            "--sharding zero2 --offload-optimizer",
            "--offload-activations",
        ]
    );
    // No halving of 2048 fits full fine-tuning of 8 B parameters: `shorter` is null.
    assert!(v["shorter"].is_null(), "{}", v["shorter"]);
    let fitting: Vec<&serde_json::Value> = alts.iter().filter(|a| a["fits"] == true).collect();
    assert!(fitting.len() >= 2, "{alts:?}");
    for a in fitting {
        let b = &a["best"];
        assert_eq!(b["report"]["fits"], true);
        assert_eq!(
            b["micro_batch"].as_u64().unwrap()
                * b["grad_accum"].as_u64().unwrap()
                * b["report"]["gpus"].as_u64().unwrap(),
            32
        );
        assert_eq!(b["seq_len"], 2048);
    }
    // --out writes the nearest plan (still exit 3), a run config that fits.
    let plan = std::env::temp_dir().join(format!("vramplan-near-{}.toml", std::process::id()));
    let o = vramplan(&[&args[..], &["--out", plan.to_str().unwrap()]].concat());
    assert_eq!(o.status.code(), Some(3));
    let text = std::fs::read_to_string(&plan).unwrap();
    assert!(
        text.contains("this is the nearest plan: --lora 16."),
        "{text}"
    );
    let e = json(&["estimate", "--json", "--check", plan.to_str().unwrap()]);
    assert_eq!(e["fits"], true);
    std::fs::remove_file(&plan).unwrap();
}

/// With 8 GPUs, the ladder shards them, and `--emit accelerate` writes the nearest
/// sharded plan: accelerate's config with its DeepSpeed section and the launch command;
/// still exit 3, since the run as asked (DDP) does not fit. The command as given
/// (bf16 autocast, which accelerate runs as bf16-mixed once sharded) and in fp32.
#[test]
fn fit_emit_on_8_gpus_writes_the_sharded_plan() {
    let base = [
        "fit",
        "--gpu",
        "rtx4090-24gb",
        "--model",
        "llama-3.1-8b",
        "--seq-len",
        "2048",
        "--global-batch",
        "32",
        "--gpus",
        "8",
        "--emit",
        "accelerate",
    ];
    // Asked in fp32, the nearest plan that fits takes bf16 too (with DeepSpeed's bucket and
    // ZeRO-3's gathered root counted, 8-bit AdamW in fp32 over 8 cards of 24 GB does not).
    for (extra, mixed) in [(&[][..], "bf16"), (&["--precision", "fp32"][..], "bf16")] {
        let o = vramplan(&[&base[..], extra].concat());
        let (out, err) = (stdout(&o), String::from_utf8_lossy(&o.stderr));
        assert_eq!(o.status.code(), Some(3), "{extra:?}: {out}{err}");
        assert!(
            err.contains("the nearest plan accelerate runs: --sharding zero"),
            "{extra:?}: {err}"
        );
        assert!(out.contains("# accelerate launch --config_file"), "{out}");
        let cfg: serde_json::Value = serde_norway::from_str(&out).expect("YAML");
        assert_eq!(cfg["distributed_type"], "DEEPSPEED");
        assert_eq!(cfg["num_processes"], 8);
        assert_eq!(cfg["mixed_precision"], mixed, "{out}");
        assert!(cfg["deepspeed_config"]["zero_stage"].as_u64().unwrap() >= 1);
    }
}

/// Seed 004's fallback ladder (1024, then 768, then 512): `--seq-len 16384,8192,4096,2048`
/// takes the first length that fits (Qwen2.5-0.5B on a 12 GB card: 4096, as planned
/// today) and says why each longer one did not.
#[test]
fn fit_seq_len_list_takes_the_first_that_fits() {
    let args = [
        "fit",
        "--gpu",
        "rtx3060-12gb",
        "--model",
        "qwen2.5-0.5b",
        "--seq-len",
        "16384,8192,4096,2048",
        "--global-batch",
        "16",
    ];
    let o = vramplan(&args);
    let text = stdout(&o);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        text.contains("does not fit: seq 16384: the smallest candidate"),
        "{text}"
    );
    let v = json(&[&args[..], &["--json"]].concat());
    let longer: Vec<u64> = v["longer"]
        .as_array()
        .expect("the longer lengths")
        .iter()
        .map(|m| m["seq_len"].as_u64().unwrap())
        .collect();
    let chosen = v["best"]["seq_len"].as_u64().unwrap();
    let lengths = [16384, 8192, 4096, 2048];
    let k = lengths
        .iter()
        .position(|s| *s == chosen)
        .expect("one of the list");
    assert_eq!(longer, lengths[..k]);
    assert!(k > 0);
    // A length that is not a number is one line, exit 2.
    let o = vramplan(&[
        "fit",
        "--gpu",
        "rtx4060-laptop-8gb",
        "--model",
        "smollm2-135m",
        "--seq-len",
        "1024,x",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr)
            .trim_end()
            .lines()
            .count(),
        1
    );
}

/// Issue 11's 8 GB case (the sequence length is the eighth argument).
const QLORA_8GB: [&str; 10] = [
    "fit",
    "--gpu",
    "rtx4060-laptop-8gb",
    "--model",
    "qwen3-8b",
    "--qlora",
    "--seq-len",
    "1024",
    "--global-batch",
    "16",
];

/// Issue 11's 8 GB case: QLoRA of Qwen3-8B at seq 1024 × 16 fits the laptop card at the
/// default margin once the loss is chunked by 256 rows (the run's 1,024-row chunk is the
/// whole micro-batch: 8.5 GiB); the plan it writes is that chunk.
#[test]
fn qlora_of_qwen3_8b_fits_the_8_gb_laptop_card_at_1024() {
    let args = QLORA_8GB;
    let o = vramplan(&args);
    let text = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{text}");
    assert!(
        text.contains("choice: micro-batch 1 × accumulation 16 at seq 1024, checkpointing full, loss chunked by 256 rows: fits"),
        "{text}"
    );
    let v = json(&[&args[..], &["--json"]].concat());
    let best = &v["best"];
    assert_eq!(best["loss_chunk"], 256, "{best}");
    let (device, capacity) = (
        best["report"]["device_bytes"].as_u64().unwrap(),
        best["report"]["capacity_bytes"].as_u64().unwrap(),
    );
    assert!(
        device as f64 <= 0.95 * capacity as f64,
        "{device} {capacity}"
    );
    let dir = std::env::temp_dir().join(format!("vramplan-qlora8-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let plan = dir.join("plan.toml");
    let o = vramplan(&[&args[..], &["--out", plan.to_str().unwrap()]].concat());
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    let written = std::fs::read_to_string(&plan).unwrap();
    assert!(written.contains("loss_chunk = 256"), "{written}");
    let e = json(&["estimate", plan.to_str().unwrap(), "--json"]);
    assert_eq!(e["device_bytes"], best["report"]["device_bytes"], "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

/// The same case at a 10 % margin fits nothing at seq 1024; the ladder names the longest
/// halving of 1024 that fits as asked, and `fit` at that length finds a plan (exit 0)
/// whose device figure is the one named.
#[test]
fn fit_names_the_longest_shorter_length_that_fits() {
    let args = [&QLORA_8GB[..], &["--margin", "10%"]].concat();
    let o = vramplan(&args);
    let text = stdout(&o);
    assert_eq!(o.status.code(), Some(3), "{text}");
    assert!(text.contains("shorter: seq "), "{text}");
    let o = vramplan(&[&args[..], &["--json"]].concat());
    assert_eq!(o.status.code(), Some(3));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("valid JSON");
    let s = &v["shorter"];
    let seq = s["seq_len"].as_u64().expect("a shorter length fits");
    assert!(seq < 1024 && 1024 % seq == 0 && seq >= 128, "{s}");
    let shorter = seq.to_string();
    let mut again = args.to_vec();
    again[7] = &shorter;
    let r = json(&[&again[..], &["--json"]].concat());
    assert_eq!(
        r["best"]["report"]["device_bytes"], s["device_bytes"],
        "{s}"
    );
    assert_eq!(
        r["best"]["report"]["peak_allocated_bytes"],
        s["peak_allocated_bytes"]
    );
}

/// Piped without `COLUMNS`, tables fit 80 columns (and `COLUMNS` widens them).
#[test]
fn piped_tables_fit_80_columns() {
    let widest = |columns: Option<&str>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_vramplan"));
        c.args(["fit", "--gpu", "rtx4090-24gb", "--model", "llama-3.1-8b"])
            .args(["--seq-len", "2048", "--global-batch", "32"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env_remove("COLUMNS");
        if let Some(w) = columns {
            c.env("COLUMNS", w);
        }
        let o = c.output().expect("binary runs");
        let text = stdout(&o);
        let table_lines = text.lines().filter(|l| l.starts_with(['│', '┌', '└', '╞']));
        table_lines
            .map(|l| l.chars().count())
            .max()
            .expect("a table")
    };
    assert!(widest(None) <= 80, "{}", widest(None));
    assert!(widest(Some("120")) > 80);
}

/// `fit --keep`: the ladder leaves the kept kinds alone; an unknown kind is one line and
/// exit 2, naming what is accepted.
#[test]
fn fit_keep_forbids_kinds_of_change() {
    let base = [
        "fit",
        "--gpu",
        "rtx4090-24gb",
        "--model",
        "llama-3.1-8b",
        "--seq-len",
        "2048",
        "--global-batch",
        "32",
        "--json",
    ];
    let o = vramplan(&[&base[..], &["--keep", "lora,gpus"]].concat());
    assert_eq!(o.status.code(), Some(3));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    let flags = v["alternatives"].to_string();
    assert!(
        !flags.contains("--lora") && !flags.contains("--gpus"),
        "{flags}"
    );
    assert!(flags.contains("--optimizer adamw-8bit"), "{flags}");
    let o = vramplan(&[&base[..], &["--keep", "lora,batch"]].concat());
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("\"batch\"") && err.contains("checkpointing | loss"),
        "{err}"
    );
}

/// nanochat's `base_train` (fe5aed9: compiled, bf16 autocast, vocab 65,536) on H100 80 GB
/// cards against the public figures (`docs/accuracy.md`, "nanochat on an H100"), with
/// 524,288 tokens per step as the script computes its accumulation.
fn nanochat_h100(depth: u64, batch: u64, gpus: u64, vocab: Option<u64>) -> serde_json::Value {
    let dir = std::env::temp_dir().join(format!("vramplan-nanochat-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("d{depth}-b{batch}-x{gpus}.toml"));
    let vocab = vocab
        .map(|v| format!("vocab_size = {v}\n"))
        .unwrap_or_default();
    let accum = (524_288 / (batch * 2048 * gpus)).max(1);
    let toml = format!(
        "[model]\npreset = \"nanochat-d{depth}\"\n{vocab}[train]\nmicro_batch = {batch}\n\
         seq_len = 2048\ngrad_accum = {accum}\nprecision = \"bf16-autocast\"\noptimizer = \"muon\"\n\
         compile = true\n[hardware]\ngpu = \"h100-80gb\"\ngpus = {gpus}\n"
    );
    std::fs::write(&path, toml).unwrap();
    let v = json(&["estimate", "--json", path.to_str().unwrap()]);
    std::fs::remove_file(&path).ok();
    v
}

fn share_of_card(v: &serde_json::Value) -> f64 {
    v["device_bytes"].as_f64().unwrap() / v["capacity_bytes"].as_f64().unwrap()
}

/// The speedrun's `base_train` (d20, device batch 32 × 2048, 8 × H100) runs close to full:
/// read from nanochat's own command line, it is planned compiled and fits, between 60 %
/// and 100 % of the card.
#[test]
fn nanochat_d20_speedrun_fits_an_h100_close_to_full() {
    let v = json(&[
        "estimate",
        "--json",
        "tests/data/launch/nanochat/speedrun_base_train_d20.sh",
        "--gpu",
        "h100-80gb",
    ]);
    let share = share_of_card(&v);
    assert!(v["fits"].as_bool().unwrap(), "{v}");
    assert!(
        (0.60..=1.0).contains(&share),
        "{:.1} % of the card",
        share * 100.0
    );
    // The same run from a TOML, on the speedrun's 8 GPUs.
    let t = nanochat_h100(20, 32, 8, None);
    assert_eq!(t["device_bytes"], v["device_bytes"]);
}

/// The same `base_train` on one H100 (`--nproc_per_node=1`: accumulation 8, so the fp32
/// gradients of earlier micro-batches and the whole optimizer state are live at the loss's
/// backward). README's "runs on a single GPU" is not a measurement; planned, it sits at the
/// card's edge: within 5 % of the capacity either way (102 % today, docs/accuracy.md).
#[test]
fn nanochat_d20_on_one_h100_is_at_the_edge_of_the_card() {
    let v = nanochat_h100(20, 32, 1, None);
    assert_eq!(v["grad_accum"], 8);
    let share = share_of_card(&v);
    assert!(
        (0.95..=1.05).contains(&share),
        "{:.1} % of the card",
        share * 100.0
    );
}

/// d32 on 8 × H100 (run1000.sh): device batch 8 runs (about 78 of 80 GB in nvidia-smi),
/// 16 runs out of memory. Predicted: batch 8 fits with room the public figure does not
/// show (the caching allocator's cache is not modelled, docs/accuracy.md), batch 16 does not.
#[test]
fn nanochat_d32_fits_at_batch_8_and_not_at_16() {
    let b8 = nanochat_h100(32, 8, 8, None);
    let b16 = nanochat_h100(32, 16, 8, None);
    assert!(b8["fits"].as_bool().unwrap(), "{b8}");
    assert!(!b16["fits"].as_bool().unwrap(), "{b16}");
    let share = share_of_card(&b8);
    assert!(
        (0.65..=0.85).contains(&share),
        "{:.1} % of the card",
        share * 100.0
    );
}

/// d12 with the 2026 vocabulary (32,768) at device batch 32 × 2048 on one H100: 34 GB
/// (nvidia-smi). Predicted within 10 % of it, below it.
#[test]
fn nanochat_d12_at_batch_32_is_near_34_gb() {
    let v = nanochat_h100(12, 32, 1, Some(32_768));
    let gb = v["device_bytes"].as_f64().unwrap() / 1e9;
    assert!((gb / 34.0 - 1.0).abs() < 0.10, "{gb:.1} GB");
}
