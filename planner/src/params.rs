//! Every parameter of a model, by name, as the reference implementation registers it.
//!
//! Sources: Hugging Face transformers 5.23 `modeling_llama.py`, `modeling_qwen2.py`,
//! `modeling_qwen3.py`, `modeling_gemma2.py`, `modeling_gemma3.py`, `modeling_phi3.py`,
//! `modeling_olmo2.py`, `modeling_mixtral.py`, `modeling_qwen3_moe.py`, `modeling_gpt2.py`,
//! `modeling_t5.py`; karpathy/nanochat `nanochat/gpt.py`. A mixture of experts keeps each
//! projection of all its experts in one 3-D parameter (`experts.gate_up_proj` is
//! `[experts, 2 × width, hidden]`); it is listed here as its 2-D view
//! `[experts × 2 × width, hidden]`, which has the same elements.
//! The optimizer state, the gradients and ZeRO-3's gathered layer all follow from this list.

use crate::spec::{Arch, ModelSpec};
use crate::timeline::Shape;
use crate::units::DType;
use std::cell::RefCell;
use std::rc::Rc;

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
    /// Shared, so that every tensor named after the parameter can hold it cheaply.
    pub name: Rc<str>,
    pub rows: u64,
    pub cols: u64,
    pub role: Role,
    /// The block it belongs to (encoder blocks first for T5), or None outside blocks.
    pub layer: Option<u64>,
    /// False for LoRA's frozen base: no gradient, no optimizer state.
    pub trainable: bool,
    /// Its dtype where it differs from the run's parameter dtype (LoRA's fp32 adapters).
    pub dtype: Option<DType>,
}

impl Param {
    pub fn numel(&self) -> u64 {
        self.rows.saturating_mul(self.cols)
    }

    /// As registered: vectors are 1-D. Inline, so asking for it allocates nothing.
    pub fn shape(&self) -> Shape {
        if self.rows == 1 {
            Shape::new(&[self.cols])
        } else {
            Shape::new(&[self.rows, self.cols])
        }
    }
}

/// Indices into a parameter list, by block, built in one pass.
pub fn by_layer(params: &[Param], layers: u64) -> Vec<Vec<usize>> {
    let mut counts = vec![0usize; layers as usize];
    for p in params {
        if let Some(c) = p.layer.and_then(|l| counts.get_mut(l as usize)) {
            *c += 1;
        }
    }
    let mut out: Vec<Vec<usize>> = counts.into_iter().map(Vec::with_capacity).collect();
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
            name: name.into(),
            rows,
            cols,
            role,
            layer,
            trainable: true,
            dtype: None,
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
    match m.arch {
        Arch::Llama | Arch::Qwen2 | Arch::Qwen3 | Arch::Mixtral | Arch::Qwen3Moe => p.llama(),
        Arch::Gemma2 | Arch::Gemma3 => p.gemma(),
        Arch::Phi3 => p.phi3(),
        Arch::Olmo2 => p.olmo2(),
        Arch::Gpt2 => p.gpt2(),
        Arch::Nanochat => p.nanochat(),
        Arch::T5 => p.t5(),
    }
    p.out
}

thread_local! {
    /// The last model listed, with its parameters.
    static LAST: RefCell<Option<(ModelSpec, Rc<Vec<Param>>)>> = const { RefCell::new(None) };
}

/// [`parameters`], shared: the list is made once per model and handed out again while
/// the model stays the same (a fit estimates dozens of runs of one model, and naming
/// every parameter of each was about a seventh of its time).
pub fn shared(m: &ModelSpec) -> Rc<Vec<Param>> {
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        if let Some((_, p)) = last.as_ref().filter(|(k, _)| k == m) {
            return Rc::clone(p);
        }
        let p = Rc::new(parameters(m));
        *last = Some((m.clone(), Rc::clone(&p)));
        p
    })
}

