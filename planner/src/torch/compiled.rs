//! `torch.compile`: what AOTAutograd's min-cut partitioner keeps for backward instead of
//! eager autograd's saved tensors (torch 2.15, `torch/_functorch/partitioners.py`,
//! `min_cut_rematerialization_partition`, inductor's default).
//!
//! The partitioner sees forward and backward as one graph and cuts it where the fewest
//! bytes cross: pointwise chains (casts, the norm's scale, RoPE, SiLU, the product of the
//! gated MLP, the residual adds) are fused and recomputed in backward from their inputs;
//! what cannot be recomputed cheaply is kept: the outputs of matmuls and of the attention
//! kernel, the statistics of reductions (a norm's reciprocal RMS, the loss's row maximum
//! and log-sum-exp), and the residual stream. So a block keeps one compute-precision copy of
//! each matmul input (autocast's per-linear copies become one fused cast), no fp32
//! normalized activations, and the loss keeps its logits in compute precision instead of
//! eager's fp32 copy and `log_softmax` output.
//!
//! What each block keeps was read from the saved-tensor hooks of the compiled step
//! (`saved_tensors_hooks` see `CompiledFunction`'s `save_for_backward`) on the CPU and is
//! checked against the memory timeline (`tools/measure_frameworks.py`,
//! `tests/data/torch_frameworks.json`). Per block, with N tokens (B × T):
//! - transformers' Llama (and torchtune's, torchtitan's): the norm's rstd (N fp32), the
//!   normed input cast once (N·H·c), the attention kernel's q, k, v, output and
//!   log-sum-exp, with k and v expanded to all heads (the compiled graph decomposes
//!   `repeat_kv`/`expand` before the attention), the mid-block residual (N·H·r) and its rstd,
//!   the MLP input cast (N·H·c), gate, up and their product (3·N·I·c); transformers also
//!   materializes the causal mask (B × 1 × T × T, c) once for all blocks.
//! - nanochat's GPT: as above, but q and k are kept as the projections' outputs with the
//!   QK-norm's rstd (rotation and norm are recomputed), the MLP keeps `c_fc`'s output and
//!   relu² (N·4H·c each).

use super::block::{self, Block, Dims, Saved};
use super::recipe::{Implementation, Recipe};
use crate::spec::{Arch, ModelSpec, TrainSpec};
use crate::timeline::Layout;
use crate::units::DType;

fn keep(blk: &mut Block, name: &'static str, layout: Layout, attention_core: bool) {
    blk.saved.push(Saved {
        name,
        layout,
        attention_core,
        // What the compiled graph keeps under LoRA is not modelled (the config refuses it).
        linears: &[],
    });
}

/// One fp32 statistic per token (and per head where `per` > 1): a norm's rstd.
fn rows(d: &Dims, per: u64) -> Layout {
    Layout::new(&[d.b, d.t, per], DType::F32)
}

/// The attention kernel's saved inputs and outputs; `kv` is the width k and v reach it at.
fn attention(blk: &mut Block, d: &Dims, kv: u64) {
    keep(blk, "attention q", d.tok(d.q, d.c), true);
    keep(blk, "attention k", d.tok(kv, d.c), true);
    keep(blk, "attention v", d.tok(kv, d.c), true);
    keep(blk, "attention output", d.tok(d.q, d.c), true);
    keep(
        blk,
        "log-sum-exp",
        Layout::new(&[d.b, d.heads, d.t], DType::F32),
        true,
    );
}

/// The residual after attention and the MLP's norm (rstd and the cast of its output).
fn mid_block(blk: &mut Block, d: &Dims) {
    keep(blk, "residual after attention", d.tok(d.h, d.r), false);
    keep(blk, "mlp norm rstd", rows(d, 1), false);
    keep(blk, "mlp input (cast once)", d.tok(d.h, d.c), false);
}

/// A Llama block as the partitioner cuts it; `kv` is the width of k and v at the kernel.
pub fn llama(d: &Dims, kv: u64) -> Block {
    let mut blk = Block {
        compiled: true,
        ..Block::default()
    };
    keep(&mut blk, "attention norm rstd", rows(d, 1), false);
    keep(&mut blk, "qkv input (cast once)", d.tok(d.h, d.c), false);
    attention(&mut blk, d, kv);
    mid_block(&mut blk, d);
    keep(&mut blk, "gate", d.tok(d.i, d.c), false);
    keep(&mut blk, "up", d.tok(d.i, d.c), false);
    keep(&mut blk, "silu(gate) * up", d.tok(d.i, d.c), false);
    // o_proj's output before the residual add; in backward the gradients of gate and up
    // (one fused kernel) beside the gradient of their product (measured where a
    // checkpointed compiled block's backward is the peak: torchtitan, `FullAC`).
    blk.fwd_transient = d.tok(d.h, d.c);
    blk.bwd_transient = d.tok_n(3, d.i, d.c);
    blk
}

