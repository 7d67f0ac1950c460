//! The `torch` engine: one steady-state training step of PyTorch eager, as people run
//! the Hugging Face implementations (and nanochat's GPT), played as a timeline.
//!
//! Order of the step (what the measurement script runs, `tools/measure_torch.py`):
//! `loss = model(x, labels=x).loss` (under autocast when asked; the output object, and
//! with it the logits, is dropped at once), `loss.backward()`, `opt.step()`,
//! `opt.zero_grad(set_to_none=True)`. With accumulation the modelled micro-step is a later
//! one, when the gradients already exist. Weights, optimizer state and (DDP) gradient
//! buckets exist before the step.
//!
//! `play` runs the phases in that order: model state, forward, loss, backward, optimizer.
//! The phases are shared; what an implementation's code saves is a `recipe::Recipe`
//! (the extension point: another framework's block is one new file implementing
//! `recipe::Implementation`, see `docs/model.md`). Parameters are indexed by block once,
//! so the whole inventory is linear in layers.

mod block;
mod checkpoint;
mod compiled;
mod deepspeed;
mod lora;
mod loss;
mod nanochat;
mod optim;
mod recipe;
mod regime;
mod shard;
mod torchtitan;
mod torchtune;

pub(crate) use recipe::check as check_implementation;
pub use regime::{check_regime, describe as describe_regime};
pub use shard::{host_buffers, host_bytes as offloaded_state_bytes, offload_traffic, HostBuffer};

use crate::params::{self, Param, Role};
use crate::spec::{Arch, Checkpointing, ModelSpec, RunSpec, Sharding, TrainSpec};
use crate::timeline::{Component, Extent, Layout, Name, Step, TensorId, Timeline};
use crate::units::DType;
use block::{Block, Dims, Saved};
use recipe::{Implementation, Recipe};
use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::rc::Rc;

/// The implementation whose code the run follows.
fn implementation(spec: &RunSpec) -> &'static dyn Implementation {
    use crate::spec::Implementation as Code;
    match (spec.train.implementation, spec.train.compile) {
        (Code::Torchtune, _) => &torchtune::Torchtune,
        (Code::Torchtitan, _) => &torchtitan::Torchtitan,
        (_, true) => &compiled::CompiledTransformers,
        _ => &block::Transformers,
    }
}

/// Everything the phases read, computed once.
struct Run<'a> {
    m: &'a ModelSpec,
    t: &'a TrainSpec,
    cuda: bool,
    stage: u8,
    shards: u64,
    /// nanochat's own distributed optimizers instead of DDP (`torch::nanochat`).
    own_sync: bool,
    sharding: Sharding,
    reshard_after_forward: bool,
    /// DeepSpeed's CPU offload of the optimizer and of the parameters (`shard`).
    offload_optimizer: bool,
    offload_params: bool,
    /// DeepSpeed ZeRO's buffer sizes (`deepspeed`).
    zero: crate::spec::ZeroBuckets,
    params: Rc<Vec<Param>>,
    /// The parameters with gradients and optimizer state (all but LoRA's frozen base).
    trainable: Rc<Vec<Param>>,
    lora: Option<&'a crate::lora::LoraSpec>,
    /// Parameter indices per block.
    by_layer: Vec<Vec<usize>>,
    /// Elements per block: of the matrices autocast copies, and of all its parameters.
    layer_numel: Vec<(u64, u64)>,
    layers: u64,
    d: Dims,
    recipe: Recipe,
    /// The block of the layers that attend through a sliding window with a mask.
    windowed: Option<Block>,
    /// LoRA's first block when its input needs no gradient (`lora::adjust`).
    first: Option<Block>,
}

