//! The training loop, in pieces that read top to bottom (burn's style): [`train`] loads
//! the data and the model, then each step is [`Run::step`] (micro-steps and the update),
//! measured by a [`Meter`], validated by a [`Validator`], logged by [`Progress`] and saved
//! by a [`Checkpointer`]; the [`Summary`] compares the measured peak with the prediction.

use crate::engine::checkpoint::{self, Keep, Meta};
use crate::engine::data::{self, Corpus};
use crate::engine::hf;
use crate::engine::lora;
use crate::engine::model::Model;
use crate::engine::optim::{self, AdamW};
use crate::engine::probe::{NoProbe, Probe, Recorder};
use crate::engine::rng::Rng;
use crate::engine::rundir::{self, Lock};
use crate::engine::sft::{self, Formatter, TrainOn};
use crate::engine::{
    alloc, bad, check_vocab, device, device_name, load_tokenizer, matmul_rate, on_step_pool, step,
    step_opts, warm_up,
};
use crate::Error;
use anyhow::Result;
use candle_core::{DType, Device};
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use vramplan_planner::RunSpec;

pub struct Opts {
    pub steps: u64,
    pub lr: f64,
    pub seed: u64,
    pub eval_every: u64,
    pub save_every: u64,
    pub log_every: u64,
    /// The newest checkpoints to keep, and the best by validation loss.
    pub keep: Keep,
    pub out: PathBuf,
    pub resume: bool,
    /// A fresh run in a folder holding another run moves that run aside.
    pub force: bool,
    /// Stop after this step (as an interruption would), saving a checkpoint.
    pub stop_at: Option<u64>,
    pub data: Option<PathBuf>,
    /// A Hugging Face tokenizer.json (default: bytes); its folder's tokenizer_config.json
    /// gives SFT data its chat template and end token.
    pub tokenizer: Option<PathBuf>,
    /// What prompt/response data trains on.
    pub train_on: TrainOn,
    /// The Hugging Face config.json the run started from (saved with each checkpoint).
    pub hf_config: Option<String>,
    /// A Hugging Face checkpoint folder whose weights a fresh run starts from.
    pub init: Option<PathBuf>,
    /// The plan's TOML, saved with every checkpoint.
    pub plan_toml: String,
    /// The planner's predicted peak for one step, bytes.
    pub predicted_peak: u64,
    /// Where to train, and the forward's dtype there (f32, or bf16 over f32 master weights).
    pub device: Device,
    pub compute: DType,
    /// Rated dense bf16 FLOP/s of the plan's GPU, for MFU on CUDA.
    pub rated_flops: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub steps: u64,
    pub final_loss: f64,
    pub val_loss: f64,
    pub val_bits_per_byte: f64,
    pub tokens_per_second: f64,
    /// Model FLOPs (no recomputation) per second over `matmul_flops_per_second`.
    pub mfu: f64,
    /// What MFU divides by: the GPU's rated dense bf16 rate, or on the CPU this machine's
    /// measured matmul rate in the compute dtype on the engine's threads.
    pub matmul_flops_per_second: f64,
    /// `cpu` or `cuda:N`, and the forward's dtype (`f32`, `bf16`).
    pub device: String,
    pub compute_dtype: String,
    pub predicted_peak_bytes: u64,
    pub measured_peak_bytes: u64,
    /// What `measured_peak_bytes` counts.
    pub measured_by: String,
    /// The same for tensors alone: on the CPU without gemm's packing scratch, which a
    /// GPU's matmul does not allocate; on CUDA equal to `measured_peak_bytes`.
    pub measured_tensor_peak_bytes: u64,
    /// (predicted − measured) / measured, against `measured_peak_bytes` in f32 (the f32
    /// inventory is the CPU's whole heap) and against `measured_tensor_peak_bytes` with
    /// 16-bit compute (that inventory is the tensors', as on a GPU). None (null) when no
    /// step was measured: the first step, which creates the optimizer state, is not
    /// counted, so a one-step run has nothing to compare against.
    pub peak_error: Option<f64>,
    /// The whole process's heap high-water mark over the run: the data as loaded, the
    /// model and every step (streamed Parquet data keeps it far below the file's size).
    pub process_peak_bytes: u64,
    pub params: u64,
    pub data: String,
    pub entropy_nats_per_byte: Option<f64>,
    pub entropy_bits_per_byte: Option<f64>,
    /// Validation loss minus the corpus's entropy rate (the lowest achievable loss), nats.
    pub excess_over_entropy_nats: Option<f64>,
    pub seconds: f64,
}

