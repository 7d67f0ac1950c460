//! The sentences of `diagnose` and of `fit`'s ladder when nothing fits, written from the
//! planner's data (see the rule in `render`).

use vramplan_planner::{
    thousands, Bytes, Candidate, Edit, Explanation, Fact, FixKind, Hint, HostChange, HostSignal,
    Implausible, Lever, Miss, PlanCheck, RunSpec, Source,
};

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
        Explanation::FreeButRefused {
            free_bytes,
            request_bytes,
        } => format!(
            "fragmentation: the device reports {} free, more than the {} request, and still refused it (no block that large could be mapped)",
            b(*free_bytes),
            b(*request_bytes)
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
        } => does_not_fit(*allocated_bytes, *free_bytes, *request_bytes, *hint),
        Explanation::HostOom {
            how,
            process,
            anon_rss_bytes,
            rank,
        } => host_oom(*how, process.as_deref(), *anon_rss_bytes, *rank),
        Explanation::NoSizes { source: s, hint } => format!(
            "{}: the message prints no sizes, so the cause cannot be told from it{}",
            source(*s),
            hint_for(*hint, "while ")
        ),
    }
}

fn does_not_fit(
    allocated: Option<u64>,
    free: Option<u64>,
    request: Option<u64>,
    hint: Option<Hint>,
) -> String {
    let mut parts = Vec::new();
    if let Some(a) = allocated {
        parts.push(format!("{} already allocated", b(a)));
    }
    if let Some(f) = free {
        parts.push(format!("{} free", b(f)));
    }
    let numbers = match (parts.is_empty(), request) {
        (true, None) => String::new(),
        (true, Some(q)) => format!(": {} more was asked", b(q)),
        (false, None) => format!(": {}", parts.join(" and ")),
        (false, Some(q)) => format!(": {} when {} more was asked", parts.join(" and "), b(q)),
    };
    format!("the run does not fit{numbers}{}", hint_for(hint, "for "))
}

fn host_oom(how: HostSignal, process: Option<&str>, rss: Option<u64>, rank: Option<u32>) -> String {
    let who = match (process, rank) {
        (Some(p), _) => format!("the kernel's OOM killer killed {p}"),
        (None, Some(r)) => format!("rank {r} was killed"),
        (None, None) => "the process was killed".to_string(),
    };
    let with = rss
        .map(|r| format!(" holding {} of host memory", b(r)))
        .unwrap_or_default();
    let by = match how {
        HostSignal::OomKiller => "",
        HostSignal::Sigkill => " with SIGKILL (exit code -9)",
        HostSignal::Exit137 => " (exit code 137 = SIGKILL)",
        HostSignal::WorkerKilled => " (a data loader worker was killed by a signal)",
        HostSignal::ShellKilled => " (the shell printed \"Killed\")",
    };
    format!(
        "the host ran out of memory: {who}{with}{by}; no CUDA error, so the GPU is not the limit"
    )
}

/// What printed a report, for sentences.
pub fn source(s: Source) -> &'static str {
    match s {
        Source::PytorchCuda => "PyTorch's CUDA allocator",
        Source::PytorchHip => "PyTorch's ROCm (HIP) allocator",
        Source::PytorchXpu => "PyTorch's XPU allocator",
        Source::Mps => "PyTorch's MPS allocator",
        Source::CudaError => {
            "a CUDA runtime error outside PyTorch's allocator (CUDA error: out of memory)"
        }
        Source::Cublas => "cuBLAS could not allocate its workspace (CUBLAS_STATUS_ALLOC_FAILED)",
        Source::Cudarc => "candle/cudarc's driver error",
        Source::Host => "the host",
    }
}

fn pct(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "?".to_string();
    }
    format!("{:.0} %", part as f64 * 100.0 / whole as f64)
}

