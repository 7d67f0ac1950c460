//! CPU benchmark of the loss stage at vocabulary 65,536: the peak memory above the hidden
//! states and head, and tokens per second, with fp32 logits for the whole micro-batch
//! (`loss = "float-cast"`) and in row chunks (`loss = "chunked"`), using the engine's own
//! code (`vramplan::engine::step`) and counting allocator (the library's global allocator).
//!
//! `cargo bench --profile dev --bench loss_chunking [-- TOKENS...]`. Plans whose logits
//! graph would not fit in this machine's memory are skipped and said so.

use candle_core::{DType, Device, Tensor};
use std::time::Instant;
use vramplan::engine::model::Model;
use vramplan::engine::rng::Rng;
use vramplan::engine::{alloc, step};
use vramplan_planner::{Arch, ModelSpec};

const VOCAB: u64 = 65_536;
const HIDDEN: u64 = 256;

fn available() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<u64>().ok())
        })
        .map(|k| k * 1024)
        .unwrap_or(8 << 30)
}

fn main() -> candle_core::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let tokens_list = if args.is_empty() { vec![8192] } else { args };
    let model = Model::new(
        &head_spec(),
        DType::F32,
        DType::F32,
        &Device::Cpu,
        &mut Rng::new(1),
    )?;
    println!(
        "loss stage, vocabulary {VOCAB}, width {HIDDEN}, f32, {} threads",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    println!(
        "| tokens | loss | rows per chunk | peak above inputs | in f32 copies of the chunk's logits | of them tensors (no matmul scratch) | seconds | tokens/s |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|");
    for &n in &tokens_list {
        let (h, y) = batch(n)?;
        let mut chunks = vec![n, 2048, 1024, 256];
        chunks.retain(|c| *c <= n);
        chunks.dedup();
        for chunk in chunks {
            row(&model, &h, &y, n, chunk)?;
        }
    }
    Ok(())
}

/// nanochat d4's head: width 256, vocabulary 65,536, soft-capped logits.
fn head_spec() -> ModelSpec {
    ModelSpec {
        name: "nanochat-d4-head".into(),
        arch: Arch::Nanochat,
        hidden_size: HIDDEN,
        num_layers: 0,
        num_decoder_layers: 0,
        num_heads: 2,
        num_kv_heads: 2,
        head_dim: 128,
        intermediate_size: 1024,
        vocab_size: VOCAB,
        tie_embeddings: false,
        max_positions: 0,
        gated_ffn: false,
        features: Default::default(),
    }
}

/// `n` random hidden states and targets.
fn batch(n: usize) -> candle_core::Result<(Tensor, Tensor)> {
    let mut r = Rng::new(2);
    let h: Vec<f32> = (0..n * HIDDEN as usize)
        .map(|_| r.normal() as f32)
        .collect();
    let h = Tensor::from_vec(h, (n, HIDDEN as usize), &Device::Cpu)?;
    let y: Vec<u32> = (0..n).map(|_| r.below(VOCAB as usize) as u32).collect();
    Ok((h, Tensor::from_vec(y, n, &Device::Cpu)?))
}

/// One table row: the loss stage over `n` tokens in chunks of `chunk` rows (the whole
/// micro-batch at once when `chunk == n`), or a note that it would not fit.
fn row(model: &Model, h: &Tensor, y: &Tensor, n: usize, chunk: usize) -> candle_core::Result<()> {
    let label = if chunk == n { "float-cast" } else { "chunked" };
    // The fused loss holds a chunk's logits and their gradient, and the head's matmul
    // its own gradient of the hidden states: a few f32 copies of a chunk's logits.
    let copy = chunk as u64 * VOCAB * 4;
    let need = 4 * copy;
    if need > available() * 8 / 10 {
        println!(
            "| {n} | {label} | {chunk} | skipped: needs about {:.1} GiB | | | | |",
            need as f64 / (1u64 << 30) as f64
        );
        return Ok(());
    }
    let opts = step::Opts {
        chunk,
        checkpoint: true,
        scale: 1.0 / n as f64,
    };
    let mut grads = step::Grads::new();
    let (before, tensors_before) = (alloc::current(), alloc::tensors_current());
    alloc::reset_peak();
    let t0 = Instant::now();
    let (loss, g) = step::loss_stage(model, h, y, opts, &mut grads)?;
    let secs = t0.elapsed().as_secs_f64();
    let peak = alloc::peak() - before;
    let tensors = alloc::tensors_peak() - tensors_before;
    drop((g, grads));
    println!(
        "| {n} | {label} | {chunk} | {:.1} MiB | {:.2} | {:.2} | {secs:.2} | {:.0} |",
        peak as f64 / (1u64 << 20) as f64,
        peak as f64 / copy as f64,
        tensors as f64 / copy as f64,
        n as f64 / secs
    );
    assert!((loss / n as f64).is_finite());
    Ok(())
}