/// One line of `OUT/metrics.jsonl`.
#[derive(Serialize, Default)]
struct MetricLine {
    step: u64,
    loss: f64,
    lr: f64,
    grad_norm: f64,
    tokens_per_second: f64,
    peak_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    val_loss: Option<f64>,
    /// The step's time and tokens, for the run's rate.
    #[serde(skip)]
    seconds: f64,
    #[serde(skip)]
    tokens: u64,
}

/// Whether `VRAMPLAN_MEM_DEBUG` asks for stage-by-stage memory of the first counted step.
fn mem_debug() -> bool {
    std::env::var_os("VRAMPLAN_MEM_DEBUG").is_some()
}

/// Whether `VRAMPLAN_MEM_DEBUG=census` also asks which tensors each stage's peak holds.
fn census_debug() -> bool {
    std::env::var_os("VRAMPLAN_MEM_DEBUG").is_some_and(|v| v == "census")
}

/// `VRAMPLAN_MEM_DEBUG`'s lines: each stage's live bytes and high-water mark above the
/// baseline, and with the census the largest sizes live at that mark.
fn print_marks(r: &Recorder, baseline: u64) {
    for m in r.take() {
        let (live, peak) = (m.live - baseline, m.peak - baseline);
        eprintln!("mem: {:>8}: live {live} peak {peak}", m.label);
        for (bytes, n) in m.census.iter().take(16) {
            eprintln!("mem:           {n:>4} x {bytes:>10} B");
        }
    }
}

/// Trains `spec` and writes `OUT/metrics.jsonl`, checkpoints and `OUT/summary.json`.
/// Returns `None` when a resumed run had no step left to do (its summary is kept).
pub fn train(spec: &RunSpec, o: &Opts) -> Result<Option<Summary>> {
    if o.device.is_cpu() {
        on_step_pool(|| train_here(spec, o))?
    } else {
        train_here(spec, o)
    }
}

fn train_here(spec: &RunSpec, o: &Opts) -> Result<Option<Summary>> {
    let hf = tokenizer(spec, o)?;
    let fmt = Formatter::load(o.tokenizer.as_deref(), o.train_on)?
        .for_model(spec, o.hf_config.as_deref());
    let corpus = corpus(spec, o.data.as_deref(), &hf, &fmt)?;
    let _lock = prepare_out(o)?;
    let process_peak = alloc::peak();
    let before_warm = alloc::current();
    if o.device.is_cpu() {
        warm_up(o.compute)?;
    }
    let speed = Speed::new(spec, o)?;
    let mut meter = Meter::new(&o.device, process_peak)?;
    if mem_debug() {
        eprintln!(
            "mem: before warm-up {before_warm}, baseline {}",
            meter.baseline
        );
    }
    alloc::census(census_debug());
    let mut model = Model::new(
        &spec.model,
        DType::F32,
        o.compute,
        &o.device,
        &mut Rng::new(o.seed),
    )?;
    model.numerics = hf::numerics_of(o.hf_config.as_deref());
    if let Some(dir) = &o.init {
        // A resumed run's checkpoint replaces these weights (under LoRA, the adapters).
        hf::load_weights(&model, dir)?;
    }
    if let Some(l) = &spec.lora {
        lora::apply(
            &mut model,
            lora::Adapters::of(l),
            &mut Rng::new(o.seed.wrapping_add(2)),
        )?;
    }
    let mut run = Run::new(spec, o, model, corpus);
    let start = if o.resume { run.resume(o)? } else { 0 };
    let end = o.stop_at.unwrap_or(o.steps).min(o.steps);
    if start >= end {
        return Ok(None);
    }
    run.announce(o);
    let mut progress = Progress::open(o, &run.corpus, speed, start)?;
    let checkpointer = Checkpointer { o, end };
    let validator = Validator {
        every: o.eval_every,
        total: o.steps,
    };
    for s in start..end {
        let debug = (mem_debug() && s == start + 1).then(|| Recorder::new(false));
        let probe: &dyn Probe = debug.as_ref().map_or(&NoProbe, |r| r as &dyn Probe);
        let mut line = run.step(s, &mut meter, &checkpointer, probe, s > start)?;
        if let Some(r) = &debug {
            if let Some(peak) = meter.include(r.top()) {
                line.peak_bytes = peak;
            }
            print_marks(r, meter.baseline);
        }
        let saving = checkpointer.due(line.step);
        // A checkpoint ranked by validation loss needs one at its step.
        if validator.due(line.step) || (saving && o.keep.best > 0) {
            line.val_loss = Some(validate(&run.model, &run.corpus, spec)?);
        }
        progress.record(&line, s == start)?;
        if saving {
            checkpointer.save(&run, &line, o.keep)?;
        }
    }
    let summary = progress.summary(spec, o, &run, &meter, end)?;
    crate::write_atomic(
        &o.out.join(rundir::SUMMARY),
        &serde_json::to_string_pretty(&summary)?,
    )?;
    Ok(Some(summary))
}

