//! LoRA in f64 on tiny models: `B = 0` is the base model exactly; every adapter's
//! gradient is central finite differences' (with checkpointing and the chunked loss too);
//! the base gets no gradient and does not move under AdamW; merging gives the adapted
//! logits; PEFT's files read back as written.

use super::*;
use crate::engine::optim::AdamW;
use crate::engine::probe::NoProbe;
use crate::engine::step::{all_logits, eval_loss, forward_backward, Grads, Opts};
use candle_core::DType;
use vramplan_planner::{Arch, ModelSpec};

fn spec(arch: Arch) -> ModelSpec {
    ModelSpec {
        name: format!("tiny-{arch}"),
        arch,
        hidden_size: 8,
        num_layers: 2,
        num_decoder_layers: 0,
        num_heads: 2,
        num_kv_heads: 1,
        head_dim: 4,
        intermediate_size: 12,
        vocab_size: 16,
        tie_embeddings: arch != Arch::Qwen2,
        max_positions: 0,
        gated_ffn: false,
        features: Default::default(),
    }
}

const B: usize = 2;
const T: usize = 5;
const ARCHS: [Arch; 3] = [Arch::Llama, Arch::Qwen2, Arch::Qwen3];

fn all_linear() -> Adapters {
    Adapters {
        rank: 3,
        alpha: 6.0,
        targets: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
        .map(String::from)
        .to_vec(),
    }
}

/// PEFT's default targets for llama-like models.
fn qv() -> Adapters {
    Adapters {
        rank: 2,
        alpha: 16.0,
        targets: vec!["q_proj".into(), "v_proj".into()],
    }
}

fn base(arch: Arch) -> Model {
    Model::new(
        &spec(arch),
        DType::F64,
        DType::F64,
        &Device::Cpu,
        &mut Rng::new(3),
    )
    .unwrap()
}

/// The base with adapters on `ad`'s linears, `B` random (`randomize`) or PEFT's zeros.
fn adapted(arch: Arch, ad: Adapters, randomize: bool) -> Model {
    let mut m = base(arch);
    apply(&mut m, ad, &mut Rng::new(4)).unwrap();
    if randomize {
        let mut r = Rng::new(9);
        for (n, v) in &m.params {
            if n.contains("lora_B") {
                let shape = v.as_tensor().shape().clone();
                let w: Vec<f64> = (0..shape.elem_count()).map(|_| 0.3 * r.normal()).collect();
                v.set(&Tensor::from_vec(w, shape, &Device::Cpu).unwrap())
                    .unwrap();
            }
        }
    }
    m
}

fn batch(seed: u64) -> (Tensor, Tensor) {
    let mut r = Rng::new(seed);
    let mut ids = |_| r.below(16) as u32;
    let x: Vec<u32> = (0..B * T).map(&mut ids).collect();
    let y: Vec<u32> = (0..B * T).map(&mut ids).collect();
    (
        Tensor::from_vec(x, B * T, &Device::Cpu).unwrap(),
        Tensor::from_vec(y, B * T, &Device::Cpu).unwrap(),
    )
}

fn plain() -> Opts {
    Opts {
        chunk: B * T,
        checkpoint: false,
        scale: 1.0 / (B * T) as f64,
    }
}

