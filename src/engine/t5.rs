//! T5 (`T5ForConditionalGeneration` of transformers 5.24 `models/t5/modeling_t5.py`), the
//! architecture of ChatLM-mini-Chinese: an encoder over the prompt, a decoder over the
//! response with cross-attention to the encoder's output.
//!
//! - Norm (`T5LayerNorm`): `w · x / sqrt(mean(x²) + eps)`, no mean, no bias, statistics in
//!   f32; before each sub-layer (pre-norm), and a final norm at the end of each stack.
//! - Attention: `softmax(q·kᵀ + bias + mask)·v` *without* the `1/√d` scaling; the
//!   relative position bias is an embedding of `(buckets, heads)` held by block 0 of each
//!   stack and added in every block of that stack (`compute_bias`, shared through
//!   `position_bias`); buckets are bidirectional in the encoder and causal in the decoder
//!   (`_relative_position_bucket`: half exact, half logarithmic up to `max_distance`).
//!   Cross-attention has no bias, only the encoder's padding mask.
//! - Feed-forward: `wo(relu(wi(x)))`, or `wo(gelu_new(wi_0(x)) · wi_1(x))` for
//!   `feed_forward_proj = "gated-gelu"`.
//! - One shared embedding for both stacks and the head; with tied embeddings (the only
//!   form the engine runs) the decoder's output is scaled by `d_model^-0.5` before the
//!   head (`scale_decoder_outputs`).
//! - Training input (`engine::sft`): the prompt's tokens feed the encoder (pads masked out
//!   of every key), the labels are the response's; the decoder reads the labels shifted
//!   right behind `decoder_start_token_id` (`_shift_right`), and padded labels have no
//!   loss (transformers' -100). Dropout is not applied (a rate of 0).
//!
//! Parameters are named as [`vramplan_planner::parameters`] lists them: encoder blocks
//! `layers.0..L`, decoder blocks `layers.L..L+D` (each with `self_attn`, `cross_attn` in
//! the decoder, `ffn`), `encoder.final_layer_norm`, `decoder.final_layer_norm`,
//! `shared.weight`; block 0 of each stack has `self_attn.relative_attention_bias`, stored
//! as transformers' `(buckets, heads)`.

use crate::engine::model::{causal_mask, frozen_op, wide, Model};
use crate::engine::probe::Probe;
use crate::engine::rng::Rng;
use crate::engine::sft::Micro;
use crate::engine::step::{self, Grads, Opts};
use candle_core::{DType, Device, Result, Tensor, Var, D};
use std::collections::BTreeMap;
use vramplan_planner::{ModelSpec, Role};

/// The relative-position buckets the planner's parameter list has (transformers' default,
/// ChatLM-mini-Chinese's).
pub const BUCKETS: usize = 32;

/// The additive mask value for a padded key (transformers adds its dtype's minimum).
const MASKED: f32 = -1e9;

/// The position-bias table of the stack whose block 0 is `layers.{first}`.
fn bias_name(first: usize) -> String {
    format!("layers.{first}.self_attn.relative_attention_bias")
}

/// transformers' `_init_weights` for T5 (`initializer_factor` 1): the shared embedding
/// `N(0, 1)`, q `N(0, (d·d_kv)^-½)`, k and v `N(0, d^-½)`, o `N(0, (H·d_kv)^-½)`, wi
/// `N(0, d^-½)`, wo `N(0, d_ff^-½)`, the position bias `N(0, d^-½)`, norms 1.
pub fn init(
    spec: &ModelSpec,
    dtype: DType,
    device: &Device,
    rng: &mut Rng,
) -> Result<BTreeMap<String, Var>> {
    let (d, dkv, h, ff) = (
        spec.hidden_size as f64,
        spec.head_dim as f64,
        spec.num_heads as f64,
        spec.intermediate_size as f64,
    );
    let mut params = BTreeMap::new();
    for p in vramplan_planner::parameters(spec) {
        let (rows, cols) = (p.rows as usize, p.cols as usize);
        let n = &*p.name;
        let std = if n.ends_with("relative_attention_bias") {
            d.powf(-0.5)
        } else if p.role == Role::Vector {
            0.0
        } else if p.role == Role::Embedding || p.role == Role::Head {
            1.0
        } else if n.ends_with(".q.weight") {
            (d * dkv).powf(-0.5)
        } else if n.ends_with(".o.weight") {
            (h * dkv).powf(-0.5)
        } else if n.ends_with(".wo.weight") {
            ff.powf(-0.5)
        } else {
            d.powf(-0.5)
        };
        let shape: Vec<usize> = if n.ends_with("relative_attention_bias") {
            vec![BUCKETS, rows * cols / BUCKETS]
        } else if rows == 1 {
            vec![cols]
        } else {
            vec![rows, cols]
        };
        let t = if std == 0.0 {
            Tensor::ones(shape, dtype, device)?
        } else {
            let v: Vec<f64> = (0..rows * cols).map(|_| rng.normal() * std).collect();
            Tensor::from_vec(v, shape, &Device::Cpu)?
                .to_dtype(dtype)?
                .to_device(device)?
        };
        params.insert(n.to_string(), Var::from_tensor(&t)?);
    }
    Ok(params)
}