/// The tokenizer the run encodes with: `--tokenizer`'s, or bytes (which needs a
/// vocabulary of 256).
fn tokenizer(spec: &RunSpec, o: &Opts) -> crate::engine::Result<Option<tokenizers::Tokenizer>> {
    match &o.tokenizer {
        Some(p) => Ok(Some(load_tokenizer(p, spec)?)),
        None => {
            check_vocab(spec)?;
            Ok(None)
        }
    }
}

/// The training data (`data`, else the built-in corpus), encoded by `hf` (or as bytes),
/// checked to hold one sequence.
pub(crate) fn corpus<'a>(
    spec: &RunSpec,
    data: Option<&Path>,
    hf: &'a Option<tokenizers::Tokenizer>,
    fmt: &'a Formatter,
) -> crate::engine::Result<Corpus<'a>> {
    let t = spec.train.seq_len as usize;
    let tok = match hf {
        Some(h) => data::Tokens::Hf(h),
        None => data::Tokens::Bytes,
    };
    let corpus = match data {
        Some(p) => data::load(p, t + 1, tok, fmt)?,
        None => data::builtin(&tok)?,
    };
    if fmt.is_seq2seq() && corpus.val_examples.is_empty() {
        let why = if fmt.train_on == sft::TrainOn::All {
            "--train-on all: a T5 model trains on prompt/response examples (the prompt to the encoder, the response as the decoder's labels); use --train-on response"
        } else {
            "text data: a T5 model trains on prompt/response examples (JSONL or Parquet with string fields \"prompt\" and \"response\"), the prompt to the encoder, the response as the decoder's labels"
        };
        return Err(bad(&corpus.name, why));
    }
    if matches!(&corpus.train, data::Train::Tokens(v) if v.len() < t + 2) {
        return Err(bad(
            &corpus.name,
            "the training split is shorter than one sequence",
        ));
    }
    Ok(corpus)
}

/// Locks `--out` for this run, makes sure a fresh run does not mix with another run's
/// files, and copies the tokenizer into it, so a checkpoint samples on its own.
fn prepare_out(o: &Opts) -> Result<Lock> {
    let lock = Lock::take(&o.out)?;
    if !o.resume {
        rundir::claim(&o.out, o.force)?;
    }
    let mut copies: Vec<(PathBuf, PathBuf)> = Vec::new();
    if let Some(p) = &o.tokenizer {
        copies.push((p.clone(), o.out.join(checkpoint::TOKENIZER)));
    }
    // The checkpoint's other tokenizer files, for `export`.
    for f in &hf::TOKENIZER_FILES[1..] {
        if let Some(src) = o.init.as_ref().map(|d| d.join(f)).filter(|p| p.is_file()) {
            copies.push((src, o.out.join(f)));
        }
    }
    // The chat template SFT data was formatted with: the config beside the tokenizer.
    let config = o.tokenizer.as_ref().map(|p| p.with_file_name(sft::CONFIG));
    if let Some(c) = config.filter(|c| c.is_file()) {
        copies.retain(|(_, dst)| !dst.ends_with(sft::CONFIG));
        copies.push((c, o.out.join(sft::CONFIG)));
    }
    for (src, dst) in copies {
        if std::fs::canonicalize(&src).ok() != std::fs::canonicalize(&dst).ok() {
            let bytes = std::fs::read(&src)
                .map_err(|e| bad(&src.display().to_string(), format!("cannot read: {e}")))?;
            crate::fsutil::write_atomic_with(&dst, |w| w.write_all(&bytes))?;
        }
    }
    Ok(lock)
}

