//! Host memory (RAM) of a training run, beside its GPU memory: per training process and
//! per machine (one process per GPU on the node, as torchrun, accelerate and DeepSpeed
//! launch them).
//!
//! Every term is private to its process or shared by all processes of the machine
//! (file-backed pages: shared libraries, a memory-mapped checkpoint), and held while the
//! model loads, while it trains, or throughout. A process's peak is its resident set
//! (private and shared) in its larger phase; the machine's peak is, in the larger phase,
//! the processes' private bytes plus the shared pages once.
//!
//! The terms and where each number comes from. *Measured*: `tools/measure_host.py` on
//! CPU (torch 2.15, transformers 5.24, tokenizers 0.23), its output in
//! `tests/data/host_rss.json`, which a test compares with the constants here. *Modelled*:
//! from the source named, not measured. *Cited*: a figure from a public report.
//! - **runtime** (measured): the interpreter with torch and transformers imported: private
//!   heap [`RUNTIME_PRIVATE`] and the shared libraries' pages [`RUNTIME_SHARED`]. The
//!   candle engine is vramplan's own binary and has neither.
//! - **CUDA's host side** (cited, an upper bound): driver and kernel images loaded at the
//!   first CUDA call, [`CUDA_HOST`] (pytorch/pytorch#12873, CUDA 9 with every module loaded
//!   eagerly; lazy module loading, torch's default since 1.13, loads less).
//! - **model before `.to("cuda")`**, by how the weights arrive ([`Load`]):
//!   `init` builds the model on the CPU from its config: the fp32 parameters and
//!   [`LOAD_OVERHEAD`], private (measured: `init_*`). `mmap`, transformers' `from_pretrained` of
//!   safetensors: tensors in the file's dtype stay views of the mapped file, so the file's
//!   pages are shared through the page cache (4 B a parameter for an fp32 checkpoint) and
//!   only [`LOAD_OVERHEAD`] is private (measured: `load_*_float32`); a dtype other than the
//!   file's is a private converted copy (measured: `load_*_bfloat16`). `copy`, a file read
//!   whole and then copied into the tensors (`torch.load` without `mmap=True`; the candle
//!   engine's resume, `std::fs::read` then `safetensors::load_buffer`): twice the
//!   parameters, private (modelled). Held while loading only.
//! - **tokenizer** (measured): a byte-level BPE `tokenizer.json` loaded by `tokenizers`,
//!   [`TOKENIZER_PER_ENTRY`] bytes per vocabulary entry.
//! - **data-loader workers** (measured): each worker is a forked process, its unique set
//!   [`WORKER_PRIVATE`] on top of the pages it shares with its parent; each prefetches
//!   `prefetch_factor` batches into shared memory (modelled: torch's `DataLoader`), and
//!   each reads the data itself.
//! - **pinned batches** (modelled): with `pin_memory`, the pin thread copies each batch
//!   into page-locked memory; the CUDA host allocator rounds each block up to a power of
//!   two and caches it (`CachingHostAllocator`): the batches in flight.
//! - **Parquet reader** (modelled, [`Reader`]): `row-group` holds one decompressed row
//!   group (pyarrow's `iter_batches` / `read_row_group`; pyarrow writes at most
//!   [`PYARROW_ROW_GROUP_ROWS`] rows a group); `whole` the whole decompressed table
//!   (`pq.read_table`, pandas); `pages` one data page of each column, compressed and
//!   decompressed ([`PARQUET_PAGE`], the default page size of pyarrow and parquet-rs;
//!   vramplan's engine reads this way). A row's text is taken as [`TEXT_BYTES_PER_TOKEN`]
//!   bytes per token of `seq_len` unless the row group's size is given.
//! - **offloaded activations** (modelled): the saved activations the step moves to pinned
//!   host memory (`save_on_cpu(pin_memory=True)`, torchtune's `OffloadActivations`).
//! - **DeepSpeed offload** (modelled; the buffers counted on DeepSpeed's CPU accelerator,
//!   `tools/measure_deepspeed_offload.py`, the resident memory unmeasured): with
//!   `offload_optimizer = "cpu"` the fp32 master partition, the Adam moments, the fp32
//!   gradient partition and DeepSpeed's staging buffers; with `offload_params = "cpu"` the
//!   16-bit parameter partitions. Each buffer is a term of its own (`torch::host_buffers`,
//!   from DeepSpeed 0.19.6's source); pinned ones are rounded to a power of two as
//!   PyTorch's `CachingHostAllocator` rounds them.

