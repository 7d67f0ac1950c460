//! nanochat's dtypes where it trains on CUDA (karpathy/nanochat, `nanochat/gpt.py`).
//!
//! `GPT.init_weights` casts the token embedding to bf16 when the model lives on CUDA
//! (`self.transformer.wte.to(dtype=torch.bfloat16)`; at fe5aed9, the speedrun of October
//! 2025, the cast sits in `GPT.__init__` and applies on every device, and `base_train`
//! only runs on CUDA). So on CUDA `wte`'s weight, its gradient and its AdamW state are
//! bf16 (`torch.optim.AdamW` and nanochat's `DistAdamW` make their state with
//! `zeros_like`), and `wte(idx)` is bf16. nanochat's `norm` is `F.rms_norm` without a
//! weight, which autocast of torch 2.8 (nanochat's pin, `uv.lock`) does not list on any
//! device: it keeps its input's dtype, so the residual stream is bf16 from the embedding
//! on (the sums of bf16 tensors stay bf16). The norm computes in fp32 inside: eager, it
//! saves an fp32 copy of its bf16 input (what the CPU's decomposition saves); a norm's
//! bf16 output feeds the linears as it is, so autocast makes no copies of it.
//!
//! CUDA's autocast differs from the CPU's on one op nanochat runs: `pow` is on CUDA's
//! fp32 list (`aten/src/ATen/autocast_mode.cpp`, `KERNEL_CUDA(pow, Tensor_Scalar, fp32)`)
//! and `square` is `pow(x, 2)`: eager, ReLU² on CUDA saves an fp32 copy of the ReLU output
//! and makes relu² in fp32, which `c_proj` casts back to bf16 (and saves). Compiled, the
//! casts are part of the fused pointwise chain and the partitioner's cut is unchanged.
//!
//! On several GPUs nanochat does not wrap the model in DDP (`base_train.py` at fe5aed9):
//! its optimizers synchronize themselves after backward. `DistAdamW` (`nanochat/adamw.py`,
//! "in the style of ZeRO-2") reduce-scatters each gradient and keeps `exp_avg` and
//! `exp_avg_sq` for its rank's slice only; `DistMuon` (`nanochat/muon.py`) gives each
//! parameter one owner rank (block-cyclic within each shape group) that alone keeps its
//! momentum buffer. So there are no DDP gradient buckets, the gradients stay whole on every
//! rank, and the optimizer state is split over the ranks (modelled as an even split; rank 0
//! owns ⌈n / ranks⌉ of a shape group's n matrices, at most one matrix more).
//!
//! From torch 2.12 `rms_norm` is on CUDA's fp32 list (pytorch/pytorch#174824): the
//! residual stream would be fp32 again. Modelled is nanochat's pin, torch 2.8.

use super::block::{Block, Dims, Saved};
use super::recipe::Recipe;
use crate::params::{Param, Role};
use crate::spec::{EmbeddingDtype, Implementation, Precision, RunSpec, Sharding, TrainSpec};
use crate::units::DType;
use std::rc::Rc;

/// Whether the run's token embedding is bf16 under autocast (the residual stream too).
pub fn bf16_stream(t: &TrainSpec) -> bool {
    t.embedding_dtype == Some(EmbeddingDtype::Bf16) && t.precision == Precision::Bf16Autocast
}

/// Whether the run is nanochat's own data parallelism (`DistAdamW` and `DistMuon`, no DDP):
/// nanochat's code on several GPUs with plain data parallelism.
pub fn own_sync(spec: &RunSpec) -> bool {
    spec.train.implementation == Implementation::Nanochat
        && spec.hardware.gpus > 1
        && spec.hardware.sharding == Sharding::Ddp
}

/// The parameters with `wte` in bf16 where the run casts it.
pub fn cast_embedding(t: &TrainSpec, params: Rc<Vec<Param>>) -> Rc<Vec<Param>> {
    if t.embedding_dtype != Some(EmbeddingDtype::Bf16) {
        return params;
    }
    let mut p = (*params).clone();
    for w in p.iter_mut().filter(|w| w.role == Role::Embedding) {
        w.dtype = Some(DType::Bf16);
    }
    Rc::new(p)
}

/// CUDA's autocast in nanochat's eager block: ReLU² runs as `pow` on fp32, so its backward
/// keeps an fp32 copy of the ReLU output (B × T × 4H).
pub fn cuda_autocast(recipe: &mut Recipe, d: &Dims, compiled: bool) {
    if compiled || !d.autocast {
        return;
    }
    push(
        &mut recipe.encoder,
        "relu (fp32 copy: CUDA autocast's pow)",
        d,
        d.i,
    );
}

fn push(blk: &mut Block, name: &'static str, d: &Dims, width: u64) {
    blk.saved.push(Saved {
        name,
        layout: d.tok(width, DType::F32),
        attention_core: false,
        linears: &[],
    });
}