/// transformers' `_relative_position_bucket` of `rel = key − query`: bidirectional
/// (encoder) halves the buckets between the two signs; causal (decoder) counts only
/// keys before the query. Half of the buckets are exact distances, the rest grow
/// logarithmically up to `max_distance` (computed in f32 as torch does), then the last.
pub fn bucket(rel: i64, bidirectional: bool, buckets: usize, max_distance: usize) -> u32 {
    let mut nb = buckets as i64;
    let mut base = 0;
    let n = if bidirectional {
        nb /= 2;
        if rel > 0 {
            base = nb;
        }
        rel.abs()
    } else {
        (-rel).max(0)
    };
    let exact = nb / 2;
    if n < exact {
        return (base + n) as u32;
    }
    let ratio = (n as f32 / exact as f32).ln() / ((max_distance as f64 / exact as f64).ln() as f32);
    // A float past i64's range saturates (max_distance ≤ the exact buckets: all large).
    let large = exact.saturating_add((ratio * (nb - exact) as f32) as i64);
    (base + large.min(nb - 1)) as u32
}

/// The position bias `(1, H, tq, tk)` of the stack whose block 0 is `first`, from its
/// `(buckets, H)` table, in f32 (f64 for an f64 model).
fn position_bias(
    model: &Model,
    first: usize,
    tq: usize,
    tk: usize,
    causal: bool,
) -> Result<Tensor> {
    let n = &model.numerics;
    let idx: Vec<u32> = (0..tq * tk)
        .map(|i| {
            let (q, k) = ((i / tk) as i64, (i % tk) as i64);
            bucket(k - q, !causal, n.rel_buckets, n.rel_max_distance)
        })
        .collect();
    let idx = Tensor::from_vec(idx, tq * tk, &model.device)?;
    let table = wide(model.p(&bias_name(first)))?;
    let h = table.dim(1)?;
    table
        .embedding(&idx)?
        .t()?
        .contiguous()?
        .reshape((1, h, tq, tk))
}

/// What one stack's attention adds to its scores: the position bias (self-attention)
/// plus the mask, both `(·, ·, tq, tk)` broadcastable to `(B, H, tq, tk)`, wide.
pub struct Scores {
    bias: Option<Tensor>,
    mask: Tensor,
}

impl Scores {
    /// The mask, a constant, through [`frozen_op`]: candle's own broadcast add would give it
    /// a gradient of the scores' whole shape that nothing reads, held until the backward
    /// ends (one `(B, H, tq, tk)` tensor per attention).
    fn add(&self, s: &Tensor) -> Result<Tensor> {
        let s = frozen_op(s, &self.mask, true)?;
        match &self.bias {
            Some(b) => s.broadcast_add(b),
            None => Ok(s),
        }
    }
}

/// The padding mask of encoder keys `(B, 1, 1, T)` from `keep` `(B·T,)` (1: a token, 0:
/// padding), additive and wide.
fn key_mask(model: &Model, keep: &Tensor, b: usize) -> Result<Tensor> {
    let t = keep.dim(0)? / b;
    let wide_dt = if model.dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let keep = keep.to_device(&model.device)?.to_dtype(wide_dt)?;
    ((keep - 1.0)? * -(MASKED as f64))?.reshape((b, 1, 1, t))
}