impl Run<'_> {
    fn new(spec: &RunSpec) -> Run<'_> {
        let (m, t, hw) = (&spec.model, &spec.train, &spec.hardware);
        let (params, trainable) = match &spec.lora {
            None => {
                let p = nanochat::cast_embedding(t, params::shared(m));
                (Rc::clone(&p), p)
            }
            Some(l) => {
                let p = crate::lora::parameters(&params::shared(m), l);
                let t: Vec<Param> = p.iter().filter(|p| p.trainable).cloned().collect();
                (Rc::new(p), Rc::new(t))
            }
        };
        let layers = m.num_layers.saturating_add(m.num_decoder_layers);
        let d = Dims::new(m, t);
        let mut recipe = implementation(spec).recipe(m, t);
        if hw.device.is_cuda() && t.implementation == crate::spec::Implementation::Nanochat {
            nanochat::cuda_autocast(&mut recipe, &d, t.compile);
        }
        let mut windowed = block::windowed(&recipe.encoder, m, t);
        let mut first = None;
        if let Some(l) = &spec.lora {
            let raw = match &windowed {
                Some(w) if m.features.sliding(0) => w,
                _ => &recipe.encoder,
            };
            // Checkpointing makes the embedding output require grad
            // (`enable_input_require_grads`); so does a trained embedding.
            let input_grad = t.checkpointing != Checkpointing::None
                || l.modules_to_save.iter().any(|s| s == "embed_tokens");
            if !input_grad {
                first = Some(lora::adjust(raw, l, &params, &d, false));
            }
            recipe.encoder = lora::adjust(&recipe.encoder, l, &params, &d, true);
            windowed = windowed.map(|w| lora::adjust(&w, l, &params, &d, true));
        }
        let by_layer = params::by_layer(&params, layers);
        let layer_numel = layer_numel(&params, &by_layer, spec.lora.as_ref());
        Run {
            m,
            t,
            cuda: hw.device.is_cuda(),
            // DeepSpeed runs its ZeRO optimizer on one GPU when it offloads.
            stage: if hw.gpus > 1 || hw.offloads() {
                hw.sharding.stage()
            } else {
                0
            },
            shards: hw.shard_group(),
            own_sync: nanochat::own_sync(spec),
            sharding: hw.sharding,
            reshard_after_forward: hw.reshard_after_forward,
            offload_optimizer: hw.offload_optimizer == crate::spec::Offload::Cpu,
            offload_params: hw.offload_params == crate::spec::Offload::Cpu,
            zero: hw.zero,
            by_layer,
            layer_numel,
            params,
            trainable,
            lora: spec.lora.as_ref(),
            layers,
            d,
            recipe,
            windowed,
            first,
        }
    }

    fn block(&self, l: u64) -> &Block {
        if let (0, Some(f)) = (l, &self.first) {
            return f;
        }
        match &self.windowed {
            Some(w) if self.m.features.sliding(l) => w,
            _ => self.recipe.block(l, self.m.num_layers),
        }
    }

    /// Ranks the optimizer state is split over (ZeRO stage ≥ 1).
    fn optimizer_shards(&self) -> u64 {
        if self.stage >= 1 || self.own_sync {
            self.shards
        } else {
            1
        }
    }

    fn layer_params(&self, l: u64) -> impl Iterator<Item = &Param> + '_ {
        self.by_layer[l as usize].iter().map(|i| &self.params[*i])
    }

    /// Whether block `l` is checkpointed whole (full, or its turn under every-N).
    fn whole(&self, l: u64) -> bool {
        self.t.checkpointing.whole_block(l)
    }

    /// The gradients of `ps`; stepped inside backward, each is consumed by its own step
    /// as soon as it is complete (its AccumulateGrad hook), before the next one is made.
    fn grads_of(&self, s: &mut Step, grads: &mut Grads, ps: &[&Param], autocast: bool) {
        if !self.t.optimizer_in_backward {
            grads.for_params(s, ps.iter().copied(), autocast, &self.d);
            return;
        }
        for p in ps {
            grads.for_params(s, std::iter::once(*p), autocast, &self.d);
            optim::per_param(s, p, self.t, self.cuda, self.optimizer_shards());
            grads.drop_grad(s, p);
        }
    }

    /// Stepped inside backward, the steps of parameters whose gradients are complete now.
    fn steps_in_backward(&self, s: &mut Step, grads: &mut Grads, ps: &[&Param]) {
        if !self.t.optimizer_in_backward {
            return;
        }
        for p in ps {
            optim::per_param(s, p, self.t, self.cuda, self.optimizer_shards());
            grads.drop_grad(s, p);
        }
    }
}

/// The bytes of the step outside PyTorch's allocator: optimizer state in CUDA managed
/// memory (paged optimizers), and in host memory the saved activations offloaded and
/// DeepSpeed's offloaded state ([`shard::host_buffers`]).
pub fn off_allocator(spec: &RunSpec) -> (u64, u64) {
    let state = shard::host_bytes(spec);
    if !spec.train.offload_activations && !optim::pages(spec.train.optimizer) {
        return (0, state);
    }
    let run = Run::new(spec);
    // Only trainable parameters have optimizer state (LoRA's frozen base has none).
    let paged = optim::paged(&run.trainable, run.t, run.optimizer_shards());
    let host = if run.t.offload_activations {
        (0..run.layers)
            .map(|l| {
                checkpoint::offloaded_bytes(run.t.checkpointing, l, run.block(l), &run.d, run.cuda)
            })
            .fold(0u64, u64::saturating_add)
    } else {
        0
    };
    (paged, host.saturating_add(state))
}

/// Plays one step of `spec` on the torch engine.
pub fn play(spec: &RunSpec) -> Timeline {
    let run = Run::new(spec);
    // About six tensors a parameter (weight, gradients, optimizer state) and forty a
    // block (saved activations, temporaries, recomputation).
    let layers = run.layers as usize;
    let room = (run.params.len() * 6 + layers * 40 + 64, layers * 2 + 16);
    let (mut s, mut grads) = shared_model_state(spec, &run, room);
    let mut fwd = forward(&mut s, &run, &mut grads);
    let mut prefetched = shard::root_prefetch(&mut s, &run);
    let head_group = fwd
        .head
        .gathered
        .take()
        .or_else(|| shard::head_gathered(&mut s, &run));
    let g = head_backward(&mut s, &run, fwd.head, fwd.x, &mut grads, &mut prefetched);
    let final_norm = |p: &&Param| p.layer.is_none() && p.role == Role::Vector;
    if let Some(id) = head_group {
        // torchtitan's [norm, lm_head] group: its post-backward follows the norm's.
        let norm: Vec<&Param> = run.params.iter().filter(final_norm).collect();
        run.grads_of(&mut s, &mut grads, &norm, false);
        s.free(id);
        shard::post_backward(&mut s, &run, &mut grads, None);
    }
    let (g, emb_prefetched) = blocks_backward(&mut s, &run, fwd.frames, g, &mut grads, prefetched);
    s.phase("backward: embedding");
    let emb = run
        .params
        .iter()
        .filter(|p| p.role == Role::Embedding || (!shard::own_groups(&run) && final_norm(p)));
    let emb: Vec<&Param> = emb.collect();
    run.grads_of(&mut s, &mut grads, &emb, false);
    s.free(g);
    // The embedding group's post-backward reshards it before its reduce-scatter
    // (`_fsdp_param_group.py`, `post_backward`: `reshard()`, then `foreach_reduce`).
    emb_prefetched
        .into_iter()
        .chain(fwd.embedding)
        .for_each(|id| s.free(id));
    shard::end_of_backward(&mut s, &run, &mut grads);
    deepspeed::end_of_backward(&mut s, &mut grads);
    for id in fwd.stem.into_iter().chain(fwd.inputs) {
        s.free(id);
    }
    // Optimizer step, then zero_grad(set_to_none=True).
    fwd.root.into_iter().for_each(|id| s.free(id));
    s.phase("optimizer step");
    if let Some(bucket) = grads.zero.take() {
        deepspeed::step(&mut s, &run, bucket);
        return s.finish();
    }
    let masters = shard::master_gradients(&mut s, &run, &mut grads);
    // Offloaded, the step runs on the CPU (DeepSpeedCPUAdam).
    if !run.t.optimizer_in_backward && !run.offload_optimizer {
        // PyTorch's step skips parameters without a gradient: LoRA's frozen base makes no
        // temporaries there.
        optim::step(
            &mut s,
            &run.trainable,
            run.t,
            run.cuda,
            run.optimizer_shards(),
        );
    }
    grads.free_all(&mut s);
    masters.into_iter().for_each(|id| s.free(id));
    s.finish()
}

