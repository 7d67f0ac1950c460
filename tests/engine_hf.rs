//! Hugging Face checkpoints in the engine: tiny random checkpoints written by transformers
//! (`tools/hf_reference.py write`, committed under `tests/data/hf_tiny/`) load with
//! `--init` and give transformers' logits at every position; `train --init` then `export`
//! writes a folder whose tensors are the checkpoint's under transformers' names, which
//! loads back with the same logits; bad checkpoints are one line and exit 2.

#![cfg(feature = "engine")]

use crate::train::{run, text, tmp};
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};
use vramplan::engine::{checkpoint, hf, model::Model, rng::Rng, step};

fn data(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/hf_tiny")
        .join(case)
}

/// The tokens and logits of a reference file.
fn reference(path: &Path) -> (Vec<u32>, Vec<Vec<f32>>) {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let tokens = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    let logits = v["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect();
    (tokens, logits)
}

fn logits_of(model: &Model, tokens: &[u32]) -> Vec<Vec<f32>> {
    let ids = Tensor::from_vec(tokens.to_vec(), tokens.len(), &Device::Cpu).unwrap();
    step::all_logits(model, &ids).unwrap()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

#[test]
fn logits_equal_transformers_for_each_architecture() {
    // Reference: transformers 5.24.0 (torch 2.15.0), eager attention, f32 forward, logits
    // of all 12 positions; llama tied with SmolLM2's eps 1e-5 and RoPE base 1e5, qwen2
    // with biases in two shards, qwen3 with head norms and head_dim 32 ≠ 64/4, mistral in
    // bf16 with a window of 4 tokens (without it transformers' logits move by up to 4.3).
    for case in ["llama", "qwen2", "qwen3", "mistral"] {
        let (tokens, want) = reference(&data(case).join("reference.json"));
        let (_, model) = hf::load_model(&data(case)).unwrap();
        let got = logits_of(&model, &tokens);
        let d = max_diff(&got, &want);
        assert!(d <= 1e-4, "{case}: max |engine − transformers| = {d}");
    }
}

/// The model of checkpoint `l`, whose shape is `spec`.
fn restored(spec: &vramplan_planner::ModelSpec, l: &checkpoint::Loaded) -> Model {
    let mut m = Model::new(spec, DType::F32, DType::F32, &Device::Cpu, &mut Rng::new(0)).unwrap();
    m.numerics = hf::numerics_of(l.meta.hf_config.as_deref());
    checkpoint::restore(l, &m, None).unwrap();
    m
}

/// `vramplan train ARGS --out OUT` (logging once a hundred steps), then `vramplan export
/// OUT --out EXPORT`; what `export` said.
fn train_then_export(args: &[&str], out: &Path, export: &Path) -> String {
    let o = run(&[
        &["train"],
        args,
        &["--out", out.to_str().unwrap(), "--log-every", "100"],
    ]
    .concat());
    assert!(o.status.success(), "{}", text(&o));
    let o = run(&[
        "export",
        out.to_str().unwrap(),
        "--out",
        export.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    text(&o)
}

/// Trains `case` from its checkpoint for `steps` steps (the built-in corpus) into `out`
/// and exports the run to `export`.
fn train_and_export(case: &str, steps: &str, out: &Path, export: &Path) {
    let said = train_then_export(
        &["--init", data(case).to_str().unwrap(), "--steps", steps],
        out,
        export,
    );
    assert!(
        said.contains("config.json, model.safetensors (f32)"),
        "{said}"
    );
}

/// The prompt/response rows the SFT runs train on.
fn sft_data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/peft_sft.jsonl")
}

#[test]
fn export_writes_the_checkpoint_under_transformers_names_and_loads_back() {
    for case in ["llama", "qwen2"] {
        let d = tmp(&format!("export-{case}"));
        let (out, export) = (d.join("run"), d.join("hf"));
        train_and_export(case, "2", &out, &export);
        let l = checkpoint::latest(&out).unwrap();
        let (_, again) = hf::load_model(&export).unwrap();
        let trained = restored(&again.spec, &l);
        let exported =
            candle_core::safetensors::load(export.join(hf::WEIGHTS), &Device::Cpu).unwrap();
        assert_eq!(
            exported.len(),
            trained.params.len(),
            "{case}: one tensor per parameter"
        );
        for (n, v) in &trained.params {
            let (a, b) = (v.as_tensor(), &exported[&hf::hf_name(n)]);
            assert_eq!(a.dims(), b.dims(), "{case}: {n}");
            let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{case}: {n}");
        }
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(export.join(hf::CONFIG)).unwrap())
                .unwrap();
        assert_eq!(config["model_type"], case);
        assert_eq!(config["dtype"], "float32");
        assert_eq!(config["tie_word_embeddings"], case == "llama");
        assert_eq!(exported.contains_key("lm_head.weight"), case != "llama");
        // init → train → export → init: the checkpoint's logits, exactly.
        let (tokens, _) = reference(&data(case).join("reference.json"));
        assert_eq!(
            max_diff(&logits_of(&again, &tokens), &logits_of(&trained, &tokens)),
            0.0,
            "{case}"
        );
    }
}

/// A copy of the llama checkpoint in `dir` with its config.json edited by `edit`.
fn edited(dir: &Path, edit: impl Fn(&mut serde_json::Value)) -> PathBuf {
    let to = dir.join("ckpt");
    std::fs::create_dir_all(&to).unwrap();
    std::fs::copy(data("llama").join(hf::WEIGHTS), to.join(hf::WEIGHTS)).unwrap();
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data("llama").join(hf::CONFIG)).unwrap())
            .unwrap();
    edit(&mut v);
    std::fs::write(to.join(hf::CONFIG), v.to_string()).unwrap();
    to
}