/// The encoder's and the decoder's additions to their scores, and the cross-attention's.
pub struct Tables {
    enc: Scores,
    dec: Scores,
    cross: Scores,
}

impl Tables {
    /// For `b` rows of `te` encoder and `td` decoder positions, `keep` the encoder's
    /// tokens (`(B·te,)`, 1 or 0). The biases are in the graph: their table gets a gradient.
    pub fn new(model: &Model, keep: &Tensor, b: usize, td: usize) -> Result<Tables> {
        let te = keep.dim(0)? / b;
        let enc_mask = key_mask(model, keep, b)?;
        let l = model.spec.num_layers as usize;
        Ok(Tables {
            enc: Scores {
                bias: Some(position_bias(model, 0, te, te, false)?),
                mask: enc_mask.clone(),
            },
            dec: Scores {
                bias: Some(position_bias(model, l, td, td, true)?),
                mask: causal_mask(td, 0, model.dtype, &model.device)?,
            },
            cross: Scores {
                bias: None,
                mask: enc_mask,
            },
        })
    }
}

/// `w · rms(x)`: T5LayerNorm with the weight `name`, as one node keeping `x` and `w`
/// ([`crate::engine::fused::rms_norm_scaled`]: the same values as the fused RMSNorm
/// narrowed to `x`'s dtype, then the product).
fn norm(model: &Model, x: &Tensor, name: &str) -> Result<Tensor> {
    crate::engine::fused::rms_norm_scaled(x, &model.w(name)?, model.numerics.rms_eps)
}

/// Attention `stem` (`layers.N.self_attn`) of rows `x` `(B·tq, C)` over rows `kv`
/// `(B·tk, C)`, with `scores` added before the softmax; no `1/√d` scaling.
fn attention(
    model: &Model,
    stem: &str,
    x: &Tensor,
    kv: &Tensor,
    b: usize,
    scores: &Scores,
) -> Result<Tensor> {
    let (h, d) = (model.spec.num_heads as usize, model.spec.head_dim as usize);
    let (tq, tk) = (x.dim(0)? / b, kv.dim(0)? / b);
    let heads = |y: &Tensor, t: usize| y.reshape((b, t, h, d))?.transpose(1, 2)?.contiguous();
    let q = heads(&model.lin(x, &format!("{stem}.q"))?, tq)?;
    let k = heads(&model.lin(kv, &format!("{stem}.k"))?, tk)?;
    let v = heads(&model.lin(kv, &format!("{stem}.v"))?, tk)?;
    let s = super::matmul::matmul(&q, &k.t()?.contiguous()?)?;
    let att =
        candle_nn::ops::softmax(&scores.add(&wide(&s)?)?, D::Minus1)?.to_dtype(model.compute)?;
    let y = super::matmul::matmul(&att, &v)?
        .transpose(1, 2)?
        .reshape((b * tq, h * d))?;
    model.lin(&y, &format!("{stem}.o"))
}

/// The feed-forward of block `l`: ReLU, or gated GELU (tanh approximation).
fn ffn(model: &Model, l: usize, x: &Tensor) -> Result<Tensor> {
    let lin = |x: &Tensor, n: &str| model.lin(x, &format!("layers.{l}.ffn.{n}"));
    let hid = if model.spec.gated_ffn {
        (lin(x, "wi_0")?.gelu()? * lin(x, "wi_1")?)?
    } else {
        lin(x, "wi")?.relu()?
    };
    lin(&hid, "wo")
}

/// Encoder block `l` on rows `x` of `b` sequences.
pub fn encoder_block(model: &Model, l: usize, x: &Tensor, b: usize, t: &Tables) -> Result<Tensor> {
    let p = format!("layers.{l}");
    let h = norm(model, x, &format!("{p}.self_attn.layer_norm.weight"))?;
    let x = (x + attention(model, &format!("{p}.self_attn"), &h, &h, b, &t.enc)?)?;
    let h = norm(model, &x, &format!("{p}.ffn.layer_norm.weight"))?;
    x + ffn(model, l, &h)?
}