/// What [`model_state`] reads of a run: all of it but the micro-batch, the sequence, the
/// checkpointing and the loss, and of the accumulation only whether there is any.
fn state_key(spec: &RunSpec) -> RunSpec {
    let mut k = spec.clone();
    k.train.micro_batch = 0;
    k.train.seq_len = 0;
    k.train.grad_accum = k.train.grad_accum.min(2);
    k.train.checkpointing = Checkpointing::None;
    k.train.loss = crate::spec::LossMode::FloatCast;
    k
}

thread_local! {
    /// The last run's model state (its key, the step after it, the gradients): a fit's
    /// candidates differ only in what the key leaves out.
    static LAST_STATE: RefCell<Option<(RunSpec, Step, Grads)>> = const { RefCell::new(None) };
}

/// A step holding `run`'s model state, with room for `room` (tensors, phases): a copy of
/// the last one when its key is the same, so a fit plays the weights and optimizer state
/// once. A LoRA run's parameter list is its own, so it always plays its own.
fn shared_model_state(spec: &RunSpec, run: &Run, room: (usize, usize)) -> (Step, Grads) {
    let afresh = || {
        let mut s = Step::with_capacity(room.0, room.1);
        let grads = model_state(&mut s, run);
        (s, grads)
    };
    if spec.lora.is_some() {
        return afresh();
    }
    let key = state_key(spec);
    let hit = LAST_STATE.with(|last| match &*last.borrow() {
        Some((k, s, g)) if *k == key => Some((Step::resume(s, room.0, room.1), g.clone())),
        _ => None,
    });
    hit.unwrap_or_else(|| {
        let (s, grads) = afresh();
        LAST_STATE.with(|last| *last.borrow_mut() = Some((key, s.clone(), grads.clone())));
        (s, grads)
    })
}

/// Before the step: weights, optimizer state, DDP's gradient buckets, and with
/// accumulation the gradients earlier micro-steps made.
fn model_state(s: &mut Step, run: &Run) -> Grads {
    if deepspeed::zero(run) {
        return deepspeed::model_state(s, run);
    }
    let weight_shards = if run.stage >= 3 { run.shards } else { 1 };
    if let Some(p) = shard::stored_weights(run) {
        for w in run.params.iter() {
            for (suffix, layout) in lora::stored(w, p, run.lora) {
                s.persistent(
                    Name::of("", &w.name, suffix),
                    Component::Weights,
                    Extent::Shard(layout, weight_shards),
                );
            }
        }
    }
    shard::compute_weights(s, run);
    if !run.offload_optimizer {
        optim::states(s, &run.trainable, run.t, run.optimizer_shards());
    }
    shard::offload_buffers(s, run);
    let gd = shard::grad_dtype(run);
    if run.shards > 1 && run.stage <= 1 && !run.own_sync {
        let all = Layout::new(&[crate::lora::trainable_count(&run.trainable)], gd);
        s.persistent("DDP gradient buckets", Component::Gradients, all);
    }
    let mut grads = Grads::new(&run.trainable, gd, run.stage >= 2, run.shards);
    grads.pre_reduce = shard::pre_reduce(run);
    grads.to_host = shard::grads_to_host(run);
    grads.fsdp2 = shard::reducer(run);
    if run.t.grad_accum > 1 && !grads.to_host {
        grads.all_persistent(s);
    }
    grads
}

/// What a block's forward leaves for its backward.
struct Frame {
    /// The block's input, where something keeps it for backward.
    input: Option<TensorId>,
    saved: Vec<TensorId>,
    copies: Vec<TensorId>,
    /// What went to host memory (offloading), brought back for the block's backward.
    offloaded: Vec<Layout>,
}

/// What the forward leaves for backward.
struct Forward {
    /// input_ids, labels and the rotary tables: freed last.
    inputs: Vec<TensorId>,
    /// The embedding's saved tensors before the first block's input.
    stem: Vec<TensorId>,
    frames: Vec<Frame>,
    /// FSDP2's root parameters (embedding, final norm, head), gathered for the whole step.
    root: Vec<TensorId>,
    /// torchtitan's embedding group, not resharded after forward (`shard::own_groups`).
    embedding: Option<TensorId>,
    /// The last block's output, where the final norm keeps it.
    x: Option<TensorId>,
    head: Head,
}

/// What the final norm, the head and the loss leave for backward.
struct Head {
    /// torchtitan's group of the final norm and the head (`shard::own_groups`).
    gathered: Option<TensorId>,
    saved: Vec<TensorId>,
    copy: Option<TensorId>,
    loss: loss::LossState,
}