/// One fact of the evidence.
pub fn fact(f: &Fact) -> String {
    match f {
        Fact::RequestShare { request_bytes: q, capacity_bytes: c } => {
            format!("the request, {}, is {} of the capacity {}", b(*q), pct(*q, *c), b(*c))
        }
        Fact::RequestAboveCapacity { request_bytes: q, capacity_bytes: c } => {
            format!("the request, {}, is more than the whole capacity {}", b(*q), b(*c))
        }
        Fact::TensorShape { shape, vocab_like, matches_request } => format!(
            "the printed tensor {shape}{}{}",
            if *vocab_like { " has a vocabulary-sized last dimension (tokens × vocab: logits)" } else { "" },
            if *matches_request { ", and its size is the request" } else { "" }
        ),
        Fact::CodeNames { hint } => format!("the failing code is the {}", hint.name()),
        Fact::CacheHoldsRequest { reserved_unallocated_bytes: u, request_bytes: q } => format!(
            "the cache holds {} reserved but unallocated, enough for the {} request, but not in one piece",
            b(*u),
            b(*q)
        ),
        Fact::CacheAndFreeHoldRequest { reserved_unallocated_bytes: u, free_bytes: f, request_bytes: q } => format!(
            "{} cached but unallocated plus {} free would hold the {} request: the cache is split by live blocks",
            b(*u),
            b(*f),
            b(*q)
        ),
        Fact::FreeButRefused { free_bytes: f, request_bytes: q } => {
            format!("the device reports {} free for a {} request", b(*f), b(*q))
        }
        Fact::OtherProcessesHold { bytes, capacity_bytes: c, processes } => format!(
            "{} other process{} hold {} ({} of the capacity)",
            processes,
            if *processes == 1 { "" } else { "es" },
            b(*bytes),
            pct(*bytes, *c)
        ),
        Fact::OutsidePytorch { bytes, capacity_bytes: c } => format!(
            "{} of the device is in use but not held by this process's PyTorch ({} of the capacity): another process or library",
            b(*bytes),
            pct(*bytes, *c)
        ),
        Fact::ThisProcessListed { pid, bytes } => format!(
            "process {pid} ({}) is this process (it holds what PyTorch reserved; in a container it sees itself under another PID)",
            b(*bytes)
        ),
        Fact::ThisProcessHoldsDevice { in_use_bytes: p, free_bytes: f, capacity_bytes: c } => format!(
            "this process's {} in use plus {} free is the capacity {}: no other process holds memory",
            b(*p),
            b(*f),
            b(*c)
        ),
        Fact::DeviceFull { used_bytes: u, capacity_bytes: c } => {
            format!("live tensors fill {} of the device ({} of {})", pct(*u, *c), b(*u), b(*c))
        }
        Fact::SmallRequest { request_bytes: q, capacity_bytes: c } => {
            format!("the request is an ordinary one: {} ({} of the capacity)", b(*q), pct(*q, *c))
        }
        Fact::RequestAboveFree { request_bytes: q, free_bytes: f } => {
            format!("the request, {}, is more than the {} free", b(*q), b(*f))
        }
        Fact::HostKilled { how } => match how {
            HostSignal::OomKiller => "the kernel's OOM killer names the killed process".to_string(),
            HostSignal::Sigkill => "the launcher reports SIGKILL (exit code -9), the OOM killer's signal".to_string(),
            HostSignal::Exit137 => "exit code 137 is 128 + SIGKILL, the OOM killer's signal".to_string(),
            HostSignal::WorkerKilled => "a data loader worker was killed by a signal".to_string(),
            HostSignal::ShellKilled => "the shell printed \"Killed\": the process got SIGKILL".to_string(),
        },
        Fact::NoSizes { source: s } => format!("{} prints no sizes", source(*s)),
    }
}

/// One finding of the log against the plan.
pub fn plan_check(c: &PlanCheck) -> String {
    match c {
        PlanCheck::CapacityDiffers { log_bytes, preset_bytes } => format!(
            "the log's GPU has {} but the config's preset has {}: the plan is for another GPU",
            b(*log_bytes),
            b(*preset_bytes)
        ),
        PlanCheck::CapacityMatches { log_bytes, preset_bytes } => format!(
            "the log's GPU capacity {} matches the preset's {}",
            b(*log_bytes),
            b(*preset_bytes)
        ),
        PlanCheck::MoreThanPlanned { at_failure_bytes, planned_peak_bytes } => format!(
            "{} was live or asked at the failure, more than the planned peak of {}: a larger batch or sequence than configured, memory kept across steps (a leak), or another model",
            b(*at_failure_bytes),
            b(*planned_peak_bytes)
        ),
        PlanCheck::AgreesDoesNotFit { at_failure_bytes, planned_peak_bytes } => format!(
            "the plan agrees: {} live or asked at the failure, within the planned peak of {} that does not fit",
            b(*at_failure_bytes),
            b(*planned_peak_bytes)
        ),
        PlanCheck::PlanFitsYetFailed { at_failure_bytes, planned_device_bytes } => format!(
            "the plan says the run fits ({} on the device) yet it failed with {} live or asked: another process, a different batch than configured, or a leak",
            b(*planned_device_bytes),
            b(*at_failure_bytes)
        ),
        PlanCheck::OtherProcessesNotPlanned { bytes } => format!(
            "other processes hold {} that the plan counts as the run's",
            b(*bytes)
        ),
        PlanCheck::NoHostEstimate => {
            "the planner has no host-RAM estimate yet, so the plan cannot say how much host memory the run needs".to_string()
        }
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
        FixKind::CheckDevice => {
            "check what holds the device (nvidia-smi or rocm-smi: another process, a previous run) before changing the run".to_string()
        }
        FixKind::Host { change } => host_change(*change).to_string(),
    }
}

