//! The architectures the engine trains, written with differentiable candle ops (candle's
//! fused `rms_norm`, `softmax_last_dim` and `rope` have no backward), but for RMSNorm, RoPE
//! and the attention's softmax, which are the engine's own nodes with their backward
//! ([`crate::engine::fused`]), and the loss chunk ([`crate::engine::xent`]).
//!
//! - `nanochat` (karpathy/nanochat `gpt.py`): `x = norm(wte[ids])`; per block
//!   `x += attn(norm(x))`, `x += c_proj(relu(c_fc(norm(x)))²)`, parameter-free RMSNorm,
//!   RoPE then QK-norm, untied `lm_head`, logits `15·tanh(z/15)`.
//! - `llama` (transformers `modeling_llama.py`; also Mistral and SmolLM2): RMSNorm with
//!   weights, SwiGLU `down(silu(gate(x))·up(x))`, grouped-query attention, RoPE as
//!   transformers rotates (`x·cos + rotate_half(x)·sin`, the opposite sense to nanochat's),
//!   logits `h·wteᵀ` (tied) or `h·lm_headᵀ`; a sliding window where the config has one.
//! - `qwen2` (`modeling_qwen2.py`): llama with biases on q, k and v.
//! - `qwen3` (`modeling_qwen3.py`): llama with an RMSNorm (weights, width `head_dim`) on
//!   each head of q and k before RoPE.
//! - `t5` (`modeling_t5.py`, ChatLM-mini-Chinese): an encoder-decoder, its blocks in
//!   [`crate::engine::t5`]; this `Model` holds its parameters, embedding and head.
//!
//! RMSNorm's epsilon and RoPE's base are the config's ([`Numerics`]); a plan without a
//! config.json gets transformers' `LlamaConfig` defaults (1e-6, 10,000).
//!
//! Activations are `(N, C)` with `N = batch·seq` rows; attention reshapes to `(B, H, T, D)`.
//! Parameters are named as [`vramplan_planner::parameters`] lists them.
//!
//! Mixed precision: parameters (the master weights) stay in `dtype` (f32); the forward runs
//! in `compute` (bf16 on CUDA): every use of a weight casts it, so its gradient comes back
//! through the cast in f32. As under PyTorch's autocast, the RMSNorm statistics, the
//! attention softmax (after the mask) and the logits with their soft-cap and log-sum-exp
//! run in f32. With `compute == dtype` every cast is a no-op and the graph is the plain
//! f32 one.

use crate::engine::head_grad::HeadGradSum;
use crate::engine::rng::Rng;
use crate::engine::step::Grads;
use crate::engine::xent::HeadGrad;
use candle_core::{DType, Device, Result, Tensor, Var};
use std::collections::BTreeMap;
use vramplan_planner::{Arch, ModelSpec, Role};

/// nanochat's logit soft-cap.
const SOFTCAP: f64 = 15.0;

/// The numbers a config.json gives beyond the model's shape.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Numerics {
    /// RMSNorm epsilon (`rms_norm_eps`).
    pub rms_eps: f64,
    /// RoPE base (`rope_theta`).
    pub rope_theta: f64,
    /// T5: relative-position buckets and the distance the last one starts at
    /// (`relative_attention_num_buckets`, `relative_attention_max_distance`).
    pub rel_buckets: usize,
    pub rel_max_distance: usize,
    /// T5: the decoder's first input (`decoder_start_token_id`).
    pub decoder_start: u32,
}

impl Default for Numerics {
    /// transformers' `LlamaConfig` defaults, also the engine's nanochat (PyTorch's
    /// `F.rms_norm` default for f32 is its machine epsilon; 1e-6 is harmless for both).
    fn default() -> Numerics {
        Numerics {
            rms_eps: 1e-6,
            rope_theta: 10_000.0,
            rel_buckets: crate::engine::t5::BUCKETS,
            rel_max_distance: 128,
            decoder_start: 0,
        }
    }
}

