//! Stage marks inside a step, for calibrating the planner's inventory: the step calls
//! [`Probe::mark`] at the end of each stage, and a probe decides what to do with it.
//! Training passes [`NoProbe`]; calibration and `VRAMPLAN_MEM_DEBUG` pass a [`Recorder`].

use crate::engine::alloc;
use std::cell::RefCell;

/// Told the end of each stage of a step (`"fwd 0 attn"`, `"loss"`, `"opt"`, ...).
pub trait Probe {
    fn mark(&self, label: &str);
}

/// Ignores every mark: what a training step runs with.
pub struct NoProbe;

impl Probe for NoProbe {
    fn mark(&self, _: &str) {}
}

/// One stage: its label, the live bytes at its end and the high-water mark during it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    pub label: String,
    pub live: u64,
    pub peak: u64,
    /// With the allocator's census on, the tensors live at the stage's high-water mark:
    /// (bytes, how many), largest total first; empty otherwise.
    pub census: Vec<(u64, u64)>,
}

/// Records each stage from the counting allocator (the CPU heap) and starts a new
/// high-water mark for the next stage.
pub struct Recorder {
    /// Tensors alone (no matmul scratch) rather than the whole heap.
    tensors: bool,
    marks: RefCell<Vec<Mark>>,
    /// The highest high-water marks (the whole heap, tensors alone) of the stages so far:
    /// each mark starts a new one, so the step's own is their largest.
    top: std::cell::Cell<(u64, u64)>,
}

impl Recorder {
    pub fn new(tensors: bool) -> Recorder {
        Recorder {
            tensors,
            marks: RefCell::new(Vec::new()),
            top: std::cell::Cell::new((0, 0)),
        }
    }

    /// The highest heap and tensor high-water marks of the stages recorded so far.
    pub fn top(&self) -> (u64, u64) {
        self.top.get()
    }

    /// Live bytes now, counted as this recorder counts.
    pub fn live(&self) -> u64 {
        if self.tensors {
            alloc::tensors_current()
        } else {
            alloc::current()
        }
    }

    /// The marks so far, oldest first, leaving the recorder empty. It keeps its buffer, so
    /// a recorder used again (calibration measures many configurations with one) does not
    /// allocate for its marks inside a measured step once it has held as many.
    pub fn take(&self) -> Vec<Mark> {
        let mut marks = self.marks.borrow_mut();
        let out = marks.clone();
        marks.clear();
        out
    }
}

impl Probe for Recorder {
    fn mark(&self, label: &str) {
        let (heap, tensors) = self.top.get();
        self.top
            .set((heap.max(alloc::peak()), tensors.max(alloc::tensors_peak())));
        let (live, peak) = if self.tensors {
            (alloc::tensors_current(), alloc::tensors_peak())
        } else {
            (alloc::current(), alloc::peak())
        };
        self.marks.borrow_mut().push(Mark {
            label: label.to_string(),
            live,
            peak,
            census: alloc::census_at_peak(),
        });
        alloc::reset_peak();
    }
}