fn grads(m: &Model, opts: Opts) -> Grads {
    let (x, y) = batch(1);
    let mut g = Grads::new();
    forward_backward(m, &x, &y, B, opts, &mut g, &NoProbe).unwrap();
    g
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

fn logits(m: &Model) -> Vec<Vec<f32>> {
    let ids = Tensor::from_vec(
        (0..9u32).map(|i| (i * 5 + 2) % 16).collect(),
        9,
        &Device::Cpu,
    );
    all_logits(m, &ids.unwrap()).unwrap()
}

#[test]
fn zero_b_gives_the_base_models_logits_exactly() {
    for arch in ARCHS {
        let want = logits(&base(arch));
        let m = adapted(arch, all_linear(), false);
        assert_eq!(
            m.params.len(),
            2 * 7 * 2,
            "{arch}: A and B on 7 linears × 2 layers"
        );
        assert_eq!(logits(&m), want, "{arch}");
        // A is PEFT's kaiming_uniform(a = √5): U(−1/√in, 1/√in).
        let a = flat(m.params["layers.1.mlp.down_proj.lora_A.weight"].as_tensor());
        let bound = 1.0 / 12f64.sqrt();
        assert!(a.iter().all(|v| v.abs() <= bound), "{arch}");
        assert!(a.iter().any(|v| v.abs() > 0.8 * bound), "{arch}");
    }
}

#[test]
fn adapter_gradients_match_finite_differences_and_the_base_gets_none() {
    for arch in ARCHS {
        let m = adapted(arch, all_linear(), true);
        let g = grads(&m, plain());
        let mut names: Vec<&String> = g.keys().collect();
        names.sort();
        assert_eq!(
            names,
            m.params.keys().collect::<Vec<_>>(),
            "{arch}: adapters only"
        );
        let (x, y) = batch(1);
        for (name, var) in &m.params {
            let gv = flat(&g[name]);
            assert!(gv.iter().any(|v| v.abs() > 1e-9), "{arch} {name}: zero");
            let spread = [0, gv.len() / 2, gv.len() - 1];
            crate::engine::tests::assert_finite_differences(
                var,
                &gv,
                &spread,
                &format!("{arch} {name}"),
                || eval_loss(&m, &x, &y, B, B * T).unwrap(),
            );
        }
        // The memory savers give the same adapter gradients.
        for opts in [
            Opts {
                chunk: 3,
                checkpoint: true,
                ..plain()
            },
            Opts {
                chunk: 4,
                checkpoint: false,
                ..plain()
            },
        ] {
            let other = grads(&m, opts);
            assert_eq!(other.len(), g.len(), "{arch} {opts:?}");
            for (n, a) in &g {
                let (p, q) = (flat(a), flat(&other[n]));
                let scale = p.iter().fold(1e-12f64, |s, v| s.max(v.abs()));
                let d = p
                    .iter()
                    .zip(&q)
                    .fold(0.0f64, |s, (a, b)| s.max((a - b).abs()));
                assert!(d <= 1e-9 * scale.max(1.0), "{arch} {opts:?} {n}: {d}");
            }
        }
    }
}

#[test]
fn adamw_moves_the_adapters_and_not_the_base() {
    for arch in ARCHS {
        let m = adapted(arch, qv(), false);
        let before: BTreeMap<String, Vec<f64>> =
            m.frozen.iter().map(|(n, t)| (n.clone(), flat(t))).collect();
        let b0 = flat(m.params["layers.0.self_attn.v_proj.lora_B.weight"].as_tensor());
        let mut opt = AdamW::new();
        for _ in 0..3 {
            let g = grads(&m, plain());
            opt.step(&m, g, 1e-2).unwrap();
        }
        for (n, t) in &m.frozen {
            assert_eq!(flat(t), before[n], "{arch}: base {n} moved");
        }
        let mut state: Vec<&String> = opt.state.keys().collect();
        state.sort();
        assert_eq!(
            state,
            m.params.keys().collect::<Vec<_>>(),
            "{arch}: state of adapters only"
        );
        let b3 = flat(m.params["layers.0.self_attn.v_proj.lora_B.weight"].as_tensor());
        assert_ne!(b0, b3, "{arch}: B moved");
    }
}

#[test]
fn merging_gives_the_adapted_logits_and_peft_files_read_back() {
    for arch in ARCHS {
        let m = adapted(arch, all_linear(), true);
        let merged = merged(&m).unwrap();
        assert!(merged.frozen.is_empty() && merged.lora.is_none());
        assert_eq!(merged.params.len(), m.frozen.len());
        let (a, b) = (logits(&m), logits(&merged));
        let d = a
            .iter()
            .flatten()
            .zip(b.iter().flatten())
            .fold(0f32, |s, (p, q)| s.max((p - q).abs()));
        assert!(d <= 1e-5, "{arch}: merged logits differ by {d}");
        assert_ne!(
            a,
            logits(&base(arch)),
            "{arch}: the adapters change the logits"
        );
        let dir = std::env::temp_dir().join(format!("vramplan-peft-{}-{arch}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        write_peft(&m, Some("tiny"), &dir).unwrap();
        let mut again = base(arch);
        load_peft(&mut again, &dir).unwrap();
        assert_eq!(again.lora, m.lora);
        assert_eq!(logits(&again), a, "{arch}");
        let v: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(ADAPTER_CONFIG)).unwrap())
                .unwrap();
        assert_eq!(
            (v["r"].as_u64(), v["lora_alpha"].as_f64()),
            (Some(3), Some(6.0))
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
