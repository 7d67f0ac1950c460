//! DeepSpeed ZeRO-1/2/3 without offload: what one rank keeps, itemized from DeepSpeed
//! 0.19.6 (`deepspeed/runtime/zero/`; `docs/model.md`, "DeepSpeed ZeRO", cites the lines).
//! P is the trainable parameters, N the ranks, c the 16-bit dtype (bf16 under
//! `bf16-mixed`, fp32 under `fp32`), B `reduce_bucket_size`.
//!
//! - ZeRO-1/2 (`stage_1_and_2.py`): the module's parameters are views into one flat group
//!   of P elements padded to a multiple of 2N (`bit16_groups_flat`, c); the optimizer steps
//!   this rank's fp32 copy of its partition (`single_partition_of_fp32_groups`, P/N fp32)
//!   and keeps its state over that one flat tensor. At a micro-step's first gradient hook
//!   (`setup_buckets`) the IPG bucket is allocated, B elements of c, whatever the model's
//!   size; each gradient is copied into it and autograd's copy freed (ZeRO-2); ZeRO-1's
//!   hooks copy nothing and its gradients wait for the end of backward. When the next
//!   gradient would overflow the bucket, and at the end of backward, the bucket is
//!   flattened into one all-reduce buffer (`allreduce_bucket`, `use_multi_rank_bucket_allreduce`)
//!   and this rank's gradients are copied into `grads_in_partition` (every parameter that
//!   overlaps its partition, whole). The bucket is released at the end of backward.
//!   The step flattens the partition's gradients, casts them to fp32, steps, and copies the
//!   result into the 16-bit partition.
//! - ZeRO-3 (`stage3.py`, `partition_parameters.py`, `partitioned_param_coordinator.py`):
//!   each parameter keeps its partition (`ds_tensor`, ⌈n/N⌉ of c); parameters of at most
//!   `stage3_param_persistence_threshold` elements stay whole too. A module's parameters
//!   are gathered for its forward and kept while they are used again within
//!   `stage3_max_reuse_distance` elements of the trace (their backward), else released and
//!   gathered again; after its backward they are released. The IPG bucket (B of c) and
//!   the gradient partitions (`grad_partitions_flat_buffer`, Σ⌈n/N⌉ of c) exist from the
//!   start; a full bucket is reduce-scattered through one padded flat copy
//!   (`reduce_scatter_coalesced`).
//! - On the CPU the collectives are gloo's: its reduce-scatter all-reduces a copy of the
//!   whole input (`tests/data/torch_fsdp.json` shows it for FSDP2), modelled on the CPU
//!   only. DeepSpeed's CPU accelerator has no streams, so nothing waits for one.

use super::{optim, shard, Grads, Run};
use crate::params::{Param, Role};
use crate::spec::Sharding;
use crate::timeline::{Component, Layout, Name, Step, TensorId};
use crate::units::DType;
use std::rc::Rc;

/// ZeRO-1/2's `nccl_start_alignment_factor`: the flat group is padded to a multiple of
/// this times the ranks (`stage_1_and_2.py` L349, L393–395).
const START_ALIGNMENT: u64 = 2;

/// DeepSpeed ZeRO without offload over several ranks (not LoRA, whose frozen base is
/// outside the flat groups).
pub fn zero(run: &Run) -> bool {
    matches!(
        run.sharding,
        Sharding::Zero1 | Sharding::Zero2 | Sharding::Zero3
    ) && run.stage >= 1
        && run.shards > 1
        && !run.offload_optimizer
        && !run.offload_params
        && run.lora.is_none()
}

fn c(run: &Run) -> DType {
    shard::compute_dtype(run)
}

fn trainable(run: &Run) -> u64 {
    run.trainable
        .iter()
        .map(Param::numel)
        .fold(0, u64::saturating_add)
}

/// ZeRO-1/2's flat group and one rank's partition of it, in elements.
fn flat(run: &Run) -> (u64, u64) {
    let align = START_ALIGNMENT.saturating_mul(run.shards);
    let flat = trainable(run).div_ceil(align).saturating_mul(align);
    (flat, flat / run.shards)
}

