//! `vramplan train` and `sample` end to end: the planner's `candle` inventory against the
//! engine's counting allocator, exact resume, damaged checkpoints, bad data, plans that
//! do not fit.

#![cfg(feature = "engine")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub(crate) fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vramplan"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("binary runs")
}

/// A fresh folder for one test, removed when the test passes (kept when it fails).
pub(crate) struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

pub(crate) fn tmp(name: &str) -> TempDir {
    let d = std::env::temp_dir().join(format!("vramplan-train-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TempDir(d)
}

pub(crate) fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub(crate) fn summary(out: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap()
}

struct Plan {
    arch: &'static str,
    hidden: u64,
    heads: u64,
    kv: u64,
    head_dim: u64,
    ffn: u64,
    vocab: u64,
    batch: u64,
    seq: u64,
    checkpointing: &'static str,
    loss: &'static str,
    chunk: u64,
    layers: u64,
}

impl Plan {
    fn toml(&self) -> String {
        format!(
            "[model]\nname = \"test\"\narch = \"{}\"\nhidden_size = {}\nnum_layers = {}\nnum_heads = {}\n\
             num_kv_heads = {}\nhead_dim = {}\nintermediate_size = {}\nvocab_size = {}\ntie_embeddings = {}\n\
             [train]\nmicro_batch = {}\nseq_len = {}\nprecision = \"fp32\"\ncheckpointing = \"{}\"\n\
             loss = \"{}\"\nloss_chunk = {}\nengine = \"candle\"\n[hardware]\ngpu = \"cpu\"\n",
            self.arch,
            self.hidden,
            self.layers,
            self.heads,
            self.kv,
            self.head_dim,
            self.ffn,
            self.vocab,
            self.arch == "llama",
            self.batch,
            self.seq,
            self.checkpointing,
            self.loss,
            self.chunk
        )
    }
}

#[allow(clippy::too_many_arguments)]
const fn p(
    arch: &'static str,
    hidden: u64,
    heads: u64,
    kv: u64,
    head_dim: u64,
    ffn: u64,
    vocab: u64,
    batch: u64,
    seq: u64,
    checkpointing: &'static str,
    loss: &'static str,
    chunk: u64,
    layers: u64,
) -> Plan {
    Plan {
        arch,
        hidden,
        heads,
        kv,
        head_dim,
        ffn,
        vocab,
        batch,
        seq,
        checkpointing,
        loss,
        chunk,
        layers,
    }
}

/// Fourteen small configurations over architecture, vocabulary, batch, sequence,
/// checkpointing and chunk size (the test adds two with accumulation). Measured on 2 cores
/// (candle 0.11.1, Dec 2026, with the fused norm, RoPE and softmax): all sixteen within
/// 1.3 % (worst −1.29 %, plan 3), qwen2 −0.37 % (plan 12), qwen3 −0.45 % (plan 13).
#[rustfmt::skip]
const PLANS: [Plan; 14] = [
    // arch, width, heads, kv heads, head dim, MLP, vocab, batch, seq, checkpointing, loss, chunk, layers
    p("nanochat", 64, 2, 2, 32, 256, 256, 16, 64, "full", "chunked", 256, 2),
    p("nanochat", 64, 2, 2, 32, 256, 1024, 16, 64, "full", "chunked", 128, 2),
    p("nanochat", 64, 2, 2, 32, 256, 4096, 8, 64, "full", "chunked", 128, 2),
    p("nanochat", 64, 2, 2, 32, 256, 4096, 8, 64, "full", "float-cast", 512, 2),
    p("nanochat", 96, 2, 2, 32, 384, 512, 8, 128, "full", "chunked", 256, 3),
    p("nanochat", 64, 2, 2, 32, 256, 256, 16, 64, "none", "float-cast", 1024, 2),
    p("nanochat", 64, 2, 2, 32, 256, 2048, 4, 128, "none", "chunked", 128, 2),
    p("llama", 64, 4, 2, 16, 192, 256, 16, 64, "full", "chunked", 256, 2),
    p("llama", 64, 4, 2, 16, 192, 2048, 16, 64, "full", "chunked", 256, 2),
    p("llama", 128, 4, 1, 32, 256, 512, 8, 64, "full", "chunked", 64, 2),
    p("llama", 64, 4, 2, 16, 192, 256, 16, 64, "none", "float-cast", 1024, 2),
    p("llama", 96, 4, 4, 24, 256, 1024, 8, 128, "none", "chunked", 256, 1),
    // qwen2's q/k/v biases and qwen3's per-head q/k norms over llama's fitted sets.
    p("qwen2", 64, 4, 2, 16, 192, 256, 16, 64, "none", "float-cast", 1024, 2),
    p("qwen3", 64, 4, 2, 32, 192, 256, 16, 64, "full", "chunked", 256, 2),
];

/// The target: the inventory within 2 % of the counting allocator's peak.
const BOUND: f64 = 0.02;
/// With 16-bit compute (f16 on the CPU) the inventory predicts the tensors alone (gemm's
/// CPU packing scratch left out, as on a GPU): measured on these plans (2 cores, Dec 2026)
/// all sixteen within 0.7 %, worst −0.62 % (plans 13 and 14).
const HALF_BOUND: f64 = 0.02;

/// Trains each plan for 3 steps; returns the report and the worst relative error of the
/// prediction against the summary's `measured` field.
fn inventory_errors(dir: &Path, tomls: &[String], tag: &str, measured: &str) -> (String, f64) {
    let mut report = String::new();
    let mut worst: f64 = 0.0;
    for (i, toml) in tomls.iter().enumerate() {
        let path = dir.join(format!("{tag}{i}.toml"));
        std::fs::write(&path, toml).unwrap();
        let out = dir.join(format!("{tag}out{i}"));
        let o = run(&[
            "train",
            path.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--steps",
            "3",
            "--eval-every",
            "0",
            "--save-every",
            "0",
        ]);
        assert!(o.status.success(), "{tag} plan {i}: {}", text(&o));
        let s = summary(&out);
        let (pred, meas) = (
            s["predicted_peak_bytes"].as_u64().unwrap(),
            s[measured].as_u64().unwrap(),
        );
        let err = (pred as f64 - meas as f64) / meas as f64;
        assert!(
            (err - s["peak_error"].as_f64().unwrap()).abs() < 1e-9,
            "{tag} plan {i}: the summary's error is against {measured}"
        );
        worst = worst.max(err.abs());
        report += &format!(
            "{tag} plan {i}: predicted {pred} measured {meas} error {:+.2} %\n",
            100.0 * err
        );
    }
    (report, worst)
}

/// The twelve plans, then two of them with gradient accumulation.
fn accuracy_plans() -> Vec<String> {
    let mut tomls: Vec<String> = PLANS.iter().map(Plan::toml).collect();
    for k in [0, 7] {
        tomls.push(
            PLANS[k]
                .toml()
                .replace("precision", "grad_accum = 2\nprecision"),
        );
    }
    tomls
}

#[test]
fn candle_inventory_predicts_the_measured_peak() {
    let dir = tmp("accuracy");
    let (report, worst) = inventory_errors(&dir, &accuracy_plans(), "fp32", "measured_peak_bytes");
    println!("{report}");
    assert!(
        worst <= BOUND,
        "worst error {:.2} %:\n{report}",
        100.0 * worst
    );
}

#[test]
fn candle_inventory_with_16_bit_compute() {
    let dir = tmp("accuracy16");
    let tomls: Vec<String> = accuracy_plans()
        .iter()
        .map(|t| t.replace("\"fp32\"", "\"fp16-autocast\""))
        .collect();
    let (report, worst) = inventory_errors(&dir, &tomls, "fp16", "measured_tensor_peak_bytes");
    println!("{report}");
    assert!(
        worst <= HALF_BOUND,
        "worst error {:.2} %:\n{report}",
        100.0 * worst
    );
}

/// The LoRA plans: the llama, qwen2 and qwen3 plans, with `[lora]` rank 8 on q/v
/// (PEFT's default targets) and rank 16 on every linear, over random frozen bases.
/// Measured on 2 cores (candle 0.11.1, Dec 2026, per-linear adapter terms): from −0.47 %
/// (lora plans 6 and 10) to +1.77 % (lora plan 4: llama, width 128, one KV head, q/v).
const LORA_BOUND: f64 = 0.02;

#[test]
fn candle_inventory_of_lora_plans() {
    let dir = tmp("accuracy-lora");
    let tomls: Vec<String> = PLANS[7..]
        .iter()
        .flat_map(|p| {
            [
                "[lora]\nrank = 8\n",
                "[lora]\nrank = 16\ntarget_modules = \"all-linear\"\n",
            ]
            .map(|l| p.toml() + l)
        })
        .collect();
    let (report, worst) = inventory_errors(&dir, &tomls, "lora", "measured_peak_bytes");
    println!("{report}");
    assert!(
        worst <= LORA_BOUND,
        "worst error {:.2} %:\n{report}",
        100.0 * worst
    );
}

/// Each projection adapted alone, and the MLP's three together: without checkpointing
/// (llama plan 10, qwen2 plan 12) and with it (llama plan 7, qwen3 plan 13, where the
/// attention half's backward is the step's peak). Measured on 2 cores (Dec 2026): −0.51 %
/// to +0.46 % on these 32. The MLP alone without checkpointing is warned of (gate_proj
/// alone there: −7.9 %), but these two pass.
#[test]
fn candle_inventory_of_lora_targets_one_by_one() {
    let dir = tmp("accuracy-lora-targets");
    let tomls: Vec<String> = [10, 12, 7, 13]
        .iter()
        .flat_map(|&k| {
            [
                "[\"q_proj\"]",
                "[\"k_proj\"]",
                "[\"v_proj\"]",
                "[\"o_proj\"]",
                "[\"up_proj\"]",
                "[\"down_proj\"]",
                "[\"gate_proj\", \"up_proj\", \"down_proj\"]",
                "[\"q_proj\", \"gate_proj\"]",
            ]
            .map(|t| PLANS[k].toml() + &format!("[lora]\nrank = 8\ntarget_modules = {t}\n"))
        })
        .collect();
    let (report, worst) = inventory_errors(&dir, &tomls, "lora-t", "measured_peak_bytes");
    println!("{report}");
    assert!(
        worst <= LORA_BOUND,
        "worst error {:.2} %:\n{report}",
        100.0 * worst
    );
}

/// LoRA over qwen3 in 16-bit compute without checkpointing, adapters on v_proj (held-out
/// seed 13's plan 15, 3 blocks, width 96, one key/value head): +4.60 % while the choice of
/// the half holding the backward's peak counted qwen3's kept norm copies, which the graph
/// already holds; +1.64 % after (and +1.33 % with q_proj too); since RMSNorm and its
/// weight are one node, +1.29 % and +0.96 % (Dec 2026, 2 cores).
#[test]
fn candle_inventory_of_lora_over_qwen3_in_16_bit_without_checkpointing() {
    let dir = tmp("accuracy-lora-qwen3-half");
    let plan = p(
        "qwen3", 96, 2, 1, 32, 128, 256, 16, 32, "none", "chunked", 256, 3,
    );
    let tomls: Vec<String> = ["[\"v_proj\"]", "[\"q_proj\", \"v_proj\"]"]
        .map(|t| {
            plan.toml().replace("\"fp32\"", "\"fp16-autocast\"")
                + &format!("[lora]\nrank = 4\ntarget_modules = {t}\n")
        })
        .to_vec();
    let (report, worst) = inventory_errors(&dir, &tomls, "lora-q3h", "measured_tensor_peak_bytes");
    println!("{report}");
    assert!(
        worst <= LORA_BOUND,
        "worst error {:.2} %:\n{report}",
        100.0 * worst
    );
}

pub(crate) fn losses(out: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

pub(crate) fn small_plan(dir: &Path) -> PathBuf {
    let path = dir.join("small.toml");
    std::fs::write(
        &path,
        p(
            "llama", 32, 2, 1, 16, 64, 256, 4, 32, "full", "chunked", 64, 2,
        )
        .toml(),
    )
    .unwrap();
    path
}

#[test]
fn resume_continues_exactly() {
    let dir = tmp("resume");
    let plan = small_plan(&dir);
    let plan = plan.to_str().unwrap();
    let (a, b) = (dir.join("a"), dir.join("b"));
    let common = ["--steps", "8", "--eval-every", "0", "--save-every", "0"];
    let o = run(&[&["train", plan, "--out", a.to_str().unwrap()][..], &common].concat());
    assert!(o.status.success(), "{}", text(&o));
    let o = run(&[
        &[
            "train",
            plan,
            "--out",
            b.to_str().unwrap(),
            "--stop-at",
            "5",
        ][..],
        &common,
    ]
    .concat());
    assert!(o.status.success(), "{}", text(&o));
    let o = run(&[
        &["train", plan, "--out", b.to_str().unwrap(), "--resume"][..],
        &common,
    ]
    .concat());
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("resumed from"), "{}", text(&o));
    let (la, lb) = (losses(&a), losses(&b));
    assert_eq!(la.len(), 8);
    assert_eq!(la, lb, "8 steps straight vs 5 steps + resume for 3");
    // Resuming from an older checkpoint drops the log of the steps after it.
    let c = dir.join("c");
    let args = ["--steps", "8", "--eval-every", "0", "--save-every", "4"];
    let o = run(&[&["train", plan, "--out", c.to_str().unwrap()][..], &args].concat());
    assert!(o.status.success(), "{}", text(&o));
    std::fs::remove_dir_all(c.join("ckpt-00000008")).unwrap();
    let o = run(&[
        &["train", plan, "--out", c.to_str().unwrap(), "--resume"][..],
        &args,
    ]
    .concat());
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("(step 4)"), "{}", text(&o));
    assert_eq!(losses(&c), la, "8 steps with a resume from step 4");
}

#[test]
fn a_damaged_newest_checkpoint_falls_back_to_the_previous_one() {
    let dir = tmp("damaged");
    let plan = small_plan(&dir);
    let out = dir.join("out");
    let o = run(&[
        "train",
        plan.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "4",
        "--save-every",
        "2",
        "--eval-every",
        "0",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(out.join("ckpt-00000002").is_dir() && out.join("ckpt-00000004").is_dir());
    // A write killed midway leaves a temporary folder; a torn copy leaves a short file.
    let stray = out.join(".ckpt-00000006.tmp");
    std::fs::create_dir_all(&stray).unwrap();
    std::fs::write(stray.join("state.safetensors"), b"partial").unwrap();
    let torn = out.join("ckpt-00000006");
    std::fs::create_dir_all(&torn).unwrap();
    let good = std::fs::read(out.join("ckpt-00000004/state.safetensors")).unwrap();
    std::fs::write(torn.join("state.safetensors"), &good[..good.len() / 2]).unwrap();
    std::fs::copy(out.join("ckpt-00000004/meta.json"), torn.join("meta.json")).unwrap();
    let o = run(&[
        "train",
        plan.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "6",
        "--resume",
        "--eval-every",
        "0",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("skipping damaged checkpoint"), "{t}");
    assert!(t.contains("ckpt-00000004 (step 4)"), "{t}");
    let o = run(&[
        "sample",
        "--checkpoint",
        out.join("ckpt-00000004").to_str().unwrap(),
        "--prompt",
        "ab",
        "--tokens",
        "5",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("ab"));
}

#[test]
fn a_diverging_loss_stops_with_a_checkpoint() {
    let dir = tmp("nan");
    let plan = small_plan(&dir);
    let out = dir.join("out");
    let o = run(&[
        "train",
        plan.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "20",
        "--lr",
        "1e30",
        "--eval-every",
        "0",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("the loss became") && t.contains("--resume"),
        "{t}"
    );
    assert!(!checkpoints(&out).is_empty(), "{t}");
}

pub(crate) fn checkpoints(out: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("ckpt-")
        })
        .collect()
}

#[test]
fn bad_data_is_a_clear_error() {
    let dir = tmp("data");
    let plan = small_plan(&dir);
    let empty = dir.join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let short = dir.join("short.txt");
    std::fs::write(&short, "hello").unwrap();
    let corrupt = dir.join("bad.jsonl");
    std::fs::write(&corrupt, "{\"text\": \"fine\"}\n{not json\n").unwrap();
    let wrong = dir.join("wrong.jsonl");
    std::fs::write(&wrong, "{\"body\": \"no text field\"}\n").unwrap();
    let missing = dir.join("missing.txt");
    for (file, expect) in [
        (&missing, "cannot read data"),
        (&empty, "empty"),
        (&short, "too little"),
        (&corrupt, "line 2"),
        (&wrong, "\"text\""),
    ] {
        let o = run(&[
            "train",
            plan.to_str().unwrap(),
            "--data",
            file.to_str().unwrap(),
            "--out",
            dir.join("out").to_str().unwrap(),
            "--steps",
            "1",
        ]);
        assert_eq!(o.status.code(), Some(2), "{}: {}", file.display(), text(&o));
        assert!(
            text(&o).contains(expect),
            "{}: {}",
            file.display(),
            text(&o)
        );
    }
}

#[test]
fn jsonl_prompt_response_data_trains() {
    let dir = tmp("jsonl");
    let plan = small_plan(&dir);
    let data = dir.join("chat.jsonl");
    let mut s = String::new();
    for i in 0..300 {
        s += &format!(
            "{{\"prompt\": \"what is {i} plus one?\", \"response\": \"{}\"}}\n",
            i + 1
        );
    }
    std::fs::write(&data, s).unwrap();
    let out = dir.join("out");
    let o = run(&[
        "train",
        plan.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "3",
        "--eval-every",
        "3",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let s = summary(&out);
    for key in [
        "steps",
        "final_loss",
        "val_loss",
        "tokens_per_second",
        "predicted_peak_bytes",
        "measured_peak_bytes",
        "peak_error",
    ] {
        assert!(s.get(key).is_some(), "summary lacks {key}");
    }
    assert_eq!(losses(&out).len(), 3);
}

/// A plan that names CPU kernels this binary does not run trains planned with the ones it
/// runs, and says so in one line.
#[test]
fn a_plan_naming_other_cpu_kernels_is_planned_with_this_binarys() {
    let dir = tmp("kernels");
    let plan = small_plan(&dir);
    let first = text(&run(&["estimate", plan.to_str().unwrap()]));
    let other = if first.contains("(avx512 kernels)") {
        "avx2"
    } else {
        "avx512"
    };
    let named = dir.join("named.toml");
    let body = std::fs::read_to_string(&plan).unwrap();
    std::fs::write(&named, format!("{body}cpu_kernels = \"{other}\"\n")).unwrap();
    let out = dir.join("out");
    let o = run(&[
        "train",
        named.to_str().unwrap(),
        "--steps",
        "1",
        "--eval-every",
        "0",
        "--out",
        out.to_str().unwrap(),
    ]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.lines().any(|l| l.contains(&format!(
            "cpu_kernels = \"{other}\", but this binary runs gemm's"
        ))),
        "{t}"
    );
    let predicted = summary(&out)["predicted_peak_bytes"].clone();
    let want = run(&["estimate", "--json", plan.to_str().unwrap()]);
    let want: serde_json::Value = serde_json::from_slice(&want.stdout).unwrap();
    assert_eq!(predicted, want["peak_allocated_bytes"], "{t}");
}

#[test]
fn a_plan_over_the_memory_limit_is_refused() {
    let dir = tmp("limit");
    let plan = small_plan(&dir);
    let out = dir.join("out");
    let o = run(&[
        "train",
        plan.to_str().unwrap(),
        "--memory-limit",
        "0.0002",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("does not fit") && t.contains("at the peak"),
        "{t}"
    );
    assert!(t.contains("no configuration of this model fits"), "{t}");
    // A plan that can be fixed: the planner's fit writes one that fits the limit.
    let big = dir.join("big.toml");
    std::fs::write(
        &big,
        p(
            "nanochat",
            64,
            2,
            2,
            32,
            256,
            4096,
            64,
            128,
            "none",
            "float-cast",
            1024,
            2,
        )
        .toml(),
    )
    .unwrap();
    let o = run(&[
        "train",
        big.to_str().unwrap(),
        "--memory-limit",
        "0.2",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let fitted = out.join("plan.fit.toml");
    assert!(text(&o).contains("a plan that fits"), "{}", text(&o));
    let o = run(&["estimate", "--json", fitted.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["peak_allocated_bytes"].as_u64().unwrap() < (2 << 30) / 10);
    assert!(checkpoints(&out).is_empty());
}

#[test]
fn the_built_in_run_learns() {
    let dir = tmp("builtin");
    let out = dir.join("out");
    let o = run(&[
        "train",
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "40",
        "--eval-every",
        "40",
        "--lr",
        "0.01",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("corpus entropy"), "{}", text(&o));
    let l = losses(&out);
    // ln 256 = 5.55 at the start; the corpus's entropy rate is about 1.3 nats.
    assert!(l[0].1 > 4.5 && l[39].1 < 3.0, "{l:?}");
}

#[test]
fn a_hugging_face_tokenizer_trains_and_samples() {
    let dir = tmp("tokenizer");
    let plan = small_plan(&dir);
    let tok = dir.join("tokenizer.json");
    std::fs::write(
        &tok,
        r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,
"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
"model":{"type":"WordLevel","vocab":{"[UNK]":0,"the":1,"cat":2,"sat":3,"on":4,"mat":5,".":6},"unk_token":"[UNK]"}}"#,
    )
    .unwrap();
    let words = ["the", "cat", "sat", "on", "the", "mat", "."];
    let corpus: Vec<&str> = (0..4000).map(|i| words[i % words.len()]).collect();
    let data = dir.join("words.txt");
    std::fs::write(&data, corpus.join(" ")).unwrap();
    let out = dir.join("out");
    let o = run(&[
        "train",
        plan.to_str().unwrap(),
        "--tokenizer",
        tok.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "40",
        "--lr",
        "0.01",
        "--eval-every",
        "40",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let l = losses(&out);
    assert!(l[39].1 < l[0].1 - 1.0, "{l:?}");
    let o = run(&[
        "sample",
        "--checkpoint",
        out.to_str().unwrap(),
        "--prompt",
        "the cat",
        "--tokens",
        "6",
        "--temperature",
        "0",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(s.starts_with("the cat "), "{s}");
    // A tokenizer with more ids than the model's vocabulary is refused.
    let big = dir.join("big.json");
    let vocab: Vec<String> = (0..300).map(|i| format!("\"w{i}\":{i}")).collect();
    std::fs::write(
        &big,
        format!(
            r#"{{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,"pre_tokenizer":{{"type":"Whitespace"}},"post_processor":null,"decoder":null,"model":{{"type":"WordLevel","vocab":{{{}}},"unk_token":"w0"}}}}"#,
            vocab.join(",")
        ),
    )
    .unwrap();
    let o = run(&[
        "train",
        plan.to_str().unwrap(),
        "--tokenizer",
        big.to_str().unwrap(),
        "--out",
        dir.join("out2").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("more than the model's vocab_size"),
        "{}",
        text(&o)
    );
}

#[test]
fn model_replaces_the_plans_model() {
    let dir = tmp("model");
    let cfg = dir.join("config.json");
    std::fs::write(
        &cfg,
        r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
            "intermediate_size": 64, "vocab_size": 256, "tie_word_embeddings": true,
            "max_position_embeddings": 128}"#,
    )
    .unwrap();
    let out = dir.join("out");
    let o = run(&[
        "train",
        "--model",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "2",
        "--eval-every",
        "0",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    // 256 × 32 tied embedding, 2 blocks of 4·32·32 − 2·32·16 attention + 3·32·64 MLP
    // + 2·32 norms, and the final norm.
    let blocks = 2 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64 + 2 * 32);
    assert_eq!(summary(&out)["params"], 256 * 32 + blocks + 32);
    let o = run(&["train", "--model", "no-such-model", "--steps", "1"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("no such preset"), "{}", text(&o));
}

#[test]
fn device_and_precision_choices() {
    let dir = tmp("device");
    let plan = small_plan(&dir);
    let out = dir.join("out");
    let train = |plan: &Path, extra: &[&str]| {
        run(&[
            &[
                "train",
                plan.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ][..],
            // Each run replaces the last (moved aside to out.old-N).
            &[
                "--steps",
                "2",
                "--eval-every",
                "0",
                "--save-every",
                "0",
                "--force",
            ],
            extra,
        ]
        .concat())
    };
    // The small plan with another precision, on the CPU.
    let with_precision = |precision: &str| {
        let path = dir.join(format!("{precision}.toml"));
        let toml = std::fs::read_to_string(&plan).unwrap();
        std::fs::write(&path, toml.replace("\"fp32\"", &format!("\"{precision}\""))).unwrap();
        train(&path, &["--device", "cpu"])
    };
    let o = train(&plan, &["--device", "gpu0"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let t = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(t.trim().lines().count(), 1, "{t}");
    assert!(
        t.contains("--device") && t.contains("auto, cpu, cuda, cuda:N"),
        "{t}"
    );
    if !cfg!(feature = "cuda") {
        let o = train(&plan, &["--device", "cuda"]);
        assert_eq!(o.status.code(), Some(2), "{}", text(&o));
        assert!(text(&o).contains("built without CUDA"), "{}", text(&o));
    }
    // Mixed precision on the CPU: f16 compute over f32 master weights.
    let o = with_precision("fp16-autocast");
    assert!(o.status.success(), "{}", text(&o));
    let s = summary(&out);
    assert_eq!(s["device"], "cpu");
    assert_eq!(s["compute_dtype"], "f16");
    assert!(s["final_loss"].as_f64().unwrap().is_finite());
    let ckpt = checkpoints(&out).pop().unwrap();
    let st = std::fs::read(ckpt.join("state.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&st[8..8 + header_len]).unwrap();
    for (name, t) in header.as_object().unwrap() {
        if name != "__metadata__" {
            assert_eq!(
                t["dtype"], "F32",
                "{name}: master weights and moments stay f32"
            );
        }
    }
    // bf16 on the CPU is not run: candle's CPU matmul has no bf16.
    let o = with_precision("bf16-autocast");
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("no bf16"), "{}", text(&o));
    assert_eq!(summary(&out)["compute_dtype"], "f32");
}

#[test]
fn sft_accumulation_follows_the_loss_of_one_big_micro_batch() {
    // Responses of 1 to 3 digits (and the blank line): micro-batches hold different
    // numbers of response tokens, which a mean of per-micro-batch means would weigh wrong.
    let dir = tmp("sft-accum");
    let plan = small_plan(&dir);
    let data = dir.join("qa.jsonl");
    let lines: String = (0..60)
        .map(|i| {
            format!(
                "{{\"prompt\": \"{i} squared?\", \"response\": \"{}\"}}\n",
                i * i
            )
        })
        .collect();
    std::fs::write(&data, lines).unwrap();
    let train = |name: &str, micro: &str, accum: &str| {
        let out = dir.join(name);
        let o = run(&[
            "train",
            plan.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--steps",
            "6",
            "--set",
            &format!("train.micro_batch={micro}"),
            "--set",
            &format!("train.grad_accum={accum}"),
        ]);
        assert!(o.status.success(), "{}", text(&o));
        losses(&out)
    };
    let (a, b) = (train("accum", "2", "3"), train("one", "6", "1"));
    assert_eq!(a.len(), 6);
    for ((s, x), (_, y)) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-4 * y.abs(), "step {s}: {x} vs {y}");
    }
}

#[test]
fn a_chat_template_beside_the_tokenizer_formats_sft_data_and_eval_uses_it() {
    let dir = tmp("sft-template");
    let plan = small_plan(&dir);
    let tok = dir.join("tokenizer.json");
    std::fs::write(
        &tok,
        r#"{"version":"1.0","truncation":null,"padding":null,
"added_tokens":[{"id":7,"content":"<|im_start|>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true},
{"id":8,"content":"<|im_end|>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}],
"normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
"model":{"type":"WordLevel","vocab":{"[UNK]":0,"the":1,"cat":2,"sat":3,"on":4,"mat":5,".":6,"<|im_start|>":7,"<|im_end|>":8,"user":9,"assistant":10,"system":11},"unk_token":"[UNK]"}}"#,
    )
    .unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::copy(
        root.join("tests/data/chat/smollm2/tokenizer_config.json"),
        dir.join("tokenizer_config.json"),
    )
    .unwrap();
    let words = ["the", "cat", "sat", "on", "mat", "."];
    let lines: String = (0..50)
        .map(|i| {
            let p = format!("{} {}", words[i % 6], words[(i + 1) % 6]);
            format!(
                "{{\"prompt\": \"{p}\", \"response\": \"{}\"}}\n",
                words[(i + 2) % 6]
            )
        })
        .collect();
    let data = dir.join("chat.jsonl");
    std::fs::write(&data, lines).unwrap();
    let out = dir.join("out");
    let o = run(&[
        "train",
        plan.to_str().unwrap(),
        "--tokenizer",
        tok.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "30",
        "--lr",
        "0.01",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("prompt/response data: the chat template of")
            && text(&o).contains("loss on the response tokens only"),
        "{}",
        text(&o)
    );
    let l = losses(&out);
    assert!(l[29].1 < 0.5 * l[0].1, "{l:?}");
    // The run folder keeps the template, so eval validates on the same responses.
    assert!(out.join("tokenizer_config.json").is_file());
    let o = run(&["eval", "--json", "--checkpoints", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let got = v["checkpoints"][0]["val_loss"].as_f64().unwrap();
    let logged = summary(&out)["val_loss"].as_f64().unwrap();
    assert!((got - logged).abs() < 1e-6 * logged, "{got} vs {logged}");
}

#[test]
fn candle_inventory_holds_on_sft_data() {
    // Two byte-level llama plans (checkpointed and chunked with accumulation; plain) on
    // padded prompt/response rows: SFT adds a weight per target and draws the step's
    // micro-batches first, which the inventory's 2 % must still cover.
    let dir = tmp("accuracy-sft");
    let data = dir.join("qa.jsonl");
    let lines: String = (0..200)
        .map(|i| {
            format!(
                "{{\"prompt\": \"what is {i} times {i}?\", \"response\": \"{}\"}}\n",
                i * i
            )
        })
        .collect();
    std::fs::write(&data, lines).unwrap();
    let tomls = [
        PLANS[7]
            .toml()
            .replace("precision", "grad_accum = 2\nprecision"),
        PLANS[10].toml(),
    ];
    let mut report = String::new();
    for (i, toml) in tomls.iter().enumerate() {
        let (plan, out) = (
            dir.join(format!("sft{i}.toml")),
            dir.join(format!("out{i}")),
        );
        std::fs::write(&plan, toml).unwrap();
        let o = run(&[
            "train",
            plan.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--steps",
            "3",
            "--eval-every",
            "0",
            "--save-every",
            "0",
        ]);
        assert!(o.status.success(), "sft plan {i}: {}", text(&o));
        assert!(
            text(&o).contains("loss on the response tokens only"),
            "{}",
            text(&o)
        );
        let err = summary(&out)["peak_error"].as_f64().unwrap();
        report += &format!("sft plan {i}: error {:+.2} %\n", 100.0 * err);
        assert!(err.abs() <= BOUND, "{report}");
    }
    println!("{report}");
}

#[test]
fn bad_sft_input_is_one_line_and_exit_2() {
    let dir = tmp("sft-bad");
    let plan = small_plan(&dir);
    let mixed = dir.join("mixed.jsonl");
    std::fs::write(
        &mixed,
        "{\"prompt\": \"p\", \"response\": \"r\"}\n{\"text\": \"a document\"}\n",
    )
    .unwrap();
    let one = dir.join("one.jsonl");
    std::fs::write(&one, "{\"prompt\": \"p\", \"response\": \"r\"}\n").unwrap();
    let tdir = dir.join("tok");
    std::fs::create_dir_all(&tdir).unwrap();
    let tok = tdir.join("tokenizer.json");
    std::fs::write(
        &tok,
        r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,
"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
"model":{"type":"WordLevel","vocab":{"[UNK]":0,"p":1,"r":2},"unk_token":"[UNK]"}}"#,
    )
    .unwrap();
    std::fs::write(
        tdir.join("tokenizer_config.json"),
        r#"{"chat_template": "{% for m in messages %}{{ m.content }"}"#,
    )
    .unwrap();
    let out = dir.join("out");
    let cases: [(&[&str], &str); 4] = [
        (
            &["--data", mixed.to_str().unwrap()],
            "line 2: expected string fields \"prompt\" and \"response\"",
        ),
        (
            &["--data", one.to_str().unwrap()],
            "1 prompt/response examples: needs at least 2",
        ),
        (
            &["--data", one.to_str().unwrap(), "--train-on", "prompts"],
            "--train-on: \"prompts\": expected response or all",
        ),
        (
            &[
                "--data",
                one.to_str().unwrap(),
                "--tokenizer",
                tok.to_str().unwrap(),
            ],
            "tokenizer_config.json: chat_template: ",
        ),
    ];
    for (args, expect) in cases {
        let mut a = vec![
            "train",
            plan.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        a.extend_from_slice(args);
        let o = run(&a);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(expect), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    }
}

#[test]
fn train_on_all_keeps_prompt_response_rows_as_text_documents() {
    let dir = tmp("sft-all");
    let plan = small_plan(&dir);
    let data = dir.join("qa.jsonl");
    let lines: String = (0..300)
        .map(|i| {
            format!(
                "{{\"prompt\": \"what is {i} plus one?\", \"response\": \"{}\"}}\n",
                i + 1
            )
        })
        .collect();
    std::fs::write(&data, lines).unwrap();
    let mut val = Vec::new();
    for on in ["all", "response"] {
        let out = dir.join(on);
        let o = run(&[
            "train",
            plan.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--steps",
            "2",
            "--train-on",
            on,
        ]);
        assert!(o.status.success(), "{}", text(&o));
        let expect = if on == "all" {
            "as text documents, packed; loss on every token (--train-on all)"
        } else {
            "one example a row, padded; loss on the response tokens only"
        };
        assert!(text(&o).contains(expect), "{on}: {}", text(&o));
        val.push(summary(&out)["val_loss"].as_f64().unwrap());
    }
    // The checkpoint keeps the choice: a resume without --train-on goes on with `all`,
    // and one that changes it says so.
    let out = dir.join("all");
    let resume = |steps: &str, extra: &[&str]| {
        let mut args = vec![
            "train",
            plan.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--steps",
            steps,
            "--resume",
        ];
        args.extend_from_slice(extra);
        run(&args)
    };
    let o = resume("3", &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("(--train-on all)"), "{}", text(&o));
    let o = resume("4", &["--train-on", "response"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("--train-on response (was all)"),
        "{}",
        text(&o)
    );
    // Different tokens are scored: the held-out text's every byte, or the responses'.
    assert!((val[0] - val[1]).abs() > 1e-3, "{val:?}");
}

#[test]
fn lora_resume_continues_exactly_and_samples() {
    // LoRA SFT from the tiny llama checkpoint: 8 steps straight, and 5 steps then a resume
    // that names no --init (the checkpoint holds the adapters; the base is the folder the
    // run started from), give the same losses.
    let dir = tmp("lora-resume");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let plan = root.join("tests/data/peft_llama/plan.toml");
    let init = root.join("tests/data/hf_tiny/llama");
    let sft = root.join("tests/data/peft_sft.jsonl");
    let (a, b) = (dir.join("a"), dir.join("b"));
    let common = [
        "--steps",
        "8",
        "--eval-every",
        "0",
        "--save-every",
        "0",
        "--data",
        sft.to_str().unwrap(),
    ];
    let first = |out: &Path, extra: &[&str]| {
        let args = [
            &[
                "train",
                plan.to_str().unwrap(),
                "--init",
                init.to_str().unwrap(),
            ][..],
            &["--out", out.to_str().unwrap()],
            &common,
            extra,
        ]
        .concat();
        let o = run(&args);
        assert!(o.status.success(), "{}", text(&o));
    };
    first(&a, &[]);
    first(&b, &["--stop-at", "5"]);
    let o = run(&[
        &["train", "--out", b.to_str().unwrap(), "--resume"][..],
        &common,
    ]
    .concat());
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("resumed from"), "{}", text(&o));
    let (la, lb) = (losses(&a), losses(&b));
    assert_eq!(la.len(), 8);
    assert_eq!(la, lb, "8 steps straight vs 5 steps + resume for 3");
    let o = run(&[
        "sample",
        "--checkpoint",
        b.to_str().unwrap(),
        "--prompt",
        "what is 3 plus one?\n",
        "--tokens",
        "4",
        "--temperature",
        "0",
    ]);
    assert!(o.status.success(), "{}", text(&o));
}