use crate::error::{PlanError, Result};
use crate::spec::{Choice, Device, Engine, Implementation, RunSpec};
use crate::units::{Bytes, MIB};
use serde::Serialize;

/// Private heap of a process with torch and transformers imported (`import_transformers`
/// RssAnon).
pub const RUNTIME_PRIVATE: u64 = 428_589_056;
/// File-backed pages of the same process: torch's shared libraries (RssFile).
pub const RUNTIME_SHARED: u64 = 324_411_392;
/// Private bytes `from_pretrained` adds when the tensors stay views of the mapped file
/// (`load_t5_float32` RssAnon growth).
pub const LOAD_OVERHEAD: u64 = 110_632_960;
/// Host memory CUDA takes at its first call (pytorch/pytorch#12873: 1122.488 MiB).
pub const CUDA_HOST: u64 = 1_177_015_910;
/// Resident bytes per vocabulary entry of a loaded `tokenizer.json` (the 151,643-entry
/// case: 110,620,672 B).
pub const TOKENIZER_PER_ENTRY: u64 = 730;
/// Unique set size of one forked data-loader worker.
pub const WORKER_PRIVATE: u64 = 15_245_312;
/// pyarrow's `write_table` default: at most 1024 × 1024 rows a row group.
pub const PYARROW_ROW_GROUP_ROWS: u64 = 1 << 20;
/// A data page (pyarrow's `data_page_size` and parquet-rs's default: 1 MiB).
pub const PARQUET_PAGE: u64 = MIB;
/// UTF-8 bytes of text per token assumed for a row (English BPE: about 4 characters a
/// token; Chinese: about 1.5 characters of 3 bytes).
pub const TEXT_BYTES_PER_TOKEN: u64 = 4;
/// Tensors a batch carries to the GPU (input ids, labels, attention mask), int64 each.
pub const BATCH_TENSORS: u64 = 3;

/// How the weights reach host memory before they move to the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Load {
    /// Built from the config on the CPU (pretraining from scratch).
    Init,
    /// `from_pretrained` of safetensors, memory-mapped.
    Mmap,
    /// The file read whole, then copied into the tensors.
    Copy,
}

/// How the training data is read from Parquet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reader {
    /// Not Parquet, or already tokenized in memory-mapped arrays.
    None,
    /// One decompressed row group at a time.
    RowGroup,
    /// The whole table in memory.
    Whole,
    /// One data page of each column at a time.
    Pages,
}

macro_rules! spelled {
    ($t:ty, $($s:literal => $v:expr),+) => {
        impl Choice for $t {
            const ALL: &'static [(&'static str, Self)] = &[$(($s, $v)),+];
        }
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }
        impl Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.serialize_str(self.name())
            }
        }
    };
}
spelled!(Load, "init" => Load::Init, "mmap" => Load::Mmap, "copy" => Load::Copy);
spelled!(Reader, "none" => Reader::None, "row-group" => Reader::RowGroup, "whole" => Reader::Whole, "pages" => Reader::Pages);

/// When a term is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Load,
    Train,
    Both,
}

/// Where a term's number comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Basis {
    Measured,
    Modelled,
    Cited,
}

/// One named part of a process's host memory.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostTerm {
    pub name: &'static str,
    pub bytes: u64,
    /// Shared by all processes of the machine (counted once there).
    pub shared: bool,
    pub phase: Phase,
    pub basis: Basis,
}

/// What the host side of a run is, beyond its [`RunSpec`].
#[derive(Debug, Clone, PartialEq)]
pub struct HostOptions {
    /// `DataLoader(num_workers=…)`; 0 reads in the training process.
    pub workers: u64,
    /// Batches each worker prefetches (`prefetch_factor`, torch's default 2).
    pub prefetch: u64,
    pub pin_memory: bool,
    pub load: Load,
    pub reader: Reader,
    /// Decompressed bytes of one row group, when known.
    pub row_group_bytes: Option<u64>,
    /// Rows of the data set (for `whole`, and to cap a row group).
    pub samples: Option<u64>,
    /// Training processes on the machine; the GPUs of a node unless set.
    pub processes: Option<u64>,
    /// The machine's RAM, to check against.
    pub capacity: Option<Bytes>,
}

