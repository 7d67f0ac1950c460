//! Stage-by-stage memory of one engine step, the data `tools/calibrate_candle.py` fits
//! the planner's candle working sets to (`vramplan calibrate-candle`).
//!
//! A configuration is one line, `arch ckpt L C H KV D I V B T chunk` (architecture
//! `llama`, `nanochat` or `t5`, checkpointing 0 or 1, layers, width, heads, KV heads, head
//! width, MLP width, vocabulary, micro-batch, sequence length, loss chunk rows); a `t5`
//! line adds `Ldec gated` (decoder layers; 1 for gated GELU, 0 for ReLU), its KV heads are
//! its heads, and both its stacks read `T` positions (prompt and response of `T` tokens
//! each, the shapes `engine::sft` pads to). Its
//! measurement is the line, then ` |`, then per stage of the second step (the first
//! creates AdamW's state) ` label:working_set:live` (bytes: the stage's high-water mark
//! above the live bytes at the end of the previous stage, and the live bytes at its end
//! above the baseline), then ` | STEP peak` (the step's high-water mark above the
//! baseline). The baseline is taken after the model and AdamW exist, as in training.

use crate::engine::model::Model;
use crate::engine::optim::AdamW;
use crate::engine::probe::{NoProbe, Probe, Recorder};
use crate::engine::rng::Rng;
use crate::engine::sft::{seq2seq_rows, Example, Micro};
use crate::engine::step::{forward_backward, Grads, Opts};
use crate::engine::{alloc, bad, data, t5, warm_up};
use anyhow::Result;
use candle_core::{DType, Device};
use vramplan_planner::{Arch, ModelSpec};

/// The fields of a configuration line, for error messages.
pub const FIELDS: &str = "arch ckpt L C H KV D I V B T chunk (t5: Ldec gated)";

/// One configuration to measure.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The line as given; the measurement repeats it.
    pub line: String,
    pub spec: ModelSpec,
    pub checkpoint: bool,
    pub batch: usize,
    pub seq: usize,
    pub chunk: usize,
}

impl Config {
    /// Parses a configuration line; `file` and `n` (1-based) name it in errors.
    pub fn parse(file: &str, n: usize, line: &str) -> Result<Config> {
        let f: Vec<&str> = line.split_whitespace().collect();
        let at = format!("{file}: line {n}");
        let arch = match f.first().copied().unwrap_or("") {
            "llama" => Arch::Llama,
            "nanochat" => Arch::Nanochat,
            "t5" => Arch::T5,
            a => return Err(bad(&at, format!("arch {a:.40?}: one of llama, nanochat, t5")).into()),
        };
        let fields = if arch == Arch::T5 { 14 } else { 12 };
        if f.len() != fields {
            return Err(bad(
                &at,
                format!("{} fields; expected {fields}: {FIELDS}", f.len()),
            )
            .into());
        }
        let u = |i: usize| {
            f[i].parse::<u64>()
                .ok()
                .filter(|v| *v > 0 || i == 1 || i == 13)
                .ok_or_else(|| {
                    bad(
                        &at,
                        format!("field {} ({:.40?}): a positive integer", i + 1, f[i]),
                    )
                })
        };
        let spec = ModelSpec {
            name: format!("tiny-{arch}"),
            arch,
            hidden_size: u(3)?,
            num_layers: u(2)?,
            num_decoder_layers: if arch == Arch::T5 { u(12)? } else { 0 },
            num_heads: u(4)?,
            num_kv_heads: if arch == Arch::T5 { u(4)? } else { u(5)? },
            head_dim: u(6)?,
            intermediate_size: u(7)?,
            vocab_size: u(8)?,
            tie_embeddings: arch != Arch::Nanochat,
            max_positions: 0,
            gated_ffn: arch == Arch::T5 && u(13)? == 1,
            features: Default::default(),
        };
        Ok(Config {
            line: line.to_string(),
            spec,
            checkpoint: f[1] == "1",
            batch: u(9)? as usize,
            seq: u(10)? as usize,
            chunk: u(11)? as usize,
        })
    }
}

/// Measures `c` on the CPU with `compute` as the forward's dtype, counting as `recorder`
/// counts, and returns its measurement line. Measure a file's configurations with one
/// recorder: its buffer for the marks then exists before the baseline, as it did when the
/// committed data was measured.
pub fn measure(c: &Config, compute: DType, recorder: &Recorder) -> Result<String> {
    // As `train` does: the pool's threads and gemm's per-thread buffers (for both dtypes)
    // exist before anything is measured.
    warm_up(compute)?;
    let m = Model::new(&c.spec, DType::F32, compute, &Device::Cpu, &mut Rng::new(1))?;
    let mut opt = AdamW::new();
    let opts = Opts {
        chunk: c.chunk,
        checkpoint: c.checkpoint,
        scale: 1.0 / (c.batch * c.seq) as f64,
    };
    let mut r = Rng::new(2);
    let toks: Vec<u32> = (0..10_000)
        .map(|_| r.below(c.spec.vocab_size.min(256) as usize) as u32)
        .collect();
    let mut step = |probe: &dyn Probe| -> Result<()> {
        let mut g = Grads::new();
        if c.spec.arch == Arch::T5 {
            let micro = seq2seq_micro(&toks, c, &mut r)?;
            probe.mark("batch");
            t5::forward_backward(&m, &micro, c.batch, opts, &mut g, probe)?;
        } else {
            let (x, y) = data::batch(&toks, c.batch, c.seq, &mut r)?;
            probe.mark("batch");
            forward_backward(&m, &x, &y, c.batch, opts, &mut g, probe)?;
        }
        probe.mark("fb");
        opt.step(&m, g, 1e-3)?;
        probe.mark("opt");
        Ok(())
    };
    let base = recorder.live();
    // The first step creates AdamW's state and is not recorded.
    step(&NoProbe)?;
    alloc::reset_peak();
    let before = recorder.live();
    step(recorder)?;
    let mut prev = before;
    let mut out = format!("{} |", c.line);
    let mut top = 0;
    for mark in recorder.take() {
        let ws = mark.peak.saturating_sub(prev);
        let live = mark.live.saturating_sub(base);
        out += &format!(" {}:{ws}:{live}", mark.label.replace(' ', ""));
        top = top.max(mark.peak.saturating_sub(base));
        prev = mark.live;
    }
    Ok(format!("{out} | STEP {top}"))
}

