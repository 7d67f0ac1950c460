//! One training step as a sequence of allocation and free events over named tensors.
//!
//! An inventory (see `torch` and `candle`) plays the step and records every tensor it
//! creates with its owner (a [`Component`]) and the phase it was created in. The peak is
//! the maximum of live bytes over the event sequence, so "where is the peak" and "what was
//! live" are read off the same data that `diagnose` searches and the plots draw.
//!
//! A tensor is allocated either by bytes (`Step::alloc`) or by shape and dtype
//! (`Step::tensor`, or any allocation given a [`Layout`]); the bytes are then the
//! element count times the width, and `Tensor::describe` prints `[20, 3072, 65536] f32`.

use crate::units::{Bytes, DType};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;
use std::rc::Rc;

/// Who owns a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Component {
    Weights,
    /// Low-precision copies of the weights (autocast's cache, ZeRO-3's gathered layer).
    WeightCopies,
    Gradients,
    Optimizer,
    /// Tensors saved for backward, and the inputs.
    Activations,
    /// Logits and everything the loss makes of them (fp32 copies, log-probabilities, their gradients).
    Logits,
    /// Short-lived buffers inside an op or the backward of a block.
    Temporaries,
}

impl Component {
    pub const ALL: [Component; 7] = [
        Component::Weights,
        Component::WeightCopies,
        Component::Gradients,
        Component::Optimizer,
        Component::Activations,
        Component::Logits,
        Component::Temporaries,
    ];

    pub fn key(self) -> &'static str {
        match self {
            Component::Weights => "weights",
            Component::WeightCopies => "weight_copies",
            Component::Gradients => "gradients",
            Component::Optimizer => "optimizer",
            Component::Activations => "activations",
            Component::Logits => "logits",
            Component::Temporaries => "temporaries",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Bytes per component, in [`Component::ALL`] order: the live state of a step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ByComponent([u64; Component::ALL.len()]);

impl ByComponent {
    pub fn get(&self, c: Component) -> Bytes {
        Bytes(self.0[c.index()])
    }

    /// Adds, saturating: the planner never overflows.
    pub fn add(&mut self, c: Component, b: Bytes) {
        let v = &mut self.0[c.index()];
        *v = v.saturating_add(b.0);
    }

    pub fn sub(&mut self, c: Component, b: Bytes) {
        let v = &mut self.0[c.index()];
        *v = v.saturating_sub(b.0);
    }

    pub fn total(&self) -> Bytes {
        Bytes(self.0.iter().fold(0, |a, b| a.saturating_add(*b)))
    }

    /// Every component with its bytes, in [`Component::ALL`] order.
    pub fn iter(&self) -> impl Iterator<Item = (Component, Bytes)> + '_ {
        Component::ALL.iter().map(|c| (*c, self.get(*c)))
    }

    pub fn to_map(&self) -> BTreeMap<Component, Bytes> {
        self.iter().collect()
    }
}

/// Dimensions a [`Shape`] holds without a heap allocation.
const INLINE_DIMS: usize = 6;

/// A tensor's dimensions: inline up to [`INLINE_DIMS`] (every shape the inventories
/// make), on the heap beyond. Compares, prints (`{:?}`) and serializes as a list.
#[derive(Clone)]
pub enum Shape {
    Inline(u8, [u64; INLINE_DIMS]),
    Heap(Vec<u64>),
}

impl Shape {
    pub fn new(dims: &[u64]) -> Shape {
        if dims.len() <= INLINE_DIMS {
            let mut a = [0; INLINE_DIMS];
            a[..dims.len()].copy_from_slice(dims);
            Shape::Inline(dims.len() as u8, a)
        } else {
            Shape::Heap(dims.to_vec())
        }
    }

    pub fn as_slice(&self) -> &[u64] {
        match self {
            Shape::Inline(n, a) => &a[..usize::from(*n)],
            Shape::Heap(v) => v,
        }
    }
}

impl std::ops::Deref for Shape {
    type Target = [u64];

    fn deref(&self) -> &[u64] {
        self.as_slice()
    }
}

impl PartialEq for Shape {
    fn eq(&self, other: &Shape) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for Shape {}

impl fmt::Debug for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_slice(), f)
    }
}

impl Serialize for Shape {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.as_slice())
    }
}

/// A tensor's shape and element type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Layout {
    pub shape: Shape,
    pub dtype: DType,
}

impl Layout {
    pub fn new(shape: &[u64], dtype: DType) -> Layout {
        Layout {
            shape: Shape::new(shape),
            dtype,
        }
    }

    pub fn bytes(&self) -> Bytes {
        self.dtype.size(&self.shape)
    }

    pub fn numel(&self) -> u64 {
        self.shape.iter().fold(1, |a, d| a.saturating_mul(*d))
    }