pub struct Model {
    pub spec: ModelSpec,
    /// The parameters' (master weights') dtype: f32, or f64 for gradient checks.
    pub dtype: DType,
    /// The forward's dtype: `dtype`, or bf16 / f16 over f32 master weights.
    pub compute: DType,
    pub device: Device,
    /// The trained parameters: every parameter, or under LoRA the adapters alone.
    pub params: BTreeMap<String, Var>,
    /// Under LoRA the base parameters, frozen: plain tensors, not `Var`s, so they get no
    /// gradient and no optimizer state ([`crate::engine::lora`]).
    pub frozen: BTreeMap<String, Tensor>,
    /// The adapters' scaling and targets, under LoRA.
    pub lora: Option<crate::engine::lora::Adapters>,
    pub numerics: Numerics,
}

/// `x` in at least f32 (f64 stays f64).
pub fn wide(x: &Tensor) -> Result<Tensor> {
    match x.dtype() {
        DType::F64 => Ok(x.clone()),
        _ => x.to_dtype(DType::F32),
    }
}

/// `x / sqrt(mean(x²) + eps)` over the last dimension, computed in at least f32 and
/// returned in `x`'s dtype.
pub fn rms(x: &Tensor, eps: f64) -> Result<Tensor> {
    super::fused::rms_norm(&wide(x)?, eps)?.to_dtype(x.dtype())
}

/// `x · wᵀ`.
fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    super::matmul::matmul(x, &w.t()?)
}

/// A frozen op's `cpu_fwd` and `cuda_fwd`: its generic `fwd` over the storage of the
/// input's device, with the weight's storage picked from the same device.
/// `storage_forwards!(cuda)` writes the `cuda_fwd` alone.
macro_rules! storage_forwards {
    () => {
        fn cpu_fwd(
            &self,
            x: &candle_core::CpuStorage,
            l: &candle_core::Layout,
        ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
            self.fwd(x, l, |s| match s {
                candle_core::Storage::Cpu(w) => Some(w),
                _ => None,
            })
        }

        storage_forwards!(cuda);
    };
    (cuda) => {
        fn cuda_fwd(
            &self,
            x: &candle_core::CudaStorage,
            l: &candle_core::Layout,
        ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
            self.fwd(x, l, |s| match s {
                candle_core::Storage::Cuda(w) => Some(w),
                _ => None,
            })
        }
    };
}

/// `x·Wᵀ` for a frozen `W` (`out × in`, not a `Var`) as one candle op whose backward gives
/// `x` its gradient `g·W` and `W` none. candle's own matmul backward computes the gradient
/// of both operands whether they need one or not (`backprop.rs`, `Op::Matmul`), so under
/// LoRA every frozen linear would get a weight-sized gradient in each backward's store.
struct FrozenLinear {
    w: Tensor,
}

impl FrozenLinear {
    /// `x` `(m, k)` by `Wᵀ` through the storage's own matmul (the kernel `Tensor::matmul`
    /// runs): on CUDA, and for bf16 on the CPU.
    fn fwd<S: candle_core::backend::BackendStorage>(
        &self,
        x: &S,
        l: &candle_core::Layout,
        pick: impl Fn(&candle_core::Storage) -> Option<&S>,
    ) -> Result<(S, candle_core::Shape)> {
        let (m, k) = l.shape().dims2()?;
        let n = self.w.dim(0)?;
        let wt = self.w.t()?;
        let (storage, wl) = wt.storage_and_layout();
        let Some(w) = pick(&storage) else {
            candle_core::bail!("frozen linear: the weight is on another device than its input");
        };
        Ok((x.matmul(w, (1, m, n, k), l, wl)?, (m, n).into()))
    }
}

impl candle_core::CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    /// On the CPU through [`super::matmul::cpu_product`], as a trained linear multiplies.
    fn cpu_fwd(
        &self,
        x: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let wt = self.w.t()?;
        let (storage, wl) = wt.storage_and_layout();
        match &*storage {
            candle_core::Storage::Cpu(w) if !matches!(x, candle_core::CpuStorage::BF16(_)) => {
                super::matmul::cpu_product(x, l, w, wl)
            }
            _ => self.fwd(x, l, |s| match s {
                candle_core::Storage::Cpu(w) => Some(w),
                _ => None,
            }),
        }
    }

    storage_forwards!(cuda);

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(super::matmul::matmul(g, &self.w)?))
    }
}

