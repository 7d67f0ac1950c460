//! One micro-step's forward and backward, with the memory savers of the plan:
//!
//! - chunked loss: the last block's output is split into row chunks; each chunk becomes
//!   its own leaf, its logits (f32), log-sum-exp and share of the mean loss are computed
//!   and backpropagated at once, and only the chunk's (detached) input gradient and the
//!   head's gradient are kept. Peak logits memory is one chunk's, not the batch's.
//! - full checkpointing: each block runs as two halves, `x + attn(norm(x))` and
//!   `h + mlp(norm(h))`, on detached inputs, and only each half's input is kept; backward
//!   recomputes one half at a time from a fresh leaf and backpropagates the surrogate
//!   `sum(out · grad_out)`, whose gradient with respect to the half's input and parameters
//!   is the chain rule's (candle has no way to seed `backward` with a gradient). Halves
//!   rather than whole blocks: candle keeps a graph's every intermediate through its
//!   backward, so half a block's graph at a time lowers the step's peak by 14–19 % on the
//!   plans of `tests/train.rs`.
//!
//! Every gradient kept is `detach`ed so no graph outlives its stage (CANDLE_NOTES).

use crate::engine::head_grad::HeadGradSum;
use crate::engine::model::{causal_mask, Model, Rope};
use crate::engine::probe::Probe;
use candle_core::{Result, Tensor, Var};
use std::collections::BTreeMap;

/// The rotary tables and the causal mask for sequences of `t`, on the model's device.
fn tables(model: &Model, t: usize) -> Result<(Rope, Tensor)> {
    Ok((
        Rope::new(model, t, model.compute)?,
        causal_mask(t, model.window(), model.dtype, &model.device)?,
    ))
}

/// Parameter gradients by name, accumulated over micro-steps.
pub type Grads = BTreeMap<String, Tensor>;

#[derive(Debug, Clone, Copy)]
pub struct Opts {
    /// Rows per loss chunk (at least the batch's rows for the plain loss).
    pub chunk: usize,
    pub checkpoint: bool,
    /// Multiplies the summed token losses: `1 / (tokens per micro-step · accumulation)`,
    /// or for SFT `1 / (response tokens of the optimizer step)`.
    pub scale: f64,
}

fn accumulate(grads: &mut Grads, name: &str, g: Tensor) -> Result<()> {
    let g = g.detach();
    match grads.remove(name) {
        Some(old) => {
            let sum = (old + g)?;
            grads.insert(name.to_string(), sum);
        }
        None => {
            grads.insert(name.to_string(), g);
        }
    }
    Ok(())
}

pub(crate) fn collect(
    model: &Model,
    store: &candle_core::backprop::GradStore,
    names: &[String],
    grads: &mut Grads,
) -> Result<()> {
    for n in names {
        if let Some(g) = store.get(model.p(n)) {
            accumulate(grads, n, g.clone())?;
        }
    }
    Ok(())
}

/// Runs forward and backward on `ids`/`targets` (`(N,)` u32, `N = b·t`), adds the
/// parameter gradients to `grads` and returns the summed (unscaled) token loss. `probe` is
/// told the end of each stage.
pub fn forward_backward(
    model: &Model,
    ids: &Tensor,
    targets: &Tensor,
    b: usize,
    opts: Opts,
    grads: &mut Grads,
    probe: &dyn Probe,
) -> Result<f64> {
    forward_backward_weighted(model, ids, targets, None, b, opts, grads, probe)
}