    /// Several buffers counted as one allocation (a block's workspace): flat, in their
    /// common dtype, or as raw `u8` bytes when their dtypes differ.
    pub fn concat(parts: &[Layout]) -> Layout {
        match parts.first() {
            Some(p) if parts.iter().all(|q| q.dtype == p.dtype) => {
                let n = parts.iter().fold(0u64, |a, q| a.saturating_add(q.numel()));
                Layout::new(&[n], p.dtype)
            }
            _ => Layout::new(
                &[parts.iter().map(Layout::bytes).sum::<Bytes>().0],
                DType::U8,
            ),
        }
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} {}", self.shape, self.dtype)
    }
}

/// A tensor's name, formatted only when shown: a fixed name, one built from a block
/// index (`block 3 output` is `"block "`, 3, then the pieces), or any other text.
/// Prints, compares and serializes as the text it stands for.
#[derive(Clone)]
pub enum Name {
    Static(&'static str),
    Block(&'static str, u64, [&'static str; 3]),
    /// `{pre}{name}{post}`: a tensor named after a parameter.
    Of(&'static str, Rc<str>, &'static str),
    Owned(String),
}

impl Name {
    /// `{pre}{l}` followed by `rest`.
    pub fn block(pre: &'static str, l: u64, rest: [&'static str; 3]) -> Name {
        Name::Block(pre, l, rest)
    }

    /// `{pre}{name}{post}`, `name` shared.
    pub fn of(pre: &'static str, name: &Rc<str>, post: &'static str) -> Name {
        Name::Of(pre, Rc::clone(name), post)
    }

    /// The text, borrowed where it is stored as such.
    pub fn text(&self) -> std::borrow::Cow<'_, str> {
        match self {
            Name::Static(s) => (*s).into(),
            Name::Owned(s) => s.as_str().into(),
            Name::Of("", s, "") => (**s).into(),
            Name::Block(..) | Name::Of(..) => self.to_string().into(),
        }
    }
}

impl From<&'static str> for Name {
    fn from(s: &'static str) -> Name {
        Name::Static(s)
    }
}

impl From<String> for Name {
    fn from(s: String) -> Name {
        Name::Owned(s)
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Name::Static(s) => f.write_str(s),
            Name::Owned(s) => f.write_str(s),
            Name::Of(pre, s, post) => {
                f.write_str(pre)?;
                f.write_str(s)?;
                f.write_str(post)
            }
            Name::Block(pre, l, rest) => {
                write!(f, "{pre}{l}")?;
                rest.iter().try_for_each(|r| f.write_str(r))
            }
        }
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.text(), f)
    }
}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        self.text() == other
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        self.text() == *other
    }
}

impl Serialize for Name {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text())
    }
}

/// What an allocation is given: bare bytes, or a layout whose bytes follow from it.
#[derive(Debug, Clone)]
pub enum Extent {
    Bytes(Bytes),
    Layout(Layout),
    /// This rank's part of a tensor split over `ranks` (ZeRO): the full tensor's bytes
    /// over the ranks, rounded up, described as a flat shard.
    Shard(Layout, u64),
}

impl From<Bytes> for Extent {
    fn from(b: Bytes) -> Extent {
        Extent::Bytes(b)
    }
}

impl From<Layout> for Extent {
    fn from(l: Layout) -> Extent {
        Extent::Layout(l)
    }
}

/// A tensor (or buffer) of the step.
#[derive(Debug, Clone, Serialize)]
pub struct Tensor {
    pub name: Name,
    pub component: Component,
    pub bytes: Bytes,
    /// Shape and dtype, where the inventory knows them (`bytes` follows from them).
    #[serde(flatten)]
    pub layout: Option<Layout>,
    /// Index into [`Timeline::phases`] at allocation.
    pub phase: usize,
    /// True for tensors that exist before the step and outlive it.
    pub persistent: bool,
}

impl Tensor {
    pub fn shape(&self) -> Option<&[u64]> {
        self.layout.as_ref().map(|l| l.shape.as_slice())
    }

    pub fn dtype(&self) -> Option<DType> {
        self.layout.as_ref().map(|l| l.dtype)
    }

    /// Shape and dtype as `[20, 3072, 65536] f32`, when known.
    pub fn describe(&self) -> Option<String> {
        self.layout.as_ref().map(Layout::to_string)
    }
}

/// Handle to a tensor in a [`Step`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorId(usize);

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Event {
    pub tensor: usize,
    pub alloc: bool,
}

/// Builds a [`Timeline`] by playing the step.
#[derive(Debug, Default, Clone)]
pub struct Step {
    tensors: Vec<Tensor>,
    events: Vec<Event>,
    phases: Vec<Name>,
    live: Vec<bool>,
}

