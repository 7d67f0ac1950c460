//! Every parameter of a model, by name, as the reference implementation registers it.
//!
//! Sources: Hugging Face transformers `modeling_llama.py`, `modeling_qwen2.py`,
//! `modeling_gpt2.py`, `modeling_t5.py`; karpathy/nanochat `nanochat/gpt.py`.
//! The optimizer state, the gradients and ZeRO-3's gathered layer all follow from this list.

use crate::spec::{Arch, ModelSpec};

/// How an optimizer treats a parameter (nanochat's Muon takes the block matrices).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Embedding,
    Head,
    /// A 2-D weight inside a block.
    Matrix,
    /// Norm weights, biases, position tables.
    Vector,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    pub name: String,
    pub rows: u64,
    pub cols: u64,
    pub role: Role,
    /// The block it belongs to (encoder blocks first for T5), or None outside blocks.
    pub layer: Option<u64>,
}

impl Param {
    pub fn numel(&self) -> u64 {
        self.rows.saturating_mul(self.cols)
    }

    /// As registered: vectors are 1-D.
    pub fn shape(&self) -> Vec<u64> {
        if self.rows == 1 {
            vec![self.cols]
        } else {
            vec![self.rows, self.cols]
        }
    }
}

/// Indices into a parameter list, by block, built in one pass.
pub fn by_layer(params: &[Param], layers: u64) -> Vec<Vec<usize>> {
    let mut out = vec![Vec::new(); layers as usize];
    for (i, p) in params.iter().enumerate() {
        if let Some(l) = p.layer.and_then(|l| out.get_mut(l as usize)) {
            l.push(i);
        }
    }
    out
}

struct List<'a> {
    out: Vec<Param>,
    m: &'a ModelSpec,
}

impl List<'_> {
    fn push(&mut self, name: String, rows: u64, cols: u64, role: Role, layer: Option<u64>) {
        self.out.push(Param {
            name,
            rows,
            cols,
            role,
            layer,
        });
    }
    fn mat(&mut self, l: u64, name: &str, rows: u64, cols: u64) {
        self.push(
            format!("layers.{l}.{name}"),
            rows,
            cols,
            Role::Matrix,
            Some(l),
        );
    }
    fn vec(&mut self, l: Option<u64>, name: &str, n: u64) {
        let full = match l {
            Some(l) => format!("layers.{l}.{name}"),
            None => name.to_string(),
        };
        self.push(full, 1, n, Role::Vector, l);
    }
    fn embedding(&mut self, name: &str) {
        let (v, h) = (self.m.vocab_size, self.m.hidden_size);
        self.push(name.into(), v, h, Role::Embedding, None);
    }
    fn head(&mut self) {
        if !self.m.tie_embeddings {
            let (v, h) = (self.m.vocab_size, self.m.hidden_size);
            self.push("lm_head.weight".into(), v, h, Role::Head, None);
        }
    }
}