/// `x ⊙ w` or `x + w` for a frozen `w` broadcast over `x`'s leading dimensions (a norm's
/// scale, a bias) as one candle op whose backward gives `x` its gradient and `w` none.
/// candle's own backward of a broadcast op gives the untracked operand, a leaf, a gradient
/// of `x`'s whole shape that nothing consumes: under LoRA one `(N, C)` tensor per norm and
/// bias, kept in the store until the backward ends (measured: most of what a LoRA step's
/// backward held beyond the full fine-tune's, `VRAMPLAN_MEM_DEBUG=census`).
struct FrozenOperand {
    w: Tensor,
    add: bool,
}

impl FrozenOperand {
    fn fwd<S: candle_core::backend::BackendStorage>(
        &self,
        x: &S,
        l: &candle_core::Layout,
        pick: impl Fn(&candle_core::Storage) -> Option<&S>,
    ) -> Result<(S, candle_core::Shape)> {
        let (storage, wl) = self.w.storage_and_layout();
        let Some(w) = pick(&storage) else {
            candle_core::bail!("frozen operand: the weight is on another device than its input");
        };
        let wl = wl.broadcast_as(l.shape().clone())?;
        let y = if self.add {
            x.binary_impl::<candle_core::op::Add>(w, l, &wl)?
        } else {
            x.binary_impl::<candle_core::op::Mul>(w, l, &wl)?
        };
        Ok((y, l.shape().clone()))
    }
}

impl candle_core::CustomOp1 for FrozenOperand {
    fn name(&self) -> &'static str {
        if self.add {
            "frozen-bias"
        } else {
            "frozen-scale"
        }
    }

    storage_forwards!();

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        if self.add {
            Ok(Some(g.clone()))
        } else {
            Ok(Some(g.broadcast_mul(&self.w)?))
        }
    }
}

/// `x ⊙ w`, or `x + w` with `add`, for a `w` that never needs a gradient (a frozen
/// weight, the rotary tables, the causal mask) broadcast over `x`: through
/// [`FrozenOperand`] where `x` is tracked, else the plain broadcast op (which then records
/// nothing).
pub(crate) fn frozen_op(x: &Tensor, w: &Tensor, add: bool) -> Result<Tensor> {
    if !x.track_op() {
        return if add {
            x.broadcast_add(w)
        } else {
            x.broadcast_mul(w)
        };
    }
    x.apply_op1(FrozenOperand { w: w.clone(), add })
}

/// Rotary tables `(T, D/2)`, and the sense of the rotation.
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
    /// transformers' sense (`rotate_half`) rather than nanochat's.
    hf: bool,
}