/// Decoder block `l` (numbered after the encoder's) on rows `y`, attending to the
/// encoder's output `enc`.
pub fn decoder_block(
    model: &Model,
    l: usize,
    y: &Tensor,
    enc: &Tensor,
    b: usize,
    t: &Tables,
) -> Result<Tensor> {
    let p = format!("layers.{l}");
    let h = norm(model, y, &format!("{p}.self_attn.layer_norm.weight"))?;
    let y = (y + attention(model, &format!("{p}.self_attn"), &h, &h, b, &t.dec)?)?;
    let h = norm(model, &y, &format!("{p}.cross_attn.layer_norm.weight"))?;
    let y = (&y + attention(model, &format!("{p}.cross_attn"), &h, enc, b, &t.cross)?)?;
    let h = norm(model, &y, &format!("{p}.ffn.layer_norm.weight"))?;
    y + ffn(model, l, &h)?
}

/// The encoder stack's final norm.
fn encoder_out(model: &Model, x: &Tensor) -> Result<Tensor> {
    norm(model, x, "encoder.final_layer_norm.weight")
}

/// The decoder stack's final norm, scaled by `d_model^-½` for the tied head.
fn decoder_out(model: &Model, y: &Tensor) -> Result<Tensor> {
    norm(model, y, "decoder.final_layer_norm.weight")? * (model.spec.hidden_size as f64).powf(-0.5)
}

fn encoders(model: &Model) -> std::ops::Range<usize> {
    0..model.spec.num_layers as usize
}

fn decoders(model: &Model) -> std::ops::Range<usize> {
    let l = model.spec.num_layers as usize;
    l..l + model.spec.num_decoder_layers as usize
}

/// The encoder's input of micro-batch `m`: its ids and which are tokens.
fn encoder_input(m: &Micro) -> Result<(&Tensor, &Tensor)> {
    match &m.encoder {
        Some(e) => Ok((&e.ids, &e.keep)),
        None => candle_core::bail!("a T5 micro-batch needs encoder input (prompt/response data)"),
    }
}

/// The whole forward in one graph: the decoder's scaled output `(B·td, C)`.
pub fn forward(model: &Model, m: &Micro, b: usize) -> Result<Tensor> {
    let (enc_ids, keep) = encoder_input(m)?;
    let dev = &model.device;
    let dec_ids = m.ids.to_device(dev)?;
    let t = Tables::new(model, keep, b, dec_ids.dim(0)? / b)?;
    let mut x = model.embed(&enc_ids.to_device(dev)?)?;
    for l in encoders(model) {
        x = encoder_block(model, l, &x, b, &t)?;
    }
    let enc = encoder_out(model, &x)?;
    let mut y = model.embed(&dec_ids)?;
    for l in decoders(model) {
        y = decoder_block(model, l, &y, &enc, b, &t)?;
    }
    decoder_out(model, &y)
}

/// Forward and backward of micro-batch `m` (`b` rows): adds the parameter gradients to
/// `grads` and returns the summed (weighted) token loss. The loss is the engine's chunked
/// loss over the decoder's output; with `opts.checkpoint` each block runs on a detached
/// input and is recomputed in backward.
pub fn forward_backward(
    model: &Model,
    m: &Micro,
    b: usize,
    opts: Opts,
    grads: &mut Grads,
    probe: &dyn Probe,
) -> Result<f64> {
    let targets = m.targets.to_device(&model.device)?;
    probe.mark("start");
    if opts.checkpoint {
        return checkpointed(model, m, b, &targets, opts, grads, probe);
    }
    let out = forward(model, m, b)?;
    probe.mark("fwd");
    let last = out.detach();
    let (loss, g) =
        step::loss_stage_weighted(model, &last, &targets, m.weights.as_ref(), opts, grads)?;
    drop(last);
    probe.mark("loss");
    let store = (out * &g)?.sum_all()?.backward()?;
    drop(g);
    let names: Vec<String> = model.params.keys().cloned().collect();
    step::collect(model, &store, &names, grads)?;
    // The store's gradients hold the forward graph through their ops: gone with it.
    drop(store);
    probe.mark("bwd");
    Ok(loss)
}

/// The parameters block `l` uses: its own and its stack's position bias.
fn block_params(model: &Model, l: usize) -> Vec<String> {
    let first = if l < model.spec.num_layers as usize {
        0
    } else {
        model.spec.num_layers as usize
    };
    let mut names = model.block_params(l);
    let bias = bias_name(first);
    if l != first && model.trains(&bias) {
        names.push(bias);
    }
    names
}