/// ZeRO-3's partition of one parameter (`partition_numel`).
fn part3(run: &Run, p: &Param) -> u64 {
    p.numel().div_ceil(run.shards)
}

fn persists(run: &Run, p: &Param) -> bool {
    p.numel() <= run.zero.param_persistence_threshold
}

/// The one flat fp32 tensor the wrapped optimizer steps.
fn master(n: u64) -> Param {
    Param {
        name: Rc::from("ZeRO fp32 partition"),
        rows: 1,
        cols: n,
        role: Role::Vector,
        layer: None,
        trainable: true,
        dtype: Some(DType::F32),
    }
}

/// The elements of every parameter that overlaps rank 0's partition, whole
/// (`get_partition_info`, `copy_grads_in_partition`'s `grads_in_partition`).
fn partition_params(run: &Run, part: u64) -> u64 {
    let mut start = 0u64;
    let mut sum = 0u64;
    for p in run.trainable.iter() {
        if start >= part {
            break;
        }
        sum = sum.saturating_add(p.numel());
        start = start.saturating_add(p.numel());
    }
    sum
}

/// Before the step: the weights, the fp32 partition and its optimizer state, and under
/// ZeRO-3 the bucket and the gradient partitions; returns the gradients' bookkeeping.
pub fn model_state(s: &mut Step, run: &Run) -> Grads {
    let c = c(run);
    let master_numel = if run.stage < 3 {
        let (flat, part) = flat(run);
        s.persistent(
            "flat 16-bit parameters (ZeRO bit16_groups_flat)",
            Component::Weights,
            Layout::new(&[flat], c),
        );
        part
    } else {
        stage3_weights(s, run)
    };
    s.persistent(
        "fp32 partition (ZeRO master weights)",
        Component::Weights,
        Layout::new(&[master_numel], DType::F32),
    );
    optim::states(s, &[master(master_numel)], run.t, 1);
    let mut bucket = Bucket::new(run);
    if run.stage >= 3 {
        bucket.buffer = Some(s.persistent(
            "ZeRO-3 gradient bucket (reduce_bucket_size)",
            Component::Gradients,
            Layout::new(&[run.zero.reduce_bucket_size], c),
        ));
        s.persistent(
            "ZeRO-3 gradient partitions (grad_partitions_flat_buffer)",
            Component::Gradients,
            Layout::new(&[master_numel], c),
        );
    }
    let mut grads = Grads::new(&run.trainable, c, false, 1);
    if run.t.grad_accum > 1 {
        bucket.accumulated(s, run);
    }
    grads.zero = Some(bucket);
    grads
}

/// ZeRO-3's partitions and persistent parameters; returns the partitions' elements.
fn stage3_weights(s: &mut Step, run: &Run) -> u64 {
    let c = c(run);
    let mut total = 0u64;
    for p in run.trainable.iter() {
        let n = part3(run, p);
        total = total.saturating_add(n);
        s.persistent(
            Name::of("", &p.name, " (ZeRO-3 partition)"),
            Component::Weights,
            Layout::new(&[n], c),
        );
        if persists(run, p) {
            s.persistent(
                Name::of("", &p.name, " (ZeRO-3 persistent, whole)"),
                Component::Weights,
                Layout::new(&p.shape(), c),
            );
        }
    }
    total
}

/// The gradients' way through DeepSpeed's IPG bucket during one micro-step.
#[derive(Clone)]
pub struct Bucket {
    stage: u8,
    size: u64,
    dtype: DType,
    ranks: u64,
    gloo: bool,
    /// The IPG buffer (ZeRO-1/2: from the first hook to the end of backward).
    buffer: Option<TensorId>,
    /// Elements in the bucket, and the same padded to a multiple of N per parameter.
    elements: u64,
    padded: u64,
    params: usize,
    /// Gradients larger than the bucket, reduced where they are.
    pending: Vec<TensorId>,
    /// ZeRO-1: autograd's gradients, by parameter index, until the end of backward.
    held: Vec<(usize, u64, TensorId)>,
    /// ZeRO-1/2: `grads_in_partition`, and the one an earlier micro-step left.
    partition: Option<TensorId>,
    partition_numel: u64,
    earlier: Option<TensorId>,
}