impl Rope {
    /// The tables of `model` for sequences of `t`: frequencies `base^(−2i/D)`, in `dtype`.
    pub fn new(model: &Model, t: usize, dtype: DType) -> Result<Rope> {
        let head_dim = model.spec.head_dim as usize;
        let base = model.numerics.rope_theta;
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for pos in 0..t {
            for i in 0..half {
                let freq = base.powf(-(2.0 * i as f64) / head_dim as f64);
                let a = pos as f64 * freq;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let mk = |v: Vec<f64>| Tensor::from_vec(v, (t, half), &model.device)?.to_dtype(dtype);
        Ok(Rope {
            cos: mk(cos)?,
            sin: mk(sin)?,
            hf: model.spec.arch != Arch::Nanochat,
        })
    }

    /// On `(B, H, T, D)` with halves `(x1, x2)`: transformers' `(x1·cos − x2·sin,
    /// x2·cos + x1·sin)`, or nanochat's `(x1·cos + x2·sin, x2·cos − x1·sin)`.
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        super::fused::rope(x, &self.cos, &self.sin, self.hf)
    }
}

/// The additive causal mask `(T, T)`: 0 where query `i` sees key `j` (`j ≤ i`, and with a
/// sliding window `window > 0` also `i − j < window`, as transformers' Mistral masks),
/// −1e9 elsewhere; f32 (f64 for an f64 model), added to the scores after they are widened.
pub fn causal_mask(t: usize, window: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let v: Vec<f32> = (0..t * t)
        .map(|i| {
            let (q, k) = (i / t, i % t);
            if k > q || (window > 0 && q - k >= window) {
                -1e9
            } else {
                0.0
            }
        })
        .collect();
    let wide = if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    Tensor::from_vec(v, (t, t), device)?.to_dtype(wide)
}

/// The decoder-only models' initial parameters (see [`Model::new`]).
fn init(
    spec: &ModelSpec,
    dtype: DType,
    device: &Device,
    rng: &mut Rng,
) -> Result<BTreeMap<String, Var>> {
    let mut params = BTreeMap::new();
    for p in vramplan_planner::parameters(spec) {
        let (rows, cols) = (p.rows as usize, p.cols as usize);
        let std = match p.role {
            Role::Vector => 0.0,
            Role::Embedding if spec.arch == Arch::Nanochat => 1.0,
            Role::Embedding => 0.02,
            Role::Head => 0.1 / (cols as f64).sqrt(),
            Role::Matrix if p.name.contains("proj.weight") && !p.name.contains("q_proj") => {
                0.5 / (cols as f64).sqrt()
            }
            Role::Matrix => 1.0 / (cols as f64).sqrt(),
        };
        let t = if p.name.ends_with(".bias") {
            Tensor::zeros(rows * cols, dtype, device)?
        } else if p.role == Role::Vector {
            Tensor::ones(rows * cols, dtype, device)?
        } else {
            let v: Vec<f64> = (0..rows * cols).map(|_| rng.normal() * std).collect();
            Tensor::from_vec(v, (rows, cols), &Device::Cpu)?
                .to_dtype(dtype)?
                .to_device(device)?
        };
        params.insert(p.name.to_string(), Var::from_tensor(&t)?);
    }
    Ok(params)
}

impl Model {
    /// A freshly initialized model: matrices `N(0, 1/√fan_in)` (output projections halved),
    /// embeddings `N(0, 1)` (nanochat) or `N(0, 0.02)` (llama, tied), norm weights 1; T5 as
    /// transformers initializes it ([`crate::engine::t5::init`]). The same seed gives the
    /// same weights on every device and in every compute dtype.
    pub fn new(
        spec: &ModelSpec,
        dtype: DType,
        compute: DType,
        device: &Device,
        rng: &mut Rng,
    ) -> Result<Model> {
        let params = match spec.arch {
            Arch::T5 => crate::engine::t5::init(spec, dtype, device, rng)?,
            _ => init(spec, dtype, device, rng)?,
        };
        Ok(Model {
            spec: spec.clone(),
            dtype,
            compute,
            device: device.clone(),
            params,
            frozen: BTreeMap::new(),
            lora: None,
            numerics: Numerics::default(),
        })
    }

    /// Parameter `name` in the compute dtype: a cast in the graph, or the parameter itself.
    pub fn w(&self, name: &str) -> Result<Tensor> {
        self.p(name).to_dtype(self.compute)
    }

    /// `x ⊙ w`, or `x + w` with `add`, for parameter `name` broadcast over `x`'s rows (a
    /// norm's scale, a bias): a frozen `w` over a tracked `x` through [`FrozenOperand`].
    fn broadcast_op(&self, x: &Tensor, name: &str, add: bool) -> Result<Tensor> {
        let w = self.w(name)?;
        if self.trains(name) {
            return if add {
                x.broadcast_add(&w)
            } else {
                x.broadcast_mul(&w)
            };
        }
        frozen_op(x, &w, add)
    }

    pub fn p(&self, name: &str) -> &Tensor {
        match (self.params.get(name), self.frozen.get(name)) {
            (Some(v), _) => v.as_tensor(),
            (None, Some(t)) => t,
            (None, None) => panic!("the model has no parameter {name}"),
        }
    }

    /// `x·Wᵀ` for the weight `name`; a frozen weight through [`FrozenLinear`], so that it
    /// gets no gradient.
    fn matmul_t(&self, x: &Tensor, name: &str) -> Result<Tensor> {
        let w = self.w(name)?;
        if self.trains(name) {
            linear(x, &w)
        } else {
            x.contiguous()?.apply_op1(FrozenLinear { w })
        }
    }

