//! What the first block of a LoRA step keeps without checkpointing, op by op.
//!
//! candle keeps a tensor while an op that needs a gradient holds it as an operand. In a
//! full fine-tune every op of a block does (its input comes from the trained embedding);
//! under LoRA the first block's input comes from the frozen embedding and needs none, so
//! an op needs a gradient only downstream of an adapted linear (whose `A·x` reads the
//! input and whose sum holds the frozen product). Which tensors of the first block are
//! kept then depends on the targets: with q_proj and v_proj adapted, the k path and the
//! first norm keep nothing; with only o_proj, nothing before it; with only down_proj,
//! nothing but down_proj's input. This module lists the engine's block
//! (`src/engine/model.rs`: `norm`, `attention`, `mlp` of llama, mistral, qwen2, qwen3) as
//! ops over their operands and returns the bytes the full fine-tune's graph keeps in the
//! first block that the LoRA step's does not ([`first_block_untracked`]); the fitted
//! whole-graph working sets are the full fine-tune's, and `lora_extras` takes this off.
//! The adapters' own tensors (`A·x`, `B·(A·x)`, its scaled copy and the sum) are
//! `lora_extras`'s.

use crate::spec::{Arch, Precision, RunSpec};

/// One tensor of the block: its bytes and the tensors it was computed from.
struct Node {
    bytes: f64,
    inputs: Vec<usize>,
    /// An adapted linear: its LoRA branch needs a gradient whatever its input.
    adapted: bool,
}

/// The block as a list of tensors in the order the engine makes them; node 0 is the
/// block's input (counted elsewhere: its bytes are 0).
struct Block {
    nodes: Vec<Node>,
    /// Bytes of an element in the compute dtype.
    act: f64,
}

const WIDE: f64 = 4.0;

impl Block {
    fn add(&mut self, bytes: f64, inputs: &[usize]) -> usize {
        self.nodes.push(Node {
            bytes,
            inputs: inputs.to_vec(),
            adapted: false,
        });
        self.nodes.len() - 1
    }

    /// `x` in f32: the same tensor in f32 compute, a copy under 16-bit.
    fn wide(&mut self, x: usize, elems: f64) -> usize {
        if self.act == WIDE {
            x
        } else {
            self.add(elems * WIDE, &[x])
        }
    }

    /// Back to the compute dtype from f32.
    fn narrow(&mut self, x: usize, elems: f64) -> usize {
        if self.act == WIDE {
            x
        } else {
            self.add(elems * self.act, &[x])
        }
    }

    /// `rms(x)·w` over rows of `width` (`rows · width` elements): one node keeping its
    /// input (read in place, also as a transposed view) and the weight
    /// (`src/engine/fused/scaled_norm.rs`).
    fn norm(&mut self, x: usize, rows: f64, width: f64) -> usize {
        self.add(rows * width * self.act, &[x])
    }

    /// A linear of `out` elements from `x`, adapted or frozen.
    fn linear(&mut self, x: usize, out: f64, adapted: bool) -> usize {
        let y = self.add(out * self.act, &[x]);
        self.nodes[y].adapted = adapted;
        y
    }

    /// The rotation of `x` (`elems` elements), one node keeping its input (read in place,
    /// also as a transposed view) and its output (`src/engine/fused.rs`).
    fn rope(&mut self, x: usize, elems: f64) -> usize {
        self.add(elems * self.act, &[x])
    }

    /// Which tensors are tracked (need a gradient), then the bytes of those held by a
    /// tracked op. `input` is whether the block's input is tracked; the block's output is
    /// held by the next block.
    fn kept(&self, input: bool) -> f64 {
        let mut tracked = vec![false; self.nodes.len()];
        tracked[0] = input;
        for (i, n) in self.nodes.iter().enumerate().skip(1) {
            tracked[i] = n.adapted || n.inputs.iter().any(|&j| tracked[j]);
        }
        let mut held = vec![false; self.nodes.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            if n.adapted {
                // The LoRA branch reads the input; the sum holds the frozen product.
                held[i] = true;
                n.inputs.iter().for_each(|&j| held[j] = true);
            } else if tracked[i] {
                n.inputs.iter().for_each(|&j| held[j] = true);
            }
        }
        if let Some(last) = held.last_mut() {
            *last = tracked[self.nodes.len() - 1];
        }
        self.nodes
            .iter()
            .zip(&held)
            .filter(|(_, h)| **h)
            .map(|(n, _)| n.bytes)
            .sum()
    }
}