impl Bucket {
    fn new(run: &Run) -> Bucket {
        let (_, part) = flat(run);
        Bucket {
            stage: run.stage,
            size: run.zero.reduce_bucket_size,
            dtype: c(run),
            ranks: run.shards,
            gloo: !run.cuda,
            buffer: None,
            elements: 0,
            padded: 0,
            params: 0,
            pending: Vec::new(),
            held: Vec::new(),
            partition: None,
            partition_numel: partition_params(run, part),
            earlier: None,
        }
    }

    /// What earlier micro-steps leave: ZeRO-1 the gradients themselves, ZeRO-2 the
    /// gradient partition they were copied into (ZeRO-3 accumulates in its flat buffer).
    fn accumulated(&mut self, s: &mut Step, run: &Run) {
        match self.stage {
            1 => {
                for (i, p) in run.trainable.iter().enumerate() {
                    let id = s.persistent(
                        Name::of("grad of ", &p.name, ""),
                        Component::Gradients,
                        Layout::new(&p.shape(), self.dtype),
                    );
                    self.held.push((i, p.numel(), id));
                }
            }
            2 => {
                self.earlier = Some(s.persistent(
                    "ZeRO gradient partition of the earlier micro-step",
                    Component::Gradients,
                    Layout::new(&[self.partition_numel], self.dtype),
                ));
            }
            _ => {}
        }
    }

    fn open(&mut self, s: &mut Step) {
        if self.buffer.is_none() {
            self.buffer = Some(s.alloc(
                "ZeRO gradient bucket (reduce_bucket_size)",
                Component::Gradients,
                Layout::new(&[self.size], self.dtype),
            ));
        }
    }

    /// Autograd's gradient of parameter `i` and its hook.
    pub fn grad(&mut self, s: &mut Step, i: usize, p: &Param, full: &Layout) {
        let n = p.numel();
        let layout = Layout::new(&full.shape, self.dtype);
        if self.stage == 1 {
            self.open(s);
            if self.held.iter().any(|h| h.0 == i) {
                s.transient(
                    Name::of("grad of ", &p.name, " (to accumulate)"),
                    Component::Temporaries,
                    layout,
                );
            } else {
                let id = s.alloc(
                    Name::of("grad of ", &p.name, ""),
                    Component::Gradients,
                    layout,
                );
                self.held.push((i, n, id));
            }
            return;
        }
        let g = s.alloc(
            Name::of("grad of ", &p.name, ""),
            Component::Gradients,
            layout,
        );
        if self.stage == 2 {
            self.open(s);
        }
        self.add(s, n, g);
    }

    /// `reduce_independent_p_g_buckets_and_remove_grads`: reduce first if `n` would
    /// overflow the bucket, then copy the gradient in (freeing autograd's), unless it is
    /// larger than the bucket.
    fn add(&mut self, s: &mut Step, n: u64, g: TensorId) {
        if self.elements > 0 && self.elements.saturating_add(n) > self.size {
            self.flush(s);
        }
        if n > self.size {
            self.pending.push(g);
        } else {
            s.free(g);
        }
        self.elements = self.elements.saturating_add(n);
        let r = self.ranks;
        self.padded = self.padded.saturating_add(n.div_ceil(r).saturating_mul(r));
        self.params += 1;
    }

    /// `reduce_ipg_grads`: the bucket's reduction and the copy into this rank's partition.
    fn flush(&mut self, s: &mut Step) {
        if self.elements == 0 {
            return;
        }
        if self.stage < 3 {
            s.transient(
                "ZeRO bucket flattened for its all-reduce",
                Component::Temporaries,
                Layout::new(&[self.elements], self.dtype),
            );
            if self.partition.is_none() {
                self.partition = Some(s.alloc(
                    "ZeRO gradient partition (grads_in_partition)",
                    Component::Gradients,
                    Layout::new(&[self.partition_numel], self.dtype),
                ));
            }
        } else {
            // One parameter whose size N divides is reduce-scattered in place.
            let copy = !(self.params == 1 && self.padded == self.elements);
            let flat = Layout::new(&[self.padded], self.dtype);
            let cat = copy.then(|| {
                s.alloc(
                    "ZeRO-3 gradients flattened for the reduce-scatter",
                    Component::Temporaries,
                    flat.clone(),
                )
            });
            if self.gloo {
                s.transient(
                    "gloo's copy of the reduce-scatter input",
                    Component::Temporaries,
                    flat,
                );
            }
            cat.into_iter().for_each(|id| s.free(id));
        }
        self.pending.drain(..).for_each(|id| s.free(id));
        self.elements = 0;
        self.padded = 0;
        self.params = 0;
    }