impl HostOptions {
    /// PyTorch's `DataLoader` defaults; weights as the implementation gets them
    /// (nanochat and the candle engine train from their own initialisation).
    pub fn for_run(spec: &RunSpec) -> HostOptions {
        let from_scratch = spec.train.engine == Engine::Candle
            || spec.train.implementation == Implementation::Nanochat;
        HostOptions {
            workers: 0,
            prefetch: 2,
            pin_memory: false,
            load: if from_scratch { Load::Init } else { Load::Mmap },
            reader: Reader::None,
            row_group_bytes: None,
            samples: None,
            processes: None,
            capacity: None,
        }
    }
}

/// Host memory per process and per machine.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostReport {
    pub terms: Vec<HostTerm>,
    pub processes: u64,
    /// One process's resident set at its peak (private and shared pages).
    pub per_process_bytes: u64,
    /// All processes at the machine's peak, shared pages once.
    pub per_machine_bytes: u64,
    /// The phase of the machine's peak: "load" or "train".
    pub peak_phase: &'static str,
    pub capacity_bytes: Option<u64>,
    /// Where the capacity came from (a flag, a config key, the machine itself).
    pub capacity_source: Option<String>,
    pub fits: Option<bool>,
}

impl HostReport {
    pub fn headroom_bytes(&self) -> Option<i64> {
        self.capacity_bytes
            .map(|c| c as i64 - self.per_machine_bytes as i64)
    }
}

/// The model's host bytes before it moves to the GPU: (private, shared).
fn load_bytes(spec: &RunSpec, load: Load) -> (u64, u64) {
    let params = crate::params::count(&spec.model);
    let dtype = spec.train.precision.param_bytes();
    match load {
        Load::Init => (params.saturating_mul(4).saturating_add(LOAD_OVERHEAD), 0),
        // The checkpoint is taken to be in the dtype the run keeps its parameters in.
        Load::Mmap => (LOAD_OVERHEAD, params.saturating_mul(dtype)),
        Load::Copy => (params.saturating_mul(dtype).saturating_mul(2), 0),
    }
}

/// One batch as the loader hands it over: `BATCH_TENSORS` int64 tensors of micro × seq.
fn batch_bytes(spec: &RunSpec) -> u64 {
    spec.train
        .tokens_per_micro_batch()
        .saturating_mul(8 * BATCH_TENSORS)
}

/// Bytes one reading process holds in the Parquet reader.
fn reader_bytes(spec: &RunSpec, o: &HostOptions) -> u64 {
    let row = spec.train.seq_len.saturating_mul(TEXT_BYTES_PER_TOKEN);
    let rows = |cap: u64| o.samples.map_or(cap, |s| s.min(cap));
    match o.reader {
        Reader::None => 0,
        Reader::RowGroup => o
            .row_group_bytes
            .unwrap_or_else(|| rows(PYARROW_ROW_GROUP_ROWS).saturating_mul(row)),
        Reader::Whole => rows(u64::MAX).saturating_mul(row),
        // prompt and response: two columns, a page of each, compressed and not.
        Reader::Pages => 2 * 2 * PARQUET_PAGE,
    }
}

fn term(name: &'static str, bytes: u64, phase: Phase, basis: Basis) -> HostTerm {
    HostTerm {
        name,
        bytes,
        shared: false,
        phase,
        basis,
    }
}