fn forward(s: &mut Step, run: &Run, grads: &mut Grads) -> Forward {
    let d = &run.d;
    s.phase("forward: embedding");
    let mut inputs = vec![
        s.alloc("input_ids", Component::Activations, d.tok(1, DType::I64)),
        s.alloc("labels", Component::Activations, d.tok(1, DType::I64)),
    ];
    if let Some(rope) = &run.recipe.rope {
        inputs.push(s.alloc("rotary cos/sin", Component::Activations, rope.clone()));
    }
    let embedding = shard::embedding_gathered(s, run);
    let mut stem: Vec<TensorId> = run
        .recipe
        .stem
        .iter()
        .map(|(name, l)| s.alloc(*name, Component::Activations, l.clone()))
        .collect();
    let embedding = match embedding {
        Some(id) if run.reshard_after_forward => {
            s.free(id);
            None
        }
        kept => kept,
    };
    let root = shard::root_gathered(s, run);
    let mut x = stem
        .pop()
        .expect("the embedding makes the first block's input");
    let mut frames = Vec::with_capacity(run.layers as usize);
    let mut cached = Vec::new();
    for l in 0..run.layers {
        s.phase(Name::block("forward: block ", l, ["", "", ""]));
        let (frame, out, copy) = block_forward(s, run, l, x);
        frames.push(frame);
        cached.extend(copy);
        x = out;
    }
    let (head, x) = head_forward(s, run, grads, x);
    if !cached.is_empty() {
        // Leaving autocast clears its cache (the checkpointed blocks' weight copies)
        // before backward.
        s.phase("leaving autocast");
        cached.into_iter().for_each(|id| s.free(id));
    }
    Forward {
        inputs,
        stem,
        frames,
        root,
        embedding,
        x,
        head,
    }
}

/// Block `l`'s forward: its frame for backward, its output, and autocast's cached weight
/// copies where only the cache keeps them.
fn block_forward(
    s: &mut Step,
    run: &Run,
    l: u64,
    input: TensorId,
) -> (Frame, TensorId, Option<TensorId>) {
    let (d, ck) = (&run.d, run.t.checkpointing);
    let blk = run.block(l);
    let whole = run.whole(l);
    let copies = weight_copies(s, run, l, true);
    // Full checkpointing runs the forward as usual and drops what it made.
    let made = save(s, blk, l, "", |sv| whole || kept(ck, sv));
    let saved = if whole {
        made.into_iter().for_each(|id| s.free(id));
        vec![]
    } else if ck == Checkpointing::SelectiveOp {
        checkpoint::op_forward(s, blk, l, made, d, run.cuda)
    } else {
        made
    };
    let (saved, offloaded) = if run.t.offload_activations {
        let layouts = checkpoint::kept_layouts(ck, l, blk, d, run.cuda);
        (vec![], checkpoint::offload(s, saved, &layouts))
    } else {
        (saved, Vec::new())
    };
    s.transient(
        Name::block("block ", l, [" forward temporaries", "", ""]),
        Component::Temporaries,
        blk.fwd_transient.clone(),
    );
    let out = s.alloc(
        Name::block("block ", l, [" output", "", ""]),
        Component::Activations,
        d.tok(d.h, d.r),
    );
    // ZeRO-3 and checkpointing drop the weight copies once the block's forward is done,
    // but for autocast's cache: under a checkpoint (non-reentrant, grad enabled) autocast
    // still caches its bf16 casts of the weights that require grad until the forward
    // leaves autocast (LoRA's frozen base is cast afresh and not cached).
    let mut cached = None;
    let copies = if shard::reshards_after_forward(run, l) {
        copies.into_iter().for_each(|c| s.free(c));
        vec![]
    } else if whole {
        let mut copies = copies;
        // `weight_copies` makes autocast's copy last, where the block has matrices.
        if d.autocast && run.lora.is_none() && run.layer_numel[l as usize].0 > 0 {
            cached = copies.pop();
        }
        copies.into_iter().for_each(|c| s.free(c));
        vec![]
    } else {
        copies
    };
    // Outside a checkpoint wrapper, a block whose norms keep their own copy of the input
    // leaves the input itself to be freed once the residual add has read it.
    let wrapped = whole || matches!(ck, Checkpointing::Selective | Checkpointing::SelectiveOp);
    let input = (blk.input_saved || wrapped).then_some(input).or_else(|| {
        s.free(input);
        None
    });
    let frame = Frame {
        input,
        saved,
        copies,
        offloaded,
    };
    (frame, out, cached)
}

/// Whether forward keeps `sv` for backward (selective checkpointing drops the attention core).
/// Under `selective-op` forward first makes the whole set (`checkpoint::op_forward` then
/// keeps what the policy saves); a block not checkpointed under every-N keeps everything.
fn kept(ck: Checkpointing, sv: &Saved) -> bool {
    match ck {
        Checkpointing::None | Checkpointing::Every(_) | Checkpointing::SelectiveOp => true,
        Checkpointing::Selective => !sv.attention_core,
        Checkpointing::Full => false,
    }
}

/// Allocates block `l`'s saved tensors that `which` selects: in forward, and again when
/// backward recomputes them.
fn save(
    s: &mut Step,
    blk: &Block,
    l: u64,
    suffix: &'static str,
    which: impl Fn(&Saved) -> bool,
) -> Vec<TensorId> {
    let mut ids = Vec::with_capacity(blk.saved.len());
    ids.extend(blk.saved.iter().filter(|sv| which(sv)).map(|sv| {
        s.alloc(
            Name::block("block ", l, [" ", sv.name, suffix]),
            Component::Activations,
            sv.layout.clone(),
        )
    }));
    ids
}

