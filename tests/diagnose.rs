//! `vramplan diagnose` over the out-of-memory logs in tests/data/oom (written after the
//! message formats of PyTorch 1.x/2.x's CUDACachingAllocator and cudarc's DriverError).

use serde_json::Value;
use std::io::Write;
use std::process::{Command, Stdio};

const GIB: f64 = 1073741824.0;
const MIB: f64 = 1048576.0;

fn run(args: &[&str], stdin: &[u8]) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vramplan"))
        .arg("diagnose")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run vramplan");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin)
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn reports(log: &str, extra: &[&str]) -> Vec<Value> {
    let path = format!("tests/data/oom/{log}");
    let mut args = vec![path.as_str(), "--json"];
    args.extend_from_slice(extra);
    let (code, out, err) = run(&args, b"");
    assert_eq!(code, 0, "{log}: {err}");
    let v: Value = serde_json::from_str(&out).expect("json");
    v["reports"].as_array().expect("reports").clone()
}

fn one(log: &str) -> Value {
    let r = reports(log, &[]);
    assert_eq!(r.len(), 1, "{log}");
    r[0].clone()
}

/// Bytes as printed: two decimals of the unit, so compare within half a hundredth.
fn near(v: &Value, expected: f64, unit: f64) {
    let got = v.as_f64().expect("a number");
    assert!(
        (got - expected * unit).abs() <= 0.005 * unit,
        "{got} vs {expected}"
    );
}

fn top_fix(r: &Value) -> String {
    r["fixes"][0]["change"].as_str().expect("a fix").to_string()
}

#[test]
fn seed_scenario_names_the_fp32_logits_and_a_fitting_fix() {
    let r = reports(
        "seed_nanochat_d16.log",
        &["--config", "presets/examples/nanochat-d16-failed.toml"],
    );
    assert_eq!(r.len(), 1);
    let r = &r[0];
    assert_eq!(r["cause"], "huge-tensor");
    near(&r["request_bytes"], 15.0, GIB);
    near(&r["capacity_bytes"], 31.36, GIB);
    assert_eq!(r["rank"], 0);
    assert!(r["code_line"]
        .as_str()
        .unwrap()
        .starts_with("logits = logits.float()"));
    let t = r["tensor"].as_str().expect("a matched tensor");
    assert!(t.contains("float") || t.contains("fp32"), "{t}");
    assert_eq!(r["fixes"][0]["fits"], true);
    assert!(top_fix(r).contains("loss = \"chunked\""));
}