/// What MFU divides by, and the model's FLOPs per token.
#[derive(Clone, Copy)]
struct Speed {
    matmul_flops: f64,
    flops_per_token: f64,
}

impl Speed {
    fn new(spec: &RunSpec, o: &Opts) -> Result<Speed> {
        let matmul_flops = match o.rated_flops {
            Some(f) if !o.device.is_cpu() => f,
            _ => matmul_rate(&o.device, o.compute)?,
        };
        Ok(Speed {
            matmul_flops,
            flops_per_token: vramplan_planner::model_flops_per_token(spec),
        })
    }

    fn mfu(&self, tokens_per_second: f64) -> f64 {
        self.flops_per_token * tokens_per_second / self.matmul_flops
    }
}

/// The memory of each step above the baseline taken before the model was built, and its
/// maximum over the counted steps (all but a process's first, the warm-up).
struct Meter {
    device: device::Meter,
    baseline: u64,
    tensors_baseline: u64,
    measured: u64,
    measured_tensors: u64,
    process_peak: u64,
}

impl Meter {
    fn new(d: &Device, process_peak: u64) -> Result<Meter> {
        let device = device::Meter::new(d)?;
        Ok(Meter {
            baseline: device.current()?,
            tensors_baseline: device.tensors_current()?,
            device,
            measured: 0,
            measured_tensors: 0,
            process_peak,
        })
    }

    /// Starts a step's high-water mark.
    fn begin(&mut self) -> Result<()> {
        self.process_peak = self.process_peak.max(alloc::peak());
        self.device.reset_peak()
    }

    /// The step's peak above the baseline, kept in the measurement when `counted`.
    fn end(&mut self, counted: bool) -> Result<u64> {
        let peak = self.device.peak()?.saturating_sub(self.baseline);
        if counted {
            self.measured = self.measured.max(peak);
            let tensors = self
                .device
                .tensors_peak()?
                .saturating_sub(self.tensors_baseline);
            self.measured_tensors = self.measured_tensors.max(tensors);
        }
        Ok(peak)
    }

    fn process_peak(&self) -> u64 {
        self.process_peak.max(alloc::peak())
    }

    /// Takes a recorded step's highest CPU heap and tensor marks into the measurement
    /// (each stage mark restarts the allocator's high-water mark, so what `end` read was
    /// the last stage's) and returns the step's peak above the baseline. On a GPU the
    /// device's own high-water mark is untouched by the marks and stands: `None`.
    fn include(&mut self, (heap, tensors): (u64, u64)) -> Option<u64> {
        if !matches!(self.device, device::Meter::Cpu) {
            return None;
        }
        self.process_peak = self.process_peak.max(heap);
        let peak = heap.saturating_sub(self.baseline);
        self.measured = self.measured.max(peak);
        self.measured_tensors = self
            .measured_tensors
            .max(tensors.saturating_sub(self.tensors_baseline));
        Some(peak)
    }
}

/// The model, its optimizer and where the data stands: what a checkpoint saves.
struct Run<'a, 'c> {
    spec: &'a RunSpec,
    model: Model,
    opt: AdamW,
    data_rng: Rng,
    corpus: Corpus<'c>,
    sopts: step::Opts,
    total_steps: u64,
    lr: f64,
}

impl<'a, 'c> Run<'a, 'c> {
    fn new(spec: &'a RunSpec, o: &Opts, model: Model, corpus: Corpus<'c>) -> Run<'a, 'c> {
        Run {
            spec,
            model,
            opt: AdamW::new(),
            data_rng: Rng::new(o.seed.wrapping_add(1)),
            corpus,
            sopts: step_opts(spec),
            total_steps: o.steps,
            lr: o.lr,
        }
    }