/// The terms of one training process.
pub fn terms(spec: &RunSpec, report_host_bytes: u64, o: &HostOptions) -> Vec<HostTerm> {
    use Basis::*;
    use Phase::{Both, Train};
    let mut t = Vec::new();
    if spec.train.engine == Engine::Torch {
        t.push(term(
            "runtime (Python, torch)",
            RUNTIME_PRIVATE,
            Both,
            Measured,
        ));
        t.push(HostTerm {
            shared: true,
            ..term("runtime libraries", RUNTIME_SHARED, Both, Measured)
        });
    }
    if matches!(spec.hardware.device, Device::Gpu(_)) {
        t.push(term("CUDA host side (upper bound)", CUDA_HOST, Both, Cited));
    }
    let (private, shared) = load_bytes(spec, o.load);
    let basis = if o.load == Load::Copy {
        Modelled
    } else {
        Measured
    };
    t.push(term("model before .to(cuda)", private, Phase::Load, basis));
    if shared > 0 {
        t.push(HostTerm {
            shared: true,
            ..term("checkpoint pages (mmap)", shared, Phase::Load, Measured)
        });
    }
    let tokenizer = spec.model.vocab_size.saturating_mul(TOKENIZER_PER_ENTRY);
    t.push(term("tokenizer", tokenizer, Both, Measured));
    let readers = o.workers.max(1);
    let reader = reader_bytes(spec, o).saturating_mul(readers);
    if reader > 0 {
        t.push(term("Parquet reader", reader, Train, Modelled));
    }
    if o.workers > 0 {
        let private = WORKER_PRIVATE.saturating_mul(o.workers);
        t.push(term("data-loader workers", private, Train, Measured));
        let prefetched = batch_bytes(spec).saturating_mul(o.workers * o.prefetch.max(1));
        t.push(term("prefetched batches", prefetched, Train, Modelled));
    }
    if o.pin_memory && spec.hardware.device.is_cuda() {
        let in_flight = if o.workers > 0 {
            o.workers * o.prefetch.max(1)
        } else {
            1
        };
        let block = batch_bytes(spec)
            .div_ceil(BATCH_TENSORS)
            .next_power_of_two();
        let pinned = block.saturating_mul(BATCH_TENSORS * in_flight);
        t.push(term("pinned batches", pinned, Train, Modelled));
    }
    // The report's host bytes are the offloaded activations and DeepSpeed's offloaded
    // state; the state is listed buffer by buffer.
    let state = crate::torch::host_buffers(spec);
    let state_bytes = state
        .iter()
        .map(|b| b.bytes)
        .fold(0u64, u64::saturating_add);
    let activations = report_host_bytes.saturating_sub(state_bytes);
    if activations > 0 {
        t.push(term("offloaded activations", activations, Train, Modelled));
    }
    for b in state {
        t.push(term(b.name, b.bytes, Train, Modelled));
    }
    t
}

/// Private and shared bytes held in `phase` (terms held throughout count in both).
fn held(terms: &[HostTerm], phase: Phase, shared: bool) -> u64 {
    terms
        .iter()
        .filter(|t| t.shared == shared && (t.phase == phase || t.phase == Phase::Both))
        .map(|t| t.bytes)
        .fold(0u64, u64::saturating_add)
}

/// Host memory of the run; `report_host_bytes` is what the estimate keeps in host memory
/// (offloaded activations and DeepSpeed's offloaded state, `Report::host_bytes`).
pub fn host_memory(spec: &RunSpec, report_host_bytes: u64, o: &HostOptions) -> HostReport {
    let terms = terms(spec, report_host_bytes, o);
    let processes = o
        .processes
        .unwrap_or(spec.hardware.gpus_per_node)
        .clamp(1, spec.hardware.gpus.max(1));
    let phase = |p: Phase| {
        let private = held(&terms, p, false);
        let shared = held(&terms, p, true);
        (
            private.saturating_add(shared),
            private.saturating_mul(processes).saturating_add(shared),
        )
    };
    let (load_process, load_machine) = phase(Phase::Load);
    let (train_process, train_machine) = phase(Phase::Train);
    let (per_machine_bytes, peak_phase) = if load_machine > train_machine {
        (load_machine, "load")
    } else {
        (train_machine, "train")
    };
    let capacity_bytes = o.capacity.map(|c| c.0);
    HostReport {
        processes,
        per_process_bytes: load_process.max(train_process),
        per_machine_bytes,
        peak_phase,
        capacity_bytes,
        capacity_source: None,
        fits: capacity_bytes.map(|c| per_machine_bytes <= c),
        terms,
    }
}