    /// Whether parameter `name` is trained (a `Var` of [`Model::params`]).
    pub fn trains(&self, name: &str) -> bool {
        self.params.contains_key(name)
    }

    /// The linear `stem` (`layers.0.self_attn.q_proj`) on rows `x`: `x·Wᵀ`, plus under
    /// LoRA `scale·(x·Aᵀ)·Bᵀ` where the linear has an adapter.
    pub(crate) fn lin(&self, x: &Tensor, stem: &str) -> Result<Tensor> {
        let y = self.matmul_t(x, &format!("{stem}.weight"))?;
        let Some(ad) = self.lora.as_ref().filter(|a| a.targets(stem)) else {
            return Ok(y);
        };
        let (na, nb) = crate::engine::lora::names(stem);
        let low = linear(x, &self.w(&na)?)?;
        y + (linear(&low, &self.w(&nb)?)? * ad.scale())?
    }

    pub fn embedding_name(&self) -> &'static str {
        match self.spec.arch {
            Arch::Nanochat => "wte.weight",
            Arch::T5 => "shared.weight",
            _ => "embed_tokens.weight",
        }
    }

    /// Token ids `(N,)` to the first block's input `(N, C)`.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let x = self
            .p(self.embedding_name())
            .embedding(ids)?
            .to_dtype(self.compute)?;
        match self.spec.arch {
            Arch::Nanochat => rms(&x, self.numerics.rms_eps),
            _ => Ok(x),
        }
    }

    /// RMSNorm with the weight `weight` (nanochat's has none), one node
    /// ([`super::fused::rms_norm_scaled`]).
    fn norm(&self, x: &Tensor, weight: &str) -> Result<Tensor> {
        match self.spec.arch {
            Arch::Nanochat => rms(x, self.numerics.rms_eps),
            _ => super::fused::rms_norm_scaled(x, &self.w(weight)?, self.numerics.rms_eps),
        }
    }

    /// Block `l` on `(N, C)` rows of `b` sequences.
    pub fn block(
        &self,
        l: usize,
        x: &Tensor,
        b: usize,
        rope: &Rope,
        mask: &Tensor,
    ) -> Result<Tensor> {
        let h = self.attention_half(l, x, b, rope, mask)?;
        self.mlp_half(l, &h)
    }

    /// `x + attn(norm(x))`: the first half of block `l`.
    pub fn attention_half(
        &self,
        l: usize,
        x: &Tensor,
        b: usize,
        rope: &Rope,
        mask: &Tensor,
    ) -> Result<Tensor> {
        let h = self.norm(x, &format!("layers.{l}.input_layernorm.weight"))?;
        x + self.attention(l, &h, b, rope, mask)?
    }

    /// `x + mlp(norm(x))`: the second half of block `l`.
    pub fn mlp_half(&self, l: usize, x: &Tensor) -> Result<Tensor> {
        let h = self.norm(x, &format!("layers.{l}.post_attention_layernorm.weight"))?;
        x + self.mlp(l, &h)?
    }

    fn attention(
        &self,
        l: usize,
        x: &Tensor,
        b: usize,
        rope: &Rope,
        mask: &Tensor,
    ) -> Result<Tensor> {
        let s = &self.spec;
        let (n, nh, nkv, hd) = (
            x.dim(0)?,
            s.num_heads as usize,
            s.num_kv_heads as usize,
            s.head_dim as usize,
        );
        let t = n / b;
        let names: [&str; 4] = match s.arch {
            Arch::Nanochat => ["attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj"],
            _ => [
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.o_proj",
            ],
        };
        let stem = |i: usize| format!("layers.{l}.{}", names[i]);
        // q, k, v as heads `(B, H, T, D)`, with Qwen2's biases.
        let project = |i: usize, h: usize| -> Result<Tensor> {
            let mut y = self.lin(x, &stem(i))?;
            if s.arch == Arch::Qwen2 {
                y = self.broadcast_op(&y, &format!("layers.{l}.{}.bias", names[i]), true)?;
            }
            y.reshape((b, t, h, hd))?.transpose(1, 2)
        };
        let (mut q, mut k, mut v) = (project(0, nh)?, project(1, nkv)?, project(2, nkv)?);
        let eps = self.numerics.rms_eps;
        match s.arch {
            // nanochat normalizes q and k after RoPE, without weights.
            Arch::Nanochat => {
                q = rms(&rope.apply(&q)?, eps)?;
                k = rms(&rope.apply(&k)?, eps)?;
            }
            // Qwen3 normalizes each head before RoPE, with weights.
            Arch::Qwen3 => {
                let (qn, kn) = (
                    format!("layers.{l}.self_attn.q_norm.weight"),
                    format!("layers.{l}.self_attn.k_norm.weight"),
                );
                q = rope.apply(&self.norm(&q, &qn)?)?;
                k = rope.apply(&self.norm(&k, &kn)?)?;
            }
            _ => {
                q = rope.apply(&q)?;
                k = rope.apply(&k)?;
            }
        }
        if nh != nkv {
            let rep = nh / nkv;
            let expand = |y: &Tensor| {
                y.unsqueeze(2)?
                    .broadcast_as((b, nkv, rep, t, hd))?
                    .reshape((b, nh, t, hd))
            };
            k = expand(&k)?;
            v = expand(&v)?;
        }
        let scale = 1.0 / (hd as f64).sqrt();
        let att = super::matmul::matmul(&q.contiguous()?, &k.t()?.contiguous()?)?;
        let att = super::fused::causal_softmax(&wide(&att)?, scale, self.window(), mask)?
            .to_dtype(self.compute)?;
        let y = super::matmul::matmul(&att, &v.contiguous()?)?;
        let y = y.transpose(1, 2)?.reshape((n, nh * hd))?;
        self.lin(&y, &stem(3))
    }

    fn mlp(&self, l: usize, x: &Tensor) -> Result<Tensor> {
        let lin = |x: &Tensor, n: &str| self.lin(x, &format!("layers.{l}.mlp.{n}"));
        match self.spec.arch {
            Arch::Nanochat => {
                let h = super::fused::relu_sqr(&lin(x, "c_fc")?)?;
                lin(&h, "c_proj")
            }
            _ => {
                let g = lin(x, "gate_proj")?.silu()?;
                let u = lin(x, "up_proj")?;
                lin(&(g * u)?, "down_proj")
            }
        }
    }

    /// The name of the matrix the head multiplies by (the embedding when tied).
    pub fn head_name(&self) -> &'static str {
        if self.spec.tie_embeddings {
            self.embedding_name()
        } else {
            "lm_head.weight"
        }
    }

    /// The logits of rows `h` (last block's output), in at least f32: the final norm, the
    /// head's matmul in the compute dtype, then the cast, then nanochat's soft-cap. T5's
    /// rows come normalized and scaled from its decoder ([`crate::engine::t5`]).
    pub fn logits(&self, h: &Tensor) -> Result<Tensor> {
        super::xent::softcapped(&self.raw_logits(h)?, self.softcap())
    }

    /// The logits before nanochat's soft-cap, in at least f32.
    fn raw_logits(&self, h: &Tensor) -> Result<Tensor> {
        wide(&self.matmul_t(&self.head_input(h)?, self.head_name())?)
    }

    /// What the head multiplies: the last block's output normed (T5's comes normed).
    fn head_input(&self, h: &Tensor) -> Result<Tensor> {
        match self.spec.arch {
            Arch::T5 => Ok(h.clone()),
            _ => self.norm(h, "norm.weight"),
        }
    }

    /// nanochat's logit soft-cap.
    fn softcap(&self) -> Option<f64> {
        (self.spec.arch == Arch::Nanochat).then_some(SOFTCAP)
    }

    /// Sum over rows of the cross-entropy `logsumexp(z) − z[target]`; targets `(R, 1)` u32.
    /// A trained head's gradient goes into `sum` where given, else into candle's store.
    pub fn loss_sum(
        &self,
        h: &Tensor,
        targets: &Tensor,
        sum: Option<&HeadGradSum>,
    ) -> Result<Tensor> {
        self.token_losses(h, targets, sum)?.sum_all()
    }

    /// The cross-entropy of each row, `(R, 1)`, in at least f32; targets `(R, 1)` u32.
    pub fn token_losses(
        &self,
        h: &Tensor,
        targets: &Tensor,
        sum: Option<&HeadGradSum>,
    ) -> Result<Tensor> {
        let h = self.head_input(h)?;
        let w = self.w(self.head_name())?;
        let head = match sum {
            _ if !self.trains(self.head_name()) => HeadGrad::None,
            Some(s) => HeadGrad::Sum(s.clone()),
            None => HeadGrad::Store,
        };
        super::xent::head_losses(&h, &w, head, targets, self.softcap())
    }

    /// A running sum for the head's gradient where the head trains, taking over what
    /// `grads` accumulated for it in earlier micro-steps.
    pub fn head_grad_sum(&self, grads: &mut Grads) -> Option<HeadGradSum> {
        let name = self.head_name();
        self.trains(name)
            .then(|| HeadGradSum::new(grads.remove(name), self.p(name).dtype()))
    }

    /// Sum over rows of the cross-entropy times `weights` `(R, 1)` (of the losses' dtype).
    pub fn weighted_loss_sum(
        &self,
        h: &Tensor,
        targets: &Tensor,
        weights: &Tensor,
        sum: Option<&HeadGradSum>,
    ) -> Result<Tensor> {
        let l = self.token_losses(h, targets, sum)?;
        let w = weights.to_dtype(l.dtype())?;
        (l * w)?.sum_all()
    }

    /// The attention window of every layer (0: none). Models whose layers differ (Gemma)
    /// are refused before they get here.
    pub fn window(&self) -> usize {
        self.spec.features.sliding_window as usize
    }

    pub fn num_layers(&self) -> usize {
        self.spec.num_layers as usize
    }

    /// Names of the parameters of block `l`'s attention half (`attn`) or MLP half.
    pub fn half_params(&self, l: usize, attn: bool) -> Vec<String> {
        self.block_params(l)
            .into_iter()
            .filter(|n| {
                let is_attn = n.contains("attn") || n.contains("input_layernorm");
                is_attn == attn
            })
            .collect()
    }

    /// Names of the parameters that belong to block `l`.
    pub fn block_params(&self, l: usize) -> Vec<String> {
        let prefix = format!("layers.{l}.");
        self.params
            .keys()
            .filter(|k| k.starts_with(&prefix))
            .cloned()
            .collect()
    }

    /// Trained parameters the loss stage touches: the final norm and the head.
    pub fn head_params(&self) -> Vec<String> {
        [self.head_name(), "norm.weight"]
            .into_iter()
            .filter(|n| self.trains(n))
            .map(str::to_string)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frozen scale or bias gives the same values and the same input gradient as the
    /// broadcast op, and leaves the store no gradient of the weight (the broadcast op
    /// leaves one of the weight's broadcast view, `x`'s whole shape).
    #[test]
    fn frozen_operands_match_the_broadcast_ops_and_leave_no_weight_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (6, 4), &dev)?)?;
        let w = Tensor::randn(0f32, 1., 4, &dev)?;
        let g = Tensor::randn(0f32, 1., (6, 4), &dev)?;
        for add in [false, true] {
            let frozen = x
                .as_tensor()
                .apply_op1(FrozenOperand { w: w.clone(), add })?;
            let plain = if add {
                x.broadcast_add(&w)?
            } else {
                x.broadcast_mul(&w)?
            };
            let diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
                (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
            };
            assert_eq!(diff(&frozen, &plain)?, 0.0);
            let (fs, ps) = (
                (&frozen * &g)?.sum_all()?.backward()?,
                (&plain * &g)?.sum_all()?.backward()?,
            );
            let (fx, px) = (fs.get(&x).unwrap(), ps.get(&x).unwrap());
            assert!(diff(fx, px)? < 1e-6, "add {add}");
            // Both stores also hold the gradient of `g`, the untracked factor of the sum.
            assert_eq!(fs.get_ids().count(), 2, "add {add}");
            assert_eq!(ps.get_ids().count(), 3, "add {add}");
        }
        Ok(())
    }
}