/// The checkpointed step: block inputs saved, each block recomputed from a fresh leaf
/// in backward; the gradient of the encoder's output is summed over the decoder blocks.
#[allow(clippy::too_many_arguments)]
fn checkpointed(
    model: &Model,
    m: &Micro,
    b: usize,
    targets: &Tensor,
    opts: Opts,
    grads: &mut Grads,
    probe: &dyn Probe,
) -> Result<f64> {
    let (enc_ids, keep) = encoder_input(m)?;
    let dev = &model.device;
    let (enc_ids, dec_ids) = (enc_ids.to_device(dev)?, m.ids.to_device(dev)?);
    let t = Tables::new(model, keep, b, dec_ids.dim(0)? / b)?;
    let mut xs = vec![model.embed(&enc_ids)?.detach()];
    probe.mark("tables");
    for l in encoders(model) {
        let x = encoder_block(model, l, &xs[xs.len() - 1], b, &t)?.detach();
        xs.push(x);
        probe.mark(&format!("fwd {l}"));
    }
    let enc_last = xs.pop().expect("the embedding's output");
    let enc = encoder_out(model, &enc_last)?.detach();
    let mut ys = vec![model.embed(&dec_ids)?.detach()];
    probe.mark("enc");
    for l in decoders(model) {
        let y = decoder_block(model, l, &ys[ys.len() - 1], &enc, b, &t)?.detach();
        ys.push(y);
        probe.mark(&format!("fwd {l}"));
    }
    let dec_last = ys.pop().expect("the embedding's output");
    let last = decoder_out(model, &dec_last)?.detach();
    probe.mark("fwd");
    let (loss, g) =
        step::loss_stage_weighted(model, &last, targets, m.weights.as_ref(), opts, grads)?;
    drop(last);
    probe.mark("loss");
    let g_out = g;
    let g = step::half_backward(
        model,
        dec_last,
        &g_out,
        &["decoder.final_layer_norm.weight".into()],
        grads,
        |y| decoder_out(model, y),
    )?;
    drop(g_out);
    let (g_dec, g_enc) = decoder_backward(model, ys, &enc, g, (b, &t), grads, probe)?;
    let mut g = step::half_backward(
        model,
        enc_last,
        &g_enc,
        &["encoder.final_layer_norm.weight".into()],
        grads,
        |x| encoder_out(model, x),
    )?;
    drop(g_enc);
    probe.mark("bwd enc");
    for l in encoders(model).rev() {
        let input = xs.pop().expect("one input per block");
        g = step::half_backward(model, input, &g, &block_params(model, l), grads, |x| {
            encoder_block(model, l, x, b, &t)
        })?;
        probe.mark(&format!("bwd {l}"));
    }
    let emb = model.embedding_name();
    if model.trains(emb) {
        let s = ((model.embed(&enc_ids)? * &g)?.sum_all()?
            + (model.embed(&dec_ids)? * &g_dec)?.sum_all()?)?;
        step::collect(model, &s.backward()?, &[emb.to_string()], grads)?;
    }
    probe.mark("emb");
    Ok(loss)
}

/// Backward through the decoder blocks from `g`, the gradient of the last block's output,
/// each recomputed from its saved input in `ys` and a leaf of the encoder's output `enc`:
/// returns the gradient of the decoder's embedding output and of `enc` (summed over the
/// blocks' cross-attention).
fn decoder_backward(
    model: &Model,
    mut ys: Vec<Tensor>,
    enc: &Tensor,
    mut g: Tensor,
    (b, t): (usize, &Tables),
    grads: &mut Grads,
    probe: &dyn Probe,
) -> Result<(Tensor, Tensor)> {
    let mut g_enc = enc.zeros_like()?;
    probe.mark("bwd dec");
    for l in decoders(model).rev() {
        let (input, enc_leaf) = (
            Var::from_tensor(&ys.pop().expect("one input per block"))?,
            Var::from_tensor(enc)?,
        );
        let out = decoder_block(model, l, input.as_tensor(), enc_leaf.as_tensor(), b, t)?;
        let store = (out * &g)?.sum_all()?.backward()?;
        step::collect(model, &store, &block_params(model, l), grads)?;
        let (Some(gi), Some(ge)) = (
            store.get(input.as_tensor()),
            store.get(enc_leaf.as_tensor()),
        ) else {
            candle_core::bail!("a checkpointed decoder block's inputs got no gradient");
        };
        g = gi.detach();
        g_enc = (g_enc + ge.detach())?;
        drop(store);
        probe.mark(&format!("bwd {l}"));
    }
    Ok((g, g_enc))
}