/// nanochat's block as the partitioner cuts it.
pub fn nanochat(d: &Dims) -> Block {
    let mut blk = Block::default();
    keep(&mut blk, "attention norm rstd", rows(d, 1), false);
    keep(
        &mut blk,
        "c_q/c_k/c_v input (cast once)",
        d.tok(d.h, d.c),
        false,
    );
    keep(&mut blk, "c_q output", d.tok(d.q, d.c), false);
    keep(&mut blk, "q norm rstd", rows(d, d.heads), false);
    keep(&mut blk, "c_k output", d.tok(d.k, d.c), false);
    let kv_heads = d.k.saturating_mul(d.heads) / d.q.max(1);
    keep(&mut blk, "k norm rstd", rows(d, kv_heads), false);
    attention(&mut blk, d, d.k);
    mid_block(&mut blk, d);
    keep(&mut blk, "c_fc output", d.tok(d.i, d.c), false);
    keep(&mut blk, "relu²", d.tok(d.i, d.c), false);
    blk.fwd_transient = d.tok(d.h, d.c);
    blk.bwd_transient = Layout::concat(&[d.tok_n(2, d.i, d.c), d.tok(d.h, d.r)]);
    blk
}

/// What the final norm leaves for the head's backward: its rstd and the head's input,
/// cast once.
pub fn head(d: &Dims) -> Vec<(&'static str, Layout)> {
    vec![
        ("final norm rstd", rows(d, 1)),
        ("lm_head input (cast once)", d.tok(d.h, d.c)),
    ]
}

/// transformers' compiled forward materializes the causal mask (B × 1 × T × T) once, in
/// the compute dtype, and the attention of every block saves it.
pub fn causal_mask(m: &ModelSpec, t: &TrainSpec, d: &Dims) -> Option<Layout> {
    matches!(m.arch, Arch::Llama | Arch::Qwen2)
        .then(|| Layout::new(&[t.micro_batch, 1, t.seq_len, t.seq_len], d.c))
}

/// transformers' modeling files and nanochat's `gpt.py` under `torch.compile`: the eager
/// recipe's embedding, the blocks and the final norm as the partitioner cuts them.
pub struct CompiledTransformers;