    /// The end of backward (`independent_gradient_partition_epilogue`; ZeRO-1's
    /// `reduce_gradients` first copies every gradient into the bucket, in the group's order).
    fn end_of_backward(&mut self, s: &mut Step) {
        if self.stage == 1 {
            let mut held = std::mem::take(&mut self.held);
            held.sort_by_key(|h| h.0);
            for (_, n, id) in held {
                self.add(s, n, id);
            }
        }
        self.flush(s);
        if self.stage < 3 {
            if let Some(id) = self.buffer.take() {
                s.free(id);
            }
        }
        if let Some(id) = self.earlier.take() {
            s.free(id);
        }
    }
}

/// The end of backward, for a ZeRO run.
pub fn end_of_backward(s: &mut Step, grads: &mut Grads) {
    if let Some(b) = grads.zero.as_mut() {
        b.end_of_backward(s);
    }
}

/// The optimizer step: the partition's gradients flattened and cast to fp32, the wrapped
/// optimizer's step over the fp32 partition.
pub fn step(s: &mut Step, run: &Run, mut b: Bucket) {
    let c = c(run);
    let n = if run.stage < 3 {
        flat(run).1
    } else {
        run.trainable.iter().map(|p| part3(run, p)).sum()
    };
    let flat_g = s.alloc(
        "ZeRO gradient partition flattened",
        Component::Temporaries,
        Layout::new(&[n], c),
    );
    let fp32 = if c == DType::F32 {
        flat_g
    } else {
        let g = s.alloc(
            "ZeRO fp32 gradient partition",
            Component::Gradients,
            Layout::new(&[n], DType::F32),
        );
        s.free(flat_g);
        g
    };
    if let Some(id) = b.partition.take() {
        s.free(id);
    }
    optim::step(s, &[master(n)], run.t, run.cuda, 1);
    s.free(fp32);
}

/// ZeRO-3: the parameters of block `l` that are not persistent, gathered whole.
pub fn gathered(s: &mut Step, run: &Run, l: u64) -> Option<TensorId> {
    let numel = run
        .layer_params(l)
        .filter(|p| !persists(run, p))
        .map(|p| part3(run, p).saturating_mul(run.shards))
        .fold(0, u64::saturating_add);
    (numel > 0).then(|| {
        s.alloc(
            Name::block("block ", l, [" gathered weights (ZeRO-3)", "", ""]),
            Component::WeightCopies,
            Layout::new(&[numel], c(run)),
        )
    })
}

/// ZeRO-3's root parameters (embedding, final norm, head) that are not persistent,
/// gathered for the whole step.
pub fn root_gathered(s: &mut Step, run: &Run) -> Vec<TensorId> {
    let numel = run
        .params
        .iter()
        .filter(|p| p.layer.is_none() && !persists(run, p))
        .map(|p| part3(run, p).saturating_mul(run.shards))
        .fold(0, u64::saturating_add);
    if numel == 0 {
        return Vec::new();
    }
    vec![s.alloc(
        "root parameters gathered (ZeRO-3)",
        Component::WeightCopies,
        Layout::new(&[numel], c(run)),
    )]
}

/// Whether block `l`'s gathered parameters are released after its forward: when the
/// trace until its backward (the later blocks and the root, forward and backward) holds
/// at least `stage3_max_reuse_distance` elements (`__params_to_release`).
pub fn releases_after_forward(run: &Run, l: u64) -> bool {
    let later: u64 = (l + 1..run.layers)
        .flat_map(|k| run.layer_params(k))
        .chain(run.params.iter().filter(|p| p.layer.is_none()))
        .map(Param::numel)
        .fold(0, u64::saturating_add);
    later.saturating_mul(2) >= run.zero.max_reuse_distance
}
