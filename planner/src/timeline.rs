//! One training step as a sequence of allocation and free events over named tensors.
//!
//! An inventory (see `torch` and `candle`) plays the step and records every tensor it
//! creates with its owner (a [`Component`]) and the phase it was created in. The peak is
//! the maximum of live bytes over the event sequence, so "where is the peak" and "what was
//! live" are read off the same data that `diagnose` searches and the plots draw.

use crate::units::Bytes;
use serde::Serialize;
use std::collections::BTreeMap;

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

/// A tensor (or buffer) of the step.
#[derive(Debug, Clone, Serialize)]
pub struct Tensor {
    pub name: String,
    pub component: Component,
    pub bytes: Bytes,
    /// Index into [`Timeline::phases`] at allocation.
    pub phase: usize,
    /// True for tensors that exist before the step and outlive it.
    pub persistent: bool,
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
#[derive(Debug, Default)]
pub struct Step {
    tensors: Vec<Tensor>,
    events: Vec<Event>,
    phases: Vec<String>,
    live: Vec<bool>,
}

impl Step {
    pub fn new() -> Step {
        Step {
            phases: vec!["before the step".into()],
            ..Step::default()
        }
    }

    /// Starts a new phase (e.g. "forward: layer 3").
    pub fn phase(&mut self, label: impl Into<String>) {
        self.phases.push(label.into());
    }

    fn push(
        &mut self,
        name: String,
        component: Component,
        bytes: Bytes,
        persistent: bool,
    ) -> TensorId {
        let id = self.tensors.len();
        self.tensors.push(Tensor {
            name,
            component,
            bytes,
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
        name: impl Into<String>,
        component: Component,
        bytes: Bytes,
    ) -> TensorId {
        self.push(name.into(), component, bytes, true)
    }

    pub fn alloc(
        &mut self,
        name: impl Into<String>,
        component: Component,
        bytes: Bytes,
    ) -> TensorId {
        self.push(name.into(), component, bytes, false)
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
    pub fn transient(&mut self, name: impl Into<String>, component: Component, bytes: Bytes) {
        let id = self.alloc(name, component, bytes);
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
    pub phases: Vec<String>,
    /// The state at the peak of live bytes (the first event that reaches the maximum).
    pub peak: Snapshot,
}

impl Timeline {
    fn new(tensors: Vec<Tensor>, events: Vec<Event>, phases: Vec<String>) -> Timeline {
        let mut live = [0u64; 7];
        let mut best = (0u64, 0usize, live);
        for (i, e) in events.iter().enumerate() {
            let t = &tensors[e.tensor];
            let c = t.component.index();
            if e.alloc {
                live[c] = live[c].saturating_add(t.bytes.0);
                let total = live.iter().fold(0u64, |a, b| a.saturating_add(*b));
                if total > best.0 {
                    best = (total, i, live);
                }
            } else {
                live[c] = live[c].saturating_sub(t.bytes.0);
            }
        }
        let (total, event, by) = best;
        let peak = match events.get(event) {
            Some(e) => Snapshot {
                event,
                phase: phases[tensors[e.tensor].phase].clone(),
                total: Bytes(total),
                by_component: Component::ALL
                    .iter()
                    .map(|c| (*c, Bytes(by[c.index()])))
                    .collect(),
                tensor: tensors[e.tensor].name.clone(),
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
    pub fn curve(&self) -> Vec<[u64; 7]> {
        let mut live = [0u64; 7];
        self.events
            .iter()
            .map(|e| {
                let t = &self.tensors[e.tensor];
                let c = t.component.index();
                if e.alloc {
                    live[c] = live[c].saturating_add(t.bytes.0);
                } else {
                    live[c] = live[c].saturating_sub(t.bytes.0);
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
        assert_eq!(t.curve().last().unwrap().iter().sum::<u64>(), 100);
    }
}