    /// Continues from the newest checkpoint in `--out` written by this run; returns the
    /// steps it had done. A folder whose run stopped before its first checkpoint starts
    /// over.
    fn resume(&mut self, o: &Opts) -> Result<u64> {
        let metrics = o.out.join(rundir::METRICS);
        if checkpoint::list(&o.out).is_empty() && metrics.exists() {
            eprintln!(
                "note: {}: no checkpoint yet; starting from step 0",
                o.out.display()
            );
            return Ok(0);
        }
        let l = checkpoint::latest(&o.out).map_err(|e| bad("--resume", e))?;
        let asked = rundir::Asked {
            plan: &o.plan_toml,
            seed: o.seed,
            lr: o.lr,
            steps: o.steps,
            train_on: o.train_on.name(),
        };
        for note in rundir::check_resume(&l.dir, &l.meta, &asked)? {
            eprintln!("note: resuming {}: {note}", l.dir.display());
        }
        checkpoint::restore(&l, &self.model, Some(&mut self.opt))?;
        self.data_rng = Rng(l.meta.data_rng);
        self.corpus.train.seek(l.meta.data_position)?;
        let start = l.meta.step;
        Progress::truncate(&metrics, start)?;
        if start < o.stop_at.unwrap_or(o.steps).min(o.steps) {
            println!("resumed from {} (step {start})", l.dir.display());
        }
        Ok(start)
    }

    fn announce(&self, o: &Opts) {
        let t = &self.spec.train;
        let params = vramplan_planner::param_count(&self.spec.model);
        println!(
            "training {} ({:.2} M parameters) on {}: {} steps of {} × {} tokens × {} accumulation",
            self.spec.model.name,
            params as f64 / 1e6,
            self.corpus.name,
            o.steps,
            t.micro_batch,
            t.seq_len,
            t.grad_accum
        );
        if let Some(f) = &self.corpus.format {
            println!("prompt/response data: {f}");
        }
    }

    /// Tokens per optimizer step.
    fn tokens(&self) -> u64 {
        self.spec.train.tokens_per_micro_batch() * self.spec.train.grad_accum
    }

    /// The micro-steps' forward and backward: the mean token loss and the summed
    /// gradients. The micro-batches are drawn first, so the loss is normalised by the
    /// targets of the whole step (SFT: its response tokens), not per micro-batch.
    fn micro_steps(&mut self, probe: &dyn Probe) -> Result<(f64, step::Grads)> {
        let (b, t) = (
            self.spec.train.micro_batch as usize,
            self.spec.train.seq_len as usize,
        );
        let micros = (0..self.spec.train.grad_accum)
            .map(|_| self.corpus.train.batch(b, t, &mut self.data_rng))
            .collect::<crate::engine::Result<Vec<_>>>()?;
        Ok(sft::step_grads(&self.model, micros, b, self.sopts, probe)?)
    }

    /// Saves the weights from before step `s`, whose loss is `loss` (not a number), beside
    /// the checkpoints kept, and says so.
    fn diverged(&self, s: u64, loss: f64, checkpointer: &Checkpointer) -> anyhow::Error {
        let keep = checkpointer.o.keep;
        let keep = Keep {
            last: keep.last.max(1) + 1,
            ..keep
        };
        let line = MetricLine {
            step: s,
            loss,
            ..MetricLine::default()
        };
        match checkpointer.save(self, &line, keep) {
            Ok(dir) => Error::Diverged {
                loss,
                step: s + 1,
                saved: dir.display().to_string(),
            }
            .into(),
            Err(e) => e,
        }
    }

    /// Optimizer step `s` (0-based): the micro-steps' forward and backward, then AdamW.
    /// A loss that is not a number stops the run, with the weights before the step saved.
    fn step(
        &mut self,
        s: u64,
        meter: &mut Meter,
        checkpointer: &Checkpointer,
        probe: &dyn Probe,
        counted: bool,
    ) -> Result<MetricLine> {
        let t0 = Instant::now();
        meter.begin()?;
        let (loss, grads) = self.micro_steps(probe)?;
        if !loss.is_finite() {
            drop(grads);
            return Err(self.diverged(s, loss, checkpointer));
        }
        let lr = optim::schedule(s, self.total_steps, self.lr);
        let grad_norm = self.opt.step(&self.model, grads, lr)?;
        probe.mark("opt");
        let peak_bytes = meter.end(counted)?;
        let seconds = t0.elapsed().as_secs_f64();
        Ok(MetricLine {
            step: s + 1,
            loss,
            lr,
            grad_norm,
            tokens_per_second: self.tokens() as f64 / seconds,
            peak_bytes,
            val_loss: None,
            seconds,
            tokens: self.tokens(),
        })
    }
}

/// Validation every `every` steps and at the last (0: only at the end of the run).
struct Validator {
    every: u64,
    total: u64,
}