#[test]
fn seed_scenario_text_and_out() {
    let dir = std::env::temp_dir().join(format!("vramplan-diagnose-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("fixed.toml");
    let out_s = out.display().to_string();
    let (code, text, err) = run(
        &[
            "tests/data/oom/seed_nanochat_d16.log",
            "--config",
            "presets/examples/nanochat-d16-failed.toml",
            "--out",
            &out_s,
        ],
        b"",
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        text.contains("20 × 3072 × 65,536 × 4 B = 15.0 GiB"),
        "{text}"
    );
    // The matched tensor with the shape and dtype the inventory gives it.
    assert!(
        text.contains("logits.float() (fp32 copy) [20, 3072, 65536] f32"),
        "{text}"
    );
    let fixed = std::fs::read_to_string(&out).expect("--out written");
    assert!(fixed.contains("chunked"), "{fixed}");
    // The written plan is accepted by `estimate`.
    let st = Command::new(env!("CARGO_BIN_EXE_vramplan"))
        .args(["estimate", &out_s])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn pytorch1_huge_logits() {
    let r = one("v1_huge_logits.log");
    assert_eq!(r["cause"], "huge-tensor");
    near(&r["request_bytes"], 14.28, GIB);
    near(&r["capacity_bytes"], 39.59, GIB);
    near(&r["free_bytes"], 13.61, GIB);
    near(&r["allocated_bytes"], 21.37, GIB);
    near(&r["reserved_bytes"], 23.90, GIB);
    assert_eq!(top_fix(&r), "loss = \"chunked\"");
}

#[test]
fn pytorch1_fragmentation() {
    let r = one("v1_fragmentation.log");
    assert_eq!(r["cause"], "fragmentation");
    near(&r["request_bytes"], 2.0, GIB);
    near(&r["reserved_unallocated_bytes"], 21.60 - 15.12, GIB);
    assert!(top_fix(&r).starts_with("PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"));
}

#[test]
fn pytorch2_fragmentation() {
    let r = one("v2_fragmentation.log");
    assert_eq!(r["cause"], "fragmentation");
    near(&r["reserved_unallocated_bytes"], 6.55, GIB);
    near(&r["process_in_use_bytes"], 75.90, GIB);
    assert!(top_fix(&r).starts_with("PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"));
}

#[test]
fn pytorch2_other_processes_named() {
    let r = one("v2_other_processes.log");
    assert_eq!(r["cause"], "other-processes");
    near(&r["other_processes_bytes"], 41.20 + 12.00, GIB);
    near(&r["request_bytes"], 500.0, MIB);
    assert!(top_fix(&r).contains("nvidia-smi"));
}

#[test]
fn pytorch2_other_processes_inferred() {
    // torch.cuda.OutOfMemoryError without "Process N has" sentences: capacity − free − this process.
    let r = one("v2_other_inferred.log");
    assert_eq!(r["cause"], "other-processes");
    let other = r["other_processes_bytes"].as_f64().unwrap();
    assert!(
        (other / GIB - (23.65 - 21.06 / 1024.0 - 9.40)).abs() < 0.02,
        "{other}"
    );
    assert!(top_fix(&r).starts_with("free the GPU"));
}

#[test]
fn pytorch2_does_not_fit() {
    let r = one("v2_does_not_fit.log");
    assert_eq!(r["cause"], "does-not-fit");
    near(&r["request_bytes"], 512.0, MIB);
    near(&r["free_bytes"], 121.31, MIB);
    near(&r["allocated_bytes"], 22.96, GIB);
    assert_eq!(top_fix(&r), "halve micro_batch and double grad_accum");
}

#[test]
fn candle_driver_error() {
    let r = one("candle.log");
    assert_eq!(r["cause"], "does-not-fit");
    assert_eq!(r["driver_error"], true);
    assert!(r["request_bytes"].is_null());
    assert_eq!(top_fix(&r), "halve micro_batch and double grad_accum");
}

#[test]
fn torchrun_two_ranks_keep_their_tracebacks_apart() {
    let r = reports("multirank_torchrun.log", &[]);
    assert_eq!(r.len(), 2);
    assert_eq!(r[0]["rank"], 1);
    assert_eq!(r[0]["gpu"], 1);
    assert_eq!(r[0]["cause"], "huge-tensor");
    near(&r[0]["request_bytes"], 8.0, GIB);
    assert!(r[0]["code_line"]
        .as_str()
        .unwrap()
        .contains("scaled_dot_product_attention"));
    assert_eq!(r[1]["rank"], 0);
    assert_eq!(r[1]["cause"], "does-not-fit");
    assert_eq!(r[1]["code_line"], "optimizer.step()");
    assert!(top_fix(&r[1]).starts_with("sharding = \"zero2\""));
}

#[test]
fn accelerate_default_prefix() {
    let r = one("accelerate_default_prefix.log");
    assert_eq!(r["rank"], 1);
    assert_eq!(r["cause"], "huge-tensor");
    near(&r["request_bytes"], 10.0, GIB);
    near(&r["reserved_unallocated_bytes"], 640.0, MIB);
    assert!(r["code_line"].as_str().unwrap().contains("softmax"));
    assert_eq!(top_fix(&r), "halve micro_batch and double grad_accum");
}

#[test]
fn pytorch1_optimizer_step() {
    let r = one("v1_optimizer_step.log");
    assert_eq!(r["cause"], "does-not-fit");
    near(&r["request_bytes"], 384.0, MIB);
    near(&r["free_bytes"], 290.75, MIB);
    near(&r["reserved_unallocated_bytes"], 14.45 - 14.21, GIB);
    assert!(top_fix(&r).starts_with("sharding = \"zero2\""));
}

#[test]
fn decimal_units() {
    let r = one("decimal_units.log");
    assert_eq!(r["request_bytes"], 3_000_000_000u64);
    assert_eq!(r["capacity_bytes"], 16_000_000_000u64);
    assert_eq!(r["free_bytes"], 2_200_000_000u64);
    assert_eq!(r["cause"], "does-not-fit");
}

#[test]
fn mentions_are_not_reports() {
    let r = one("mixed_noise.log");
    assert_eq!(r["rank"], 3);
    assert_eq!(r["gpu"], 3);
    assert_eq!(r["cause"], "does-not-fit");
    near(&r["request_bytes"], 1.5, GIB);
    assert_eq!(top_fix(&r), "loss = \"chunked\"");
}

#[test]
fn empty_input_has_no_report() {
    let (code, out, _) = run(&["-"], b"");
    assert_eq!(code, 0);
    assert!(out.contains("no CUDA out-of-memory report found"));
    let (code, out, _) = run(&[], b"");
    assert_eq!(code, 0);
    assert!(out.contains("no CUDA out-of-memory report found"));
}

#[test]
fn garbage_input_exits_zero() {
    let garbage: Vec<u8> = (0..20_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let (code, out, _) = run(&["-"], &garbage);
    assert_eq!(code, 0);
    assert!(out.contains("no CUDA out-of-memory report found"));
    let (code, _, _) = run(
        &["-", "--json"],
        b"CUDA out of memory. Tried to allocate 99999999999999999999999 TiB (GPU 99999999999; \xff",
    );
    assert_eq!(code, 0);
}

#[test]
fn unreadable_log_is_bad_input() {
    let (code, _, err) = run(&["tests/data/oom/no-such.log"], b"");
    assert_eq!(code, 2);
    assert!(err.contains("no-such.log"), "{err}");
}

/// A log of `n` reports after the PyTorch 1.x message, every other one with nonsense
/// numbers when asked (tools/oom_log.py writes the same for timing by hand).
fn many_reports(n: usize, nonsense: bool) -> String {
    let mut log = String::new();
    for i in 0..n {
        let bad = nonsense && i % 2 == 1;
        let req = if bad && i % 4 == 1 {
            "-3.00 GiB"
        } else {
            "15.00 GiB"
        };
        let alloc = if bad { "900.00 GiB" } else { "12.10 GiB" };
        log.push_str(&format!(
            "step {i}\n  File \"gpt.py\", line 301, in forward\n    logits = logits.float()\nRuntimeError: CUDA out of memory. Tried to allocate {req} (GPU 0; 31.84 GiB total capacity; {alloc} already allocated; 3.20 GiB free; 14.00 GiB reserved in total by PyTorch)\n"
        ));
    }
    log
}

/// Regression: re-planning the config's fixes for every report cost 15–30 ms a report
/// (and a nonsense report took over 5 s); the fixes are planned once per config.
#[test]
fn many_reports_against_a_config_finish_fast() {
    let log = many_reports(400, true);
    let start = std::time::Instant::now();
    let (code, out, err) = run(
        &[
            "-",
            "--json",
            "--config",
            "presets/examples/nanochat-d16-failed.toml",
        ],
        log.as_bytes(),
    );
    let took = start.elapsed();
    assert_eq!(code, 0, "{err}");
    // The old code needed about 150 ms a report in a debug build: 60 s for these 400.
    assert!(took.as_secs() < 15, "took {took:?}");
    let v: Value = serde_json::from_str(&out).expect("json");
    let r = v["reports"].as_array().expect("reports");
    assert_eq!(r.len(), 400);
    assert_eq!(r[0]["fixes"], r[398]["fixes"]);
    assert!(r[0]["implausible"].is_null());
    assert!(r[0]["tensor"].is_string(), "{}", r[0]);
    for bad in [&r[1], &r[3]] {
        let why = bad["implausible"].as_str().expect("the nonsense is named");
        assert!(why.contains("not matched"), "{why}");
        assert!(bad["tensor"].is_null());
    }
}

#[test]
fn host_kills_and_sizeless_errors_are_explained_without_zeros() {
    let (code, out, err) = run(
        &[
            "tests/data/oom/real/039-tranx-dmesg-oom-killer.log",
            "--config",
            "presets/examples/nanochat-d16-failed.toml",
        ],
        b"",
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("host-oom"), "{out}");
    assert!(out.contains("no host-RAM estimate"), "{out}");
    assert!(out.contains("pin_memory = False"), "{out}");
    assert!(
        !out.contains("predicted peak"),
        "GPU fixes for a host kill: {out}"
    );
    let r = one("real/008-iim-cuda-error-no-sizes.log");
    assert_eq!(r["cause"], "unknown");
    assert_eq!(r["source"], "cuda-error");
    assert!(r["request_bytes"].is_null());
    let (code, out, _) = run(
        &["tests/data/oom/real/016-qwen-cublas-alloc-failed.log"],
        b"",
    );
    assert_eq!(code, 0);
    assert!(out.contains("none printed"), "{out}");
    assert!(!out.contains(" 0 B"), "{out}");
}