/// The parameters of `m`, in registration order.
pub fn parameters(m: &ModelSpec) -> Vec<Param> {
    let mut p = List { out: Vec::new(), m };
    let (h, i) = (m.hidden_size, m.intermediate_size);
    let q = m.num_heads.saturating_mul(m.head_dim);
    let kv = m.num_kv_heads.saturating_mul(m.head_dim);
    match m.arch {
        Arch::Llama | Arch::Qwen2 => {
            p.embedding("embed_tokens.weight");
            for l in 0..m.num_layers {
                p.mat(l, "self_attn.q_proj.weight", q, h);
                p.mat(l, "self_attn.k_proj.weight", kv, h);
                p.mat(l, "self_attn.v_proj.weight", kv, h);
                if m.arch == Arch::Qwen2 {
                    p.vec(Some(l), "self_attn.q_proj.bias", q);
                    p.vec(Some(l), "self_attn.k_proj.bias", kv);
                    p.vec(Some(l), "self_attn.v_proj.bias", kv);
                }
                p.mat(l, "self_attn.o_proj.weight", h, q);
                p.mat(l, "mlp.gate_proj.weight", i, h);
                p.mat(l, "mlp.up_proj.weight", i, h);
                p.mat(l, "mlp.down_proj.weight", h, i);
                p.vec(Some(l), "input_layernorm.weight", h);
                p.vec(Some(l), "post_attention_layernorm.weight", h);
            }
            p.vec(None, "norm.weight", h);
            p.head();
        }
        Arch::Gpt2 => {
            p.embedding("wte.weight");
            p.vec(None, "wpe.weight", m.max_positions.saturating_mul(h));
            for l in 0..m.num_layers {
                p.vec(Some(l), "ln_1.weight", h);
                p.vec(Some(l), "ln_1.bias", h);
                p.mat(l, "attn.c_attn.weight", h, q.saturating_add(2 * kv));
                p.vec(Some(l), "attn.c_attn.bias", q.saturating_add(2 * kv));
                p.mat(l, "attn.c_proj.weight", q, h);
                p.vec(Some(l), "attn.c_proj.bias", h);
                p.vec(Some(l), "ln_2.weight", h);
                p.vec(Some(l), "ln_2.bias", h);
                p.mat(l, "mlp.c_fc.weight", h, i);
                p.vec(Some(l), "mlp.c_fc.bias", i);
                p.mat(l, "mlp.c_proj.weight", i, h);
                p.vec(Some(l), "mlp.c_proj.bias", h);
            }
            p.vec(None, "ln_f.weight", h);
            p.vec(None, "ln_f.bias", h);
            p.head();
        }
        Arch::Nanochat => {
            p.embedding("wte.weight");
            for l in 0..m.num_layers {
                p.mat(l, "attn.c_q.weight", q, h);
                p.mat(l, "attn.c_k.weight", kv, h);
                p.mat(l, "attn.c_v.weight", kv, h);
                p.mat(l, "attn.c_proj.weight", h, q);
                p.mat(l, "mlp.c_fc.weight", i, h);
                p.mat(l, "mlp.c_proj.weight", h, i);
            }
            p.head();
        }
        Arch::T5 => {
            p.embedding("shared.weight");
            let buckets = 32u64;
            let ffn = |p: &mut List, l: u64| {
                if m.gated_ffn {
                    p.mat(l, "ffn.wi_0.weight", i, h);
                    p.mat(l, "ffn.wi_1.weight", i, h);
                } else {
                    p.mat(l, "ffn.wi.weight", i, h);
                }
                p.mat(l, "ffn.wo.weight", h, i);
                p.vec(Some(l), "ffn.layer_norm.weight", h);
            };
            let attn = |p: &mut List, l: u64, which: &str| {
                for w in ["q", "k", "v"] {
                    p.mat(l, &format!("{which}.{w}.weight"), q, h);
                }
                p.mat(l, &format!("{which}.o.weight"), h, q);
                p.vec(Some(l), &format!("{which}.layer_norm.weight"), h);
            };
            for l in 0..m.num_layers {
                attn(&mut p, l, "self_attn");
                if l == 0 {
                    p.vec(
                        Some(l),
                        "self_attn.relative_attention_bias",
                        buckets * m.num_heads,
                    );
                }
                ffn(&mut p, l);
            }
            p.vec(None, "encoder.final_layer_norm.weight", h);
            for d in 0..m.num_decoder_layers {
                let l = m.num_layers + d;
                attn(&mut p, l, "self_attn");
                if d == 0 {
                    p.vec(
                        Some(l),
                        "self_attn.relative_attention_bias",
                        buckets * m.num_heads,
                    );
                }
                attn(&mut p, l, "cross_attn");
                ffn(&mut p, l);
            }
            p.vec(None, "decoder.final_layer_norm.weight", h);
            p.head();
        }
    }
    p.out
}

/// Total parameter count.
pub fn count(m: &ModelSpec) -> u64 {
    parameters(m)
        .iter()
        .map(Param::numel)
        .fold(0, u64::saturating_add)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presets::Presets;

    fn n(name: &str) -> u64 {
        count(Presets::builtin().unwrap().model(name).unwrap())
    }

    #[test]
    fn parameter_counts_match_published_figures() {
        // REFERENCES.md, nanochat at vocab 65,536: d12 185.6 M, d16 335.5 M, d20 561.0 M, d26 1,082 M, d32 1,879 M.
        assert_eq!((n("nanochat-d12") + 50_000) / 100_000, 1856);
        assert_eq!((n("nanochat-d16") + 50_000) / 100_000, 3355);
        assert_eq!((n("nanochat-d20") + 50_000) / 100_000, 5610);
        assert_eq!((n("nanochat-d26") + 500_000) / 1_000_000, 1082);
        assert_eq!((n("nanochat-d32") + 500_000) / 1_000_000, 1879);
        // Hugging Face model cards: SmolLM2-135M 134,515,008; GPT-2 124,439,808; Qwen2.5-0.5B 494,032,768;
        // Llama-3.2-1B 1,235,814,400.
        assert_eq!(n("smollm2-135m"), 134_515_008);
        assert_eq!(n("gpt2"), 124_439_808);
        assert_eq!(n("qwen2.5-0.5b"), 494_032_768);
        assert_eq!(n("llama-3.2-1b"), 1_235_814_400);
    }
}