/// [`forward_backward`] with a weight per target (`(N,)` f32; 0: no loss): the loss is
/// the weighted sum of the token losses.
#[allow(clippy::too_many_arguments)]
pub fn forward_backward_weighted(
    model: &Model,
    ids: &Tensor,
    targets: &Tensor,
    weights: Option<&Tensor>,
    b: usize,
    opts: Opts,
    grads: &mut Grads,
    probe: &dyn Probe,
) -> Result<f64> {
    let (ids, targets) = (
        &ids.to_device(&model.device)?,
        &targets.to_device(&model.device)?,
    );
    let n = ids.dim(0)?;
    let t = n / b;
    let (rope, mask) = tables(model, t)?;
    let layers = model.num_layers();
    let emb_name = vec![model.embedding_name().to_string()];
    probe.mark("start");
    if opts.checkpoint {
        // Saved: each block's input and the output of its attention half.
        let mut inputs = vec![model.embed(ids)?.detach()];
        let mut mids = Vec::with_capacity(layers);
        for l in 0..layers {
            let h = model
                .attention_half(l, &inputs[l], b, &rope, &mask)?
                .detach();
            probe.mark(&format!("fwd {l} attn"));
            let x = model.mlp_half(l, &h)?.detach();
            mids.push(h);
            inputs.push(x);
            probe.mark(&format!("fwd {l}"));
        }
        let last = inputs.pop().expect("the embedding output");
        let (loss, mut g) = loss_stage_weighted(model, &last, targets, weights, opts, grads)?;
        drop(last);
        probe.mark("loss");
        for l in (0..layers).rev() {
            let mid = mids.pop().expect("one mid per block");
            g = half_backward(model, mid, &g, &model.half_params(l, false), grads, |x| {
                model.mlp_half(l, x)
            })?;
            probe.mark(&format!("bwd {l} mlp"));
            let input = inputs.pop().expect("one input per block");
            g = half_backward(model, input, &g, &model.half_params(l, true), grads, |x| {
                model.attention_half(l, x, b, &rope, &mask)
            })?;
            probe.mark(&format!("bwd {l}"));
        }
        embedding_backward(model, ids, &g, grads)?;
        probe.mark("emb");
        Ok(loss)
    } else {
        let mut x = model.embed(ids)?;
        for l in 0..layers {
            x = model.block(l, &x, b, &rope, &mask)?;
        }
        probe.mark("fwd");
        let last = x.detach();
        let (loss, g) = loss_stage_weighted(model, &last, targets, weights, opts, grads)?;
        drop(last);
        probe.mark("loss");
        let store = (x * &g)?.sum_all()?.backward()?;
        drop(g);
        let mut names = emb_name;
        for l in 0..layers {
            names.extend(model.block_params(l));
        }
        collect(model, &store, &names, grads)?;
        drop(store);
        probe.mark("bwd");
        Ok(loss)
    }
}

/// The embedding's gradient from `g`, the gradient of its output; none for a frozen
/// embedding (LoRA).
fn embedding_backward(model: &Model, ids: &Tensor, g: &Tensor, grads: &mut Grads) -> Result<()> {
    let name = model.embedding_name();
    if model.trains(name) {
        let store = (model.embed(ids)? * g)?.sum_all()?.backward()?;
        collect(model, &store, &[name.to_string()], grads)?;
    }
    Ok(())
}

/// Recomputes `f` from a fresh leaf holding `input`, backpropagates `sum(f(leaf) · grad)`,
/// adds the gradients of `params` and returns the (detached) gradient of `input`.
pub(crate) fn half_backward(
    model: &Model,
    input: Tensor,
    grad: &Tensor,
    params: &[String],
    grads: &mut Grads,
    f: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let leaf = Var::from_tensor(&input)?;
    drop(input);
    let out = f(leaf.as_tensor())?;
    let store = (out * grad)?.sum_all()?.backward()?;
    collect(model, &store, params, grads)?;
    match store.get(leaf.as_tensor()) {
        Some(x) => Ok(x.detach()),
        None => candle_core::bail!("a checkpointed input got no gradient"),
    }
}

/// The chunked loss: returns the summed token loss and the gradient of `last` (detached).
pub fn loss_stage(
    model: &Model,
    last: &Tensor,
    targets: &Tensor,
    opts: Opts,
    grads: &mut Grads,
) -> Result<(f64, Tensor)> {
    loss_stage_weighted(model, last, targets, None, opts, grads)
}

/// [`loss_stage`] with a weight per target row (`(N,)`; 0: no loss).
pub fn loss_stage_weighted(
    model: &Model,
    last: &Tensor,
    targets: &Tensor,
    weights: Option<&Tensor>,
    opts: Opts,
    grads: &mut Grads,
) -> Result<(f64, Tensor)> {
    let n = last.dim(0)?;
    let chunk = opts.chunk.clamp(1, n);
    let head = model.head_params();
    let sum = model.head_grad_sum(grads);
    let mut parts = Vec::with_capacity(n.div_ceil(chunk));
    let mut total = 0.0;
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let leaf = Var::from_tensor(&last.narrow(0, start, len)?)?;
        let tg = targets.narrow(0, start, len)?.unsqueeze(1)?;
        let rows = Rows {
            weights,
            start,
            len,
        };
        let ls = chunk_loss(model, leaf.as_tensor(), &tg, rows, sum.as_ref())?;
        total += ls.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        let store = (ls * opts.scale)?.backward()?;
        collect(model, &store, &head, grads)?;
        match store.get(leaf.as_tensor()) {
            Some(g) => parts.push(g.detach()),
            None => candle_core::bail!("loss chunk input got no gradient"),
        }
        start += len;
    }
    if let Some(g) = sum.map(|s| s.take()).transpose()?.flatten() {
        grads.insert(model.head_name().to_string(), g);
    }
    let g = if parts.len() == 1 {
        parts.pop().expect("one part")
    } else {
        Tensor::cat(&parts, 0)?
    };
    Ok((total, g))
}