/// `--host-ram` / `hardware.host_ram_gib`: a positive number of GiB.
pub fn host_ram(key: &str, gib: f64) -> Result<Bytes> {
    if gib.is_finite() && gib > 0.0 && gib < 1.0e6 {
        Ok(Bytes((gib * crate::units::GIB as f64) as u64))
    } else {
        Err(PlanError::invalid(
            key,
            gib,
            "a positive number of GiB, e.g. 12 or 31.3",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Context, Presets, RawConfig};

    const MEASURED: &str = include_str!("../../tests/data/host_rss.json");

    fn spec(toml: &str) -> RunSpec {
        let presets = Presets::builtin().expect("presets");
        RawConfig::from_toml(toml)
            .expect("parses")
            .resolve(&presets, &Context::default())
            .expect("resolves")
    }

    fn seed_001() -> RunSpec {
        spec(include_str!(
            "../../presets/examples/chatlm-pretrain-3x3080.toml"
        ))
    }

    fn case(name: &str) -> serde_json::Value {
        let v: serde_json::Value = serde_json::from_str(MEASURED).expect("valid JSON");
        v["cases"][name].clone()
    }

    fn within(what: &str, model: u64, measured: u64, tolerance: f64) {
        let err = (model as f64 - measured as f64).abs() / measured as f64;
        assert!(
            err <= tolerance,
            "{what}: modelled {model}, measured {measured} ({:.1} % off)",
            err * 100.0
        );
    }

    /// The constants are the measurement (tools/measure_host.py, torch 2.15 on CPU).
    #[test]
    fn constants_are_the_measured_figures() {
        let at = |c: &str, k: &str| case(c)["after"][k].as_u64().unwrap();
        let grew = |c: &str, k: &str| at(c, k) - case(c)["before"][k].as_u64().unwrap();
        let rows: [(&str, u64, u64, f64); 5] = [
            (
                "runtime private",
                RUNTIME_PRIVATE,
                case("import_transformers")["RssAnon"].as_u64().unwrap(),
                0.05,
            ),
            (
                "runtime shared",
                RUNTIME_SHARED,
                case("import_transformers")["RssFile"].as_u64().unwrap(),
                0.05,
            ),
            (
                "mmap load, t5",
                LOAD_OVERHEAD,
                grew("load_t5_float32", "RssAnon"),
                0.05,
            ),
            (
                "mmap load, llama",
                LOAD_OVERHEAD,
                grew("load_llama_float32", "RssAnon"),
                0.05,
            ),
            (
                "worker",
                WORKER_PRIVATE,
                case("worker")["workers_uss"][0].as_u64().unwrap(),
                0.1,
            ),
        ];
        for (what, model, measured, tol) in rows {
            within(what, model, measured, tol);
        }
    }

    /// Tokenizers of three vocabulary sizes against `TOKENIZER_PER_ENTRY` × vocabulary.
    #[test]
    fn tokenizer_bytes_follow_the_vocabulary() {
        for (vocab, tol) in [(29_298u64, 0.05), (49_152, 0.15), (151_643, 0.05)] {
            let measured = case(&format!("tokenizer_{vocab}"))["rss_delta"]
                .as_u64()
                .unwrap();
            within(
                &format!("tokenizer {vocab}"),
                vocab * TOKENIZER_PER_ENTRY,
                measured,
                tol,
            );
        }
    }

    /// Building the model from its config, and a converted (bf16) load, against the
    /// measured growth of the process.
    #[test]
    fn model_load_terms_match_the_measured_loads() {
        let t5 = seed_001();
        let grew = |c: &str| case(c)["rss_delta"].as_u64().unwrap();
        let (init, _) = load_bytes(&t5, Load::Init);
        within("init t5", init, grew("init_t5"), 0.1);
        // The mmap'd fp32 load: the file's pages are shared, the private part is small.
        let (private, shared) = load_bytes(&t5, Load::Mmap);
        assert_eq!(private, LOAD_OVERHEAD);
        let file = serde_json::from_str::<serde_json::Value>(MEASURED).unwrap()
            ["safetensors_bytes"]["t5"]
            .as_u64()
            .unwrap();
        within("t5 checkpoint pages", shared, file, 0.01);
    }

    /// Seed 001: three processes on one machine, no workers, no pinning, row groups.
    #[test]
    fn seed_001_per_process_and_per_machine() {
        let s = seed_001();
        let mut o = HostOptions::for_run(&s);
        o.reader = Reader::RowGroup;
        o.samples = Some(10_000_000);
        o.capacity = Some(Bytes(12 << 30));
        let h = host_memory(&s, 0, &o);
        assert_eq!(h.processes, 3);
        let names: Vec<&str> = h.terms.iter().map(|t| t.name).collect();
        assert!(names.contains(&"Parquet reader"), "{names:?}");
        assert!(!names.contains(&"data-loader workers"), "{names:?}");
        assert!(!names.contains(&"pinned batches"), "{names:?}");
        // A full pyarrow row group: 2^20 rows × 192 tokens × 4 B.
        let reader = h.terms.iter().find(|t| t.name == "Parquet reader").unwrap();
        assert_eq!(reader.bytes, (1 << 20) * 192 * 4);
        // The machine holds the shared pages once, the private ones three times.
        let private: u64 = h
            .terms
            .iter()
            .filter(|t| !t.shared && t.phase != Phase::Load)
            .map(|t| t.bytes)
            .sum();
        let shared: u64 = h
            .terms
            .iter()
            .filter(|t| t.shared && t.phase != Phase::Load)
            .map(|t| t.bytes)
            .sum();
        if h.peak_phase == "train" {
            assert_eq!(h.per_machine_bytes, 3 * private + shared);
        }
        assert!(h.per_machine_bytes < 3 * h.per_process_bytes);
        assert_eq!(h.fits, Some(h.per_machine_bytes <= 12 << 30));
    }

    /// (case, options, the term it adds, its bytes) for seed 001's run.
    fn option_rows(s: &RunSpec) -> Vec<(&'static str, HostOptions, &'static str, u64)> {
        let base = HostOptions::for_run(s);
        let with = |f: fn(&mut HostOptions)| {
            let mut o = base.clone();
            f(&mut o);
            o
        };
        let batch = 32 * 192 * 8 * 3;
        let params = crate::params::count(&s.model);
        let pinned = 3 * (32u64 * 192 * 8).next_power_of_two();
        vec![
            (
                "workers",
                with(|o| o.workers = 2),
                "data-loader workers",
                2 * WORKER_PRIVATE,
            ),
            (
                "prefetch",
                with(|o| (o.workers, o.prefetch) = (2, 4)),
                "prefetched batches",
                8 * batch,
            ),
            (
                "pin",
                with(|o| o.pin_memory = true),
                "pinned batches",
                pinned,
            ),
            (
                "pages",
                with(|o| o.reader = Reader::Pages),
                "Parquet reader",
                4 * MIB,
            ),
            (
                "pages, 3 workers",
                with(|o| (o.reader, o.workers) = (Reader::Pages, 3)),
                "Parquet reader",
                12 * MIB,
            ),
            (
                "row group given",
                with(|o| (o.reader, o.row_group_bytes) = (Reader::RowGroup, Some(64 * MIB))),
                "Parquet reader",
                64 * MIB,
            ),
            (
                "whole",
                with(|o| (o.reader, o.samples) = (Reader::Whole, Some(1000))),
                "Parquet reader",
                1000 * 192 * 4,
            ),
            (
                "copy",
                with(|o| o.load = Load::Copy),
                "model before .to(cuda)",
                2 * 4 * params,
            ),
        ]
    }

    /// Each option adds its term and never lowers the peak (table-driven).
    #[test]
    fn options_add_their_terms() {
        let s = seed_001();
        let base = HostOptions::for_run(&s);
        let without = host_memory(&s, 0, &base);
        for (what, o, name, bytes) in option_rows(&s) {
            let h = host_memory(&s, 0, &o);
            let t = h.terms.iter().find(|t| t.name == name);
            assert_eq!(t.map(|t| t.bytes), Some(bytes), "{what}");
            assert!(h.per_process_bytes >= without.per_process_bytes, "{what}");
        }
        let offloaded = host_memory(&s, 5 << 30, &base);
        let t = offloaded
            .terms
            .iter()
            .find(|t| t.name == "offloaded activations");
        assert_eq!(t.map(|t| t.bytes), Some(5 << 30));
        assert_eq!(offloaded.peak_phase, "train");
    }

    /// DeepSpeed's offload: one term per host buffer, as ZeRO-2 and ZeRO-3 keep them (sizes
    /// from `deepspeed/runtime/zero/stage_1_and_2.py` and `stage3.py`, DeepSpeed 0.19.6),
    /// pinned ones rounded to a power of two; the report's host bytes are those terms plus
    /// the offloaded activations.
    #[test]
    fn offloaded_state_is_a_term_per_buffer() {
        let toml = |sharding: &str, params: &str| {
            format!("[model]\npreset = \"llama-3.2-1b\"\n[train]\nprecision = \"bf16-mixed\"\ngrad_accum = 2\n[hardware]\ngpu = \"rtx4090-24gb\"\ngpus = 2\nsharding = \"{sharding}\"\noffload_optimizer = \"cpu\"\noffload_params = \"{params}\"\n")
        };
        let pin = |b: u64| b.next_power_of_two();
        let zero2 = spec(&toml("zero2", "none"));
        let p = crate::params::count(&zero2.model);
        let half = p.div_ceil(2);
        let o = HostOptions::for_run(&zero2);
        let h = host_memory(&zero2, crate::torch::offloaded_state_bytes(&zero2), &o);
        let bytes = |h: &HostReport, n: &str| h.terms.iter().find(|t| t.name == n).map(|t| t.bytes);
        assert_eq!(
            bytes(&h, "offload: fp32 master partition"),
            Some(pin(4 * half))
        );
        assert_eq!(
            bytes(&h, "offload: Adam moments (DeepSpeedCPUAdam, fp32)"),
            Some(8 * half)
        );
        assert_eq!(
            bytes(&h, "offload: fp32 gradient partition"),
            Some(pin(4 * half))
        );
        assert_eq!(
            bytes(&h, "offload: 16-bit parameter buffer"),
            Some(pin(2 * half))
        );
        assert!(bytes(&h, "offload: accumulated gradients").is_some());
        assert!(bytes(&h, "offloaded activations").is_none());
        let zero3 = spec(&toml("zero3", "cpu"));
        let h3 = host_memory(
            &zero3,
            crate::torch::offloaded_state_bytes(&zero3) + (1 << 30),
            &o,
        );
        assert_eq!(
            bytes(&h3, "offload: 16-bit parameter partitions"),
            Some(pin(2 * half))
        );
        assert_eq!(bytes(&h3, "offload: fp32 master partition"), Some(4 * half));
        assert_eq!(bytes(&h3, "offloaded activations"), Some(1 << 30));
        assert!(bytes(&h3, "offload: 16-bit parameter buffer").is_none());
        // At least the 16 B a parameter of the state moved, over the two ranks.
        let state: u64 = crate::torch::host_buffers(&zero2)
            .iter()
            .map(|b| b.bytes)
            .sum();
        assert!(state >= 16 * half, "{state}");
    }

    #[test]
    fn the_candle_engine_and_the_cpu_have_no_python_or_cuda() {
        let cpu = spec("[model]\npreset = \"smollm2-135m\"\n[hardware]\ngpu = \"cpu\"\n");
        let names: Vec<&str> = terms(&cpu, 0, &HostOptions::for_run(&cpu))
            .iter()
            .map(|t| t.name)
            .collect();
        assert!(!names.iter().any(|n| n.starts_with("CUDA")), "{names:?}");
        let candle = spec("[model]\npreset = \"smollm2-135m\"\n[train]\nengine = \"candle\"\n[hardware]\ngpu = \"rtx4090-24gb\"\n");
        let o = HostOptions::for_run(&candle);
        assert_eq!(o.load, Load::Init);
        let names: Vec<&str> = terms(&candle, 0, &o).iter().map(|t| t.name).collect();
        assert!(!names.iter().any(|n| n.starts_with("runtime")), "{names:?}");
    }

    #[test]
    fn host_ram_is_validated() {
        assert_eq!(host_ram("--host-ram", 12.0).unwrap(), Bytes(12 << 30));
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let e = host_ram("hardware.host_ram_gib", bad)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("hardware.host_ram_gib = "), "{e}");
            assert!(e.contains("positive number of GiB"), "{e}");
        }
    }
}