#[test]
fn a_checkpoint_the_engine_cannot_run_is_one_line_and_exit_2() {
    type Edit = fn(&mut serde_json::Value);
    let cases: &[(&str, Edit, &str)] = &[
        ("act", |v| v["hidden_act"] = "gelu".into(), "hidden_act = \"gelu\": the engine's MLP is SiLU-gated"),
        ("scaling", |v| v["rope_parameters"]["rope_type"] = "llama3".into(), "rope_type = \"llama3\""),
        ("shape", |v| v["intermediate_size"] = 128.into(), "model.layers.0.mlp.down_proj.weight has shape [64, 96]; the config's model needs [64, 128]"),
        ("untied", |v| v["tie_word_embeddings"] = false.into(), "no tensor lm_head.weight"),
        ("family", |v| v["model_type"] = "qwen3".into(), "no tensor model.layers.0.self_attn.k_norm.weight"),
        ("gemma", |v| v["model_type"] = "gemma2".into(), "model_type = \"gemma2\": the engine loads llama, mistral, qwen2, qwen3 and t5"),
    ];
    for (name, edit, want) in cases {
        let d = tmp(&format!("bad-init-{name}"));
        let ckpt = edited(&d, edit);
        let o = run(&["sample", "--init", ckpt.to_str().unwrap(), "--tokens", "1"]);
        let t = text(&o);
        assert_eq!(o.status.code(), Some(2), "{name}: {t}");
        assert!(t.contains(want), "{name}: {t}");
        assert_eq!(t.trim().lines().count(), 1, "{name}: {t}");
    }
}

#[test]
fn a_plan_whose_model_is_not_the_checkpoints_is_refused() {
    let d = tmp("init-plan-mismatch");
    let plan = d.join("plan.toml");
    // The checkpoint's model but for its MLP width (96).
    std::fs::write(
        &plan,
        "[model]\nname = \"tiny\"\narch = \"llama\"\nhidden_size = 64\nnum_layers = 2\nnum_heads = 4\nnum_kv_heads = 2\nintermediate_size = 128\nvocab_size = 256\ntie_embeddings = true\n[train]\nmicro_batch = 2\nseq_len = 16\nengine = \"candle\"\nprecision = \"fp32\"\n[hardware]\ngpu = \"cpu\"\n",
    )
    .unwrap();
    let o = run(&[
        "train",
        plan.to_str().unwrap(),
        "--init",
        data("llama").to_str().unwrap(),
        "--steps",
        "1",
        "--out",
        d.join("run").to_str().unwrap(),
    ]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(2), "{t}");
    assert!(
        t.contains("model.intermediate_size = 128, but ") && t.contains("config.json has 96"),
        "{t}"
    );
    assert_eq!(t.trim().lines().count(), 1, "{t}");
}

#[test]
fn transformers_loads_an_exported_run_with_the_engines_logits() {
    // Reference: tests/data/hf_tiny/exported/CASE.json, transformers 5.24.0's
    // `from_pretrained` on the export of `train --init CASE --data
    // tests/data/peft_sft.jsonl --steps 50` (full fine-tuning SFT, seed 0). The run is
    // repeated here: it learns, and its export must give those logits.
    for case in ["llama", "qwen3"] {
        let d = tmp(&format!("exported-{case}"));
        let (out, export) = (d.join("run"), d.join("hf"));
        let (init, sft) = (data(case), sft_data());
        let args = [
            "--init",
            init.to_str().unwrap(),
            "--data",
            sft.to_str().unwrap(),
        ];
        train_then_export(&[&args[..], &["--steps", "50"]].concat(), &out, &export);
        let losses = crate::train::losses(&out);
        let (first, last) = (losses[0].1, losses[losses.len() - 1].1);
        assert!(last < 0.7 * first, "{case}: SFT loss {first} → {last}");
        let (tokens, want) = reference(&data("exported").join(format!("{case}.json")));
        let (_, untrained) = reference(&data(case).join("reference.json"));
        assert!(
            max_diff(&want, &untrained) > 0.05,
            "{case}: training moved the logits"
        );
        let (_, model) = hf::load_model(&export).unwrap();
        let diff = max_diff(&logits_of(&model, &tokens), &want);
        assert!(diff <= 1e-4, "{case}: max |engine − transformers| = {diff}");
    }
}

