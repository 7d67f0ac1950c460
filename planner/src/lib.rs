//! vramplan's memory model: an inventory of the tensors of one training step, played as a
//! timeline, and the searches built on it (`fit`, `compare`).
//!
//! No printing and no file I/O: callers hand in strings and get data back.

mod allocator;
mod candle_engine;
mod compare;
mod config;
mod diagnose;
mod error;
mod fit;
mod hf;
mod host;
mod levers;
mod lora;
mod lora_fit;
mod oom;
mod params;
mod presets;
mod report;
mod schedule;
mod spec;
mod timeline;
mod torch;
mod units;

pub use candle_engine::{HEAD_GRAD_ROWS, HEAD_GRAD_VOCAB};
pub use compare::{compare, fp32_logits, gib2, Comparison, ComponentDiff, ConfigDiff};
pub use config::{
    check_run, defaults, Context, PresetSource, RawConfig, RawHardware, RawModel, RawTrain,
    MAX_COUNT, MAX_DIM, MAX_GPUS, MAX_LAYERS,
};
pub use diagnose::{
    assess, best_fix, diagnose, diagnose_log, generic_fixes, implausible, logits_shape,
    plan_checks, planned_fixes, Assessment, Confidence, DiagnosedLog, Diagnosis, Edit, Evidence,
    Explanation, Fact, Fix, FixKind, FixPlan, Hint, HostChange, Implausible, LogitsShape,
    PlanCheck, Predicted,
};
pub use error::{quote, PlanError, Result, QUOTE_CHARS};
pub use fit::{
    fit, fit_exhaustive, fit_first, loss_label, try_fit, Attempt, Candidate, FitRequest, FitResult,
    GlobalBatch, Miss,
};
pub use hf::hf_config;
pub use host::{
    host_memory, host_ram, Basis, HostOptions, HostReport, HostTerm, Load, Phase, Reader,
};
pub use levers::{
    alternatives, apply as apply_lever, fit_or_ladder, raw_with, shorter, Alternative, Ladder,
    Lever, Shorter, MAX_LADDER_GPUS, MIN_SHORTER_SEQ,
};
pub use lora::{linear_modules, LoraSpec, RawLora, Targets};
pub use lora_fit::{adapters, with_adapters, DEFAULT_RANK};
pub use oom::{
    classify, match_tensor, parse_amount, parse_log, Cause, HostKill, HostSignal, Match, OomReport,
    PrintedShape, ProcessUse, Source,
};
pub use params::{count as param_count, parameters, Param, Role};
pub use presets::{Presets, GPUS_TOML, MODEL_FILES};
pub use report::{estimate, model_flops_per_token, play, Report};
pub use schedule::{
    epochs, steps_per_epoch, training_time, DataSize, TrainingTime, Utilization,
    DEFAULT_UTILIZATION,
};
pub use spec::*;
pub use timeline::{
    ByComponent, Component, Event, Extent, Layout, Snapshot, Step, Tensor, TensorId, Timeline,
};
pub use torch::{host_buffers, offload_traffic, offloaded_state_bytes, HostBuffer};
pub use units::{thousands, Bytes, DType, GIB, KIB, MIB};
