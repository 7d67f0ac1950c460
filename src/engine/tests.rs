//! Gradient checks (f64): every parameter of each architecture gets the gradient that
//! central finite differences of the loss give, and the memory savers (chunked loss,
//! block checkpointing, accumulation) give the same gradients as the plain backward.

use super::model::Model;
use super::probe::NoProbe;
use super::rng::Rng;
use super::step::{eval_loss, forward_backward, Grads, Opts};
use candle_core::{DType, Device, Tensor};
use vramplan_planner::{Arch, ModelSpec};

fn spec(arch: Arch) -> ModelSpec {
    ModelSpec {
        name: format!("tiny-{arch}"),
        arch,
        hidden_size: 8,
        num_layers: 2,
        num_decoder_layers: 0,
        num_heads: 2,
        num_kv_heads: if arch == Arch::Nanochat { 2 } else { 1 },
        head_dim: 4,
        intermediate_size: 12,
        vocab_size: 16,
        tie_embeddings: arch == Arch::Llama,
        max_positions: 0,
        gated_ffn: false,
        features: Default::default(),
    }
}

const B: usize = 2;
const T: usize = 5;

fn batch(seed: u64) -> (Tensor, Tensor) {
    let mut r = Rng::new(seed);
    let x: Vec<u32> = (0..B * T).map(|_| r.below(16) as u32).collect();
    let y: Vec<u32> = (0..B * T).map(|_| r.below(16) as u32).collect();
    (
        Tensor::from_vec(x, B * T, &Device::Cpu).unwrap(),
        Tensor::from_vec(y, B * T, &Device::Cpu).unwrap(),
    )
}