/// The final norm, autocast's copy of the head weight, and the loss forward; returns
/// them with the last block's output `x` where the norm keeps it.
fn head_forward(
    s: &mut Step,
    run: &Run,
    grads: &mut Grads,
    x: TensorId,
) -> (Head, Option<TensorId>) {
    let d = &run.d;
    s.phase("forward: final norm and head");
    let gathered = shard::head_gathered(s, run);
    let saved = match &run.recipe.head {
        Some(head) => head
            .iter()
            .map(|(name, l)| s.alloc(*name, Component::Activations, l.clone()))
            .collect(),
        None => eager_head(s, run),
    };
    let x = run.recipe.encoder.input_saved.then_some(x).or_else(|| {
        s.free(x);
        None
    });
    let copy = d.autocast.then(|| {
        s.alloc(
            "lm_head weight (bf16 copy)",
            Component::WeightCopies,
            Layout::new(&[run.m.vocab_size, run.m.hidden_size], d.c),
        )
    });
    let loss = if loss::grads_head(run.t) {
        // The loss splits the final norm's output; the trainer drops it when the loss returns.
        let output = s.alloc("final norm output", Component::Activations, d.tok(d.h, d.c));
        let mut head_grad = |s: &mut Step, at| grads.head_chunk(s, run, at);
        let loss = loss::forward(s, run.m, run.t, d.c, run.cuda, &mut head_grad);
        s.free(output);
        loss
    } else {
        loss::forward(s, run.m, run.t, d.c, run.cuda, &mut |_, _| {})
    };
    // torchtitan's chunked loss reshards the [norm, lm_head] group after its loop
    // (`lm_head.reshard()`); the norm's pre-backward gathers it again (`play`).
    let gathered = match gathered {
        Some(id) if loss::grads_head(run.t) => {
            s.free(id);
            None
        }
        g => g,
    };
    let head = Head {
        gathered,
        saved,
        copy,
        loss,
    };
    (head, x)
}

/// Eager's final norm: its normalized input (RMSNorm's; GPT-2's LayerNorm and nanochat's
/// weightless norm keep none) and
/// the head's input (autocast's copy), each kept only where a trained weight needs it
/// (LoRA freezes the norm, and may the head).
fn eager_head(s: &mut Step, run: &Run) -> Vec<TensorId> {
    let d = &run.d;
    let normed = ("final norm normalized", d.tok(d.h, d.r));
    let input = (
        if d.autocast {
            "lm_head input (bf16 copy)"
        } else {
            "final norm output"
        },
        d.tok(d.h, if d.autocast { d.c } else { d.r }),
    );
    let mut saved = Vec::with_capacity(3);
    if !run.recipe.encoder.input_saved {
        // The norm's upcast of a bf16 stream, kept in its place (`Block::input_saved`).
        saved.push(s.alloc(
            "final norm x.float()",
            Component::Activations,
            d.tok(d.h, DType::F32),
        ));
    }
    // GPT-2's LayerNorm is one op that saves its input and statistics, and nanochat's
    // norm has no weight: neither keeps a normalized tensor of its own.
    let no_normed = matches!(run.m.arch, Arch::Gpt2 | Arch::Nanochat);
    for (keep, (name, layout)) in [
        (run.lora.is_none() && !no_normed, normed),
        (lora::head_trains(&run.params, run.m), input),
    ] {
        if keep {
            saved.push(s.alloc(name, Component::Activations, layout));
        } else {
            s.transient(name, Component::Activations, layout);
        }
    }
    saved
}

/// The loss backward, the head's gradients and the final norm's backward; returns the
/// gradient flowing into the last block. Under torchtitan's own FSDP2 groups the head's
/// pre-backward makes the last block's prefetch (`prefetched`).
fn head_backward(
    s: &mut Step,
    run: &Run,
    head: Head,
    x: Option<TensorId>,
    grads: &mut Grads,
    prefetched: &mut Option<TensorId>,
) -> TensorId {
    let d = &run.d;
    let grad_hidden_fwd = head.loss.grad_hidden;
    let g_logits = loss::backward(s, run.m, run.t, d.c, head.loss);
    if prefetched.is_none() {
        *prefetched = shard::head_prefetch(s, run);
    }
    s.phase("backward: head");
    let grad_hidden = |s: &mut Step| {
        s.alloc(
            "grad of final hidden states",
            Component::Activations,
            d.tok(d.h, d.c),
        )
    };
    // A tied head's gradient is complete only after the embedding's backward.
    let untied: Vec<&Param> = run.params.iter().filter(|p| p.role == Role::Head).collect();
    let g = match g_logits {
        Some(gl) => {
            let gh = grad_hidden(s);
            grads.for_params(s, head_params(run), d.autocast, d);
            // The head's AccumulateGrad (and its hook) runs after the matmul's backward
            // has released the logits' gradient.
            s.free(gl);
            run.steps_in_backward(s, grads, &untied);
            gh
        }
        None => {
            if !loss::grads_head(run.t) {
                grads.for_params(s, head_params(run), d.autocast, d);
            }
            run.steps_in_backward(s, grads, &untied);
            grad_hidden_fwd.unwrap_or_else(|| grad_hidden(s))
        }
    };
    if let Some(c) = head.copy {
        s.free(c);
    }
    let gn = s.alloc(
        "grad through final norm",
        Component::Activations,
        d.tok(d.h, d.r),
    );
    s.free(g);
    head.saved.into_iter().chain(x).for_each(|id| s.free(id));
    gn
}