impl Step {
    pub fn new() -> Step {
        Step::with_capacity(0, 0)
    }

    /// A step with room for about `tensors` tensors and `phases` phases, so that playing
    /// it does not grow its vectors over and over.
    pub fn with_capacity(tensors: usize, phases: usize) -> Step {
        let mut p = Vec::with_capacity(phases + 1);
        p.push("before the step".into());
        Step {
            tensors: Vec::with_capacity(tensors),
            events: Vec::with_capacity(tensors.saturating_mul(2)),
            phases: p,
            live: Vec::with_capacity(tensors),
        }
    }

    /// A step that continues from a copy of `prefix`, with room as [`Step::with_capacity`].
    pub fn resume(prefix: &Step, tensors: usize, phases: usize) -> Step {
        fn copy<T: Clone>(v: &[T], n: usize) -> Vec<T> {
            let mut out = Vec::with_capacity(n.max(v.len()));
            out.extend_from_slice(v);
            out
        }
        Step {
            tensors: copy(&prefix.tensors, tensors),
            events: copy(&prefix.events, tensors.saturating_mul(2)),
            phases: copy(&prefix.phases, phases + 1),
            live: copy(&prefix.live, tensors),
        }
    }

    /// Starts a new phase (e.g. "forward: layer 3").
    pub fn phase(&mut self, label: impl Into<Name>) {
        self.phases.push(label.into());
    }

    fn push(
        &mut self,
        name: Name,
        component: Component,
        extent: Extent,
        persistent: bool,
    ) -> TensorId {
        let id = self.tensors.len();
        let (bytes, layout) = match extent {
            Extent::Bytes(b) => (b, None),
            Extent::Layout(l) => (l.bytes(), Some(l)),
            Extent::Shard(l, ranks) if ranks > 1 => (
                Bytes(l.bytes().0.div_ceil(ranks)),
                Some(Layout::new(&[l.numel().div_ceil(ranks)], l.dtype)),
            ),
            Extent::Shard(l, _) => (l.bytes(), Some(l)),
        };
        self.tensors.push(Tensor {
            name,
            component,
            bytes,
            layout,
            phase: self.phases.len() - 1,
            persistent,
        });
        self.live.push(true);
        self.events.push(Event {
            tensor: id,
            alloc: true,
        });
        TensorId(id)
    }

    /// A tensor that lives through the whole step (weights, optimizer state).
    pub fn persistent(
        &mut self,
        name: impl Into<Name>,
        component: Component,
        size: impl Into<Extent>,
    ) -> TensorId {
        self.push(name.into(), component, size.into(), true)
    }

    /// A tensor of the step, given its bytes or its [`Layout`].
    pub fn alloc(
        &mut self,
        name: impl Into<Name>,
        component: Component,
        size: impl Into<Extent>,
    ) -> TensorId {
        self.push(name.into(), component, size.into(), false)
    }

    /// A tensor of the step by shape and dtype.
    pub fn tensor(
        &mut self,
        name: impl Into<Name>,
        component: Component,
        shape: &[u64],
        dtype: DType,
    ) -> TensorId {
        self.alloc(name, component, Layout::new(shape, dtype))
    }

    /// Frees a tensor; freeing twice is a no-op so inventories can release defensively.
    pub fn free(&mut self, id: TensorId) {
        if self.live.get(id.0).copied().unwrap_or(false) {
            self.live[id.0] = false;
            self.events.push(Event {
                tensor: id.0,
                alloc: false,
            });
        }
    }

    /// Allocates and frees at once: a transient buffer inside one op.
    pub fn transient(
        &mut self,
        name: impl Into<Name>,
        component: Component,
        size: impl Into<Extent>,
    ) {
        let id = self.alloc(name, component, size);
        self.free(id);
    }

    pub fn finish(self) -> Timeline {
        Timeline::new(self.tensors, self.events, self.phases)
    }
}

/// The state at one point of the step.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    /// Index of the event after which this state holds.
    pub event: usize,
    pub phase: String,
    pub total: Bytes,
    pub by_component: BTreeMap<Component, Bytes>,
    /// The tensor whose allocation reached this state.
    pub tensor: String,
}

/// A played step.
#[derive(Debug, Clone, Serialize)]
pub struct Timeline {
    pub tensors: Vec<Tensor>,
    pub events: Vec<Event>,
    pub phases: Vec<Name>,
    /// The state at the peak of live bytes (the first event that reaches the maximum).
    pub peak: Snapshot,
}