/// The engine's llama-family block on `rows` rows, with `adapted(module)` for each of its
/// linears.
fn block(spec: &RunSpec, adapted: &dyn Fn(&str) -> bool) -> Block {
    let (m, t) = (&spec.model, &spec.train);
    let rows = (t.micro_batch * t.seq_len) as f64;
    let (c, h, kv, d, i) = (
        m.hidden_size as f64,
        m.num_heads as f64,
        m.num_kv_heads as f64,
        m.head_dim as f64,
        m.intermediate_size as f64,
    );
    let (q_el, kv_el) = (rows * h * d, rows * kv * d);
    let scores = t.micro_batch as f64 * h * (t.seq_len as f64).powi(2);
    let mut b = Block {
        nodes: Vec::with_capacity(64),
        act: if t.precision == Precision::Fp32 {
            4.0
        } else {
            2.0
        },
    };
    let x = b.add(0.0, &[]);
    let hn = b.norm(x, rows, c);
    let proj = |b: &mut Block, name: &str, elems: f64| {
        let y = b.linear(hn, elems, adapted(name));
        match m.arch {
            Arch::Qwen2 => b.add(elems * b.act, &[y]),
            Arch::Qwen3 if name != "v_proj" => b.norm(y, elems / d, d),
            _ => y,
        }
    };
    let q = proj(&mut b, "q_proj", q_el);
    let k = proj(&mut b, "k_proj", kv_el);
    let v = proj(&mut b, "v_proj", kv_el);
    let q = b.rope(q, q_el);
    let mut k = b.rope(k, kv_el);
    let mut v_held = v;
    if kv < h {
        k = b.add(q_el * b.act, &[k]);
        v_held = b.add(q_el * b.act, &[v]);
    }
    let kt = b.add(q_el * b.act, &[k]);
    let s = b.add(scores * b.act, &[q, kt]);
    let s = b.wide(s, scores);
    // The softmax is one node keeping the widened scores and its output (`fused.rs`).
    let p = b.add(scores * WIDE, &[s]);
    let p = b.narrow(p, scores);
    // Without the kv repeat, v's transposed view is made contiguous for the matmul.
    let vc = if kv < h {
        v_held
    } else {
        b.add(kv_el * b.act, &[v])
    };
    let av = b.add(q_el * b.act, &[p, vc]);
    let y = b.add(q_el * b.act, &[av]);
    let o = b.linear(y, rows * c, adapted("o_proj"));
    let mid = b.add(rows * c * b.act, &[x, o]);
    let hn = b.norm(mid, rows, c);
    let g = b.linear(hn, rows * i, adapted("gate_proj"));
    let gs = b.add(rows * i * b.act, &[g]);
    let u = b.linear(hn, rows * i, adapted("up_proj"));
    let gu = b.add(rows * i * b.act, &[gs, u]);
    let down = b.linear(gu, rows * c, adapted("down_proj"));
    b.add(rows * c * b.act, &[mid, down]);
    b
}

/// Bytes the full fine-tune's first block keeps (every op tracked) that the LoRA step's
/// first block does not (its input from the frozen embedding, only the adapted linears
/// and what follows them tracked).
pub(super) fn first_block_untracked(spec: &RunSpec, targets: &[String]) -> f64 {
    let adapted = |m: &str| targets.iter().any(|t| t == m);
    let full = block(spec, &|_| true).kept(true);
    let lora = block(spec, &adapted).kept(false);
    (full - lora).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Context, RawConfig};
    use crate::presets::Presets;

    /// tests/train.rs's plan 10 (llama, 64 wide, 4 heads of 16 over 2 kv heads, MLP 192,
    /// 16 × 64 rows), f32.
    fn spec() -> RunSpec {
        let text = "[model]\nname = \"t\"\narch = \"llama\"\nhidden_size = 64\nnum_layers = 2\n\
            num_heads = 4\nnum_kv_heads = 2\nhead_dim = 16\nintermediate_size = 192\n\
            vocab_size = 256\ntie_embeddings = true\n[train]\nmicro_batch = 16\nseq_len = 64\n\
            precision = \"fp32\"\ncheckpointing = \"none\"\nengine = \"candle\"\n\
            [hardware]\ngpu = \"cpu\"\n";
        RawConfig::from_toml(text)
            .and_then(|r| r.resolve(&Presets::builtin()?, &Context::default()))
            .unwrap()
    }

    fn targets(t: &[&str]) -> Vec<String> {
        t.iter().map(|s| s.to_string()).collect()
    }

    /// With q_proj and v_proj adapted the first norm keeps what the full fine-tune's does
    /// (its input is the block's, its output the adapters' input) and the k path nothing
    /// but its transposed copy (the projection and the rotation, `2·N·KV·D`, and the copy
    /// repeating it to every head, `N·H·D`).
    #[test]
    fn q_and_v_leave_the_k_path_untracked() {
        let (n, kv, q) = (1024.0 * 4.0, 32.0, 64.0);
        let want = 2.0 * n * kv + n * q;
        let got = first_block_untracked(&spec(), &targets(&["q_proj", "v_proj"]));
        assert_eq!(got, want);
    }

    /// With down_proj alone the first block keeps down_proj's input and product, the
    /// attention half's output (held by the residual sum) and the block's output.
    #[test]
    fn down_proj_alone_keeps_only_what_its_adapter_reads() {
        let s = spec();
        let full = block(&s, &|_| true).kept(true);
        let (n, c, i) = (1024.0 * 4.0, 64.0, 192.0);
        let kept = n * i + 3.0 * n * c;
        let got = first_block_untracked(&s, &targets(&["down_proj"]));
        assert_eq!(got, full - kept);
        // Every target set keeps no more than the full fine-tune, adapting more keeps more.
        let all = targets(&[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]);
        assert!(first_block_untracked(&s, &all) <= got);
        assert!(first_block_untracked(&s, &all) >= 0.0);
    }
}