/// Rows `start..start + len` of the batch, and the weight of every row when given.
#[derive(Clone, Copy)]
struct Rows<'a> {
    weights: Option<&'a Tensor>,
    start: usize,
    len: usize,
}

/// The summed loss of `h`, `rows` of the batch, weighted by those rows of `weights`
/// (which may be on the CPU) when given; the head's gradient into `sum` where given.
fn chunk_loss(
    model: &Model,
    h: &Tensor,
    targets: &Tensor,
    rows: Rows,
    sum: Option<&HeadGradSum>,
) -> Result<Tensor> {
    match rows.weights {
        Some(w) => {
            let w = w
                .narrow(0, rows.start, rows.len)?
                .to_device(&model.device)?;
            model.weighted_loss_sum(h, targets, &w.unsqueeze(1)?, sum)
        }
        None => model.loss_sum(h, targets, sum),
    }
}

/// The mean token loss of `ids`/`targets` without gradients (validation).
pub fn eval_loss(
    model: &Model,
    ids: &Tensor,
    targets: &Tensor,
    b: usize,
    chunk: usize,
) -> Result<f64> {
    let n = ids.dim(0)?;
    Ok(eval_loss_sum(model, ids, targets, None, b, chunk)? / n as f64)
}

/// The summed (weighted) token loss of `ids`/`targets` without gradients.
pub fn eval_loss_sum(
    model: &Model,
    ids: &Tensor,
    targets: &Tensor,
    weights: Option<&Tensor>,
    b: usize,
    chunk: usize,
) -> Result<f64> {
    let (ids, targets) = (
        &ids.to_device(&model.device)?,
        &targets.to_device(&model.device)?,
    );
    let n = ids.dim(0)?;
    let t = n / b;
    let (rope, mask) = tables(model, t)?;
    let mut x = model.embed(ids)?.detach();
    for l in 0..model.num_layers() {
        x = model.block(l, &x, b, &rope, &mask)?.detach();
    }
    chunked_loss_sum(model, &x, targets, weights, chunk)
}

/// The summed (weighted) token loss of the last block's output `x`, `chunk` rows at a
/// time, without gradients.
pub(crate) fn chunked_loss_sum(
    model: &Model,
    x: &Tensor,
    targets: &Tensor,
    weights: Option<&Tensor>,
    chunk: usize,
) -> Result<f64> {
    let n = x.dim(0)?;
    let chunk = chunk.clamp(1, n);
    let mut total = 0.0;
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let tg = targets.narrow(0, start, len)?.unsqueeze(1)?;
        let h = x.narrow(0, start, len)?.contiguous()?;
        let ls = chunk_loss(
            model,
            &h,
            &tg,
            Rows {
                weights,
                start,
                len,
            },
            None,
        )?;
        total += ls.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        start += len;
    }
    Ok(total)
}

/// The last block's output `(T, C)` for one sequence `ids` `(T,)`, without gradients.
fn hidden(model: &Model, ids: &Tensor) -> Result<Tensor> {
    let ids = &ids.to_device(&model.device)?;
    let t = ids.dim(0)?;
    let (rope, mask) = tables(model, t)?;
    let mut x = model.embed(ids)?.detach();
    for l in 0..model.num_layers() {
        x = model.block(l, &x, 1, &rope, &mask)?.detach();
    }
    Ok(x)
}

/// The logits of the last position of one sequence `ids` `(T,)`, as f32.
pub fn last_logits(model: &Model, ids: &Tensor) -> Result<Vec<f32>> {
    let x = hidden(model, ids)?;
    let t = x.dim(0)?;
    let z = model.logits(&x.narrow(0, t - 1, 1)?.contiguous()?)?;
    z.squeeze(0)?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1::<f32>()
}

/// The logits of every position of one sequence `ids` `(T,)`: `T` rows of the vocabulary,
/// as f32 (row `i` predicts token `i + 1`).
pub fn all_logits(model: &Model, ids: &Tensor) -> Result<Vec<Vec<f32>>> {
    let x = hidden(model, ids)?;
    model
        .logits(&x)?
        .to_dtype(candle_core::DType::F32)?
        .to_vec2::<f32>()
}