fn model(arch: Arch) -> Model {
    let m = Model::new(
        &spec(arch),
        DType::F64,
        DType::F64,
        &Device::Cpu,
        &mut Rng::new(3),
    )
    .unwrap();
    // Norm weights start at 1 and biases at 0; perturb them so their gradients are not special.
    let mut r = Rng::new(5);
    for (n, v) in &m.params {
        if n.contains("norm") || n.ends_with(".bias") {
            let k = v.as_tensor().dim(0).unwrap();
            let w: Vec<f64> = (0..k).map(|_| 1.0 + 0.3 * r.normal()).collect();
            v.set(&Tensor::from_vec(w, k, &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    m
}

fn grads(m: &Model, opts: Opts, micro: &[u64]) -> Grads {
    let mut g = Grads::new();
    for s in micro {
        let (x, y) = batch(*s);
        forward_backward(m, &x, &y, B, opts, &mut g, &NoProbe).unwrap();
    }
    g
}

fn plain() -> Opts {
    Opts {
        chunk: B * T,
        checkpoint: false,
        scale: 1.0 / (B * T) as f64,
    }
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

#[test]
fn every_parameter_matches_finite_differences() {
    for arch in [Arch::Nanochat, Arch::Llama, Arch::Qwen2, Arch::Qwen3] {
        let m = model(arch);
        let g = grads(&m, plain(), &[1]);
        let (x, y) = batch(1);
        assert_eq!(
            g.len(),
            m.params.len(),
            "{arch}: a parameter got no gradient"
        );
        for (name, var) in &m.params {
            let gv = flat(&g[name]);
            assert!(
                gv.iter().any(|v| v.abs() > 1e-9),
                "{arch} {name}: zero gradient"
            );
            let spread = [0, gv.len() / 3, gv.len() / 2, gv.len() - 1];
            assert_finite_differences(var, &gv, &spread, &format!("{arch} {name}"), || {
                eval_loss(&m, &x, &y, B, B * T).unwrap()
            });
        }
    }
}

/// Asserts that `grad`, the backward's gradient of `var` flattened, is central finite
/// differences' of `loss` at its largest entry and at the indices `spread`.
pub(super) fn assert_finite_differences(
    var: &candle_core::Var,
    grad: &[f64],
    spread: &[usize],
    what: &str,
    mut loss: impl FnMut() -> f64,
) {
    let mut w = flat(var.as_tensor());
    let shape = var.as_tensor().shape().clone();
    let big = (0..grad.len())
        .max_by(|a, b| grad[*a].abs().total_cmp(&grad[*b].abs()))
        .unwrap();
    for &i in std::iter::once(&big).chain(spread) {
        let (h, orig) = (1e-5, w[i]);
        let mut at = |v: f64| {
            w[i] = v;
            var.set(&Tensor::from_vec(w.clone(), shape.clone(), &Device::Cpu).unwrap())
                .unwrap();
            loss()
        };
        let fd = (at(orig + h) - at(orig - h)) / (2.0 * h);
        at(orig);
        let err = (fd - grad[i]).abs();
        assert!(
            err <= 1e-6 + 1e-5 * grad[big].abs(),
            "{what}[{i}]: backward {} vs finite difference {fd}",
            grad[i]
        );
    }
}

fn assert_same(a: &Grads, b: &Grads, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (n, ga) in a {
        let (va, vb) = (flat(ga), flat(&b[n]));
        let scale = va.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-12);
        for (p, q) in va.iter().zip(&vb) {
            assert!((p - q).abs() <= 1e-5 * scale, "{what}: {n}: {p} vs {q}");
        }
    }
}

#[test]
fn chunked_loss_and_checkpointing_match_the_plain_backward() {
    for arch in [Arch::Nanochat, Arch::Llama, Arch::Qwen2, Arch::Qwen3] {
        let m = model(arch);
        let reference = grads(&m, plain(), &[1]);
        for (chunk, checkpoint) in [(3, false), (4, true), (B * T, true), (1, true)] {
            let g = grads(
                &m,
                Opts {
                    chunk,
                    checkpoint,
                    ..plain()
                },
                &[1],
            );
            assert_same(
                &reference,
                &g,
                &format!("{arch} chunk {chunk} checkpoint {checkpoint}"),
            );
        }
    }
}

/// Mixed precision (the CUDA path's bf16 compute, run here in f16 since candle's CPU matmul
/// has no bf16): the master weights and every gradient stay f32, and the gradients are
/// the f64 ones to within 16-bit rounding, with and without the memory savers.
#[test]
fn mixed_precision_gradients_match_the_f64_ones() {
    for arch in [Arch::Nanochat, Arch::Llama] {
        let exact = model(arch);
        let mixed = Model::new(
            &spec(arch),
            DType::F32,
            DType::F16,
            &Device::Cpu,
            &mut Rng::new(3),
        )
        .unwrap();
        for (n, v) in &mixed.params {
            v.set(&exact.params[n].as_tensor().to_dtype(DType::F32).unwrap())
                .unwrap();
        }
        let reference = grads(&exact, plain(), &[1]);
        for (chunk, checkpoint) in [(B * T, false), (4, true)] {
            let what = format!("{arch} chunk {chunk} checkpoint {checkpoint}");
            let g = grads(
                &mixed,
                Opts {
                    chunk,
                    checkpoint,
                    ..plain()
                },
                &[1],
            );
            assert_eq!(
                g.len(),
                mixed.params.len(),
                "{what}: a parameter got no gradient"
            );
            for (n, gm) in &g {
                assert_eq!(gm.dtype(), DType::F32, "{what}: {n}");
                let (a, b) = (flat(&gm.to_dtype(DType::F64).unwrap()), flat(&reference[n]));
                let norm = |v: &mut dyn Iterator<Item = f64>| v.map(|x| x * x).sum::<f64>().sqrt();
                let err =
                    norm(&mut a.iter().zip(&b).map(|(p, q)| p - q)) / norm(&mut b.iter().copied());
                // llama's k_proj reaches 1.35e-2 (its gradient cancels most at this
                // width of 8); f16 keeps 11 bits.
                assert!(err < 2e-2, "{what}: {n}: relative error {err:.2e}");
            }
        }
        let mut opt = super::optim::AdamW::new();
        opt.step(&mixed, grads(&mixed, plain(), &[1]), 1e-3)
            .unwrap();
        for (n, v) in &mixed.params {
            assert_eq!(v.as_tensor().dtype(), DType::F32, "{arch}: master {n}");
        }
    }
}

#[test]
fn accumulation_sums_micro_steps() {
    let m = model(Arch::Llama);
    let half = Opts {
        scale: 0.5 / (B * T) as f64,
        ..plain()
    };
    let acc = grads(
        &m,
        Opts {
            chunk: 4,
            checkpoint: true,
            ..half
        },
        &[1, 2],
    );
    let (a, b) = (grads(&m, half, &[1]), grads(&m, half, &[2]));
    let sum: Grads = a
        .iter()
        .map(|(n, g)| (n.clone(), (g + &b[n]).unwrap()))
        .collect();
    assert_same(&sum, &acc, "accumulation");
}

#[test]
fn builtin_corpus_entropy_is_consistent() {
    let c = super::data::builtin(&super::data::Tokens::Bytes).unwrap();
    let e = c.entropy.unwrap();
    assert!(e.rate > 0.5 && e.rate < (4f64).ln() + 1e-9, "{e:?}");
    // Empirical conditional entropy of the generated text is close to the exact rate.
    let super::data::Train::Tokens(train) = &c.train else {
        panic!("the built-in corpus is in memory");
    };
    let mut counts = std::collections::HashMap::new();
    for w in train.windows(2) {
        *counts.entry((w[0], w[1])).or_insert(0u64) += 1;
    }
    let mut from = std::collections::HashMap::new();
    for ((a, _), n) in &counts {
        *from.entry(*a).or_insert(0u64) += n;
    }
    let total: u64 = from.values().sum();
    let h: f64 = counts
        .iter()
        .map(|((a, _), n)| {
            let p = *n as f64 / from[a] as f64;
            -(*n as f64 / total as f64) * p.ln()
        })
        .sum();
    assert!(
        (h - e.rate).abs() < 0.01,
        "empirical {h} vs exact {}",
        e.rate
    );
}