impl Implementation for CompiledTransformers {
    fn recipe(&self, m: &ModelSpec, t: &TrainSpec) -> Recipe {
        let d = Dims::new(m, t);
        let eager = block::Transformers.recipe(m, t);
        let mut stem = eager.stem;
        if m.arch == Arch::Nanochat {
            // The partitioner saves the embedding itself, in its own dtype, and recomputes
            // the norm's fp32 upcast in backward (eager keeps that upcast).
            stem[0] = ("embedding output", d.tok(d.h, d.r));
        }
        if let Some(mask) = causal_mask(m, t, &d) {
            stem.insert(0, ("causal mask (materialized)", mask));
        }
        let encoder = match m.arch {
            Arch::Nanochat => nanochat(&d),
            _ => llama(&d, d.q),
        };
        Recipe {
            rope: eager.rope,
            stem,
            encoder,
            decoder: None,
            head: Some(head(&d)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::checkpoint;
    use super::super::torchtitan::Torchtitan;
    use super::super::torchtune::Torchtune;
    use super::*;
    use crate::config::{Context, RawConfig};
    use crate::presets::Presets;
    use crate::spec::{Implementation as Code, RunSpec};
    use proptest::prelude::*;

    /// A block's saved bytes without the norms' per-row rstd, which the eager
    /// inventory leaves out (they are 1/H of a saved activation).
    fn saved_bytes(r: &Recipe) -> u64 {
        r.encoder
            .saved
            .iter()
            .filter(|s| !s.name.ends_with("rstd"))
            .map(|s| s.layout.bytes().0)
            .sum()
    }

    /// The run of a two-block model of `arch` with `heads` (`kv` of them for keys and
    /// values) of `head_dim`, an MLP `ffn` times the width, `b × t` tokens, and `train`
    /// (more `[train]` lines).
    #[allow(clippy::too_many_arguments)]
    fn run_of(
        arch: &str,
        heads: u64,
        kv: u64,
        head_dim: u64,
        ffn: u64,
        b: u64,
        t: u64,
        train: &str,
    ) -> (RunSpec, String) {
        let hidden = heads * head_dim;
        let toml = format!(
            "[model]\narch = \"{arch}\"\nhidden_size = {hidden}\nnum_layers = 2\nnum_heads = {heads}\nnum_kv_heads = {kv}\nintermediate_size = {}\nvocab_size = 1000\n[train]\nmicro_batch = {b}\nseq_len = {t}\n{train}",
            hidden * ffn
        );
        let spec = RawConfig::from_toml(&toml)
            .unwrap()
            .resolve(&Presets::builtin().unwrap(), &Context::default())
            .unwrap();
        (spec, toml)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        /// What a compiled block keeps for backward is never more than what eager autograd
        /// keeps for the same block, for every modelled implementation and precision
        /// (head_dim × heads = hidden, as these architectures build it).
        #[test]
        fn compile_never_increases_the_saved_set(
            arch in prop::sample::select(vec!["llama", "qwen2", "nanochat"]),
            tune in any::<bool>(),
            heads_pow in 0u32..5,
            kv_pow in 0u32..5,
            head_dim in prop::sample::select(vec![32u64, 64, 128]),
            ffn in 1u64..5,
            b in 1u64..9,
            t in 1u64..4097,
            precision in prop::sample::select(vec!["fp32", "bf16-autocast", "fp16-autocast", "bf16"]),
        ) {
            let heads = 1u64 << heads_pow;
            let kv = 1u64 << kv_pow.min(heads_pow);
            let code = match arch {
                "nanochat" => "nanochat",
                "llama" if tune => "torchtune",
                _ => "hf",
            };
            let train = format!("precision = \"{precision}\"\nimplementation = \"{code}\"\n");
            let (mut spec, toml) = run_of(arch, heads, kv, head_dim, ffn, b, t, &train);
            let (m, eager_t) = (&spec.model, spec.train.clone());
            let compiled_t = TrainSpec { compile: true, ..eager_t.clone() };
            let (eager, compiled) = match spec.train.implementation {
                Code::Torchtune => (Torchtune.recipe(m, &eager_t), Torchtune.recipe(m, &compiled_t)),
                _ => (block::Transformers.recipe(m, &eager_t), CompiledTransformers.recipe(m, &compiled_t)),
            };
            prop_assert!(saved_bytes(&compiled) <= saved_bytes(&eager), "{toml}");
            spec.train = compiled_t;
            prop_assert!(crate::config::check_run(&spec).is_ok(), "{toml}");
        }

        /// Compiled over torchtitan's `SelectiveAC`, a block keeps no more after its
        /// forward than the eager op policy keeps, on the CPU and on CUDA.
        #[test]
        fn compile_never_increases_what_the_op_policy_keeps(
            heads_pow in 0u32..5,
            kv_pow in 0u32..5,
            head_dim in prop::sample::select(vec![32u64, 64, 128]),
            ffn in 1u64..5,
            b in 1u64..9,
            t in 1u64..4097,
            precision in prop::sample::select(vec!["fp32", "bf16-autocast", "bf16"]),
            cuda in any::<bool>(),
        ) {
            let heads = 1u64 << heads_pow;
            let kv = 1u64 << kv_pow.min(heads_pow);
            let train = format!(
                "precision = \"{precision}\"\nimplementation = \"torchtitan\"\ncheckpointing = \"selective-op\"\n"
            );
            let (mut spec, toml) = run_of("llama", heads, kv, head_dim, ffn, b, t, &train);
            let (m, eager_t) = (&spec.model, spec.train.clone());
            let compiled_t = TrainSpec { compile: true, ..eager_t.clone() };
            let d = Dims::new(m, &eager_t);
            let kept = |t: &TrainSpec| -> u64 {
                let r = Torchtitan.recipe(m, t);
                checkpoint::kept_layouts(t.checkpointing, 1, &r.encoder, &d, cuda)
                    .iter()
                    .map(|l| l.bytes().0)
                    .sum()
            };
            prop_assert!(kept(&compiled_t) <= kept(&eager_t), "{toml}");
            spec.train = compiled_t;
            prop_assert!(crate::config::check_run(&spec).is_ok(), "{toml}");
        }
    }
}