fn host_change(c: HostChange) -> &'static str {
    match c {
        HostChange::FewerWorkers => "host: fewer data loader workers (num_workers = 0 to 2; each worker copies the dataset's state)",
        HostChange::NoPinnedMemory => "host: pin_memory = False (pinned buffers are locked host RAM)",
        HostChange::MmapLoading => "host: memory-map the data and the weights (safetensors, low_cpu_mem_usage) instead of reading a copy per rank",
        HostChange::SmallerShuffleBuffer => "host: a smaller shuffle buffer",
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

/// The `fit` flags that ask for levers taken together.
pub fn lever_flags(levers: &[Lever]) -> String {
    let flags: Vec<String> = levers.iter().map(|l| flag(*l)).collect();
    flags.join(" ")
}

fn flag(l: Lever) -> String {
    match l {
        Lever::Shard { sharding } => format!("--sharding {sharding}"),
        Lever::Optimizer8bit { optimizer } => format!("--optimizer {optimizer}"),
        Lever::PureBf16 => "--precision bf16".to_string(),
        Lever::Lora { rank } => format!("--lora {rank}"),
        Lever::Qlora { rank } => format!("--qlora {rank}"),
        Lever::MoreGpus { gpus, sharding } => format!("--gpus {gpus} --sharding {sharding}"),
        Lever::OffloadOptimizer { sharding, params } => {
            let p = if params { " --offload-params" } else { "" };
            format!("--sharding {sharding} --offload-optimizer{p}")
        }
        Lever::OffloadActivations => "--offload-activations".to_string(),
    }
}

/// What levers give up, against the run as asked (`base`), in a few words each; `shown`
/// is the plan the row shows (its offloaded bytes are the plan's own).
pub fn gives_up(levers: &[Lever], base: &RunSpec, shown: Option<&Candidate>) -> String {
    let parts: Vec<String> = levers.iter().map(|l| give_up(*l, base, shown)).collect();
    parts.join("; ")
}

fn give_up(l: Lever, base: &RunSpec, shown: Option<&Candidate>) -> String {
    let gpus = base.hardware.gpus;
    match l {
        Lever::Shard { .. } => format!("more communication over the {gpus} GPUs"),
        Lever::Optimizer8bit { .. } => {
            format!("{} state quantized to 8 bits", base.train.optimizer)
        }
        Lever::PureBf16 => "fp32 master weights (small updates round away)".to_string(),
        Lever::Lora { rank } => format!("full fine-tuning: rank-{rank} adapters, frozen base"),
        Lever::Qlora { rank } => {
            format!("full fine-tuning: rank-{rank} adapters, 4-bit NF4 base")
        }
        Lever::MoreGpus { gpus: n, .. } => format!("hardware: {n} GPUs instead of {gpus}"),
        Lever::OffloadOptimizer { .. } => offload_cost(base, l, shown),
        Lever::OffloadActivations => "speed: activations to host memory and back".to_string(),
    }
}

/// The offload rung's cost: the Adam step on the CPU and the bytes each GPU moves over
/// PCIe a step, with the host memory the state takes (of the plan shown, else of the run
/// as asked with the lever).
fn offload_cost(base: &RunSpec, l: Lever, shown: Option<&Candidate>) -> String {
    let applied = vramplan_planner::apply_lever(base, &[l]);
    let Some(s) = shown.map(|c| &c.spec).or(applied.as_ref()) else {
        return "speed: Adam on the CPU, gradients and parameters over PCIe".to_string();
    };
    format!(
        "speed: Adam on the CPU, {} over PCIe a step per GPU; host: {} of offloaded state per GPU",
        b(vramplan_planner::offload_traffic(s)),
        b(vramplan_planner::offloaded_state_bytes(s))
    )
}

/// A candidate's settings: "micro-batch 2 × accumulation 16 at seq 2048, checkpointing full, loss chunked".
pub fn candidate(c: &Candidate) -> String {
    format!(
        "micro-batch {} × accumulation {} at seq {}, checkpointing {}, loss {}",
        c.micro_batch,
        c.grad_accum,
        c.seq_len,
        c.checkpointing,
        c.loss_label()
    )
}

/// Why a search found nothing: "seq 1024: the smallest candidate (…) needs 9.1 GiB, 7.1 GiB usable".
pub fn miss(m: &Miss) -> String {
    let seq = m
        .seq_len
        .map(|s| format!("seq {s}"))
        .unwrap_or_else(|| "every sequence length".to_string());
    match &m.smallest {
        Some(c) => format!(
            "{seq}: the smallest candidate ({}) needs {}, {} usable with a {:.0} % margin",
            candidate(c),
            b(c.report.device_bytes),
            b(m.usable_bytes),
            m.margin * 100.0
        ),
        None => format!("{seq}: no candidate splits the global batch"),
    }
}