#[test]
fn a_run_from_random_weights_exports_a_config_transformers_reads() {
    // transformers 5.24's from_pretrained on such an export: LlamaForCausalLM, no missing,
    // unexpected or mismatched keys (checked by hand; the engine's reading is checked here).
    let d = tmp("export-plan");
    let plan = d.join("plan.toml");
    std::fs::write(
        &plan,
        "[model]\nname = \"tiny\"\narch = \"llama\"\nhidden_size = 64\nnum_layers = 2\nnum_heads = 4\nnum_kv_heads = 2\nintermediate_size = 128\nvocab_size = 256\ntie_embeddings = false\n[train]\nmicro_batch = 2\nseq_len = 16\nengine = \"candle\"\nprecision = \"fp32\"\n[hardware]\ngpu = \"cpu\"\n",
    )
    .unwrap();
    let (out, export) = (d.join("run"), d.join("hf"));
    let o = run(&[
        "train",
        plan.to_str().unwrap(),
        "--steps",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let o = run(&[
        "export",
        out.to_str().unwrap(),
        "--out",
        export.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(export.join(hf::CONFIG)).unwrap()).unwrap();
    for (key, want) in [
        ("architectures", serde_json::json!(["LlamaForCausalLM"])),
        ("model_type", "llama".into()),
        ("hidden_size", 64.into()),
        ("intermediate_size", 128.into()),
        ("num_key_value_heads", 2.into()),
        ("head_dim", 16.into()),
        ("rms_norm_eps", 1e-6.into()),
        ("rope_theta", 10000.0.into()),
        ("tie_word_embeddings", false.into()),
        ("dtype", "float32".into()),
    ] {
        assert_eq!(config[key], want, "{key}");
    }
    let l = checkpoint::latest(&out).unwrap();
    let (_, again) = hf::load_model(&export).unwrap();
    let trained = restored(&again.spec, &l);
    let tokens: Vec<u32> = (0..10).map(|i| (i * 37 + 11) % 256).collect();
    assert_eq!(
        max_diff(&logits_of(&again, &tokens), &logits_of(&trained, &tokens)),
        0.0
    );
}

/// The mean cross-entropy of `model` over the response bytes (and the blank line after
/// them) of `prompt\nresponse\n\n`, by hand from the logits.
fn response_loss(model: &Model, pairs: &[(String, String)]) -> f64 {
    let (mut sum, mut count) = (0.0, 0);
    for (p, r) in pairs {
        let bytes: Vec<u32> = format!("{p}\n{r}\n\n").bytes().map(u32::from).collect();
        let z = logits_of(model, &bytes[..bytes.len() - 1]);
        for (j, row) in z.iter().enumerate().skip(p.len()) {
            let mx = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
            let lse = mx + row.iter().map(|&v| (v as f64 - mx).exp()).sum::<f64>().ln();
            sum += lse - row[bytes[j + 1] as usize] as f64;
            count += 1;
        }
    }
    sum / count as f64
}

#[test]
fn sft_from_a_checkpoint_learns_and_logs_the_response_loss() {
    let pairs: Vec<(String, String)> = (0..40)
        .map(|i| (format!("what is {i} plus one?"), format!("{}", i + 1)))
        .collect();
    for case in ["llama", "qwen3"] {
        let d = tmp(&format!("sft-{case}"));
        let data_file = d.join("qa.jsonl");
        let lines: String = pairs
            .iter()
            .map(|(p, r)| serde_json::json!({"prompt": p, "response": r}).to_string() + "\n")
            .collect();
        std::fs::write(&data_file, lines).unwrap();
        let out = d.join("run");
        let o = run(&[
            "train",
            "--init",
            data(case).to_str().unwrap(),
            "--data",
            data_file.to_str().unwrap(),
            "--steps",
            "12",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", text(&o));
        assert!(
            text(&o).contains("prompt/response data: prompt, newline, response, blank line; one example a row, padded; loss on the response tokens only"),
            "{}",
            text(&o)
        );
        let losses = crate::train::losses(&out);
        let (first, last) = (losses[0].1, losses[losses.len() - 1].1);
        assert!(last < 0.6 * first, "{case}: loss {first} → {last}");
        // The validation loss logged is the held-out tenth's response loss.
        let l = checkpoint::latest(&out).unwrap();
        let (_, init) = hf::load_model(&data(case)).unwrap();
        let model = restored(&init.spec, &l);
        let want = response_loss(&model, &pairs[36..]);
        let got = crate::train::summary(&out)["val_loss"].as_f64().unwrap();
        assert!(
            (got - want).abs() < 1e-4,
            "{case}: val_loss {got}, by hand {want}"
        );
    }
}

/// The logits of `key` (`peft`, `merged`, `export`) in `tests/data/peft_CASE/reference.json`.
fn peft_reference(case: &str, key: &str) -> (Vec<u32>, Vec<Vec<f32>>) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/data/peft_{case}"));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path.join("reference.json")).unwrap())
            .unwrap();
    let tokens = serde_json::from_value(v["tokens"].clone()).unwrap();
    (tokens, serde_json::from_value(v[key].clone()).unwrap())
}

fn peft_data(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/data/peft_{case}"))
}

/// `train tests/data/peft_CASE/plan.toml --init CASE --data tests/data/peft_sft.jsonl`
/// (LoRA SFT, 50 steps) into `out`, exported to `export`.
fn lora_sft_and_export(case: &str, out: &Path, export: &Path) -> String {
    let plan = peft_data(case).join("plan.toml");
    let (plan, init, sft) = (plan.to_str().unwrap(), data(case), sft_data());
    let args = [
        plan,
        "--init",
        init.to_str().unwrap(),
        "--data",
        sft.to_str().unwrap(),
    ];
    train_then_export(&args, out, export)
}

#[test]
fn peft_loads_the_engines_lora_adapters_with_the_engines_logits() {
    // Reference: tests/data/peft_CASE/reference.json, tools/peft_reference.py (peft 0.21.2,
    // transformers 5.24.0, torch 2.15.0): the base from tests/data/hf_tiny/CASE, the
    // adapters of this run's export through `PeftModel.from_pretrained` (every tensor of
    // the file found under PEFT's own names), then `merge_and_unload()`, and
    // `from_pretrained` on the merged export. The run is repeated here: its adapters must
    // be the committed ones, and give PEFT's logits.
    use vramplan::engine::lora;
    for case in ["llama", "qwen3"] {
        let d = tmp(&format!("peft-{case}"));
        let (out, export) = (d.join("run"), d.join("hf"));
        let said = lora_sft_and_export(case, &out, &export);
        assert!(
            said.contains("model.safetensors (f32, adapters merged), adapter/adapter_config.json and adapter/adapter_model.safetensors (PEFT)"),
            "{said}"
        );
        let losses = crate::train::losses(&out);
        let (first, last) = (losses[0].1, losses[losses.len() - 1].1);
        assert!(last < 0.7 * first, "{case}: LoRA SFT loss {first} → {last}");
        // The checkpoint holds the adapters and their moments only.
        let l = checkpoint::latest(&out).unwrap();
        assert!(l.tensors.keys().all(|k| k.contains(".lora_")), "{case}");
        assert_eq!(
            l.tensors.len(),
            3 * 2 * 7 * 2,
            "{case}: A, B × 7 linears × 2 layers, and m, v"
        );
        // This run's adapters are the committed ones.
        let fresh = candle_core::safetensors::load(
            export.join("adapter").join(lora::ADAPTER_WEIGHTS),
            &Device::Cpu,
        )
        .unwrap();
        let committed = candle_core::safetensors::load(
            peft_data(case).join(lora::ADAPTER_WEIGHTS),
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(fresh.len(), committed.len(), "{case}");
        for (n, t) in &committed {
            let diff = (t - &fresh[n]).unwrap().abs().unwrap().max_all().unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() <= 1e-5, "{case}: {n}");
        }
        let (tokens, want) = peft_reference(case, "peft");
        let (_, untrained) = reference(&data(case).join("reference.json"));
        assert!(
            max_diff(&want, &untrained) > 0.05,
            "{case}: the adapters move the logits"
        );
        // The engine's base + PEFT's files (the committed and this run's) give PEFT's logits.
        for dir in [peft_data(case), export.join("adapter")] {
            let (_, mut model) = hf::load_model(&data(case)).unwrap();
            lora::load_peft(&mut model, &dir).unwrap();
            let diff = max_diff(&logits_of(&model, &tokens), &want);
            assert!(
                diff <= 1e-4,
                "{case}: max |engine − PEFT| = {diff} ({})",
                dir.display()
            );
        }
        // The merged export is PEFT's merge_and_unload, and transformers reads it so.
        let (_, merged) = hf::load_model(&export).unwrap();
        for key in ["merged", "export"] {
            let diff = max_diff(&logits_of(&merged, &tokens), &peft_reference(case, key).1);
            assert!(diff <= 1e-4, "{case}: max |merged export − {key}| = {diff}");
        }
    }
}