/// Backward through the blocks, last first, the last block's gathered parameters already
/// `prefetched` under FSDP2; returns the gradient of the embedding output, and what block
/// 0's backward prefetched (torchtitan's embedding group, `shard::own_groups`).
fn blocks_backward(
    s: &mut Step,
    run: &Run,
    mut frames: Vec<Frame>,
    mut g: TensorId,
    grads: &mut Grads,
    mut prefetched: Option<TensorId>,
) -> (TensorId, Option<TensorId>) {
    let (d, ck) = (&run.d, run.t.checkpointing);
    for l in (0..run.layers).rev() {
        let blk = run.block(l);
        let whole = run.whole(l);
        let frame = frames.pop().expect("one frame per block");
        s.phase(Name::block("backward: block ", l, ["", "", ""]));
        let mut copies = frame.copies;
        if whole || shard::reshards_after_forward(run, l) {
            let gathered = prefetched.take();
            copies.extend(weight_copies(s, run, l, gathered.is_none()));
            copies.extend(gathered);
        }
        prefetched = shard::prefetch(s, run, l);
        let reloaded: Vec<TensorId> = frame
            .offloaded
            .into_iter()
            .map(|o| {
                s.alloc(
                    Name::block("block ", l, [" saved tensor (back from host)", "", ""]),
                    Component::Activations,
                    o,
                )
            })
            .collect();
        let mut saved = frame.saved;
        let recomputed = if ck == Checkpointing::SelectiveOp && !whole {
            checkpoint::op_recompute(s, blk, l, d, run.cuda, &mut saved)
        } else {
            save(s, blk, l, " (recomputed)", |sv| whole || !kept(ck, sv))
        };
        s.transient(
            Name::block("block ", l, [" backward temporaries", "", ""]),
            Component::Temporaries,
            blk.bwd_transient.clone(),
        );
        let ps: Vec<&Param> = run.layer_params(l).collect();
        run.grads_of(s, grads, &ps, d.autocast);
        saved
            .into_iter()
            .chain(recomputed)
            .chain(copies)
            .chain(reloaded)
            .for_each(|id| s.free(id));
        let gi = s.alloc(
            Name::block("grad of block ", l, [" input", "", ""]),
            Component::Activations,
            d.tok(d.h, d.r),
        );
        s.free(g);
        g = gi;
        frame.input.into_iter().for_each(|id| s.free(id));
        shard::post_backward(s, run, grads, Some(l));
    }
    (g, prefetched)
}

/// The parameters the head's matmul makes gradients for: the head, or the tied embedding.
fn head_params<'r>(run: &'r Run) -> impl Iterator<Item = &'r Param> {
    run.params
        .iter()
        .find(|p| p.role == Role::Head)
        .into_iter()
        .chain(tied_embedding(&run.params, run.m))
}

/// Under tied embeddings the head's gradient lands on the embedding weight.
fn tied_embedding<'a>(params: &'a [Param], m: &ModelSpec) -> Option<&'a Param> {
    m.tie_embeddings
        .then(|| params.iter().find(|p| p.role == Role::Embedding))
        .flatten()
}

/// The block's weights as its matmuls use them: autocast's bf16 copies (saved for
/// backward), and under ZeRO-3 the gathered full weights.
fn weight_copies(s: &mut Step, run: &Run, l: u64, gather: bool) -> Vec<TensorId> {
    let d = &run.d;
    let mut out = Vec::with_capacity(2);
    let (matrices, all) = run.layer_numel[l as usize];
    if gather && deepspeed::zero(run) {
        out.extend(
            (run.stage >= 3)
                .then(|| deepspeed::gathered(s, run, l))
                .flatten(),
        );
    } else if gather {
        out.extend(shard::gathered(s, run, l, all));
    }
    if d.autocast && matrices > 0 {
        out.push(s.alloc(
            Name::block("block ", l, [" weights (bf16 copies)", "", ""]),
            Component::WeightCopies,
            Layout::new(&[matrices], d.c),
        ));
    }
    out
}

/// Per block, the elements of the matrices autocast copies and of all its parameters:
/// what [`weight_copies`] allocates, summed once per run.
fn layer_numel(
    params: &[Param],
    by_layer: &[Vec<usize>],
    lora: Option<&crate::lora::LoraSpec>,
) -> Vec<(u64, u64)> {
    by_layer
        .iter()
        .map(|ix| {
            ix.iter()
                .map(|i| &params[*i])
                .fold((0u64, 0u64), |(m, a), p| {
                    let copied = p.role == Role::Matrix && lora::copied(p, lora);
                    let n = p.numel();
                    (
                        if copied { m.saturating_add(n) } else { m },
                        a.saturating_add(n),
                    )
                })
        })
        .collect()
}

/// FNV-1a: parameter names are short and trusted, so the index needs no DoS-resistant
/// (and slower) hash.
#[derive(Default)]
struct Fnv(u64);