/// The summed (weighted) token loss of micro-batch `m` without gradients.
pub fn eval_loss_sum(model: &Model, m: &Micro, b: usize, chunk: usize) -> Result<f64> {
    let x = forward(model, m, b)?.detach();
    let targets = m.targets.to_device(&model.device)?;
    step::chunked_loss_sum(model, &x, &targets, m.weights.as_ref(), chunk)
}

/// The logits `(B·td, V)` of every decoder position, as f32 rows.
pub fn logits(model: &Model, m: &Micro, b: usize) -> Result<Vec<Vec<f32>>> {
    let x = forward(model, m, b)?.detach();
    model.logits(&x)?.to_dtype(DType::F32)?.to_vec2::<f32>()
}

/// Generates `n` tokens after the encoder reads `prompt`: the decoder starts from
/// `decoder_start_token_id` and takes `pick(logits)` of its last position each time
/// (the decoder is rerun over what it has; no cache).
pub fn generate(
    model: &Model,
    prompt: &[u32],
    n: usize,
    mut pick: impl FnMut(&[f32]) -> u32,
) -> Result<Vec<u32>> {
    let dev = &model.device;
    let te = prompt.len();
    let keep = Tensor::ones(te, DType::F32, &Device::Cpu)?;
    let mut out = vec![model.numerics.decoder_start];
    let t0 = Tables::new(model, &keep, 1, 1)?;
    let mut x = model.embed(&Tensor::from_vec(prompt.to_vec(), te, dev)?)?;
    for l in encoders(model) {
        x = encoder_block(model, l, &x, 1, &t0)?.detach();
    }
    let enc = encoder_out(model, &x)?.detach();
    for _ in 0..n {
        let td = out.len();
        let t = Tables::new(model, &keep, 1, td)?;
        let mut y = model.embed(&Tensor::from_vec(out.clone(), td, dev)?)?;
        for l in decoders(model) {
            y = decoder_block(model, l, &y, &enc, 1, &t)?.detach();
        }
        let last = decoder_out(model, &y.narrow(0, td - 1, 1)?)?;
        let z = model
            .logits(&last)?
            .squeeze(0)?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        out.push(pick(&z));
    }
    Ok(out[1..].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::probe::NoProbe;
    use crate::engine::sft::{seq2seq_rows, Example};
    use crate::engine::tests::assert_finite_differences;
    use vramplan_planner::Arch;

    #[test]
    fn buckets_are_transformers() {
        // transformers 5.24 `T5Attention._relative_position_bucket`, num_buckets 32,
        // max_distance 128: bidirectional −3 → 3, 3 → 19, 20 → 16 + 8 + ⌊ln(20/8)/ln(16)·8⌋ = 26,
        // 500 → 31; causal −20 → 16 + ⌊ln(20/16)/ln(8)·16⌋ = 17, 5 → 0.
        assert_eq!(bucket(-3, true, 32, 128), 3);
        assert_eq!(bucket(3, true, 32, 128), 19);
        assert_eq!(bucket(20, true, 32, 128), 26);
        assert_eq!(bucket(500, true, 32, 128), 31);
        assert_eq!(bucket(-20, false, 32, 128), 17);
        assert_eq!(bucket(5, false, 32, 128), 0);
        // 8 buckets up to distance 6, relative positions −5..=5 (encoder) and −5..=0
        // (decoder), as transformers gives them.
        let enc: Vec<u32> = (-5..=5).map(|r| bucket(r, true, 8, 6)).collect();
        assert_eq!(enc, [3, 3, 2, 2, 1, 0, 5, 6, 6, 7, 7]);
        let dec: Vec<u32> = (-5..=0).map(|r| bucket(r, false, 8, 6)).collect();
        assert_eq!(dec, [6, 4, 3, 2, 1, 0]);
    }

    const B: usize = 2;
    const T: usize = 6;

    fn spec(gated: bool) -> ModelSpec {
        ModelSpec {
            name: "tiny-t5".into(),
            arch: Arch::T5,
            hidden_size: 8,
            num_layers: 2,
            num_decoder_layers: 2,
            num_heads: 2,
            num_kv_heads: 2,
            head_dim: 4,
            intermediate_size: 12,
            vocab_size: 16,
            tie_embeddings: true,
            max_positions: 0,
            gated_ffn: gated,
            features: Default::default(),
        }
    }

    /// A tiny f64 T5 whose norms are not 1 and whose 6 positions reach the logarithmic
    /// buckets of both stacks (and the encoder's last): 8 of its 32 buckets are used, up
    /// to distance 6 (see `buckets_are_transformers`).
    fn model(gated: bool) -> Model {
        let mut m = Model::new(
            &spec(gated),
            DType::F64,
            DType::F64,
            &Device::Cpu,
            &mut Rng::new(3),
        )
        .unwrap();
        m.numerics.rel_buckets = 8;
        m.numerics.rel_max_distance = 6;
        let mut r = Rng::new(5);
        for (n, v) in &m.params {
            if n.contains("norm") {
                let k = v.as_tensor().dim(0).unwrap();
                let w: Vec<f64> = (0..k).map(|_| 1.0 + 0.3 * r.normal()).collect();
                v.set(&Tensor::from_vec(w, k, &Device::Cpu).unwrap())
                    .unwrap();
            }
        }
        m
    }

    /// Row 0 fills both sides; row 1 has 3 encoder tokens (then pads) and 4 labels.
    fn micro(seed: u64) -> Micro {
        let mut r = Rng::new(seed);
        let mut ex = |enc: usize, dec: usize| {
            let tokens: Vec<u32> = (0..enc + dec).map(|_| 1 + r.below(15) as u32).collect();
            let loss = (0..enc + dec).map(|i| i >= enc).collect();
            Example {
                tokens,
                loss,
                bytes: dec,
            }
        };
        let rows = [ex(T, T), ex(3, 4)];
        seq2seq_rows(&rows, T, 0).unwrap()
    }

    fn opts(m: &Micro, chunk: usize, checkpoint: bool) -> Opts {
        Opts {
            chunk,
            checkpoint,
            scale: 1.0 / m.count as f64,
        }
    }

    fn grads(model: &Model, m: &Micro, o: Opts) -> Grads {
        let mut g = Grads::new();
        forward_backward(model, m, B, o, &mut g, &NoProbe).unwrap();
        g
    }

    fn flat(t: &Tensor) -> Vec<f64> {
        t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
    }

    #[test]
    fn every_parameter_matches_finite_differences() {
        for gated in [false, true] {
            let model = model(gated);
            let m = micro(1);
            let g = grads(&model, &m, opts(&m, B * T, false));
            assert_eq!(
                g.len(),
                model.params.len(),
                "gated {gated}: a parameter got no gradient"
            );
            for (name, var) in &model.params {
                let gv = flat(&g[name]);
                assert!(
                    gv.iter().any(|v| v.abs() > 1e-9),
                    "gated {gated} {name}: zero gradient"
                );
                let spread = [0, gv.len() / 3, gv.len() / 2, gv.len() - 1];
                assert_finite_differences(
                    var,
                    &gv,
                    &spread,
                    &format!("t5 gated {gated} {name}"),
                    || eval_loss_sum(&model, &m, B, B * T).unwrap() / m.count as f64,
                );
            }
        }
    }

    #[test]
    fn checkpointing_and_chunks_give_the_plain_gradients() {
        let model = model(false);
        let m = micro(2);
        let plain = grads(&model, &m, opts(&m, B * T, false));
        for (chunk, checkpoint) in [(5, false), (B * T, true), (4, true)] {
            let g = grads(&model, &m, opts(&m, chunk, checkpoint));
            assert_eq!(g.len(), plain.len());
            for (n, p) in &plain {
                let d = (p - &g[n])
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                assert!(
                    d < 1e-12,
                    "chunk {chunk} checkpoint {checkpoint} {n}: differs by {d}"
                );
            }
        }
    }
}