/// A T5 micro-batch of `c.batch` rows, each a prompt of `c.seq` tokens and a response of
/// as many, drawn from `toks`: every encoder and decoder position is a token.
fn seq2seq_micro(toks: &[u32], c: &Config, r: &mut Rng) -> Result<Micro> {
    let rows: Vec<Example> = (0..c.batch)
        .map(|_| {
            let start = r.below(toks.len() - 2 * c.seq);
            Example {
                tokens: toks[start..start + 2 * c.seq].to_vec(),
                loss: (0..2 * c.seq).map(|i| i >= c.seq).collect(),
                bytes: c.seq,
            }
        })
        .collect();
    Ok(seq2seq_rows(&rows, c.seq, 0)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_parses_into_its_model_and_step() {
        let c = Config::parse("cfgs.txt", 1, "llama 1 2 8 2 1 4 12 16 2 5 4").unwrap();
        assert_eq!(
            (c.spec.arch, c.spec.num_layers, c.spec.hidden_size),
            (Arch::Llama, 2, 8)
        );
        assert_eq!((c.spec.num_kv_heads, c.spec.vocab_size), (1, 16));
        assert!(c.checkpoint && c.spec.tie_embeddings);
        assert_eq!((c.batch, c.seq, c.chunk), (2, 5, 4));
    }

    #[test]
    fn bad_lines_name_the_line_and_what_is_accepted() {
        let cases = [
            ("llama 1 2 8", "cfgs.txt: line 3: 4 fields; expected 12"),
            (
                "gpt9 0 2 8 2 1 4 12 16 2 5 4",
                "cfgs.txt: line 3: arch \"gpt9\": one of llama, nanochat",
            ),
            (
                "llama 0 2 8 2 1 4 12 16 0 5 4",
                "cfgs.txt: line 3: field 10 (\"0\"): a positive integer",
            ),
            (
                "llama 0 2 x 2 1 4 12 16 2 5 4",
                "cfgs.txt: line 3: field 4 (\"x\")",
            ),
        ];
        for (line, want) in cases {
            let e = Config::parse("cfgs.txt", 3, line).unwrap_err();
            assert!(e.to_string().starts_with(want), "{line}: {e}");
            assert!(
                e.downcast_ref::<crate::Error>().is_some(),
                "{line}: not bad input"
            );
        }
    }

    /// The stages of a checkpointed step, in order, each as `label:working_set:live`,
    /// and a step peak at least every stage's live bytes.
    #[test]
    fn a_measurement_lists_every_stage() {
        let line = "nanochat 1 2 8 2 2 4 12 256 2 5 4";
        let c = Config::parse("cfgs.txt", 1, line).unwrap();
        let out = measure(&c, DType::F32, &Recorder::new(false)).unwrap();
        let (head, rest) = out.split_once(" | ").unwrap();
        assert_eq!(head, line);
        let (stages, step) = rest.split_once(" | STEP ").unwrap();
        let peak: u64 = step.parse().unwrap();
        let labels: Vec<&str> = stages
            .split(' ')
            .map(|s| s.split(':').next().unwrap())
            .collect();
        let want = [
            "batch", "start", "fwd0attn", "fwd0", "fwd1attn", "fwd1", "loss", "bwd1mlp", "bwd1",
            "bwd0mlp", "bwd0", "emb", "fb", "opt",
        ];
        assert_eq!(labels, want);
        for s in stages.split(' ') {
            let live: u64 = s.rsplit(':').next().unwrap().parse().unwrap();
            assert!(live <= peak, "{s} above the step's peak {peak}");
        }
    }

    /// A T5 line: encoder and decoder blocks each a stage forward and backward, the
    /// stacks' ends their own stages.
    #[test]
    fn a_t5_measurement_lists_both_stacks() {
        let line = "t5 1 2 8 2 2 4 12 64 2 5 4 1 1";
        let c = Config::parse("cfgs.txt", 1, line).unwrap();
        assert_eq!((c.spec.num_decoder_layers, c.spec.gated_ffn), (1, true));
        let out = measure(&c, DType::F32, &Recorder::new(false)).unwrap();
        let (_, rest) = out.split_once(" | ").unwrap();
        let (stages, _) = rest.split_once(" | STEP ").unwrap();
        let labels: Vec<&str> = stages
            .split(' ')
            .map(|s| s.split(':').next().unwrap())
            .collect();
        let want = [
            "batch", "start", "tables", "fwd0", "fwd1", "enc", "fwd2", "fwd", "loss", "bwddec",
            "bwd2", "bwdenc", "bwd1", "bwd0", "emb", "fb", "opt",
        ];
        assert_eq!(labels, want);
        let e = Config::parse("cfgs.txt", 2, "t5 1 2 8 2 2 4 12 64 2 5 4").unwrap_err();
        assert!(e.to_string().contains("12 fields; expected 14"), "{e}");
    }
}