impl Hasher for Fnv {
    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for b in bytes {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = h;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// What [`Grads`] reads per parameter: its position by name (the first of a name), found
/// in constant time so that backward stays linear in layers, and its gradient's layout.
/// Built once per parameter list and dtype (a fit plays the same list at every candidate).
struct GradIndex {
    params: Rc<Vec<Param>>,
    dtype: DType,
    index: HashMap<Rc<str>, usize, BuildHasherDefault<Fnv>>,
    layouts: Vec<Layout>,
}

thread_local! {
    /// The last index built; the parameter list it holds keeps its address unique.
    static LAST_INDEX: RefCell<Option<Rc<GradIndex>>> = const { RefCell::new(None) };
}

impl GradIndex {
    fn shared(params: &Rc<Vec<Param>>, dtype: DType) -> Rc<GradIndex> {
        LAST_INDEX.with(|last| {
            let mut last = last.borrow_mut();
            if let Some(g) = last
                .as_ref()
                .filter(|g| Rc::ptr_eq(&g.params, params) && g.dtype == dtype)
            {
                return Rc::clone(g);
            }
            let mut index = HashMap::with_capacity_and_hasher(params.len(), Default::default());
            for (i, p) in params.iter().enumerate() {
                index.entry(p.name.clone()).or_insert(i);
            }
            let g = Rc::new(GradIndex {
                params: Rc::clone(params),
                dtype,
                index,
                layouts: params
                    .iter()
                    .map(|p| Layout::new(&p.shape(), p.dtype.unwrap_or(dtype)))
                    .collect(),
            });
            *last = Some(Rc::clone(&g));
            g
        })
    }
}

/// Parameter gradients: allocated when backward first reaches a parameter, accumulated in
/// place afterwards; with ZeRO-2/3 reduced to this rank's shard right away.
#[derive(Clone)]
struct Grads {
    ids: Vec<Option<TensorId>>,
    at: Rc<GradIndex>,
    sharded: bool,
    shards: u64,
    /// The full-size buffers a gradient passes through before its reduce-scatter, by dtype
    /// (ZeRO: the gradient itself; FSDP2 reduces whole groups through `fsdp2` instead).
    pre_reduce: Vec<DType>,
    /// DeepSpeed's offload: each gradient is copied to the host once reduced, and none
    /// stays on the device.
    to_host: bool,
    /// FSDP2: the unsharded gradients waiting for their group's reduce-scatter.
    fsdp2: Option<shard::Reducer>,
    /// DeepSpeed ZeRO: the gradients' way through its bucket.
    zero: Option<deepspeed::Bucket>,
}

impl Grads {
    fn new(params: &Rc<Vec<Param>>, dtype: DType, sharded: bool, shards: u64) -> Grads {
        Grads {
            ids: vec![None; params.len()],
            at: GradIndex::shared(params, dtype),
            sharded,
            shards: shards.max(1),
            pre_reduce: vec![dtype],
            to_host: false,
            fsdp2: None,
            zero: None,
        }
    }

    /// Frees `p`'s gradient (the optimizer stepped inside backward has used it).
    fn drop_grad(&mut self, s: &mut Step, p: &Param) {
        if let Some(id) = self.at.index.get(&p.name).and_then(|&i| self.ids[i].take()) {
            s.free(id);
        }
    }

    fn size(&self, i: usize) -> Extent {
        let ranks = if self.sharded { self.shards } else { 1 };
        Extent::Shard(self.at.layouts[i].clone(), ranks)
    }

    fn all_persistent(&mut self, s: &mut Step) {
        for i in 0..self.ids.len() {
            self.ids[i] = Some(s.persistent(
                Name::of("grad of ", &self.at.params[i].name, ""),
                Component::Gradients,
                self.size(i),
            ));
        }
    }

    /// lm_head's weight gradient in one chunk of torchtitan's chunked loss: under FSDP2
    /// it waits unsynced until the last chunk, which reduces it ([`shard::Reducer::chunk`]);
    /// otherwise the first chunk's matmul makes it and the others' add into it.
    fn head_chunk(&mut self, s: &mut Step, run: &Run, at: loss::HeadGrad) {
        if !shard::head_sync_deferred(run) {
            if at == loss::HeadGrad::Made {
                self.for_params(s, head_params(run), run.d.autocast, &run.d);
            }
            return;
        }
        let head = head_params(run)
            .next()
            .and_then(|p| self.at.index.get(&p.name));
        if let (Some(r), Some(&i)) = (self.fsdp2.as_mut(), head) {
            r.chunk(s, i, &self.at.params[i], &self.at.layouts[i], at);
        }
        if let loss::HeadGrad::Accumulated { last: true, .. } = at {
            shard::post_backward(s, run, self, None);
        }
    }

    fn for_params<'a>(
        &mut self,
        s: &mut Step,
        ps: impl Iterator<Item = &'a Param>,
        autocast: bool,
        d: &Dims,
    ) {
        for p in ps {
            let Some(&i) = self.at.index.get(&p.name) else {
                continue;
            };
            let full = self.at.layouts[i].clone();
            if autocast && p.role != Role::Vector && p.role != Role::Embedding {
                // The matmul's gradient is bf16; `to` backward casts it to the fp32 parameter.
                s.transient(
                    Name::of("grad of ", &p.name, " (bf16)"),
                    Component::Temporaries,
                    Layout::new(&full.shape, d.c),
                );
            }
            if let Some(r) = self.fsdp2.as_mut() {
                r.unsharded(s, i, p, full);
                continue;
            }
            if let Some(z) = self.zero.as_mut() {
                z.grad(s, i, p, &full);
                continue;
            }
            match self.ids[i] {
                Some(_) => s.transient(
                    Name::of("grad of ", &p.name, " (to accumulate)"),
                    Component::Temporaries,
                    full,
                ),
                None if self.to_host => s.transient(
                    Name::of("grad of ", &p.name, " (to host)"),
                    Component::Temporaries,
                    full,
                ),
                None => {
                    if self.sharded {
                        // A parameter narrower than the run's gradients (nanochat's bf16
                        // `wte`) has autograd make its gradient in its own dtype.
                        let mut parts: Vec<Layout> = self
                            .pre_reduce
                            .iter()
                            .map(|dt| {
                                let narrow = full.dtype.bytes() < dt.bytes();
                                Layout::new(&full.shape, if narrow { full.dtype } else { *dt })
                            })
                            .collect();
                        let before = match parts.len() {
                            1 => parts.remove(0),
                            _ => Layout::concat(&parts),
                        };
                        s.transient(
                            Name::of("grad of ", &p.name, " (before reduce-scatter)"),
                            Component::Temporaries,
                            before,
                        );
                    }
                    self.ids[i] = Some(s.alloc(
                        Name::of("grad of ", &p.name, ""),
                        Component::Gradients,
                        self.size(i),
                    ));
                }
            }
        }
    }

    fn free_all(&mut self, s: &mut Step) {
        for id in self.ids.iter_mut().filter_map(Option::take) {
            s.free(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Context, RawConfig};
    use crate::presets::Presets;

    fn spec(train: &str, hardware: &str, layers: u64) -> RunSpec {
        let toml = format!(
            "[model]\npreset = \"smollm2-135m\"\n[train]\nmicro_batch = 2\nseq_len = 256\n{train}\n[hardware]\ngpu = \"h100-80gb\"\n{hardware}\n"
        );
        let presets = Presets::builtin().unwrap();
        let mut s = RawConfig::from_toml(&toml)
            .unwrap()
            .resolve(&presets, &Context::default())
            .unwrap();
        s.model.num_layers = layers;
        s
    }

    /// A fit's candidates in turn: each step played from the last one's model state is
    /// the step played afresh, tensor for tensor and event for event.
    #[test]
    fn steps_from_the_shared_model_state_match_steps_played_afresh() {
        let runs = [
            (4, 256, "grad_accum = 2", ""),
            (1, 256, "grad_accum = 8\ncheckpointing = \"full\"", ""),
            (8, 256, "grad_accum = 1\nloss = \"chunked\"", ""),
            (2, 512, "grad_accum = 4", ""),
            (
                2,
                256,
                "precision = \"bf16-mixed\"\ngrad_accum = 2",
                "gpus = 2\nsharding = \"zero3\"",
            ),
            (
                4,
                256,
                "precision = \"bf16-mixed\"\ncheckpointing = \"selective\"\ngrad_accum = 2",
                "gpus = 2\nsharding = \"zero3\"",
            ),
            (
                4,
                256,
                "optimizer = \"adamw-8bit\"\ngrad_accum = 2",
                "gpus = 2\nsharding = \"zero3\"",
            ),
        ];
        let specs: Vec<RunSpec> = runs
            .iter()
            .map(|(mb, seq, t, h)| {
                let mut s = spec(t, h, 3);
                (s.train.micro_batch, s.train.seq_len) = (*mb, *seq);
                s
            })
            .collect();
        let json = |t: &Timeline| serde_json::to_value(t).unwrap();
        let mut hits = 0;
        for pair in specs.windows(2) {
            LAST_STATE.with(|l| *l.borrow_mut() = None);
            play(&pair[0]);
            let got = json(&play(&pair[1]));
            hits += usize::from(state_key(&pair[0]) == state_key(&pair[1]));
            LAST_STATE.with(|l| *l.borrow_mut() = None);
            assert_eq!(got, json(&play(&pair[1])), "{:?}", pair[1].train);
        }
        assert_eq!(hits, 2);
    }

    #[test]
    fn the_inventory_is_linear_in_layers() {
        // 1,024 layers took 82 s when every block searched all parameters (issue 9).
        let full = "checkpointing = \"full\"";
        let zero3 = "gpus = 2\nsharding = \"zero3\"";
        let start = std::time::Instant::now();
        let big = play(&spec(full, zero3, 4096)).events.len();
        assert!(start.elapsed().as_secs() < 20, "{:?}", start.elapsed());
        let half = play(&spec(full, zero3, 2048)).events.len();
        assert!(big as f64 <= 2.1 * half as f64, "{big} vs {half}");
    }

    #[test]
    fn every_torch_tensor_has_a_shape_and_dtype_that_give_its_bytes() {
        let runs = [
            (
                "precision = \"bf16-autocast\"\noptimizer = \"muon\"",
                "gpus = 3\nsharding = \"zero3\"",
            ),
            (
                "precision = \"fp32\"\nloss = \"chunked\"\ngrad_accum = 2",
                "gpus = 2",
            ),
            ("precision = \"bf16\"\noptimizer = \"adafactor\"", ""),
        ];
        for (train, hardware) in runs {
            let t = play(&spec(train, hardware, 2));
            for x in &t.tensors {
                let l = x.layout.as_ref().unwrap_or_else(|| panic!("{}", x.name));
                // A ZeRO shard rounds the bytes up, the element count of its flat shard
                // may be rounded up one element further.
                let from_shape = l.bytes().0;
                let ok = x.bytes.0 == from_shape
                    || (x.bytes.0 < from_shape && from_shape - x.bytes.0 < l.dtype.bytes());
                assert!(ok, "{}: {} B vs {l}", x.name, x.bytes.0);
            }
        }
    }

    #[test]
    fn the_fp32_logits_of_seed_000_read_as_their_shape() {
        // nanochat d16, 20 × 3072 tokens, vocab 65,536: `logits.float()` is 15.0 GiB.
        let toml = include_str!("../../../presets/examples/nanochat-d16-failed.toml");
        let presets = Presets::builtin().unwrap();
        let spec = RawConfig::from_toml(toml)
            .unwrap()
            .resolve(&presets, &Context::default())
            .unwrap();
        let t = play(&spec);
        let copy = t
            .tensors
            .iter()
            .find(|x| x.name == "logits.float() (fp32 copy)")
            .unwrap();
        assert_eq!(copy.describe().as_deref(), Some("[20, 3072, 65536] f32"));
    }
}