impl Validator {
    fn due(&self, step_no: u64) -> bool {
        self.every > 0 && (step_no.is_multiple_of(self.every) || step_no == self.total)
    }
}

/// Mean validation loss over up to `VAL_WINDOWS` fixed windows.
pub(crate) fn validate(
    model: &Model,
    corpus: &Corpus,
    spec: &RunSpec,
) -> crate::engine::Result<f64> {
    let t = spec.train.seq_len as usize;
    let b = spec.train.micro_batch as usize;
    if !corpus.val_examples.is_empty() {
        return validate_examples(model, &corpus.val_examples, spec);
    }
    let offs = data::val_windows(&corpus.val, t, data::VAL_WINDOWS);
    if offs.is_empty() {
        return Err(bad(
            &corpus.name,
            "the validation split is shorter than one sequence",
        ));
    }
    let mut total = 0.0;
    let mut count = 0;
    for w in offs.chunks(b.max(1)) {
        let (x, y) = data::windows_batch(&corpus.val, w, t)?;
        total += step::eval_loss(model, &x, &y, w.len(), step_opts(spec).chunk)? * w.len() as f64;
        count += w.len();
    }
    Ok(total / count as f64)
}

/// Mean loss over the response tokens of the held-out SFT examples.
fn validate_examples(
    model: &Model,
    examples: &[crate::engine::sft::Example],
    spec: &RunSpec,
) -> crate::engine::Result<f64> {
    let t = spec.train.seq_len as usize;
    let b = (spec.train.micro_batch as usize).max(1);
    let (mut total, mut count) = (0.0, 0);
    let chunk = step_opts(spec).chunk;
    for rows in examples.chunks(b) {
        if model.spec.arch == vramplan_planner::Arch::T5 {
            let m = sft::seq2seq_rows(rows, t, model.numerics.decoder_start)?;
            total += crate::engine::t5::eval_loss_sum(model, &m, rows.len(), chunk)?;
            count += m.count;
            continue;
        }
        let m = sft::rows(rows, t)?;
        total += step::eval_loss_sum(
            model,
            &m.ids,
            &m.targets,
            m.weights.as_ref(),
            rows.len(),
            chunk,
        )?;
        count += m.count;
    }
    if count == 0 {
        return Err(bad(
            "--data",
            "the held-out examples have no response tokens to validate on",
        ));
    }
    Ok(total / count as f64)
}

/// Checkpoints every `--save-every` steps and at the run's last step.
struct Checkpointer<'o> {
    o: &'o Opts,
    end: u64,
}

impl Checkpointer<'_> {
    fn due(&self, step_no: u64) -> bool {
        (self.o.save_every > 0 && step_no.is_multiple_of(self.o.save_every)) || step_no == self.end
    }

    /// Saves `run` after the step `line` logs, and prunes to `keep`.
    fn save(&self, run: &Run, line: &MetricLine, keep: Keep) -> Result<PathBuf> {
        let o = self.o;
        let meta = Meta {
            step: line.step,
            data_rng: run.data_rng.0,
            data_position: run.corpus.train.position(),
            adam_t: run.opt.t,
            seed: o.seed,
            plan: o.plan_toml.clone(),
            plan_hash: checkpoint::plan_hash(&o.plan_toml),
            data: o
                .data
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "built-in".into()),
            total_steps: o.steps,
            learning_rate: o.lr,
            last_loss: line.loss,
            val_loss: line.val_loss,
            train_on: Some(o.train_on.name().into()),
            tokenizer: o.tokenizer.is_some(),
            checksums: Default::default(),
            hf_config: o.hf_config.clone(),
            init: o.init.as_ref().map(|p| p.display().to_string()),
        };
        Ok(checkpoint::save(&o.out, &run.model, &run.opt, &meta, keep)?)
    }
}

/// `OUT/metrics.jsonl` (a line per step) and the progress line every `--log-every` steps.
struct Progress {
    metrics: std::fs::File,
    path: PathBuf,
    speed: Speed,
    bytes_per_token: f64,
    log_every: u64,
    steps: u64,
    tokens: u64,
    seconds: f64,
    last_loss: f64,
    val_loss: f64,
    began: Instant,
}