impl Timeline {
    fn new(tensors: Vec<Tensor>, events: Vec<Event>, phases: Vec<Name>) -> Timeline {
        let mut live = ByComponent::default();
        let mut best = (Bytes(0), 0usize, live);
        for (i, e) in events.iter().enumerate() {
            let t = &tensors[e.tensor];
            if e.alloc {
                live.add(t.component, t.bytes);
                let total = live.total();
                if total > best.0 {
                    best = (total, i, live);
                }
            } else {
                live.sub(t.component, t.bytes);
            }
        }
        let (total, event, by) = best;
        let peak = match events.get(event) {
            Some(e) => Snapshot {
                event,
                phase: phases[tensors[e.tensor].phase].to_string(),
                total,
                by_component: by.to_map(),
                tensor: tensors[e.tensor].name.to_string(),
            },
            None => Snapshot {
                event: 0,
                phase: "before the step".into(),
                total: Bytes(0),
                by_component: BTreeMap::new(),
                tensor: String::new(),
            },
        };
        Timeline {
            tensors,
            events,
            phases,
            peak,
        }
    }

    /// Live bytes by component after every event: the curve the plots draw.
    pub fn curve(&self) -> Vec<ByComponent> {
        let mut live = ByComponent::default();
        self.events
            .iter()
            .map(|e| {
                let t = &self.tensors[e.tensor];
                if e.alloc {
                    live.add(t.component, t.bytes);
                } else {
                    live.sub(t.component, t.bytes);
                }
                live
            })
            .collect()
    }

    /// The tensors live at the peak, largest first.
    pub fn live_at_peak(&self) -> Vec<&Tensor> {
        let mut live = vec![false; self.tensors.len()];
        for e in &self.events[..=self.peak.event.min(self.events.len().saturating_sub(1))] {
            live[e.tensor] = e.alloc;
        }
        let mut out: Vec<&Tensor> = self
            .tensors
            .iter()
            .zip(live)
            .filter_map(|(t, l)| l.then_some(t))
            .collect();
        out.sort_by_key(|t| std::cmp::Reverse(t.bytes));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_is_the_maximum_of_live_bytes() {
        let mut s = Step::new();
        s.persistent("w", Component::Weights, Bytes(100));
        s.phase("forward");
        let a = s.alloc("a", Component::Activations, Bytes(50));
        s.phase("loss");
        let l = s.alloc("logits", Component::Logits, Bytes(70));
        s.free(a);
        s.free(l);
        s.phase("optimizer");
        s.transient("tmp", Component::Temporaries, Bytes(10));
        let t = s.finish();
        assert_eq!(t.peak.total, Bytes(220));
        assert_eq!(t.peak.phase, "loss");
        assert_eq!(t.peak.tensor, "logits");
        assert_eq!(t.live_at_peak().len(), 3);
        assert_eq!(t.curve().last().unwrap().total(), Bytes(100));
    }

    #[test]
    fn tensors_by_shape_carry_it_and_bytes_follow() {
        let mut s = Step::new();
        // nanochat's fp32 logits at seed 000: 20 × 3072 × 65,536 × 4 B.
        let l = s.tensor("logits", Component::Logits, &[20, 3072, 65536], DType::F32);
        s.free(l);
        s.alloc("by bytes", Component::Temporaries, Bytes(10));
        let t = s.finish();
        assert_eq!(t.tensors[0].bytes, Bytes(20 * 3072 * 65536 * 4));
        assert_eq!(
            t.tensors[0].describe().as_deref(),
            Some("[20, 3072, 65536] f32")
        );
        assert_eq!(t.tensors[1].describe(), None);
        let json = serde_json::to_value(&t.tensors[0]).unwrap();
        assert_eq!(json["shape"], serde_json::json!([20, 3072, 65536]));
        assert_eq!(json["dtype"], "f32");
    }

    #[test]
    fn by_component_adds_subtracts_and_saturates() {
        let mut b = ByComponent::default();
        b.add(Component::Weights, Bytes(u64::MAX));
        b.add(Component::Weights, Bytes(1));
        b.add(Component::Logits, Bytes(5));
        b.sub(Component::Logits, Bytes(7));
        assert_eq!(b.get(Component::Weights), Bytes(u64::MAX));
        assert_eq!(b.get(Component::Logits), Bytes(0));
        assert_eq!(b.total(), Bytes(u64::MAX));
        let order: Vec<Component> = b.iter().map(|(c, _)| c).collect();
        assert_eq!(order, Component::ALL);
    }

    #[test]
    fn mixed_workspaces_are_raw_bytes() {
        let a = Layout::new(&[3, 4], DType::Bf16);
        let b = Layout::new(&[5], DType::F32);
        assert_eq!(
            Layout::concat(&[a.clone(), a.clone()]),
            Layout::new(&[24], DType::Bf16)
        );
        let m = Layout::concat(&[a.clone(), b.clone()]);
        assert_eq!((m.dtype, m.bytes()), (DType::U8, a.bytes() + b.bytes()));
    }
}
