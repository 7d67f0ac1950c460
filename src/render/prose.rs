//! The sentences of `diagnose`, written from the planner's data (see the rule in `render`).

use vramplan_planner::{thousands, Bytes, Edit, Explanation, FixKind, Hint, Implausible};

fn b(x: u64) -> String {
    Bytes(x).to_string()
}

fn hint_for(h: Option<Hint>, word: &str) -> String {
    h.map(|h| format!(" ({word}the {})", h.name()))
        .unwrap_or_default()
}

pub fn explanation(e: &Explanation) -> String {
    match e {
        Explanation::HugeTensorMatched {
            tensor,
            bytes,
            phase,
            shape,
        } => {
            let formula = match shape {
                Some(s) => format!(
                    ", {} × {} × {} × {} B = {}",
                    s.micro_batch,
                    s.seq_len,
                    thousands(s.vocab_size),
                    s.width_bytes,
                    b(*bytes)
                ),
                None => format!(", {}", b(*bytes)),
            };
            format!("one huge tensor: {tensor}{formula} during {phase}")
        }
        Explanation::HugeTensor {
            request_bytes,
            hint,
        } => format!(
            "one huge tensor of {}{}",
            b(*request_bytes),
            hint_for(*hint, "")
        ),
        Explanation::Fragmentation {
            reserved_unallocated_bytes,
            request_bytes,
        } => format!(
            "fragmentation: PyTorch holds {} reserved but unallocated, more than enough for the {} request, but not in one piece",
            b(*reserved_unallocated_bytes),
            b(*request_bytes)
        ),
        Explanation::OtherProcesses {
            other_processes_bytes,
            capacity_bytes,
        } => format!(
            "other processes hold {} of the GPU's {}",
            b(*other_processes_bytes),
            b(*capacity_bytes)
        ),
        Explanation::DriverError => {
            "the device ran out of memory (candle/cudarc reports no sizes): the run does not fit"
                .to_string()
        }
        Explanation::DoesNotFit {
            allocated_bytes,
            free_bytes,
            request_bytes,
            hint,
        } => format!(
            "the run does not fit: {} already allocated and {} free when {} more was asked{}",
            b(*allocated_bytes),
            b(*free_bytes),
            b(*request_bytes),
            hint_for(*hint, "for ")
        ),
    }
}

fn edit(e: &Edit) -> String {
    match e {
        Edit::MicroBatch {
            micro_batch,
            grad_accum,
        } => format!("micro_batch = {micro_batch}, grad_accum = {grad_accum}"),
        Edit::Loss { loss } => format!("loss = \"{loss}\""),
        Edit::Checkpointing { checkpointing } => format!("checkpointing = \"{checkpointing}\""),
        Edit::SeqLen { seq_len } => format!("seq_len = {seq_len}"),
        Edit::Sharding { sharding } => format!("sharding = \"{sharding}\""),
    }
}

pub fn change(k: &FixKind) -> String {
    match k {
        FixKind::Edits { edits } => edits.iter().map(edit).collect::<Vec<_>>().join(", "),
        FixKind::ExpandableSegments {
            reserved_unallocated_bytes,
            request_bytes,
        } => format!(
            "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True ({} reserved but unallocated ≥ {} requested)",
            b(*reserved_unallocated_bytes),
            b(*request_bytes)
        ),
        FixKind::FreeGpu {
            other_processes_bytes,
        } => format!(
            "free the GPU: other processes hold {} (check nvidia-smi)",
            b(*other_processes_bytes)
        ),
        FixKind::HalveMicroBatch => "halve micro_batch and double grad_accum".to_string(),
        FixKind::ShardOptimizer => "sharding = \"zero2\" (or an 8-bit optimizer)".to_string(),
    }
}

pub fn implausible(i: &Implausible) -> String {
    match i {
        Implausible::NoRequest => {
            "the report asks for no memory: not matched against the plan".to_string()
        }
        Implausible::AboveCapacity { field, bytes } => format!(
            "the report's {field} memory ({}) is above the GPU's capacity: not matched against the plan",
            b(*bytes)
        ),
    }
}