/// Each architecture's parameters, named as its reference implementation registers them.
impl List<'_> {
    fn widths(&self) -> (u64, u64, u64, u64) {
        let m = self.m;
        let q = m.num_heads.saturating_mul(m.head_dim);
        let kv = m.num_kv_heads.saturating_mul(m.head_dim);
        (m.hidden_size, m.intermediate_size, q, kv)
    }

    /// transformers' `LlamaForCausalLM` (Qwen2 adds q/k/v biases, Qwen3 and Qwen3-MoE
    /// per-head q/k norms; Mixtral and Qwen3-MoE route to experts instead of one MLP).
    fn llama(&mut self) {
        let h = self.m.hidden_size;
        self.embedding("embed_tokens.weight");
        for l in 0..self.m.num_layers {
            self.attention(l);
            self.mlp(l);
            self.vec(Some(l), "input_layernorm.weight", h);
            self.vec(Some(l), "post_attention_layernorm.weight", h);
        }
        self.vec(None, "norm.weight", h);
        self.head();
    }

    /// `self_attn` with the biases and norms its family registers.
    fn attention(&mut self, l: u64) {
        let (h, _, q, kv) = self.widths();
        let arch = self.m.arch;
        self.mat(l, "self_attn.q_proj.weight", q, h);
        self.mat(l, "self_attn.k_proj.weight", kv, h);
        self.mat(l, "self_attn.v_proj.weight", kv, h);
        if arch == Arch::Qwen2 {
            self.vec(Some(l), "self_attn.q_proj.bias", q);
            self.vec(Some(l), "self_attn.k_proj.bias", kv);
            self.vec(Some(l), "self_attn.v_proj.bias", kv);
        }
        self.mat(l, "self_attn.o_proj.weight", h, q);
        // Qwen3 and Gemma 3 normalize each head (width head_dim); OLMo 2 all heads at once.
        let (qn, kn) = match arch {
            Arch::Qwen3 | Arch::Qwen3Moe | Arch::Gemma3 => (self.m.head_dim, self.m.head_dim),
            Arch::Olmo2 => (q, kv),
            _ => return,
        };
        self.vec(Some(l), "self_attn.q_norm.weight", qn);
        self.vec(Some(l), "self_attn.k_norm.weight", kn);
    }

    /// The SwiGLU (GeGLU for Gemma) MLP, or the router and the experts' stacked weights.
    fn mlp(&mut self, l: u64) {
        let (h, i, _, _) = self.widths();
        let f = &self.m.features;
        if f.experts > 0 {
            let (e, w) = (f.experts, f.expert_intermediate);
            self.mat(l, "mlp.gate.weight", e, h);
            self.mat(l, "mlp.experts.gate_up_proj", e.saturating_mul(2 * w), h);
            self.mat(l, "mlp.experts.down_proj", e.saturating_mul(h), w);
            return;
        }
        self.mat(l, "mlp.gate_proj.weight", i, h);
        self.mat(l, "mlp.up_proj.weight", i, h);
        self.mat(l, "mlp.down_proj.weight", h, i);
    }

    /// transformers' `Gemma2ForCausalLM` / `Gemma3ForCausalLM`: a norm before and after
    /// both the attention and the MLP.
    fn gemma(&mut self) {
        let h = self.m.hidden_size;
        self.embedding("embed_tokens.weight");
        for l in 0..self.m.num_layers {
            self.attention(l);
            self.mlp(l);
            for norm in [
                "input_layernorm",
                "post_attention_layernorm",
                "pre_feedforward_layernorm",
                "post_feedforward_layernorm",
            ] {
                self.vec(Some(l), &format!("{norm}.weight"), h);
            }
        }
        self.vec(None, "norm.weight", h);
        self.head();
    }

    /// transformers' `Phi3ForCausalLM`: one `qkv_proj`, one `gate_up_proj`.
    fn phi3(&mut self) {
        let (h, i, q, kv) = self.widths();
        self.embedding("embed_tokens.weight");
        for l in 0..self.m.num_layers {
            self.mat(l, "self_attn.o_proj.weight", h, q);
            self.mat(l, "self_attn.qkv_proj.weight", q.saturating_add(2 * kv), h);
            self.mat(l, "mlp.gate_up_proj.weight", 2 * i, h);
            self.mat(l, "mlp.down_proj.weight", h, i);
            self.vec(Some(l), "input_layernorm.weight", h);
            self.vec(Some(l), "post_attention_layernorm.weight", h);
        }
        self.vec(None, "norm.weight", h);
        self.head();
    }

    /// transformers' `Olmo2ForCausalLM`: the norms follow the attention and the MLP.
    fn olmo2(&mut self) {
        let h = self.m.hidden_size;
        self.embedding("embed_tokens.weight");
        for l in 0..self.m.num_layers {
            self.attention(l);
            self.mlp(l);
            self.vec(Some(l), "post_attention_layernorm.weight", h);
            self.vec(Some(l), "post_feedforward_layernorm.weight", h);
        }
        self.vec(None, "norm.weight", h);
        self.head();
    }

    /// transformers' `GPT2LMHeadModel`.
    fn gpt2(&mut self) {
        let (h, i, q, kv) = self.widths();
        self.embedding("wte.weight");
        self.vec(None, "wpe.weight", self.m.max_positions.saturating_mul(h));
        for l in 0..self.m.num_layers {
            self.vec(Some(l), "ln_1.weight", h);
            self.vec(Some(l), "ln_1.bias", h);
            self.mat(l, "attn.c_attn.weight", h, q.saturating_add(2 * kv));
            self.vec(Some(l), "attn.c_attn.bias", q.saturating_add(2 * kv));
            self.mat(l, "attn.c_proj.weight", q, h);
            self.vec(Some(l), "attn.c_proj.bias", h);
            self.vec(Some(l), "ln_2.weight", h);
            self.vec(Some(l), "ln_2.bias", h);
            self.mat(l, "mlp.c_fc.weight", h, i);
            self.vec(Some(l), "mlp.c_fc.bias", i);
            self.mat(l, "mlp.c_proj.weight", i, h);
            self.vec(Some(l), "mlp.c_proj.bias", h);
        }
        self.vec(None, "ln_f.weight", h);
        self.vec(None, "ln_f.bias", h);
        self.head();
    }

    /// nanochat's `GPT` (parameter-free norms).
    fn nanochat(&mut self) {
        let (h, i, q, kv) = self.widths();
        self.embedding("wte.weight");
        for l in 0..self.m.num_layers {
            self.mat(l, "attn.c_q.weight", q, h);
            self.mat(l, "attn.c_k.weight", kv, h);
            self.mat(l, "attn.c_v.weight", kv, h);
            self.mat(l, "attn.c_proj.weight", h, q);
            self.mat(l, "mlp.c_fc.weight", i, h);
            self.mat(l, "mlp.c_proj.weight", h, i);
        }
        self.head();
    }

    /// transformers' `T5ForConditionalGeneration`: encoder blocks, then decoder blocks
    /// numbered after them; the first block of each stack holds the relative position bias.
    fn t5(&mut self) {
        let h = self.m.hidden_size;
        self.embedding("shared.weight");
        for l in 0..self.m.num_layers {
            self.t5_attention(l, "self_attn");
            if l == 0 {
                self.t5_position_bias(l);
            }
            self.t5_ffn(l);
        }
        self.vec(None, "encoder.final_layer_norm.weight", h);
        for d in 0..self.m.num_decoder_layers {
            let l = self.m.num_layers + d;
            self.t5_attention(l, "self_attn");
            if d == 0 {
                self.t5_position_bias(l);
            }
            self.t5_attention(l, "cross_attn");
            self.t5_ffn(l);
        }
        self.vec(None, "decoder.final_layer_norm.weight", h);
        self.head();
    }

    fn t5_attention(&mut self, l: u64, which: &str) {
        let (h, _, q, _) = self.widths();
        for w in ["q", "k", "v"] {
            self.mat(l, &format!("{which}.{w}.weight"), q, h);
        }
        self.mat(l, &format!("{which}.o.weight"), h, q);
        self.vec(Some(l), &format!("{which}.layer_norm.weight"), h);
    }

    fn t5_position_bias(&mut self, l: u64) {
        const BUCKETS: u64 = 32;
        let n = BUCKETS * self.m.num_heads;
        self.vec(Some(l), "self_attn.relative_attention_bias", n);
    }

    fn t5_ffn(&mut self, l: u64) {
        let (h, i, _, _) = self.widths();
        if self.m.gated_ffn {
            self.mat(l, "ffn.wi_0.weight", i, h);
            self.mat(l, "ffn.wi_1.weight", i, h);
        } else {
            self.mat(l, "ffn.wi.weight", i, h);
        }
        self.mat(l, "ffn.wo.weight", h, i);
        self.vec(Some(l), "ffn.layer_norm.weight", h);
    }
}

/// Total parameter count.
pub fn count(m: &ModelSpec) -> u64 {
    shared(m)
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