impl Progress {
    /// Opens the log to append to after `start` steps (a fresh log when 0).
    fn open(o: &Opts, corpus: &Corpus, speed: Speed, start: u64) -> Result<Progress> {
        let path = o.out.join(rundir::METRICS);
        let metrics = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(start > 0)
            .truncate(start == 0)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Ok(Progress {
            metrics,
            path,
            speed,
            bytes_per_token: corpus.bytes_per_token,
            log_every: o.log_every.max(1),
            steps: o.steps,
            tokens: 0,
            seconds: 0.0,
            last_loss: f64::NAN,
            val_loss: f64::NAN,
            began: Instant::now(),
        })
    }

    /// Drops the metrics of steps after `step` (a run that went on past its last
    /// checkpoint), so a resumed run's log reads as one run.
    fn truncate(path: &Path, step: u64) -> Result<()> {
        let Ok(text) = std::fs::read_to_string(path) else {
            return Ok(());
        };
        let kept: String = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_some_and(|s| s <= step)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        Ok(crate::write_atomic(path, &kept)?)
    }

    fn bits_per_byte(&self, nats_per_token: f64) -> f64 {
        nats_per_token / self.bytes_per_token / std::f64::consts::LN_2
    }

    /// Logs a step; prints it when it is due or the run's first.
    fn record(&mut self, line: &MetricLine, first: bool) -> Result<()> {
        self.seconds += line.seconds;
        self.tokens += line.tokens;
        self.last_loss = line.loss;
        if let Some(v) = line.val_loss {
            self.val_loss = v;
        }
        writeln!(self.metrics, "{}", serde_json::to_string(line)?)
            .map_err(|e| Error::io(&self.path, e))?;
        if line.step.is_multiple_of(self.log_every) || line.step == self.steps || first {
            let rate = self.tokens as f64 / self.seconds.max(1e-9);
            println!(
                "step {:>6}/{}  loss {:.4}{}  {rate:>8.0} tok/s  MFU {:>4.1} %  peak {:.1} MiB",
                line.step,
                self.steps,
                line.loss,
                line.val_loss
                    .map(|v| format!("  val {v:.4} ({:.3} bits/byte)", self.bits_per_byte(v)))
                    .unwrap_or_default(),
                100.0 * self.speed.mfu(rate),
                line.peak_bytes as f64 / (1 << 20) as f64
            );
        }
        Ok(())
    }

    /// The run's summary: losses, speed, and the measured peak against the prediction.
    fn summary(
        &self,
        spec: &RunSpec,
        o: &Opts,
        run: &Run,
        meter: &Meter,
        steps: u64,
    ) -> Result<Summary> {
        let val_loss = if self.val_loss.is_nan() {
            validate(&run.model, &run.corpus, spec)?
        } else {
            self.val_loss
        };
        // The f32 inventory is the CPU's whole heap; the 16-bit one is the tensors', as on
        // a GPU.
        let against = if o.compute == DType::F32 {
            meter.measured
        } else {
            meter.measured_tensors
        };
        let peak_error =
            (against > 0).then(|| (o.predicted_peak as f64 - against as f64) / against as f64);
        let tokens_per_second = if self.seconds > 0.0 {
            self.tokens as f64 / self.seconds
        } else {
            0.0
        };
        let corpus = &run.corpus;
        Ok(Summary {
            steps,
            final_loss: self.last_loss,
            val_loss,
            val_bits_per_byte: self.bits_per_byte(val_loss),
            tokens_per_second,
            mfu: self.speed.mfu(tokens_per_second),
            matmul_flops_per_second: self.speed.matmul_flops,
            device: device_name(&o.device),
            compute_dtype: o.compute.as_str().to_string(),
            predicted_peak_bytes: o.predicted_peak,
            measured_peak_bytes: meter.measured,
            measured_by: meter.device.what().to_string(),
            measured_tensor_peak_bytes: meter.measured_tensors,
            process_peak_bytes: meter.process_peak(),
            peak_error,
            params: vramplan_planner::param_count(&spec.model),
            data: corpus.name.clone(),
            entropy_nats_per_byte: corpus.entropy.map(|e| e.rate),
            entropy_bits_per_byte: corpus.entropy.map(|e| e.rate / std::f64::consts::LN_2),
            excess_over_entropy_nats: corpus
                .entropy
                .map(|e| val_loss / corpus.bytes_per_token - e.rate),
            seconds: self.began.elapsed().as_secs_f64(),
        })
    }
}
